use super::*;
use crate::state::{PortRange, Principal};

mod gateways;

fn parse_str(yaml: &str) -> Result<FileDoc, String> {
    parse(Path::new("node.yaml"), yaml).map_err(|e| e.to_string())
}

const GOOD: &str = r#"
agent:
  cgroupRoot: /sys/fs/cgroup
mesh:
  excludedPorts: [22]
  excludedCidrs: ["169.254.0.0/16"]
  mtls:
    mode: PERMISSIVE
    namespaces: {prod: STRICT}
workloads:
  - name: client
    namespace: default
    serviceAccount: client
    ips: ["10.1.0.2"]
    netns: /proc/self/ns/net
  - name: legacy
    ips: ["10.1.0.9"]
    netns: /does/not/matter
    enrolled: false
  - name: api
    namespace: prod
    ips: ["10.2.0.5"]
    node: node-b
    mtlsMode: DISABLED
services:
  - name: echo
    vips: ["10.96.0.10"]
    ports: [{port: 80, targetPort: 8080}, {port: 81}]
    endpoints: ["10.1.0.3"]
"#;

#[test]
fn a_full_file_parses_with_defaults() {
    let doc = parse_str(GOOD).unwrap();
    let legacy = &doc.snapshot.workloads[&WorkloadRef::new("default", "legacy")];
    assert!(!legacy.enrolled);
    assert_eq!(legacy.service_account, "default");
    let echo = &doc.snapshot.services[&WorkloadRef::new("default", "echo")];
    assert_eq!(echo.ports[1].target_port, 81);
    assert_eq!(doc.snapshot.mesh.excluded_ports, vec![22]);
    let api = &doc.snapshot.workloads[&WorkloadRef::new("prod", "api")];
    assert_eq!(
        api.location,
        Location::Remote {
            node: "node-b".into()
        }
    );
    assert_eq!(doc.snapshot.mtls_mode(api), MtlsMode::Disabled);
    assert_eq!(doc.snapshot.mesh.mtls.namespaces["prod"], MtlsMode::Strict);
    assert_eq!(doc.snapshot.local_enrolled().count(), 1);
}

#[test]
fn services_bind_to_waypoints_by_name() {
    let doc = parse_str(
        "agent: {node: n1}\n\
             services:\n\
             - {name: echo, vips: [10.96.0.10], ports: [{port: 80}], waypoint: wp}\n\
             - {name: plain, vips: [10.96.0.11], ports: [{port: 80}]}\n\
             waypoints:\n\
             - {name: wp, ips: [10.1.0.9]}\n",
    )
    .unwrap();
    let s = &doc.snapshot;
    let echo = &s.services[&WorkloadRef::new("default", "echo")];
    let wp = s.waypoint_of(echo).unwrap().unwrap();
    assert_eq!(wp.service_account, "wp", "the name by default");
    assert_eq!(wp.addresses, vec!["10.1.0.9".parse::<IpAddr>().unwrap()]);
    let plain = &s.services[&WorkloadRef::new("default", "plain")];
    assert!(s.waypoint_of(plain).is_none());

    let unknown = parse_str(
        "services: [{name: echo, vips: [10.96.0.10], ports: [{port: 80}], waypoint: gone}]",
    )
    .unwrap();
    let echo = &unknown.snapshot.services[&WorkloadRef::new("default", "echo")];
    assert_eq!(
        unknown.snapshot.waypoint_of(echo),
        Some(Err(WorkloadRef::new("default", "gone")))
    );
    let bad = parse_str("waypoints: [{name: wp, ips: [nope]}]").unwrap_err();
    assert!(bad.contains("waypoints[0].ips"), "{bad}");
}

#[test]
fn a_service_may_prefer_close_endpoints() {
    let doc = parse_str(
        "services: [{name: echo, ports: [{port: 80}], trafficDistribution: PreferClose}]",
    )
    .unwrap();
    let echo = &doc.snapshot.services[&WorkloadRef::new("default", "echo")];
    assert_eq!(
        echo.traffic_distribution,
        Some(crate::state::TrafficDistribution::PreferClose)
    );
    let bad = parse_str("services: [{name: echo, trafficDistribution: Nearby}]").unwrap_err();
    assert!(bad.contains("services[0].trafficDistribution"), "{bad}");
}

