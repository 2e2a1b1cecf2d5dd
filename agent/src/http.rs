//! The `http` wrapper: a capability served by an existing local HTTP service.
//!
//! The job's input is the request body (POST), its arguments — only those the capability
//! declares (`args`; any other is refused) — travel as query parameters and, as JSON, in the
//! `Spine-Args` header; the response body is the job's output. Status codes
//! decide the outcome: 2xx ok; 400 and 422 bad arguments; 408, 429 and 5xx retryable; other
//! statuses failed; the configuration may override any code.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::args::{ArgRules, ArgSpec, DeclError, Target};
use crate::config::Verdict;
use crate::handler::{HandlerFuture, JobContext, JobError, Output};

/// Bytes of an error response body quoted in the job's error.
const BODY_TAIL: usize = 1024;

/// A configured HTTP capability.
pub struct HttpWrapper {
    client: reqwest::Client,
    url: reqwest::Url,
    rules: ArgRules,
    post: bool,
    max_output: u64,
    status_codes: BTreeMap<u16, Verdict>,
}

fn default_verdict(status: u16) -> Verdict {
    match status {
        200..=299 => Verdict::Ok,
        400 | 422 => Verdict::BadArguments,
        408 | 429 | 500..=599 => Verdict::Retryable,
        _ => Verdict::Failed,
    }
}

/// The arguments of an http capability: its `args` declarations (none: it takes no
/// arguments). A declared name already in the URL's query is refused, since the service would
/// then see a job's value beside the configured one (`mode=safe&mode=unsafe`).
pub fn arg_rules(
    url: &str,
    declared: Option<&BTreeMap<String, ArgSpec>>,
) -> Result<ArgRules, DeclError> {
    let url =
        reqwest::Url::parse(url).map_err(|e| DeclError::new("url", format!("'{url}': {e}")))?;
    let declared = declared.cloned().unwrap_or_default();
    if let Some((name, _)) = url
        .query_pairs()
        .find(|(k, _)| declared.contains_key(k.as_ref()))
    {
        return Err(DeclError::new(
            format!("args.{name}"),
            "is already set in the url's query; a job must not add a second value",
        ));
    }
    ArgRules::compile(&declared, Target::Http)
}

