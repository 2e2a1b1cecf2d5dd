//! The agent crate's error type.

/// Why an agent could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The configuration is invalid; the message names the key.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The first connection failed (wrong password, unreachable server, TLS).
    #[error(transparent)]
    Connect(#[from] spine_xmpp::ConnectError),
    /// The connection was lost and the server then refused the credentials.
    #[error("reconnecting failed: {0}")]
    Reconnect(String),
}
