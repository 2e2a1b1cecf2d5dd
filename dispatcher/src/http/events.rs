//! Events in (`POST /v1/events`, the CloudEvents HTTP binding: structured, binary and batched
//! modes) and the rules they fire (`GET /v1/rules`); docs/events.md.

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::auth::{read_body, Caller};
use super::data::content_length;
use super::error::ApiError;
use super::forward;
use super::openapi::ErrorBody;
use super::routes::{change, mismatch, read};
use super::{max_body, Handle};
use crate::core::{Answer, ApiReply, ApiRequest, Query};
use crate::triggers::{Event, EventData};

/// Longest `id`, `source`, `type` or `subject` taken, in bytes.
const MAX_ATTRIBUTE: usize = 1024;

/// Events one batch may carry.
const MAX_BATCH: usize = 1000;

/// A job an event made.
#[derive(Debug, Serialize, ToSchema)]
pub struct FiredView {
    /// The rule that made it.
    pub rule: String,
    /// The job.
    pub id: String,
    /// Its state.
    #[schema(value_type = crate::core::JobStateName)]
    pub state: spine_protocol::JobState,
}

/// `POST /v1/events`'s answer: the event, stored with the jobs it made.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventAnswer {
    /// The event's `id`.
    pub id: String,
    /// The event's `source`.
    pub source: String,
    /// The jobs of the rules it matched (none: it matched no rule). Sent again, the same
    /// jobs.
    pub jobs: Vec<FiredView>,
}

/// One item of a batch's answer: the event's answer, or its error.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum BatchEventItem {
    Stored(EventAnswer),
    Refused(ErrorBody),
}

/// A batch's answer, one item per event, in order.
#[derive(Debug, Serialize, ToSchema)]
pub struct BatchEventAnswer {
    pub events: Vec<BatchEventItem>,
}

/// A structured-mode event (`application/cloudevents+json`).
#[derive(Debug, Deserialize, ToSchema)]
pub struct StructuredEvent {
    /// `1.0`.
    pub specversion: String,
    /// Unique within its source: an event sent again with the same `source` and `id` makes
    /// no second job.
    pub id: String,
    /// Who produced it (a URI reference).
    pub source: String,
    /// What happened.
    #[serde(rename = "type")]
    pub ty: String,
    /// What it is about.
    #[serde(default)]
    pub subject: Option<String>,
    /// When it happened (RFC 3339).
    #[serde(default)]
    pub time: Option<String>,
    /// Its data's media type (JSON when absent).
    #[serde(default)]
    pub datacontenttype: Option<String>,
    /// Its data.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub data: Option<Value>,
    /// Its data, binary, in base64.
    #[serde(default)]
    pub data_base64: Option<String>,
    // Extension attributes are accepted and not used (serde skips unknown fields).
}

fn is_json(mime: &str) -> bool {
    let m = mime
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    m == "application/json" || m == "text/json" || m.ends_with("+json")
}

/// Checks the attributes every event has, naming the one at fault.
#[allow(clippy::too_many_arguments)]
fn event(
    specversion: &str,
    id: String,
    source: String,
    ty: String,
    subject: Option<String>,
    time: Option<&str>,
    mime: Option<String>,
    data: EventData,
    prefix: &str,
) -> Result<Event, ApiError> {
    let name = |k: &str| format!("{prefix}{k}");
    if specversion != "1.0" {
        return Err(ApiError::field(
            &name("specversion"),
            format!("'{specversion}': this dispatcher takes CloudEvents 1.0"),
        ));
    }
    for (k, v) in [("id", &id), ("source", &source), ("type", &ty)] {
        if v.is_empty() {
            return Err(ApiError::field(&name(k), "missing or empty: required"));
        }
    }
    for (k, v) in [
        ("id", Some(&id)),
        ("source", Some(&source)),
        ("type", Some(&ty)),
        ("subject", subject.as_ref()),
    ] {
        if v.is_some_and(|v| v.len() > MAX_ATTRIBUTE) {
            return Err(ApiError::field(
                &name(k),
                format!("at most {MAX_ATTRIBUTE} bytes"),
            ));
        }
    }
    let time_ms = time
        .map(|t| {
            chrono::DateTime::parse_from_rfc3339(t)
                .map(|d| u64::try_from(d.timestamp_millis()).unwrap_or(0))
                .map_err(|e| {
                    ApiError::field(
                        &name("time"),
                        format!("'{t}' is not an RFC 3339 time ({e}), like 2026-11-26T10:00:00Z"),
                    )
                })
        })
        .transpose()?;
    Ok(Event {
        id,
        source,
        ty,
        subject,
        time_ms,
        mime,
        data,
        depth: 0,
    })
}

