//! Which store a dispatcher keeps its jobs in: the embedded redb file (`data_dir/jobs.redb`,
//! the default: nothing to install) or PostgreSQL (`store = "postgres://…"`). Both keep the
//! same promises (docs/dispatcher.md §5); the driver sees only this.

use std::sync::Arc;

use spine_protocol::CapabilityName;
use tokio::task::JoinHandle;

use super::postgres::{PgStore, PgTarget};
use super::{OwnedBatch, Store, StoreError};
use crate::config::DispatcherConfig;
use crate::jobs::JobRecord;

/// The job store of a running dispatcher.
#[derive(Clone)]
pub enum JobStore {
    /// The embedded store.
    Redb(Arc<Store>),
    /// PostgreSQL.
    Postgres(Arc<PgStore>),
}

/// What a store held at start.
pub struct Held {
    /// Every job.
    pub jobs: Vec<JobRecord>,
    /// Every capability an agent has offered.
    pub capabilities: Vec<CapabilityName>,
    /// Agents (bare JIDs) with when they were last seen (ms).
    pub agents: Vec<(String, u64)>,
    /// Event rules made over the HTTP API.
    pub rules: Vec<crate::triggers::RuleConfig>,
}

impl JobStore {
    /// Opens the store the configuration names.
    pub async fn open(cfg: &DispatcherConfig) -> Result<JobStore, StoreError> {
        match cfg.store_target().map_err(StoreError)? {
            None => {
                let s = Store::open_with_cache(
                    &cfg.data_dir.join("jobs.redb"),
                    cfg.store_cache.as_u64(),
                )?;
                if s.replayed() > 0 {
                    tracing::info!(
                        batches = s.replayed(),
                        "job store: the last stop was not clean; applied again the {} batches the journal held since the last checkpoint",
                        s.replayed()
                    );
                }
                Ok(JobStore::Redb(Arc::new(s)))
            }
            Some(target) => {
                let tls = spine_tls::client_config_for_ca_file(cfg.store_ca.as_deref())
                    .map_err(|x| StoreError(format!("store_ca: {x}")))?;
                let pg = Arc::new(PgStore::open(target, tls, cfg.store_timeout, cfg.lease).await?);
                pg.watch();
                Ok(JobStore::Postgres(pg))
            }
        }
    }

    /// Where it is, for logs (never a password).
    pub fn describe(&self) -> String {
        match self {
            JobStore::Redb(_) => "redb".into(),
            JobStore::Postgres(p) => format!("postgres {}", p.name()),
        }
    }

    /// Set while the store cannot be reached (never for the embedded store, whose failures
    /// stop the dispatcher).
    pub fn unreachable(&self) -> Arc<std::sync::atomic::AtomicBool> {
        match self {
            JobStore::Redb(_) => Arc::default(),
            JobStore::Postgres(p) => p.health(),
        }
    }

    /// Everything held.
    pub async fn held(&self) -> Result<Held, StoreError> {
        match self {
            JobStore::Redb(s) => Ok(Held {
                jobs: s.load()?,
                capabilities: s.known_capabilities()?,
                agents: s.agents()?,
                rules: s.rules()?,
            }),
            JobStore::Postgres(p) => Ok(Held {
                jobs: p.load().await?,
                capabilities: p.known_capabilities().await?,
                agents: p.agents().await?,
                rules: p.rules().await?,
            }),
        }
    }

    /// The fleet it remembers, without the jobs (what a standby starts from).
    pub async fn fleet(&self) -> Result<Held, StoreError> {
        match self {
            JobStore::Redb(s) => Ok(Held {
                jobs: Vec::new(),
                capabilities: s.known_capabilities()?,
                agents: s.agents()?,
                rules: s.rules()?,
            }),
            JobStore::Postgres(p) => Ok(Held {
                jobs: Vec::new(),
                capabilities: p.known_capabilities().await?,
                agents: p.agents().await?,
                rules: p.rules().await?,
            }),
        }
    }

    /// The audit lines stored but perhaps not yet in the audit file.
    pub async fn audit_outbox(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        match self {
            JobStore::Redb(s) => s.audit_outbox(),
            JobStore::Postgres(p) => p.audit_outbox().await,
        }
    }

