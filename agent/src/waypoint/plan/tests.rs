//! `plan` and the per-try decisions on pure inputs: a snapshot, a CONNECT target, a request
//! head. No sockets.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use super::*;
use crate::{
    policy::PolicyIndex,
    state::{
        AccessPolicy, Action, HttpRoute, L7Match, Location, RouteKind, Rule, Service, ServicePort,
        Workload, WorkloadSelector,
        route::{
            Backend, Filter, HeaderMatch, Mirror, ParentRef, PathMatch, PathRewrite, UrlRewrite,
            ValueMatch,
        },
    },
};

const TRUST_DOMAIN: &str = "cluster.local";

fn svc(name: &str) -> WorkloadRef {
    WorkloadRef::new("default", name)
}

fn service_ref(name: &str) -> ServiceRef {
    ServiceRef {
        name: svc(name),
        port: 80,
    }
}

/// Services `echo` (the bound one), `v1`, `v2` and `shadow`, each port 80 → 8080 with one
/// pod `<name>-1` labelled `app: <name>`; `empty` has no endpoints.
fn snapshot(routes: Vec<HttpRoute>) -> Snapshot {
    let mut snapshot = Snapshot::default();
    for (name, ip) in [
        ("echo", "10.1.0.1"),
        ("v1", "10.1.0.2"),
        ("v2", "10.1.0.3"),
        ("shadow", "10.1.0.4"),
    ] {
        let ip = ip.parse().unwrap();
        let pod = svc(&format!("{name}-1"));
        snapshot.workloads.insert(
            pod.clone(),
            Workload {
                name: pod,
                service_account: name.to_owned(),
                ips: vec![ip],
                location: Location::Remote { node: "b".into() },
                enrolled: true,
                mtls_mode: None,
                labels: BTreeMap::from([("app".to_owned(), name.to_owned())]),
            },
        );
        snapshot.services.insert(svc(name), service(name, vec![ip]));
    }
    snapshot
        .services
        .insert(svc("empty"), service("empty", Vec::new()));
    snapshot.routes = routes;
    snapshot
}

fn service(name: &str, endpoints: Vec<IpAddr>) -> Service {
    Service {
        name: svc(name),
        vips: Vec::new(),
        ports: vec![ServicePort {
            port: 80,
            target_port: 8080,
        }],
        endpoints,
        waypoint: Some("waypoint".into()),
        traffic_distribution: None,
    }
}

fn view(snapshot: Snapshot) -> View {
    let snapshot = Arc::new(snapshot);
    View::build(snapshot, &PolicyIndex::for_trust_domain(Some(TRUST_DOMAIN)))
}

/// Route `web`, attached to `echo` (every port).
fn route(rules: Vec<RouteRule>) -> HttpRoute {
    HttpRoute {
        name: svc("web"),
        kind: RouteKind::Http,
        gateway_parents: Vec::new(),
        parents: vec![ParentRef {
            service: svc("echo"),
            port: None,
        }],
        hostnames: Vec::new(),
        rules,
    }
}

fn rule(matches: Vec<RequestMatch>, backends: &[(&str, u32)]) -> RouteRule {
    RouteRule {
        matches,
        backends: backends
            .iter()
            .map(|(name, weight)| Backend {
                service: service_ref(name),
                weight: *weight,
                filters: Vec::new(),
            })
            .collect(),
        ..RouteRule::default()
    }
}

fn prefix(prefix: &str) -> RequestMatch {
    RequestMatch {
        path: Some(PathMatch::Prefix(prefix.to_owned())),
        ..RequestMatch::default()
    }
}

fn echo() -> Target {
    Target::Service {
        service: svc("echo"),
        port: 80,
    }
}

/// An HTTP/1.1 GET of `uri` to host `echo`, with `headers`.
fn head(uri: &str, headers: &[(&str, &str)]) -> Parts {
    let mut request = Request::get(uri).header(header::HOST, "echo");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.body(()).unwrap().into_parts().0
}

