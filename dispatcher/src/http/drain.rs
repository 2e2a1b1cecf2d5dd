//! `POST /v1/agents/{jid}/drain` and `POST /v1/agents/{jid}/undrain`: an operator takes an
//! agent out of rotation, or puts it back, without stopping it (PROTOCOL.md §5.6).
//!
//! The handler checks that the caller is an operator, reads the optional reason, and asks the
//! core ([`ApiRequest::SetAgentState`]), which sends the agent `<drain/>` or `<undrain/>` and
//! answers once the agent did (or after its timeout). The answer is the agent as the registry
//! then sees it, or an error saying why nothing changed, each with its own status. A standby
//! passes the request on to the leader, which drains ([`forward`]).

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse as _, Response};
use axum::Json;
use serde::Deserialize;
use spine_protocol::operator::MAX_REASON;

use super::auth::{read_body, Caller};
use super::error::ApiError;
use super::forward;
use super::openapi::{AgentView, ErrorBody, Refusals};
use super::routes::{change, mismatch};
use super::{Handle, SMALL_BODY};
use crate::core::api::StateError;
use crate::core::{ApiReply, ApiRequest};

/// The optional body of a drain.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = DrainRequest)]
pub struct StateBody {
    /// Why: for the agent's log, its state file and its refusals of jobs (one line, at most
    /// 1024 characters).
    #[schema(example = "kernel upgrade")]
    reason: Option<String>,
}

/// `POST /v1/agents/{jid}/drain`, body `{"reason": "…"}` or none.
#[utoipa::path(
    post, path = "/v1/agents/{jid}/drain", tag = "fleet",
    summary = "Take an agent out of rotation (operator tokens)",
    description = "The agent finishes the jobs it runs, takes no new ones from any dispatcher, and keeps running (PROTOCOL.md §5.6); with its state_file set it stays drained across restarts. Answered once the agent has. At a standby (several dispatchers) the request is passed on to the leader.",
    params(("jid" = String, Path, description = "The agent's full JID (the `/` as `%2F`), or its bare JID when one agent runs on that account")),
    request_body(content = Option<StateBody>, description = "Optional: why"),
    responses(
        (status = 200, description = "The agent as the dispatcher sees it after its answer", body = AgentView),
        Refusals,
        (status = 404, description = "No agent with that JID is registered (`unknown-agent`)", body = ErrorBody),
        (status = 409, description = "A bare JID that names several agents (`ambiguous-agent`): give the full JID", body = ErrorBody),
        (status = 502, description = "The agent refused (`agent-refused`) or does not support it (`not-supported`)", body = ErrorBody),
        (status = 504, description = "The agent did not answer within 10 s (`agent-timeout`)", body = ErrorBody),
    ),
)]
pub(super) async fn drain(
    State(h): State<Handle>,
    caller: Caller,
    Path(jid): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    set_state(h, caller, jid, true, (uri, headers), body).await
}

/// `POST /v1/agents/{jid}/undrain`, no body (or `{}`).
#[utoipa::path(
    post, path = "/v1/agents/{jid}/undrain", tag = "fleet",
    summary = "Put a drained agent back in rotation (operator tokens)",
    params(("jid" = String, Path, description = "The agent's full JID (the `/` as `%2F`), or its bare JID when one agent runs on that account")),
    responses(
        (status = 200, description = "The agent as the dispatcher sees it after its answer", body = AgentView),
        Refusals,
        (status = 404, description = "No agent with that JID is registered (`unknown-agent`)", body = ErrorBody),
        (status = 409, description = "A bare JID that names several agents (`ambiguous-agent`): give the full JID", body = ErrorBody),
        (status = 502, description = "The agent refused (`agent-refused`) or does not support it (`not-supported`)", body = ErrorBody),
        (status = 504, description = "The agent did not answer within 10 s (`agent-timeout`)", body = ErrorBody),
    ),
)]
pub(super) async fn undrain(
    State(h): State<Handle>,
    caller: Caller,
    Path(jid): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    set_state(h, caller, jid, false, (uri, headers), body).await
}

