//! Watchers (docs/agent.md, "Watchers"): an agent turns what happens on its machine into
//! events for the dispatcher's rules (PROTOCOL.md §11.9.1) — a file that appears in a
//! directory and stops growing (the upload-directory case), or the result of a probe command
//! run on an interval.
//!
//! Each `[[watch]]` runs in a task of its own and hands [`Watched`] events to the driver,
//! which passes them to the state machine (`machine::events`: the slot, the upload, the IQ,
//! the retries); the machine's verdict comes back as an [`Ack`]. A directory watcher polls
//! (`std::fs`, on the blocking pool) rather than subscribing to inotify: "stopped growing"
//! needs a timer anyway, polling sees files on NFS and FUSE mounts that inotify misses, and a
//! directory of a few thousand names costs microseconds per scan.
//!
//! An event's id is derived from what it is about (a file's path, size and modification
//! time), so that a file seen again after a restart of the agent names the same event, and
//! the dispatcher makes no second job of it.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

mod socket;

/// Longest name of a watcher (it is the last part of its events' source).
const MAX_NAME: usize = 64;
/// At most this much of a probe's stdout and stderr each goes into its event.
const PROBE_OUTPUT: usize = 4096;
/// Files a directory watcher tracks at once; more are left for later scans.
const MAX_TRACKED: usize = 100_000;

/// What a watcher does after the dispatcher took a file's event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum After {
    /// Leave the file (its event is not sent again while it stays as it is).
    #[default]
    Keep,
    /// Delete the file.
    Delete,
}

/// When a probe's result is an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Emit {
    /// The first run, and each run whose exit status differs from the run before.
    #[default]
    Change,
    /// Every run.
    Always,
}

/// One `[[watch]]`: a directory (`directory`), a probe (`command`) or a socket (`socket`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchConfig {
    /// Letters, digits, `.`, `_`, `-`: the events' source is `/agents/<jid>/<name>`.
    pub name: String,
    /// A directory to watch for files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub directory: Option<PathBuf>,
    /// A probe: the program and its arguments (no shell).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// A Unix socket the agent listens on: a local service writes one JSON event per line
    /// and reads one answer per line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
    /// The events' type. Default `spine.file.created` (directory) or `spine.probe.result`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub ty: Option<String>,
    /// Directory: only file names matching this glob (`*.jpg`). Default: every name that does
    /// not start with `.`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
    /// Directory: look into subdirectories too.
    #[serde(default)]
    pub recursive: bool,
    /// Directory: a file is complete once its size and modification time stayed the same this
    /// long.
    #[serde(default = "default_settle", with = "spine_protocol::units::duration")]
    pub settle: Duration,
    /// Directory: how often it is scanned.
    #[serde(default = "default_poll", with = "spine_protocol::units::duration")]
    pub poll: Duration,
    /// Directory: `keep` (default) or `delete` a file once its event was taken.
    #[serde(default)]
    pub after: After,
    /// Probe: how often it runs.
    #[serde(default = "default_interval", with = "spine_protocol::units::duration")]
    pub interval: Duration,
    /// Probe: how long one run may take (then it is killed and counts as failed); a run
    /// never takes longer than `interval`.
    #[serde(
        default = "default_probe_timeout",
        with = "spine_protocol::units::duration"
    )]
    pub timeout: Duration,
    /// Probe: `change` (default) or `always`.
    #[serde(default)]
    pub emit: Emit,
}

fn default_settle() -> Duration {
    Duration::from_secs(2)
}
fn default_poll() -> Duration {
    Duration::from_secs(1)
}
fn default_interval() -> Duration {
    Duration::from_secs(30)
}
fn default_probe_timeout() -> Duration {
    Duration::from_secs(10)
}

