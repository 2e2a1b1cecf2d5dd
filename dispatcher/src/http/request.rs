//! From request to [`JobSpec`]: a submission's body is read as JSON or as a raw upload whose
//! fields are in the query string ([`body_form`]), deserialised into a [`SubmitRequest`] that
//! names the field at fault, and checked into the spec the core accepts (the
//! caller may run every capability it names). Nothing here talks to the core.

use axum::http::StatusCode;
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Value};
use spine_protocol::{AttrName, CapabilityName, Condition, Filter, JobId, SpineError, Strategy};

use super::auth::Caller;
use super::error::ApiError;
use crate::jobs::JobSpec;

/// `POST /v1/jobs`'s body (for a raw upload: its query string). Unknown fields are refused,
/// naming the field.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitRequest {
    /// The capability to run (a map/reduce job's: its map step).
    #[schema(example = "image.thumbnail")]
    capability: String,
    /// The handler's arguments.
    #[serde(default)]
    #[schema(value_type = Option<Object>, example = json!({"size": 128}))]
    args: Option<serde_json::Map<String, Value>>,
    /// Input bytes, base64 (or send them raw: any Content-Type but JSON makes the body the
    /// input).
    input: Option<String>,
    /// Input already in the blob store (`PUT /v1/blobs`): its SHA-256, hex.
    pub(super) input_ref: Option<String>,
    /// The input's MIME type.
    input_type: Option<String>,
    /// `least-loaded` (the default), `any`, `all` (every matching agent) or `affinity`.
    strategy: Option<String>,
    /// Only agents whose attributes match, like `gpu, mem>=16` (docs/dispatcher.md).
    filter: Option<String>,
    /// Prefer agents by this attribute instead of by load.
    sort: Option<String>,
    /// `affinity` strategy: jobs with the same key go to the same agent while it can take
    /// them.
    affinity_key: Option<String>,
    /// Give up on the job after this long, like `30s` (counted from `not_before` for a
    /// delayed job).
    deadline: Option<String>,
    /// A delayed job: not placed before this time, an RFC 3339 time
    /// (`2026-11-26T18:00:00Z`) or a countdown (`90s`, `2h`). Until then the job is
    /// `accepted`, stored like any other.
    #[schema(example = "10m")]
    not_before: Option<String>,
    /// Higher first; default 0.
    priority: Option<i64>,
    /// Attempts before the job fails (at most the dispatcher's max_attempts).
    max_attempts: Option<u64>,
    /// A key that makes resubmitting safe: the same key (for the same caller) answers with
    /// the job it first made.
    idempotency_key: Option<String>,
    /// Forward the agent's progress reports (events of `GET /v1/jobs/{id}/events`).
    #[serde(default)]
    progress: bool,
    /// Accept the job even if no agent has offered its capabilities yet (it then waits
    /// `no_agent_wait` for one, like a job whose agents are momentarily absent).
    pub(super) wait_for_agent: Option<bool>,
    /// `all` strategy: agents to use, "5" or "50%".
    limit: Option<String>,
    /// `all` strategy: children at once.
    batch: Option<u64>,
    /// Map/reduce: the reduce capability (`capability` is the map step).
    reduce: Option<String>,
    /// Map/reduce: the split capability (without it the input is the fragment list).
    split: Option<String>,
    /// Map/reduce: outputs per reduce step.
    fan_in: Option<u64>,
    /// Map/reduce: the fragments, instead of `input`.
    #[schema(value_type = Option<Vec<Fragment>>)]
    fragments: Option<Vec<spine_protocol::Fragment>>,
}

impl SubmitRequest {
    /// The `Idempotency-Key` header's `key`: the job's key, unless the body names another.
    pub(super) fn set_idempotency_key(&mut self, key: &str) -> Result<(), ApiError> {
        match &self.idempotency_key {
            Some(k) if k != key => Err(ApiError::field(
                "idempotency_key",
                "the body's idempotency_key and the Idempotency-Key header differ: give one, or the same key in both",
            )),
            _ => {
                self.idempotency_key = Some(key.to_owned());
                Ok(())
            }
        }
    }
}

