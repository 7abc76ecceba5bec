//! The L7 apps, app to app on loopback: what the end-to-end tests rely on, minus the mesh.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use ::http::{HeaderName, HeaderValue, Method};
use tokio::net::TcpListener;
use weft_tests::l7::{GrpcCallReport, HttpLoadReport, ServedCall, ServedRequest};

use crate::{grpc, http};

/// An `http-serve` on 127.0.0.1:0, and what it logged.
async fn http_backend(options: http::ServeOptions) -> (SocketAddr, Arc<Mutex<Vec<ServedRequest>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&log);
    tokio::spawn(http::serve_listener(listener, options, move |r| {
        sink.lock().unwrap().push(r.clone());
    }));
    (addr, log)
}

fn named(name: &str) -> http::ServeOptions {
    http::ServeOptions {
        name: name.to_owned(),
        ..Default::default()
    }
}

fn load(to: SocketAddr, count: u64) -> http::LoadOptions {
    http::LoadOptions {
        to,
        count,
        concurrency: 4,
        method: Method::GET,
        path: "/".to_owned(),
        headers: Vec::new(),
        http2: false,
        body_bytes: 0,
        slow_body: None,
        pace: Duration::ZERO,
        timeout: Duration::from_secs(10),
        tls: None,
        new_connections: false,
    }
}

async fn grpc_backend() -> (SocketAddr, Arc<Mutex<Vec<ServedCall>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&log);
    tokio::spawn(grpc::serve_listener(listener, "g1".to_owned(), move |c| {
        sink.lock().unwrap().push(c.clone());
    }));
    (addr, log)
}

fn call(to: SocketAddr, mode: grpc::Mode, messages: u64) -> grpc::CallOptions {
    grpc::CallOptions {
        to,
        mode,
        messages,
        method: None,
        headers: Vec::new(),
        pace: Duration::ZERO,
        timeout: Duration::from_secs(10),
        tls: None,
    }
}

