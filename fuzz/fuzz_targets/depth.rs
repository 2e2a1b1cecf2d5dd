//! The depth guard against the real parser: on any input split anywhere, `scan` and
//! `filter` never panic; wherever rxml accepts a document, the guard counts exactly rxml's
//! deepest nesting; and `filter`'s output of an accepted document is accepted too, with no
//! element deeper than the limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use minidom::rxml::{Event, Parse, Parser};
use spine_protocol::depth::DepthGuard;

/// rxml's deepest nesting, counted from its events without building a tree (a tree of a
/// deep input is what the guard exists to prevent). `None` if rxml refuses the input.
fn rxml_deepest(mut doc: &[u8]) -> Option<u32> {
    let mut p = Parser::new();
    let (mut depth, mut deepest) = (0u32, 0u32);
    loop {
        match p.parse(&mut doc, true) {
            Ok(Some(Event::StartElement(..))) => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            Ok(Some(Event::EndElement(..))) => depth -= 1,
            Ok(Some(_)) => {}
            Ok(None) => return Some(deepest),
            Err(_) => return None,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, doc)) = data.split_first() else {
        return;
    };
    let split = usize::from(first.max(1));
    let limit = u32::from(first % 8) + 1;

    let mut counter = DepthGuard::new(u32::MAX);
    for c in doc.chunks(split) {
        counter.scan(c).expect("no limit");
    }
    let mut guard = DepthGuard::new(limit);
    let mut out = Vec::new();
    for c in doc.chunks(split) {
        guard.filter(c, &mut out);
    }
    if let Some(deepest) = rxml_deepest(doc) {
        assert_eq!(counter.deepest(), deepest, "scan vs rxml");
        let filtered = rxml_deepest(&out).expect("filter keeps an accepted document well-formed");
        assert_eq!(filtered, deepest.min(limit), "filter output depth");
    }
});
