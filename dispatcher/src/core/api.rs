//! The core's API types, shared by every front end: what the core is asked ([`ApiRequest`]
//! for changes, answered after the commit; [`Query`] for reads, answered at once) and what it
//! says about jobs ([`JobEvent`], for event streams).
//!
//! The HTTP layer sends a [`Command`] (one of these with a reply sender) to the driver
//! ([`crate::driver`]), which calls the core and keeps the reply sender of a change until the
//! core's [`Ready`] names its answer (a change is answered only once it is stored).
//!
//! [`Ready`]: super::Ready

use serde::Serialize;
use spine_protocol::{AgentInfo, AttrName, CapabilityName, Filter, JobId, JobState, SpineError};
use tokio::sync::oneshot;

use crate::jobs::{JobFilter, JobRecord, JobSpec};
use crate::policy::Capabilities;

/// A request that changes jobs: answered after the changes it made are stored.
#[derive(Debug, Clone)]
pub(crate) enum ApiRequest {
    /// Accept a job.
    Submit {
        spec: Box<JobSpec>,
        /// Accept it even if no agent ever offered its capabilities.
        wait_for_agent: bool,
        /// The capabilities the caller may run (an `unknown-capability` answer lists only
        /// those).
        visible: Capabilities,
        /// The caller waits for the job's end (`?wait=`), so the answer may wait for a
        /// commit something else asks for ([`super::Pending::Lazy`]).
        wait: bool,
    },
    /// Cancel a job (and its children).
    Cancel { id: JobId },
    /// An event for the rules (docs/events.md): answered with the jobs it made, once stored.
    Event { event: Box<crate::triggers::Event> },
    /// An operator's drain (`drain: true`, with its reason) or undrain of the agent named by
    /// `agent` (a full JID, or a bare JID with one agent on it): answered when the agent
    /// answered, or after [`super::operator::STATE_TIMEOUT`].
    SetAgentState {
        agent: jid::Jid,
        drain: bool,
        reason: Option<String>,
    },
    /// Make or replace an event rule (`PUT /v1/rules/{name}`): answered once it is stored.
    PutRule {
        rule: Box<crate::triggers::RuleConfig>,
    },
    /// Delete an event rule made over the API (`DELETE /v1/rules/{name}`).
    DeleteRule { name: String },
    /// The HTTP side stored an agent's upload to the slot of `job`'s `attempt` (its signature
    /// named `agent`, a bare JID; its size and hash matched the slot's).
    SlotFilled {
        job: JobId,
        attempt: u64,
        agent: String,
        blob: crate::blobs::Stored,
    },
}

/// The answer to an [`ApiRequest`].
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ApiReply {
    /// The job accepted (or the one its idempotency key created before), with its state.
    Submitted(Result<(JobId, JobState), SpineError>),
    /// A submission whose caller waits for the job's end, answered with it: the job ended
    /// before its acceptance was stored (they share the commit). With the job's final view,
    /// the one its event streams get: rendered once for all of them.
    Ended {
        id: JobId,
        state: JobState,
        view: super::Rendered,
    },
    /// The cancelled job's final state.
    Cancelled(Result<JobState, SpineError>),
    /// The jobs an event made (or had made, sent before).
    Event(Result<Vec<super::events::Fired>, SpineError>),
    SlotFilled(Result<(), SpineError>),
    /// A rule made (`true`: new; `false`: replaced), or why not.
    RulePut(Result<bool, RuleChangeError>),
    /// A rule deleted, or why not.
    RuleDeleted(Result<(), RuleChangeError>),
    /// The agent after its drain or undrain, as the registry sees it.
    AgentState(Result<AgentInfo, StateError>),
}

/// Why a rule was not made or deleted (each maps to its own HTTP status).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum RuleChangeError {
    /// The rule is invalid: the message names the field.
    Invalid(String),
    /// The rule is in the configuration file, which the API does not change.
    Configured(String),
    /// No rule of that name was made over the API.
    Unknown(String),
    /// A standby changes no rule.
    Standby,
}

/// Why a drain or undrain did not happen (each maps to its own HTTP status).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum StateError {
    /// No agent registered under the JID given.
    UnknownAgent(String),
    /// A bare JID with several agents on it: these full JIDs.
    Ambiguous { given: String, agents: Vec<String> },
    /// The agent did not answer in time.
    NoAnswer { agent: String, waited_ms: u64 },
    /// The agent does not implement drain (an older or another implementation).
    NotSupported { agent: String, said: String },
    /// The agent, or the server for it, refused: the Spine condition (or XMPP condition),
    /// and the text.
    Refused {
        agent: String,
        condition: String,
        text: String,
    },
}