async fn set_state(
    h: Handle,
    caller: Caller,
    jid: String,
    drain: bool,
    (uri, headers): (Uri, HeaderMap),
    body: Body,
) -> Result<Response, ApiError> {
    let verb = if drain { "drain" } else { "undrain" };
    // Taking capacity away from everyone is an operator's decision, as reading every
    // capability's metrics is: the local operator, or a token for every capability and job.
    if !(caller.grant.all_jobs && caller.grant.capabilities.is_all()) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "not-authorized",
            format!(
                "token '{}' may not {verb} agents: it needs capabilities [\"*\"] and all_jobs = true (an operator token)",
                caller.name
            ),
        ));
    }
    let agent: jid::Jid = jid.parse().map_err(|e| {
        ApiError::field(
            "jid",
            format!("'{jid}' is not a JID ({e}): give the agent's JID, e.g. agent1@example.com/worker (the '/' as %2F in the URL)"),
        )
    })?;
    let small = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(0);
    let bytes = read_body(body, SMALL_BODY, small).await?;
    let parsed: StateBody = if bytes.iter().all(u8::is_ascii_whitespace) {
        StateBody::default()
    } else {
        serde_json::from_slice(&bytes).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad-request",
                format!("the body is optional; if given, it is {{\"reason\": \"…\"}}: {e}"),
            )
        })?
    };
    let reason = match (parsed.reason, drain) {
        (Some(_), false) => {
            return Err(ApiError::field(
                "reason",
                "an undrain takes no reason (only a drain does)",
            ))
        }
        (Some(r), true) if r.chars().count() > MAX_REASON || r.chars().any(char::is_control) => {
            return Err(ApiError::field(
                "reason",
                format!("one line of at most {MAX_REASON} characters, without control characters"),
            ))
        }
        (r, _) => r.filter(|r| !r.trim().is_empty()),
    };
    // A standby: the leader sends the agent its drain, and answers with the agent as it sees
    // it.
    if let Some(answer) = forward::to_leader(&h, Method::POST, &uri, &headers, &bytes).await? {
        return Ok(answer);
    }
    let request = ApiRequest::SetAgentState {
        agent,
        drain,
        reason,
    };
    let ApiReply::AgentState(answer) = change(&h, request).await? else {
        return Err(mismatch());
    };
    match answer {
        Ok(info) => Ok(Json(AgentView::of(&info)).into_response()),
        Err(e) => Err(state_error(e, verb)),
    }
}

/// The API's error for each way a drain or undrain can fail.
fn state_error(e: StateError, verb: &str) -> ApiError {
    match e {
        StateError::UnknownAgent(jid) => ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown-agent",
            format!("no agent {jid} is registered with this dispatcher (see `spine agents` for the JIDs of the agents it knows)"),
        ),
        StateError::Ambiguous { given, agents } => ApiError {
            field: Some("jid".into()),
            ..ApiError::new(
                StatusCode::CONFLICT,
                "ambiguous-agent",
                format!(
                    "{given} runs {} agents ({}): name one by its full JID",
                    agents.len(),
                    agents.join(", ")
                ),
            )
        },
        StateError::NoAnswer { agent, waited_ms } => ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "agent-timeout",
            format!(
                "agent {agent} did not answer the {verb} within {} s; whether it changed is unknown: check its state with `spine agents`, and try again",
                waited_ms / 1000
            ),
        ),
        StateError::NotSupported { agent, said } => ApiError::new(
            StatusCode::BAD_GATEWAY,
            "not-supported",
            format!(
                "agent {agent} does not support {verb} (an older Spine agent, or another implementation; it answered: {said}): upgrade it, or stop it with SIGTERM, which drains it and exits"
            ),
        ),
        StateError::Refused {
            agent,
            condition,
            text,
        } if condition == "not-authorized" => ApiError::new(
            StatusCode::BAD_GATEWAY,
            "agent-refused",
            format!(
                "agent {agent} refused the {verb}: not-authorized ({text}); this dispatcher's account is not among the agent's configured dispatchers"
            ),
        ),
        StateError::Refused {
            agent,
            condition,
            text,
        } => ApiError::new(
            StatusCode::BAD_GATEWAY,
            "agent-refused",
            format!("agent {agent} refused the {verb}: {condition} ({text})"),
        ),
    }
}