fn structured(e: StructuredEvent, prefix: &str) -> Result<Event, ApiError> {
    let data = match (e.data, e.data_base64) {
        (Some(_), Some(_)) => {
            return Err(ApiError::field(
                &format!("{prefix}data_base64"),
                "give data or data_base64, not both",
            ))
        }
        (None, Some(b64)) => EventData::Bytes(
            base64::engine::general_purpose::STANDARD
                .decode(b64.as_bytes())
                .map_err(|err| {
                    ApiError::field(
                        &format!("{prefix}data_base64"),
                        format!("not base64: {err}"),
                    )
                })?,
        ),
        // Text data of a type that is not JSON is the text's bytes.
        (Some(Value::String(s)), None)
            if e.datacontenttype.as_deref().is_some_and(|m| !is_json(m)) =>
        {
            EventData::Bytes(s.into_bytes())
        }
        (Some(v), None) => EventData::Json(v),
        (None, None) => EventData::None,
    };
    event(
        &e.specversion,
        e.id,
        e.source,
        e.ty,
        e.subject,
        e.time.as_deref(),
        e.datacontenttype,
        data,
        prefix,
    )
}

fn binary(
    headers: &HeaderMap,
    content_type: Option<String>,
    body: Vec<u8>,
) -> Result<Event, ApiError> {
    let header = |k: &str| -> Result<Option<String>, ApiError> {
        headers
            .get(k)
            .map(|v| {
                v.to_str()
                    .map(str::to_owned)
                    .map_err(|_| ApiError::field(k, "not visible ASCII text"))
            })
            .transpose()
    };
    let Some(specversion) = header("ce-specversion")? else {
        return Err(ApiError::field(
            "ce-specversion",
            "missing: send the event as Content-Type: application/cloudevents+json (structured mode), as application/cloudevents-batch+json (a list), or with ce-specversion, ce-id, ce-source and ce-type headers and its data as the body (binary mode)",
        ));
    };
    let data = data_of(content_type.as_deref(), &body)?;
    event(
        &specversion,
        header("ce-id")?.unwrap_or_default(),
        header("ce-source")?.unwrap_or_default(),
        header("ce-type")?.unwrap_or_default(),
        header("ce-subject")?,
        header("ce-time")?.as_deref(),
        content_type,
        data,
        "ce-",
    )
}

/// One event to the core: stored with its jobs before the answer.
async fn fire(h: &Handle, ev: Event) -> Result<EventAnswer, ApiError> {
    let (id, source) = (ev.id.clone(), ev.source.clone());
    let ApiReply::Event(answer) = change(
        h,
        ApiRequest::Event {
            event: Box::new(ev),
        },
    )
    .await?
    else {
        return Err(mismatch());
    };
    let jobs = answer?
        .into_iter()
        .map(|f| FiredView {
            rule: f.rule,
            id: f.id.to_string(),
            state: f.state,
        })
        .collect();
    Ok(EventAnswer { id, source, jobs })
}