#[test]
fn namespaces_bind_their_services_unless_a_service_says_otherwise() {
    let doc = parse_str(
        "namespaces:\n\
             - {name: prod, waypoint: wp}\n\
             - {name: dev}\n\
             - {name: off, waypoint: none}\n\
             services:\n\
             - {name: a, namespace: prod, vips: [10.96.0.10]}\n\
             - {name: b, namespace: prod, vips: [10.96.0.11], waypoint: other}\n\
             - {name: c, namespace: prod, vips: [10.96.0.12], waypoint: none}\n\
             - {name: d, namespace: dev, vips: [10.96.0.13]}\n\
             - {name: e, vips: [10.96.0.14], waypoint: none}\n\
             - {name: f, namespace: off, vips: [10.96.0.15]}\n",
    )
    .unwrap();
    let waypoint = |ns: &str, name: &str| {
        doc.snapshot.services[&WorkloadRef::new(ns, name)]
            .waypoint
            .clone()
    };
    assert_eq!(waypoint("prod", "a").as_deref(), Some("wp"));
    assert_eq!(waypoint("prod", "b").as_deref(), Some("other"));
    assert_eq!(waypoint("prod", "c"), None, "opted out");
    assert_eq!(waypoint("dev", "d"), None);
    assert_eq!(waypoint("default", "e"), None);
    assert_eq!(
        waypoint("off", "f"),
        None,
        "a namespace's none binds nothing"
    );

    let err = parse_str("namespaces: [{name: prod}, {name: prod}]").unwrap_err();
    assert!(
        err.contains("namespaces[1].name: duplicate namespace prod"),
        "{err}"
    );
    let err = parse_str("namespaces: [{name: prod, waypoint: W}]").unwrap_err();
    assert!(err.contains("namespaces[0].waypoint"), "{err}");
    let err = parse_str("namespaces: [{name: prod, useWaypoint: w}]").unwrap_err();
    assert!(err.contains("unknown field `useWaypoint`"), "{err}");
}

const ROUTES: &str = r#"
routes:
  - apiVersion: gateway.networking.k8s.io/v1
    kind: HTTPRoute
    metadata: {name: web, namespace: prod}
    spec:
      parentRefs: [{kind: Service, group: "", name: web, port: 80}]
      rules:
        - matches: [{path: {type: PathPrefix, value: /api}}]
          backendRefs:
            - {name: web-v1, port: 8080, weight: 90}
            - {name: web-v2, port: 8080, weight: 10}
  - apiVersion: gateway.networking.k8s.io/v1
    kind: GRPCRoute
    metadata: {name: echo, namespace: prod}
    spec:
      parentRefs: [{kind: Service, name: echo}]
      rules:
        - matches: [{method: {service: echo.Echo, method: Say}}]
          backendRefs: [{name: echo, port: 9090}]
  - apiVersion: gateway.networking.k8s.io/v1
    kind: HTTPRoute
    metadata: {name: api}
    spec:
      parentRefs: [{kind: Service, name: api}]
      rules: [{backendRefs: [{name: api, port: 80}]}]
"#;

#[test]
fn routes_are_read_as_manifests_and_sorted_by_kind_and_name() {
    let doc = parse_str(ROUTES).unwrap();
    let names: Vec<_> = doc
        .snapshot
        .routes
        .iter()
        .map(|r| format!("{} {}", r.kind, r.name))
        .collect();
    assert_eq!(
        names,
        [
            "HTTPRoute default/api",
            "HTTPRoute prod/web",
            "GRPCRoute prod/echo"
        ]
    );
    let web = &doc.snapshot.routes[1];
    assert_eq!(web.parents[0].service, WorkloadRef::new("prod", "web"));
    assert_eq!(web.rules[0].backends[1].weight, 10);
    let echo = &doc.snapshot.routes[2];
    assert_eq!(
        echo.rules[0].matches[0].path,
        Some(crate::state::route::PathMatch::Exact(
            "/echo.Echo/Say".into()
        ))
    );

    let err = parse_str(&ROUTES.replace("value: /api", "value: api")).unwrap_err();
    assert!(
        err.contains("routes[0].spec.rules[0].matches[0].path.value"),
        "{err}"
    );
    let err =
        parse_str(&ROUTES.replace("{name: web-v2, port: 8080, weight: 10}", "{name: web-v2}"))
            .unwrap_err();
    assert!(
        err.contains("routes[0].spec.rules[0].backendRefs[1].port: required"),
        "{err}"
    );
    let twice = ROUTES.replace(
        "metadata: {name: api}",
        "metadata: {name: web, namespace: prod}",
    );
    let err = parse_str(&twice).unwrap_err();
    assert!(
        err.contains("routes[2].metadata.name: duplicate HTTPRoute prod/web"),
        "{err}"
    );
    // Same name, another kind: two routes.
    let both = ROUTES.replace(
        "metadata: {name: echo, namespace: prod}",
        "metadata: {name: web, namespace: prod}",
    );
    assert_eq!(parse_str(&both).unwrap().snapshot.routes.len(), 3);
}

