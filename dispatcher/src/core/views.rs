//! What the core shows of jobs: the `<job-status>` of a job for XMPP submitters (large
//! outputs first, through [`crate::deliver`]), its JSON view for HTTP and event streams,
//! progress and partial results forwarded to watchers and event streams, and the Prometheus
//! text of `/metrics`.
//!
//! Called by [`super::outcomes`] (a job ended), [`super::submit`] (`<status/>`),
//! [`super::inbound`] (progress reports) and [`super::Core::query`] (metrics). Every count
//! here comes from counters and indexes kept with the job table, never from a scan of it.

use jid::{FullJid, Jid};
use serde::Serialize;
use spine_protocol::{
    CapabilityName, Condition, Data, Failure, JobId, JobResult, JobState, JobStatus, Outcome,
    Progress, SpineError, INLINE_LIMIT,
};
use utoipa::ToSchema;
use xmpp_parsers::message::{Message, MessageType};

use super::{Core, EventKind, Now, BUCKETS};
use crate::deliver::{Out, Request, Via};
use crate::jobs::{Body, JobRecord, Recorded};
use base64::Engine as _;
use serde_json::{json, Value};

/// A job's `<job-status>` (its output inline when it fits; see [`Core::send_status`]).
pub(crate) fn status(job: &JobRecord) -> JobStatus {
    let outcome = match &job.outcome {
        Some(Recorded::Succeeded {
            meta,
            output,
            mime,
            elapsed_ms,
        }) => Some(Outcome::Result(JobResult {
            job: job.id.clone(),
            attempt: job.attempts.max(1),
            elapsed_ms: *elapsed_ms,
            meta: meta.clone().into(),
            // Outputs over the inline limit would break stanza limits: `send_status` sends
            // them in chunks ahead of the status, which then references them.
            output: output
                .inline()
                .filter(|b| !b.is_empty() && b.len() <= INLINE_LIMIT)
                .map(|b| Data::Inline {
                    mime: mime.clone(),
                    bytes: b.to_vec(),
                }),
        })),
        Some(Recorded::Failure {
            condition,
            message,
            field,
        }) => Some(Outcome::Failure(Failure {
            condition: *condition,
            message: message.clone(),
            field: field.clone(),
        })),
        None => None,
    };
    JobStatus {
        job: job.id.clone(),
        capability: job.spec.capability.clone(),
        state: job.state,
        attempts: job.attempts,
        agent: job.agent.clone().map(Jid::from),
        percent: job.percent,
        outcome,
    }
}

