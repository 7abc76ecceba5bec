//! The waypoint end to end (issue "Waypoint: L7 weighted routing and policy"): a client
//! pod on node 1 calls a service VIP; node 1's agent sends the connection over HBONE to the
//! waypoint pod (on node 1, outside the mesh, running the real `weft waypoint`), which
//! routes each HTTP request by the Gateway API routes of its state file and forwards it
//! over HBONE to a backend pod on node 2, whose agent admits it because it comes from the
//! waypoint's identity. What the applications send and receive is asserted, and what the
//! waypoint counted.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use weft_tests::{
    Service, TestAgent, TestNode, TestPod, TestWaypoint, eventually,
    l7::{self, GrpcCall, GrpcLoad, GrpcMode, HttpLoad, HttpServe, HttpServer},
    metrics::Scrape,
    privileged,
    sys::kill,
    test_name, waypoint,
};

/// Node 1: the client and the waypoint. Node 2: the backends v1, v2, a flaky one, a
/// shadow (mirror target) and a gRPC server. Fields drop in order: processes first, then
/// agents, then the nodes.
struct Mesh {
    waypoint: TestWaypoint,
    servers: Vec<HttpServer>,
    _grpc: l7::GrpcServer,
    agent1: TestAgent,
    agent2: TestAgent,
    client: TestPod,
    v1: TestPod,
    _v2: TestPod,
    _flaky: TestPod,
    _shadow: TestPod,
    _wp_pod: TestPod,
    _collector: TestPod,
    node1: TestNode,
    node2: TestNode,
}

impl Mesh {
    fn new(test: &str, routes: Value, policies: Value) -> Result<Self> {
        Self::with_waypoint_args(test, routes, policies, &[])
    }

    /// [`Mesh::new`] with more `weft waypoint` flags.
    fn with_waypoint_args(
        test: &str,
        routes: Value,
        policies: Value,
        args: &[&str],
    ) -> Result<Self> {
        let node1 = TestNode::new(test, 1)?;
        let node2 = TestNode::new(test, 2)?;
        node1.connect(&node2)?;
        let client = node1.pod("client").service_account("client").create()?;
        let wp_pod = TestWaypoint::pod(&node1, WAYPOINT)?;
        // An OTLP/HTTP collector outside the mesh: the test app records each POST.
        let collector = node1.pod("collector").enrolled(false).create()?;
        let backend = |name: &str| {
            node2
                .pod(name)
                .service_account("reviews")
                .label("app", "reviews")
                .label("version", name)
                .create()
        };
        let (v1, v2, flaky, shadow) = (
            backend("v1")?,
            backend("v2")?,
            backend("flaky")?,
            backend("shadow")?,
        );
        for node in [&node1, &node2] {
            node.add_service(service("reviews", 20, PORT, &[&v1, &v2], Some(WAYPOINT)));
            node.add_service(service("reviews-v1", 21, PORT, &[&v1], None));
            node.add_service(service("reviews-v2", 22, PORT, &[&v2], None));
            node.add_service(service("flaky", 23, PORT, &[&flaky], None));
            node.add_service(service("shadow", 24, PORT, &[&shadow], None));
            node.add_service(service("grpc", 25, GRPC_PORT, &[&v1], Some(WAYPOINT)));
            node.add_service(service("grpc-v1", 26, GRPC_PORT, &[&v1], None));
            node.set_waypoints(json!([{
                "name": WAYPOINT, "serviceAccount": WAYPOINT, "ips": [wp_pod.ip().to_string()],
            }]));
            node.set_policies(policies.clone());
        }
        let agent1 = node1.start_agent()?;
        let agent2 = node2.start_agent()?;
        let servers = vec![
            l7::http_serve(
                &v1,
                &HttpServe::new(APP_PORT, "v1")
                    .delay(slow())
                    .delay_path("/slow"),
            )?,
            l7::http_serve(
                &v2,
                &HttpServe::new(APP_PORT, "v2")
                    .delay(slow())
                    .delay_path("/slow"),
            )?,
            l7::http_serve(&flaky, &HttpServe::new(APP_PORT, "flaky").fail_every(2))?,
            l7::http_serve(&shadow, &HttpServe::new(APP_PORT, "shadow"))?,
            l7::http_serve(&collector, &HttpServe::new(OTLP_PORT, "collector"))?,
        ];
        let grpc = l7::grpc_serve(&v1, GRPC_APP_PORT, "grpc-v1")?;
        let otlp = format!("http://{}", collector.addr(OTLP_PORT));
        let args = [&["--otlp-endpoint", otlp.as_str()], args].concat();
        let waypoint = TestWaypoint::start_with_args(&node1, &wp_pod, WAYPOINT, routes, &args)?;
        Ok(Mesh {
            waypoint,
            servers,
            _grpc: grpc,
            agent1,
            agent2,
            client,
            v1,
            _v2: v2,
            _flaky: flaky,
            _shadow: shadow,
            _wp_pod: wp_pod,
            _collector: collector,
            node1,
            node2,
        })
    }

