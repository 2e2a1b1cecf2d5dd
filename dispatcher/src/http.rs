//! The HTTP/JSON API (axum): what web apps use to submit jobs, follow them and choose agents.
//!
//! Handlers never touch the dispatcher's state: they send a [`Command`] with a `oneshot` reply
//! to the connection task (the one owner of the registry, jobs and store) through a cloneable
//! [`Handle`]. Progress and outcomes reach `GET /v1/jobs/{id}/events` (server-sent events)
//! through a broadcast channel.
//!
//! The front end is this module's own accept loop ([`serve`]) in front of the axum router: a
//! connection limit with room kept for loopback clients, TCP_NODELAY, hyper's header-read
//! timeout. Every route but `/healthz` then goes through [`admit`], which authenticates from
//! the headers alone, refuses a declared body over the route's limit, and bounds the request's
//! time; only then does a handler read a body. Authentication: bearer tokens from the
//! configuration, each allowed a set of capabilities. With no token configured the API serves
//! loopback clients only.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, DefaultBodyLimit, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine as _;
use futures::{Stream, StreamExt as _};
use serde::Deserialize;
use serde_json::{json, Value};
use spine_protocol::{
    AgentInfo, AttrName, CapabilityName, Condition, Filter, JobId, JobState, SpineError, Strategy,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{DispatcherConfig, HttpToken};
use crate::error::DispatcherError;
use crate::jobs::{JobRecord, JobSpec, Recorded};
use crate::policy::{Capabilities, Grant, Policy};

/// Largest HTTP request body for a dispatcher whose largest input is `max_input` bytes (its
/// `max_blob`): room for that input in base64 inside a JSON body (4/3 of it, and the rest of
/// the request). 96 MiB with the default `max_blob` of 64 MiB.
pub fn max_body(max_input: u64) -> usize {
    usize::try_from(max_input.saturating_add(max_input / 2)).unwrap_or(usize::MAX)
}

/// Largest body of any request but a submission, and of every request before it is
/// authenticated (the router's default, for any extractor that reads a body).
pub const SMALL_BODY: usize = 64 * 1024;

/// hyper's read buffer per connection, which bounds a request's headers (and the memory a
/// connection holds before it is authenticated): headers that do not fit are refused with
/// 431 (hyper checks between reads, so up to twice this gets in). At least 8 KiB (hyper).
const READ_BUFFER: usize = 64 * 1024;

/// Open files besides the HTTP connections: the store, the audit log, the XMPP connection,
/// standard streams, the runtime's own.
const OTHER_FILES: u64 = 64;

/// How long answers in progress get to finish when the dispatcher stops (an event stream
/// never finishes by itself).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// A request from an HTTP handler to the connection task./// A request from an HTTP handler to the connection task.
pub(crate) enum Command {
    Submit {
        spec: Box<JobSpec>,
        /// Accept it even if no agent ever offered its capabilities.
        wait_for_agent: bool,
        /// The capabilities the caller may run (an `unknown-capability` answer lists only
        /// those).
        visible: Capabilities,
        reply: oneshot::Sender<Result<(JobId, JobState), SpineError>>,
    },
    Get {
        id: JobId,
        reply: oneshot::Sender<Option<JobRecord>>,
    },
    Cancel {
        id: JobId,
        reply: oneshot::Sender<Result<JobState, SpineError>>,
    },
    Agents {
        capability: CapabilityName,
        filter: Option<Filter>,
        sort: Option<AttrName>,
        limit: Option<usize>,
        reply: oneshot::Sender<Vec<AgentInfo>>,
    },
    Capabilities {
        reply: oneshot::Sender<Vec<(CapabilityName, usize, usize)>>,
    },
    List {
        state: Option<JobState>,
        /// Only this submitter's jobs.
        submitter: Option<String>,
        limit: usize,
        reply: oneshot::Sender<Vec<JobRecord>>,
    },
    Metrics {
        reply: oneshot::Sender<String>,
    },
}

pub use crate::core::JobEvent;

/// Cloneable access to the connection task, for HTTP handlers.
#[derive(Clone)]
pub(crate) struct Handle {
    pub(crate) tx: mpsc::Sender<Command>,
    pub(crate) events: broadcast::Sender<JobEvent>,
    /// The configured tokens with their grants (capability patterns parsed once, at start).
    pub(crate) tokens: Arc<Vec<(HttpToken, Grant)>>,
    pub(crate) max_attempts: u64,
    pub(crate) max_input: u64,
    limits: Arc<Limits>,
    streams: Arc<Streams>,
    conns: Arc<ConnCounts>,
}

impl Handle {
    /// The handle of a dispatcher configured by `cfg`, sending to `tx` and `events`.
    pub(crate) fn new(
        cfg: &DispatcherConfig,
        tx: mpsc::Sender<Command>,
        events: broadcast::Sender<JobEvent>,
    ) -> Result<Self, DispatcherError> {
        Ok(Handle {
            tx,
            events,
            tokens: Arc::new(Policy::http_tokens(cfg)?),
            max_attempts: cfg.max_attempts,
            max_input: cfg.max_blob.as_u64(),
            limits: Arc::new(Limits::from_config(cfg)),
            streams: Arc::default(),
            conns: Arc::default(),
        })
    }
}

/// The HTTP front end's timeouts and limits (the `http_*` keys of the configuration).
#[derive(Debug, Clone)]
struct Limits {
    header_timeout: Duration,
    request_timeout: Duration,
    max_connections: usize,
    loopback_reserve: usize,
    max_streams: usize,
    max_streams_per_token: usize,
}

impl Limits {
    fn from_config(cfg: &DispatcherConfig) -> Self {
        Limits {
            header_timeout: cfg.http_header_timeout,
            request_timeout: cfg.http_request_timeout,
            max_connections: cfg.http_max_connections,
            loopback_reserve: cfg.http_loopback_reserve,
            max_streams: cfg.http_max_event_streams,
            max_streams_per_token: cfg.http_max_event_streams_per_token,
        }
    }

    /// Connections a client at `peer` may find open and still get in: all of them for
    /// loopback clients, all but the reserve for the others.
    fn connection_cap(&self, peer: SocketAddr) -> usize {
        if is_loopback(peer) {
            self.max_connections
        } else {
            self.max_connections.saturating_sub(self.loopback_reserve)
        }
    }
}

/// A loopback peer, also as an IPv4-mapped IPv6 address (a dual-stack listener).
fn is_loopback(peer: SocketAddr) -> bool {
    peer.ip().to_canonical().is_loopback()
}

/// Open connections and the ones refused at the limit, for `/metrics`.
#[derive(Default)]
struct ConnCounts {
    open: AtomicUsize,
    refused: AtomicU64,
}

/// One open connection, counted until it is dropped.
struct ConnSlot(Arc<ConnCounts>);

impl ConnSlot {
    fn take(c: &Arc<ConnCounts>) -> Self {
        c.open.fetch_add(1, Ordering::AcqRel);
        ConnSlot(c.clone())
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Open event streams, in all and per caller (token name, or `local`).
#[derive(Default)]
struct Streams(Mutex<StreamCounts>);

#[derive(Default)]
struct StreamCounts {
    total: usize,
    per_caller: HashMap<String, usize>,
}

impl Streams {
    /// Counts a new stream of `who`, or refuses it: 429 past the caller's limit, 503 past the
    /// dispatcher's.
    fn open(self: &Arc<Self>, who: &str, limits: &Limits) -> Result<StreamSlot, ApiError> {
        let mut c = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let mine = c.per_caller.get(who).copied().unwrap_or(0);
        if mine >= limits.max_streams_per_token {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too-many-streams",
                format!(
                    "'{who}' has {mine} event streams open, the most a token may have (http_max_event_streams_per_token)"
                ),
            ));
        }
        if c.total >= limits.max_streams {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "too-many-streams",
                format!(
                    "the dispatcher has {} event streams open, its limit (http_max_event_streams)",
                    c.total
                ),
            ));
        }
        c.total += 1;
        *c.per_caller.entry(who.to_owned()).or_default() += 1;
        Ok(StreamSlot {
            streams: self.clone(),
            who: who.to_owned(),
        })
    }

    fn total(&self) -> usize {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).total
    }
}

