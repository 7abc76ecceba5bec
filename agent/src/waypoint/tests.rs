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
        Arc, Mutex,
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

use super::{Config, Metrics, Waypoint, upstream::BoxBody};
use crate::{
    identity::SpiffeId,
    proxy::hbone::{self, Pool, PoolConfig},
    state::{
        AccessPolicy, Action, L7Match, Location, Rule, Service, ServicePort, Snapshot, Workload,
        WorkloadRef, WorkloadSelector,
        route::{
            Backend, Filter, HeaderMatch, HeaderModifier, HttpRoute, Mirror, ParentRef, PathMatch,
            PathRewrite, Pattern, QueryParamMatch, Redirect, RequestMatch, Retry, RouteKind,
            RouteRule, ServiceRef, Timeouts, UrlRewrite, ValueMatch,
        },
    },
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
    seen: Mutex<Vec<Seen>>,
    peers: Mutex<Vec<SpiffeId>>,
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
    waypoint_id: SpiffeId,
    registry: Registry,
    log: Captured,
    spans: Arc<Mutex<Vec<Span>>>,
}

struct Spans(Arc<Mutex<Vec<Span>>>);

impl SpanExporter for Spans {
    fn export(&self, span: Span) {
        self.0.lock().unwrap().push(span);
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
                seen: Mutex::new(Vec::new()),
                peers: Mutex::new(Vec::new()),
            });
            let handler = Arc::new(BackendHandler(Arc::clone(&state)));
            tokio::spawn(async move {
                while let Ok((tcp, _)) = listener.accept().await {
                    tokio::spawn(hbone::serve(tcp, Arc::clone(&tls), Arc::clone(&handler)));
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
        let log = Captured::default();
        let spans = Arc::new(Mutex::new(Vec::new()));
        let exporter: Arc<dyn SpanExporter> = Arc::new(Spans(Arc::clone(&spans)));
        let waypoint_pool = Pool::new(
            Arc::<TestCerts>::clone(&waypoint_certs),
            PoolConfig::default(),
        );
        let waypoint = Waypoint::new(
            config,
            state_rx,
            waypoint_pool.clone(),
            metrics,
            AccessLog::to_writer(log.clone()),
            Some(exporter),
        );
        let tls = hbone::server_config(waypoint_certs, waypoint_id.clone()).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let waypoint_addr = listener.local_addr().unwrap();
        tokio::spawn(waypoint.serve(listener, tls));

        let client_certs = TestCerts::new(ca.bundle());
        client_certs.insert(ca.issue(&id("client")));
        Self {
            waypoint_addr,
            state,
            backends,
            client_pool: Pool::new(client_certs, PoolConfig::default()),
            waypoint_pool,
            waypoint_id,
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
        let address = self.waypoint_addr;
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
            PATIENCE,
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
        if request.target != SocketAddr::new(self.0.ip, TARGET_PORT) {
            return Err(hbone::Refusal::NotServed);
        }
        self.0.peers.lock().unwrap().push(request.peer_identity);
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
    state.seen.lock().unwrap().push(Seen {
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
                timeout(PATIENCE, sender.send_request(request))
                    .await
                    .expect("response in time")
                    .unwrap()
            }
            Client::H2(sender) => {
                let uri = format!("http://echo.default{}", request.uri());
                *request.uri_mut() = uri.parse().unwrap();
                request.headers_mut().remove("host");
                let mut sender = sender.clone();
                timeout(PATIENCE, sender.send_request(request))
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
        let body = timeout(PATIENCE, body.collect())
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

// ---------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_split_lands_within_three_points_of_90_10() {
    let h = Harness::new(&["v1", "v2"]).await;
    h.set_routes(vec![route(vec![rule(vec![], &[("v1", 90), ("v2", 10)])])]);
    let client = h.h2().await;
    let total: u32 = 2_000;
    let mut tasks = JoinSet::new();
    let (done_tx, mut done) = mpsc::unbounded_channel();
    for worker in 0..32u32 {
        let client = client.clone();
        let done_tx = done_tx.clone();
        tasks.spawn(async move {
            for _ in (worker..total).step_by(32) {
                let reply = client.get("/split").await;
                assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
                let _ = done_tx.send(reply.backend().to_owned());
            }
        });
    }
    drop(done_tx);
    while let Some(result) = tasks.join_next().await {
        result.unwrap();
    }
    let mut v1 = 0;
    let mut n = 0;
    while let Some(backend) = done.recv().await {
        n += 1;
        if backend == "v1" {
            v1 += 1;
        }
    }
    assert_eq!(n, total);
    let share = f64::from(v1) * 100.0 / f64::from(n);
    eprintln!(
        "90/10 split over {n} requests: v1 {share:.2}%, v2 {:.2}%",
        100.0 - share
    );
    assert!((87.0..=93.0).contains(&share), "v1 got {share:.2}%");
    assert_eq!(
        h.backend("v1").count.load(Ordering::SeqCst) + h.backend("v2").count.load(Ordering::SeqCst),
        u64::from(total)
    );
    assert_eq!(h.requests_by_code().get(&200), Some(&u64::from(total)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weight_change_applies_to_new_requests_and_in_flight_ones_complete() {
    let h = Harness::new(&["v1", "v2"]).await;
    h.set_routes(vec![route(vec![rule(vec![], &[("v1", 100), ("v2", 0)])])]);
    let client = h.h2().await;
    let mut slow = JoinSet::new();
    for _ in 0..20 {
        let client = client.clone();
        slow.spawn(async move { client.call("GET", "/slow", &[("x-delay-ms", "600")]).await });
    }
    // Every slow request has reached v1 before the weights change.
    let deadline = Instant::now() + PATIENCE;
    while h.backend("v1").count.load(Ordering::SeqCst) < 20 {
        assert!(Instant::now() < deadline, "slow requests did not arrive");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    h.set_routes(vec![route(vec![rule(vec![], &[("v1", 0), ("v2", 100)])])]);
    for _ in 0..50 {
        let reply = client.get("/fast").await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.backend(), "v2", "new requests take the new weights");
    }
    let mut completed = 0;
    while let Some(reply) = slow.join_next().await {
        let reply = reply.unwrap();
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        assert_eq!(reply.backend(), "v1");
        completed += 1;
    }
    assert_eq!(completed, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_header_query_and_method_matches_pick_the_backend() {
    let h = Harness::new(&["a", "b", "c"]).await;
    let header = |name: &str, value: &str| HeaderMatch {
        name: name.into(),
        value: ValueMatch::Exact(value.into()),
    };
    h.set_routes(vec![route(vec![
        rule(vec![path(PathMatch::Exact("/exact".into()))], &[("a", 1)]),
        rule(vec![path(PathMatch::Prefix("/api".into()))], &[("b", 1)]),
        rule(
            vec![path(PathMatch::Regex(Pattern::new("/re/[0-9]+").unwrap()))],
            &[("c", 1)],
        ),
        rule(
            vec![RequestMatch {
                headers: vec![header("x-canary", "yes")],
                ..RequestMatch::default()
            }],
            &[("c", 1)],
        ),
        rule(
            vec![RequestMatch {
                method: Some("POST".into()),
                query_params: vec![QueryParamMatch {
                    name: "debug".into(),
                    value: ValueMatch::Exact("1".into()),
                }],
                ..RequestMatch::default()
            }],
            &[("a", 1)],
        ),
    ])]);
    for client in [h.h1().await, h.h2().await] {
        let expect = [
            ("GET", "/exact", vec![], "a"),
            ("GET", "/exact/more", vec![], "-"),
            ("GET", "/api", vec![], "b"),
            ("GET", "/api/users", vec![], "b"),
            ("GET", "/apix", vec![], "-"),
            ("GET", "/re/42", vec![], "c"),
            ("GET", "/re/x", vec![], "-"),
            ("GET", "/anything", vec![("x-canary", "yes")], "c"),
            // The longer prefix wins over the header match's implicit `/`.
            ("GET", "/api/x", vec![("x-canary", "yes")], "b"),
            ("POST", "/q?debug=1", vec![], "a"),
            ("GET", "/q?debug=1", vec![], "-"),
            ("POST", "/q?debug=2", vec![], "-"),
            // Prefix (with a method) beats regex.
            ("POST", "/re/1?debug=1", vec![], "a"),
        ];
        for (method, path, headers, backend) in expect {
            let reply = client.call(method, path, &headers).await;
            assert_eq!(
                reply.backend(),
                backend,
                "{method} {path} {headers:?}: {reply:?}"
            );
            let status = if backend == "-" { 404 } else { 200 };
            assert_eq!(reply.status.as_u16(), status, "{method} {path}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_timeout_answers_504_on_time() {
    let h = Harness::new(&["slow"]).await;
    let limit = Duration::from_millis(300);
    h.set_routes(vec![route(vec![RouteRule {
        timeouts: Timeouts {
            request: Some(limit),
            backend_request: None,
        },
        ..rule(vec![], &[("slow", 1)])
    }])]);
    let client = h.h1().await;
    // Warm the upstream connection so the measurement is the timeout, not a handshake.
    assert_eq!(client.get("/warm").await.status, StatusCode::OK);
    let reply = client
        .call("GET", "/sleepy", &[("x-delay-ms", "3000")])
        .await;
    eprintln!("request timeout {limit:?}: 504 after {:?}", reply.elapsed);
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(
        reply.elapsed >= limit,
        "504 came early: {:?}",
        reply.elapsed
    );
    assert!(
        reply.elapsed < limit + Duration::from_secs(2),
        "{:?}",
        reply.elapsed
    );
    let line = h.access_log().pop().unwrap();
    assert_eq!(line["response_flags"], "UT");
    assert_eq!(line["error"], "request_timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_on_503_succeeds_against_a_backend_failing_every_other_request() {
    let h = Harness::new(&["flaky"]).await;
    h.backend("flaky")
        .fail_every_other
        .store(true, Ordering::SeqCst);
    h.set_routes(vec![route(vec![RouteRule {
        retry: Some(Retry {
            attempts: 2,
            codes: vec![503],
            backoff: Duration::from_millis(5),
        }),
        ..rule(vec![], &[("flaky", 1)])
    }])]);
    let client = h.h1().await;
    for i in 0..10 {
        // Small bodies are kept for the retry: the second try gets the whole body too.
        let body = Bytes::from(vec![b'x'; 1000 * i]);
        let reply = client
            .call_with_body("POST", "/retry", &[], body.clone())
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        assert_eq!(reply.body, format!("flaky POST /retry {}", body.len()));
    }
    assert_eq!(h.backend("flaky").count.load(Ordering::SeqCst), 20);
    let log = h.access_log();
    assert_eq!(log.len(), 10);
    assert!(
        log.iter()
            .all(|l| l["retries"] == 1 && l["response_code"] == 200)
    );
    let text = h.registry.encode().unwrap();
    let retries = text
        .lines()
        .find(|l| l.starts_with("weft_waypoint_request_retries_total{"))
        .unwrap();
    assert!(retries.ends_with(" 10"), "{retries}");
    // A body too big to keep is streamed once and never retried.
    let big = Bytes::from(vec![b'y'; 100 * 1024]);
    let reply = client.call_with_body("POST", "/big", &[], big).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(h.access_log().last().unwrap()["retries"], 0);
    assert_eq!(h.backend("flaky").count.load(Ordering::SeqCst), 21);
    assert_eq!(client.get("/even").await.status, StatusCode::OK);
    // Without a retry policy the client sees the 503.
    h.set_routes(vec![route(vec![rule(vec![], &[("flaky", 1)])])]);
    let statuses: Vec<u16> = [client.get("/a").await, client.get("/b").await]
        .iter()
        .map(|r| r.status.as_u16())
        .collect();
    assert_eq!(statuses, [503, 200]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_gets_a_copy_and_the_client_sees_only_the_primary() {
    let h = Harness::new(&["primary", "shadow"]).await;
    h.set_routes(vec![route(vec![RouteRule {
        filters: vec![Filter::Mirror(Mirror {
            backend: service_ref("shadow"),
            parts_per_million: 1_000_000,
        })],
        ..rule(vec![], &[("primary", 1)])
    }])]);
    let client = h.h1().await;
    let reply = client.get("/mirrored?x=1").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.backend(), "primary");
    assert!(
        reply.body.starts_with("primary GET /mirrored?x=1"),
        "{}",
        reply.body
    );
    let deadline = Instant::now() + PATIENCE;
    while h.backend("shadow").count.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "the mirror got no copy");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let copy = h.backend("shadow").seen.lock().unwrap()[0].clone();
    assert_eq!(copy.path_and_query, "/mirrored?x=1");
    assert_eq!(copy.method, "GET");
    assert_eq!(h.backend("primary").count.load(Ordering::SeqCst), 1);
    assert_eq!(h.requests_by_code(), BTreeMap::from([(200, 1)]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_and_streaming_pass_through_with_trailers() {
    let h = Harness::new(&["grpc"]).await;
    // No route: the service's own endpoint serves; gRPC always goes upstream as HTTP/2.
    let Client::H2(sender) = h.h2().await else {
        unreachable!("h2 client")
    };
    let grpc_request = |body: BoxBody| {
        Request::builder()
            .method("POST")
            .uri("http://echo.default/weft.test.Echo/Say")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(body)
            .unwrap()
    };
    // Unary.
    let mut unary = sender.clone();
    let response = unary
        .send_request(grpc_request(full("\0\0\0\0\x05hello")))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let collected = response.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("trailers");
    assert_eq!(
        collected.to_bytes(),
        Bytes::from_static(b"\0\0\0\0\x05hello")
    );
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["grpc-message"], "all good");
    assert_eq!(trailers["x-custom-trailer"], "kept");

    // Bidirectional streaming: each message comes back before the next is sent, so
    // nothing is buffered on the way.
    let (tx, rx) = mpsc::channel(4);
    let mut streaming = sender.clone();
    let response = streaming
        .send_request(grpc_request(ChannelBody(rx).boxed_unsync()))
        .await
        .unwrap();
    let mut body = response.into_body();
    for i in 0..3u8 {
        let message = Bytes::from(vec![0, 0, 0, 0, 1, b'a' + i]);
        tx.send(Frame::data(message.clone())).await.unwrap();
        let frame = timeout(PATIENCE, body.frame())
            .await
            .expect("echo before the stream ends")
            .unwrap()
            .unwrap();
        assert_eq!(frame.into_data().unwrap(), message);
    }
    drop(tx);
    let mut trailers = None;
    while let Some(frame) = timeout(PATIENCE, body.frame()).await.unwrap() {
        if let Ok(t) = frame.unwrap().into_trailers() {
            trailers = Some(t);
        }
    }
    let trailers = trailers.expect("streaming trailers");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["x-custom-trailer"], "kept");
    // The status is in the metrics.
    let text = h.registry.encode().unwrap();
    let grpc_lines: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.starts_with("weft_requests_total{") && l.contains("request_protocol=\"grpc\"")
        })
        .collect();
    assert_eq!(grpc_lines.len(), 1, "{text}");
    assert_eq!(label(grpc_lines[0], "grpc_response_status"), "0");
    assert!(grpc_lines[0].ends_with(" 2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l7_deny_blocks_post_admin_and_allows_get() {
    let h = Harness::new(&["app"]).await;
    h.update(|s| {
        s.policies.insert(
            svc("deny-admin"),
            AccessPolicy {
                name: svc("deny-admin"),
                selector: WorkloadSelector {
                    namespace: "default".into(),
                    match_labels: BTreeMap::from([("app".into(), "app".into())]),
                },
                action: Action::Deny,
                rules: vec![Rule {
                    l7: Some(L7Match {
                        methods: vec!["POST".into()],
                        paths: vec!["/admin".into()],
                        headers: BTreeMap::new(),
                    }),
                    ..Rule::default()
                }],
            },
        );
    });
    let client = h.h1().await;
    assert_eq!(
        client.call("POST", "/admin", &[]).await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(client.get("/").await.status, StatusCode::OK);
    assert_eq!(client.get("/admin").await.status, StatusCode::OK);
    assert_eq!(
        client.call("POST", "/other", &[]).await.status,
        StatusCode::OK
    );
    // Denied requests never reach the backend.
    assert_eq!(h.backend("app").count.load(Ordering::SeqCst), 3);
    let denied = &h.access_log()[0];
    assert_eq!(denied["response_code"], 403);
    assert_eq!(denied["policy.name"], "default/deny-admin");
    assert_eq!(denied["response_flags"], "RBAC");
    let text = h.registry.encode().unwrap();
    assert!(
        text.contains("weft_waypoint_denied_requests_total{reason=\"denied_by_policy\",policy=\"default/deny-admin\"} 1"),
        "{text}"
    );

    // A gRPC client gets PERMISSION_DENIED, trailers-only.
    let Client::H2(mut sender) = h.h2().await else {
        unreachable!("h2 client")
    };
    let request = Request::builder()
        .method("POST")
        .uri("http://echo.default/admin")
        .header("content-type", "application/grpc")
        .body(empty())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["grpc-status"], "7");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_metrics_equal_the_requests_sent() {
    let h = Harness::new(&["m"]).await;
    h.set_routes(vec![route(vec![rule(
        vec![path(PathMatch::Prefix("/ok".into()))],
        &[("m", 1)],
    )])]);
    let h1 = h.h1().await;
    let h2 = h.h2().await;
    for i in 0..30 {
        let client = if i % 2 == 0 { &h1 } else { &h2 };
        assert_eq!(client.get("/ok").await.status, StatusCode::OK);
    }
    for _ in 0..7 {
        assert_eq!(h1.get("/missing").await.status, StatusCode::NOT_FOUND);
    }
    assert_eq!(h.requests_by_code(), BTreeMap::from([(200, 30), (404, 7)]));
    assert_eq!(h.access_log().len(), 37);
    let text = h.registry.encode().unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("weft_requests_total{") && l.contains("response_code=\"200\""))
        .unwrap();
    assert_eq!(label(line, "reporter"), "waypoint");
    assert_eq!(
        label(line, "source_principal"),
        "spiffe://cluster.local/ns/default/sa/client"
    );
    assert_eq!(label(line, "destination_workload"), "m");
    assert_eq!(
        label(line, "destination_principal"),
        "spiffe://cluster.local/ns/default/sa/m"
    );
    assert_eq!(
        label(line, "destination_service"),
        "echo.default.svc.cluster.local"
    );
    assert_eq!(label(line, "route_name"), "default/echo-route");
    assert_eq!(label(line, "connection_security_policy"), "mutual_tls");
    assert!(text.contains("weft_request_duration_milliseconds_bucket{"));
    assert!(text.contains("weft_response_bytes_sum{"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_rewrite_and_header_modifiers_do_what_the_route_says() {
    let h = Harness::new(&["web"]).await;
    h.set_routes(vec![route(vec![
        RouteRule {
            filters: vec![Filter::Redirect(Redirect {
                scheme: None,
                hostname: Some("new.example".into()),
                path: Some(PathRewrite::ReplacePrefixMatch("/new".into())),
                port: None,
                status: 302,
            })],
            ..rule(vec![path(PathMatch::Prefix("/old".into()))], &[("web", 1)])
        },
        RouteRule {
            filters: vec![
                Filter::UrlRewrite(UrlRewrite {
                    hostname: Some("internal.web".into()),
                    path: Some(PathRewrite::ReplacePrefixMatch("/api/v2".into())),
                }),
                Filter::RequestHeaders(HeaderModifier {
                    set: vec![("x-set".into(), "set".into())],
                    add: vec![("x-added".into(), "added".into())],
                    remove: vec!["x-remove".into()],
                }),
                Filter::ResponseHeaders(HeaderModifier {
                    set: vec![("x-resp".into(), "yes".into())],
                    add: Vec::new(),
                    remove: vec!["x-backend-remove".into()],
                }),
            ],
            ..rule(vec![path(PathMatch::Prefix("/v1".into()))], &[("web", 1)])
        },
    ])]);
    let client = h.h1().await;
    let reply = client.get("/old/page?q=1").await;
    assert_eq!(reply.status, StatusCode::FOUND);
    assert_eq!(reply.headers["location"], "http://new.example/new/page?q=1");
    assert_eq!(h.backend("web").count.load(Ordering::SeqCst), 0);

    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let reply = client
        .call(
            "GET",
            "/v1/users?page=2",
            &[
                ("x-remove", "1"),
                ("x-set", "old"),
                ("traceparent", traceparent),
            ],
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.headers["x-resp"], "yes");
    assert!(!reply.headers.contains_key("x-backend-remove"));
    let seen = h.backend("web").seen.lock().unwrap()[0].clone();
    assert_eq!(seen.path_and_query, "/api/v2/users?page=2");
    assert_eq!(seen.headers["host"], "internal.web");
    assert_eq!(seen.headers["x-set"], "set");
    assert_eq!(seen.headers["x-added"], "added");
    assert!(!seen.headers.contains_key("x-remove"));
    // Trace context: same trace, the waypoint's span as the parent of the backend's.
    let forwarded = seen.headers["traceparent"].to_str().unwrap();
    assert!(forwarded.starts_with("00-0af7651916cd43dd8448eb211c80319c-"));
    assert!(!forwarded.contains("b7ad6b7169203331"));
    let spans = h.spans.lock().unwrap();
    let span = spans.last().expect("a span per request");
    assert_eq!(
        span.context.trace_id.to_string(),
        "0af7651916cd43dd8448eb211c80319c"
    );
    assert!(forwarded.contains(&span.context.span_id.to_string()));
    // The backend saw the waypoint's identity, not the client's.
    assert!(
        h.backend("web")
            .peers
            .lock()
            .unwrap()
            .iter()
            .all(|p| *p == id("waypoint"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connects_to_targets_the_waypoint_does_not_serve_are_refused() {
    let h = Harness::new(&["pod"]).await;
    let err = h
        .connect("10.96.9.9:80".parse().unwrap())
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "bad_request");
    // A pod of the bound service at its target port is served: that pod, no routes.
    h.set_routes(vec![route(vec![rule(vec![], &[("nowhere", 1)])])]);
    let pod = SocketAddr::new(h.backend("pod").ip, TARGET_PORT);
    let client = h.h2_to(pod).await;
    let reply = client.get("/direct").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.backend(), "pod");
    let err = h
        .connect(SocketAddr::new(h.backend("pod").ip, 9999))
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "bad_request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_reused_and_closed_once_idle() {
    let idle = Duration::from_millis(300);
    let h = Harness::with(&["pooled"], |config| config.upstream_idle_timeout = idle).await;
    let tunnels = || h.backend("pooled").peers.lock().unwrap().len();
    // HTTP/1.1: sequential requests share one keep-alive connection (one CONNECT).
    let h1 = h.h1().await;
    for _ in 0..5 {
        assert_eq!(h1.get("/keep-alive").await.status, StatusCode::OK);
    }
    assert_eq!(tunnels(), 1);
    // HTTP/2: concurrent requests share one multiplexed connection.
    let h2 = h.h2().await;
    let mut tasks = JoinSet::new();
    for _ in 0..20 {
        let h2 = h2.clone();
        tasks.spawn(async move { h2.call("GET", "/mux", &[("x-delay-ms", "50")]).await });
    }
    while let Some(reply) = tasks.join_next().await {
        assert_eq!(reply.unwrap().status, StatusCode::OK);
    }
    assert_eq!(tunnels(), 2);
    assert_eq!(h.waypoint_pool.stats().streams, 2);
    // Unused past the idle timeout, both close (their HBONE streams end).
    let deadline = Instant::now() + PATIENCE;
    while h.waypoint_pool.stats().streams > 0 {
        assert!(
            Instant::now() < deadline,
            "idle upstream connections stayed open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // And the next request opens a new one.
    assert_eq!(h1.get("/again").await.status, StatusCode::OK);
    assert_eq!(tunnels(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_try_timeout_is_retried_within_the_request_timeout() {
    let h = Harness::new(&["sluggish"]).await;
    h.set_routes(vec![route(vec![RouteRule {
        timeouts: Timeouts {
            request: Some(Duration::from_secs(5)),
            backend_request: Some(Duration::from_millis(200)),
        },
        retry: Some(Retry {
            attempts: 1,
            codes: Vec::new(),
            backoff: Duration::from_millis(1),
        }),
        ..rule(vec![], &[("sluggish", 1)])
    }])]);
    let client = h.h2().await;
    // The first try sleeps past its timeout, the retry answers at once.
    let reply = client
        .call("GET", "/slow-first", &[("x-delay-first-ms", "2000")])
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert!(
        reply.elapsed >= Duration::from_millis(200),
        "{:?}",
        reply.elapsed
    );
    assert!(
        reply.elapsed < Duration::from_secs(2),
        "{:?}",
        reply.elapsed
    );
    assert_eq!(h.access_log().last().unwrap()["retries"], 1);
    // Both tries too slow: 504 once the retries are used up.
    let reply = client.call("GET", "/slow", &[("x-delay-ms", "2000")]).await;
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    let line = h.access_log().pop().unwrap();
    assert_eq!(
        (line["retries"].as_u64(), line["error"].as_str()),
        (Some(1), Some("try_timeout"))
    );
    assert_eq!(line["response_flags"], "UT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_backends_and_garbage_clients_fail_cleanly() {
    let h = Harness::new(&["alive"]).await;
    // An endpoint nobody listens on: 503, with the HBONE reason in the log.
    let dead: IpAddr = "127.77.250.1".parse().unwrap();
    h.update(|s| {
        s.workloads.insert(
            svc("dead"),
            Workload {
                name: svc("dead"),
                service_account: "dead".into(),
                ips: vec![dead],
                location: Location::Remote { node: "n".into() },
                enrolled: true,
                mtls_mode: None,
                labels: BTreeMap::new(),
            },
        );
        if let Some(echo) = s.services.get_mut(&svc(SERVICE)) {
            echo.endpoints = vec![dead];
        }
    });
    let client = h.h1().await;
    let reply = client.get("/").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    let line = h.access_log().pop().unwrap();
    assert_eq!(line["response_flags"], "UF");
    assert_eq!(line["error"], "hbone_dial");
    // No endpoints at all: 503 too.
    h.update(|s| {
        if let Some(echo) = s.services.get_mut(&svc(SERVICE)) {
            echo.endpoints.clear();
        }
    });
    assert_eq!(
        client.get("/").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(h.access_log().pop().unwrap()["error"], "no_endpoints");
    // A client that speaks no HTTP gets its stream closed; the waypoint carries on.
    let mut stream = h.connect(Harness::vip()).await.unwrap();
    stream.write_all(b"\x16\x03garbage\r\n\r\n").await.unwrap();
    let mut rest = Vec::new();
    let _ = timeout(PATIENCE, stream.read_to_end(&mut rest))
        .await
        .expect("closed");
    h.update(|s| {
        if let Some(echo) = s.services.get_mut(&svc(SERVICE)) {
            echo.endpoints = vec![h.backends["alive"].ip];
        }
    });
    assert_eq!(h.h2().await.get("/").await.status, StatusCode::OK);
}

const PATIENCE: Duration = Duration::from_secs(10);
