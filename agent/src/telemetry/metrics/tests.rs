use super::*;

fn labels() -> TcpLabels {
    TcpLabels {
        reporter: "destination",
        source_workload: "client".into(),
        source_workload_namespace: "default".into(),
        source_principal: "spiffe://cluster.local/ns/default/sa/client".into(),
        source_app: "client".into(),
        source_version: "unknown".into(),
        destination_workload: "echo".into(),
        destination_workload_namespace: "default".into(),
        destination_principal: "spiffe://cluster.local/ns/default/sa/echo".into(),
        destination_app: "echo".into(),
        destination_version: "v1".into(),
        destination_service: "echo.default.svc.cluster.local".into(),
        destination_service_name: "echo".into(),
        destination_service_namespace: "default".into(),
        connection_security_policy: "mutual_tls",
        response_flags: "-",
    }
}

#[test]
fn prefixes_are_validated() {
    for good in ["weft", "istio", "_x", "a_1"] {
        assert!(Prefix::new(good).is_ok(), "{good}");
    }
    for bad in ["", "Weft", "1x", "we-ft", "we ft", "wéft"] {
        assert!(Prefix::new(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn tcp_families_carry_istio_names_and_labels_under_the_prefix() {
    for prefix in ["weft", "istio"] {
        let mut registry = Registry::new(&Prefix::new(prefix).unwrap());
        let tcp = TcpMetrics::new(&mut registry);
        let l = labels();
        tcp.opened(&l);
        tcp.closed(
            &l,
            Transfer {
                request_bytes: 1234,
                response_bytes: 56,
                duration_seconds: 0.2,
            },
        );
        tcp.denied("not_allowed");
        let text = registry.encode().unwrap();
        for family in [
            "tcp_connections_opened_total{",
            "tcp_connections_closed_total{",
            "tcp_sent_bytes_total{",
            "tcp_received_bytes_total{",
            "tcp_connection_duration_seconds_bucket{",
            "tcp_connection_duration_seconds_count{",
        ] {
            assert!(
                text.contains(&format!("\n{prefix}_{family}")),
                "{family}: {text}"
            );
        }
        let sample = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(&format!("{prefix}_{name}{{")))
                .unwrap_or_else(|| panic!("{name}: {text}"))
                .to_owned()
        };
        assert!(sample("tcp_received_bytes_total").ends_with("} 1234"));
        assert!(sample("tcp_sent_bytes_total").ends_with("} 56"));
        let line = sample("tcp_connections_closed_total");
        for label in [
            "reporter=\"destination\"",
            "source_workload=\"client\"",
            "source_principal=\"spiffe://cluster.local/ns/default/sa/client\"",
            "destination_service=\"echo.default.svc.cluster.local\"",
            "destination_version=\"v1\"",
            "connection_security_policy=\"mutual_tls\"",
            "response_flags=\"-\"",
        ] {
            assert!(line.contains(label), "{label}: {line}");
        }
        assert!(
            text.contains(&format!(
                "{prefix}_agent_denied_connections_total{{reason=\"not_allowed\"}} 1"
            )),
            "{text}"
        );
        if prefix == "istio" {
            assert!(!text.contains("weft_"), "{text}");
        }
    }
}

#[test]
fn health_is_read_at_scrape_time() {
    let mut registry = Registry::default();
    registry.register_collector(HealthCollector::new(|| AgentHealth {
        enrolled_pods: 3,
        pods_without_client_address: 1,
        certificates: vec![
            (
                "spiffe://cluster.local/ns/default/sa/client".into(),
                Some(1_800_000_000.0),
            ),
            ("spiffe://cluster.local/ns/default/sa/late".into(), None),
        ],
        config_generation: 2,
        policy_generation: 2,
        config_rejected: 1,
        config_restart_pending: 2,
        config_source: "",
        ebpf: Some(vec![
            ("connect_redirected", 7),
            ("sklookup_error_dropped", 0),
        ]),
    }));
    let text = registry.encode().unwrap();
    for line in [
        "weft_agent_enrolled_pods 3",
        "weft_agent_pods_without_client_address 1",
        "weft_agent_config_generation 2",
        "weft_agent_policy_generation 2",
        "weft_config_rejected_total{source=\"file\"} 1",
        "weft_agent_config_restart_pending 2",
        "weft_agent_certificate_expiry_timestamp_seconds{identity=\"spiffe://cluster.local/ns/default/sa/client\"} 1800000000.0",
        "weft_agent_ebpf_events_total{event=\"connect_redirected\"} 7",
        "weft_agent_ebpf_events_total{event=\"sklookup_error_dropped\"} 0",
    ] {
        assert!(text.lines().any(|l| l == line), "{line}: {text}");
    }
    assert!(!text.contains("sa/late"), "{text}");
    assert!(text.ends_with("# EOF\n"));
}

#[test]
fn the_grafana_dashboard_parses_and_queries_only_exported_metrics() {
    let dashboard: serde_json::Value =
        serde_json::from_str(include_str!("../../../../deploy/grafana/weft-l4.json"))
            .expect("deploy/grafana/weft-l4.json is valid JSON");
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    assert!(variables.iter().any(|v| v["name"] == "datasource"));
    // Every series of every family, so the exposition names them all.
    let mut registry = Registry::default();
    let tcp = TcpMetrics::new(&mut registry);
    tcp.opened(&labels());
    tcp.closed(
        &labels(),
        Transfer {
            request_bytes: 1,
            response_bytes: 1,
            duration_seconds: 1.0,
        },
    );
    tcp.denied("not_allowed");
    registry.register_collector(HealthCollector::new(|| AgentHealth {
        certificates: vec![("id".into(), Some(1.0))],
        ebpf: Some(vec![("connect_redirected", 1)]),
        ..AgentHealth::default()
    }));
    let exposition = registry.encode().unwrap();
    let mut queries = Vec::new();
    collect_queries(&dashboard, &mut queries);
    assert!(queries.len() > 10, "{queries:?}");
    let mut names = 0;
    for query in &queries {
        for (i, _) in query.match_indices("${prefix}_") {
            let name: String = query[i + "${prefix}_".len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            names += 1;
            assert!(
                exposition.contains(&format!("\nweft_{name}")),
                "the dashboard queries {name}, which the agent does not export"
            );
        }
    }
    assert!(names > 10);
}

/// Every `expr` of the panels and `query` of the variables.
fn collect_queries(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v.as_str()) {
                    ("expr" | "definition", Some(text)) => out.push(text.to_owned()),
                    _ => collect_queries(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => {
            for v in items {
                collect_queries(v, out);
            }
        }
        _ => {}
    }
}