/// `POST /v1/events`.
#[utoipa::path(
    post, path = "/v1/events", tag = "events",
    summary = "Post an event (CloudEvents 1.0): the rules it matches make their jobs",
    description = "Structured mode (`Content-Type: application/cloudevents+json`, the event as JSON), binary mode (`ce-specversion`, `ce-id`, `ce-source`, `ce-type` headers, optionally `ce-subject` and `ce-time`; the body is the data, its Content-Type the data's) or a batch (`application/cloudevents-batch+json`, a list of structured events; the answer lists each one's outcome). Answered once the event's jobs are stored; the same `source` and `id` sent again makes no second job and answers the jobs it made. The token needs `events = true` (or is an operator's).",
    request_body(content((StructuredEvent = "application/cloudevents+json"), (String = "application/octet-stream"))),
    responses(
        (status = 202, description = "Stored: the jobs it made (none when it matched no rule)", body = EventAnswer),
        (status = 200, description = "A batch: one item per event", body = BatchEventAnswer),
        (status = 400, description = "An attribute is wrong (`field` names it), or a rule could not make its job of the event (a field its template names is missing: the message names the rule and the field)", body = ErrorBody),
        (status = 401, description = "No token, or an unknown one", body = ErrorBody),
        (status = 403, description = "The token may not post events", body = ErrorBody),
        (status = 429, description = "A rule's job was refused for now (queue full, rate limit): retry after `Retry-After`", body = ErrorBody),
        (status = 503, description = "Unavailable (the store down; at a standby, which passes events on to the leader: no leader known, or the leader unreachable): retry", body = ErrorBody),
    ),
)]
pub(super) async fn post_event(
    State(h): State<Handle>,
    caller: Caller,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    if !caller.grant.events {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "not-authorized",
            format!(
                "token '{}' may not post events: give it events = true in its [[http_token]]",
                caller.name
            ),
        ));
    }
    let bytes = read_event(&h, &headers, body).await?;
    // A standby: the leader makes the jobs.
    if let Some(answer) = forward::to_leader(&h, Method::POST, &uri, &headers, &bytes).await? {
        return Ok(answer);
    }
    take(&h, &headers, bytes, None).await
}

/// An event request's body, read: CloudEvents in any mode, or, from a `webhook` that is
/// not CloudEvents-aware, a plain body it maps to an event.
async fn take(
    h: &Handle,
    headers: &HeaderMap,
    bytes: Vec<u8>,
    webhook: Option<&crate::triggers::Webhook>,
) -> Result<Response, ApiError> {
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let kind = content_type.as_deref().map(|c| {
        c.split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase()
    });
    let not_json = |e: serde_json::Error, what: &str| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad-request",
            format!("the body is not {what}: {e}"),
        )
    };
    match kind.as_deref() {
        Some("application/cloudevents+json") => {
            let e: StructuredEvent = serde_json::from_slice(&bytes)
                .map_err(|e| not_json(e, "a CloudEvent (specversion, id, source, type, …)"))?;
            let answer = fire(h, structured(e, "")?).await?;
            Ok((StatusCode::ACCEPTED, Json(answer)).into_response())
        }
        Some("application/cloudevents-batch+json") => {
            let list: Vec<Value> =
                serde_json::from_slice(&bytes).map_err(|e| not_json(e, "a list of CloudEvents"))?;
            if list.is_empty() || list.len() > MAX_BATCH {
                return Err(ApiError::field(
                    "events",
                    format!("from 1 to {MAX_BATCH} events, not {}", list.len()),
                ));
            }
            let mut events = Vec::with_capacity(list.len());
            // In order: a later event may rely on an earlier one's job existing.
            for (i, v) in list.into_iter().enumerate() {
                let prefix = format!("[{i}].");
                let one = match serde_json::from_value::<StructuredEvent>(v) {
                    Ok(e) => match structured(e, &prefix) {
                        Ok(ev) => fire(h, ev).await,
                        Err(e) => Err(e),
                    },
                    Err(e) => Err(ApiError::field(
                        &format!("[{i}]"),
                        format!("not a CloudEvent: {e}"),
                    )),
                };
                events.push(match one {
                    Ok(a) => BatchEventItem::Stored(a),
                    Err(e) => BatchEventItem::Refused(ErrorBody::from(&e)),
                });
            }
            Ok((StatusCode::OK, Json(BatchEventAnswer { events })).into_response())
        }
        _ => {
            let ev = match webhook {
                Some(w) if !headers.contains_key("ce-specversion") => {
                    let data = data_of(content_type.as_deref(), &bytes)?;
                    let header = |k: &str| headers.get(k).and_then(|v| v.to_str().ok());
                    w.event(header, content_type, bytes, data)
                }
                _ => binary(headers, content_type, bytes)?,
            };
            let answer = fire(h, ev).await?;
            Ok((StatusCode::ACCEPTED, Json(answer)).into_response())
        }
    }
}

