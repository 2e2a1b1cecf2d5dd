//! Payloads between a submitter (any authorised XMPP client) and a dispatcher: `<submit/>`
//! answered by `<accepted/>`, `<status/>` answered by `<job-status/>` (also pushed in a message
//! in watch mode), and `<discover/>` answered by the ranked `<agents/>`.

use std::fmt;
use std::str::FromStr;

use jid::Jid;
use minidom::Element;
use serde::{Deserialize, Serialize};
use xmpp_parsers::iq::{IqGetPayload, IqResultPayload, IqSetPayload};
use xmpp_parsers::message::MessagePayload;

use crate::condition::Condition;
use crate::data::{attr_elements, read_attr, Args, Attributes, Data};
use crate::error::ParseError;
use crate::filter::Filter;
use crate::job::{args_input_children, job_ref_payload, parse_args_input, JobResult};
use crate::names::{AttrName, CapabilityName, JobId};
use crate::presence::AgentState;
use crate::xml::{set_once, unknown_child, Builder, NonNegative, Reader};

/// Longest idempotency key, in bytes.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 256;

/// The longest `wait-ms` a `<submit>` may ask for (protocol 1.3, PROTOCOL.md §11.2.1): five
/// minutes. A submitter's IQ timeout must be longer than the wait it asks for, and a wait the
/// length of a long job belongs to watch mode, not to an unanswered request.
pub const MAX_SUBMIT_WAIT_MS: u64 = 300_000;

/// How the dispatcher places a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// The capable agent with the lowest effective load (in-flight ÷ slots).
    #[default]
    LeastLoaded,
    /// A capable agent with a free slot, chosen at random.
    Random,
    /// Capable agents in turn.
    RoundRobin,
    /// The less loaded of two capable agents chosen at random.
    PowerOfTwo,
    /// The same agent for the same `affinity-key` (rendezvous hashing).
    Affinity,
    /// Every capable agent; the results are gathered.
    All,
}

impl Strategy {
    /// Every strategy.
    pub const ALL: [Strategy; 6] = [
        Strategy::LeastLoaded,
        Strategy::Random,
        Strategy::RoundRobin,
        Strategy::PowerOfTwo,
        Strategy::Affinity,
        Strategy::All,
    ];

    /// The wire form.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::LeastLoaded => "least-loaded",
            Strategy::Random => "random",
            Strategy::RoundRobin => "round-robin",
            Strategy::PowerOfTwo => "power-of-two",
            Strategy::Affinity => "affinity",
            Strategy::All => "all",
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Strategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Strategy::ALL
            .into_iter()
            .find(|x| x.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown strategy '{s}'; expected one of least-loaded, random, round-robin, power-of-two, affinity, all"
                )
            })
    }
}
crate::xml::attr_via_str!(Strategy);

/// How many capable agents a job of the `all` strategy goes to: a count or a percentage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Limit {
    /// At most this many agents.
    Count(u64),
    /// This percentage of the capable agents (rounded up, at least one).
    Percent(u8),
}

impl Limit {
    /// How many of `capable` agents to use.
    pub fn of(self, capable: usize) -> usize {
        match self {
            Limit::Count(n) => capable.min(n as usize),
            Limit::Percent(p) => (capable * p as usize).div_ceil(100).max(1).min(capable),
        }
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Limit::Count(n) => write!(f, "{n}"),
            Limit::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl FromStr for Limit {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let err =
            || format!("'{s}': expected a number of agents (\"5\") or a percentage (\"50%\")");
        match s.strip_suffix('%') {
            Some(p) => match crate::xml::parse_u64(p) {
                Ok(p @ 1..=100) => Ok(Limit::Percent(p as u8)),
                _ => Err(err()),
            },
            None => match crate::xml::parse_u64(s) {
                Ok(n @ 1..) => Ok(Limit::Count(n)),
                _ => Err(err()),
            },
        }
    }
}

impl TryFrom<String> for Limit {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<Limit> for String {
    fn from(l: Limit) -> String {
        l.to_string()
    }
}
crate::xml::attr_via_str!(Limit);

/// Default fan-in of a map/reduce job: map outputs (or reduce outputs) per reduce step.
pub const DEFAULT_FAN_IN: u64 = 16;
/// Largest fan-in accepted.
pub const MAX_FAN_IN: u64 = 4096;

/// A map/reduce job (PROTOCOL.md §11.7): the submit's `capability` is the map step, run once per
/// input fragment; `reduce` combines map outputs, `fan_in` at a time, in a tree of steps until
/// one output is left.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapReduce {
    /// The reduce capability (it must accept its own outputs as inputs).
    pub reduce: CapabilityName,
    /// A capability that turns the submitted input into the fragment list; without it the
    /// input is the fragment list itself.
    pub split: Option<CapabilityName>,
    /// How many outputs one reduce step combines (2 to [`MAX_FAN_IN`]).
    pub fan_in: u64,
}

impl MapReduce {
    /// Reduce with `reduce`, input given as a fragment list, the default fan-in.
    pub fn new(reduce: CapabilityName) -> Self {
        MapReduce {
            reduce,
            split: None,
            fan_in: DEFAULT_FAN_IN,
        }
    }