/// The example file of docs/config.md (its first YAML block), with a real certificate
/// and key in place of the elided PEM of its `secrets:` item.
fn config_docs_example() -> String {
    let docs = include_str!("../../../../docs/config.md");
    let block = docs.split("```yaml\n").nth(1).unwrap();
    let block = block.split_once("```").unwrap().0;
    assert!(block.contains(ELIDED_CERT) && block.contains(ELIDED_KEY));
    let cert = rcgen::generate_simple_self_signed(vec!["shop.example.com".into()]).unwrap();
    let indented = |pem: String| {
        pem.lines()
            .map(|l| format!("        {l}\n"))
            .collect::<String>()
    };
    block
        .replace(ELIDED_CERT, &indented(cert.cert.pem()))
        .replace(ELIDED_KEY, &indented(cert.signing_key.serialize_pem()))
}

const ELIDED_CERT: &str = "        -----BEGIN CERTIFICATE-----\n        MIIBhTCCASugAwIBAgIU...\n        -----END CERTIFICATE-----\n";
const ELIDED_KEY: &str = "        -----BEGIN PRIVATE KEY-----\n        MIGHAgEAMBMGByqGSM49...\n        -----END PRIVATE KEY-----\n";

#[test]
fn the_waypoint_and_route_example_of_the_config_docs_parses() {
    let block = config_docs_example();
    let from = block.find("\nwaypoints:").unwrap();
    let to = block.find("\n# Access policies").unwrap();
    let doc = parse_str(&block[from..to]).unwrap();
    assert_eq!(doc.snapshot.routes.len(), 2);
    let route = &doc.snapshot.routes[0];
    assert_eq!(route.name, WorkloadRef::new("default", "echo"));
    assert_eq!(route.rules[0].backends.len(), 2);
    assert_eq!(route.rules[0].retry.as_ref().unwrap().attempts, 2);
    assert_eq!(route.rules[0].name.as_deref(), Some("api"));
    assert_eq!(doc.snapshot.waypoints.len(), 1);
    let policies = &doc.snapshot.traffic_policies;
    let named = |name: &str| policies.iter().find(|p| p.name.name == name).unwrap();
    let pool = named("echo-pool");
    assert!(pool.connection_pool.is_some() && pool.retry_budget.is_some());
    let retry = named("echo-retry").retry.as_ref().unwrap();
    assert_eq!(retry.max_backoff, std::time::Duration::from_secs(2));
    let users = named("echo-users").request_authentication.as_ref().unwrap();
    assert_eq!(users.jwt_rules[0].issuer, "https://issuer.example.com");
}

#[test]
fn the_gateway_example_of_the_config_docs_parses() {
    let block = config_docs_example();
    let from = block.find("\nroutes:").unwrap();
    let to = block.find("\n# Traffic policies").unwrap();
    let doc = parse_str(&block[from..to]).unwrap();
    let s = &doc.snapshot;
    let public = &s.gateways[&WorkloadRef::new("edge", "public")];
    let protocols: Vec<_> = public.listeners.iter().map(|l| l.protocol.name()).collect();
    assert_eq!(protocols, ["HTTPS", "HTTP", "TLS", "TCP"]);
    assert_eq!(
        public.listeners[0].hostname.as_deref(),
        Some("*.example.com")
    );
    assert!(
        s.tls_certificates
            .contains_key(&WorkloadRef::new("edge", "shop-cert"))
    );
    let shop = s.routes.iter().find(|r| r.name.name == "shop").unwrap();
    assert_eq!(shop.gateway_parents[0].gateway, public.name);
    assert_eq!(
        shop.gateway_parents[0].section_name.as_deref(),
        Some("https")
    );
}

#[test]
fn kubernetes_mode_refuses_routes_gateways_waypoints_and_namespaces() {
    for section in [
        ROUTES.to_owned(),
        "gateways: [{}]\n".into(),
        "secrets: [{}]\n".into(),
        "waypoints: [{name: wp}]\n".into(),
        "namespaces: [{name: prod, waypoint: wp}]\n".into(),
    ] {
        let key = section.trim_start().split(':').next().unwrap().to_owned();
        let err = parse_settings(Path::new("agent.yaml"), &section)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!(
                "agent.yaml: {key}: not allowed with --source kubernetes"
            )),
            "{err}"
        );
    }
}

const EXTERNAL: &str = r#"
mesh:
  outboundTrafficPolicy: {mode: REGISTRY_ONLY}
externalServices:
  - name: api
    namespace: egress
    hosts: [API.example.test.]
    ports:
      - {number: 443, name: https, protocol: HTTPS}
      - {number: 80, name: http, protocol: HTTP, targetPort: 443, tls: {}}
  - name: db
    hosts: [db.internal]
    resolution: STATIC
    addresses: ["192.0.2.10"]
    ports: [{number: 5432}]
"#;

