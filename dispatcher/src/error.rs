//! The dispatcher crate's error type.

/// Why a dispatcher could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum DispatcherError {
    /// The configuration is invalid; the message names the key.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The first connection failed.
    #[error(transparent)]
    Connect(#[from] spine_xmpp::ConnectError),
    /// The job store failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The blob store (large payloads) could not be opened.
    #[error("blob store {path}: {why}")]
    Blobs {
        /// Its directory.
        path: std::path::PathBuf,
        /// What failed.
        why: String,
    },
    /// The connection ended for good.
    #[error("connection lost: {0}")]
    Connection(String),
}
