//! Admission: the layer every route but `/healthz` goes through before its handler runs. It
//! authenticates the caller from the headers alone (bearer tokens compared in constant time,
//! or the local operator when no token is configured), refuses a declared body over the
//! route's limit, bounds the request's time, and hands the handler a [`Caller`]; handlers then
//! read their body with [`read_body`], within the same limit.

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::StreamExt as _;
use spine_protocol::CapabilityName;

use super::error::ApiError;
use super::serve::is_loopback;
use super::{max_body, Handle, SMALL_BODY};
use crate::jobs::JobRecord;
use crate::policy::{Capabilities, Grant};

/// Who is calling: the token's name (or `local`) and what it may do. [`admit`] puts it in
/// the request's extensions; handlers take it as an extractor.
#[derive(Clone)]
pub(super) struct Caller {
    pub(super) name: String,
    pub(super) grant: Grant,
    /// May read `/metrics`: the local operator, an operator token (every capability and
    /// every job) or a token with `metrics = true`.
    pub(super) metrics: bool,
}

impl Caller {
    pub(super) fn may_run(&self, cap: &CapabilityName) -> bool {
        self.grant.capabilities.allows(cap)
    }

    /// Refuses a capability the token may not run (403).
    pub(super) fn check_may_run(&self, cap: &CapabilityName) -> Result<(), ApiError> {
        if self.may_run(cap) {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "not-authorized",
                format!("token '{}' may not run {cap}", self.name),
            ))
        }
    }

    /// The `submitter` of the jobs it submits.
    pub(super) fn submitter(&self) -> String {
        format!("http:{}", self.name)
    }

    /// Refuses a job submitted by someone else, unless the token has `all_jobs`.
    pub(super) fn check_sees(&self, job: &JobRecord) -> Result<(), ApiError> {
        if self.grant.may_see(&self.submitter(), &job.spec.submitter) {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "not-authorized",
                format!(
                    "job {} was submitted by someone else (token '{}' has no all_jobs)",
                    job.id, self.name
                ),
            ))
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        parts.extensions.get::<Caller>().cloned().ok_or_else(|| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the request was not authenticated (a route outside the admission layer)",
            )
        })
    }
}

/// The console's cookie holding the token (HTTP-only: the page's script never sees it).
pub(super) const TOKEN_COOKIE: &str = "spine_token";
/// The console's CSRF cookie: the page echoes its value in [`CSRF_HEADER`] on every change,
/// which a page of another site cannot read nor send.
pub(super) const CSRF_COOKIE: &str = "spine_csrf";
/// The header a cookie-authenticated change must carry.
pub(super) const CSRF_HEADER: &str = "x-spine-csrf";

/// A `Set-Cookie` value for the console: path `/`, `SameSite=Strict` (a page of another site
/// never sends it), HTTP-only for the token, `Secure` when the API is served over HTTPS.
pub(super) fn cookie(name: &str, value: &str, http_only: bool, secure: bool) -> String {
    let mut c = format!("{name}={value}; Path=/; SameSite=Strict");
    if http_only {
        c.push_str("; HttpOnly");
    }
    if secure {
        c.push_str("; Secure");
    }
    c
}

/// A token as a cookie value (base64url: a token may hold characters a cookie may not).
pub(super) fn encode_cookie(token: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token)
}

fn decode_cookie(v: &str) -> Option<String> {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(v)
        .ok()?;
    String::from_utf8(bytes).ok()
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Refuses a change a page of another site (or another port of this host) asked for: the
/// browser says so in `Sec-Fetch-Site`. Without tokens the API trusts loopback clients, and a
/// page in the operator's browser is one; API clients (curl, the client libraries) send no
/// such header.
pub(super) fn check_same_origin(headers: &HeaderMap) -> Result<(), ApiError> {
    match headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        Some("cross-site") | Some("same-site") => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "cross-origin",
            "a page of another origin may not change anything here (Sec-Fetch-Site)",
        )),
        _ => Ok(()),
    }
}