#[test]
fn external_services_are_read_by_namespace_and_name() {
    let doc = parse_str(EXTERNAL).unwrap();
    let s = &doc.snapshot;
    assert_eq!(s.mesh.outbound, OutboundMode::RegistryOnly);
    let api = &s.external_services[&WorkloadRef::new("egress", "api")];
    assert_eq!(api.hosts, ["api.example.test"]);
    assert_eq!(
        api.port(80).unwrap().tls.as_ref().unwrap().sni,
        "api.example.test"
    );
    let db = &s.external_services[&WorkloadRef::new("default", "db")];
    assert_eq!(db.resolution, Resolution::Static);
    assert_eq!(db.addresses, ["192.0.2.10".parse::<IpAddr>().unwrap()]);

    // The same name twice in a namespace: refused, naming the second.
    let twice =
        format!("{EXTERNAL}  - {{name: db, hosts: [db2.internal], ports: [{{number: 1}}]}}\n");
    let err = parse_str(&twice).unwrap_err();
    assert!(
        err.contains("externalServices[2].name: duplicate external service default/db"),
        "{err}"
    );
    // Too many.
    let mut many = String::from("externalServices:\n");
    for i in 0..=crate::source::external::MAX_SERVICES {
        many.push_str(&format!(
            "  - {{name: s{i}, hosts: [s{i}.test], ports: [{{number: 443}}]}}\n"
        ));
    }
    let err = parse_str(&many).unwrap_err();
    assert!(
        err.contains("externalServices: 257 external services: at most 256"),
        "{err}"
    );
    // Kubernetes mode: they come from the API.
    let err = parse_settings(Path::new("agent.yaml"), EXTERNAL)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("externalServices: not allowed with --source kubernetes"),
        "{err}"
    );
}

#[test]
fn the_external_services_example_of_the_config_docs_parses() {
    let block = config_docs_example();
    let from = block.find("\nexternalServices:").unwrap();
    let to = block.find("\n# Access policies").unwrap();
    let doc = parse_str(&block[from..to]).unwrap();
    let s = &doc.snapshot.external_services;
    let api = &s[&WorkloadRef::new("egress", "api")];
    assert_eq!(api.port(80).unwrap().target_port, 443);
    assert!(api.port(80).unwrap().tls.is_some());
    assert_eq!(s[&WorkloadRef::new("egress", "db")].addresses.len(), 2);
}

#[tokio::test]
async fn a_bad_external_service_rejects_the_reload_and_keeps_the_last_good_ones() {
    let bad = EXTERNAL.replace("tls: {}", "tls: {caCertificates: not a pem}");
    let fixed = EXTERNAL.replace("tls: {}", "tls: {sni: edge.example.test}");
    let (rejection, fixed) = reload_bad_then_good(EXTERNAL, &bad, &fixed).await;
    assert!(
        rejection.contains("externalServices[0].ports[1].tls.caCertificates: no PEM certificate"),
        "{rejection}"
    );
    let api = &fixed.external_services[&WorkloadRef::new("egress", "api")];
    assert_eq!(
        api.port(80).unwrap().tls.as_ref().unwrap().sni,
        "edge.example.test"
    );
}

#[tokio::test]
async fn a_bad_route_rejects_the_reload_and_keeps_the_last_good_routes() {
    // A good weight change and a bad regex in the same file: neither is taken.
    let bad = ROUTES.replace("weight: 90", "weight: 50").replace(
        "{type: PathPrefix, value: /api}",
        "{type: RegularExpression, value: \"(\"}",
    );
    let (rejection, fixed) =
        reload_bad_then_good(ROUTES, &bad, &ROUTES.replace("weight: 90", "weight: 50")).await;
    assert!(
        rejection
            .contains("routes[0].spec.rules[0].matches[0].path.value: invalid regular expression"),
        "{rejection}"
    );
    assert_eq!(fixed.routes[1].rules[0].backends[0].weight, 50);
}

#[test]
fn access_log_is_on_by_default_and_switchable_per_namespace() {
    let doc = parse_str(GOOD).unwrap();
    assert!(doc.snapshot.mesh.access_log.enabled_for("default"));
    let doc = parse_str(&GOOD.replace(
        "  mtls:\n",
        "  accessLog: {enabled: false, namespaces: {prod: true}}\n  mtls:\n",
    ))
    .unwrap();
    let access_log = &doc.snapshot.mesh.access_log;
    assert!(!access_log.enabled_for("default"));
    assert!(access_log.enabled_for("prod"));
    let err = parse_str(&GOOD.replace(
        "  mtls:\n",
        "  accessLog: {namespaces: {Bad_NS: false}}\n  mtls:\n",
    ))
    .unwrap_err();
    assert!(err.contains("mesh.accessLog.namespaces.Bad_NS"), "{err}");
}

