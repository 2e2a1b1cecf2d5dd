//! The election's I/O ([`crate::election`] is its pure part): a task of its own that asks the
//! PostgreSQL lease row what [`Election`] says to ask, when it says to, on the store's lease
//! connection, and publishes this process's part ([`Leadership`]) to the driver and the HTTP
//! API through a `watch` channel. While it stands by, it also reads who leads, so that
//! refusals can name the leader. Stopping it ([`Campaign::stop`]) releases the lease, so that
//! a standby takes over at once after a clean shutdown.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::election::{Answer, Ask, Election, Role, Timing};
use crate::store::postgres::{Contact, LeaderRow, PgStore};

/// This process's part, as the driver and the HTTP API see it.
#[derive(Debug, Clone)]
pub struct Leadership {
    /// This process's id in the lease row.
    pub holder: String,
    /// Leader (with the epoch that fences its commits) or standby.
    pub role: Role,
    /// Who holds the row, as last read (a standby reads it each poll), and when.
    pub leader: Option<LeaderRow>,
    /// When `leader` was read.
    pub leader_read: Option<Instant>,
    /// The lease's length (this process's setting; dispatchers sharing a store have one).
    pub lease: std::time::Duration,
    /// When this process last took or renewed the lease.
    pub renewed: Option<Instant>,
    /// Times this process became leader.
    pub elections: u64,
    /// Times another dispatcher took the lease over from a leader that did not release it
    /// (seen by this process, standby or leader).
    pub failovers: u64,
}

impl Leadership {
    /// Before the first answer: standing by.
    pub fn new(holder: String) -> Leadership {
        Leadership {
            holder,
            role: Role::Standby,
            leader: None,
            leader_read: None,
            lease: crate::election::Timing::default().lease,
            renewed: None,
            elections: 0,
            failovers: 0,
        }
    }

    /// The epoch this process leads with, if it leads.
    pub fn epoch(&self) -> Option<u64> {
        match self.role {
            Role::Leader { epoch } => Some(epoch),
            Role::Standby => None,
        }
    }

    /// The leader's HTTP API base URL, if another process leads and published one.
    pub fn leader_url(&self) -> Option<&str> {
        self.leader
            .as_ref()
            .filter(|l| !l.holder.is_empty() && l.holder != self.holder && !l.url.is_empty())
            .map(|l| l.url.as_str())
    }

    /// Whether another process leads and renewed its lease lately, by the row as last read:
    /// more than half a lease left now. A leader that stopped renewing (paused, or dead and
    /// not yet replaced) is not, well before a standby takes over from it.
    pub fn leader_lively(&self, now: Instant) -> bool {
        let (Some(row), Some(read)) = (&self.leader, self.leader_read) else {
            return false;
        };
        let left = row.expires_in_ms - now.saturating_duration_since(read).as_secs_f64() * 1e3;
        self.leader_url().is_some() && left > self.lease.as_secs_f64() * 1e3 / 2.0
    }

    /// The leader's XMPP JID, if another process leads.
    pub fn leader_jid(&self) -> Option<&str> {
        self.leader
            .as_ref()
            .filter(|l| !l.holder.is_empty() && l.holder != self.holder && !l.jid.is_empty())
            .map(|l| l.jid.as_str())
    }
}

/// The running election task.
pub(crate) struct Campaign {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Campaign {
    /// Starts campaigning as `holder`, reachable at `contact`.
    pub(crate) fn start(
        pg: Arc<PgStore>,
        holder: String,
        contact: Contact,
        timing: Timing,
    ) -> (Campaign, watch::Receiver<Leadership>) {
        let mut first = Leadership::new(holder.clone());
        first.lease = timing.lease;
        let (tx, rx) = watch::channel(first);
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(pg, holder, contact, timing, tx, stop.clone()));
        (Campaign { stop, task }, rx)
    }

    /// Stops campaigning: a leader releases the lease (another takes over at once).
    pub(crate) async fn stop(self) {
        self.stop.cancel();
        if let Err(e) = self.task.await {
            warn!("the election task ended badly: {e}");
        }
    }
}

