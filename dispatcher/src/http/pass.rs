//! A standby's submissions, several to the leader in one request (`POST /v1/jobs:passed`).
//!
//! A standby passes a JSON submission on to the leader, which stores and places it in one
//! commit ([`super::forward::submit_to_leader`]). One HTTP request to the leader per
//! submission costs the standby a client request and the leader a server request for every
//! job, on top of the caller's own request: with the jobs sent to three dispatchers in turn,
//! that relay was the largest cost the standbys added (BENCHMARKS.md). So a standby gathers
//! the small submissions that arrive while its earlier ones are on their way
//! ([`Passer`]: at most [`IN_FLIGHT`] requests to the leader storing at once, each taking
//! whatever waits, up to [`MAX_ITEMS`]) and sends them together; under load each request
//! carries many, and one submission alone goes at once. The leader checks each one as if its
//! caller had sent it ([`passed`]: the caller's own headers, so its token, its same-origin
//! headers and its `Idempotency-Key`), gives them to the core together (they share a commit),
//! and answers each as `POST /v1/jobs` would have, as a line of its own in a stream
//! (`{"i", "status", "body", "retry_after"}`): first, once every submission is stored or
//! refused, the answers of those whose callers do not wait (and of jobs that ended already)
//! and a `{"stored": true}` line — the request no longer counts against [`IN_FLIGHT`] — then
//! each waiting caller's answer when its job ends or its wait is over, as the leader answers
//! its own callers. The standby answers each caller with its own line.
//!
//! Nothing of a request the leader refused as a whole (any status but 200) was stored: the
//! standby then stores those submissions itself, for the leader, as when the leader cannot be
//! reached at all. A caller whose answer did not come (the leader died or stalled) gets 503
//! `standby`, and retries with its idempotency key.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use spine_protocol::JobId;
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::auth::{authenticate, read_body};
use super::error::ApiError;
use super::forward::FORWARDED_BY;
use super::openapi::{ErrorBody, Submitted};
use super::Handle;

/// Where a standby sends its callers' submissions, several at a time.
pub(crate) const PASSED_PATH: &str = "/v1/jobs:passed";

/// Submissions in one request to the leader at most.
pub(crate) const MAX_ITEMS: usize = 64;

/// The largest submission body a standby gathers with others; a larger one goes on alone
/// (`POST /v1/jobs`, as its caller sent it).
pub(crate) const MAX_ITEM_BODY: usize = 16 * 1024;

/// The largest request to [`PASSED_PATH`]: [`MAX_ITEMS`] bodies with their headers.
const MAX_PASSED_BODY: usize = MAX_ITEMS * (MAX_ITEM_BODY + 8 * 1024);

/// Requests to the leader storing at once: while they are, what arrives gathers for the next
/// one. (Measured with three dispatchers on two cores: 2 beat 1, 8 and 32.)
const IN_FLIGHT: usize = 2;

/// How long a standby waits for the leader's answers beyond the longest wait of a request:
/// the leader answers once the submissions are stored, within milliseconds; a leader that
/// took the request and says nothing is paused, and the callers had better retry elsewhere.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// What became of one submission at the leader.
pub(crate) enum Outcome {
    /// The leader's answer for it: status, JSON body, `Retry-After` seconds.
    Answer(u16, Box<RawValue>, Option<u64>),
    /// The leader did not take it (not reachable, or it refused the request as a whole):
    /// nothing was stored, the standby stores it.
    StoreHere,
    /// The leader took the request and gave no answer (why): it may have been stored.
    Lost(String),
}

/// A submission waiting to go: its part of the request (`{"headers":…,"wait_ms":…,"body":…}`),
/// the leader it goes to, its caller's wait and who hears the outcome.
struct Waiting {
    item: Vec<u8>,
    leader: String,
    wait: Duration,
    reply: oneshot::Sender<Outcome>,
}

