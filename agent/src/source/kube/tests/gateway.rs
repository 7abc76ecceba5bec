//! A gateway's source: its Gateway and certificate Secrets, each watched by name in its
//! namespace, and the routes naming it.

use k8s_openapi::{ByteString, api::core::v1::Secret};

use super::*;

type GatewayKind = gateway_api::experimental::gateways::Gateway;

/// The source of the gateway `edge/public`, which reads the Secrets `shop-cert` and
/// `api-cert`.
fn gateway_config() -> Config {
    Config {
        gateway_for: Some(Box::new(GatewayFor {
            gateway: WorkloadRef::new("edge", "public"),
            tls_secrets: vec!["shop-cert".into(), "api-cert".into()],
        })),
        ..test_config(NODE)
    }
}

fn gateway_object(name: &str, class: &str) -> serde_json::Value {
    json!({
        "metadata": {"name": name, "namespace": "edge"},
        "spec": {
            "gatewayClassName": class,
            "listeners": [
                {"name": "https", "port": 8443, "protocol": "HTTPS",
                 "tls": {"certificateRefs": [{"name": "shop-cert"}]},
                 "allowedRoutes": {"namespaces": {"from": "All"}}},
            ],
        },
    })
}

/// A `kubernetes.io/tls` Secret of a fresh self-signed certificate, as the API keeps it.
fn tls_secret(namespace: &str, name: &str) -> Secret {
    let cert = rcgen::generate_simple_self_signed(vec!["shop.example.com".into()]).unwrap();
    let data = [
        ("tls.crt", cert.cert.pem()),
        ("tls.key", cert.signing_key.serialize_pem()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), ByteString(v.into_bytes())))
    .collect();
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            ..ObjectMeta::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(data),
        ..Secret::default()
    }
}

fn gateway_route(name: &str, gateway: &str) -> serde_json::Value {
    json!({
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {
            "parentRefs": [{"kind": "Gateway", "name": gateway, "namespace": "edge"}],
            "rules": [{"backendRefs": [{"name": "shop", "port": 80}]}],
        },
    })
}

#[tokio::test]
async fn a_gateway_reads_its_gateway_its_secrets_by_name_and_the_routes_naming_it() {
    let api = FakeApi::start().await;
    api.apply_value::<GatewayKind>(gateway_object("public", "weft"));
    api.apply_value::<GatewayKind>(gateway_object("internal", "weft"));
    api.apply(&tls_secret("edge", "shop-cert"));
    api.apply(&tls_secret("edge", "unrelated"));
    api.apply(&tls_secret("shop", "shop-cert"));
    api.apply_value::<HttpRouteKind>(gateway_route("shop", "public"));
    api.apply_value::<HttpRouteKind>(gateway_route("other", "internal"));
    // A waypoint's route is not the gateway's.
    api.apply_value::<HttpRouteKind>(http_route("web", "web", "web-v1"));
    let mut h = Harness::start_with(api, gateway_config()).await;

    let s = h
        .until("the gateway, its certificate and its route", |s| {
            !s.gateways.is_empty() && !s.tls_certificates.is_empty() && !s.routes.is_empty()
        })
        .await;
    let public = WorkloadRef::new("edge", "public");
    assert_eq!(s.gateways.keys().collect::<Vec<_>>(), [&public]);
    assert_eq!(
        s.tls_certificates.keys().collect::<Vec<_>>(),
        [&WorkloadRef::new("edge", "shop-cert")]
    );
    let routes: Vec<_> = s.routes.iter().map(|r| r.name.to_string()).collect();
    assert_eq!(routes, ["shop/shop"]);
    h.until_health("ready", |_, ready| ready.is_ready()).await;

    // Secrets only by name, in the gateway's namespace: what RBAC with resourceNames
    // allows, and no other Secret ever reaches the agent.
    let requests = h.api.requests();
    let secrets: Vec<&String> = requests.iter().filter(|r| r.contains("secrets")).collect();
    assert!(!secrets.is_empty());
    for request in &secrets {
        assert!(
            request.starts_with("/api/v1/namespaces/edge/secrets?")
                && (request.contains("fieldSelector=metadata.name%3Dshop-cert")
                    || request.contains("fieldSelector=metadata.name%3Dapi-cert")),
            "{request}"
        );
    }
    assert!(
        requests
            .iter()
            .filter(|r| r.contains("/gateways"))
            .all(
                |r| r.starts_with("/apis/gateway.networking.k8s.io/v1/namespaces/edge/gateways?")
                    && r.contains("fieldSelector=metadata.name%3Dpublic")
            ),
        "{requests:#?}"
    );

    // The second Secret arrives later: rotation and late creation are watch events.
    h.api.apply(&tls_secret("edge", "api-cert"));
    let s = h
        .until("both certificates", |s| s.tls_certificates.len() == 2)
        .await;
    let before = s.tls_certificates[&WorkloadRef::new("edge", "shop-cert")]
        .fingerprint
        .clone();
    h.api.apply(&tls_secret("edge", "shop-cert"));
    h.until("the rotated certificate", |s| {
        s.tls_certificates[&WorkloadRef::new("edge", "shop-cert")].fingerprint != before
    })
    .await;
}