// The OpenAPI document's `Job` schema is derived from this type (its doc comments are the
// descriptions), so the document cannot drift from what is served.
/// A job (`GET /v1/jobs/{id}`, the answer of a submission that waited, the data of its
/// events).
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Job)]
pub struct JobView {
    /// The job's id, as `POST /v1/jobs` answered it.
    #[schema(value_type = String, example = "j-01JD5T6W3K8Q0N6Y7M2S4B1C9E")]
    pub id: JobId,
    /// The capability that runs it (a map/reduce job's: its map step).
    #[schema(value_type = String, example = "image.thumbnail")]
    pub capability: CapabilityName,
    /// Where the job is in its life.
    #[schema(value_type = JobStateName)]
    pub state: JobState,
    /// Attempts so far (dispatches to an agent; a busy agent's refusal is not one).
    pub attempts: u64,
    /// The agent running it or that ran it last (a full JID), if any.
    #[schema(value_type = Option<String>)]
    pub agent: Option<FullJid>,
    /// The last progress the agent reported, 0–100.
    #[schema(maximum = 100)]
    pub percent: Option<u8>,
    /// Who submitted it: `http:NAME` over HTTP (the token's name), the bare JID over XMPP.
    pub submitter: String,
    /// Its placement priority (higher first).
    pub priority: i64,
    /// Its arguments (not in listings).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub args: Option<serde_json::Map<String, Value>>,
    /// Its input: size and type (the bytes are the agent's; not in listings).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input: Option<InputView>,
    /// When it was accepted (RFC 3339, UTC).
    #[schema(example = "2026-11-26T09:30:00.000Z")]
    pub accepted_at: String,
    /// When it last changed.
    pub updated_at: String,
    /// When its current or last attempt was sent to an agent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dispatched_at: Option<String>,
    /// When it ended (a final job's last change).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<String>,
    /// The timeline of its life, oldest first (not in listings): every change of state, each
    /// dispatch with its agent and attempt, retries with why, the outcome. The first step and
    /// the newest 47 are kept.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<StepView>,
    /// A delayed job: when it may start (RFC 3339, UTC). It is `accepted` until then.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(example = "2026-11-26T18:00:00.000Z")]
    pub not_before: Option<String>,
    /// The jobs this one made (map/reduce steps, an `all` job's copies).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    #[schema(value_type = Vec<String>)]
    pub children: Vec<JobId>,
    /// The job this one is a step of.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub parent: Option<JobId>,
    /// Map/reduce: the reduce capability.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub reduce: Option<CapabilityName>,
    /// Map/reduce: the split capability, when the job has one (`null` when it has none).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Option<String>>)]
    pub split: Option<Option<CapabilityName>>,
    /// Map/reduce: outputs per reduce step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fan_in: Option<u64>,
    /// Map/reduce: how far the steps are.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mapreduce: Option<MapReduceView>,
    /// The result, once the job succeeded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<ResultView>,
    /// Why the job failed, was cancelled or timed out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<FailureView>,
    /// A job an event rule made (docs/events.md): the rule and the event.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub event: Option<crate::jobs::EventRef>,
}

/// A job's input as its page shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct InputView {
    /// Its length in bytes (a fragment list's own length for a map/reduce job).
    pub size: u64,
    /// Its type, when the submitter gave one.
    pub mime: Option<String>,
}

/// One step of a job's life (`history`).
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = JobStep)]
pub struct StepView {
    /// When (RFC 3339, UTC).
    pub at: String,
    /// The state the job entered (or kept, for a note).
    #[schema(value_type = JobStateName)]
    pub state: JobState,
    /// The attempt at that point (0 before the first dispatch).
    pub attempt: u64,
    /// The agent of the attempt, once dispatched.
    #[schema(value_type = Option<String>)]
    pub agent: Option<FullJid>,
    /// Why: a retry's failure, a busy agent, the outcome's message.
    pub note: Option<String>,
}

/// `ms` since the UNIX epoch as RFC 3339 (UTC, milliseconds).
pub fn rfc3339_ms(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_millis(t).to_string()
}

// A schema only, for `spine_protocol::JobState` (a unit test checks the two agree).
/// Where a job is in its life. Final: succeeded, failed, cancelled, timed-out.
#[derive(Serialize, ToSchema)]
#[schema(as = JobState)]
#[allow(dead_code)]
#[serde(rename_all = "kebab-case")]
pub enum JobStateName {
    Accepted,
    Queued,
    Dispatched,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    TimedOut,
}

/// A map/reduce job's progress.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = MapReduceProgress)]
pub struct MapReduceView {
    /// Map steps (one per fragment; 0 until the split step has answered).
    pub fragments: u64,
    /// Map steps done.
    pub fragments_done: u64,
    /// Reduce steps, every level.
    pub reduce_steps: u64,
    /// Reduce steps done.
    pub reduce_steps_done: u64,
    /// Speculative copies started for stragglers.
    pub speculative: u64,
}

/// A succeeded job's result: its output inline (base64) when it is at most 48 KiB, otherwise
/// by `output_url` (or, for a map step whose agent keeps it, `output_kept_by`).
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = JobResult)]
pub struct ResultView {
    /// The output, base64; `null` when it is served by `output_url` (or kept by an agent).
    pub output: Option<String>,
    /// The output's length in bytes.
    pub output_size: u64,
    /// Where to GET a large output (with the same token).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_url: Option<String>,
    /// The SHA-256 of a large output, hex.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_sha256: Option<String>,
    /// A map step's output kept by the agent that made it (PROTOCOL.md §13.5): its bare JID.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_kept_by: Option<String>,
    /// The output's MIME type, when the agent gave one.
    #[serde(rename = "type")]
    pub mime: Option<String>,
    /// Metadata the handler returned.
    #[schema(value_type = Object)]
    pub meta: serde_json::Map<String, Value>,
    /// The handler's time, in milliseconds.
    pub elapsed_ms: Option<u64>,
}

