//! Bindings: (protocol, address prefix, port) -> label. Parsing, the map
//! key encoding, and the precedence rule lookups follow.

use std::{
    collections::{BTreeSet, HashMap},
    fmt,
    net::{IpAddr, Ipv4Addr},
};

use serde::{Deserialize, Serialize};
use steer_common::BindingKey;

use super::{
    compile,
    net::{Family, Protocol, SocketInfo},
    prefix::Prefix,
    text::clip,
};
use crate::error::{Error, Result, fail};

/// One binding; `port` 0 means every port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Binding {
    pub label: String,
    pub protocol: Protocol,
    pub prefix: Prefix,
    pub port: u16,
}

impl fmt::Display for Binding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {} {}", self.label, self.protocol, self.prefix, self.port)
    }
}

impl Binding {
    /// Its key in a binding set.
    pub fn key(&self) -> BindingKey {
        encode_key(self.protocol, &self.prefix, self.port)
    }

    /// Which of two bindings that match a lookup wins: the longer prefix
    /// (in the v4-mapped space), then the exact port over the wildcard.
    pub fn precedence(&self) -> (u8, bool) {
        (self.prefix.mapped().1, self.port != 0)
    }

    /// Whether a lookup of `protocol` to `addr`:`port` matches this binding.
    pub fn matches(&self, protocol: Protocol, addr: IpAddr, port: u16) -> bool {
        self.protocol == protocol && (self.port == 0 || self.port == port) && self.prefix.covers(addr)
    }

    /// The family of its prefix ("domain" in the metrics).
    pub fn family(&self) -> Family {
        if self.prefix.is_ipv4() { Family::Ipv4 } else { Family::Ipv6 }
    }

    /// Whether `info`'s socket can take connections this binding matches.
    pub fn served_by(&self, info: &SocketInfo) -> bool {
        info.protocol == self.protocol
            && match (info.family, self.family()) {
                (Family::Ipv4, Family::Ipv4) | (Family::Ipv6, Family::Ipv6) => true,
                (Family::Ipv6, Family::Ipv4) => !info.v6only,
                // Such as ::/0: IPv4 lookups match it as v4-mapped addresses.
                (Family::Ipv4, Family::Ipv6) => {
                    self.prefix.prefix_len() <= 96 && self.prefix.covers(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
                }
            }
    }
}

/// When `served` (a label's bindings) is not empty and none of them can use
/// `info`'s socket, the kinds they are ("tcp ipv4, udp ipv6"), for an error.
pub fn unserved<B: std::borrow::Borrow<Binding>>(info: &SocketInfo, served: &[B]) -> Option<String> {
    if served.is_empty() || served.iter().any(|b| b.borrow().served_by(info)) {
        return None;
    }
    let kinds: BTreeSet<String> =
        served.iter().map(|b| format!("{} {}", b.borrow().protocol, b.borrow().family())).collect();
    Some(kinds.into_iter().collect::<Vec<_>>().join(", "))
}

/// A whole set of bindings as `load-bindings` takes it: each key once,
/// in [`compile::order`], with its label as an index into `labels` (each
/// label once, checked). 24 bytes a binding, where a [`Binding`] takes 48
/// and an allocation for its label.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyedBindings {
    labels: Vec<String>,
    entries: Vec<(BindingKey, u32)>,
}

/// Labels numbered in order of first appearance, each checked once.
#[derive(Default)]
struct Labels {
    names: Vec<String>,
    index: HashMap<String, u32>,
}

impl Labels {
    fn number(&mut self, label: &str) -> Result<u32> {
        if let Some(&i) = self.index.get(label) {
            return Ok(i);
        }
        super::label::label_key(label)?;
        let i = self.names.len() as u32;
        self.names.push(label.to_owned());
        self.index.insert(label.to_owned(), i);
        Ok(i)
    }
}

