//! `spine-server`: the embedded XMPP server that lets Spine run on one machine with nothing
//! installed.
//!
//! Not implemented yet: this crate is an empty shell so the workspace has its final layout.
//! It is built in the "Embedded XMPP server" issue.