/// Why a job failed, was cancelled or timed out.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = JobFailure)]
pub struct FailureView {
    /// The condition (PROTOCOL.md §9): `bad-arguments`, `handler-failed`, `timed-out`, …
    #[schema(value_type = String, example = "bad-arguments")]
    pub condition: Condition,
    /// A message for people.
    pub message: Option<String>,
    /// For `bad-arguments`: the argument at fault.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl JobView {
    /// The view of `j`.
    pub fn of(j: &JobRecord) -> JobView {
        let mr = j.spec.mapreduce.as_ref();
        JobView {
            id: j.id.clone(),
            capability: j.spec.capability.clone(),
            state: j.state,
            attempts: j.attempts,
            agent: j.agent.clone(),
            percent: j.percent,
            submitter: j.spec.submitter.clone(),
            priority: j.spec.priority,
            args: Some(j.spec.args.clone()),
            input: (!j.spec.input.is_empty()).then(|| InputView {
                size: j.spec.input.len(),
                mime: j.spec.input_mime.clone(),
            }),
            accepted_at: rfc3339_ms(j.accepted_ms),
            updated_at: rfc3339_ms(j.updated_ms),
            dispatched_at: (j.dispatched_ms > 0).then(|| rfc3339_ms(j.dispatched_ms)),
            ended_at: j.state.is_final().then(|| rfc3339_ms(j.updated_ms)),
            history: j
                .history
                .iter()
                .map(|st| StepView {
                    at: rfc3339_ms(st.at_ms),
                    state: st.state,
                    attempt: st.attempt,
                    agent: st.agent.clone(),
                    note: st.note.clone(),
                })
                .collect(),
            not_before: j.spec.not_before_ms.map(rfc3339_ms),
            children: j.children.clone(),
            parent: j.spec.parent.clone(),
            reduce: mr.map(|m| m.reduce.clone()),
            split: mr.map(|m| m.split.clone()),
            fan_in: mr.map(|m| m.fan_in),
            mapreduce: j.mr.as_ref().map(|st| {
                let (md, mt, rd, rt) = st.counts();
                MapReduceView {
                    fragments: mt as u64,
                    fragments_done: md as u64,
                    reduce_steps: rt as u64,
                    reduce_steps_done: rd as u64,
                    speculative: st.speculative,
                }
            }),
            result: match &j.outcome {
                Some(Recorded::Succeeded {
                    meta,
                    output,
                    mime,
                    elapsed_ms,
                }) => Some(result_view(&j.id, meta, output, mime, *elapsed_ms)),
                _ => None,
            },
            error: match &j.outcome {
                Some(Recorded::Failure {
                    condition,
                    message,
                    field,
                }) => Some(FailureView {
                    condition: *condition,
                    message: message.clone(),
                    field: field.clone(),
                }),
                _ => None,
            },
            event: j.spec.event.clone(),
        }
    }
}

/// Small outputs inline; a large one by its URL (streamed from the blob store), or by the
/// agent that keeps it.
fn result_view(
    id: &JobId,
    meta: &serde_json::Map<String, Value>,
    output: &Body,
    mime: &Option<String>,
    elapsed_ms: Option<u64>,
) -> ResultView {
    let mut v = ResultView {
        output: None,
        output_size: output.len(),
        output_url: None,
        output_sha256: None,
        output_kept_by: None,
        mime: mime.clone(),
        meta: meta.clone(),
        elapsed_ms,
    };
    match (output.inline().filter(|b| b.len() <= INLINE_LIMIT), output) {
        (Some(b), _) => v.output = Some(base64::engine::general_purpose::STANDARD.encode(b)),
        (None, Body::Kept(k)) => {
            v.output_size = k.blob.size;
            v.output_sha256 = Some(k.blob.hex());
            v.output_kept_by = Some(k.agent.to_string());
        }
        (None, _) => {
            v.output_url = Some(format!("/v1/jobs/{id}/output"));
            v.output_sha256 = output.stored().map(|s| s.hex());
        }
    }
    v
}