    fn server(&self, name: &str) -> &HttpServer {
        self.servers
            .iter()
            .find(|s| s.name == name)
            .expect("a backend of this name")
    }

    /// Replaces the waypoint's routes and waits until its config dump shows them.
    fn set_routes(&self, routes: Value, shows: &str) -> Result<()> {
        self.waypoint.write_config(&self.node1, routes)?;
        eventually(Duration::from_secs(10), || {
            let dump = self.waypoint.config_dump()?.to_string();
            ensure!(dump.contains(shows), "routes not applied yet");
            Ok(())
        })
    }

    /// `waypoint`'s requests_total for these labels.
    fn requests(&self, labels: &[(&str, &str)]) -> Result<f64> {
        Ok(Scrape::parse(&self.waypoint.metrics()?).sum("weft_requests_total", labels))
    }
}

#[test]
fn a_90_10_canary_holds_over_2000_requests_and_a_weight_change_drops_nothing() -> Result<()> {
    privileged!();
    let mesh = Mesh::new(test_name!(), json!([split_route(90, 10)]), json!([]))?;
    let report = HttpLoad::new(vip(20, PORT), 2_000)
        .concurrency(8)
        .run(&mesh.client)?;
    ensure!(
        report.status(200) == 2_000,
        "every request answered 200: {report:?}"
    );
    let v1 = report.backend("v1") as f64 / 20.0;
    println!(
        "90/10 split over 2,000 requests: v1 {v1:.1} %, v2 {:.1} %",
        100.0 - v1
    );
    ensure!(
        (87.0..=93.0).contains(&v1),
        "v1 got {v1:.1} % of 2,000, not 90 ± 3"
    );
    // What the waypoint counted is what the client sent, with Istio's labels.
    let counted = mesh.requests(&[
        ("reporter", "waypoint"),
        ("response_code", "200"),
        ("destination_service_name", "reviews"),
        (
            "source_principal",
            "spiffe://cluster.local/ns/default/sa/client",
        ),
    ])?;
    ensure!(
        counted == 2_000.0,
        "waypoint counted {counted} requests, the client sent 2,000"
    );
    eventually(Duration::from_secs(10), || {
        let lines = mesh.waypoint.access_log().len();
        ensure!(
            lines == 2_000,
            "{lines} access-log lines for 2,000 requests"
        );
        Ok(())
    })?;

    // Requests in flight (held by the backends) when the weights change all complete; new
    // requests follow the new weights at once.
    let slow = HttpLoad::new(vip(20, PORT), 20)
        .concurrency(20)
        .path("/slow")
        .start(&mesh.client)?;
    let backends = [mesh.server("v1"), mesh.server("v2")];
    eventually(Duration::from_secs(10), || {
        let held: usize = backends.iter().map(|b| b.held().len()).sum();
        ensure!(
            held == 20,
            "the backends hold {held} of the 20 slow requests"
        );
        Ok(())
    })?;
    mesh.set_routes(json!([split_route(0, 100)]), "\"weight\":0")?;
    let answered: usize = backends.iter().map(|b| b.requests().len()).sum();
    ensure!(
        answered == 2_000,
        "no slow request was answered before the new weights applied: {} answered",
        answered.saturating_sub(2_000)
    );
    let after = HttpLoad::new(vip(20, PORT), 200)
        .concurrency(4)
        .run(&mesh.client)?;
    ensure!(
        after.backend("v2") == 200,
        "after the change every new request goes to v2: {after:?}"
    );
    let slow = slow.finish()?;
    ensure!(
        slow.status(200) == 20 && slow.failed() == 0,
        "in-flight requests survive the weight change: {slow:?}"
    );
    Ok(())
}

