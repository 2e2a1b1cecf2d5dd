//! End-to-end tests of Spine against real XMPP servers (embedded, Prosody, ejabberd).
//!
//! Empty until the server, agent and dispatcher exist; the test harness lands with them.
