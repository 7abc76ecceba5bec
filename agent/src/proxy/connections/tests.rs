use std::collections::BTreeMap;

use super::*;
use crate::{
    policy::DenyReason,
    state::{AccessLogSettings, Location, Service, ServicePort},
    telemetry::{Registry, access_log::Captured},
};

const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
const ECHO_ID: &str = "spiffe://cluster.local/ns/default/sa/echo";

/// A registry over `snapshot`, with its metrics and access-log lines.
struct Harness {
    connections: Connections,
    registry: Registry,
    lines: Captured,
    state: watch::Sender<Arc<Snapshot>>,
}

impl Harness {
    fn new(snapshot: Snapshot) -> Self {
        let (state, rx) = watch::channel(Arc::new(snapshot));
        let mut registry = Registry::default();
        let (access_log, lines) = AccessLog::captured();
        let connections =
            Connections::new(rx, TcpMetrics::new(&mut registry)).with_access_log(access_log);
        Self {
            connections,
            registry,
            lines,
            state,
        }
    }

    fn metrics(&self) -> String {
        self.registry.encode().unwrap()
    }

    /// The one sample of `family` (prefix included) whose labels contain all of `labels`.
    fn sample(&self, family: &str, labels: &[&str]) -> u64 {
        let text = self.metrics();
        let matching: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with(&format!("{family}{{")))
            .filter(|l| labels.iter().all(|want| l.contains(want)))
            .collect();
        assert_eq!(matching.len(), 1, "{family} {labels:?}:\n{text}");
        matching[0].rsplit(' ').next().unwrap().parse().unwrap()
    }

    fn access_lines(&self) -> Vec<serde_json::Value> {
        self.lines
            .lines()
            .iter()
            .inspect(|l| {
                assert!(
                    l.starts_with(crate::telemetry::access_log::LINE_PREFIX),
                    "{l}"
                )
            })
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

fn workload(namespace: &str, name: &str, ip: &str, labels: &[(&str, &str)]) -> Workload {
    Workload {
        name: WorkloadRef::new(namespace, name),
        service_account: name.into(),
        ips: vec![ip.parse().unwrap()],
        location: Location::Local {
            netns: format!("/run/netns/{name}").into(),
        },
        enrolled: true,
        mtls_mode: None,
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

/// client (10.1.0.2, app/version labels) → service echo (10.96.0.10:80) → echo pod
/// (10.1.0.3:8080, app.kubernetes.io labels).
fn mesh() -> Snapshot {
    let client = workload(
        "default",
        "client",
        "10.1.0.2",
        &[("app", "client"), ("version", "v1")],
    );
    let echo = workload(
        "default",
        "echo",
        "10.1.0.3",
        &[
            ("app.kubernetes.io/name", "echo"),
            ("app.kubernetes.io/version", "v2"),
        ],
    );
    let service = Service {
        name: WorkloadRef::new("default", "echo"),
        vips: vec!["10.96.0.10".parse().unwrap()],
        ports: vec![ServicePort {
            port: 80,
            target_port: 8080,
        }],
        endpoints: vec!["10.1.0.3".parse().unwrap()],
        waypoint: None,
        traffic_distribution: None,
    };
    Snapshot {
        workloads: BTreeMap::from([(client.name.clone(), client), (echo.name.clone(), echo)]),
        services: BTreeMap::from([(service.name.clone(), service)]),
        ..Snapshot::default()
    }
}

/// The client's side of one HBONE connection through the service: 1000 bytes up, 37 down.
fn outbound(h: &Harness) -> Arc<Tracked> {
    let t = h.connections.open(
        Direction::Outbound,
        "default/client".into(),
        "10.1.0.2:40000".parse().unwrap(),
        "10.96.0.10:80".parse().unwrap(),
    );
    t.set_upstream(
        "10.1.0.3:8080".parse().unwrap(),
        Some("default/echo".into()),
    );
    t.set_identities(Some(CLIENT_ID.into()), Some(ECHO_ID.into()));
    t.sent.fetch_add(1000, Ordering::Relaxed);
    t.received.fetch_add(37, Ordering::Relaxed);
    t
}

/// The server's side of the same connection.
fn hbone(h: &Harness) -> Arc<Tracked> {
    let t = h.connections.open(
        Direction::Hbone,
        "default/echo".into(),
        "10.1.0.2:51000".parse().unwrap(),
        "10.1.0.3:8080".parse().unwrap(),
    );
    t.set_upstream("10.1.0.3:8080".parse().unwrap(), None);
    t.set_identities(Some(CLIENT_ID.into()), Some(ECHO_ID.into()));
    t
}

#[test]
fn outbound_connections_are_labelled_from_the_snapshot_with_exact_bytes() {
    let h = Harness::new(mesh());
    let t = outbound(&h);
    h.connections.established(&t);
    h.connections.close(&t, None);
    let labels = [
        "reporter=\"source\"",
        "source_workload=\"client\"",
        "source_workload_namespace=\"default\"",
        &format!("source_principal=\"{CLIENT_ID}\""),
        "source_app=\"client\"",
        "source_version=\"v1\"",
        "destination_workload=\"echo\"",
        "destination_workload_namespace=\"default\"",
        &format!("destination_principal=\"{ECHO_ID}\""),
        "destination_app=\"echo\"",
        "destination_version=\"v2\"",
        "destination_service=\"echo.default.svc.cluster.local\"",
        "destination_service_name=\"echo\"",
        "destination_service_namespace=\"default\"",
        "connection_security_policy=\"mutual_tls\"",
        "response_flags=\"-\"",
    ];
    // Istio's directions: received = request (client → server), sent = response.
    assert_eq!(h.sample("weft_tcp_received_bytes_total", &labels), 1000);
    assert_eq!(h.sample("weft_tcp_sent_bytes_total", &labels), 37);
    assert_eq!(h.sample("weft_tcp_connections_opened_total", &labels), 1);
    assert_eq!(h.sample("weft_tcp_connections_closed_total", &labels), 1);
    assert_eq!(
        h.sample("weft_tcp_connection_duration_seconds_count", &labels),
        1
    );
}

#[test]
fn hbone_connections_are_reported_by_the_destination_with_the_proven_source() {
    let h = Harness::new(mesh());
    let t = hbone(&h);
    t.set_policy(&Decision::Allow);
    t.sent.fetch_add(1000, Ordering::Relaxed);
    t.received.fetch_add(37, Ordering::Relaxed);
    h.connections.close(&t, None);
    let labels = [
        "reporter=\"destination\"",
        "source_workload=\"client\"",
        "source_app=\"client\"",
        &format!("source_principal=\"{CLIENT_ID}\""),
        "destination_workload=\"echo\"",
        "destination_version=\"v2\"",
        "destination_service=\"echo.default.svc.cluster.local\"",
        "connection_security_policy=\"mutual_tls\"",
        "response_flags=\"-\"",
    ];
    assert_eq!(h.sample("weft_tcp_received_bytes_total", &labels), 1000);
    assert_eq!(h.sample("weft_tcp_sent_bytes_total", &labels), 37);
    // Never established: counted as opened at close, with the same labels.
    assert_eq!(h.sample("weft_tcp_connections_opened_total", &labels), 1);
    let line = &h.access_lines()[0];
    assert_eq!(line["policy"], "allow");
    assert_eq!(line["src.workload"], "client");
    assert_eq!(line["dst.service"], "default/echo");
}

#[test]
fn opened_is_counted_once_and_bytes_add_up_across_connections() {
    let h = Harness::new(mesh());
    for _ in 0..3 {
        let t = outbound(&h);
        h.connections.established(&t);
        h.connections.established(&t);
        h.connections.close(&t, None);
    }
    let labels = ["reporter=\"source\"", "destination_workload=\"echo\""];
    assert_eq!(h.sample("weft_tcp_connections_opened_total", &labels), 3);
    assert_eq!(h.sample("weft_tcp_connections_closed_total", &labels), 3);
    assert_eq!(h.sample("weft_tcp_received_bytes_total", &labels), 3000);
    assert_eq!(h.sample("weft_tcp_sent_bytes_total", &labels), 111);
}

#[test]
fn a_policy_denial_is_counted_flagged_and_logged() {
    let h = Harness::new(mesh());
    let t = hbone(&h);
    let decision = Decision::Deny {
        policy: Some(WorkloadRef::new("default", "deny-client")),
        reason: DenyReason::DeniedByPolicy,
    };
    t.set_policy(&decision);
    h.connections.close(
        &t,
        Some(&Error::PolicyDenied {
            reason: DenyReason::DeniedByPolicy,
            policy: Some(WorkloadRef::new("default", "deny-client")),
        }),
    );
    assert_eq!(
        h.sample(
            "weft_agent_denied_connections_total",
            &["reason=\"denied_by_policy\""]
        ),
        1
    );
    assert_eq!(
        h.sample(
            "weft_tcp_connections_closed_total",
            &["response_flags=\"RBAC\""]
        ),
        1
    );
    let line = &h.access_lines()[0];
    assert_eq!(line["policy"], "deny");
    assert_eq!(line["policy.name"], "default/deny-client");
    assert_eq!(line["policy.reason"], "denied_by_policy");
    assert_eq!(line["response_flags"], "RBAC");
    assert_eq!(line["error"], "denied_by_policy");
    assert!(
        line["error_detail"]
            .as_str()
            .unwrap()
            .contains("deny-client")
    );
}

#[test]
fn plaintext_refused_by_a_strict_pod_counts_as_denied() {
    let h = Harness::new(mesh());
    let t = h.connections.open(
        Direction::Inbound,
        "default/echo".into(),
        "10.1.0.2:40001".parse().unwrap(),
        "10.1.0.3:8080".parse().unwrap(),
    );
    h.connections
        .close(&t, Some(&Error::PlaintextRefusedStrict));
    assert_eq!(
        h.sample(
            "weft_agent_denied_connections_total",
            &["reason=\"plaintext_refused_strict\""]
        ),
        1
    );
    let labels = [
        "connection_security_policy=\"none\"",
        "source_principal=\"unknown\"",
        "source_workload=\"client\"",
        "response_flags=\"RBAC\"",
    ];
    assert_eq!(h.sample("weft_tcp_connections_closed_total", &labels), 1);
}

#[test]
fn the_access_log_line_is_one_json_object_with_every_field() {
    let h = Harness::new(mesh());
    let t = outbound(&h);
    h.connections.close(
        &t,
        Some(&Error::Transfer(crate::hbone::copy::Error::Upstream(
            std::io::Error::other("connection reset"),
        ))),
    );
    let lines = h.access_lines();
    assert_eq!(lines.len(), 1);
    let line = &lines[0];
    for field in [
        "kind",
        "start_time",
        "duration_ms",
        "direction",
        "reporter",
        "pod",
        "id",
        "src.addr",
        "src.identity",
        "src.workload",
        "src.namespace",
        "dst.addr",
        "dst.identity",
        "dst.workload",
        "dst.namespace",
        "dst.service",
        "upstream",
        "bytes_sent",
        "bytes_received",
        "connection_security_policy",
        "policy",
        "policy.name",
        "policy.reason",
        "response_flags",
        "error",
        "error_detail",
    ] {
        assert!(line.get(field).is_some(), "{field} missing: {line}");
    }
    assert_eq!(line["kind"], "access");
    assert!(
        humantime::parse_rfc3339(line["start_time"].as_str().unwrap()).is_ok(),
        "{line}"
    );
    assert_eq!(line["direction"], "outbound");
    assert_eq!(line["reporter"], "source");
    assert_eq!(line["src.addr"], "10.1.0.2:40000");
    assert_eq!(line["src.identity"], CLIENT_ID);
    assert_eq!(line["src.workload"], "client");
    assert_eq!(line["src.namespace"], "default");
    assert_eq!(line["dst.addr"], "10.96.0.10:80");
    assert_eq!(line["dst.identity"], ECHO_ID);
    assert_eq!(line["dst.workload"], "echo");
    assert_eq!(line["dst.service"], "default/echo");
    assert_eq!(line["upstream"], "10.1.0.3:8080");
    assert_eq!(line["bytes_sent"], 1000);
    assert_eq!(line["bytes_received"], 37);
    assert_eq!(line["connection_security_policy"], "mutual_tls");
    assert_eq!(line["policy"], serde_json::Value::Null);
    assert_eq!(line["response_flags"], "UC");
    assert_eq!(line["error"], "upstream");
    assert!(
        line["error_detail"]
            .as_str()
            .unwrap()
            .contains("connection reset")
    );
}

#[test]
fn the_access_log_is_switched_by_the_reporting_pods_namespace() {
    let mut snapshot = mesh();
    snapshot.mesh.access_log = AccessLogSettings {
        enabled: true,
        namespaces: BTreeMap::from([("default".to_owned(), false)]),
    };
    let h = Harness::new(snapshot);
    let t = outbound(&h);
    h.connections.close(&t, None);
    assert!(h.lines.lines().is_empty());
    // Metrics do not depend on the switch.
    assert_eq!(
        h.sample(
            "weft_tcp_connections_closed_total",
            &["reporter=\"source\""]
        ),
        1
    );
    // Switched back on by a new snapshot: the next connection is logged.
    h.state.send_replace(Arc::new(mesh()));
    let t = outbound(&h);
    h.connections.close(&t, None);
    assert_eq!(h.access_lines().len(), 1);
}

#[test]
fn unknown_peers_are_labelled_unknown() {
    let h = Harness::new(mesh());
    let t = h.connections.open(
        Direction::Outbound,
        "default/client".into(),
        "10.1.0.2:40002".parse().unwrap(),
        "192.0.2.7:443".parse().unwrap(),
    );
    t.set_upstream("192.0.2.7:443".parse().unwrap(), None);
    h.connections.close(&t, None);
    let labels = [
        "destination_workload=\"unknown\"",
        "destination_service=\"unknown\"",
        "destination_principal=\"unknown\"",
        "connection_security_policy=\"none\"",
    ];
    assert_eq!(h.sample("weft_tcp_connections_closed_total", &labels), 1);
    let line = &h.access_lines()[0];
    assert_eq!(line["dst.workload"], serde_json::Value::Null);
}

#[test]
fn closed_connections_move_to_recent_with_their_outcome() {
    let registry = Connections::default();
    let a = registry.open(
        Direction::Outbound,
        "default/client".into(),
        "127.0.0.1:40000".parse().unwrap(),
        "10.1.0.3:80".parse().unwrap(),
    );
    let b = registry.open(
        Direction::Inbound,
        "default/server".into(),
        "10.1.0.2:40001".parse().unwrap(),
        "10.1.0.3:80".parse().unwrap(),
    );
    a.sent.store(5, Ordering::Relaxed);
    registry.close(&a, None);
    registry.close(&b, Some(&Error::NoOrigDst));
    let view = registry.view();
    assert!(view.active.is_empty());
    assert_eq!(view.recent.len(), 2);
    assert_eq!(view.recent[0].bytes_sent, 5);
    assert_eq!(view.recent[1].error, Some("no_orig_dst"));
    assert_eq!(view.closed_total["ok"], 1);
    assert_eq!(view.closed_total["no_orig_dst"], 1);
}

#[test]
fn recent_is_bounded() {
    let registry = Connections::default();
    for _ in 0..RECENT + 10 {
        let c = registry.open(
            Direction::Outbound,
            "p".into(),
            "127.0.0.1:1".parse().unwrap(),
            "10.0.0.1:1".parse().unwrap(),
        );
        registry.close(&c, None);
    }
    assert_eq!(registry.view().recent.len(), RECENT);
}

#[test]
fn an_unavailable_waypoint_is_flagged_no_healthy_upstream_and_named_in_the_record() {
    let h = Harness::new(mesh());
    let t = h.connections.open(
        Direction::Outbound,
        "default/client".into(),
        "10.1.0.2:40002".parse().unwrap(),
        "10.96.0.10:80".parse().unwrap(),
    );
    t.set_service(Some("default/echo".into()));
    t.set_waypoint(Some("default/wp".into()));
    h.connections.close(
        &t,
        Some(&Error::WaypointUnavailable {
            service: WorkloadRef::new("default", "echo"),
            waypoint: WorkloadRef::new("default", "wp"),
            problem: crate::proxy::WaypointProblem::NotReady,
        }),
    );
    let labels = [
        "response_flags=\"UH\"",
        "destination_service_name=\"echo\"",
        "source_workload=\"client\"",
    ];
    assert_eq!(h.sample("weft_tcp_connections_closed_total", &labels), 1);
    let line = &h.access_lines()[0];
    assert_eq!(line["error"], "waypoint_unavailable");
    assert_eq!(line["response_flags"], "UH");
    let detail = line["error_detail"].as_str().unwrap();
    assert!(
        detail.contains("default/wp") && detail.contains("no ready address"),
        "{detail}"
    );
    let recent = &h.connections.view().recent[0];
    assert_eq!(recent.waypoint.as_deref(), Some("default/wp"));
    assert_eq!(recent.service.as_deref(), Some("default/echo"));
    assert_eq!(recent.error, Some("waypoint_unavailable"));
}

#[test]
fn a_connection_around_the_waypoint_counts_as_denied() {
    let h = Harness::new(mesh());
    let t = hbone(&h);
    h.connections.close(
        &t,
        Some(&Error::PolicyDenied {
            reason: DenyReason::WaypointBypassed,
            policy: None,
        }),
    );
    assert_eq!(
        h.sample(
            "weft_agent_denied_connections_total",
            &["reason=\"waypoint_bypassed\""]
        ),
        1
    );
    assert_eq!(
        h.sample(
            "weft_tcp_connections_closed_total",
            &["response_flags=\"RBAC\""]
        ),
        1
    );
    let line = &h.access_lines()[0];
    assert_eq!(line["error"], "waypoint_bypassed");
    assert_eq!(line["policy.reason"], "waypoint_bypassed");
}

#[test]
fn a_connection_pool_refusal_is_flagged_upstream_overflow_and_not_a_denial() {
    let h = Harness::new(mesh());
    let t = h.connections.open(
        Direction::Outbound,
        "default/client".into(),
        "10.1.0.2:40003".parse().unwrap(),
        "10.96.0.10:80".parse().unwrap(),
    );
    t.set_upstream(
        "10.1.0.3:8080".parse().unwrap(),
        Some("default/echo".into()),
    );
    h.connections.close(
        &t,
        Some(&Error::Overflow {
            service: WorkloadRef::new("default", "echo"),
            policy: WorkloadRef::new("default", "echo-pool"),
            max_connections: 10,
        }),
    );
    let labels = ["response_flags=\"UO\"", "destination_service_name=\"echo\""];
    assert_eq!(h.sample("weft_tcp_connections_closed_total", &labels), 1);
    let line = &h.access_lines()[0];
    assert_eq!(line["error"], "overflow");
    assert_eq!(line["response_flags"], "UO");
    let detail = line["error_detail"].as_str().unwrap();
    assert!(
        detail.contains("default/echo-pool") && detail.contains("maxConnections"),
        "{detail}"
    );
    // Counted in its own family (`breaker`), not among the denials.
    assert!(
        !h.metrics().contains("weft_agent_denied_connections_total{"),
        "{}",
        h.metrics()
    );
}

#[test]
fn an_external_service_is_named_by_its_host_and_an_unregistered_one_is_refused_no_route() {
    use crate::state::{ExternalPort, ExternalService, external::Protocol};
    let mut snapshot = mesh();
    let api = ExternalService::for_test(
        WorkloadRef::new("egress", "api"),
        &["api.example.test"],
        vec![ExternalPort::for_test(443, Protocol::Https)],
        &["192.0.2.1"],
    );
    snapshot.external_services.insert(api.name.clone(), api);
    let h = Harness::new(snapshot);
    let t = h.connections.open(
        Direction::Outbound,
        "default/client".into(),
        "10.1.0.2:40004".parse().unwrap(),
        "192.0.2.1:443".parse().unwrap(),
    );
    t.set_upstream("192.0.2.1:443".parse().unwrap(), None);
    t.set_external(WorkloadRef::new("egress", "api"));
    h.connections.established(&t);
    t.sent.fetch_add(517, Ordering::Relaxed);
    h.connections.close(&t, None);
    let labels = [
        "destination_service=\"api.example.test\"",
        "destination_service_name=\"api.example.test\"",
        "destination_service_namespace=\"egress\"",
        "destination_workload=\"unknown\"",
        "source_workload=\"client\"",
    ];
    // Istio's directions: received = request (client → server).
    assert_eq!(h.sample("weft_tcp_received_bytes_total", &labels), 517);
    let line = &h.access_lines()[0];
    assert_eq!(line["dst.service"], "egress/api.example.test");

    let refused = h.connections.open(
        Direction::Outbound,
        "default/client".into(),
        "10.1.0.2:40005".parse().unwrap(),
        "198.51.100.7:443".parse().unwrap(),
    );
    h.connections.close(
        &refused,
        Some(&Error::Unregistered("198.51.100.7:443".parse().unwrap())),
    );
    let labels = ["response_flags=\"NR\"", "destination_service=\"unknown\""];
    assert_eq!(h.sample("weft_tcp_connections_closed_total", &labels), 1);
    let reason = ["reason=\"unregistered_destination\""];
    assert_eq!(h.sample("weft_agent_denied_connections_total", &reason), 1);
    assert_eq!(h.access_lines()[1]["error"], "unregistered_destination");
}