impl WatchConfig {
    /// Checks one watcher; errors name the key (`watch[0].settle: …`).
    pub fn validate(&self, key: &str) -> Result<(), String> {
        let ok_name = !self.name.is_empty()
            && self.name.len() <= MAX_NAME
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !ok_name {
            return Err(format!(
                "{key}.name: '{}' must be 1 to {MAX_NAME} letters, digits, '.', '_' or '-'",
                self.name
            ));
        }
        let kinds = [
            self.directory.is_some(),
            self.command.is_some(),
            self.socket.is_some(),
        ];
        match kinds.iter().filter(|k| **k).count() {
            0 => {
                return Err(format!(
                    "{key}: give directory (a directory watcher), command (a probe) or socket \
                     (events from a local service)"
                ))
            }
            1 => {}
            _ => {
                return Err(format!(
                    "{key}: give one of directory, command and socket, not several"
                ))
            }
        }
        if let Some(p) = &self.socket {
            if !p.is_absolute() {
                return Err(format!(
                    "{key}.socket: '{}' must be an absolute path",
                    p.display()
                ));
            }
        }
        match (&self.directory, &self.command) {
            (Some(_), Some(_)) | (None, None) => {}
            (Some(d), None) => {
                if !d.is_absolute() {
                    return Err(format!(
                        "{key}.directory: '{}' must be an absolute path",
                        d.display()
                    ));
                }
                if let Some(p) = &self.pattern {
                    glob::Pattern::new(p)
                        .map_err(|e| format!("{key}.pattern: '{p}' is not a glob: {e}"))?;
                }
                if self.poll < Duration::from_millis(50) {
                    return Err(format!("{key}.poll: must be at least 50ms"));
                }
                if self.settle < self.poll {
                    return Err(format!(
                        "{key}.settle: must be at least poll ({:?}): a file is complete after \
                         two scans that saw it the same",
                        self.poll
                    ));
                }
            }
            (None, Some(argv)) => {
                if argv.first().is_none_or(|p| p.is_empty()) {
                    return Err(format!(
                        "{key}.command: needs a program, e.g. [\"/usr/bin/check\", \"--quiet\"]"
                    ));
                }
                if self.interval < Duration::from_secs(1) {
                    return Err(format!("{key}.interval: must be at least 1s"));
                }
                if self.timeout.is_zero() {
                    return Err(format!("{key}.timeout: must be more than 0"));
                }
            }
        }
        if let Some(t) = &self.ty {
            if t.is_empty() || t.len() > spine_protocol::events::MAX_EVENT_ATTRIBUTE {
                return Err(format!("{key}.type: must be 1 to 1024 bytes"));
            }
        }
        Ok(())
    }

    /// The events' type.
    pub fn event_type(&self) -> String {
        self.ty.clone().unwrap_or_else(|| {
            if self.directory.is_some() {
                "spine.file.created".into()
            } else if self.socket.is_some() {
                "spine.service.event".into()
            } else {
                "spine.probe.result".into()
            }
        })
    }
}

/// An event a watcher saw, for the state machine to send.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Watched {
    /// The watcher's name (the last part of the source).
    pub(crate) watch: String,
    pub(crate) id: String,
    pub(crate) ty: String,
    pub(crate) subject: Option<String>,
    /// RFC 3339.
    pub(crate) time: String,
    pub(crate) data: WatchedData,
}

/// A watched event's data.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum WatchedData {
    /// JSON, inline.
    Json(Value),
    /// A file, sent by reference: put to an event slot over HTTP.
    File {
        path: PathBuf,
        size: u64,
        sha256: [u8; 32],
        mime: Option<String>,
    },
}

/// The state machine's verdict on one event: the jobs it made (their ids), or why it was
/// given up.
pub(crate) type Ack = Result<Vec<String>, String>;

/// A watched event on its way to the driver, with where its verdict goes.
pub(crate) struct Sighting {
    pub(crate) event: Watched,
    pub(crate) ack: oneshot::Sender<Ack>,
}

/// Starts every configured watcher; each sends its sightings on the returned channel and
/// stops when `stop` is cancelled.
pub(crate) fn start(
    watches: &[WatchConfig],
    stop: tokio_util::sync::CancellationToken,
) -> mpsc::Receiver<Sighting> {
    let (tx, rx) = mpsc::channel(64);
    for w in watches {
        let (w, tx, stop) = (w.clone(), tx.clone(), stop.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = run(w, tx) => {}
            }
        });
    }
    rx
}

