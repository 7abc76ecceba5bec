//! The waypoint over real loopback sockets and real TLS: a client opens HBONE CONNECTs to
//! the waypoint and speaks HTTP/1.1 or HTTP/2 through them; backends are HBONE servers on
//! their own 127.77.x.y addresses that terminate into hyper HTTP servers, report their
//! name in `x-backend`, and can fail every other request or be slow.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::{
    body::{Body, Frame, Incoming},
    client::conn::{http1, http2},
    service::service_fn,
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
    task::JoinSet,
    time::{Instant, timeout},
};

use super::{Config, DRAIN_METRICS, Metrics, Shutdown, Waypoint, upstream::BoxBody};
use crate::{
    drain::Drain,
    hbone::{self, Pool, PoolConfig},
    identity::SpiffeId,
    state::{
        AccessPolicy, Action, L7Match, Location, Rule, Service, ServicePort, Snapshot, Workload,
        WorkloadRef, WorkloadSelector,
        route::{
            Backend, Filter, HeaderMatch, HeaderModifier, HttpRoute, Mirror, ParentRef, PathMatch,
            PathRewrite, Pattern, QueryParamMatch, Redirect, RequestMatch, Retry, RouteKind,
            RouteRule, ServiceRef, Timeouts, UrlRewrite, ValueMatch,
        },
    },
    sync::Mutex,
    telemetry::{
        AccessLog, Prefix, Registry,
        access_log::Captured,
        trace::{Span, SpanExporter},
    },
    test_util::{TestCa, TestCerts},
};

// ---------------------------------------------------------------------------------------
// Harness

/// The bound service every test talks to.
const VIP: &str = "10.96.0.10";
const SERVICE: &str = "echo";
const PORT: u16 = 80;
const TARGET_PORT: u16 = 8080;

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "default", sa).unwrap()
}

fn svc(name: &str) -> WorkloadRef {
    WorkloadRef::new("default", name)
}

fn service_ref(name: &str) -> ServiceRef {
    ServiceRef {
        name: svc(name),
        port: PORT,
    }
}

/// One backend pod: what it saw and how it behaves.
struct BackendState {
    name: String,
    ip: IpAddr,
    count: AtomicU64,
    fail_every_other: AtomicBool,
    /// CONNECTs that reached its node proxy (HBONE server), refused or not.
    connects: AtomicU64,
    /// Its node proxy refuses every CONNECT so (`Denied`: 401, by policy).
    refuse_connects: Mutex<Option<hbone::Refusal>>,
    seen: Mutex<Vec<Seen>>,
    peers: Mutex<Vec<SpiffeId>>,
    /// The HBONE connections it serves, to break them (a restart, as clients see it).
    connections: Mutex<Vec<tokio::task::AbortHandle>>,
}

impl BackendState {
    /// Breaks every HBONE connection it serves, and returns once their tasks have ended
    /// (their sockets are closed).
    async fn drop_connections(&self) {
        let tasks: Vec<_> = self.connections.lock().drain(..).collect();
        for task in &tasks {
            task.abort();
        }
        until("the backend's connections closed", || {
            tasks.iter().all(tokio::task::AbortHandle::is_finished)
        })
        .await;
    }
}

