//! `spine-dispatcher`: the agent registry and scheduler and the job lifecycle (pure state
//! machines), the durable job store, and the connection task serving the HTTP and XMPP APIs.
//!
//! Data flow: agents' advertisements and load reports arrive as presence; the connection task
//! feeds them to the [`registry::Registry`] as events, with the current time as a parameter;
//! for every job it asks the registry to `pick` an agent by the job's strategy and tells it
//! when the job was assigned and when it finished. The registry does no I/O and reads no
//! clock, which is what makes it testable with plain `#[test]`s and fast enough for 50,000
//! agents.

#![forbid(unsafe_code)]

pub mod audit;
mod clock;
pub mod config;
mod core;
mod deliver;
mod driver;
pub mod error;
pub mod http;
pub mod jobs;
pub mod policy;
pub mod registry;
pub mod sim;
pub mod store;

pub use config::{DispatcherConfig, DEFAULT_CONFIG};
pub use driver::{run, Dispatcher};
pub use error::DispatcherError;
