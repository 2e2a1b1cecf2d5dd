//! Writing the stanzas of a stream (`cargo bench -p spine-protocol --bench emit`): the direct
//! writer (`spine_protocol::emit`) against xso's serialisers into rxml's encoder (what
//! tokio-xmpp's stanza stream and the server's general writer run). Both write the stanzas of
//! a no-op job's life that the direct writer takes (five of six: presence is the general
//! writer's); the figure is per stanza.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use xmpp_parsers::stanza::Stanza;

mod common;
use common::JOB;

fn writing(c: &mut Criterion) {
    // The job's stanzas, typed, one document each.
    let mut stanzas = Vec::new();
    let mut rest = JOB;
    for end in [
        "</iq>",
        "</iq>",
        "</iq>",
        "</iq>",
        "</presence>",
        "</message>",
    ] {
        let at = rest.find(end).expect("the stanza's end") + end.len();
        let st: Stanza = xso::from_bytes(&rest.as_bytes()[..at]).expect("a stanza");
        rest = &rest[at..];
        if !matches!(st, Stanza::Presence(_)) {
            stanzas.push(st);
        }
    }
    let mut g = c.benchmark_group("write_stanzas");
    g.throughput(Throughput::Elements(stanzas.len() as u64));
    g.bench_function("xso_rxml", |b| {
        b.iter(|| {
            stanzas
                .iter()
                .map(|st| xso::to_vec(st).expect("writes").len())
                .sum::<usize>()
        })
    });
    g.bench_function("emit", |b| {
        let mut out = Vec::with_capacity(4096);
        b.iter(|| {
            out.clear();
            for st in &stanzas {
                assert_eq!(spine_protocol::emit::stanza(st, &mut out), Ok(true));
            }
            out.len()
        })
    });
    g.finish();
}

criterion_group!(benches, writing);
criterion_main!(benches);
