//! The routes and their handlers: each one takes the [`Caller`] that admission let in, turns
//! the request into a [`Command`] for the core (through the [`Handle`]), and
//! answers with a JSON view of the reply. `GET /v1/jobs/{id}/events` follows a job through
//! the broadcast channel of [`JobEvent`](super::JobEvent)s until its final event.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures::Stream;
use serde::Deserialize;
use serde_json::{json, Value};
use spine_protocol::{AttrName, CapabilityName, Filter, JobId, JobState};
use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::debug;

use super::auth::{admit, read_body, Caller};
use super::console;
use super::data;
use super::error::ApiError;
use super::forward::{submit_to_leader, Passed};
use super::openapi::{
    AgentList, AgentView, BatchAnswer, BatchItem, BatchRequest, CapabilityList, CapabilityView,
    ErrorBody, JobList, Later, Refusals, SubmitAnswer, Submitted,
};
use super::request::SubmitRequest;
use super::request::{body_form, job_id, parse_request, query_as_json, spec_from, BodyForm};
use super::views::job_listed;
use super::wait::Fresh;
use super::{max_body, Command, Handle, SMALL_BODY};
use crate::core::{Answer, ApiReply, ApiRequest, Query as Lookup};
use crate::core::{JobStateName, JobView, Rendered};
use crate::jobs::{Body as JobBody, JobRecord};

/// Asks the driver for a change (answered once it is stored). While the job store cannot be
/// reached nothing can be stored: refused at once, to be retried, rather than left waiting.
pub(super) async fn change(h: &Handle, request: ApiRequest) -> Result<ApiReply, ApiError> {
    // A standby takes submissions (it stores them for the leader), nothing else.
    let submission = matches!(request, ApiRequest::Submit { .. }) && h.shared.is_some();
    if h.store_down() {
        return Err(ApiError::store_down());
    }
    if let Some(e) = h.standby().filter(|_| !submission) {
        return Err(e);
    }
    let (reply, rx) = oneshot::channel();
    h.tx.send(Command::Change { request, reply })
        .await
        .map_err(|_| ApiError::unavailable())?;
    // Dropped unanswered: the dispatcher is stopping, or stopped leading meanwhile.
    rx.await
        .map_err(|_| h.standby().unwrap_or_else(ApiError::unavailable))
}

/// Asks the driver for a read (answered at once). A standby holds no job: it answers what it
/// knows (the fleet, its metrics) and refuses the rest with 503 `standby`.
pub(super) async fn read(h: &Handle, query: Lookup) -> Result<Answer, ApiError> {
    let about_the_fleet = matches!(
        query,
        Lookup::Metrics | Lookup::Fleet { .. } | Lookup::Agents { .. } | Lookup::Capabilities
    );
    if !about_the_fleet {
        if let Some(e) = h.standby() {
            return Err(e);
        }
    }
    let (reply, rx) = oneshot::channel();
    h.tx.send(Command::Read { query, reply })
        .await
        .map_err(|_| ApiError::unavailable())?;
    rx.await.map_err(|_| ApiError::unavailable())
}

/// An answer of another kind than asked for: a bug, reported as the API being unavailable.
pub(super) fn mismatch() -> ApiError {
    tracing::error!("the dispatcher answered an HTTP request with an answer of another kind");
    ApiError::unavailable()
}

