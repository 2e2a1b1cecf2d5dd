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

use std::net::IpAddr;
use std::path::{Path, PathBuf};

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
    #[error("job {id} {state}: {}{message} ({condition})", field.as_ref().map(|f| format!("field '{f}': ")).unwrap_or_default())]
    JobFailed {
        /// The job.
        id: String,
        /// Its final state.
        state: String,
        /// Spine condition.
        condition: String,
        /// The argument at fault (`bad-arguments`), as the agent named it.
        field: Option<String>,
        /// For people.
        message: String,
    },
    /// The server's certificate was refused (unknown issuer, wrong name, expired).
    #[error("{context}: the TLS certificate of {host} was refused ({reason}); if the dispatcher's certificate comes from a private CA or is self-signed, pass that CA's certificate with --ca-file (SPINE_CA_FILE)")]
    Certificate {
        /// What was being done.
        context: String,
        /// The host whose certificate it was.
        host: String,
        /// rustls's reason.
        reason: String,
        /// The transport error (not a `source`: `reason` says what it adds).
        error: reqwest::Error,
    },
    /// The TLS trust settings are unusable (the CA file cannot be read or holds no
    /// certificate, or the system's store is empty).
    #[error("--ca-file (SPINE_CA_FILE): {0}")]
    Trust(spine_tls::TlsError),
    /// An answer that does not fit the API.
    #[error("unexpected answer from the dispatcher: {0}")]
    Protocol(String),
    /// The token would cross the network in clear, and that was not allowed.
    #[error("{0}")]
    Insecure(String),
    /// The options contradict each other.
    #[error("{0}")]
    Usage(String),
    /// A local file could not be read.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// A transport error of `context`, telling a refused certificate apart (it needs a CA file,
/// not a retry).
fn http(context: &str) -> impl FnOnce(reqwest::Error) -> ClientError + '_ {
    move |source| {
        if let Some(reason) = spine_tls::certificate_error(&source).map(ToString::to_string) {
            let host = source
                .url()
                .and_then(|u| u.host_str())
                .unwrap_or("the server")
                .to_owned();
            return ClientError::Certificate {
                context: context.to_owned(),
                host,
                reason,
                error: source,
            };
        }
        ClientError::Http {
            context: context.to_owned(),
            source,
        }
    }
}

/// Command-line options that say where the API is and how to authenticate, for
/// `#[command(flatten)]`: `--api URL` (or `SPINE_API`, default http://127.0.0.1:8480), the
/// token from `SPINE_TOKEN`, `--token-file FILE` (or `SPINE_TOKEN_FILE`) or `--token TOKEN`,
/// `--ca-file FILE` (or `SPINE_CA_FILE`) to verify an `https://` API against a private CA, and
/// `--insecure` to send a token over plain HTTP to a non-loopback address.
#[derive(clap::Args, Debug, Clone)]
pub struct ApiArgs {
    /// Base URL of the dispatcher's HTTP API.
    #[arg(long, env = "SPINE_API", default_value = "http://127.0.0.1:8480")]
    pub api: String,
    /// Bearer token (or SPINE_TOKEN). On the command line it is visible to every user of the
    /// machine (ps, /proc): prefer SPINE_TOKEN or --token-file.
    #[arg(long, env = "SPINE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// File holding the bearer token (a trailing newline is stripped).
    #[arg(long, env = "SPINE_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Send the token even over plain http:// to an address that is not loopback, where
    /// anyone on the way can read it (prefer an https:// URL).
    #[arg(long, env = "SPINE_INSECURE")]
    pub insecure: bool,
    /// CA certificates (PEM) to verify an https:// API with, instead of the operating
    /// system's store: the dispatcher's private CA, or its self-signed certificate (the same
    /// meaning as `ca_file` in the agent's and dispatcher's `[tls]`).
    #[arg(long, env = "SPINE_CA_FILE", value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
}

impl ApiArgs {
    /// The token, from `--token`/`SPINE_TOKEN` or from the file of `--token-file`.
    pub fn token(&self) -> Result<Option<String>, ClientError> {
        match (&self.token, &self.token_file) {
            (Some(_), Some(_)) => Err(ClientError::Usage(
                "a token (--token or SPINE_TOKEN) and a token file (--token-file or SPINE_TOKEN_FILE) are both given: use one".into(),
            )),
            (Some(t), None) => Ok(Some(t.clone())),
            (None, Some(f)) => {
                let text = std::fs::read_to_string(f).map_err(|source| ClientError::File {
                    path: f.display().to_string(),
                    source,
                })?;
                let token = text.trim_end_matches(['\n', '\r']);
                if token.is_empty() {
                    return Err(ClientError::Usage(format!(
                        "{}: the token file is empty",
                        f.display()
                    )));
                }
                Ok(Some(token.to_owned()))
            }
            (None, None) => Ok(None),
        }
    }

