//! Issue 13, finding 2: a policy the API server accepts but weft cannot understand fails
//! closed, the same on every agent and after a restart, and says why in its status.

use serde_json::Value;

use super::*;
use crate::{
    identity::SpiffeId,
    policy::{ConnectionFacts, PolicyIndex},
};

/// (what, how it breaks the rule of `policy_object`, the field the error must name).
type Malformed = (&'static str, fn(&mut Value), &'static str);

/// The malformed inputs of the issue.
fn malformed() -> Vec<Malformed> {
    vec![
        (
            "a principal without its spiffe:// scheme",
            |rule| rule["from"][0] = json!({"principals": ["cluster.local/ns/web/sa/fe"]}),
            "spec.rules[0].from[0].principals[0]",
        ),
        (
            "a CIDR with a /33 prefix",
            |rule| rule["from"][0] = json!({"ipBlocks": [{"cidr": "10.0.0.0/33"}]}),
            "spec.rules[0].from[0].ipBlocks[0].cidr",
        ),
        (
            "a port range ending below its start",
            |rule| rule["toPorts"] = json!(["8080-80"]),
            "spec.rules[0].toPorts[0]",
        ),
    ]
}

/// `policy_object` (selecting `app: api` in `prod`, from `web/front` to 8080), with its
/// first rule broken by `breaks`.
fn broken_policy(name: &str, action: &str, breaks: fn(&mut Value)) -> Value {
    let mut object = policy_object("prod", name, action, "web/front");
    breaks(&mut object["spec"]["rules"][0]);
    object
}

/// Namespace `prod` in the mesh with pods `api` (app=api) and `web` (app=web), namespace
/// `dev` with pod `tool` (app=api), all on another node.
fn cluster(api: &FakeApi) {
    api.apply(&namespace("prod", true));
    api.apply(&namespace("dev", true));
    api.apply(&pod("prod", "api", "node-b", "10.2.0.2", &[("app", "api")]));
    api.apply(&pod("prod", "web", "node-b", "10.2.0.3", &[("app", "web")]));
    api.apply(&pod("dev", "tool", "node-b", "10.2.0.4", &[("app", "api")]));
}

/// What the destination proxy decides for a connection to `workload:8080` from the
/// identity `web/front`, the one the intact policy allows: the reason of a denial, `None`
/// when allowed.
fn decide(snapshot: &Snapshot, workload: (&str, &str)) -> Option<&'static str> {
    let index = PolicyIndex::build(snapshot);
    let destination = &snapshot.workloads[&WorkloadRef::new(workload.0, workload.1)];
    let front = SpiffeId::new("cluster.local", "web", "front").unwrap();
    index
        .evaluate(&ConnectionFacts {
            destination,
            dst_port: 8080,
            source_identity: Some(&front),
            source_ip: ip("10.0.0.5"),
            request: None,
        })
        .reason()
}

/// The snapshot a freshly started agent of `node` publishes first: an agent restarted
/// with no memory of earlier versions.
async fn fresh_agent_snapshot(api: &FakeApi, node: &str) -> Arc<Snapshot> {
    let (tx, mut rx) = watch::channel(Arc::new(Snapshot::default()));
    let status = Arc::new(SourceStatus::new(crate::source::Kind::Kubernetes));
    let task = tokio::spawn(run(
        client_from(api.config()).unwrap(),
        test_config(node),
        MeshSettings::default(),
        tx,
        Report {
            status: Arc::clone(&status),
            health: Arc::new(Health::default()),
            ready: Ready::default(),
        },
    ));
    let deadline = tokio::time::Instant::now() + patience();
    while status.view().generation == 0 {
        tokio::time::timeout_at(deadline, rx.changed())
            .await
            .expect("the fresh agent publishes a snapshot")
            .unwrap();
    }
    task.abort();
    Arc::clone(&rx.borrow())
}

#[tokio::test]
async fn a_malformed_allow_policy_denies_the_workloads_it_selects_on_every_agent() {
    for (what, breaks, _) in malformed() {
        let api = FakeApi::start().await;
        cluster(&api);
        api.apply_value::<crd::AccessPolicy>(broken_policy("api-allow", "ALLOW", breaks));
        let mut h = Harness::start(api).await;
        let s = h.until("the pods", |s| s.workloads.len() == 3).await;

        assert_eq!(
            decide(&s, ("prod", "api")),
            Some("invalid_policy"),
            "{what}: the selected workload must deny; policies: {:#?}",
            s.policies
        );
        // Not selected: untouched.
        assert_eq!(decide(&s, ("prod", "web")), None, "{what}");
        assert_eq!(decide(&s, ("dev", "tool")), None, "{what}");

        // Another agent, or this one restarted, decides the same from the API alone.
        let fresh = fresh_agent_snapshot(&h.api, "node-c").await;
        assert_eq!(fresh.policies, s.policies, "{what}");
        assert_eq!(decide(&fresh, ("prod", "api")), Some("invalid_policy"));

        // Counted, by kind.
        let text = encode(&h.health);
        assert!(
            text.contains("weft_policies_invalid{kind=\"access_policy\"} 1"),
            "{what}: {text}"
        );
    }
}

