//! A standby passes on to the leader what only the leader can do or knows
//! (docs/dispatcher.md, "Running several dispatchers").
//!
//! A webhook sender, an operator's script, the console or a load balancer in front of every
//! dispatcher knows one URL and does not follow a standby's `503 standby` to the leader; and
//! only the leader can do these: an event's jobs are made by the leader's rules, their keys
//! checked against the leader's jobs; a drain is answered once the agent answered the leader;
//! the leader keeps the rules, the job table (lists, a job's steps) and runs the canaries. So a
//! standby asked for one of these (events, drains, rule changes and lists, job lists and
//! trees, canaries) checks the caller and the request as it would (the token's grant, the
//! webhook's signature, the body), then sends the same request — method, path, headers and
//! body — to the leader's `public_url`, and answers with the leader's answer: the caller's
//! `202` means the leader stored the jobs. The leader checks the token or the signature again:
//! the standby adds no authority of its own. It is refused as before (503 `standby`, naming the
//! leader) when no leader is known, when the leader cannot be reached, or when the request was
//! passed on already (two dispatchers that each take the other for the leader, for the moment
//! an election takes, would otherwise bounce it between them).
//!
//! A submission (`POST /v1/jobs` with a JSON body) is passed on too, as the quick path
//! ([`submit_to_leader`]): the leader stores and places it in one commit — a small one
//! gathered with others into one request ([`super::pass`]). A standby can do it itself, so
//! when the leader is not reachable it stores the job for the leader instead of refusing.

use std::path::Path;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderName, Method, Uri};
use axum::response::Response;

use super::error::ApiError;
use super::pass::{response, Outcome, Passer, MAX_ITEM_BODY};
use super::Handle;

/// The header a passed-on request carries, naming the standby: a standby does not pass such a
/// request on again.
pub(crate) const FORWARDED_BY: &str = "spine-forwarded-by";

/// How long a passed-on event stream may stay silent (the leader's keep-alives come every
/// 15 s).
const STREAM_SILENCE: Duration = Duration::from_secs(60);

/// How long a standby waits for the leader's answer (an event's answer comes once its jobs
/// are stored, a drain's once the agent answered: within 10 s).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// The HTTP clients a standby reaches the leader with.
pub(crate) struct Forwarder {
    client: reqwest::Client,
    /// For event streams: no limit on the whole answer, which lasts as long as the stream.
    streams: reqwest::Client,
    /// This dispatcher, as the passed-on requests name it ([`FORWARDED_BY`]).
    by: String,
    /// Small submissions, passed on several at a time (started on first use).
    passer: std::sync::OnceLock<Passer>,
}

impl Forwarder {
    /// A client that verifies the leader's HTTPS certificate against `peer_ca` (or the
    /// system's roots), follows no redirect and uses no proxy from the environment.
    pub(crate) fn new(peer_ca: Option<&Path>, by: String) -> Result<Forwarder, String> {
        let tls =
            spine_tls::client_config_for_ca_file(peer_ca).map_err(|e| format!("peer_ca: {e}"))?;
        let builder = || {
            reqwest::Client::builder()
                .use_preconfigured_tls(tls.clone())
                .connect_timeout(Duration::from_secs(5))
                .redirect(reqwest::redirect::Policy::none())
                .no_proxy()
                .tcp_nodelay(true)
        };
        let built = |b: reqwest::ClientBuilder| {
            b.build()
                .map_err(|e| format!("the HTTP client for reaching the leader: {e}"))
        };
        Ok(Forwarder {
            client: built(builder().timeout(ANSWER_TIMEOUT))?,
            // The leader sends a keep-alive comment every 15 s: a minute of silence is a
            // leader gone without closing.
            streams: built(builder().read_timeout(STREAM_SILENCE))?,
            by,
            passer: std::sync::OnceLock::new(),
        })
    }

    /// The queue of submissions for the leader ([`super::pass`]), started on first use.
    pub(crate) fn passer(&self) -> &Passer {
        self.passer
            .get_or_init(|| Passer::start(self.client.clone(), self.by.clone()))
    }

