//! A standby's submissions, several to the leader in one request (`POST /v1/jobs:passed`).
//!
//! A standby passes a JSON submission on to the leader, which stores and places it in one
//! commit ([`super::forward::submit_to_leader`]). One HTTP request to the leader per
//! submission costs the standby a client request and the leader a server request for every
//! job, on top of the caller's own request: with the jobs sent to three dispatchers in turn,
//! that relay was the largest cost the standbys added (BENCHMARKS.md). So a standby gathers
//! the small submissions that arrive while its earlier ones are on their way
//! ([`Passer`]: at most [`IN_FLIGHT`] requests to the leader at once, each taking whatever
//! waits, up to [`MAX_ITEMS`]) and sends them together; under load each request carries many,
//! and one submission alone goes at once. The leader checks each one as if its caller had
//! sent it ([`passed`]: the caller's own headers, so its token, its same-origin headers and
//! its `Idempotency-Key`), gives them to the core together (they share a commit), and answers
//! with one answer per submission, in order. The standby answers each caller with its own.
//!
//! A caller that waits (`?wait=`) is answered by the leader when its job is stored — with the
//! final job when it ended before that commit, as a fast job does — and otherwise waits at
//! the standby, which hears of the job's end from the leader's announcement (PostgreSQL's
//! `spine_ended`, carrying the job's view: the leader marks these jobs, as it marks those a
//! standby stored).
//!
//! Nothing of a request the leader refused as a whole (any answer but 200) was stored: the
//! standby then stores those submissions itself, for the leader, as when the leader cannot be
//! reached at all. A request that reached the leader and got no answer in time leaves its
//! callers with 503 `standby`: they retry, with their idempotency keys.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use spine_protocol::{JobId, JobState};
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::auth::{authenticate, read_body};
use super::error::ApiError;
use super::forward::FORWARDED_BY;
use super::openapi::{ErrorBody, Submitted};
use super::views::job_json;
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

/// Requests to the leader under way at once: while they are, what arrives gathers for the
/// next one.
const IN_FLIGHT: usize = 2;

/// How long a standby waits for the leader's answers: the leader answers once the
/// submissions are stored, within milliseconds; a leader that took the request and says
/// nothing is paused, and the callers had better retry elsewhere.
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

/// A submission waiting to go: its part of the request (`{"headers":…,"wait":…,"body":…}`),
/// the leader it goes to and who hears the outcome.
struct Waiting {
    item: Vec<u8>,
    leader: String,
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
    /// not of its connection), whether its caller waits, and its JSON `body` (checked
    /// already: valid JSON).
    pub(crate) async fn pass(
        &self,
        leader: &str,
        headers: &[(&str, &str)],
        wait: bool,
        body: &[u8],
    ) -> Outcome {
        let mut item = Vec::with_capacity(body.len() + 128);
        item.extend_from_slice(b"{\"headers\":");
        if serde_json::to_writer(&mut item, headers).is_err() {
            return Outcome::StoreHere;
        }
        item.extend_from_slice(if wait {
            b",\"wait\":true,\"body\":"
        } else {
            b",\"wait\":false,\"body\":"
        });
        // Checked as JSON by the caller (parse_request): it goes in as it is.
        item.extend_from_slice(body);
        item.push(b'}');
        let (reply, rx) = oneshot::channel();
        let w = Waiting {
            item,
            leader: leader.to_owned(),
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
        tokio::spawn(async move {
            send(&client, &by, batch).await;
            drop(slot);
        });
    }
}

/// One request to the leader with `batch`; each submission's caller hears its outcome.
async fn send(client: &reqwest::Client, by: &str, batch: Vec<Waiting>) {
    let leader = batch[0].leader.trim_end_matches('/').to_owned();
    let mut body = Vec::with_capacity(batch.iter().map(|w| w.item.len() + 1).sum::<usize>() + 20);
    body.extend_from_slice(b"{\"submissions\":[");
    for (i, w) in batch.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(&w.item);
    }
    body.extend_from_slice(b"]}");
    let sent = client
        .post(format!("{leader}{PASSED_PATH}"))
        .header(FORWARDED_BY, by)
        .header(header::CONTENT_TYPE, "application/json")
        .timeout(ANSWER_TIMEOUT)
        .body(body)
        .send()
        .await;
    let answers = match sent {
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
        Ok(r) => match r.bytes().await {
            Ok(b) => serde_json::from_slice::<Answers>(&b).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        },
    };
    match answers {
        Ok(a) if a.answers.len() == batch.len() => {
            for (w, a) in batch.into_iter().zip(a.answers) {
                let _ = w
                    .reply
                    .send(Outcome::Answer(a.status, a.body, a.retry_after));
            }
        }
        Ok(a) => {
            let why = format!("{} answers to {} submissions", a.answers.len(), batch.len());
            tracing::error!(leader = %leader, "the leader's answer to passed submissions: {why}");
            tell(batch, || Outcome::Lost(why.clone()));
        }
        Err(why) => {
            tracing::warn!(leader = %leader, "the leader's answer to passed submissions could not be read: {why}");
            tell(batch, || Outcome::Lost(why.clone()));
        }
    }
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

/// An accepted submission's answer (`{"id", "state"}`), read back at the standby.
#[derive(Deserialize)]
pub(crate) struct Accepted {
    pub(crate) id: JobId,
    pub(crate) state: JobState,
}

/// `POST /v1/jobs:passed`'s body: the submissions a standby gathered.
#[derive(Deserialize)]
struct Submissions<'a> {
    #[serde(borrow)]
    submissions: Vec<Submission<'a>>,
}

