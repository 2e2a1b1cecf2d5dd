//! The web console (docs/console.md) and the API endpoints written for it, which any client
//! may use too: the whole fleet and its live changes (`GET /v1/fleet`, `GET
//! /v1/fleet/events`), every visible job's events on one stream (`GET /v1/jobs/events`), a
//! job's tree of steps, retrying a job, and who the caller is (`GET /v1/whoami`).
//!
//! The console itself is three files embedded in the binary (`dispatcher/ui/`), served at
//! `/ui` under a strict Content-Security-Policy; it signs in by posting a token to `/ui/login`,
//! which sets it as an HTTP-only cookie that admission (`auth.rs`) accepts like a bearer token,
//! with a CSRF cookie whose value the page echoes in a header on every change.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Form, Json};
use futures::Stream;
use serde::{Deserialize, Serialize};
use serde_json::json;
use spine_protocol::{CapabilityName, Filter, JobState};
use tokio::sync::broadcast;
use utoipa::ToSchema;

use super::auth::{cookie, find_token, Caller, CSRF_COOKIE, TOKEN_COOKIE};
use super::error::ApiError;
use super::openapi::{ErrorBody, Refusals, Submitted};
use super::request::job_id;
use super::routes::{async_stream, change, find_job, mismatch, read};
use super::views::job_json;
use super::Handle;
use crate::core::{Answer, ApiReply, ApiRequest, FleetAnswer, Query as Lookup};
use crate::registry::FleetAgent;

/// How often the fleet stream sends what changed (at most; nothing when nothing did).
const FLEET_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FleetQuery {
    capability: Option<String>,
    filter: Option<String>,
}

/// A capability's load, in a fleet answer.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct FleetCapability {
    #[schema(example = "image.thumbnail")]
    pub name: String,
    /// Agents offering it.
    pub agents: u64,
    /// Their slots for it.
    pub slots: u64,
    /// Its jobs running on them.
    pub in_flight: u64,
    /// Its jobs waiting.
    pub queued: u64,
}

/// The fleet (`GET /v1/fleet`, and the `snapshot` event of `GET /v1/fleet/events`), or what
/// changed in it (the stream's `update` events).
#[derive(Debug, Serialize, ToSchema)]
pub struct Fleet {
    /// The registry's version: it grows with every change of an agent.
    pub version: u64,
    /// When (RFC 3339, UTC).
    pub at: String,
    /// The agents (a snapshot), or those that changed (an update), by JID.
    pub agents: Vec<FleetAgent>,
    /// Agents that left, or no longer match the view (updates only).
    pub gone: Vec<String>,
    /// Every capability the caller may run, with its load (unfiltered).
    pub capabilities: Vec<FleetCapability>,
    /// A whole snapshot (the stream's reader fell too far behind for a delta).
    #[serde(skip)]
    snapshot: bool,
}

impl Fleet {
    fn of(a: FleetAnswer) -> Fleet {
        Fleet {
            version: a.changes.version,
            snapshot: a.changes.snapshot,
            at: crate::core::rfc3339_ms(a.at_ms),
            agents: a.changes.agents,
            gone: a.changes.gone,
            capabilities: a
                .capabilities
                .into_iter()
                .map(|(c, agents, slots, in_flight, queued)| FleetCapability {
                    name: c.to_string(),
                    agents,
                    slots,
                    in_flight,
                    queued,
                })
                .collect(),
        }
    }
}

/// The view a fleet query asks for, checked.
struct FleetAsk {
    capability: Option<CapabilityName>,
    filter: Option<Filter>,
}

fn fleet_ask(caller: &Caller, q: FleetQuery) -> Result<FleetAsk, ApiError> {
    let capability = match q.capability.filter(|c| !c.is_empty()) {
        None => None,
        Some(c) => {
            let c: CapabilityName = c
                .parse()
                .map_err(|e: String| ApiError::field("capability", e))?;
            caller.check_may_run(&c)?;
            Some(c)
        }
    };
    let filter = match q.filter.filter(|f| !f.trim().is_empty()) {
        None => None,
        Some(f) => Some(
            f.parse::<Filter>()
                .map_err(|e| ApiError::field("filter", e.to_string()))?,
        ),
    };
    Ok(FleetAsk { capability, filter })
}