/// A standby's queue of submissions for the leader, and the task that sends them.
pub(crate) struct Passer {
    tx: mpsc::Sender<Waiting>,
    /// Requests sent to the leader, and the submissions they carried (`/metrics`).
    pub(crate) requests: Arc<AtomicU64>,
    pub(crate) submissions: Arc<AtomicU64>,
}

impl Passer {
    /// The queue, and its task on the current runtime, sending with `client` as `by`.
    pub(crate) fn start(client: reqwest::Client, by: String) -> Passer {
        let (tx, rx) = mpsc::channel(4 * MAX_ITEMS);
        let requests = Arc::new(AtomicU64::new(0));
        let submissions = Arc::new(AtomicU64::new(0));
        let counts = (requests.clone(), submissions.clone());
        tokio::spawn(gather(rx, client, by, counts));
        Passer {
            tx,
            requests,
            submissions,
        }
    }

    /// Passes one submission on to `leader`: its caller's `headers` (those of the request,
    /// not of its connection), its caller's `wait` (`?wait=`, for the leader to serve), and
    /// its JSON `body` (checked already: valid JSON).
    pub(crate) async fn pass(
        &self,
        leader: &str,
        headers: &[(&str, &str)],
        wait: Option<Duration>,
        body: &[u8],
    ) -> Outcome {
        let mut item = Vec::with_capacity(body.len() + 128);
        item.extend_from_slice(b"{\"headers\":");
        if serde_json::to_writer(&mut item, headers).is_err() {
            return Outcome::StoreHere;
        }
        if let Some(w) = wait {
            item.extend_from_slice(format!(",\"wait_ms\":{}", w.as_millis()).as_bytes());
        }
        item.extend_from_slice(b",\"body\":");
        // Checked as JSON by the caller (parse_request): it goes in as it is.
        item.extend_from_slice(body);
        item.push(b'}');
        let (reply, rx) = oneshot::channel();
        let w = Waiting {
            item,
            leader: leader.to_owned(),
            wait: wait.unwrap_or_default(),
            reply,
        };
        if self.tx.send(w).await.is_err() {
            return Outcome::StoreHere;
        }
        rx.await.unwrap_or(Outcome::StoreHere)
    }
}

/// The task: takes what waits (at most [`MAX_ITEMS`], for one leader) whenever fewer than
/// [`IN_FLIGHT`] requests are under way, and sends it as one request.
async fn gather(
    mut rx: mpsc::Receiver<Waiting>,
    client: reqwest::Client,
    by: String,
    counts: (Arc<AtomicU64>, Arc<AtomicU64>),
) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut carried: Option<Waiting> = None;
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let first = match carried.take() {
            Some(w) => w,
            None => match rx.recv().await {
                Some(w) => w,
                None => return,
            },
        };
        let mut size = first.item.len();
        let mut batch = vec![first];
        while batch.len() < MAX_ITEMS {
            match rx.try_recv() {
                Ok(w) if w.leader == batch[0].leader && size + w.item.len() < MAX_PASSED_BODY => {
                    size += w.item.len();
                    batch.push(w);
                }
                Ok(w) => {
                    carried = Some(w);
                    break;
                }
                Err(_) => break,
            }
        }
        counts.0.fetch_add(1, Ordering::Relaxed);
        counts.1.fetch_add(batch.len() as u64, Ordering::Relaxed);
        let (client, by) = (client.clone(), by.clone());
        tokio::spawn(async move { send(&client, &by, batch, slot).await });
    }
}