/// Polls `ready` until it holds; panics naming `what` after `patience()`.
async fn until(what: &str, mut ready: impl FnMut() -> bool) {
    let patience = patience();
    let deadline = Instant::now() + patience;
    while !ready() {
        assert!(Instant::now() < deadline, "not after {patience:?}: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[derive(Clone, Debug)]
struct Seen {
    method: String,
    path_and_query: String,
    headers: HeaderMap,
}

struct Harness {
    waypoint_addr: SocketAddr,
    state: watch::Sender<Arc<Snapshot>>,
    backends: BTreeMap<String, Arc<BackendState>>,
    client_pool: Pool,
    /// The waypoint's own HBONE client pool (towards the backends).
    waypoint_pool: Pool,
    waypoint: Waypoint,
    waypoint_id: SpiffeId,
    /// The waypoint's HBONE server config, for a second listener.
    waypoint_tls: Arc<rustls::ServerConfig>,
    registry: Registry,
    log: Captured,
    spans: Arc<Mutex<Vec<Span>>>,
}

struct Spans(Arc<Mutex<Vec<Span>>>);

impl SpanExporter for Spans {
    fn export(&self, span: Span) {
        self.0.lock().push(span);
    }
}

impl Harness {
    /// Backends named `names`, each with its own Service `<name>` (port 80 → 8080); the
    /// bound service `echo` (VIP 10.96.0.10:80) has the first backend as its endpoint.
    async fn new(names: &[&str]) -> Self {
        Self::with(names, |_| {}).await
    }

    /// `new`, with the waypoint's config changed by `configure`.
    async fn with(names: &[&str], configure: impl FnOnce(&mut Config)) -> Self {
        static NEXT_NET: AtomicU8 = AtomicU8::new(1);
        let net = NEXT_NET.fetch_add(1, Ordering::Relaxed);
        let ca = TestCa::new("weft waypoint test CA");
        let waypoint_id = id("waypoint");

        // Backends: all on one port, each on its own loopback address.
        let mut backends = BTreeMap::new();
        let mut hbone_port = 0;
        let mut snapshot = Snapshot::default();
        for (i, name) in names.iter().enumerate() {
            let ip = IpAddr::V4(Ipv4Addr::new(127, 77, net, u8::try_from(i + 1).unwrap()));
            let listener = TcpListener::bind(SocketAddr::new(ip, hbone_port))
                .await
                .unwrap();
            hbone_port = listener.local_addr().unwrap().port();
            let backend_id = id(name);
            let certs = TestCerts::new(ca.bundle());
            certs.insert(ca.issue(&backend_id));
            let tls = hbone::server_config(certs, backend_id).unwrap();
            let state = Arc::new(BackendState {
                name: (*name).to_owned(),
                ip,
                count: AtomicU64::new(0),
                fail_every_other: AtomicBool::new(false),
                connects: AtomicU64::new(0),
                refuse_connects: Mutex::new(None),
                seen: Mutex::new(Vec::new()),
                peers: Mutex::new(Vec::new()),
                connections: Mutex::new(Vec::new()),
            });
            let handler = Arc::new(BackendHandler(Arc::clone(&state)));
            let accepting = Arc::clone(&state);
            tokio::spawn(async move {
                while let Ok((tcp, _)) = listener.accept().await {
                    let task =
                        tokio::spawn(hbone::serve(tcp, Arc::clone(&tls), Arc::clone(&handler)));
                    accepting.connections.lock().push(task.abort_handle());
                }
            });
            backends.insert((*name).to_owned(), state);
            snapshot.workloads.insert(
                svc(name),
                Workload {
                    name: svc(name),
                    service_account: (*name).to_owned(),
                    ips: vec![ip],
                    location: Location::Remote {
                        node: "node-b".into(),
                    },
                    enrolled: true,
                    mtls_mode: None,
                    labels: BTreeMap::from([("app".to_owned(), (*name).to_owned())]),
                },
            );
            snapshot.services.insert(
                svc(name),
                Service {
                    name: svc(name),
                    vips: Vec::new(),
                    ports: vec![ServicePort {
                        port: PORT,
                        target_port: TARGET_PORT,
                    }],
                    endpoints: vec![ip],
                    waypoint: None,
                    traffic_distribution: None,
                },
            );
        }
        let first_ip = backends[names[0]].ip;
        snapshot.services.insert(
            svc(SERVICE),
            Service {
                name: svc(SERVICE),
                vips: vec![VIP.parse().unwrap()],
                ports: vec![ServicePort {
                    port: PORT,
                    target_port: TARGET_PORT,
                }],
                endpoints: vec![first_ip],
                waypoint: Some("waypoint".into()),
                traffic_distribution: None,
            },
        );

        // The waypoint.
        let waypoint_certs = TestCerts::new(ca.bundle());
        waypoint_certs.insert(ca.issue(&waypoint_id));
        let (state, state_rx) = watch::channel(Arc::new(snapshot));
        let mut config = Config::new(svc("waypoint"), waypoint_id.clone());
        config.listen_addr = "127.0.0.1:0".parse().unwrap();
        config.upstream_port = hbone_port;
        configure(&mut config);
        let mut registry = Registry::new(&Prefix::new("weft").unwrap());
        let metrics = Metrics::new(&mut registry);
        let (access_log, log) = AccessLog::captured();
        let spans = Arc::new(Mutex::new(Vec::new()));
        let exporter: Arc<dyn SpanExporter> = Arc::new(Spans(Arc::clone(&spans)));
        let waypoint_pool = Pool::new(
            Arc::<TestCerts>::clone(&waypoint_certs),
            PoolConfig::default(),
        );
        let drain = Drain::default();
        registry.register_collector(drain.metrics_named(&DRAIN_METRICS));
        let waypoint = Waypoint::new(
            config,
            state_rx,
            waypoint_pool.clone(),
            metrics,
            access_log,
            Some(exporter),
            drain,
        )
        .unwrap();
        let tls = hbone::server_config(waypoint_certs, waypoint_id.clone()).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let waypoint_addr = listener.local_addr().unwrap();
        tokio::spawn(waypoint.clone().serve(listener, Arc::clone(&tls)));

        let client_certs = TestCerts::new(ca.bundle());
        client_certs.insert(ca.issue(&id("client")));
        Self {
            waypoint_addr,
            state,
            backends,
            client_pool: Pool::new(client_certs, PoolConfig::default()),
            waypoint_pool,
            waypoint,
            waypoint_id,
            waypoint_tls: tls,
            registry,
            log,
            spans,
        }
    }

    fn update(&self, change: impl FnOnce(&mut Snapshot)) {
        let mut snapshot = (**self.state.borrow()).clone();
        snapshot.index = Default::default();
        change(&mut snapshot);
        self.state.send_replace(Arc::new(snapshot));
    }

    fn set_routes(&self, routes: Vec<HttpRoute>) {
        self.update(|s| s.routes = routes);
    }

    fn backend(&self, name: &str) -> &BackendState {
        &self.backends[name]
    }

    async fn connect(&self, target: SocketAddr) -> Result<hbone::HboneStream, hbone::Error> {
        self.connect_at(self.waypoint_addr, target).await
    }

    /// `connect` through the HBONE listener at `address`.
    async fn connect_at(
        &self,
        address: SocketAddr,
        target: SocketAddr,
    ) -> Result<hbone::HboneStream, hbone::Error> {
        let key = hbone::Key {
            source: id("client"),
            destination: self.waypoint_id.clone(),
            address,
            local: Ipv4Addr::LOCALHOST.into(),
        };
        let request = hbone::ConnectRequest {
            target,
            source: "10.1.0.7:40000".parse().unwrap(),
            baggage: None,
            traceparent: None,
        };
        timeout(
            patience(),
            self.client_pool
                .connect(key, move || TcpStream::connect(address), request),
        )
        .await
        .expect("CONNECT in time")
    }

    fn vip() -> SocketAddr {
        SocketAddr::new(VIP.parse().unwrap(), PORT)
    }

    async fn h1(&self) -> Client {
        let stream = self.connect(Self::vip()).await.unwrap();
        let (sender, connection) = http1::handshake(TokioIo::new(stream)).await.unwrap();
        tokio::spawn(connection);
        Client::H1(Arc::new(tokio::sync::Mutex::new(sender)))
    }

    async fn h2(&self) -> Client {
        self.h2_to(Self::vip()).await
    }

    async fn h2_to(&self, target: SocketAddr) -> Client {
        let stream = self.connect(target).await.unwrap();
        let (sender, connection) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(connection);
        Client::H2(sender)
    }

    /// `<prefix>_requests_total` summed by response code.
    fn requests_by_code(&self) -> BTreeMap<u16, u64> {
        let text = self.registry.encode().unwrap();
        let mut counts = BTreeMap::new();
        for line in text
            .lines()
            .filter(|l| l.starts_with("weft_requests_total{"))
        {
            let code: u16 = label(line, "response_code").parse().unwrap();
            let value: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
            *counts.entry(code).or_default() += value;
        }
        counts
    }

    fn access_log(&self) -> Vec<serde_json::Value> {
        self.log
            .lines()
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

fn label<'a>(line: &'a str, name: &str) -> &'a str {
    let start = line
        .find(&format!("{name}=\""))
        .unwrap_or_else(|| panic!("no {name} in {line}"))
        + name.len()
        + 2;
    let rest = &line[start..];
    &rest[..rest.find('"').unwrap()]
}

// ---------------------------------------------------------------------------------------
// Backends

struct BackendHandler(Arc<BackendState>);

struct BackendTunnel(Arc<BackendState>);

impl hbone::StreamHandler for BackendHandler {
    type Tunnel = BackendTunnel;

    async fn accept(
        &self,
        request: hbone::InboundConnect,
    ) -> Result<BackendTunnel, hbone::Refusal> {
        self.0.connects.fetch_add(1, Ordering::SeqCst);
        if request.target != SocketAddr::new(self.0.ip, TARGET_PORT) {
            return Err(hbone::Refusal::NotServed);
        }
        if let Some(refusal) = *self.0.refuse_connects.lock() {
            return Err(refusal);
        }
        self.0.peers.lock().push(request.peer_identity);
        Ok(BackendTunnel(Arc::clone(&self.0)))
    }
}

impl hbone::Tunnel for BackendTunnel {
    async fn run(self, stream: hbone::ServerStream) {
        let state = self.0;
        let service = service_fn(move |req| backend_service(Arc::clone(&state), req));
        let _ = auto::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(stream), service)
            .await;
    }

    fn abandon(self, _: std::io::Error) {}
}

async fn backend_service(
    state: Arc<BackendState>,
    req: Request<Incoming>,
) -> Result<Response<BoxBody>, Infallible> {
    let n = state.count.fetch_add(1, Ordering::SeqCst);
    let (parts, body) = req.into_parts();
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or("/".to_owned(), |pq| pq.to_string());
    state.seen.lock().push(Seen {
        method: parts.method.to_string(),
        path_and_query: path_and_query.clone(),
        headers: parts.headers.clone(),
    });
    let header_ms = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .map(Duration::from_millis)
    };
    // `x-delay-first-ms`: only even-numbered requests (the first try of each pair) wait.
    let delay = header_ms("x-delay-ms")
        .or_else(|| header_ms("x-delay-first-ms").filter(|_| n.is_multiple_of(2)));
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    let mut response = if state.fail_every_other.load(Ordering::SeqCst) && n.is_multiple_of(2) {
        let _ = body.collect().await;
        let mut r = Response::new(full("unavailable"));
        *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        r
    } else if parts
        .headers
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
    {
        grpc_echo(body)
    } else {
        let received = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        Response::new(full(&format!(
            "{} {} {} {}",
            state.name,
            parts.method,
            path_and_query,
            received.len()
        )))
    };
    let headers = response.headers_mut();
    headers.insert("x-backend", HeaderValue::from_str(&state.name).unwrap());
    headers.insert("x-backend-remove", HeaderValue::from_static("1"));
    Ok(response)
}

/// Echoes every message as it arrives, then trailers with a status and a custom one.
fn grpc_echo(mut body: Incoming) -> Response<BoxBody> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { return };
            if let Ok(data) = frame.into_data()
                && tx.send(Frame::data(data)).await.is_err()
            {
                return;
            }
        }
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        trailers.insert("grpc-message", HeaderValue::from_static("all good"));
        trailers.insert("x-custom-trailer", HeaderValue::from_static("kept"));
        let _ = tx.send(Frame::trailers(trailers)).await;
    });
    let mut response = Response::new(ChannelBody(rx).boxed_unsync());
    response
        .headers_mut()
        .insert("content-type", HeaderValue::from_static("application/grpc"));
    response
}