/// [`Rendered::later`]'s one value.
static LATER: std::sync::LazyLock<std::sync::Arc<serde_json::value::RawValue>> =
    std::sync::LazyLock::new(|| {
        serde_json::value::RawValue::from_string("null".into())
            .unwrap_or_else(|_| unreachable!("null is JSON"))
            .into()
    });

/// JSON rendered once and shared: a job's view or an event's data, which every reader
/// (waiting requests, event streams, the standbys' relay) sends as it is. A clone is a
/// reference count, not a copy of a tree; it serialises as the JSON it holds.
#[derive(Clone, Debug)]
pub struct Rendered(std::sync::Arc<serde_json::value::RawValue>);

impl Rendered {
    /// `v` rendered (`{}`, logged, if it does not serialise: the views here always do).
    pub fn of<T: Serialize + ?Sized>(v: &T) -> Rendered {
        match serde_json::value::to_raw_value(v) {
            Ok(raw) => Rendered(raw.into()),
            Err(e) => {
                tracing::error!("a view did not serialise: {e}");
                Rendered::parse("{}").unwrap_or_else(|_| unreachable!("{{}} is JSON"))
            }
        }
    }

    /// A final event's view not rendered yet ([`Core::set_listened`](super::Core::set_listened)):
    /// `null`, told apart from any other by [`Rendered::is_later`].
    pub fn later() -> Rendered {
        Rendered(LATER.clone())
    }

    /// Whether this is [`Rendered::later`]'s (not merely `null`).
    pub fn is_later(&self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &LATER)
    }

    /// The JSON view of job `j`, rendered: [`job_json`] without the tree.
    pub fn job(j: &JobRecord) -> Rendered {
        match serde_json::value::to_raw_value(&JobView::of(j)) {
            Ok(raw) => Rendered(raw.into()),
            Err(_) => Rendered::of(&job_json(j)),
        }
    }

    /// `text`, checked to be one JSON value.
    pub fn parse(text: &str) -> Result<Rendered, serde_json::Error> {
        serde_json::value::RawValue::from_string(text.to_owned()).map(|raw| Rendered(raw.into()))
    }

    /// The JSON text.
    pub fn get(&self) -> &str {
        self.0.get()
    }

    /// Parsed, for the few readers that look inside (webhook subscriptions, the console's
    /// every-job stream).
    pub fn value(&self) -> Value {
        serde_json::from_str(self.get()).unwrap_or_default()
    }
}

impl PartialEq for Rendered {
    fn eq(&self, other: &Rendered) -> bool {
        self.get() == other.get()
    }
}

impl Serialize for Rendered {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> serde::Deserialize<'de> for Rendered {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Rendered, D::Error> {
        Box::<serde_json::value::RawValue>::deserialize(d).map(|raw| Rendered(raw.into()))
    }
}

/// The JSON view of a job (the HTTP API's, and the data of its `final` event): [`JobView`].
pub fn job_json(j: &JobRecord) -> Value {
    serde_json::to_value(JobView::of(j)).unwrap_or_else(|e| {
        // Every field is a string, a number, a list or a map with string keys.
        tracing::error!(job = %j.id, "a job's view did not serialise: {e}");
        json!({ "id": j.id, "state": j.state })
    })
}

