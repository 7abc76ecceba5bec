//! End-to-end tests over real loopback sockets: pool → TLS → HTTP/2 → server → upstream.
//! `handshake` meets hand-configured rustls peers, `reset` reads RST_STREAM frames with a
//! plain h2 peer.

mod handshake;
mod reset;

use std::{
    collections::HashSet,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use rustls::NamedGroup;
use time::OffsetDateTime;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::mpsc,
    task::JoinSet,
    time::{Instant, timeout},
};

use super::*;
use crate::{
    identity::SpiffeId,
    sync::Mutex,
    test_util::{TestCa, TestCerts, closed_port, echo_server, reset_server, tcp_pair},
};

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "default", sa).unwrap()
}

/// What the test handler does with a target.
#[derive(Default)]
struct Targets {
    denied: HashSet<SocketAddr>,
    served: HashSet<SocketAddr>,
    /// Served, but the upstream connect takes this long.
    slow: Option<(SocketAddr, Duration)>,
}

struct TestHandler {
    targets: Mutex<Targets>,
    seen: Mutex<Vec<InboundConnect>>,
    /// When the last upstream connected.
    connected_at: Mutex<Option<Instant>>,
    finished: mpsc::UnboundedSender<Finished>,
}

#[derive(Debug)]
struct Finished {
    sent: u64,
    received: u64,
    error: Option<&'static str>,
}

struct TestTransfer {
    sent: AtomicU64,
    received: AtomicU64,
    finished: mpsc::UnboundedSender<Finished>,
}

impl Transfer for TestTransfer {
    type Error = copy::Error;

    fn sent(&self) -> &AtomicU64 {
        &self.sent
    }

    fn received(&self) -> &AtomicU64 {
        &self.received
    }

    fn finish(self, result: Result<(), copy::Error>) {
        let _ = self.finished.send(Finished {
            sent: self.sent.load(Ordering::Relaxed),
            received: self.received.load(Ordering::Relaxed),
            error: result.err().map(|e| e.reason()),
        });
    }

    fn idle_timeout(&self) -> Duration {
        Duration::from_secs(3600)
    }
}

impl ConnectHandler for TestHandler {
    type Transfer = TestTransfer;

    async fn open(&self, request: InboundConnect) -> Result<Accepted<TestTransfer>, Refusal> {
        let target = request.target;
        let (denied, served, slow) = {
            let targets = self.targets.lock();
            (
                targets.denied.contains(&target),
                targets.served.contains(&target),
                targets.slow.filter(|(addr, _)| *addr == target),
            )
        };
        self.seen.lock().push(request);
        if denied {
            return Err(Refusal::Denied);
        }
        if !served && slow.is_none() {
            return Err(Refusal::NotServed);
        }
        if let Some((_, delay)) = slow {
            tokio::time::sleep(delay).await;
        }
        let upstream = TcpStream::connect(target)
            .await
            .map_err(|_| Refusal::Unreachable)?;
        *self.connected_at.lock() = Some(Instant::now());
        Ok(Accepted {
            upstream,
            transfer: TestTransfer {
                sent: AtomicU64::new(0),
                received: AtomicU64::new(0),
                finished: self.finished.clone(),
            },
        })
    }
}

/// A client pool and an HBONE server for `server_id`, each with its own certificates.
struct Harness {
    client_id: SpiffeId,
    server_id: SpiffeId,
    client_certs: Arc<TestCerts>,
    server_certs: Arc<TestCerts>,
    server_addr: SocketAddr,
    handler: Arc<TestHandler>,
    pool: Pool,
    /// One result per served HBONE connection.
    served: mpsc::UnboundedReceiver<Result<(), &'static str>>,
    finished: mpsc::UnboundedReceiver<Finished>,
    /// The server's per-connection tasks, to break connections from the server side.
    server_tasks: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    ca: TestCa,
}

impl Harness {
    async fn new() -> Self {
        Self::with_config(PoolConfig::default()).await
    }