/// `POST /v1/jobs`: a JSON body (input as base64), or a raw upload (any other Content-Type:
/// the body is the input, the job's fields are query parameters). [`admit`] authenticated the
/// caller and checked the declared length before this reads the body.
#[utoipa::path(
    post, path = "/v1/jobs", tag = "jobs",
    summary = "Submit a job (and, with `wait`, wait for it)",
    description = "A JSON body, or a raw upload: any other Content-Type makes the body the job's input, and the job's fields (capability first) go in the query string. With `wait`, the answer is the final job (200) when it ends within the wait, otherwise the job as it is (202).",
    params(
        ("wait" = Option<String>, Query, description = "Wait up to this long for the job to end, like `30s` (at most the dispatcher's request timeout)"),
        ("Idempotency-Key" = Option<String>, Header, description = "The same as the body's `idempotency_key`"),
    ),
    request_body(
        description = "The job (JSON), or its input (any other Content-Type, fields in the query string)",
        content((SubmitRequest = "application/json"), (String = "application/octet-stream")),
    ),
    responses(
        (status = 200, description = "With `wait`: the job ended within the wait", body = JobView),
        (status = 202, description = "Accepted: `{id, state}`, or with `wait` the job as it is when the wait is over", body = SubmitAnswer),
        Refusals,
        (status = 413, description = "The input is over the dispatcher's limit", body = ErrorBody),
        (status = 422, description = "No agent has ever offered the capability", body = ErrorBody),
        Later,
    ),
)]
pub(super) async fn submit(
    State(h): State<Handle>,
    caller: Caller,
    headers: HeaderMap,
    uri: axum::http::Uri,
    body: Body,
) -> Result<Response, ApiError> {
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_owned();
    let declared = data::content_length(&headers);
    // A raw upload is told by its Content-Type alone (a form-encoded body needs a look at
    // its first byte): its body streams to the blob store, never whole into memory.
    // `wait` is the request's, not the job's: taken out of the query before the job's fields.
    let (wait, query) = wait_param(uri.query(), &h)?;
    let query = query.as_deref();
    let raw = !matches!(body_form(&content_type, query, b"{"), Ok(BodyForm::Json));
    let mut json = None;
    let (mut req, body) = if raw {
        let fields = query_as_json(query)?;
        if fields.get("capability").is_none() {
            return Err(ApiError::field(
                "capability",
                format!(
                    "missing: a body of Content-Type {content_type} is a raw upload (the job's input), and its job fields, capability first, go in the query string (?capability=…); to send the job as JSON, send Content-Type: application/json"
                ),
            ));
        }
        let mut req = parse_request(fields.to_string().as_bytes(), "query parameters")?;
        key_header(&mut req, &headers)?;
        (req, Some(body))
    } else {
        // A JSON body is read whole: one declared over its limit is refused before a byte of
        // it is read (admit allowed it for a raw upload's larger limit).
        let limit = max_body(h.max_json_input);
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too-large",
                format!("a JSON body is at most {limit} bytes (1.5 × max_blob, its input in base64): send a large input as a raw upload (the body is the input, the job's fields in the query string), or upload it with PUT /v1/blobs and give its input_ref"),
            ));
        }
        let small = usize::try_from(declared.unwrap_or(0)).unwrap_or(usize::MAX);
        let bytes = read_body(body, limit, small).await?;
        body_form(&content_type, query, &bytes)?;
        let mut req = parse_request(&bytes, "JSON body")?;
        key_header(&mut req, &headers)?;
        // Kept only where it may go on to the leader (a leader frees it now).
        if h.standby().is_some() {
            json = Some(bytes);
        }
        (req, None)
    };
    let wait_for_agent = req.wait_for_agent.unwrap_or(false);
    let input_ref = req.input_ref.take();
    let mut spec = spec_from(req, &caller, h.max_attempts, h.max_json_input, h.max_delay)?;
    // At a standby, a JSON submission, checked, goes on to the leader, which stores and
    // places it in one go; stored here for the leader only when the leader is not reachable.
    if let Some(bytes) = &json {
        if let Passed::Answer(r) = submit_to_leader(&h, &uri, &headers, bytes, wait).await? {
            return Ok(r);
        }
    }
    if let Some(body) = body {
        spec.input = match (&h.data, declared) {
            (Some(d), n) if n.is_none_or(|n| n > spine_protocol::INLINE_LIMIT as u64) => {
                // (Boxed: a large future, for raw uploads only.)
                let stored = Box::pin(data::store_body(&d.blobs, body, n, h.max_input, None));
                JobBody::Stored(stored.await?)
            }
            _ => {
                let limit = usize::try_from(h.max_input).unwrap_or(usize::MAX);
                let small = usize::try_from(declared.unwrap_or(0)).unwrap_or(usize::MAX);
                JobBody::Inline(read_body(body, limit, small).await?)
            }
        };
        spec.input_mime = Some(content_type);
    }
    if let Some(hex) = input_ref {
        if !spec.input.is_empty() {
            return Err(ApiError::field(
                "input_ref",
                "give an input, fragments or an input_ref, one of them",
            ));
        }
        spec.input = JobBody::Stored(data::stored_ref(&h, &hex).await?);
    }
    data::fetch_fragments(&h, &spec).await?;
    // At a standby, the leader's announcements from before the submission: none is missed,
    // and the wait begins without a read.
    let fresh = wait.and_then(|_| Fresh::before_submit(&h));
    let (id, state, ended) = submit_one(&h, spec, wait_for_agent, &caller, wait.is_some()).await?;
    answer_waited(&h, id, state, ended, wait, fresh).await
}

/// A submission's answer: without `wait`, `{id, state}` (202); with it, the final job (200),
/// or the job as it is when the wait is over (202). `ended`: the job, when it ended before
/// its acceptance was stored.
async fn answer_waited(
    h: &Handle,
    id: JobId,
    state: JobState,
    ended: Option<Rendered>,
    wait: Option<Duration>,
    fresh: Option<Fresh>,
) -> Result<Response, ApiError> {
    let Some(wait) = wait else {
        return Ok((StatusCode::ACCEPTED, Json(Submitted { id, state })).into_response());
    };
    if let Some(view) = ended {
        return Ok((StatusCode::OK, view).into_response());
    }
    // (A key that named a job which has ended: read it.)
    let fresh = fresh.filter(|_| !state.is_final());
    let (done, job) = waited_fresh(h, &id, wait, fresh).await?;
    let status = if done {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok((status, job).into_response())
}

/// The `Idempotency-Key` header, as the body's `idempotency_key` (the same key in both is
/// fine; two different ones are refused).
fn key_header(req: &mut SubmitRequest, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(());
    };
    let key = v.to_str().map_err(|_| {
        ApiError::field(
            "Idempotency-Key",
            "the header must be visible ASCII (up to 256 bytes)",
        )
    })?;
    req.set_idempotency_key(key)
}