/// One request to the leader with `batch`; each submission's caller hears its outcome. The
/// `slot` is let go once the leader said the submissions are stored (or the request failed).
async fn send(
    client: &reqwest::Client,
    by: &str,
    batch: Vec<Waiting>,
    slot: tokio::sync::OwnedSemaphorePermit,
) {
    let leader = batch[0].leader.trim_end_matches('/').to_owned();
    let longest = batch.iter().map(|w| w.wait).max().unwrap_or_default();
    let mut body = Vec::with_capacity(batch.iter().map(|w| w.item.len() + 1).sum::<usize>() + 20);
    body.extend_from_slice(b"{\"submissions\":[");
    for (i, w) in batch.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(&w.item);
    }
    body.extend_from_slice(b"]}");
    // The leader says the submissions are stored within ANSWER_TIMEOUT, or it is stalled
    // (paused): then its callers hear so, and the slot goes to the next request, at once
    // rather than after the longest wait.
    let stored_by = tokio::time::Instant::now() + ANSWER_TIMEOUT;
    let sent = client
        .post(format!("{leader}{PASSED_PATH}"))
        .header(FORWARDED_BY, by)
        .header(header::CONTENT_TYPE, "application/json")
        .timeout(longest + ANSWER_TIMEOUT)
        .body(body)
        .send();
    let sent = match tokio::time::timeout_at(stored_by, sent).await {
        Ok(sent) => sent,
        Err(_) => {
            tracing::warn!(leader = %leader, "passed {} submission(s) on to the leader and got no answer within {ANSWER_TIMEOUT:?}", batch.len());
            return tell(batch, || {
                Outcome::Lost("no answer from the leader in time".into())
            });
        }
    };
    let answer = match sent {
        Err(e) if e.is_connect() => {
            tracing::debug!(leader = %leader, "the leader is not reachable: {} submission(s) stored here for it: {e}", batch.len());
            return tell(batch, || Outcome::StoreHere);
        }
        Err(e) => {
            tracing::warn!(leader = %leader, "passed {} submission(s) on to the leader and got no answer: {e}", batch.len());
            let why = e.to_string();
            return tell(batch, || Outcome::Lost(why.clone()));
        }
        Ok(r) if r.status() != StatusCode::OK => {
            // Refused as a whole, before anything was stored (it no longer leads, its store
            // is down, or it is of a version without this path): stored here.
            tracing::debug!(leader = %leader, status = %r.status(), "the leader refused passed submissions: stored here for it");
            return tell(batch, || Outcome::StoreHere);
        }
        Ok(r) => r,
    };
    let mut replies: Vec<Option<oneshot::Sender<Outcome>>> =
        batch.into_iter().map(|w| Some(w.reply)).collect();
    let mut slot = Some(slot);
    let mut stream = answer.bytes_stream();
    let mut buf: Vec<u8> = Vec::new();
    let why = loop {
        let next = futures::StreamExt::next(&mut stream);
        let got = if slot.is_some() {
            match tokio::time::timeout_at(stored_by, next).await {
                Ok(got) => got,
                Err(_) => break "the leader did not say in time that it stored them".to_owned(),
            }
        } else {
            next.await
        };
        let chunk = match got {
            Some(Ok(chunk)) => chunk,
            Some(Err(e)) => break e.to_string(),
            None => break "the leader's answer ended early".to_owned(),
        };
        each_line(&mut buf, &chunk, |line| {
            if line.starts_with(STORED) {
                drop(slot.take());
                return;
            }
            match serde_json::from_slice::<Answer>(line) {
                Ok(a) => {
                    if let Some(reply) = replies.get_mut(a.i).and_then(Option::take) {
                        let _ = reply.send(Outcome::Answer(a.status, a.body, a.retry_after));
                    }
                }
                Err(e) => {
                    tracing::error!(leader = %leader, "a line of the leader's answer to passed submissions could not be read: {e}");
                }
            }
        });
        if replies.iter().all(Option::is_none) {
            return;
        }
    };
    let left = replies.iter().filter(|r| r.is_some()).count();
    tracing::warn!(leader = %leader, "{left} passed submission(s) got no answer from the leader: {why}");
    for reply in replies.into_iter().flatten() {
        let _ = reply.send(Outcome::Lost(why.clone()));
    }
}