    /// Checks the fan-in range; the reason names the rule broken.
    pub fn check_fan_in(fan_in: u64) -> Result<(), String> {
        if (2..=MAX_FAN_IN).contains(&fan_in) {
            Ok(())
        } else {
            Err(format!("must be 2 to {MAX_FAN_IN}"))
        }
    }
}

/// Where a job is in its life. Final states: succeeded, failed, cancelled, timed-out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobState {
    /// Stored, not yet looked at by the scheduler.
    Accepted,
    /// Waiting for a capable agent with a free slot.
    Queued,
    /// Sent to an agent.
    Dispatched,
    /// The agent reported that it started.
    Running,
    /// Finished with a result.
    Succeeded,
    /// Finished with an error, after the allowed attempts.
    Failed,
    /// Cancelled by a submitter.
    Cancelled,
    /// The deadline passed.
    TimedOut,
}

impl JobState {
    /// Every state, in lifecycle order.
    pub const ALL: [JobState; 8] = [
        JobState::Accepted,
        JobState::Queued,
        JobState::Dispatched,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
        JobState::TimedOut,
    ];

    /// The wire form.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Accepted => "accepted",
            JobState::Queued => "queued",
            JobState::Dispatched => "dispatched",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
            JobState::TimedOut => "timed-out",
        }
    }

    /// Whether the job has its one outcome.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled | JobState::TimedOut
        )
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        JobState::ALL
            .into_iter()
            .find(|x| x.as_str() == s)
            .ok_or_else(|| format!("unknown job state '{s}'"))
    }
}
crate::xml::attr_via_str!(JobState);

/// `<submit/>`: a new job, from any authorised XMPP client to a dispatcher (IQ set).
#[derive(Debug, Clone, PartialEq)]
pub struct Submit {
    /// What to run.
    pub capability: CapabilityName,
    /// How to place it.
    pub strategy: Strategy,
    /// Which agents qualify.
    pub filter: Option<Filter>,
    /// Prefer agents with the lowest value of this numeric attribute, then the least loaded.
    pub sort: Option<AttrName>,
    /// Key for the `affinity` strategy (required with it, refused without it).
    pub affinity_key: Option<String>,
    /// Deadline from acceptance, in milliseconds (from the end of `delay_ms` when given).
    pub deadline_ms: Option<u64>,
    /// A delayed job: not placed before this long after acceptance, in milliseconds.
    pub delay_ms: Option<u64>,
    /// Higher runs first when jobs queue.
    pub priority: i64,
    /// Attempts before the job fails.
    pub max_attempts: Option<u64>,
    /// The same key from the same submitter yields the same job.
    pub idempotency_key: Option<String>,
    /// Push progress, partial results and the final status to the submitter.
    pub watch: bool,
    /// Protocol 1.3: answer the `<submit>` when the job ends, with its final `<job-status>`,
    /// or after this many milliseconds with `<accepted>` (PROTOCOL.md §11.2.1). At most
    /// [`MAX_SUBMIT_WAIT_MS`].
    pub wait_ms: Option<u64>,
    /// Accept the job even when no agent has ever offered its capabilities to this
    /// dispatcher (which otherwise refuses it at once with `unknown-capability`): it then
    /// waits for one like a job whose agents are momentarily absent (PROTOCOL.md §11.1).
    pub wait_for_agent: bool,
    /// Protocol 1.1: the submitter takes an output over the inline limit by reference — a
    /// signed URL of the dispatcher's HTTP API in the `<job-status>` — instead of in chunks
    /// (PROTOCOL.md §11.3, §13.4).
    pub refs: bool,
    /// With the `all` strategy: how many capable agents to use (default: every one).
    pub limit: Option<Limit>,
    /// With the `all` strategy: how many agents run it at once (default: all at once).
    pub batch: Option<u64>,
    /// A map/reduce job: `capability` is the map step.
    pub mapreduce: Option<MapReduce>,
    /// Arguments.
    pub args: Args,
    /// Input data.
    pub input: Option<Data>,
}

