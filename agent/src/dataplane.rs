//! The agent's HTTP data plane (protocol 1.1, docs/PROTOCOL.md §13.4): where the core's
//! [`Fetch`] and [`Put`] effects become HTTP requests and their ends come back as
//! [`Transfer`] inputs.
//!
//! [`crate::driver`] hands each effect to [`DataPlane`], which runs it in a task of its own
//! (so a slow dispatcher never holds up the connection task) and sends one [`Transfer`] on the
//! channel the driver reads; the driver passes it to [`crate::machine::Core::fetched`] or
//! [`crate::machine::Core::put_done`]. Nothing here decides what a failure means: the core
//! answers `fetch-failed` or falls back to chunks. HTTPS trusts what the XMPP connection
//! trusts (`tls.ca_file`, or else the system's store), with rustls and the ring provider.
//!
//! For a capability that takes its input as a file, a referenced input is streamed into a new
//! work directory ([`crate::files::WorkDir`]) while it is hashed; a handler's fragment files
//! are PUT streamed from disk ([`FilePut`]) and, when HTTP is not possible, read back here
//! into an inline list ([`InlineFiles`]) off the connection task.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tracing::warn;

use spine_protocol::fragments::{self, Fragment, FragmentRef, FRAGMENTS_MIME};
use spine_protocol::DataRef;

use crate::config::AgentConfig;
use crate::files::WorkDir;
use crate::held::Held;
use crate::machine::{Fetch, Fetched, FilePut, InlineFiles, KeepOut, Put, Source};

/// How long establishing one connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Blobs of one fragment list fetched at once.
const FRAGMENT_FETCHES: usize = 4;
/// Bytes buffered when streaming a body to or from a file.
const FILE_BUF: usize = 256 * 1024;

/// The end of one transfer, keyed as the core asked for it.
#[derive(Debug)]
pub(crate) enum Transfer {
    /// An input fetch: the verified bytes, or `host: reason` for every source tried.
    Fetched {
        key: u64,
        result: Result<Fetched, String>,
    },
    /// An output upload: stored (`201`), or why not.
    Put {
        key: u64,
        result: Result<(), String>,
    },
    /// An output kept in the keep directory (`data_listen`), or why not.
    Kept {
        key: u64,
        result: Result<(), String>,
    },
    /// A fragment file's upload: stored (`201`), or why not.
    FilePut {
        key: u64,
        result: Result<(), String>,
    },
    /// Fragment files read back into a list with the bytes inline (and deleted), or why not.
    Inlined {
        key: u64,
        result: Result<Vec<u8>, String>,
    },
}

/// Runs transfers in tasks; aborts them on request.
pub(crate) struct DataPlane {
    client: reqwest::Client,
    /// The outputs this agent keeps (`data_listen`): written here, and read from disk when a
    /// fragment's URL is this agent's own.
    held: Option<Arc<Held>>,
    tasks: HashMap<u64, AbortHandle>,
    tx: mpsc::UnboundedSender<Transfer>,
}

/// The output bytes as a request body, shared with the core's copy (kept for the chunk
/// fallback).
struct Shared(Arc<Vec<u8>>);

impl AsRef<[u8]> for Shared {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// The HTTP client of the data plane: no redirects (a signed URL names exactly what it
/// fetches), no proxy from the environment, a 5 s connect timeout, and the XMPP side's trust.
pub(crate) fn client(config: &AgentConfig) -> reqwest::Client {
    // The same trust as the XMPP side: `tls.ca_file`, or the system store.
    let tls = spine_tls::client_config_for_ca_file(config.tls.ca_file.as_deref())
        .map_err(|e| format!("tls.ca_file: {e}"));
    let builder = reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .tcp_nodelay(true);
    let builder = match tls {
        Ok(tls) => builder.use_preconfigured_tls(tls),
        Err(e) => {
            if config.http_data {
                warn!("no CA to verify HTTPS data transfers with ({e}): https:// sources will fail and fall back to chunks");
            }
            builder
        }
    };
    builder.build().unwrap_or_else(|e| {
        warn!("HTTP client with the configured trust failed ({e}); using the defaults");
        reqwest::Client::new()
    })
}

impl DataPlane {
    /// A data plane using `client`, and the channel its tasks report on.
    pub(crate) fn new(
        client: reqwest::Client,
        held: Option<Arc<Held>>,
    ) -> (Self, mpsc::UnboundedReceiver<Transfer>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let plane = DataPlane {
            client,
            held,
            tasks: HashMap::new(),
            tx,
        };
        (plane, rx)
    }

