//! Routing: weighted splits and their changes, matches, filters, mirrors, targets.

use super::*;

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
    // The connection and its CONNECT stream.
    let idle = h.waypoint.drain().open();
    let mut slow = JoinSet::new();
    for _ in 0..20 {
        let client = client.clone();
        slow.spawn(async move { client.call("GET", "/slow", &[("x-delay-ms", "1500")]).await });
    }
    // Every slow request has reached v1 before the weights change.
    let deadline = Instant::now() + patience();
    while h.backend("v1").count.load(Ordering::SeqCst) < 20 {
        assert!(Instant::now() < deadline, "slow requests did not arrive");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    h.set_routes(vec![route(vec![rule(vec![], &[("v1", 0), ("v2", 100)])])]);
    assert_eq!(
        h.waypoint.drain().open(),
        idle + 20,
        "the slow requests are in flight"
    );
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
    until("the slow requests are done", || {
        h.waypoint.drain().open() == idle
    })
    .await;
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
    let seen = h.backend("web").seen.lock()[0].clone();
    assert_eq!(seen.path_and_query, "/api/v2/users?page=2");
    assert_eq!(seen.headers["host"], "internal.web");
    assert_eq!(seen.headers["x-set"], "set");
    assert_eq!(seen.headers["x-added"], "added");
    assert!(!seen.headers.contains_key("x-remove"));
    // Trace context: same trace, the waypoint's span as the parent of the backend's.
    let forwarded = seen.headers["traceparent"].to_str().unwrap();
    assert!(forwarded.starts_with("00-0af7651916cd43dd8448eb211c80319c-"));
    assert!(!forwarded.contains("b7ad6b7169203331"));
    let spans = h.spans.lock();
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
            .iter()
            .all(|p| *p == id("waypoint"))
    );
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
    let deadline = Instant::now() + patience();
    while h.backend("shadow").count.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "the mirror got no copy");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let copy = h.backend("shadow").seen.lock()[0].clone();
    assert_eq!(copy.path_and_query, "/mirrored?x=1");
    assert_eq!(copy.method, "GET");
    assert_eq!(h.backend("primary").count.load(Ordering::SeqCst), 1);
    assert_eq!(h.requests_by_code(), BTreeMap::from([(200, 1)]));
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