/// One open event stream, counted until it is dropped (when its task ends).
struct StreamSlot {
    streams: Arc<Streams>,
    who: String,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut c = self
            .streams
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_caller.get_mut(&self.who) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.per_caller.remove(&self.who);
            }
        }
    }
}

/// An API error: HTTP status and a JSON body `{"error": ..., "field": ...}`.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    condition: &'static str,
    message: String,
    field: Option<String>,
}

impl ApiError {
    fn new(status: StatusCode, condition: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            condition,
            message: message.into(),
            field: None,
        }
    }
    fn field(field: &str, message: impl Into<String>) -> Self {
        ApiError {
            field: Some(field.to_owned()),
            ..Self::new(StatusCode::BAD_REQUEST, "bad-request", message)
        }
    }
    fn unavailable() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the dispatcher is shutting down",
        )
    }
}

impl From<SpineError> for ApiError {
    fn from(e: SpineError) -> Self {
        let status = match e.condition {
            Condition::QueueFull | Condition::Busy => StatusCode::TOO_MANY_REQUESTS,
            Condition::UnknownJob | Condition::NoAgent => StatusCode::NOT_FOUND,
            // The request is well formed and the endpoint exists, but it names a capability
            // this dispatcher has never seen: 404 would read as "no such endpoint".
            Condition::UnknownCapability => StatusCode::UNPROCESSABLE_ENTITY,
            Condition::NotAuthorized => StatusCode::FORBIDDEN,
            Condition::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Condition::BadArguments | Condition::Malformed => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError {
            status,
            condition: e.condition.as_str(),
            message: e.text.unwrap_or_else(|| e.condition.to_string()),
            field: e.field,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.condition, "message": self.message });
        if let Some(f) = self.field {
            body["field"] = json!(f);
        }
        (self.status, Json(body)).into_response()
    }
}

/// Who is calling: the token's name (or `local`) and what it may do. [`admit`] puts it in
/// the request's extensions; handlers take it as an extractor.
#[derive(Clone)]
struct Caller {
    name: String,
    grant: Grant,
    /// May read `/metrics`: the local operator, an operator token (every capability and
    /// every job) or a token with `metrics = true`.
    metrics: bool,
}

impl Caller {
    fn may_run(&self, cap: &CapabilityName) -> bool {
        self.grant.capabilities.allows(cap)
    }

    /// The `submitter` of the jobs it submits.
    fn submitter(&self) -> String {
        format!("http:{}", self.name)
    }

    /// Refuses a job submitted by someone else, unless the token has `all_jobs`.
    fn check_sees(&self, job: &JobRecord) -> Result<(), ApiError> {
        if self.grant.may_see(&self.submitter(), &job.spec.submitter) {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "not-authorized",
                format!(
                    "job {} was submitted by someone else (token '{}' has no all_jobs)",
                    job.id, self.name
                ),
            ))
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        parts.extensions.get::<Caller>().cloned().ok_or_else(|| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the request was not authenticated (a route outside the admission layer)",
            )
        })
    }
}

fn authenticate(h: &Handle, headers: &HeaderMap, peer: SocketAddr) -> Result<Caller, ApiError> {
    if h.tokens.is_empty() {
        if is_loopback(peer) {
            // Without tokens the API is the local operator's: everything, every job.
            return Ok(Caller {
                name: "local".into(),
                grant: Grant {
                    capabilities: Capabilities::all(),
                    all_jobs: true,
                },
                metrics: true,
            });
        }
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "not-authorized",
            "no API tokens are configured: only loopback clients are served",
        ));
    }
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "not-authorized",
                "missing 'Authorization: Bearer <token>'",
            )
        })?;
    // Compare SHA-256 digests, every byte of every token: timing says nothing about which
    // prefix matched nor how long the configured tokens are.
    use sha2::Digest as _;
    let given = sha2::Sha256::digest(given.as_bytes());
    let mut found = None;
    for (t, grant) in h.tokens.iter() {
        let same = sha2::Sha256::digest(t.token.as_bytes())
            .iter()
            .zip(given.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
        if same {
            found = Some((t, grant));
        }
    }
    let (t, grant) = found.ok_or_else(|| {
        ApiError::new(StatusCode::UNAUTHORIZED, "not-authorized", "unknown token")
    })?;
    Ok(Caller {
        name: t.name.clone(),
        grant: grant.clone(),
        metrics: t.metrics || (grant.all_jobs && t.capabilities.iter().any(|c| c == "*")),
    })
}

