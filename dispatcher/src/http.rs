//! The HTTP/JSON API (axum): what web apps use to submit jobs, follow them and choose agents.
//!
//! Handlers never touch the dispatcher's state: they send a [`Command`] with a `oneshot` reply
//! to the connection task (the one owner of the registry, jobs and store) through a cloneable
//! [`Handle`]. Progress and outcomes reach `GET /v1/jobs/{id}/events` (server-sent events)
//! through a broadcast channel.
//!
//! Authentication: bearer tokens from the configuration, each allowed a set of capabilities.
//! With no token configured the API serves loopback clients only.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine as _;
use futures::Stream;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use spine_protocol::{
    AgentInfo, AttrName, CapabilityName, Condition, Filter, JobId, JobState, SpineError, Strategy,
};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::config::HttpToken;
use crate::jobs::{JobRecord, JobSpec, Recorded};
use crate::policy::{Capabilities, Grant};

/// Largest HTTP request body for a dispatcher whose largest input is `max_input` bytes (its
/// `max_blob`): room for that input in base64 inside a JSON body (4/3 of it, and the rest of
/// the request). 96 MiB with the default `max_blob` of 64 MiB.
pub fn max_body(max_input: u64) -> usize {
    usize::try_from(max_input.saturating_add(max_input / 2)).unwrap_or(usize::MAX)
}

/// A request from an HTTP handler to the connection task.
pub(crate) enum Command {
    Submit {
        spec: Box<JobSpec>,
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

/// Something that happened to a job, for event streams.
#[derive(Debug, Clone, Serialize)]
pub struct JobEvent {
    /// The job.
    pub job: JobId,
    /// `progress`, `partial` or `final`.
    pub kind: &'static str,
    /// Event data (JSON).
    pub data: Value,
}

/// Cloneable access to the connection task, for HTTP handlers.
#[derive(Clone)]
pub(crate) struct Handle {
    pub(crate) tx: mpsc::Sender<Command>,
    pub(crate) events: broadcast::Sender<JobEvent>,
    /// The configured tokens with their grants (capability patterns parsed once, at start).
    pub(crate) tokens: std::sync::Arc<Vec<(HttpToken, Grant)>>,
    pub(crate) max_attempts: u64,
    pub(crate) max_input: u64,
}

/// An API error: HTTP status and a JSON body `{"error": ..., "field": ...}`.
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
            Condition::UnknownJob | Condition::UnknownCapability | Condition::NoAgent => {
                StatusCode::NOT_FOUND
            }
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

/// Who is calling: the token's name (or `local`) and what it may do.
struct Caller {
    name: String,
    grant: Grant,
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

fn authenticate(h: &Handle, headers: &HeaderMap, peer: SocketAddr) -> Result<Caller, ApiError> {
    if h.tokens.is_empty() {
        if peer.ip().is_loopback() {
            // Without tokens the API is the local operator's: everything, every job.
            return Ok(Caller {
                name: "local".into(),
                grant: Grant {
                    capabilities: Capabilities::all(),
                    all_jobs: true,
                },
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
    })
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
            Some(crate::runtime::now_ms() + dur.as_millis() as u64)
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
        Some(Recorded::Failure { condition, message }) => {
            v["error"] = json!({ "condition": condition, "message": message });
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
            "progress" => match v.as_str() {
                "true" | "1" => json!(true),
                "false" | "0" => json!(false),
                _ => return Err(ApiError::field("progress", "expected true or false")),
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

/// `POST /v1/jobs`: a JSON body (input as base64), or a raw upload (any other Content-Type:
/// the body is the input, the job's fields are query parameters).
async fn submit(
    State(h): State<Handle>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    uri: axum::http::Uri,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let caller = authenticate(&h, &headers, peer)?;
    // A body over the limit (or cut short) gets the API's JSON error, not axum's plain text.
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too-large",
                format!(
                    "the request body is over the limit of {} bytes (1.5 × max_blob)",
                    max_body(h.max_input)
                ),
            )
        } else {
            ApiError::new(e.status(), "bad-request", e.body_text())
        }
    })?;
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    let (req, raw) = if content_type.starts_with("application/json") {
        (parse_request(&body, "JSON body")?, None)
    } else {
        let fields = query_as_json(uri.query())?;
        let req = parse_request(fields.to_string().as_bytes(), "query parameters")?;
        (req, Some((body.to_vec(), content_type.to_owned())))
    };
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
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let caller = authenticate(&h, &headers, peer)?;
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
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let caller = authenticate(&h, &headers, peer)?;
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
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let caller = authenticate(&h, &headers, peer)?;
    let id = job_id(&id)?;
    // Subscribe before reading the state, so nothing falls between the two.
    let mut rx = h.events.subscribe();
    let rec = find_job(&h, &id).await?;
    caller.check_sees(&rec)?;
    let h2 = h.clone();
    let stream = async_stream(move |tx| async move {
        let done = rec.state.is_final();
        let _ = tx
            .send(
                SseEvent::default()
                    .event(if done { "final" } else { "state" })
                    .data(job_json(&rec).to_string()),
            )
            .await;
        if done {
            return;
        }
        loop {
            match rx.recv().await {
                Ok(ev) if ev.job == id => {
                    let last = ev.kind == "final";
                    if tx
                        .send(SseEvent::default().event(ev.kind).data(ev.data.to_string()))
                        .await
                        .is_err()
                        || last
                    {
                        return;
                    }
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    let _ = tx
                        .send(
                            SseEvent::default()
                                .event("lagged")
                                .data(json!({ "missed": n }).to_string()),
                        )
                        .await;
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
                            let _ = tx
                                .send(
                                    SseEvent::default()
                                        .event("final")
                                        .data(job_json(&j).to_string()),
                                )
                                .await;
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
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let caller = authenticate(&h, &headers, peer)?;
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
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    q: Result<Query<AgentsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let caller = authenticate(&h, &headers, peer)?;
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

async fn capabilities(
    State(h): State<Handle>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    authenticate(&h, &headers, peer)?;
    let list = ask(&h, |reply| Command::Capabilities { reply }).await?;
    let caps: Vec<Value> = list
        .into_iter()
        .map(|(c, agents, queued)| json!({ "name": c, "agents": agents, "queued": queued }))
        .collect();
    Ok(Json(json!({ "capabilities": caps })))
}

async fn metrics(
    State(h): State<Handle>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authenticate(&h, &headers, peer)?;
    let text = ask(&h, |reply| Command::Metrics { reply }).await?;
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

/// The API's routes.
pub(crate) fn router(h: Handle) -> Router {
    let limit = max_body(h.max_input);
    Router::new()
        .route("/v1/jobs", axum::routing::post(submit).get(list_jobs))
        .route("/v1/jobs/{id}", get(get_job).delete(cancel_job))
        .route("/v1/jobs/{id}/events", get(events))
        .route("/v1/agents", get(agents))
        .route("/v1/capabilities", get(capabilities))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(h)
}
