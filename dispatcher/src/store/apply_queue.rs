//! The queue from the journal to the applier thread ([`super::applier`]).
//!
//! The applier takes the first batch and then lingers up to [`super::APPLY_LINGER`] for more,
//! so that one redb transaction holds many. Over a channel (std's or crossbeam's) every send
//! wakes a receiver that waits, so while the applier lingered each commit woke it to move one
//! batch into its group and sleep again: a `futex` wake on the dispatcher's thread, before the
//! commit's answers left, and a thread switch on a 2-core machine where the answer's way
//! through the server needs both cores (BENCHMARKS.md, twenty-fourth session). This queue
//! wakes the applier only when that changes something: it sleeps with nothing to apply, a
//! reader waits ([`ApplyQueue::now`]), its group is full, or the queue closes. The batches that
//! come while it lingers wait for the linger's end. No channel crate offers a send that does
//! not wake, hence these few lines by hand.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// What the applier does, for whoever pushes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Asleep {
    /// Awake (applying, checkpointing): it looks at the queue again when done.
    No,
    /// Waiting for a first batch.
    Idle,
    /// Waiting for more batches after the first, until its linger ends.
    Lingering,
}

struct State<T> {
    items: Vec<T>,
    /// A reader waits: apply what is queued without lingering.
    now: bool,
    closed: bool,
    asleep: Asleep,
    /// How many times the applier was woken (what the tests count).
    wakes: u64,
}

/// See the module documentation. `T` is a batch on its way to redb.
pub(super) struct ApplyQueue<T> {
    state: Mutex<State<T>>,
    cv: Condvar,
    /// A group is applied at once when it holds this many batches.
    group: usize,
}

/// What [`ApplyQueue::next_group`] found.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Next<T> {
    /// Batches to apply in one transaction, in the order they were pushed (perhaps none, when
    /// a reader asked for them to be applied and none were waiting).
    Group(Vec<T>),
    /// The queue closed and every batch was taken.
    Closed,
}