/// A body fed frame by frame through a channel.
struct ChannelBody(mpsc::Receiver<Frame<Bytes>>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = super::upstream::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.0.poll_recv(cx).map(|f| f.map(Ok))
    }
}

fn full(text: &str) -> BoxBody {
    Full::new(Bytes::from(text.to_owned()))
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn empty() -> BoxBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

// ---------------------------------------------------------------------------------------
// Client

#[derive(Clone)]
enum Client {
    H1(Arc<tokio::sync::Mutex<http1::SendRequest<BoxBody>>>),
    H2(http2::SendRequest<BoxBody>),
}

#[derive(Debug)]
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
    elapsed: Duration,
}

impl Reply {
    fn backend(&self) -> &str {
        self.headers
            .get("x-backend")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
    }
}

impl Client {
    async fn send(&self, request: Request<BoxBody>) -> Response<Incoming> {
        let mut request = request;
        match self {
            Client::H1(sender) => {
                let mut sender = sender.lock().await;
                sender.ready().await.unwrap();
                timeout(patience(), sender.send_request(request))
                    .await
                    .expect("response in time")
                    .unwrap()
            }
            Client::H2(sender) => {
                let uri = format!("http://echo.default{}", request.uri());
                *request.uri_mut() = uri.parse().unwrap();
                request.headers_mut().remove("host");
                let mut sender = sender.clone();
                timeout(patience(), sender.send_request(request))
                    .await
                    .expect("response in time")
                    .unwrap()
            }
        }
    }