/// `not_before`: an RFC 3339 time, or a countdown from `now_ms`; at most `max_delay` ahead.
/// A time already past is allowed (the job is queued at once): clocks differ a little.
fn not_before(text: &str, now_ms: u64, max_delay: std::time::Duration) -> Result<u64, ApiError> {
    let at_ms = match humantime::parse_duration(text) {
        Ok(d) => now_ms.saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        Err(_) => {
            let t = humantime::parse_rfc3339_weak(text).map_err(|e| {
                ApiError::field(
                    "not_before",
                    format!("'{text}': {e}; give an RFC 3339 time (\"2026-11-26T18:00:00Z\") or a countdown (\"90s\", \"2h\")"),
                )
            })?;
            let since = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
        }
    };
    let limit = now_ms.saturating_add(u64::try_from(max_delay.as_millis()).unwrap_or(u64::MAX));
    if at_ms > limit {
        return Err(ApiError::field(
            "not_before",
            format!(
                "'{text}' is more than {} ahead (the dispatcher's max_delay)",
                humantime::format_duration(max_delay)
            ),
        ));
    }
    Ok(at_ms)
}

/// A map/reduce fragment: `data` (base64), or `sha256` and `size` of a blob stored with
/// `PUT /v1/blobs`.
// A schema only, for `spine_protocol::Fragment`'s JSON form.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct Fragment {
    /// A label (a file name, say), passed to the reduce that uses this fragment's output.
    name: Option<String>,
    /// The bytes' MIME type.
    #[schema(rename = "type")]
    mime: Option<String>,
    /// The bytes, base64.
    data: Option<String>,
    /// Or: the SHA-256 of a stored blob, hex.
    sha256: Option<String>,
    /// With `sha256`: its length.
    size: Option<u64>,
}

pub(super) fn spec_from(
    req: SubmitRequest,
    caller: &Caller,
    max_attempts: u64,
    max_input: u64,
    max_delay: std::time::Duration,
) -> Result<JobSpec, ApiError> {
    let capability: CapabilityName = req
        .capability
        .parse()
        .map_err(|e: String| ApiError::field("capability", e))?;
    caller.check_may_run(&capability)?;
    let strategy = match req.strategy.as_deref() {
        None => Strategy::LeastLoaded,
        Some(s) => s
            .parse()
            .map_err(|e: String| ApiError::field("strategy", e))?,
    };
    if let Some(f) = &req.filter {
        f.parse::<Filter>()
            .map_err(|e| ApiError::field("filter", e.to_string()))?;
    }
    let sort = match &req.sort {
        None => None,
        Some(s) => Some(
            s.parse::<AttrName>()
                .map_err(|e| ApiError::field("sort", e))?,
        ),
    };
    match (strategy, &req.affinity_key) {
        (Strategy::Affinity, None) => {
            return Err(ApiError::field(
                "affinity_key",
                "required with strategy 'affinity'",
            ))
        }
        (s, Some(_)) if s != Strategy::Affinity => {
            return Err(ApiError::field(
                "affinity_key",
                "only the 'affinity' strategy takes a key",
            ))
        }
        _ => {}
    }
    let limit = match &req.limit {
        None => None,
        Some(_) if strategy != Strategy::All => {
            return Err(ApiError::field(
                "limit",
                "only the 'all' strategy takes a limit",
            ))
        }
        Some(l) => Some(
            l.parse::<spine_protocol::Limit>()
                .map_err(|e| ApiError::field("limit", e))?,
        ),
    };
    match req.batch {
        Some(_) if strategy != Strategy::All => {
            return Err(ApiError::field(
                "batch",
                "only the 'all' strategy takes a batch size",
            ))
        }
        Some(0) => return Err(ApiError::field("batch", "must be at least 1")),
        _ => {}
    }
    let now_ms = crate::clock::now_ms();
    let not_before_ms = match &req.not_before {
        None => None,
        Some(t) => Some(not_before(t, now_ms, max_delay)?),
    };
    let deadline_ms = match &req.deadline {
        None => None,
        Some(d) => {
            let dur = humantime::parse_duration(d).map_err(|e| {
                ApiError::field("deadline", format!("'{d}': {e} (use units, e.g. \"30s\")"))
            })?;
            Some(not_before_ms.unwrap_or(now_ms) + dur.as_millis() as u64)
        }
    };
    let mapreduce = mapreduce_from(&req, strategy, caller)?;
    let (input, input_type) = match (&req.input, &req.fragments) {
        (Some(_), Some(_)) => {
            return Err(ApiError::field(
                "fragments",
                "give the fragments or an input, not both",
            ))
        }
        (None, Some(f)) => (
            spine_protocol::fragments::encode(f),
            Some(spine_protocol::FRAGMENTS_MIME.to_owned()),
        ),
        (None, None) => (Vec::new(), req.input_type),
        (Some(b), None) => (
            base64::engine::general_purpose::STANDARD
                .decode(b)
                .map_err(|e| ApiError::field("input", format!("not base64: {e}")))?,
            req.input_type,
        ),
    };
    if input.len() as u64 > max_input {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-large",
            format!(
                "input of {} bytes is over the limit of {max_input}",
                input.len()
            ),
        ));
    }
    if req.max_attempts == Some(0) {
        return Err(ApiError::field("max_attempts", "must be at least 1"));
    }
    if req
        .idempotency_key
        .as_ref()
        .is_some_and(|k| k.is_empty() || k.len() > 256)
    {
        return Err(ApiError::field("idempotency_key", "must be 1 to 256 bytes"));
    }
    Ok(JobSpec {
        capability,
        strategy,
        filter: req
            .filter
            .map(|f| f.parse::<Filter>())
            .transpose()
            .map_err(|e| {
                ApiError::from(
                    SpineError::new(Condition::BadArguments)
                        .with_field("filter")
                        .with_text(e.to_string()),
                )
            })?,
        sort,
        affinity_key: req.affinity_key,
        args: req.args.unwrap_or_default(),
        input: crate::jobs::Body::Inline(input),
        input_mime: input_type,
        deadline_ms,
        not_before_ms,
        priority: req.priority.unwrap_or(0),
        max_attempts: req.max_attempts.unwrap_or(max_attempts),
        submitter: caller.submitter(),
        idempotency_key: req.idempotency_key,
        progress: req.progress,
        watch: None,
        limit,
        batch: req.batch,
        mapreduce,
        output_refs: false,
        input_blobs: Vec::new(),
        keep_output: false,
        input_kept: Vec::new(),
        event: None,
        target: None,
        parent: None,
    })
}

