//! gRPC pass-through, L7 policy, and what metrics and the access log say.

use super::*;

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
        let frame = timeout(patience(), body.frame())
            .await
            .expect("echo before the stream ends")
            .unwrap()
            .unwrap();
        assert_eq!(frame.into_data().unwrap(), message);
    }
    drop(tx);
    let mut trailers = None;
    while let Some(frame) = timeout(patience(), body.frame()).await.unwrap() {
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
                        ..L7Match::default()
                    }),
                    ..Rule::default()
                }],
                invalid: None,
                external_services: vec![],
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
    // The mesh's access-log switch holds for the waypoint's namespace too.
    h.update(|s| s.mesh.access_log.enabled = false);
    assert_eq!(h1.get("/ok").await.status, StatusCode::OK);
    assert_eq!(h.access_log().len(), 37);
    assert_eq!(h.requests_by_code()[&200], 31);
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
