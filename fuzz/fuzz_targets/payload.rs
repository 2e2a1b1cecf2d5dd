//! Every Spine payload parser (`parse_payload` covers all seventeen elements), the presence
//! reader and the condition reader on arbitrary text: no input may panic, and whatever parses
//! serialises and parses again to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use minidom::Element;
use spine_protocol::{parse_payload, presence_payloads, SpineError};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(el) = text.parse::<Element>() else {
        return;
    };
    let _ = presence_payloads(std::slice::from_ref(&el));
    let _ = SpineError::from_condition_element(&el, None);
    match parse_payload(el) {
        Ok(p) => {
            let again = parse_payload(Element::from(p.clone()));
            assert_eq!(again.as_ref(), Ok(&p));
        }
        Err(e) => {
            let _ = e.to_spine_error();
        }
    }
});