/// SIGTERM under HTTP/1.1 load: every request in flight (held by the backend) when the
/// signal comes completes, the waypoint says it drains, and it exits once they have ended,
/// having cut nothing.
#[test]
fn sigterm_fails_no_request_in_flight() -> Result<()> {
    privileged!();
    let mut mesh = Mesh::new(test_name!(), json!([split_route(100, 0)]), json!([]))?;
    let slow = HttpLoad::new(vip(20, PORT), 20)
        .concurrency(20)
        .path("/slow")
        .start(&mesh.client)?;
    let v1 = mesh.server("v1");
    eventually(Duration::from_secs(10), || {
        let held = v1.held().len();
        ensure!(held == 20, "v1 holds {held} of the 20 slow requests");
        Ok(())
    })?;
    let pid = mesh.waypoint.pid().context("waypoint running")?;
    kill(pid, libc::SIGTERM);
    eventually(Duration::from_secs(10), || {
        let scrape = Scrape::parse(&mesh.waypoint.metrics()?);
        ensure!(
            scrape.sum("weft_waypoint_draining", &[]) == 1.0,
            "not draining yet"
        );
        Ok(())
    })?;
    let slow = slow.finish()?;
    ensure!(
        slow.status(200) == 20 && slow.failed() == 0,
        "requests in flight at SIGTERM complete: {slow:?}"
    );
    let status = mesh.waypoint.wait_exit(Duration::from_secs(30))?;
    let log = mesh.waypoint.log();
    ensure!(status.success(), "the waypoint exited {status}:\n{log}");
    ensure!(
        log.contains("drained: every connection and request ended"),
        "the waypoint did not drain to the end:\n{log}"
    );
    Ok(())
}