impl KeyedBindings {
    /// The set `bindings` make, each label checked; fails when one key is
    /// bound to two labels (10.0.0.0/8 and ::ffff:10.0.0.0/104 are one key).
    pub fn from_bindings<'a>(bindings: impl IntoIterator<Item = &'a Binding>) -> Result<Self> {
        let mut labels = Labels::default();
        let mut entries = Vec::new();
        for b in bindings {
            entries.push((b.key(), labels.number(&b.label)?));
        }
        Self::new(labels.names, entries)
    }

    /// Sorts `entries` (labels numbered in order of first appearance, as
    /// `labels` lists them) and drops repeated keys; fails naming a key
    /// bound to two labels, the two of its labels that appear first.
    fn new(labels: Vec<String>, mut entries: Vec<(BindingKey, u32)>) -> Result<Self> {
        compile::order(&mut entries);
        for run in entries.chunk_by(|a, b| a.0 == b.0) {
            let first = run.iter().map(|e| e.1).min().expect("runs are never empty");
            if let Some(second) = run.iter().map(|e| e.1).filter(|l| *l != first).min() {
                let (protocol, prefix, port) = decode_key(&run[0].0)?;
                fail!(
                    Invalid,
                    "{protocol} {prefix} {port} is bound to both {} and {}",
                    labels[first as usize],
                    labels[second as usize]
                );
            }
        }
        entries.dedup_by_key(|e| e.0);
        Ok(Self { labels, entries })
    }

    /// The labels, in order of first appearance.
    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    /// Each key with the index of its label in [`labels`](Self::labels).
    pub fn entries(&self) -> &[(BindingKey, u32)] {
        &self.entries
    }

    /// The labels and the entries, to be taken apart.
    pub fn into_parts(self) -> (Vec<String>, Vec<(BindingKey, u32)>) {
        (self.labels, self.entries)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The binding a lookup resolves to: what the BPF program must answer.
pub fn resolve(bindings: &[Binding], protocol: Protocol, addr: IpAddr, port: u16) -> Option<&Binding> {
    bindings.iter().filter(|b| b.matches(protocol, addr, port)).max_by_key(|b| b.precedence())
}

/// What `bindings --json` prints and `load-bindings` reads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BindingsFile {
    pub bindings: Vec<Binding>,
}

impl BindingsFile {
    /// Parses a bindings file; `name` is what messages call it.
    pub fn parse(text: &str, name: &str) -> Result<Self> {
        serde_json::from_str(text).map_err(|e| invalid_file(&e, name))
    }

    /// Parses a bindings file straight into the set it names: what
    /// [`parse`](Self::parse) then [`KeyedBindings::from_bindings`] give,
    /// without a [`Binding`] per entry. A bad label is refused where it
    /// first appears, with its line.
    pub fn parse_keyed(text: &[u8], name: &str) -> Result<KeyedBindings> {
        Self::keyed(serde_json::Deserializer::from_slice(text), name)
    }

    /// [`parse_keyed`](Self::parse_keyed) as it reads `reader`: memory for
    /// the set, not for the text.
    pub fn read_keyed(reader: impl std::io::Read, name: &str) -> Result<KeyedBindings> {
        Self::keyed(serde_json::Deserializer::from_reader(reader), name)
    }

    fn keyed<'de, R: serde_json::de::Read<'de>>(
        mut de: serde_json::Deserializer<R>,
        name: &str,
    ) -> Result<KeyedBindings> {
        let mut labels = Labels::default();
        let mut entries = Vec::new();
        let seed = keyed::FileSeed { labels: &mut labels, entries: &mut entries };
        serde::de::DeserializeSeed::deserialize(seed, &mut de)
            .and_then(|()| de.end())
            .map_err(|e| invalid_file(&e, name))?;
        drop(de);
        KeyedBindings::new(labels.names, entries)
    }
}

/// A bindings file's parse error, `name` naming the file.
fn invalid_file(e: &serde_json::Error, name: &str) -> Error {
    if e.is_io() {
        return Error::Invalid(format!("reading {name}: {e}"));
    }
    Error::Invalid(format!("{name} is not a valid bindings file: {}", clip(&e.to_string())))
}

/// Deserializing a bindings file into [`KeyedBindings`]' parts as serde's
/// derive would into a [`BindingsFile`] (the same shapes accepted, the same
/// messages), but an entry at a time and each label numbered as it comes.
mod keyed {
    use std::fmt;

    use serde::de::{self, DeserializeSeed, Deserializer, Error as _, MapAccess, SeqAccess, Visitor};
    use steer_common::BindingKey;

    use super::{Labels, encode_key};
    use crate::model::{Prefix, Protocol};

    const FILE_FIELDS: &[&str] = &["bindings"];
    const FIELDS: &[&str] = &["label", "protocol", "prefix", "port"];

