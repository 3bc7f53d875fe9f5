//! Labels: the names bindings route to and sockets register under.

use steer_common::{LabelName, MAX_LABEL_LEN};

use crate::error::{Result, fail};

/// Checks a label against the rules and encodes it as the `labels` key.
pub fn label_key(label: &str) -> Result<LabelName> {
    let ok = !label.is_empty()
        && label.len() <= MAX_LABEL_LEN
        && label.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
    if !ok {
        fail!(
            Invalid,
            "bad label {}: use 1 to {MAX_LABEL_LEN} letters, digits, '-', '_', '.' or ':'",
            super::text::bounded(label)
        );
    }
    let mut key = LabelName([0; LabelName::SIZE]);
    key.0[..label.len()].copy_from_slice(label.as_bytes());
    Ok(key)
}

/// The label a `labels` key names.
pub fn label_from_key(key: &LabelName) -> String {
    String::from_utf8_lossy(key.as_bytes()).into_owned()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::model::strategies;

    proptest! {
        #![proptest_config(strategies::config(1024))]

        /// Every valid label encodes to a key that names it back.
        #[test]
        fn valid_labels_round_trip_through_keys(label in strategies::label()) {
            prop_assert_eq!(label_from_key(&label_key(&label).unwrap()), label);
        }

        /// Any text is either a valid label that round-trips, or refused
        /// with a short message; which one, the rules say.
        #[test]
        fn any_text_is_a_label_or_refused(
            text in prop_oneof![
                proptest::collection::vec(any::<char>(), 0..100).prop_map(String::from_iter),
                "[A-Za-z0-9._:/ -]{0,70}",
            ],
        ) {
            let valid = (1..=MAX_LABEL_LEN).contains(&text.len())
                && text.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c));
            match label_key(&text) {
                Ok(key) => {
                    prop_assert!(valid, "{:?} accepted", text);
                    prop_assert_eq!(label_from_key(&key), text);
                }
                Err(e) => {
                    prop_assert!(!valid, "{:?} refused: {}", text, e);
                    prop_assert!(e.to_string().chars().count() < 1024, "{}", e);
                }
            }
        }
    }

    #[test]
    fn labels_follow_the_rules() {
        assert_eq!(label_from_key(&label_key("web-1.a_b:c").unwrap()), "web-1.a_b:c");
        assert!(label_key(&"x".repeat(MAX_LABEL_LEN)).is_ok());
        for bad in ["", "has space", "tab\t", "ü", &"x".repeat(MAX_LABEL_LEN + 1)] {
            assert!(label_key(bad).unwrap_err().to_string().starts_with("bad label"), "{bad:?}");
        }
        assert!(label_key(&"x".repeat(1 << 20)).unwrap_err().to_string().len() < 250);
    }
}