async fn run(w: WatchConfig, tx: mpsc::Sender<Sighting>) {
    if let Some(path) = &w.socket {
        return crate::watch::socket::serve(path.clone(), &w, tx).await;
    }
    match (&w.directory, &w.command) {
        (Some(dir), _) => {
            info!(watch = %w.name, directory = %dir.display(), "watching a directory");
            watch_directory(dir.clone(), &w, tx).await
        }
        (None, Some(argv)) => {
            info!(watch = %w.name, program = %argv[0], "running a probe every {:?}", w.interval);
            probe(argv.clone(), &w, tx).await
        }
        (None, None) => {}
    }
}

fn rfc3339(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// What a scan saw of one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Seen {
    pub(crate) size: u64,
    /// Modification time, ns since the epoch.
    pub(crate) mtime_ns: u128,
}

/// Where a tracked file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Changed at the last scans; complete once unchanged since `since` for `settle`.
    Settling { since: Instant },
    /// Its event is on its way (hashing, or with the state machine).
    Sending,
    /// Its event was taken (or given up): nothing more while it stays as it is.
    Done,
}

/// The files of one directory watcher (pure: scans go in, files to send come out).
#[derive(Debug, Default)]
pub(crate) struct Tracker {
    files: BTreeMap<PathBuf, (Seen, Phase)>,
}

impl Tracker {
    /// One scan's view at `now`: the files that are complete and not sent yet, now marked
    /// as being sent. A file that changed starts settling again; one that is gone is
    /// forgotten.
    pub(crate) fn scan(
        &mut self,
        seen: &BTreeMap<PathBuf, Seen>,
        now: Instant,
        settle: Duration,
    ) -> Vec<(PathBuf, Seen)> {
        self.files.retain(|p, _| seen.contains_key(p));
        let mut ready = Vec::new();
        for (path, s) in seen {
            let room = self.files.len() < MAX_TRACKED;
            match self.files.get_mut(path) {
                Some((old, phase)) if old == s => {
                    if let Phase::Settling { since } = *phase {
                        if now.duration_since(since) >= settle {
                            *phase = Phase::Sending;
                            ready.push((path.clone(), *s));
                        }
                    }
                }
                Some((old, phase)) => {
                    // Grew or was rewritten (even after its event): settle again.
                    *old = *s;
                    *phase = Phase::Settling { since: now };
                }
                None if room => {
                    self.files
                        .insert(path.clone(), (*s, Phase::Settling { since: now }));
                }
                None => {}
            }
        }
        ready
    }

    /// The event of `path` as it was `seen` is settled (taken or given up): not sent again
    /// while the file stays the same. `false` puts it back to settling (to try again).
    pub(crate) fn settled(&mut self, path: &Path, seen: Seen, done: bool, now: Instant) {
        if let Some((s, phase)) = self.files.get_mut(path) {
            if *s == seen {
                *phase = if done {
                    Phase::Done
                } else {
                    Phase::Settling { since: now }
                };
            }
        }
    }

    /// Forgets `path` (deleted after its event).
    pub(crate) fn forget(&mut self, path: &Path) {
        self.files.remove(path);
    }
}

/// The event id of a file as seen: the same file, unchanged, has the same id after a restart.
pub(crate) fn file_event_id(relative: &str, s: Seen) -> String {
    let mut h = Sha256::new();
    h.update(relative.as_bytes());
    h.update([0]);
    h.update(s.size.to_be_bytes());
    h.update(s.mtime_ns.to_be_bytes());
    let d = h.finalize();
    spine_protocol::data::hex(&d[..16])
}

/// Lists the regular files under `dir` (into subdirectories when `recursive`) whose name
/// matches `pattern` (or, without one, does not start with `.`).
fn list(
    dir: &Path,
    recursive: bool,
    pattern: Option<&glob::Pattern>,
) -> std::io::Result<BTreeMap<PathBuf, Seen>> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        let entries = match std::fs::read_dir(&d) {
            Ok(e) => e,
            // The watched directory itself must be readable; a subdirectory may vanish.
            Err(e) if d == dir => return Err(e),
            Err(_) => continue,
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') {
                continue;
            }
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                if recursive {
                    dirs.push(entry.path());
                }
                continue;
            }
            if !meta.is_file() || pattern.is_some_and(|p| !p.matches(&name)) {
                continue;
            }
            let mtime_ns = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            out.insert(
                entry.path(),
                Seen {
                    size: meta.len(),
                    mtime_ns,
                },
            );
        }
    }
    Ok(out)
}

