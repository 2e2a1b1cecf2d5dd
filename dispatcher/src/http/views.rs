//! The JSON views of what the core answers, as HTTP shows them: a job in a listing (without
//! its output) and an agent. A whole job is the core's [`job_json`], which its events carry
//! too. Handlers in `routes.rs` send these.

use serde_json::{json, Value};
use spine_protocol::AgentInfo;

pub use crate::core::job_json;
use crate::jobs::JobRecord;

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