fn plan_of<'v>(view: &'v View, target: &Target, request: &Parts) -> Plan<'v> {
    plan(target, view, request, EscapedSlashes::Reject)
}

fn forwarded<'v>(plan: Plan<'v>) -> Forward<'v> {
    match plan.outcome {
        Ok(Outcome::Forward(forward)) => *forward,
        Ok(Outcome::Redirect { status, .. }) => panic!("redirected ({status}), not forwarded"),
        Err(e) => panic!("failed ({e}), not forwarded"),
    }
}

fn failed(plan: Plan<'_>) -> Error {
    match plan.outcome {
        Err(e) => e,
        Ok(outcome) => panic!("planned {outcome:?}, not failed"),
    }
}

/// Where the request goes, by backend service name.
fn destination_of(plan: Plan<'_>) -> String {
    match forwarded(plan).destination {
        Destination::Service(service) => service.name.name,
        Destination::Pod(addr, _) => addr.to_string(),
    }
}

#[test]
fn a_service_without_routes_is_sent_to_itself_as_is() {
    let view = view(snapshot(Vec::new()));
    let plan = plan_of(&view, &echo(), &head("/a?b=c", &[]));
    assert_eq!(plan.route, None);
    let forward = forwarded(plan);
    assert_eq!(
        forward.destination,
        Destination::Service(service_ref("echo"))
    );
    assert_eq!(forward.template.authority.as_deref(), Some("echo"));
    assert_eq!(forward.template.path_and_query, "/a?b=c");
    assert_eq!(forward.retry, None);
    assert_eq!(forward.timeouts, Timeouts::default());
    assert!(!forward.mirrored);
}

#[test]
fn a_pod_target_goes_to_that_pod_whatever_the_routes_say() {
    let view = view(snapshot(vec![route(vec![rule(
        vec![prefix("/only")],
        &[("v1", 1)],
    )])]));
    let pod = Target::Pod {
        addr: "10.1.0.1:8080".parse().unwrap(),
        service: svc("echo"),
    };
    let plan = plan_of(&view, &pod, &head("/elsewhere", &[]));
    assert_eq!(plan.route, None);
    assert_eq!(
        forwarded(plan).destination,
        Destination::Pod("10.1.0.1:8080".parse().unwrap(), svc("echo"))
    );
}

#[test]
fn routes_that_match_nothing_refuse_the_request_without_a_route_name() {
    let view = view(snapshot(vec![route(vec![rule(
        vec![prefix("/api")],
        &[("v1", 1)],
    )])]));
    let plan = plan_of(&view, &echo(), &head("/other", &[]));
    assert_eq!(plan.route, None);
    assert!(matches!(failed(plan), Error::NoRoute));
}

#[test]
fn a_header_match_picks_its_rule_and_names_the_route() {
    let v2_by_header = RequestMatch {
        headers: vec![HeaderMatch {
            name: "x-version".into(),
            value: ValueMatch::Exact("v2".into()),
        }],
        ..RequestMatch::default()
    };
    let view = view(snapshot(vec![route(vec![
        rule(vec![v2_by_header], &[("v2", 1)]),
        rule(Vec::new(), &[("v1", 1)]),
    ])]));
    let with = plan_of(&view, &echo(), &head("/", &[("x-version", "v2")]));
    assert_eq!(with.route, Some(&svc("web")));
    assert_eq!(destination_of(with), "v2");
    let without = plan_of(&view, &echo(), &head("/", &[("x-version", "v1")]));
    assert_eq!(without.route, Some(&svc("web")));
    assert_eq!(destination_of(without), "v1");
}

