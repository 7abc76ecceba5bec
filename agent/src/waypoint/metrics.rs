//! The waypoint's request metrics, named and labelled as Istio's standard HTTP metrics
//! (`<prefix>_requests_total`, `<prefix>_request_duration_milliseconds`,
//! `<prefix>_request_bytes`, `<prefix>_response_bytes`, reporter `waypoint`) plus
//! `route_name`, and the requests L7 policy denied; requests refused before routing (an
//! ambiguous path), mirror copies not sent, and `forwarded: for=` headers not believed;
//! connection-pool overflows, and outlier detection's ejections.

use std::fmt;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
};

use super::breaker::Limit;
use crate::{state::WorkloadRef, telemetry::Registry};

/// Istio's HTTP metric labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    /// `name.namespace.svc.cluster.local`.
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    /// `http` or `grpc`.
    pub request_protocol: &'static str,
    pub response_code: u16,
    /// The gRPC status (`-` for non-gRPC requests or when none came).
    pub grpc_response_status: String,
    pub response_flags: &'static str,
    pub connection_security_policy: &'static str,
    /// `namespace/name` of the route, or empty.
    pub route_name: String,
}

/// Labels of the denied-requests counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeniedLabels {
    pub reason: &'static str,
    /// `namespace/name` of the DENY policy, or empty.
    pub policy: String,
}

/// Labels of the failed-connections counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub reason: &'static str,
}

/// Labels of the gateway's TLS handshakes counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

/// Labels of the retries counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route_name: String,
    pub destination_service: String,
}

/// Labels of the circuit-breaking counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OverflowLabels {
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    /// `pending_requests`, `requests`, `retries` or `retry_budget`.
    pub limit: &'static str,
}

/// Labels of the rate-limit and fault counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabels {
    /// `namespace/name` of the TrafficPolicy.
    pub policy: String,
    /// `abort` or `delay` (faults), `route` or `service` (rate limits).
    pub kind: &'static str,
}

/// Labels of the outlier-detection metrics: the backend Service.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub destination_service_name: String,
    pub destination_service_namespace: String,
}

/// Labels of the end-user authentication failures: the Service addressed, and why.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthnLabels {
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    /// `expired`, `wrong_issuer`, `bad_signature`, `jwks_unavailable`, ...
    pub reason: &'static str,
}

/// The waypoint's metrics. Cheap to clone (the families are shared).
#[derive(Clone, Debug)]
pub struct Metrics {
    requests: Family<HttpLabels, Counter>,
    duration_ms: Family<HttpLabels, Histogram>,
    request_bytes: Family<HttpLabels, Histogram>,
    response_bytes: Family<HttpLabels, Histogram>,
    denied: Family<DeniedLabels, Counter>,
    retries: Family<RouteLabels, Counter>,
    connection_errors: Family<ErrorLabels, Counter>,
    tls_handshakes: Family<ResultLabels, Counter>,
    passthrough: Family<ResultLabels, Counter>,
    rejected: Family<ErrorLabels, Counter>,
    mirrors_skipped: Family<ErrorLabels, Counter>,
    forwarded_ignored: Family<ErrorLabels, Counter>,
    overflows: Family<OverflowLabels, Counter>,
    rate_limited: Family<PolicyLabels, Counter>,
    faults: Family<PolicyLabels, Counter>,
    ejections: Family<ServiceLabels, Counter>,
    ejected: Family<ServiceLabels, Gauge>,
    authn_failures: Family<AuthnLabels, Counter>,
}

/// One finished request as the metrics see it.
#[derive(Clone, Copy, Debug)]
pub struct Observation {
    pub duration_ms: f64,
    pub request_bytes: u64,
    pub response_bytes: u64,
}