impl Submit {
    /// A least-loaded job with no arguments.
    pub fn new(capability: CapabilityName) -> Self {
        Submit {
            capability,
            strategy: Strategy::LeastLoaded,
            filter: None,
            sort: None,
            affinity_key: None,
            deadline_ms: None,
            delay_ms: None,
            priority: 0,
            max_attempts: None,
            idempotency_key: None,
            watch: false,
            wait_ms: None,
            wait_for_agent: false,
            refs: false,
            limit: None,
            batch: None,
            mapreduce: None,
            args: Args::default(),
            input: None,
        }
    }
}

impl TryFrom<Element> for Submit {
    type Error = ParseError;
    fn try_from(el: Element) -> Result<Self, ParseError> {
        let mut r = Reader::new(&el, "submit")?;
        let capability = r.req("capability")?;
        let strategy = r.opt("strategy")?.unwrap_or_default();
        let filter = r.opt("filter")?;
        let sort = r.opt("sort")?;
        let affinity_key: Option<String> = r.opt("affinity-key")?;
        match (strategy, &affinity_key) {
            (Strategy::Affinity, None) => {
                return Err(ParseError::MissingAttribute {
                    element: "submit",
                    attribute: "affinity-key",
                })
            }
            (s, Some(_)) if s != Strategy::Affinity => {
                return Err(r.invalid("affinity-key", "only the affinity strategy takes a key"))
            }
            _ => {}
        }
        let deadline_ms = r.opt("deadline-ms")?;
        let delay_ms = r.opt("delay-ms")?;
        let priority = r.opt("priority")?.unwrap_or(0);
        let max_attempts = r.opt::<u64>("max-attempts")?;
        if max_attempts == Some(0) {
            return Err(r.invalid("max-attempts", "must be at least 1"));
        }
        let idempotency_key: Option<String> = r.opt("idempotency-key")?;
        if idempotency_key
            .as_ref()
            .is_some_and(|k| k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY_LEN)
        {
            return Err(r.invalid(
                "idempotency-key",
                format!("must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} bytes"),
            ));
        }
        let watch = r.opt("watch")?.unwrap_or(false);
        let wait_ms: Option<u64> = r.opt("wait-ms")?;
        if wait_ms.is_some_and(|w| w > MAX_SUBMIT_WAIT_MS) {
            return Err(r.invalid(
                "wait-ms",
                format!("must be at most {MAX_SUBMIT_WAIT_MS} (five minutes); watch a longer job"),
            ));
        }
        let wait_for_agent = r.opt("wait-for-agent")?.unwrap_or(false);
        let refs = r.opt("refs")?.unwrap_or(false);
        let limit: Option<Limit> = r.opt("limit")?;
        let batch: Option<u64> = r.opt("batch")?;
        if batch == Some(0) {
            return Err(r.invalid("batch", "must be at least 1"));
        }
        if strategy != Strategy::All && limit.is_some() {
            return Err(r.invalid("limit", "only the all strategy takes a limit"));
        }
        if strategy != Strategy::All && batch.is_some() {
            return Err(r.invalid("batch", "only the all strategy takes a batch size"));
        }
        let reduce: Option<CapabilityName> = r.opt("reduce")?;
        let split: Option<CapabilityName> = r.opt("split")?;
        let fan_in: Option<u64> = r.opt("fan-in")?;
        let mapreduce = match reduce {
            Some(reduce) => {
                if strategy == Strategy::All {
                    return Err(r.invalid("reduce", "the all strategy cannot be a map/reduce"));
                }
                if let Some(f) = fan_in {
                    MapReduce::check_fan_in(f).map_err(|e| r.invalid("fan-in", e))?;
                }
                Some(MapReduce {
                    reduce,
                    split,
                    fan_in: fan_in.unwrap_or(DEFAULT_FAN_IN),
                })
            }
            None if split.is_some() => {
                return Err(r.invalid("split", "only a map/reduce job (with reduce) takes split"))
            }
            None if fan_in.is_some() => {
                return Err(r.invalid("fan-in", "only a map/reduce job (with reduce) takes fan-in"))
            }
            None => None,
        };
        let (args, input) = parse_args_input(&r)?;
        if let Some(Data::Ref(_)) = &input {
            // References come from a dispatcher's blob store; a submitter sends its bytes
            // inline or in chunks (or uses the HTTP API's input_ref).
            return Err(ParseError::Invalid {
                element: "input",
                reason: "a submit's input is inline or a blob, not a reference with <hash/>".into(),
            });
        }
        r.finish()?;
        Ok(Submit {
            capability,
            strategy,
            filter,
            sort,
            affinity_key,
            deadline_ms,
            delay_ms,
            priority,
            max_attempts,
            idempotency_key,
            watch,
            wait_ms,
            wait_for_agent,
            refs,
            limit,
            batch,
            mapreduce,
            args,
            input,
        })
    }
}