impl Core {
    /// Sends `job`'s `<job-status>` to an XMPP submitter, `via` a reply to its `<status>` or a
    /// watch message: at once, or, when the output is over the inline limit, after the output
    /// in chunks (PROTOCOL.md §11.3), the status then referencing that blob, or saying the
    /// output was left out if the submitter did not take it. `Err`: a reply refused because
    /// too many outputs are already on their way to `to`.
    pub(super) fn send_status(
        &mut self,
        to: Jid,
        via: Via,
        job: &JobId,
        now: Now,
    ) -> Result<(), SpineError> {
        let Some(rec) = self.jobs.get(job) else {
            return Ok(());
        };
        let mut st = status(rec);
        // A submitter that asked for references gets a large stored output as a signed URL
        // (protocol 1.1): no chunks through the XMPP server.
        if let Some(r) = self.output_reference(rec, &to, now) {
            if let Some(Outcome::Result(res)) = &mut st.outcome {
                res.output = Some(Data::Ref(r));
            }
            self.send(Out::Status {
                to,
                via,
                status: Box::new(st),
            });
            return Ok(());
        }
        let large = match &rec.outcome {
            Some(Recorded::Succeeded {
                output: Body::Stored(b),
                mime,
                ..
            }) => Some((b.size, b.sha256, mime.clone())),
            Some(Recorded::Succeeded {
                output: Body::Inline(output),
                mime,
                ..
            }) if output.len() > INLINE_LIMIT => {
                let sha256 = self.deliveries.digest(job, output);
                Some((output.len() as u64, sha256, mime.clone()))
            }
            _ => None,
        };
        let Some((size, sha256, mime)) = large else {
            self.send(Out::Status {
                to,
                via,
                status: Box::new(st),
            });
            return Ok(());
        };
        let req = Request {
            to,
            via,
            status: st,
            job: job.clone(),
            size,
            sha256,
            mime,
        };
        self.deliveries.offer(req, now.mono)?;
        self.pump_deliveries(now);
        Ok(())
    }

    /// Sends what the transfers of large outputs to submitters have ready: chunks, and the
    /// statuses of the transfers that ended.
    pub(super) fn pump_deliveries(&mut self, now: Now) {
        let jobs = &self.jobs;
        let store = self.blob_store.as_ref();
        let read = |job: &JobId, offset: u64, end: u64| {
            let gone = || "the job's output is no longer held".to_owned();
            match jobs.get(job).and_then(|j| j.outcome.as_ref()) {
                Some(Recorded::Succeeded {
                    output: Body::Inline(b),
                    ..
                }) => b
                    .get(offset as usize..end as usize)
                    .map(<[u8]>::to_vec)
                    .ok_or_else(gone),
                Some(Recorded::Succeeded {
                    output: Body::Stored(b),
                    ..
                }) => store
                    .read_at(b, offset, (end - offset) as usize)
                    .map_err(|e| format!("the output cannot be read from the blob store: {e}")),
                _ => Err(gone()),
            }
        };
        let out = self.deliveries.poll(read, now.mono);
        self.ready.stanzas.extend(out.into_iter().map(Into::into));
    }

    /// Forwards a progress or partial report to the job's event streams and XMPP watcher.
    pub(super) fn forward(&mut self, job: &JobId, payload: minidom::Element) {
        let (kind, data) = if payload.name() == "progress" {
            let data = Progress::try_from(payload.clone())
                .map(|p| serde_json::json!({ "percent": p.percent, "message": p.message }))
                .unwrap_or_default();
            (EventKind::Progress, data)
        } else {
            let data = spine_protocol::Partial::try_from(payload.clone())
                .map(|p| {
                    use base64::Engine as _;
                    serde_json::json!({ "seq": p.seq, "type": p.mime, "data": base64::engine::general_purpose::STANDARD.encode(&p.bytes) })
                })
                .unwrap_or_default();
            (EventKind::Partial, data)
        };
        self.publish(job, kind, Rendered::of(&data));
        let Some(watch) = self.jobs.get(job).and_then(|j| j.spec.watch.clone()) else {
            return;
        };
        let mut m = Message::new(Some(watch));
        m.type_ = MessageType::Headline;
        m.payloads.push(payload);
        self.send(m);
    }

