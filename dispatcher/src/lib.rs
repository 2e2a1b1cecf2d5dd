//! `spine-dispatcher`: registry, least-loaded scheduling, durable job lifecycle and the HTTP
//! and XMPP APIs.
//!
//! Not implemented yet: this crate is an empty shell so the workspace has its final layout.
//! It is built in the "Dispatcher" issue.