    /// The passed-on submissions' figures for `/metrics`, once any went.
    pub(crate) fn metrics(&self) -> String {
        let Some(p) = self.passer.get() else {
            return String::new();
        };
        format!(
            "# HELP spine_passed_submissions_total Submissions this dispatcher passed on to the leader while standing by, several per request.\n\
             # TYPE spine_passed_submissions_total counter\n\
             spine_passed_submissions_total {}\n\
             # HELP spine_passed_requests_total Requests that carried them to the leader.\n\
             # TYPE spine_passed_requests_total counter\n\
             spine_passed_requests_total {}\n",
            p.submissions.load(std::sync::atomic::Ordering::Relaxed),
            p.requests.load(std::sync::atomic::Ordering::Relaxed),
        )
    }
}

/// Headers that belong to one connection, not to the request: not passed on (RFC 9110
/// §7.6.1), nor `Host` and `Content-Length`, which the client sets for the new request.
fn connection_header(name: &HeaderName) -> bool {
    [
        header::CONNECTION,
        header::HOST,
        header::CONTENT_LENGTH,
        header::TRANSFER_ENCODING,
        header::TE,
        header::TRAILER,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
    ]
    .contains(name)
        || name.as_str() == "keep-alive"
}

/// At a standby, the leader's answer to this request (`method`, `uri`, `headers` and `body`,
/// sent on to it); None when this dispatcher leads, or is alone.
pub(crate) async fn to_leader(
    h: &Handle,
    method: Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Option<Response>, ApiError> {
    pass_on(h, method, uri, headers, Some(body)).await
}

/// At a standby, the leader's event stream (`GET /v1/events/stream` with the caller's
/// filter), passed through as it comes; None when this dispatcher leads. The stream ends when
/// the leader's does (it stopped leading, or died): the client reconnects, as to any
/// server-sent event stream, and the standby it reaches passes it on to the next leader.
pub(crate) async fn stream_from_leader(
    h: &Handle,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<Option<Response>, ApiError> {
    pass_on(h, Method::GET, uri, headers, None).await
}

/// How long a standby waits for the leader's answer to a submission without `wait`: the
/// leader answers once the job is stored, within milliseconds; a leader that accepted the
/// connection and says nothing is paused, and the caller had better retry elsewhere.
const SUBMIT_TIMEOUT: Duration = Duration::from_secs(2);

/// What became of a submission at a standby ([`submit_to_leader`]).
pub(crate) enum Passed {
    /// The leader's answer, for the caller.
    Answer(Response),
    /// Not delivered to any leader (this dispatcher leads or is alone, no leader is known or
    /// it has not renewed its lease lately, the leader refused the connection, or the request
    /// came passed on already): the submission is stored here, for the leader.
    StoreHere,
}

/// At a standby, a submission (`POST /v1/jobs` with a JSON body, checked already) passed on
/// to the leader, which stores and places it at once: one commit, no hand-over through the
/// store. `wait` is the caller's, for which the leader holds the request. When the request
/// did not reach the leader ([`Passed::StoreHere`]) the standby stores the job for it, as
/// before; when it did and no answer came (a leader paused, or dead in between), the caller
/// gets 503 `standby` and retries, with its idempotency key, which makes it one job.
pub(crate) async fn submit_to_leader(
    h: &Handle,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
    wait: Option<Duration>,
) -> Result<Passed, ApiError> {
    if h.standby().is_none() || headers.contains_key(FORWARDED_BY) {
        return Ok(Passed::StoreHere);
    }
    let leader = h
        .leadership()
        .filter(|l| l.leader_lively(std::time::Instant::now()))
        .and_then(|l| l.leader_url().map(str::to_owned));
    let (Some(fw), Some(leader)) = (h.forward.as_ref(), leader) else {
        return Ok(Passed::StoreHere);
    };
    if body.len() <= MAX_ITEM_BODY {
        // Gathered with others: the caller's own headers (each a string, as a small JSON
        // submission's are; one that is not goes on alone).
        let own: Option<Vec<(&str, &str)>> = headers
            .iter()
            .filter(|(name, _)| !connection_header(name))
            .map(|(name, value)| value.to_str().ok().map(|v| (name.as_str(), v)))
            .collect();
        if let Some(own) = own {
            return match fw.passer().pass(&leader, &own, wait, body).await {
                Outcome::Answer(status, answer, retry) => {
                    Ok(Passed::Answer(response(status, answer, retry)))
                }
                Outcome::StoreHere => Ok(Passed::StoreHere),
                Outcome::Lost(why) => Err(ApiError::standby_unreachable(&leader, &why)),
            };
        }
    }
    let timeout = wait.map_or(SUBMIT_TIMEOUT, |w| w + SUBMIT_TIMEOUT);
    let req = request(fw, &fw.client, &leader, Method::POST, uri, headers)
        .timeout(timeout)
        .body(body.to_vec());
    match req.send().await {
        Err(e) if e.is_connect() => {
            tracing::debug!(leader = %leader, "the leader is not reachable: the submission is stored here for it: {e}");
            Ok(Passed::StoreHere)
        }
        Err(e) => Err(unreachable(&leader, e)),
        Ok(answer) => relay(answer, &leader, true).await.map(Passed::Answer),
    }
}

/// [`to_leader`] with a `body` (the answer read whole, within [`ANSWER_TIMEOUT`]), or
/// [`stream_from_leader`] without one (the answer passed through as it comes).
async fn pass_on(
    h: &Handle,
    method: Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: Option<&[u8]>,
) -> Result<Option<Response>, ApiError> {
    let Some(refusal) = h.standby() else {
        return Ok(None);
    };
    let leader = h
        .leadership()
        .and_then(|l| l.leader_url().map(str::to_owned));
    let (Some(fw), Some(leader)) = (h.forward.as_ref(), leader) else {
        return Err(refusal);
    };
    if headers.contains_key(FORWARDED_BY) {
        return Err(refusal);
    }
    let client = if body.is_some() {
        &fw.client
    } else {
        &fw.streams
    };
    let mut req = request(fw, client, &leader, method, uri, headers);
    if let Some(body) = body {
        req = req.body(body.to_vec());
    }
    let answer = req.send().await.map_err(|e| unreachable(&leader, e))?;
    relay(answer, &leader, body.is_some()).await.map(Some)
}

/// The same request (method, path and query, the request's own headers) to the leader at
/// `leader`, marked as passed on by this dispatcher.
fn request(
    fw: &Forwarder,
    client: &reqwest::Client,
    leader: &str,
    method: Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> reqwest::RequestBuilder {
    let path = uri.path_and_query().map_or(uri.path(), |p| p.as_str());
    let url = format!("{}{path}", leader.trim_end_matches('/'));
    let mut req = client.request(method, &url).header(FORWARDED_BY, &fw.by);
    for (name, value) in headers {
        if !connection_header(name) {
            req = req.header(name, value);
        }
    }
    req
}

/// 503 `standby` naming the leader, which could not be reached or did not answer.
fn unreachable(leader: &str, e: reqwest::Error) -> ApiError {
    tracing::warn!(leader = %leader, "could not pass a request on to the leader: {e}");
    ApiError::standby_unreachable(leader, &e.to_string())
}

/// The leader's answer as this dispatcher's: its status, type, caching and `Retry-After`,
/// and its body — read `whole`, or passed through as it comes (a stream).
async fn relay(answer: reqwest::Response, leader: &str, whole: bool) -> Result<Response, ApiError> {
    let mut out = Response::builder().status(answer.status());
    for name in [
        header::CONTENT_TYPE,
        header::CACHE_CONTROL,
        header::RETRY_AFTER,
    ] {
        if let Some(v) = answer.headers().get(&name) {
            out = out.header(name, v);
        }
    }
    let body = if whole {
        Body::from(answer.bytes().await.map_err(|e| unreachable(leader, e))?)
    } else {
        Body::from_stream(answer.bytes_stream())
    };
    out.body(body)
        .map_err(|e| ApiError::standby_unreachable(leader, &e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_s_own_headers_go_on_and_the_connection_s_do_not() {
        let kept = [
            "authorization",
            "content-type",
            "ce-id",
            "ce-specversion",
            "x-hub-signature-256",
            "x-github-event",
            "origin",
        ];
        for name in kept {
            assert!(!connection_header(&HeaderName::from_static(name)), "{name}");
        }
        let dropped = [
            "connection",
            "host",
            "content-length",
            "transfer-encoding",
            "te",
            "trailer",
            "upgrade",
            "proxy-authorization",
            "keep-alive",
        ];
        for name in dropped {
            assert!(connection_header(&HeaderName::from_static(name)), "{name}");
        }
    }

    #[test]
    fn an_unreadable_peer_ca_is_refused_naming_it() {
        let err = Forwarder::new(Some(Path::new("/nonexistent/ca.pem")), "d@x/1".into())
            .err()
            .expect("refused");
        assert!(err.starts_with("peer_ca: /nonexistent/ca.pem"), "{err}");
    }
}