/// A JSON submission (the body `POST /v1/jobs` takes, `json`) by `caller` with its request
/// `headers`, checked and accepted: what `POST /v1/jobs:batch` does for each of its jobs,
/// and a leader for each submission a standby passed on. With `wait` (its caller waits for
/// the job's end), the job's final view when it ended before its acceptance was stored.
pub(super) async fn accept_json(
    h: &Handle,
    caller: &Caller,
    headers: Option<&HeaderMap>,
    json: &[u8],
    wait: bool,
) -> Result<(JobId, JobState, Option<Rendered>), ApiError> {
    let mut req = parse_request(json, "job")?;
    if let Some(headers) = headers {
        key_header(&mut req, headers)?;
    }
    let wait_for_agent = req.wait_for_agent.unwrap_or(false);
    let input_ref = req.input_ref.take();
    let mut spec = spec_from(req, caller, h.max_attempts, h.max_json_input, h.max_delay)?;
    if let Some(hex) = input_ref {
        if !spec.input.is_empty() {
            return Err(ApiError::field(
                "input_ref",
                "give an input, fragments or an input_ref, one of them",
            ));
        }
        spec.input = JobBody::Stored(data::stored_ref(h, &hex).await?);
    }
    data::fetch_fragments(h, &spec).await?;
    submit_one(h, spec, wait_for_agent, caller, wait).await
}

/// One submission, to the core. A standby stores it for the leader (docs/dispatcher.md,
/// "Running several dispatchers"); an idempotency key the shared store knows already answers
/// its job there, since a standby holds no job to find it in.
/// With `wait`, the job's final view when it ended before its acceptance was stored.
async fn submit_one(
    h: &Handle,
    spec: crate::jobs::JobSpec,
    wait_for_agent: bool,
    caller: &Caller,
    wait: bool,
) -> Result<(JobId, spine_protocol::JobState, Option<Rendered>), ApiError> {
    if let (Some(pg), Some(key)) = (h.standby_store(), &spec.idempotency_key) {
        // (Boxed: a read of the shared store is a large future, which every submission's
        // would otherwise carry inline and move with it.)
        match Box::pin(pg.idempotent(&spec.submitter, key)).await {
            Ok(Some(rec)) => return Ok((rec.id, rec.state, None)),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!("a standby could not look an idempotency key up: {e}");
                return Err(ApiError::store_down());
            }
        }
    }
    let request = ApiRequest::Submit {
        spec: Box::new(spec),
        wait_for_agent,
        visible: caller.grant.capabilities.clone(),
        wait,
    };
    match change(h, request).await? {
        ApiReply::Submitted(answer) => {
            let (id, state) = answer?;
            Ok((id, state, None))
        }
        ApiReply::Ended { id, state, view } => Ok((id, state, Some(view))),
        _ => Err(mismatch()),
    }
}

/// Jobs one `POST /v1/jobs:batch` may submit.
const MAX_BATCH: usize = 1000;

/// `POST /v1/jobs:batch`: `{"jobs": [job, …]}`, each job the JSON body `POST /v1/jobs` takes
/// (its own `idempotency_key` included). Each is checked and accepted or refused on its own;
/// the answer lists, in order, `{"id", "state"}` or the error `POST /v1/jobs` would have
/// answered with its `status`. The submissions go to the core together, so they share group
/// commits instead of waiting for one each.
#[utoipa::path(
    post, path = "/v1/jobs:batch", tag = "jobs",
    summary = "Submit up to 1000 jobs in one request",
    request_body = BatchRequest,
    responses(
        (status = 200, description = "One item per job, in order: accepted, or the error `POST /v1/jobs` would have answered (with its `status`)", body = BatchAnswer),
        (status = 400, description = "A field is wrong: `field` names it", body = ErrorBody),
        (status = 401, description = "No token, or an unknown one", body = ErrorBody),
        (status = 403, description = "The token may not do this", body = ErrorBody),        Later,
    ),
)]
pub(super) async fn submit_batch(
    State(h): State<Handle>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let limit = max_body(h.max_json_input);
    let small = usize::try_from(data::content_length(&headers).unwrap_or(0)).unwrap_or(usize::MAX);
    let bytes = read_body(body, limit, small).await?;
    let batch: BatchRequest = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad-request",
            format!(
                "the body must be {{\"jobs\": [job, …]}}, each job as POST /v1/jobs takes it: {e}"
            ),
        )
    })?;
    if batch.jobs.is_empty() || batch.jobs.len() > MAX_BATCH {
        return Err(ApiError::field(
            "jobs",
            format!("from 1 to {MAX_BATCH} jobs, not {}", batch.jobs.len()),
        ));
    }
    let one = |job: Value| {
        let (h, caller) = (&h, &caller);
        async move {
            let json = job.to_string();
            let (id, state, _) = accept_json(h, caller, None, json.as_bytes(), false).await?;
            Ok::<_, ApiError>(Submitted { id, state })
        }
    };
    let answers = futures::future::join_all(batch.jobs.into_iter().map(one)).await;
    let jobs = answers
        .into_iter()
        .map(|a| match a {
            Ok(s) => BatchItem::Submitted(s),
            Err(e) => BatchItem::Refused(ErrorBody::from(&e)),
        })
        .collect();
    Ok((StatusCode::OK, Json(BatchAnswer { jobs })).into_response())
}

