//! `spine-server`: a small, standards-conformant XMPP server (RFC 6120 c2s, the RFC 6121
//! routing and presence rules an agent bus needs) so that Spine runs on one machine with
//! nothing installed: `spine up`, `spine server`, and the test suite use it.
//!
//! It is a real server that any XMPP client can use: STARTTLS (rustls), SASL SCRAM-SHA-1/256
//! (with -PLUS over TLS 1.3) and PLAIN, resource binding with conflict handling, routing to
//! full and bare JIDs, directed presence with `unavailable` sent to every recipient when a
//! session ends, `service-unavailable` for IQs to offline entities, `from` stamping, XEP-0030
//! and XEP-0199 for the server entity, and limits (stanza size, rate, connections, login and
//! idle timeouts). It does not federate (no s2s), keep rosters, store offline messages or
//! implement XEP-0198 stream management.
//!
//! Data flow: [`Server::bind`] opens the listener; [`Server::run`] accepts connections, each
//! of which becomes one task (`session`) that negotiates the stream and then routes stanzas
//! through the shared `router`.

#![forbid(unsafe_code)]

pub mod accounts;
mod admission;
pub mod config;
pub mod error;
mod io;
mod router;
pub mod scram;
mod session;
pub mod tls;
mod wire;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use jid::BareJid;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

pub use accounts::account_block;
pub use admission::AdmissionStats;
pub use bytesize::ByteSize;
pub use config::{ServerConfig, DEFAULT_CONFIG};
pub use error::ServerError;

/// State shared by every session.
pub(crate) struct Shared {
    pub(crate) cfg: ServerConfig,
    pub(crate) domain_jid: BareJid,
    /// Swapped whole by a reload (SIGHUP); sessions take a reference per login.
    accounts: std::sync::RwLock<Arc<accounts::Accounts>>,
    tls: std::sync::RwLock<TlsAcceptor>,
    pub(crate) router: router::Router,
    pub(crate) shutdown: watch::Receiver<bool>,
    pub(crate) admission: Arc<admission::Admission>,
}

