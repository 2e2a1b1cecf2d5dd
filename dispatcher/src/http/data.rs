//! The HTTP side of the data plane (docs/dispatcher.md §4, PROTOCOL.md §13.4): large
//! payloads stream between the blob store ([`crate::blobs`]) and the network, never through
//! the dispatcher's core, a JSON body or base64.
//!
//! - `GET /v1/blobs/{sha256}?job&agent&exp&sig` — an agent fetches a job's input by the URL
//!   its job IQ carried; the signature (made by the core, [`crate::core::data`]) is the only
//!   credential, so these routes sit outside token authentication.
//! - `PUT /v1/uploads/{job}?attempt&agent&size&sha256&exp&sig` — an agent uploads an output
//!   to the slot it was granted; the bytes must have the size and hash it announced. The core
//!   is told before the 201, so the agent's result (sent after) finds them.
//! - `PUT /v1/blobs` — a web app uploads bytes once (token-authenticated) and names them by
//!   hash in jobs (`input_ref`). Among dispatchers sharing PostgreSQL the bytes are copied
//!   there before the 201, and a dispatcher asked for a blob it lacks copies it from there
//!   ([`stored_ref`], [`fetch_fragments`]): the upload and the job may go to different
//!   dispatchers (a load balancer in front of them).
//! - `GET /v1/jobs/{id}/output` — a job's output as raw bytes.
//!
//! Downloads answer a single `Range` (RFC 9110 §14); several ranges get the whole body, which
//! the RFC allows. A small hand-written parser rather than tower-http's `ServeFile`: outputs
//! may be inline in the job record, not files, and the file's name is the blob's hash.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::StreamExt as _;

use super::auth::Caller;
use super::error::ApiError;
use super::openapi::{BlobStored, ErrorBody};
use super::request::job_id;
use super::routes::{change, find_job, mismatch};
use super::Handle;
use crate::blobs::{parse_sha256, BlobError, BlobStore, Stored};
use crate::core::{ApiReply, ApiRequest};
use crate::jobs::{Body as JobBody, Recorded};
use crate::signing::UrlKey;
use crate::signing::{BlobGrant, Grant, QueryError, SigError, SignedUrl, UploadGrant};

/// A transfer that moves no byte for this long is cut off.
const IDLE: Duration = Duration::from_secs(30);

/// One blocking read per piece when streaming a file out: large enough that the hop to the
/// blocking pool and the socket write per piece are noise.
const READ_BUF: usize = 1 << 20;

/// Pieces read ahead of the socket: the disk read of the next piece overlaps the network
/// write of this one, at a cost of this many pieces of memory per download.
const READ_AHEAD: usize = 2;

/// What the data routes share: the store, the signing key, and counters for `/metrics`.
#[derive(Clone)]
pub(crate) struct DataHandle {
    pub(crate) blobs: BlobStore,
    pub(crate) key: Arc<UrlKey>,
    pub(crate) counters: Arc<Counters>,
}

/// Refusals of signed URLs, by reason.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) bad_signature: AtomicU64,
    pub(crate) expired: AtomicU64,
    pub(crate) not_found: AtomicU64,
    pub(crate) fetched: AtomicU64,
    pub(crate) uploaded: AtomicU64,
}

impl Counters {
    /// The counters as Prometheus text.
    pub(crate) fn render(&self, blobs: &BlobStore) -> String {
        let m = blobs.metrics();
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        format!(
            "# HELP spine_blob_store_bytes Bytes in the blob store (complete blobs).\n\
             # TYPE spine_blob_store_bytes gauge\n\
             spine_blob_store_bytes {}\n\
             # HELP spine_blob_store_blobs Blobs in the blob store.\n\
             # TYPE spine_blob_store_blobs gauge\n\
             spine_blob_store_blobs {}\n\
             # HELP spine_blob_store_quota_bytes The blob store's quota (0: none).\n\
             # TYPE spine_blob_store_quota_bytes gauge\n\
             spine_blob_store_quota_bytes {}\n\
             # HELP spine_blob_quota_refusals_total Uploads and payloads refused at the blob store's quota.\n\
             # TYPE spine_blob_quota_refusals_total counter\n\
             spine_blob_quota_refusals_total {}\n\
             # HELP spine_blob_dedup_total Writes whose bytes were already stored.\n\
             # TYPE spine_blob_dedup_total counter\n\
             spine_blob_dedup_total {}\n\
             # HELP spine_blob_url_refusals_total Signed URLs refused (403), by reason.\n\
             # TYPE spine_blob_url_refusals_total counter\n\
             spine_blob_url_refusals_total{{reason=\"signature\"}} {}\n\
             spine_blob_url_refusals_total{{reason=\"expired\"}} {}\n\
             # HELP spine_blob_fetches_total Inputs fetched by agents over HTTP.\n\
             # TYPE spine_blob_fetches_total counter\n\
             spine_blob_fetches_total {}\n\
             # HELP spine_blob_uploads_total Outputs uploaded by agents to their slots.\n\
             # TYPE spine_blob_uploads_total counter\n\
             spine_blob_uploads_total {}\n",
            m.used_bytes,
            m.blobs,
            m.quota.unwrap_or(0),
            m.quota_refusals,
            m.dedup_hits,
            get(&self.bad_signature),
            get(&self.expired),
            get(&self.fetched),
            get(&self.uploaded),
        )
    }
}