    /// A client of that API. A token bound for plain HTTP off loopback is refused unless
    /// `--insecure`, and then sent with a warning on standard error.
    pub fn client(&self) -> Result<Client, ClientError> {
        let token = self.token()?;
        if token.is_some() {
            if let Some(host) = cleartext_host(&self.api) {
                if !self.insecure {
                    return Err(ClientError::Insecure(format!(
                        "refusing to send the API token in clear over http:// to {host}, which is not a loopback address: run the command on the dispatcher's machine or through a tunnel (ssh -L 8480:127.0.0.1:8480), or pass --insecure (SPINE_INSECURE=1) to send it anyway"
                    )));
                }
                eprintln!(
                    "spine: warning: sending the API token in clear over http:// to {host} (--insecure)"
                );
            }
        }
        Client::with_ca_file(&self.api, token, self.ca_file.as_deref())
    }
}

/// The host of `base` when a request there would travel in clear over the network: plain
/// `http://` to a host that is not a loopback address (nor `localhost`). `None` otherwise,
/// and for a URL that does not parse (the request fails with its own error).
pub fn cleartext_host(base: &str) -> Option<String> {
    let url = reqwest::Url::parse(base).ok()?;
    if url.scheme() != "http" {
        return None;
    }
    let host = url.host_str()?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = match bare.parse::<IpAddr>() {
        Ok(ip) => ip.to_canonical().is_loopback(),
        Err(_) => {
            let name = bare.trim_end_matches('.').to_ascii_lowercase();
            name == "localhost" || name.ends_with(".localhost")
        }
    };
    (!loopback).then(|| host.to_owned())
}

