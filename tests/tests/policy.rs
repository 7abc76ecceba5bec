//! Identity-based access policy, end to end across two nodes (issue "Identity-based access
//! policy and L4 telemetry"): the destination node's agent judges every new connection by
//! the AccessPolicies of its config; denied connections are reset (never left half-open)
//! and recorded with their reason; a policy change applies to the next connection and
//! closes the open ones it denies; a malformed policy is rejected, naming the field, and
//! the previous policy stays in force.
//!
//! The client pods run on node 1, the server on node 2, so every meshed connection crosses
//! the node link as HBONE and policy sees the client's proven SPIFFE id.

use std::{cell::RefCell, collections::BTreeMap, net::SocketAddr, time::Duration};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use weft_tests::{
    TestAgent, TestNode, TestPod,
    app::{self, Mode},
    assert_eventually, eventually, privileged, test_name,
};

/// The pods of the policy tests: two clients on node 1 (one in another namespace, one
/// outside the mesh), a server with two ports on node 2.
/// Fields drop in order: apps and agents stop before the nodes are torn down.
struct Cluster {
    apps: Vec<app::Server>,
    /// Connections the test let through to the app on each port: all it may accept.
    admitted: RefCell<BTreeMap<u16, usize>>,
    _agent1: TestAgent,
    agent2: TestAgent,
    client: TestPod,
    stranger: TestPod,
    outsider: TestPod,
    server: TestPod,
    node2: TestNode,
    _node1: TestNode,
}

impl Cluster {
    fn new(test: &str) -> Result<Self> {
        let node1 = TestNode::new(test, 1)?;
        let node2 = TestNode::new(test, 2)?;
        node1.connect(&node2)?;
        let client = node1.pod("client").service_account("client").create()?;
        let stranger = node1
            .pod("stranger")
            .namespace("other")
            .service_account("stranger")
            .create()?;
        let outsider = node1.pod("outsider").enrolled(false).create()?;
        let server = node2
            .pod("server")
            .service_account("server")
            .label("app", "server")
            .create()?;
        let agent1 = node1.start_agent()?;
        let agent2 = node2.start_agent()?;
        let apps = vec![
            app::serve(&server, PORT, Mode::Echo)?,
            app::serve(&server, OTHER_PORT, Mode::Echo)?,
        ];
        Ok(Cluster {
            apps,
            admitted: RefCell::default(),
            _agent1: agent1,
            agent2,
            client,
            stranger,
            outsider,
            server,
            node2,
            _node1: node1,
        })
    }

    /// Installs `policies` (and `defaultDeny`) on the server's node and waits until its
    /// agent applied them.
    fn apply(&self, policies: Value, default_deny: bool) -> Result<()> {
        self.node2.set_policies(policies);
        self.node2
            .set_mesh(json!({ "excludedPorts": [22], "defaultDeny": default_deny }));
        self.agent2.reload_and_wait(&self.node2)
    }

    fn to(&self, port: u16) -> SocketAddr {
        SocketAddr::V4(self.server.addr(port))
    }

    /// A connection from `from` to the server's `port` is allowed: the payload is echoed.
    fn expect_allowed(&self, from: &TestPod, port: u16) -> Result<()> {
        let text = format!("hello from {}", from.name());
        let report = app::send_text(from, self.to(port), &text)
            .with_context(|| format!("{} → :{port} should be allowed", from.name()))?;
        ensure!(
            report.reply.as_deref() == Some(text.as_str()),
            "{} → :{port}: echo missing: {report:?}",
            from.name()
        );
        self.admit(port);
        // Also catches a denied connection whose `accepted` line came after its check.
        self.expect_app_saw_only_admitted(port)
    }

    /// Counts one connection to `port` the test lets through (and the app will accept).
    fn admit(&self, port: u16) {
        *self.admitted.borrow_mut().entry(port).or_default() += 1;
    }