    /// Fetches a job's input: the sources in order until one gives the referenced bytes.
    pub(crate) fn fetch(&mut self, f: Fetch) {
        let key = f.key;
        let (client, tx, held) = (self.client.clone(), self.tx.clone(), self.held.clone());
        let task = tokio::spawn(async move {
            let fetch = async {
                match (&f.source, f.to_file) {
                    (Source::Ref(r), true) => {
                        fetch_ref_to_file(&client, r).await.map(Fetched::File)
                    }
                    _ => fetch_sources(&client, held.as_deref(), &f)
                        .await
                        .map(Fetched::Bytes),
                }
            };
            let result = match tokio::time::timeout_at(f.deadline, fetch).await {
                Ok(r) => r,
                Err(_) => Err("timed out".to_owned()),
            };
            let _ = tx.send(Transfer::Fetched { key: f.key, result });
        });
        self.tasks.insert(key, task.abort_handle());
    }

    /// Uploads an output to its slot.
    pub(crate) fn put(&mut self, p: Put) {
        let key = p.key;
        let (client, tx) = (self.client.clone(), self.tx.clone());
        let task = tokio::spawn(async move {
            let result = match tokio::time::timeout_at(p.deadline, put(&client, &p)).await {
                Ok(r) => r,
                Err(_) => Err(format!("{}: timed out", host(&p.url))),
            };
            let _ = tx.send(Transfer::Put { key: p.key, result });
        });
        self.tasks.insert(key, task.abort_handle());
    }

    /// Writes an output to the keep directory (on the blocking pool).
    pub(crate) fn keep(&mut self, k: KeepOut) {
        let (held, tx) = (self.held.clone(), self.tx.clone());
        tokio::spawn(async move {
            let result = match held {
                None => Err("this agent has no data_listen".to_owned()),
                Some(h) => tokio::task::spawn_blocking(move || {
                    h.put(&k.sha256, &k.bytes, k.holder_key)
                        .map_err(|e| e.to_string())
                })
                .await
                .unwrap_or_else(|e| Err(e.to_string())),
            };
            let _ = tx.send(Transfer::Kept { key: k.key, result });
        });
    }

    /// Uploads a fragment file to its slot, streamed from disk.
    pub(crate) fn put_file(&mut self, p: FilePut) {
        let key = p.key;
        let (client, tx) = (self.client.clone(), self.tx.clone());
        let task = tokio::spawn(async move {
            let result = match tokio::time::timeout_at(p.deadline, put_file(&client, &p)).await {
                Ok(r) => r,
                Err(_) => Err(format!("{}: timed out", host(&p.url))),
            };
            let _ = tx.send(Transfer::FilePut { key: p.key, result });
        });
        self.tasks.insert(key, task.abort_handle());
    }

    /// Reads fragment files back into a list with the bytes inline, on the blocking pool; the
    /// files are deleted after.
    pub(crate) fn inline(&mut self, i: InlineFiles) {
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let InlineFiles { key, files } = i;
            let result = tokio::task::spawn_blocking(move || crate::files::inline_list(&files))
                .await
                .unwrap_or_else(|e| Err(format!("reading the fragment files: {e}")));
            let _ = tx.send(Transfer::Inlined { key, result });
        });
    }

    /// Stops a transfer the core no longer wants (its job was cancelled or stopped).
    pub(crate) fn abort(&mut self, key: u64) {
        if let Some(t) = self.tasks.remove(&key) {
            t.abort();
        }
    }

    /// A transfer's end was taken.
    pub(crate) fn finished(&mut self, key: u64) {
        self.tasks.remove(&key);
    }
}

/// `host[:port]` of a URL, for messages (never the signed query).
fn host(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) => match (u.host_str(), u.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_owned(),
            _ => "?".to_owned(),
        },
        Err(_) => "an unparsable URL".to_owned(),
    }
}

/// A reqwest error without its URL (which carries a signature), with its causes.
fn describe(e: reqwest::Error) -> String {
    let timeout = e.is_timeout();
    let e = e.without_url();
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    if timeout {
        text.push_str(" (timed out)");
    }
    text
}

/// Fetches what `f` names: the referenced input, and the blobs a fragment list names.
async fn fetch_sources(
    client: &reqwest::Client,
    held: Option<&Held>,
    f: &Fetch,
) -> Result<Vec<u8>, String> {
    match &f.source {
        Source::Ref(r) => {
            let bytes = fetch_ref(client, r).await?;
            if r.mime.as_deref() != Some(FRAGMENTS_MIME) {
                return Ok(bytes);
            }
            // A fragment list too long for the job stanza may name blobs too.
            match fragments::decode(&bytes) {
                Ok(list) if list.iter().any(|f| f.source.is_some()) => {
                    resolve_fragments(client, held, list).await
                }
                _ => Ok(bytes),
            }
        }
        Source::Fragments(list) => resolve_fragments(client, held, list.clone()).await,
    }
}

