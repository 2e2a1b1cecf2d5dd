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
use std::sync::{Arc, Mutex};
use std::time::Duration;

use spine_protocol::JobId;
use tokio::sync::{broadcast, oneshot};

use super::error::ApiError;
use super::Handle;
use crate::core::{EventKind, JobEvent, Rendered};

/// What a waiting request is told: the final job's JSON, or `None` to read it again.
type Wake = Option<Rendered>;

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

/// Announcements a standby keeps (about a second's worth under load), for the callers whose
/// submissions were stored before they began to wait.
const RECENT: usize = 8192;

/// What a standby heard of a job's end: its view as the leader sent it, if it did.
type View = Option<Arc<str>>;

/// A standby's callers waiting for jobs to end, and the ends the leader announced lately
/// (PostgreSQL's `spine_ended`). As on the leader ([`Waiters`]), an announcement costs a map
/// lookup, not a wake-up of every waiting request; and a job's view is parsed by the one
/// standby whose caller waits for it, once.
///
/// A caller learns its job's id only once the leader stored it, and the job may end before
/// the caller registers: so the announcements are numbered and the latest [`RECENT`] kept. A
/// caller that took a [`Fresh`] mark before its submission finds its job among them, or
/// knows (when none after its mark was let go) that it has not ended, without a read.
#[derive(Default)]
pub(crate) struct Announced {
    inner: Mutex<Heard>,
}

#[derive(Default)]
struct Heard {
    waiting: HashMap<Arc<str>, Vec<oneshot::Sender<View>>>,
    /// The latest announcements, oldest first: (number, id).
    order: std::collections::VecDeque<(u64, Arc<str>)>,
    /// The same, by id: (number, view).
    recent: HashMap<Arc<str>, (u64, View)>,
    /// The number of the next announcement.
    next: u64,
    /// Every announcement from this number on is in `recent` (earlier ones were let go, or
    /// lost to a lagging channel).
    kept_from: u64,
}

/// What [`Announced::register`] found.
enum Registered {
    /// The job's end was announced already.
    Ended(View),
    /// Woken when it is; `complete`: no announcement since the caller's mark was missed, so
    /// the job has not ended yet.
    Waiting(oneshot::Receiver<View>, bool),
}

impl Announced {
    fn lock(&self) -> std::sync::MutexGuard<'_, Heard> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The mark a caller takes before submitting: the number of the next announcement.
    fn mark(&self) -> u64 {
        self.lock().next
    }

    /// The leader announced that `id` ended: its waiters are told.
    pub(crate) fn announce(&self, id: Arc<str>, view: View) {
        let mut h = self.lock();
        let n = h.next;
        h.next += 1;
        if let Some(waiting) = h.waiting.remove(&id) {
            for w in waiting {
                let _ = w.send(view.clone());
            }
        }
        h.order.push_back((n, id.clone()));
        h.recent.insert(id, (n, view));
        while h.order.len() > RECENT {
            let Some((m, old)) = h.order.pop_front() else {
                break;
            };
            h.kept_from = m + 1;
            // (Announced again since: kept.)
            if h.recent.get(&old).is_some_and(|(k, _)| *k == m) {
                h.recent.remove(&old);
            }
        }
    }

    /// Announcements were lost (the channel lagged): every waiter looks for itself, and no
    /// mark from before now is complete.
    pub(crate) fn lost(&self) {
        let mut h = self.lock();
        // The lost ones count as one announcement, let go.
        h.next += 1;
        h.kept_from = h.next;
        for (_, waiting) in h.waiting.drain() {
            for w in waiting {
                let _ = w.send(None);
            }
        }
    }

    fn register(&self, id: &str, since: Option<u64>) -> Registered {
        let mut h = self.lock();
        if let Some((_, view)) = h.recent.get(id) {
            return Registered::Ended(view.clone());
        }
        let complete = since.is_some_and(|s| h.kept_from <= s);
        let (tx, rx) = oneshot::channel();
        h.waiting.entry(id.into()).or_default().push(tx);
        Registered::Waiting(rx, complete)
    }

    fn forget_gone(&self, id: &str) {
        let mut h = self.lock();
        if let Some(v) = h.waiting.get_mut(id) {
            v.retain(|s| !s.is_closed());
            if v.is_empty() {
                h.waiting.remove(id);
            }
        }
    }

    /// Feeds it from the listener's `ended` channel, until that closes.
    pub(crate) fn follow(
        self: Arc<Self>,
        mut rx: broadcast::Receiver<crate::store::postgres::Ended>,
    ) {
        tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok(e) if e.is_missed() => self.lost(),
                    Ok(e) => self.announce(e.id, e.view),
                    Err(broadcast::error::RecvError::Lagged(_)) => self.lost(),
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
    }
}

/// A standby's caller that submitted the job it waits for: the number of the first
/// announcement after its submission began ([`Announced`]), so that its wait begins without
/// a read of the shared store.
pub(super) struct Fresh(u64);

impl Fresh {
    /// At a standby, before a submission: its mark.
    pub(super) fn before_submit(h: &Handle) -> Option<Fresh> {
        h.standby_store()?;
        h.announced.as_ref().map(|a| Fresh(a.mark()))
    }
}

/// A view the leader sent, checked for its caller.
fn parsed(view: &str) -> Result<Rendered, ApiError> {
    Rendered::parse(view).map_err(|e| {
        tracing::error!("the leader announced a job's end with a view that is not JSON: {e}");
        ApiError::unavailable()
    })
}