impl From<Submit> for Element {
    fn from(s: Submit) -> Element {
        Builder::new("submit")
            .attr("capability", s.capability.as_str())
            .opt(
                "strategy",
                (s.strategy != Strategy::LeastLoaded).then_some(s.strategy),
            )
            .opt("filter", s.filter.as_ref().map(|f| f.to_string()))
            .opt("sort", s.sort.as_ref().map(|x| x.as_str()))
            .opt("affinity-key", s.affinity_key.as_deref())
            .opt("deadline-ms", s.deadline_ms)
            .opt("delay-ms", s.delay_ms)
            .opt("priority", (s.priority != 0).then_some(s.priority))
            .opt("max-attempts", s.max_attempts)
            .opt("idempotency-key", s.idempotency_key.as_deref())
            .opt("watch", s.watch.then_some(true))
            .opt("wait-ms", s.wait_ms)
            .opt("wait-for-agent", s.wait_for_agent.then_some(true))
            .opt("refs", s.refs.then_some(true))
            .opt("limit", s.limit)
            .opt("batch", s.batch)
            .opt("reduce", s.mapreduce.as_ref().map(|m| m.reduce.as_str()))
            .opt(
                "split",
                s.mapreduce
                    .as_ref()
                    .and_then(|m| m.split.as_ref().map(|x| x.as_str())),
            )
            .opt(
                "fan-in",
                s.mapreduce
                    .as_ref()
                    .map(|m| m.fan_in)
                    .filter(|f| *f != DEFAULT_FAN_IN),
            )
            .children(args_input_children(&s.args, &s.input))
            .build()
    }
}

impl IqSetPayload for Submit {}

/// `<accepted/>`: the dispatcher stored the job (reply to `<submit/>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// The job's id.
    pub job: JobId,
    /// Its state when the reply was sent.
    pub state: JobState,
}

impl TryFrom<Element> for Accepted {
    type Error = ParseError;
    fn try_from(el: Element) -> Result<Self, ParseError> {
        let mut r = Reader::new(&el, "accepted")?;
        let job = r.req("job")?;
        let state = r.req("state")?;
        r.no_text()?;
        r.no_children()?;
        r.finish()?;
        Ok(Accepted { job, state })
    }
}

impl From<Accepted> for Element {
    fn from(a: Accepted) -> Element {
        Builder::new("accepted")
            .attr("job", a.job.as_str())
            .attr("state", a.state)
            .build()
    }
}

impl IqResultPayload for Accepted {}

job_ref_payload!(
    /// `<status/>`: ask a dispatcher where a job is (IQ get), answered by `<job-status/>`.
    Status,
    "status"
);
impl IqGetPayload for Status {}

