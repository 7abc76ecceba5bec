//! Hostile requests: mirrors of denied requests, forged `forwarded: for=`, paths spelled to
//! slip past a DENY.

use std::sync::atomic::Ordering;

use crate::state::{IpBlock, Source};

use super::*;

fn policy(name: &str, app: &str, action: Action, rule: Rule) -> AccessPolicy {
    AccessPolicy {
        name: svc(name),
        selector: WorkloadSelector {
            namespace: "default".into(),
            match_labels: BTreeMap::from([("app".into(), app.into())]),
        },
        action,
        rules: vec![rule],
        invalid: None,
        external_services: vec![],
    }
}

fn paths(paths: &[&str]) -> Rule {
    Rule {
        l7: Some(L7Match {
            methods: Vec::new(),
            paths: paths.iter().map(|p| (*p).to_owned()).collect(),
            headers: BTreeMap::new(),
            ..L7Match::default()
        }),
        ..Rule::default()
    }
}

fn mirrored_to_shadow() -> HttpRoute {
    route(vec![RouteRule {
        filters: vec![Filter::Mirror(Mirror {
            backend: service_ref("shadow"),
            parts_per_million: 1_000_000,
        })],
        ..rule(vec![], &[("primary", 1)])
    }])
}

/// Waits until `backend` saw `n` requests, then returns their paths.
async fn paths_seen(h: &Harness, backend: &str, n: usize) -> Vec<String> {
    let deadline = Instant::now() + patience();
    while h.backend(backend).seen.lock().len() < n {
        assert!(Instant::now() < deadline, "{backend} saw fewer than {n}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let seen = h.backend(backend).seen.lock();
    seen.iter().map(|s| s.path_and_query.clone()).collect()
}

fn metric(h: &Harness, name: &str, reason: &str) -> u64 {
    let text = h.registry.encode().unwrap();
    text.lines()
        .filter(|l| l.starts_with(&format!("weft_{name}_total{{")))
        .filter(|l| label(l, "reason") == reason)
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_primary_policy_denies_is_not_mirrored() {
    let h = Harness::new(&["primary", "shadow"]).await;
    h.set_routes(vec![mirrored_to_shadow()]);
    h.update(|s| {
        let p = policy("no-admin", "primary", Action::Deny, paths(&["/admin"]));
        s.policies.insert(p.name.clone(), p);
    });
    let client = h.h1().await;
    assert_eq!(client.get("/admin").await.status, StatusCode::FORBIDDEN);
    assert_eq!(client.get("/open").await.status, StatusCode::OK);
    // The copy of /open is sent after /admin was refused: once it is there, so would be
    // a copy of /admin.
    assert_eq!(paths_seen(&h, "shadow", 1).await, ["/open"]);
    assert_eq!(h.backend("primary").count.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_the_mirror_endpoints_policy_denies_is_not_sent() {
    let h = Harness::new(&["primary", "shadow"]).await;
    h.set_routes(vec![mirrored_to_shadow()]);
    h.update(|s| {
        let p = policy(
            "shadow-no-admin",
            "shadow",
            Action::Deny,
            paths(&["/admin"]),
        );
        s.policies.insert(p.name.clone(), p);
    });
    let client = h.h1().await;
    // The primary may serve /admin; the shadow's own policy refuses it a copy.
    assert_eq!(client.get("/admin").await.status, StatusCode::OK);
    assert_eq!(client.get("/open").await.status, StatusCode::OK);
    assert_eq!(paths_seen(&h, "shadow", 1).await, ["/open"]);
    assert_eq!(metric(&h, "waypoint_mirrors_skipped", "policy_denied"), 1);
}

/// An ALLOW for the address 10.1.0.7 only (the harness client's `forwarded: for=`).
fn only_from_forwarded_address(s: &mut Snapshot) {
    let rule = Rule {
        from: vec![Source {
            ip_blocks: vec![IpBlock {
                cidr: "10.1.0.7/32".parse().unwrap(),
                except: Vec::new(),
            }],
            ..Source::default()
        }],
        ..Rule::default()
    };
    let p = policy("only-10-1-0-7", "app", Action::Allow, rule);
    s.policies.insert(p.name.clone(), p);
}

/// A pod of `service_account` with the address 10.1.0.7.
fn add_workload_at_forwarded_address(s: &mut Snapshot, name: &str, service_account: &str) {
    let workload = Workload {
        name: svc(name),
        service_account: service_account.into(),
        ips: vec!["10.1.0.7".parse().unwrap()],
        location: Location::Remote { node: "a".into() },
        enrolled: true,
        mtls_mode: None,
        labels: BTreeMap::new(),
    };
    s.workloads.insert(workload.name.clone(), workload);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_is_believed_for_a_workload_of_the_peers_identity() {
    let h = Harness::new(&["app"]).await;
    h.update(|s| {
        only_from_forwarded_address(s);
        add_workload_at_forwarded_address(s, "client-1", "client");
    });
    assert_eq!(h.h1().await.get("/").await.status, StatusCode::OK);
    assert_eq!(h.access_log()[0]["src.addr"], "10.1.0.7:0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_a_workload_of_another_identity_is_ignored_and_counted() {
    let h = Harness::new(&["app"]).await;
    h.update(|s| {
        only_from_forwarded_address(s);
        add_workload_at_forwarded_address(s, "payments-1", "payments");
    });
    assert_eq!(h.h1().await.get("/").await.status, StatusCode::FORBIDDEN);
    let src = h.access_log()[0]["src.addr"].as_str().unwrap().to_owned();
    assert!(
        src.starts_with("127.0.0.1:"),
        "the peer's own address: {src}"
    );
    assert_eq!(
        metric(&h, "waypoint_forwarded_for_ignored", "identity_mismatch"),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_an_unknown_address_is_ignored() {
    let h = Harness::new(&["app"]).await;
    h.update(only_from_forwarded_address);
    assert_eq!(h.h1().await.get("/").await.status, StatusCode::FORBIDDEN);
    assert_eq!(
        metric(&h, "waypoint_forwarded_for_ignored", "unknown_address"),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_spelling_of_a_denied_path_is_denied_and_the_backend_sees_the_normal_form() {
    let h = Harness::new(&["app", "admin"]).await;
    h.set_routes(vec![route(vec![
        rule(
            vec![path(PathMatch::Prefix("/admin".into()))],
            &[("admin", 1)],
        ),
        rule(vec![], &[("app", 1)]),
    ])]);
    h.update(|s| {
        let p = policy(
            "no-secret",
            "admin",
            Action::Deny,
            paths(&["/admin/secret"]),
        );
        s.policies.insert(p.name.clone(), p);
    });
    for client in [h.h1().await, h.h2().await] {
        for spelling in [
            "/admin/secret",
            "/admin/%73ecret",
            "//admin//secret",
            "/./admin/./secret",
            "/x/../admin/secret",
            "/%2e%2E/admin/secret",
        ] {
            let reply = client.get(spelling).await;
            assert_eq!(reply.status, StatusCode::FORBIDDEN, "{spelling}");
        }
        // Routed by the normal form (`//admin` is `/admin`), forwarded in it, query as sent.
        let reply = client.get("//admin/./open?q=%2F&r=..//x").await;
        assert_eq!(reply.backend(), "admin");
        assert!(
            reply
                .body
                .starts_with("admin GET /admin/open?q=%2F&r=..//x "),
            "{}",
            reply.body
        );
    }
    assert_eq!(h.backend("admin").count.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encoded_slash_is_refused_with_400_and_counted() {
    let h = Harness::new(&["app"]).await;
    let client = h.h1().await;
    for path in ["/a%2Fb", "/a%2fb", "/a%5Cb", "/a%5cb"] {
        assert_eq!(
            client.get(path).await.status,
            StatusCode::BAD_REQUEST,
            "{path}"
        );
    }
    assert_eq!(client.get("/a%zz").await.status, StatusCode::BAD_REQUEST);
    assert_eq!(h.backend("app").count.load(Ordering::SeqCst), 0);
    assert_eq!(
        metric(&h, "waypoint_rejected_requests", "path_escaped_slash"),
        4
    );
    assert_eq!(
        metric(
            &h,
            "waypoint_rejected_requests",
            "path_bad_percent_encoding"
        ),
        1
    );
    assert_eq!(h.access_log()[0]["error"], "path_escaped_slash");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_switch_an_encoded_slash_is_kept_or_decoded() {
    let keep = Harness::with(&["app"], |c| {
        c.path_escaped_slashes = super::super::path::EscapedSlashes::Keep;
    })
    .await;
    let reply = keep.h1().await.get("/a%2fb/..%2F").await;
    assert!(
        reply.body.starts_with("app GET /a%2Fb/..%2F "),
        "{}",
        reply.body
    );
    let decode = Harness::with(&["app"], |c| {
        c.path_escaped_slashes = super::super::path::EscapedSlashes::Decode;
    })
    .await;
    let reply = decode.h1().await.get("/a%2Fb/..%2Fc").await;
    assert!(reply.body.starts_with("app GET /a/c "), "{}", reply.body);
}
