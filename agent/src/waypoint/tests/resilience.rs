//! Timeouts, retries, upstream connection pooling and failures.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_timeout_answers_504_on_time() {
    let h = Harness::new(&["slow"]).await;
    // Room for the request to reach the backend first, even on a loaded machine.
    let limit = Duration::from_secs(1);
    h.set_routes(vec![route(vec![RouteRule {
        timeouts: Timeouts {
            request: Some(limit),
            backend_request: None,
        },
        ..rule(vec![], &[("slow", 1)])
    }])]);
    let client = h.h1().await;
    // Warm the upstream connection: the timed request goes straight to the backend.
    assert_eq!(client.get("/warm").await.status, StatusCode::OK);
    // The backend never answers in time: whatever answers is the waypoint's timer, and
    // no wall-clock upper bound is needed (without the timeout, `call` gives up after
    // `patience()` with "response in time").
    let reply = client
        .call("GET", "/sleepy", &[("x-delay-ms", FOREVER_MS)])
        .await;
    eprintln!("request timeout {limit:?}: 504 after {:?}", reply.elapsed);
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(
        reply.elapsed >= limit,
        "504 came early: {:?}",
        reply.elapsed
    );
    assert_eq!(
        h.backend("slow").count.load(Ordering::SeqCst),
        2,
        "the backend had the timed request (and still holds it)"
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
    // A streamed body of unknown length (gRPC-style, HTTP/2) is retried too: the copy
    // kept while the first try streamed is replayed.
    let Client::H2(mut sender) = h.h2().await else {
        unreachable!("h2 client")
    };
    for _ in 0..2 {
        let (tx, rx) = mpsc::channel(4);
        let request = Request::builder()
            .method("POST")
            .uri("http://echo.default/stream")
            .body(ChannelBody(rx).boxed_unsync())
            .unwrap();
        let sent = tokio::spawn(async move {
            for chunk in [&b"abc"[..], b"defg", b"hi"] {
                tx.send(Frame::data(Bytes::from_static(chunk)))
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, Bytes::from_static(b"flaky POST /stream 9"));
        sent.await.unwrap();
    }
    assert_eq!(h.backend("flaky").count.load(Ordering::SeqCst), 24);
    assert_eq!(h.access_log().last().unwrap()["retries"], 1);
    // A body too big to keep is streamed once and never retried.
    let big = Bytes::from(vec![b'y'; 100 * 1024]);
    let reply = client.call_with_body("POST", "/big", &[], big).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(h.access_log().last().unwrap()["retries"], 0);
    assert_eq!(h.backend("flaky").count.load(Ordering::SeqCst), 25);
    assert_eq!(client.get("/even").await.status, StatusCode::OK);
    // Without a retry policy the client sees the 503.
    h.set_routes(vec![route(vec![rule(vec![], &[("flaky", 1)])])]);
    let statuses: Vec<u16> = [client.get("/a").await, client.get("/b").await]
        .iter()
        .map(|r| r.status.as_u16())
        .collect();
    assert_eq!(statuses, [503, 200]);
}

/// docs/waypoint.md: a try is not retried "when the backend's node proxy refused the
/// waypoint by policy (401), which another try would only repeat", whatever the rule's
/// retry policy says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_from_the_destination_proxy_is_not_retried() {
    let h = Harness::new(&["guarded"]).await;
    h.set_routes(vec![route(vec![RouteRule {
        retry: Some(Retry {
            attempts: 3,
            codes: vec![401, 503],
            backoff: Duration::from_millis(1),
        }),
        ..rule(vec![], &[("guarded", 1)])
    }])]);
    let backend = h.backend("guarded");
    let connects = || backend.connects.load(Ordering::SeqCst);
    *backend.refuse_connects.lock() = Some(hbone::Refusal::Denied);
    let client = h.h1().await;
    let reply = client.get("/denied").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{reply:?}");
    assert_eq!(
        connects(),
        1,
        "one CONNECT reached the destination's proxy: the 401 was not retried"
    );
    assert_eq!(
        backend.count.load(Ordering::SeqCst),
        0,
        "the app saw nothing"
    );
    let line = h.access_log().pop().unwrap();
    assert_eq!(
        (line["retries"].as_u64(), line["error"].as_str()),
        (Some(0), Some("policy_denied"))
    );
    // The same rule does retry a refusal that is not policy: 503 from the proxy, 1 + 3
    // tries.
    *backend.refuse_connects.lock() = Some(hbone::Refusal::Unreachable);
    assert_eq!(
        client.get("/unreachable").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(connects(), 1 + 4);
    assert_eq!(h.access_log().pop().unwrap()["retries"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_try_timeout_is_retried_within_the_request_timeout() {
    let h = Harness::new(&["sluggish"]).await;
    h.set_routes(vec![route(vec![RouteRule {
        timeouts: Timeouts {
            request: Some(Duration::from_secs(5)),
            // Room for each try to reach the backend, even on a loaded machine.
            backend_request: Some(Duration::from_millis(500)),
        },
        retry: Some(Retry {
            attempts: 1,
            codes: Vec::new(),
            backoff: Duration::from_millis(1),
        }),
        ..rule(vec![], &[("sluggish", 1)])
    }])]);
    let client = h.h2().await;
    // The first try never answers in time, the retry answers at once: an OK is the
    // retry's, which only the per-try timeout can have started.
    let reply = client
        .call("GET", "/slow-first", &[("x-delay-first-ms", FOREVER_MS)])
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert!(
        reply.elapsed >= Duration::from_millis(500),
        "{:?}",
        reply.elapsed
    );
    assert_eq!(h.backend("sluggish").count.load(Ordering::SeqCst), 2);
    assert_eq!(h.access_log().last().unwrap()["retries"], 1);
    // Both tries too slow: 504 once the retries are used up, before the request timeout.
    let reply = client
        .call("GET", "/slow", &[("x-delay-ms", FOREVER_MS)])
        .await;
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
    let _ = timeout(patience(), stream.read_to_end(&mut rest))
        .await
        .expect("closed");
    // Counted as the connection ends (just after the stream closes).
    let counted = "weft_waypoint_connection_errors_total{reason=\"downstream_http\"} 1";
    until("the failed connection is counted", || {
        h.registry.encode().unwrap().contains(counted)
    })
    .await;
    h.update(|s| {
        if let Some(echo) = s.services.get_mut(&svc(SERVICE)) {
            echo.endpoints = vec![h.backends["alive"].ip];
        }
    });
    assert_eq!(h.h2().await.get("/").await.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_reused_and_closed_once_idle() {
    let idle = Duration::from_secs(1);
    let h = Harness::with(&["pooled"], |config| config.upstream_idle_timeout = idle).await;
    let tunnels = || h.backend("pooled").peers.lock().len();
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
    until("idle upstream connections close", || {
        h.waypoint_pool.stats().streams == 0
    })
    .await;
    // And the next request opens a new one.
    assert_eq!(h1.get("/again").await.status, StatusCode::OK);
    assert_eq!(tunnels(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_dropping_its_idle_connections_costs_no_request() {
    let h = Harness::new(&["restarts"]).await;
    for client in [h.h1().await, h.h2().await] {
        for _ in 0..3 {
            assert_eq!(client.get("/before").await.status, StatusCode::OK);
            h.backend("restarts").drop_connections().await;
            let reply = client.get("/after").await;
            assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        }
    }
    // Every request after a drop came over a new CONNECT (and a new TLS connection).
    assert_eq!(h.backend("restarts").peers.lock().len(), 8);
}