/// The SHA-256 of a file, read in pieces.
fn hash_file(path: &Path) -> std::io::Result<[u8; 32]> {
    use std::io::Read as _;
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().into())
}

/// A file's event with its verdict to come.
struct InFlight {
    path: PathBuf,
    seen: Seen,
    ack: oneshot::Receiver<Ack>,
}

async fn watch_directory(dir: PathBuf, w: &WatchConfig, tx: mpsc::Sender<Sighting>) {
    let pattern = w
        .pattern
        .as_deref()
        .and_then(|p| glob::Pattern::new(p).ok());
    let ty = w.event_type();
    let mut tracker = Tracker::default();
    let mut in_flight: Vec<InFlight> = Vec::new();
    let mut warned = false;
    let mut tick = tokio::time::interval(w.poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = Instant::now();
        // Verdicts that came in since the last scan.
        let mut still = Vec::new();
        for mut f in in_flight.drain(..) {
            match f.ack.try_recv() {
                Err(oneshot::error::TryRecvError::Empty) => still.push(f),
                Ok(Ok(jobs)) => {
                    debug!(watch = %w.name, file = %f.path.display(), jobs = jobs.len(), "file event taken");
                    if w.after == After::Delete {
                        match std::fs::remove_file(&f.path) {
                            Ok(()) => tracker.forget(&f.path),
                            Err(e) => {
                                warn!(watch = %w.name, file = %f.path.display(), "cannot delete the file after its event: {e}");
                                tracker.settled(&f.path, f.seen, true, now);
                            }
                        }
                    } else {
                        tracker.settled(&f.path, f.seen, true, now);
                    }
                }
                Ok(Err(why)) => {
                    error!(watch = %w.name, file = %f.path.display(), "file event given up: {why}");
                    tracker.settled(&f.path, f.seen, true, now);
                }
                // The agent is ending: the next run sees the file again.
                Err(oneshot::error::TryRecvError::Closed) => {
                    tracker.settled(&f.path, f.seen, false, now)
                }
            }
        }
        in_flight = still;
        let (d, r, p) = (dir.clone(), w.recursive, pattern.clone());
        let listed = tokio::task::spawn_blocking(move || list(&d, r, p.as_ref())).await;
        let seen = match listed {
            Ok(Ok(seen)) => {
                warned = false;
                seen
            }
            Ok(Err(e)) => {
                if !warned {
                    warn!(watch = %w.name, directory = %dir.display(), "cannot read the watched directory: {e} (trying again every {:?})", w.poll);
                    warned = true;
                }
                continue;
            }
            Err(_) => continue,
        };
        for (path, s) in tracker.scan(&seen, now, w.settle) {
            let relative = path
                .strip_prefix(&dir)
                .unwrap_or(&path)
                .to_string_lossy()
                .replace('\\', "/");
            let p = path.clone();
            let sha256 = match tokio::task::spawn_blocking(move || hash_file(&p)).await {
                Ok(Ok(h)) => h,
                Ok(Err(e)) => {
                    debug!(watch = %w.name, file = %path.display(), "cannot read the file yet: {e}");
                    tracker.settled(&path, s, false, now);
                    continue;
                }
                Err(_) => continue,
            };
            let mime = mime_guess::from_path(&path).first().map(|m| m.to_string());
            let time = SystemTime::UNIX_EPOCH
                + Duration::from_nanos(u64::try_from(s.mtime_ns).unwrap_or(u64::MAX));
            let event = Watched {
                watch: w.name.clone(),
                id: file_event_id(&relative, s),
                ty: ty.clone(),
                subject: Some(relative.clone()),
                time: rfc3339(time),
                data: WatchedData::File {
                    path: path.clone(),
                    size: s.size,
                    sha256,
                    mime,
                },
            };
            info!(watch = %w.name, file = %relative, bytes = s.size, "file complete: sending its event");
            let (ack_tx, ack_rx) = oneshot::channel();
            if tx.send(Sighting { event, ack: ack_tx }).await.is_err() {
                return;
            }
            in_flight.push(InFlight {
                path,
                seen: s,
                ack: ack_rx,
            });
        }
    }
}