async fn fleet_read(
    h: &Handle,
    caller: &Caller,
    ask: &FleetAsk,
    since: Option<u64>,
) -> Result<Fleet, ApiError> {
    let query = Lookup::Fleet {
        capability: ask.capability.clone(),
        filter: ask.filter.clone(),
        visible: caller.grant.capabilities.clone(),
        since,
    };
    match read(h, query).await? {
        Answer::Fleet(a) => Ok(Fleet::of(*a)),
        _ => Err(mismatch()),
    }
}

fn bad_query(e: axum::extract::rejection::QueryRejection) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "bad-request", e.body_text())
}

#[utoipa::path(
    get, path = "/v1/fleet", tag = "fleet",
    summary = "Every agent (of the capabilities the caller may run), with each capability's load",
    params(
        ("capability" = Option<String>, Query, description = "Only agents of this capability (their attributes for it)"),
        ("filter" = Option<String>, Query, description = "Only agents whose attributes match (the filter grammar), like `gpu, mem>=16`"),
    ),
    responses((status = 200, description = "The fleet", body = Fleet), Refusals),
)]
pub(super) async fn fleet(
    State(h): State<Handle>,
    caller: Caller,
    q: Result<Query<FleetQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Fleet>, ApiError> {
    let Query(q) = q.map_err(bad_query)?;
    let ask = fleet_ask(&caller, q)?;
    Ok(Json(fleet_read(&h, &caller, &ask, None).await?))
}

#[utoipa::path(
    get, path = "/v1/fleet/events", tag = "fleet",
    summary = "The fleet, live: a snapshot, then at most one update a second with what changed",
    params(
        ("capability" = Option<String>, Query, description = "Only agents of this capability"),
        ("filter" = Option<String>, Query, description = "Only agents whose attributes match"),
    ),
    responses(
        (status = 200, description = "Server-sent events: `snapshot` then `update`, each a Fleet", content_type = "text/event-stream", body = String),
        Refusals,
        (status = 429, description = "Too many event streams open for this token", body = ErrorBody),
    ),
)]
pub(super) async fn fleet_events(
    State(h): State<Handle>,
    caller: Caller,
    q: Result<Query<FleetQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let Query(q) = q.map_err(bad_query)?;
    let ask = fleet_ask(&caller, q)?;
    let slot = h.streams.open(&caller.name, &h.limits)?;
    let first = fleet_read(&h, &caller, &ask, None).await?;
    let stream = async_stream(move |tx| async move {
        let _slot = slot;
        let mut version = first.version;
        let mut caps = first.capabilities.clone();
        if tx.send(sse("snapshot", &first)).await.is_err() {
            return;
        }
        drop(first);
        let mut every = tokio::time::interval(FLEET_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        every.tick().await;
        loop {
            tokio::select! {
                _ = tx.closed() => return,
                _ = every.tick() => {}
            }
            let Ok(update) = fleet_read(&h, &caller, &ask, Some(version)).await else {
                return;
            };
            version = update.version;
            let quiet = update.agents.is_empty() && update.gone.is_empty();
            if quiet && !update.snapshot && update.capabilities == caps {
                continue;
            }
            let kind = if update.snapshot {
                "snapshot"
            } else {
                "update"
            };
            caps.clone_from(&update.capabilities);
            if tx.send(sse(kind, &update)).await.is_err() {
                return;
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// A job's event on the every-job stream: its data names the job (`job`).
fn job_sse(ev: crate::core::JobEvent) -> SseEvent {
    let mut data = ev.data.value();
    if let Some(o) = data.as_object_mut() {
        o.entry("job").or_insert_with(|| json!(ev.job));
    }
    SseEvent::default()
        .event(ev.kind.as_str())
        .data(data.to_string())
}

/// At a standby, the `final` event of a job the leader announced ended, if `may_see` its
/// submitter: from the view the leader sent (a job a standby accepted), or else read from
/// the shared store.
async fn final_heard(
    pg: &crate::store::postgres::PgStore,
    id: &str,
    view: Option<&str>,
    may_see: impl Fn(&str) -> bool,
) -> Option<SseEvent> {
    let mut data = match view {
        Some(view) => serde_json::from_str::<serde_json::Value>(view)
            .ok()
            .filter(|d| {
                d.get("submitter")
                    .and_then(|s| s.as_str())
                    .is_some_and(&may_see)
            })?,
        None => match pg.job(id).await {
            Ok(Some(rec)) if may_see(&rec.spec.submitter) => job_json(&rec),
            Ok(_) => return None,
            Err(e) => {
                tracing::warn!("a standby could not read a job that ended: {e}");
                return None;
            }
        },
    };
    if let Some(o) = data.as_object_mut() {
        let id = o.get("id").cloned().unwrap_or_else(|| json!(id));
        o.entry("job").or_insert(id);
    }
    Some(SseEvent::default().event("final").data(data.to_string()))
}

fn sse(kind: &str, data: &impl Serialize) -> SseEvent {
    SseEvent::default()
        .event(kind)
        .data(serde_json::to_string(data).unwrap_or_else(|_| "{}".into()))
}

#[utoipa::path(
    get, path = "/v1/jobs/events", tag = "jobs",
    summary = "Every job's events the caller may see, on one stream",
    description = "`progress`, `partial` and `final` events (as on a job's own stream) of every job the caller may see: its own, or all with all_jobs. Each event's data names its job (`id` in a final Job, `job` otherwise). At a standby (several dispatchers) the leader's `progress` and `partial` events are relayed (best effort: one over 7,900 bytes is not) and the `final` events read from the shared store when the leader announces the ends.",
    responses(
        (status = 200, description = "Server-sent events", content_type = "text/event-stream", body = String),
        Refusals,
        (status = 429, description = "Too many event streams open for this token", body = ErrorBody),
    ),
)]
pub(super) async fn jobs_events(
    State(h): State<Handle>,
    caller: Caller,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let slot = h.streams.open(&caller.name, &h.limits)?;
    let mut rx = h.events.subscribe();
    let mut ended = h.ended.as_ref().map(broadcast::Sender::subscribe);
    let mut relayed = h.relayed.as_ref().map(broadcast::Sender::subscribe);
    let me = caller.submitter();
    let h2 = h.clone();
    let stream = async_stream(move |tx| async move {
        let _slot = slot;
        // A standby hears of jobs from the leader: progress and partial results relayed
        // (PostgreSQL's `spine_events`, best effort), and the ends announced, each read from
        // the shared store for its final event. It looks every second whether it leads now,
        // and then follows the events as the leader does.
        while let (Some(pg), Some(ended)) = (h2.standby_store().cloned(), ended.as_mut()) {
            let relayed_event = async {
                match relayed.as_mut() {
                    Some(r) => r.recv().await,
                    None => std::future::pending().await,
                }
            };
            let heard = tokio::select! {
                _ = tx.closed() => return,
                r = tokio::time::timeout(Duration::from_secs(1), ended.recv()) => r,
                ev = relayed_event => {
                    match ev {
                        Ok(ev) if caller.grant.may_see(&me, &ev.submitter) => {
                            if tx.send(job_sse(ev)).await.is_err() {
                                return;
                            }
                        }
                        Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                        Err(broadcast::error::RecvError::Closed) => relayed = None,
                    }
                    continue;
                }
            };
            let heard = match heard {
                Err(_) => continue,
                Ok(Ok(heard)) => heard,
                // `missed` counts the leader's announcements, each the ends of one commit.
                Ok(Err(broadcast::error::RecvError::Lagged(n))) => {
                    let lagged = SseEvent::default()
                        .event("lagged")
                        .data(json!({ "missed": n }).to_string());
                    if tx.send(lagged).await.is_err() {
                        return;
                    }
                    continue;
                }
                Ok(Err(broadcast::error::RecvError::Closed)) => return,
            };
            for (id, view) in heard.jobs() {
                let Some(event) =
                    final_heard(&pg, id, view, |s| caller.grant.may_see(&me, s)).await
                else {
                    continue;
                };
                if tx.send(event).await.is_err() {
                    return;
                }
            }
        }
        loop {
            let ev = tokio::select! {
                _ = tx.closed() => return,
                ev = rx.recv() => ev,
            };
            let event = match ev {
                Ok(ev)
                    if ev.kind != crate::core::EventKind::Fired
                        && caller.grant.may_see(&me, &ev.submitter) =>
                {
                    job_sse(ev)
                }
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Lagged(n)) => SseEvent::default()
                    .event("lagged")
                    .data(json!({ "missed": n }).to_string()),
                Err(broadcast::error::RecvError::Closed) => return,
            };
            if tx.send(event).await.is_err() {
                return;
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

#[utoipa::path(
    get, path = "/v1/jobs/{id}/tree", tag = "jobs",
    summary = "A map/reduce or `all` job's steps, with each step's copies",
    params(("id" = String, Path, description = "The job's id")),
    responses(
        (status = 200, description = "Its levels of steps (none for a job without steps)", body = crate::core::tree::TreeView),
        Refusals,
        (status = 404, description = "No such job", body = ErrorBody),
    ),
)]
pub(super) async fn tree(
    State(h): State<Handle>,
    caller: Caller,
    Path(id): Path<String>,
    uri: axum::http::Uri,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    let id = job_id(&id)?;
    // A standby holds no job table: the leader answers.
    let get = axum::http::Method::GET;
    if let Some(answer) = super::forward::to_leader(&h, get, &uri, &headers, &[]).await? {
        return Ok(answer);
    }
    let rec = find_job(&h, &id).await?;
    caller.check_sees(&rec)?;
    match read(&h, Lookup::Tree { id: id.clone() }).await? {
        Answer::Tree(Some(t)) => Ok(Json(t).into_response()),
        Answer::Tree(None) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not-found",
            format!("no job {id}"),
        )),
        _ => Err(mismatch()),
    }
}

/// `POST /v1/jobs/{id}/retry`'s answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct Retried {
    /// The new job.
    #[serde(flatten)]
    pub job: Submitted,
    /// The job it repeats.
    pub retry_of: String,
}

#[utoipa::path(
    post, path = "/v1/jobs/{id}/retry", tag = "jobs",
    summary = "Submit a failed, timed-out or cancelled job again, as a new job",
    description = "The new job has the same capability, arguments, input, strategy, priority and attempts; its deadline is as far from now as the old one's was from its acceptance; it is the caller's, without an idempotency key. A step of a map/reduce or `all` job is retried by retrying its parent.",
    params(("id" = String, Path, description = "The job to repeat")),
    responses(
        (status = 202, description = "The new job", body = Retried),
        Refusals,
        (status = 404, description = "No such job", body = ErrorBody),
        (status = 409, description = "The job has not failed (it runs, or succeeded), or is a step of another job", body = ErrorBody),
    ),
)]
pub(super) async fn retry(
    State(h): State<Handle>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = job_id(&id)?;
    let rec = find_job(&h, &id).await?;
    caller.check_sees(&rec)?;
    caller.check_may_run(&rec.spec.capability)?;
    if !matches!(
        rec.state,
        JobState::Failed | JobState::TimedOut | JobState::Cancelled
    ) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not-failed",
            format!(
                "job {id} is {}: only a failed, timed-out or cancelled job is retried",
                rec.state
            ),
        ));
    }
    if let Some(parent) = &rec.spec.parent {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "a-step",
            format!("job {id} is a step of job {parent}: retry {parent}"),
        ));
    }
    let mut spec = rec.spec.clone();
    let now = crate::driver::now().ms;
    spec.idempotency_key = None;
    spec.submitter = caller.submitter();
    spec.not_before_ms = None;
    spec.deadline_ms = spec
        .deadline_ms
        .map(|d| now.saturating_add(d.saturating_sub(rec.accepted_ms)));
    let request = ApiRequest::Submit {
        spec: Box::new(spec),
        wait_for_agent: true,
        visible: caller.grant.capabilities.clone(),
        wait: false,
    };
    let ApiReply::Submitted(answer) = change(&h, request).await? else {
        return Err(mismatch());
    };
    let (new, state) = answer?;
    Ok((
        StatusCode::ACCEPTED,
        Json(Retried {
            job: Submitted { id: new, state },
            retry_of: id.to_string(),
        }),
    )
        .into_response())
}

