//! What the agent tells operators: logs, the access log and metrics.
//!
//! - Logging set-up (here): tracing to stderr, as text for people or JSON for collectors,
//!   filtered by `WEFT_LOG` (EnvFilter syntax, default `info`).
//! - `access_log`: one JSON line per connection on stdout, written by `proxy::Connections`
//!   at close; switchable per namespace (`mesh.accessLog`).
//! - `metrics`: the registry served on the metrics port, Istio-compatible TCP metrics and
//!   the agent's health, with a configurable name prefix (`agent.metricsPrefix`).
//! - `line_writer`: stdout and stderr written by a thread each, so that a log pipe nobody
//!   drains costs counted lines, never a blocked proxy thread.
//! - `log_limit`: per-call-site rate limits for warnings a peer can cause at will
//!   (`warn_limited!`).
//! - `trace`: trace context (W3C and B3) of the waypoint's L7 requests and their spans.
//! - `otlp`: exports those spans to an OpenTelemetry collector (OTLP/HTTP, JSON).

pub mod access_log;
pub mod line_writer;
pub mod log_limit;
pub mod metrics;
pub mod otlp;
pub mod trace;

use std::io::IsTerminal;

use serde::Serialize;
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

pub use access_log::{AccessLog, AccessRecord};
use line_writer::LineWriter;
pub use metrics::{Prefix, Registry, TcpMetrics};

/// Telemetry settings fixed at start-up.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Config {
    /// First word of every metric name (`weft`, or `istio` for Istio's dashboards).
    pub metrics_prefix: Prefix,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "invalid metric prefix {0:?}: lowercase letters, digits and '_', not starting with a digit"
    )]
    InvalidPrefix(String),
}

/// Output format of the logs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Installs the global subscriber. Call once, first thing.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_env(LOG_ENV).unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        // Colour only for a person at a terminal; a log file or collector gets plain text.
        LogFormat::Text => registry
            .with(
                fmt::layer()
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_writer(LineWriter::stderr()),
            )
            .init(),
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_writer(LineWriter::stderr()),
            )
            .init(),
    }
}

const LOG_ENV: &str = "WEFT_LOG";

/// Exposes the lines the process's stdout (the access log) and stderr (the logs) lost
/// while they were not keeping up.
pub fn register_output_metrics(registry: &mut Registry) {
    let registry = registry.prometheus_mut();
    registry.register(
        "access_log_lines_dropped",
        "Access-log lines lost because stdout was not keeping up or the write failed",
        LineWriter::stdout().dropped_lines(),
    );
    registry.register(
        "log_lines_dropped",
        "Log lines lost because stderr was not keeping up or the write failed",
        LineWriter::stderr().dropped_lines(),
    );
}
