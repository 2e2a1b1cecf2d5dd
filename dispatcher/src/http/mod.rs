//! The HTTP/JSON API (axum): what web apps use to submit jobs, follow them and choose agents.
//!
//! Handlers never touch the dispatcher's state: they send a [`Command`] with a `oneshot` reply
//! to the driver (the one task that owns the core, the connection and the store) through a cloneable
//! [`Handle`]. Progress and outcomes reach `GET /v1/jobs/{id}/events` (server-sent events)
//! through a broadcast channel.
//!
//! A request's way through the modules: [`serve`] (`serve.rs`) accepts the connection within
//! the connection limit and hands it to hyper; `admit` (`auth.rs`) authenticates the caller
//! from the headers alone, refuses a declared body over the route's limit, and bounds the
//! request's time; the route handler (`routes.rs`) reads the body, turns it into a
//! [`JobSpec`] (`request.rs`) or a query, sends a [`Command`] through the [`Handle`] and
//! answers with a JSON view of what comes back (`views.rs`); any refusal on the way is an
//! `ApiError` (`error.rs`). Authentication: bearer tokens from the configuration, each allowed
//! a set of capabilities. With no token configured the API serves loopback clients only.

mod auth;
mod console;
mod data;
mod drain;
mod error;
mod events;
pub(crate) mod forward;
pub mod openapi;
mod pass;
mod request;
mod routes;
mod serve;
mod views;
pub(crate) mod wait;

use std::sync::Arc;

use tokio::sync::{broadcast, mpsc};

use crate::config::DispatcherConfig;
use crate::policy::{Grant, HttpToken, Policy};

pub use request::SubmitRequest;
pub(crate) use routes::router;
pub(crate) use serve::Listener;
pub(crate) use serve::{ensure_open_files, serve};
pub use views::job_json;

use data::DataHandle;
use serve::{ConnCounts, Limits, Streams};

/// Largest HTTP request body for a dispatcher whose largest input is `max_input` bytes (its
/// `max_blob`): room for that input in base64 inside a JSON body (4/3 of it, and the rest of
/// the request). 96 MiB with the default `max_blob` of 64 MiB.
pub fn max_body(max_input: u64) -> usize {
    usize::try_from(max_input.saturating_add(max_input / 2)).unwrap_or(usize::MAX)
}

/// Largest body of any request but a submission, and of every request before it is
/// authenticated (the router's default, for any extractor that reads a body).
pub const SMALL_BODY: usize = 64 * 1024;

pub(crate) use crate::core::Command;
pub use crate::core::JobEvent;

/// Cloneable access to the core, for HTTP handlers: one reference count to bump per request
/// and per handler (axum clones the state for each), not one per field.
#[derive(Clone)]
pub(crate) struct Handle(Arc<HandleState>);

impl std::ops::Deref for Handle {
    type Target = HandleState;
    fn deref(&self) -> &HandleState {
        &self.0
    }
}

/// What a [`Handle`] holds: set while the dispatcher starts (the `with_*` builders), then
/// shared by every request.
#[derive(Clone)]
pub(crate) struct HandleState {
    pub(crate) tx: mpsc::Sender<Command>,
    pub(crate) events: broadcast::Sender<JobEvent>,
    /// The configured tokens with their grants (capability patterns parsed once, at start).
    pub(crate) tokens: Arc<Vec<(HttpToken, Grant)>>,
    pub(crate) max_attempts: u64,
    /// How far ahead `not_before` may be (`max_delay`).
    pub(crate) max_delay: std::time::Duration,
    pub(crate) max_input: u64,
    /// Largest input inline in a JSON body (base64, read whole): `max_blob`.
    pub(crate) max_json_input: u64,
    limits: Arc<Limits>,
    streams: Arc<Streams>,
    conns: Arc<ConnCounts>,
    /// The blob store's endpoints, when the data plane is on.
    pub(crate) data: Option<DataHandle>,
    /// Requests waiting for jobs to end (`?wait=`), told by the driver.
    pub(crate) waiters: Arc<wait::Waiters>,
    /// Served over HTTPS (the console's cookies are `Secure`).
    pub(crate) https: bool,
    /// Set while the job store cannot be reached ([`crate::store::JobStore::unreachable`]):
    /// changes are then refused at once (503) instead of waiting for it.
    store_down: Arc<std::sync::atomic::AtomicBool>,
    /// This dispatcher's part among several (PostgreSQL); None: it always leads.
    leadership: Option<tokio::sync::watch::Receiver<crate::leadership::Leadership>>,
    /// The store several dispatchers share (PostgreSQL): a standby reads jobs there.
    shared: Option<Arc<crate::store::postgres::PgStore>>,
    /// Ids of jobs the leader announced ended (a standby's event streams).
    pub(crate) ended: Option<broadcast::Sender<crate::store::postgres::Ended>>,
    /// The same, for a standby's callers waiting for their jobs' ends.
    pub(crate) announced: Option<Arc<wait::Announced>>,
    /// The leader's progress and partial events, relayed to a standby's event streams.
    pub(crate) relayed: Option<broadcast::Sender<crate::core::JobEvent>>,
    /// Webhook senders that sign their requests (`[[webhook]]`), by name.
    pub(crate) webhooks: Arc<std::collections::HashMap<String, crate::triggers::Webhook>>,
    /// Several dispatchers: how a standby passes requests on to the leader.
    pub(crate) forward: Option<Arc<forward::Forwarder>>,
}