/// The map/reduce part of a request, checked (the caller must be allowed every step).
fn mapreduce_from(
    req: &SubmitRequest,
    strategy: Strategy,
    caller: &Caller,
) -> Result<Option<spine_protocol::MapReduce>, ApiError> {
    let cap = |field: &str, name: &str| -> Result<CapabilityName, ApiError> {
        let c: CapabilityName = name
            .parse()
            .map_err(|e: String| ApiError::field(field, e))?;
        caller.check_may_run(&c)?;
        Ok(c)
    };
    let Some(reduce) = &req.reduce else {
        for (field, given) in [
            ("split", req.split.is_some()),
            ("fan_in", req.fan_in.is_some()),
            ("fragments", req.fragments.is_some()),
        ] {
            if given {
                return Err(ApiError::field(
                    field,
                    "only a map/reduce job (with reduce) takes this",
                ));
            }
        }
        return Ok(None);
    };
    if strategy == Strategy::All {
        return Err(ApiError::field(
            "reduce",
            "the 'all' strategy cannot be a map/reduce",
        ));
    }
    if let Some(f) = req.fan_in {
        spine_protocol::MapReduce::check_fan_in(f).map_err(|e| ApiError::field("fan_in", e))?;
    }
    if req.split.is_some() && req.fragments.is_some() {
        return Err(ApiError::field(
            "fragments",
            "with a split step the input is split; give an input, not fragments",
        ));
    }
    Ok(Some(spine_protocol::MapReduce {
        reduce: cap("reduce", reduce)?,
        split: req.split.as_deref().map(|s| cap("split", s)).transpose()?,
        fan_in: req.fan_in.unwrap_or(spine_protocol::DEFAULT_FAN_IN),
    }))
}

pub(super) fn job_id(s: &str) -> Result<JobId, ApiError> {
    s.parse().map_err(|e: String| ApiError::field("id", e))
}

/// Reads a `SubmitRequest` from JSON, naming the field at fault.
pub(super) fn parse_request(json: &[u8], what: &str) -> Result<SubmitRequest, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(json);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let msg = e.inner().to_string();
        // A wrong type names its path; an unknown or missing field is named in the message.
        let field = if path.is_empty() || path == "." {
            msg.split('`').nth(1).map(str::to_owned)
        } else {
            Some(path)
        };
        ApiError {
            field,
            ..ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad-request",
                format!("invalid {what}: {msg}"),
            )
        }
    })
}

