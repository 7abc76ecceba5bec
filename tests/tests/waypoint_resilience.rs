//! Resilience at the waypoint (issue "Resilience and end-user auth at the waypoint"):
//! `TrafficPolicy` objects in the waypoint's state file limit what it sends to a Service
//! (connection pools and circuit breaking), inject faults into a route's requests and
//! rate-limit them. A client pod on node 1 calls Services bound to the waypoint (on node
//! 1); their backends run on node 2. What the client received, what the backends saw (at
//! most how many at once, on how many connections) and what the waypoint counted are
//! asserted.

use std::{collections::BTreeSet, net::SocketAddr, time::Duration};

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use weft_tests::{
    Service, TestAgent, TestNode, TestPod, TestWaypoint,
    l7::{self, HttpLoad, HttpServe, HttpServer},
    privileged, test_name, waypoint,
};

/// Node 1: the client and the waypoint. Node 2: a slow backend (`reviews`) and a flaky
/// one. Fields drop in order: processes first, then agents, then the nodes.
struct Mesh {
    waypoint: TestWaypoint,
    slow: HttpServer,
    flaky: HttpServer,
    _agents: [TestAgent; 2],
    client: TestPod,
    _pods: Vec<TestPod>,
    node1: TestNode,
    _node2: TestNode,
}

impl Mesh {
    fn new(test: &str) -> Result<Self> {
        let node1 = TestNode::new(test, 1)?;
        let node2 = TestNode::new(test, 2)?;
        node1.connect(&node2)?;
        let client = node1.pod("client").service_account("client").create()?;
        let wp_pod = TestWaypoint::pod(&node1, WAYPOINT)?;
        let slow = node2.pod("slow").service_account("reviews").create()?;
        let flaky = node2.pod("flaky").service_account("flaky").create()?;
        for node in [&node1, &node2] {
            node.add_service(service("reviews", 30, &slow));
            node.add_service(service("flaky", 31, &flaky));
            node.set_waypoints(json!([{
                "name": WAYPOINT, "serviceAccount": WAYPOINT, "ips": [wp_pod.ip().to_string()],
            }]));
        }
        let agents = [node1.start_agent()?, node2.start_agent()?];
        let slow_server = l7::http_serve(
            &slow,
            &HttpServe::new(APP_PORT, "reviews")
                .delay(hold())
                .delay_path("/slow"),
        )?;
        let flaky_server =
            l7::http_serve(&flaky, &HttpServe::new(APP_PORT, "flaky").fail_every(2))?;
        let waypoint = TestWaypoint::start(&node1, &wp_pod, WAYPOINT, routes())?;
        Ok(Mesh {
            waypoint,
            slow: slow_server,
            flaky: flaky_server,
            _agents: agents,
            client,
            _pods: vec![wp_pod, slow, flaky],
            node1,
            _node2: node2,
        })
    }

    /// Replaces the waypoint's traffic policies and waits until its config dump shows
    /// `shows`.
    fn set_policies(&self, policies: Value, shows: &str) -> Result<()> {
        let sections = json!({ "routes": routes(), "trafficPolicies": policies });
        self.waypoint.apply_sections(&self.node1, sections, shows)
    }

    fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        self.waypoint.metric(name, labels)
    }
}