/// The sources of one reference in order, until one gives the referenced bytes.
async fn fetch_ref(client: &reqwest::Client, r: &DataRef) -> Result<Vec<u8>, String> {
    let mut reasons = Vec::new();
    for url in &r.sources {
        match fetch_one(client, url, r.size, &r.sha256).await {
            Ok(bytes) => return Ok(bytes),
            Err(reason) => reasons.push(format!("{}: {reason}", host(url))),
        }
    }
    Err(reasons.join("; "))
}

/// The sources of one reference in order, until one has streamed the referenced bytes into
/// the input file of a new work directory (the directory is deleted after a failure).
async fn fetch_ref_to_file(client: &reqwest::Client, r: &DataRef) -> Result<WorkDir, String> {
    let work = tokio::task::spawn_blocking(WorkDir::create)
        .await
        .map_err(|e| format!("creating the job directory: {e}"))??;
    let mut reasons = Vec::new();
    for url in &r.sources {
        match fetch_one_to_file(client, url, r.size, &r.sha256, &work.input()).await {
            Ok(()) => return Ok(work),
            Err(reason) => reasons.push(format!("{}: {reason}", host(url))),
        }
    }
    drop(tokio::task::spawn_blocking(move || drop(work)));
    Err(reasons.join("; "))
}