/// How long a standby's cancel waits for the leader to end the job before answering.
const STANDBY_CANCEL_WAIT: Duration = Duration::from_secs(5);

/// `wait` taken out of a query string: its duration, and the query without it.
fn wait_param(
    query: Option<&str>,
    h: &Handle,
) -> Result<(Option<Duration>, Option<String>), ApiError> {
    let Some(q) = query.filter(|q| q.split('&').any(|p| p == "wait" || p.starts_with("wait=")))
    else {
        return Ok((None, query.map(str::to_owned)));
    };
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(q).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad-request",
            format!("invalid query string: {e}"),
        )
    })?;
    let mut wait = None;
    let mut rest = Vec::new();
    for (k, v) in pairs {
        if k == "wait" {
            if wait.is_some() {
                return Err(ApiError::field("wait", "given twice"));
            }
            wait = Some(super::wait::parse_wait(&v, h.limits.request_timeout)?);
        } else {
            rest.push((k, v));
        }
    }
    let rest = serde_urlencoded::to_string(&rest)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad-request", e.to_string()))?;
    Ok((wait, (!rest.is_empty()).then_some(rest)))
}

/// Waits up to `wait` for job `id` to end: (whether it ended, the job's JSON then).
pub(super) async fn waited(
    h: &Handle,
    id: &JobId,
    wait: Duration,
) -> Result<(bool, Rendered), ApiError> {
    waited_fresh(h, id, wait, None).await
}

/// [`waited`], for the caller that submitted the job (see [`Fresh`]).
async fn waited_fresh(
    h: &Handle,
    id: &JobId,
    wait: Duration,
    fresh: Option<Fresh>,
) -> Result<(bool, Rendered), ApiError> {
    let read_final = || async {
        let rec = find_job(h, id).await?;
        Ok(rec.state.is_final().then(|| Rendered::job(&rec)))
    };
    match super::wait::until_final(h, id, wait, read_final, fresh).await? {
        Some(job) => Ok((true, job)),
        None => Ok((false, Rendered::job(&find_job(h, id).await?))),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct GetQuery {
    wait: Option<String>,
}

/// `GET /v1/jobs/{id}`, with `?wait=30s` a long poll: answered when the job ends, or with the
/// job as it is when the wait is over (200 either way; its `state` says which).
#[utoipa::path(
    get, path = "/v1/jobs/{id}", tag = "jobs",
    summary = "A job; with `wait`, a long poll until it ends",
    params(
        ("id" = String, Path, description = "The job's id"),
        ("wait" = Option<String>, Query, description = "Answer when the job ends, or when this long (like `30s`) has passed; its `state` says which"),
    ),
    responses(
        (status = 200, description = "The job", body = JobView),
        Refusals,
        (status = 404, description = "No such job", body = ErrorBody),
    ),
)]
pub(super) async fn get_job(
    State(h): State<Handle>,
    caller: Caller,
    Path(id): Path<String>,
    q: Result<Query<GetQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Rendered, ApiError> {
    let Query(q) = q.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad-request",
            format!("{e} (GET /v1/jobs/{{id}} takes only wait)"),
        )
    })?;
    let id = job_id(&id)?;
    let rec = find_job(&h, &id).await?;
    caller.check_sees(&rec)?;
    match q.wait {
        Some(w) if !rec.state.is_final() => {
            let wait = super::wait::parse_wait(&w, h.limits.request_timeout)?;
            Ok(waited(&h, &id, wait).await?.1)
        }
        Some(w) => {
            super::wait::parse_wait(&w, h.limits.request_timeout)?;
            Ok(Rendered::job(&rec))
        }
        None => Ok(Rendered::job(&rec)),
    }
}

