//! OTLP span export: the waypoint's finished spans go to an OpenTelemetry collector over
//! plaintext OTLP/HTTP in the JSON encoding
//! (<https://opentelemetry.io/docs/specs/otlp/#json-protobuf-encoding>).
//!
//! Input: `Span`s through `SpanExporter::export`, which only pushes onto a bounded queue
//! (never blocks: a slow or absent collector costs spans, not request latency). A background
//! task batches them (up to `Config::batch_size`, or whatever is queued every
//! `Config::batch_interval`) and POSTs one `ExportTraceServiceRequest` per batch to
//! `<endpoint>/v1/traces`, over one kept-alive HTTP/1.1 connection.
//!
//! Output, besides the collector's copy: `Metrics`
//! - `<prefix>_otlp_spans_exported_total`: spans the collector accepted (2xx);
//! - `<prefix>_otlp_spans_dropped_total{reason}`: `queue_full`, `export_failed` (the batch
//!   of a failed POST), `rejected` (the collector's answer said so: OTLP partial success),
//!   `not_sampled` (the trace context said not to record it), `shutdown` (exported after
//!   the worker ended);
//! - `<prefix>_otlp_export_errors_total{reason}`: failed POSTs, by `Error::reason`.
//!
//! Failures are logged at warn at most once a minute (with the count since the last line).
//! A failed batch is not retried: the next one may succeed, and a waypoint that keeps
//! retrying a dead collector only grows its memory.

use std::{
    fmt,
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use http::{Method, Request, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{counter::Counter, family::Family},
};
use serde::Serialize;
use tokio::{
    net::TcpStream,
    sync::{mpsc, oneshot},
    task::JoinHandle,
};
use tracing::{debug, warn};

use super::{
    Registry,
    trace::{Span, SpanExporter},
};

/// What an exporter needs to know. `Config::new` fills in the defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The collector's base URI, `http://host:port` (an optional path prefix is kept;
    /// `/v1/traces` is appended).
    pub endpoint: String,
    /// Resource attribute `service.name` (the waypoint's name, or `weft-waypoint`).
    pub service_name: String,
    /// Resource attribute `k8s.namespace.name`, when known.
    pub namespace: Option<String>,
    /// More resource attributes (`k8s.pod.name`, `service.version`, …).
    pub resource_attributes: Vec<(String, String)>,
    /// Spans waiting for the worker; beyond this they are dropped (`queue_full`).
    pub queue_capacity: usize,
    /// Spans per POST at most.
    pub batch_size: usize,
    /// A partial batch is sent after this long.
    pub batch_interval: Duration,
    /// One POST (connect, request, response) gives up after this long.
    pub timeout: Duration,
}

/// Exports spans to one OTLP/HTTP collector. Construct inside a tokio runtime (it spawns its
/// worker). Dropping it closes the queue: the worker sends what is queued and ends; call
/// `flush().await` first to be sure the last batch went out before the runtime stops.
pub struct OtlpExporter {
    queue: mpsc::Sender<Command>,
    metrics: Metrics,
    worker: JoinHandle<()>,
}

/// Why an export (one POST) failed, or why a config was refused.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "invalid OTLP endpoint {endpoint:?}: {reason} (expected http://host:port of an \
         OTLP/HTTP collector, usually port 4318)"
    )]
    InvalidEndpoint {
        endpoint: String,
        reason: &'static str,
    },
    #[error("cannot connect to the OTLP collector at {authority}: {source} (is it running?)")]
    Connect {
        authority: String,
        #[source]
        source: std::io::Error,
    },
    #[error("OTLP collector at {authority} failed the HTTP exchange: {source}")]
    Http {
        authority: String,
        #[source]
        source: hyper::Error,
    },
    #[error("OTLP collector at {authority} answered {status} to a trace export")]
    Status {
        authority: String,
        status: http::StatusCode,
    },
    #[error("OTLP collector at {authority} did not answer within {timeout:?}")]
    Timeout {
        authority: String,
        timeout: Duration,
    },
    #[error("BUG: cannot build the OTLP request: {0}")]
    BugRequest(#[source] http::Error),
    #[error("BUG: the OTLP exporter was built outside a tokio runtime")]
    BugNoRuntime,
}

