//! The HTTP API's description: the JSON bodies the handlers answer with, as types, and the
//! OpenAPI 3.1 document derived from them and from the handlers' `#[utoipa::path]`
//! annotations. `GET /v1/openapi.json` serves it; `docs/openapi.json` is the committed copy
//! that a test (`openapi_document_is_committed`) keeps equal to what this code generates, so
//! a handler cannot change its answer without the document (and the clients checked against
//! it) seeing the change.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use spine_protocol::{AgentInfo, JobState};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

use super::error::ApiError;
use super::request::{Fragment, SubmitRequest};
use crate::core::{FailureView, JobStateName, JobView, MapReduceView, ResultView};

/// A job accepted (or cancelled): its id and state.
#[derive(Debug, Serialize, ToSchema)]
pub struct Submitted {
    /// The job's id.
    #[schema(value_type = String, example = "j-01JD5T6W3K8Q0N6Y7M2S4B1C9E")]
    pub id: spine_protocol::JobId,
    /// Its state now (`accepted` or `queued` after a submission; a final state after a
    /// cancel).
    #[schema(value_type = JobStateName)]
    pub state: JobState,
}

/// `POST /v1/jobs`'s 202: `{id, state}` without `wait`; with it, the job as it is when the
/// wait is over.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum SubmitAnswer {
    /// Without `wait`.
    Submitted(Submitted),
    /// With `wait`.
    Job(Box<JobView>),
}

/// An error, as every endpoint answers one (and as a batch lists a refused item).
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// The condition: `bad-request`, `unknown-capability`, `not-authorized`, `rate-limited`
    /// (a rate limit), `queue-full`, `too-large`, `unknown-job`, `unavailable`, `standby`
    /// (one of several dispatchers that does not lead), …
    #[schema(example = "bad-request")]
    pub error: String,
    /// What went wrong and how to fix it, for people.
    pub message: String,
    /// The HTTP status it goes with.
    #[schema(example = 400)]
    pub status: u16,
    /// The request field at fault, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(example = "filter")]
    pub field: Option<String>,
    /// For 429 and 503: seconds to wait before trying again (the `Retry-After` header; here
    /// too for a batch's items).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
    /// For `standby`: the leading dispatcher's API base URL, where to send the request.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(example = "https://d2.example.com:8443")]
    pub leader: Option<String>,
}

impl From<&ApiError> for ErrorBody {
    fn from(e: &ApiError) -> Self {
        ErrorBody {
            error: e.condition.to_owned(),
            message: e.message.clone(),
            status: e.status.as_u16(),
            field: e.field.clone(),
            retry_after: e
                .retry_after
                .or(matches!(e.status.as_u16(), 429 | 503).then_some(1)),
            leader: e.leader.clone(),
        }
    }
}

// The two response sets below are schemas only: the handlers answer `ApiError`s, whose body
// is `ErrorBody`.

/// The refusals of every endpoint that takes a token.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
pub enum Refusals {
    /// A field is wrong: `field` names it
    #[response(status = 400)]
    BadRequest(ErrorBody),
    /// No token, or an unknown one
    #[response(status = 401)]
    Unauthorized(ErrorBody),
    /// The token may not do this
    #[response(status = 403)]
    Forbidden(ErrorBody),
}

/// The refusals that pass: come back after `Retry-After` seconds.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
pub enum Later {
    /// A rate limit (`rate-limited`) or a full queue (`queue-full`)
    #[response(status = 429, headers(("Retry-After" = u32, description = "Seconds to wait")))]
    TooMany(ErrorBody),
    /// The dispatcher is stopping (`unavailable`)
    #[response(status = 503, headers(("Retry-After" = u32, description = "Seconds to wait")))]
    Unavailable(ErrorBody),
}

/// `POST /v1/jobs:batch`'s body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    /// 1 to 1000 jobs, each as `POST /v1/jobs` takes it (its own `idempotency_key`
    /// included).
    #[schema(value_type = Vec<SubmitRequest>)]
    pub jobs: Vec<Value>,
}

/// One item of a batch's answer: the job accepted, or the error `POST /v1/jobs` would have
/// answered for it.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum BatchItem {
    /// Accepted.
    Submitted(Submitted),
    /// Refused.
    Refused(ErrorBody),
}

/// `POST /v1/jobs:batch`'s answer: one item per job, in order.
#[derive(Debug, Serialize, ToSchema)]
pub struct BatchAnswer {
    pub jobs: Vec<BatchItem>,
}

/// `GET /v1/jobs`'s answer: the newest jobs first, without their outputs.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobList {
    pub jobs: Vec<JobView>,
    /// The cursor of the next page (pass it as `before`), when there may be more.
    pub next: Option<String>,
}