    async fn call(&self, method: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
        self.call_with_body(method, path, headers, Bytes::new())
            .await
    }

    async fn call_with_body(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Reply {
        let started = Instant::now();
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "echo.default");
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let body = if body.is_empty() {
            empty()
        } else {
            Full::new(body)
                .map_err(|never| match never {})
                .boxed_unsync()
        };
        let response = self.send(builder.body(body).unwrap()).await;
        let (parts, body) = response.into_parts();
        let body = timeout(patience(), body.collect())
            .await
            .expect("body in time")
            .unwrap()
            .to_bytes();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body: String::from_utf8_lossy(&body).into_owned(),
            elapsed: started.elapsed(),
        }
    }

    async fn get(&self, path: &str) -> Reply {
        self.call("GET", path, &[]).await
    }
}

// ---------------------------------------------------------------------------------------
// Routes

fn route(rules: Vec<RouteRule>) -> HttpRoute {
    HttpRoute {
        name: svc("echo-route"),
        kind: RouteKind::Http,
        gateway_parents: Vec::new(),
        parents: vec![ParentRef {
            service: svc(SERVICE),
            port: None,
        }],
        hostnames: Vec::new(),
        rules,
    }
}

fn to(backends: &[(&str, u32)]) -> Vec<Backend> {
    backends
        .iter()
        .map(|(name, weight)| Backend {
            service: service_ref(name),
            weight: *weight,
            filters: Vec::new(),
        })
        .collect()
}

fn rule(matches: Vec<RequestMatch>, backends: &[(&str, u32)]) -> RouteRule {
    RouteRule {
        matches,
        backends: to(backends),
        ..RouteRule::default()
    }
}

fn path(p: PathMatch) -> RequestMatch {
    RequestMatch {
        path: Some(p),
        ..RequestMatch::default()
    }
}

/// How long a test waits for what must happen (scaled by `WEFT_TEST_PATIENCE_MS`, like every
/// test's deadlines).
fn patience() -> Duration {
    weft_test_env::scaled(Duration::from_secs(10))
}

/// A backend delay no test outlives: a reply that comes is not the backend's.
const FOREVER_MS: &str = "3600000";

mod balancing;
mod drain;
mod gateway;
mod hardening;
mod observability;
mod pools;
mod resilience;
mod routing;
