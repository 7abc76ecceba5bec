//! Admin and readiness HTTP servers.
//!
//! Admin (`agent.adminAddr`, default 127.0.0.1:15000, keep it on localhost):
//! - `GET /healthz/ready`      200 `ready`, or 503 with the pending conditions
//! - `GET /status`             JSON for `weft status`: readiness, config generation and last
//!   rejection, enrolled pods and their listeners, certificates (identity, serial, expiry,
//!   renewal, last error), eBPF maps and counters, connection totals
//! - `GET /config_dump`        JSON: start-up config and the current state snapshot
//! - `GET /debug/connections`  JSON: active and recently closed connections
//! - `POST /quitquitquit`      graceful exit; only with the header `Weft-Admin: quit` and a
//!   loopback `Host` (see [`quit_allowed`])
//!
//! Readiness (`agent.readinessAddr`, default 0.0.0.0:15021): `GET /healthz/ready` only.
//!
//! Metrics (`agent.metricsAddr`, default 0.0.0.0:15020):
//! - `GET /metrics`            OpenMetrics text: the proxy's TCP metrics and the agent's
//!   health, read at scrape time (docs/telemetry.md)
//! - `GET /healthz/ready`      as above
//!
//! The three servers share one accept loop and router; each serves its own endpoint set,
//! each within the limits of `agent.http` (see `http`).
//!
//! The admin address must be a loopback address (`config` refuses any other): the admin
//! API shows every pod's identity and can stop the agent.

use std::{net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;
use serde_json::json;
use tokio::{
    net::TcpListener,
    sync::{Notify, watch},
};
use tracing::debug;

use crate::{
    ebpf::{self, DataplaneView},
    hbone, http,
    identity::CertManager,
    proxy::Connections,
    readiness::Ready,
    report::EnrollStatus,
    source::SourceStatus,
    state::StateHandle,
    telemetry::{
        Registry,
        metrics::{self, AgentHealth, HealthCollector},
    },
};

/// Admin addresses and the limits of their servers, fixed at start-up.
#[derive(Clone, Debug, Serialize)]
pub struct Config {
    pub admin_addr: SocketAddr,
    pub readiness_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub http: http::Limits,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "cannot listen on {addr}: {source} (is another agent running in this network namespace? \
         An agent that does not hand over, as before agent.handover, must stop first: \
         docs/kubernetes.md, Upgrades)"
    )]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Everything the admin endpoints read.
pub struct Context {
    pub node: String,
    /// The start-up configuration, serialized once.
    pub config: serde_json::Value,
    pub ready: Ready,
    pub state: StateHandle,
    pub source: Arc<SourceStatus>,
    /// Published after each enrollment pass; none before the first.
    pub enroll: watch::Receiver<Option<Arc<EnrollStatus>>>,
    pub dataplane: Arc<DataplaneView>,
    pub connections: Arc<Connections>,
    /// The certificate manager, when the node has a CA.
    pub certs: Option<CertManager>,
    /// Outbound HBONE connections, when mutual TLS is on.
    pub hbone_pool: Option<hbone::Pool>,
    pub shutdown: Arc<Notify>,
    /// Served on `/metrics`; `Servers::spawn` adds the agent's health to it.
    pub metrics: Registry,
}

/// Bound servers; `spawn` starts serving.
pub struct Servers {
    admin: TcpListener,
    readiness: TcpListener,
    metrics: TcpListener,
    limits: http::Limits,
}

impl Servers {
    /// Binds the three ports. `share` (the agent hands over to a successor): with
    /// SO_REUSEPORT, so that a successor binds them beside this agent and serves them alone
    /// once this one stops (`Serving::stop`). Only a process of the same user may join.
    pub fn bind(config: &Config, share: Share) -> Result<Self, Error> {
        Ok(Self {
            admin: bind_shared(config.admin_addr, share)?,
            readiness: bind_shared(config.readiness_addr, share)?,
            metrics: bind_shared(config.metrics_addr, share)?,
            limits: config.http,
        })
    }