fn forbidden(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "not-authorized", message)
}

fn data_of(h: &Handle) -> Result<&DataHandle, ApiError> {
    h.data.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not-found",
            "this dispatcher has no blob store endpoints (no public_url)",
        )
    })
}

/// Checks a signed URL's signature and expiry; counts and refuses (403) what fails.
fn check<'a, G: Grant>(d: &DataHandle, url: &'a SignedUrl<G>) -> Result<&'a G, ApiError> {
    let now = crate::clock::now_ms() / 1000;
    match url.verify(&d.key, now) {
        Ok(g) => Ok(g),
        Err(SigError::Expired) => {
            d.counters.expired.fetch_add(1, Ordering::Relaxed);
            Err(forbidden(
                "this URL expired: the job's sender gives a fresh one with the next attempt",
            ))
        }
        Err(_) => {
            d.counters.bad_signature.fetch_add(1, Ordering::Relaxed);
            Err(forbidden(
                "the URL's signature does not match (it was changed, or made for another agent, job or blob)",
            ))
        }
    }
}

fn unsigned(d: &DataHandle, e: QueryError) -> ApiError {
    d.counters.bad_signature.fetch_add(1, Ordering::Relaxed);
    forbidden(format!("not a signed URL of this dispatcher: {e}"))
}

/// `GET /v1/blobs/{sha256}`: a job's input, for the agent its URL was signed for.
pub(super) async fn fetch_blob(
    State(h): State<Handle>,
    Path(hex): Path<String>,
    uri: axum::http::Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let d = data_of(&h)?;
    let url = BlobGrant::parse(&hex, uri.query().unwrap_or("")).map_err(|e| {
        // A path that is no blob's name is simply not found; anything else is refused.
        if parse_sha256(&hex).is_err() {
            not_found(d)
        } else {
            unsigned(d, e)
        }
    })?;
    let sha = check(d, &url)?.sha256;
    let file = d.blobs.file(&sha).map_err(|_| not_found(d))?;
    d.counters.fetched.fetch_add(1, Ordering::Relaxed);
    serve_file(file, &headers, None).await
}

fn not_found(d: &DataHandle) -> ApiError {
    d.counters.not_found.fetch_add(1, Ordering::Relaxed);
    ApiError::new(StatusCode::NOT_FOUND, "not-found", "no such blob")
}

/// `PUT /v1/uploads/{job}`: an agent's output, into the slot it was granted.
pub(super) async fn put_upload(
    State(h): State<Handle>,
    Path(job): Path<String>,
    uri: axum::http::Uri,
    body: Body,
) -> Result<Response, ApiError> {
    let d = data_of(&h)?;
    let url = UploadGrant::parse(&job, uri.query().unwrap_or("")).map_err(|e| unsigned(d, e))?;
    let g = check(d, &url)?.clone();
    let want = Stored {
        sha256: g.sha256,
        size: g.size,
    };
    let blob = store_body(&d.blobs, body, Some(g.size), u64::MAX, Some(want)).await?;
    let (job, attempt, agent) = (g.job, g.attempt, g.agent.to_string());
    let request = ApiRequest::SlotFilled {
        job: job.clone(),
        attempt,
        agent,
        blob,
    };
    let ApiReply::SlotFilled(answer) = change(&h, request).await? else {
        return Err(mismatch());
    };
    answer.map_err(|e| ApiError::new(StatusCode::CONFLICT, "unknown-job", e.to_string()))?;
    d.counters.uploaded.fetch_add(1, Ordering::Relaxed);
    Ok((
        StatusCode::CREATED,
        axum::Json(BlobStored {
            sha256: blob.hex(),
            size: blob.size,
        }),
    )
        .into_response())
}

