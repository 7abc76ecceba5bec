//! TrafficPolicies: in a waypoint's snapshot oldest first, kept at their last good version
//! when rejected; in a node agent's, the connection pools of Services without a waypoint;
//! and their `status.ancestors` written by the elected node agent.

use serde_json::Value;

use super::*;
use crate::state::traffic;

/// A TrafficPolicy of `prod` created at `created`, targeting the Services `targets`, with
/// `maxConnections`.
fn traffic_policy(name: &str, created: &str, targets: &[&str], max_connections: u32) -> Value {
    let refs: Vec<Value> = targets
        .iter()
        .map(|t| json!({"group": "", "kind": "Service", "name": t}))
        .collect();
    json!({
        "metadata": {
            "name": name, "namespace": "prod", "generation": 1,
            "creationTimestamp": created,
        },
        "spec": {"targetRefs": refs, "connectionPool": {"maxConnections": max_connections}},
    })
}

/// `prod` bound to waypoint `wp`, with Services `reviews` and `ratings` (bound through their
/// namespace) and `other` (bound to another waypoint).
fn cluster(api: &FakeApi) {
    api.apply(&with_labels(
        namespace("prod", true),
        &[("weft.dev/use-waypoint", "wp")],
    ));
    api.apply(&service("prod", "reviews", "10.96.0.10", &[("", 80, None)]));
    api.apply(&service("prod", "ratings", "10.96.0.11", &[("", 80, None)]));
    api.apply(&with_labels(
        service("prod", "other", "10.96.0.12", &[("", 80, None)]),
        &[("weft.dev/use-waypoint", "other")],
    ));
}

/// Adds `traffic_policy(..)` to `api`.
fn add(api: &FakeApi, name: &str, created: &str, targets: &[&str], max_connections: u32) {
    api.apply_value::<crd::TrafficPolicy>(traffic_policy(name, created, targets, max_connections));
}

fn names(s: &Snapshot) -> Vec<&str> {
    s.traffic_policies
        .iter()
        .map(|p| p.name.name.as_str())
        .collect()
}

#[tokio::test]
async fn a_waypoint_gets_the_policies_of_its_services_oldest_first_and_keeps_the_last_good() {
    let api = FakeApi::start().await;
    cluster(&api);
    // Named against their age: the order is the creation time's, not the name's.
    add(&api, "b-old", "2026-01-01T00:00:00Z", &["reviews"], 10);
    add(
        &api,
        "a-young",
        "2026-02-01T00:00:00Z",
        &["reviews", "ratings"],
        20,
    );
    add(&api, "elsewhere", "2026-01-01T00:00:00Z", &["other"], 5);
    let mut h = Harness::start_with(api, waypoint_config()).await;
    let s = h
        .until("the policies", |s| s.traffic_policies.len() == 2)
        .await;
    assert_eq!(names(&s), ["b-old", "a-young"]);
    let reviews = WorkloadRef::new("prod", "reviews");
    let (from, pool) = traffic::connection_pool(&s.traffic_policies, &reviews).unwrap();
    assert_eq!(
        (from.name.as_str(), pool.max_connections),
        ("b-old", Some(10))
    );

    // Broken: its last good version stays in force, and the rest keeps flowing.
    let mut broken = traffic_policy("b-old", "2026-01-01T00:00:00Z", &["reviews"], 0);
    broken["metadata"]["generation"] = 2.into();
    h.api.apply_value::<crd::TrafficPolicy>(broken);
    let s = h
        .after_rejected(Kind::TrafficPolicy, 1, ("details", "10.96.0.13"))
        .await;
    assert_eq!(names(&s), ["b-old", "a-young"]);
    let (from, pool) = traffic::connection_pool(&s.traffic_policies, &reviews).unwrap();
    assert_eq!(
        (from.name.as_str(), pool.max_connections),
        ("b-old", Some(10))
    );
    let last = h.health.view()[&Kind::TrafficPolicy]
        .last_rejection
        .clone()
        .unwrap();
    assert!(
        last.contains("TrafficPolicy prod/b-old rejected: spec.connectionPool.maxConnections"),
        "{last}"
    );
    // A re-list keeps it too.
    h.api.expire();
    h.api.apply(&service(
        "prod",
        "details-2",
        "10.96.0.14",
        &[("", 80, None)],
    ));
    let s = h.until("after a re-list", |s| s.services.len() == 5).await;
    assert_eq!(names(&s), ["b-old", "a-young"]);

    // Deleted: gone.
    h.api.delete::<crd::TrafficPolicy>(Some("prod"), "b-old");
    let s = h
        .until("the old one gone", |s| s.traffic_policies.len() == 1)
        .await;
    let (from, _) = traffic::connection_pool(&s.traffic_policies, &reviews).unwrap();
    assert_eq!(from.name, "a-young");
}

