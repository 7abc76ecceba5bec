//! What the waypoint records about one request: an `Exchange` collects it while the
//! request is routed and forwarded, and is finished (metrics, access-log line, span) when
//! the response body ends, or is dropped (the client went away).

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Instant, SystemTime},
};

use bytes::Bytes;
use http::HeaderMap;
use hyper::body::{Body, Frame, SizeHint};

use http::{Request, Version, header};
use hyper::body::Incoming;

use super::{
    Inner, Target, Tunnel, View,
    access_log::RequestRecord,
    metrics::{HttpLabels, Observation},
    upstream::{BoxBody, BoxError},
    wire::{authority, is_grpc},
};
use crate::{
    drain,
    state::WorkloadRef,
    telemetry::trace::{Span, TraceContext},
};

/// One request in progress.
pub struct Exchange {
    pub inner: Arc<Inner>,
    pub start: Instant,
    pub start_time: SystemTime,
    pub record: RequestRecord,
    pub labels: HttpLabels,
    pub trace: TraceContext,
    pub request_bytes: Arc<AtomicU64>,
    pub grpc: bool,
    /// Holds the request open for a drain, until the exchange is finished or dropped.
    _guard: drain::Guard,
}

impl Exchange {
    /// The exchange's record as far as the request itself tells.
    pub fn start(tunnel: &Tunnel, view: &View, request: &Request<Incoming>) -> Self {
        let inner = &tunnel.inner;
        let trace = TraceContext::from_request(request.headers());
        let grpc = is_grpc(request.headers());
        let peer = &tunnel.peer_identity;
        let source_workload = view
            .snapshot
            .workload_by_ip(tunnel.source.ip())
            .filter(|w| w.identity(&inner.trust_domain).is_ok_and(|id| &id == peer))
            .map_or_else(|| UNKNOWN.to_owned(), |w| w.name.name.clone());
        let (service, dst_workload) = match &tunnel.target {
            Target::Service { service, .. } => (Some(service), None),
            Target::Pod { addr, service } => (
                Some(service),
                view.snapshot
                    .workload_by_ip(addr.ip())
                    .map(|w| w.name.clone()),
            ),
            // Known once the route picked a backend (`destination_service`).
            Target::Listener { .. } => (None, None),
        };
        // A gateway's client comes from outside the mesh: no identity, no mTLS.
        let outside = matches!(tunnel.target, Target::Listener { .. });
        let reporter = if outside { "gateway" } else { REPORTER };
        let src_identity = if outside {
            "-".to_owned()
        } else {
            peer.to_string()
        };
        let record = RequestRecord {
            kind: "access",
            reporter,
            start_time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            method: request.method().to_string(),
            path: request.uri().path().to_owned(),
            authority: authority(request).unwrap_or_default(),
            protocol: match request.version() {
                Version::HTTP_2 => "HTTP/2",
                Version::HTTP_10 => "HTTP/1.0",
                _ => "HTTP/1.1",
            },
            response_flags: "-",
            src_identity,
            src_addr: tunnel.source.to_string(),
            dst_workload: dst_workload.as_ref().map(ToString::to_string),
            trace_id: trace.trace_id.to_string(),
            traceparent: format!(
                "00-{}-{}-{}",
                trace.trace_id,
                trace.span_id,
                if trace.sampled { "01" } else { "00" }
            ),
            user_agent: request
                .headers()
                .get(header::USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            ..RequestRecord::default()
        };
        let labels = HttpLabels {
            reporter,
            source_workload,
            source_workload_namespace: if outside {
                UNKNOWN.to_owned()
            } else {
                peer.namespace().to_owned()
            },
            source_principal: if outside {
                UNKNOWN.to_owned()
            } else {
                peer.to_string()
            },
            destination_workload: dst_workload
                .as_ref()
                .map_or_else(|| UNKNOWN.to_owned(), |w| w.name.clone()),
            destination_workload_namespace: dst_workload
                .as_ref()
                .map_or_else(|| UNKNOWN.to_owned(), |w| w.namespace.clone()),
            destination_principal: UNKNOWN.to_owned(),
            destination_service: UNKNOWN.to_owned(),
            destination_service_name: UNKNOWN.to_owned(),
            destination_service_namespace: UNKNOWN.to_owned(),
            request_protocol: if grpc { "grpc" } else { "http" },
            response_code: 0,
            grpc_response_status: "-".to_owned(),
            response_flags: "-",
            connection_security_policy: if outside { "none" } else { "mutual_tls" },
            route_name: String::new(),
        };
        let mut exchange = Exchange {
            inner: Arc::clone(inner),
            start: Instant::now(),
            start_time: SystemTime::now(),
            record,
            labels,
            trace,
            request_bytes: Arc::new(AtomicU64::new(0)),
            grpc,
            _guard: inner.drain.guard(),
        };
        if let Some(service) = service {
            exchange.destination_service(service);
        }
        exchange
    }

    /// Names the Service the request goes to: the one addressed, or (a gateway's request)
    /// the backend its route picked.
    pub fn destination_service(&mut self, service: &WorkloadRef) {
        self.record.dst_service = Some(service.to_string());
        self.labels.destination_service = format!(
            "{}.{}.svc.{CLUSTER_DOMAIN}",
            service.name, service.namespace
        );
        self.labels
            .destination_service_name
            .clone_from(&service.name);
        self.labels
            .destination_service_namespace
            .clone_from(&service.namespace);
    }

    /// Records the finished request: metrics, the access-log line, the span.
    fn finish(mut self, grpc_status: Option<String>, response_bytes: u64) {
        let duration = self.start.elapsed();
        let request_bytes = self.request_bytes.load(Ordering::Relaxed);
        self.labels.grpc_response_status = match (&grpc_status, self.grpc) {
            (Some(status), true) => status.clone(),
            _ => "-".to_owned(),
        };
        self.inner.metrics.request(
            &self.labels,
            Observation {
                duration_ms: duration.as_secs_f64() * 1000.0,
                request_bytes,
                response_bytes,
            },
        );
        self.inner
            .metrics
            .retried(&self.labels, self.record.retries);
        let record = &mut self.record;
        record.grpc_status = grpc_status.filter(|_| self.grpc);
        record.bytes_received = request_bytes;
        record.bytes_sent = response_bytes;
        record.duration_ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
        record.response_flags = self.labels.response_flags;
        // `mesh.accessLog`, for the waypoint's own namespace (it is the reporter).
        let namespace = &self.inner.config.name.namespace;
        if self
            .inner
            .view()
            .snapshot
            .mesh
            .access_log
            .enabled_for(namespace)
        {
            self.inner.access_log.write_json(&self.record);
        }
        if let Some(exporter) = &self.inner.exporter {
            let record = &self.record;
            let mut attributes = vec![
                ("http.request.method", record.method.clone()),
                ("url.path", record.path.clone()),
                (
                    "http.response.status_code",
                    record.response_code.to_string(),
                ),
                ("server.address", record.authority.clone()),
                ("network.protocol.name", "http".to_owned()),
            ];
            if let Some(upstream) = &record.upstream_host {
                attributes.push(("upstream.address", upstream.clone()));
            }
            if let Some(route) = &record.route {
                attributes.push(("weft.route", route.clone()));
            }
            if let Some(status) = &record.grpc_status {
                attributes.push(("rpc.grpc.status_code", status.clone()));
            }
            exporter.export(Span {
                context: self.trace.clone(),
                name: format!("{} {}", record.method, record.path),
                start: self.start_time,
                end: self.start_time + duration,
                attributes,
                error: record.response_code >= 500 || record.error.is_some(),
            });
        }
    }
}

/// The response body the client reads: counts bytes, reads `grpc-status` from the
/// trailers, and finishes the exchange at its end (or when dropped early).
pub struct Observed {
    body: BoxBody,
    exchange: Option<Exchange>,
    sent: u64,
    grpc_status: Option<String>,
}

impl Observed {
    /// `headers` are the response's: a trailers-only gRPC response has its status there.
    pub fn new(body: BoxBody, exchange: Exchange, headers: &HeaderMap) -> Self {
        Self {
            body,
            exchange: Some(exchange),
            sent: 0,
            grpc_status: grpc_status(headers),
        }
    }