/// `PUT /v1/blobs`: bytes a web app names by hash in later jobs (`input_ref`).
#[utoipa::path(
    put, path = "/v1/blobs", tag = "data",
    summary = "Store bytes that later jobs name by their SHA-256 (`input_ref`, fragment references)",
    description = "Among several dispatchers (PostgreSQL) the bytes are copied to the shared store before the answer, so a job naming them may be submitted to any dispatcher.",
    request_body(description = "The bytes", content((String = "application/octet-stream"))),
    responses(
        (status = 201, description = "Stored", body = BlobStored),
        (status = 401, description = "No token, or an unknown one", body = ErrorBody),
        (status = 413, description = "Over the dispatcher's max_input", body = ErrorBody),
        (status = 503, description = "The shared store (PostgreSQL) cannot be reached: retry", body = ErrorBody),
    ),
)]
pub(super) async fn put_blob(
    State(h): State<Handle>,
    _caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let d = data_of(&h)?;
    let declared = content_length(&headers);
    let blob = store_body(&d.blobs, body, declared, h.max_input, None).await?;
    // Among several dispatchers, into the shared store too: a job naming the blob may be
    // submitted to another, and the leader may be another.
    if let Some(pg) = h.shared.as_ref() {
        pg.put_blobs(&[(blob, d.blobs.path(&blob.sha256))])
            .await
            .map_err(|e| {
                tracing::warn!(blob = %blob.hex(), "cannot copy an upload to the shared store: {e}");
                ApiError::store_down()
            })?;
    }
    Ok((
        StatusCode::CREATED,
        axum::Json(BlobStored {
            sha256: blob.hex(),
            size: blob.size,
        }),
    )
        .into_response())
}

/// `GET /v1/jobs/{id}/output`: a finished job's output, raw, with its type.
#[utoipa::path(
    get, path = "/v1/jobs/{id}/output", tag = "data",
    summary = "A succeeded job's output, raw, with its type (ranges supported)",
    params(("id" = String, Path, description = "The job's id")),
    responses(
        (status = 200, description = "The output; Content-Type is the job's output type", content_type = "application/octet-stream", body = String),
        (status = 206, description = "The requested range (`Range: bytes=…`)", content_type = "application/octet-stream", body = String),
        (status = 404, description = "No such job", body = ErrorBody),
        (status = 409, description = "The job has not succeeded, or its output is kept by an agent (`kept-by-agent`)", body = ErrorBody),
    ),
)]
pub(super) async fn get_output(
    State(h): State<Handle>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = job_id(&id)?;
    let rec = find_job(&h, &id).await?;
    caller.check_sees(&rec)?;
    let Some(Recorded::Succeeded { output, mime, .. }) = rec.outcome else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "no-output",
            format!("job {id} has no output: it is {}", rec.state),
        ));
    };
    let mime = mime.unwrap_or_else(|| "application/octet-stream".into());
    match output {
        JobBody::Inline(bytes) => serve_bytes(bytes, &headers, &mime),
        JobBody::Stored(b) => {
            let d = data_of(&h)?;
            // Among several dispatchers the output may have been stored by another: it is in
            // the shared store too (docs/dispatcher.md §5, "PostgreSQL").
            if let (false, Some(pg)) = (d.blobs.contains(&b.sha256), h.shared.as_ref()) {
                pg.fetch_blobs(&[b], &d.blobs).await.map_err(|e| {
                    tracing::warn!(job = %id, "cannot copy an output from the shared store: {e}");
                    ApiError::store_down()
                })?;
            }
            let file = d.blobs.file(&b.sha256).map_err(|e| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    format!("the output of job {id} cannot be read from the blob store: {e}"),
                )
            })?;
            serve_file(file, &headers, Some(&mime)).await
        }
        JobBody::Kept(k) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "kept-by-agent",
            format!(
                "job {id} is a map/reduce step whose output the agent {} keeps for the steps \
                 that take it (data_listen); it is not in the dispatcher's blob store. The \
                 map/reduce job's own output is.",
                k.agent
            ),
        )),
    }
}

