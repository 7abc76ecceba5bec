//! Admin and readiness HTTP servers.
//!
//! Admin (`agent.adminAddr`, default 127.0.0.1:15000, keep it on localhost):
//! - `GET /healthz/ready`      200 `ready`, or 503 with the pending conditions
//! - `GET /status`             JSON for `weft status`: readiness, config generation and last
//!   rejection, enrolled pods and their listeners, certificates (identity, serial, expiry,
//!   renewal, last error), eBPF maps and counters, connection totals
//! - `GET /config_dump`        JSON: start-up config and the current state snapshot
//! - `GET /debug/connections`  JSON: active and recently closed connections
//! - `POST /quitquitquit`      graceful exit
//!
//! Readiness (`agent.readinessAddr`, default 0.0.0.0:15021): `GET /healthz/ready` only.
//!
//! Metrics (`agent.metricsAddr`, default 0.0.0.0:15020):
//! - `GET /metrics`            OpenMetrics text: the proxy's TCP metrics and the agent's
//!   health, read at scrape time (docs/telemetry.md)
//! - `GET /healthz/ready`      as above
//!
//! The three servers share one accept loop and router; each serves its own endpoint set.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming};
use serde::Serialize;
use serde_json::json;
use tokio::{net::TcpListener, sync::Notify};
use tracing::debug;

use crate::{
    ebpf::{self, Dataplane},
    enroll::EnrollStatus,
    http,
    identity::CertManager,
    proxy::{Connections, hbone},
    readiness::Ready,
    source::SourceStatus,
    state::StateHandle,
    telemetry::{
        Registry,
        metrics::{self, AgentHealth, HealthCollector},
    },
};

/// Admin addresses, fixed at start-up.
#[derive(Clone, Debug, Serialize)]
pub struct Config {
    pub admin_addr: SocketAddr,
    pub readiness_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "cannot listen on {addr}: {source} (is another agent running in this network namespace?)"
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
    pub enroll: Arc<Mutex<EnrollStatus>>,
    pub dataplane: Arc<Mutex<Dataplane>>,
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
}

impl Servers {
    pub async fn bind(config: &Config) -> Result<Self, Error> {
        Ok(Self {
            admin: bind(config.admin_addr).await?,
            readiness: bind(config.readiness_addr).await?,
            metrics: bind(config.metrics_addr).await?,
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

    pub fn spawn(self, mut context: Context) {
        let health = health_collector(&context);
        context.metrics.register_collector(health);
        let context = Arc::new(context);
        tokio::spawn(serve(self.admin, Arc::clone(&context), Endpoints::Admin));
        tokio::spawn(serve(
            self.readiness,
            Arc::clone(&context),
            Endpoints::Readiness,
        ));
        tokio::spawn(serve(self.metrics, context, Endpoints::Metrics));
    }
}

#[derive(Clone, Copy)]
enum Endpoints {
    Admin,
    Readiness,
    Metrics,
}

async fn serve(listener: TcpListener, context: Arc<Context>, endpoints: Endpoints) {
    http::serve(listener, "admin", move |req| {
        route(&context, endpoints, req)
    })
    .await;
}

fn route(
    context: &Context,
    endpoints: Endpoints,
    req: &Request<Incoming>,
) -> Response<Full<Bytes>> {
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
        (Endpoints::Admin, &Method::POST, "/quitquitquit") => {
            context.shutdown.notify_one();
            http::text(StatusCode::OK, "shutting down\n".into())
        }
        _ => http::text(StatusCode::NOT_FOUND, format!("no endpoint {path}\n")),
    }
}

/// Binds one of the admin listeners (before serving, so a bad address fails start-up).
pub(crate) async fn bind(addr: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { addr, source })
}

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
    let enroll = Arc::clone(&context.enroll);
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
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .stats()
            .map_err(|e| debug!(component = "admin", error = %e, "cannot read eBPF stats"))
            .ok()
            .map(|stats| ebpf::stat_fields(&stats).to_vec());
        AgentHealth {
            enrolled_pods: enroll
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .enrolled
                .len() as u64,
            certificates,
            config_generation: config.generation,
            // The file source carries policies in the same snapshot as everything else.
            policy_generation: config.generation,
            config_rejected: config.rejected_total,
            config_source: config.source.as_str(),
            ebpf,
        }
    })
}

fn status(context: &Context) -> serde_json::Value {
    let dataplane = match context
        .dataplane
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .dump()
    {
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
        "pods": &*context.enroll.lock().unwrap_or_else(PoisonError::into_inner),
        "dataplane": dataplane,
        "connections": {
            "active": connections.active.len(),
            "closed_total": connections.closed_total,
        },
        "mtls": context.certs.is_some(),
        "certificates": context.certs.as_ref().map(CertManager::status).unwrap_or_default(),
        "hbone_pool": context.hbone_pool.as_ref().map(hbone::Pool::stats),
    })
}