/// An agent, as `GET /v1/agents` shows it.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Agent)]
pub struct AgentView {
    /// Its full JID.
    #[schema(example = "worker-1@spine.example/agent")]
    pub jid: String,
    /// `ready` or `draining`.
    #[schema(example = "ready")]
    pub state: String,
    /// Effective in-flight ÷ slots, as the dispatcher sees it (what placement compares).
    pub load: f64,
    /// Effective in-flight jobs, agent-wide.
    pub in_flight: u64,
    /// Its slots.
    pub slots: u64,
    /// 1-minute OS load average, when the agent reports it.
    pub loadavg: Option<f64>,
    /// Memory in use, bytes.
    pub mem_used: Option<u64>,
    /// Total memory, bytes.
    pub mem_total: Option<u64>,
    /// Its attributes for the capability asked about (what `filter` and `sort` see).
    #[schema(value_type = Object)]
    pub attributes: serde_json::Map<String, Value>,
}

impl AgentView {
    /// The view of `a`.
    pub fn of(a: &AgentInfo) -> AgentView {
        AgentView {
            jid: a.jid.to_string(),
            state: a.state.as_str().to_owned(),
            load: a.load,
            in_flight: a.in_flight,
            slots: a.slots,
            loadavg: a.loadavg,
            mem_used: a.mem_used,
            mem_total: a.mem_total,
            attributes: a
                .attrs
                .iter()
                .map(|(k, v)| (k.to_string(), Value::from(v.as_str())))
                .collect(),
        }
    }
}

/// `GET /v1/agents`'s answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct AgentList {
    /// The capability asked about.
    #[schema(value_type = String)]
    pub capability: spine_protocol::CapabilityName,
    /// Its agents, least loaded first unless `sort` says otherwise.
    pub agents: Vec<AgentView>,
}

/// A capability the caller may run.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Capability)]
pub struct CapabilityView {
    /// Its name.
    #[schema(value_type = String, example = "image.thumbnail")]
    pub name: spine_protocol::CapabilityName,
    /// Agents offering it now.
    pub agents: u64,
    /// Jobs waiting for a slot.
    pub queued: u64,
    /// Its agents' slots for it.
    pub slots: u64,
    /// Its jobs running on its agents now (effective in-flight, as placement counts them).
    pub in_flight: u64,
    /// The seconds the counts and latencies below cover (the last five minutes).
    pub window_s: u64,
    /// Jobs that succeeded in the window.
    pub succeeded: u64,
    /// Jobs that failed or timed out in the window.
    pub failed: u64,
    /// Attempts that failed and were retried in the window.
    pub retried: u64,
    /// Jobs ended per minute over the window.
    pub per_minute: f64,
    /// Acceptance to end of the jobs that succeeded in the window, in milliseconds.
    pub latency_ms: Option<crate::core::recent::Percentiles>,
    /// Its load every 5 s over the last 10 minutes, oldest first.
    pub samples: Vec<crate::core::recent::Sample>,
}

impl CapabilityView {
    /// The view of `c`.
    pub(crate) fn of(c: crate::core::CapabilityStats) -> CapabilityView {
        let w = c.window;
        CapabilityView {
            name: c.name,
            agents: c.agents,
            queued: c.queued,
            slots: c.slots,
            in_flight: c.in_flight,
            window_s: crate::core::recent::WINDOW_S,
            succeeded: w.succeeded,
            failed: w.failed,
            retried: w.retried,
            per_minute: ((w.succeeded + w.failed) as f64 * 60.0
                / crate::core::recent::WINDOW_S as f64
                * 10.0)
                .round()
                / 10.0,
            latency_ms: w.latency_ms,
            samples: w.samples,
        }
    }
}

/// `GET /v1/capabilities`'s answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct CapabilityList {
    pub capabilities: Vec<CapabilityView>,
}

/// A blob stored (`PUT /v1/blobs`, `PUT /v1/uploads/{job}`).
#[derive(Debug, Serialize, ToSchema)]
pub struct BlobStored {
    /// Its SHA-256, hex: the `input_ref` of a job that reads it.
    pub sha256: String,
    /// Its length, bytes.
    pub size: u64,
}

