//! L4 telemetry end to end across two nodes (issue "Identity-based access policy and L4
//! telemetry"): after a known transfer, the TCP byte counters of both reporters equal what
//! the applications sent and received, exactly, with Istio's labels; the access-log line of
//! each end carries the connection's fields; a denied connection is counted by reason and
//! logged with the policy that denied it.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use weft_tests::{
    TestAgent, TestNode,
    app::{self, Mode},
    eventually,
    metrics::Scrape,
    privileged, test_name,
};

#[test]
fn byte_counters_labels_and_access_log_match_a_known_transfer() -> Result<()> {
    privileged!();
    let node1 = TestNode::new(test_name!(), 1)?;
    let node2 = TestNode::new(test_name!(), 2)?;
    node1.connect(&node2)?;
    let client = node1
        .pod("client")
        .service_account("client")
        .label("app", "shop")
        .label("version", "v1")
        .create()?;
    let server = node2
        .pod("server")
        .service_account("server")
        .label("app", "catalog")
        .label("version", "v2")
        .create()?;
    let agent1 = node1.start_agent()?;
    let agent2 = node2.start_agent()?;
    // The hash server reads everything, then answers one line: the two directions differ.
    let _hash = app::serve(&server, PORT, Mode::Hash)?;

    let to = SocketAddr::V4(server.addr(PORT));
    let report = app::send(&client, to, SENT, 5)?;
    assert_eq!(report.sent_bytes, SENT);
    let answered = report.received_bytes;
    ensure!(answered > 0, "the hash server answered nothing: {report:?}");

    let both = [
        ("source", &agent1, "outbound"),
        ("destination", &agent2, "hbone"),
    ];
    for (reporter, agent, direction) in both {
        let labels = [
            ("reporter", reporter),
            ("source_workload", "client"),
            ("source_workload_namespace", "default"),
            ("source_principal", CLIENT_ID),
            ("source_app", "shop"),
            ("source_version", "v1"),
            ("destination_workload", "server"),
            ("destination_workload_namespace", "default"),
            ("destination_principal", SERVER_ID),
            ("destination_app", "catalog"),
            ("destination_version", "v2"),
            ("connection_security_policy", "mutual_tls"),
            ("response_flags", "-"),
        ];
        // Counters move at close; the proxies close a moment after the apps.
        let scrape = eventually(Duration::from_secs(10), || {
            let scrape = Scrape::parse(&agent.metrics()?);
            ensure!(
                scrape.sum("weft_tcp_connections_closed_total", &labels) == 1.0,
                "{reporter}: no closed connection with the expected labels yet; have:\n{:#?}",
                scrape
                    .matching("weft_tcp_connections_closed_total", &[])
                    .collect::<Vec<_>>()
            );
            Ok(scrape)
        })?;
        // Istio's directions: received = request bytes (client → server), sent = response.
        assert_eq!(
            scrape.sum("weft_tcp_received_bytes_total", &labels),
            SENT as f64,
            "{reporter}: request bytes"
        );
        assert_eq!(
            scrape.sum("weft_tcp_sent_bytes_total", &labels),
            answered as f64,
            "{reporter}: response bytes"
        );
        assert_eq!(
            scrape.sum("weft_tcp_connections_opened_total", &labels),
            1.0,
            "{reporter}: opened"
        );

        let line = access_line(agent, direction, to)?;
        for (key, expected) in [
            ("reporter", json!(reporter)),
            ("src.identity", json!(CLIENT_ID)),
            ("src.workload", json!("client")),
            ("src.namespace", json!("default")),
            ("dst.addr", json!(to.to_string())),
            ("dst.identity", json!(SERVER_ID)),
            ("dst.workload", json!("server")),
            ("dst.namespace", json!("default")),
            ("bytes_sent", json!(SENT)),
            ("bytes_received", json!(answered)),
            ("connection_security_policy", json!("mutual_tls")),
            ("response_flags", json!("-")),
            ("error", Value::Null),
        ] {
            assert_eq!(
                line[key], expected,
                "{reporter} access log `{key}`: {line:#}"
            );
        }
        ensure!(
            line["start_time"].as_str().is_some_and(|t| t.contains('T')),
            "start_time is RFC 3339: {line:#}"
        );
        ensure!(line["duration_ms"].is_u64(), "duration_ms: {line:#}");
    }
    // The source address the server's proxy saw is the client pod's own.
    let inbound = access_line(&agent2, "hbone", to)?;
    ensure!(
        inbound["src.addr"]
            .as_str()
            .is_some_and(|a| a.starts_with(&format!("{}:", client.ip()))),
        "src.addr: {inbound:#}"
    );
    ensure!(inbound["policy"] == json!("allow"), "policy: {inbound:#}");

    // A denial: counted by reason, logged with the policy.
    node2.set_policies(json!([{
        "name": "no-shop", "action": "DENY",
        "rules": [{ "from": [{ "principals": [CLIENT_ID] }] }],
    }]));
    agent2.reload(&node2)?;
    eventually(Duration::from_secs(10), || {
        let r = app::send_text(&client, to, "denied");
        ensure!(r.is_err(), "still allowed: {r:?}");
        Ok(())
    })?;
    let denied = eventually(Duration::from_secs(10), || {
        agent2
            .access_log()
            .into_iter()
            .find(|l| l["policy"] == json!("deny"))
            .context("no access-log line for the denial yet")
    })?;
    assert_eq!(
        denied["policy.name"],
        json!("default/no-shop"),
        "{denied:#}"
    );
    assert_eq!(
        denied["policy.reason"],
        json!("denied_by_policy"),
        "{denied:#}"
    );
    assert_eq!(denied["response_flags"], json!("RBAC"), "{denied:#}");
    assert_eq!(denied["error"], json!("denied_by_policy"), "{denied:#}");
    let scrape = Scrape::parse(&agent2.metrics()?);
    ensure!(
        scrape.sum(
            "weft_agent_denied_connections_total",
            &[("reason", "denied_by_policy")]
        ) >= 1.0,
        "the denial is counted by reason"
    );
    Ok(())
}

/// The access-log line an agent wrote for the connection to `to` in `direction`.
fn access_line(agent: &TestAgent, direction: &str, to: SocketAddr) -> Result<Value> {
    eventually(Duration::from_secs(10), || {
        agent
            .access_log()
            .into_iter()
            .find(|l| l["direction"] == json!(direction) && l["dst.addr"] == json!(to.to_string()))
            .with_context(|| format!("no {direction} access-log line for {to} yet"))
    })
}

const PORT: u16 = 8080;
/// Request bytes of the known transfer.
const SENT: u64 = 3 * 1024 * 1024 + 7;
const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/server";