#[test]
fn kubernetes_mode_takes_settings_only_and_names_the_section_it_refuses() {
    let settings = "agent:\n  cgroupRoot: /sys/fs/cgroup\nmesh:\n  defaultDeny: true\n";
    let doc = parse_settings(Path::new("agent.yaml"), settings).unwrap();
    assert!(doc.snapshot.mesh.default_deny);
    assert!(doc.snapshot.workloads.is_empty());
    let err = parse_settings(Path::new("agent.yaml"), GOOD)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("agent.yaml: workloads: not allowed with --source kubernetes"),
        "{err}"
    );
    let policies_only = format!("{settings}{POLICIES}");
    let err = parse_settings(Path::new("agent.yaml"), &policies_only)
        .unwrap_err()
        .to_string();
    assert!(err.contains("policies: not allowed"), "{err}");
}

#[test]
fn unknown_mtls_mode_is_named() {
    let err = parse_str(&GOOD.replace("mode: PERMISSIVE", "mode: LAX")).unwrap_err();
    assert!(err.contains("mesh.mtls.mode"), "{err}");
    assert!(err.contains("STRICT"), "{err}");
}

#[test]
fn a_local_pod_needs_a_netns() {
    let err = parse_str(&GOOD.replace("    node: node-b\n", "")).unwrap_err();
    assert!(err.contains("workloads[2].netns"), "{err}");
}

#[test]
fn a_local_pod_may_be_known_by_uid_until_the_node_learns_its_netns() {
    let uid = "0d5cb5a1-8f2e-4c55-9a43-3b4f3e0e2a11";
    let text = GOOD.replace("netns: /proc/self/ns/net", &format!("podUid: {uid}"));
    let doc = parse_str(&text).unwrap();
    let client = &doc.snapshot.workloads[&WorkloadRef::new("default", "client")];
    assert_eq!(client.pod_uid(), Some(uid));
    assert_eq!(client.netns(), None);
    // Not enrollable until `node::join` fills in the netns.
    assert_eq!(doc.snapshot.local_enrolled().count(), 0);

    let err = parse_str(&GOOD.replace(
        "netns: /proc/self/ns/net",
        "netns: /proc/self/ns/net\n    podUid: 0d5cb5a1-8f2e-4c55-9a43-3b4f3e0e2a11",
    ))
    .unwrap_err();
    assert!(err.contains("workloads[0].podUid"), "{err}");
    assert!(err.contains("not both"), "{err}");
    let probed = parse_str(&text.replace(
        &format!("podUid: {uid}"),
        &format!("podUid: {uid}\n    probePorts: [8080, 9090]"),
    ))
    .unwrap();
    let client = &probed.snapshot.workloads[&WorkloadRef::new("default", "client")];
    assert_eq!(client.probe_ports(), [8080, 9090]);
    let err = parse_str(&GOOD.replace(
        "netns: /proc/self/ns/net",
        "netns: /proc/self/ns/net\n    probePorts: [8080]",
    ))
    .unwrap_err();
    assert!(err.contains("workloads[0].probePorts"), "{err}");
    let err = parse_str(&text.replace(
        &format!("podUid: {uid}"),
        &format!("podUid: {uid}\n    probePorts: [0]"),
    ))
    .unwrap_err();
    assert!(err.contains("workloads[0].probePorts[0]"), "{err}");
    let err = parse_str(&GOOD.replace("netns: /proc/self/ns/net", "podUid: Pod_1")).unwrap_err();
    assert!(err.contains("workloads[0].podUid"), "{err}");
    assert!(err.contains("\"Pod_1\" is not a pod UID"), "{err}");
    let twice = text.replace("netns: /does/not/matter", &format!("podUid: {uid}"));
    let err = parse_str(&twice).unwrap_err();
    assert!(err.contains("workloads[1].podUid"), "{err}");
    assert!(
        err.contains("already the UID of workload default/client"),
        "{err}"
    );
}

#[test]
fn unknown_field_is_named() {
    let err =
        parse_str(&GOOD.replace("serviceAccount: client", "serviceAcount: client")).unwrap_err();
    assert!(err.contains("serviceAcount"), "{err}");
    assert!(err.contains("workloads[0]"), "{err}");
}

#[test]
fn bad_ip_names_the_field_and_the_value() {
    let err = parse_str(&GOOD.replace("10.1.0.2", "10.1.0.300")).unwrap_err();
    assert!(err.contains("workloads[0].ips[0]"), "{err}");
    assert!(err.contains("10.1.0.300"), "{err}");
}

#[test]
fn missing_netns_of_an_enrolled_pod_is_rejected() {
    let err = parse_str(&GOOD.replace("/proc/self/ns/net", "/run/netns/nope")).unwrap_err();
    assert!(err.contains("workloads[0].netns"), "{err}");
    assert!(err.contains("/run/netns/nope does not exist"), "{err}");
}