/// The exporter's counters (see the module docs for the names). Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    exported: Counter,
    dropped: Family<ReasonLabels, Counter>,
    errors: Family<ReasonLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

enum Command {
    Export(Box<Span>),
    Flush(oneshot::Sender<()>),
}

impl Config {
    pub fn new(endpoint: impl Into<String>, service_name: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into(),
            service_name: service_name.into(),
            namespace: None,
            resource_attributes: Vec::new(),
            queue_capacity: QUEUE_CAPACITY,
            batch_size: BATCH_SIZE,
            batch_interval: BATCH_INTERVAL,
            timeout: EXPORT_TIMEOUT,
        }
    }
}

impl OtlpExporter {
    /// Checks the endpoint and starts the worker. Must run inside a tokio runtime.
    pub fn new(config: Config, metrics: Metrics) -> Result<Self, Error> {
        let target = Target::parse(&config.endpoint)?;
        let (queue, rx) = mpsc::channel(config.queue_capacity.max(1));
        let worker = Worker {
            resource: resource(&config),
            target,
            batch_size: config.batch_size.max(1),
            batch_interval: config.batch_interval,
            timeout: config.timeout,
            metrics: metrics.clone(),
            sender: None,
            complaints: Complaints::default(),
        };
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| Error::BugNoRuntime)?;
        let worker = runtime.spawn(worker.run(rx));
        Ok(Self {
            queue,
            metrics,
            worker,
        })
    }

    /// Sends everything exported before this call and waits until the collector answered
    /// (or the POST failed). Returns at once if the worker has ended.
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.queue.send(Command::Flush(done)).await.is_ok() {
            // An Err: the worker ended (runtime shutting down); nothing left to wait for.
            let _ = wait.await;
        }
    }

    /// Closes the queue, lets the worker send what is queued, and waits for it (at most
    /// `timeout`).
    pub async fn shutdown(self, timeout: Duration) {
        let Self { queue, worker, .. } = self;
        drop(queue);
        if tokio::time::timeout(timeout, worker).await.is_err() {
            warn!(
                component = "otlp",
                "OTLP exporter did not finish its last batch in time"
            );
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}

impl SpanExporter for OtlpExporter {
    fn export(&self, span: Span) {
        // Respect the client's sampling decision: an unsampled trace is not recorded.
        if !span.context.sampled {
            self.metrics.dropped("not_sampled");
            return;
        }
        match self.queue.try_send(Command::Export(Box::new(span))) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => self.metrics.dropped("queue_full"),
            Err(mpsc::error::TrySendError::Closed(_)) => self.metrics.dropped("shutdown"),
        }
    }
}

impl fmt::Debug for OtlpExporter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OtlpExporter")
            .field("metrics", &self.metrics)
            .finish_non_exhaustive()
    }
}

impl Error {
    /// Stable label of the `otlp_export_errors_total` counter.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::InvalidEndpoint { .. } => "invalid_endpoint",
            Error::Connect { .. } => "connect",
            Error::Http { .. } => "http",
            Error::Status { .. } => "status",
            Error::Timeout { .. } => "timeout",
            Error::BugRequest(_) | Error::BugNoRuntime => "bug",
        }
    }
}

impl Metrics {
    /// Counters registered in `registry` (named with its prefix).
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register_collector(metrics.clone());
        metrics
    }

    pub fn exported(&self) -> u64 {
        self.exported.get()
    }

    pub fn dropped_for(&self, reason: &'static str) -> u64 {
        self.dropped.get_or_create(&ReasonLabels { reason }).get()
    }

    /// Failed POSTs for this `Error::reason`.
    pub fn errors_for(&self, reason: &'static str) -> u64 {
        self.errors.get_or_create(&ReasonLabels { reason }).get()
    }

    fn dropped(&self, reason: &'static str) {
        self.dropped_by(reason, 1);
    }

    fn dropped_by(&self, reason: &'static str, n: u64) {
        self.dropped
            .get_or_create(&ReasonLabels { reason })
            .inc_by(n);
    }

    fn error(&self, reason: &'static str) {
        self.errors.get_or_create(&ReasonLabels { reason }).inc();
    }
}