    /// Stores a batch in one durable transaction while the caller goes on: redb on a blocking
    /// thread, PostgreSQL on an async task. A fast redb commit ([`Store::commits_fast`]) is
    /// made here, on the caller's thread, and the [`Committing`] it returns is already done.
    pub fn commit(&self, b: OwnedBatch) -> Committing {
        match self {
            JobStore::Redb(s) if s.commits_fast() => {
                Committing::Done(std::future::ready(s.commit_owned(b)))
            }
            JobStore::Redb(s) => {
                let s = s.clone();
                Committing::Running(tokio::task::spawn_blocking(move || s.commit_owned(b)))
            }
            JobStore::Postgres(p) => {
                let p = p.clone();
                Committing::Running(tokio::spawn(async move { p.commit(&b).await }))
            }
        }
    }
}

/// A commit started by [`JobStore::commit`]: it resolves when the batch is stored (or could
/// not be), like the join handle of the task that stores it.
///
/// A commit made on the caller's thread is [`Committing::Done`] at once. It was a task spawned
/// only to hold its result until then: the task's completion woke the dispatcher's, often
/// through a parked runtime worker (a futex wake, 10–17 µs on this machine's 2 vCPUs), on
/// the critical path of every sequential job (BENCHMARKS.md).
pub enum Committing {
    /// Made already, on the caller's thread.
    Done(std::future::Ready<Result<(), StoreError>>),
    /// Being made on a task of its own.
    Running(JoinHandle<Result<(), StoreError>>),
}

impl Committing {
    /// Whether the commit has ended (made, or failed).
    pub fn is_finished(&self) -> bool {
        match self {
            Committing::Done(_) => true,
            Committing::Running(h) => h.is_finished(),
        }
    }
}

impl std::future::Future for Committing {
    type Output = Result<Result<(), StoreError>, tokio::task::JoinError>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        // Both are Unpin.
        match self.get_mut() {
            Committing::Done(r) => std::pin::Pin::new(r).poll(cx).map(Ok),
            Committing::Running(h) => std::pin::Pin::new(h).poll(cx),
        }
    }
}

/// Whether the configuration's `store` names PostgreSQL (a URL; the rest of it checked by
/// [`target`]).
pub(crate) fn is_postgres(url: &str) -> bool {
    let u = url.trim();
    u.starts_with("postgres://") || u.starts_with("postgresql://")
}

/// Parses the configuration's `store` (none: the embedded store).
pub(crate) fn target(
    url: Option<&str>,
    password: Option<&str>,
) -> Result<Option<PgTarget>, String> {
    match url.map(str::trim) {
        None | Some("") | Some("redb") => Ok(None),
        Some(u) if is_postgres(u) => PgTarget::parse(u, password).map(Some),
        Some(other) => Err(format!(
            "'{}' is not a store: \"redb\" (the default, data_dir/jobs.redb) or a PostgreSQL URL \"postgres://user@host:5432/db\"",
            other.chars().take(40).collect::<String>()
        )),
    }
}

#[cfg(test)]
mod tests {
    use futures::FutureExt as _;

    use super::*;

    #[tokio::test]
    async fn a_commit_made_here_is_done_at_once_and_one_on_a_task_when_the_task_ends() {
        let dir = tempfile::tempdir().unwrap();
        let store = JobStore::Redb(Arc::new(
            Store::open(&dir.path().join("jobs.redb")).unwrap(),
        ));
        // A new store has made no slow commit: the next is made here, done before any poll
        // of the runtime.
        let c = store.commit(OwnedBatch::default());
        assert!(matches!(c, Committing::Done(_)) && c.is_finished());
        assert!(matches!(c.now_or_never(), Some(Ok(Ok(())))));

        // A failed commit is reported the same way either side.
        let failed = Committing::Done(std::future::ready(Err(StoreError("disk full".into()))));
        match failed.await {
            Ok(Err(StoreError(m))) => assert_eq!(m, "disk full"),
            other => panic!("expected the store's error, got {other:?}"),
        }
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let mut running = Committing::Running(tokio::spawn(async move {
            rx.await.map_err(|_| StoreError("dropped".into()))
        }));
        assert!(
            (&mut running).now_or_never().is_none(),
            "the task has not ended"
        );
        tx.send(()).unwrap();
        assert!(matches!(running.await, Ok(Ok(()))));
    }
}
