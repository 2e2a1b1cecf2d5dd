//! Submit-and-wait and long polls: `POST /v1/jobs?wait=30s` and `GET /v1/jobs/{id}?wait=30s`
//! answer with the final job as soon as it ends (or the job as it is when the wait is over),
//! so that a web app needs one round trip per job and no polling.
//!
//! The driver hands each final event to the requests waiting for that job ([`Waiters`])
//! through a oneshot, when it sends the event out: a thousand waiting requests cost a map
//! lookup per final event, not a thousand receivers each cloning every event, and no task
//! is woken for the events no one waits for. A waiter registers before it reads the job's
//! state, so a job that ends between the two is not missed.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::Value;
use spine_protocol::JobId;
use tokio::sync::{broadcast, oneshot};

use super::error::ApiError;
use super::Handle;
use crate::core::{EventKind, JobEvent};

/// What a waiting request is told: the final job's JSON, or `None` to read it again.
type Wake = Option<Value>;

/// The requests waiting for jobs to end.
#[derive(Default)]
pub(crate) struct Waiters {
    map: Mutex<HashMap<JobId, Vec<oneshot::Sender<Wake>>>>,
}

impl Waiters {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<JobId, Vec<oneshot::Sender<Wake>>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A receiver woken when `id` ends (or dropped when the dispatcher stops).
    fn register(&self, id: &JobId) -> oneshot::Receiver<Wake> {
        let (tx, rx) = oneshot::channel();
        self.lock().entry(id.clone()).or_default().push(tx);
        rx
    }

    /// Drops the waiters of `id` whose requests are gone (their wait ended).
    fn forget_gone(&self, id: &JobId) {
        let mut map = self.lock();
        if let Some(v) = map.get_mut(id) {
            v.retain(|s| !s.is_closed());
            if v.is_empty() {
                map.remove(id);
            }
        }
    }

    /// The driver, stopping: every waiting request answers with the job as it is.
    pub(crate) fn close(&self) {
        self.lock().clear();
    }

    /// The driver, for each event it sends out: a final one wakes its job's waiters.
    pub(crate) fn event(&self, ev: &JobEvent) {
        if ev.kind != EventKind::Final {
            return;
        }
        let waiting = self.lock().remove(&ev.job);
        for s in waiting.into_iter().flatten() {
            let _ = s.send(Some(ev.data.clone()));
        }
    }
}

/// The `wait` of a request: a duration (`30s`, `1m`, `500ms`) of at most the request timeout
/// less a second, so that the answer always comes before `http_request_timeout` cuts it.
pub(super) fn parse_wait(text: &str, request_timeout: Duration) -> Result<Duration, ApiError> {
    let wait = spine_protocol::units::parse_duration(text).map_err(|e| {
        ApiError::field(
            "wait",
            format!("'{text}' is not a duration such as 30s, 1m or 500ms: {e}"),
        )
    })?;
    let max = request_timeout.saturating_sub(Duration::from_secs(1));
    if wait > max {
        return Err(ApiError::field(
            "wait",
            format!(
                "at most {} (http_request_timeout less a second); a longer wait is a loop of \
                 waits, or the job's event stream (GET /v1/jobs/{{id}}/events)",
                spine_protocol::units::format_duration(max)
            ),
        ));
    }
    Ok(wait)
}

/// How often a standby looks at a job a caller waits for, whatever it hears.
const STANDBY_POLL: Duration = Duration::from_secs(1);

/// A standby's caller that submitted the job it waits for: it heard the leader's
/// announcements from before the submission, and knows the job had not ended then, so its
/// wait begins without a read of the shared store.
pub(super) struct Fresh(pub broadcast::Receiver<crate::store::postgres::Ended>);

impl Fresh {
    /// At a standby, before a submission: the announcements from now on.
    pub(super) fn before_submit(h: &Handle) -> Option<Fresh> {
        h.standby_store()?;
        h.ended.as_ref().map(|s| Fresh(s.subscribe()))
    }
}