/// The base URL and the bearer token of a dispatcher's HTTP API.
#[derive(Clone, Debug)]
pub struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Client {
    /// A client of the API at `base` (such as `http://127.0.0.1:8480`); an `https://` API is
    /// verified against the operating system's certificate store.
    pub fn new(base: &str, token: Option<String>) -> Result<Self, ClientError> {
        Client::with_ca_file(base, token, None)
    }

    /// A client of the API at `base`; an `https://` API is verified against the CA
    /// certificates of `ca_file` (PEM) only, or without one the operating system's store.
    /// The trust is loaded only for an `https://` base, so that a plain-HTTP client works on a
    /// machine without a certificate store.
    pub fn with_ca_file(
        base: &str,
        token: Option<String>,
        ca_file: Option<&Path>,
    ) -> Result<Self, ClientError> {
        // Talks to the configured URL only: no proxy from the environment.
        let mut builder = reqwest::Client::builder().no_proxy();
        if base.trim_start().to_ascii_lowercase().starts_with("https:") {
            let tls = spine_tls::client_config_for_ca_file(ca_file).map_err(ClientError::Trust)?;
            builder = builder.use_preconfigured_tls(tls);
        }
        let http = builder.build().map_err(http("building the HTTP client"))?;
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

    /// `POST /v1/jobs` as a raw upload: the file at `input` is the body, streamed (never held
    /// whole in memory; the dispatcher streams it to its blob store), with `mime` as its
    /// Content-Type; `fields` (a JSON object of the job's other fields, `args` included) go in
    /// the query string. Returns the job id.
    pub async fn submit_file(
        &self,
        fields: &Value,
        input: &Path,
        mime: &str,
    ) -> Result<String, ClientError> {
        let mut query = Vec::new();
        for (k, v) in fields.as_object().into_iter().flatten() {
            match v {
                Value::Null => {}
                Value::String(s) => query.push((k.clone(), s.clone())),
                other => query.push((k.clone(), other.to_string())),
            }
        }
        let query = serde_urlencoded::to_string(&query)
            .map_err(|e| ClientError::Protocol(format!("encoding the job's fields: {e}")))?;
        let file = tokio::fs::File::open(input)
            .await
            .map_err(|e| ClientError::Protocol(format!("reading {}: {e}", input.display())))?;
        let len = file.metadata().await.map(|m| m.len()).ok();
        let stream = tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024);
        let mut req = self
            .request(reqwest::Method::POST, &format!("/v1/jobs?{query}"))
            .header("content-type", mime)
            .body(reqwest::Body::wrap_stream(stream));
        if let Some(n) = len {
            req = req.header("content-length", n);
        }
        let accepted = self.call(req, "uploading the input").await?;
        accepted["id"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| ClientError::Protocol(format!("no job id in {accepted}")))
    }

    /// `PUT /v1/blobs`: stores `body` (`len` bytes) in the dispatcher's blob store and
    /// returns a fragment naming it (`{"sha256", "size"}`, PROTOCOL.md §11.7.1), for a
    /// map/reduce job's fragment list. A dispatcher without blob endpoints (no `public_url`)
    /// answers [`ClientError::Api`] with status 404.
    pub async fn put_blob(
        &self,
        body: impl Into<reqwest::Body>,
        len: u64,
    ) -> Result<Fragment, ClientError> {
        let req = self
            .request(reqwest::Method::PUT, "/v1/blobs")
            .header("content-type", "application/octet-stream")
            .header("content-length", len)
            .body(body);
        let stored = self.call(req, "uploading a blob").await?;
        let (Some(hex), Some(size)) = (stored["sha256"].as_str(), stored["size"].as_u64()) else {
            return Err(ClientError::Protocol(format!(
                "no sha256 and size in {stored}"
            )));
        };
        let sha256 = parse_sha256(hex)
            .ok_or_else(|| ClientError::Protocol(format!("sha256 '{hex}' is not 64 hex digits")))?;
        Ok(Fragment::reference(sha256, size))
    }

    /// [`Client::put_blob`] of a file, streamed (never held whole in memory), labelled with
    /// its file name.
    pub async fn put_file(&self, path: &Path) -> Result<Fragment, ClientError> {
        let err = |source| ClientError::File {
            path: path.display().to_string(),
            source,
        };
        let file = tokio::fs::File::open(path).await.map_err(err)?;
        let len = file.metadata().await.map_err(err)?.len();
        let stream = tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024);
        let mut f = self
            .put_blob(reqwest::Body::wrap_stream(stream), len)
            .await?;
        f.name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        Ok(f)
    }

    /// Splits a text file into fragments of about `size` bytes, each cut after a newline
    /// (a line longer than `size` is cut where it is), and uploads each to the blob store:
    /// the fragment list of a map/reduce job over the file, by reference. The file is read
    /// one fragment at a time, so a file far larger than memory splits (into fragments that
    /// fit it). Fragments are labelled `name:index`.
    pub async fn put_file_split(
        &self,
        path: &Path,
        size: usize,
    ) -> Result<Vec<Fragment>, ClientError> {
        use tokio::io::AsyncReadExt as _;
        let err = |source| ClientError::File {
            path: path.display().to_string(),
            source,
        };
        let size = size.max(1);
        let name = path
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        let mut file = tokio::fs::File::open(path).await.map_err(err)?;
        let mut out = Vec::new();
        // What was read past the last cut: the start of the next fragment.
        let mut carry: Vec<u8> = Vec::new();
        let mut eof = false;
        while !eof || !carry.is_empty() {
            let mut piece = std::mem::take(&mut carry);
            while !eof && piece.len() < size {
                let start = piece.len();
                piece.resize(size, 0);
                let n = file.read(&mut piece[start..]).await.map_err(err)?;
                piece.truncate(start + n);
                eof = n == 0;
            }
            if piece.is_empty() {
                break;
            }
            if !eof {
                // Cut after the last newline of the piece; the rest starts the next one.
                if let Some(nl) = piece.iter().rposition(|b| *b == b'\n') {
                    carry = piece.split_off(nl + 1);
                }
            }
            let len = piece.len() as u64;
            let mut f = self.put_blob(piece, len).await?;
            f.name = Some(format!("{name}:{}", out.len()));
            out.push(f);
        }
        Ok(out)
    }

    /// A finished job's output: inline in the job (up to 64 KiB), or read from its
    /// `output_url` (`GET /v1/jobs/{id}/output`, streamed from the dispatcher's blob store).
    /// A job that did not succeed is [`ClientError::JobFailed`].
    pub async fn output(&self, job: &Value) -> Result<Vec<u8>, ClientError> {
        match (job["state"].as_str(), job["result"]["output_url"].as_str()) {
            (Some("succeeded"), Some(url)) if job["result"]["output"].is_null() => {
                let context = "reading the output";
                let resp = self
                    .request(reqwest::Method::GET, url)
                    .send()
                    .await
                    .map_err(http(context))?;
                if !resp.status().is_success() {
                    return check(resp, context).await.map(|_| Vec::new());
                }
                let bytes = resp.bytes().await.map_err(http(context))?;
                Ok(bytes.to_vec())
            }
            _ => output(job),
        }
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
        Some("succeeded") if job["result"]["output"].is_null() && !job["result"]["output_url"].is_null() => {
            Err(ClientError::Protocol(format!(
                "the output of {id} ({} bytes) is not inline: read it from its output_url ({}), as Client::output does",
                job["result"]["output_size"], job["result"]["output_url"]
            )))
        }
        Some("succeeded") => base64::engine::general_purpose::STANDARD
            .decode(job["result"]["output"].as_str().unwrap_or(""))
            .map_err(|e| ClientError::Protocol(format!("output of {id} is not base64: {e}"))),
        state => Err(ClientError::JobFailed {
            id,
            state: state.unwrap_or("unknown").to_owned(),
            condition: job["error"]["condition"].as_str().unwrap_or("").to_owned(),
            field: job["error"]["field"].as_str().map(str::to_owned),
            message: job["error"]["message"].as_str().unwrap_or("").to_owned(),
        }),
    }
}