/// The blob a job's `input_ref` names, with its size: it must be in the store (or, among
/// several dispatchers, in the shared store, whence it is copied).
pub(super) async fn stored_ref(h: &Handle, hex: &str) -> Result<Stored, ApiError> {
    let d = data_of(h).map_err(|_| {
        ApiError::field(
            "input_ref",
            "this dispatcher has no blob store endpoints (no public_url): send the input itself",
        )
    })?;
    let sha = parse_sha256(hex).map_err(|e| ApiError::field("input_ref", e.to_string()))?;
    if let Ok(size) = d.blobs.len(&sha) {
        return Ok(Stored { sha256: sha, size });
    }
    if let Some(pg) = h.shared.as_ref() {
        // Boxed: reads of the shared store and file writes make a large future, which every
        // submission's future would otherwise carry inline (and move) for this rare case.
        let copied = Box::pin(async {
            let size = pg.blob_size(&sha).await.map_err(|e| shared_down(hex, &e))?;
            let Some(size) = size else {
                return Ok(None);
            };
            let s = Stored { sha256: sha, size };
            let (_, missing) = pg
                .fetch_blobs(&[s], &d.blobs)
                .await
                .map_err(|e| shared_down(hex, &e))?;
            Ok::<_, ApiError>(missing.is_empty().then_some(s))
        });
        if let Some(s) = copied.await? {
            return Ok(s);
        }
    }
    Err(ApiError::field(
        "input_ref",
        format!("blob {hex} is not in the blob store: upload it with PUT /v1/blobs first (blobs no job holds are deleted after blob_orphan_ttl)"),
    ))
}

/// A map/reduce job's fragments named by reference (`sha256`, `size`) that this dispatcher
/// lacks, copied from the shared store (several dispatchers: uploaded to another), so that
/// the job's check finds them. A list that cannot be read is left to that check, which names
/// what is wrong.
pub(super) async fn fetch_fragments(
    h: &Handle,
    spec: &crate::jobs::JobSpec,
) -> Result<(), ApiError> {
    let (Some(pg), Some(d)) = (h.shared.as_ref(), h.data.as_ref()) else {
        return Ok(());
    };
    let (Some(m), JobBody::Inline(bytes)) = (&spec.mapreduce, &spec.input) else {
        return Ok(());
    };
    if m.split.is_some() {
        return Ok(());
    }
    let Ok(list) = spine_protocol::fragments::decode(bytes) else {
        return Ok(());
    };
    let want: Vec<Stored> = list
        .iter()
        .filter_map(|f| f.source.as_ref())
        .map(|r| Stored {
            sha256: r.sha256,
            size: r.size,
        })
        .filter(|s| !d.blobs.contains(&s.sha256))
        .collect();
    if want.is_empty() {
        return Ok(());
    }
    // (Boxed, as in `stored_ref`.)
    Box::pin(pg.fetch_blobs(&want, &d.blobs))
        .await
        .map_err(|e| shared_down("of a fragment", &e))?;
    Ok(())
}

/// The shared store could not give a blob: 503, as for any change while it is down.
fn shared_down(blob: &str, e: &crate::store::StoreError) -> ApiError {
    tracing::warn!(blob, "cannot copy a blob from the shared store: {e}");
    ApiError::store_down()
}

pub(super) fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// Streams a request body into the blob store: at most `max` bytes (`size` exactly, when
/// declared), checked against `expect` when given. Nothing is stored unless all of it came.
pub(super) async fn store_body(
    blobs: &BlobStore,
    body: Body,
    size: Option<u64>,
    max: u64,
    expect: Option<Stored>,
) -> Result<Stored, ApiError> {
    if let Some(n) = size.filter(|n| *n > max) {
        return Err(too_large(n, max));
    }
    let mut w = blobs.writer(size).map_err(blob_error)?;
    let mut stream = body.into_data_stream();
    loop {
        let piece = match tokio::time::timeout(IDLE, stream.next()).await {
            Err(_) => {
                return Err(ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "request-timeout",
                    format!("no byte of the body for {} s", IDLE.as_secs()),
                ))
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad-request",
                    format!("the body could not be read: {e}"),
                ))
            }
            Ok(Some(Ok(p))) => p,
        };
        if w.received() + piece.len() as u64 > max {
            return Err(too_large(w.received() + piece.len() as u64, max));
        }
        w.write_bytes(piece).await.map_err(blob_error)?;
    }
    w.finish(expect.map(|e| (e.size, e.sha256)))
        .await
        .map_err(blob_error)
}

