//! Logging to standard error for every long-running command: human text (coloured only on a
//! terminal, never with `NO_COLOR` set) or one JSON object per line for log shippers
//! (`--log-format json`).
//!
//! One rewrite of a dependency's log: tokio-xmpp logs every stream error a server sends
//! (`<stream:error/>`, e.g. `system-shutdown` when the server stops) as a `WARN` "Received
//! unsupported stream element: StreamError(ReceivedStreamError(StreamError { condition:
//! SystemShutdown, … }))".
//! That record is dropped and replaced by one in Spine's words: `INFO` for a server shutting
//! down, `WARN` otherwise, with the condition in XMPP's spelling.

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
    if installed.is_ok() && log::set_boxed_logger(Box::new(FromLog)).is_ok() {
        log::set_max_level(tracing_log::AsLog::as_log(
            &tracing::level_filters::LevelFilter::current(),
        ));
    }
}

/// Colour only for a terminal, and never with `NO_COLOR` set (no-color.org).
fn colour() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

const RECEIVED: &str = "Received unsupported stream element: StreamError(";

/// `SystemShutdown` → `system-shutdown`.
fn kebab(camel: &str) -> String {
    let mut out = String::new();
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('-');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// The stream error condition in a tokio-xmpp "unsupported stream element" message.
fn stream_error_condition(message: &str) -> Option<String> {
    let rest = message.strip_prefix(RECEIVED)?;
    let rest = &rest[rest.find("condition: ")? + "condition: ".len()..];
    let name: String = rest
        .chars()
        .take_while(char::is_ascii_alphanumeric)
        .collect();
    (!name.is_empty()).then(|| kebab(&name))
}

/// Forwards `log` records to tracing (as tracing-log's `LogTracer` does), except tokio-xmpp's
/// line about a received stream error, which it replaces with Spine's.
struct FromLog;

impl log::Log for FromLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        // The subscriber decides, in `format_trace`.
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        if record.target().starts_with("tokio_xmpp") {
            if let Some(condition) = stream_error_condition(&record.args().to_string()) {
                if condition == "system-shutdown" {
                    tracing::info!(
                        "the XMPP server closed the stream: it is shutting down (system-shutdown)"
                    );
                } else {
                    tracing::warn!(
                        "the XMPP server closed the stream with the error '{condition}'"
                    );
                }
                return;
            }
        }
        let _ = tracing_log::format_trace(record);
    }

    fn flush(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_condition_of_a_received_stream_error() {
        let m = "Received unsupported stream element: StreamError(ReceivedStreamError(StreamError { condition: SystemShutdown, texts: {Lang(\"\"): \"server shutting down\"}, application_specific: [] })). Emitting stream error.";
        assert_eq!(
            stream_error_condition(m).as_deref(),
            Some("system-shutdown")
        );
        let m = "Received unsupported stream element: StreamError(StreamError { condition: Conflict, texts: {\"\": \"replaced\"} })";
        assert_eq!(stream_error_condition(m).as_deref(), Some("conflict"));
        assert_eq!(stream_error_condition("Received invalid stanza: x"), None);
        assert_eq!(kebab("PolicyViolation"), "policy-violation");
    }
}