    /// Addresses actually bound (port 0 resolved).
    pub fn addresses(&self) -> (Option<SocketAddr>, Option<SocketAddr>) {
        (
            self.admin.local_addr().ok(),
            self.readiness.local_addr().ok(),
        )
    }

    /// The metrics address actually bound.
    pub fn metrics_address(&self) -> Option<SocketAddr> {
        self.metrics.local_addr().ok()
    }

    pub fn spawn(self, mut context: Context) -> Serving {
        let health = health_collector(&context);
        context.metrics.register_collector(health);
        let metrics = http::Metrics::new(context.metrics.prometheus_mut());
        let context = Arc::new(context);
        let tasks = [
            (self.admin, Endpoints::Admin),
            (self.readiness, Endpoints::Readiness),
            (self.metrics, Endpoints::Metrics),
        ]
        .map(|(listener, endpoints)| {
            let gate = http::Gate::new(endpoints.name(), self.limits, metrics.clone());
            tokio::spawn(serve(listener, gate, Arc::clone(&context), endpoints))
        });
        Serving { tasks }
    }
}

/// Whether the admin ports are bound to be shared with a successor agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Share {
    Alone,
    WithSuccessor,
}

/// The three accept loops, running.
pub struct Serving {
    tasks: [tokio::task::JoinHandle<()>; 3],
}

impl Serving {
    /// Closes the three listeners: a successor bound beside this agent answers alone. A
    /// request already accepted is still answered (its task is not the accept loop's).
    pub fn stop(self) {
        for task in self.tasks {
            task.abort();
        }
    }
}

#[derive(Clone, Copy)]
enum Endpoints {
    Admin,
    Readiness,
    Metrics,
}

impl Endpoints {
    /// The `server` label of the HTTP metrics.
    fn name(self) -> &'static str {
        match self {
            Endpoints::Admin => "admin",
            Endpoints::Readiness => "readiness",
            Endpoints::Metrics => "metrics",
        }
    }
}

async fn serve(
    listener: TcpListener,
    gate: Arc<http::Gate>,
    context: Arc<Context>,
    endpoints: Endpoints,
) {
    http::serve(listener, gate, move |req| route(&context, endpoints, req)).await;
}

fn route(context: &Context, endpoints: Endpoints, req: &Request<Bytes>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    match (endpoints, req.method(), path) {
        (_, &Method::GET, "/healthz/ready") => ready(&context.ready),
        (Endpoints::Admin, &Method::GET, "/status") => http::json(&status(context)),
        (Endpoints::Admin, &Method::GET, "/config_dump") => http::json(&json!({
            "node": context.node,
            "config": context.config,
            "state": &**context.state.borrow(),
        })),
        (Endpoints::Admin, &Method::GET, "/debug/connections") => {
            http::json(&context.connections.view())
        }
        (Endpoints::Metrics, &Method::GET, "/metrics") => metrics_response(&context.metrics),
        (Endpoints::Admin, &Method::POST, "/quitquitquit") => quit(req, &context.shutdown),
        _ => http::text(StatusCode::NOT_FOUND, format!("no endpoint {path}\n")),
    }
}

/// `POST /quitquitquit`: shuts down if [`quit_allowed`], else 403 saying why.
pub(crate) fn quit(req: &Request<Bytes>, shutdown: &Notify) -> Response<Full<Bytes>> {
    match quit_allowed(req) {
        Ok(()) => {
            shutdown.notify_one();
            http::text(StatusCode::OK, "shutting down\n".into())
        }
        Err(why) => {
            crate::warn_limited!(component = "admin", reason = why, "refused /quitquitquit");
            http::text(StatusCode::FORBIDDEN, format!("refused: {why}\n"))
        }
    }
}