/// The largest body `method path` may carry: a submission's, or [`SMALL_BODY`].
fn body_limit(h: &Handle, method: &Method, path: &str) -> usize {
    if method == Method::POST && path == "/v1/jobs" {
        max_body(h.max_input)
    } else {
        SMALL_BODY
    }
}

fn too_large_body(limit: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too-large",
        format!("the request body is over the limit of {limit} bytes for this endpoint"),
    )
}

/// The admission layer in front of every route but `/healthz`: authenticates from the headers
/// before anything reads the body (a refused request's body is never read: hyper closes the
/// connection instead), refuses a declared `Content-Length` over the route's limit at once,
/// and bounds the time until the answer starts by `http_request_timeout`.
///
/// The request timeout is this `tokio::time::timeout` rather than tower-http's
/// `TimeoutLayer` so that the answer is the API's JSON error; like that layer it covers the
/// handler, body upload included, but not an event stream once its headers are sent. The
/// header-read timeout cannot be a layer at all (no layer runs before the headers are
/// parsed): it is hyper's, in [`serve_connection`].
async fn admit(State(h): State<Handle>, mut req: Request, next: Next) -> Response {
    let Some(ConnectInfo(peer)) = req.extensions().get::<ConnectInfo<SocketAddr>>().copied() else {
        return ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "no peer address (the router is served without serve())",
        )
        .into_response();
    };
    let caller = match authenticate(&h, req.headers(), peer) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let limit = body_limit(&h, req.method(), req.uri().path());
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return too_large_body(limit).into_response();
    }
    req.extensions_mut().insert(caller);
    match tokio::time::timeout(h.limits.request_timeout, next.run(req)).await {
        Ok(r) => r,
        Err(_) => ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request-timeout",
            format!(
                "the request took longer than {} (http_request_timeout)",
                humantime::format_duration(h.limits.request_timeout)
            ),
        )
        .into_response(),
    }
}

/// Reads a body of at most `limit` bytes (the declared length was checked by [`admit`]; a
/// chunked body is cut off here).
async fn read_body(body: Body, limit: usize, declared: usize) -> Result<Vec<u8>, ApiError> {
    let mut stream = body.into_data_stream();
    let mut buf = Vec::with_capacity(declared.min(limit).min(1 << 20));
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad-request",
                format!("reading the request body: {e}"),
            )
        })?;
        if buf.len() + chunk.len() > limit {
            return Err(too_large_body(limit));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf)
}

async fn ask<T>(
    h: &Handle,
    make: impl FnOnce(oneshot::Sender<T>) -> Command,
) -> Result<T, ApiError> {
    let (tx, rx) = oneshot::channel();
    h.tx.send(make(tx))
        .await
        .map_err(|_| ApiError::unavailable())?;
    rx.await.map_err(|_| ApiError::unavailable())
}

/// `POST /v1/jobs` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitRequest {
    capability: String,
    #[serde(default)]
    args: Option<serde_json::Map<String, Value>>,
    /// Input bytes, base64.
    input: Option<String>,
    input_type: Option<String>,
    strategy: Option<String>,
    filter: Option<String>,
    sort: Option<String>,
    affinity_key: Option<String>,
    /// Like "30s".
    deadline: Option<String>,
    priority: Option<i64>,
    max_attempts: Option<u64>,
    idempotency_key: Option<String>,
    #[serde(default)]
    progress: bool,
    /// Accept the job even if no agent has offered its capabilities yet (it then waits
    /// `no_agent_wait` for one, like a job whose agents are momentarily absent).
    wait_for_agent: Option<bool>,
    /// `all` strategy: agents to use, "5" or "50%".
    limit: Option<String>,
    /// `all` strategy: children at once.
    batch: Option<u64>,
    /// Map/reduce: the reduce capability (`capability` is the map step).
    reduce: Option<String>,
    /// Map/reduce: the split capability (without it the input is the fragment list).
    split: Option<String>,
    /// Map/reduce: outputs per reduce step.
    fan_in: Option<u64>,
    /// Map/reduce: the fragments, instead of `input`.
    fragments: Option<Vec<spine_protocol::Fragment>>,
}

fn spec_from(
    req: SubmitRequest,
    caller: &Caller,
    max_attempts: u64,
    max_input: u64,
) -> Result<JobSpec, ApiError> {
    let capability: CapabilityName = req
        .capability
        .parse()
        .map_err(|e: String| ApiError::field("capability", e))?;
    if !caller.may_run(&capability) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "not-authorized",
            format!("token '{}' may not run {capability}", caller.name),
        ));
    }
    let strategy = match req.strategy.as_deref() {
        None => Strategy::LeastLoaded,
        Some(s) => s
            .parse()
            .map_err(|e: String| ApiError::field("strategy", e))?,
    };
    if let Some(f) = &req.filter {
        f.parse::<Filter>()
            .map_err(|e| ApiError::field("filter", e.to_string()))?;
    }
    let sort = match &req.sort {
        None => None,
        Some(s) => Some(
            s.parse::<AttrName>()
                .map_err(|e| ApiError::field("sort", e))?,
        ),
    };
    match (strategy, &req.affinity_key) {
        (Strategy::Affinity, None) => {
            return Err(ApiError::field(
                "affinity_key",
                "required with strategy 'affinity'",
            ))
        }
        (s, Some(_)) if s != Strategy::Affinity => {
            return Err(ApiError::field(
                "affinity_key",
                "only the 'affinity' strategy takes a key",
            ))
        }
        _ => {}
    }
    let limit = match &req.limit {
        None => None,
        Some(_) if strategy != Strategy::All => {
            return Err(ApiError::field(
                "limit",
                "only the 'all' strategy takes a limit",
            ))
        }
        Some(l) => Some(
            l.parse::<spine_protocol::Limit>()
                .map_err(|e| ApiError::field("limit", e))?,
        ),
    };
    match req.batch {
        Some(_) if strategy != Strategy::All => {
            return Err(ApiError::field(
                "batch",
                "only the 'all' strategy takes a batch size",
            ))
        }
        Some(0) => return Err(ApiError::field("batch", "must be at least 1")),
        _ => {}
    }
    let deadline_ms = match &req.deadline {
        None => None,
        Some(d) => {
            let dur = humantime::parse_duration(d).map_err(|e| {
                ApiError::field("deadline", format!("'{d}': {e} (use units, e.g. \"30s\")"))
            })?;
            Some(crate::driver::now().ms + dur.as_millis() as u64)
        }
    };
    let mapreduce = mapreduce_from(&req, strategy, caller)?;
    let (input, input_type) = match (&req.input, &req.fragments) {
        (Some(_), Some(_)) => {
            return Err(ApiError::field(
                "fragments",
                "give the fragments or an input, not both",
            ))
        }
        (None, Some(f)) => (
            spine_protocol::fragments::encode(f),
            Some(spine_protocol::FRAGMENTS_MIME.to_owned()),
        ),
        (None, None) => (Vec::new(), req.input_type),
        (Some(b), None) => (
            base64::engine::general_purpose::STANDARD
                .decode(b)
                .map_err(|e| ApiError::field("input", format!("not base64: {e}")))?,
            req.input_type,
        ),
    };
    if input.len() as u64 > max_input {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-large",
            format!(
                "input of {} bytes is over the limit of {max_input}",
                input.len()
            ),
        ));
    }
    if req.max_attempts == Some(0) {
        return Err(ApiError::field("max_attempts", "must be at least 1"));
    }
    if req
        .idempotency_key
        .as_ref()
        .is_some_and(|k| k.is_empty() || k.len() > 256)
    {
        return Err(ApiError::field("idempotency_key", "must be 1 to 256 bytes"));
    }
    Ok(JobSpec {
        capability,
        strategy,
        filter: req.filter,
        sort,
        affinity_key: req.affinity_key,
        args: req.args.unwrap_or_default(),
        input,
        input_mime: input_type,
        deadline_ms,
        priority: req.priority.unwrap_or(0),
        max_attempts: req.max_attempts.unwrap_or(max_attempts),
        submitter: caller.submitter(),
        idempotency_key: req.idempotency_key,
        progress: req.progress,
        watch: None,
        limit,
        batch: req.batch,
        mapreduce,
        target: None,
        parent: None,
    })
}

