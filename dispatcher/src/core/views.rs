//! What the core shows of jobs: the `<job-status>` of a job for XMPP submitters (large
//! outputs first, through [`crate::deliver`]), its JSON view for HTTP and event streams,
//! progress and partial results forwarded to watchers and event streams, and the Prometheus
//! text of `/metrics`.
//!
//! Called by [`super::outcomes`] (a job ended), [`super::submit`] (`<status/>`),
//! [`super::inbound`] (progress reports) and [`super::Core::query`] (metrics). Every count
//! here comes from counters and indexes kept with the job table, never from a scan of it.

use jid::Jid;
use spine_protocol::{
    Data, Failure, JobId, JobResult, JobStatus, Outcome, Progress, SpineError, INLINE_LIMIT,
};
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

/// The JSON view of a job (the HTTP API's, and the data of its `final` event).
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
            // Small outputs inline; a large one by its URL (streamed from the blob store).
            v["result"] = match output.inline().filter(|b| b.len() <= INLINE_LIMIT) {
                Some(b) => json!({
                    "output": base64::engine::general_purpose::STANDARD.encode(b),
                    "output_size": b.len(),
                    "type": mime,
                    "meta": meta,
                    "elapsed_ms": elapsed_ms,
                }),
                None => match output {
                    // A map step's output an agent keeps (data_listen): not served here.
                    Body::Kept(k) => json!({
                        "output": null,
                        "output_size": k.blob.size,
                        "output_sha256": k.blob.hex(),
                        "output_kept_by": k.agent.to_string(),
                        "type": mime,
                        "meta": meta,
                        "elapsed_ms": elapsed_ms,
                    }),
                    _ => json!({
                        "output": null,
                        "output_size": output.len(),
                        "output_url": format!("/v1/jobs/{}/output", j.id),
                        "output_sha256": output.stored().map(|s| s.hex()),
                        "type": mime,
                        "meta": meta,
                        "elapsed_ms": elapsed_ms,
                    }),
                },
            };
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
        self.publish(job, kind, data);
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
        out
    }
}