#[test]
fn a_pool_of_10_refuses_40_of_50_concurrent_requests_at_once_and_the_backend_sees_10() -> Result<()>
{
    privileged!();
    let mesh = Mesh::new(test_name!())?;
    mesh.set_policies(
        json!([policy(
            "reviews-pool",
            "reviews",
            json!({ "maxConnections": 10, "maxPendingRequests": 0 })
        )]),
        "reviews-pool",
    )?;
    // Every client connection has its HBONE stream to the waypoint before the burst, so
    // the 503s' latency is the waypoint's answer, not a tunnel being set up.
    let warm = HttpLoad::new(vip(30), 10).run(&mesh.client)?;
    ensure!(warm.status(200) == 10, "warm-up: {warm:?}");

    let burst = HttpLoad::new(vip(30), 50)
        .concurrency(50)
        .path("/slow")
        .timeout(hold() * 4)
        .run(&mesh.client)?;
    let held = mesh.slow.requests();
    let held: Vec<_> = held.iter().filter(|r| r.path == "/slow").collect();
    let most = held.iter().map(|r| r.in_flight).max().unwrap_or(0);
    println!(
        "50 concurrent, pool of 10: {} × 200, {} × 503; 503 latency at the client p50 {:.2} ms, max {:.2} ms; backend peak {most} at once",
        burst.status(200),
        burst.status(503),
        burst.latency_by_status_ms.get(&503).map_or(0.0, |l| l.p50),
        burst.latency_by_status_ms.get(&503).map_or(0.0, |l| l.max),
    );
    ensure!(
        burst.status(200) == 10 && burst.status(503) == 40,
        "10 requests get a connection, the other 40 are refused: {burst:?}"
    );
    ensure!(
        held.len() == 10 && most == 10,
        "the backend saw the 10, at most 10 at once (peak {most}): {held:?}"
    );
    // Refused at once: well before the backend would have answered them.
    let refused = burst.latency_by_status_ms[&503];
    ensure!(
        refused.max < hold().as_secs_f64() * 1000.0 / 2.0,
        "503s were not queued behind the held requests: {refused:?}"
    );
    let uo = [("response_flags", "UO"), ("response_code", "503")];
    ensure!(
        mesh.metric("weft_requests_total", &uo)? == 40.0,
        "40 requests counted with flag UO"
    );
    // The waypoint's own time for each 503 (Istio's buckets). A refusal waits for nothing
    // but a CPU: in this debug build on two cores, 38 to 40 of the 40 are within 5 ms. The
    // test asserts what scheduling cannot make flaky (250 ms, an eighth of the hold),
    // and prints the rest; the release build's figure belongs to the benchmark.
    let within = |le: &str| {
        mesh.metric(
            "weft_request_duration_milliseconds_bucket",
            &[("response_flags", "UO"), ("le", le)],
        )
    };
    println!(
        "the waypoint's time for the 40 refusals: {} within 5 ms, {} within 25 ms",
        within("5.0")?,
        within("25.0")?
    );
    ensure!(
        within("250.0")? == 40.0,
        "every 503 answered by the waypoint without waiting"
    );
    let overflow = [
        ("destination_service_name", "reviews"),
        ("limit", "pending_requests"),
    ];
    ensure!(
        mesh.metric("weft_waypoint_overflows_total", &overflow)? == 40.0,
        "40 overflows counted for reviews"
    );
    let lines: Vec<_> = mesh
        .waypoint
        .access_log()
        .into_iter()
        .filter(|l| l["response_flags"] == "UO")
        .collect();
    ensure!(
        lines.len() == 40 && lines.iter().all(|l| l["error"] == "overflow"),
        "each refusal has its access-log line: {lines:?}"
    );

    // The pool frees as the held requests end: the next requests pass, on the
    // connections already open (no new one).
    let after = HttpLoad::new(vip(30), 20).run(&mesh.client)?;
    ensure!(after.status(200) == 20, "the pool frees: {after:?}");
    Ok(())
}