    /// The app on `port` accepted exactly the connections the test let through: no denied
    /// one reached it.
    fn expect_app_saw_only_admitted(&self, port: u16) -> Result<()> {
        let admitted = self.admitted.borrow().get(&port).copied().unwrap_or(0);
        let app = self
            .apps
            .iter()
            .find(|a| a.port == port)
            .context("no app on that port")?;
        let accepted = app.wait_accepted(admitted);
        ensure!(
            accepted.len() == admitted,
            "the app on :{port} accepted {} connections, {admitted} were let through; a \
             denied one reached it: {accepted:?}",
            accepted.len()
        );
        Ok(())
    }

    /// A connection from `from` to the server's `port` is denied: the client sees a reset
    /// (not a hang, not a clean close), the server app is never reached, and the server's
    /// agent records the denial with `reason`.
    fn expect_denied(&self, from: &TestPod, port: u16, reason: &str) -> Result<()> {
        let seen = self.agent2.newest_record_id()?;
        let result = app::send_text(from, self.to(port), "should not pass");
        match result {
            Ok(report) => bail!(
                "{} → :{port} should be denied ({reason}), but got {report:?}",
                from.name()
            ),
            Err(e) => {
                ensure!(
                    app::is_reset(&e),
                    "{} → :{port}: a denial must reset the connection: {e:#}",
                    from.name()
                );
            }
        }
        let record = self.agent2.expect_new_record(seen, "the denial", |r| {
            r.dst == self.to(port).to_string() && r.error.is_some()
        });
        ensure!(
            record.error.as_deref() == Some(reason),
            "{} → :{port}: expected reason {reason}, got {record:?}",
            from.name()
        );
        self.expect_app_saw_only_admitted(port)
    }
}

#[test]
fn access_policy_matrix_across_two_nodes() -> Result<()> {
    privileged!();
    let c = Cluster::new(test_name!())?;
    let (client, stranger, outsider) = (&c.client, &c.stranger, &c.outsider);

    // No policy: everything is allowed.
    c.expect_allowed(client, PORT)?;
    c.expect_allowed(stranger, PORT)?;

    // ALLOW by identity: only the client's SPIFFE id gets in.
    c.apply(
        json!([{
            "name": "allow-client", "selector": { "matchLabels": { "app": "server" } },
            "action": "ALLOW",
            "rules": [{ "from": [{ "principals": [CLIENT_ID] }] }],
        }]),
        false,
    )?;
    c.expect_allowed(client, PORT)?;
    c.expect_denied(stranger, PORT, "not_allowed")?;
    // Plaintext proves no identity: the outsider cannot match a principal.
    c.expect_denied(outsider, PORT, "not_allowed")?;

    // ALLOW by namespace: the other namespace gets in, the client no longer does.
    c.apply(
        json!([{
            "name": "allow-other-ns", "action": "ALLOW",
            "rules": [{ "from": [{ "namespaces": ["other"] }] }],
        }]),
        false,
    )?;
    c.expect_allowed(stranger, PORT)?;
    c.expect_denied(client, PORT, "not_allowed")?;

    // Ports: the client may reach 8080 only.
    c.apply(
        json!([{
            "name": "client-8080", "action": "ALLOW",
            "rules": [{ "from": [{ "principals": [CLIENT_ID] }], "toPorts": [PORT] }],
        }]),
        false,
    )?;
    c.expect_allowed(client, PORT)?;
    c.expect_denied(client, OTHER_PORT, "not_allowed")?;

    // DENY beats ALLOW.
    c.apply(
        json!([
            {
                "name": "allow-all", "action": "ALLOW", "rules": [{}],
            },
            {
                "name": "deny-client", "action": "DENY",
                "rules": [{ "from": [{ "serviceAccounts": ["default/client"] }] }],
            },
        ]),
        false,
    )?;
    c.expect_denied(client, PORT, "denied_by_policy")?;
    c.expect_allowed(stranger, PORT)?;

    // Default deny: with no policy selecting the server, nothing gets in.
    c.apply(json!([]), true)?;
    c.expect_denied(client, PORT, "default_deny")?;
    c.expect_denied(outsider, PORT, "default_deny")?;

    // And one policy change later the client is back: the next connection is judged anew.
    c.apply(
        json!([{
            "name": "allow-client", "action": "ALLOW",
            "rules": [{ "from": [{ "principals": [CLIENT_ID] }] }],
        }]),
        true,
    )?;
    c.expect_allowed(client, PORT)?;
    c.expect_denied(stranger, PORT, "not_allowed")?;
    Ok(())
}