impl Metrics {
    /// Metrics served by `registry` (under its prefix).
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Self::unregistered();
        registry.register_collector(Exposition(metrics.clone()));
        metrics
    }

    fn unregistered() -> Self {
        Self {
            requests: Family::default(),
            duration_ms: Family::new_with_constructor(|| {
                Histogram::new(DURATION_BUCKETS_MS.iter().copied())
            }),
            request_bytes: Family::new_with_constructor(|| {
                Histogram::new(SIZE_BUCKETS.iter().copied())
            }),
            response_bytes: Family::new_with_constructor(|| {
                Histogram::new(SIZE_BUCKETS.iter().copied())
            }),
            denied: Family::default(),
            retries: Family::default(),
            connection_errors: Family::default(),
            tls_handshakes: Family::default(),
            passthrough: Family::default(),
            rejected: Family::default(),
            mirrors_skipped: Family::default(),
            forwarded_ignored: Family::default(),
            overflows: Family::default(),
            rate_limited: Family::default(),
            faults: Family::default(),
            ejections: Family::default(),
            ejected: Family::default(),
            authn_failures: Family::default(),
        }
    }

    pub fn request(&self, labels: &HttpLabels, seen: Observation) {
        self.requests.get_or_create(labels).inc();
        self.duration_ms
            .get_or_create(labels)
            .observe(seen.duration_ms);
        self.request_bytes
            .get_or_create(labels)
            .observe(seen.request_bytes as f64);
        self.response_bytes
            .get_or_create(labels)
            .observe(seen.response_bytes as f64);
    }

    /// Tries after the first of one request.
    pub fn retried(&self, labels: &HttpLabels, retries: u32) {
        if retries > 0 {
            self.retries
                .get_or_create(&RouteLabels {
                    route_name: labels.route_name.clone(),
                    destination_service: labels.destination_service.clone(),
                })
                .inc_by(u64::from(retries));
        }
    }

    /// A client's HTTP connection (inside a CONNECT) failed: it was reset.
    pub fn connection_error(&self, reason: &'static str) {
        self.connection_errors
            .get_or_create(&ErrorLabels { reason })
            .inc();
    }

    /// A TLS handshake on a gateway's HTTPS listener: `ok`, `no_certificate` (no listener
    /// serves the SNI), `failed` or `timeout`.
    pub fn tls_handshake(&self, result: &'static str) {
        self.tls_handshakes
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// A connection a gateway's TLS passthrough or TCP listener passed on (`ok`), or
    /// refused or lost, by reason.
    pub fn passthrough(&self, result: &'static str) {
        self.passthrough
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// A request refused before routing (its path), answered 400.
    pub fn rejected(&self, reason: &'static str) {
        self.rejected.get_or_create(&ErrorLabels { reason }).inc();
    }

    /// A mirror copy that was not sent (its endpoint's policy, its size, no endpoint).
    pub fn mirror_skipped(&self, reason: &'static str) {
        self.mirrors_skipped
            .get_or_create(&ErrorLabels { reason })
            .inc();
    }

    /// A CONNECT's `forwarded: for=` that was not believed: its peer's address is used.
    pub fn forwarded_ignored(&self, reason: &'static str) {
        self.forwarded_ignored
            .get_or_create(&ErrorLabels { reason })
            .inc();
    }

    /// A request refused, or a retry not made, at a connection-pool limit of `service`.
    pub fn overflow(&self, service: &WorkloadRef, limit: Limit) {
        self.overflows
            .get_or_create(&OverflowLabels {
                destination_service_name: service.name.clone(),
                destination_service_namespace: service.namespace.clone(),
                limit: limit.name(),
            })
            .inc();
    }

    /// A request refused (429) by the token bucket of `policy` on a `kind` target.
    pub fn rate_limited(&self, policy: &WorkloadRef, kind: &'static str) {
        let policy = policy.to_string();
        self.rate_limited
            .get_or_create(&PolicyLabels { policy, kind })
            .inc();
    }

    /// A fault (`abort` or `delay`) of `policy` injected into a request.
    pub fn fault(&self, policy: &WorkloadRef, kind: &'static str) {
        let policy = policy.to_string();
        self.faults
            .get_or_create(&PolicyLabels { policy, kind })
            .inc();
    }

    /// A request to `service` refused (401) for its token, for `reason`.
    pub fn authn_failed(&self, service: &WorkloadRef, reason: &'static str) {
        self.authn_failures
            .get_or_create(&AuthnLabels {
                destination_service_name: service.name.clone(),
                destination_service_namespace: service.namespace.clone(),
                reason,
            })
            .inc();
    }

    /// An endpoint of `service` ejected by outlier detection; `ejected` are out now.
    pub fn ejected(&self, service: &WorkloadRef, ejected: usize) {
        let labels = service_labels(service);
        self.ejections.get_or_create(&labels).inc();
        self.ejected_now(service, ejected);
    }

    /// Endpoints of `service` ejected now.
    pub fn ejected_now(&self, service: &WorkloadRef, ejected: usize) {
        let ejected = i64::try_from(ejected).unwrap_or(i64::MAX);
        self.ejected
            .get_or_create(&service_labels(service))
            .set(ejected);
    }

    /// `service` is gone: its gauge of ejected endpoints goes with it.
    pub fn service_gone(&self, service: &WorkloadRef) {
        self.ejected.remove(&service_labels(service));
    }

    pub fn denied(&self, reason: &'static str, policy: String) {
        self.denied
            .get_or_create(&DeniedLabels { reason, policy })
            .inc();
    }
}

/// Encodes the families at scrape time (the registry adds the prefix).
#[derive(Debug)]
struct Exposition(Metrics);

impl Collector for Exposition {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let m = &self.0;
        m.requests.encode(encoder.encode_descriptor(
            "requests",
            "Requests the waypoint answered",
            None,
            m.requests.metric_type(),
        )?)?;
        m.duration_ms.encode(encoder.encode_descriptor(
            "request_duration_milliseconds",
            "Request duration, arrival to the end of the response, milliseconds",
            None,
            m.duration_ms.metric_type(),
        )?)?;
        m.request_bytes.encode(encoder.encode_descriptor(
            "request_bytes",
            "Request body sizes, bytes",
            None,
            m.request_bytes.metric_type(),
        )?)?;
        m.response_bytes.encode(encoder.encode_descriptor(
            "response_bytes",
            "Response body sizes, bytes",
            None,
            m.response_bytes.metric_type(),
        )?)?;
        m.denied.encode(encoder.encode_descriptor(
            "waypoint_denied_requests",
            "Requests the waypoint's L7 access policy denied, by reason and policy",
            None,
            m.denied.metric_type(),
        )?)?;
        m.retries.encode(encoder.encode_descriptor(
            "waypoint_request_retries",
            "Tries after the first, by route",
            None,
            m.retries.metric_type(),
        )?)?;
        m.connection_errors.encode(encoder.encode_descriptor(
            "waypoint_connection_errors",
            "Client HTTP connections that failed (protocol errors, resets), by reason",
            None,
            m.connection_errors.metric_type(),
        )?)?;
        m.tls_handshakes.encode(encoder.encode_descriptor(
            "gateway_tls_handshakes",
            "TLS handshakes on a gateway's HTTPS listeners, by result (ok, no_certificate, failed, timeout)",
            None,
            m.tls_handshakes.metric_type(),
        )?)?;
        m.passthrough.encode(encoder.encode_descriptor(
            "gateway_passthrough_connections",
            "Connections of a gateway's TLS passthrough and TCP listeners, by result (ok, no_route, no_endpoints, bad_client_hello, ...)",
            None,
            m.passthrough.metric_type(),
        )?)?;
        m.rejected.encode(encoder.encode_descriptor(
            "waypoint_rejected_requests",
            "Requests refused with 400 before routing (an ambiguous or malformed path), by reason",
            None,
            m.rejected.metric_type(),
        )?)?;
        m.mirrors_skipped.encode(encoder.encode_descriptor(
            "waypoint_mirrors_skipped",
            "Mirror copies not sent (the mirror endpoint's policy, body size, no endpoint), by reason",
            None,
            m.mirrors_skipped.metric_type(),
        )?)?;
        m.forwarded_ignored.encode(encoder.encode_descriptor(
            "waypoint_forwarded_for_ignored",
            "CONNECTs whose forwarded: for= did not name a workload of the peer's identity, by reason",
            None,
            m.forwarded_ignored.metric_type(),
        )?)?;
        m.overflows.encode(encoder.encode_descriptor(
            "waypoint_overflows",
            "Requests refused with 503 (UO) at a connection-pool limit of a backend Service, or retries not made over maxRetries or the retry budget, by limit",
            None,
            m.overflows.metric_type(),
        )?)?;
        m.rate_limited.encode(encoder.encode_descriptor(
            "waypoint_rate_limited",
            "Requests refused with 429 (RL) by a TrafficPolicy rate limit, by policy and target kind (route, service)",
            None,
            m.rate_limited.metric_type(),
        )?)?;
        m.faults.encode(encoder.encode_descriptor(
            "waypoint_faults_injected",
            "Faults injected into requests by a TrafficPolicy, by policy and kind (abort, delay)",
            None,
            m.faults.metric_type(),
        )?)?;
        m.ejections.encode(encoder.encode_descriptor(
            "waypoint_outlier_ejections",
            "Endpoints of a backend Service ejected by outlier detection",
            None,
            m.ejections.metric_type(),
        )?)?;
        m.ejected.encode(encoder.encode_descriptor(
            "waypoint_outlier_ejected_endpoints",
            "Endpoints of a backend Service ejected now (updated as requests arrive)",
            None,
            m.ejected.metric_type(),
        )?)?;
        m.authn_failures.encode(encoder.encode_descriptor(
            "waypoint_authn_failures",
            "Requests refused with 401 for an invalid end-user token (TrafficPolicy requestAuthentication), by Service and reason",
            None,
            m.authn_failures.metric_type(),
        )?)?;
        Ok(())
    }
}

fn service_labels(service: &WorkloadRef) -> ServiceLabels {
    ServiceLabels {
        destination_service_name: service.name.clone(),
        destination_service_namespace: service.namespace.clone(),
    }
}

impl Default for Metrics {
    /// Metrics registered nowhere.
    fn default() -> Self {
        Self::unregistered()
    }
}

/// Istio's duration buckets, milliseconds.
const DURATION_BUCKETS_MS: [f64; 14] = [
    1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0,
];

/// Istio's size buckets, bytes (1 to 10^8 by powers of ten).
const SIZE_BUCKETS: [f64; 9] = [1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8];
