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

    /// Stores a batch in one durable transaction, on a task of its own (redb: a blocking
    /// thread; PostgreSQL: an async task), while the caller goes on.
    pub fn commit(&self, b: OwnedBatch) -> JoinHandle<Result<(), StoreError>> {
        match self {
            // Fast commits on this thread (the join handle is then of a task that is done).
            JobStore::Redb(s) if s.commits_fast() => {
                let r = s.commit_owned(b);
                tokio::spawn(async move { r })
            }
            JobStore::Redb(s) => {
                let s = s.clone();
                tokio::task::spawn_blocking(move || s.commit_owned(b))
            }
            JobStore::Postgres(p) => {
                let p = p.clone();
                tokio::spawn(async move { p.commit(&b).await })
            }
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