/// Calls `f` with each whole line (without its `\n`) of what `buf` held and `chunk` adds;
/// keeps the unfinished last line in `buf` for the next chunk.
fn each_line(buf: &mut Vec<u8>, chunk: &[u8], mut f: impl FnMut(&[u8])) {
    buf.extend_from_slice(chunk);
    let mut start = 0;
    while let Some(n) = buf[start..].iter().position(|b| *b == b'\n') {
        f(&buf[start..start + n]);
        start += n + 1;
    }
    buf.drain(..start);
}

/// Tells every caller of `batch` the same outcome.
fn tell(batch: Vec<Waiting>, outcome: impl Fn() -> Outcome) {
    for w in batch {
        let _ = w.reply.send(outcome());
    }
}

/// At the standby: the response for one submission's caller, from the leader's answer.
pub(crate) fn response(status: u16, body: Box<RawValue>, retry_after: Option<u64>) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut r = (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        String::from(Box::<str>::from(body)),
    )
        .into_response();
    if let Some(s) = retry_after {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(s));
    }
    r
}

/// `POST /v1/jobs:passed`'s body: the submissions a standby gathered.
#[derive(Deserialize)]
struct Submissions {
    submissions: Vec<Submission>,
}

#[derive(Deserialize)]
struct Submission {
    /// The caller's request headers, as name and value.
    headers: Vec<(String, String)>,
    /// The caller's `?wait=`, in milliseconds.
    #[serde(default)]
    wait_ms: Option<u64>,
    /// The JSON body `POST /v1/jobs` takes.
    body: Box<RawValue>,
}

/// The line of `POST /v1/jobs:passed`'s answer that says every submission is stored or
/// refused: the rest of the answers are the waiting callers'.
const STORED: &[u8] = b"{\"stored\":true}";

/// One submission's answer: what `POST /v1/jobs` would have answered.
#[derive(Serialize, Deserialize)]
struct Answer {
    /// Which submission, from 0, in the request's order.
    i: usize,
    /// The status.
    status: u16,
    /// Its JSON body.
    body: Box<RawValue>,
    /// Its `Retry-After`, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    retry_after: Option<u64>,
}

impl Answer {
    /// One line of the answer's stream.
    fn line(&self) -> axum::body::Bytes {
        let mut v = serde_json::to_vec(self).unwrap_or_default();
        v.push(b'\n');
        v.into()
    }
}

/// What became of a submission at the leader once it was stored (or refused).
enum Took {
    /// Its answer.
    Done(Answer),
    /// Stored; its caller waits up to this long for the job's end.
    Waits(usize, JobId, Duration),
}