/// `POST /v1/events/{webhook}`: an event from a sender that signs (`[[webhook]]`).
#[utoipa::path(
    post, path = "/v1/events/{webhook}", tag = "events",
    summary = "Post an event signed with a webhook's secret (no token)",
    description = "The body is signed: the `X-Hub-Signature-256` header (or the webhook's `signature_header`) is `sha256=` and the hex HMAC-SHA256 of the body with the webhook's secret, as GitHub sends it. A CloudEvent (any mode) is taken as `POST /v1/events` takes it; any other body becomes an event of the webhook's `source` and `type` (with the value of its `type_header`), its `id` from `id_header` or the body's SHA-256, the body as data.",
    params(("webhook" = String, Path, description = "The webhook's name")),
    request_body(content((StructuredEvent = "application/cloudevents+json"), (String = "application/json"))),
    responses(
        (status = 202, description = "Stored: the jobs it made (none when it matched no rule)", body = EventAnswer),
        (status = 400, description = "An attribute is wrong (`field` names it), or a rule could not make its job", body = ErrorBody),
        (status = 401, description = "The signature is missing, malformed or does not match", body = ErrorBody),
        (status = 404, description = "No such webhook", body = ErrorBody),
        (status = 429, description = "A rule's job was refused for now: retry after `Retry-After`", body = ErrorBody),
        (status = 503, description = "Unavailable (the store down; at a standby, which passes events on to the leader: no leader known, or the leader unreachable): retry", body = ErrorBody),
    ),
    security(()),
)]
pub(super) async fn post_webhook(
    State(h): State<Handle>,
    axum::extract::Path(name): axum::extract::Path<String>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let Some(w) = h.webhooks.get(&name).cloned() else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not-found",
            format!("no webhook '{name}' ([[webhook]] in the dispatcher's configuration)"),
        ));
    };
    let bytes = read_event(&h, &headers, body).await?;
    let signature = headers
        .get(w.config.signature_header.as_str())
        .and_then(|v| v.to_str().ok());
    w.verify(signature, &bytes).map_err(|e| {
        tracing::warn!(webhook = %name, "webhook request refused: {e}");
        ApiError::new(StatusCode::UNAUTHORIZED, "not-authorized", e.to_string())
    })?;
    // A standby: the leader makes the jobs (and checks the signature again).
    if let Some(answer) = forward::to_leader(&h, Method::POST, &uri, &headers, &bytes).await? {
        return Ok(answer);
    }
    take(&h, &headers, bytes, Some(&w)).await
}

/// An event request's body, read whole within the limit of a JSON job (`max_blob` in base64).
async fn read_event(h: &Handle, headers: &HeaderMap, body: Body) -> Result<Vec<u8>, ApiError> {
    let limit = max_body(h.max_json_input);
    let small = usize::try_from(content_length(headers).unwrap_or(0)).unwrap_or(usize::MAX);
    read_body(body, limit, small).await
}