impl<T> ApplyQueue<T> {
    pub(super) fn new(group: usize) -> Self {
        ApplyQueue {
            state: Mutex::new(State {
                items: Vec::new(),
                now: false,
                closed: false,
                asleep: Asleep::No,
                wakes: 0,
            }),
            cv: Condvar::new(),
            group: group.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues a batch; `Err` gives it back if the queue is closed.
    pub(super) fn push(&self, item: T) -> Result<(), T> {
        let mut s = self.lock();
        if s.closed {
            return Err(item);
        }
        s.items.push(item);
        let wake = match s.asleep {
            Asleep::Idle => true,
            Asleep::Lingering => s.items.len() >= self.group,
            Asleep::No => false,
        };
        s.wakes += u64::from(wake);
        drop(s);
        if wake {
            self.cv.notify_one();
        }
        Ok(())
    }

    /// A reader waits for what is queued: the applier stops lingering.
    pub(super) fn now(&self) {
        self.tell(|s| s.now = true);
    }

    /// No more batches: the applier takes what is left, then [`Next::Closed`].
    pub(super) fn close(&self) {
        self.tell(|s| s.closed = true);
    }

    /// Changes what the applier looks at, and wakes it if it sleeps.
    fn tell(&self, change: impl FnOnce(&mut State<T>)) {
        let mut s = self.lock();
        change(&mut s);
        let wake = s.asleep != Asleep::No;
        s.wakes += u64::from(wake);
        drop(s);
        if wake {
            self.cv.notify_one();
        }
    }

    /// Every batch queued, at once (the checkpoint takes them under the journal's lock).
    pub(super) fn take_all(&self) -> Vec<T> {
        std::mem::take(&mut self.lock().items)
    }

    /// The applier's wait: for a first batch (or a reader's [`ApplyQueue::now`]), then up to
    /// `linger` for more, unless a reader waits, the group is full or the queue closed. At
    /// most a group's worth of batches; the rest stay for the next call.
    pub(super) fn next_group(&self, linger: Duration) -> Next<T> {
        let mut s = self.lock();
        while s.items.is_empty() && !s.now && !s.closed {
            s.asleep = Asleep::Idle;
            s = self
                .cv
                .wait(s)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        if s.items.is_empty() && s.closed {
            s.asleep = Asleep::No;
            return Next::Closed;
        }
        if !s.items.is_empty() && !s.now && !s.closed {
            let until = Instant::now() + linger;
            while s.items.len() < self.group && !s.now && !s.closed {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                s.asleep = Asleep::Lingering;
                s = self
                    .cv
                    .wait_timeout(s, left)
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .0;
            }
        }
        s.asleep = Asleep::No;
        s.now = false;
        let n = s.items.len().min(self.group);
        Next::Group(s.items.drain(..n).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const LONG: Duration = Duration::from_secs(30);

    /// Waits until the applier's thread sleeps as `want` says (it gets there on its own).
    fn until_asleep<T>(q: &ApplyQueue<T>, want: Asleep) {
        let t0 = Instant::now();
        while q.lock().asleep != want {
            assert!(t0.elapsed() < LONG, "the applier never got to {want:?}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn batches_come_in_order_and_a_lingering_applier_is_not_woken_by_each() {
        let q = ApplyQueue::new(512);
        q.push(1).unwrap();
        q.push(2).unwrap();
        // Three batches within a linger of 150 ms come as one group, and only after it.
        let q = Arc::new(q);
        let t = {
            let q = q.clone();
            std::thread::spawn(move || {
                let t0 = Instant::now();
                let g = q.next_group(Duration::from_millis(150));
                (g, t0.elapsed())
            })
        };
        until_asleep(&q, Asleep::Lingering);
        q.push(3).unwrap();
        q.push(4).unwrap();
        let (g, took) = t.join().unwrap();
        assert_eq!(g, Next::Group(vec![1, 2, 3, 4]));
        assert!(took >= Duration::from_millis(150), "{took:?}");
        assert_eq!(q.lock().wakes, 0, "nothing woke the lingering applier");
    }

    #[test]
    fn an_idle_applier_wakes_for_a_batch_and_a_full_group_or_a_reader_ends_the_linger() {
        let q = Arc::new(ApplyQueue::new(3));
        let t = {
            let q = q.clone();
            std::thread::spawn(move || {
                let a = q.next_group(LONG);
                let b = q.next_group(LONG);
                let c = q.next_group(LONG);
                (a, b, c)
            })
        };
        // Idle: the first batch wakes it; it lingers; the group of three ends the linger.
        until_asleep(&q, Asleep::Idle);
        q.push(1).unwrap();
        until_asleep(&q, Asleep::Lingering);
        q.push(2).unwrap();
        q.push(3).unwrap();
        // The next call finds nothing and sleeps; the fourth wakes it, and it lingers (30 s):
        // a reader ends that at once.
        until_asleep(&q, Asleep::Idle);
        q.push(4).unwrap();
        until_asleep(&q, Asleep::Lingering);
        q.now();
        // A reader with nothing queued gets an empty group at once.
        until_asleep(&q, Asleep::Idle);
        q.now();
        let (a, b, c) = t.join().unwrap();
        assert_eq!(a, Next::Group(vec![1, 2, 3]));
        assert_eq!(b, Next::Group(vec![4]));
        assert_eq!(c, Next::Group(vec![]));
        // The first batch, the full group, the fourth batch and the two readers; not the
        // second batch.
        assert_eq!(q.lock().wakes, 5);
    }

    #[test]
    fn closing_hands_over_what_is_left_then_says_closed_and_refuses_more() {
        let q = Arc::new(ApplyQueue::new(512));
        q.push("a").unwrap();
        let t = {
            let q = q.clone();
            std::thread::spawn(move || (q.next_group(LONG), q.next_group(LONG)))
        };
        until_asleep(&q, Asleep::Lingering);
        q.close();
        assert_eq!(q.push("b"), Err("b"));
        let (a, b) = t.join().unwrap();
        assert_eq!(a, Next::Group(vec!["a"]));
        assert_eq!(b, Next::Closed);
        // And an idle applier is woken by the close.
        let q = Arc::new(ApplyQueue::<u8>::new(512));
        let t = {
            let q = q.clone();
            std::thread::spawn(move || q.next_group(LONG))
        };
        until_asleep(&q, Asleep::Idle);
        q.close();
        assert_eq!(t.join().unwrap(), Next::Closed);
    }

    #[test]
    fn take_all_empties_the_queue() {
        let q = ApplyQueue::new(2);
        for i in 0..5 {
            q.push(i).unwrap();
        }
        assert_eq!(q.take_all(), vec![0, 1, 2, 3, 4]);
        q.push(5).unwrap();
        q.now();
        // A reader asked: no linger, one group's worth.
        assert_eq!(q.next_group(LONG), Next::Group(vec![5]));
    }
}