impl HttpWrapper {
    /// From configuration values (already validated). It takes no arguments until
    /// [`HttpWrapper::with_args`] declares them.
    pub fn new(
        url: &str,
        method: &str,
        timeout: Duration,
        max_output: u64,
        status_codes: &BTreeMap<String, Verdict>,
    ) -> Result<Self, String> {
        let url = reqwest::Url::parse(url).map_err(|e| e.to_string())?;
        // A wrapped service is called directly: no proxy from the agent's environment, no
        // redirect that could take the call (and the job's input) elsewhere.
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| e.to_string())?;
        let status_codes = status_codes
            .iter()
            .map(|(k, v)| {
                k.parse::<u16>()
                    .map(|c| (c, *v))
                    .map_err(|_| format!("'{k}' is not an HTTP status"))
            })
            .collect::<Result<_, _>>()?;
        let rules = ArgRules::compile(&BTreeMap::new(), Target::Http)
            .map_err(|e| format!("{}: {}", e.key, e.why))?;
        Ok(HttpWrapper {
            client,
            url,
            rules,
            post: method == "POST",
            max_output,
            status_codes,
        })
    }

    /// The same wrapper with its arguments declared (`args` of the capability). Errors name
    /// the key below the capability.
    pub fn with_args(
        mut self,
        declared: Option<&BTreeMap<String, ArgSpec>>,
    ) -> Result<Self, String> {
        self.rules =
            arg_rules(self.url.as_str(), declared).map_err(|e| format!("{}: {}", e.key, e.why))?;
        Ok(self)
    }

    /// The handler running this wrapper.
    pub fn into_handler(self) -> crate::handler::SharedHandler {
        let me = Arc::new(self);
        Arc::new(move |ctx: JobContext| -> HandlerFuture {
            let me = me.clone();
            Box::pin(async move { me.run(ctx).await })
        })
    }

    async fn run(&self, ctx: JobContext) -> Result<Output, JobError> {
        // Only declared arguments get this far: one query parameter each.
        let args = self.rules.check(&ctx.args)?;
        let mut url = self.url.clone();
        if !args.is_empty() {
            let mut q = url.query_pairs_mut();
            for (k, text) in &args {
                q.append_pair(k, text);
            }
        }
        let args_json = Value::Object(ctx.args.clone()).to_string();
        let req = if self.post {
            self.client.post(url).body(ctx.input.clone())
        } else {
            self.client.get(url)
        };
        let req = req
            .header("Spine-Job-Id", ctx.id.as_str())
            .header("Spine-Capability", ctx.capability.as_str())
            .header("Spine-Attempt", ctx.attempt.to_string())
            .header("Spine-Args", args_json)
            .header(
                "Content-Type",
                ctx.input_mime
                    .as_deref()
                    .unwrap_or("application/octet-stream"),
            );
        let mut resp = req.send().await.map_err(|e| {
            if e.is_timeout() {
                JobError::Retryable(format!("{}: timed out", self.url))
            } else {
                JobError::Retryable(format!("{}: {e}", self.url))
            }
        })?;
        let status = resp.status().as_u16();
        let mime = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let mut body = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| JobError::Retryable(format!("{}: reading the response: {e}", self.url)))?
        {
            if (body.len() + chunk.len()) as u64 > self.max_output {
                return Err(JobError::Failed(format!(
                    "response is over the limit of {} bytes",
                    self.max_output
                )));
            }
            body.extend_from_slice(&chunk);
        }
        let verdict = self
            .status_codes
            .get(&status)
            .copied()
            .unwrap_or_else(|| default_verdict(status));
        let describe = || {
            let start = body.len().saturating_sub(BODY_TAIL);
            let text = String::from_utf8_lossy(&body[start..]).trim().to_owned();
            if text.is_empty() {
                format!("HTTP {status}")
            } else {
                format!("HTTP {status}: {text}")
            }
        };
        match verdict {
            Verdict::Ok => {
                let mut out = Output::bytes(body).with_meta("http_status", status);
                out.mime = mime;
                Ok(out)
            }
            Verdict::Retryable => Err(JobError::Retryable(describe())),
            Verdict::Failed => Err(JobError::Failed(describe())),
            Verdict::BadArguments => Err(JobError::BadArguments {
                field: String::new(),
                message: describe(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_status_mapping() {
        assert_eq!(default_verdict(200), Verdict::Ok);
        assert_eq!(default_verdict(204), Verdict::Ok);
        assert_eq!(default_verdict(400), Verdict::BadArguments);
        assert_eq!(default_verdict(422), Verdict::BadArguments);
        assert_eq!(default_verdict(404), Verdict::Failed);
        assert_eq!(default_verdict(429), Verdict::Retryable);
        assert_eq!(default_verdict(503), Verdict::Retryable);
    }

    /// Finding 13a of the security review: a job could add `mode=unsafe` after the configured
    /// `?mode=safe`, or any other parameter.
    #[test]
    fn only_declared_arguments_and_never_one_of_the_urls_own() {
        let decl: BTreeMap<String, ArgSpec> =
            toml::from_str("mode = {}\npage = { type = \"integer\", required = false }").unwrap();
        let e = arg_rules("http://127.0.0.1:9/r?mode=safe", Some(&decl)).unwrap_err();
        assert_eq!(e.key, "args.mode");
        let rules = arg_rules("http://127.0.0.1:9/r?v=1", Some(&decl)).unwrap();
        let args = |v: serde_json::Value| v.as_object().cloned().unwrap_or_default();
        let texts = rules
            .check(&args(serde_json::json!({"mode": "a b"})))
            .unwrap();
        assert_eq!(texts.len(), 1);
        match rules.check(&args(serde_json::json!({"mode": "x", "admin": true}))) {
            Err(crate::JobError::BadArguments { field, message }) => {
                assert_eq!(field, "admin");
                assert!(message.ends_with("accepts only mode, page"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        // Without declarations it takes no arguments at all.
        let none = arg_rules("http://127.0.0.1:9/r", None).unwrap();
        assert!(none.check(&args(serde_json::json!({"mode": "x"}))).is_err());
    }
}