#[test]
fn duplicate_ip_is_rejected() {
    let err = parse_str(&GOOD.replace("10.1.0.9", "10.1.0.2")).unwrap_err();
    assert!(err.contains("workloads[1].ips[0]"), "{err}");
}

#[test]
fn bad_cidr_and_zero_port_are_named() {
    let err = parse_str(&GOOD.replace("169.254.0.0/16", "169.254.0.0/33")).unwrap_err();
    assert!(err.contains("mesh.excludedCidrs[0]"), "{err}");
    let err = parse_str(&GOOD.replace("{port: 81}", "{port: 0}")).unwrap_err();
    assert!(err.contains("services[0].ports[1].port"), "{err}");
}

const POLICIES: &str = r#"
policies:
  - name: api-allow
    namespace: prod
    selector:
      matchLabels: {app: api}
    action: ALLOW
    rules:
      - from:
          - principals:
              - "spiffe://cluster.local/ns/web/sa/front"
              - "spiffe://cluster.local/ns/ops/*"
          - serviceAccounts: ["jobs/batch"]
            ipBlocks: [{cidr: 10.0.0.0/8, except: ["10.9.0.0/16"]}]
          - namespaces: [monitoring]
        toPorts: [8080, "9000-9100"]
  - name: deny-delete
    namespace: prod
    action: DENY
    rules:
      - methods: [DELETE]
        paths: ["/admin/*"]
        headers: {x-env: [canary]}
"#;

fn with_policies(yaml: &str) -> Result<FileDoc, String> {
    let file = GOOD
        .replace(
            "    mtlsMode: DISABLED\n",
            "    mtlsMode: DISABLED\n    labels: {app: api, weft.dev/tier: back}\n",
        )
        .replace("  mtls:\n", "  defaultDeny: true\n  mtls:\n");
    parse_str(&format!("{file}{yaml}"))
}

#[test]
fn policies_labels_and_default_deny_parse() {
    let doc = with_policies(POLICIES).unwrap();
    let snapshot = &doc.snapshot;
    assert!(snapshot.mesh.default_deny);
    let api = &snapshot.workloads[&WorkloadRef::new("prod", "api")];
    assert_eq!(api.labels["weft.dev/tier"], "back");

    let allow = &snapshot.policies[&WorkloadRef::new("prod", "api-allow")];
    assert!(allow.selects(api));
    assert_eq!(allow.action, Action::Allow);
    let rule = &allow.rules[0];
    assert_eq!(rule.from.len(), 3);
    assert_eq!(
        rule.from[0].principals[1],
        Principal::Prefix("spiffe://cluster.local/ns/ops/".into())
    );
    assert_eq!(rule.from[1].service_accounts[0].to_string(), "jobs/batch");
    assert!(!rule.from[1].ip_blocks[0].contains("10.9.1.1".parse().unwrap()));
    assert_eq!(
        rule.to_ports[1],
        PortRange {
            start: 9000,
            end: 9100
        }
    );
    assert_eq!(rule.l7, None);

    let deny = &snapshot.policies[&WorkloadRef::new("prod", "deny-delete")];
    assert!(deny.selector.match_labels.is_empty());
    assert!(deny.selects(api));
    let l7 = deny.rules[0].l7.as_ref().unwrap();
    assert_eq!(l7.methods, vec!["DELETE"]);
    assert_eq!(l7.headers["x-env"], vec!["canary"]);
}

