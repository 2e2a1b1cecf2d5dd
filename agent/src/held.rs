//! Outputs this agent keeps and serves itself (`data_listen`, docs/PROTOCOL.md §13.5): the
//! map/reduce data-locality path.
//!
//! A job whose `<keep/>` asks for it (a map step, sent by a 1.1 dispatcher to an agent that
//! advertised `serves`) has its output over the inline limit written here by the driver
//! ([`Held::put`], content-addressed, under the keep directory) instead of uploaded to the
//! dispatcher; the result names the agent's URL. The reduce steps that take it fetch it from
//! here with the dispatcher's signed URLs ([`serve`]); a reduce placed on this same agent
//! reads the file directly ([`Held::local`]), so the bytes never cross the network. The key
//! that checks those URLs comes with each `<keep/>` (derived for this agent by the
//! dispatcher, [`UrlKey::for_holder`]); a kept file lives for `data_keep_for`, after which a
//! reduce that still wants it fails its fetch and the dispatcher runs the map step again.

use std::io::{self, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use spine_protocol::data::{hex, parse_sha256};
use spine_protocol::signing::{BlobGrant, UrlKey};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 64;
/// A client has this long to send its request head (and TLS handshake).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Keys remembered: one per dispatcher that sent a `<keep/>`.
const MAX_KEYS: usize = 16;

/// The kept outputs on disk, the keys that check URLs to them, and counts of what was served
/// and refused.
pub(crate) struct Held {
    /// `<keep dir>/sha256/`: one file per blob, named by its hash in hex.
    dir: PathBuf,
    /// The agent's `serves` URL (no trailing `/`).
    base: String,
    keep_for: Duration,
    keys: Mutex<Vec<[u8; 32]>>,
    /// Bytes served, GETs answered 200.
    pub(crate) served: AtomicU64,
    /// Requests refused with 403 (bad, expired or altered signature).
    pub(crate) refused: AtomicU64,
    /// Requests for a blob not kept here (404).
    pub(crate) not_found: AtomicU64,
    /// Held open while the agent runs when the directory is a temporary one.
    _temp: Option<crate::scratch::JobDir>,
}

impl Held {
    /// Opens (creating) the keep directory: `dir`, or a temporary one removed at exit (or by
    /// the next agent after a crash, [`crate::scratch`]). Files
    /// left by an earlier run are served again until they age out.
    pub(crate) fn open(dir: Option<&Path>, base: String, keep_for: Duration) -> io::Result<Held> {
        let (root, temp) = match dir {
            Some(d) => (d.to_owned(), None),
            None => {
                // Under the agent's scratch directory (crate::scratch): a killed agent's
                // kept outputs are deleted by the next one.
                let t = crate::scratch::JobDir::create("spine-kept-").map_err(io::Error::other)?;
                (t.path().to_owned(), Some(t))
            }
        };
        let dir = root.join("sha256");
        std::fs::create_dir_all(&dir)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?;
        Ok(Held {
            dir,
            base: base.trim_end_matches('/').to_owned(),
            keep_for,
            keys: Mutex::new(Vec::new()),
            served: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            not_found: AtomicU64::new(0),
            _temp: temp,
        })
    }

    /// The `serves` URL (scheme, host and port).
    pub(crate) fn url_base(&self) -> &str {
        &self.base
    }

    /// The URL a result names for a kept blob (the core builds the same).
    #[cfg(test)]
    fn url(&self, sha256: &[u8; 32]) -> String {
        format!("{}/v1/blobs/{}", self.base, hex(sha256))
    }

    fn path(&self, sha256: &[u8; 32]) -> PathBuf {
        self.dir.join(hex(sha256))
    }

    /// Keeps `bytes` (whose SHA-256 the caller computed) under their hash, and remembers
    /// `key` to check URLs with. Written to a temporary name and renamed, so a reader never
    /// sees half a file; not fsynced: a file lost in a crash is a fetch that fails, and the
    /// dispatcher runs its step again.
    pub(crate) fn put(&self, sha256: &[u8; 32], bytes: &[u8], key: [u8; 32]) -> io::Result<()> {
        self.add_key(key);
        let path = self.path(sha256);
        if path.exists() {
            // Renew its age: it is wanted again.
            return std::fs::File::options()
                .append(true)
                .open(&path)
                .and_then(|f| f.set_modified(SystemTime::now()));
        }
        let mut tmp = tempfile::NamedTempFile::new_in(&self.dir)?;
        tmp.write_all(bytes)?;
        tmp.persist(&path).map_err(|e| e.error)?;
        Ok(())
    }

    fn add_key(&self, key: [u8; 32]) {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if !keys.contains(&key) {
            if keys.len() >= MAX_KEYS {
                keys.remove(0);
            }
            keys.push(key);
        }
    }

    /// The kept file a URL names, when it is one of this agent's own (a reduce placed where
    /// its input is): read from disk instead of fetched over the network.
    pub(crate) fn local(&self, url: &str) -> Option<PathBuf> {
        let rest = url.strip_prefix(&self.base)?.strip_prefix("/v1/blobs/")?;
        let hex = rest.split('?').next()?;
        let path = self.path(&parse_sha256(hex).ok()?);
        path.is_file().then_some(path)
    }

    /// Deletes kept files older than `data_keep_for`. Returns how many.
    pub(crate) fn sweep(&self) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return 0;
        };
        let now = SystemTime::now();
        let mut n = 0;
        for e in entries.flatten() {
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| now.duration_since(t).ok())
                .is_some_and(|age| age > self.keep_for);
            if old && std::fs::remove_file(e.path()).is_ok() {
                n += 1;
            }
        }
        n
    }

    /// Answers one request: `GET` or `HEAD /v1/blobs/{sha256}?job=&agent=&exp=&sig=`, checked
    /// against every key known.
    async fn answer(&self, method: &Method, path: &str, query: &str) -> Response<Full<Bytes>> {
        if method != Method::GET && method != Method::HEAD {
            return status(
                StatusCode::METHOD_NOT_ALLOWED,
                "only GET and HEAD are served",
            );
        }
        let Some(seg) = path.strip_prefix("/v1/blobs/").filter(|s| !s.contains('/')) else {
            self.not_found.fetch_add(1, Ordering::Relaxed);
            return status(StatusCode::NOT_FOUND, "no such path");
        };
        let url = match BlobGrant::parse(seg, query) {
            Ok(u) => u,
            Err(e) => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                debug!("kept output refused: {e}");
                return status(StatusCode::FORBIDDEN, &e.to_string());
            }
        };
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let keys = self.keys.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut why = None;
        let ok = keys.iter().any(|k| {
            url.verify(&UrlKey::from_bytes(*k), now)
                .map_err(|e| why = Some(e))
                .is_ok()
        });
        if !ok {
            self.refused.fetch_add(1, Ordering::Relaxed);
            let why = why.map_or(
                "no dispatcher has asked this agent to keep outputs".into(),
                |e| e.to_string(),
            );
            debug!(agent = %url.grant.agent, job = %url.grant.job, "kept output refused: {why}");
            return status(StatusCode::FORBIDDEN, &why);
        }
        let path = self.path(&url.grant.sha256);
        let read = tokio::task::spawn_blocking(move || std::fs::read(path)).await;
        match read {
            Ok(Ok(bytes)) => {
                self.served.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                let len = bytes.len();
                let body = if method == Method::HEAD {
                    Bytes::new()
                } else {
                    Bytes::from(bytes)
                };
                Response::builder()
                    .header("content-type", "application/octet-stream")
                    .header("content-length", len)
                    .body(Full::new(body))
                    .unwrap_or_else(|_| status(StatusCode::INTERNAL_SERVER_ERROR, "response"))
            }
            _ => {
                self.not_found.fetch_add(1, Ordering::Relaxed);
                status(
                    StatusCode::NOT_FOUND,
                    "this agent no longer keeps that output (aged out or lost)",
                )
            }
        }
    }
}

