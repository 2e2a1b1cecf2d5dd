//! Issue 14, finding 6, the dispatcher's side: the bounds on open blobs come from its
//! configuration (the byte bounds following `max_blob` unless set), and bad values name their
//! key. The bounded assembler itself is tested in `spine_protocol::blob`.

use spine_dispatcher::DispatcherConfig;
use std::time::Duration;

fn config(toml: &str) -> Result<DispatcherConfig, String> {
    DispatcherConfig::from_toml(&format!(
        "jid = \"d@example.com/d\"\npassword = \"x\"\n{toml}\n"
    ))
    .map_err(|e| e.to_string())
}

#[test]
fn open_blob_bounds_follow_max_blob_unless_set() {
    let mib = 1u64 << 20;
    let l = config("").unwrap().blob_limits(Duration::from_secs(300));
    assert_eq!(
        (
            l.max_size,
            l.per_sender,
            l.per_sender_bytes,
            l.total,
            l.total_bytes
        ),
        (64 * mib, 64, 256 * mib, 4096, 1024 * mib)
    );
    let l = config("max_blob = \"1GiB\"")
        .unwrap()
        .blob_limits(Duration::ZERO);
    assert_eq!(
        (l.per_sender_bytes, l.total_bytes),
        (4096 * mib, 16384 * mib)
    );
    let l = config(
        "max_open_blobs_per_sender = 2\nmax_open_blob_bytes_per_sender = \"100MiB\"\nmax_open_blobs = 10\nmax_open_blob_bytes = \"200MiB\"",
    )
    .unwrap()
    .blob_limits(Duration::ZERO);
    assert_eq!(
        (l.per_sender, l.per_sender_bytes, l.total, l.total_bytes),
        (2, 100 * mib, 10, 200 * mib)
    );
}

#[test]
fn bad_blob_bounds_name_their_key() {
    for (toml, key) in [
        (
            "max_open_blobs_per_sender = 0",
            "max_open_blobs_per_sender: must be at least 1",
        ),
        (
            "max_open_blobs = 1\nmax_open_blobs_per_sender = 2",
            "max_open_blobs: must be at least max_open_blobs_per_sender",
        ),
        (
            "max_open_blob_bytes_per_sender = \"1MiB\"",
            "max_open_blob_bytes_per_sender: must be at least max_blob",
        ),
        (
            "max_open_blob_bytes = \"100MiB\"",
            "max_open_blob_bytes: must be at least max_open_blob_bytes_per_sender",
        ),
    ] {
        let e = config(toml).err().unwrap_or_default();
        assert!(e.contains(key), "{toml}: {e}");
    }
}
