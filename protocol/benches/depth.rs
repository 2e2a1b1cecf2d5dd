//! The depth guard on the bytes every XMPP connection reads (`cargo bench -p spine-protocol
//! --bench depth`): the server scans each client's stream, every client filters what the
//! server relays, so its cost is paid for every stanza of every job, twice. Measured on the
//! stanzas of a no-op job's life (a submit, the job request, its result, a status message
//! and a load presence) and on a 64 KiB chunk of base64, both in reads of 4 KiB as a socket
//! gives them.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use spine_protocol::depth::{DepthGuard, MAX_STREAM_DEPTH};

mod common;
use common::JOB;

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