/// Whether a mutating admin request may proceed. The admin port listens on loopback only,
/// so the remaining attacker is a web page in a browser on the node: a cross-origin page
/// cannot add a custom header without a CORS preflight, which this server never grants;
/// and a page that rebinds its own name to 127.0.0.1 (DNS rebinding, same origin) still
/// sends its own name as `Host`, which is not a loopback address. `curl` and `weft` send
/// both without effort (`curl -X POST -H 'Weft-Admin: quit' 127.0.0.1:15000/quitquitquit`).
pub(crate) fn quit_allowed(req: &Request<Bytes>) -> Result<(), &'static str> {
    if req.headers().get(ADMIN_HEADER).map(|v| v.as_bytes()) != Some(b"quit") {
        return Err("the header `Weft-Admin: quit` is required");
    }
    let host = req
        .headers()
        .get(hyper::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    if !is_loopback_host(host) {
        return Err("the Host header must name a loopback address");
    }
    Ok(())
}

/// `127.0.0.1[:port]`, `[::1][:port]` or `localhost[:port]`.
fn is_loopback_host(host: &str) -> bool {
    if let Ok(addr) = host.parse::<SocketAddr>() {
        return addr.ip().is_loopback();
    }
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.parse::<u16>().is_ok() => name,
        _ => host,
    };
    let name = name.trim_start_matches('[').trim_end_matches(']');
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Refuses an admin address that is not loopback: `Err` says why.
pub fn require_loopback(addr: SocketAddr) -> Result<(), String> {
    if addr.ip().is_loopback() {
        Ok(())
    } else {
        Err(format!(
            "{addr} is not a loopback address: the admin API shows every identity and can stop \
             the process, so it listens on 127.0.0.1 or [::1] only (use `kubectl port-forward` \
             or `weft status` on the node)"
        ))
    }
}

/// Binds one of the admin listeners (before serving, so a bad address fails start-up).
pub(crate) fn bind(addr: SocketAddr) -> Result<TcpListener, Error> {
    bind_shared(addr, Share::Alone)
}

fn bind_shared(addr: SocketAddr, share: Share) -> Result<TcpListener, Error> {
    let bind = || -> std::io::Result<TcpListener> {
        let socket = match addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        socket.set_reuseaddr(true)?;
        socket.set_reuseport(share == Share::WithSuccessor)?;
        socket.bind(addr)?;
        socket.listen(LISTEN_BACKLOG)
    };
    bind().map_err(|source| Error::Bind { addr, source })
}

/// The admin ports' accept queue (as std's default).
const LISTEN_BACKLOG: u32 = 128;

/// `/healthz/ready`: 200, or 503 with each pending condition and why.
pub(crate) fn ready(ready: &Ready) -> Response<Full<Bytes>> {
    let pending = ready.pending();
    if pending.is_empty() {
        return http::text(StatusCode::OK, "ready\n".into());
    }
    let reasons: String = pending.iter().map(|(k, v)| format!("{k}: {v}\n")).collect();
    http::text(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("not ready\n{reasons}"),
    )
}

/// `/metrics` in the OpenMetrics text format.
pub(crate) fn metrics_response(registry: &Registry) -> Response<Full<Bytes>> {
    match registry.encode() {
        Ok(body) => http::response(StatusCode::OK, metrics::CONTENT_TYPE, body),
        Err(e) => http::text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode metrics: {e}\n"),
        ),
    }
}

/// The agent's health for `/metrics`, read at each scrape from what `/status` shows.
fn health_collector(context: &Context) -> HealthCollector {
    let enroll = context.enroll.clone();
    let dataplane = Arc::clone(&context.dataplane);
    let source = Arc::clone(&context.source);
    let certs = context.certs.clone();
    HealthCollector::new(move || {
        let config = source.view();
        let certificates = certs
            .as_ref()
            .map(CertManager::status)
            .unwrap_or_default()
            .into_iter()
            .map(|c| {
                let expiry = c
                    .not_after
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(|d| d.as_secs_f64());
                (c.identity.to_string(), expiry)
            })
            .collect();
        let ebpf = dataplane
            .stats()
            .map_err(|e| debug!(component = "admin", error = %e, "cannot read eBPF stats"))
            .ok()
            .map(|stats| ebpf::stat_fields(&stats).to_vec());
        let enrollment = enrollment(&enroll);
        AgentHealth {
            enrolled_pods: enrollment.enrolled.len() as u64,
            pods_without_client_address: enrollment
                .enrolled
                .iter()
                .filter(|pod| !pod.client_address)
                .count() as u64,
            certificates,
            config_generation: config.generation,
            // The file source carries policies in the same snapshot as everything else.
            policy_generation: config.generation,
            config_rejected: config.rejected_total,
            config_restart_pending: config.restart_pending.len() as u64,
            config_source: config.source.as_str(),
            ebpf,
        }
    })
}

