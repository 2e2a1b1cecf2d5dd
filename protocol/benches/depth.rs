//! The depth guard on the bytes every XMPP connection reads (`cargo bench -p spine-protocol
//! --bench depth`): the server scans each client's stream, every client filters what the
//! server relays, so its cost is paid for every stanza of every job, twice. Measured on the
//! stanzas of a no-op job's life (a submit, the job request, its result, a status message
//! and a load presence) and on a 64 KiB chunk of base64, both in reads of 4 KiB as a socket
//! gives them.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use spine_protocol::depth::{DepthGuard, MAX_STREAM_DEPTH};

/// The stanzas of one no-op job, as they cross the server (PROTOCOL.md's shapes).
const JOB: &str = concat!(
    "<iq type='set' id='s1' to='dispatcher@localhost/main' from='webapp@localhost/app' xmlns='jabber:client'>",
    "<submit xmlns='urn:spine:job:1' capability='text.upper' watch='true'><args/><input mime='text/plain'>aGVsbG8=</input></submit></iq>",
    "<iq type='result' id='s1' to='webapp@localhost/app' from='dispatcher@localhost/main' xmlns='jabber:client'>",
    "<accepted xmlns='urn:spine:job:1' job='0190f5e2-7c1a-7d3e-9a51-3b0c2f9d1e44' state='dispatched'/></iq>",
    "<iq type='set' id='j-8f3a-1' to='agent1@localhost/worker' from='dispatcher@localhost/main' xmlns='jabber:client'>",
    "<job xmlns='urn:spine:job:1' id='0190f5e2-7c1a-7d3e-9a51-3b0c2f9d1e44' capability='text.upper' attempt='1' deadline-ms='300000'>",
    "<args/><input mime='text/plain'>aGVsbG8=</input></job></iq>",
    "<iq type='result' id='j-8f3a-1' to='dispatcher@localhost/main' from='agent1@localhost/worker' xmlns='jabber:client'>",
    "<result xmlns='urn:spine:job:1' job='0190f5e2-7c1a-7d3e-9a51-3b0c2f9d1e44' attempt='1' elapsed-ms='0'><output mime='text/plain'>SEVMTE8=</output></result></iq>",
    "<presence to='dispatcher@localhost/main' from='agent1@localhost/worker' xmlns='jabber:client'>",
    "<load xmlns='urn:spine:load:1' seq='42' slots='64' in-flight='3' loadavg='0.52' mem-free-mb='20123'/></presence>",
    "<message type='normal' to='webapp@localhost/app' from='dispatcher@localhost/main' xmlns='jabber:client'>",
    "<job-status xmlns='urn:spine:job:1' job='0190f5e2-7c1a-7d3e-9a51-3b0c2f9d1e44' state='succeeded' attempts='1'>",
    "<output mime='text/plain'>SEVMTE8=</output></job-status></message>",
);

fn depth(c: &mut Criterion) {
    let stanzas: Vec<u8> = JOB.repeat(16).into_bytes();
    let chunk: Vec<u8> = format!(
        "<message xmlns='jabber:client'><chunk xmlns='urn:spine:job:1' seq='1'>{}</chunk></message>",
        "QUJDRA".repeat(64 * 1024 / 6)
    )
    .into_bytes();
    let mut g = c.benchmark_group("depth_guard");
    for (name, bytes) in [("job_stanzas", &stanzas), ("base64_chunk", &chunk)] {
        g.throughput(Throughput::Bytes(bytes.len() as u64));
        g.bench_function(format!("scan/{name}"), |b| {
            b.iter(|| {
                let mut guard = DepthGuard::new(MAX_STREAM_DEPTH);
                for read in bytes.chunks(4096) {
                    guard.scan(read).expect("within the limit");
                }
                guard.depth()
            })
        });
        let mut out = Vec::with_capacity(bytes.len() + 1);
        g.bench_function(format!("filter/{name}"), |b| {
            b.iter(|| {
                let mut guard = DepthGuard::new(MAX_STREAM_DEPTH);
                out.clear();
                for read in bytes.chunks(4096) {
                    guard.filter(read, &mut out);
                }
                out.len()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, depth);
criterion_main!(benches);