/// The job `id`, or 404.
pub(super) async fn find_job(h: &Handle, id: &JobId) -> Result<JobRecord, ApiError> {
    let job = match h.standby_store() {
        // A standby holds no job: it reads the shared store, as of the leader's last commit.
        Some(pg) => pg.job(id.as_str()).await.map_err(|e| {
            tracing::warn!("a standby could not read a job: {e}");
            ApiError::store_down()
        })?,
        None => {
            let Answer::Job(job) = read(h, Lookup::Get { id: id.clone() }).await? else {
                return Err(mismatch());
            };
            job.map(|j| *j)
        }
    };
    job.ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "unknown-job", format!("no job {id}")))
}

#[utoipa::path(
    delete, path = "/v1/jobs/{id}", tag = "jobs",
    summary = "Cancel a job",
    description = "A job that has not ended is cancelled (its agent is told to stop); one that has ended keeps its outcome. Either way the answer is its state after.",
    params(("id" = String, Path, description = "The job's id")),
    responses(
        (status = 200, description = "The job's state after the cancel", body = Submitted),
        Refusals,
        (status = 404, description = "No such job", body = ErrorBody),
    ),
)]
pub(super) async fn cancel_job(
    State(h): State<Handle>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Submitted>, ApiError> {
    let id = job_id(&id)?;
    // A job's submitter never changes, so checking before the cancel is not a race.
    let rec = find_job(&h, &id).await?;
    caller.check_sees(&rec)?;
    if let Some(pg) = h.standby_store() {
        // A standby asks the leader through the store, and answers once the job has ended
        // (or with its state then, after a few seconds).
        if rec.state.is_final() {
            return Ok(Json(Submitted {
                id,
                state: rec.state,
            }));
        }
        pg.request_cancel(id.as_str()).await.map_err(|e| {
            tracing::warn!("a standby could not pass a cancel on: {e}");
            ApiError::store_down()
        })?;
        let (_, job) = waited(&h, &id, STANDBY_CANCEL_WAIT).await?;
        let state = serde_json::from_value(job.value()["state"].clone()).unwrap_or(rec.state);
        return Ok(Json(Submitted { id, state }));
    }
    let ApiReply::Cancelled(answer) = change(&h, ApiRequest::Cancel { id: id.clone() }).await?
    else {
        return Err(mismatch());
    };
    let state = answer?;
    Ok(Json(Submitted { id, state }))
}

#[utoipa::path(
    get, path = "/v1/jobs/{id}/events", tag = "jobs",
    summary = "Follow a job: server-sent events until its end",
    description = "The first event is `state` (or `final`, if the job has ended) with the whole job; then `state`, `progress` and `partial` events as they happen, and `final` with the whole job, after which the stream ends. `lagged` (`{\"missed\": n}`) says events were dropped for a slow reader.",
    params(("id" = String, Path, description = "The job's id")),
    responses(
        (status = 200, description = "An event stream; each event's data is JSON (`state`/`final`: a Job)", content_type = "text/event-stream", body = String),
        Refusals,
        (status = 404, description = "No such job", body = ErrorBody),
        (status = 429, description = "Too many event streams open for this token", body = ErrorBody),
    ),
)]
pub(super) async fn events(
    State(h): State<Handle>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let id = job_id(&id)?;
    // Counted from here until the stream's task ends (the job ended or the client left).
    let slot = h.streams.open(&caller.name, &h.limits)?;
    // Subscribe before reading the state, so nothing falls between the two.
    let mut rx = h.events.subscribe();
    let mut relayed = h.relayed.as_ref().map(broadcast::Sender::subscribe);
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
                    .data(Rendered::job(&rec).get()),
            )
            .await
            .is_err()
            || done
        {
            return;
        }
        // A standby hears of the job from the leader: its progress and partial results
        // relayed (PostgreSQL's `spine_events`, best effort), and its end announced, after
        // which the stream's final event is the job read from the shared store.
        let mut ended = Box::pin(waited(&h2, &id, Duration::from_secs(60)));
        while h2.standby_store().is_some() {
            let relayed_event = async {
                match relayed.as_mut() {
                    Some(r) => r.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = tx.closed() => return,
                r = &mut ended => match r {
                    Ok((true, job)) => {
                        let _ = tx
                            .send(SseEvent::default().event("final").data(job.get()))
                            .await;
                        return;
                    }
                    Ok((false, _)) => ended = Box::pin(waited(&h2, &id, Duration::from_secs(60))),
                    Err(_) => return,
                },
                ev = relayed_event => match ev {
                    Ok(ev) if ev.job == id => {
                        let e = SseEvent::default().event(ev.kind.as_str()).data(ev.data.get());
                        if tx.send(e).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => relayed = None,
                },
            }
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
                Ok(ev) if ev.job == id && ev.kind != crate::core::EventKind::Fired => {
                    let last = ev.kind == crate::core::EventKind::Final;
                    if tx
                        .send(
                            SseEvent::default()
                                .event(ev.kind.as_str())
                                .data(ev.data.get()),
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
                    match read(&h2, Lookup::Get { id: id.clone() }).await {
                        Err(_) => return,
                        Ok(Answer::Job(Some(j))) if j.state.is_final() => {
                            // The stream ends here whether or not the client still reads.
                            let last = SseEvent::default()
                                .event("final")
                                .data(Rendered::job(&j).get());
                            if tx.send(last).await.is_err() {
                                debug!(job = %id, "event stream closed before its final event");
                            }
                            return;
                        }
                        Ok(_) => {}
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// A stream fed by a task through a small channel.
pub(super) fn async_stream<F, Fut>(f: F) -> impl Stream<Item = Result<SseEvent, Infallible>>
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
pub(super) struct ListQuery {
    state: Option<String>,
    capability: Option<String>,
    submitter: Option<String>,
    agent: Option<String>,
    since: Option<String>,
    until: Option<String>,
    before: Option<String>,
    limit: Option<usize>,
}

/// A time bound of a listing: RFC 3339, or ms since the UNIX epoch.
fn time_param(field: &str, v: &str) -> Result<u64, ApiError> {
    if let Ok(ms) = v.parse::<u64>() {
        return Ok(ms);
    }
    humantime::parse_rfc3339_weak(v)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as u64)
        .ok_or_else(|| {
            ApiError::field(
                field,
                format!("'{v}' is not a time: give RFC 3339 (2026-11-26T09:30:00Z) or ms since the UNIX epoch"),
            )
        })
}

/// A listing cursor: `ACCEPTED_MS.ORDER`, as `next` gave it.
fn cursor(v: &str) -> Result<(u64, u64), ApiError> {
    v.split_once('.')
        .and_then(|(a, s)| Some((a.parse().ok()?, s.parse().ok()?)))
        .ok_or_else(|| {
            ApiError::field(
                "before",
                format!("'{v}' is not a cursor: pass back the `next` of the previous page"),
            )
        })
}

#[utoipa::path(
    get, path = "/v1/jobs", tag = "jobs",
    summary = "A page of jobs, newest first (the caller's own, unless its token has all_jobs)",
    params(
        ("state" = Option<JobStateName>, Query, description = "Only jobs in this state"),
        ("capability" = Option<String>, Query, description = "Only jobs of this capability"),
        ("submitter" = Option<String>, Query, description = "Only jobs of this submitter (tokens with all_jobs; others see their own)"),
        ("agent" = Option<String>, Query, description = "Only jobs whose current or last agent is this one (a full JID, or a bare JID for every agent on it)"),
        ("since" = Option<String>, Query, description = "Accepted at or after (RFC 3339, or ms since the UNIX epoch)"),
        ("until" = Option<String>, Query, description = "Accepted at or before"),
        ("before" = Option<String>, Query, description = "The `next` of the previous page"),
        ("limit" = Option<usize>, Query, description = "At most this many (default 100, at most 10000)"),
    ),
    responses(
        (status = 200, description = "The jobs, newest first, without outputs, and the next page's cursor", body = JobList),
        Refusals,
    ),
)]
pub(super) async fn list_jobs(
    State(h): State<Handle>,
    caller: Caller,
    uri: axum::http::Uri,
    headers: HeaderMap,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) =
        q.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad-request", e.body_text()))?;
    // A standby holds no job table: the leader lists.
    if let Some(answer) = super::forward::to_leader(&h, Method::GET, &uri, &headers, &[]).await? {
        return Ok(answer);
    }
    let state = match q.state.filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => Some(
            s.parse::<JobState>()
                .map_err(|e| ApiError::field("state", e))?,
        ),
    };
    let capability = match q.capability.filter(|s| !s.is_empty()) {
        None => None,
        Some(c) => Some(
            c.parse::<CapabilityName>()
                .map_err(|e: String| ApiError::field("capability", e))?,
        ),
    };
    let nonempty = |v: Option<String>| v.filter(|s| !s.is_empty());
    let filter = crate::jobs::JobFilter {
        state,
        // Without all_jobs a token lists its own jobs only.
        submitter: if caller.grant.all_jobs {
            nonempty(q.submitter)
        } else {
            Some(caller.submitter())
        },
        capability,
        agent: nonempty(q.agent),
        since_ms: nonempty(q.since)
            .map(|v| time_param("since", &v))
            .transpose()?,
        until_ms: nonempty(q.until)
            .map(|v| time_param("until", &v))
            .transpose()?,
    };
    let before = nonempty(q.before).map(|v| cursor(&v)).transpose()?;
    let limit = q.limit.unwrap_or(100).min(10_000);
    let query = Lookup::List {
        filter,
        before,
        limit,
    };
    let Answer::Jobs { jobs, next } = read(&h, query).await? else {
        return Err(mismatch());
    };
    Ok(Json(JobList {
        jobs: jobs.iter().map(job_listed).collect(),
        next: next.map(|(at, seq)| format!("{at}.{seq}")),
    })
    .into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AgentsQuery {
    capability: Option<String>,
    filter: Option<String>,
    sort: Option<String>,
    limit: Option<usize>,
}

#[utoipa::path(
    get, path = "/v1/agents", tag = "fleet",
    summary = "The agents of a capability, as placement sees them",
    params(
        ("capability" = String, Query, description = "The capability"),
        ("filter" = Option<String>, Query, description = "Only agents whose attributes match (the filter grammar, docs/dispatcher.md), like `gpu, mem>=16`"),
        ("sort" = Option<String>, Query, description = "Order by this attribute instead of by load"),
        ("limit" = Option<usize>, Query, description = "At most this many"),
    ),
    responses(
        (status = 200, description = "The agents", body = AgentList),
        Refusals,
    ),
)]
pub(super) async fn agents(
    State(h): State<Handle>,
    caller: Caller,
    q: Result<Query<AgentsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<AgentList>, ApiError> {
    let Query(q) =
        q.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad-request", e.body_text()))?;
    let capability: CapabilityName = q
        .capability
        .ok_or_else(|| ApiError::field("capability", "required"))?
        .parse()
        .map_err(|e: String| ApiError::field("capability", e))?;
    caller.check_may_run(&capability)?;
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
    let query = Lookup::Agents {
        capability: capability.clone(),
        filter,
        sort,
        limit: q.limit,
    };
    let Answer::Agents(list) = read(&h, query).await? else {
        return Err(mismatch());
    };
    Ok(Json(AgentList {
        capability,
        agents: list.iter().map(AgentView::of).collect(),
    }))
}

/// The capabilities the caller may run, with their agents and queues (a limited token does
/// not learn what else the bus offers).
#[utoipa::path(
    get, path = "/v1/capabilities", tag = "fleet",
    summary = "The capabilities the caller may run, with their agents, queues and last minutes",
    responses(
        (status = 200, description = "The capabilities", body = CapabilityList),
        Refusals,
    ),
)]
pub(super) async fn capabilities(
    State(h): State<Handle>,
    caller: Caller,
) -> Result<Json<CapabilityList>, ApiError> {
    let Answer::Capabilities(list) = read(&h, Lookup::Capabilities).await? else {
        return Err(mismatch());
    };
    let capabilities = list
        .into_iter()
        .filter(|c| caller.may_run(&c.name))
        .map(CapabilityView::of)
        .collect();
    Ok(Json(CapabilityList { capabilities }))
}