#[test]
fn a_new_policy_closes_the_open_connections_it_denies() -> Result<()> {
    privileged!();
    let c = Cluster::new(test_name!())?;
    // A long transfer, allowed when it starts.
    let running =
        app::start_send_paced(&c.client, c.to(PORT), 4 << 20, 1, Duration::from_secs(30))?;
    c.admit(PORT);
    let open = c.agent2.expect_record("the open connection", |r| {
        r.direction == "hbone" && r.dst == c.to(PORT).to_string()
    });
    c.apply(
        json!([{
            "name": "deny-client", "action": "DENY",
            "rules": [{ "from": [{ "principals": [CLIENT_ID] }] }],
        }]),
        false,
    )?;
    let result = running.finish();
    let Err(e) = result else {
        bail!("the transfer should have been cut by the new policy: {result:?}");
    };
    ensure!(app::is_reset(&e), "a revoked connection is reset: {e:#}");
    let revoked = c.agent2.expect_record("the revoked connection", |r| {
        r.dst == c.to(PORT).to_string() && r.error.as_deref() == Some("policy_revoked")
    });
    assert_eq!(
        revoked.id, open.id,
        "the connection open before the change was revoked"
    );
    assert_eventually(Duration::from_secs(5), || {
        ensure!(
            c.agent2
                .log()
                .contains("open connection closed: the new policy denies it"),
            "no log line for the revocation"
        );
        Ok(())
    });
    // The next connection is refused outright.
    c.expect_denied(&c.client, PORT, "denied_by_policy")?;
    Ok(())
}

#[test]
fn a_malformed_policy_is_rejected_naming_the_field_and_the_old_one_stays() -> Result<()> {
    privileged!();
    let c = Cluster::new(test_name!())?;
    c.apply(
        json!([{
            "name": "deny-stranger", "action": "DENY",
            "rules": [{ "from": [{ "namespaces": ["other"] }] }],
        }]),
        false,
    )?;
    c.expect_denied(&c.stranger, PORT, "denied_by_policy")?;

    let mut config = c.node2.config();
    config["policies"] = json!([{
        "name": "broken", "action": "ALLOW",
        "rules": [{ "from": [{ "ipBlocks": [{ "cidr": "10.0.0/8" }] }] }],
    }]);
    let rejected_before = c.agent2.status()?["config"]["rejected_total"]
        .as_u64()
        .unwrap_or(0);
    c.agent2.rewrite_config(&config)?;
    eventually(Duration::from_secs(10), || {
        let status = c.agent2.status()?;
        let rejection = status["config"]["last_rejection"].as_str().unwrap_or("");
        ensure!(
            status["config"]["rejected_total"].as_u64() > Some(rejected_before)
                && rejection.contains("policies[0].rules[0].from[0].ipBlocks[0].cidr"),
            "no rejection naming the field yet: {:#}",
            status["config"]
        );
        Ok(())
    })?;
    // The previous policy is still the one in force.
    c.expect_denied(&c.stranger, PORT, "denied_by_policy")?;
    c.expect_allowed(&c.client, PORT)?;
    Ok(())
}

const PORT: u16 = 8080;
const OTHER_PORT: u16 = 9090;
const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