/// The map/reduce part of a request, checked (the caller must be allowed every step).
fn mapreduce_from(
    req: &SubmitRequest,
    strategy: Strategy,
    caller: &Caller,
) -> Result<Option<spine_protocol::MapReduce>, ApiError> {
    let cap = |field: &str, name: &str| -> Result<CapabilityName, ApiError> {
        let c: CapabilityName = name
            .parse()
            .map_err(|e: String| ApiError::field(field, e))?;
        if !caller.may_run(&c) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "not-authorized",
                format!("token '{}' may not run {c}", caller.name),
            ));
        }
        Ok(c)
    };
    let Some(reduce) = &req.reduce else {
        for (field, given) in [
            ("split", req.split.is_some()),
            ("fan_in", req.fan_in.is_some()),
            ("fragments", req.fragments.is_some()),
        ] {
            if given {
                return Err(ApiError::field(
                    field,
                    "only a map/reduce job (with reduce) takes this",
                ));
            }
        }
        return Ok(None);
    };
    if strategy == Strategy::All {
        return Err(ApiError::field(
            "reduce",
            "the 'all' strategy cannot be a map/reduce",
        ));
    }
    if let Some(f) = req.fan_in {
        spine_protocol::MapReduce::check_fan_in(f).map_err(|e| ApiError::field("fan_in", e))?;
    }
    if req.split.is_some() && req.fragments.is_some() {
        return Err(ApiError::field(
            "fragments",
            "with a split step the input is split; give an input, not fragments",
        ));
    }
    Ok(Some(spine_protocol::MapReduce {
        reduce: cap("reduce", reduce)?,
        split: req.split.as_deref().map(|s| cap("split", s)).transpose()?,
        fan_in: req.fan_in.unwrap_or(spine_protocol::DEFAULT_FAN_IN),
    }))
}

/// The JSON view of a job.
pub fn job_json(j: &JobRecord) -> Value {
    let mut v = json!({
        "id": j.id,
        "capability": j.spec.capability,
        "state": j.state,
        "attempts": j.attempts,
        "agent": j.agent,
        "percent": j.percent,
        "submitter": j.spec.submitter,
    });
    if !j.children.is_empty() {
        v["children"] = json!(j.children);
    }
    if let Some(p) = &j.spec.parent {
        v["parent"] = json!(p);
    }
    if let Some(m) = &j.spec.mapreduce {
        v["reduce"] = json!(m.reduce);
        v["split"] = json!(m.split);
        v["fan_in"] = json!(m.fan_in);
    }
    if let Some(st) = &j.mr {
        let (md, mt, rd, rt) = st.counts();
        v["mapreduce"] = json!({
            "fragments": mt, "fragments_done": md,
            "reduce_steps": rt, "reduce_steps_done": rd,
            "speculative": st.speculative,
        });
    }
    match &j.outcome {
        Some(Recorded::Succeeded {
            meta,
            output,
            mime,
            elapsed_ms,
        }) => {
            v["result"] = json!({
                "output": base64::engine::general_purpose::STANDARD.encode(output),
                "type": mime,
                "meta": meta,
                "elapsed_ms": elapsed_ms,
            });
        }
        Some(Recorded::Failure {
            condition,
            message,
            field,
        }) => {
            v["error"] = json!({ "condition": condition, "message": message });
            if let Some(f) = field {
                v["error"]["field"] = json!(f);
            }
        }
        None => {}
    }
    v
}

fn job_id(s: &str) -> Result<JobId, ApiError> {
    s.parse().map_err(|e: String| ApiError::field("id", e))
}

/// Reads a `SubmitRequest` from JSON, naming the field at fault.
fn parse_request(json: &[u8], what: &str) -> Result<SubmitRequest, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(json);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let msg = e.inner().to_string();
        // A wrong type names its path; an unknown or missing field is named in the message.
        let field = if path.is_empty() || path == "." {
            msg.split('`').nth(1).map(str::to_owned)
        } else {
            Some(path)
        };
        ApiError {
            field,
            ..ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad-request",
                format!("invalid {what}: {msg}"),
            )
        }
    })
}