    async fn with_config(config: PoolConfig) -> Self {
        let ca = TestCa::new("weft test CA");
        let client_id = id("client");
        let server_id = id("server");
        let client_certs = TestCerts::new(ca.bundle());
        let server_certs = TestCerts::new(ca.bundle());
        client_certs.insert(ca.issue(&client_id));
        server_certs.insert(ca.issue(&server_id));
        let (finished_tx, finished) = mpsc::unbounded_channel();
        let handler = Arc::new(TestHandler {
            targets: Mutex::new(Targets::default()),
            seen: Mutex::new(Vec::new()),
            connected_at: Mutex::new(None),
            finished: finished_tx,
        });
        let tls = server_config(Arc::<TestCerts>::clone(&server_certs), server_id.clone()).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server_addr = listener.local_addr().unwrap();
        let (served_tx, served) = mpsc::unbounded_channel();
        let accept_handler = Arc::clone(&handler);
        let server_tasks = Arc::new(Mutex::new(Vec::new()));
        let tasks = Arc::clone(&server_tasks);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let tls = Arc::clone(&tls);
                let handler = Arc::clone(&accept_handler);
                let served_tx = served_tx.clone();
                let task = tokio::spawn(async move {
                    let result = serve(tcp, tls, handler).await;
                    let _ = served_tx.send(result.map_err(|e| e.reason()));
                });
                tasks.lock().push(task.abort_handle());
            }
        });
        Self {
            pool: Pool::new(Arc::<TestCerts>::clone(&client_certs), config),
            client_id,
            server_id,
            client_certs,
            server_certs,
            server_addr,
            handler,
            served,
            finished,
            server_tasks,
            ca,
        }
    }

    fn key(&self) -> Key {
        Key {
            source: self.client_id.clone(),
            destination: self.server_id.clone(),
            address: self.server_addr,
            local: std::net::Ipv4Addr::LOCALHOST.into(),
        }
    }

    fn serve_target(&self, target: SocketAddr) {
        self.handler.targets.lock().served.insert(target);
    }

    async fn connect_with(&self, key: Key, target: SocketAddr) -> Result<HboneStream, Error> {
        let address = key.address;
        let request = ConnectRequest {
            target,
            source: "10.1.0.7:40000".parse().unwrap(),
            baggage: Some("k8s.namespace.name=default".to_owned()),
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_owned()),
        };
        timeout(
            patience(),
            self.pool
                .connect(key, move || TcpStream::connect(address), request),
        )
        .await
        .expect("connect finishes in time")
    }

    async fn connect(&self, target: SocketAddr) -> Result<HboneStream, Error> {
        self.connect_with(self.key(), target).await
    }

    async fn server_result(&mut self) -> Result<(), &'static str> {
        timeout(patience(), self.served.recv())
            .await
            .expect("server finishes in time")
            .expect("server result")
    }
}

async fn echo_round_trip(stream: &mut HboneStream, payload: &[u8]) -> Vec<u8> {
    let (mut read, mut write) = tokio::io::split(stream);
    let writer = async {
        write.write_all(payload).await.unwrap();
        write.shutdown().await.unwrap();
    };
    let reader = async {
        let mut got = Vec::new();
        read.read_to_end(&mut got).await.unwrap();
        got
    };
    let ((), got) = timeout(patience(), async { tokio::join!(writer, reader) })
        .await
        .expect("echo finishes in time");
    got
}

#[tokio::test]
async fn bytes_echo_both_ways_with_half_close() {
    let mut h = Harness::new().await;
    let (echo, _task) = echo_server().await;
    h.serve_target(echo);
    let mut stream = h.connect(echo).await.unwrap();
    assert_eq!(stream.peer_identity(), &h.server_id);
    let payload: Vec<u8> = (0..2_000_000u32).map(|i| i as u8).collect();
    let got = echo_round_trip(&mut stream, &payload).await;
    assert_eq!(got.len(), payload.len());
    assert!(got == payload);
    let finished = timeout(patience(), h.finished.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(finished.sent, 2_000_000);
    assert_eq!(finished.received, 2_000_000);
    assert_eq!(finished.error, None);

    let seen = h.handler.seen.lock();
    let request = &seen[0];
    assert_eq!(request.peer_identity, h.client_id);
    assert_eq!(request.target, echo);
    assert_eq!(request.headers[FORWARDED], "for=10.1.0.7");
    assert_eq!(request.headers[BAGGAGE], "k8s.namespace.name=default");
    assert!(request.headers.contains_key(TRACEPARENT));
}

#[tokio::test]
async fn half_close_keeps_the_other_direction_open() {
    let h = Harness::new().await;
    // An upstream that reads to EOF, then answers.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        s.write_all(format!("got {}", got.len()).as_bytes())
            .await
            .unwrap();
        s.shutdown().await.unwrap();
    });
    h.serve_target(upstream);
    let mut stream = h.connect(upstream).await.unwrap();
    stream.write_all(b"hello").await.unwrap();
    stream.shutdown().await.unwrap();
    let mut reply = Vec::new();
    timeout(patience(), stream.read_to_end(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply, b"got 5");
}

