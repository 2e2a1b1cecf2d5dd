//! Logging to standard error for every long-running command: human text (coloured only on a
//! terminal, never with `NO_COLOR` set) or one JSON object per line for log shippers
//! (`--log-format json`).
//!
//! A stream error a server sends (`system-shutdown` when it stops) is logged by `spine_xmpp`
//! in Spine's words; tokio-xmpp's own stream, which logged it as "Received unsupported stream
//! element", is no longer used after the login.

use std::io::IsTerminal as _;
use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

static FORMAT: OnceLock<LogFormat> = OnceLock::new();

/// Sets the format for [`init`] (from the global `--log-format` flag).
pub fn set_format(f: LogFormat) {
    let _ = FORMAT.set(f);
}

/// Sets up logging to standard error with the given filter (RUST_LOG wins if set), and
/// routes the `log` records of dependencies (tokio-xmpp) into it.
pub fn init(filter: &str) {
    let env = std::env::var("RUST_LOG").unwrap_or_else(|_| filter.to_owned());
    let registry = tracing_subscriber::registry().with(EnvFilter::new(env));
    let installed = match FORMAT.get().copied().unwrap_or_default() {
        LogFormat::Json => tracing::subscriber::set_global_default(
            registry.with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            ),
        ),
        LogFormat::Text => tracing::subscriber::set_global_default(
            registry.with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(colour())
                    .with_writer(std::io::stderr),
            ),
        ),
    };
    if installed.is_ok() {
        // The `log` records of dependencies (tokio-xmpp's login among them) go to the same
        // subscriber, up to the level it lets through.
        let _ = tracing_log::LogTracer::builder()
            .with_max_level(tracing_log::AsLog::as_log(
                &tracing::level_filters::LevelFilter::current(),
            ))
            .init();
    }
}

/// Colour only for a terminal, and never with `NO_COLOR` set (no-color.org).
fn colour() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}