#[test]
fn backends_are_chosen_by_weight_and_bring_their_own_filters() {
    let mut zero_and_one = rule(Vec::new(), &[("v1", 0), ("v2", 1)]);
    zero_and_one.backends[1].filters = vec![Filter::RequestHeaders(HeaderModifier {
        set: vec![("x-backend".into(), "v2".into())],
        ..HeaderModifier::default()
    })];
    let view_zero = view(snapshot(vec![route(vec![zero_and_one])]));
    for _ in 0..100 {
        let forward = forwarded(plan_of(&view_zero, &echo(), &head("/", &[])));
        assert_eq!(forward.destination, Destination::Service(service_ref("v2")));
        assert_eq!(forward.template.headers["x-backend"], "v2");
    }
    let split = view(snapshot(vec![route(vec![rule(
        Vec::new(),
        &[("v1", 3), ("v2", 1)],
    )])]));
    let picked: std::collections::BTreeSet<String> = (0..1000)
        .map(|_| destination_of(plan_of(&split, &echo(), &head("/", &[]))))
        .collect();
    assert_eq!(picked, ["v1".to_owned(), "v2".to_owned()].into());
}

#[test]
fn a_rule_without_a_weighted_backend_fails_but_still_names_its_route() {
    let view = view(snapshot(vec![route(vec![rule(Vec::new(), &[("v1", 0)])])]));
    let plan = plan_of(&view, &echo(), &head("/", &[]));
    assert_eq!(plan.route, Some(&svc("web")));
    assert!(matches!(failed(plan), Error::NoBackend));
}

#[test]
fn a_redirect_answers_with_its_location_and_response_headers_without_a_backend() {
    let mut redirecting = rule(vec![prefix("/old")], &[("v1", 0)]);
    redirecting.filters = vec![
        Filter::Redirect(Redirect {
            scheme: Some("https".into()),
            hostname: None,
            path: Some(PathRewrite::ReplacePrefixMatch("/new".into())),
            port: None,
            status: 302,
        }),
        Filter::ResponseHeaders(HeaderModifier {
            set: vec![("x-moved".into(), "yes".into())],
            ..HeaderModifier::default()
        }),
    ];
    let view = view(snapshot(vec![route(vec![redirecting])]));
    let request = head("/old/a?x=1", &[]);
    let plan = plan_of(&view, &echo(), &request);
    assert_eq!(plan.route, Some(&svc("web")));
    let Ok(Outcome::Redirect { status, headers }) = plan.outcome else {
        panic!("not a redirect: {:?}", plan.outcome);
    };
    assert_eq!(status, StatusCode::FOUND);
    assert_eq!(headers[header::LOCATION], "https://echo/new/a?x=1");
    assert_eq!(headers["x-moved"], "yes");
}

#[test]
fn a_rewrite_changes_host_and_path_to_the_backend_but_not_what_policy_sees() {
    let mut rewriting = rule(vec![prefix("/v1")], &[("v1", 1)]);
    rewriting.filters = vec![
        Filter::UrlRewrite(UrlRewrite {
            hostname: Some("internal".into()),
            path: Some(PathRewrite::ReplacePrefixMatch("/v2".into())),
        }),
        Filter::RequestHeaders(HeaderModifier {
            set: vec![("x-set".into(), "after".into())],
            add: vec![("x-add".into(), "a".into())],
            remove: vec!["x-drop".into()],
        }),
    ];
    let view = view(snapshot(vec![route(vec![rewriting])]));
    let request = head(
        "/v1/users?id=7",
        &[
            ("x-set", "before"),
            ("x-drop", "1"),
            ("connection", "x-hop"),
            ("x-hop", "1"),
            ("keep-alive", "timeout=5"),
        ],
    );
    let forward = forwarded(plan_of(&view, &echo(), &request));
    let template = &forward.template;
    assert_eq!(template.authority.as_deref(), Some("internal"));
    assert_eq!(template.path_and_query, "/v2/users?id=7");
    assert_eq!(template.headers["x-set"], "after");
    assert_eq!(template.headers["x-add"], "a");
    for gone in ["x-drop", "connection", "x-hop", "keep-alive"] {
        assert!(!template.headers.contains_key(gone), "{gone} was kept");
    }
    let facts = forward.facts(&request, None);
    assert_eq!((facts.method, facts.path), ("GET", "/v1/users"));
    assert_eq!(facts.headers["x-drop"], "1");
}