/// Names an [`ApiRequest`] so its answer in [`super::Ready::replies`] finds its asker.
pub(crate) type ApiToken = u64;

/// A read: answered at once from the core's state, changing nothing.
#[derive(Debug, Clone)]
pub(crate) enum Query {
    Get {
        id: JobId,
    },
    Agents {
        capability: CapabilityName,
        filter: Option<Filter>,
        sort: Option<AttrName>,
        limit: Option<usize>,
    },
    Capabilities,
    /// A page of jobs ([`crate::jobs::JobTable::find`]).
    List {
        filter: JobFilter,
        /// After the job with this (accepted, order).
        before: Option<(u64, u64)>,
        limit: usize,
    },
    Metrics,
    /// The fleet (every agent of the view), or what changed in it since a version.
    Fleet {
        capability: Option<CapabilityName>,
        filter: Option<Filter>,
        /// The capabilities the reader may see.
        visible: Capabilities,
        since: Option<u64>,
    },
    /// A job's tree of steps.
    Tree {
        id: JobId,
    },
    /// The event rules with their counters.
    Rules,
    /// Each agent's canaries.
    Canaries,
}

/// A capability as the console's capabilities page shows it.
#[derive(Debug)]
pub(crate) struct CapabilityStats {
    pub name: CapabilityName,
    pub agents: u64,
    pub queued: u64,
    pub slots: u64,
    pub in_flight: u64,
    pub window: super::recent::Window,
}

/// The fleet, or what changed in it, with every visible capability's load.
#[derive(Debug)]
pub(crate) struct FleetAnswer {
    pub changes: crate::registry::FleetChanges,
    /// (name, agents, slots, in-flight, queued).
    pub capabilities: Vec<(CapabilityName, u64, u64, u64, u64)>,
    /// When (ms since the UNIX epoch).
    pub at_ms: u64,
}

/// The rules with their counters, and the schedules with where they stand.
#[derive(Debug)]
pub(crate) struct RulesAnswer {
    /// Each rule, its counters, and whether it was made over the API (not configured).
    pub rules: Vec<(crate::triggers::RuleConfig, super::events::RuleCounts, bool)>,
    pub schedules: Vec<super::ticks::Ticking>,
    /// Whether this dispatcher leads (a standby fires no tick).
    pub leads: bool,
}

/// The answer to a [`Query`].
#[derive(Debug)]
pub(crate) enum Answer {
    Job(Option<Box<JobRecord>>),
    Agents(Vec<AgentInfo>),
    /// Each capability offered or queued, with its agents, queue and last minutes.
    Capabilities(Vec<CapabilityStats>),
    /// A page of jobs and where the next starts.
    Jobs {
        jobs: Vec<JobRecord>,
        next: Option<(u64, u64)>,
    },
    Metrics(String),
    Fleet(Box<FleetAnswer>),
    Tree(Option<super::tree::TreeView>),
    Rules(Box<RulesAnswer>),
    Canaries(Vec<super::canary::CanaryView>),
}

/// A request from an HTTP handler to the driver, with where its answer goes.
#[derive(Debug)]
pub(crate) enum Command {
    /// A change: answered once the changes it made are stored.
    Change {
        request: ApiRequest,
        reply: oneshot::Sender<ApiReply>,
    },
    /// A read: answered at once.
    Read {
        query: Query,
        reply: oneshot::Sender<Answer>,
    },
}

/// What happened to a job, in an event stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// The agent reported progress.
    Progress,
    /// The agent streamed a partial result.
    Partial,
    /// The job ended (the data is the whole job).
    Final,
    /// A rule made the job of an event (the data names the rule and the event); only on
    /// the CloudEvents stream (`GET /v1/events/stream`).
    Fired,
}

impl EventKind {
    /// The SSE event name.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Progress => "progress",
            EventKind::Partial => "partial",
            EventKind::Final => "final",
            EventKind::Fired => "fired",
        }
    }
}

/// Something that happened to a job, for event streams.
#[derive(Debug, Clone, Serialize)]
pub struct JobEvent {
    /// The job.
    pub job: JobId,
    /// Who submitted it (event streams of many jobs show each reader only its own).
    #[serde(skip)]
    pub submitter: String,
    /// What happened.
    pub kind: EventKind,
    /// Event data (JSON).
    pub data: super::Rendered,
}