#[tokio::test]
async fn server_with_another_identity_is_an_identity_mismatch() {
    let mut h = Harness::new().await;
    let (echo, _task) = echo_server().await;
    h.serve_target(echo);
    let mut key = h.key();
    key.destination = id("someone-else");
    let err = h.connect_with(key, echo).await.unwrap_err();
    assert_eq!(err.reason(), "identity_mismatch", "{err}");
    let message = err.to_string();
    assert!(
        message.contains("sa/someone-else") && message.contains("sa/server"),
        "{message}"
    );
    // The server sees the client's alert.
    assert_eq!(h.server_result().await, Err("identity_mismatch"));
    assert_eq!(h.pool.stats().handshake_failures, 1);
}

#[tokio::test]
async fn client_from_another_trust_domain_is_refused_at_the_handshake() {
    let mut h = Harness::new().await;
    // Signed by the very root the server trusts: only the trust domain is wrong.
    let foreign = SpiffeId::new("other.domain", "x", "y").unwrap();
    h.client_certs.insert(h.ca.issue(&foreign));
    let (echo, _task) = echo_server().await;
    h.serve_target(echo);
    let mut key = h.key();
    key.source = foreign;
    let err = h.connect_with(key, echo).await.unwrap_err();
    assert_eq!(h.server_result().await, Err("foreign_trust_domain"));
    assert!(h.handler.seen.lock().is_empty());
    assert_eq!(err.reason(), "bad_certificate", "{err}");
}

#[tokio::test]
async fn server_cert_from_an_untrusted_ca_is_refused() {
    let mut h = Harness::new().await;
    let rogue = TestCa::new("rogue CA");
    h.server_certs.insert(rogue.issue(&h.server_id));
    let err = h.connect(closed_port().await).await.unwrap_err();
    assert_eq!(err.reason(), "untrusted_ca", "{err}");
    assert_eq!(h.server_result().await, Err("untrusted_ca"));
}

#[tokio::test]
async fn client_cert_from_an_untrusted_ca_is_refused() {
    let mut h = Harness::new().await;
    let rogue = TestCa::new("rogue CA");
    h.client_certs.insert(rogue.issue(&h.client_id));
    let (echo, _task) = echo_server().await;
    h.serve_target(echo);
    // TLS 1.3: the client finishes first, and learns of the refusal from the alert.
    let err = h.connect(echo).await.unwrap_err();
    assert_eq!(h.server_result().await, Err("untrusted_ca"));
    assert_eq!(err.reason(), "untrusted_ca", "{err}");
    assert!(h.handler.seen.lock().is_empty());
}

#[tokio::test]
async fn expired_certificates_are_refused_both_ways() {
    let mut h = Harness::new().await;
    let long_ago = OffsetDateTime::now_utc() - time::Duration::days(30);
    h.server_certs.insert(h.ca.issue_valid(
        &h.server_id,
        long_ago,
        long_ago + time::Duration::days(1),
    ));
    let err = h.connect(closed_port().await).await.unwrap_err();
    assert_eq!(err.reason(), "expired_certificate", "{err}");
    assert_eq!(h.server_result().await, Err("expired_certificate"));

    let mut h = Harness::new().await;
    h.client_certs.insert(h.ca.issue_valid(
        &h.client_id,
        long_ago,
        long_ago + time::Duration::days(1),
    ));
    let err = h.connect(closed_port().await).await.unwrap_err();
    assert_eq!(h.server_result().await, Err("expired_certificate"));
    assert_eq!(err.reason(), "expired_certificate", "{err}");
}

