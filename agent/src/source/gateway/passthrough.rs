//! `TLSRoute` (`gateway.networking.k8s.io/v1`, or `v1alpha2`/`v1alpha3` as older
//! installations serve it) and `TCPRoute` (`v1alpha2`) → `state::HttpRoute` of kind
//! `Tls` or `Tcp`: the routes of a gateway's TLS passthrough and TCP listeners. Their
//! parentRefs and backendRefs are read through the HTTP types, so one validation serves
//! every kind; a rule has backends only, and a route has one rule (the only one a
//! connection could take: there is nothing to match on but the SNI, which the route's
//! `hostnames` already say).

use gateway_api::experimental::{tcproutes as tcp, tlsroutes as tls};
use serde_json::Value;

use super::{RuleParts, at, decode, hostnames, invalid, object_name, parents, reshape, rule};
use crate::{
    source::syntax::Invalid,
    state::{HttpRoute, RouteKind},
};

/// The `apiVersion`s a `TLSRoute` may come in.
pub const TLS_ROUTE_VERSIONS: [&str; 3] = [
    "gateway.networking.k8s.io/v1",
    "gateway.networking.k8s.io/v1alpha3",
    "gateway.networking.k8s.io/v1alpha2",
];
/// The `apiVersion` of a `TCPRoute`.
pub const TCP_ROUTE_VERSION: &str = "gateway.networking.k8s.io/v1alpha2";

/// Validates a `TLSRoute` object.
pub fn tls_route(
    field: &str,
    object: &Value,
    default_namespace: &str,
) -> Result<HttpRoute, Invalid> {
    let route: tls::TlsRoute = decode(field, &with_version(object, "v1"))?;
    let spec = route.spec;
    let parts = L4Parts {
        kind: RouteKind::Tls,
        hostnames: Some(spec.hostnames),
        parent_refs: &spec.parent_refs,
        rules: &spec.rules,
    };
    l4_route(field, &route.metadata, default_namespace, parts)
}

/// Validates a `TCPRoute` object.
pub fn tcp_route(
    field: &str,
    object: &Value,
    default_namespace: &str,
) -> Result<HttpRoute, Invalid> {
    let route: tcp::TcpRoute = decode(field, object)?;
    let spec = route.spec;
    let parts = L4Parts {
        kind: RouteKind::Tcp,
        hostnames: None,
        parent_refs: &spec.parent_refs,
        rules: &spec.rules,
    };
    l4_route(field, &route.metadata, default_namespace, parts)
}

/// What a TLSRoute and a TCPRoute both carry, as their own types have it.
struct L4Parts<'a, P, R> {
    kind: RouteKind,
    hostnames: Option<Vec<String>>,
    parent_refs: &'a P,
    rules: &'a R,
}

/// The route of `parts`, its parentRefs and rules read through the HTTP types.
fn l4_route<P: serde::Serialize, R: serde::Serialize>(
    field: &str,
    metadata: &kube::api::ObjectMeta,
    default_namespace: &str,
    parts: L4Parts<'_, P, R>,
) -> Result<HttpRoute, Invalid> {
    let name = object_name(field, metadata, default_namespace)?;
    let spec_field = at(field, "spec");
    let rules = reshape(&format!("{spec_field}.rules"), parts.rules)?;
    let parent_refs = reshape(&format!("{spec_field}.parentRefs"), parts.parent_refs)?;
    Ok(HttpRoute {
        kind: parts.kind,
        parents: Vec::new(),
        gateway_parents: gateway_parents(&spec_field, &name.namespace, parent_refs)?,
        hostnames: hostnames(&spec_field, parts.hostnames)?,
        rules: one_rule(&spec_field, &name.namespace, rules)?,
        name,
    })
}

/// The Gateway parents of an L4 route: a Service parent is refused (a TLS or TCP route
/// attaches only to a gateway's listener here).
fn gateway_parents(
    spec_field: &str,
    namespace: &str,
    refs: Option<Vec<gateway_api::experimental::httproutes::HttpRouteParentRefs>>,
) -> Result<Vec<crate::state::GatewayParent>, Invalid> {
    let (services, gateways) = parents(spec_field, namespace, refs)?;
    if !services.is_empty() {
        return Err(invalid(
            format!("{spec_field}.parentRefs"),
            "a Service parent: weft attaches TLS and TCP routes to Gateway listeners only".into(),
        ));
    }
    Ok(gateways)
}

/// A rule of an L4 route, as the HTTP types read it: a name and backends.
#[derive(serde::Deserialize)]
struct L4Rule {
    name: Option<String>,
    #[serde(rename = "backendRefs", default)]
    backend_refs: Vec<gateway_api::experimental::httproutes::HttpRouteRulesBackendRefs>,
}

