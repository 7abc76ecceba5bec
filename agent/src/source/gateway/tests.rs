//! The route conversion: every field of both kinds, the defaults, and the errors by field.

use std::time::Duration;

use proptest::prelude::*;
use serde_json::Value;

use super::*;

const HTTP: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: api, namespace: prod}
spec:
  parentRefs:
    - {group: "", kind: Service, name: api, port: 80}
    - {kind: Service, name: api-admin, namespace: prod}
    - {name: public-gateway}
    - {group: gateway.networking.k8s.io, kind: Gateway, name: edge, namespace: infra, sectionName: https, port: 443}
    - {group: gateway.networking.k8s.io, kind: ListenerSet, name: extra}
  hostnames: [API.example.com, "*.example.org"]
  rules:
    - name: canary
      matches:
        - path: {type: PathPrefix, value: /v2/}
          method: POST
          headers:
            - {name: X-Env, value: canary}
            - {name: x-user, type: RegularExpression, value: "u[0-9]+"}
          queryParams:
            - {name: debug, value: "1"}
            - {name: Trace, type: RegularExpression, value: "on|yes"}
        - path: {type: Exact, value: /health}
        - path: {type: RegularExpression, value: "/v[0-9]+/users"}
        - headers: [{name: x-any, value: a}]
      filters:
        - type: RequestHeaderModifier
          requestHeaderModifier:
            set: [{name: X-Route, value: canary}]
            add: [{name: x-hop, value: waypoint}]
            remove: [X-Debug]
        - type: ResponseHeaderModifier
          responseHeaderModifier:
            set: [{name: cache-control, value: no-store}]
        - type: RequestMirror
          requestMirror:
            backendRef: {name: shadow, port: 8080}
            percent: 25
        - type: RequestMirror
          requestMirror:
            backendRef: {name: shadow, port: 8080}
            fraction: {numerator: 1, denominator: 3}
      backendRefs:
        - {name: api-v1, port: 8080, weight: 90}
        - name: api-v2
          port: 8080
          filters:
            - type: RequestHeaderModifier
              requestHeaderModifier: {add: [{name: x-canary, value: "true"}]}
        - {name: api-v3, port: 8080, weight: 0}
      timeouts: {request: 10s, backendRequest: 500ms}
      retry: {attempts: 3, codes: [500, 503], backoff: 100ms}
    - matches: [{path: {type: PathPrefix, value: /old}}]
      filters:
        - type: RequestRedirect
          requestRedirect:
            scheme: https
            hostname: new.example.com
            port: 8443
            path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}
    - matches: [{path: {value: /legacy}}]
      filters:
        - type: URLRewrite
          urlRewrite:
            hostname: legacy.internal
            path: {type: ReplaceFullPath, replaceFullPath: /v1}
      backendRefs: [{name: legacy, port: 80}]
      timeouts: {request: 0s}
      retry: {}
    - backendRefs: [{name: api-v1, port: 8080}]
      retry: {attempts: 0}
"#;

const GRPC: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: echo}
spec:
  parentRefs: [{kind: Service, group: core, name: echo}, {kind: Gateway, name: public, port: 80}]
  rules:
    - matches:
        - method: {service: echo.v1.Echo, method: Say}
        - method: {service: echo.v1.Echo}
        - method: {method: Stream}
        - method: {type: RegularExpression, service: "echo\\.v[0-9]+\\.Echo", method: "S.*"}
        - method: {type: RegularExpression, method: "Get.*"}
          headers: [{name: X-Tenant, value: a}]
      filters:
        - type: RequestHeaderModifier
          requestHeaderModifier: {set: [{name: x-grpc, value: "1"}]}
        - type: RequestMirror
          requestMirror: {backendRef: {name: echo-shadow, port: 9090}}
      backendRefs:
        - {name: echo, port: 9090, weight: 3}
        - name: echo-v2
          port: 9090
          filters:
            - type: ResponseHeaderModifier
              responseHeaderModifier: {remove: [x-internal]}
    - backendRefs: [{name: echo, port: 9090}]
"#;