/// The configured token equal to `given`, compared by SHA-256 digests, every byte of every
/// token: timing says nothing about which prefix matched nor how long the configured tokens
/// are.
pub(super) fn find_token<'a>(
    h: &'a Handle,
    given: &str,
) -> Option<&'a (crate::policy::HttpToken, Grant)> {
    use sha2::Digest as _;
    let given = sha2::Sha256::digest(given.as_bytes());
    let mut found = None;
    for entry in h.tokens.iter() {
        let same = sha2::Sha256::digest(entry.0.token.as_bytes())
            .iter()
            .zip(given.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
        if same {
            found = Some(entry);
        }
    }
    found
}

pub(super) fn authenticate(
    h: &Handle,
    method: &Method,
    headers: &HeaderMap,
    peer: SocketAddr,
) -> Result<Caller, ApiError> {
    if method != Method::GET && method != Method::HEAD {
        check_same_origin(headers)?;
    }
    if h.tokens.is_empty() {
        if is_loopback(peer) {
            // Without tokens the API is the local operator's: everything, every job.
            return Ok(Caller {
                name: "local".into(),
                grant: Grant {
                    capabilities: Capabilities::all(),
                    all_jobs: true,
                    events: true,
                },
                metrics: true,
            });
        }
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "not-authorized",
            "no API tokens are configured: only loopback clients are served",
        ));
    }
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let given = match bearer {
        Some(b) => b,
        None => {
            // The console's cookie, and for a change the CSRF header that proves the page
            // that sent it is the console's own.
            let Some(token) = cookie_value(headers, TOKEN_COOKIE).and_then(decode_cookie) else {
                return Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "not-authorized",
                    "missing 'Authorization: Bearer <token>' (or sign in to the console at /ui)",
                ));
            };
            if method != Method::GET && method != Method::HEAD {
                let want = cookie_value(headers, CSRF_COOKIE);
                let got = headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok());
                if want.is_none() || want != got {
                    return Err(ApiError::new(
                        StatusCode::FORBIDDEN,
                        "csrf",
                        "a change signed in by the console's cookie needs the X-Spine-CSRF header equal to the spine_csrf cookie",
                    ));
                }
            }
            token
        }
    };
    let (t, grant) = find_token(h, &given).ok_or_else(|| {
        ApiError::new(StatusCode::UNAUTHORIZED, "not-authorized", "unknown token")
    })?;
    let operator = grant.all_jobs && t.capabilities.iter().any(|c| c == "*");
    Ok(Caller {
        name: t.name.clone(),
        grant: grant.clone(),
        metrics: t.metrics || operator,
    })
}

/// The largest body `method path` may carry: a submission's, or [`SMALL_BODY`].
fn body_limit(h: &Handle, method: &Method, path: &str) -> usize {
    if method == Method::POST && (path == "/v1/jobs:batch" || path == "/v1/events") {
        // Many JSON jobs, read whole.
        max_body(h.max_json_input)
    } else if method == Method::POST && path == "/v1/jobs" {
        // A JSON body is read whole (its input in base64); a raw upload streams to disk.
        max_body(h.max_json_input).max(usize::try_from(h.max_input).unwrap_or(usize::MAX))
    } else if method == Method::PUT && path == "/v1/blobs" {
        usize::try_from(h.max_input).unwrap_or(usize::MAX)
    } else {
        SMALL_BODY
    }
}

fn too_large_body(limit: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too-large",
        format!("the request body is over the limit of {limit} bytes for this endpoint"),
    )
}

/// The admission layer in front of every route but `/healthz`: authenticates from the headers
/// before anything reads the body (a refused request's body is never read: hyper closes the
/// connection instead), refuses a declared `Content-Length` over the route's limit at once,
/// and bounds the time until the answer starts by `http_request_timeout`.
///
/// The request timeout is this `tokio::time::timeout` rather than tower-http's
/// `TimeoutLayer` so that the answer is the API's JSON error; like that layer it covers the
/// handler, body upload included, but not an event stream once its headers are sent. The
/// header-read timeout cannot be a layer at all (no layer runs before the headers are
/// parsed): it is hyper's, in [`serve_connection`].
pub(super) async fn admit(State(h): State<Handle>, mut req: Request, next: Next) -> Response {
    let Some(ConnectInfo(peer)) = req.extensions().get::<ConnectInfo<SocketAddr>>().copied() else {
        return ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "no peer address (the router is served without serve())",
        )
        .into_response();
    };
    let caller = match authenticate(&h, req.method(), req.headers(), peer) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let limit = body_limit(&h, req.method(), req.uri().path());
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return too_large_body(limit).into_response();
    }
    req.extensions_mut().insert(caller);
    match tokio::time::timeout(h.limits.request_timeout, next.run(req)).await {
        Ok(r) => r,
        Err(_) => ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request-timeout",
            format!(
                "the request took longer than {} (http_request_timeout)",
                spine_protocol::units::format_duration(h.limits.request_timeout)
            ),
        )
        .into_response(),
    }
}

