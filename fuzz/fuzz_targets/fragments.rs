//! The fragment-list reader (map/reduce inputs, PROTOCOL.md §11.7): no input may panic, and a
//! list that reads encodes and reads again to the same fragments.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spine_protocol::fragments;

fuzz_target!(|data: &[u8]| {
    if let Ok(list) = fragments::decode(data) {
        let again = fragments::decode(&fragments::encode(&list)).expect("encoded lists read");
        assert_eq!(again, list);
    }
});