/// At the leader, `POST /v1/jobs:passed` (from a standby, [`FORWARDED_BY`]): each submission
/// checked as if its caller had sent it — authenticated from its own headers, from the
/// standby's address — and accepted or refused on its own; a waiting caller's answer comes
/// when its job ends, or its wait is over. Not behind the admission layer: the request has
/// no caller of its own, each submission has one. Refused as a whole (and nothing stored) by
/// a standby, and while the job store cannot be reached.
pub(super) async fn passed(
    State(h): State<Handle>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    if !headers.contains_key(FORWARDED_BY) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad-request",
            format!("{PASSED_PATH} takes the submissions a standby passes on (with its {FORWARDED_BY} header); submit jobs with POST /v1/jobs or POST /v1/jobs:batch"),
        ));
    }
    if let Some(e) = h.standby() {
        return Err(e);
    }
    if h.store_down() {
        return Err(ApiError::store_down());
    }
    let declared = super::data::content_length(&headers);
    if declared.is_some_and(|n| n > MAX_PASSED_BODY as u64) {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-large",
            format!("at most {MAX_PASSED_BODY} bytes"),
        ));
    }
    let small = usize::try_from(declared.unwrap_or(0)).unwrap_or(usize::MAX);
    let took = async {
        let bytes = read_body(body, MAX_PASSED_BODY, small).await?;
        let batch: Submissions = serde_json::from_slice(&bytes).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad-request",
                format!("the body must be {{\"submissions\": [{{\"headers\", \"wait_ms\", \"body\"}}, …]}}: {e}"),
            )
        })?;
        if batch.submissions.is_empty() || batch.submissions.len() > MAX_ITEMS {
            return Err(ApiError::field(
                "submissions",
                format!(
                    "from 1 to {MAX_ITEMS} submissions, not {}",
                    batch.submissions.len()
                ),
            ));
        }
        // Each in a task of its own (`FuturesOrdered`), not side by side in one allocation
        // (`join_all`): a submission's future is kilobytes, and a request's worth of them
        // together made a large allocation per request, whose pages were faulted in anew.
        let took: futures::stream::FuturesOrdered<_> = batch
            .submissions
            .iter()
            .enumerate()
            .map(|(i, s)| take(&h, peer, i, s))
            .collect();
        Ok::<_, ApiError>(futures::StreamExt::collect::<Vec<Took>>(took).await)
    };
    let took = match tokio::time::timeout(h.limits.request_timeout, took).await {
        Ok(t) => t?,
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request-timeout",
                "the passed submissions took longer than http_request_timeout to store",
            ))
        }
    };
    // The answers known now, the mark, then each waiting caller's as its job ends.
    let mut first = Vec::new();
    let waiting = futures::stream::FuturesUnordered::new();
    for t in took {
        match t {
            Took::Done(a) => first.extend_from_slice(&a.line()),
            Took::Waits(i, id, wait) => {
                let h = h.clone();
                waiting.push(async move { waited_answer(&h, i, &id, wait).await.line() });
            }
        }
    }
    first.extend_from_slice(STORED);
    first.push(b'\n');
    let first = futures::stream::once(async move { axum::body::Bytes::from(first) });
    let lines = futures::StreamExt::map(
        futures::StreamExt::chain(first, waiting),
        Ok::<_, std::convert::Infallible>,
    );
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(lines),
    )
        .into_response())
}

/// One passed submission (the `i`th), as `POST /v1/jobs` with a JSON body would have
/// taken it: its answer, or its job's id when its caller waits and the job has not ended.
async fn take(h: &Handle, peer: SocketAddr, i: usize, s: &Submission) -> Took {
    let wait = match s.wait_ms.map(Duration::from_millis) {
        Some(w) if w >= h.limits.request_timeout => {
            return Took::Done(refused(
                i,
                ApiError::field("wait", "at most http_request_timeout less a second"),
            ))
        }
        w => w,
    };
    let accepted = async {
        let mut headers = HeaderMap::with_capacity(s.headers.len());
        for (name, value) in &s.headers {
            let name = HeaderName::from_bytes(name.as_bytes()).map_err(|e| {
                ApiError::new(StatusCode::BAD_REQUEST, "bad-request", e.to_string())
            })?;
            let value = HeaderValue::from_str(value).map_err(|e| {
                ApiError::new(StatusCode::BAD_REQUEST, "bad-request", e.to_string())
            })?;
            headers.append(name, value);
        }
        let caller = authenticate(h, &Method::POST, &headers, peer)?;
        let json = s.body.get().as_bytes();
        super::routes::accept_json(h, &caller, Some(&headers), json, wait.is_some()).await
    };
    match (accepted.await, wait) {
        (Ok((_, _, Some(view))), _) => Took::Done(Answer {
            i,
            status: StatusCode::OK.as_u16(),
            body: raw(&view),
            retry_after: None,
        }),
        (Ok((id, state, None)), Some(wait)) if !state.is_final() => Took::Waits(i, id, wait),
        (Ok((id, state, None)), _) => Took::Done(Answer {
            i,
            status: StatusCode::ACCEPTED.as_u16(),
            body: raw(&Submitted { id, state }),
            retry_after: None,
        }),
        (Err(e), _) => Took::Done(refused(i, e)),
    }
}