/// The API's description.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Spine dispatcher HTTP API",
        description = "Submit jobs to a Spine agent bus, follow them and fetch their outputs; list agents and capabilities. The guide is docs/dispatcher.md; clients for Python and JavaScript are in clients/.",
        license(name = "MIT OR Apache-2.0"),
    ),
    paths(
        super::routes::submit,
        super::routes::submit_batch,
        super::routes::list_jobs,
        super::routes::get_job,
        super::routes::cancel_job,
        super::routes::events,
        super::console::jobs_events,
        super::console::tree,
        super::console::retry,
        super::data::get_output,
        super::data::put_blob,
        super::routes::agents,
        super::drain::drain,
        super::drain::undrain,
        super::routes::capabilities,
        super::console::fleet,
        super::console::fleet_events,
        super::console::whoami,
        super::events::post_event,
        super::events::post_webhook,
        super::events::rules,
        super::events::put_rule,
        super::events::delete_rule,
        super::events::stream,
        super::events::canaries,
        super::routes::metrics,
        super::routes::healthz,
        super::routes::openapi_json,
    ),
    components(schemas(
        JobView, JobStateName, MapReduceView, ResultView, FailureView, Submitted, ErrorBody,
        BatchRequest, BatchItem, BatchAnswer, SubmitAnswer, JobList, AgentView, AgentList, CapabilityView,
        CapabilityList, BlobStored, SubmitRequest, Fragment, super::drain::StateBody,
        crate::core::InputView, crate::core::StepView, crate::core::recent::Sample,
        crate::core::recent::Percentiles, crate::core::tree::TreeView, crate::core::tree::LevelView,
        crate::core::tree::StepBox, crate::core::tree::CopyView, crate::registry::FleetAgent,
        super::console::Fleet, super::console::FleetCapability, super::console::Retried,
        super::console::WhoAmI, super::events::StructuredEvent, super::events::EventAnswer,
        super::events::FiredView, super::events::BatchEventAnswer, super::events::BatchEventItem,
        super::events::RuleView, super::events::RuleList, super::events::ScheduleView, super::events::CanaryList,
    )),
    modifiers(&Tokens),
    security(("token" = [])),
    tags(
        (name = "jobs", description = "Submit, follow, cancel"),
        (name = "data", description = "Large inputs and outputs"),
        (name = "fleet", description = "Agents and capabilities"),
        (name = "events", description = "Events in, and the rules that make jobs of them (docs/events.md)"),
        (name = "operations", description = "Health, metrics, this document"),
    ),
)]
pub struct ApiDoc;

/// The bearer token every endpoint but `/healthz` and this document takes (none on loopback
/// when the dispatcher has no tokens configured).
struct Tokens;

impl Modify for Tokens {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "A token from the dispatcher's [[http_token]] table (docs/security.md).",
                    ))
                    .build(),
            ),
        );
    }
}

/// The document, as served and committed: pretty JSON with a final newline.
pub fn document() -> String {
    let mut doc = ApiDoc::openapi();
    // The version is the workspace's: without this the document would change with every
    // release even when the API does not.
    doc.info.version = "1".to_owned();
    let mut s = doc
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\": \"the API description did not render: {e}\"}}"));
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `docs/openapi.json` is what this code generates. After changing the API, regenerate
    /// it with `SPINE_BLESS=1 cargo test -p spine-dispatcher openapi` and commit it.
    #[test]
    fn openapi_document_is_committed() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json");
        let now = document();
        if std::env::var_os("SPINE_BLESS").is_some() {
            std::fs::write(path, &now).expect("write docs/openapi.json");
            return;
        }
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            committed == now,
            "docs/openapi.json differs from the API this code serves: regenerate it with \
             `SPINE_BLESS=1 cargo test -p spine-dispatcher openapi` and commit it"
        );
    }

    /// The schema's job states are exactly the protocol's.
    #[test]
    fn job_states_in_the_schema_are_the_protocols() {
        let doc: Value = serde_json::from_str(&document()).expect("JSON");
        let listed: Vec<String> = doc["components"]["schemas"]["JobState"]["enum"]
            .as_array()
            .expect("JobState is an enum")
            .iter()
            .map(|v| v.as_str().unwrap_or_default().to_owned())
            .collect();
        let ours: Vec<String> = JobState::ALL
            .iter()
            .map(|s| serde_json::to_value(s).expect("a state serialises"))
            .map(|v| v.as_str().unwrap_or_default().to_owned())
            .collect();
        assert_eq!(listed, ours);
    }

    /// Every JSON answer the handlers build is described: the document names each schema the
    /// clients rely on, with the fields they read.
    #[test]
    fn the_document_describes_the_job_and_its_errors() {
        let doc: Value = serde_json::from_str(&document()).expect("JSON");
        assert_eq!(doc["openapi"], "3.1.0");
        let job = &doc["components"]["schemas"]["Job"]["properties"];
        for f in [
            "id",
            "capability",
            "state",
            "attempts",
            "agent",
            "result",
            "error",
        ] {
            assert!(job.get(f).is_some(), "Job lacks {f}: {job}");
        }
        let err = &doc["components"]["schemas"]["ErrorBody"]["properties"];
        for f in ["error", "message", "status", "field"] {
            assert!(err.get(f).is_some(), "ErrorBody lacks {f}");
        }
        for p in [
            "/v1/jobs",
            "/v1/jobs:batch",
            "/v1/jobs/{id}",
            "/v1/jobs/{id}/events",
            "/v1/jobs/{id}/output",
            "/v1/agents",
            "/v1/capabilities",
            "/v1/openapi.json",
        ] {
            assert!(doc["paths"].get(p).is_some(), "no path {p}");
        }
    }
}