/// One probe run's result.
async fn run_probe(argv: &[String], timeout: Duration) -> Value {
    let started = Instant::now();
    let mut cmd = tokio::process::Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let cut = |b: &[u8]| {
        let b = &b[..b.len().min(PROBE_OUTPUT)];
        String::from_utf8_lossy(b).trim_end().to_owned()
    };
    let result = match cmd.spawn() {
        Err(e) => {
            return json!({"ok": false, "exit_code": null, "error": format!("cannot start {}: {e}", argv[0]), "elapsed_ms": 0})
        }
        Ok(child) => tokio::time::timeout(timeout, child.wait_with_output()).await,
    };
    let elapsed_ms = started.elapsed().as_millis() as u64;
    match result {
        Err(_) => {
            json!({"ok": false, "exit_code": null, "error": format!("timed out after {timeout:?}"), "elapsed_ms": elapsed_ms})
        }
        Ok(Err(e)) => {
            json!({"ok": false, "exit_code": null, "error": e.to_string(), "elapsed_ms": elapsed_ms})
        }
        Ok(Ok(out)) => json!({
            "ok": out.status.success(),
            "exit_code": out.status.code(),
            "stdout": cut(&out.stdout),
            "stderr": cut(&out.stderr),
            "elapsed_ms": elapsed_ms,
        }),
    }
}