/// Reads a body of at most `limit` bytes (the declared length was checked by [`admit`]; a
/// chunked body is cut off here).
pub(super) async fn read_body(
    body: Body,
    limit: usize,
    declared: usize,
) -> Result<Vec<u8>, ApiError> {
    let mut stream = body.into_data_stream();
    let mut buf = Vec::with_capacity(declared.min(limit).min(1 << 20));
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad-request",
                format!("reading the request body: {e}"),
            )
        })?;
        if buf.len() + chunk.len() > limit {
            return Err(too_large_body(limit));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf)
}
#[cfg(test)]
mod tests {
    use axum::http::Method;
    use tokio::sync::{broadcast, mpsc};

    use super::*;
    use crate::config::DispatcherConfig;

    #[test]
    fn only_submissions_and_blob_uploads_take_large_bodies() {
        let (tx, _) = mpsc::channel(1);
        let (events, _) = broadcast::channel(1);
        let cfg = DispatcherConfig::default();
        let h = Handle::new(
            &cfg,
            &crate::policy::Policy::from_config(&cfg).unwrap(),
            tx,
            events,
        );
        // A submission: a raw upload of max_input (streamed to disk), or a JSON body with
        // max_blob of base64 (96 MiB for 64 MiB).
        assert_eq!(body_limit(&h, &Method::POST, "/v1/jobs"), 4 << 30);
        assert_eq!(body_limit(&h, &Method::PUT, "/v1/blobs"), 4 << 30);
        assert_eq!(max_body(h.max_json_input), 96 << 20);
        assert_eq!(body_limit(&h, &Method::GET, "/v1/jobs"), SMALL_BODY);
        assert_eq!(body_limit(&h, &Method::DELETE, "/v1/jobs/x"), SMALL_BODY);
    }

    #[test]
    fn events_are_posted_by_tokens_that_may_and_by_operators() {
        let (tx, _) = mpsc::channel(1);
        let (events, _) = broadcast::channel(1);
        let cfg = DispatcherConfig::from_toml(
            r#"
            [[http_token]]
            name = "ops"
            token = "ops-secret-0123456789"
            capabilities = ["*"]
            all_jobs = true
            [[http_token]]
            name = "hook"
            token = "hook-secret-0123456789"
            capabilities = []
            events = true
            [[http_token]]
            name = "app"
            token = "app-secret-0123456789"
            capabilities = ["text.*"]
            "#,
        )
        .unwrap();
        let h = Handle::new(
            &cfg,
            &crate::policy::Policy::from_config(&cfg).unwrap(),
            tx,
            events,
        );
        let peer: SocketAddr = "192.0.2.1:4000".parse().unwrap();
        let caller = |token: &str| {
            let mut headers = HeaderMap::new();
            headers.insert("authorization", format!("Bearer {token}").parse().unwrap());
            authenticate(&h, &Method::POST, &headers, peer).unwrap()
        };
        let ops = caller("ops-secret-0123456789");
        let hook = caller("hook-secret-0123456789");
        let app = caller("app-secret-0123456789");
        assert_eq!(
            (ops.grant.events, hook.grant.events, app.grant.events),
            (true, true, false)
        );
        // The sender of events runs nothing itself.
        assert!(!hook.may_run(&"text.upper".parse().unwrap()));
        assert_eq!(body_limit(&h, &Method::POST, "/v1/events"), 96 << 20);
    }
}