#[test]
fn max_requests_per_connection_and_max_retries_apply_per_service() -> Result<()> {
    privileged!();
    let mesh = Mesh::new(test_name!())?;
    // No policy: sequential requests share one backend connection, and the route's retry
    // turns each of the flaky backend's 503s into a 200.
    let peers = |from: usize| -> BTreeSet<String> {
        mesh.slow.requests()[from..]
            .iter()
            .map(|r| r.peer.clone())
            .collect()
    };
    let r = HttpLoad::new(vip(30), 5).run(&mesh.client)?;
    ensure!(r.status(200) == 5, "{r:?}");
    // Fewer connections than requests (a request may come before the last one's
    // connection is back in the pool).
    ensure!(peers(0).len() < 5, "kept-alive connections: {:?}", peers(0));
    let r = HttpLoad::new(vip(31), 10).run(&mesh.client)?;
    ensure!(r.status(200) == 10, "retries hide the 503s: {r:?}");

    mesh.set_policies(
        json!([
            policy(
                "one-each",
                "reviews",
                json!({ "maxRequestsPerConnection": 1 })
            ),
            policy("no-retries", "flaky", json!({ "maxRetries": 0 })),
        ]),
        "no-retries",
    )?;
    let before = mesh.slow.requests().len();
    let r = HttpLoad::new(vip(30), 5).run(&mesh.client)?;
    ensure!(r.status(200) == 5, "{r:?}");
    ensure!(
        peers(before).len() == 5,
        "a connection per request: {:?}",
        peers(before)
    );
    let tries_before = mesh.flaky.requests().len();
    let r = HttpLoad::new(vip(31), 10).run(&mesh.client)?;
    let tries = mesh.flaky.requests().len() - tries_before;
    ensure!(
        r.status(503) == 5 && r.status(200) == 5 && tries == 10,
        "no retry over maxRetries 0: the client sees every other 503 ({tries} tries): {r:?}"
    );
    let overflow = [("destination_service_name", "flaky"), ("limit", "retries")];
    ensure!(
        mesh.metric("weft_waypoint_overflows_total", &overflow)? == 5.0,
        "5 retries not made, counted"
    );
    Ok(())
}

#[test]
fn faults_abort_and_delay_their_share_and_a_rate_limit_answers_429_with_retry_after() -> Result<()>
{
    privileged!();
    let mesh = Mesh::new(test_name!())?;
    let on_rule = |rule: &str| json!({ "group": GATEWAY_GROUP, "kind": "HTTPRoute", "name": "reviews", "sectionName": rule });
    mesh.set_policies(
        json!([
            attached(
                "chaos",
                on_rule("faulty"),
                "fault",
                json!({ "abort": { "httpStatus": 503, "percentage": 10 } })
            ),
            attached(
                "slowdown",
                on_rule("delayed"),
                "fault",
                json!({ "delay": { "fixedDelay": "250ms", "percentage": 100 } })
            ),
            attached(
                "limit",
                on_rule("limited"),
                "rateLimit",
                json!({ "maxTokens": 5, "tokensPerFill": 1, "fillInterval": "10s" })
            ),
        ]),
        "slowdown",
    )?;

    // Aborts: 10 % of 2,000, within 3 points (σ ≈ 13 requests: 4.5 σ); the aborted ones
    // never reach the backend.
    let before = mesh.slow.requests().len();
    let r = HttpLoad::new(vip(30), 2_000)
        .concurrency(8)
        .path("/faulty")
        .run(&mesh.client)?;
    let (aborted, passed) = (r.status(503), r.status(200));
    let reached = mesh.slow.requests().len() - before;
    println!(
        "fault abort 10 %: {aborted} of 2000 answered 503 by the waypoint; the backend saw {reached}"
    );
    ensure!(
        aborted + passed == 2_000 && (140..=260).contains(&aborted),
        "10 % ± 3 aborted: {r:?}"
    );
    ensure!(
        reached as u64 == passed,
        "the backend saw only the passed ones: {reached}"
    );
    let fi = [("response_flags", "FI"), ("response_code", "503")];
    ensure!(
        mesh.metric("weft_requests_total", &fi)? == aborted as f64,
        "each abort counted with flag FI"
    );

    // Delays: every request of the rule held 250 ms; the others not.
    let delayed = HttpLoad::new(vip(30), 20)
        .path("/delayed")
        .run(&mesh.client)?;
    let plain = HttpLoad::new(vip(30), 20)
        .path("/plain")
        .run(&mesh.client)?;
    println!(
        "fault delay 250 ms: p50 {:.1} ms, max {:.1} ms (without: p50 {:.1} ms)",
        delayed.latency_ms.p50, delayed.latency_ms.max, plain.latency_ms.p50
    );
    ensure!(
        delayed.status(200) == 20 && plain.status(200) == 20,
        "{delayed:?} {plain:?}"
    );
    ensure!(
        delayed.latency_ms.p50 >= 250.0 && plain.latency_ms.p50 < 250.0,
        "delayed by the fault only: {delayed:?} {plain:?}"
    );
    let di = [("policy", "default/slowdown"), ("kind", "delay")];
    ensure!(mesh.metric("weft_waypoint_faults_injected_total", &di)? == 20.0);

    // Rate limit: 5 tokens, one more every 10 s: the first 5 pass, the rest get 429 with
    // the seconds until the next token (up to 10).
    let burst = HttpLoad::new(vip(30), 10)
        .path("/limited")
        .run(&mesh.client)?;
    ensure!(
        burst.status(200) == 5 && burst.status(429) == 5,
        "5 pass, 5 are limited: {burst:?}"
    );
    let refused = HttpLoad::new(vip(30), 1)
        .path("/limited")
        .run(&mesh.client)?;
    let answer = refused.first.as_ref().context("a response")?;
    let retry_after: u64 = answer
        .header("retry-after")
        .context("retry-after")?
        .parse()?;
    println!("rate limit: 429 with retry-after {retry_after}");
    ensure!(
        answer.status == 429 && (5..=10).contains(&retry_after),
        "429 says when a token is back: {answer:?}"
    );
    let rl = [("response_flags", "RL"), ("response_code", "429")];
    ensure!(mesh.metric("weft_requests_total", &rl)? == 6.0);
    Ok(())
}