/// The waypoint replaced as its Deployment's rolling update does, under HTTP/1.1 and gRPC
/// load: a new waypoint pod (same service account) becomes ready, then the old pod gets
/// SIGTERM and, as Kubernetes does at the same time, the waypoint's address moves to the
/// new pod in the agents' config. Not one request or call fails: the old waypoint accepts
/// on for its `--listen-grace` while the agents catch up, then finishes what it has
/// (HTTP/1.1 closes after the response, HTTP/2 and HBONE get GOAWAY); the clients come
/// back through the agent to the new one (a gRPC call the old one never processed is sent
/// again, as gRPC clients do), and the old one exits once it has served everything,
/// having cut nothing.
#[test]
fn a_replaced_waypoint_fails_no_request_and_no_call() -> Result<()> {
    privileged!();
    let routes = json!([split_route(100, 0), grpc_route()]);
    let grace = format!("{}ms", listen_grace().as_millis());
    let mut mesh = Mesh::with_waypoint_args(
        test_name!(),
        routes.clone(),
        json!([]),
        &["--listen-grace", &grace],
    )?;
    let mut http = HttpLoad::new(vip(20, PORT), HTTP_REQUESTS)
        .concurrency(4)
        .pace(Duration::from_millis(50))
        .start(&mesh.client)?;
    let mut grpc = GrpcLoad::new(vip(25, GRPC_PORT), GRPC_CALLS)
        .concurrency(4)
        .messages(5, Duration::from_millis(40))
        .start(&mesh.client)?;
    let served = |waypoint: &TestWaypoint, protocol| -> Result<f64> {
        Ok(Scrape::parse(&waypoint.metrics()?)
            .sum("weft_requests_total", &[("request_protocol", protocol)]))
    };
    eventually(Duration::from_secs(10), || {
        let (h, g) = (
            served(&mesh.waypoint, "http")?,
            served(&mesh.waypoint, "grpc")?,
        );
        ensure!(
            h > 0.0 && g > 0.0,
            "not both loads through the waypoint yet: {h} {g}"
        );
        Ok(())
    })?;

    let next_pod = mesh
        .node1
        .pod("waypoint-next")
        .service_account(WAYPOINT)
        .enrolled(false)
        .create()?;
    let next = TestWaypoint::start(&mesh.node1, &next_pod, WAYPOINT, routes.clone())?;
    let pid = mesh.waypoint.pid().context("waypoint running")?;
    kill(pid, libc::SIGTERM);
    let signalled = std::time::Instant::now();
    let moved = json!([{
        "name": WAYPOINT, "serviceAccount": WAYPOINT, "ips": [next_pod.ip().to_string()],
    }]);
    for (node, agent) in [(&mesh.node1, &mesh.agent1), (&mesh.node2, &mesh.agent2)] {
        node.set_waypoints(moved.clone());
        agent.reload_and_wait(node)?;
    }
    next.write_config(&mesh.node1, routes)?;
    ensure!(
        signalled.elapsed() < listen_grace(),
        "the agents took {:?} to see the new waypoint, longer than the listen grace: \
         the test would not show what the grace is for",
        signalled.elapsed()
    );
    eventually(listen_grace() + Duration::from_secs(5), || {
        let draining = mesh
            .waypoint
            .log()
            .contains("draining: accepting no connection");
        ensure!(draining, "the old waypoint does not drain yet");
        Ok(())
    })?;
    if !(http.running() && grpc.running()) {
        bail!(
            "a load ended before the old waypoint drained (it failed, or proved nothing): \
             HTTP/1.1 {:?}, gRPC {:?}",
            http.finish(),
            grpc.finish()
        );
    }

    let status = mesh.waypoint.wait_exit(Duration::from_secs(30))?;
    let log = mesh.waypoint.log();
    ensure!(
        status.success() && log.contains("drained: every connection and request ended"),
        "the old waypoint did not drain to the end ({status}):\n{log}"
    );
    let http = http.finish()?;
    eprintln!("replaced waypoint: HTTP/1.1 load: {http:?}");
    ensure!(
        http.status(200) == HTTP_REQUESTS && http.failed() == 0,
        "every HTTP/1.1 request answered 200 across the replacement: {http:?}"
    );
    let grpc = grpc.finish()?;
    eprintln!("replaced waypoint: gRPC load: {grpc:?}");
    ensure!(
        grpc.ok == GRPC_CALLS && grpc.failed == 0,
        "every gRPC call exact across the replacement: {grpc:?}"
    );
    let (h, g) = (served(&next, "http")?, served(&next, "grpc")?);
    ensure!(
        h > 0.0 && g > 0.0,
        "the new waypoint did not serve the rest of both loads: {h} {g}"
    );
    Ok(())
}