#[tokio::test]
async fn not_yet_valid_certificate_is_refused() {
    let h = Harness::new().await;
    let later = OffsetDateTime::now_utc() + time::Duration::days(30);
    h.server_certs
        .insert(h.ca.issue_valid(&h.server_id, later, later + time::Duration::days(1)));
    let err = h.connect(closed_port().await).await.unwrap_err();
    assert_eq!(err.reason(), "not_yet_valid_certificate", "{err}");
}

#[tokio::test]
async fn missing_own_certificate_fails_closed_without_dialing() {
    let h = Harness::new().await;
    h.client_certs.remove(&h.client_id);
    let request = ConnectRequest {
        target: closed_port().await,
        source: "10.1.0.7:1".parse().unwrap(),
        baggage: None,
        traceparent: None,
    };
    let err = h
        .pool
        .connect(
            h.key(),
            || async { panic!("must not dial without a certificate") },
            request,
        )
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "no_certificate");
}

#[tokio::test]
async fn server_without_its_certificate_refuses() {
    let mut h = Harness::new().await;
    h.server_certs.remove(&h.server_id);
    let err = h.connect(closed_port().await).await.unwrap_err();
    assert_eq!(h.server_result().await, Err("no_certificate"));
    assert_eq!(err.reason(), "no_certificate", "{err}");
}

#[tokio::test]
async fn refusals_map_to_statuses_and_errors() {
    let h = Harness::new().await;
    let denied = closed_port().await;
    h.handler.targets.lock().denied.insert(denied);
    let unreachable = closed_port().await;
    h.serve_target(unreachable);
    let not_served = closed_port().await;

    let err = h.connect(not_served).await.unwrap_err();
    assert_eq!(err.reason(), "bad_request", "{err}");
    let err = h.connect(denied).await.unwrap_err();
    assert_eq!(err.reason(), "policy_denied", "{err}");
    let err = h.connect(unreachable).await.unwrap_err();
    assert_eq!(err.reason(), "upstream_unreachable", "{err}");
    // Refusals are per stream: the connection stays and serves the next CONNECT.
    let (echo, _task) = echo_server().await;
    h.serve_target(echo);
    let mut stream = h.connect(echo).await.unwrap();
    assert_eq!(
        echo_round_trip(&mut stream, b"still here").await,
        b"still here"
    );
    assert_eq!(h.pool.stats().handshakes, 1);
}

#[tokio::test]
async fn ok_is_sent_only_after_the_upstream_connected() {
    let h = Harness::new().await;
    let (echo, _task) = echo_server().await;
    let delay = Duration::from_millis(300);
    h.handler.targets.lock().slow = Some((echo, delay));
    let started = Instant::now();
    let _stream = h.connect(echo).await.unwrap();
    let answered = Instant::now();
    let connected = h.handler.connected_at.lock().unwrap();
    assert!(answered - started >= delay);
    assert!(connected <= answered);
}

#[tokio::test]
async fn sequential_connects_share_one_handshake() {
    let h = Harness::new().await;
    let (echo, _task) = echo_server().await;
    h.serve_target(echo);
    for i in 0..100u32 {
        let mut stream = h.connect(echo).await.unwrap();
        let payload = i.to_be_bytes();
        assert_eq!(echo_round_trip(&mut stream, &payload).await, payload);
    }
    let stats = h.pool.stats();
    assert_eq!(stats.handshakes, 1, "{stats:?}");
    assert_eq!(stats.connections, 1, "{stats:?}");
}

#[tokio::test]
async fn concurrent_first_connects_share_one_handshake() {
    let h = Arc::new(Harness::new().await);
    let (echo, _task) = echo_server().await;
    h.serve_target(echo);
    let mut tasks = JoinSet::new();
    for i in 0..20u32 {
        let h = Arc::clone(&h);
        tasks.spawn(async move {
            let mut stream = h.connect(echo).await.unwrap();
            let payload = i.to_be_bytes();
            assert_eq!(echo_round_trip(&mut stream, &payload).await, payload);
        });
    }
    while let Some(result) = tasks.join_next().await {
        result.unwrap();
    }
    assert_eq!(h.pool.stats().handshakes, 1, "{:?}", h.pool.stats());
}

