//! Retries that do not make outages worse (issue "Resilience and end-user auth at the
//! waypoint", item 4): `TrafficPolicy` `retry` on an HTTPRoute rule (which endings are
//! retried, the longest backoff) and `retryBudget` on the backend Service. A client pod on
//! node 1 calls the Service `flaky` bound to the waypoint (on node 1); its backend runs on
//! node 2 and answers as each request asks (`x-testapp-status`, `x-testapp-delay-ms`,
//! `x-testapp-reset`). The backend logs each try's arrival; the tries of one request share
//! the `traceparent` the waypoint sends, so the backend's log tells the tries of each
//! request apart, and when each arrived.
//!
//! The tests of this file measure time: they run one at a time (`SERIAL`), so one's burst
//! of 50 requests does not stretch another's intervals.

use std::{collections::BTreeMap, net::SocketAddr, sync::LazyLock, time::Duration};

use anyhow::{Result, ensure};
use serde_json::{Value, json};
use weft_tests::{
    Service, TestAgent, TestNode, TestPod, TestWaypoint,
    l7::{self, HttpLoad, HttpServe, HttpServer, ServedRequest},
    privileged, test_name, waypoint,
};

/// Node 1: the client and the waypoint. Node 2: the backend. Fields drop in order:
/// processes first, then agents, then the nodes.
struct Mesh {
    waypoint: TestWaypoint,
    backend: HttpServer,
    _agents: [TestAgent; 2],
    client: TestPod,
    _pods: Vec<TestPod>,
    node1: TestNode,
    _node2: TestNode,
    _serial: tokio::sync::MutexGuard<'static, ()>,
}

impl Mesh {
    fn new(test: &str) -> Result<Self> {
        let serial = SERIAL.blocking_lock();
        let node1 = TestNode::new(test, 1)?;
        let node2 = TestNode::new(test, 2)?;
        node1.connect(&node2)?;
        let client = node1.pod("client").service_account("client").create()?;
        let wp_pod = TestWaypoint::pod(&node1, WAYPOINT)?;
        let flaky = node2.pod("flaky").service_account("flaky").create()?;
        for node in [&node1, &node2] {
            node.add_service(Service {
                name: "flaky".into(),
                namespace: "default".into(),
                vips: vec![std::net::Ipv4Addr::new(10, 96, 0, 31)],
                ports: vec![(PORT, APP_PORT)],
                endpoints: vec![flaky.ip()],
                waypoint: Some(WAYPOINT.into()),
            });
            node.set_waypoints(json!([{
                "name": WAYPOINT, "serviceAccount": WAYPOINT, "ips": [wp_pod.ip().to_string()],
            }]));
        }
        let agents = [node1.start_agent()?, node2.start_agent()?];
        let backend = l7::http_serve(&flaky, &HttpServe::new(APP_PORT, "flaky"))?;
        let waypoint = TestWaypoint::start(&node1, &wp_pod, WAYPOINT, json!([route()]))?;
        Ok(Mesh {
            waypoint,
            backend,
            _agents: agents,
            client,
            _pods: vec![wp_pod, flaky],
            node1,
            _node2: node2,
            _serial: serial,
        })
    }

    /// Replaces the waypoint's traffic policies and waits until its config dump shows
    /// `shows`.
    fn set_policies(&self, policies: Value, shows: &str) -> Result<()> {
        let sections = json!({ "routes": [route()], "trafficPolicies": policies });
        self.waypoint.apply_sections(&self.node1, sections, shows)
    }

    fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        self.waypoint.metric(name, labels)
    }

    /// The tries the backend saw since its `from`th, grouped by request (trace id), each
    /// request's in order of arrival.
    fn tries_by_request(&self, from: usize) -> BTreeMap<String, Vec<ServedRequest>> {
        let mut by_trace: BTreeMap<String, Vec<ServedRequest>> = BTreeMap::new();
        for r in self.backend.requests().into_iter().skip(from) {
            let trace = r
                .header("traceparent")
                .and_then(|t| t.split('-').nth(1))
                .unwrap_or_default()
                .to_owned();
            by_trace.entry(trace).or_default().push(r);
        }
        for tries in by_trace.values_mut() {
            tries.sort_by_key(|r| r.received_us);
        }
        by_trace
    }
}

