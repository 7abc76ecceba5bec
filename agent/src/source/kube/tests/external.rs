//! ExternalServices: a valid one is in the snapshot; one that cannot be understood is left
//! out (never its last good version) and says why in its `Accepted` condition, until fixed.

use serde_json::Value;

use super::*;

/// An ExternalService of `egress` for `host`, on port 443 (HTTPS) and 80 (HTTP, with TLS
/// origination to 443).
fn external_service(name: &str, host: &str) -> Value {
    json!({
        "metadata": {"name": name, "namespace": "egress", "generation": 1},
        "spec": {
            "hosts": [host],
            "ports": [
                {"number": 443, "name": "https", "protocol": "HTTPS"},
                {"number": 80, "name": "http", "protocol": "HTTP", "targetPort": 443, "tls": {}},
            ],
        },
    })
}

fn add(api: &FakeApi, object: Value) {
    api.apply_value::<crd::ExternalService>(object);
}

/// The `Accepted` condition of `egress/name` as (status, reason, message), once written.
fn accepted(api: &FakeApi, name: &str) -> Option<(String, String, String)> {
    let object = api.object::<crd::ExternalService>("egress", name)?;
    let condition = object["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Accepted")?
        .clone();
    let text = |key: &str| condition[key].as_str().unwrap_or_default().to_owned();
    Some((text("status"), text("reason"), text("message")))
}

/// Waits until the `Accepted` condition of `egress/name` has status `status`.
async fn until_accepted(api: &FakeApi, name: &str, status: &str) -> (String, String, String) {
    let deadline = Instant::now() + patience();
    loop {
        if let Some(said) = accepted(api, name).filter(|(s, _, _)| s == status) {
            return said;
        }
        assert!(Instant::now() < deadline, "{:#?}", api.patches());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_valid_external_service_is_registered_and_a_bad_one_is_left_out_until_fixed() {
    let api = FakeApi::start().await;
    api.apply(&namespace("prod", true));
    api.apply(&agent_pod(NODE, true));
    add(&api, external_service("api", "API.example.test."));
    // An IP address as a host: the API server takes it, weft cannot.
    add(&api, external_service("bad", "203.0.113.7"));
    let mut h = Harness::start(api).await;
    let api_ref = WorkloadRef::new("egress", "api");
    let s = h
        .until("the valid one", |s| {
            s.external_services.contains_key(&api_ref)
        })
        .await;
    let registered = &s.external_services[&api_ref];
    assert_eq!(registered.hosts, ["api.example.test"]);
    let tls = registered.port(80).unwrap().tls.as_ref().unwrap();
    assert_eq!(tls.sni, "api.example.test");
    assert_eq!(s.external_services.len(), 1, "the bad one is left out");
    assert_eq!(h.health.view()[&Kind::ExternalService].rejected, 1);

    // Its status says why, naming the field; the valid one's says it is in force.
    let (_, reason, message) = until_accepted(&h.api, "bad", "False").await;
    assert_eq!(reason, "Invalid");
    assert!(
        message.contains("spec.hosts[0]") && message.contains("resolution STATIC"),
        "{message}"
    );
    assert!(message.contains("out of the registry"), "{message}");
    until_accepted(&h.api, "api", "True").await;

    // Fixed: registered, and accepted.
    let mut fixed = external_service("bad", "fixed.example.test");
    fixed["metadata"]["generation"] = 2.into();
    add(&h.api, fixed);
    let bad_ref = WorkloadRef::new("egress", "bad");
    let s = h
        .until("the fixed one", |s| {
            s.external_services.contains_key(&bad_ref)
        })
        .await;
    assert_eq!(s.external_services[&bad_ref].hosts, ["fixed.example.test"]);
    until_accepted(&h.api, "bad", "True").await;

    // Broken again: left out, not kept at its last good version.
    let mut broken = external_service("bad", "*.example.test");
    broken["metadata"]["generation"] = 3.into();
    add(&h.api, broken);
    let s = h
        .until("the broken one gone", |s| {
            !s.external_services.contains_key(&bad_ref)
        })
        .await;
    assert!(s.external_services.contains_key(&api_ref));
    let (_, _, message) = until_accepted(&h.api, "bad", "False").await;
    assert!(message.contains("wildcard"), "{message}");
}

#[tokio::test]
async fn a_missing_external_service_crd_is_no_services_and_does_not_block_readiness() {
    let api = FakeApi::start().await;
    api.set_missing::<crd::ExternalService>(true);
    let mut h = Harness::start(api).await;
    h.until_health("ready without the CRD", |_, ready| ready.is_ready())
        .await;
    let s = h.until("a snapshot", |_| true).await;
    assert!(s.external_services.is_empty());
}

#[test]
fn beyond_the_limit_external_services_are_left_out_and_say_so() {
    let mut stores = reflector::Stores::default();
    let status = project::StatusOf {
        generation: Some(1),
        ..Default::default()
    };
    for i in 0..=crate::source::external::MAX_SERVICES {
        let name = format!("s{i:03}");
        let spec = serde_json::from_value(
            json!({"hosts": [format!("{name}.test")], "ports": [{"number": 443}]}),
        )
        .unwrap();
        let service =
            crate::source::external::service("spec", WorkloadRef::new("egress", &name), spec)
                .unwrap();
        stores.external_services.items.insert(
            format!("egress/{name}"),
            project::ExternalItem {
                service: Some(service),
                status: status.clone(),
            },
        );
    }
    let s = build::snapshot(&stores, &MeshSettings::default(), None, None);
    assert_eq!(
        s.external_services.len(),
        crate::source::external::MAX_SERVICES
    );
    let last = WorkloadRef::new("egress", "s256");
    assert!(!s.external_services.contains_key(&last));
    let writes = accepted::plan(&stores, "2026-01-01T00:00:00Z");
    let of_last = writes.iter().find(|w| w.name == "s256").unwrap();
    let condition = &of_last.status["conditions"][0];
    assert_eq!(condition["status"], "False");
    assert_eq!(condition["reason"], "TooMany");
    assert!(
        condition["message"]
            .as_str()
            .unwrap()
            .contains("more than 256"),
        "{condition}"
    );
    let of_first = writes.iter().find(|w| w.name == "s000").unwrap();
    assert_eq!(of_first.status["conditions"][0]["status"], "True");
}
