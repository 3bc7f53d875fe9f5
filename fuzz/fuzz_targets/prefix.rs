//! `Prefix::from_str` on any text: it fails with a short message or gives
//! a prefix whose text parses back to it, and prints the same again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use steer::model::Prefix;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match text.parse::<Prefix>() {
        Ok(prefix) => {
            let shown = prefix.to_string();
            let back: Prefix = shown.parse().expect("a prefix's text parses");
            assert_eq!(back, prefix, "{text:?} -> {shown}");
            assert_eq!(back.to_string(), shown);
            let (addr, len) = prefix.mapped();
            assert_eq!(Prefix::from_mapped(addr, len).expect("its key decodes").mapped(), (addr, len));
        }
        Err(e) => assert!(e.to_string().chars().count() < 1024, "{e}"),
    }
});