/// The report survives its JSON line (what the harness parses).
fn round_trip<T: serde::Serialize + serde::de::DeserializeOwned>(report: &T) -> T {
    let line = format!("report {}", crate::json_line(report));
    serde_json::from_str(line.strip_prefix("report ").unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_every_other_request_over_http1_and_h2() {
    for http2 in [false, true] {
        let mut options = named("v1");
        options.fail_every = Some(2);
        let (addr, log) = http_backend(options).await;
        let mut options = load(addr, 20);
        options.http2 = http2;
        let report: HttpLoadReport = round_trip(&http::run_load(options).await);
        assert_eq!(report.sent, 20);
        assert_eq!(report.completed, 20, "{report:?}");
        assert_eq!(report.backend("v1"), 20);
        assert_eq!(report.status(200), 10);
        assert_eq!(report.status(503), 10);
        assert!(report.errors.is_empty(), "{report:?}");
        assert!(report.latency_ms.p50 <= report.latency_ms.p99);
        assert!(report.latency_ms.p99 <= report.latency_ms.max);
        let version = if http2 { "HTTP/2.0" } else { "HTTP/1.1" };
        let served = log.lock().unwrap().clone();
        assert_eq!(served.len(), 20);
        assert!(served.iter().all(|r| r.version == version), "{served:?}");
        assert_eq!(served.iter().filter(|r| r.status == 503).count(), 10);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_echo_shows_method_path_headers_and_body_length() {
    let (addr, _log) = http_backend(named("echo")).await;
    let mut options = load(addr, 1);
    options.method = Method::POST;
    options.path = "/items/7?color=red".to_owned();
    options.body_bytes = 1234;
    options.headers = vec![
        (
            HeaderName::from_static("x-a"),
            HeaderValue::from_static("1"),
        ),
        (
            HeaderName::from_static("x-a"),
            HeaderValue::from_static("2"),
        ),
        (
            HeaderName::from_static("traceparent"),
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        ),
    ];
    let report = http::run_load(options).await;
    let first = report.first.expect("a response");
    assert_eq!(first.header("x-backend"), Some("echo"));
    let echo = first.echo().expect("a JSON echo");
    assert_eq!(echo.method, "POST");
    assert_eq!(echo.path, "/items/7?color=red");
    assert_eq!(echo.body_bytes, 1234);
    assert_eq!(echo.headers["x-a"], ["1", "2"]);
    assert!(echo.header("traceparent").unwrap().starts_with("00-4bf9"));
    assert_eq!(echo.authority, Some(addr.to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_delay_path_is_slow_and_slow_bodies_arrive_whole() {
    let mut options = named("slow");
    options.delay = Some(Duration::from_millis(300));
    options.delay_path = Some("/slow".to_owned());
    let (addr, _log) = http_backend(options).await;

    let fast = http::run_load(load(addr, 4)).await;
    assert!(fast.latency_ms.max < 300.0, "{fast:?}");

    let mut slow = load(addr, 4);
    slow.path = "/slow/x".to_owned();
    slow.http2 = true;
    let slow = http::run_load(slow).await;
    assert_eq!(slow.status(200), 4);
    assert!(slow.latency_ms.p50 >= 300.0, "{slow:?}");

    let mut upload = load(addr, 2);
    upload.body_bytes = 100_000;
    upload.slow_body = Some(Duration::from_millis(200));
    let upload = http::run_load(upload).await;
    assert!(upload.latency_ms.p50 >= 200.0, "{upload:?}");
    assert_eq!(upload.first.unwrap().echo().unwrap().body_bytes, 100_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_can_ask_for_its_status_delay_and_body_size() {
    let (addr, log) = http_backend(named("asked")).await;
    let mut options = load(addr, 2);
    options.headers = vec![
        (
            HeaderName::from_static("x-testapp-status"),
            HeaderValue::from_static("502"),
        ),
        (
            HeaderName::from_static("x-testapp-delay-ms"),
            HeaderValue::from_static("250"),
        ),
        (
            HeaderName::from_static("x-testapp-response-bytes"),
            HeaderValue::from_static("4096"),
        ),
    ];
    let report = http::run_load(options).await;
    assert_eq!(report.status(502), 2, "{report:?}");
    assert!(report.latency_ms.p50 >= 250.0, "{report:?}");
    assert_eq!(report.first.unwrap().body.len(), 4096);
    assert!(log.lock().unwrap().iter().all(|r| r.status == 502));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_can_ask_for_no_answer_and_arrivals_are_timed() {
    let (addr, log) = http_backend(named("reset")).await;
    let mut options = load(addr, 3);
    options.concurrency = 1;
    options.headers = vec![(
        HeaderName::from_static("x-testapp-reset"),
        HeaderValue::from_static("1"),
    )];
    let report = http::run_load(options).await;
    assert_eq!(report.completed, 0, "{report:?}");
    assert_eq!(report.failed(), 3, "{report:?}");
    let log = log.lock().unwrap();
    assert!(log.iter().all(|r| r.status == 0), "{log:?}");
    assert!(
        log.windows(2).all(|w| w[0].received_us < w[1].received_us),
        "{log:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_errors_and_timeouts_are_counted_with_reasons() {
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let report = http::run_load(load(addr, 3)).await;
    assert_eq!(report.completed, 0);
    assert_eq!(report.errors.get("connect"), Some(&3), "{report:?}");
    assert!(report.error_messages[0].contains("connect"));

    let mut options = named("late");
    options.delay = Some(Duration::from_secs(5));
    let (addr, _log) = http_backend(options).await;
    let mut options = load(addr, 1);
    options.timeout = Duration::from_millis(200);
    let report = http::run_load(options).await;
    assert_eq!(report.errors.get("timeout"), Some(&1), "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_server_stream_and_bidi_end_with_trailers() {
    let (addr, log) = grpc_backend().await;

    let unary: GrpcCallReport = round_trip(&grpc::run_call(call(addr, grpc::Mode::Unary, 1)).await);
    assert_eq!(unary.error, None);
    assert_eq!(unary.messages, ["msg-0"]);
    assert_eq!(unary.http_status, Some(200));
    assert_eq!(unary.header("content-type"), Some("application/grpc"));
    assert_eq!(unary.header("x-backend"), Some("g1"));
    assert_eq!(unary.grpc_status.as_deref(), Some("0"));
    assert_eq!(unary.trailer("grpc-message"), Some("ok"));
    assert_eq!(unary.trailer("x-trailer"), Some("received=1"));

    let stream = grpc::run_call(call(addr, grpc::Mode::ServerStream, 5)).await;
    assert_eq!(stream.error, None);
    assert_eq!(stream.messages_sent, 1);
    assert_eq!(stream.messages_received, 5);
    assert_eq!(stream.grpc_status.as_deref(), Some("0"));

    let bidi = grpc::run_call(call(addr, grpc::Mode::Bidi, 4)).await;
    assert_eq!(bidi.error, None);
    assert_eq!(bidi.messages, ["msg-0", "msg-1", "msg-2", "msg-3"]);
    assert_eq!(bidi.trailer("x-trailer"), Some("received=4"));

    let calls = log.lock().unwrap().clone();
    assert_eq!(calls.len(), 3);
    assert_eq!(calls[0].path, "/weft.test.Echo/Unary");
    assert_eq!(calls[0].headers["te"], ["trailers"]);
    assert_eq!(calls[2].messages_received, 4);
}

/// A load's calls share one connection; a connection whose server refuses every stream
/// (REFUSED_STREAM: provably unprocessed) costs no call, only a retry on a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_load_shares_a_connection_and_sends_a_refused_call_again() {
    let (backend, log) = grpc_backend().await;
    let mut options = call(backend, grpc::Mode::Bidi, 3);
    let load = grpc::run_load(options.clone(), 12, 3).await;
    assert_eq!(
        (load.ok, load.failed, load.retried, load.connections),
        (12, 0, 0, 1),
        "{load:?}"
    );
    assert_eq!(log.lock().unwrap().len(), 12);

    // The first connection's server refuses every stream; later ones reach the backend.
    let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
    options.to = front.local_addr().unwrap();
    tokio::spawn(async move {
        let (first, _) = front.accept().await.unwrap();
        tokio::spawn(async move {
            let mut connection = h2::server::handshake(first).await.unwrap();
            while let Some(Ok((_, mut respond))) = connection.accept().await {
                respond.send_reset(h2::Reason::REFUSED_STREAM);
            }
        });
        while let Ok((mut client, _)) = front.accept().await {
            tokio::spawn(async move {
                let mut server = tokio::net::TcpStream::connect(backend).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            });
        }
    });
    let load = grpc::run_load(options, 12, 3).await;
    assert_eq!(
        (load.ok, load.failed, load.connections),
        (12, 0, 2),
        "{load:?}"
    );
    assert!((1..=3).contains(&load.retried), "{load:?}");
    assert_eq!(
        log.lock().unwrap().len(),
        24,
        "a refused call never reached the backend"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_fail_answers_13_in_trailers_and_other_services_12() {
    let (addr, _log) = grpc_backend().await;
    let mut options = call(addr, grpc::Mode::Unary, 1);
    options.method = Some("Fail".to_owned());
    let fail = grpc::run_call(options).await;
    assert_eq!(fail.error, None);
    assert_eq!(fail.http_status, Some(200));
    assert_eq!(fail.trailer("grpc-status"), Some("13"));
    assert_eq!(fail.grpc_status.as_deref(), Some("13"));
    assert_eq!(fail.messages_received, 0);

    let mut options = call(addr, grpc::Mode::Unary, 1);
    options.method = Some("/other.Svc/Call".to_owned());
    // Not a path of weft.test.Echo: a trailers-only UNIMPLEMENTED, status in the headers.
    let other = grpc::run_call(options).await;
    assert_eq!(other.trailers, None, "{other:?}");
    assert_eq!(other.grpc_status.as_deref(), Some("12"), "{other:?}");
}

/// A minimal h2c reverse proxy built on hyper (as the waypoint is): each downstream
/// connection gets an upstream connection, requests and responses stream through frame by
/// frame, trailers included.
async fn hyper_h2_proxy(to: SocketAddr) -> SocketAddr {
    use hyper::{body::Incoming, service::service_fn};
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let upstream = tokio::net::TcpStream::connect(to).await.unwrap();
                let (sender, connection) = hyper::client::conn::http2::handshake::<_, _, Incoming>(
                    TokioExecutor::new(),
                    TokioIo::new(upstream),
                )
                .await
                .unwrap();
                tokio::spawn(connection);
                let service = service_fn(move |req| {
                    let mut sender = sender.clone();
                    async move { sender.send_request(req).await }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_streams_and_trailers_pass_a_hyper_proxy() {
    let (backend, log) = grpc_backend().await;
    let proxy = hyper_h2_proxy(backend).await;

    let bidi = grpc::run_call(call(proxy, grpc::Mode::Bidi, 6)).await;
    assert_eq!(bidi.error, None, "{bidi:?}");
    assert_eq!(bidi.messages_received, 6);
    assert_eq!(bidi.trailer("x-trailer"), Some("received=6"));
    assert_eq!(bidi.grpc_status.as_deref(), Some("0"));

    let stream = grpc::run_call(call(proxy, grpc::Mode::ServerStream, 10)).await;
    assert_eq!(stream.messages_received, 10, "{stream:?}");

    let mut options = call(proxy, grpc::Mode::Unary, 1);
    options.method = Some("Fail".to_owned());
    let fail = grpc::run_call(options).await;
    assert_eq!(fail.trailer("grpc-status"), Some("13"), "{fail:?}");
    assert_eq!(fail.header("x-backend"), Some("g1"));
    assert_eq!(log.lock().unwrap().len(), 3);
}

#[tokio::test]
async fn a_grpc_call_to_nothing_reports_the_connect_error() {
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let report = grpc::run_call(call(addr, grpc::Mode::Unary, 1)).await;
    assert!(
        report.error.as_deref().unwrap().starts_with("connect"),
        "{report:?}"
    );
    assert_eq!(report.grpc_status, None);
}

#[test]
fn switches_take_no_value_and_headers_repeat() {
    let args: Vec<String> = [
        "--http2", "--header", "a:1", "--count", "3", "--header", "b: 2",
    ]
    .map(String::from)
    .to_vec();
    let flags = crate::Flags::parse(&args).unwrap();
    assert!(flags.switch("http2"));
    assert_eq!(flags.required::<u64>("count").unwrap(), 3);
    let headers = crate::header_flags(&flags).unwrap();
    assert_eq!(headers.len(), 2);
    assert_eq!(headers[1].1, "2");
}

#[cfg(feature = "jwt")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_serve_answers_tls13_with_the_file_as_it_is_now() {
    let tls = weft_tests::jwt::TlsFiles::for_ip("127.0.0.1".parse().unwrap()).unwrap();
    let file = tls.dir().join("jwks.json");
    std::fs::write(&file, r#"{"keys":["one"]}"#).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = crate::https::server_config(&tls.cert, &tls.key).unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&log);
    tokio::spawn(crate::https::serve_listener(
        listener,
        config,
        file.clone(),
        move |f| {
            sink.lock().unwrap().push(f.clone());
        },
    ));
    let ca = std::fs::read(&tls.ca).unwrap();
    let get = move |path: &'static str| {
        let ca = ca.clone();
        tokio::task::spawn_blocking(move || weft_tests::jwt::https_get(&ca, addr, path))
    };
    assert_eq!(
        get("/jwks.json").await.unwrap().unwrap(),
        r#"{"keys":["one"]}"#
    );
    // Rewritten: the next request gets the new content.
    std::fs::write(&file, r#"{"keys":["two"]}"#).unwrap();
    assert_eq!(get("/other").await.unwrap().unwrap(), r#"{"keys":["two"]}"#);
    let log = log.lock().unwrap().clone();
    assert_eq!(log.len(), 2, "{log:?}");
    assert_eq!((log[0].seq, log[0].path.as_str()), (1, "/jwks.json"));
    assert_eq!((log[1].seq, log[1].path.as_str()), (2, "/other"));
    assert!(
        log.iter()
            .all(|f| f.status == 200 && f.tls == "TLSv1_3" && f.bytes == 16)
    );
    assert_ne!(log[0].sha256, log[1].sha256);
    // A client that trusts another CA gets no answer.
    let other = weft_tests::jwt::TlsFiles::for_ip("127.0.0.1".parse().unwrap()).unwrap();
    let other_ca = std::fs::read(&other.ca).unwrap();
    let refused = tokio::task::spawn_blocking(move || {
        weft_tests::jwt::https_get(&other_ca, addr, "/jwks.json")
    })
    .await
    .unwrap();
    assert!(refused.is_err(), "{refused:?}");
}

#[cfg(feature = "jwt")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_load_over_tls_records_the_certificate_of_every_handshake() {
    let tls = weft_tests::jwt::TlsFiles::for_ip("127.0.0.1".parse().unwrap()).unwrap();
    let file = tls.dir().join("body.json");
    std::fs::write(&file, "{}").unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let to = listener.local_addr().unwrap();
    let config = crate::https::server_config(&tls.cert, &tls.key).unwrap();
    tokio::spawn(crate::https::serve_listener(listener, config, file, |_| {}));
    let leaf = weft_tests::tls::fingerprint_pem(&std::fs::read_to_string(&tls.cert).unwrap());
    let leaf = leaf.unwrap();
    let client = |sni: Option<&str>| {
        let mut args = vec!["--tls-ca".to_owned(), tls.ca.display().to_string()];
        if let Some(sni) = sni {
            args.extend(["--sni".to_owned(), sni.to_owned()]);
        }
        let flags = crate::Flags::parse(&args).unwrap();
        crate::ClientTls::from_flags(&flags, to, b"http/1.1")
            .unwrap()
            .map(Arc::new)
    };
    // Keep-alive: one handshake; a new connection per request: one each, none resumed.
    let kept = http::run_load(http::LoadOptions {
        concurrency: 1,
        tls: client(None),
        ..load(to, 3)
    })
    .await;
    assert_eq!(
        (kept.status(200), kept.certificates.clone()),
        (3, vec![leaf.clone()])
    );
    let fresh = http::run_load(http::LoadOptions {
        concurrency: 1,
        tls: client(None),
        new_connections: true,
        ..load(to, 3)
    })
    .await;
    assert_eq!(
        (fresh.status(200), fresh.certificates),
        (3, vec![leaf.clone(); 3])
    );
    // A name the certificate is not for: a TLS failure, and the certificate it was shown.
    let refused = http::run_load(http::LoadOptions {
        tls: client(Some("other.example")),
        ..load(to, 1)
    })
    .await;
    assert_eq!(refused.errors.get("tls"), Some(&1), "{refused:?}");
    assert_eq!(refused.certificates, vec![leaf]);
}
