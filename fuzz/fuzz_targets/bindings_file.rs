//! `BindingsFile::parse` (what `load-bindings` reads) on any text: it
//! fails with a short message or gives a file whose JSON parses back to it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use steer::model::BindingsFile;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match BindingsFile::parse(text, "fuzz.json") {
        Ok(file) => {
            let again = serde_json::to_string(&file).expect("a bindings file prints as JSON");
            assert_eq!(BindingsFile::parse(&again, "again").expect("its JSON parses"), file);
        }
        Err(e) => assert!(e.chain().chars().count() < 1024, "{}", e.chain()),
    }
});