async fn run(
    pg: Arc<PgStore>,
    holder: String,
    contact: Contact,
    timing: Timing,
    tx: watch::Sender<Leadership>,
    stop: CancellationToken,
) {
    let mut election = Election::new(timing, Instant::now());
    let mut last_read = None::<Instant>;
    loop {
        let now = Instant::now();
        if let Some(ask) = election.poll(now) {
            let answer = pg.lease(&holder, ask, timing.lease, &contact).await;
            election.answer(answer, Instant::now());
            if matches!(answer, Answer::Took { .. } | Answer::Renewed) {
                tx.send_modify(|l| l.renewed = Some(now));
            }
            if let Answer::Took { epoch } = answer {
                info!(epoch, holder = %holder, "took the lease: this dispatcher leads");
            }
            if answer == Answer::Lost {
                warn!(holder = %holder, "the lease was taken by another dispatcher: standing by");
            }
        }
        let now = Instant::now();
        let role = election.role(now);
        // A standby reads who leads (to name it, and to count failovers), once a poll.
        if role == Role::Standby && last_read.is_none_or(|t| now >= t + timing.poll) {
            last_read = Some(now);
            match pg.leader().await {
                Ok(row) => tx.send_modify(|l| {
                    let before = l.leader.as_ref().map(|r| (r.epoch, r.holder.clone()));
                    // A new epoch by someone else, after a holder that did not release the
                    // row (it was still named when last read): a failover.
                    if let Some((epoch, prev)) = before {
                        if row.epoch > epoch && !prev.is_empty() && row.holder != prev {
                            l.failovers += 1;
                        }
                    }
                    l.leader = Some(row);
                    l.leader_read = Some(now);
                }),
                Err(e) => warn!("cannot read who leads: {e}"),
            }
        }
        tx.send_if_modified(|l| {
            let changed = l.role != role || l.elections != election.elections;
            l.role = role;
            l.elections = election.elections;
            if let (Role::Leader { epoch }, true) = (role, changed) {
                l.leader = Some(LeaderRow {
                    holder: holder.clone(),
                    epoch,
                    url: contact.url.clone(),
                    jid: contact.jid.clone(),
                    expires_in_ms: timing.lease.as_secs_f64() * 1e3,
                });
            }
            changed
        });
        let wake = election
            .next_wake()
            .map(|t| t.saturating_duration_since(Instant::now()))
            .unwrap_or(timing.poll)
            .min(timing.poll);
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(wake) => {}
        }
    }
    if let Some(ask @ Ask::Release { epoch }) = election.step_down(Instant::now()) {
        let answer = pg.lease(&holder, ask, timing.lease, &contact).await;
        election.answer(answer, Instant::now());
        info!(
            epoch,
            ?answer,
            "released the lease: a standby takes over at once"
        );
    }
    tx.send_modify(|l| l.role = Role::Standby);
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_leader_is_lively_while_more_than_half_its_lease_is_left() {
        let t0 = Instant::now();
        let mut l = Leadership::new("me".into());
        l.lease = Duration::from_millis(1200);
        assert!(!l.leader_lively(t0), "no row read");
        l.leader = Some(LeaderRow {
            holder: "other".into(),
            epoch: 3,
            url: "http://127.0.0.1:8080".into(),
            jid: "dispatcher@localhost/d1".into(),
            expires_in_ms: 1000.0,
        });
        l.leader_read = Some(t0);
        assert!(l.leader_lively(t0));
        assert!(l.leader_lively(t0 + Duration::from_millis(350)));
        assert!(
            !l.leader_lively(t0 + Duration::from_millis(450)),
            "550 ms left: it has not renewed"
        );
        // This process itself, or a leader without a URL, is no one to pass requests to.
        l.leader.as_mut().unwrap().holder = "me".into();
        assert!(!l.leader_lively(t0));
        l.leader.as_mut().unwrap().holder = "other".into();
        l.leader.as_mut().unwrap().url.clear();
        assert!(!l.leader_lively(t0));
    }
}
