//! Finding and checking the stanzas of a stream (`cargo bench -p spine-protocol --bench
//! scan`): the stanza scanner (`spine_protocol::scan`) against rxml's namespace-resolving
//! parser, which every stanza Spine reads goes through today (under tokio-xmpp, xso and
//! minidom, which then build a tree on top: that is not measured here). Both read the
//! stanzas of a no-op job's life, 16 jobs' worth from one buffer; the figure is per stanza.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use minidom::rxml::{self, Parse as _};
use spine_protocol::scan::{scan, Scan, Scope};

mod common;
use common::{JOB, JOB_STANZAS};

const JOBS: usize = 16;

const HEADER: &str =
    "<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>";

fn reading(c: &mut Criterion) {
    let stanzas = JOB.repeat(JOBS);
    let doc = format!("{HEADER}{stanzas}");
    let scope = Scope {
        default_ns: "jabber:client",
        max_bytes: 1 << 20,
        max_depth: 64,
    };
    let mut g = c.benchmark_group("read_stanzas");
    g.throughput(Throughput::Elements((JOB_STANZAS * JOBS) as u64));
    g.bench_function("rxml_events", |b| {
        b.iter(|| {
            let mut p = rxml::Parser::default();
            let mut buf = doc.as_bytes();
            let mut events = 0usize;
            while let Ok(Some(_)) = p.parse(&mut buf, false) {
                events += 1;
            }
            assert!(buf.is_empty(), "rxml read it all");
            events
        })
    });
    g.bench_function("scanner", |b| {
        b.iter(|| {
            let mut rest = stanzas.as_str();
            let mut n = 0usize;
            while let Ok(Scan::Stanza(s)) = scan(rest, &scope) {
                rest = &rest[s.len..];
                n += 1;
            }
            assert_eq!(n, JOB_STANZAS * JOBS, "every stanza scanned");
            n
        })
    });
    g.finish();
}

criterion_group!(benches, reading);
criterion_main!(benches);