/// Prometheus metrics, for operators only: they show every capability and queue.
#[utoipa::path(
    get, path = "/metrics", tag = "operations",
    summary = "Prometheus metrics (tokens with `metrics = true`)",
    responses(
        (status = 200, description = "The Prometheus text format", content_type = "text/plain", body = String),
        Refusals,
    ),
)]
pub(super) async fn metrics(State(h): State<Handle>, caller: Caller) -> Result<Response, ApiError> {
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
    let Answer::Metrics(mut text) = read(&h, Lookup::Metrics).await? else {
        return Err(mismatch());
    };
    text.push_str(&format!(
        "# HELP spine_http_connections Open connections to the HTTP API.\n\
         # TYPE spine_http_connections gauge\n\
         spine_http_connections {}\n\
         # HELP spine_http_connections_refused_total Connections refused at http_max_connections.\n\
         # TYPE spine_http_connections_refused_total counter\n\
         spine_http_connections_refused_total {}\n\
         # HELP spine_http_event_streams Open event streams.\n\
         # TYPE spine_http_event_streams gauge\n\
         spine_http_event_streams {}\n\
         # HELP spine_store_reachable Whether the job store can be reached (0 while PostgreSQL cannot: changes are refused with 503).\n\
         # TYPE spine_store_reachable gauge\n\
         spine_store_reachable {}\n",
        h.conns.open.load(Ordering::Acquire),
        h.conns.refused.load(Ordering::Acquire),
        h.streams.total(),
        u8::from(!h.store_down()),
    ));
    if let Some(l) = h.leadership() {
        text.push_str(&leadership_metrics(&l));
    }
    if let Some(d) = &h.data {
        text.push_str(&d.counters.render(&d.blobs));
    }
    if let Some(f) = &h.forward {
        text.push_str(&f.metrics());
    }
    Ok(([("content-type", "text/plain; version=0.0.4")], text).into_response())
}

