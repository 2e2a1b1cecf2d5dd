//! The JSON views of what the connection task answers: a job (with its result inline, or
//! without it in listings) and an agent. Handlers in `routes.rs` and the event streams send
//! these; the connection task uses [`job_json`] for the events it publishes.

use base64::Engine as _;
use serde_json::{json, Value};
use spine_protocol::AgentInfo;

use crate::jobs::{JobRecord, Recorded};

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

/// A job as a listing shows it: [`job_json`] without the output (listings carry no payloads;
/// `GET /v1/jobs/{id}` does).
pub(super) fn job_listed_json(j: &JobRecord) -> Value {
    let mut v = job_json(j);
    if let Some(r) = v.get_mut("result") {
        r["output"] = Value::Null;
    }
    v
}

/// The JSON view of an agent, for `GET /v1/agents`.
pub(super) fn agent_json(a: &AgentInfo) -> Value {
    json!({
        "jid": a.jid.to_string(), "state": a.state.as_str(), "load": a.load, "in_flight": a.in_flight,
        "slots": a.slots, "loadavg": a.loadavg, "mem_used": a.mem_used, "mem_total": a.mem_total,
        "attributes": a.attrs.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
    })
}