/// A waiting caller's answer: the final job (200), or the job as it is when the wait is over
/// (202), as `POST /v1/jobs?wait=` answers.
async fn waited_answer(h: &Handle, i: usize, id: &JobId, wait: Duration) -> Answer {
    match super::routes::waited(h, id, wait).await {
        Ok((done, job)) => Answer {
            i,
            status: if done { 200 } else { 202 },
            body: raw(&job),
            retry_after: None,
        },
        Err(e) => refused(i, e),
    }
}

/// The `i`th submission's refusal.
fn refused(i: usize, e: ApiError) -> Answer {
    let retry_after = (e.status == StatusCode::TOO_MANY_REQUESTS
        || e.status == StatusCode::SERVICE_UNAVAILABLE)
        .then(|| e.retry_after.unwrap_or(1).max(1));
    Answer {
        i,
        status: e.status.as_u16(),
        body: raw(&ErrorBody::from(&e)),
        retry_after,
    }
}

/// `v` as JSON (the views and errors here always serialise).
fn raw<T: Serialize>(v: &T) -> Box<RawValue> {
    serde_json::value::to_raw_value(v).unwrap_or_else(|e| {
        tracing::error!("a passed submission's answer did not serialise: {e}");
        Box::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request's passed submissions each have a future, allocated and moved as it is
    /// created: the rare paths that read the shared store (reconnecting, a blob copied, an
    /// idempotency key looked up) are boxed so that they are not carried inline. Before, a
    /// submission's future was 8 KiB and a waiting caller's 5.5 KiB.
    #[test]
    fn a_submission_s_futures_do_not_carry_the_shared_store_s_inline() {
        let (tx, _) = tokio::sync::mpsc::channel(1);
        let (events, _) = tokio::sync::broadcast::channel(1);
        let cfg = crate::config::DispatcherConfig::default();
        let policy = crate::policy::Policy::from_config(&cfg).unwrap();
        let h = Handle::new(&cfg, &policy, tx, events);
        let s = Submission {
            headers: vec![],
            wait_ms: None,
            body: raw(&1),
        };
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let id: JobId = "j-1".parse().unwrap();
        let took = std::mem::size_of_val(&take(&h, peer, 0, &s));
        let waits = std::mem::size_of_val(&waited_answer(&h, 0, &id, Duration::ZERO));
        assert!(took < 6 * 1024, "a submission's future is {took} bytes");
        assert!(
            waits < 3 * 1024,
            "a waiting caller's future is {waits} bytes"
        );
    }

    #[test]
    fn lines_are_read_whole_across_chunks() {
        let mut buf = Vec::new();
        let mut seen: Vec<String> = Vec::new();
        let mut feed = |buf: &mut Vec<u8>, chunk: &str| {
            each_line(buf, chunk.as_bytes(), |l| {
                seen.push(String::from_utf8(l.to_vec()).unwrap())
            })
        };
        feed(&mut buf, "{\"i\":0}\n{\"i\":1}\n{\"sto");
        feed(&mut buf, "red\":true}");
        feed(&mut buf, "\n");
        feed(&mut buf, "");
        feed(&mut buf, "{\"i\":2}\n{\"i\"");
        assert_eq!(
            seen,
            ["{\"i\":0}", "{\"i\":1}", "{\"stored\":true}", "{\"i\":2}"]
        );
        assert_eq!(buf, b"{\"i\"");
    }

    #[test]
    fn an_answer_line_reads_back_with_its_body_as_sent() {
        let a = Answer {
            i: 3,
            status: 429,
            body: raw(&serde_json::json!({"error": "rate-limited", "status": 429})),
            retry_after: Some(2),
        };
        let line = a.line();
        assert!(line.ends_with(b"\n") && !line.starts_with(STORED));
        let back: Answer = serde_json::from_slice(line.trim_ascii_end()).unwrap();
        assert_eq!((back.i, back.status, back.retry_after), (3, 429, Some(2)));
        assert_eq!(back.body.get(), r#"{"error":"rate-limited","status":429}"#);
        let r = response(back.status, back.body, back.retry_after);
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "2");
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
    }
}
