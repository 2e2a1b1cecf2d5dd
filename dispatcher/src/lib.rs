//! `spine-dispatcher`: the agent registry and scheduler and the job lifecycle (pure state
//! machines), the dispatcher's core that joins them (no I/O), the driver that performs the
//! core's effects, the durable job store, and the HTTP API.
//!
//! Data flow: stanzas, HTTP requests and timers reach the driver ([`driver`]), which feeds
//! each to the core with the time as a parameter; the core updates the
//! [`registry::Registry`] (agents' advertisements and load) and the [`jobs::JobTable`]
//! (accepted jobs, their queues and outcomes), asks the registry to `pick` an agent for each
//! queued job, and returns its effects in order — what to store, what to send, whom to
//! answer — which the driver performs: commit, then send, then answer. Nothing below the
//! driver does I/O or reads a clock, which is what makes the whole dispatcher testable with
//! plain `#[test]`s and simulable in virtual time. docs/dispatcher.md §10 follows one job
//! through the files.

#![forbid(unsafe_code)]

pub mod audit;
mod blob_gc;
pub mod blobs;
pub mod canaries;
mod clock;
pub mod config;
mod core;
mod deliver;
mod driver;
pub mod election;
pub mod error;
mod fastmap;
pub mod http;
pub mod jobs;
pub mod leadership;
pub mod policy;
pub mod registry;
pub mod schedules;
mod sent_ahead;
pub mod signing;
pub mod sim;
pub mod store;
pub mod subscriptions;
pub mod triggers;

pub use config::{DispatcherConfig, DEFAULT_CONFIG};
pub use driver::{run, Dispatcher};
pub use error::DispatcherError;
