//! The stanza scanner against rxml: on any input, and on every cut of it the first byte
//! chooses, `scan` never panics, never accepts what rxml refuses, never refuses what rxml
//! accepts (but where it is documented to be stricter), and reports the stanza rxml reads:
//! the same length, name, namespace, attributes and children
//! (`spine_protocol::scan::differential::check`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use spine_protocol::scan::differential::check;

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let Ok(s) = std::str::from_utf8(rest) else {
        return;
    };
    if let Err(e) = check(s) {
        panic!("the scanner and rxml differ on {e}");
    }
    let step = usize::from(first.max(1));
    for (cut, _) in s.char_indices().step_by(step) {
        if let Err(e) = check(&s[..cut]) {
            panic!("the scanner and rxml differ on {e}");
        }
    }
});