/// The route's one rule.
fn one_rule(
    spec_field: &str,
    namespace: &str,
    rules: Vec<L4Rule>,
) -> Result<Vec<crate::state::route::RouteRule>, Invalid> {
    if rules.len() != 1 {
        return Err(invalid(
            format!("{spec_field}.rules"),
            format!(
                "{} rules: a TLS or TCP route has exactly one (a connection has nothing else to match on)",
                rules.len()
            ),
        ));
    }
    let raw = rules.into_iter().next().expect("one rule");
    let parts = RuleParts {
        name: raw.name,
        matches: Vec::new(),
        filters: Vec::new(),
        backend_refs: raw.backend_refs,
    };
    Ok(vec![rule(
        &format!("{spec_field}.rules[0]"),
        namespace,
        parts,
    )?])
}

/// `object` with its `apiVersion` as the types know it: the older versions of TLSRoute have
/// the same fields.
fn with_version(object: &Value, version: &str) -> Value {
    let mut object = object.clone();
    object["apiVersion"] = Value::String(format!("gateway.networking.k8s.io/{version}"));
    object
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{source::gateway::route, state::WorkloadRef};

    fn parse(yaml: &str) -> Result<HttpRoute, Invalid> {
        let object: Value = serde_yaml::from_str(yaml).unwrap();
        route("routes[0]", &object, "default")
    }

    const TLS_ROUTE: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: TLSRoute
metadata: {name: db, namespace: data}
spec:
  parentRefs: [{name: public, namespace: edge, sectionName: db}]
  hostnames: [DB.example.com]
  rules: [{backendRefs: [{name: postgres, port: 5432}]}]
"#;

    #[test]
    fn a_tls_route_attaches_to_a_gateway_listener_by_sni() {
        let route = parse(TLS_ROUTE).unwrap();
        assert_eq!(route.kind, RouteKind::Tls);
        assert_eq!(route.name, WorkloadRef::new("data", "db"));
        assert_eq!(route.hostnames, ["db.example.com"]);
        assert_eq!(
            route.gateway_parents[0].gateway,
            WorkloadRef::new("edge", "public")
        );
        assert_eq!(route.gateway_parents[0].section_name.as_deref(), Some("db"));
        let backend = &route.rules[0].backends[0];
        assert_eq!(backend.service.name, WorkloadRef::new("data", "postgres"));
        assert_eq!(backend.service.port, 5432);
        // The older versions read the same.
        let older = TLS_ROUTE.replace("/v1\n", "/v1alpha2\n");
        assert_eq!(parse(&older).unwrap(), route);
    }

    #[test]
    fn a_tcp_route_has_one_rule_and_gateway_parents_only() {
        let tcp = r#"
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {name: raw}
spec:
  parentRefs: [{name: public}]
  rules: [{backendRefs: [{name: a, port: 9000, weight: 3}, {name: b, port: 9000}]}]
"#;
        let route = parse(tcp).unwrap();
        assert_eq!(route.kind, RouteKind::Tcp);
        assert_eq!(route.rules[0].backends.len(), 2);
        assert_eq!(
            route.gateway_parents[0].gateway,
            WorkloadRef::new("default", "public")
        );

        let cases = [
            (
                "kind: TCPRoute",
                "kind: TCPRout",
                "routes[0].kind",
                "expected",
            ),
            (
                "kind: TCPRoute",
                "kind: HTTPRoute",
                "routes[0].apiVersion",
                "/v1",
            ),
            (
                "v1alpha2",
                "v1",
                "routes[0].apiVersion",
                "gateway.networking.k8s.io/v1alpha2",
            ),
            (
                "rules: [{backendRefs",
                "rules: [{backendRefs: [{name: a, port: 1}]}, {backendRefs",
                "routes[0].spec.rules",
                "exactly one",
            ),
            (
                "[{name: public}]",
                "[{kind: Service, group: \"\", name: a}]",
                "routes[0].spec.parentRefs",
                "Gateway listeners only",
            ),
            (
                "{name: b, port: 9000}",
                "{name: b, port: 9000, namespace: other}",
                "routes[0].spec.rules[0].backendRefs[1].namespace",
                "",
            ),
        ];
        for (from, to, field, says) in cases {
            let err = parse(&tcp.replace(from, to)).unwrap_err();
            assert_eq!(err.field, field, "{to}: {err}");
            assert!(err.to_string().contains(says), "{to}: {err}");
        }
    }
}