fn policy(name: &str, service: &str, pool: Value) -> Value {
    let service = json!({ "group": "", "kind": "Service", "name": service });
    attached(name, service, "connectionPool", pool)
}

/// A TrafficPolicy attached to `target` that sets `feature`.
fn attached(name: &str, target: Value, feature: &str, value: Value) -> Value {
    json!({
        "apiVersion": "weft.dev/v1alpha1", "kind": "TrafficPolicy",
        "metadata": { "name": name, "namespace": "default" },
        "spec": { "targetRefs": [target], feature: value },
    })
}

/// `flaky`'s route retries; `reviews`' has named rules for the policies to target.
fn routes() -> Value {
    let flaky = json!([{
        "retry": { "attempts": 2, "codes": [503], "backoff": "10ms" },
        "backendRefs": [{ "name": "flaky", "port": PORT }],
    }]);
    let to_reviews = json!([{ "name": "reviews", "port": PORT }]);
    let rule = |name: &str| {
        json!({ "name": name, "matches": [{ "path": { "type": "PathPrefix", "value": format!("/{name}") } }],
                "backendRefs": to_reviews })
    };
    let reviews =
        json!([rule("faulty"), rule("delayed"), rule("limited"), { "backendRefs": to_reviews }]);
    json!([
        waypoint::route("HTTPRoute", "flaky", "flaky", PORT, flaky),
        waypoint::route("HTTPRoute", "reviews", "reviews", PORT, reviews),
    ])
}

const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";

fn service(name: &str, vip_host: u8, endpoint: &TestPod) -> Service {
    Service {
        name: name.into(),
        namespace: "default".into(),
        vips: vec![std::net::Ipv4Addr::new(10, 96, 0, vip_host)],
        ports: vec![(PORT, APP_PORT)],
        endpoints: vec![endpoint.ip()],
        waypoint: Some(WAYPOINT.into()),
    }
}

fn vip(host: u8) -> SocketAddr {
    SocketAddr::from(([10, 96, 0, host], PORT))
}

/// How long the slow backend holds `/slow` requests: long enough that a refusal after it
/// cannot pass for one at once.
fn hold() -> Duration {
    weft_tests::scaled(Duration::from_secs(2))
}

const WAYPOINT: &str = "waypoint";
const PORT: u16 = 80;
const APP_PORT: u16 = 8080;