/// `GET /v1/whoami`'s answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct WhoAmI {
    /// The token's name (`local` without tokens).
    pub name: String,
    /// The capability patterns it may run.
    pub capabilities: Vec<String>,
    /// Whether it sees every submitter's jobs.
    pub all_jobs: bool,
    /// Whether it may read `/metrics`.
    pub metrics: bool,
    /// Whether the dispatcher has tokens (without, loopback clients are the local operator
    /// and the console needs no sign-in).
    pub tokens: bool,
}

#[utoipa::path(
    get, path = "/v1/whoami", tag = "operations",
    summary = "Who the caller is and what it may do",
    responses((status = 200, description = "The caller", body = WhoAmI), Refusals),
)]
pub(super) async fn whoami(State(h): State<Handle>, caller: Caller) -> Json<WhoAmI> {
    Json(WhoAmI {
        name: caller.name.clone(),
        capabilities: caller.grant.capabilities.patterns().to_vec(),
        all_jobs: caller.grant.all_jobs,
        metrics: caller.metrics,
        tokens: !h.tokens.is_empty(),
    })
}

// The console's files, embedded: nothing is fetched at run time.
const INDEX_HTML: &str = include_str!("../../ui/index.html");
const CONSOLE_JS: &str = include_str!("../../ui/console.js");
const CONSOLE_CSS: &str = include_str!("../../ui/console.css");