/// The fields of a raw-upload submission, from the query string, as the JSON object the JSON
/// form would have carried: numbers and booleans typed, `args` parsed as JSON.
fn query_as_json(query: Option<&str>) -> Result<Value, ApiError> {
    let pairs: Vec<(String, String)> =
        serde_urlencoded::from_str(query.unwrap_or("")).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad-request",
                format!("invalid query string: {e}"),
            )
        })?;
    let mut m = serde_json::Map::new();
    for (k, v) in pairs {
        let value = match k.as_str() {
            "priority" | "max_attempts" | "batch" | "fan_in" => match v.parse::<i64>() {
                Ok(n) => json!(n),
                Err(_) => return Err(ApiError::field(&k, format!("'{v}' is not an integer"))),
            },
            "progress" | "wait_for_agent" => match v.as_str() {
                "true" | "1" => json!(true),
                "false" | "0" => json!(false),
                _ => return Err(ApiError::field(&k, "expected true or false")),
            },
            "args" => serde_json::from_str::<Value>(&v)
                .map_err(|e| ApiError::field("args", format!("not JSON: {e}")))?,
            "input" | "input_type" | "fragments" => {
                return Err(ApiError::field(
                    &k,
                    "with a raw upload the body is the input and Content-Type its type",
                ))
            }
            _ => json!(v),
        };
        m.insert(k, value);
    }
    Ok(Value::Object(m))
}

/// How a submission's body is read.
#[derive(Debug, PartialEq, Eq)]
enum BodyForm {
    /// The job as a JSON object.
    Json,
    /// The job's input; its fields are in the query string.
    Raw,
}

/// The form of a submission's body, from its Content-Type (media type compared without case
/// or parameters): JSON for `application/json` (or none); also for
/// `application/x-www-form-urlencoded` without a query string when the body is a JSON object,
/// which is what `curl -d '{…}'` and many HTTP clients send by default (a form-encoded body
/// cannot start with `{`, so nothing else is taken for JSON). A form-encoded body that is not
/// a JSON object and has no query string is refused with 415 and the two forms that work.
/// Any other type is a raw upload.
fn body_form(content_type: &str, query: Option<&str>, body: &[u8]) -> Result<BodyForm, ApiError> {
    let media = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if media == "application/json" {
        return Ok(BodyForm::Json);
    }
    let no_query = query.is_none_or(str::is_empty);
    if media == "application/x-www-form-urlencoded" && no_query {
        if body.trim_ascii_start().starts_with(b"{") {
            return Ok(BodyForm::Json);
        }
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            "a body of Content-Type application/x-www-form-urlencoded is read as JSON only when it is a JSON object (as `curl -d '{...}'` sends it), and form fields are not taken: send Content-Type: application/json with the job as a JSON object, or a raw upload with the job fields in the query string",
        ));
    }
    Ok(BodyForm::Raw)
}

/// `POST /v1/jobs`: a JSON body (input as base64), or a raw upload (any other Content-Type:
/// the body is the input, the job's fields are query parameters). [`admit`] authenticated the
/// caller and checked the declared length before this reads the body.
async fn submit(
    State(h): State<Handle>,
    caller: Caller,
    headers: HeaderMap,
    uri: axum::http::Uri,
    body: Body,
) -> Result<Response, ApiError> {
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    let body = read_body(body, max_body(h.max_input), declared).await?;
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    let (req, raw) = match body_form(content_type, uri.query(), &body)? {
        BodyForm::Json => (parse_request(&body, "JSON body")?, None),
        BodyForm::Raw => {
            let fields = query_as_json(uri.query())?;
            if fields.get("capability").is_none() {
                return Err(ApiError::field(
                    "capability",
                    format!(
                        "missing: a body of Content-Type {content_type} is a raw upload (the job's input), and its job fields, capability first, go in the query string (?capability=…); to send the job as JSON, send Content-Type: application/json"
                    ),
                ));
            }
            let req = parse_request(fields.to_string().as_bytes(), "query parameters")?;
            (req, Some((body, content_type.to_owned())))
        }
    };
    let wait_for_agent = req.wait_for_agent.unwrap_or(false);
    let mut spec = spec_from(req, &caller, h.max_attempts, h.max_input)?;
    if let Some((input, mime)) = raw {
        if input.len() as u64 > h.max_input {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too-large",
                format!(
                    "input of {} bytes is over the limit of {}",
                    input.len(),
                    h.max_input
                ),
            ));
        }
        spec.input = input;
        spec.input_mime = Some(mime);
    }
    let (id, state) = ask(&h, |reply| Command::Submit {
        spec: Box::new(spec),
        wait_for_agent,
        visible: caller.grant.capabilities.clone(),
        reply,
    })
    .await??;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "id": id, "state": state })),
    )
        .into_response())
}

async fn get_job(
    State(h): State<Handle>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = job_id(&id)?;
    let rec = find_job(&h, &id).await?;
    caller.check_sees(&rec)?;
    Ok(Json(job_json(&rec)))
}

/// The job `id`, or 404.
async fn find_job(h: &Handle, id: &JobId) -> Result<JobRecord, ApiError> {
    ask(h, |reply| Command::Get {
        id: id.clone(),
        reply,
    })
    .await?
    .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "unknown-job", format!("no job {id}")))
}

async fn cancel_job(
    State(h): State<Handle>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = job_id(&id)?;
    // A job's submitter never changes, so checking before the cancel is not a race.
    caller.check_sees(&find_job(&h, &id).await?)?;
    let state = ask(&h, |reply| Command::Cancel {
        id: id.clone(),
        reply,
    })
    .await??;
    Ok(Json(json!({ "id": id, "state": state })))
}