fn too_large(n: u64, max: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too-large",
        format!("a body of {n} bytes is over the limit of {max} (max_input)"),
    )
}

/// The answer for a blob the store did not take.
fn blob_error(e: BlobError) -> ApiError {
    match e {
        BlobError::QuotaExceeded { .. } => ApiError::new(
            StatusCode::INSUFFICIENT_STORAGE,
            "storage-full",
            e.to_string(),
        ),
        BlobError::SizeMismatch { .. } | BlobError::HashMismatch { .. } => {
            ApiError::new(StatusCode::BAD_REQUEST, "bad-request", e.to_string())
        }
        other => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            other.to_string(),
        ),
    }
}

/// A single byte range of a body of `len` bytes, from a `Range` header: `None` for the whole
/// body (no header, or one this does not serve: several ranges, another unit), `Err` if it
/// cannot be satisfied.
fn range(headers: &HeaderMap, len: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(spec) = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().strip_prefix("bytes="))
    else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((a, b)) = spec.split_once('-') else {
        return Ok(None);
    };
    let (a, b) = (a.trim(), b.trim());
    let r = match (a.parse::<u64>(), b.parse::<u64>()) {
        // `bytes=-N`: the last N bytes.
        (Err(_), Ok(n)) if a.is_empty() && n > 0 => (len.saturating_sub(n), len),
        (Ok(s), Err(_)) if b.is_empty() => (s, len),
        (Ok(s), Ok(e)) if e >= s => (s, e.saturating_add(1).min(len)),
        _ => return Ok(None),
    };
    if r.0 >= len {
        return Err(());
    }
    Ok(Some(r))
}

fn unsatisfiable(len: u64) -> Response {
    let mut r = ApiError::new(
        StatusCode::RANGE_NOT_SATISFIABLE,
        "range-not-satisfiable",
        format!("the body has {len} bytes"),
    )
    .into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
        r.headers_mut().insert(header::CONTENT_RANGE, v);
    }
    r
}

fn head(
    status: StatusCode,
    mime: &str,
    len: u64,
    r: Option<(u64, u64)>,
    total: u64,
) -> axum::http::response::Builder {
    let mut b = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, mime)
        .header(header::CONTENT_LENGTH, len)
        .header(header::ACCEPT_RANGES, "bytes");
    if let Some((s, e)) = r {
        b = b.header(
            header::CONTENT_RANGE,
            format!("bytes {s}-{}/{total}", e - 1),
        );
    }
    b
}

fn serve_bytes(bytes: Vec<u8>, headers: &HeaderMap, mime: &str) -> Result<Response, ApiError> {
    let len = bytes.len() as u64;
    let r = match range(headers, len) {
        Ok(r) => r,
        Err(()) => return Ok(unsatisfiable(len)),
    };
    let (status, body) = match r {
        Some((s, e)) => (
            StatusCode::PARTIAL_CONTENT,
            bytes[s as usize..e as usize].to_vec(),
        ),
        None => (StatusCode::OK, bytes),
    };
    head(status, mime, body.len() as u64, r, len)
        .body(Body::from(body))
        .map_err(internal)
}

async fn serve_file(
    file: std::fs::File,
    headers: &HeaderMap,
    mime: Option<&str>,
) -> Result<Response, ApiError> {
    let len = file.metadata().map_err(internal)?.len();
    let r = match range(headers, len) {
        Ok(r) => r,
        Err(()) => return Ok(unsatisfiable(len)),
    };
    let (status, start, end) = match r {
        Some((s, e)) => (StatusCode::PARTIAL_CONTENT, s, e),
        None => (StatusCode::OK, 0, len),
    };
    head(
        status,
        mime.unwrap_or("application/octet-stream"),
        end - start,
        r,
        len,
    )
    .body(Body::from_stream(file_stream(file, start, end - start)))
    .map_err(internal)
}