    /// Prometheus text exposition (counts from the job table's counters).
    pub(super) fn metrics(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        out.push_str("# HELP spine_jobs Jobs known to this dispatcher, by capability and state.\n# TYPE spine_jobs gauge\n");
        let mut counts: Vec<_> = self.jobs.counts().into_iter().collect();
        counts.sort_by(|a, b| {
            (a.0 .0.as_str(), a.0 .1.as_str()).cmp(&(b.0 .0.as_str(), b.0 .1.as_str()))
        });
        for ((cap, state), n) in counts {
            let _ = writeln!(
                out,
                "spine_jobs{{capability=\"{cap}\",state=\"{state}\"}} {n}"
            );
        }
        out.push_str("# HELP spine_queue_depth Jobs waiting for an agent, by capability.\n# TYPE spine_queue_depth gauge\n");
        for c in self.jobs.queued_capabilities() {
            let _ = writeln!(
                out,
                "spine_queue_depth{{capability=\"{c}\"}} {}",
                self.jobs.queued(&c)
            );
        }
        out.push_str("# HELP spine_agents Registered agents.\n# TYPE spine_agents gauge\n");
        let _ = writeln!(out, "spine_agents {}", self.registry.len());
        out.push_str("# HELP spine_dispatch_latency_seconds Time from acceptance to first dispatch.\n# TYPE spine_dispatch_latency_seconds histogram\n");
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "spine_dispatch_latency_seconds_bucket{{le=\"{b}\"}} {}",
                self.latency.counts[i]
            );
        }
        let _ = writeln!(
            out,
            "spine_dispatch_latency_seconds_bucket{{le=\"+Inf\"}} {}",
            self.latency.n
        );
        let _ = writeln!(
            out,
            "spine_dispatch_latency_seconds_sum {}",
            self.latency.sum_s
        );
        let _ = writeln!(
            out,
            "spine_dispatch_latency_seconds_count {}",
            self.latency.n
        );
        out.push_str("# HELP spine_agent_in_flight Jobs running on each agent (its report and ours).\n# TYPE spine_agent_in_flight gauge\n");
        let agents = self.registry.loads();
        for (jid, in_flight, _) in &agents {
            let _ = writeln!(out, "spine_agent_in_flight{{agent=\"{jid}\"}} {in_flight}");
        }
        out.push_str(
            "# HELP spine_agent_slots Slots of each agent.\n# TYPE spine_agent_slots gauge\n",
        );
        for (jid, _, slots) in &agents {
            let _ = writeln!(out, "spine_agent_slots{{agent=\"{jid}\"}} {slots}");
        }
        self.stats.write(&mut out);
        self.rule_metrics(&mut out);
        self.schedule_metrics(&mut out);
        self.canary_metrics(&mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::{JobSpec, JobTable};

    #[test]
    fn a_rendered_job_is_its_json_view_and_serialises_as_that_json() {
        let mut t = JobTable::new(10);
        let spec = JobSpec {
            input: b"hello".to_vec().into(),
            idempotency_key: Some("k\"1".into()),
            ..JobSpec::new("text.upper".parse().unwrap(), "http:app")
        };
        let rec = t.submit("j1".parse().unwrap(), spec, 5).unwrap().clone();
        let r = Rendered::job(&rec);
        assert_eq!(r.value(), job_json(&rec), "the same view, without the tree");
        assert_eq!(r.value()["id"], "j1");
        // Inside another document it is the JSON it holds, as it is (not a string of it),
        // and it reads back from there (the standbys' relay).
        #[derive(serde::Serialize, serde::Deserialize)]
        struct Outer {
            data: Rendered,
        }
        let outer = serde_json::to_string(&Outer { data: r.clone() }).unwrap();
        assert_eq!(outer, format!("{{\"data\":{}}}", r.get()));
        let o: Outer = serde_json::from_str(&outer).unwrap();
        assert_eq!(o.data, r);
        assert!(Rendered::parse("{\"a\":").is_err(), "not JSON");
        assert_eq!(Rendered::parse(" [1, 2] ").unwrap().value(), json!([1, 2]));
    }
}