#[test]
fn backoff_intervals_follow_the_jittered_exponential_envelope_up_to_the_policy_maximum()
-> Result<()> {
    privileged!();
    let mesh = Mesh::new(test_name!())?;
    mesh.set_policies(
        json!([policy(
            "backoff-max",
            route_target(Some("backoff")),
            json!({ "retry": { "backoff": { "max": "300ms" } } }),
        )]),
        "backoff-max",
    )?;
    // Every try answers 503: each request makes all its tries, 1 + BACKOFF_ATTEMPTS.
    let load = HttpLoad::new(vip(), REQUESTS)
        .concurrency(4)
        .path("/backoff")
        .header("x-testapp-status", "503")
        .run(&mesh.client)?;
    ensure!(
        load.status(503) == REQUESTS,
        "every request ends 503: {load:?}"
    );
    let by_request = mesh.tries_by_request(0);
    let tries: Vec<usize> = by_request.values().map(Vec::len).collect();
    ensure!(
        by_request.len() == REQUESTS as usize
            && tries.iter().all(|n| *n == 1 + BACKOFF_ATTEMPTS as usize),
        "{REQUESTS} requests of {} tries each: {tries:?}",
        1 + BACKOFF_ATTEMPTS
    );

    // The interval between try i and i+1 at the backend: the waypoint's pause before retry
    // i+1 plus one round trip (waypoint → node 2 → backend → back), a few ms here.
    let mut intervals = vec![Vec::new(); BACKOFF_ATTEMPTS as usize];
    for tries in by_request.values() {
        for (i, pair) in tries.windows(2).enumerate() {
            let us = pair[1].received_us.saturating_sub(pair[0].received_us);
            intervals[i].push(Duration::from_micros(us));
        }
    }
    for (i, measured) in intervals.iter().enumerate() {
        let envelope = envelope(i);
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let min = measured.iter().min().copied().unwrap_or_default();
        let max = measured.iter().max().copied().unwrap_or_default();
        let mean = measured.iter().sum::<Duration>() / REQUESTS as u32;
        println!(
            "interval {i}: envelope {:.0} ms; measured min {:.1} ms, mean {:.1} ms, max {:.1} ms; all: {:?}",
            ms(envelope),
            ms(min),
            ms(mean),
            ms(max),
            measured.iter().map(|d| ms(*d).round()).collect::<Vec<_>>()
        );
        // Each pause is at most the envelope; the round trip and the scheduling of a debug
        // build on two shared cores add a few ms, 20 times less than the margin.
        ensure!(
            max <= envelope + MARGIN,
            "interval {i}: {max:?} is over the envelope {envelope:?} (+{MARGIN:?})"
        );
        // Full jitter: uniform in [0, envelope]. Over 40 requests the mean is half the
        // envelope with σ ≈ 4.6 % of it: ±20 % is over 4σ, plus the round trip above.
        ensure!(
            mean >= envelope * 3 / 10 && mean <= envelope * 7 / 10 + MEAN_MARGIN,
            "interval {i}: mean {mean:?} is not near half the envelope {envelope:?}"
        );
        // Not all equal: the chance that 40 uniform pauses span less than half their
        // range is below 1e-10.
        ensure!(
            max - min >= envelope / 2,
            "interval {i}: {min:?}..{max:?} is not jittered over the envelope {envelope:?}"
        );
    }
    let retries = mesh.metric("weft_waypoint_request_retries_total", &[])?;
    ensure!(
        retries == f64::from(REQUESTS as u32 * BACKOFF_ATTEMPTS),
        "every retry counted: {retries}"
    );
    Ok(())
}

