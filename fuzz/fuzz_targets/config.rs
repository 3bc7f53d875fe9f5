//! `Config::parse` (what `apply` and `watch` read) on any text: it fails
//! with a short message or gives a valid config whose JSON parses back to it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use steer::model::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match Config::parse(text, "fuzz.json") {
        Ok(config) => {
            config.validate().expect("a parsed config is valid");
            let again = serde_json::to_string(&config).expect("a config prints as JSON");
            assert_eq!(Config::parse(&again, "again").expect("its JSON parses"), config);
        }
        Err(e) => assert!(e.chain().chars().count() < 1024, "{}", e.chain()),
    }
});