/// `<failure/>` inside `<job-status/>`: why a job ended without a result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The Spine condition.
    pub condition: Condition,
    /// A message for people.
    pub message: Option<String>,
    /// For `bad-arguments`: the argument at fault, as the agent's error named it (`field`),
    /// so that a submitter can tell which of its arguments to fix.
    pub field: Option<String>,
}

/// How a finished job ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// It succeeded with this result.
    Result(JobResult),
    /// It failed, was cancelled or timed out.
    Failure(Failure),
    /// It succeeded, but this status does not carry its output: too large to travel inline,
    /// and it could not be sent in chunks first (PROTOCOL.md §11.3). The result without its
    /// output (a `Some` output is left out when serialised), and what was left out.
    Truncated(JobResult, TruncatedOutput),
}

/// An output a `<job-status>` left out: `<output truncated='true' size='…' sha256='…'/>` in
/// its `<result>` (PROTOCOL.md §11.3). A dispatcher sends it instead of the bytes only when the
/// submitter did not take them in chunks (it refused them, or did not acknowledge them in
/// time); the output is still the job's, whole, at the dispatcher's HTTP API
/// (`GET /v1/jobs/{id}`). Never silence: a receiver knows how much it did not get.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TruncatedOutput {
    /// The whole output's length in bytes.
    pub size: u64,
    /// Its SHA-256, to check a copy fetched another way.
    pub sha256: [u8; 32],
    /// Its MIME type, if known.
    pub mime: Option<String>,
}

impl TruncatedOutput {
    fn parse(el: &Element) -> Result<Self, ParseError> {
        let mut r = Reader::unchecked(el, "output");
        if !r.req::<bool>("truncated")? {
            return Err(r.invalid("truncated", "an output left out says truncated='true'"));
        }
        let size = r.req("size")?;
        let sha256 = r.req::<crate::data::Sha256Hex>("sha256")?.0;
        let mime = r.opt::<crate::data::Mime>("type")?.map(|m| m.0);
        r.no_text()?;
        r.no_children()?;
        r.finish()?;
        Ok(TruncatedOutput { size, sha256, mime })
    }

    fn to_element(&self) -> Element {
        Builder::new("output")
            .opt("type", self.mime.as_deref())
            .attr("size", self.size)
            .attr("sha256", crate::data::hex(&self.sha256))
            .attr("truncated", true)
            .build()
    }
}

/// The outcome a `<result>` inside a `<job-status>` stands for: a result, or one whose
/// `<output>` says it was left out.
fn status_result(c: &Element) -> Result<Outcome, ParseError> {
    let truncated = c
        .children()
        .find(|o| o.is("output", crate::NS) && o.attr("truncated").is_some());
    // An output by reference with its sources (protocol 1.1, to a submitter that asked for
    // references): a `<result>` from an agent never has sources, so it is read apart.
    let by_url = c.children().find(|o| {
        o.is("output", crate::NS)
            && o.children().any(|s| s.is("sources", crate::NS))
            && o.children().any(|h| h.is("hash", crate::data::NS_HASHES))
    });
    if let Some(o) = by_url {
        let output = Data::parse(o, "output")?;
        let mut rest = c.clone();
        rest.remove_child("output", crate::NS);
        let mut result = JobResult::try_from(rest)?;
        if result.output.is_some() {
            return Err(ParseError::DuplicateChild {
                element: "result",
                child: "output",
            });
        }
        result.output = Some(output);
        return Ok(Outcome::Result(result));
    }
    let Some(t) = truncated else {
        return Ok(Outcome::Result(JobResult::try_from(c.clone())?));
    };
    let left_out = TruncatedOutput::parse(t)?;
    let mut rest = c.clone();
    rest.remove_child("output", crate::NS);
    let result = JobResult::try_from(rest)?;
    if result.output.is_some() {
        return Err(ParseError::DuplicateChild {
            element: "result",
            child: "output",
        });
    }
    Ok(Outcome::Truncated(result, left_out))
}