/// A plain body's data: JSON when its type is (or none is given), else its bytes.
fn data_of(content_type: Option<&str>, body: &[u8]) -> Result<EventData, ApiError> {
    if body.is_empty() {
        Ok(EventData::None)
    } else if content_type.is_none_or(is_json) {
        Ok(EventData::Json(serde_json::from_slice(body).map_err(
            |e| {
                ApiError::field(
                    "body",
                    format!("the data is not JSON ({e}); send another Content-Type for other data"),
                )
            },
        )?))
    } else {
        Ok(EventData::Bytes(body.to_vec()))
    }
}

/// A rule, as `GET /v1/rules` shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct RuleView {
    /// As configured (`[[rule]]`: name, on, when, do, retry).
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub config: crate::triggers::RuleConfig,
    /// Its counters since the dispatcher started.
    #[schema(value_type = Object)]
    pub counts: crate::core::events::RuleCounts,
    /// Where its dead letters are listed: its jobs that failed (also `timed-out` and
    /// `cancelled`).
    pub dead_letters: String,
    /// `configuration` (a `[[rule]]` of the dispatcher's file: read-only here) or `api` (made
    /// with `PUT /v1/rules/{name}`, stored with the jobs).
    pub origin: &'static str,
}

/// A schedule, as `GET /v1/rules` shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct ScheduleView {
    /// As configured (`[[schedule]]`: name, cron, timezone, prohibit_overlap, catch_up).
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub config: crate::schedules::ScheduleConfig,
    /// Its next tick (RFC 3339, UTC); none at a standby, which fires no tick.
    pub next_tick: Option<String>,
    /// The last tick fired (by this dispatcher, or found in the jobs it holds).
    pub last_tick: Option<String>,
    /// Its counters since the dispatcher started.
    #[schema(value_type = Object)]
    pub counts: crate::core::ticks::ScheduleCounts,
}

/// `GET /v1/rules`' answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct RuleList {
    pub rules: Vec<RuleView>,
    pub schedules: Vec<ScheduleView>,
}

/// `GET /v1/rules`.
#[utoipa::path(
    get, path = "/v1/rules", tag = "events",
    summary = "The event rules and schedules, with their counters",
    responses(
        (status = 200, description = "Every rule, in configuration order", body = RuleList),
        (status = 401, description = "No token, or an unknown one", body = ErrorBody),
        (status = 403, description = "Only an operator (all_jobs) sees the rules", body = ErrorBody),
    ),
)]
pub(super) async fn rules(
    State(h): State<Handle>,
    caller: Caller,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    operator_only(&caller, "see the rules")?;
    // A standby: the leader keeps the rules and their counts.
    if let Some(answer) = forward::to_leader(&h, Method::GET, &uri, &headers, &[]).await? {
        return Ok(answer);
    }
    let Answer::Rules(answer) = read(&h, Query::Rules).await? else {
        return Err(mismatch());
    };
    let leads = answer.leads;
    let schedules = answer
        .schedules
        .into_iter()
        .map(|t| ScheduleView {
            next_tick: t.next_ms.filter(|_| leads).map(crate::core::rfc3339_ms),
            last_tick: t.last_ms.map(crate::core::rfc3339_ms),
            counts: t.counts,
            config: t.schedule.config,
        })
        .collect();
    let rules = answer
        .rules
        .into_iter()
        .map(|(config, counts, api)| RuleView {
            dead_letters: format!("/v1/jobs?submitter=rule:{}&state=failed", config.name),
            config,
            counts,
            origin: if api { "api" } else { "configuration" },
        })
        .collect();
    Ok(Json(RuleList { rules, schedules }).into_response())
}

/// Only an operator (a token with `all_jobs`, or the local caller) reads or changes rules.
fn operator_only(caller: &Caller, what: &str) -> Result<(), ApiError> {
    if caller.grant.all_jobs {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        "not-authorized",
        format!(
            "token '{}' may not {what} (an operator's token, with all_jobs, may)",
            caller.name
        ),
    ))
}