fn status(code: StatusCode, message: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({ "message": message }).to_string();
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    r.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

/// The bound listener of `data_listen`, with TLS when configured.
pub(crate) struct Listener {
    tcp: TcpListener,
    tls: Option<TlsAcceptor>,
}

impl Listener {
    /// Binds `addr`; `tls` from `data_tls_cert`/`data_tls_key`.
    pub(crate) async fn bind(
        addr: SocketAddr,
        tls: Option<tokio_rustls::rustls::ServerConfig>,
    ) -> io::Result<Listener> {
        let tcp = TcpListener::bind(addr)
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("data_listen {addr}: {e}")))?;
        Ok(Listener {
            tcp,
            tls: tls.map(|c| TlsAcceptor::from(Arc::new(c))),
        })
    }

    /// The address bound (the port when `data_listen` asked for port 0).
    pub(crate) fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// Whether it serves HTTPS.
    pub(crate) fn is_tls(&self) -> bool {
        self.tls.is_some()
    }
}

/// Binds `data_listen`, opens the keep directory and serves it until `stop`. Errors name the
/// setting at fault.
pub(crate) async fn start(
    config: &crate::AgentConfig,
    addr: SocketAddr,
    stop: CancellationToken,
) -> Result<Arc<Held>, crate::AgentError> {
    let bad =
        |key: &str, e: &dyn std::fmt::Display| crate::AgentError::Config(format!("{key}: {e}"));
    let tls = match (&config.data_tls_cert, &config.data_tls_key) {
        (Some(cert), Some(key)) => Some(
            spine_tls::server_config_from_files(cert, key).map_err(|e| bad("data_tls_cert", &e))?,
        ),
        _ => None,
    };
    let listener = Listener::bind(addr, tls)
        .await
        .map_err(|e| bad("data_listen", &e))?;
    let bound = listener.local_addr().map_err(|e| bad("data_listen", &e))?;
    let scheme = if listener.is_tls() { "https" } else { "http" };
    let base = config
        .data_url
        .clone()
        .unwrap_or_else(|| format!("{scheme}://{bound}"));
    let held = Held::open(config.data_keep_dir.as_deref(), base, config.data_keep_for)
        .map_err(|e| bad("data_keep_dir", &e))?;
    let held = Arc::new(held);
    tokio::spawn(serve(listener, held.clone(), stop));
    Ok(held)
}