#[test]
fn paths_are_routed_in_normal_form_and_escaped_slashes_refused_by_default() {
    let view = view(snapshot(vec![route(vec![rule(
        vec![prefix("/v1")],
        &[("v1", 1)],
    )])]));
    let forward = forwarded(plan_of(&view, &echo(), &head("/x/..//v1/%61", &[])));
    assert_eq!(forward.template.path_and_query, "/v1/a");
    assert_eq!(forward.path_and_query, "/v1/a");

    let escaped = head("/v1/a%2Fb", &[]);
    let refused = plan_of(&view, &echo(), &escaped);
    assert_eq!(refused.route, None);
    assert!(matches!(
        failed(refused),
        Error::Path(path::Error::EscapedSlash)
    ));
    let kept = forwarded(plan(&echo(), &view, &escaped, EscapedSlashes::Keep));
    assert_eq!(kept.template.path_and_query, "/v1/a%2Fb");
}

#[test]
fn retries_timeouts_and_sampled_mirrors_come_from_the_rule() {
    let retry = Retry {
        attempts: 2,
        codes: vec![503],
        backoff: Duration::from_millis(25),
    };
    let timeouts = Timeouts {
        request: Some(Duration::from_secs(1)),
        backend_request: Some(Duration::from_millis(100)),
    };
    let mirror = |name: &str, parts_per_million| {
        Filter::Mirror(Mirror {
            backend: service_ref(name),
            parts_per_million,
        })
    };
    let mut mirrored = rule(vec![prefix("/m")], &[("v1", 1)]);
    mirrored.retry = Some(retry.clone());
    mirrored.timeouts = timeouts;
    mirrored.filters = vec![mirror("shadow", 1_000_000), mirror("v2", 0)];
    let mut never_sampled = rule(Vec::new(), &[("v1", 1)]);
    never_sampled.filters = vec![mirror("shadow", 0)];
    let view = view(snapshot(vec![route(vec![mirrored, never_sampled])]));

    let forward = forwarded(plan_of(&view, &echo(), &head("/m", &[])));
    assert_eq!(forward.retry, Some(&retry));
    assert_eq!(forward.timeouts, timeouts);
    assert!(forward.mirrored);
    assert_eq!(forward.mirrors, vec![&service_ref("shadow")]);

    // A rule that mirrors reads the body whole even when this request was not sampled.
    let forward = forwarded(plan_of(&view, &echo(), &head("/other", &[])));
    assert_eq!(forward.retry, None);
    assert!(forward.mirrored);
    assert!(forward.mirrors.is_empty());
}

#[test]
fn grpc_and_http2_requests_go_to_the_backend_over_http2() {
    let view = view(snapshot(Vec::new()));
    let protocol = |request: &Parts| {
        forwarded(plan_of(&view, &echo(), request))
            .template
            .protocol
    };
    assert_eq!(protocol(&head("/", &[])), Protocol::Http1);
    let grpc = head(
        "/pkg.Svc/Call",
        &[("content-type", "application/grpc+proto")],
    );
    assert_eq!(protocol(&grpc), Protocol::Http2);
    let mut h2 = head("http://echo/", &[]);
    h2.version = Version::HTTP_2;
    assert_eq!(protocol(&h2), Protocol::Http2);
}

