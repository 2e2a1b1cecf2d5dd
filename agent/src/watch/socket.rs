//! A socket watcher (`[[watch]] socket = …`): a local service — an exec-wrapped legacy
//! program, a cron job, a shell script with `socat` — emits events by writing one JSON object
//! per line to a Unix socket the agent listens on, and reads one JSON answer per line, in
//! order: `{"id", "ok": true, "jobs": [...]}` once the dispatcher has stored the jobs the
//! rules made of it, or `{"id", "ok": false, "error": "..."}`.
//!
//! A line is `{"type"?, "id"?, "subject"?, "time"?, "data"?}`: `type` defaults to the
//! watcher's, `id` to one made of the watcher's name, the time and a count (give your own to
//! make a retry of the same event harmless: the dispatcher makes each event's jobs once per
//! source and id). The socket is created for the agent's user only (mode 0600); a stale socket
//! file left by a killed agent is replaced.

use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, warn};

use super::{rfc3339, Sighting, WatchConfig, Watched, WatchedData};

/// Longest line read (an event's JSON data is at most the inline limit, 64 KiB).
const MAX_LINE: usize = 80 * 1024;
/// Connections served at once.
const MAX_CONNECTIONS: usize = 64;

pub(super) async fn serve(path: PathBuf, w: &WatchConfig, tx: mpsc::Sender<Sighting>) {
    // A socket file left by an agent that was killed: replaced. Anything else there is not
    // ours to delete.
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.file_type().is_socket() => {
            let _ = std::fs::remove_file(&path);
        }
        Ok(_) => {
            error!(watch = %w.name, socket = %path.display(), "not a socket: the watcher does not start (move the file away)");
            return;
        }
        Err(_) => {}
    }
    let listener = match UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            error!(watch = %w.name, socket = %path.display(), "cannot listen: {e}");
            return;
        }
    };
    if let Err(e) = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)) {
        warn!(watch = %w.name, socket = %path.display(), "cannot make the socket private: {e}");
    }
    info!(watch = %w.name, socket = %path.display(), "listening for events");
    let _remove = RemoveOnDrop(path.clone());
    let seq = Arc::new(AtomicU64::new(0));
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!(watch = %w.name, "accepting a connection: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            warn!(watch = %w.name, "{MAX_CONNECTIONS} connections already: one refused");
            continue;
        };
        let (w, tx, seq) = (w.clone(), tx.clone(), seq.clone());
        tokio::spawn(async move {
            connection(stream, &w, &tx, &seq).await;
            drop(permit);
        });
    }
}

/// Deletes the socket file when the watcher stops.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Serves one connection: a line in, its answer out, in order.
async fn connection(
    stream: UnixStream,
    w: &WatchConfig,
    tx: &mpsc::Sender<Sighting>,
    seq: &AtomicU64,
) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read);
    let mut buf = Vec::new();
    let mut n = 0u64;
    loop {
        buf.clear();
        // Reads at most MAX_LINE + 1 bytes of a line: a longer one is refused, not buffered.
        let got = match (&mut lines)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut buf)
            .await
        {
            Ok(0) => return,
            Ok(got) => got,
            Err(e) => {
                debug!(watch = %w.name, "reading a line: {e}");
                return;
            }
        };
        n += 1;
        let answer = if got > MAX_LINE {
            let a =
                json!({"ok": false, "error": format!("line {n}: longer than {MAX_LINE} bytes")});
            // The rest of that line cannot be told from the next: the connection ends.
            let _ = write.write_all(format!("{a}\n").as_bytes()).await;
            return;
        } else {
            let text = String::from_utf8_lossy(&buf);
            let text = text.trim();
            if text.is_empty() {
                continue;
            }
            match event(text, w, seq) {
                Err(why) => json!({"ok": false, "error": format!("line {n}: {why}")}),
                Ok(event) => {
                    let id = event.id.clone();
                    let (ack_tx, ack_rx) = oneshot::channel();
                    if tx.send(Sighting { event, ack: ack_tx }).await.is_err() {
                        return;
                    }
                    match ack_rx.await {
                        Ok(Ok(jobs)) => json!({"id": id, "ok": true, "jobs": jobs}),
                        Ok(Err(why)) => json!({"id": id, "ok": false, "error": why}),
                        Err(_) => {
                            json!({"id": id, "ok": false, "error": "the agent is stopping: send it again"})
                        }
                    }
                }
            }
        };
        if write
            .write_all(format!("{answer}\n").as_bytes())
            .await
            .is_err()
        {
            return;
        }
    }
}

/// The event a line describes.
fn event(line: &str, w: &WatchConfig, seq: &AtomicU64) -> Result<Watched, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let Value::Object(mut o) = v else {
        return Err("an event is a JSON object: {\"type\": …, \"data\": …}".into());
    };
    let text =
        |o: &mut serde_json::Map<String, Value>, k: &str| -> Result<Option<String>, String> {
            match o.remove(k) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) if !s.is_empty() && s.len() <= 1024 => Ok(Some(s)),
                Some(other) => Err(format!("{k}: {other} is not a string of 1 to 1024 bytes")),
            }
        };
    let ty = text(&mut o, "type")?.unwrap_or_else(|| w.event_type());
    let subject = text(&mut o, "subject")?;
    let time = text(&mut o, "time")?;
    let id = match text(&mut o, "id")? {
        Some(id) => id,
        None => {
            let ms = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis());
            format!("{}-{ms}-{}", w.name, seq.fetch_add(1, Ordering::Relaxed))
        }
    };
    let data = o.remove("data").unwrap_or(Value::Null);
    if let Some(k) = o.keys().next() {
        return Err(format!(
            "{k}: unknown (an event line has type, id, subject, time and data)"
        ));
    }
    Ok(Watched {
        watch: w.name.clone(),
        id,
        ty,
        subject,
        time: time.unwrap_or_else(|| rfc3339(SystemTime::now())),
        data: WatchedData::Json(data),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watch() -> WatchConfig {
        toml::from_str("name = \"legacy\"\nsocket = \"/run/x.sock\"\n").unwrap()
    }

    #[test]
    fn a_line_is_an_event_with_defaults_and_bad_lines_say_why() {
        let (w, seq) = (watch(), AtomicU64::new(0));
        let e = event(
            r#"{"type": "com.example.done", "id": "r-7", "data": {"n": 1}}"#,
            &w,
            &seq,
        )
        .unwrap();
        assert_eq!((e.ty.as_str(), e.id.as_str()), ("com.example.done", "r-7"));
        assert_eq!(e.data, WatchedData::Json(json!({"n": 1})));
        let e = event("{}", &w, &seq).unwrap();
        assert_eq!(e.ty, "spine.service.event");
        assert!(e.id.starts_with("legacy-"), "{}", e.id);
        assert_eq!(e.data, WatchedData::Json(Value::Null));
        for (line, want) in [
            ("nope", "not JSON"),
            ("[1]", "a JSON object"),
            (r#"{"type": 3}"#, "type:"),
            (r#"{"colour": "red"}"#, "colour: unknown"),
        ] {
            let why = event(line, &w, &seq).unwrap_err();
            assert!(why.contains(want), "{line}: {why}");
        }
    }
}
