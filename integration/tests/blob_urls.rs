//! The blob store's HTTP endpoints on a real dispatcher (issue 17): a signed URL is the only
//! credential of `GET /v1/blobs/{sha256}` and `PUT /v1/uploads/{job}`, so every way of
//! bending one — a changed signature, an expired one, a URL made for another job or agent, a
//! path outside the store — is refused and counted, while the URL as signed works; and the
//! store's quota refuses an upload whole, with an error that names the setting.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;
use spine_dispatcher::blobs::parse_sha256;
use spine_dispatcher::signing::{BlobGrant, UploadGrant, UrlKey};
use spine_integration::farm::start_http_dispatcher;
use spine_integration::TestServer;

const ACCOUNTS: &[(&str, &str)] = &[("dispatcher", "pw-d")];

fn http() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// `n` bytes that do not repeat.
fn bytes(n: usize, seed: u8) -> Vec<u8> {
    (0..n as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 ^ seed)
        .collect()
}

async fn put_blob(base: &str, body: Vec<u8>) -> (u16, Value) {
    let r = http()
        .put(format!("{base}/v1/blobs"))
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (
        status,
        serde_json::from_slice(&r.bytes().await.unwrap()).unwrap(),
    )
}

/// A counter of `/metrics` (0 when absent).
async fn metric(base: &str, line: &str) -> u64 {
    let text = http()
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(line)?.trim().parse().ok())
        .unwrap_or(0)
}