impl Handle {
    /// The handle of a dispatcher configured by `cfg`, whose policy (built once, at start)
    /// is `policy`, sending to `tx` and `events`.
    pub(crate) fn new(
        cfg: &DispatcherConfig,
        policy: &Policy,
        tx: mpsc::Sender<Command>,
        events: broadcast::Sender<JobEvent>,
    ) -> Self {
        Handle(Arc::new(HandleState {
            tx,
            events,
            tokens: Arc::new(policy.http_tokens().to_vec()),
            max_attempts: cfg.max_attempts,
            max_delay: cfg.max_delay,
            max_input: cfg.max_input.as_u64(),
            max_json_input: cfg.max_blob.as_u64(),
            limits: Arc::new(Limits::from_config(cfg)),
            streams: Arc::default(),
            conns: Arc::default(),
            data: None,
            waiters: Arc::default(),
            https: cfg.http_tls_cert.is_some(),
            store_down: Arc::default(),
            leadership: None,
            shared: None,
            ended: None,
            announced: None,
            relayed: None,
            webhooks: Arc::default(),
            forward: None,
        }))
    }

    /// The state, to set while starting (cloned if a request holds it already: none does).
    fn state(&mut self) -> &mut HandleState {
        Arc::make_mut(&mut self.0)
    }

    /// Passing requests on to the leader while standing by ([`forward`]).
    pub(crate) fn with_forward(mut self, forward: Option<forward::Forwarder>) -> Self {
        self.state().forward = forward.map(Arc::new);
        self
    }

    /// With the webhooks (their secrets read at start).
    pub(crate) fn with_webhooks(
        mut self,
        webhooks: std::collections::HashMap<String, crate::triggers::Webhook>,
    ) -> Self {
        self.state().webhooks = Arc::new(webhooks);
        self
    }

    /// Follows this dispatcher's part in the election: a standby refuses what only the
    /// leader can do (503 `standby`, naming the leader).
    pub(crate) fn with_leadership(
        mut self,
        rx: Option<tokio::sync::watch::Receiver<crate::leadership::Leadership>>,
    ) -> Self {
        self.state().leadership = rx;
        self
    }

    /// With the store several dispatchers share: a standby then stores submissions for the
    /// leader and reads jobs there.
    pub(crate) fn with_shared(
        mut self,
        store: Option<Arc<crate::store::postgres::PgStore>>,
        ended: Option<broadcast::Sender<crate::store::postgres::Ended>>,
        relayed: Option<broadcast::Sender<crate::core::JobEvent>>,
    ) -> Self {
        self.state().shared = store;
        if let Some(tx) = &ended {
            let heard = Arc::new(wait::Announced::default());
            heard.clone().follow(tx.subscribe());
            self.state().announced = Some(heard);
        }
        self.state().ended = ended;
        self.state().relayed = relayed;
        self
    }

    /// The shared store, while this dispatcher stands by (None while it leads, or alone).
    pub(crate) fn standby_store(&self) -> Option<&Arc<crate::store::postgres::PgStore>> {
        self.standby().and(self.shared.as_ref())
    }

    /// This dispatcher's part, if it takes part in an election.
    pub(crate) fn leadership(&self) -> Option<crate::leadership::Leadership> {
        self.leadership.as_ref().map(|rx| rx.borrow().clone())
    }

    /// The refusal of a standby, naming the leader; None when this dispatcher leads.
    pub(crate) fn standby(&self) -> Option<error::ApiError> {
        let l = self.leadership.as_ref()?.borrow();
        match l.role {
            crate::election::Role::Leader { .. } => None,
            crate::election::Role::Standby => Some(error::ApiError::standby(l.leader_url())),
        }
    }

    /// Refuses changes while this flag says the job store cannot be reached.
    pub(crate) fn with_store_health(mut self, down: Arc<std::sync::atomic::AtomicBool>) -> Self {
        self.state().store_down = down;
        self
    }

    /// Whether the job store cannot be reached now.
    pub(crate) fn store_down(&self) -> bool {
        self.store_down.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// With the blob store's endpoints (the data plane, docs/dispatcher.md §4).
    pub(crate) fn with_data(
        mut self,
        blobs: crate::blobs::BlobStore,
        key: Arc<crate::signing::UrlKey>,
    ) -> Self {
        self.state().data = Some(DataHandle {
            blobs,
            key,
            counters: Arc::default(),
        });
        self
    }
}