/// Serves kept outputs until `stop`, and sweeps aged ones every minute.
pub(crate) async fn serve(listener: Listener, held: Arc<Held>, stop: CancellationToken) {
    let Listener { tcp, tls } = listener;
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut sweep = tokio::time::interval(Duration::from_secs(60));
    info!(url = %held.base, "serving kept outputs");
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            _ = sweep.tick() => {
                let h = held.clone();
                if let Ok(n) = tokio::task::spawn_blocking(move || h.sweep()).await {
                    if n > 0 {
                        debug!(files = n, "kept outputs aged out");
                    }
                }
                continue;
            }
            a = tcp.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                warn!("data_listen: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (held, tls, stop) = (held.clone(), tls.clone(), stop.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let _ = stream.set_nodelay(true);
            match tls {
                None => connection(stream, held, stop).await,
                Some(tls) => match tokio::time::timeout(HEADER_TIMEOUT, tls.accept(stream)).await {
                    Ok(Ok(s)) => connection(s, held, stop).await,
                    Ok(Err(e)) => debug!(%peer, "data_listen: TLS handshake failed: {e}"),
                    Err(_) => debug!(%peer, "data_listen: TLS handshake timed out"),
                },
            }
        });
    }
}

async fn connection<S>(stream: S, held: Arc<Held>, stop: CancellationToken)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let held = held.clone();
        async move {
            let uri = req.uri();
            let r = held
                .answer(req.method(), uri.path(), uri.query().unwrap_or(""))
                .await;
            Ok::<_, std::convert::Infallible>(r)
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => if let Err(e) = r { debug!("data_listen: connection: {e}") },
        _ = stop.cancelled() => conn.as_mut().graceful_shutdown(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jid::BareJid;

    fn held(dir: &Path) -> Held {
        Held::open(
            Some(dir),
            "http://127.0.0.1:7443/".into(),
            Duration::from_secs(3600),
        )
        .expect("open")
    }

    #[tokio::test]
    async fn urls_signed_with_the_holder_key_fetch_and_others_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let h = held(dir.path());
        let dispatcher = UrlKey::from_bytes([9; 32]);
        let me = BareJid::new("agent1@example.com").expect("jid");
        let key = dispatcher.for_holder(&me);
        let bytes = b"kept output".repeat(10_000);
        let sha: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(&bytes).into();
        h.put(&sha, &bytes, key.to_bytes()).expect("put");
        assert_eq!(
            h.url(&sha),
            format!("http://127.0.0.1:7443/v1/blobs/{}", hex(&sha))
        );
        assert_eq!(
            h.local(&h.url(&sha)),
            Some(dir.path().join("sha256").join(hex(&sha)))
        );
        assert_eq!(h.local("http://elsewhere:1/v1/blobs/00"), None);
        let grant = BlobGrant {
            sha256: sha,
            job: "mr.r1.0".parse().expect("job"),
            agent: BareJid::new("agent2@example.com").expect("jid"),
        };
        let exp = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .expect("clock")
            .as_secs()
            + 300;
        let ask = |url: String| {
            let h = &h;
            async move {
                let (path, query) = url
                    .strip_prefix("http://127.0.0.1:7443")
                    .expect("base")
                    .split_once('?')
                    .expect("query");
                h.answer(&Method::GET, path, query).await.status()
            }
        };
        assert_eq!(ask(grant.url(&h.base, exp, &key)).await, StatusCode::OK);
        assert_eq!(h.served.load(Ordering::Relaxed), bytes.len() as u64);
        // Signed with the dispatcher's own key, or another holder's: refused.
        assert_eq!(
            ask(grant.url(&h.base, exp, &dispatcher)).await,
            StatusCode::FORBIDDEN
        );
        let other = dispatcher.for_holder(&BareJid::new("agent3@example.com").expect("jid"));
        assert_eq!(
            ask(grant.url(&h.base, exp, &other)).await,
            StatusCode::FORBIDDEN
        );
        // Expired; tampered (another job).
        assert_eq!(
            ask(grant.url(&h.base, exp - 600, &key)).await,
            StatusCode::FORBIDDEN
        );
        let tampered = grant.url(&h.base, exp, &key).replace("mr.r1.0", "mr.r1.1");
        assert_eq!(ask(tampered).await, StatusCode::FORBIDDEN);
        assert_eq!(h.refused.load(Ordering::Relaxed), 4);
        // A path outside the store, and a blob not kept: 404.
        assert_eq!(
            h.answer(&Method::GET, "/v1/blobs/../../etc/passwd", "")
                .await
                .status(),
            StatusCode::NOT_FOUND
        );
        let mut missing = grant.clone();
        missing.sha256 = [1; 32];
        assert_eq!(
            ask(missing.url(&h.base, exp, &key)).await,
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            h.answer(&Method::PUT, "/v1/blobs/x", "").await.status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
    }

    #[test]
    fn kept_files_age_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let h = Held::open(
            Some(dir.path()),
            "http://h:1".into(),
            Duration::from_secs(60),
        )
        .expect("open");
        h.put(&[1; 32], b"a", [0; 32]).expect("put");
        h.put(&[2; 32], b"b", [0; 32]).expect("put");
        let old = SystemTime::now() - Duration::from_secs(120);
        std::fs::File::options()
            .append(true)
            .open(h.path(&[1; 32]))
            .and_then(|f| f.set_modified(old))
            .expect("age");
        assert_eq!(h.sweep(), 1);
        assert!(!h.path(&[1; 32]).exists());
        assert!(h.path(&[2; 32]).exists());
    }
}