#[tokio::test]
async fn a_policy_edited_into_a_malformed_one_denies_on_running_and_restarted_agents_alike() {
    let api = FakeApi::start().await;
    cluster(&api);
    api.apply_value::<crd::AccessPolicy>(policy_object("prod", "api-allow", "ALLOW", "web/front"));
    let mut h = Harness::start(api).await;
    let name = WorkloadRef::new("prod", "api-allow");
    let s = h
        .until("the policy", |s| s.policies.contains_key(&name))
        .await;
    assert_eq!(
        decide(&s, ("prod", "api")),
        None,
        "the intact policy allows"
    );

    let (_, breaks, _) = malformed()[0];
    h.api
        .apply_value::<crd::AccessPolicy>(broken_policy("api-allow", "ALLOW", breaks));
    let running = h
        .after_rejected(Kind::AccessPolicy, 1, ("api", "10.96.0.10"))
        .await;
    let restarted = fresh_agent_snapshot(&h.api, NODE).await;

    assert_eq!(decide(&running, ("prod", "api")), Some("invalid_policy"));
    assert_eq!(decide(&restarted, ("prod", "api")), Some("invalid_policy"));
    assert_eq!(running.policies, restarted.policies);
}

#[tokio::test]
async fn a_malformed_policy_whose_selector_is_malformed_too_denies_its_whole_namespace() {
    let api = FakeApi::start().await;
    cluster(&api);
    let (_, breaks, _) = malformed()[1];
    let mut object = broken_policy("api-allow", "ALLOW", breaks);
    object["spec"]["selector"]["matchLabels"] = json!({"app": "not a label value!"});
    api.apply_value::<crd::AccessPolicy>(object);
    // One that does not even decode (an action the schema would refuse, a selector that
    // is not a map): the same.
    api.apply_value::<crd::AccessPolicy>(json!({
        "metadata": {"name": "garbled", "namespace": "dev"},
        "spec": {"selector": "app=api", "action": "REJECT"},
    }));
    let mut h = Harness::start(api).await;
    let s = h.until("the pods", |s| s.workloads.len() == 3).await;

    assert_eq!(decide(&s, ("prod", "api")), Some("invalid_policy"));
    assert_eq!(decide(&s, ("prod", "web")), Some("invalid_policy"));
    assert_eq!(decide(&s, ("dev", "tool")), Some("invalid_policy"));
}

#[tokio::test]
async fn a_malformed_deny_policy_denies_everything_it_selects() {
    let api = FakeApi::start().await;
    cluster(&api);
    let (_, breaks, _) = malformed()[2];
    api.apply_value::<crd::AccessPolicy>(broken_policy("api-deny", "DENY", breaks));
    let mut h = Harness::start(api).await;
    let s = h.until("the pods", |s| s.workloads.len() == 3).await;

    // The intact DENY would have denied web/front on 8080 only; unreadable, it denies all.
    assert_eq!(decide(&s, ("prod", "api")), Some("invalid_policy"));
    assert_eq!(decide(&s, ("prod", "web")), None);
}

#[tokio::test]
async fn a_malformed_peer_authentication_is_strict_for_what_it_selects() {
    let api = FakeApi::start().await;
    cluster(&api);
    // A mode the schema would refuse, with a readable selector: STRICT for api.
    api.apply_value::<crd::PeerAuthentication>(json!({
        "metadata": {"name": "api-mode", "namespace": "prod"},
        "spec": {"selector": {"matchLabels": {"app": "api"}}, "mtls": {"mode": "OFF"}},
    }));
    // An unreadable selector: STRICT for its whole namespace, whatever mode it names.
    api.apply_value::<crd::PeerAuthentication>(json!({
        "metadata": {"name": "dev-mode", "namespace": "dev"},
        "spec": {"selector": {"matchLabels": {"app": "bad value!"}}, "mtls": {"mode": "DISABLED"}},
    }));
    let mut h = Harness::start(api).await;
    let s = h.until("the pods", |s| s.workloads.len() == 3).await;

    let mode = |ns: &str, name: &str| s.mtls_mode(&s.workloads[&WorkloadRef::new(ns, name)]);
    assert_eq!(mode("prod", "api"), MtlsMode::Strict);
    assert_eq!(mode("prod", "web"), MtlsMode::Permissive);
    assert_eq!(mode("dev", "tool"), MtlsMode::Strict);
    let text = encode(&h.health);
    assert!(
        text.contains("weft_policies_invalid{kind=\"peer_authentication\"} 2"),
        "{text}"
    );
}