#[test]
fn each_try_builds_its_request_for_the_protocol_and_endpoint() {
    let endpoint = Endpoint {
        addr: "10.1.0.2:8080".parse().unwrap(),
        workload: svc("v1-1"),
        identity: SpiffeId::new(TRUST_DOMAIN, "default", "v1").unwrap(),
        service: svc("v1"),
    };
    let mut template = Template {
        method: Method::POST,
        authority: None,
        path_and_query: "/p?q".into(),
        headers: HeaderMap::from_iter([(header::HOST, HeaderValue::from_static("stale"))]),
        protocol: Protocol::Http1,
    };
    let http1 = template.build(&endpoint, ()).unwrap();
    assert_eq!(http1.method(), Method::POST);
    assert_eq!(http1.uri(), "/p?q");
    assert_eq!(http1.headers()[header::HOST], "10.1.0.2:8080");

    template.protocol = Protocol::Http2;
    template.authority = Some("echo".into());
    let http2 = template.build(&endpoint, ()).unwrap();
    assert_eq!(http2.version(), Version::HTTP_2);
    assert_eq!(http2.uri(), "http://echo/p?q");
    assert!(!http2.headers().contains_key(header::HOST));

    template.authority = Some("bad authority".into());
    assert!(matches!(
        template.build(&endpoint, ()),
        Err(Error::BadRequest(_))
    ));
}

#[test]
fn a_destination_without_a_usable_endpoint_is_an_error_per_cause() {
    let snapshot = snapshot(Vec::new());
    let endpoint =
        |destination: Destination| destination.endpoint(&snapshot, TRUST_DOMAIN, backend::any);
    let found = endpoint(Destination::Service(service_ref("echo"))).unwrap();
    assert_eq!(found.addr, "10.1.0.1:8080".parse().unwrap());
    assert_eq!(found.workload, svc("echo-1"));
    assert_eq!(
        found.identity,
        SpiffeId::new(TRUST_DOMAIN, "default", "echo").unwrap()
    );
    assert!(matches!(
        endpoint(Destination::Service(service_ref("nope"))),
        Err(Error::UnknownService(_))
    ));
    let other_port = ServiceRef {
        name: svc("echo"),
        port: 81,
    };
    assert!(matches!(
        endpoint(Destination::Service(other_port)),
        Err(Error::UnknownPort { port: 81, .. })
    ));
    assert!(matches!(
        endpoint(Destination::Service(service_ref("empty"))),
        Err(Error::NoEndpoints(_))
    ));
    assert!(matches!(
        endpoint(Destination::Pod(
            "10.9.9.9:8080".parse().unwrap(),
            svc("echo")
        )),
        Err(Error::UnknownEndpoint(_))
    ));
}

#[test]
fn each_endpoints_policy_admits_or_denies_the_request_for_the_original_client() {
    let mut snapshot = snapshot(Vec::new());
    let policy = AccessPolicy {
        name: svc("no-admin"),
        selector: WorkloadSelector {
            namespace: "default".into(),
            match_labels: BTreeMap::from([("app".into(), "v1".into())]),
        },
        action: Action::Deny,
        rules: vec![Rule {
            l7: Some(L7Match {
                paths: vec!["/admin".into()],
                ..L7Match::default()
            }),
            ..Rule::default()
        }],
        invalid: None,
        external_services: vec![],
    };
    snapshot.policies.insert(policy.name.clone(), policy);
    let view = view(snapshot);
    let endpoint = Destination::Service(service_ref("v1"))
        .endpoint(&view.snapshot, TRUST_DOMAIN, backend::any)
        .unwrap();
    let client = SpiffeId::new(TRUST_DOMAIN, "default", "client").unwrap();
    let source: IpAddr = "10.1.0.9".parse().unwrap();
    let headers = HeaderMap::new();
    let request = |path| RequestFacts {
        method: "GET",
        path,
        headers: &headers,
        user: None,
    };
    assert!(admit(&view, &endpoint, &client, source, &request("/ok")).is_ok());
    match admit(&view, &endpoint, &client, source, &request("/admin")) {
        Err(Error::PolicyDenied { reason, policy }) => {
            assert_eq!(reason, "denied_by_policy");
            assert_eq!(policy, Some(svc("no-admin")));
        }
        other => panic!("not denied: {other:?}"),
    }
    let gone = Endpoint {
        workload: svc("gone"),
        ..endpoint
    };
    assert!(matches!(
        admit(&view, &gone, &client, source, &request("/ok")),
        Err(Error::UnknownEndpoint(_))
    ));
}
