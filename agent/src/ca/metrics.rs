//! The CA's metrics, and the plain-HTTP server that serves them (`metricsListen`, off
//! unless set; the chart sets 0.0.0.0:15014, istiod's monitoring port):
//!
//! - `GET /metrics`: OpenMetrics text.
//!   - `weft_ca_certificates_issued_total`
//!   - `weft_ca_requests_refused_total{reason}`: every refusal, by the API's `error` reason
//!     (`identity_not_on_node`, `unauthenticated`, `api_unavailable`, `invalid_csr`, …)
//!   - `weft_ca_trust_bundle_publish_total{result}`: `created`, `updated`, `failed`
//!   - `weft_http_connections_refused_total{server, reason}`: `server` is `ca` (the API) or
//!     `ca_metrics`; reasons as in `http` (`connection_limit`, `header_timeout`, …)
//! - `GET /healthz/ready`: 200 once the CA serves (its listener is bound before this one).

use std::{net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use tokio::net::TcpListener;

use crate::http;

/// The CA's counters and their registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    issued: Counter,
    refused: Family<ReasonLabels, Counter>,
    bundle: Family<ResultLabels, Counter>,
    /// The HTTP servers' own refusals (the API's and this one's connection caps, timeouts).
    pub http: http::Metrics,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix(PREFIX);
        let issued = Counter::default();
        registry.register(
            "ca_certificates_issued",
            "Workload certificates issued",
            issued.clone(),
        );
        let refused = Family::default();
        registry.register(
            "ca_requests_refused",
            "Certificate requests refused, by reason",
            refused.clone(),
        );
        let bundle = Family::default();
        registry.register(
            "ca_trust_bundle_publish",
            "Trust bundle ConfigMap writes, by result",
            bundle.clone(),
        );
        let http = http::Metrics::new(&mut registry);
        Self {
            registry,
            issued,
            refused,
            bundle,
            http,
        }
    }

    pub fn issued(&self) {
        self.issued.inc();
    }

    pub fn refused(&self, reason: &'static str) {
        self.refused.get_or_create(&ReasonLabels { reason }).inc();
    }

    pub fn bundle_published(&self, result: &'static str) {
        self.bundle.get_or_create(&ResultLabels { result }).inc();
    }

    /// The exposition, in OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail; an empty answer would show if it ever did.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Serves `/metrics` and `/healthz/ready` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    let gate = http::Gate::new("ca_metrics", http::Limits::default(), metrics.http.clone());
    http::serve(listener, gate, move |req| answer(&metrics, req)).await;
}

/// Binds the metrics listener (before serving, so a bad address fails start-up).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, super::Error> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| super::Error::Bind { addr, source })
}

fn answer(metrics: &Metrics, req: &Request<Bytes>) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => (StatusCode::OK, OPENMETRICS, metrics.encode()),
        (&Method::GET, "/healthz/ready") => (StatusCode::OK, http::TEXT, "ready\n".to_owned()),
        _ => (
            StatusCode::NOT_FOUND,
            http::TEXT,
            "GET /metrics or /healthz/ready\n".to_owned(),
        ),
    };
    http::response(status, content_type, body)
}

const PREFIX: &str = "weft";
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