// A collector rather than `register`: `telemetry::Registry` applies the prefix and exposes
// collectors only.
impl Collector for Metrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let families: [(&str, &str, &dyn EncodeMetric); 3] = [
            (
                "otlp_spans_exported",
                "Spans the OTLP collector accepted",
                &self.exported,
            ),
            (
                "otlp_spans_dropped",
                "Spans not exported, by reason",
                &self.dropped,
            ),
            (
                "otlp_export_errors",
                "Failed exports (POSTs) to the OTLP collector, by reason",
                &self.errors,
            ),
        ];
        for (name, help, metric) in families {
            metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)?;
        }
        Ok(())
    }
}

/// Where the POSTs go.
#[derive(Clone, Debug)]
struct Target {
    /// `host:port`, for the TCP connection and the `Host` header.
    authority: String,
    /// `<base path>/v1/traces`.
    uri: Uri,
}

impl Target {
    fn parse(endpoint: &str) -> Result<Self, Error> {
        let invalid = |reason| Error::InvalidEndpoint {
            endpoint: endpoint.to_owned(),
            reason,
        };
        let uri: Uri = endpoint.parse().map_err(|_| invalid("not a URI"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => return Err(invalid("TLS is not supported; use plaintext http")),
            _ => return Err(invalid("the scheme must be http")),
        }
        let authority = uri.authority().ok_or_else(|| invalid("no host"))?;
        if authority.host().is_empty() {
            return Err(invalid("no host"));
        }
        if uri.query().is_some() {
            return Err(invalid("a query is not allowed"));
        }
        // OTLP/HTTP's default port when none is given.
        let port = authority.port_u16().unwrap_or(DEFAULT_PORT);
        let authority = format!("{}:{port}", authority.host());
        let base = uri.path().trim_end_matches('/');
        let uri = format!("http://{authority}{base}{TRACES_PATH}")
            .parse()
            .map_err(|_| invalid("not a URI"))?;
        Ok(Self { authority, uri })
    }
}

struct Worker {
    resource: Resource,
    target: Target,
    batch_size: usize,
    batch_interval: Duration,
    timeout: Duration,
    metrics: Metrics,
    /// The kept-alive connection, if one is open.
    sender: Option<SendRequest<Full<Bytes>>>,
    complaints: Complaints,
}

impl Worker {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut batch = Vec::with_capacity(self.batch_size);
        let mut tick = tokio::time::interval(self.batch_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                command = rx.recv() => match command {
                    Some(Command::Export(span)) => {
                        batch.push(*span);
                        if batch.len() >= self.batch_size {
                            self.send(&mut batch).await;
                            tick.reset();
                        }
                    }
                    Some(Command::Flush(done)) => {
                        self.send(&mut batch).await;
                        // The flusher may have given up waiting; nothing to tell then.
                        let _ = done.send(());
                    }
                    None => {
                        self.send(&mut batch).await;
                        debug!(component = "otlp", "span queue closed; exporter stopped");
                        return;
                    }
                },
                _ = tick.tick() => self.send(&mut batch).await,
            }
        }
    }

    /// POSTs `batch` (if not empty) and empties it, counting the outcome.
    async fn send(&mut self, batch: &mut Vec<Span>) {
        if batch.is_empty() {
            return;
        }
        let count = batch.len() as u64;
        let body = request_body(&self.resource, batch);
        batch.clear();
        let outcome = match tokio::time::timeout(self.timeout, self.post(body)).await {
            Ok(outcome) => outcome,
            Err(_) => {
                // The connection may be mid-exchange: never reuse it.
                self.sender = None;
                Err(Error::Timeout {
                    authority: self.target.authority.clone(),
                    timeout: self.timeout,
                })
            }
        };
        match outcome {
            Ok(Rejected { spans: 0, .. }) => {
                self.metrics.exported.inc_by(count);
            }
            Ok(Rejected { spans, message }) => {
                let spans = spans.min(count);
                self.metrics.exported.inc_by(count - spans);
                self.metrics.dropped_by("rejected", spans);
                let detail = format!("the collector rejected {spans} of {count} spans: {message}");
                self.complaints.complain("rejected", &detail, spans);
            }
            Err(e) => {
                self.metrics.error(e.reason());
                self.metrics.dropped_by("export_failed", count);
                self.complaints.complain(e.reason(), &e, count);
            }
        }
    }

    /// One POST; a 2xx may still reject some spans (OTLP "partial success").
    async fn post(&mut self, body: Vec<u8>) -> Result<Rejected, Error> {
        let authority = &self.target.authority;
        // A kept-alive connection the collector has not closed, else a new one.
        let kept = match self.sender.take() {
            Some(mut sender) => sender.ready().await.is_ok().then_some(sender),
            None => None,
        };
        let reused = kept.is_some();
        let mut sender = match kept {
            Some(sender) => sender,
            None => connect(authority).await?,
        };
        let request = Request::builder()
            .method(Method::POST)
            .uri(self.target.uri.path())
            .header(header::HOST, authority.as_str())
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::USER_AGENT, USER_AGENT)
            .body(Full::new(Bytes::from(body)))
            .map_err(Error::BugRequest)?;
        let http = |source| Error::Http {
            authority: authority.clone(),
            source,
        };
        let response = match sender.try_send_request(request).await {
            Ok(response) => response,
            Err(mut e) => match e.take_message() {
                // The collector closed the idle connection before the request went out
                // (hyper hands it back unsent): once more on a new connection.
                Some(request) if reused => {
                    sender = connect(authority).await?;
                    sender.send_request(request).await.map_err(http)?
                }
                _ => return Err(http(e.into_error())),
            },
        };
        let status = response.status();
        // Read the answer to the end so the connection can carry the next batch.
        let answer = response.into_body().collect().await.map_err(http)?;
        if !status.is_success() {
            let text = String::from_utf8_lossy(&answer.to_bytes()).into_owned();
            debug!(component = "otlp", %status, answer = %text, "OTLP export refused");
            return Err(Error::Status {
                authority: authority.clone(),
                status,
            });
        }
        self.sender = Some(sender);
        Ok(Rejected::of(&answer.to_bytes()))
    }
}