async fn probe(argv: Vec<String>, w: &WatchConfig, tx: mpsc::Sender<Sighting>) {
    let ty = w.event_type();
    let mut last: Option<Value> = None;
    let mut acks: HashMap<String, oneshot::Receiver<Ack>> = HashMap::new();
    let mut tick = tokio::time::interval(w.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        acks.retain(|id, rx| match rx.try_recv() {
            Err(oneshot::error::TryRecvError::Empty) => true,
            Ok(Err(why)) => {
                error!(watch = %w.name, event = %id, "probe event given up: {why}");
                false
            }
            _ => false,
        });
        let at = SystemTime::now();
        let result = run_probe(&argv, w.timeout.min(w.interval)).await;
        let status = (result.get("ok").cloned(), result.get("exit_code").cloned());
        let changed = last
            .as_ref()
            .is_none_or(|l| (l.get("ok").cloned(), l.get("exit_code").cloned()) != status);
        last = Some(result.clone());
        if !changed && w.emit == Emit::Change {
            continue;
        }
        let ms = at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
        let event = Watched {
            watch: w.name.clone(),
            id: format!("{}-{ms}", w.name),
            ty: ty.clone(),
            subject: Some(argv[0].clone()),
            time: rfc3339(at),
            data: WatchedData::Json(result),
        };
        let (ack_tx, ack_rx) = oneshot::channel();
        acks.insert(event.id.clone(), ack_rx);
        if tx.send(Sighting { event, ack: ack_tx }).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(size: u64, mtime_ns: u128) -> Seen {
        Seen { size, mtime_ns }
    }

    #[test]
    fn a_file_is_sent_once_after_it_stopped_growing_and_again_only_if_it_changes() {
        let settle = Duration::from_secs(2);
        let t0 = Instant::now();
        let mut t = Tracker::default();
        let p = PathBuf::from("/in/a.jpg");
        let at = |s: u64| t0 + Duration::from_millis(s);
        let scan = |t: &mut Tracker, s: Seen, ms: u64| {
            t.scan(&BTreeMap::from([(p.clone(), s)]), at(ms), settle)
        };
        // Written in pieces: each scan sees it grow, so it settles again.
        for (i, ms) in [0, 1000, 2000, 3000].into_iter().enumerate() {
            assert!(scan(&mut t, seen(100 * (i as u64 + 1), ms as u128), ms).is_empty());
        }
        // Unchanged for less than settle: not yet.
        assert!(scan(&mut t, seen(400, 3000), 4000).is_empty());
        // Unchanged for settle: once.
        let ready = scan(&mut t, seen(400, 3000), 5000);
        assert_eq!(ready, vec![(p.clone(), seen(400, 3000))]);
        assert!(scan(&mut t, seen(400, 3000), 6000).is_empty());
        t.settled(&p, seen(400, 3000), true, at(6000));
        assert!(scan(&mut t, seen(400, 3000), 60_000).is_empty());
        // Rewritten: a new event once it settles.
        assert!(scan(&mut t, seen(500, 61_000), 61_000).is_empty());
        assert_eq!(scan(&mut t, seen(500, 61_000), 63_000).len(), 1);
        // A failure to send puts it back: sent again after settling.
        t.settled(&p, seen(500, 61_000), false, at(63_000));
        assert!(scan(&mut t, seen(500, 61_000), 64_000).is_empty());
        assert_eq!(scan(&mut t, seen(500, 61_000), 65_000).len(), 1);
        // Gone: forgotten; back with the same size and time: the same id, sent again (the
        // dispatcher makes no second job of it).
        assert!(t.scan(&BTreeMap::new(), at(66_000), settle).is_empty());
        assert!(t.files.is_empty());
    }

    #[test]
    fn file_event_ids_name_the_file_as_it_is() {
        let a = file_event_id("in/a.jpg", seen(10, 5));
        assert_eq!(a.len(), 32);
        assert_eq!(a, file_event_id("in/a.jpg", seen(10, 5)));
        assert_ne!(a, file_event_id("in/a.jpg", seen(11, 5)));
        assert_ne!(a, file_event_id("in/a.jpg", seen(10, 6)));
        assert_ne!(a, file_event_id("in/b.jpg", seen(10, 5)));
    }

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(951_782_400_123);
        assert_eq!(rfc3339(t), "2000-02-29T00:00:00.123Z");
    }

    fn cfg(toml_text: &str) -> Result<(), String> {
        #[derive(Deserialize)]
        struct W {
            watch: Vec<WatchConfig>,
        }
        let w: W = toml::from_str(toml_text).map_err(|e| e.to_string())?;
        w.watch[0].validate("watch[0]")
    }

    /// The agents' blocks of docs/events.md and docs/agent.md are configurations that load.
    #[test]
    fn the_docs_watchers_load() {
        let mut n = 0;
        for doc in [
            include_str!("../../docs/events.md"),
            include_str!("../../docs/agent.md"),
        ] {
            for block in doc.split("```toml\n").skip(1) {
                let text = block.split("```").next().unwrap_or("");
                if !text.contains("[[watch]]") {
                    continue;
                }
                let cfg =
                    crate::AgentConfig::from_toml(text).unwrap_or_else(|e| panic!("{e}\n{text}"));
                cfg.validate().unwrap_or_else(|e| panic!("{e}\n{text}"));
                n += 1;
            }
        }
        assert!(n >= 2, "{n} watcher examples");
    }

    #[test]
    fn bad_watchers_are_refused_naming_the_key() {
        assert_eq!(
            cfg("[[watch]]\nname = \"up\"\ndirectory = \"/srv/in\"\n"),
            Ok(())
        );
        assert_eq!(
            cfg("[[watch]]\nname = \"p\"\ncommand = [\"/bin/true\"]\ninterval = \"5s\"\n"),
            Ok(())
        );
        for (text, want) in [
            ("name = \"a b\"\ndirectory = \"/x\"", "watch[0].name"),
            ("name = \"a\"", "give directory"),
            (
                "name = \"a\"\ndirectory = \"/x\"\ncommand = [\"x\"]",
                "not several",
            ),
            ("name = \"a\"\nsocket = \"rel.sock\"", "watch[0].socket"),
            ("name = \"a\"\ndirectory = \"rel\"", "watch[0].directory"),
            (
                "name = \"a\"\ndirectory = \"/x\"\npattern = \"[\"",
                "watch[0].pattern",
            ),
            (
                "name = \"a\"\ndirectory = \"/x\"\nsettle = \"100ms\"",
                "watch[0].settle",
            ),
            ("name = \"a\"\ncommand = []", "watch[0].command"),
            (
                "name = \"a\"\ncommand = [\"x\"]\ntimeout = \"0s\"",
                "watch[0].timeout",
            ),
        ] {
            let e = cfg(&format!("[[watch]]\n{text}\n")).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
        }
    }
}