async fn events(
    State(h): State<Handle>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let id = job_id(&id)?;
    // Counted from here until the stream's task ends (the job ended or the client left).
    let slot = h.streams.open(&caller.name, &h.limits)?;
    // Subscribe before reading the state, so nothing falls between the two.
    let mut rx = h.events.subscribe();
    let rec = find_job(&h, &id).await?;
    caller.check_sees(&rec)?;
    let h2 = h.clone();
    let stream = async_stream(move |tx| async move {
        let _slot = slot;
        let done = rec.state.is_final();
        if tx
            .send(
                SseEvent::default()
                    .event(if done { "final" } else { "state" })
                    .data(job_json(&rec).to_string()),
            )
            .await
            .is_err()
            || done
        {
            return;
        }
        loop {
            // Both branches are cancellation-safe: `closed` keeps no state, and a broadcast
            // receiver keeps its place. Without the first, a stream whose client left would
            // live (and count) until its job's next event.
            let ev = tokio::select! {
                _ = tx.closed() => return,
                ev = rx.recv() => ev,
            };
            match ev {
                Ok(ev) if ev.job == id => {
                    let last = ev.kind == crate::core::EventKind::Final;
                    if tx
                        .send(
                            SseEvent::default()
                                .event(ev.kind.as_str())
                                .data(ev.data.to_string()),
                        )
                        .await
                        .is_err()
                        || last
                    {
                        return;
                    }
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    if tx
                        .send(
                            SseEvent::default()
                                .event("lagged")
                                .data(json!({ "missed": n }).to_string()),
                        )
                        .await
                        .is_err()
                    {
                        return;
                    }
                    // The missed events may have held the final one: look at the job again.
                    let (rtx, rrx) = oneshot::channel();
                    if h2
                        .tx
                        .send(Command::Get {
                            id: id.clone(),
                            reply: rtx,
                        })
                        .await
                        .is_err()
                    {
                        return;
                    }
                    if let Ok(Some(j)) = rrx.await {
                        if j.state.is_final() {
                            // The stream ends here whether or not the client still reads.
                            let last = SseEvent::default()
                                .event("final")
                                .data(job_json(&j).to_string());
                            if tx.send(last).await.is_err() {
                                debug!(job = %id, "event stream closed before its final event");
                            }
                            return;
                        }
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// A stream fed by a task through a small channel.
fn async_stream<F, Fut>(f: F) -> impl Stream<Item = Result<SseEvent, Infallible>>
where
    F: FnOnce(mpsc::Sender<SseEvent>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(f(tx));
    futures::stream::unfold(
        rx,
        |mut rx| async move { rx.recv().await.map(|e| (Ok(e), rx)) },
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    state: Option<String>,
    limit: Option<usize>,
}

async fn list_jobs(
    State(h): State<Handle>,
    caller: Caller,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) =
        q.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad-request", e.body_text()))?;
    let state = match q.state {
        None => None,
        Some(s) => Some(
            s.parse::<JobState>()
                .map_err(|e| ApiError::field("state", e))?,
        ),
    };
    let limit = q.limit.unwrap_or(100).min(10_000);
    let jobs = ask(&h, |reply| Command::List {
        state,
        // Without all_jobs a token lists its own jobs only.
        submitter: (!caller.grant.all_jobs).then(|| caller.submitter()),
        limit,
        reply,
    })
    .await?;
    let list: Vec<Value> = jobs
        .iter()
        .map(|j| {
            let mut v = job_json(j);
            if let Some(r) = v.get_mut("result") {
                r["output"] = Value::Null; // listings carry no payloads; GET /v1/jobs/{id} does
            }
            v
        })
        .collect();
    Ok(Json(json!({ "jobs": list })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentsQuery {
    capability: Option<String>,
    filter: Option<String>,
    sort: Option<String>,
    limit: Option<usize>,
}

async fn agents(
    State(h): State<Handle>,
    caller: Caller,
    q: Result<Query<AgentsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) =
        q.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad-request", e.body_text()))?;
    let capability: CapabilityName = q
        .capability
        .ok_or_else(|| ApiError::field("capability", "required"))?
        .parse()
        .map_err(|e: String| ApiError::field("capability", e))?;
    if !caller.may_run(&capability) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "not-authorized",
            format!("token '{}' may not run {capability}", caller.name),
        ));
    }
    let filter = match q.filter {
        None => None,
        Some(f) => Some(
            f.parse::<Filter>()
                .map_err(|e| ApiError::field("filter", e.to_string()))?,
        ),
    };
    let sort = match q.sort {
        None => None,
        Some(s) => Some(
            s.parse::<AttrName>()
                .map_err(|e| ApiError::field("sort", e))?,
        ),
    };
    let list = ask(&h, |reply| Command::Agents {
        capability: capability.clone(),
        filter,
        sort,
        limit: q.limit,
        reply,
    })
    .await?;
    let agents: Vec<Value> = list
        .iter()
        .map(|a| {
            json!({
                "jid": a.jid.to_string(), "state": a.state.as_str(), "load": a.load, "in_flight": a.in_flight,
                "slots": a.slots, "loadavg": a.loadavg, "mem_used": a.mem_used, "mem_total": a.mem_total,
                "attributes": a.attrs.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
            })
        })
        .collect();
    Ok(Json(json!({ "capability": capability, "agents": agents })))
}

/// The capabilities the caller may run, with their agents and queues (a limited token does
/// not learn what else the bus offers).
async fn capabilities(State(h): State<Handle>, caller: Caller) -> Result<Json<Value>, ApiError> {
    let list = ask(&h, |reply| Command::Capabilities { reply }).await?;
    let caps: Vec<Value> = list
        .into_iter()
        .filter(|(c, _, _)| caller.may_run(c))
        .map(|(c, agents, queued)| json!({ "name": c, "agents": agents, "queued": queued }))
        .collect();
    Ok(Json(json!({ "capabilities": caps })))
}

/// Prometheus metrics, for operators only: they show every capability and queue.
async fn metrics(State(h): State<Handle>, caller: Caller) -> Result<Response, ApiError> {
    if !caller.metrics {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "not-authorized",
            format!(
                "token '{}' may not read metrics (it needs metrics = true, or capabilities [\"*\"] with all_jobs)",
                caller.name
            ),
        ));
    }
    let mut text = ask(&h, |reply| Command::Metrics { reply }).await?;
    text.push_str(&format!(
        "# HELP spine_http_connections Open connections to the HTTP API.\n\
         # TYPE spine_http_connections gauge\n\
         spine_http_connections {}\n\
         # HELP spine_http_connections_refused_total Connections refused at http_max_connections.\n\
         # TYPE spine_http_connections_refused_total counter\n\
         spine_http_connections_refused_total {}\n\
         # HELP spine_http_event_streams Open event streams.\n\
         # TYPE spine_http_event_streams gauge\n\
         spine_http_event_streams {}\n",
        h.conns.open.load(Ordering::Acquire),
        h.conns.refused.load(Ordering::Acquire),
        h.streams.total(),
    ));
    Ok(([("content-type", "text/plain; version=0.0.4")], text).into_response())
}

async fn healthz(State(h): State<Handle>) -> Response {
    if h.tx.is_closed() {
        (StatusCode::SERVICE_UNAVAILABLE, "stopping\n").into_response()
    } else {
        (StatusCode::OK, "ok\n").into_response()
    }
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not-found",
        "no such endpoint (see docs/dispatcher.md)",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "this endpoint does not take that method (see docs/dispatcher.md)",
    )
}

/// The API's routes: every one but `/healthz` behind [`admit`]; a body of at most
/// [`SMALL_BODY`] for any extractor (a submission reads its own, after admission).
pub(crate) fn router(h: Handle) -> Router {
    Router::new()
        .route("/v1/jobs", axum::routing::post(submit).get(list_jobs))
        .route("/v1/jobs/{id}", get(get_job).delete(cancel_job))
        .route("/v1/jobs/{id}/events", get(events))
        .route("/v1/agents", get(agents))
        .route("/v1/capabilities", get(capabilities))
        .route("/metrics", get(metrics))
        .route_layer(axum::middleware::from_fn_with_state(h.clone(), admit))
        .route("/healthz", get(healthz))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(SMALL_BODY))
        .with_state(h)
}

/// Serves the API on `listener` until `stop`: one task per connection, at most
/// `http_max_connections` of them, the last `http_loopback_reserve` for loopback clients only.
/// A connection over the limit is answered 503 (JSON) and closed at once, so that the
/// listener's backlog keeps moving and a loopback client still gets in; nothing of it is read.
pub(crate) async fn serve(listener: TcpListener, h: Handle, stop: CancellationToken) {
    let limits = h.limits.clone();
    let conns = h.conns.clone();
    let app = router(h);
    let mut refusals = Throttled::default();
    let mut accept_errors = Throttled::default();
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(c) => c,
            Err(e) => {
                use std::io::ErrorKind::*;
                // The peer gave up before the accept: nothing to do.
                if matches!(
                    e.kind(),
                    ConnectionAborted | ConnectionReset | ConnectionRefused
                ) {
                    continue;
                }
                // Out of file descriptors or memory: wait a little rather than spin; the
                // header timeout frees connections meanwhile.
                if let Some(n) = accept_errors.tick() {
                    warn!("HTTP API: accept failed ({n} times in the last seconds): {e}");
                }
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                }
            }
        };
        // One accept loop takes the slots, so the check and the count cannot race (slots
        // are only given back meanwhile).
        if conns.open.load(Ordering::Acquire) >= limits.connection_cap(peer) {
            conns.refused.fetch_add(1, Ordering::Relaxed);
            if let Some(n) = refusals.tick() {
                warn!(
                    %peer,
                    "HTTP API: connection limit reached, {n} connections refused (http_max_connections = {}, of which {} for loopback clients)",
                    limits.max_connections, limits.loopback_reserve
                );
            }
            refuse(stream);
            continue;
        }
        let slot = ConnSlot::take(&conns);
        tokio::spawn(serve_connection(
            stream,
            peer,
            app.clone(),
            limits.clone(),
            stop.clone(),
            slot,
        ));
    }
    info!("HTTP API: no longer accepting connections");
}

