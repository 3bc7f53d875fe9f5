//! What `load-bindings` reads, on any text: `BindingsFile::parse` fails
//! with a short message or gives a file whose JSON parses back to it; and
//! the parsers `load-bindings` uses (straight into a keyed set, from text
//! and as it reads) give what parsing then keying gives: the same set, or
//! the same error but where a bad label comes first (refused as it appears).
#![no_main]

use libfuzzer_sys::fuzz_target;
use steer::model::{BindingsFile, KeyedBindings};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let parsed = BindingsFile::parse(text, "fuzz.json");
    match &parsed {
        Ok(file) => {
            let again = serde_json::to_string(file).expect("a bindings file prints as JSON");
            assert_eq!(&BindingsFile::parse(&again, "again").expect("its JSON parses"), file);
        }
        Err(e) => assert!(e.chain().chars().count() < 1024, "{}", e.chain()),
    }
    let want = parsed.and_then(|f| KeyedBindings::from_bindings(&f.bindings));
    let got = BindingsFile::parse_keyed(data, "fuzz.json");
    let read = BindingsFile::read_keyed(data, "fuzz.json");
    // serde_json's reader places some errors a column past its slice
    // parser: compared without the place (or the length of a clipped one).
    let unplaced = |e: &steer::Error| {
        let message = e.to_string();
        let message = message.split(" at line ").next().unwrap_or_default();
        let clipped = message.strip_suffix(" bytes in all)").and_then(|m| m.rsplit_once("... ("));
        clipped.map_or(message, |(head, _)| head).to_string()
    };
    assert_eq!(read.as_ref().map_err(unplaced), got.as_ref().map_err(unplaced));
    match (got, want) {
        (Ok(got), Ok(want)) => assert_eq!(got, want),
        (Err(got), Err(want)) => {
            assert!(got.chain().chars().count() < 1024, "{}", got.chain());
            if !got.to_string().contains("bad label") {
                assert_eq!(got.to_string(), want.to_string());
            }
        }
        (got, want) => panic!("keyed {got:?}, parsed {want:?}"),
    }
});