/// `<job-status/>`: a job's state, attempts and, once final, its outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct JobStatus {
    /// The job.
    pub job: JobId,
    /// Its capability.
    pub capability: CapabilityName,
    /// Its state.
    pub state: JobState,
    /// Attempts made so far.
    pub attempts: u64,
    /// The agent of the last attempt.
    pub agent: Option<Jid>,
    /// Last progress reported.
    pub percent: Option<u8>,
    /// The outcome, when the state is final.
    pub outcome: Option<Outcome>,
}

impl TryFrom<Element> for JobStatus {
    type Error = ParseError;
    fn try_from(el: Element) -> Result<Self, ParseError> {
        let mut r = Reader::new(&el, "job-status")?;
        let job = r.req("job")?;
        let capability = r.req("capability")?;
        let state: JobState = r.req("state")?;
        let attempts = r.req("attempts")?;
        let agent = r.opt("agent")?;
        let percent = match r.opt::<u64>("percent")? {
            Some(p) if p > 100 => return Err(r.invalid("percent", "must be 0 to 100")),
            p => p.map(|p| p as u8),
        };
        r.no_text()?;
        let mut outcome = None;
        for c in r.children() {
            let c = c?;
            let o = match c.name() {
                "result" => status_result(c)?,
                "failure" => {
                    let mut fr = Reader::unchecked(c, "failure");
                    let condition = fr.req("condition")?;
                    let field = fr.opt::<String>("field")?;
                    fr.no_children()?;
                    fr.finish()?;
                    let text = c.text();
                    Outcome::Failure(Failure {
                        condition,
                        message: (!text.is_empty()).then_some(text),
                        field,
                    })
                }
                _ => return Err(unknown_child("job-status", c)),
            };
            set_once(&mut outcome, o, "job-status", "result or failure")?;
        }
        let fits = match (&outcome, state) {
            (None, s) => !s.is_final() || s == JobState::Succeeded,
            (Some(Outcome::Result(_) | Outcome::Truncated(..)), JobState::Succeeded) => true,
            (Some(Outcome::Failure(_)), s) => s.is_final() && s != JobState::Succeeded,
            _ => false,
        };
        if !fits {
            return Err(ParseError::Invalid {
                element: "job-status",
                reason: format!(
                    "state '{state}' does not go with {}",
                    match outcome {
                        None => "no outcome",
                        Some(Outcome::Result(_) | Outcome::Truncated(..)) => "a <result>",
                        Some(Outcome::Failure(_)) => "a <failure>",
                    }
                ),
            });
        }
        r.finish()?;
        Ok(JobStatus {
            job,
            capability,
            state,
            attempts,
            agent,
            percent,
            outcome,
        })
    }
}

impl From<JobStatus> for Element {
    fn from(s: JobStatus) -> Element {
        let mut b = Builder::new("job-status")
            .attr("job", s.job.as_str())
            .attr("capability", s.capability.as_str())
            .attr("state", s.state)
            .attr("attempts", s.attempts)
            .opt("agent", s.agent)
            .opt("percent", s.percent.map(u64::from));
        match s.outcome {
            Some(Outcome::Result(r)) => b = b.child(r.into()),
            Some(Outcome::Truncated(mut r, left_out)) => {
                r.output = None;
                let mut el = Element::from(r);
                el.append_child(left_out.to_element());
                b = b.child(el)
            }
            Some(Outcome::Failure(f)) => {
                b = b.child(
                    Builder::new("failure")
                        .attr("condition", f.condition)
                        .opt("field", f.field)
                        .text(f.message.unwrap_or_default())
                        .build(),
                )
            }
            None => {}
        }
        b.build()
    }
}

impl IqResultPayload for JobStatus {}
impl MessagePayload for JobStatus {}

/// `<discover/>`: ask a dispatcher for the capable agents, least loaded first (IQ get).
#[derive(Debug, Clone, PartialEq)]
pub struct Discover {
    /// The capability.
    pub capability: CapabilityName,
    /// Which agents qualify.
    pub filter: Option<Filter>,
    /// Order by this numeric attribute first (ascending), then by load.
    pub sort: Option<AttrName>,
    /// At most this many agents.
    pub limit: Option<u64>,
}