#[tokio::test]
async fn a_node_agent_carries_no_policies_of_bound_services_and_a_missing_crd_does_not_block_it() {
    let api = FakeApi::start().await;
    cluster(&api);
    add(&api, "pool", "2026-01-01T00:00:00Z", &["reviews"], 10);
    let mut h = Harness::start(api).await;
    let s = h.until("the services", |s| s.services.len() == 3).await;
    assert!(s.traffic_policies.is_empty());
    assert_eq!(h.health.view()[&Kind::TrafficPolicy].objects, 1);

    // A cluster upgraded by Helm, which does not install new CRDs: ready all the same.
    let api = FakeApi::start().await;
    api.set_missing::<crd::TrafficPolicy>(true);
    let h = Harness::start(api).await;
    h.until_health("ready without the CRD", |_, ready| ready.is_ready())
        .await;
}

#[tokio::test]
async fn a_node_agent_gets_the_connection_pools_of_services_without_a_waypoint() {
    let api = FakeApi::start().await;
    cluster(&api);
    // Opted out of its namespace's waypoint: the node proxy limits it.
    api.apply(&with_labels(
        service("prod", "plain", "10.96.0.20", &[("", 80, None)]),
        &[("weft.dev/use-waypoint", "none")],
    ));
    add(&api, "plain-pool", "2026-01-01T00:00:00Z", &["plain"], 10);
    add(
        &api,
        "both",
        "2026-02-01T00:00:00Z",
        &["reviews", "plain"],
        20,
    );
    // Bound, or gone: the waypoint's business, or nobody's.
    add(&api, "bound-pool", "2026-01-01T00:00:00Z", &["reviews"], 5);
    add(&api, "ghost-pool", "2026-01-01T00:00:00Z", &["ghost"], 5);
    // No connection pool: nothing a node enforces.
    let mut fault = traffic_policy("plain-fault", "2026-01-01T00:00:00Z", &["plain"], 1);
    fault["spec"]
        .as_object_mut()
        .unwrap()
        .remove("connectionPool");
    fault["spec"]["rateLimit"] = json!({"maxTokens": 5, "tokensPerFill": 5, "fillInterval": "1s"});
    api.apply_value::<crd::TrafficPolicy>(fault);
    let mut h = Harness::start(api).await;
    let s = h
        .until("the node's pools", |s| s.traffic_policies.len() == 2)
        .await;
    assert_eq!(names(&s), ["plain-pool", "both"]);
    let plain = WorkloadRef::new("prod", "plain");
    let (from, pool) = traffic::connection_pool(&s.traffic_policies, &plain).unwrap();
    assert_eq!(
        (from.name.as_str(), pool.max_connections),
        ("plain-pool", Some(10))
    );

    // Bound to a waypoint after all: the policies leave the node's snapshot.
    h.api.apply(&with_labels(
        service("prod", "plain", "10.96.0.20", &[("", 80, None)]),
        &[("weft.dev/use-waypoint", "wp")],
    ));
    let s = h
        .until("the pools gone", |s| s.traffic_policies.is_empty())
        .await;
    assert!(s.services[&plain].waypoint.is_some());
}

/// Our entries of `status.ancestors` as (Service name, status, reason, message).
fn ancestors(object: &Value) -> Vec<(String, String, String, String)> {
    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    object["status"]["ancestors"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["controllerName"] == "weft.dev/waypoint")
        .map(|e| {
            let c = &e["conditions"][0];
            assert_eq!(c["type"], "Accepted", "{e}");
            let name = text(&e["ancestorRef"]["name"]);
            (
                name,
                text(&c["status"]),
                text(&c["reason"]),
                text(&c["message"]),
            )
        })
        .collect()
}