/// Answers a connection over the limit with 503 and closes it, without reading from it.
fn refuse(stream: TcpStream) {
    const BODY: &str = r#"{"error":"too-many-connections","message":"the dispatcher has as many HTTP connections open as it allows (http_max_connections); try again later"}"#;
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\nretry-after: 1\r\n\r\n{BODY}",
        BODY.len()
    );
    // A fresh socket's send buffer takes these few bytes at once; if it does not, the client
    // sees the connection closed, which says the same.
    if let Err(e) = stream
        .set_nodelay(true)
        .and_then(|()| stream.try_write(answer.as_bytes()))
    {
        debug!("HTTP API: refusing a connection: {e}");
    }
}

/// Serves one connection with hyper: TCP_NODELAY, the header-read timeout and a bounded read
/// buffer; on `stop`, a graceful shutdown of at most [`SHUTDOWN_GRACE`]; then [`linger`].
async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    app: Router,
    limits: Arc<Limits>,
    stop: CancellationToken,
    _slot: ConnSlot,
) {
    use tower::ServiceExt as _;
    // Without it each small write (an event, a JSON answer) may wait for the client's delayed
    // acknowledgement of the previous one: about 40 ms per event stream event.
    if let Err(e) = stream.set_nodelay(true) {
        debug!(%peer, "HTTP API: TCP_NODELAY: {e}");
    }
    // Boxed futures keep the connection `Unpin`, which `poll_without_shutdown` needs.
    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let mut req = req.map(Body::new);
        req.extensions_mut().insert(ConnectInfo(peer));
        Box::pin(app.clone().oneshot(req))
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    // hyper's header-read timeout (it needs a timer) also closes a connection idle between
    // requests: the clock starts again when an answer ends.
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(READ_BUFFER);
    let mut conn = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    let served = {
        // Cancellation-safe: the connection keeps its state when this poll is dropped.
        let run = std::future::poll_fn(|cx| conn.poll_without_shutdown(cx));
        tokio::select! {
            r = run => Some(r),
            _ = stop.cancelled() => None,
        }
    };
    let served = match served {
        Some(r) => r,
        None => {
            std::pin::Pin::new(&mut conn).graceful_shutdown();
            let run = std::future::poll_fn(|cx| conn.poll_without_shutdown(cx));
            match tokio::time::timeout(SHUTDOWN_GRACE, run).await {
                Ok(r) => r,
                Err(_) => {
                    debug!(%peer, "HTTP API: connection dropped at shutdown");
                    return;
                }
            }
        }
    };
    match served {
        Ok(()) => linger(conn.into_parts().io.into_inner()).await,
        Err(e) => debug!(%peer, "HTTP API: connection ended: {e}"),
    }
}

/// Most bytes [`linger`] reads and drops, and the longest it waits.
const LINGER_BYTES: usize = 256 * 1024;
const LINGER_TIME: Duration = Duration::from_secs(1);

/// Closes a connection whose answer has been sent: first our half (FIN), then, once the
/// client closed its half, or after [`LINGER_BYTES`] or [`LINGER_TIME`], the socket. An early
/// answer (401, 413) leaves the client still sending its body, and closing a socket with
/// unread data resets the connection, which can destroy the answer before the client read it
/// (it then sees "broken pipe" instead of the 413). Go's net/http and nginx linger likewise.
/// The bytes are dropped as they come, never kept.
async fn linger(mut tcp: TcpStream) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    if tcp.shutdown().await.is_err() {
        return;
    }
    let deadline = Instant::now() + LINGER_TIME;
    let mut buf = vec![0u8; 16 * 1024];
    let mut dropped = 0;
    while dropped < LINGER_BYTES {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => dropped += n,
            // Closed by the client (the usual end), an error, or time is up.
            _ => return,
        }
    }
    // Still sending: give it the rest of the time to read the answer, without reading more.
    tokio::time::sleep_until(deadline).await;
}