/// `len` bytes of `file` from `start`, as a stream of pieces read ahead of the consumer.
///
/// Not `ReaderStream` over `tokio::fs::File`: that reads a piece only when the previous one
/// was taken (disk and network in turn, never at once), and copies each piece twice (into
/// the file's buffer, then into the stream's). Here each piece is read once into its own
/// buffer by a blocking task, while the one before is on the way out; a blocking thread is
/// held only during a read, never while a slow client keeps the channel full.
fn file_stream(
    file: std::fs::File,
    start: u64,
    len: u64,
) -> impl futures::Stream<Item = std::io::Result<axum::body::Bytes>> {
    let (tx, rx) = tokio::sync::mpsc::channel(READ_AHEAD);
    let file = Arc::new(file);
    tokio::spawn(async move {
        let mut offset = start;
        let end = start + len;
        while offset < end {
            let n = (end - offset).min(READ_BUF as u64) as usize;
            let f = file.clone();
            let piece = tokio::task::spawn_blocking(move || read_exact_at(&f, offset, n))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)));
            let failed = piece.is_err();
            // The receiver is gone when the client left: stop reading.
            if tx.send(piece).await.is_err() || failed {
                return;
            }
            offset += n as u64;
        }
    });
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|p| (p, rx)) })
}

/// Exactly `n` bytes at `offset`; a file shorter than that (it never shrinks in the store)
/// is an error, so that a response never ends short of its `Content-Length` silently.
fn read_exact_at(f: &std::fs::File, offset: u64, n: usize) -> std::io::Result<axum::body::Bytes> {
    use std::os::unix::fs::FileExt as _;
    let mut buf = vec![0u8; n];
    f.read_exact_at(&mut buf, offset)?;
    Ok(buf.into())
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_range(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::RANGE, HeaderValue::from_str(v).unwrap());
        h
    }

    async fn collect(
        stream: impl futures::Stream<Item = std::io::Result<axum::body::Bytes>>,
    ) -> (Vec<u8>, usize, Option<std::io::Error>) {
        let mut stream = std::pin::pin!(stream);
        let (mut bytes, mut pieces) = (Vec::new(), 0);
        while let Some(p) = stream.next().await {
            match p {
                Ok(p) => {
                    assert!(p.len() <= READ_BUF);
                    bytes.extend_from_slice(&p);
                    pieces += 1;
                }
                Err(e) => return (bytes, pieces, Some(e)),
            }
        }
        (bytes, pieces, None)
    }

    #[tokio::test]
    async fn a_file_streams_in_read_ahead_pieces_and_a_short_file_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..3 * READ_BUF + 1000).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).expect("write");
        let open = || std::fs::File::open(&path).expect("open");
        let (all, pieces, err) = collect(file_stream(open(), 0, data.len() as u64)).await;
        assert!(err.is_none(), "{err:?}");
        assert_eq!((all.len(), pieces), (data.len(), 4));
        assert!(all == data);
        // A range in the middle, across a piece boundary.
        let (s, e) = (READ_BUF as u64 - 10, 2 * READ_BUF as u64 + 10);
        let (part, _, err) = collect(file_stream(open(), s, e - s)).await;
        assert!(err.is_none(), "{err:?}");
        assert!(part == data[s as usize..e as usize]);
        // Asked for more than the file holds: the stream ends with an error, not short.
        let (got, _, err) = collect(file_stream(open(), 0, data.len() as u64 + 1)).await;
        assert_eq!(
            err.map(|e| e.kind()),
            Some(std::io::ErrorKind::UnexpectedEof)
        );
        assert!(got.len() < data.len() + 1);
    }

    #[test]
    fn one_byte_range_is_served_and_others_get_the_whole_body() {
        assert_eq!(range(&HeaderMap::new(), 100), Ok(None));
        assert_eq!(range(&with_range("bytes=0-9"), 100), Ok(Some((0, 10))));
        assert_eq!(range(&with_range("bytes=90-"), 100), Ok(Some((90, 100))));
        assert_eq!(range(&with_range("bytes=-5"), 100), Ok(Some((95, 100))));
        assert_eq!(range(&with_range("bytes=50-500"), 100), Ok(Some((50, 100))));
        assert_eq!(range(&with_range("bytes=0-1,5-6"), 100), Ok(None));
        assert_eq!(range(&with_range("items=0-1"), 100), Ok(None));
        assert_eq!(range(&with_range("bytes=9-3"), 100), Ok(None));
        assert_eq!(range(&with_range("bytes=100-"), 100), Err(()));
    }
}