#[tokio::test]
async fn ancestors_say_accepted_conflicted_target_not_found_or_invalid_once() {
    let api = FakeApi::start().await;
    cluster(&api);
    api.apply(&agent_pod(NODE, true));
    add(&api, "old", "2026-01-01T00:00:00Z", &["reviews"], 10);
    let mut young = traffic_policy("young", "2026-02-01T00:00:00Z", &["reviews", "ratings"], 20);
    // Another controller's entry must survive.
    young["status"] = json!({"ancestors": [{
        "ancestorRef": {"group": "", "kind": "Service", "namespace": "prod", "name": "reviews"},
        "controllerName": "example.com/mesh",
        "conditions": [],
    }]});
    api.apply_value::<crd::TrafficPolicy>(young);
    // A target named twice is one ancestor.
    add(
        &api,
        "missing",
        "2026-01-01T00:00:00Z",
        &["nope", "nope"],
        10,
    );
    add(&api, "zero", "2026-01-01T00:00:00Z", &["ratings"], 0);
    let mut h = Harness::start(api).await;
    h.until("the services", |s| s.services.len() == 3).await;

    let object =
        |api: &FakeApi, name: &str| api.object::<crd::TrafficPolicy>("prod", name).unwrap();
    let written = |api: &FakeApi, names: &[&str]| {
        names.iter().all(|n| !ancestors(&object(api, n)).is_empty())
    };
    let deadline = Instant::now() + patience();
    while !written(&h.api, &["old", "young", "missing", "zero"]) {
        assert!(Instant::now() < deadline, "{:#?}", h.api.patches());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let said = |api: &FakeApi, name: &str| {
        ancestors(&object(api, name))
            .into_iter()
            .map(|(service, status, reason, _)| format!("{service} {status} {reason}"))
            .collect::<Vec<_>>()
    };
    assert_eq!(said(&h.api, "old"), ["reviews True Accepted"]);
    assert_eq!(
        said(&h.api, "young"),
        ["reviews False Conflicted", "ratings True Accepted"]
    );
    let young = object(&h.api, "young");
    assert_eq!(
        young["status"]["ancestors"][0]["controllerName"], "example.com/mesh",
        "kept"
    );
    assert_eq!(
        young["status"]["ancestors"][1]["ancestorRef"],
        json!({"group": "", "kind": "Service", "namespace": "prod", "name": "reviews"})
    );
    let condition = &young["status"]["ancestors"][1]["conditions"][0];
    assert!(
        condition["message"].as_str().unwrap().contains("prod/old"),
        "names the winner: {condition}"
    );
    assert_eq!(condition["observedGeneration"], 1);
    assert!(condition["lastTransitionTime"].is_string());
    assert_eq!(said(&h.api, "missing"), ["nope False TargetNotFound"]);
    let (_, _, reason, message) = ancestors(&object(&h.api, "zero")).remove(0);
    assert_eq!(reason, "Invalid");
    assert!(
        message.contains("spec.connectionPool.maxConnections")
            && message.contains("nothing of it is in force"),
        "{message}"
    );

    // Unchanged: not written again, whatever else changes.
    let writes = |api: &FakeApi| api.patches().len();
    assert_eq!(writes(&h.api), 4, "{:#?}", h.api.patches());
    h.api
        .apply(&service("prod", "details", "10.96.0.13", &[("", 80, None)]));
    h.until("the new service", |s| s.services.len() == 4).await;
    tokio::time::sleep(weft_test_env::scaled(Duration::from_millis(200))).await;
    assert_eq!(writes(&h.api), 4, "{:#?}", h.api.patches());

    // Broken (a connection pool on a route): every target it names says why; the last good
    // version stays in force, so `young` still loses `reviews`.
    let mut broken = object(&h.api, "old");
    broken["spec"]["targetRefs"] = json!([
        {"group": "", "kind": "Service", "name": "reviews"},
        {"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": "web"},
    ]);
    broken["metadata"]["generation"] = 2.into();
    h.api.apply_value::<crd::TrafficPolicy>(broken);
    // The Service appears: TargetNotFound turns Accepted.
    h.api
        .apply(&service("prod", "nope", "10.96.0.15", &[("", 80, None)]));
    let deadline = Instant::now() + patience();
    while !(said(&h.api, "old") == ["reviews False Invalid", "web False Invalid"]
        && said(&h.api, "missing") == ["nope True Accepted"])
    {
        assert!(Instant::now() < deadline, "{:#?}", h.api.patches());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let old = object(&h.api, "old");
    let condition = &old["status"]["ancestors"][1]["conditions"][0];
    let message = condition["message"].as_str().unwrap();
    assert!(
        message.contains("spec.connectionPool") && message.contains("last good version"),
        "{message}"
    );
    assert_eq!(condition["observedGeneration"], 2);
    assert_eq!(
        old["status"]["ancestors"][1]["ancestorRef"]["kind"],
        "HTTPRoute"
    );
    assert_eq!(
        said(&h.api, "young"),
        ["reviews False Conflicted", "ratings True Accepted"]
    );
}
