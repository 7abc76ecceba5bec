//! Prometheus metrics served on the metrics port (`/metrics`, OpenMetrics text).
//!
//! Two kinds: the node proxy's L4 metrics, named and labelled like Istio's standard TCP
//! metrics so that Istio and Kiali dashboards work with the prefix set to `istio`
//! (`TcpMetrics`, counted by `proxy::Connections`), and the agent's own health, read at
//! scrape time from whatever `app` hands in (`AgentHealth` through `HealthCollector`).
//! Every name starts with the configurable prefix (`agent.metricsPrefix`, default `weft`).
//! docs/telemetry.md lists every metric.

use std::{fmt, sync::Arc};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::Histogram,
    },
    registry::Unit,
};

use super::Error;

/// A validated metric name prefix: `[a-z_][a-z0-9_]*`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(transparent)]
pub struct Prefix(String);

/// The agent's metric registry; every name in it starts with the prefix.
#[derive(Debug)]
pub struct Registry {
    inner: prometheus_client::registry::Registry,
}

/// Istio's TCP metric labels. Unknown values are `unknown` (Istio's convention), so
/// every series of a family carries every label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    /// `source` (the client's proxy, outbound) or `destination` (the server's proxy).
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    /// `name.namespace.svc.cluster.local`.
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    /// `mutual_tls` (HBONE) or `none` (plaintext).
    pub connection_security_policy: &'static str,
    /// `-`, or an Envoy-style code (`response_flags`).
    pub response_flags: &'static str,
}

/// Labels of the denied-connections counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeniedLabels {
    /// `denied_by_policy`, `not_allowed`, `default_deny`, `plaintext_refused_strict`.
    pub reason: &'static str,
}

/// Labels of the node proxy's connection-pool metrics: the destination Service.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    pub destination_service_name: String,
    pub destination_service_namespace: String,
}

/// The node proxy's per-connection metrics. Cheap to clone (the families are shared).
#[derive(Clone, Debug)]
pub struct TcpMetrics {
    opened: Family<TcpLabels, Counter>,
    closed: Family<TcpLabels, Counter>,
    /// Response direction: destination → source (Istio's "sent during response").
    sent_bytes: Family<TcpLabels, Counter>,
    /// Request direction: source → destination (Istio's "received during request").
    received_bytes: Family<TcpLabels, Counter>,
    duration: Family<TcpLabels, Histogram>,
    denied: Family<DeniedLabels, Counter>,
    /// Connections refused at a Service's `connectionPool.maxConnections` (flag `UO`).
    overflows: Family<PoolLabels, Counter>,
    /// Connections open to a Service under such a limit.
    pool_connections: Family<PoolLabels, Gauge>,
}

/// The agent's health at one scrape, in plain values (so this module needs no other
/// module's types).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AgentHealth {
    /// Pods enrolled on this node.
    pub enrolled_pods: u64,
    /// Enrolled pods whose application sees the pod's own address instead of its mesh
    /// clients' (no reply routing in the pod).
    pub pods_without_client_address: u64,
    /// Certificate expiry (seconds since the epoch) by SPIFFE id; None: no certificate yet.
    pub certificates: Vec<(String, Option<f64>)>,
    /// Snapshots accepted from the config source (1 after start-up).
    pub config_generation: u64,
    /// Policy set in force; the file source carries policies in the same snapshot, so
    /// this equals the config generation there.
    pub policy_generation: u64,
    /// Config changes rejected (the last good config stays in force).
    pub config_rejected: u64,
    /// Fields of the `agent:` section changed since start-up (applied only by a restart).
    pub config_restart_pending: u64,
    /// The `source` label of `config_rejected` (`file` when empty).
    pub config_source: &'static str,
    /// eBPF verdict and error counters summed over CPUs, by `Stats` field name; None when
    /// the map cannot be read.
    pub ebpf: Option<Vec<(&'static str, u64)>>,
}

/// Reads `AgentHealth` at every scrape.
pub struct HealthCollector {
    read: Arc<dyn Fn() -> AgentHealth + Send + Sync>,
}