    /// A field name: its index in `fields`, or unknown.
    struct Field(&'static [&'static str]);

    impl<'de> DeserializeSeed<'de> for Field {
        type Value = usize;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<usize, D::Error> {
            d.deserialize_identifier(self)
        }
    }

    impl Visitor<'_> for Field {
        type Value = usize;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("field identifier")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<usize, E> {
            self.0.iter().position(|f| *f == v).ok_or_else(|| E::unknown_field(v, self.0))
        }
    }

    /// The whole file: `{"bindings": [...]}`.
    pub(super) struct FileSeed<'a> {
        pub labels: &'a mut Labels,
        pub entries: &'a mut Vec<(BindingKey, u32)>,
    }

    impl<'de> DeserializeSeed<'de> for FileSeed<'_> {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_struct("BindingsFile", FILE_FIELDS, self)
        }
    }

    impl<'de> Visitor<'de> for FileSeed<'_> {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("struct BindingsFile")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            let list = ListSeed { labels: self.labels, entries: self.entries };
            match seq.next_element_seed(list)? {
                Some(()) => Ok(()),
                None => Err(A::Error::invalid_length(0, &"struct BindingsFile with 1 element")),
            }
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            let mut seen = false;
            while let Some(_bindings) = map.next_key_seed(Field(FILE_FIELDS))? {
                if seen {
                    return Err(A::Error::duplicate_field("bindings"));
                }
                map.next_value_seed(ListSeed { labels: self.labels, entries: self.entries })?;
                seen = true;
            }
            if !seen {
                return Err(A::Error::missing_field("bindings"));
            }
            Ok(())
        }
    }

    /// The list of bindings.
    struct ListSeed<'a> {
        labels: &'a mut Labels,
        entries: &'a mut Vec<(BindingKey, u32)>,
    }

    impl<'de> DeserializeSeed<'de> for ListSeed<'_> {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_seq(self)
        }
    }

    impl<'de> Visitor<'de> for ListSeed<'_> {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a sequence")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            if let Some(n) = seq.size_hint() {
                self.entries.reserve(n);
            }
            while let Some(entry) = seq.next_element_seed(EntrySeed { labels: self.labels })? {
                self.entries.push(entry);
            }
            Ok(())
        }
    }

    /// One binding, as its key and label number.
    struct EntrySeed<'a> {
        labels: &'a mut Labels,
    }

    impl<'de> DeserializeSeed<'de> for EntrySeed<'_> {
        type Value = (BindingKey, u32);
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_struct("Binding", FIELDS, self)
        }
    }

    impl<'de> Visitor<'de> for EntrySeed<'_> {
        type Value = (BindingKey, u32);
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("struct Binding")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let short = |i| A::Error::invalid_length(i, &"struct Binding with 4 elements");
            let label = seq.next_element_seed(LabelSeed(self.labels))?.ok_or_else(|| short(0))?;
            let protocol: Protocol = seq.next_element()?.ok_or_else(|| short(1))?;
            let prefix: Prefix = seq.next_element()?.ok_or_else(|| short(2))?;
            let port: u16 = seq.next_element()?.ok_or_else(|| short(3))?;
            Ok((encode_key(protocol, &prefix, port), label))
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let (mut label, mut protocol, mut prefix, mut port) = (None, None, None, None);
            while let Some(field) = map.next_key_seed(Field(FIELDS))? {
                let seen = [label.is_some(), protocol.is_some(), prefix.is_some(), port.is_some()];
                if seen[field] {
                    return Err(A::Error::duplicate_field(FIELDS[field]));
                }
                match field {
                    0 => label = Some(map.next_value_seed(LabelSeed(&mut *self.labels))?),
                    1 => protocol = Some(map.next_value::<Protocol>()?),
                    2 => prefix = Some(map.next_value::<Prefix>()?),
                    _ => port = Some(map.next_value::<u16>()?),
                }
            }
            let label = label.ok_or_else(|| A::Error::missing_field("label"))?;
            let protocol = protocol.ok_or_else(|| A::Error::missing_field("protocol"))?;
            let prefix = prefix.ok_or_else(|| A::Error::missing_field("prefix"))?;
            let port = port.ok_or_else(|| A::Error::missing_field("port"))?;
            Ok((encode_key(protocol, &prefix, port), label))
        }
    }

    /// A label, numbered (and checked the first time it appears).
    struct LabelSeed<'a>(&'a mut Labels);

    impl<'de> DeserializeSeed<'de> for LabelSeed<'_> {
        type Value = u32;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<u32, D::Error> {
            d.deserialize_str(self)
        }
    }

    impl Visitor<'_> for LabelSeed<'_> {
        type Value = u32;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a string")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<u32, E> {
            self.0.number(v).map_err(E::custom)
        }
    }
}