#[tokio::test]
async fn concurrent_connects_behind_a_failed_handshake_share_its_failure() {
    let h = Arc::new(Harness::new().await);
    h.server_certs
        .insert(TestCa::new("rogue CA").issue(&h.server_id));
    let mut tasks = JoinSet::new();
    for _ in 0..10 {
        let h = Arc::clone(&h);
        tasks.spawn(async move { h.connect(closed_port().await).await.unwrap_err().reason() });
    }
    while let Some(reason) = tasks.join_next().await {
        assert_eq!(reason.unwrap(), "untrusted_ca");
    }
    let stats = h.pool.stats();
    assert!(stats.handshake_failures < 10, "{stats:?}");
}

#[tokio::test]
async fn full_connections_make_the_pool_open_another() {
    let h = Harness::with_config(PoolConfig {
        max_streams_per_connection: 2,
        ..PoolConfig::default()
    })
    .await;
    let (echo, _task) = echo_server().await;
    h.serve_target(echo);
    let mut open = Vec::new();
    for _ in 0..5 {
        open.push(h.connect(echo).await.unwrap());
    }
    let stats = h.pool.stats();
    assert_eq!(stats.handshakes, 3, "{stats:?}");
    assert_eq!(stats.streams, 5, "{stats:?}");
    for stream in &mut open {
        assert_eq!(echo_round_trip(stream, b"x").await, b"x");
    }
}

#[tokio::test]
async fn idle_connections_are_closed() {
    let mut h = Harness::with_config(PoolConfig {
        idle_timeout: Duration::from_millis(200),
        ..PoolConfig::default()
    })
    .await;
    let (echo, _task) = echo_server().await;
    h.serve_target(echo);
    let mut stream = h.connect(echo).await.unwrap();
    assert_eq!(echo_round_trip(&mut stream, b"ping").await, b"ping");
    // In use: not closed even past the idle timeout.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(h.pool.stats().connections, 1);
    drop(stream);
    // The server sees the connection end.
    assert!(h.server_result().await.is_ok());
    let stats = h.pool.stats();
    assert_eq!(stats.connections, 0, "{stats:?}");
    assert_eq!(stats.streams, 0, "{stats:?}");
    // The next connect handshakes again.
    let mut stream = h.connect(echo).await.unwrap();
    assert_eq!(echo_round_trip(&mut stream, b"ping").await, b"ping");
    assert_eq!(h.pool.stats().handshakes, 2);
}