impl Shared {
    /// The accounts in force now.
    pub(crate) fn accounts(&self) -> Arc<accounts::Accounts> {
        self.accounts
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The TLS acceptor in force now.
    pub(crate) fn tls(&self) -> TlsAcceptor {
        self.tls.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Reloads a running server's accounts and TLS certificate (what `spine server` does on
/// SIGHUP). Cheap to clone.
#[derive(Clone)]
pub struct Reloader {
    shared: Arc<Shared>,
}

impl Reloader {
    /// Validates `cfg` and puts its accounts and TLS certificate in force for every login
    /// from now on (sessions already bound stay). Returns the keys that differ from the
    /// running configuration but take effect only after a restart. On an error nothing
    /// changes.
    pub fn reload(&self, cfg: &ServerConfig) -> Result<Vec<&'static str>, ServerError> {
        cfg.validate()?;
        let running = &self.shared.cfg;
        if cfg.domain != running.domain {
            return Err(ServerError::Config(format!(
                "domain: '{}' differs from the running '{}'; changing it needs a restart",
                cfg.domain, running.domain
            )));
        }
        let tls = tls::setup(&cfg.tls, &cfg.domain)?;
        let accounts = accounts::Accounts::from_config(cfg);
        if accounts.is_empty() {
            warn!("no accounts and no dev_secret configured: nobody can log in");
        }
        *self
            .shared
            .accounts
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Arc::new(accounts);
        *self.shared.tls.write().unwrap_or_else(|p| p.into_inner()) = TlsAcceptor::from(tls.config);
        let changed = [
            ("listen", cfg.listen != running.listen),
            (
                "max_stanza_size",
                cfg.max_stanza_size != running.max_stanza_size,
            ),
            (
                "max_connections",
                cfg.max_connections != running.max_connections,
            ),
            ("rate_limit", cfg.rate_limit != running.rate_limit),
            ("idle_timeout", cfg.idle_timeout != running.idle_timeout),
            ("ping_timeout", cfg.ping_timeout != running.ping_timeout),
            ("login_timeout", cfg.login_timeout != running.login_timeout),
            ("auth_timeout", cfg.auth_timeout != running.auth_timeout),
            (
                "max_unauthenticated_per_address",
                cfg.max_unauthenticated_per_address != running.max_unauthenticated_per_address,
            ),
            (
                "max_unauthenticated",
                cfg.max_unauthenticated != running.max_unauthenticated,
            ),
            (
                "auth_failures_before_backoff",
                cfg.auth_failures_before_backoff != running.auth_failures_before_backoff,
            ),
            (
                "outbound_queue",
                cfg.outbound_queue != running.outbound_queue,
            ),
        ];
        let restart = changed
            .into_iter()
            .filter_map(|(key, differs)| differs.then_some(key))
            .collect();
        Ok(restart)
    }
}

/// A server with its listening socket open.
pub struct Server {
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown_tx: watch::Sender<bool>,
    cert_pem: String,
    local_addr: SocketAddr,
}

/// How long sessions get to close their streams after shutdown starts.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

impl Server {
    /// Validates the configuration, prepares TLS and accounts, and opens the listener
    /// (`listen` may use port 0; [`Server::local_addr`] tells the port chosen).
    pub async fn bind(cfg: ServerConfig) -> Result<Server, ServerError> {
        cfg.validate()?;
        let tls = tls::setup(&cfg.tls, &cfg.domain)?;
        let accounts = accounts::Accounts::from_config(&cfg);
        if accounts.is_empty() {
            warn!("no accounts and no dev_secret configured: nobody can log in");
        }
        let listener = TcpListener::bind(cfg.listen)
            .await
            .map_err(|error| ServerError::Bind {
                addr: cfg.listen,
                error,
            })?;
        let local_addr = listener.local_addr().map_err(ServerError::Accept)?;
        let domain_jid =
            BareJid::new(&cfg.domain).map_err(|e| ServerError::Config(format!("domain: {e}")))?;
        let (shutdown_tx, shutdown) = watch::channel(false);
        let admission = Arc::new(admission::Admission::new(
            cfg.max_unauthenticated_per_address,
            cfg.unauthenticated_limit(),
            cfg.auth_failures_before_backoff,
        ));
        let shared = Arc::new(Shared {
            admission,
            cfg,
            domain_jid,
            accounts: std::sync::RwLock::new(Arc::new(accounts)),
            tls: std::sync::RwLock::new(TlsAcceptor::from(tls.config)),
            router: router::Router::default(),
            shutdown,
        });
        Ok(Server {
            listener,
            shared,
            shutdown_tx,
            cert_pem: tls.cert_pem,
            local_addr,
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The server's certificate (PEM); a client trusts it as its CA for a self-signed setup.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A handle that reloads accounts and the TLS certificate while the server runs.
    pub fn reloader(&self) -> Reloader {
        Reloader {
            shared: self.shared.clone(),
        }
    }

    /// Counters of refused connections and logins (connection floods, password guessing).
    pub fn admission_stats(&self) -> Arc<AdmissionStats> {
        self.shared.admission.stats.clone()
    }

    /// The XMPP domain served.
    pub fn domain(&self) -> &str {
        &self.shared.cfg.domain
    }

    /// Accepts connections until `shutdown` completes, then closes every stream with a
    /// `system-shutdown` stream error and waits (up to a few seconds) for sessions to end.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
        let Server {
            listener,
            shared,
            shutdown_tx,
            local_addr,
            ..
        } = self;
        info!(addr = %local_addr, domain = %shared.cfg.domain, "XMPP server listening");
        let slots = Arc::new(Semaphore::new(shared.cfg.max_connections));
        // A flood of refused connections logs one line a second, with the count in between.
        let refusals = admission::LogGate::new(Duration::from_secs(1));
        let mut tasks = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                accepted = listener.accept() => {
                    let (tcp, peer) = match accepted {
                        Ok(v) => v,
                        Err(e) => {
                            // Out of file descriptors and the like: wait, do not spin.
                            warn!("accept failed: {e}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let Ok(permit) = slots.clone().try_acquire_owned() else {
                        if let Some(more) = refusals.allow() {
                            warn!(%peer, "connection limit ({}) reached: refusing{}", shared.cfg.max_connections, admission::LogGate::and_more(more));
                        }
                        drop(tcp);
                        continue;
                    };
                    let pending = match shared.admission.admit(peer.ip()) {
                        Ok(p) => p,
                        Err(why) => {
                            if let Some(more) = refusals.allow() {
                                warn!(%peer, "refusing connection: {why}{}", admission::LogGate::and_more(more));
                            }
                            drop(tcp);
                            continue;
                        }
                    };
                    let shared = shared.clone();
                    tasks.spawn(async move {
                        session::run(shared, tcp, peer, pending).await;
                        drop(permit);
                    });
                }
                // Reap finished sessions so the set does not grow without bound.
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
        info!(
            sessions = shared.router.sessions(),
            "shutting down: closing client streams"
        );
        let _ = shutdown_tx.send(true);
        let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            warn!(
                "{} sessions did not close in {SHUTDOWN_GRACE:?}; aborting them",
                tasks.len()
            );
            tasks.abort_all();
        }
        Ok(())
    }
}

/// Binds and runs a server until `shutdown` completes.
pub async fn run(cfg: ServerConfig, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
    Server::bind(cfg).await?.run(shutdown).await
}
