//! The access log: one JSON object per connection, on one line, written when the
//! connection closes. Lines go to the agent's stdout (logs go to stderr), so a collector
//! or a test can take every stdout line starting with `{"kind":"access"` as a record.
//! docs/telemetry.md shows the fields.

use std::{io::Write, net::SocketAddr};

use serde::Serialize;

use super::line_writer::LineWriter;

/// One connection, as its access-log line shows it. Field names are ztunnel's where it
/// has one (`src.addr`, `dst.identity`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AccessRecord {
    /// Always `access`: tells these lines from log lines in a merged stream.
    pub kind: &'static str,
    /// RFC 3339, UTC, milliseconds.
    pub start_time: String,
    pub duration_ms: u64,
    /// `outbound`, `inbound` (plaintext) or `hbone`.
    pub direction: &'static str,
    /// `source` or `destination` (Istio's reporter).
    pub reporter: &'static str,
    /// The pod whose proxy reports (`namespace/name`).
    pub pod: String,
    /// The proxy's connection id (as in `/debug/connections`).
    pub id: u64,
    #[serde(rename = "src.addr")]
    pub src_addr: SocketAddr,
    #[serde(rename = "src.identity")]
    pub src_identity: Option<String>,
    #[serde(rename = "src.workload")]
    pub src_workload: Option<String>,
    #[serde(rename = "src.namespace")]
    pub src_namespace: Option<String>,
    #[serde(rename = "dst.addr")]
    pub dst_addr: SocketAddr,
    #[serde(rename = "dst.identity")]
    pub dst_identity: Option<String>,
    #[serde(rename = "dst.workload")]
    pub dst_workload: Option<String>,
    #[serde(rename = "dst.namespace")]
    pub dst_namespace: Option<String>,
    /// `namespace/name` of the service the destination belongs to.
    #[serde(rename = "dst.service")]
    pub dst_service: Option<String>,
    /// The address the proxy connected to (a service VIP resolved to an endpoint).
    pub upstream: Option<SocketAddr>,
    /// Bytes the client sent (source → destination).
    pub bytes_sent: u64,
    /// Bytes the client received (destination → source).
    pub bytes_received: u64,
    /// `mutual_tls` or `none`.
    pub connection_security_policy: &'static str,
    /// `allow`, `deny`, or null when this proxy evaluated no policy (the source side).
    pub policy: Option<&'static str>,
    /// `namespace/name` of the DENY policy that matched.
    #[serde(rename = "policy.name")]
    pub policy_name: Option<String>,
    /// Why the connection was denied (`denied_by_policy`, `not_allowed`, …).
    #[serde(rename = "policy.reason")]
    pub policy_reason: Option<&'static str>,
    /// `-` or an Envoy-style code (docs/telemetry.md).
    pub response_flags: &'static str,
    /// The stable error reason, null when the connection ended cleanly.
    pub error: Option<&'static str>,
    /// The error's message, for people.
    pub error_detail: Option<String>,
}

/// Where access-log lines go: a `LineWriter`, so a connection only queues its line and a
/// blocked stdout costs counted lines, never a stalled connection. Cloning shares the
/// destination.
#[derive(Clone)]
pub struct AccessLog {
    lines: LineWriter,
}

impl AccessLog {
    /// The process's stdout.
    pub fn stdout() -> Self {
        Self {
            lines: LineWriter::stdout(),
        }
    }

    pub fn to_writer(writer: impl Write + Send + 'static) -> Self {
        Self {
            lines: LineWriter::new("access log", writer),
        }
    }

    /// Queues one line.
    pub fn write(&self, record: &AccessRecord) {
        self.write_json(record);
    }

    /// Queues any record as one line (the waypoint's per-request records use this); it
    /// should serialize `kind` first, like `AccessRecord`.
    pub fn write_json<T: Serialize>(&self, record: &T) {
        let Ok(mut line) = serde_json::to_vec(record) else {
            return;
        };
        line.push(b'\n');
        self.lines.write_line(&line);
    }
}

impl Default for AccessLog {
    fn default() -> Self {
        Self::stdout()
    }
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog").finish_non_exhaustive()
    }
}

/// The prefix every access-log line starts with.
pub const LINE_PREFIX: &str = "{\"kind\":\"access\"";

/// An in-memory sink, for tests: the lines written so far.
#[cfg(test)]
#[derive(Clone)]
pub struct Captured {
    bytes: std::sync::Arc<crate::sync::Mutex<Vec<u8>>>,
    lines: LineWriter,
}

#[cfg(test)]
impl AccessLog {
    /// A log whose lines the returned `Captured` reads.
    pub fn captured() -> (Self, Captured) {
        let bytes = std::sync::Arc::default();
        let log = Self::to_writer(CapturedWriter(std::sync::Arc::clone(&bytes)));
        let lines = log.lines.clone();
        (log, Captured { bytes, lines })
    }
}

#[cfg(test)]
impl Captured {
    /// Every line queued so far, once written.
    pub fn lines(&self) -> Vec<String> {
        assert!(
            self.lines.flush(std::time::Duration::from_secs(10)),
            "the access-log writer is stuck"
        );
        let bytes = self.bytes.lock().clone();
        String::from_utf8(bytes)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

#[cfg(test)]
struct CapturedWriter(std::sync::Arc<crate::sync::Mutex<Vec<u8>>>);

#[cfg(test)]
impl Write for CapturedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