    fn done(&mut self, error: Option<&'static str>) {
        if let Some(mut exchange) = self.exchange.take() {
            if exchange.record.error.is_none() {
                exchange.record.error = error;
                if error.is_some() && exchange.labels.response_flags == "-" {
                    exchange.labels.response_flags = "DC";
                }
            }
            exchange.finish(self.grpc_status.take(), self.sent);
        }
    }
}

impl Body for Observed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.sent += data.len() as u64;
                }
                if let Some(trailers) = frame.trailers_ref()
                    && let Some(status) = grpc_status(trailers)
                {
                    self.grpc_status = Some(status);
                }
            }
            Poll::Ready(Some(Err(_))) => self.done(Some("upstream_body")),
            Poll::Ready(None) => self.done(None),
            Poll::Pending => {}
        }
        if !matches!(polled, Poll::Pending) && self.body.is_end_stream() {
            self.done(None);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        let ended = self.body.is_end_stream();
        self.done((!ended).then_some("downstream_reset"));
    }
}

/// A body that counts its data bytes into a shared counter.
pub struct Counted<B> {
    pub body: B,
    pub count: Arc<AtomicU64>,
}

impl<B> Body for Counted<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.count.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

const REPORTER: &str = "waypoint";
const UNKNOWN: &str = "unknown";
const CLUSTER_DOMAIN: &str = "cluster.local";

fn grpc_status(headers: &HeaderMap) -> Option<String> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}