impl TryFrom<Element> for Discover {
    type Error = ParseError;
    fn try_from(el: Element) -> Result<Self, ParseError> {
        let mut r = Reader::new(&el, "discover")?;
        let d = Discover {
            capability: r.req("capability")?,
            filter: r.opt("filter")?,
            sort: r.opt("sort")?,
            limit: r.opt("limit")?,
        };
        r.no_text()?;
        r.no_children()?;
        r.finish()?;
        Ok(d)
    }
}

impl From<Discover> for Element {
    fn from(d: Discover) -> Element {
        Builder::new("discover")
            .attr("capability", d.capability.as_str())
            .opt("filter", d.filter.map(|f| f.to_string()))
            .opt("sort", d.sort.as_ref().map(|s| s.as_str()))
            .opt("limit", d.limit)
            .build()
    }
}

impl IqGetPayload for Discover {}

/// One agent in a ranked `<agents/>` answer.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentInfo {
    /// The agent's full JID.
    pub jid: Jid,
    /// Ready or draining.
    pub state: AgentState,
    /// Effective in-flight ÷ slots, as the dispatcher sees it.
    pub load: f64,
    /// Effective in-flight jobs, agent-wide.
    pub in_flight: u64,
    /// The agent's total slots.
    pub slots: u64,
    /// 1-minute OS load average.
    pub loadavg: Option<f64>,
    /// Memory in use, bytes.
    pub mem_used: Option<u64>,
    /// Total memory, bytes.
    pub mem_total: Option<u64>,
    /// The effective attributes for the capability.
    pub attrs: Attributes,
}

impl AgentInfo {
    fn parse(el: &Element) -> Result<Self, ParseError> {
        let mut r = Reader::unchecked(el, "agent");
        let jid = r.req("jid")?;
        let state = r.req("state")?;
        let load = r.req::<NonNegative>("load")?.0;
        let in_flight = r.req("in-flight")?;
        let slots = r.req("slots")?;
        let loadavg = r.opt::<NonNegative>("loadavg")?.map(|v| v.0);
        let mem_used = r.opt("mem-used")?;
        let mem_total = r.opt("mem-total")?;
        r.no_text()?;
        let mut attrs = Attributes::new();
        for c in r.children() {
            let c = c?;
            match c.name() {
                "attr" => read_attr(c, "agent", &mut attrs)?,
                _ => return Err(unknown_child("agent", c)),
            }
        }
        r.finish()?;
        Ok(AgentInfo {
            jid,
            state,
            load,
            in_flight,
            slots,
            loadavg,
            mem_used,
            mem_total,
            attrs,
        })
    }

    fn to_element(&self) -> Element {
        Builder::new("agent")
            .attr("jid", self.jid.clone())
            .attr("state", self.state)
            .attr("load", NonNegative(self.load))
            .attr("in-flight", self.in_flight)
            .attr("slots", self.slots)
            .opt("loadavg", self.loadavg.map(NonNegative))
            .opt("mem-used", self.mem_used)
            .opt("mem-total", self.mem_total)
            .children(attr_elements(&self.attrs))
            .build()
    }
}

/// `<agents/>`: the ranked answer to `<discover/>`, least loaded first.
#[derive(Debug, Clone, PartialEq)]
pub struct Agents {
    /// The capability asked for.
    pub capability: CapabilityName,
    /// Capable agents in rank order.
    pub agents: Vec<AgentInfo>,
}

impl TryFrom<Element> for Agents {
    type Error = ParseError;
    fn try_from(el: Element) -> Result<Self, ParseError> {
        let mut r = Reader::new(&el, "agents")?;
        let capability = r.req("capability")?;
        r.no_text()?;
        let mut agents = Vec::new();
        for c in r.children() {
            let c = c?;
            match c.name() {
                "agent" => agents.push(AgentInfo::parse(c)?),
                _ => return Err(unknown_child("agents", c)),
            }
        }
        r.finish()?;
        Ok(Agents { capability, agents })
    }
}

impl From<Agents> for Element {
    fn from(a: Agents) -> Element {
        Builder::new("agents")
            .attr("capability", a.capability.as_str())
            .children(a.agents.iter().map(AgentInfo::to_element))
            .build()
    }
}

impl IqResultPayload for Agents {}