#[derive(Deserialize)]
struct Submission<'a> {
    /// The caller's request headers, as name and value.
    #[serde(borrow)]
    headers: Vec<(std::borrow::Cow<'a, str>, std::borrow::Cow<'a, str>)>,
    /// Its caller waits for the job's end (at the standby).
    wait: bool,
    /// The JSON body `POST /v1/jobs` takes.
    #[serde(borrow)]
    body: &'a RawValue,
}

/// `POST /v1/jobs:passed`'s answer: one per submission, in order.
#[derive(Serialize, Deserialize)]
struct Answers {
    answers: Vec<Answer>,
}

#[derive(Serialize, Deserialize)]
struct Answer {
    /// The status `POST /v1/jobs` would have answered with.
    status: u16,
    /// Its JSON body.
    body: Box<RawValue>,
    /// Its `Retry-After`, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    retry_after: Option<u64>,
}

/// At the leader, `POST /v1/jobs:passed` (from a standby, [`FORWARDED_BY`]): each submission
/// checked as if its caller had sent it — authenticated from its own headers, from the
/// standby's address — and accepted or refused on its own. Not behind the admission layer:
/// the request has no caller of its own, each submission has one. Refused as a whole (and
/// nothing stored) by a standby, and while the job store cannot be reached.
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
    let answer = async {
        let bytes = read_body(body, MAX_PASSED_BODY, small).await?;
        let batch: Submissions<'_> = serde_json::from_slice(&bytes).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad-request",
                format!("the body must be {{\"submissions\": [{{\"headers\", \"wait\", \"body\"}}, …]}}: {e}"),
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
        let answers =
            futures::future::join_all(batch.submissions.iter().map(|s| one(&h, peer, s))).await;
        Ok::<_, ApiError>(Answers { answers })
    };
    match tokio::time::timeout(h.limits.request_timeout, answer).await {
        Ok(a) => Ok((StatusCode::OK, Json(a?)).into_response()),
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request-timeout",
            "the passed submissions took longer than http_request_timeout",
        )),
    }
}

/// `v` as JSON (the views and errors here always serialise).
fn raw<T: Serialize>(v: &T) -> Box<RawValue> {
    serde_json::value::to_raw_value(v).unwrap_or_else(|e| {
        tracing::error!("a passed submission's answer did not serialise: {e}");
        Box::default()
    })
}

/// One passed submission, as `POST /v1/jobs` with a JSON body would have answered it.
async fn one(h: &Handle, peer: SocketAddr, s: &Submission<'_>) -> Answer {
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
        super::routes::accept_json(h, &caller, Some(&headers), s.body.get().as_bytes(), s.wait)
            .await
    };
    let (status, body, retry_after) = match accepted.await {
        Ok((_, _, Some(rec))) => (StatusCode::OK, raw(&job_json(&rec)), None),
        Ok((id, state, None)) => (StatusCode::ACCEPTED, raw(&Submitted { id, state }), None),
        Err(e) => {
            let retry = (e.status == StatusCode::TOO_MANY_REQUESTS
                || e.status == StatusCode::SERVICE_UNAVAILABLE)
                .then(|| e.retry_after.unwrap_or(1).max(1));
            (e.status, raw(&ErrorBody::from(&e)), retry)
        }
    };
    Answer {
        status: status.as_u16(),
        body,
        retry_after,
    }
}