/// The `Accepted` condition of a weft resource as (status, reason, message), if any.
fn accepted(object: &Value) -> Option<(String, String, String)> {
    let condition = object["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Accepted")?;
    let text = |key: &str| condition[key].as_str().unwrap_or_default().to_owned();
    Some((text("status"), text("reason"), text("message")))
}

#[tokio::test]
async fn the_accepted_condition_names_the_field_and_is_written_once_by_one_agent() {
    let api = FakeApi::start().await;
    cluster(&api);
    api.apply(&agent_pod(NODE, true));
    api.apply(&agent_pod("node-b", true));
    for (i, (_, breaks, _)) in malformed().into_iter().enumerate() {
        let mut object = broken_policy(&format!("bad-{i}"), "ALLOW", breaks);
        object["metadata"]["generation"] = 4.into();
        api.apply_value::<crd::AccessPolicy>(object);
    }
    api.apply_value::<crd::AccessPolicy>(policy_object("prod", "good", "ALLOW", "web/front"));
    api.apply_value::<crd::PeerAuthentication>(json!({
        "metadata": {"name": "dev-mode", "namespace": "dev"},
        "spec": {"selector": {"matchLabels": {"app": "bad value!"}}, "mtls": {"mode": "DISABLED"}},
    }));
    let other = OtherAgent::start(&api, "node-b");
    let mut h = Harness::start(api).await;
    h.until("the pods", |s| s.workloads.len() == 3).await;

    let policy = |api: &FakeApi, name: &str| api.object::<crd::AccessPolicy>("prod", name).unwrap();
    let deadline = Instant::now() + patience();
    let all_written = |api: &FakeApi| {
        (0..3).all(|i| accepted(&policy(api, &format!("bad-{i}"))).is_some())
            && accepted(&policy(api, "good")).is_some()
            && accepted(
                &api.object::<crd::PeerAuthentication>("dev", "dev-mode")
                    .unwrap(),
            )
            .is_some()
    };
    while !all_written(&h.api) {
        assert!(
            Instant::now() < deadline,
            "Accepted conditions not written; patches: {:#?}",
            h.api.patches()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for (i, (what, _, field)) in malformed().into_iter().enumerate() {
        let object = policy(&h.api, &format!("bad-{i}"));
        let (status, reason, message) = accepted(&object).unwrap();
        assert_eq!(
            (status.as_str(), reason.as_str()),
            ("False", "Invalid"),
            "{what}"
        );
        assert!(message.contains(field), "{what}: {message}");
        assert!(message.contains("denies"), "{what}: {message}");
        let condition = &object["status"]["conditions"][0];
        assert_eq!(condition["observedGeneration"], 4, "{condition}");
        assert!(condition["lastTransitionTime"].is_string(), "{condition}");
    }
    let (status, reason, _) = accepted(&policy(&h.api, "good")).unwrap();
    assert_eq!((status.as_str(), reason.as_str()), ("True", "Accepted"));
    let mode = h
        .api
        .object::<crd::PeerAuthentication>("dev", "dev-mode")
        .unwrap();
    let (status, _, message) = accepted(&mode).unwrap();
    assert_eq!(status, "False");
    assert!(
        message.contains("spec.selector.matchLabels.app"),
        "{message}"
    );
    assert!(message.contains("STRICT"), "{message}");

    // Written once, by one agent: no more writes whatever else changes.
    let status_writes = |api: &FakeApi| {
        api.requests()
            .iter()
            .filter(|r| r.starts_with("PATCH ") && r.ends_with("/status"))
            .count()
    };
    assert_eq!(status_writes(&h.api), 5, "{:#?}", h.api.requests());
    h.api
        .apply(&service("prod", "api", "10.96.0.10", &[("", 80, None)]));
    h.until("the service", |s| s.services.len() == 1).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(status_writes(&h.api), 5, "{:#?}", h.api.patches());
    assert!(other.health.all_synced());

    // Fixed: Accepted turns True, in one more write.
    h.api
        .apply_value::<crd::AccessPolicy>(policy_object("prod", "bad-0", "ALLOW", "web/front"));
    let deadline = Instant::now() + patience();
    while accepted(&policy(&h.api, "bad-0")).map(|a| a.0) != Some("True".into()) {
        assert!(Instant::now() < deadline, "{:#?}", h.api.patches());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(status_writes(&h.api), 6, "{:#?}", h.api.patches());
}