/// GETs one source into `path` (created or truncated), hashing while it writes: memory holds
/// one buffer, never the input.
async fn fetch_one_to_file(
    client: &reqwest::Client,
    url: &str,
    size: u64,
    sha256: &[u8; 32],
    path: &std::path::Path,
) -> Result<(), String> {
    use tokio::io::AsyncWriteExt as _;
    let mut resp = get_checked(client, url, size).await?;
    let file = tokio::fs::File::create(path)
        .await
        .map_err(|e| format!("creating {}: {e}", path.display()))?;
    let mut out = tokio::io::BufWriter::with_capacity(FILE_BUF, file);
    let mut hasher = Sha256::new();
    let mut got = 0u64;
    while let Some(chunk) = resp.chunk().await.map_err(describe)? {
        got += chunk.len() as u64;
        if got > size {
            return Err(format!("the body runs past the {size} bytes referenced"));
        }
        hasher.update(&chunk);
        out.write_all(&chunk)
            .await
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    out.flush()
        .await
        .map_err(|e| format!("writing {}: {e}", path.display()))?;
    check_end(got, size, hasher, sha256)
}

/// Puts every fragment's bytes inline: each reference fetched from its URL and checked
/// against its hash, a few at a time. One that fails fails the whole (the dispatcher then
/// sends the list with the bytes inline).
async fn resolve_fragments(
    client: &reqwest::Client,
    held: Option<&Held>,
    mut list: Vec<Fragment>,
) -> Result<Vec<u8>, String> {
    use futures::{StreamExt as _, TryStreamExt as _};
    let wanted: Vec<(usize, FragmentRef)> = list
        .iter()
        .enumerate()
        .filter_map(|(i, f)| f.source.clone().map(|r| (i, r)))
        .collect();
    let fetched: Vec<(usize, Vec<u8>)> = futures::stream::iter(wanted)
        .map(|(i, r)| async move {
            let Some(url) = r.url.as_deref() else {
                return Err(format!("fragment {i} names a blob without a URL"));
            };
            if let Some(path) = held.and_then(|h| h.local(url)) {
                return read_kept(path, r.size)
                    .await
                    .map(|bytes| (i, bytes))
                    .map_err(|reason| format!("fragment {i}: kept here: {reason}"));
            }
            fetch_one(client, url, r.size, &r.sha256)
                .await
                .map(|bytes| (i, bytes))
                .map_err(|reason| format!("fragment {i}: {}: {reason}", host(url)))
        })
        .buffer_unordered(FRAGMENT_FETCHES)
        .try_collect()
        .await?;
    for (i, bytes) in fetched {
        if let Some(f) = list.get_mut(i) {
            f.data = bytes;
            f.source = None;
        }
    }
    Ok(fragments::encode(&list))
}

/// A blob this agent kept itself (a reduce placed where its input is): read from disk, not
/// fetched. Its size is checked; its hash is its file name, computed from the bytes when they
/// were written.
async fn read_kept(path: std::path::PathBuf, size: u64) -> Result<Vec<u8>, String> {
    let bytes = tokio::task::spawn_blocking(move || std::fs::read(path))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 != size {
        return Err(format!("{} bytes on disk, {size} referenced", bytes.len()));
    }
    Ok(bytes)
}

/// GETs one source, hashing while it reads, and never holds more than the referenced size.
async fn fetch_one(
    client: &reqwest::Client,
    url: &str,
    size: u64,
    sha256: &[u8; 32],
) -> Result<Vec<u8>, String> {
    let mut resp = get_checked(client, url, size).await?;
    let mut hasher = Sha256::new();
    // The whole referenced size at once: the core checked it against `max_input_size`, and
    // the body may not run past it. Growing by doubling from a small start copied a large
    // input about once more and faulted in every page twice. The reservation only maps
    // memory: a body that ends short touches no more than it brought.
    let cap = usize::try_from(size)
        .map_err(|_| format!("{size} bytes do not fit in this machine's memory"))?;
    let mut bytes = Vec::new();
    bytes
        .try_reserve_exact(cap)
        .map_err(|e| format!("cannot hold the {size} bytes referenced: {e}"))?;
    while let Some(chunk) = resp.chunk().await.map_err(describe)? {
        if bytes.len() as u64 + chunk.len() as u64 > size {
            return Err(format!("the body runs past the {size} bytes referenced"));
        }
        hasher.update(&chunk);
        bytes.extend_from_slice(&chunk);
    }
    check_end(bytes.len() as u64, size, hasher, sha256)?;
    Ok(bytes)
}

/// A GET of `url` answered `200` with no other length than `size`.
async fn get_checked(
    client: &reqwest::Client,
    url: &str,
    size: u64,
) -> Result<reqwest::Response, String> {
    let resp = client.get(url).send().await.map_err(describe)?;
    if resp.status() != reqwest::StatusCode::OK {
        return Err(format!("HTTP status {}", resp.status()));
    }
    if let Some(len) = resp.content_length() {
        if len != size {
            return Err(format!("the body has {len} bytes, the reference {size}"));
        }
    }
    Ok(resp)
}

/// A body that ended after `got` bytes hashed into `hasher`: the referenced size and hash?
fn check_end(got: u64, size: u64, hasher: Sha256, sha256: &[u8; 32]) -> Result<(), String> {
    if got != size {
        return Err(format!("the body ended after {got} of {size} bytes"));
    }
    let digest: [u8; 32] = hasher.finalize().into();
    if &digest != sha256 {
        return Err("the bytes do not match the referenced SHA-256".to_owned());
    }
    Ok(())
}

async fn put(client: &reqwest::Client, p: &Put) -> Result<(), String> {
    let body = bytes::Bytes::from_owner(Shared(p.bytes.clone()));
    let mut req = client
        .put(&p.url)
        .header(reqwest::header::CONTENT_LENGTH, p.bytes.len())
        .body(body);
    if let Some(m) = &p.mime {
        req = req.header(reqwest::header::CONTENT_TYPE, m.as_str());
    }
    let resp = req
        .send()
        .await
        .map_err(|e| format!("{}: {}", host(&p.url), describe(e)))?;
    match resp.status() {
        reqwest::StatusCode::CREATED => Ok(()),
        s => Err(format!("{}: HTTP status {s} (expected 201)", host(&p.url))),
    }
}

/// PUTs a fragment file, streamed from disk with its length declared (the slot was granted
/// for that size and hash; the dispatcher checks both).
async fn put_file(client: &reqwest::Client, p: &FilePut) -> Result<(), String> {
    let file = tokio::fs::File::open(&p.path)
        .await
        .map_err(|e| format!("opening {}: {e}", p.path.display()))?;
    let stream = tokio_util::io::ReaderStream::with_capacity(file, FILE_BUF);
    let mut req = client
        .put(&p.url)
        .header(reqwest::header::CONTENT_LENGTH, p.size)
        .body(reqwest::Body::wrap_stream(stream));
    if let Some(m) = &p.mime {
        req = req.header(reqwest::header::CONTENT_TYPE, m.as_str());
    }
    let resp = req
        .send()
        .await
        .map_err(|e| format!("{}: {}", host(&p.url), describe(e)))?;
    match resp.status() {
        reqwest::StatusCode::CREATED => Ok(()),
        s => Err(format!("{}: HTTP status {s} (expected 201)", host(&p.url))),
    }
}
