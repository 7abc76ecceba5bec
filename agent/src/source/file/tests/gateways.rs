//! `gateways:` and `secrets:`: Gateway and Secret manifests into the snapshot, with real
//! certificates.

use serde_json::{Value, json};

use super::*;

/// A `kubernetes.io/tls` Secret `namespace/name` of a fresh self-signed certificate.
fn tls_secret(namespace: &str, name: &str) -> Value {
    let cert = rcgen::generate_simple_self_signed(vec![format!("{name}.example.com")]).unwrap();
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace},
        "type": "kubernetes.io/tls",
        "stringData": {"tls.crt": cert.cert.pem(), "tls.key": cert.signing_key.serialize_pem()},
    })
}

fn gateway(class: &str, certificates: &[&str]) -> Value {
    let refs: Vec<Value> = certificates.iter().map(|c| json!({"name": c})).collect();
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": "public", "namespace": "edge"},
        "spec": {
            "gatewayClassName": class,
            "listeners": [
                {"name": "https", "port": 8443, "protocol": "HTTPS",
                 "tls": {"certificateRefs": refs}},
                {"name": "http", "port": 8080, "protocol": "HTTP"},
            ],
        },
    })
}

/// A file of `gateways` and `secrets` (JSON is YAML).
fn file(gateways: Vec<Value>, secrets: Vec<Value>) -> String {
    json!({"gateways": gateways, "secrets": secrets}).to_string()
}

#[test]
fn gateways_and_their_certificates_are_read_by_namespace_and_name() {
    let secrets = vec![
        tls_secret("edge", "shop-cert"),
        tls_secret("edge", "api-cert"),
    ];
    let doc = parse_str(&file(
        vec![gateway("weft", &["shop-cert", "api-cert"])],
        secrets,
    ))
    .unwrap();
    let s = &doc.snapshot;
    let public = &s.gateways[&WorkloadRef::new("edge", "public")];
    assert_eq!(public.listeners.len(), 2);
    assert_eq!(
        public.listeners[0].certificates,
        [
            WorkloadRef::new("edge", "shop-cert"),
            WorkloadRef::new("edge", "api-cert")
        ]
    );
    assert_eq!(s.tls_certificates.len(), 2);
    let shop = &s.tls_certificates[&WorkloadRef::new("edge", "shop-cert")];
    assert_eq!(shop.fingerprint.len(), 64);
    assert_eq!(shop.chain.len(), 1);
}

#[test]
fn a_gateway_of_another_class_is_left_out_and_its_secrets_are_not_needed() {
    let doc = parse_str(&file(vec![gateway("istio", &["elsewhere"])], Vec::new())).unwrap();
    assert!(doc.snapshot.gateways.is_empty());
}

#[test]
fn gateway_and_secret_errors_name_the_field() {
    let mut opaque = tls_secret("edge", "opaque");
    opaque["type"] = "Opaque".into();
    let mut other = gateway("weft", &["shop-cert"]);
    other["spec"]["listeners"][1]["protocol"] = "UDP".into();
    let cases = [
        (
            file(
                vec![gateway("weft", &["shop-cert", "typo"])],
                vec![tls_secret("edge", "shop-cert")],
            ),
            "gateways[0].spec.listeners[0].tls.certificateRefs[1].name: no Secret edge/typo in secrets",
        ),
        (
            file(Vec::new(), vec![tls_secret("edge", "a"), opaque]),
            "secrets[1].type: \"Opaque\"",
        ),
        (
            file(
                Vec::new(),
                vec![tls_secret("edge", "a"), tls_secret("edge", "a")],
            ),
            "secrets[1].metadata.name: duplicate Secret edge/a",
        ),
        (
            file(
                vec![gateway("weft", &["a"]), gateway("weft", &["a"])],
                vec![tls_secret("edge", "a")],
            ),
            "gateways[1].metadata.name: duplicate Gateway edge/public",
        ),
        (
            file(vec![other], vec![tls_secret("edge", "shop-cert")]),
            "gateways[0].spec.listeners[1].protocol: not supported by weft yet",
        ),
    ];
    for (text, expected) in cases {
        let err = parse_str(&text).unwrap_err();
        assert!(err.contains(expected), "{expected}\n{err}");
    }
}

#[test]
fn routes_attach_to_gateways_of_the_file() {
    let route = json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "shop", "namespace": "shop"},
        "spec": {
            "parentRefs": [{"kind": "Gateway", "name": "public", "namespace": "edge", "sectionName": "https"}],
            "rules": [{"backendRefs": [{"name": "shop", "port": 80}]}],
        },
    });
    let text = json!({
        "gateways": [gateway("weft", &["a"])],
        "secrets": [tls_secret("edge", "a")],
        "routes": [route],
    })
    .to_string();
    let doc = parse_str(&text).unwrap();
    let parents = &doc.snapshot.routes[0].gateway_parents;
    assert_eq!(parents[0].gateway, WorkloadRef::new("edge", "public"));
    assert_eq!(parents[0].section_name.as_deref(), Some("https"));
    assert!(doc.snapshot.gateways.contains_key(&parents[0].gateway));
}