/// The election's figures (several dispatchers on PostgreSQL).
fn leadership_metrics(l: &crate::leadership::Leadership) -> String {
    let (leader, epoch) = match l.role {
        crate::election::Role::Leader { epoch } => (1, epoch),
        crate::election::Role::Standby => (0, l.leader.as_ref().map_or(0, |r| r.epoch)),
    };
    let age = l.renewed.map_or(-1.0, |t| t.elapsed().as_secs_f64());
    format!(
        "# HELP spine_leader Whether this dispatcher leads (1) or stands by (0).\n\
         # TYPE spine_leader gauge\n\
         spine_leader {leader}\n\
         # HELP spine_leader_epoch The epoch of the lease row (the fencing token) as this dispatcher last saw it.\n\
         # TYPE spine_leader_epoch gauge\n\
         spine_leader_epoch {epoch}\n\
         # HELP spine_lease_age_seconds Seconds since this dispatcher last took or renewed the lease (-1: never).\n\
         # TYPE spine_lease_age_seconds gauge\n\
         spine_lease_age_seconds {age:.3}\n\
         # HELP spine_elections_total Times this dispatcher became leader.\n\
         # TYPE spine_elections_total counter\n\
         spine_elections_total {}\n\
         # HELP spine_failovers_total Leaders replaced without releasing the lease, as this dispatcher saw it.\n\
         # TYPE spine_failovers_total counter\n\
         spine_failovers_total {}\n",
        l.elections, l.failovers
    )
}

