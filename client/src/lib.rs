//! A client of a Spine dispatcher's HTTP API (docs/dispatcher.md): what the `spine` command,
//! the example programs and a Rust web app use to submit jobs, follow them and fetch outputs.
//!
//! ```no_run
//! # async fn f() -> Result<(), spine_client::ClientError> {
//! let api = spine_client::Client::new("http://127.0.0.1:8480", None)?;
//! let id = api.submit(&serde_json::json!({ "capability": "text.upper", "input": "aGk=" })).await?;
//! let job = api.follow(&id, |_percent, _message| {}).await?;
//! let output = spine_client::output(&job)?;
//! # Ok(()) }
//! ```

use std::path::Path;

use base64::Engine as _;
use serde_json::Value;
use spine_protocol::Fragment;

/// What can go wrong talking to the API.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The request did not complete (connection refused, reset, timeout).
    #[error("{context}: {source}")]
    Http {
        /// What was being done.
        context: String,
        /// The transport error.
        source: reqwest::Error,
    },
    /// The API answered with an error.
    #[error("{status} {condition}{}: {message}", field.as_ref().map(|f| format!(" (field '{f}')")).unwrap_or_default())]
    Api {
        /// HTTP status.
        status: u16,
        /// Spine condition (`bad-request`, `not-authorized`, …).
        condition: String,
        /// The request field at fault.
        field: Option<String>,
        /// For people.
        message: String,
    },
    /// The job ended without a result.
    #[error("job {id} {state}: {message} ({condition})")]
    JobFailed {
        /// The job.
        id: String,
        /// Its final state.
        state: String,
        /// Spine condition.
        condition: String,
        /// For people.
        message: String,
    },
    /// An answer that does not fit the API.
    #[error("unexpected answer from the dispatcher: {0}")]
    Protocol(String),
    /// A local file could not be read.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

fn http(context: &str) -> impl FnOnce(reqwest::Error) -> ClientError + '_ {
    move |source| ClientError::Http {
        context: context.to_owned(),
        source,
    }
}