#[test]
fn policy_errors_name_the_field() {
    let cases = [
        (
            "10.0.0.0/8",
            "10.0.0/8",
            "policies[0].rules[0].from[1].ipBlocks[0].cidr",
            "10.0.0/8",
        ),
        (
            "\"10.9.0.0/16\"",
            "\"11.0.0.0/16\"",
            ".ipBlocks[0].except[0]",
            "not inside",
        ),
        (
            "\"spiffe://cluster.local/ns/web/sa/front\"",
            "\"spiffe://cluster.local/web\"",
            "policies[0].rules[0].from[0].principals[0]",
            "/ns/",
        ),
        ("ns/ops/*", "ns/*/x", "from[0].principals[1]", "'*'"),
        (
            "jobs/batch",
            "jobs",
            "from[1].serviceAccounts[0]",
            "namespace/service-account",
        ),
        (
            "[monitoring]",
            "[Monitoring]",
            "from[2].namespaces[0]",
            "Monitoring",
        ),
        (
            "\"9000-9100\"",
            "\"9100-9000\"",
            "policies[0].rules[0].toPorts[1]",
            "9100-9000",
        ),
        (
            "[8080,",
            "[0,",
            "policies[0].rules[0].toPorts[0]",
            "invalid port 0",
        ),
        (
            "{app: api}",
            "{app: -api}",
            "policies[0].selector.matchLabels.app",
            "label value",
        ),
        (
            "action: DENY",
            "action: REJECT",
            "policies[1].action",
            "ALLOW",
        ),
        (
            "[DELETE]",
            "[delete]",
            "policies[1].rules[0].methods[0]",
            "HTTP method",
        ),
        (
            "[\"/admin/*\"]",
            "[admin]",
            "policies[1].rules[0].paths[0]",
            "'/'",
        ),
        (
            "- namespaces: [monitoring]",
            "- {}",
            "policies[0].rules[0].from[2]",
            "no source",
        ),
        (
            "toPorts:",
            "ports:",
            "policies[0].rules[0]",
            "unknown field `ports`",
        ),
        (
            "name: deny-delete",
            "name: api-allow",
            "policies[1].name",
            "duplicate policy",
        ),
    ];
    for (from, to, field, reason) in cases {
        assert!(POLICIES.contains(from), "{from}");
        let err = with_policies(&POLICIES.replacen(from, to, 1)).unwrap_err();
        assert!(err.contains(field), "{from} -> {to}: {err}");
        assert!(err.contains(reason), "{from} -> {to}: {err}");
    }
    let err = parse_str(&GOOD.replace("mtlsMode: DISABLED", "labels: {\"a/b/c\": x}")).unwrap_err();
    assert!(err.contains("workloads[2].labels.a/b/c"), "{err}");
}

#[test]
fn policies_may_name_external_services_instead_of_workloads() {
    let egress = |target_refs: &str, selector: &str| {
        with_policies(&format!(
            "policies:\n\
             - name: no-api\n\
             \x20 namespace: egress\n\
             \x20 {selector}\n\
             \x20 targetRefs: {target_refs}\n\
             \x20 action: DENY\n\
             \x20 rules: [{{from: [{{namespaces: [batch]}}]}}]\n"
        ))
    };
    let doc = egress(
        "[{group: weft.dev, kind: ExternalService, name: api}, \
         {group: weft.dev, kind: ExternalService, name: db}]",
        "selector: {}",
    )
    .unwrap();
    let policy = &doc.snapshot.policies[&WorkloadRef::new("egress", "no-api")];
    assert_eq!(policy.external_services, ["api", "db"]);
    for (target_refs, selector, field, reason) in [
        (
            "[{group: \"\", kind: Service, name: api}]",
            "selector: {}",
            "policies[0].targetRefs[0].kind",
            "ExternalService",
        ),
        (
            "[{group: weft.dev, kind: ExternalService, name: Api}]",
            "selector: {}",
            "policies[0].targetRefs[0].name",
            "Api",
        ),
        (
            "[{group: weft.dev, kind: ExternalService, name: api, sectionName: x}]",
            "selector: {}",
            "policies[0].targetRefs[0].sectionName",
            "not supported",
        ),
        (
            "[{group: weft.dev, kind: ExternalService, name: api}]",
            "selector: {matchLabels: {app: x}}",
            "policies[0].targetRefs",
            "not both",
        ),
    ] {
        let err = egress(target_refs, selector).unwrap_err();
        assert!(err.contains(field), "{target_refs}: {err}");
        assert!(err.contains(reason), "{target_refs}: {err}");
    }
}

#[test]
fn the_examples_of_the_policy_docs_parse() {
    let docs = include_str!("../../../../docs/policy.md");
    let blocks: Vec<&str> = docs
        .split("```yaml\n")
        .skip(1)
        .filter_map(|rest| rest.split_once("```").map(|(block, _)| block))
        .collect();
    assert!(blocks.len() >= 3);
    for block in blocks {
        let yaml = if block.starts_with("policies:") {
            block.to_owned()
        } else {
            format!("policies:\n{block}")
        };
        if let Err(e) = parse_str(&yaml) {
            panic!("{e}\n{yaml}");
        }
    }
}

#[tokio::test]
async fn a_bad_policy_keeps_the_previous_policies_in_force() {
    let good = format!("{GOOD}{POLICIES}");
    // The first policy is fine and the second is not: neither is taken.
    let bad = good
        .replace("action: ALLOW", "action: DENY")
        .replace("[DELETE]", "[delete]");
    let (rejection, fixed) =
        reload_bad_then_good(&good, &bad, &good.replace("action: ALLOW", "action: DENY")).await;
    assert!(
        rejection.contains("policies[1].rules[0].methods[0]"),
        "{rejection}"
    );
    let policy = &fixed.policies[&WorkloadRef::new("prod", "api-allow")];
    assert_eq!(policy.action, Action::Deny);
}