#[test]
fn matches_timeouts_retries_and_mirrors_behave_as_routed() -> Result<()> {
    privileged!();
    let mesh = Mesh::new(test_name!(), json!([rules_route()]), json!([]))?;
    let to = vip(20, PORT);
    let only = |load: HttpLoad, backend: &str| -> Result<()> {
        let r = load.run(&mesh.client)?;
        ensure!(
            r.backend(backend) == load.count && r.status(200) == load.count,
            "{} {} {:?} should all reach {backend}: {r:?}",
            load.method,
            load.path,
            load.headers
        );
        Ok(())
    };
    only(HttpLoad::new(to, 10).header("x-canary", "yes"), "v2")?;
    // Gateway API precedence: an exact path beats a prefix, more query matches beat fewer.
    only(HttpLoad::new(to, 10).path("/exact"), "v2")?;
    only(HttpLoad::new(to, 10).path("/exact/more"), "v1")?;
    only(HttpLoad::new(to, 10).path("/re/123"), "v2")?;
    only(HttpLoad::new(to, 10).path("/q?tier=gold"), "v2")?;
    only(HttpLoad::new(to, 10).method("DELETE").path("/q"), "v2")?;
    only(HttpLoad::new(to, 10).path("/q"), "v1")?;
    let unmatched = HttpLoad::new(to, 2).path("/re/abc").run(&mesh.client)?;
    ensure!(
        unmatched.status(404) == 2,
        "no rule matches: 404: {unmatched:?}"
    );

    // Timeout: the backend holds /slow for 3 s, the route allows 500 ms.
    let r = HttpLoad::new(to, 3).path("/slow").run(&mesh.client)?;
    println!(
        "request timeout 500 ms: 504 after {:.0} ms (max)",
        r.latency_ms.max
    );
    ensure!(r.status(504) == 3, "a timed-out request answers 504: {r:?}");
    // Not at the backend's pace: a waypoint that waited for the backend would answer after
    // `slow()` at the earliest.
    let slow_ms = slow().as_secs_f64() * 1_000.0;
    ensure!(
        (450.0..slow_ms).contains(&r.latency_ms.max),
        "504 arrives at the timeout, not before and not at the backend's pace \
         ({slow_ms:.0} ms): {r:?}"
    );

    // Retry: the flaky backend fails every other request with 503.
    let r = HttpLoad::new(to, 20).path("/flaky").run(&mesh.client)?;
    ensure!(
        r.status(200) == 20,
        "retries turn every 503 into a 200: {r:?}"
    );
    let tries = mesh.server("flaky").requests().len();
    ensure!(
        tries > 20,
        "the flaky backend saw the retries: {tries} tries for 20 requests"
    );

    // Mirror: the client sees v1's answers only; the shadow gets a copy of each.
    let r = HttpLoad::new(to, 10).path("/mirror").run(&mesh.client)?;
    ensure!(
        r.backend("v1") == 10,
        "the client sees the primary only: {r:?}"
    );
    let copies = mesh.server("shadow").wait_requests(10);
    ensure!(
        copies.iter().all(|c| c.path == "/mirror"),
        "the shadow got the mirrored requests: {copies:?}"
    );

    // Filters: a header set on the way in, a rewrite of the prefix, a redirect.
    let r = HttpLoad::new(to, 1).path("/old/page").run(&mesh.client)?;
    let echo = r
        .first
        .as_ref()
        .and_then(|f| f.echo())
        .context("an echoed request")?;
    ensure!(
        echo.path == "/new/page",
        "URL rewrite replaced the prefix: {echo:?}"
    );
    ensure!(
        echo.header("x-routed-by") == Some("weft"),
        "request header set: {echo:?}"
    );
    let r = HttpLoad::new(to, 1).path("/moved").run(&mesh.client)?;
    let first = r.first.as_ref().context("a response")?;
    ensure!(
        first.status == 301 && first.header("location") == Some("http://reviews.example/new"),
        "redirect: {first:?}"
    );
    Ok(())
}

#[test]
fn grpc_unary_and_streaming_calls_keep_their_trailers() -> Result<()> {
    privileged!();
    let mesh = Mesh::new(test_name!(), json!([grpc_route()]), json!([]))?;
    for (mode, messages) in [
        (GrpcMode::Unary, 1),
        (GrpcMode::ServerStream, 5),
        (GrpcMode::Bidi, 5),
    ] {
        let r = GrpcCall::new(vip(25, GRPC_PORT), mode)
            .messages(messages)
            .run(&mesh.client)?;
        // Each message echoed once (a server stream repeats the one message).
        let sent: Vec<String> = match mode {
            GrpcMode::Bidi => (0..messages).map(|i| format!("msg-{i}")).collect(),
            _ => vec!["msg-0".to_owned(); messages as usize],
        };
        ensure!(
            r.grpc_status.as_deref() == Some("0")
                && r.grpc_message.as_deref() == Some("ok")
                && r.trailer("x-trailer").is_some()
                && r.messages_received == messages
                && r.messages == sent,
            "{mode:?}: status, message, custom trailer and exactly the {messages} messages \
             pass intact: {r:?}"
        );
    }
    let r = GrpcCall::new(vip(25, GRPC_PORT), GrpcMode::Unary)
        .method("/weft.test.Echo/Fail")
        .run(&mesh.client)?;
    ensure!(
        r.grpc_status.as_deref() == Some("13"),
        "a failed call keeps its status: {r:?}"
    );
    let failed = mesh.requests(&[("request_protocol", "grpc"), ("grpc_response_status", "13")])?;
    ensure!(
        failed == 1.0,
        "the waypoint counted the failed call by its gRPC status: {failed}"
    );
    Ok(())
}

