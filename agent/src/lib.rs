//! `spine-agent`: the library for writing Spine agents in Rust and the wrappers that put
//! legacy services on the bus.
//!
//! Not implemented yet: this crate is an empty shell so the workspace has its final layout.
//! It is built in the "Agent" issue.