#[test]
fn once_the_retry_budget_is_used_no_further_retries_are_made() -> Result<()> {
    privileged!();
    let mesh = Mesh::new(test_name!())?;
    // 50 concurrent requests, every try held, then 503; the rule retries once.
    let burst = || {
        HttpLoad::new(vip(), BURST)
            .concurrency(BURST)
            .path("/budget")
            .header("x-testapp-status", "503")
            .header("x-testapp-delay-ms", &hold().as_millis().to_string())
            .timeout(hold() * 6)
            .run(&mesh.client)
    };
    // Without a budget every request retries: the backend sees each twice.
    let load = burst()?;
    ensure!(load.status(503) == BURST, "{load:?}");
    let tries: Vec<usize> = mesh.tries_by_request(0).values().map(Vec::len).collect();
    ensure!(
        tries.len() == BURST as usize && tries.iter().all(|n| *n == 2),
        "without a budget, {BURST} requests of 2 tries: {tries:?}"
    );
    let seen = mesh.backend.requests().len();

    mesh.set_policies(
        json!([policy(
            "budget",
            json!({ "group": "", "kind": "Service", "name": "flaky" }),
            json!({ "retryBudget": { "percent": 20, "minRetryConcurrency": 3 } }),
        )]),
        "minRetryConcurrency",
    )?;
    let load = burst()?;
    ensure!(
        load.status(503) == BURST,
        "the client gets the try's answer: {load:?}"
    );
    let by_request = mesh.tries_by_request(seen);
    let firsts: Vec<u64> = by_request.values().map(|t| t[0].received_us).collect();
    let retries: Vec<&ServedRequest> = by_request.values().flat_map(|t| t.get(1)).collect();
    // Each client request has at most one try in flight, so the requests in flight to
    // flaky are at most 50: 20 % of that is 10 retries in flight at most, and at least 3
    // (minRetryConcurrency) are always allowed.
    let cap = (BURST * 20 / 100) as usize;
    // Retries the backend held at once (a retry is in flight at the waypoint from before it
    // reaches the backend until after its answer, so this is at most the waypoint's count).
    let held = hold().as_micros() as u64;
    let most_at_once = retries
        .iter()
        .map(|r| {
            retries
                .iter()
                .filter(|o| o.received_us <= r.received_us && r.received_us < o.received_us + held)
                .count()
        })
        .max()
        .unwrap_or(0);
    let spread_ms = (firsts.iter().max().unwrap_or(&0) - firsts.iter().min().unwrap_or(&0)) / 1000;
    let budget = [
        ("destination_service_name", "flaky"),
        ("limit", "retry_budget"),
    ];
    let refused = mesh.metric("weft_waypoint_overflows_total", &budget)?;
    println!(
        "{BURST} concurrent failing requests, budget 20 % (min 3): {} retries made ({most_at_once} at once at the backend), {refused} refused by the budget; first tries arrived within {spread_ms} ms",
        retries.len()
    );
    ensure!(
        by_request.len() == BURST as usize,
        "the backend saw every request: {}",
        by_request.len()
    );
    ensure!(
        (3..=cap).contains(&most_at_once),
        "between 3 and {cap} retries at once: {most_at_once}"
    );
    // Every retry made is held `hold` at the backend, so none ends before the last first
    // try has been answered (they arrive within a fraction of `hold`): the budget never
    // frees during the burst, and the retries made are those it had room for.
    ensure!(
        spread_ms < hold().as_millis() as u64 / 2,
        "the first tries arrived within half the hold ({spread_ms} ms): the scenario holds"
    );
    ensure!(
        (3..=cap).contains(&retries.len()),
        "between 3 and {cap} retries made: {}",
        retries.len()
    );
    ensure!(
        retries.len() as f64 + refused == BURST as f64,
        "each request retried or counted as refused by the budget: {} + {refused}",
        retries.len()
    );
    Ok(())
}