#[test]
fn an_l7_deny_blocks_post_admin_and_allows_get_even_to_a_pod_ip() -> Result<()> {
    privileged!();
    let policies = json!([{
        "name": "no-admin-writes",
        "selector": { "matchLabels": { "app": "reviews" } },
        "action": "DENY",
        "rules": [{ "methods": ["POST"], "paths": ["/admin", "/admin/*"] }],
    }]);
    let mesh = Mesh::new(test_name!(), json!([split_route(100, 0)]), policies)?;
    let pod_ip: SocketAddr = mesh.v1.addr(APP_PORT).into();
    for to in [vip(20, PORT), pod_ip] {
        let post = HttpLoad::new(to, 5)
            .method("POST")
            .path("/admin")
            .run(&mesh.client)?;
        ensure!(
            post.status(403) == 5,
            "POST /admin via {to} is denied: {post:?}"
        );
        let get = HttpLoad::new(to, 5).run(&mesh.client)?;
        ensure!(get.status(200) == 5, "GET / via {to} is allowed: {get:?}");
    }
    ensure!(
        mesh.server("v1")
            .requests()
            .iter()
            .all(|r| r.method != "POST"),
        "no denied request reached the application"
    );
    Ok(())
}

#[test]
fn trace_context_is_propagated_to_the_backend() -> Result<()> {
    privileged!();
    let mesh = Mesh::new(test_name!(), json!([split_route(100, 0)]), json!([]))?;
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let r = HttpLoad::new(vip(20, PORT), 1)
        .header("traceparent", parent)
        .run(&mesh.client)?;
    let echo = r
        .first
        .as_ref()
        .and_then(|f| f.echo())
        .context("an echoed request")?;
    let seen = echo
        .header("traceparent")
        .context("traceparent reached the backend")?;
    ensure!(
        seen.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-")
            && !seen.contains("00f067aa0ba902b7"),
        "same trace, the waypoint's span as parent: {seen}"
    );
    let r = HttpLoad::new(vip(20, PORT), 1)
        .header("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1")
        .run(&mesh.client)?;
    let echo = r
        .first
        .as_ref()
        .and_then(|f| f.echo())
        .context("an echoed request")?;
    ensure!(
        echo.header("b3")
            .is_some_and(|b3| b3.starts_with("80f198ee56343ba864fe8b2a57d3eff7-")),
        "B3 propagated in its own format: {echo:?}"
    );
    let log = mesh.waypoint.access_log();
    ensure!(
        log.iter()
            .any(|l| l.to_string().contains("4bf92f3577b34da6a3ce929d0e0e4736")),
        "the access log carries the trace id"
    );
    // The spans went to the collector as OTLP/HTTP JSON (batched within a second).
    let posts = mesh.server("collector").wait_requests(1);
    ensure!(
        posts.iter().all(|p| p.method == "POST"
            && p.path == "/v1/traces"
            && p.header("content-type") == Some("application/json")
            && p.body_bytes > 0),
        "OTLP export requests: {posts:?}"
    );
    // One span per request (both sampled), batched: exported within the batch interval.
    eventually(Duration::from_secs(10), || {
        let exported =
            Scrape::parse(&mesh.waypoint.metrics()?).sum("weft_otlp_spans_exported_total", &[]);
        ensure!(
            exported == 2.0,
            "the waypoint counted {exported} exported spans, not the 2 of 2 requests"
        );
        Ok(())
    })?;
    Ok(())
}

fn service(
    name: &str,
    vip_host: u8,
    port: u16,
    endpoints: &[&TestPod],
    waypoint: Option<&str>,
) -> Service {
    let target = if port == GRPC_PORT {
        GRPC_APP_PORT
    } else {
        APP_PORT
    };
    Service {
        name: name.into(),
        namespace: "default".into(),
        vips: vec![std::net::Ipv4Addr::new(10, 96, 0, vip_host)],
        ports: vec![(port, target)],
        endpoints: endpoints.iter().map(|p| p.ip()).collect(),
        waypoint: waypoint.map(str::to_owned),
    }
}

fn vip(host: u8, port: u16) -> SocketAddr {
    SocketAddr::from(([10, 96, 0, host], port))
}

fn backend(name: &str, weight: u32) -> Value {
    json!({ "name": name, "port": PORT, "weight": weight })
}