/// `PUT /v1/rules/{name}`.
#[utoipa::path(
    put, path = "/v1/rules/{name}", tag = "events",
    summary = "Make or replace an event rule (stored with the jobs, durable)",
    description = "The body is one rule as JSON, in the shape of a `[[rule]]` of the configuration: `on` (`type`, `source`, `subject`), `when`, `do` (`capability`, `args`, `input`, `strategy`, `filter`, `priority`), `retry` (`attempts`, `max_age`); `name` may be left out (the path names it). The rule is stored before the answer and holds across restarts and failovers. Rules of the configuration file cannot be changed here (409).",
    params(("name" = String, Path, description = "The rule's name: letters, digits, `.`, `_`, `-`")),
    request_body(content = Object, description = "The rule", content_type = "application/json"),
    responses(
        (status = 201, description = "Made", body = RuleView),
        (status = 200, description = "Replaced", body = RuleView),
        (status = 400, description = "Not a valid rule: `field` names what is wrong", body = ErrorBody),
        (status = 401, description = "No token, or an unknown one", body = ErrorBody),
        (status = 403, description = "Only an operator (all_jobs) changes rules", body = ErrorBody),
        (status = 409, description = "A rule of the configuration file has this name", body = ErrorBody),
        (status = 503, description = "The store is down; or at a standby, which passes the change on to the leader: no leader known, or it is unreachable", body = ErrorBody),
    ),
)]
pub(super) async fn put_rule(
    State(h): State<Handle>,
    caller: Caller,
    axum::extract::Path(name): axum::extract::Path<String>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    operator_only(&caller, "change the rules")?;
    let bytes = read_event(&h, &headers, body).await?;
    // A standby: the leader keeps the rules (and checks this one).
    if let Some(answer) = forward::to_leader(&h, Method::PUT, &uri, &headers, &bytes).await? {
        return Ok(answer);
    }
    let mut v: Value = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::field("body", format!("not JSON: {e}")))?;
    let Some(obj) = v.as_object_mut() else {
        return Err(ApiError::field(
            "body",
            "a rule is a JSON object: {\"on\": {\"type\": …}, \"do\": {\"capability\": …}}",
        ));
    };
    match obj.get("name") {
        None => {
            obj.insert("name".into(), Value::String(name.clone()));
        }
        Some(Value::String(n)) if *n == name => {}
        Some(other) => {
            return Err(ApiError::field(
                "name",
                format!("{other} differs from the path's '{name}'"),
            ))
        }
    }
    let rule: crate::triggers::RuleConfig = serde_json::from_value(v).map_err(|e| {
        ApiError::field(
            "body",
            format!("not a rule: {e} (docs/events.md, \"Rules\")"),
        )
    })?;
    let ApiReply::RulePut(answer) = change(
        &h,
        ApiRequest::PutRule {
            rule: Box::new(rule.clone()),
        },
    )
    .await?
    else {
        return Err(mismatch());
    };
    let new = answer.map_err(rule_change_error)?;
    tracing::info!(rule = %name, by = %caller.name, new, "rule stored over the API");
    let status = if new {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let view = RuleView {
        dead_letters: format!("/v1/jobs?submitter=rule:{name}&state=failed"),
        config: rule,
        counts: Default::default(),
        origin: "api",
    };
    Ok((status, Json(view)).into_response())
}

/// `DELETE /v1/rules/{name}`.
#[utoipa::path(
    delete, path = "/v1/rules/{name}", tag = "events",
    summary = "Delete an event rule made over the API (its jobs stay)",
    params(("name" = String, Path, description = "The rule's name")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "No token, or an unknown one", body = ErrorBody),
        (status = 403, description = "Only an operator (all_jobs) changes rules", body = ErrorBody),
        (status = 404, description = "No rule of this name was made over the API", body = ErrorBody),
        (status = 409, description = "A rule of the configuration file has this name", body = ErrorBody),
        (status = 503, description = "The store is down; or at a standby, which passes the change on to the leader: no leader known, or it is unreachable", body = ErrorBody),
    ),
)]
pub(super) async fn delete_rule(
    State(h): State<Handle>,
    caller: Caller,
    axum::extract::Path(name): axum::extract::Path<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    operator_only(&caller, "change the rules")?;
    // A standby: the leader keeps the rules.
    if let Some(answer) = forward::to_leader(&h, Method::DELETE, &uri, &headers, &[]).await? {
        return Ok(answer);
    }
    let ApiReply::RuleDeleted(answer) =
        change(&h, ApiRequest::DeleteRule { name: name.clone() }).await?
    else {
        return Err(mismatch());
    };
    answer.map_err(rule_change_error)?;
    tracing::info!(rule = %name, by = %caller.name, "rule deleted over the API");
    Ok(StatusCode::NO_CONTENT.into_response())
}

