//! The server crate's error type.

/// Why the server could not start or keep running.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The configuration is invalid; the message names the key.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// TLS material could not be loaded or generated.
    #[error("TLS setup failed: {0}")]
    Tls(String),
    /// The listening socket could not be opened. (The OS error is part of the message and not
    /// a `source`, so that an error chain prints it once.)
    #[error("cannot listen on {addr}: {error}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// The OS error.
        error: std::io::Error,
    },
    /// Accepting connections failed.
    #[error("accept failed: {0}")]
    Accept(std::io::Error),
}