/// Waits up to `wait` for job `id` to end: its final JSON, or `None` when the wait is over
/// first. `current` reads the job as it is now (`Some` JSON when it has ended).
pub(super) async fn until_final<F, Fut>(
    h: &Handle,
    id: &JobId,
    wait: Duration,
    mut current: F,
    fresh: Option<Fresh>,
) -> Result<Option<Value>, ApiError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<Value>, ApiError>>,
{
    let deadline = tokio::time::Instant::now() + wait;
    // A standby holds no job: it reads the shared store again when the leader announces the
    // job ended (PostgreSQL's `spine_ended`; no read when the announcement carries the job's
    // view), and at least every STANDBY_POLL.
    if h.standby_store().is_some() {
        let (mut ended, mut look) = match fresh {
            Some(Fresh(rx)) => (Some(rx), false),
            None => (h.ended.as_ref().map(broadcast::Sender::subscribe), true),
        };
        loop {
            if look {
                if let Some(done) = current().await? {
                    return Ok(Some(done));
                }
            }
            look = true;
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let nap = deadline.min(now + STANDBY_POLL);
            match ended.as_mut() {
                Some(rx) => {
                    let announced = async {
                        loop {
                            match rx.recv().await {
                                Ok(e) if e.id == id.as_str() => return e.view,
                                Ok(_) => {}
                                Err(broadcast::error::RecvError::Lagged(_)) => return None,
                                Err(broadcast::error::RecvError::Closed) => {
                                    std::future::pending::<()>().await
                                }
                            }
                        }
                    };
                    if let Ok(Some(view)) = tokio::time::timeout_at(nap, announced).await {
                        return Ok(Some(Value::clone(&view)));
                    }
                }
                None => tokio::time::sleep_until(nap).await,
            }
        }
    }
    loop {
        let woken = h.waiters.register(id);
        if let Some(done) = current().await? {
            h.waiters.forget_gone(id);
            return Ok(Some(done));
        }
        match tokio::time::timeout_at(deadline, woken).await {
            Ok(Ok(Some(done))) => return Ok(Some(done)),
            // Woken to look again (missed events), or the dispatcher is stopping.
            Ok(Ok(None)) => continue,
            Ok(Err(_)) => return current().await,
            Err(_) => {
                h.waiters.forget_gone(id);
                return Ok(None);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_is_a_duration_below_the_request_timeout() {
        let t = Duration::from_secs(120);
        assert_eq!(parse_wait("30s", t).unwrap(), Duration::from_secs(30));
        assert_eq!(parse_wait("500ms", t).unwrap(), Duration::from_millis(500));
        assert_eq!(parse_wait("119s", t).unwrap(), Duration::from_secs(119));
        let e = parse_wait("2m", t).unwrap_err().message;
        assert!(
            e.contains("at most 1m 59s") || e.contains("at most 119s"),
            "{e}"
        );
        let e = parse_wait("soon", t).unwrap_err().message;
        assert!(e.contains("'soon' is not a duration"), "{e}");
    }

    #[tokio::test]
    async fn a_final_event_wakes_every_waiter_of_its_job_and_only_those() {
        let w = Waiters::default();
        let a: JobId = "job-a".parse().unwrap();
        let b: JobId = "job-b".parse().unwrap();
        let (a1, a2, b1) = (w.register(&a), w.register(&a), w.register(&b));
        let event = |kind, state: &str| JobEvent {
            job: a.clone(),
            submitter: "http:web".into(),
            kind,
            data: serde_json::json!({ "state": state }),
        };
        // Not final: nobody wakes.
        w.event(&event(EventKind::Progress, "running"));
        assert_eq!(w.lock()[&a].len(), 2);
        w.event(&event(EventKind::Final, "succeeded"));
        for rx in [a1, a2] {
            let v = tokio::time::timeout(Duration::from_secs(5), rx)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(v, Some(serde_json::json!({"state": "succeeded"})));
        }
        let mut b1 = b1;
        assert!(b1.try_recv().is_err(), "job b has not ended");
        assert!(!w.lock().contains_key(&a), "job a's waiters are gone");
        drop(b1);
        w.forget_gone(&b);
        assert!(w.lock().is_empty());
    }
}