#[tokio::test]
async fn an_invalid_gateway_or_secret_is_left_out_and_logged_once() {
    let api = FakeApi::start().await;
    api.apply_value::<GatewayKind>(gateway_object("public", "weft"));
    api.apply(&tls_secret("edge", "shop-cert"));
    api.apply(&tls_secret("edge", "api-cert"));
    let mut h = Harness::start_with(api, gateway_config()).await;
    h.until("the gateway and its certificates", |s| {
        s.gateways.len() == 1 && s.tls_certificates.len() == 2
    })
    .await;

    // Not its last good version: left out.
    let mut opaque = tls_secret("edge", "shop-cert");
    opaque.type_ = Some("Opaque".into());
    h.api.apply(&opaque);
    let s = h
        .until("the certificate left out", |s| {
            s.tls_certificates.len() == 1
        })
        .await;
    assert!(
        s.tls_certificates
            .contains_key(&WorkloadRef::new("edge", "api-cert"))
    );
    let health = h.health.view();
    let secrets = &health[&Kind::TlsSecret];
    assert_eq!(secrets.rejected, 1, "{secrets:?}");
    let last = secrets.last_rejection.clone().unwrap();
    assert!(
        last.contains("Secret edge/shop-cert rejected: type"),
        "{last}"
    );

    let mut udp = gateway_object("public", "weft");
    udp["spec"]["listeners"][0]["protocol"] = "UDP".into();
    h.api.apply_value::<GatewayKind>(udp);
    h.until("the gateway left out", |s| s.gateways.is_empty())
        .await;
    let last = h.health.view()[&Kind::Gateway]
        .last_rejection
        .clone()
        .unwrap();
    assert!(
        last.contains("spec.listeners[0].protocol: not supported by weft yet"),
        "{last}"
    );
    assert_eq!(h.status.view().rejected_total, 2);

    // Fixed: back in. Of another class: out, and not an error.
    h.api
        .apply_value::<GatewayKind>(gateway_object("public", "weft"));
    h.until("the gateway back", |s| s.gateways.len() == 1).await;
    h.api
        .apply_value::<GatewayKind>(gateway_object("public", "istio"));
    h.until("the gateway of another class out", |s| {
        s.gateways.is_empty()
    })
    .await;
    assert_eq!(h.health.view()[&Kind::Gateway].rejected, 0);
}

#[test]
fn a_kind_watched_by_name_is_synced_once_every_watch_has_listed_and_up_while_all_are() {
    let mut health = WatchHealth::default();
    health.add_part(Some("edge/a"));
    health.add_part(Some("edge/b"));
    health.set_listed(Some("edge/a"));
    assert!(!health.synced && !health.up);
    health.set_listed(Some("edge/b"));
    assert!(health.synced && health.up);
    health.last_error = Some("500".into());
    health.set_up(Some("edge/a"), false);
    assert!(health.synced && !health.up);
    assert!(health.last_error.is_some());
    health.set_up(Some("edge/a"), true);
    assert!(health.up && health.last_error.is_none());
}