fn value(yaml: &str) -> Value {
    serde_yaml::from_str(yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"))
}

fn parse(yaml: &str) -> Result<HttpRoute, Invalid> {
    route("routes[0]", &value(yaml), "default")
}

fn svc(ns: &str, name: &str, port: u16) -> ServiceRef {
    ServiceRef {
        name: WorkloadRef::new(ns, name),
        port,
    }
}

#[test]
fn an_http_route_converts_every_field() {
    let r = parse(HTTP).unwrap();
    assert_eq!(r.name, WorkloadRef::new("prod", "api"));
    assert_eq!(r.kind, RouteKind::Http);
    // Service parents attach to a waypoint, Gateway parents to listeners; a ListenerSet is
    // someone else's: not an error, not a parent here.
    assert_eq!(
        r.gateway_parents,
        [
            GatewayParent {
                gateway: WorkloadRef::new("prod", "public-gateway"),
                section_name: None,
                port: None,
            },
            GatewayParent {
                gateway: WorkloadRef::new("infra", "edge"),
                section_name: Some("https".into()),
                port: Some(443),
            },
        ]
    );
    assert_eq!(
        r.parents,
        [
            ParentRef {
                service: WorkloadRef::new("prod", "api"),
                port: Some(80)
            },
            ParentRef {
                service: WorkloadRef::new("prod", "api-admin"),
                port: None
            },
        ]
    );
    assert_eq!(r.hostnames, ["api.example.com", "*.example.org"]);
    assert_eq!(r.rules.len(), 4);

    let canary = &r.rules[0];
    assert_eq!(canary.name.as_deref(), Some("canary"));
    let m = &canary.matches[0];
    assert_eq!(
        m.path,
        Some(PathMatch::Prefix("/v2".into())),
        "trailing / dropped"
    );
    assert_eq!(m.method.as_deref(), Some("POST"));
    assert_eq!(m.headers[0].name, "x-env");
    assert_eq!(m.headers[0].value, ValueMatch::Exact("canary".into()));
    let ValueMatch::Regex(user) = &m.headers[1].value else {
        panic!("{:?}", m.headers[1]);
    };
    assert!(user.matches("u42") && !user.matches("xu42"));
    assert_eq!(m.query_params[0].name, "debug");
    assert_eq!(
        m.query_params[1].name, "Trace",
        "query names keep their case"
    );
    assert!(matches!(&m.query_params[1].value, ValueMatch::Regex(p) if p.matches("yes")));
    assert_eq!(
        canary.matches[1].path,
        Some(PathMatch::Exact("/health".into()))
    );
    assert!(matches!(&canary.matches[2].path, Some(PathMatch::Regex(p)) if p.matches("/v3/users")));
    // A match without a path is PathPrefix /.
    assert_eq!(canary.matches[3].path, Some(PathMatch::Prefix("/".into())));

    assert_eq!(
        canary.filters[0],
        Filter::RequestHeaders(HeaderModifier {
            set: vec![("x-route".into(), "canary".into())],
            add: vec![("x-hop".into(), "waypoint".into())],
            remove: vec!["x-debug".into()],
        })
    );
    assert_eq!(
        canary.filters[1],
        Filter::ResponseHeaders(HeaderModifier {
            set: vec![("cache-control".into(), "no-store".into())],
            ..HeaderModifier::default()
        })
    );
    assert_eq!(
        canary.filters[2],
        Filter::Mirror(Mirror {
            backend: svc("prod", "shadow", 8080),
            parts_per_million: 250_000
        })
    );
    assert_eq!(
        canary.filters[3],
        Filter::Mirror(Mirror {
            backend: svc("prod", "shadow", 8080),
            parts_per_million: 333_333
        })
    );
    let weights: Vec<_> = canary.backends.iter().map(|b| b.weight).collect();
    assert_eq!(weights, [90, 1, 0], "default weight 1, zero kept");
    assert_eq!(canary.backends[0].service, svc("prod", "api-v1", 8080));
    assert_eq!(
        canary.backends[1].filters,
        [Filter::RequestHeaders(HeaderModifier {
            add: vec![("x-canary".into(), "true".into())],
            ..HeaderModifier::default()
        })]
    );
    assert_eq!(
        canary.timeouts,
        Timeouts {
            request: Some(Duration::from_secs(10)),
            backend_request: Some(Duration::from_millis(500)),
        }
    );
    assert_eq!(
        canary.retry,
        Some(Retry {
            attempts: 3,
            codes: vec![500, 503],
            backoff: Duration::from_millis(100)
        })
    );

    let redirect = &r.rules[1];
    assert!(redirect.backends.is_empty());
    assert_eq!(
        redirect.filters,
        [Filter::Redirect(Redirect {
            scheme: Some("https".into()),
            hostname: Some("new.example.com".into()),
            path: Some(PathRewrite::ReplacePrefixMatch("/new".into())),
            port: Some(8443),
            status: 301,
        })]
    );

    let legacy = &r.rules[2];
    assert_eq!(
        legacy.matches[0].path,
        Some(PathMatch::Prefix("/legacy".into()))
    );
    assert_eq!(
        legacy.filters,
        [Filter::UrlRewrite(UrlRewrite {
            hostname: Some("legacy.internal".into()),
            path: Some(PathRewrite::ReplaceFullPath("/v1".into())),
        })]
    );
    assert_eq!(legacy.timeouts, Timeouts::default(), "0s is no timeout");
    assert_eq!(
        legacy.retry,
        Some(Retry {
            attempts: DEFAULT_RETRY_ATTEMPTS,
            codes: DEFAULT_RETRY_CODES.to_vec(),
            backoff: DEFAULT_RETRY_BACKOFF
        })
    );

    let catch_all = &r.rules[3];
    assert_eq!(
        catch_all.matches,
        [RequestMatch {
            path: Some(PathMatch::Prefix("/".into())),
            ..RequestMatch::default()
        }],
        "a rule without matches takes every request"
    );
    assert_eq!(catch_all.retry, None, "attempts 0 is no retry");
}

#[test]
fn a_grpc_route_matches_paths_of_service_and_method() {
    let r = parse(GRPC).unwrap();
    assert_eq!(r.kind, RouteKind::Grpc);
    assert_eq!(
        r.name,
        WorkloadRef::new("default", "echo"),
        "default namespace"
    );
    assert_eq!(r.parents[0].service, WorkloadRef::new("default", "echo"));
    assert_eq!(
        r.gateway_parents,
        [GatewayParent {
            gateway: WorkloadRef::new("default", "public"),
            section_name: None,
            port: Some(80),
        }]
    );
    let rule = &r.rules[0];
    let path = |i: usize| rule.matches[i].path.clone().unwrap();
    assert_eq!(path(0), PathMatch::Exact("/echo.v1.Echo/Say".into()));
    let regex = |i: usize| match path(i) {
        PathMatch::Regex(p) => p,
        other => panic!("{other:?}"),
    };
    let service_only = regex(1);
    assert!(service_only.matches("/echo.v1.Echo/Say"));
    assert!(
        !service_only.matches("/echo.v1.Echo/a/b"),
        "one method segment"
    );
    assert!(
        !service_only.matches("/echoXv1.Echo/Say"),
        "dots are literal"
    );
    assert!(!service_only.matches("/echo.v1.Echo"));
    let method_only = regex(2);
    assert!(method_only.matches("/any.Service/Stream"));
    assert!(!method_only.matches("/any.Service/StreamAll"));
    let both = regex(3);
    assert!(both.matches("/echo.v2.Echo/Say") && !both.matches("/echo.v2.Echo/Get"));
    let method_regex = regex(4);
    assert!(method_regex.matches("/x.Y/GetUser") && !method_regex.matches("/x.Y/Set"));
    assert_eq!(rule.matches[4].headers[0].name, "x-tenant");
    assert_eq!(rule.matches[0].method, None);
    assert_eq!(
        rule.filters[1],
        Filter::Mirror(Mirror {
            backend: svc("default", "echo-shadow", 9090),
            parts_per_million: 1_000_000
        })
    );
    assert_eq!(rule.backends[0].weight, 3);
    assert_eq!(
        rule.backends[1].filters,
        [Filter::ResponseHeaders(HeaderModifier {
            remove: vec!["x-internal".into()],
            ..HeaderModifier::default()
        })]
    );
    assert!(r.rules[1].matches.is_empty(), "no matches: every call");
}

#[test]
fn errors_name_the_field_path() {
    let http_cases = [
        (
            "value: \"/v[0-9]+/users\"",
            "value: \"/v[0-9+/users\"",
            "routes[0].spec.rules[0].matches[2].path.value",
            "invalid regular expression",
        ),
        (
            "{type: Exact, value: /health}",
            "{type: Exact, value: health}",
            "rules[0].matches[1].path.value",
            "absolute path",
        ),
        (
            "{name: api-v1, port: 8080, weight: 90}",
            "{name: api-v1, weight: 90}",
            "routes[0].spec.rules[0].backendRefs[0].port",
            "required",
        ),
        (
            "{name: api-v1, port: 8080, weight: 90}",
            "{name: api-v1, port: 8080, weight: -1}",
            "rules[0].backendRefs[0].weight",
            "not a weight",
        ),
        (
            "{name: api-v1, port: 8080, weight: 90}",
            "{name: api-v1, port: 8080, namespace: other}",
            "rules[0].backendRefs[0].namespace",
            "ReferenceGrant",
        ),
        (
            "{name: api-v1, port: 8080, weight: 90}",
            "{name: api-v1, port: 8080, kind: Pod}",
            "rules[0].backendRefs[0].kind",
            "only Services",
        ),
        (
            "{name: api-v1, port: 8080, weight: 90}",
            "{name: api-v1, port: 70000}",
            "rules[0].backendRefs[0].port",
            "not a port",
        ),
        (
            "method: POST",
            "method: FETCH",
            "routes[0].spec.rules[0].matches[0].method",
            "unknown variant",
        ),
        (
            "{name: X-Env, value: canary}",
            "{name: \"X Env\", value: canary}",
            "rules[0].matches[0].headers[0].name",
            "header name",
        ),
        (
            "type: RegularExpression, value: \"u[0-9]+\"",
            "type: RegularExpression, value: \"u[0-9\"",
            "rules[0].matches[0].headers[1].value",
            "invalid regular expression",
        ),
        (
            "{name: X-Route, value: canary}",
            "{name: X-Route, value: \"a\\nb\"}",
            "rules[0].filters[0].requestHeaderModifier.set[0].value",
            "header value",
        ),
        (
            "percent: 25",
            "percent: 125",
            "rules[0].filters[2].requestMirror.percent",
            "percentage",
        ),
        (
            "percent: 25",
            "percent: 25\n            fraction: {numerator: 1}",
            "rules[0].filters[2].requestMirror",
            "not both",
        ),
        (
            "{numerator: 1, denominator: 3}",
            "{numerator: 4, denominator: 3}",
            "filters[3].requestMirror.fraction.numerator",
            "between 0",
        ),
        (
            "{numerator: 1, denominator: 3}",
            "{numerator: 0, denominator: 0}",
            "filters[3].requestMirror.fraction.denominator",
            "at least 1",
        ),
        (
            "backendRef: {name: shadow, port: 8080}\n            percent",
            "backendRef: {name: shadow}\n            percent",
            "rules[0].filters[2].requestMirror.backendRef.port",
            "required",
        ),
        (
            "backendRequest: 500ms",
            "backendRequest: 11s",
            "routes[0].spec.rules[0].timeouts.backendRequest",
            "exceeds the request timeout 10s",
        ),
        (
            "request: 10s",
            "request: 10 seconds",
            "rules[0].timeouts.request",
            "Gateway API duration",
        ),
        (
            "attempts: 3",
            "attempts: 11",
            "rules[0].retry.attempts",
            "number of retries",
        ),
        (
            "codes: [500, 503]",
            "codes: [200]",
            "rules[0].retry.codes[0]",
            "400-599",
        ),
        (
            "backoff: 100ms",
            "backoff: 1.5s",
            "rules[0].retry.backoff",
            "duration",
        ),
        (
            "port: 8443",
            "port: 8443\n            statusCode: 200",
            "rules[1].filters[0].requestRedirect.statusCode",
            "redirect code",
        ),
        (
            "matches: [{path: {type: PathPrefix, value: /old}}]",
            "matches: [{path: {type: Exact, value: /old}}]",
            "rules[1].filters[0].requestRedirect.path.type",
            "PathPrefix",
        ),
        (
            "path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}",
            "path: {type: ReplacePrefixMatch, replaceFullPath: /new}",
            "rules[1].filters[0].requestRedirect.path.replacePrefixMatch",
            "required",
        ),
        (
            "replacePrefixMatch: /new}\n",
            "replacePrefixMatch: /new}\n      backendRefs: [{name: x, port: 1}]\n",
            "rules[1].backendRefs",
            "takes no backendRefs",
        ),
        (
            "- type: URLRewrite",
            "- type: RequestRedirect\n          requestRedirect: {}\n        - type: URLRewrite",
            "rules[2].filters[0]",
            "cannot be used together",
        ),
        (
            "- type: URLRewrite\n          urlRewrite:",
            "- type: URLRewrite\n          requestRedirect: {}\n          x:",
            "rules[2].filters[0].x",
            "unknown field",
        ),
        (
            "- type: URLRewrite\n          urlRewrite:",
            "- type: RequestMirror\n          urlRewrite:",
            "rules[2].filters[0].requestMirror",
            "required by `type`",
        ),
        (
            "- type: URLRewrite\n          urlRewrite:\n            hostname: legacy.internal\n            path: {type: ReplaceFullPath, replaceFullPath: /v1}",
            "- type: ExtensionRef\n          extensionRef: {group: x.io, kind: Auth, name: a}",
            "routes[0].spec.rules[2].filters[0].type",
            "ExtensionRef filters are not supported",
        ),
        (
            "- type: URLRewrite\n          urlRewrite:\n            hostname: legacy.internal\n            path: {type: ReplaceFullPath, replaceFullPath: /v1}",
            "- type: CORS\n          cors: {allowOrigins: [\"https://a.example\"]}",
            "rules[2].filters[0].type",
            "CORS filters are not supported",
        ),
        (
            "      retry: {}\n",
            "      retry: {}\n      sessionPersistence: {sessionName: s}\n",
            "routes[0].spec.rules[2].sessionPersistence",
            "not supported",
        ),
        (
            "{kind: Service, name: api-admin, namespace: prod}",
            "{kind: Service, name: api-admin, sectionName: http}",
            "spec.parentRefs[1].sectionName",
            "use port",
        ),
        (
            "{kind: Service, name: api-admin, namespace: prod}",
            "{kind: Service, name: Api_Admin}",
            "spec.parentRefs[1].name",
            "not a valid name",
        ),
        (
            "sectionName: https, port: 443}",
            "sectionName: https, port: 0}",
            "routes[0].spec.parentRefs[3].port",
            "not a port",
        ),
        (
            "sectionName: https, port: 443}",
            "sectionName: HTTPS, port: 443}",
            "routes[0].spec.parentRefs[3].sectionName",
            "not a valid name",
        ),
        (
            "name: edge, namespace: infra,",
            "name: edge, namespace: Infra,",
            "routes[0].spec.parentRefs[3].namespace",
            "not a valid name",
        ),
        (
            "*.example.org",
            "exa mple.org",
            "routes[0].spec.hostnames[1]",
            "host name",
        ),
        (
            "metadata: {name: api, namespace: prod}",
            "metadata: {namespace: prod}",
            "routes[0].metadata.name",
            "not a valid name",
        ),
        (
            "kind: HTTPRoute",
            "kind: UDPRoute",
            "routes[0].kind",
            "HTTPRoute",
        ),
        (
            "apiVersion: gateway.networking.k8s.io/v1",
            "apiVersion: gateway.networking.k8s.io/v1beta2",
            "routes[0].apiVersion",
            "expected",
        ),
        (
            "  hostnames:",
            "  hostname: [a]\n  hostnames:",
            "routes[0].spec.hostname",
            "unknown field",
        ),
        (
            "timeouts: {request: 10s, backendRequest: 500ms}",
            "timeouts: {request: 10s, backendReqest: 500ms}",
            "routes[0].spec.rules[0].timeouts.backendReqest",
            "unknown field",
        ),
    ];
    for (from, to, field, reason) in http_cases {
        assert!(HTTP.contains(from), "{from}");
        let err = parse(&HTTP.replacen(from, to, 1)).unwrap_err();
        assert!(err.field.ends_with(field), "{from} -> {to}: {err}");
        assert!(err.field.starts_with("routes[0]"), "{from} -> {to}: {err}");
        assert!(err.reason.contains(reason), "{from} -> {to}: {err}");
    }
    let grpc_cases = [
        (
            "{service: echo.v1.Echo, method: Say}",
            "{type: Exact}",
            "routes[0].spec.rules[0].matches[0].method",
            "set service, method or both",
        ),
        (
            "{service: echo.v1.Echo, method: Say}",
            "{service: echo/v1, method: Say}",
            "rules[0].matches[0].method.service",
            "gRPC service name",
        ),
        (
            "{method: Stream}",
            "{method: Str.eam}",
            "rules[0].matches[2].method.method",
            "gRPC method name",
        ),
        (
            "method: \"S.*\"",
            "method: \"S(\"",
            "rules[0].matches[3].method.method",
            "invalid regular expression",
        ),
        (
            "{name: echo, port: 9090, weight: 3}",
            "{name: echo, weight: 3}",
            "routes[0].spec.rules[0].backendRefs[0].port",
            "required",
        ),
        (
            "requestMirror: {backendRef: {name: echo-shadow, port: 9090}}",
            "requestMirror: {backendRef: {name: echo-shadow, port: 9090}, percent: 101}",
            "rules[0].filters[1].requestMirror.percent",
            "percentage",
        ),
        (
            "{name: X-Tenant, value: a}",
            "{name: X-Tenant, value: a, type: Glob}",
            "rules[0].matches[4].headers[0].type",
            "unknown variant",
        ),
    ];
    for (from, to, field, reason) in grpc_cases {
        assert!(GRPC.contains(from), "{from}");
        let err = parse(&GRPC.replacen(from, to, 1)).unwrap_err();
        assert!(err.field.ends_with(field), "{from} -> {to}: {err}");
        assert!(err.reason.contains(reason), "{from} -> {to}: {err}");
    }
}

#[test]
fn an_api_object_names_fields_from_its_root() {
    let mut object = value(HTTP);
    object["spec"]["rules"][0]["backendRefs"][0]
        .as_object_mut()
        .unwrap()
        .remove("port");
    // Kubernetes adds metadata and status the route types model loosely: not checked.
    object["metadata"]["managedFields"] = serde_json::json!([{"manager": "kubectl"}]);
    object["status"] = serde_json::json!({"parents": []});
    let err = route("", &object, "default").unwrap_err();
    assert_eq!(err.field, "spec.rules[0].backendRefs[0].port");
    object["spec"]["rules"][0]["backendRefs"][0]["port"] = 8080.into();
    route("", &object, "default").unwrap();
}

#[test]
fn route_objects_round_trip_through_the_crate_types() {
    // The gRPC types read as the HTTP ones keep every field they share.
    let f: grpc::GrpcRouteRulesFilters = serde_yaml::from_str(
        "{type: RequestMirror, requestMirror: {backendRef: {name: a, port: 1}, fraction: {numerator: 1}}}",
    )
    .unwrap();
    let h: http::HttpRouteRulesFilters = reshape("f", f).unwrap();
    let m = h.request_mirror.unwrap();
    assert_eq!(m.backend_ref.port, Some(1));
    assert_eq!(m.fraction.unwrap().numerator, 1);
}

#[test]
fn durations_read_the_gateway_api_format() {
    assert_eq!(
        duration("f", "1h30m").unwrap(),
        Duration::from_secs(90 * 60)
    );
    assert_eq!(duration("f", "500ms").unwrap(), Duration::from_millis(500));
    assert_eq!(
        duration("f", "1m1s1ms").unwrap(),
        Duration::from_millis(61_001)
    );
    for bad in [
        "",
        "10",
        "1.5s",
        "-1s",
        "10us",
        "1d",
        "100000s",
        "1h1m1s1ms1h",
    ] {
        let err = duration("x.y", bad).unwrap_err();
        assert_eq!(err.field, "x.y");
        assert!(err.reason.contains(&format!("{bad:?}")), "{err}");
    }
}

proptest! {
    #[test]
    fn any_duration_of_whole_milliseconds_reads_back(ms in 0u64..359_999_999_999) {
        let d = gateway_api::Duration::from_millis(ms).unwrap();
        prop_assert_eq!(duration("f", &d.to_string()).unwrap(), Duration::from_millis(ms));
    }

    #[test]
    fn duration_parsing_never_panics(text in "[0-9hms.]{0,12}") {
        let _ = duration("f", &text);
    }

    #[test]
    fn mirror_fractions_stay_within_a_million(num in 0i32..1000, den in 1i32..1000) {
        let num = num.min(den);
        let yaml = HTTP.replacen(
            "{numerator: 1, denominator: 3}",
            &format!("{{numerator: {num}, denominator: {den}}}"),
            1,
        );
        let r = parse(&yaml).unwrap();
        let Filter::Mirror(m) = &r.rules[0].filters[3] else { panic!() };
        prop_assert!(m.parts_per_million <= 1_000_000);
        prop_assert_eq!(m.parts_per_million == 1_000_000, num == den);
    }
}

#[test]
fn redirects_and_rewrites_take_every_documented_form() {
    let route = |filter: &str, path: &str| {
        let yaml = format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r}}\n\
             spec:\n  rules:\n    - matches: [{{path: {path}}}]\n      filters: [{filter}]\n"
        );
        parse(&yaml).map(|r| r.rules[0].filters[0].clone())
    };
    assert_eq!(
        route(
            "{type: RequestRedirect, requestRedirect: {statusCode: 302, path: {type: ReplaceFullPath, replaceFullPath: /b}}}",
            "{type: Exact, value: /a}",
        )
        .unwrap(),
        Filter::Redirect(Redirect {
            scheme: None,
            hostname: None,
            path: Some(PathRewrite::ReplaceFullPath("/b".into())),
            port: None,
            status: 302,
        })
    );
    assert_eq!(
        route(
            "{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}}",
            "{value: /v1}",
        )
        .unwrap(),
        Filter::UrlRewrite(UrlRewrite {
            hostname: None,
            path: Some(PathRewrite::ReplacePrefixMatch("/v2".into())),
        })
    );
    let err = route(
        "{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}}",
        "{type: RegularExpression, value: /v1.*}",
    )
    .unwrap_err();
    assert_eq!(
        err.field,
        "routes[0].spec.rules[0].filters[0].urlRewrite.path.type"
    );
    let err = route(
        "{type: URLRewrite, urlRewrite: {hostname: \"bad host\"}}",
        "{value: /}",
    )
    .unwrap_err();
    assert_eq!(
        err.field,
        "routes[0].spec.rules[0].filters[0].urlRewrite.hostname"
    );
    let err = route(
        "{type: RequestRedirect, requestRedirect: {scheme: ftp}}",
        "{value: /}",
    )
    .unwrap_err();
    assert!(err.field.ends_with("requestRedirect.scheme"), "{err}");
}

#[test]
fn a_backend_cannot_redirect_and_a_mirror_needs_a_service() {
    let base = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\n\
                spec:\n  rules:\n    - backendRefs:\n        - name: a\n          port: 80\n";
    let err = parse(&format!(
        "{base}          filters: [{{type: RequestRedirect, requestRedirect: {{}}}}]\n"
    ))
    .unwrap_err();
    assert_eq!(
        err.field,
        "routes[0].spec.rules[0].backendRefs[0].filters[0]"
    );
    assert!(err.reason.contains("put it on the rule"), "{err}");
    let err = parse(&format!(
        "{base}      filters: [{{type: RequestMirror, requestMirror: {{backendRef: {{group: x.io, kind: Svc, name: m, port: 1}}}}}}]\n"
    ))
    .unwrap_err();
    assert_eq!(
        err.field,
        "routes[0].spec.rules[0].filters[0].requestMirror.backendRef.group"
    );
}