/// Command-line options that say where the API is: `--api URL` (or `SPINE_API`, default
/// http://127.0.0.1:8480) and `--token TOKEN` (or `SPINE_TOKEN`), for `#[command(flatten)]`.
#[derive(clap::Args, Debug, Clone)]
pub struct ApiArgs {
    /// Base URL of the dispatcher's HTTP API.
    #[arg(long, env = "SPINE_API", default_value = "http://127.0.0.1:8480")]
    pub api: String,
    /// Bearer token (or SPINE_TOKEN).
    #[arg(long, env = "SPINE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

impl ApiArgs {
    /// A client of that API.
    pub fn client(&self) -> Result<Client, ClientError> {
        Client::new(&self.api, self.token.clone())
    }
}

/// The base URL and the bearer token of a dispatcher's HTTP API.
#[derive(Clone, Debug)]
pub struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Client {
    /// A client of the API at `base` (such as `http://127.0.0.1:8480`).
    pub fn new(base: &str, token: Option<String>) -> Result<Self, ClientError> {
        // Talks to the configured URL only: no proxy from the environment.
        let http = reqwest::Client::builder()
            .no_proxy()
            .build()
            .map_err(http("building the HTTP client"))?;
        Ok(Client {
            base: base.trim_end_matches('/').to_owned(),
            token,
            http,
        })
    }

    /// A request to `path` (authenticated when a token is set).
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    /// Sends a request and reads its JSON answer; an error status becomes [`ClientError::Api`].
    pub async fn call(
        &self,
        req: reqwest::RequestBuilder,
        context: &str,
    ) -> Result<Value, ClientError> {
        let resp = req.send().await.map_err(http(context))?;
        check(resp, context).await
    }

    /// `POST /v1/jobs` with a JSON body (docs/dispatcher.md); returns the job id.
    pub async fn submit(&self, body: &Value) -> Result<String, ClientError> {
        let req = self
            .request(reqwest::Method::POST, "/v1/jobs")
            .header("content-type", "application/json")
            .body(body.to_string());
        let accepted = self.call(req, "submitting").await?;
        accepted["id"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| ClientError::Protocol(format!("no job id in {accepted}")))
    }

    /// `GET /v1/jobs/{id}`: the job, with its output once it succeeded.
    pub async fn job(&self, id: &str) -> Result<Value, ClientError> {
        let req = self.request(reqwest::Method::GET, &format!("/v1/jobs/{id}"));
        self.call(req, "reading the job").await
    }

    /// Follows `GET /v1/jobs/{id}/events` until the job ends, calling `progress` with each
    /// report (percent, message); returns the whole final job.
    pub async fn follow(
        &self,
        id: &str,
        mut progress: impl FnMut(Option<u64>, &str),
    ) -> Result<Value, ClientError> {
        self.events(id, |event, data| match event {
            "progress" => progress(
                data["percent"].as_u64(),
                data["message"].as_str().unwrap_or(""),
            ),
            "state" => progress(
                data["percent"].as_u64(),
                data["state"].as_str().unwrap_or(""),
            ),
            _ => {}
        })
        .await
    }

    /// Follows `GET /v1/jobs/{id}/events` until the job ends, calling `on_event` with each
    /// event's name (`state`, `progress`, `partial`, `lagged`) and data; returns the whole
    /// final job.
    pub async fn events(
        &self,
        id: &str,
        mut on_event: impl FnMut(&str, &Value),
    ) -> Result<Value, ClientError> {
        let ctx = "following the job";
        let mut resp = self
            .request(reqwest::Method::GET, &format!("/v1/jobs/{id}/events"))
            .send()
            .await
            .map_err(http(ctx))?;
        if !resp.status().is_success() {
            return Err(check(resp, ctx).await.err().unwrap_or_else(|| {
                ClientError::Protocol("an error status with a success body".into())
            }));
        }
        // Server-sent events: "event:" and "data:" lines, a blank line ends one.
        let mut buf = String::new();
        let mut event = String::new();
        while let Some(chunk) = resp.chunk().await.map_err(http(ctx))? {
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(i) = buf.find('\n') {
                let line = buf[..i].trim_end_matches('\r').to_owned();
                buf.drain(..=i);
                if let Some(e) = line.strip_prefix("event:") {
                    event = e.trim().to_owned();
                } else if let Some(d) = line.strip_prefix("data:") {
                    let data: Value = serde_json::from_str(d.trim()).unwrap_or(Value::Null);
                    if event == "final" {
                        // The final event carries the job; fetch it whole (outputs included).
                        return self.job(id).await;
                    }
                    on_event(&event, &data);
                }
            }
        }
        Err(ClientError::Protocol(
            "the event stream ended before the job did".into(),
        ))
    }
}

impl Client {
    /// [`Client::follow`] with a progress bar on standard error (drawn only on a terminal),
    /// labelled `label`; returns the final job.
    pub async fn follow_with_bar(&self, id: &str, label: &str) -> Result<Value, ClientError> {
        let bar = indicatif::ProgressBar::new(100);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix} {spinner} [{elapsed_precise}] {bar:40} {pos:>3}% {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_prefix(label.to_owned());
        bar.enable_steady_tick(std::time::Duration::from_millis(120));
        let result = self
            .follow(id, |percent, message| {
                if let Some(p) = percent {
                    bar.set_position(p);
                }
                bar.set_message(message.to_owned());
            })
            .await;
        match &result {
            Ok(_) => bar.finish_and_clear(),
            Err(_) => bar.abandon(),
        }
        result
    }
}

/// Turns an error response into [`ClientError::Api`].
async fn check(resp: reqwest::Response, context: &str) -> Result<Value, ClientError> {
    let status = resp.status();
    let text = resp.text().await.map_err(http(context))?;
    let body: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    if status.is_success() {
        return Ok(body);
    }
    Err(ClientError::Api {
        status: status.as_u16(),
        condition: body["error"].as_str().unwrap_or("error").to_owned(),
        field: body["field"].as_str().map(str::to_owned),
        message: body["message"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| body.to_string()),
    })
}

/// The output bytes of a finished job, or why there are none.
pub fn output(job: &Value) -> Result<Vec<u8>, ClientError> {
    let id = job["id"].as_str().unwrap_or("").to_owned();
    match job["state"].as_str() {
        Some("succeeded") => base64::engine::general_purpose::STANDARD
            .decode(job["result"]["output"].as_str().unwrap_or(""))
            .map_err(|e| ClientError::Protocol(format!("output of {id} is not base64: {e}"))),
        state => Err(ClientError::JobFailed {
            id,
            state: state.unwrap_or("unknown").to_owned(),
            condition: job["error"]["condition"].as_str().unwrap_or("").to_owned(),
            message: job["error"]["message"].as_str().unwrap_or("").to_owned(),
        }),
    }
}

/// Base64 of bytes, as the API's `input` field takes them.
pub fn base64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// One fragment per regular file of `dir` whose name passes `keep`, in name order, labelled
/// with the file name: the input of a map/reduce job over a folder.
pub fn fragments_from_dir(
    dir: &Path,
    keep: impl Fn(&str) -> bool,
) -> Result<Vec<Fragment>, ClientError> {
    let err = |path: &Path| {
        let path = path.display().to_string();
        move |source| ClientError::File { path, source }
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(err(dir))? {
        let entry = entry.map_err(err(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.file_type().map_err(err(&entry.path()))?.is_file() && keep(&name) {
            files.push((name, entry.path()));
        }
    }
    files.sort();
    files
        .into_iter()
        .map(|(name, path)| {
            let data = std::fs::read(&path).map_err(err(&path))?;
            Ok(Fragment::new(data).with_name(name))
        })
        .collect()
}