/// The console's answers may load only its own script, style and images, and may not be
/// framed (clickjacking).
const CSP: &str = "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

fn asset(body: &'static str, kind: &'static str) -> Response {
    let mut r = (StatusCode::OK, body).into_response();
    let hd = r.headers_mut();
    hd.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    hd.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    hd.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    hd.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    // A new binary may bring new files: the browser asks again each time (they are small).
    hd.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

pub(super) async fn root() -> Redirect {
    Redirect::to("/ui")
}

pub(super) async fn index() -> Response {
    asset(INDEX_HTML, "text/html; charset=utf-8")
}

pub(super) async fn script() -> Response {
    asset(CONSOLE_JS, "text/javascript; charset=utf-8")
}

pub(super) async fn style() -> Response {
    asset(CONSOLE_CSS, "text/css; charset=utf-8")
}

#[derive(Deserialize)]
pub(super) struct Login {
    token: String,
}

/// `POST /ui/login`: a form with the token. A known one is set as an HTTP-only cookie (with
/// the CSRF cookie the page echoes); either way the browser goes back to the console.
pub(super) async fn login(
    State(h): State<Handle>,
    headers: HeaderMap,
    form: Result<Form<Login>, axum::extract::rejection::FormRejection>,
) -> Result<Response, ApiError> {
    super::auth::check_same_origin(&headers)?;
    let Ok(Form(login)) = form else {
        return Ok(Redirect::to("/ui#/login?error=bad-form").into_response());
    };
    if find_token(&h, login.token.trim()).is_none() {
        tracing::info!("console sign-in with an unknown token");
        return Ok(Redirect::to("/ui#/login?error=unknown-token").into_response());
    }
    let csrf: [u8; 16] = rand::random();
    let csrf: String = csrf.iter().map(|b| format!("{b:02x}")).collect();
    let mut r = Redirect::to("/ui").into_response();
    let secure = h.https;
    let hd = r.headers_mut();
    for c in [
        cookie(
            TOKEN_COOKIE,
            &super::auth::encode_cookie(login.token.trim()),
            true,
            secure,
        ),
        cookie(CSRF_COOKIE, &csrf, false, secure),
    ] {
        if let Ok(v) = HeaderValue::from_str(&c) {
            hd.append(header::SET_COOKIE, v);
        }
    }
    Ok(r)
}

/// `POST /ui/logout`: forgets the cookies.
pub(super) async fn logout(
    State(h): State<Handle>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    super::auth::check_same_origin(&headers)?;
    let mut r = Redirect::to("/ui#/login").into_response();
    let hd = r.headers_mut();
    for name in [TOKEN_COOKIE, CSRF_COOKIE] {
        let c = format!(
            "{}; Max-Age=0",
            cookie(name, "", name == TOKEN_COOKIE, h.https)
        );
        if let Ok(v) = HeaderValue::from_str(&c) {
            hd.append(header::SET_COOKIE, v);
        }
    }
    Ok(r)
}
