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
use crate::store::postgres::{ended_lines, Ended};

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

    /// The driver, for each event it sends out: a final one wakes its job's waiters (with
    /// `None`, to read the job again, if the event carries no view: [`Rendered::later`]).
    pub(crate) fn event(&self, ev: &JobEvent) {
        if ev.kind != EventKind::Final {
            return;
        }
        let waiting = self.lock().remove(&ev.job);
        let view = (!ev.data.is_later()).then(|| ev.data.clone());
        for s in waiting.into_iter().flatten() {
            let _ = s.send(view.clone());
        }
    }

    /// Whether any request waits for a job (the core renders the views of jobs that end
    /// only then, or while an event stream is open: [`crate::core::Core::set_listened`]).
    pub(crate) fn any(&self) -> bool {
        !self.lock().is_empty()
    }

    /// Whether a request waits for job `id`.
    pub(crate) fn waits_for(&self, id: &JobId) -> bool {
        self.lock().contains_key(id)
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
///
/// Every standby hears the end of every job of the farm, most of them of no interest to its
/// callers (the jobs it passed on are answered by the leader directly). So the leader's
/// notifications are kept as they came, and looked at line by line only while callers wait
/// (to wake them) or when one registers (the lines not yet indexed are then indexed, each
/// once): a standby no one waits at spends on an announcement a count of its lines.
#[derive(Default)]
pub(crate) struct Announced {
    inner: Mutex<Heard>,
}

#[derive(Default)]
struct Heard {
    waiting: HashMap<Arc<str>, Vec<oneshot::Sender<View>>>,
    /// The latest notifications, oldest first: the number of their first announcement,
    /// their payload (a job per line), and how many they hold.
    notes: std::collections::VecDeque<(u64, Arc<str>, u64)>,
    /// The announcements `notes` hold.
    kept: u64,
    /// The announcements of `notes` numbered below `indexed`, by id: (number, view).
    recent: HashMap<Arc<str>, (u64, View)>,
    /// Every announcement numbered below this one and kept is in `recent`.
    indexed: u64,
    /// The number of the next announcement.
    next: u64,
    /// Every announcement from this number on is in `notes` (earlier ones were let go, or
    /// lost to a lagging channel).
    kept_from: u64,
}

impl Heard {
    /// Indexes the announcements kept and not yet indexed.
    fn index(&mut self) {
        if self.indexed >= self.next {
            return;
        }
        let from = self.indexed;
        let Heard { notes, recent, .. } = self;
        for (first, payload, count) in notes.iter().rev() {
            if first + count <= from {
                break;
            }
            for (k, (id, view)) in ended_lines(payload).enumerate() {
                let n = first + k as u64;
                if n < from {
                    continue;
                }
                // A later announcement of the same job wins (indexed in any order).
                match recent.get_mut(id) {
                    Some(had) if had.0 > n => {}
                    Some(had) => *had = (n, view.map(Arc::from)),
                    None => {
                        recent.insert(Arc::from(id), (n, view.map(Arc::from)));
                    }
                }
            }
        }
        self.indexed = self.next;
    }

    /// Lets go of the oldest notifications beyond [`RECENT`] announcements.
    fn let_go(&mut self) {
        while self.kept > RECENT as u64 {
            let Some((first, payload, count)) = self.notes.pop_front() else {
                break;
            };
            self.kept -= count;
            // (Never back: announcements lost later than these were let go keep it higher.)
            self.kept_from = self.kept_from.max(first + count);
            if self.indexed > first {
                for (k, (id, _)) in ended_lines(&payload).enumerate() {
                    // (Announced again since: kept.)
                    if self
                        .recent
                        .get(id)
                        .is_some_and(|(n, _)| *n == first + k as u64)
                    {
                        self.recent.remove(id);
                    }
                }
            }
        }
    }
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

    /// The leader announced that the jobs of `payload` ended (a line each: the id, then a tab
    /// and the job's view if it sent one): their waiters are told.
    pub(crate) fn announce(&self, payload: Arc<str>) {
        let mut h = self.lock();
        let mut count = 0u64;
        for (id, view) in ended_lines(&payload) {
            count += 1;
            if h.waiting.is_empty() {
                continue;
            }
            if let Some(waiting) = h.waiting.remove(id) {
                let view: View = view.map(Arc::from);
                for w in waiting {
                    let _ = w.send(view.clone());
                }
            }
        }
        if count == 0 {
            return;
        }
        let first = h.next;
        h.next += count;
        h.kept += count;
        h.notes.push_back((first, payload, count));
        h.let_go();
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
        h.index();
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
    pub(crate) fn follow(self: Arc<Self>, mut rx: broadcast::Receiver<Ended>) {
        tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok(Ended::Missed) => self.lost(),
                    Ok(Ended::Jobs(payload)) => self.announce(payload),
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
        let mark = a.mark();
        // Announced before the caller registered (the job ended while its acceptance was
        // on its way back): found among the recent ones.
        a.announce("j-0\nj-1\t{\"state\":\"succeeded\"}".into());
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
        a.announce("j-3".into());
        let Registered::Waiting(mut other, _) = a.register("j-5", Some(mark)) else {
            panic!("not announced")
        };
        a.announce("j-4\nj-2\t{}".into());
        assert!(other.try_recv().is_err(), "j-5 has not ended");
        let v = tokio::time::timeout(Duration::from_secs(5), rx)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(v.as_deref(), Some("{}"));
        drop(other);
        a.forget_gone("j-5");
        assert!(a.lock().waiting.is_empty());
        // Without a mark, a waiter reads the job first.
        let Registered::Waiting(_, complete) = a.register("j-9", None) else {
            panic!("not announced")
        };
        assert!(!complete);
    }

    #[tokio::test]
    async fn a_mark_older_than_the_kept_announcements_reads_the_job() {
        let a = Announced::default();
        let mark = a.mark();
        for n in 0..=RECENT {
            a.announce(format!("j-{n}").into());
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
    async fn announcements_no_one_waits_for_are_kept_as_they_came_and_read_when_someone_asks() {
        let a = Announced::default();
        let mark = a.mark();
        // Three notifications of 3,000 ends each, no caller waiting: nothing indexed.
        let note = |from: usize| -> Arc<str> {
            (from..from + 3000)
                .map(|n| format!("j-{n}"))
                .collect::<Vec<_>>()
                .join("\n")
                .into()
        };
        a.announce(note(0));
        a.announce(note(3000));
        a.announce("j-6000\t{\"id\":\"j-6000\"}\nj-6001".into());
        assert!(a.lock().recent.is_empty(), "no one asked: nothing indexed");
        assert_eq!(a.lock().kept, 6002);
        // A caller registering indexes what is kept, once.
        assert!(matches!(
            a.register("j-1", Some(mark)),
            Registered::Ended(None)
        ));
        assert_eq!(a.lock().recent.len(), 6002);
        match a.register("j-6000", Some(mark)) {
            Registered::Ended(v) => assert_eq!(v.as_deref(), Some("{\"id\":\"j-6000\"}")),
            Registered::Waiting(..) => panic!("announced already"),
        }
        // Past RECENT, the oldest notification goes whole, with its index entries; an end
        // announced again later stays.
        a.announce("j-2\tagain".into());
        a.announce(note(7000));
        let h = a.lock();
        assert_eq!(h.kept, 3000 + 2 + 1 + 3000);
        assert_eq!(h.kept_from, 3000);
        assert!(!h.recent.contains_key("j-1"));
        assert!(h.recent.contains_key("j-3000"));
        drop(h);
        match a.register("j-2", None) {
            Registered::Ended(v) => assert_eq!(v.as_deref(), Some("again"), "the later end"),
            Registered::Waiting(..) => panic!("announced again after"),
        }
        // A mark from before the let-go notification is not whole; one after it is.
        assert!(matches!(
            a.register("j-1", Some(mark)),
            Registered::Waiting(_, false)
        ));
        assert!(matches!(
            a.register("j-7000", Some(3000)),
            Registered::Ended(None)
        ));
        assert!(matches!(
            a.register("j-x", Some(3000)),
            Registered::Waiting(_, true)
        ));
        // Lost announcements: a later let-go does not make an older mark whole again.
        a.lost();
        let h = a.lock();
        let lost_at = h.kept_from;
        drop(h);
        a.announce(note(20_000));
        a.announce(note(30_000));
        assert!(a.lock().kept_from >= lost_at);
        assert!(matches!(
            a.register("j-y", Some(lost_at - 1)),
            Registered::Waiting(_, false)
        ));
    }

    #[tokio::test]
    async fn listening_begun_again_wakes_the_waiters_to_look_for_themselves() {
        let a = Arc::new(Announced::default());
        let (tx, rx) = broadcast::channel(16);
        a.clone().follow(rx);
        let mark = a.mark();
        let Registered::Waiting(first, true) = a.register("j-1", Some(mark)) else {
            panic!("nothing missed since the mark")
        };
        // The standby listens again (a new connection, or it stood by again after leading):
        // what was announced meanwhile may be lost.
        tx.send(Ended::Missed).unwrap();
        let woken = tokio::time::timeout(Duration::from_secs(5), first).await;
        assert_eq!(woken.expect("woken").unwrap(), None);
        let Registered::Waiting(second, false) = a.register("j-2", Some(mark)) else {
            panic!("a mark from before the gap is not whole")
        };
        // Ends announced after it reach their waiters as before.
        tx.send(Ended::Jobs(Arc::from("j-2\t{}"))).unwrap();
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