/// Waits up to `wait` for job `id` to end: its final JSON, or `None` when the wait is over
/// first. `current` reads the job as it is now (`Some` JSON when it has ended).
pub(super) async fn until_final<F, Fut>(
    h: &Handle,
    id: &JobId,
    wait: Duration,
    mut current: F,
    fresh: Option<Fresh>,
) -> Result<Option<Rendered>, ApiError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<Rendered>, ApiError>>,
{
    let deadline = tokio::time::Instant::now() + wait;
    // A standby holds no job: it reads the shared store unless the leader's announcement
    // (with the job's view) tells, and at least every STANDBY_POLL.
    if let (Some(_), Some(heard)) = (h.standby_store(), h.announced.as_ref()) {
        let mut since = fresh.map(|Fresh(n)| n);
        loop {
            let (woken, look) = match heard.register(id.as_str(), since.take()) {
                Registered::Ended(Some(view)) => return parsed(&view).map(Some),
                Registered::Ended(None) => (None, true),
                Registered::Waiting(rx, complete) => (Some(rx), !complete),
            };
            if look {
                if let Some(done) = current().await? {
                    heard.forget_gone(id.as_str());
                    return Ok(Some(done));
                }
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                heard.forget_gone(id.as_str());
                return Ok(None);
            }
            let nap = deadline.min(now + STANDBY_POLL);
            match woken {
                Some(rx) => match tokio::time::timeout_at(nap, rx).await {
                    Ok(Ok(Some(view))) => return parsed(&view).map(Some),
                    // Announced without a view, or announcements lost: look.
                    Ok(Ok(None)) => {}
                    // Dropped: the dispatcher is stopping.
                    Ok(Err(_)) => return current().await,
                    Err(_) => heard.forget_gone(id.as_str()),
                },
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
    async fn a_standby_s_waiter_hears_its_job_s_end_before_or_after_it_registers() {
        let a = Announced::default();
        let view = |s: &str| Some(Arc::<str>::from(s));
        let mark = a.mark();
        // Announced before the caller registered (the job ended while its acceptance was
        // on its way back): found among the recent ones.
        a.announce("j-1".into(), view("{\"state\":\"succeeded\"}"));
        match a.register("j-1", Some(mark)) {
            Registered::Ended(v) => assert_eq!(v.as_deref(), Some("{\"state\":\"succeeded\"}")),
            Registered::Waiting(..) => panic!("announced already"),
        }
        // Not announced since the mark: it has not ended, no read needed.
        let Registered::Waiting(rx, complete) = a.register("j-2", Some(mark)) else {
            panic!("not announced")
        };
        assert!(complete);
        // Only its own job's announcement wakes it, with the view.
        a.announce("j-3".into(), None);
        a.announce("j-2".into(), view("{}"));
        let v = tokio::time::timeout(Duration::from_secs(5), rx)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(v.as_deref(), Some("{}"));
        assert!(a.lock().waiting.is_empty());
        // Without a mark, a waiter reads the job first.
        let Registered::Waiting(_, complete) = a.register("j-4", None) else {
            panic!("not announced")
        };
        assert!(!complete);
    }

    #[tokio::test]
    async fn a_mark_older_than_the_kept_announcements_reads_the_job() {
        let a = Announced::default();
        let mark = a.mark();
        for n in 0..=RECENT {
            a.announce(format!("j-{n}").into(), None);
        }
        // The first one was let go: a caller marked before it cannot know it did not miss
        // its own job's end.
        assert!(matches!(
            a.register("j-0", Some(mark)),
            Registered::Waiting(_, false)
        ));
        assert!(matches!(
            a.register("j-1", Some(mark)),
            Registered::Ended(None)
        ));
        assert_eq!(a.lock().recent.len(), RECENT);
        // Announcements lost: every waiter is woken to look, and no earlier mark is whole.
        let later = a.mark();
        let Registered::Waiting(rx, true) = a.register("j-x", Some(later)) else {
            panic!("nothing missed since the mark")
        };
        a.lost();
        assert_eq!(rx.await.unwrap(), None);
        assert!(matches!(
            a.register("j-y", Some(later)),
            Registered::Waiting(_, false)
        ));
    }

    #[tokio::test]
    async fn listening_begun_again_wakes_the_waiters_to_look_for_themselves() {
        use crate::store::postgres::Ended;
        let a = Arc::new(Announced::default());
        let (tx, rx) = broadcast::channel(16);
        a.clone().follow(rx);
        let mark = a.mark();
        let Registered::Waiting(first, true) = a.register("j-1", Some(mark)) else {
            panic!("nothing missed since the mark")
        };
        // The standby listens again (a new connection, or it stood by again after leading):
        // what was announced meanwhile may be lost.
        tx.send(Ended::missed()).unwrap();
        let woken = tokio::time::timeout(Duration::from_secs(5), first).await;
        assert_eq!(woken.expect("woken").unwrap(), None);
        let Registered::Waiting(second, false) = a.register("j-2", Some(mark)) else {
            panic!("a mark from before the gap is not whole")
        };
        // Ends announced after it reach their waiters as before.
        tx.send(Ended {
            id: Arc::from("j-2"),
            view: Some(Arc::from("{}")),
        })
        .unwrap();
        assert_eq!(second.await.unwrap().as_deref(), Some("{}"));
        assert!(matches!(
            a.register("j-2", None),
            Registered::Ended(Some(_))
        ));
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
            data: Rendered::of(&serde_json::json!({ "state": state })),
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
            assert_eq!(
                v.map(|v| v.value()),
                Some(serde_json::json!({"state": "succeeded"}))
            );
        }
        let mut b1 = b1;
        assert!(b1.try_recv().is_err(), "job b has not ended");
        assert!(!w.lock().contains_key(&a), "job a's waiters are gone");
        drop(b1);
        w.forget_gone(&b);
        assert!(w.lock().is_empty());
    }
}