/// The key of (protocol, prefix, port).
pub fn encode_key(protocol: Protocol, prefix: &Prefix, port: u16) -> BindingKey {
    let (addr, len) = prefix.mapped();
    BindingKey::new(protocol.number(), len, port, addr)
}

/// (protocol, prefix, port) back from a key.
pub fn decode_key(key: &BindingKey) -> Result<(Protocol, Prefix, u16)> {
    let Some(protocol) = Protocol::from_number(key.protocol) else {
        fail!(Invalid, "binding with unknown protocol {}", key.protocol)
    };
    Ok((protocol, Prefix::from_mapped(key.addr, key.prefixlen)?, key.port()))
}

#[cfg(test)]
pub(crate) mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::model::strategies;

    fn b(label: &str, protocol: Protocol, prefix: &str, port: u16) -> Binding {
        Binding { label: label.into(), protocol, prefix: prefix.parse().unwrap(), port }
    }

    #[test]
    fn huge_input_is_quoted_short() {
        let huge = "x".repeat(30 << 20);
        let file = format!(r#"{{"bindings":[{{"label":"a","protocol":"{huge}","prefix":"::1","port":1}}]}}"#);
        let msg = BindingsFile::parse(&file, "f.json").unwrap_err().to_string();
        assert!(msg.len() < 400 && msg.contains("unknown variant"), "{} bytes: {}", msg.len(), &msg[..100]);
    }

    #[test]
    fn keys_round_trip() {
        for (proto, prefix, port) in [
            (Protocol::Tcp, "127.0.0.0/8", 80),
            (Protocol::Udp, "::1/128", 0),
            (Protocol::Tcp, "0.0.0.0/0", 53),
            (Protocol::Udp, "::/0", 9),
            (Protocol::Tcp, "::ffff:0:0/96", 1),
            (Protocol::Udp, "2001:db8:ffff::/47", 65535),
        ] {
            let prefix: Prefix = prefix.parse().unwrap();
            let key = encode_key(proto, &prefix, port);
            let back = decode_key(&key).unwrap();
            // ::ffff:0:0/96 and 0.0.0.0/0 are one key; the IPv4 form comes back.
            assert_eq!(encode_key(back.0, &back.1, back.2), key);
            assert_eq!((back.0, back.2), (proto, port));
        }
        assert_eq!(
            decode_key(&encode_key(Protocol::Tcp, &"10.1.0.0/16".parse().unwrap(), 8)).unwrap().1.to_string(),
            "10.1.0.0/16"
        );
    }

    /// The prefix a key gives back for `prefix`: itself, but an IPv6
    /// prefix inside the v4-mapped region (::ffff:0:0/96 and longer) comes
    /// back as the IPv4 prefix it is the same key as.
    fn canonical(prefix: Prefix) -> Prefix {
        match prefix.addr() {
            IpAddr::V6(a) if prefix.prefix_len() >= 96 => match a.to_ipv4_mapped() {
                Some(v4) => Prefix::new(IpAddr::V4(v4), prefix.prefix_len() - 96).unwrap(),
                None => prefix,
            },
            _ => prefix,
        }
    }

    proptest! {
        #![proptest_config(strategies::config(1024))]

        /// encode_key then decode_key gives the binding back (up to the
        /// IPv4 / v4-mapped identity), and its key again.
        #[test]
        fn keys_round_trip_up_to_v4_mapping(
            protocol in strategies::protocol(),
            prefix in prop_oneof![strategies::any_prefix(), strategies::clustered_prefix()],
            port in any::<u16>(),
        ) {
            let key = encode_key(protocol, &prefix, port);
            let (p, back, q) = decode_key(&key).unwrap();
            prop_assert_eq!((p, back, q), (protocol, canonical(prefix), port));
            prop_assert_eq!(encode_key(p, &back, q), key);
            prop_assert_eq!(back.mapped(), prefix.mapped());
        }

        /// Any key decodes or fails without panicking; one that decodes is
        /// the key of what it decodes to, host bits cleared.
        #[test]
        fn any_key_decodes_or_fails_cleanly(
            protocol in prop_oneof![Just(6u8), Just(17u8), any::<u8>()],
            prefixlen in prop_oneof![0..=128u8, any::<u8>()],
            port in any::<u16>(),
            addr in any::<[u8; 16]>(),
        ) {
            let key = BindingKey { protocol, prefixlen, port: port.to_be_bytes(), addr };
            match decode_key(&key) {
                Ok((p, prefix, q)) => {
                    prop_assert_eq!(encode_key(p, &prefix, q), BindingKey::new(protocol, prefixlen, port, addr));
                }
                Err(e) => prop_assert!(Protocol::from_number(protocol).is_none() || prefixlen > 128, "{}", e),
            }
        }

    }

    proptest! {
        #![proptest_config(strategies::config(256))]

        /// A bindings file prints as JSON that parses back to it, whatever
        /// its labels hold (parsing checks the syntax, not the label rules).
        #[test]
        fn bindings_files_round_trip_as_json(
            bindings in proptest::collection::vec(
                prop_oneof![
                    strategies::any_binding(),
                    (any::<String>(), strategies::clustered_binding())
                        .prop_map(|(label, b)| Binding { label, ..b }),
                ],
                0..20,
            ),
        ) {
            let file = BindingsFile { bindings };
            let text = serde_json::to_string(&file).unwrap();
            prop_assert_eq!(&BindingsFile::parse(&text, "f").unwrap(), &file);
            let pretty = serde_json::to_string_pretty(&file).unwrap();
            prop_assert_eq!(BindingsFile::parse(&pretty, "f").unwrap(), file);
        }
    }

    /// A bindings file as JSON, of the given bindings, in one of the
    /// shapes serde's derive reads (an entry as an array, fields in any
    /// order) or one it refuses (a field missing, repeated or unknown, a
    /// wrong type, the text cut short).
    fn file_text() -> impl Strategy<Value = String> {
        let entry = prop_oneof![
            4 => strategies::clustered_binding(),
            1 => strategies::any_binding(),
            1 => ("[a-c ]{1,3}", strategies::clustered_binding()).prop_map(|(label, b)| Binding { label, ..b }),
        ];
        (
            proptest::collection::vec((entry, 0..12u8), 0..12),
            any::<bool>(),
            prop_oneof![8 => Just(None), 1 => (0..100usize).prop_map(Some)],
        )
            .prop_map(|(entries, pretty, cut)| {
                let entries: Vec<serde_json::Value> = entries
                    .into_iter()
                    .map(|(b, shape)| {
                        let mut v = serde_json::to_value(&b).unwrap();
                        let fields = v.as_object_mut().unwrap();
                        match shape {
                            0 => return serde_json::json!([b.label, b.protocol, b.prefix, b.port]),
                            1 => return serde_json::json!([b.label, b.protocol, b.prefix]),
                            2 => drop(fields.remove("port")),
                            3 => drop(fields.insert("extra".into(), 1.into())),
                            4 => drop(fields.insert("port".into(), "80".into())),
                            5 => drop(fields.insert("label".into(), 7.into())),
                            _ => {}
                        }
                        v
                    })
                    .collect();
                let file = serde_json::json!({ "bindings": entries });
                let mut text =
                    if pretty { serde_json::to_string_pretty(&file) } else { serde_json::to_string(&file) }.unwrap();
                if let Some(cut) = cut {
                    text.truncate(cut.min(text.len()));
                }
                text
            })
    }

    proptest! {
        #![proptest_config(strategies::config(512))]

        /// Parsing straight into a keyed set, from text or as it is read,
        /// gives what parsing into bindings and then keying them gives:
        /// the same set, or the same error, but where a bad label comes
        /// first (refused as it appears, with its line).
        #[test]
        fn keyed_parsing_agrees_with_parsing_then_keying(text in file_text(), sequence in any::<bool>()) {
            let text = if sequence { format!("[{text}]") } else { text };
            let want = BindingsFile::parse(&text, "f").and_then(|f| KeyedBindings::from_bindings(&f.bindings));
            let got = BindingsFile::parse_keyed(text.as_bytes(), "f");
            let read = BindingsFile::read_keyed(text.as_bytes(), "f");
            // The same but for where an error is: serde_json's reader
            // places some a column past where its slice parser does
            // (compared without the place, or the length of a clipped one).
            let unplaced = |e: &Error| {
                let message = e.to_string();
                let message = message.split(" at line ").next().unwrap_or_default();
                let clipped = message.strip_suffix(" bytes in all)").and_then(|m| m.rsplit_once("... ("));
                clipped.map_or(message, |(head, _)| head).to_string()
            };
            prop_assert_eq!(read.as_ref().map_err(unplaced), got.as_ref().map_err(unplaced));
            match (got, want) {
                (Ok(got), Ok(want)) => prop_assert_eq!(got, want),
                (Err(got), Err(want)) if !got.to_string().contains("bad label") => {
                    prop_assert_eq!(got.to_string(), want.to_string())
                }
                (Err(got), Err(_)) => prop_assert!(got.to_string().contains(" at line "), "{}", got),
                (got, want) => prop_assert!(false, "keyed {:?}, parsed {:?}", got, want),
            }
        }
    }

    #[test]
    fn keyed_files_name_what_is_wrong() {
        let parse = |text: &str| BindingsFile::read_keyed(text.as_bytes(), "f.json").map_err(|e| e.to_string());
        let set = parse(
            r#"{"bindings":[{"label":"b","protocol":"tcp","prefix":"10.0.0.0/8","port":80},
                {"label":"a","protocol":"udp","prefix":"::1","port":0},
                {"label":"b","protocol":"tcp","prefix":"::ffff:10.0.0.0/104","port":80}]}"#,
        )
        .unwrap();
        // Labels in order of first appearance, each key once, in compile order.
        assert_eq!(set.labels, ["b", "a"]);
        let keys: Vec<_> = set.entries.iter().map(|(k, l)| (decode_key(k).unwrap(), *l)).collect();
        assert_eq!(
            keys,
            [
                ((Protocol::Tcp, "10.0.0.0/8".parse().unwrap(), 80), 0),
                ((Protocol::Udp, "::1/128".parse().unwrap(), 0), 1)
            ]
        );
        let bad = parse(
            "{\"bindings\":[\n{\"label\":\"a\",\"protocol\":\"tcp\",\"prefix\":\"::1\",\"port\":1},\n{\"label\":\"a b\"}]}",
        );
        assert_eq!(
            bad.unwrap_err(),
            "f.json is not a valid bindings file: bad label \"a b\": use 1 to 63 letters, digits, '-', '_', '.' or ':' \
             at line 3 column 14"
        );
        let clash = r#"{"bindings":[{"label":"y","protocol":"udp","prefix":"::1","port":0},
            {"label":"x","protocol":"tcp","prefix":"::ffff:10.0.0.0/104","port":80},
            {"label":"y","protocol":"tcp","prefix":"10.0.0.0/8","port":80}]}"#;
        assert_eq!(parse(clash).unwrap_err(), "tcp 10.0.0.0/8 80 is bound to both y and x");
        let unreadable = BindingsFile::read_keyed(std::fs::File::open("/").unwrap(), "/").unwrap_err();
        assert!(unreadable.to_string().starts_with("reading /: "), "{unreadable}");
    }

    #[test]
    fn ipv4_lengths_sit_above_every_ipv6_one_but_128() {
        let v4_any = encode_key(Protocol::Tcp, &"0.0.0.0/0".parse().unwrap(), 80);
        let v4_host = encode_key(Protocol::Tcp, &"10.1.2.3".parse().unwrap(), 80);
        assert_eq!((v4_any.prefixlen, v4_host.prefixlen), (96, 128));
        assert_eq!(v4_host.addr, "10.1.2.3".parse::<Ipv4Addr>().unwrap().to_ipv6_mapped().octets());
    }

    /// Overlapping bindings: same prefix on two ports, nested prefixes,
    /// a host route, and an IPv6 /0 that covers IPv4 too.
    pub(crate) fn precedence_examples() -> Vec<Binding> {
        use Protocol::Tcp;
        vec![
            b("a", Tcp, "127.0.0.0/8", 0),
            b("b", Tcp, "127.0.0.0/8", 80),
            b("c", Tcp, "127.0.0.0/24", 0),
            b("d", Tcp, "127.0.0.5/32", 80),
            b("v6", Tcp, "::/0", 443),
        ]
    }

    #[test]
    fn precedence_is_longest_prefix_then_exact_port() {
        use Protocol::Tcp;
        let set = precedence_examples();
        let who = |addr: &str, port| resolve(&set, Tcp, addr.parse().unwrap(), port).map(|b| b.label.as_str());
        assert_eq!(who("127.1.0.1", 80), Some("b"));
        assert_eq!(who("127.1.0.1", 81), Some("a"));
        assert_eq!(who("127.0.0.9", 80), Some("c"));
        assert_eq!(who("127.0.0.5", 80), Some("d"));
        assert_eq!(who("127.0.0.5", 81), Some("c"));
        // ::/0 covers IPv4 as v4-mapped, but any IPv4 /0 or longer beats it.
        assert_eq!(who("10.0.0.1", 443), Some("v6"));
        assert_eq!(who("127.0.0.1", 443), Some("c"));
        assert_eq!(who("2001:db8::1", 443), Some("v6"));
        assert_eq!(who("10.0.0.1", 80), None);
        assert_eq!(resolve(&set, Protocol::Udp, "127.0.0.1".parse().unwrap(), 80), None);
    }

    #[test]
    fn sockets_serve_the_bindings_their_family_can_take() {
        let info = |family, v6only, protocol| SocketInfo {
            family,
            v6only,
            protocol,
            local: None,
            listening: true,
            connected: false,
            cookie: 1,
            inode: 1,
            netns_inode: 1,
        };
        let bind = |prefix: &str| b("x", Protocol::Tcp, prefix, 0);
        let v4 = info(Family::Ipv4, false, Protocol::Tcp);
        let dual = info(Family::Ipv6, false, Protocol::Tcp);
        let v6only = info(Family::Ipv6, true, Protocol::Tcp);
        assert!(bind("10.0.0.0/8").served_by(&v4));
        assert!(bind("10.0.0.0/8").served_by(&dual));
        assert!(!bind("10.0.0.0/8").served_by(&v6only));
        assert!(bind("::/0").served_by(&v4), "::/0 matches IPv4 as v4-mapped");
        assert!(!bind("2001:db8::/32").served_by(&v4));
        assert!(!bind("10.0.0.0/8").served_by(&info(Family::Ipv4, false, Protocol::Udp)));
        assert_eq!(unserved(&v6only, &[bind("10.0.0.0/8")]).as_deref(), Some("tcp ipv4"));
        assert_eq!(unserved::<Binding>(&v6only, &[]), None);
    }

    #[test]
    fn one_key_two_labels_is_refused() {
        let keyed = |set: &[Binding]| KeyedBindings::from_bindings(set);
        let set = [b("a", Protocol::Tcp, "10.0.0.0/8", 80), b("b", Protocol::Tcp, "::ffff:10.0.0.0/104", 80)];
        assert_eq!(keyed(&set).unwrap_err().to_string(), "tcp 10.0.0.0/8 80 is bound to both a and b");
        let set = [&set[..], &[b("a", Protocol::Tcp, "10.0.0.0/8", 80)]].concat();
        assert!(keyed(&set).unwrap_err().to_string().contains("bound to both a and b"));
        let reversed: Vec<Binding> = set.iter().rev().cloned().collect();
        assert!(keyed(&reversed).unwrap_err().to_string().contains("bound to both a and b"));
        let same = [b("a", Protocol::Tcp, "10.0.0.0/8", 80), b("a", Protocol::Tcp, "10.1.0.0/8", 80)];
        assert_eq!(keyed(&same).unwrap().len(), 1);
        assert!(keyed(&[b("bad label", Protocol::Tcp, "::/0", 1)]).is_err());
    }

    #[test]
    fn bindings_files_round_trip_and_reject_unknown_fields() {
        let file = BindingsFile {
            bindings: vec![b("web", Protocol::Tcp, "127.0.0.0/8", 80), b("dns", Protocol::Udp, "2001:db8::/64", 0)],
        };
        let text = serde_json::to_string(&file).unwrap();
        assert_eq!(BindingsFile::parse(&text, "f").unwrap(), file);
        assert!(text.contains(r#""prefix":"127.0.0.0/8""#), "{text}");
        let extra = r#"{"bindings":[],"more":1}"#;
        assert!(
            BindingsFile::parse(extra, "f.json")
                .unwrap_err()
                .to_string()
                .contains("f.json is not a valid bindings file")
        );
        let sctp = r#"{"bindings":[{"label":"x","protocol":"sctp","prefix":"::1","port":1}]}"#;
        let err = BindingsFile::parse(sctp, "f").unwrap_err();
        assert!(err.to_string().contains("unknown variant `sctp`"), "{err}");
    }
}
