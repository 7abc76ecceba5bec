//! Issue 13, finding 2 (hardening): a policy that cannot be understood never opens a
//! workload. With the Kubernetes source it fails closed in place (the in-process tests
//! against the fake API server, `agent/src/source/kube/tests/fail_closed.rs`: this harness
//! runs the agent on a local file only). With the local file, the file is rejected whole;
//! what this file proves is the case with no last good file to keep: an agent whose first
//! load holds such a policy does not start, and the pod its policy guarded stays closed
//! rather than reachable without the policy, until a readable file starts the agent.
//!
//! The client runs on node 1, the server on node 2: the server's agent judges every
//! connection, over HBONE, by the client's proven SPIFFE id.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use weft_tests::{
    TestAgent, TestNode,
    app::{self, Mode},
    privileged, test_name,
};

#[test]
fn an_unreadable_policy_at_first_load_starts_no_agent_and_the_pod_stays_closed() -> Result<()> {
    privileged!();
    let test = test_name!();
    let node1 = TestNode::new(test, 1)?;
    let node2 = TestNode::new(test, 2)?;
    node1.connect(&node2)?;
    let client = node1.pod("client").service_account("client").create()?;
    let server = node2
        .pod("server")
        .service_account("server")
        .label("app", "server")
        .create()?;
    node2.set_policies(allow_client(|_| {}));
    let _agent1 = node1.start_agent()?;
    let mut agent2 = node2.start_agent()?;
    let _app = app::serve(&server, PORT, Mode::Echo)?;
    let to = SocketAddr::V4(server.addr(PORT));
    let echoed = |what: &str| -> Result<()> {
        let report = app::send_text(&client, to, what).context("client → server")?;
        ensure!(report.reply.as_deref() == Some(what), "no echo: {report:?}");
        Ok(())
    };
    echoed("allowed by the readable policy")?;

    for (what, breaks, field) in MALFORMED {
        // The node restarts its agent, and the file now holds the typo: no last good file.
        agent2.kill();
        let mut config = node2.config();
        config["policies"] = allow_client(breaks);
        let yaml = serde_yaml::to_string(&config)?;
        let mut broken = TestAgent::spawn_with_config_text(&node2, &yaml)?;
        broken.show_log_on_drop(false);
        let status = broken.wait_exit(Duration::from_secs(20))?;
        ensure!(
            status.code() == Some(2),
            "{what}: the agent must refuse to start, got {status}"
        );
        let log = broken.current_log();
        ensure!(
            log.contains(field),
            "{what}: the refusal must name {field}: {log}"
        );
        // Nothing on node 2 admits the connection without the policy.
        if let Ok(report) = app::send_text(&client, to, "must not pass")
            && report.reply.is_some()
        {
            bail!("{what}: the server was reached without its agent: {report:?}");
        }
        // A readable file: the agent starts and the pod is reachable again, as its policy says.
        agent2.rewrite_config(&{
            let mut config = node2.config();
            config["policies"] = allow_client(|_| {});
            config
        })?;
        agent2.restart()?;
        echoed(what)?;
    }
    Ok(())
}

/// The server's ALLOW policy for the client's identity on `PORT`, with its rule broken by
/// `breaks` (the identity, not a policy change, is what the echo checks).
fn allow_client(breaks: fn(&mut Value)) -> Value {
    let mut rule = json!({ "from": [{ "principals": [CLIENT_ID] }], "toPorts": [PORT] });
    breaks(&mut rule);
    json!([{
        "name": "allow-client", "selector": { "matchLabels": { "app": "server" } },
        "action": "ALLOW", "rules": [rule],
    }])
}

/// The malformed inputs of the issue: (what, how it breaks the rule, the field named).
type Malformed = (&'static str, fn(&mut Value), &'static str);
const MALFORMED: [Malformed; 3] = [
    (
        "a principal without spiffe://",
        |rule| rule["from"][0]["principals"][0] = "cluster.local/ns/web/sa/fe".into(),
        "policies[0].rules[0].from[0].principals[0]",
    ),
    (
        "a /33 CIDR",
        |rule| rule["from"][0] = json!({ "ipBlocks": [{ "cidr": "10.0.0.0/33" }] }),
        "policies[0].rules[0].from[0].ipBlocks[0].cidr",
    ),
    (
        "a port range ending below its start",
        |rule| rule["toPorts"] = json!(["8080-80"]),
        "policies[0].rules[0].toPorts[0]",
    ),
];

const PORT: u16 = 8080;
const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