/// One closed (or established) connection as the metrics see it.
#[derive(Clone, Copy, Debug)]
pub struct Transfer {
    /// Bytes source → destination.
    pub request_bytes: u64,
    /// Bytes destination → source.
    pub response_bytes: u64,
    pub duration_seconds: f64,
}

impl Prefix {
    pub fn new(prefix: &str) -> Result<Self, Error> {
        let mut chars = prefix.chars();
        let valid = chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
            && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if valid {
            Ok(Self(prefix.to_owned()))
        } else {
            Err(Error::InvalidPrefix(prefix.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for Prefix {
    fn default() -> Self {
        Self(DEFAULT_PREFIX.to_owned())
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Registry {
    pub fn new(prefix: &Prefix) -> Self {
        Self {
            inner: prometheus_client::registry::Registry::with_prefix(prefix.as_str()),
        }
    }

    /// Registers a collector read at every scrape.
    pub fn register_collector(&mut self, collector: impl Collector) {
        self.inner.register_collector(Box::new(collector));
    }

    /// The registry itself, for modules below telemetry that register their own metrics
    /// (`http::Metrics`); names still get the prefix.
    pub fn prometheus_mut(&mut self) -> &mut prometheus_client::registry::Registry {
        &mut self.inner
    }

    /// The exposition, in OpenMetrics text (`CONTENT_TYPE`).
    pub fn encode(&self) -> Result<String, fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.inner)?;
        Ok(text)
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self::new(&Prefix::default())
    }
}

impl TcpMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Self {
            opened: Family::default(),
            closed: Family::default(),
            sent_bytes: Family::default(),
            received_bytes: Family::default(),
            duration: Family::new_with_constructor(|| {
                Histogram::new(DURATION_BUCKETS.iter().copied())
            }),
            denied: Family::default(),
            overflows: Family::default(),
            pool_connections: Family::default(),
        };
        let r = &mut registry.inner;
        r.register(
            "tcp_connections_opened",
            "TCP connections opened",
            metrics.opened.clone(),
        );
        r.register(
            "tcp_connections_closed",
            "TCP connections closed",
            metrics.closed.clone(),
        );
        r.register(
            "tcp_sent_bytes",
            "Bytes sent during response (destination to source), counted at close",
            metrics.sent_bytes.clone(),
        );
        r.register(
            "tcp_received_bytes",
            "Bytes received during request (source to destination), counted at close",
            metrics.received_bytes.clone(),
        );
        r.register_with_unit(
            "tcp_connection_duration",
            "Duration of closed TCP connections",
            Unit::Seconds,
            metrics.duration.clone(),
        );
        r.register(
            "agent_denied_connections",
            "Connections this node's proxy refused, by reason",
            metrics.denied.clone(),
        );
        r.register(
            "tcp_overflows",
            "Connections this node's proxy refused (reset, flag UO) at a TrafficPolicy's \
             connectionPool.maxConnections of a Service without a waypoint",
            metrics.overflows.clone(),
        );
        r.register(
            "tcp_pool_connections",
            "Connections this node's pods have open to a Service under a TrafficPolicy's \
             connectionPool.maxConnections (counted by this node's proxy)",
            metrics.pool_connections.clone(),
        );
        metrics
    }

    /// A connection was opened (its labels are settled).
    pub fn opened(&self, labels: &TcpLabels) {
        self.opened.get_or_create(labels).inc();
    }

    /// A connection was closed after moving `transfer`'s bytes.
    pub fn closed(&self, labels: &TcpLabels, transfer: Transfer) {
        self.closed.get_or_create(labels).inc();
        self.sent_bytes
            .get_or_create(labels)
            .inc_by(transfer.response_bytes);
        self.received_bytes
            .get_or_create(labels)
            .inc_by(transfer.request_bytes);
        self.duration
            .get_or_create(labels)
            .observe(transfer.duration_seconds);
    }

    /// This node refused a connection.
    pub fn denied(&self, reason: &'static str) {
        self.denied.get_or_create(&DeniedLabels { reason }).inc();
    }

    /// This node refused a connection to a Service at its connection-pool limit.
    pub fn overflow(&self, service: &PoolLabels) {
        self.overflows.get_or_create(service).inc();
    }

    /// This node's pods have `open` connections to a Service under a connection-pool
    /// limit; `None`: the Service is no longer tracked (its series goes).
    pub fn pool_connections(&self, service: &PoolLabels, open: Option<u32>) {
        match open {
            Some(open) => {
                self.pool_connections
                    .get_or_create(service)
                    .set(i64::from(open));
            }
            None => {
                self.pool_connections.remove(service);
            }
        }
    }
}

impl Default for TcpMetrics {
    /// Metrics registered nowhere (for tests and tools that need no `/metrics`).
    fn default() -> Self {
        Self::new(&mut Registry::default())
    }
}

impl HealthCollector {
    pub fn new(read: impl Fn() -> AgentHealth + Send + Sync + 'static) -> Self {
        Self {
            read: Arc::new(read),
        }
    }
}

impl fmt::Debug for HealthCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HealthCollector").finish_non_exhaustive()
    }
}

impl Collector for HealthCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let health = (self.read)();
        gauge(
            &mut encoder,
            "agent_enrolled_pods",
            "Pods enrolled on this node",
            health.enrolled_pods,
        )?;
        gauge(
            &mut encoder,
            "agent_pods_without_client_address",
            "Enrolled pods without reply routing: their applications see the pod's own address \
             instead of their mesh clients'",
            health.pods_without_client_address,
        )?;
        gauge(
            &mut encoder,
            "agent_config_generation",
            "Configuration snapshots accepted since start-up",
            health.config_generation,
        )?;
        gauge(
            &mut encoder,
            "agent_config_restart_pending",
            "Fields of the agent: section changed since start-up; a restart applies them",
            health.config_restart_pending,
        )?;
        gauge(
            &mut encoder,
            "agent_policy_generation",
            "Generation of the access-policy set in force",
            health.policy_generation,
        )?;
        {
            let counter = ConstCounter::new(health.config_rejected);
            let mut metric = encoder.encode_descriptor(
                "config_rejected",
                "Configuration changes rejected (the last good one stays in force)",
                None,
                counter.metric_type(),
            )?;
            let source = match health.config_source {
                "" => "file",
                source => source,
            };
            counter.encode(metric.encode_family(&[("source", source)])?)?;
        }
        let expiring: Vec<_> = health
            .certificates
            .iter()
            .filter_map(|(identity, expiry)| Some((identity, (*expiry)?)))
            .collect();
        if !expiring.is_empty() {
            let mut metric = encoder.encode_descriptor(
                "agent_certificate_expiry_timestamp_seconds",
                "Expiry (notAfter) of the workload certificate of each identity, Unix time",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (identity, expiry) in expiring {
                ConstGauge::new(expiry)
                    .encode(metric.encode_family(&[("identity", identity.as_str())])?)?;
            }
        }
        if let Some(ebpf) = health.ebpf.filter(|c| !c.is_empty()) {
            let mut metric = encoder.encode_descriptor(
                "agent_ebpf_events",
                "eBPF program verdicts and error arms, summed over CPUs",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (event, count) in ebpf {
                ConstCounter::new(count).encode(metric.encode_family(&[("event", event)])?)?;
            }
        }
        Ok(())
    }
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), fmt::Error> {
    // Gauges are i64 in the encoder; the values here are counts far below i64::MAX.
    let gauge = ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX));
    gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)
}

/// `Content-Type` of `Registry::encode`'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The default prefix; `istio` makes Istio's dashboards work unchanged.
pub const DEFAULT_PREFIX: &str = "weft";

/// Connection duration buckets, seconds: short RPCs to hour-long streams.
const DURATION_BUCKETS: [f64; 14] = [
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

#[cfg(test)]
mod tests;
