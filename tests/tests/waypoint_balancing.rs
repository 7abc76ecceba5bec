//! Outlier detection and load balancing at the waypoint (issue "Resilience and end-user
//! auth at the waypoint", features 2 and 3): `TrafficPolicy` objects in the waypoint's
//! state file eject a failing endpoint for a while, and choose endpoints round-robin, by
//! least requests, or by a consistent hash of a header. A client pod on node 1 calls the
//! Service `reviews` bound to the waypoint (on node 1); its three endpoints run on node 2.
//! Which backend answered is the response's `x-backend`; when is measured from the
//! backends' request logs and the waypoint's metrics.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Result, ensure};
use serde_json::{Value, json};
use weft_tests::{
    Service, TestAgent, TestNode, TestPod, TestWaypoint, eventually,
    l7::{self, HttpLoad, HttpServe, HttpServer},
    metrics::Scrape,
    privileged, test_name,
};

/// Node 1: the client and the waypoint (and the first `near` endpoints). Node 2: the rest of
/// `reviews`' three endpoints. Fields drop in order: processes first, then agents, then the
/// nodes.
struct Mesh {
    waypoint: TestWaypoint,
    backends: Vec<HttpServer>,
    _agents: [TestAgent; 2],
    client: TestPod,
    _pods: Vec<TestPod>,
    node1: TestNode,
    _node2: TestNode,
}

impl Mesh {
    /// `serve[i]` is how endpoint `i` answers (its pod is named after the server); the first
    /// `near` of them run on node 1.
    fn new(test: &str, serve: [HttpServe; 3], near: usize) -> Result<Self> {
        let node1 = TestNode::new(test, 1)?;
        let node2 = TestNode::new(test, 2)?;
        node1.connect(&node2)?;
        let client = node1.pod("client").service_account("client").create()?;
        let wp_pod = TestWaypoint::pod(&node1, WAYPOINT)?;
        let mut pods = Vec::new();
        for (i, options) in serve.iter().enumerate() {
            let node = if i < near { &node1 } else { &node2 };
            pods.push(
                node.pod(&options.name)
                    .service_account("reviews")
                    .create()?,
            );
        }
        for node in [&node1, &node2] {
            node.add_service(Service {
                name: "reviews".into(),
                namespace: "default".into(),
                vips: vec![std::net::Ipv4Addr::new(10, 96, 0, 30)],
                ports: vec![(PORT, APP_PORT)],
                endpoints: pods.iter().map(TestPod::ip).collect(),
                waypoint: Some(WAYPOINT.into()),
            });
            node.set_waypoints(json!([{
                "name": WAYPOINT, "serviceAccount": WAYPOINT, "ips": [wp_pod.ip().to_string()],
            }]));
        }
        let agents = [node1.start_agent()?, node2.start_agent()?];
        let backends = pods
            .iter()
            .zip(&serve)
            .map(|(pod, options)| l7::http_serve(pod, options))
            .collect::<Result<Vec<_>>>()?;
        let waypoint = TestWaypoint::start(&node1, &wp_pod, WAYPOINT, json!([]))?;
        pods.push(wp_pod);
        Ok(Mesh {
            waypoint,
            backends,
            _agents: agents,
            client,
            _pods: pods,
            node1,
            _node2: node2,
        })
    }

    /// Gives `reviews` one policy with `spec` (besides its targetRefs), and waits until the
    /// waypoint's config dump shows `shows`.
    fn set_policy(&self, spec: Value, shows: &str) -> Result<()> {
        let mut policy = json!({
            "apiVersion": "weft.dev/v1alpha1", "kind": "TrafficPolicy",
            "metadata": { "name": "reviews-policy", "namespace": "default" },
            "spec": { "targetRefs": [{ "group": "", "kind": "Service", "name": "reviews" }] },
        });
        if let (Some(to), Some(from)) = (policy["spec"].as_object_mut(), spec.as_object()) {
            to.extend(from.clone());
        }
        self.write(json!({ "trafficPolicies": [policy] }), shows)
    }

    /// Writes `sections` into the waypoint's state file and waits until its config dump
    /// shows `shows`.
    fn write(&self, sections: Value, shows: &str) -> Result<()> {
        self.waypoint.write_sections(&self.node1, sections)?;
        eventually(Duration::from_secs(10), || {
            let dump = self.waypoint.config_dump()?.to_string();
            ensure!(dump.contains(shows), "{shows} not applied yet");
            Ok(())
        })
    }

    fn metric(&self, name: &str) -> Result<f64> {
        let labels = [("destination_service_name", "reviews")];
        Ok(Scrape::parse(&self.waypoint.metrics()?).sum(name, &labels))
    }
}