fn rule_change_error(e: crate::core::RuleChangeError) -> ApiError {
    use crate::core::RuleChangeError as E;
    match e {
        E::Invalid(why) => {
            let field = why.split(':').next().unwrap_or("body").to_owned();
            ApiError::field(&field, why)
        }
        E::Configured(name) => ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("rule '{name}' is in the dispatcher's configuration file: change it there (the API changes only rules made with it)"),
        ),
        E::Unknown(name) => ApiError::new(
            StatusCode::NOT_FOUND,
            "not-found",
            format!("no rule '{name}' was made over the API (GET /v1/rules lists them)"),
        ),
        E::Standby => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "standby",
            "this dispatcher does not lead: change rules at the leader",
        ),
    }
}

/// `GET /v1/events/stream`'s filters: each exact, `prefix*` or `*`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StreamFilter {
    /// The events' `type` (`spine.job.*`, `spine.job.failed`, `spine.rule.fired`).
    #[serde(rename = "type")]
    pub ty: Option<String>,
    /// The events' `source` (`/spine/jobs`, `/spine/rules/*`).
    pub source: Option<String>,
    /// The events' `subject` (a job's capability, a rule's name).
    pub subject: Option<String>,
}

fn pattern_matches(pattern: Option<&str>, value: Option<&str>) -> bool {
    let Some(p) = pattern else {
        return true;
    };
    let Some(v) = value else {
        return false;
    };
    match p.strip_suffix('*') {
        Some(prefix) => v.starts_with(prefix),
        None => p == v,
    }
}

/// A job's event as a CloudEvent (structured mode), or none for progress.
fn cloud_event(ev: &crate::core::JobEvent) -> Option<Value> {
    use crate::core::EventKind;
    if matches!(ev.kind, EventKind::Progress | EventKind::Partial) {
        return None;
    }
    let data = ev.data.value();
    match ev.kind {
        EventKind::Final => {
            let state = data["state"].as_str().unwrap_or("ended");
            Some(serde_json::json!({
                "specversion": "1.0",
                "id": ev.job,
                "source": crate::triggers::JOB_SOURCE,
                "type": format!("spine.job.{state}"),
                "subject": data["capability"],
                "time": data["ended_at"],
                "datacontenttype": "application/json",
                "data": data,
            }))
        }
        EventKind::Fired => {
            let rule = data["rule"].as_str().unwrap_or("");
            Some(serde_json::json!({
                "specversion": "1.0",
                "id": format!("{rule}/{}", ev.job),
                "source": format!("/spine/rules/{rule}"),
                "type": "spine.rule.fired",
                "subject": rule,
                "datacontenttype": "application/json",
                "data": data,
            }))
        }
        EventKind::Progress | EventKind::Partial => None,
    }
}