/// 64 hex digits as the 32 bytes of a SHA-256.
fn parse_sha256(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// Base64 of bytes, as the API's `input` field takes them.
pub fn base64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// One fragment per regular file of `dir` whose name passes `keep`, in name order, labelled
/// with the file name: the input of a map/reduce job over a folder, inline (see
/// [`Client::put_file`] for the same by reference).
pub fn fragments_from_dir(
    dir: &Path,
    keep: impl Fn(&str) -> bool,
) -> Result<Vec<Fragment>, ClientError> {
    files_in_dir(dir, keep)?
        .into_iter()
        .map(|path| {
            let data = std::fs::read(&path).map_err(|source| ClientError::File {
                path: path.display().to_string(),
                source,
            })?;
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            let mut f = Fragment::new(data);
            f.name = name;
            Ok(f)
        })
        .collect()
}

/// The regular files of `dir` whose names pass `keep`, in name order.
pub fn files_in_dir(dir: &Path, keep: impl Fn(&str) -> bool) -> Result<Vec<PathBuf>, ClientError> {
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
    Ok(files.into_iter().map(|(_, p)| p).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_http_off_loopback_is_cleartext() {
        for (url, host) in [
            ("http://10.0.0.5:8480", Some("10.0.0.5")),
            (
                "http://dispatcher.example.com:8480/",
                Some("dispatcher.example.com"),
            ),
            ("http://[2001:db8::1]:8480", Some("[2001:db8::1]")),
            ("http://127.0.0.1:8480", None),
            ("http://127.3.2.1:8480", None),
            ("http://[::1]:8480", None),
            ("http://[::ffff:127.0.0.1]:8480", None),
            ("http://localhost:8480", None),
            ("http://api.localhost:8480", None),
            ("https://dispatcher.example.com", None),
            ("not a url", None),
        ] {
            assert_eq!(cleartext_host(url).as_deref(), host, "{url}");
        }
    }

    fn args(api: &str, token: Option<&str>, insecure: bool) -> ApiArgs {
        ApiArgs {
            api: api.into(),
            token: token.map(str::to_owned),
            token_file: None,
            insecure,
            ca_file: None,
        }
    }

    #[test]
    fn a_token_in_clear_off_loopback_needs_insecure() {
        let e = args("http://10.0.0.5:8480", Some("secret"), false)
            .client()
            .unwrap_err();
        assert!(matches!(e, ClientError::Insecure(_)), "{e}");
        assert!(e.to_string().contains("--insecure"), "{e}");
        assert!(args("http://10.0.0.5:8480", Some("secret"), true)
            .client()
            .is_ok());
        // No token: nothing secret to send.
        assert!(args("http://10.0.0.5:8480", None, false).client().is_ok());
        assert!(args("http://127.0.0.1:8480", Some("secret"), false)
            .client()
            .is_ok());
    }

    #[test]
    fn the_token_comes_from_a_file_without_its_newline() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("token");
        std::fs::write(&f, "s3cret-token\n").unwrap();
        let mut a = args("http://127.0.0.1:8480", None, false);
        a.token_file = Some(f.clone());
        assert_eq!(a.token().unwrap().as_deref(), Some("s3cret-token"));
        a.token = Some("other".into());
        assert!(matches!(a.token(), Err(ClientError::Usage(_))));
        a.token = None;
        a.token_file = Some(dir.path().join("missing"));
        assert!(matches!(a.token(), Err(ClientError::File { .. })));
        std::fs::write(&f, "\n").unwrap();
        a.token_file = Some(f);
        assert!(matches!(a.token(), Err(ClientError::Usage(_))));
    }

    #[test]
    fn a_failed_job_names_the_argument_at_fault() {
        let job = serde_json::json!({
            "id": "j1", "state": "failed",
            "error": {"condition": "bad-arguments", "field": "size", "message": "must be an integer from 1 to 16384"},
        });
        assert_eq!(
            output(&job).unwrap_err().to_string(),
            "job j1 failed: field 'size': must be an integer from 1 to 16384 (bad-arguments)"
        );
        let job = serde_json::json!({
            "id": "j2", "state": "timed-out",
            "error": {"condition": "deadline-exceeded", "message": "deadline passed"},
        });
        assert_eq!(
            output(&job).unwrap_err().to_string(),
            "job j2 timed-out: deadline passed (deadline-exceeded)"
        );
    }
}