/// What a 2xx answer says was not accepted (`ExportTraceServiceResponse.partialSuccess`).
#[derive(Debug, Default, PartialEq, Eq)]
struct Rejected {
    spans: u64,
    message: String,
}

impl Rejected {
    /// An empty or unreadable answer means all were accepted (the spec: a response without
    /// `partialSuccess` is a full success).
    fn of(answer: &[u8]) -> Self {
        let Ok(answer) = serde_json::from_slice::<serde_json::Value>(answer) else {
            return Self::default();
        };
        let partial = &answer["partialSuccess"];
        // int64 is a decimal string in OTLP/JSON; accept a bare number too.
        let spans = match &partial["rejectedSpans"] {
            serde_json::Value::String(text) => text.parse().unwrap_or(0),
            value => value.as_u64().unwrap_or(0),
        };
        let message = partial["errorMessage"].as_str().unwrap_or("").to_owned();
        Self { spans, message }
    }
}

async fn connect(authority: &str) -> Result<SendRequest<Full<Bytes>>, Error> {
    let connect_error = |source| Error::Connect {
        authority: authority.to_owned(),
        source,
    };
    let stream = TcpStream::connect(authority).await.map_err(connect_error)?;
    // Spans are small and batched: no point in Nagle's delay on top of the batch timer.
    let _ = stream.set_nodelay(true);
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|source| Error::Http {
            authority: authority.to_owned(),
            source,
        })?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            debug!(component = "otlp", error = %e, "OTLP connection ended with an error");
        }
    });
    Ok(sender)
}

/// Warns at most once per `COMPLAINT_INTERVAL`, with what was suppressed in between.
#[derive(Default)]
struct Complaints {
    last: Option<Instant>,
    suppressed: u64,
}

impl Complaints {
    fn complain(&mut self, reason: &'static str, error: &dyn fmt::Display, spans: u64) {
        let due = self
            .last
            .is_none_or(|at| at.elapsed() >= COMPLAINT_INTERVAL);
        if !due {
            self.suppressed += 1;
            return;
        }
        warn!(
            component = "otlp",
            error = %error,
            reason,
            spans_dropped = spans,
            failures_since_last_warning = self.suppressed,
            "OTLP span export failed; spans are dropped until the collector answers"
        );
        self.last = Some(Instant::now());
        self.suppressed = 0;
    }
}