/// `GET /v1/events/stream`.
#[utoipa::path(
    get, path = "/v1/events/stream", tag = "events",
    summary = "Jobs' ends and rules' firings as CloudEvents, on one stream",
    description = "Server-sent events, each one's data a CloudEvent in structured mode: `spine.job.succeeded` (`failed`, `cancelled`, `timed-out`) with the capability as subject and the job as data, and `spine.rule.fired` with the rule as subject and the rule, its job and the event that fired it as data. Only events of jobs the caller may see (its own, or all with all_jobs). A reader that falls behind gets a `lagged` event with how many it missed.",
    params(StreamFilter),
    responses(
        (status = 200, description = "Server-sent events", content_type = "text/event-stream", body = String),
        (status = 401, description = "No token, or an unknown one", body = ErrorBody),
        (status = 429, description = "Too many event streams open for this token", body = ErrorBody),
        (status = 503, description = "At a standby, which passes the leader's stream through: no leader known, or it is unreachable", body = ErrorBody),
    ),
)]
pub(super) async fn stream(
    State(h): State<Handle>,
    caller: Caller,
    axum::extract::Query(filter): axum::extract::Query<StreamFilter>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
    use tokio::sync::broadcast;
    // A standby: the leader's stream, passed through.
    if let Some(answer) = forward::stream_from_leader(&h, &uri, &headers).await? {
        return Ok(answer);
    }
    let slot = h.streams.open(&caller.name, &h.limits)?;
    let mut rx = h.events.subscribe();
    let me = caller.submitter();
    let stream = super::routes::async_stream(move |tx| async move {
        let _slot = slot;
        loop {
            let ev = tokio::select! {
                _ = tx.closed() => return,
                ev = rx.recv() => ev,
            };
            let event = match ev {
                Ok(ev) if caller.grant.may_see(&me, &ev.submitter) => {
                    let Some(ce) = cloud_event(&ev) else { continue };
                    let wanted = pattern_matches(filter.ty.as_deref(), ce["type"].as_str())
                        && pattern_matches(filter.source.as_deref(), ce["source"].as_str())
                        && pattern_matches(filter.subject.as_deref(), ce["subject"].as_str());
                    if !wanted {
                        continue;
                    }
                    SseEvent::default()
                        .id(ce["id"].as_str().unwrap_or_default())
                        .data(ce.to_string())
                }
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Lagged(n)) => SseEvent::default()
                    .event("lagged")
                    .data(serde_json::json!({ "missed": n }).to_string()),
                Err(broadcast::error::RecvError::Closed) => return,
            };
            if tx.send(event).await.is_err() {
                return;
            }
        }
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(std::time::Duration::from_secs(15)))
        .into_response())
}

/// `GET /v1/canaries`' answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct CanaryList {
    /// Each agent with each capability that has a canary, by capability then agent.
    #[schema(value_type = Vec<Object>)]
    pub canaries: Vec<crate::core::canary::CanaryView>,
}

/// `GET /v1/canaries`.
#[utoipa::path(
    get, path = "/v1/canaries", tag = "events",
    summary = "Each agent's canaries, and which agents are quarantined",
    description = "For every agent that offers a capability with a `[[canary]]`: whether it is quarantined (it gets no real jobs of the capability), its failures and passes in a row, the last outcome and error, the last success, the last duration, the canaries passed, failed and skipped (the agent busy until the timeout), and when the next one runs.",
    responses(
        (status = 200, description = "The canaries", body = CanaryList),
        (status = 401, description = "No token, or an unknown one", body = ErrorBody),
        (status = 403, description = "Only an operator or a token with metrics sees them", body = ErrorBody),
        (status = 503, description = "At a standby, which asks the leader (it runs the canaries): no leader known, or it is unreachable", body = ErrorBody),
    ),
)]
pub(super) async fn canaries(
    State(h): State<Handle>,
    caller: Caller,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if !caller.grant.all_jobs && !caller.metrics {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "not-authorized",
            format!(
                "token '{}' may not see the canaries (an operator's token or one with metrics = true may)",
                caller.name
            ),
        ));
    }
    // A standby: the leader runs the canaries.
    if let Some(answer) = forward::to_leader(&h, Method::GET, &uri, &headers, &[]).await? {
        return Ok(answer);
    }
    let Answer::Canaries(canaries) = read(&h, Query::Canaries).await? else {
        return Err(mismatch());
    };
    Ok(Json(CanaryList { canaries }).into_response())
}