async fn status_of(url: &str) -> u16 {
    http().get(url).send().await.unwrap().status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_urls_work_as_signed_and_nothing_else_does() {
    let server = TestServer::start(ACCOUNTS).await;
    let dir = tempfile::tempdir().unwrap();
    let (dispatcher, base) = start_http_dispatcher(&server, dir.path(), "").await;
    let data = bytes(300 * 1024, 1);
    let (st, stored) = put_blob(&base, data.clone()).await;
    assert_eq!(st, 201, "{stored}");
    assert_eq!(stored["size"], data.len());
    let sha = parse_sha256(stored["sha256"].as_str().unwrap()).unwrap();
    // The dispatcher's own key, as it signs the URLs it hands out.
    let key = UrlKey::load_or_create(&dir.path().join("url.key")).unwrap();
    let grant = BlobGrant {
        sha256: sha,
        job: "job-1".parse().unwrap(),
        agent: "agent1@localhost".parse().unwrap(),
    };
    let url = grant.url(&base, now_s() + 60, &key);

    // As signed: the bytes, whole and by range.
    let got = http().get(&url).send().await.unwrap();
    assert_eq!(got.status().as_u16(), 200);
    assert_eq!(got.bytes().await.unwrap().as_ref(), &data[..]);
    let part = http()
        .get(&url)
        .header("range", "bytes=10-19")
        .send()
        .await
        .unwrap();
    assert_eq!(part.status().as_u16(), 206);
    assert_eq!(
        part.headers()["content-range"].to_str().unwrap(),
        format!("bytes 10-19/{}", data.len())
    );
    assert_eq!(part.bytes().await.unwrap().as_ref(), &data[10..20]);
    let tail = http()
        .get(&url)
        .header("range", "bytes=-5")
        .send()
        .await
        .unwrap();
    assert_eq!(
        tail.bytes().await.unwrap().as_ref(),
        &data[data.len() - 5..]
    );
    let past = http()
        .get(&url)
        .header("range", format!("bytes={}-", data.len()))
        .send()
        .await
        .unwrap();
    assert_eq!(past.status().as_u16(), 416);

    // Bent: each refused with 403, and counted.
    let sig_at = url.find("sig=").unwrap() + 4;
    let mut tampered = url.clone();
    let flipped = if &url[sig_at..sig_at + 1] == "A" {
        "B"
    } else {
        "A"
    };
    tampered.replace_range(sig_at..sig_at + 1, flipped);
    let other_job = url.replace("job=job-1", "job=job-2");
    let other_agent = url.replace("agent=agent1%40localhost", "agent=agent2%40localhost");
    for (bent, how) in [
        (&tampered, "tampered signature"),
        (&other_job, "replayed for another job"),
        (&other_agent, "another agent's URL"),
    ] {
        assert_ne!(bent, &url, "{how}: the URL did not change");
        assert_eq!(status_of(bent).await, 403, "{how}");
    }
    let expired = grant.url(&base, now_s() - 10, &key);
    assert_eq!(status_of(&expired).await, 403, "expired");
    assert_eq!(
        metric(&base, "spine_blob_url_refusals_total{reason=\"signature\"}").await,
        3
    );
    assert_eq!(
        metric(&base, "spine_blob_url_refusals_total{reason=\"expired\"}").await,
        1
    );

    // Outside the store: 404, never a file of the data directory.
    let unknown = BlobGrant {
        sha256: [7; 32],
        ..grant.clone()
    }
    .url(&base, now_s() + 60, &key);
    assert_eq!(status_of(&unknown).await, 404, "a blob not stored");
    for path in [
        "/v1/blobs/not-hex",
        "/v1/blobs/..%2F..%2Furl.key",
        "/v1/blobs/..%2Fjobs.redb",
    ] {
        let r = http().get(format!("{base}{path}")).send().await.unwrap();
        let st = r.status().as_u16();
        let body = r.bytes().await.unwrap();
        assert_eq!(st, 404, "{path}");
        assert!(body.len() < 1024, "{path}: {} bytes served", body.len());
    }

    // An upload slot's URL: another size is refused before a byte is stored; as signed, the
    // bytes are checked against the slot, and a slot the dispatcher never granted is 409.
    let out = bytes(100 * 1024, 2);
    let want: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(&out).into();
    let upload = UploadGrant {
        job: "job-1".parse().unwrap(),
        agent: "agent1@localhost".parse().unwrap(),
        attempt: 1,
        size: out.len() as u64,
        sha256: want,
    };
    let put_url = upload.url(&base, now_s() + 60, &key);
    let resized = put_url.replace(&format!("size={}", out.len()), "size=10");
    let r = http().put(&resized).body(out.clone()).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 403, "another size in the URL");
    let r = http()
        .put(&put_url)
        .body(bytes(100 * 1024, 3))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400, "bytes that are not the slot's");
    let r = http().put(&put_url).body(out).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 409, "no such slot was granted");
    assert_eq!(
        metric(&base, "spine_blob_url_refusals_total{reason=\"signature\"}").await,
        4
    );
    dispatcher.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_blob_quota_refuses_an_upload_whole_and_says_which_setting() {
    let server = TestServer::start(ACCOUNTS).await;
    let dir = tempfile::tempdir().unwrap();
    let extra = "max_blob = \"64KiB\"\nmax_input = \"1MiB\"\nblob_quota = \"1MiB\"\n";
    let (dispatcher, base) = start_http_dispatcher(&server, dir.path(), extra).await;
    let (st, first) = put_blob(&base, bytes(700 * 1024, 4)).await;
    assert_eq!(st, 201, "{first}");
    let (st, refused) = put_blob(&base, bytes(700 * 1024, 5)).await;
    assert_eq!(st, 507, "{refused}");
    assert_eq!(refused["error"], "storage-full", "{refused}");
    let message = refused["message"].as_str().unwrap();
    assert!(message.contains("blob_quota"), "{message}");
    assert_eq!(metric(&base, "spine_blob_quota_refusals_total").await, 1);
    assert_eq!(metric(&base, "spine_blob_store_blobs").await, 1);
    // Nothing half-written: one complete blob, no temporary file.
    let blobs = dir.path().join("blobs");
    let tmp: Vec<_> = std::fs::read_dir(blobs.join("tmp")).unwrap().collect();
    assert!(tmp.is_empty(), "{tmp:?}");
    let stored: usize = std::fs::read_dir(blobs.join("sha256"))
        .unwrap()
        .map(|d| std::fs::read_dir(d.unwrap().path()).unwrap().count())
        .sum();
    assert_eq!(stored, 1);
    dispatcher.stop();
}