/// A file of `text` and its watcher, polling every 5 ms: (its directory, its path, the
/// published snapshots, the source status).
fn watched(
    text: &str,
) -> (
    tempfile::TempDir,
    PathBuf,
    watch::Receiver<Arc<Snapshot>>,
    Arc<SourceStatus>,
) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.yaml");
    std::fs::write(&path, text).unwrap();
    let doc = load(&path).unwrap();
    let (tx, rx) = watch::channel(Arc::new(doc.snapshot.clone()));
    let status = Arc::new(SourceStatus::default());
    status.accepted();
    tokio::spawn(watch(
        path.clone(),
        Duration::from_millis(5),
        doc,
        tx,
        Arc::clone(&status),
    ));
    (dir, path, rx, status)
}

/// Starts watching a file of `good`, writes `bad` (which must be rejected while the
/// snapshot stays), then `fixed`: (the rejection, the snapshot of `fixed`).
async fn reload_bad_then_good(good: &str, bad: &str, fixed: &str) -> (String, Snapshot) {
    let (_dir, path, mut rx, status) = watched(good);
    let started = rx.borrow().as_ref().clone();
    std::fs::write(&path, bad).unwrap();
    let rejected = async {
        while status.view().rejected_total == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), rejected)
        .await
        .unwrap();
    assert!(!rx.has_changed().unwrap());
    assert_eq!(**rx.borrow(), started);
    let rejection = status.view().last_rejection.unwrap();

    std::fs::write(&path, fixed).unwrap();
    tokio::time::timeout(Duration::from_secs(10), rx.changed())
        .await
        .unwrap()
        .unwrap();
    let snapshot = rx.borrow().as_ref().clone();
    (rejection, snapshot)
}

#[tokio::test]
async fn a_bad_reload_keeps_the_last_good_snapshot() {
    let (_dir, path, mut rx, status) = watched(GOOD);

    std::fs::write(&path, GOOD.replace("10.1.0.2", "bad-ip")).unwrap();
    let rejected = async {
        while status.view().rejected_total == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), rejected)
        .await
        .unwrap();
    assert!(!rx.has_changed().unwrap());
    assert!(
        status
            .view()
            .last_rejection
            .unwrap()
            .contains("workloads[0].ips[0]")
    );

    std::fs::write(&path, GOOD.replace("10.1.0.2", "10.1.0.5")).unwrap();
    tokio::time::timeout(Duration::from_secs(10), rx.changed())
        .await
        .unwrap()
        .unwrap();
    let client = rx.borrow().workloads[&WorkloadRef::new("default", "client")].clone();
    assert_eq!(client.ips, vec!["10.1.0.5".parse::<IpAddr>().unwrap()]);
    assert_eq!(status.view().last_rejection, None);
}

#[tokio::test]
async fn an_agent_section_change_is_reported_as_pending_and_applies_nothing() {
    let (_dir, path, rx, status) = watched(GOOD);
    let pending_becomes = |want: Vec<&'static str>| {
        let status = Arc::clone(&status);
        async move {
            while status.view().restart_pending != want {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };

    // Only start-up settings change: they are named, and no new snapshot is published.
    let changed = GOOD.replace(
        "  cgroupRoot: /sys/fs/cgroup\n",
        "  cgroupRoot: /sys/fs/cgroup/other\n  metricsPrefix: istio\n",
    );
    std::fs::write(&path, &changed).unwrap();
    tokio::time::timeout(
        Duration::from_secs(10),
        pending_becomes(vec!["agent.cgroupRoot", "agent.metricsPrefix"]),
    )
    .await
    .unwrap();
    assert!(!rx.has_changed().unwrap());
    assert_eq!(status.view().generation, 1);

    // With a reloadable change too: that one applies, the pending list stays.
    std::fs::write(&path, changed.replace("10.1.0.2", "10.1.0.5")).unwrap();
    let mut applied = rx.clone();
    tokio::time::timeout(Duration::from_secs(10), applied.changed())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.view().generation, 2);
    assert_eq!(
        status.view().restart_pending,
        ["agent.cgroupRoot", "agent.metricsPrefix"]
    );

    // Back to the section in force: nothing pending.
    std::fs::write(&path, GOOD.replace("10.1.0.2", "10.1.0.5")).unwrap();
    tokio::time::timeout(Duration::from_secs(10), pending_becomes(vec![]))
        .await
        .unwrap();
}

#[test]
fn changed_agent_fields_are_named_as_written() {
    let base = parse_str(GOOD).unwrap().agent;
    assert!(base.changed_fields(&base).is_empty());
    let other = parse_str(&GOOD.replace(
        "  cgroupRoot: /sys/fs/cgroup\n",
        "  cgroupRoot: /sys/fs/cgroup\n  ports: {inbound: 16006}\n",
    ))
    .unwrap()
    .agent;
    assert_eq!(base.changed_fields(&other), ["agent.ports"]);
    assert_eq!(other.changed_fields(&base), ["agent.ports"]);
}