/// The last enrollment pass's report; before the first, an empty one.
fn enrollment(enroll: &watch::Receiver<Option<Arc<EnrollStatus>>>) -> Arc<EnrollStatus> {
    enroll.borrow().clone().unwrap_or_default()
}

fn status(context: &Context) -> serde_json::Value {
    let dataplane = match context.dataplane.dump() {
        Ok(dump) => {
            serde_json::to_value(dump).unwrap_or_else(|e| json!({ "error": e.to_string() }))
        }
        Err(e) => json!({ "error": e.to_string() }),
    };
    let connections = context.connections.view();
    json!({
        "node": context.node,
        "ready": context.ready.is_ready(),
        "pending": context.ready.pending(),
        "config": context.source.view(),
        "pods": &*enrollment(&context.enroll),
        "dataplane": dataplane,
        "connections": {
            "active": connections.active.len(),
            "closed_total": connections.closed_total,
        },
        "mtls": context.certs.is_some(),
        "certificates": context.certs.as_ref().map(CertManager::status).unwrap_or_default(),
        "hbone_pool": context.hbone_pool.as_ref().map(hbone::Pool::stats),
        // From the runtime itself (`agent.workerThreads`), not from the config.
        "worker_threads": tokio::runtime::Handle::try_current()
            .ok()
            .map(|runtime| runtime.metrics().num_workers()),
    })
}

/// The header a mutating admin request must carry (`Weft-Admin: quit`).
pub const ADMIN_HEADER: &str = "weft-admin";

#[cfg(test)]
mod tests {
    use super::*;

    fn post(headers: &[(&str, &str)]) -> Request<Bytes> {
        let mut req = Request::post("/quitquitquit");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.body(Bytes::new()).unwrap()
    }

    #[test]
    fn quit_needs_the_admin_header_and_a_loopback_host() {
        let shutdown = Notify::new();
        for (headers, status) in [
            (vec![("host", "127.0.0.1:15000")], StatusCode::FORBIDDEN),
            (
                vec![("host", "127.0.0.1:15000"), ("weft-admin", "yes")],
                StatusCode::FORBIDDEN,
            ),
            // DNS rebinding: the page's own name arrives as Host.
            (
                vec![("host", "evil.example:15000"), ("weft-admin", "quit")],
                StatusCode::FORBIDDEN,
            ),
            (vec![("weft-admin", "quit")], StatusCode::FORBIDDEN),
            (
                vec![("host", "127.0.0.1:15000"), ("weft-admin", "quit")],
                StatusCode::OK,
            ),
            (
                vec![("host", "localhost"), ("weft-admin", "quit")],
                StatusCode::OK,
            ),
            (
                vec![("host", "[::1]:15000"), ("weft-admin", "quit")],
                StatusCode::OK,
            ),
        ] {
            assert_eq!(
                quit(&post(&headers), &shutdown).status(),
                status,
                "{headers:?}"
            );
        }
    }

    #[test]
    fn only_loopback_admin_addresses_are_accepted() {
        assert!(require_loopback("127.0.0.1:15000".parse().unwrap()).is_ok());
        assert!(require_loopback("[::1]:15000".parse().unwrap()).is_ok());
        let err = require_loopback("0.0.0.0:15000".parse().unwrap()).unwrap_err();
        assert!(err.contains("not a loopback"), "{err}");
        assert!(require_loopback("10.0.0.1:15000".parse().unwrap()).is_err());
    }
}