/// Counts an event and says, at most once a second, how many happened since it last said.
#[derive(Default)]
struct Throttled {
    last: Option<Instant>,
    count: u64,
}

impl Throttled {
    fn tick(&mut self) -> Option<u64> {
        self.count += 1;
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.count))
    }
}

/// Raises this process's soft open-file limit to what `http_max_connections` needs (every
/// connection holds a descriptor), within the hard limit; refuses to start, naming the key,
/// when the hard limit is too low. Without it, connections past the limit fail at `accept`
/// ("Too many open files") and the dispatcher's own files with them.
pub(crate) fn ensure_open_files(cfg: &DispatcherConfig) -> Result<(), DispatcherError> {
    if cfg.http_listen.is_none() {
        return Ok(());
    }
    #[cfg(unix)]
    {
        let need = cfg.http_max_connections as u64 + OTHER_FILES;
        use nix::sys::resource::{getrlimit, setrlimit, Resource};
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(|e| {
            DispatcherError::Config(format!(
                "http_max_connections: reading the open-file limit: {e}"
            ))
        })?;
        if soft >= need {
            return Ok(());
        }
        if hard < need {
            return Err(DispatcherError::Config(format!(
                "http_max_connections: {} connections need {need} open files, but this process may open at most {hard} (raise LimitNOFILE= in the systemd unit, or ulimit -n; or lower http_max_connections)",
                cfg.http_max_connections
            )));
        }
        setrlimit(Resource::RLIMIT_NOFILE, need, hard).map_err(|e| {
            DispatcherError::Config(format!(
                "http_max_connections: raising the open-file limit from {soft} to {need}: {e}"
            ))
        })?;
        info!(
            from = soft,
            to = need,
            "raised the open-file limit for http_max_connections"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits::from_config(&DispatcherConfig {
            http_max_connections: 10,
            http_loopback_reserve: 3,
            http_max_event_streams: 3,
            http_max_event_streams_per_token: 2,
            ..DispatcherConfig::default()
        })
    }

    #[test]
    fn loopback_clients_may_use_the_reserve() {
        let l = limits();
        for (peer, cap) in [
            ("127.0.0.1:1", 10),
            ("127.9.9.9:1", 10),
            ("[::1]:1", 10),
            ("[::ffff:127.0.0.1]:1", 10),
            ("10.0.0.5:1", 7),
            ("[2001:db8::1]:1", 7),
            ("[::ffff:10.0.0.5]:1", 7),
        ] {
            let peer: SocketAddr = peer.parse().unwrap();
            assert_eq!(l.connection_cap(peer), cap, "{peer}");
        }
    }

    #[test]
    fn event_streams_are_counted_per_caller_and_in_all_until_dropped() {
        let l = limits();
        let s = Arc::new(Streams::default());
        let a1 = s.open("a", &l).unwrap();
        let _a2 = s.open("a", &l).unwrap();
        let Err(e) = s.open("a", &l) else {
            panic!("a third stream of a")
        };
        assert_eq!(
            (e.status, e.condition),
            (StatusCode::TOO_MANY_REQUESTS, "too-many-streams")
        );
        let _b1 = s.open("b", &l).unwrap();
        let Err(e) = s.open("b", &l) else {
            panic!("a fourth stream in all")
        };
        assert_eq!(
            (e.status, e.condition),
            (StatusCode::SERVICE_UNAVAILABLE, "too-many-streams")
        );
        assert_eq!(s.total(), 3);
        drop(a1);
        assert_eq!(s.total(), 2);
        let _b2 = s.open("b", &l).unwrap();
        assert!(s.open("c", &l).is_err());
    }

    #[test]
    fn curl_d_json_is_json_and_other_form_bodies_are_refused_with_the_two_forms() {
        let json = br#" {"capability":"text.upper"}"#;
        let form = "application/x-www-form-urlencoded";
        for (ct, query, body, want) in [
            ("application/json", None, &json[..], Some(BodyForm::Json)),
            (
                "Application/JSON; charset=utf-8",
                None,
                json,
                Some(BodyForm::Json),
            ),
            // What `curl -d '{…}'` sends.
            (form, None, json, Some(BodyForm::Json)),
            (form, Some(""), json, Some(BodyForm::Json)),
            // Job fields in the query string: a raw upload, as before.
            (form, Some("capability=a.b"), b"x=1", Some(BodyForm::Raw)),
            ("image/png", None, b"\x89PNG", Some(BodyForm::Raw)),
            (form, None, b"capability=text.upper", None),
        ] {
            match body_form(ct, query, body) {
                Ok(got) => assert_eq!(Some(got), want, "{ct} {query:?}"),
                Err(e) => {
                    assert_eq!(want, None, "{ct} {query:?}: {e:?}");
                    assert_eq!(e.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
                    assert!(
                        e.message.contains("Content-Type: application/json")
                            && e.message.contains("query string"),
                        "{}",
                        e.message
                    );
                }
            }
        }
    }

    #[test]
    fn an_unknown_capability_is_422_not_404() {
        let e =
            ApiError::from(SpineError::new(Condition::UnknownCapability).with_field("capability"));
        assert_eq!(
            (e.status, e.condition, e.field.as_deref()),
            (
                StatusCode::UNPROCESSABLE_ENTITY,
                "unknown-capability",
                Some("capability")
            )
        );
    }

    #[test]
    fn only_submissions_take_large_bodies() {
        let (tx, _) = mpsc::channel(1);
        let (events, _) = broadcast::channel(1);
        let h = Handle::new(&DispatcherConfig::default(), tx, events).unwrap();
        assert_eq!(body_limit(&h, &Method::POST, "/v1/jobs"), 96 << 20);
        assert_eq!(body_limit(&h, &Method::GET, "/v1/jobs"), SMALL_BODY);
        assert_eq!(body_limit(&h, &Method::DELETE, "/v1/jobs/x"), SMALL_BODY);
    }
}
