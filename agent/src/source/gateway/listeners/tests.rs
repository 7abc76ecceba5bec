//! The Gateway conversion: every field, the defaults, the other classes, and the errors by
//! field.

use serde_json::Value;

use super::*;
use crate::state::RouteKind;

const GATEWAY: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: public, namespace: edge}
spec:
  gatewayClassName: weft
  infrastructure: {labels: {team: edge}}
  listeners:
    - name: https
      port: 8443
      protocol: HTTPS
      hostname: "*.Example.com"
      tls:
        mode: Terminate
        certificateRefs: [{kind: Secret, name: shop-cert}, {group: "", name: api-cert, namespace: edge}]
      allowedRoutes:
        namespaces: {from: All}
        kinds: [{kind: HTTPRoute}, {group: gateway.networking.k8s.io, kind: HTTPRoute}]
    - {name: http, port: 8080, protocol: HTTP}
    - {name: http-shop, port: 8080, protocol: HTTP, hostname: shop.example.com}
"#;

fn value(yaml: &str) -> Value {
    serde_yaml::from_str(yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"))
}

fn parse(yaml: &str) -> Result<Option<Gateway>, Invalid> {
    gateway("gateways[0]", &value(yaml), "default")
}

#[test]
fn a_gateway_converts_every_field() {
    let g = parse(GATEWAY).unwrap().unwrap();
    assert_eq!(g.name, WorkloadRef::new("edge", "public"));
    assert_eq!(
        g.listeners,
        [
            Listener {
                name: "https".into(),
                port: 8443,
                protocol: ListenerProtocol::Https,
                hostname: Some("*.example.com".into()),
                certificates: vec![
                    WorkloadRef::new("edge", "shop-cert"),
                    WorkloadRef::new("edge", "api-cert"),
                ],
                allowed_routes: AllowedRoutes {
                    namespaces: RouteNamespaces::All,
                    kinds: vec![RouteKind::Http],
                },
            },
            Listener {
                name: "http".into(),
                port: 8080,
                protocol: ListenerProtocol::Http,
                hostname: None,
                certificates: Vec::new(),
                allowed_routes: AllowedRoutes {
                    namespaces: RouteNamespaces::Same,
                    kinds: vec![RouteKind::Http, RouteKind::Grpc],
                },
            },
            Listener {
                name: "http-shop".into(),
                port: 8080,
                protocol: ListenerProtocol::Http,
                hostname: Some("shop.example.com".into()),
                certificates: Vec::new(),
                allowed_routes: AllowedRoutes {
                    namespaces: RouteNamespaces::Same,
                    kinds: vec![RouteKind::Http, RouteKind::Grpc],
                },
            },
        ]
    );
}

#[test]
fn a_gateway_of_another_class_is_someone_elses() {
    // Not read any further: what weft refuses is its class's business.
    let other = GATEWAY
        .replace("gatewayClassName: weft", "gatewayClassName: istio")
        .replace("protocol: HTTP}", "protocol: TCP, unknownField: 1}");
    assert_eq!(parse(&other).unwrap(), None);
}

#[test]
fn an_api_object_names_fields_from_its_root() {
    let mut object = value(GATEWAY);
    object["metadata"]["managedFields"] = serde_json::json!([{"manager": "kubectl"}]);
    object["status"] = serde_json::json!({"conditions": []});
    object["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("namespace");
    let g = gateway("", &object, "edge").unwrap().unwrap();
    assert_eq!(g.name, WorkloadRef::new("edge", "public"));
    object["spec"]["listeners"][1]["port"] = 0.into();
    let err = gateway("", &object, "edge").unwrap_err();
    assert_eq!(err.field, "spec.listeners[1].port");
}

#[test]
fn at_most_64_listeners() {
    let mut object = value(GATEWAY);
    let listeners: Vec<Value> = (0..=MAX_LISTENERS)
        .map(|i| serde_json::json!({"name": format!("l{i}"), "port": 1000 + i, "protocol": "HTTP"}))
        .collect();
    object["spec"]["listeners"] = listeners[..MAX_LISTENERS].into();
    gateway("g", &object, "default").unwrap();
    object["spec"]["listeners"] = listeners.into();
    let err = gateway("g", &object, "default").unwrap_err();
    assert_eq!(err.field, "g.spec.listeners");
    object["spec"]["listeners"] = Value::Array(Vec::new());
    gateway("g", &object, "default").unwrap_err();
}

#[test]
fn errors_name_the_field_path() {
    let cases = [
        (
            "{name: http, port: 8080, protocol: HTTP}",
            "{name: https, port: 8080, protocol: HTTP}",
            "gateways[0].spec.listeners[1].name",
            "already the name of listeners[0]",
        ),
        (
            "{name: http, port: 8080, protocol: HTTP}",
            "{name: Http, port: 8080, protocol: HTTP}",
            "gateways[0].spec.listeners[1].name",
            "not a valid name",
        ),
        (
            "{name: http, port: 8080, protocol: HTTP}",
            "{name: http, port: 65536, protocol: HTTP}",
            "gateways[0].spec.listeners[1].port",
            "not a port",
        ),
        (
            "{name: http, port: 8080, protocol: HTTP}",
            "{name: http, port: 8080, protocol: UDP}",
            "gateways[0].spec.listeners[1].protocol",
            "not supported by weft yet",
        ),
        (
            "{name: http, port: 8080, protocol: HTTP}",
            "{name: http, port: 8443, protocol: TLS}",
            "gateways[0].spec.listeners[1].tls",
            "required for a TLS listener",
        ),
        (
            "{name: http, port: 8080, protocol: HTTP}",
            "{name: http, port: 8080, protocol: http}",
            "gateways[0].spec.listeners[1].protocol",
            "expected \"HTTP\", \"HTTPS\", \"TLS\" or \"TCP\"",
        ),
        (
            "{name: http, port: 8080, protocol: HTTP}",
            "{name: http, port: 8443, protocol: HTTP}",
            "gateways[0].spec.listeners[1].protocol",
            "share its protocol",
        ),
        (
            "{name: http-shop, port: 8080, protocol: HTTP, hostname: shop.example.com}",
            "{name: http-shop, port: 8080, protocol: HTTP}",
            "gateways[0].spec.listeners[2].hostname",
            "already serves every host on port 8080",
        ),
        (
            "{name: http, port: 8080, protocol: HTTP}",
            "{name: http, port: 8080, protocol: HTTP, tls: {certificateRefs: [{name: a}]}}",
            "gateways[0].spec.listeners[1].tls",
            "only for an HTTPS or TLS listener",
        ),
        (
            "{name: http, port: 8080, protocol: HTTP}",
            "{name: http, port: 8080, protocol: HTTPS}",
            "gateways[0].spec.listeners[1].tls",
            "required",
        ),
        (
            "mode: Terminate",
            "mode: Passthrough",
            "gateways[0].spec.listeners[0].tls.mode",
            "Passthrough is for a TLS listener",
        ),
        (
            "mode: Terminate",
            "mode: Terminate\n        options: {a.example/ciphers: x}",
            "gateways[0].spec.listeners[0].tls.options",
            "not supported by weft yet",
        ),
        (
            "certificateRefs: [{kind: Secret, name: shop-cert}, {group: \"\", name: api-cert, namespace: edge}]",
            "certificateRefs: []",
            "gateways[0].spec.listeners[0].tls.certificateRefs",
            "expected 1 to 64",
        ),
        (
            "{group: \"\", name: api-cert, namespace: edge}",
            "{group: \"\", name: api-cert, namespace: shop}",
            "gateways[0].spec.listeners[0].tls.certificateRefs[1].namespace",
            "ReferenceGrant",
        ),
        (
            "{kind: Secret, name: shop-cert}",
            "{kind: ConfigMap, name: shop-cert}",
            "gateways[0].spec.listeners[0].tls.certificateRefs[0].kind",
            "only Secrets",
        ),
        (
            "{kind: Secret, name: shop-cert}",
            "{group: cert-manager.io, kind: Secret, name: shop-cert}",
            "gateways[0].spec.listeners[0].tls.certificateRefs[0].group",
            "only core Secrets",
        ),
        (
            "hostname: \"*.Example.com\"",
            "hostname: \"10.0.0.1\"",
            "gateways[0].spec.listeners[0].hostname",
            "IP address",
        ),
        (
            "hostname: \"*.Example.com\"",
            "hostname: \"exa mple.com\"",
            "gateways[0].spec.listeners[0].hostname",
            "host name",
        ),
        (
            "namespaces: {from: All}",
            "namespaces: {from: Selector, selector: {matchLabels: {a: b}}}",
            "gateways[0].spec.listeners[0].allowedRoutes.namespaces.from",
            "not supported by weft yet",
        ),
        (
            "{kind: HTTPRoute}, {group",
            "{kind: TLSRoute}, {group",
            "gateways[0].spec.listeners[0].allowedRoutes.kinds[0].kind",
            "a listener of protocol HTTPS serves HTTPRoute and GRPCRoute",
        ),
        (
            "{kind: HTTPRoute}, {group",
            "{group: example.com, kind: HTTPRoute}, {group",
            "gateways[0].spec.listeners[0].allowedRoutes.kinds[0].group",
            "expected \"gateway.networking.k8s.io\"",
        ),
        (
            "  gatewayClassName: weft\n",
            "  gatewayClassName: weft\n  addresses: [{value: 192.0.2.1}]\n",
            "gateways[0].spec.addresses",
            "not supported by weft yet",
        ),
        (
            "infrastructure: {labels: {team: edge}}",
            "infrastructure: {parametersRef: {group: a, kind: B, name: c}}",
            "gateways[0].spec.infrastructure.parametersRef",
            "not supported by weft yet",
        ),
        (
            "  gatewayClassName: weft\n",
            "  gatewayClassName: weft\n  allowedListeners: {namespaces: {from: All}}\n",
            "gateways[0].spec.allowedListeners.namespaces.from",
            "not supported by weft yet",
        ),
        (
            "  gatewayClassName: weft\n",
            "  gatewayClassName: weft\n  defaultScope: All\n",
            "gateways[0].spec.defaultScope",
            "not supported by weft yet",
        ),
        (
            "  gatewayClassName: weft\n",
            "  gatewayClassName: weft\n  tls: {backend: {}}\n",
            "gateways[0].spec.tls",
            "not supported by weft yet",
        ),
        (
            "{name: http, port: 8080, protocol: HTTP}",
            "{name: db, port: 5443, protocol: TLS, tls: {mode: Terminate, certificateRefs: [{name: a}]}}",
            "gateways[0].spec.listeners[1].tls.mode",
            "not supported by weft yet",
        ),
        (
            "{name: http, port: 8080, protocol: HTTP}",
            "{name: db, port: 5443, protocol: TLS, tls: {mode: Passthrough, certificateRefs: [{name: a}]}}",
            "gateways[0].spec.listeners[1].tls.certificateRefs",
            "presents no certificate",
        ),
        (
            "{name: http, port: 8080, protocol: HTTP}",
            "{name: raw, port: 9000, protocol: TCP, allowedRoutes: {kinds: [{kind: HTTPRoute}]}}",
            "gateways[0].spec.listeners[1].allowedRoutes.kinds[0].kind",
            "a listener of protocol TCP serves TCPRoute",
        ),
        (
            "{name: http, port: 8080, protocol: HTTP}",
            "{name: http, port: 8080, protocol: HTTP, hostnme: a.example}",
            "gateways[0].spec.listeners[1].hostnme",
            "unknown field",
        ),
        (
            "kind: Gateway",
            "kind: GatewayClass",
            "gateways[0].kind",
            "expected \"Gateway\"",
        ),
        (
            "metadata: {name: public, namespace: edge}",
            "metadata: {namespace: edge}",
            "gateways[0].metadata.name",
            "not a valid name",
        ),
    ];
    for (from, to, field, reason) in cases {
        assert!(GATEWAY.contains(from), "{from}");
        let err = parse(&GATEWAY.replacen(from, to, 1)).unwrap_err();
        assert_eq!(err.field, field, "{from} -> {to}: {err}");
        assert!(err.reason.contains(reason), "{from} -> {to}: {err}");
    }
    // The defaults of the spec are accepted as written out.
    let explicit = GATEWAY.replace(
        "  gatewayClassName: weft\n",
        "  gatewayClassName: weft\n  allowedListeners: {namespaces: {from: None}}\n  defaultScope: None\n  addresses: []\n",
    );
    parse(&explicit).unwrap().unwrap();
}

#[test]
fn passthrough_and_tcp_listeners_admit_their_route_kinds() {
    let text = GATEWAY.replace(
        "{name: http, port: 8080, protocol: HTTP}",
        "{name: db, port: 5443, protocol: TLS, hostname: db.example.com, tls: {mode: Passthrough}}\n    - {name: raw, port: 9000, protocol: TCP}",
    );
    let object: Value = serde_yaml::from_str(&text).unwrap();
    let gateway = gateway("g", &object, "default").unwrap().unwrap();
    let db = &gateway.listeners[1];
    assert_eq!(db.protocol, ListenerProtocol::Tls);
    assert_eq!(db.hostname.as_deref(), Some("db.example.com"));
    assert!(db.certificates.is_empty());
    assert_eq!(db.allowed_routes.kinds, [RouteKind::Tls]);
    let raw = &gateway.listeners[2];
    assert_eq!(raw.protocol, ListenerProtocol::Tcp);
    assert_eq!(raw.allowed_routes.kinds, [RouteKind::Tcp]);
}