#[utoipa::path(
    get, path = "/healthz", tag = "operations", security(()),
    summary = "Whether the dispatcher serves (no token)",
    responses(
        (status = 200, description = "`ok`; among several dispatchers `ok leader` or `ok standby`", content_type = "text/plain", body = String),
        (status = 503, description = "`stopping`, or `store unreachable` while the job store (PostgreSQL) cannot be reached", content_type = "text/plain", body = String),
    ),
)]
pub(super) async fn healthz(State(h): State<Handle>) -> Response {
    if h.tx.is_closed() {
        (StatusCode::SERVICE_UNAVAILABLE, "stopping\n").into_response()
    } else if h.store_down() {
        (StatusCode::SERVICE_UNAVAILABLE, "store unreachable\n").into_response()
    } else {
        // Among several dispatchers, the part this one plays (a standby is healthy too).
        let role = match h.leadership().map(|l| l.role) {
            None => "",
            Some(crate::election::Role::Leader { .. }) => " leader",
            Some(crate::election::Role::Standby) => " standby",
        };
        (StatusCode::OK, format!("ok{role}\n")).into_response()
    }
}

#[utoipa::path(
    get, path = "/v1/openapi.json", tag = "operations", security(()),
    summary = "This document (no token)",
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json", body = Object)),
)]
pub(super) async fn openapi_json() -> Response {
    static DOC: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let doc = DOC.get_or_init(super::openapi::document).clone();
    ([("content-type", "application/json")], doc).into_response()
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
        .route("/v1/jobs:batch", axum::routing::post(submit_batch))
        .route("/v1/jobs/{id}", get(get_job).delete(cancel_job))
        .route("/v1/jobs/{id}/events", get(events))
        .route("/v1/jobs/{id}/output", get(data::get_output))
        .route("/v1/blobs", axum::routing::put(data::put_blob))
        .route("/v1/agents", get(agents))
        .route(
            "/v1/agents/{jid}/drain",
            axum::routing::post(super::drain::drain),
        )
        .route(
            "/v1/agents/{jid}/undrain",
            axum::routing::post(super::drain::undrain),
        )
        .route("/v1/capabilities", get(capabilities))
        .route("/v1/fleet", get(console::fleet))
        .route("/v1/fleet/events", get(console::fleet_events))
        .route("/v1/jobs/events", get(console::jobs_events))
        .route("/v1/jobs/{id}/tree", get(console::tree))
        .route("/v1/jobs/{id}/retry", axum::routing::post(console::retry))
        .route("/v1/whoami", get(console::whoami))
        .route("/v1/events", axum::routing::post(super::events::post_event))
        .route("/v1/rules", get(super::events::rules))
        .route(
            "/v1/rules/{name}",
            axum::routing::put(super::events::put_rule).delete(super::events::delete_rule),
        )
        .route("/v1/events/stream", get(super::events::stream))
        .route("/v1/canaries", get(super::events::canaries))
        .route("/metrics", get(metrics))
        .route_layer(axum::middleware::from_fn_with_state(h.clone(), admit))
        // A standby's gathered submissions: each is authenticated on its own.
        .route(
            super::pass::PASSED_PATH,
            axum::routing::post(super::pass::passed),
        )
        .route("/healthz", get(healthz))
        .route("/", get(console::root))
        .route("/ui", get(console::index))
        .route("/ui/", get(console::index))
        .route("/ui/console.js", get(console::script))
        .route("/ui/console.css", get(console::style))
        .route("/ui/login", axum::routing::post(console::login))
        .route("/ui/logout", axum::routing::post(console::logout))
        .route("/v1/openapi.json", get(openapi_json))
        // Signed URLs are their own credential (PROTOCOL.md §13.4): no token.
        .route("/v1/blobs/{sha256}", get(data::fetch_blob))
        .route("/v1/uploads/{job}", axum::routing::put(data::put_upload))
        // Signed by the sender (HMAC), not by a token.
        .route(
            "/v1/events/{webhook}",
            axum::routing::post(super::events::post_webhook),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(SMALL_BODY))
        .with_state(h)
}