#[tokio::test]
async fn rotated_source_cert_moves_new_streams_to_a_new_connection() {
    let h = Harness::new().await;
    let (echo, _task) = echo_server().await;
    h.serve_target(echo);
    let mut old = h.connect(echo).await.unwrap();
    old.write_all(b"before ").await.unwrap();

    h.client_certs.insert(h.ca.issue(&h.client_id));
    let mut new = h.connect(echo).await.unwrap();
    assert_eq!(h.pool.stats().handshakes, 2);
    assert_eq!(echo_round_trip(&mut new, b"new").await, b"new");

    // The stream on the old connection keeps working to its end.
    let got = echo_round_trip(&mut old, b"after").await;
    assert_eq!(got, b"before after");
    drop(old);
    drop(new);
    // The retired connection closes once its last stream is gone.
    let deadline = Instant::now() + patience();
    while h.pool.stats().connections != 1 {
        assert!(Instant::now() < deadline, "{:?}", h.pool.stats());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn upstream_reset_resets_the_client_stream() {
    let h = Harness::new().await;
    let (resetter, _task) = reset_server().await;
    h.serve_target(resetter);
    let mut stream = h.connect(resetter).await.unwrap();
    stream.write_all(b"x").await.unwrap();
    let mut buf = [0u8; 16];
    let result = timeout(patience(), stream.read(&mut buf))
        .await
        .expect("no hang");
    let err = result.expect_err("a reset, not an EOF");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
}

#[tokio::test]
async fn stream_reset_becomes_an_application_reset_through_copy() {
    // app <-> (TCP) copy (HBONE) <-> server <-> resetting upstream
    let h = Harness::new().await;
    let (resetter, _task) = reset_server().await;
    h.serve_target(resetter);
    let mut hbone = h.connect(resetter).await.unwrap();
    let (mut app, mut down) = tcp_pair().await;
    let sent = AtomicU64::new(0);
    let received = AtomicU64::new(0);
    app.write_all(b"x").await.unwrap();
    let result = timeout(
        patience(),
        copy::bidirectional(
            &mut down,
            &mut hbone,
            &sent,
            &received,
            std::time::Duration::from_secs(3_600),
        ),
    )
    .await
    .expect("no hang");
    assert!(result.is_err(), "{result:?}");
    drop(down);
    let mut buf = [0u8; 1];
    let err = timeout(patience(), app.read(&mut buf))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
}

#[tokio::test]
async fn client_abort_resets_the_upstream() {
    let h = Harness::new().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    h.serve_target(upstream);
    let mut stream = h.connect(upstream).await.unwrap();
    let (mut server_side, _) = listener.accept().await.unwrap();
    stream.write_all(b"x").await.unwrap();
    let mut byte = [0u8; 1];
    server_side.read_exact(&mut byte).await.unwrap();
    stream.abort();
    let err = timeout(patience(), server_side.read(&mut byte))
        .await
        .expect("no hang")
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
}

#[tokio::test]
async fn dropping_an_unfinished_stream_resets_the_upstream() {
    let h = Harness::new().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    h.serve_target(upstream);
    let mut stream = h.connect(upstream).await.unwrap();
    let (mut server_side, _) = listener.accept().await.unwrap();
    stream.write_all(b"x").await.unwrap();
    let mut byte = [0u8; 1];
    server_side.read_exact(&mut byte).await.unwrap();
    drop(stream);
    let err = timeout(patience(), server_side.read(&mut byte))
        .await
        .expect("no hang")
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
}

#[tokio::test]
async fn hybrid_post_quantum_key_exchange_is_negotiated() {
    let ca = TestCa::new("kx CA");
    let (client_id, server_id) = (id("client"), id("server"));
    let certs = TestCerts::new(ca.bundle());
    certs.insert(ca.issue(&client_id));
    certs.insert(ca.issue(&server_id));
    let (a, b) = tcp_pair().await;
    let server = server_config(Arc::<TestCerts>::clone(&certs), server_id.clone()).unwrap();
    let client = client_config(certs, client_id, server_id).unwrap();
    let name = tls::server_name(b.local_addr().unwrap());
    let (client, server) = tokio::join!(
        tokio_rustls::TlsConnector::from(client).connect(name, a),
        tokio_rustls::TlsAcceptor::from(server).accept(b),
    );
    let (client, server) = (client.unwrap(), server.unwrap());
    assert_eq!(
        client
            .get_ref()
            .1
            .negotiated_key_exchange_group()
            .map(|g| g.name()),
        Some(NamedGroup::X25519MLKEM768)
    );
    let server = server.get_ref().1;
    assert_eq!(
        server.negotiated_key_exchange_group().map(|g| g.name()),
        Some(NamedGroup::X25519MLKEM768)
    );
    assert_eq!(server.alpn_protocol(), Some(ALPN));
    assert_eq!(
        server.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    // No SNI on the wire.
    assert_eq!(server.server_name(), None);
}

#[test]
fn forwarded_for_follows_rfc_7239() {
    assert_eq!(
        client::forwarded_for("10.0.0.1".parse().unwrap()),
        "for=10.0.0.1"
    );
    assert_eq!(
        client::forwarded_for("fd00::1".parse().unwrap()),
        "for=\"[fd00::1]\""
    );
}

#[tokio::test]
async fn trust_bundle_is_read_at_handshake_time() {
    let h = Harness::new().await;
    let (echo, _task) = echo_server().await;
    h.serve_target(echo);
    // The client stops trusting the mesh CA: the next handshake fails.
    h.client_certs.set_bundle(TestCa::new("other CA").bundle());
    let err = h.connect(echo).await.unwrap_err();
    assert_eq!(err.reason(), "untrusted_ca", "{err}");
    h.client_certs.set_bundle(h.ca.bundle());
    let mut stream = h.connect(echo).await.unwrap();
    assert_eq!(echo_round_trip(&mut stream, b"ok").await, b"ok");
}

#[tokio::test]
async fn broken_connections_are_not_reused() {
    let h = Harness::new().await;
    let (echo, _task) = echo_server().await;
    h.serve_target(echo);
    let mut stream = h.connect(echo).await.unwrap();
    assert_eq!(echo_round_trip(&mut stream, b"one").await, b"one");
    drop(stream);
    for task in h.server_tasks.lock().drain(..) {
        task.abort();
    }
    let deadline = Instant::now() + patience();
    while h.pool.stats().connections != 0 {
        assert!(Instant::now() < deadline, "{:?}", h.pool.stats());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut stream = h.connect(echo).await.unwrap();
    assert_eq!(echo_round_trip(&mut stream, b"two").await, b"two");
    assert_eq!(h.pool.stats().handshakes, 2);
}

/// Sends one raw request over a fresh HBONE connection and returns the status.
async fn raw_status(h: &Harness, request: http::Request<()>) -> http::StatusCode {
    let tls = tls_to_server(h, weft_client_config(h)).await;
    let (mut send, connection) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(connection);
    let (response, _body) = send.send_request(request, true).unwrap();
    timeout(patience(), response)
        .await
        .unwrap()
        .unwrap()
        .status()
}

/// Weft's client configuration for the harness's client, expecting its server.
fn weft_client_config(h: &Harness) -> Arc<rustls::ClientConfig> {
    client_config(
        Arc::<TestCerts>::clone(&h.client_certs),
        h.client_id.clone(),
        h.server_id.clone(),
    )
    .unwrap()
}

/// A TLS connection to the harness's server, made with `config`.
async fn tls_to_server(
    h: &Harness,
    config: Arc<rustls::ClientConfig>,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(h.server_addr).await.unwrap();
    tokio_rustls::TlsConnector::from(config)
        .connect(tls::server_name(h.server_addr), tcp)
        .await
        .expect("TLS handshake with the harness's server")
}

/// HTTP/2 over `tls`, then `CONNECT target`, answered `200`: the request handle (keep it
/// to keep the connection), the response, and the stream's sending half.
async fn open_connect(
    tls: tokio_rustls::client::TlsStream<TcpStream>,
    target: SocketAddr,
) -> (
    h2::client::SendRequest<bytes::Bytes>,
    http::Response<h2::RecvStream>,
    h2::SendStream<bytes::Bytes>,
) {
    let (mut send, connection) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(connection);
    let request = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(target.to_string())
        .body(())
        .unwrap();
    let (response, body_out) = send.send_request(request, false).unwrap();
    let response = timeout(patience(), response).await.unwrap().unwrap();
    assert_eq!(response.status(), http::StatusCode::OK);
    (send, response, body_out)
}

#[tokio::test]
async fn other_methods_get_405_and_bad_targets_400() {
    let h = Harness::new().await;
    let get = http::Request::get("https://10.0.0.1:80/").body(()).unwrap();
    assert_eq!(
        raw_status(&h, get).await,
        http::StatusCode::METHOD_NOT_ALLOWED
    );
    let by_name = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri("example.com:80")
        .body(())
        .unwrap();
    assert_eq!(raw_status(&h, by_name).await, http::StatusCode::BAD_REQUEST);
    assert!(h.handler.seen.lock().is_empty());
}

#[test]
fn connect_requests_carry_authority_and_headers() {
    let request = ConnectRequest {
        target: "[fd00::5%3]:8080".parse().unwrap(),
        source: "[fd00::7]:5000".parse().unwrap(),
        baggage: None,
        traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
    };
    let built = client::build_request(&request).unwrap();
    assert_eq!(built.method(), http::Method::CONNECT);
    assert_eq!(built.uri().to_string(), "[fd00::5]:8080");
    assert_eq!(built.headers()[FORWARDED], "for=\"[fd00::7]\"");
    assert!(!built.headers().contains_key(BAGGAGE));
    assert!(built.headers().contains_key(TRACEPARENT));
}

/// How long a wait may take: 10 s, scaled by `WEFT_TEST_PATIENCE_MS`.
fn patience() -> Duration {
    weft_test_env::scaled(Duration::from_secs(10))
}