/// The fields of a raw-upload submission, from the query string, as the JSON object the JSON
/// form would have carried: numbers and booleans typed, `args` parsed as JSON.
pub(super) fn query_as_json(query: Option<&str>) -> Result<Value, ApiError> {
    let pairs: Vec<(String, String)> =
        serde_urlencoded::from_str(query.unwrap_or("")).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad-request",
                format!("invalid query string: {e}"),
            )
        })?;
    let mut m = serde_json::Map::new();
    for (k, v) in pairs {
        let value = match k.as_str() {
            "priority" | "max_attempts" | "batch" | "fan_in" => match v.parse::<i64>() {
                Ok(n) => json!(n),
                Err(_) => return Err(ApiError::field(&k, format!("'{v}' is not an integer"))),
            },
            "progress" | "wait_for_agent" => match v.as_str() {
                "true" | "1" => json!(true),
                "false" | "0" => json!(false),
                _ => return Err(ApiError::field(&k, "expected true or false")),
            },
            "args" => serde_json::from_str::<Value>(&v)
                .map_err(|e| ApiError::field("args", format!("not JSON: {e}")))?,
            "input" | "input_type" | "fragments" => {
                return Err(ApiError::field(
                    &k,
                    "with a raw upload the body is the input and Content-Type its type",
                ))
            }
            _ => json!(v),
        };
        m.insert(k, value);
    }
    Ok(Value::Object(m))
}

/// How a submission's body is read.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum BodyForm {
    /// The job as a JSON object.
    Json,
    /// The job's input; its fields are in the query string.
    Raw,
}

/// The form of a submission's body, from its Content-Type (media type compared without case
/// or parameters): JSON for `application/json` (or none); also for
/// `application/x-www-form-urlencoded` without a query string when the body is a JSON object,
/// which is what `curl -d '{…}'` and many HTTP clients send by default (a form-encoded body
/// cannot start with `{`, so nothing else is taken for JSON). A form-encoded body that is not
/// a JSON object and has no query string is refused with 415 and the two forms that work.
/// Any other type is a raw upload.
pub(super) fn body_form(
    content_type: &str,
    query: Option<&str>,
    body: &[u8],
) -> Result<BodyForm, ApiError> {
    let media = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if media == "application/json" {
        return Ok(BodyForm::Json);
    }
    let no_query = query.is_none_or(str::is_empty);
    if media == "application/x-www-form-urlencoded" && no_query {
        if body.trim_ascii_start().starts_with(b"{") {
            return Ok(BodyForm::Json);
        }
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            "a body of Content-Type application/x-www-form-urlencoded is read as JSON only when it is a JSON object (as `curl -d '{...}'` sends it), and form fields are not taken: send Content-Type: application/json with the job as a JSON object, or a raw upload with the job fields in the query string",
        ));
    }
    Ok(BodyForm::Raw)
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn curl_d_json_is_json_and_other_form_bodies_are_refused_with_the_two_forms() {
        let json = br#" {"capability":"text.upper"}"#;
        let form = "application/x-www-form-urlencoded";
        for (ct, query, body, want) in [
            ("application/json", None, &json[..], Some(BodyForm::Json)),
            (
                "Application/JSON; charset=utf-8",
                None,
                json,
                Some(BodyForm::Json),
            ),
            // What `curl -d '{…}'` sends.
            (form, None, json, Some(BodyForm::Json)),
            (form, Some(""), json, Some(BodyForm::Json)),
            // Job fields in the query string: a raw upload, as before.
            (form, Some("capability=a.b"), b"x=1", Some(BodyForm::Raw)),
            ("image/png", None, b"\x89PNG", Some(BodyForm::Raw)),
            (form, None, b"capability=text.upper", None),
        ] {
            match body_form(ct, query, body) {
                Ok(got) => assert_eq!(Some(got), want, "{ct} {query:?}"),
                Err(e) => {
                    assert_eq!(want, None, "{ct} {query:?}: {e:?}");
                    assert_eq!(e.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
                    assert!(
                        e.message.contains("Content-Type: application/json")
                            && e.message.contains("query string"),
                        "{}",
                        e.message
                    );
                }
            }
        }
    }
}