#[test]
fn an_endpoint_answering_503_is_ejected_and_returns_after_a_growing_ejection_time() -> Result<()> {
    privileged!();
    let serve = [
        HttpServe::new(APP_PORT, "r1"),
        HttpServe::new(APP_PORT, "r2"),
        // Every request answered 503.
        HttpServe::new(APP_PORT, "bad").fail_every(1),
    ];
    let mesh = Mesh::new(test_name!(), serve, 0)?;
    let base = Duration::from_secs(2);
    mesh.set_policy(
        json!({
            "loadBalancer": { "simple": "ROUND_ROBIN" },
            "outlierDetection": {
                "consecutive5xxErrors": 3, "interval": "1s", "baseEjectionTime": "2s",
                "maxEjectionPercent": 34,
            },
        }),
        "outlierDetection",
    )?;
    let bad = &mesh.backends[2];
    // A steady load, one request at a time; each endpoint gets every third request.
    let load = HttpLoad::new(vip(), 2_000)
        .pace(Duration::from_millis(10))
        .start(&mesh.client)?;
    let start = Instant::now();
    let mut timeline = Timeline::default();
    let deadline = start + Duration::from_secs(40);
    while timeline.back.len() < 2 && Instant::now() < deadline {
        let ejections = mesh.metric("weft_waypoint_outlier_ejections_total")? as usize;
        let served = bad.requests().len();
        let now = start.elapsed();
        if ejections > timeline.ejected.len() {
            let gauge = mesh.metric("weft_waypoint_outlier_ejected_endpoints")?;
            timeline.ejected.push((now, served, gauge));
        } else if timeline.ejected.len() > timeline.back.len()
            && served > timeline.ejected.last().map_or(0, |e| e.1)
        {
            timeline.back.push(now);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let seen_at_end = bad.requests().len();
    drop(load);
    println!("timeline (since the load started): {timeline:?}");
    ensure!(
        timeline.back.len() == 2,
        "two ejections and returns within 40 s: {timeline:?}"
    );
    for (i, ((ejected_at, served, gauge), back_at)) in
        timeline.ejected.iter().zip(&timeline.back).enumerate()
    {
        let out = *back_at - *ejected_at;
        let expected = base * (i as u32 + 1);
        println!(
            "ejection {}: after {served} answers from bad at {:.2} s (gauge {gauge}); no request to it for {:.2} s (ejection time {:.0} s)",
            i + 1,
            ejected_at.as_secs_f64(),
            out.as_secs_f64(),
            expected.as_secs_f64(),
        );
        ensure!(*gauge == 1.0, "one endpoint ejected while it is out");
        // Polled every 20 ms or so (a slow poll sees the ejection late, and the window
        // shorter), and the endpoint's next turn comes within 3 requests.
        ensure!(
            out + Duration::from_millis(300) >= expected
                && out <= expected + Duration::from_millis(1500),
            "ejection {} kept bad out {out:?}, not about {expected:?}",
            i + 1
        );
    }
    // 3 answers in a row eject it: 3 before the first ejection, 3 more before the second.
    let (first, second) = (timeline.ejected[0].1, timeline.ejected[1].1);
    ensure!(
        first == 3 && second == 6,
        "ejected after 3 errors in a row each time ({first}, {second})"
    );
    println!(
        "bad answered {seen_at_end} requests in {:.1} s of load (one request every 10 ms or so, a third of them its turn)",
        start.elapsed().as_secs_f64()
    );
    let log = mesh.waypoint.log();
    let ejected = log.matches("endpoint ejected by outlier detection").count();
    let returned = log.matches("ejected endpoint back in service").count();
    ensure!(
        ejected >= 2 && returned >= 2,
        "each ejection and return logged ({ejected}, {returned})"
    );
    ensure!(
        mesh.metric("weft_waypoint_outlier_ejections_total")? >= 2.0,
        "ejections counted"
    );
    Ok(())
}

#[test]
fn a_consistent_hash_of_a_header_keeps_each_value_on_one_endpoint() -> Result<()> {
    privileged!();
    let serve = ["r1", "r2", "r3"].map(|name| HttpServe::new(APP_PORT, name));
    let mesh = Mesh::new(test_name!(), serve, 0)?;
    mesh.set_policy(
        json!({ "loadBalancer": { "consistentHash": { "httpHeaderName": "x-user" } } }),
        "consistentHash",
    )?;
    let mut owner = BTreeMap::new();
    for user in (0..10).map(|i| format!("user-{i}")) {
        let report = HttpLoad::new(vip(), 100)
            .concurrency(4)
            .header("x-user", &user)
            .run(&mesh.client)?;
        ensure!(
            report.by_backend.len() == 1 && report.status(200) == 100,
            "{user}: every request on one endpoint: {:?}",
            report.by_backend
        );
        owner.insert(
            user,
            report.by_backend.into_keys().next().unwrap_or_default(),
        );
    }
    println!("1,000 requests, 100 per x-user value: {owner:?}");
    let spread: std::collections::BTreeSet<_> = owner.values().collect();
    ensure!(spread.len() > 1, "10 values are spread over the endpoints");
    // The same value later: the same endpoint.
    let again = HttpLoad::new(vip(), 20)
        .header("x-user", "user-0")
        .run(&mesh.client)?;
    ensure!(
        again.backend(&owner["user-0"]) == 20,
        "stable: {:?}",
        again.by_backend
    );
    // Without the header: balanced over all three.
    let without = HttpLoad::new(vip(), 60).run(&mesh.client)?;
    ensure!(without.by_backend.len() == 3, "{:?}", without.by_backend);
    Ok(())
}

#[test]
fn least_request_sends_less_to_a_slow_endpoint_than_round_robin() -> Result<()> {
    privileged!();
    let slow = HttpServe::new(APP_PORT, "slow").delay(Duration::from_millis(300));
    let serve = [
        HttpServe::new(APP_PORT, "r1"),
        HttpServe::new(APP_PORT, "r2"),
        slow,
    ];
    let mesh = Mesh::new(test_name!(), serve, 0)?;
    let share = |simple: &str| -> Result<f64> {
        mesh.set_policy(
            json!({ "loadBalancer": { "simple": simple } }),
            &format!("\"{}\"", to_camel(simple)),
        )?;
        let report = HttpLoad::new(vip(), 150).concurrency(6).run(&mesh.client)?;
        ensure!(report.status(200) == 150, "{report:?}");
        Ok(report.backend("slow") as f64 / 150.0)
    };
    let round_robin = share("ROUND_ROBIN")?;
    let least_request = share("LEAST_REQUEST")?;
    println!(
        "share of the slow endpoint (300 ms a request), 6 at a time: round robin {:.0}%, least request {:.0}%",
        round_robin * 100.0,
        least_request * 100.0
    );
    ensure!(
        (0.30..0.37).contains(&round_robin),
        "round robin gives every endpoint a third"
    );
    ensure!(
        least_request < round_robin / 2.0,
        "least request avoids the busy endpoint"
    );
    Ok(())
}

#[test]
fn a_prefer_close_service_sends_to_the_endpoint_on_the_waypoints_node() -> Result<()> {
    privileged!();
    let serve = ["near", "far1", "far2"].map(|name| HttpServe::new(APP_PORT, name));
    let mesh = Mesh::new(test_name!(), serve, 1)?;
    let spread = HttpLoad::new(vip(), 60).run(&mesh.client)?;
    ensure!(
        spread.by_backend.len() == 3,
        "without it, every endpoint: {:?}",
        spread.by_backend
    );
    // Only the waypoint needs to know: its state file's `reviews` prefers close endpoints.
    let mut services = mesh.node1.config()["services"].clone();
    for service in services.as_array_mut().into_iter().flatten() {
        if service["name"] == "reviews" {
            service["trafficDistribution"] = json!("PreferClose");
        }
    }
    mesh.write(json!({ "services": services }), "PreferClose")?;
    let close = HttpLoad::new(vip(), 60).concurrency(4).run(&mesh.client)?;
    println!(
        "60 requests: without PreferClose {:?}; with it {:?}",
        spread.by_backend, close.by_backend
    );
    ensure!(
        close.backend("near") == 60,
        "every request to the endpoint on the waypoint's node: {:?}",
        close.by_backend
    );
    Ok(())
}

/// When bad was ejected (since the load started, its answers so far, the ejected gauge),
/// and when it next got a request.
#[derive(Debug, Default)]
struct Timeline {
    ejected: Vec<(Duration, usize, f64)>,
    back: Vec<Duration>,
}

/// `ROUND_ROBIN` → `roundRobin`, as the config dump writes the load balancer.
fn to_camel(simple: &str) -> String {
    let mut out = String::new();
    for (i, word) in simple.split('_').enumerate() {
        let lower = word.to_ascii_lowercase();
        if i == 0 {
            out.push_str(&lower);
        } else {
            let mut chars = lower.chars();
            out.extend(chars.next().map(|c| c.to_ascii_uppercase()));
            out.push_str(chars.as_str());
        }
    }
    out
}

fn vip() -> SocketAddr {
    SocketAddr::from(([10, 96, 0, 30], PORT))
}

const WAYPOINT: &str = "waypoint";
const PORT: u16 = 80;
const APP_PORT: u16 = 8080;