fn http_route(rules: Value) -> Value {
    waypoint::route("HTTPRoute", "reviews", "reviews", PORT, rules)
}

fn split_route(v1: u32, v2: u32) -> Value {
    http_route(json!([{ "backendRefs": [backend("reviews-v1", v1), backend("reviews-v2", v2)] }]))
}

fn rules_route() -> Value {
    let to = |name: &str| json!([backend(name, 1)]);
    http_route(json!([
        { "matches": [{ "headers": [{ "name": "x-canary", "value": "yes" }] }], "backendRefs": to("reviews-v2") },
        { "matches": [{ "path": { "type": "Exact", "value": "/exact" } }], "backendRefs": to("reviews-v2") },
        { "matches": [{ "path": { "type": "PathPrefix", "value": "/exact" } }], "backendRefs": to("reviews-v1") },
        { "matches": [{ "path": { "type": "RegularExpression", "value": "/re/[0-9]+" } }], "backendRefs": to("reviews-v2") },
        { "matches": [
            { "path": { "type": "PathPrefix", "value": "/q" }, "queryParams": [{ "name": "tier", "value": "gold" }] },
            { "path": { "type": "PathPrefix", "value": "/q" }, "method": "DELETE" },
          ], "backendRefs": to("reviews-v2") },
        { "matches": [{ "path": { "type": "PathPrefix", "value": "/q" } }], "backendRefs": to("reviews-v1") },
        { "matches": [{ "path": { "type": "PathPrefix", "value": "/slow" } }],
          "timeouts": { "request": "500ms" }, "backendRefs": to("reviews-v1") },
        { "matches": [{ "path": { "type": "PathPrefix", "value": "/flaky" } }],
          "retry": { "attempts": 2, "codes": [503], "backoff": "10ms" }, "backendRefs": to("flaky") },
        { "matches": [{ "path": { "type": "PathPrefix", "value": "/mirror" } }],
          "filters": [{ "type": "RequestMirror", "requestMirror": { "backendRef": { "name": "shadow", "port": PORT } } }],
          "backendRefs": to("reviews-v1") },
        { "matches": [{ "path": { "type": "PathPrefix", "value": "/old" } }],
          "filters": [
            { "type": "URLRewrite", "urlRewrite": { "path": { "type": "ReplacePrefixMatch", "replacePrefixMatch": "/new" } } },
            { "type": "RequestHeaderModifier", "requestHeaderModifier": { "set": [{ "name": "x-routed-by", "value": "weft" }] } },
          ],
          "backendRefs": to("reviews-v1") },
        { "matches": [{ "path": { "type": "PathPrefix", "value": "/moved" } }],
          "filters": [{ "type": "RequestRedirect", "requestRedirect": {
              "hostname": "reviews.example", "path": { "type": "ReplaceFullPath", "replaceFullPath": "/new" }, "statusCode": 301 } }] },
    ]))
}

fn grpc_route() -> Value {
    let rules = json!([{ "matches": [{ "method": { "service": "weft.test.Echo" } }],
                         "backendRefs": [{ "name": "grpc-v1", "port": GRPC_PORT }] }]);
    waypoint::route("GRPCRoute", "grpc", "grpc", GRPC_PORT, rules)
}

/// How long the backends hold requests to `/slow` (scaled: the weight change must apply
/// while they are held).
fn slow() -> Duration {
    weft_tests::scaled(Duration::from_secs(3))
}

/// The old waypoint's `--listen-grace` in the replacement test: longer than the agents
/// take to see the new one (checked).
fn listen_grace() -> Duration {
    weft_tests::scaled(Duration::from_secs(3))
}

const WAYPOINT: &str = "waypoint";
/// The replacement test's loads: about 15 s each (4 workers; 50 ms between requests, 200
/// ms per call), long enough to span the new waypoint's start, the grace and the drain
/// (checked).
const HTTP_REQUESTS: u64 = 1000;
const GRPC_CALLS: u64 = 300;
/// Service port and the backends' port.
const PORT: u16 = 80;
const APP_PORT: u16 = 8080;
const GRPC_PORT: u16 = 9090;
const GRPC_APP_PORT: u16 = 50051;
/// OTLP/HTTP's port.
const OTLP_PORT: u16 = 4318;
