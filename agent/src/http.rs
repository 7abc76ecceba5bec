//! The one small HTTP/1.1 server the agent's admin, readiness and metrics ports, the
//! waypoint's and the CA's metrics port share: accept on a bound listener, answer each
//! request with a synchronous handler, log what goes wrong under the caller's component
//! name; and the responses those handlers build.
//!
//! Every server here holds the same limits ([`Limits`], `agent.http` in docs/config.md), so
//! that nobody who can reach a port (a pod reaching the node's 15020, say) can hold it:
//! - a connection must send a request's headers within `headerTimeout` (also while idle
//!   between keep-alive requests), and its body within `bodyTimeout`;
//! - a body longer than `maxBodyBytes` is refused with 413 before it is read whole;
//! - at most `maxConnections` connections are served at once, and at most
//!   `maxConnectionsPerIp` from one client address, so a flood from one address leaves room
//!   for the others (the kubelet's probes, Prometheus). A connection over a cap is closed
//!   at once.
//!
//! Each refusal is counted in `Metrics` (`<prefix>_http_connections_refused_total{server,
//! reason}`). The CA's TLS API applies the same limits through [`Gate`], [`builder`] and
//! [`read_body`].

use std::{
    collections::HashMap,
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{
    Request, Response, StatusCode,
    body::Incoming,
    header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderValue},
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
};
use serde::Serialize;
use tokio::net::TcpListener;
use tracing::debug;

use crate::sync::Mutex;

/// The limits every HTTP server applies (`agent.http`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Limits {
    /// A request's headers must arrive within this, counted from when the server starts
    /// waiting for them (so an idle keep-alive connection is closed after it too).
    #[serde(with = "crate::settings::humantime_ms")]
    pub header_timeout: Duration,
    /// A request's body must arrive within this, counted from the end of its headers.
    #[serde(with = "crate::settings::humantime_ms")]
    pub body_timeout: Duration,
    /// Longest request body accepted (413 above it).
    pub max_body_bytes: usize,
    /// Connections served at once, per server.
    pub max_connections: usize,
    /// Connections served at once from one client address, per server.
    pub max_connections_per_ip: usize,
}

/// The servers' refusal counters, one family shared by every server of a process.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    refused: Family<RefusedLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    server: &'static str,
    reason: &'static str,
}

/// One server's connection caps: admits a connection while both caps have room and keeps
/// its place until the returned [`Admitted`] drops.
#[derive(Debug)]
pub struct Gate {
    server: &'static str,
    limits: Limits,
    metrics: Metrics,
    open: Mutex<Open>,
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    by_ip: HashMap<IpAddr, usize>,
}

/// A connection's place under its server's caps.
#[derive(Debug)]
pub struct Admitted {
    gate: Arc<Gate>,
    ip: IpAddr,
}

/// Why a request body was refused.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the body is longer than {0} bytes")]
    TooLarge(usize),
    #[error("the body did not arrive within {0:?}")]
    Timeout(Duration),
    #[error("cannot read the body: {0}")]
    Read(String),
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            max_body_bytes: 64 * 1024,
            max_connections: 256,
            max_connections_per_ip: 32,
        }
    }
}

impl Metrics {
    /// Counters registered in `registry` (`http_connections_refused`).
    pub fn new(registry: &mut prometheus_client::registry::Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "http_connections_refused",
            "Connections and requests the HTTP servers (admin, metrics, readiness, CA) refused \
             or closed, by server and reason",
            metrics.refused.clone(),
        );
        metrics
    }

    /// `server` refused a connection or request for `reason`.
    pub fn refused(&self, server: &'static str, reason: &'static str) {
        self.refused
            .get_or_create(&RefusedLabels { server, reason })
            .inc();
    }
}

impl Gate {
    pub fn new(server: &'static str, limits: Limits, metrics: Metrics) -> Arc<Self> {
        Arc::new(Self {
            server,
            limits,
            metrics,
            open: Mutex::new(Open::default()),
        })
    }

    /// A place for a connection from `ip`, or None (counted) when a cap is reached.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Admitted> {
        let mut open = self.open.lock();
        let from_ip = open.by_ip.get(&ip).copied().unwrap_or(0);
        let reason = if open.total >= self.limits.max_connections {
            "connection_limit"
        } else if from_ip >= self.limits.max_connections_per_ip {
            "connection_limit_per_ip"
        } else {
            open.total += 1;
            open.by_ip.insert(ip, from_ip + 1);
            return Some(Admitted {
                gate: Arc::clone(self),
                ip,
            });
        };
        drop(open);
        self.metrics.refused(self.server, reason);
        crate::warn_limited!(component = self.server, peer = %ip, reason,
            "HTTP connection refused: too many open connections");
        None
    }

    /// Counts a request refused or a connection closed for `reason`.
    pub fn refused(&self, reason: &'static str) {
        self.metrics.refused(self.server, reason);
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut open = self.gate.open.lock();
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.by_ip.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.by_ip.remove(&self.ip);
            }
        }
    }
}

