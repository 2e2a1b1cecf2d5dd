//! The attribute-filter grammar (PROTOCOL.md §15): no input may panic, and a filter's
//! canonical text parses back to the same filter.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spine_protocol::Filter;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(f) = Filter::parse(text) {
        let again = Filter::parse(&f.to_string()).expect("the canonical form parses");
        assert_eq!(again, f);
    }
});