#[test]
fn retry_on_selects_the_endings_that_are_retried() -> Result<()> {
    privileged!();
    let mesh = Mesh::new(test_name!())?;
    mesh.set_policies(
        json!([
            policy(
                "on-5xx",
                route_target(Some("five")),
                json!({ "retry": { "on": ["5xx"] } })
            ),
            policy(
                "on-reset",
                route_target(Some("reset")),
                json!({ "retry": { "on": ["reset"] } })
            ),
            policy(
                "on-connect",
                route_target(Some("connect")),
                json!({ "retry": { "on": ["connect-failure", "retriable-status-codes"] } })
            ),
        ]),
        "on-connect",
    )?;
    // (path, what the backend does, tries per request, the client's status). Every rule
    // retries once, codes [503]; `/default` has no policy (reset and 503 are retried).
    let cases = [
        ("/default", ("x-testapp-status", "500"), 1, 500),
        ("/five", ("x-testapp-status", "500"), 2, 500),
        ("/default", ("x-testapp-reset", "1"), 2, 503),
        ("/reset", ("x-testapp-reset", "1"), 2, 503),
        ("/connect", ("x-testapp-reset", "1"), 1, 503),
        ("/connect", ("x-testapp-status", "503"), 2, 503),
        ("/reset", ("x-testapp-status", "503"), 1, 503),
    ];
    for (path, (ask, value), tries, status) in cases {
        let before = mesh.backend.requests().len();
        let load = HttpLoad::new(vip(), 5)
            .path(path)
            .header(ask, value)
            .run(&mesh.client)?;
        let seen = mesh.tries_by_request(before);
        let counts: Vec<usize> = seen.values().map(Vec::len).collect();
        println!(
            "{path} with {ask}: {counts:?} tries, client {:?}",
            load.by_status
        );
        ensure!(
            load.status(status) == 5,
            "{path} {ask}: the client gets {status}: {load:?}"
        );
        ensure!(
            seen.len() == 5 && counts.iter().all(|n| *n == tries),
            "{path} {ask}: {tries} tries per request: {counts:?}"
        );
    }
    Ok(())
}

fn policy(name: &str, target: Value, spec: Value) -> Value {
    let mut spec = spec;
    spec["targetRefs"] = json!([target]);
    json!({
        "apiVersion": "weft.dev/v1alpha1", "kind": "TrafficPolicy",
        "metadata": { "name": name, "namespace": "default" },
        "spec": spec,
    })
}

fn route_target(rule: Option<&str>) -> Value {
    let mut target =
        json!({ "group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": "flaky" });
    if let Some(rule) = rule {
        target["sectionName"] = json!(rule);
    }
    target
}

/// One rule per scenario, each named (a policy targets it with `sectionName`).
fn route() -> Value {
    let rule = |name: &str, attempts: u32, backoff: &str| {
        json!({
            "name": name,
            "matches": [{ "path": { "type": "PathPrefix", "value": format!("/{name}") } }],
            "retry": { "attempts": attempts, "codes": [503], "backoff": backoff },
            "backendRefs": [{ "name": "flaky", "port": PORT }],
        })
    };
    let rules = json!([
        rule(
            "backoff",
            BACKOFF_ATTEMPTS,
            &format!("{}ms", BACKOFF_BASE.as_millis())
        ),
        rule("budget", 1, "1ms"),
        rule("default", 1, "1ms"),
        rule("five", 1, "1ms"),
        rule("reset", 1, "1ms"),
        rule("connect", 1, "1ms"),
    ]);
    waypoint::route("HTTPRoute", "flaky", "flaky", PORT, rules)
}

/// The longest pause before retry `i + 1`: base · 2^i, at most the policy's 300 ms.
fn envelope(i: usize) -> Duration {
    (BACKOFF_BASE * 2u32.pow(i as u32)).min(BACKOFF_MAX)
}

fn vip() -> SocketAddr {
    SocketAddr::from(([10, 96, 0, 31], PORT))
}

/// How long the backend holds each try of the budget burst: the 50 first tries all arrive
/// well within it, so the retries it admits are all in flight together.
fn hold() -> Duration {
    weft_tests::scaled(Duration::from_secs(2))
}

/// Held by each test for its whole run.
static SERIAL: LazyLock<tokio::sync::Mutex<()>> = LazyLock::new(Default::default);

const WAYPOINT: &str = "waypoint";
const PORT: u16 = 80;
const APP_PORT: u16 = 8080;
const REQUESTS: u64 = 40;
const BURST: u64 = 50;
/// Four retries: envelopes 100, 200, 300 (400 capped), 300 (800 capped) ms.
const BACKOFF_ATTEMPTS: u32 = 4;
const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_millis(300);
/// Over any one interval's envelope: the round trip and scheduling.
const MARGIN: Duration = Duration::from_millis(100);
/// Over the mean's bound: the round trip's mean.
const MEAN_MARGIN: Duration = Duration::from_millis(30);