impl BodyError {
    /// Stable, snake_case reason: the metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            BodyError::TooLarge(_) => "body_too_large",
            BodyError::Timeout(_) => "body_timeout",
            BodyError::Read(_) => "body_read",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            BodyError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            BodyError::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            BodyError::Read(_) => StatusCode::BAD_REQUEST,
        }
    }
}

/// An HTTP/1.1 connection builder with the header timeout of `limits` (it needs a timer:
/// without one hyper never times a client out).
pub fn builder(limits: &Limits) -> hyper::server::conn::http1::Builder {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    builder
}

/// Reads a request's body within the limits: a declared length over the limit is refused
/// before any of it is read.
pub async fn read_body(
    req: Request<Incoming>,
    limits: &Limits,
) -> Result<Request<Bytes>, BodyError> {
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_body_bytes as u64) {
        return Err(BodyError::TooLarge(limits.max_body_bytes));
    }
    let (parts, body) = req.into_parts();
    let read = Limited::new(body, limits.max_body_bytes).collect();
    match tokio::time::timeout(limits.body_timeout, read).await {
        Err(_) => Err(BodyError::Timeout(limits.body_timeout)),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            Err(BodyError::TooLarge(limits.max_body_bytes))
        }
        Ok(Err(e)) => Err(BodyError::Read(e.to_string())),
        Ok(Ok(body)) => Ok(Request::from_parts(parts, body.to_bytes())),
    }
}

/// Serves `listener` with `handler` until the task is dropped, within `gate`'s limits. An
/// accept error (out of file descriptors, say) is logged and retried after a pause, never
/// the end of the server.
pub async fn serve<H>(listener: TcpListener, gate: Arc<Gate>, handler: H)
where
    H: Fn(&Request<Bytes>) -> Response<Full<Bytes>> + Send + Sync + 'static,
{
    let component = gate.server;
    let handler = Arc::new(handler);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                crate::warn_limited!(component, error = %e, "accept failed");
                tokio::time::sleep(ACCEPT_RETRY).await;
                continue;
            }
        };
        // Over a cap: closed at once, before any byte is read.
        let Some(admitted) = gate.admit(peer.ip()) else {
            continue;
        };
        let handler = Arc::clone(&handler);
        let gate = Arc::clone(&gate);
        tokio::spawn(async move {
            serve_connection(stream, peer, gate, handler).await;
            drop(admitted);
        });
    }
}

async fn serve_connection<H>(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    gate: Arc<Gate>,
    handler: Arc<H>,
) where
    H: Fn(&Request<Bytes>) -> Response<Full<Bytes>> + Send + Sync + 'static,
{
    let component = gate.server;
    let service_gate = Arc::clone(&gate);
    let service = service_fn(move |req| {
        let handler = Arc::clone(&handler);
        let gate = Arc::clone(&service_gate);
        async move {
            let response = match read_body(req, gate.limits()).await {
                Ok(req) => handler(&req),
                Err(e) => {
                    gate.refused(e.reason());
                    debug!(component, peer = %peer, reason = e.reason(), error = %e, "request refused");
                    let mut response = text(e.status(), format!("{e}\n"));
                    // The rest of the body is never read: the connection cannot be reused.
                    response
                        .headers_mut()
                        .insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
                    response
                }
            };
            Ok::<_, Infallible>(response)
        }
    });
    if let Err(e) = builder(gate.limits())
        .serve_connection(TokioIo::new(stream), service)
        .await
    {
        if e.is_timeout() {
            gate.refused("header_timeout");
        }
        debug!(component, peer = %peer, error = %e, "HTTP connection ended with an error");
    }
}

/// A response of `status` with `body` as `content_type`.
pub fn response(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// A plain-text response.
pub fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    response(status, TEXT, body)
}

/// `value` as pretty JSON, or a 500 saying why it could not be encoded.
pub fn json(value: &impl Serialize) -> Response<Full<Bytes>> {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => response(StatusCode::OK, "application/json", body),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode: {e}\n"),
        ),
    }
}

/// `text/plain` in UTF-8.
pub const TEXT: &str = "text/plain; charset=utf-8";
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