// The OTLP/JSON shape of `ExportTraceServiceRequest`
// (opentelemetry-proto, collector/trace/v1/trace_service.proto): field names in lowerCamelCase,
// ids as hex strings, 64-bit integers as decimal strings, enums as numbers.

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ExportTraceServiceRequest<'a> {
    resource_spans: [ResourceSpans<'a>; 1],
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ResourceSpans<'a> {
    resource: &'a Resource,
    scope_spans: [ScopeSpans; 1],
}

#[derive(Clone, Debug, Serialize)]
struct Resource {
    attributes: Vec<KeyValue>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ScopeSpans {
    scope: Scope,
    spans: Vec<OtlpSpan>,
}

#[derive(Serialize)]
struct Scope {
    name: &'static str,
    version: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct OtlpSpan {
    trace_id: String,
    span_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    trace_state: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parent_span_id: Option<String>,
    /// W3C trace flags in the low byte (sampled = 1).
    flags: u32,
    name: String,
    kind: u32,
    start_time_unix_nano: String,
    end_time_unix_nano: String,
    attributes: Vec<KeyValue>,
    status: Status,
}

#[derive(Clone, Debug, Serialize)]
struct KeyValue {
    key: String,
    value: AnyValue,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct AnyValue {
    string_value: String,
}

#[derive(Serialize)]
struct Status {
    /// 0 unset, 2 error.
    code: u32,
}

fn resource(config: &Config) -> Resource {
    let mut attributes = vec![key_value("service.name", &config.service_name)];
    if let Some(namespace) = &config.namespace {
        attributes.push(key_value("k8s.namespace.name", namespace));
    }
    for (key, value) in &config.resource_attributes {
        attributes.push(key_value(key, value));
    }
    Resource { attributes }
}

fn request_body(resource: &Resource, spans: &[Span]) -> Vec<u8> {
    let request = ExportTraceServiceRequest {
        resource_spans: [ResourceSpans {
            resource,
            scope_spans: [ScopeSpans {
                scope: Scope {
                    name: SCOPE_NAME,
                    version: env!("CARGO_PKG_VERSION"),
                },
                spans: spans.iter().map(otlp_span).collect(),
            }],
        }],
    };
    serde_json::to_vec(&request).expect("plain structs of strings and numbers serialize")
}

fn otlp_span(span: &Span) -> OtlpSpan {
    let context = &span.context;
    OtlpSpan {
        trace_id: context.trace_id.to_string(),
        span_id: context.span_id.to_string(),
        trace_state: context
            .tracestate
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        parent_span_id: context.parent.map(|p| p.to_string()),
        flags: u32::from(context.sampled),
        name: span.name.clone(),
        kind: SPAN_KIND_SERVER,
        start_time_unix_nano: unix_nanos(span.start),
        end_time_unix_nano: unix_nanos(span.end),
        attributes: span
            .attributes
            .iter()
            .map(|(key, value)| key_value(key, value))
            .collect(),
        status: Status {
            code: if span.error {
                STATUS_CODE_ERROR
            } else {
                STATUS_CODE_UNSET
            },
        },
    }
}

fn key_value(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: AnyValue {
            string_value: value.to_owned(),
        },
    }
}

fn unix_nanos(at: SystemTime) -> String {
    // A clock before 1970 is a broken clock: 0 rather than a refused span.
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
        .to_string()
}

pub const QUEUE_CAPACITY: usize = 4096;
pub const BATCH_SIZE: usize = 512;
pub const BATCH_INTERVAL: Duration = Duration::from_secs(1);
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// OTLP/HTTP's port when the endpoint names none.
pub const DEFAULT_PORT: u16 = 4318;
pub const TRACES_PATH: &str = "/v1/traces";

const COMPLAINT_INTERVAL: Duration = Duration::from_secs(60);
const SCOPE_NAME: &str = "weft";
const USER_AGENT: &str = concat!("weft/", env!("CARGO_PKG_VERSION"));
/// opentelemetry-proto trace.proto: `SPAN_KIND_SERVER = 2`.
const SPAN_KIND_SERVER: u32 = 2;
/// opentelemetry-proto trace.proto: `STATUS_CODE_UNSET = 0`, `STATUS_CODE_ERROR = 2`.
const STATUS_CODE_UNSET: u32 = 0;
const STATUS_CODE_ERROR: u32 = 2;

#[cfg(test)]
mod tests;
