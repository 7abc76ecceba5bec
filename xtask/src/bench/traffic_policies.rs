//! The cost of each `TrafficPolicy` feature at the waypoint: the L7 path's HTTP/1.1
//! latency at the plan's fixed rate, with no policy and with each feature switched on in
//! turn (limits set high enough that nothing is refused, a fault that draws 0 %: what is
//! measured is the bookkeeping every request pays). Every request carries the same bearer
//! token, so the `requestAuthentication` rows (an RS256 and an ES256 key, inline) differ
//! from the others by the verification alone. Each repetition visits every setting, so
//! drift over the run spreads over all of them.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use weft_tests::{TestNode, TestWaypoint, bench as harness, eventually};

use super::{
    plan::Plan,
    probe::{args, f},
    report::Report,
    workloads::{Scenario, http_load_with},
};

/// The issuer of the benchmark's end-user tokens.
const ISSUER: &str = "https://issuer.bench.weft.test";

/// The algorithms of the `requestAuthentication` rows (`weft-bench jwt` mints one key and
/// token of each).
const ALGORITHMS: [&str; 2] = ["RS256", "ES256"];

/// The settings measured: a name for the rows, and the policies that switch it on. `jwt`
/// is `weft-bench jwt`'s answer: a JWKS and a token per algorithm.
fn settings(route: &str, service: &str, jwt: &Value) -> Vec<(String, Value)> {
    let on_route =
        json!({ "group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": route });
    let on_service = json!({ "group": "", "kind": "Service", "name": service });
    let policy = |name: &str, target: &Value, feature: &str, value: Value| {
        json!([{
            "apiVersion": "weft.dev/v1alpha1", "kind": "TrafficPolicy",
            "metadata": { "name": name, "namespace": "default" },
            "spec": { "targetRefs": [target], feature: value },
        }])
    };
    let mut settings = vec![
        ("no TrafficPolicy", json!([])),
        (
            "connectionPool",
            policy(
                "bench-pool",
                &on_service,
                "connectionPool",
                json!({
                    "maxConnections": 10_000, "maxRequests": 100_000, "maxRetries": 100,
                }),
            ),
        ),
        (
            "rateLimit",
            policy(
                "bench-limit",
                &on_route,
                "rateLimit",
                json!({
                    "maxTokens": 1_000_000, "fillInterval": "1s", "perClient": true,
                }),
            ),
        ),
        (
            "fault (0 %)",
            policy(
                "bench-fault",
                &on_route,
                "fault",
                json!({
                    "abort": { "httpStatus": 503, "percentage": 0 },
                }),
            ),
        ),
    ]
    .into_iter()
    .map(|(name, policies)| (name.to_owned(), policies))
    .collect::<Vec<_>>();
    for alg in ALGORITHMS {
        let rule = json!({ "issuer": ISSUER, "jwks": jwt[alg]["jwks"] });
        settings.push((
            format!("requestAuthentication ({alg})"),
            policy(
                "bench-jwt",
                &on_service,
                "requestAuthentication",
                json!({ "jwtRules": [rule] }),
            ),
        ));
    }
    settings
}

/// Measures `scenario` (the L7 path through `waypoint`) under each setting.
pub fn run(
    plan: &Plan,
    node: &TestNode,
    waypoint: &TestWaypoint,
    routes: &Value,
    (route, service): (&str, &str),
    scenario: &Scenario<'_>,
    report: &mut Report,
) -> Result<()> {
    println!("== waypoint TrafficPolicy features ==");
    let jwt = harness::client(
        scenario.client,
        &args(&["jwt", "--issuer", ISSUER]),
        Duration::from_secs(30),
    )?;
    let settings = settings(route, service, &jwt);
    let rate = plan.http_rate;
    for _ in 0..plan.reps {
        for (name, policies) in &settings {
            apply(node, waypoint, routes, policies)?;
            // Every row carries a token: the RS256 one, or its own row's algorithm's.
            let alg = ALGORITHMS
                .into_iter()
                .find(|alg| name.contains(alg))
                .unwrap_or(ALGORITHMS[0]);
            let token = jwt[alg]["token"]
                .as_str()
                .context("weft-bench jwt: a token")?;
            let headers = [format!("authorization:Bearer {token}")];
            let metric = |q: &str| format!("HTTP/1.1 at {rate} req/s, {name}: {q}");
            match http_load_with(scenario, rate, plan.http_secs, &headers) {
                Ok(v) => {
                    println!(
                        "  {name:<30} p50 {:.0} µs, p99 {:.0} µs",
                        f(&v, "p50_us"),
                        f(&v, "p99_us")
                    );
                    report.add(scenario.key, &metric("p50"), "µs", f(&v, "p50_us"));
                    report.add(scenario.key, &metric("p99"), "µs", f(&v, "p99_us"));
                }
                Err(e) => report.fail(scenario.key, &metric("load"), &e),
            }
        }
    }
    // Back to the state the rest of the run expects.
    apply(node, waypoint, routes, &json!([]))
}

/// Writes `policies` into the waypoint's state and waits until it serves them.
fn apply(node: &TestNode, waypoint: &TestWaypoint, routes: &Value, policies: &Value) -> Result<()> {
    let sections = json!({ "routes": routes, "trafficPolicies": policies });
    waypoint.write_sections(node, sections)?;
    let names: Vec<&str> = policies
        .as_array()
        .context("a list of policies")?
        .iter()
        .filter_map(|p| p["metadata"]["name"].as_str())
        .collect();
    eventually(Duration::from_secs(10), || {
        let dump = waypoint.config_dump()?;
        let in_force = &dump["snapshot"]["traffic_policies"];
        let count = in_force.as_array().map_or(0, Vec::len);
        ensure!(
            count == names.len() && names.iter().all(|n| in_force.to_string().contains(n)),
            "the waypoint has not loaded the policies yet"
        );
        Ok(())
    })
}
