//! What a policy's sources match, end to end (docs/policy.md, "The model"): `ipBlocks`
//! with `except` and `serviceAccounts`, judged by the destination node's agent on real
//! HBONE traffic; and the HBONE pool keyed by the source pod's address, without which
//! `ipBlocks` would judge the wrong pod (docs/hbone.md, "Connection pooling (client)").
//!
//! Three client pods with one identity (`default/client`) on node 1: `inside` and `excepted`
//! share the smallest block that holds both, `excepted` is that block's `except`, `outside`
//! is not in it; `batch` (service account `batch`) is there for `serviceAccounts`, `legacy`
//! (outside the mesh) for plaintext, which only `ipBlocks` can match. The server runs on
//! node 2, so every meshed connection crosses the node link as HBONE and the server's agent
//! judges the address the HBONE connection comes from.

use std::{cell::Cell, net::SocketAddr, net::SocketAddrV4, time::Duration};

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use weft_tests::{
    TestAgent, TestNode, TestPod,
    app::{self, Mode},
    assert_eventually, privileged, test_name,
};

#[test]
fn an_allow_by_ip_block_admits_the_block_minus_its_except() -> Result<()> {
    privileged!();
    let c = Cluster::with_policy(test_name!(), "ALLOW", Cluster::ip_block)?;
    c.expect_allowed(&c.inside)?;
    // The same identity, from the except and from outside the block.
    c.expect_denied(&c.excepted, "not_allowed")?;
    c.expect_denied(&c.outside, "not_allowed")?;
    // And the first pod again, after the others: nothing the others did changed its fate.
    c.expect_allowed(&c.inside)
}

#[test]
fn a_deny_by_ip_block_spares_its_except_and_what_is_outside() -> Result<()> {
    privileged!();
    let c = Cluster::with_policy(test_name!(), "DENY", Cluster::ip_block)?;
    c.expect_denied(&c.inside, "denied_by_policy")?;
    c.expect_allowed(&c.excepted)?;
    c.expect_allowed(&c.outside)?;
    c.expect_denied(&c.inside, "denied_by_policy")
}

#[test]
fn service_accounts_admit_exactly_their_namespace_and_name() -> Result<()> {
    privileged!();
    let c = Cluster::with_policy(test_name!(), "ALLOW", |_| {
        Ok(json!({ "serviceAccounts": ["default/client"] }))
    })?;
    c.expect_allowed(&c.inside)?;
    c.expect_allowed(&c.outside)?;
    c.expect_denied(&c.batch, "not_allowed")
}

#[test]
fn a_plaintext_client_is_judged_by_its_address_alone() -> Result<()> {
    privileged!();
    let c = Cluster::new(test_name!())?;
    let legacy = json!({ "cidr": format!("{}/32", c.legacy.ip()) });
    // In the block, but the entry also names a namespace, which plaintext never proves.
    c.apply(
        "ALLOW",
        json!({ "ipBlocks": [legacy], "namespaces": ["default"] }),
    )?;
    c.expect_denied(&c.legacy, "not_allowed")?;
    // Meshed and in `default`, but not in the block.
    c.expect_denied(&c.inside, "not_allowed")?;
    // The block alone admits it.
    c.apply("ALLOW", json!({ "ipBlocks": [legacy] }))?;
    c.expect_allowed(&c.legacy)?;
    c.expect_denied(&c.inside, "not_allowed")
}

#[test]
fn two_pods_with_one_identity_never_share_an_hbone_connection() -> Result<()> {
    privileged!();
    let c = Cluster::with_policy(test_name!(), "ALLOW", Cluster::ip_block)?;
    let handshakes_before = c.handshakes()?;
    // A long transfer from `inside` keeps its HBONE connection open and in the pool while
    // `excepted`, with the same identity to the same destination, connects.
    let running = app::start_send_paced(
        &c.inside,
        c.to(),
        LONG_BYTES,
        c.next_seed(),
        Duration::from_secs(4),
    )?;
    assert_eventually(Duration::from_secs(10), || {
        let open = c.agent2.connections()?.active;
        ensure!(
            open.iter()
                .any(|r| r.direction == "hbone" && src_ip(r) == Some(c.inside.ip())),
            "inside's stream is not open on node 2: {open:#?}"
        );
        Ok(())
    });
    c.expect_denied(&c.excepted, "not_allowed")?;
    let report = running.finish().context("inside's transfer, allowed")?;
    ensure!(
        report.received_bytes == LONG_BYTES && report.received_sha256 == report.sent_sha256,
        "inside's transfer was not echoed intact: {report:?}"
    );
    let got = c
        .server_app
        .wait_closed_where(|closed| closed.received_sha256 == report.sent_sha256);
    ensure!(
        got.received_bytes == LONG_BYTES,
        "the server app received {} of {LONG_BYTES} bytes from inside",
        got.received_bytes
    );
    // The client's agent dialled one connection per pod, and the server's agent saw each
    // come from its own pod's address.
    let handshakes = c.handshakes()? - handshakes_before;
    ensure!(
        handshakes == 2,
        "two pods, one identity: expected 2 HBONE handshakes on node 1, saw {handshakes}"
    );
    Ok(())
}

/// The pods of these tests; fields drop in order: the app and the agents stop before the
/// nodes are torn down.
struct Cluster {
    server_app: app::Server,
    agent1: TestAgent,
    agent2: TestAgent,
    inside: TestPod,
    excepted: TestPod,
    outside: TestPod,
    batch: TestPod,
    legacy: TestPod,
    server: TestPod,
    node2: TestNode,
    _node1: TestNode,
    seed: Cell<u64>,
}

impl Cluster {
    fn new(test: &str) -> Result<Self> {
        let node1 = TestNode::new(test, 1)?;
        let node2 = TestNode::new(test, 2)?;
        node1.connect(&node2)?;
        let client = |name| node1.pod(name).service_account("client").create();
        let (inside, excepted, outside) =
            (client("inside")?, client("excepted")?, client("outside")?);
        let batch = node1.pod("batch").service_account("batch").create()?;
        let legacy = node1.pod("legacy").enrolled(false).create()?;
        let server = node2.pod("server").service_account("server").create()?;
        let agent1 = node1.start_agent()?;
        let agent2 = node2.start_agent()?;
        let server_app = app::serve(&server, PORT, Mode::Echo)?;
        Ok(Cluster {
            server_app,
            agent1,
            agent2,
            inside,
            excepted,
            outside,
            batch,
            legacy,
            server,
            node2,
            _node1: node1,
            seed: Cell::new(1),
        })
    }

    /// A source of one IP block: the smallest CIDR holding `inside` and `excepted`, with
    /// `excepted` as its except; `outside` must not be in it.
    fn ip_block(&self) -> Result<Value> {
        let (inside, excepted) = (u32::from(self.inside.ip()), u32::from(self.excepted.ip()));
        let prefix = (inside ^ excepted).leading_zeros();
        let mask = u32::MAX.checked_shl(32 - prefix).unwrap_or(0);
        let network = std::net::Ipv4Addr::from(inside & mask);
        let outside = u32::from(self.outside.ip());
        ensure!(
            outside & mask != inside & mask,
            "pod addresses do not leave `outside` ({}) out of {network}/{prefix}",
            self.outside.ip()
        );
        let block = json!({
            "cidr": format!("{network}/{prefix}"),
            "except": [format!("{}/32", self.excepted.ip())],
        });
        Ok(json!({ "ipBlocks": [block] }))
    }

    /// A cluster whose server is selected by one policy, `action` for the source that
    /// `from` gives (it may use the pods' addresses), in force before the first connection.
    fn with_policy(
        test: &str,
        action: &str,
        from: impl FnOnce(&Cluster) -> Result<Value>,
    ) -> Result<Self> {
        let c = Self::new(test)?;
        c.apply(action, from(&c)?)?;
        Ok(c)
    }

    /// Replaces the server node's policies with one, `action` for `from`, and waits until
    /// its agent applied it.
    fn apply(&self, action: &str, from: Value) -> Result<()> {
        self.node2.set_policies(json!([{
            "name": "under-test", "action": action, "rules": [{ "from": [from] }],
        }]));
        self.agent2.reload_and_wait(&self.node2)
    }

    fn to(&self) -> SocketAddr {
        SocketAddr::V4(self.server.addr(PORT))
    }

    fn next_seed(&self) -> u64 {
        self.seed.replace(self.seed.get() + 1)
    }

    /// TLS handshakes node 1's agent has completed (its HBONE pool's count).
    fn handshakes(&self) -> Result<u64> {
        let status = self.agent1.status()?;
        status["hbone_pool"]["handshakes"]
            .as_u64()
            .with_context(|| format!("no hbone_pool.handshakes in {status:#}"))
    }

    /// `from` sends BYTES to the server: the echo comes back intact, the server app received
    /// exactly those bytes, and the server's agent recorded a clean connection (see `arrival`) from
    /// `from`'s own address and identity.
    fn expect_allowed(&self, from: &TestPod) -> Result<()> {
        let seen = self.last_record_id()?;
        let report = app::send(from, self.to(), BYTES, self.next_seed())
            .with_context(|| format!("{} → server should be allowed", from.name()))?;
        ensure!(
            report.sent_bytes == BYTES
                && report.received_bytes == BYTES
                && report.received_sha256 == report.sent_sha256,
            "{} → server: echo not intact: {report:?}",
            from.name()
        );
        let got = self
            .server_app
            .wait_closed_where(|c| c.received_sha256 == report.sent_sha256);
        ensure!(
            got.received_bytes == BYTES && got.sent_bytes == BYTES,
            "{}: the server app saw {got:?}",
            from.name()
        );
        let (direction, identity) = arrival(from);
        self.agent2.expect_record("the allowed connection", |r| {
            Some(r.id) > seen
                && r.direction == direction
                && src_ip(r) == Some(from.ip())
                && r.src_identity == identity
                && r.dst == self.to().to_string()
                && r.error.is_none()
                && r.bytes_sent == BYTES
                && r.bytes_received == BYTES
        });
        Ok(())
    }

    /// `from`'s connection is reset, the server's agent records the denial with `reason`
    /// against `from`'s own address, and the server app accepted nothing meanwhile.
    fn expect_denied(&self, from: &TestPod, reason: &str) -> Result<()> {
        let seen = self.last_record_id()?;
        let accepted = self.server_app.accepted().len();
        app::expect_reset(
            app::send(from, self.to(), BYTES, self.next_seed()),
            &format!("{} → server ({reason})", from.name()),
        )?;
        let record = self.agent2.expect_record("the denial", |r| {
            Some(r.id) > seen && r.dst == self.to().to_string() && r.error.is_some()
        });
        ensure!(
            record.error.as_deref() == Some(reason)
                && record.direction == arrival(from).0
                && src_ip(&record) == Some(from.ip())
                && record.bytes_sent == 0
                && record.bytes_received == 0,
            "{}: expected a denial ({reason}) of a connection from {}, got {record:?}",
            from.name(),
            from.ip()
        );
        // The record is written after the decision, and a denied stream is never
        // connected to the app: had the app been reached, it would have said so by now.
        let now = self.server_app.accepted();
        ensure!(
            now.len() == accepted,
            "{}: the server app accepted a denied connection: {:?}",
            from.name(),
            &now[accepted..]
        );
        Ok(())
    }

    fn last_record_id(&self) -> Result<Option<u64>> {
        Ok(self.agent2.connections()?.all().map(|r| r.id).max())
    }
}

/// How `pod`'s connections reach the server's agent: meshed pods over HBONE with their
/// identity, others as plaintext (on the inbound port) with none.
fn arrival(pod: &TestPod) -> (&'static str, Option<String>) {
    if pod.enrolled() {
        ("hbone", Some(pod.spiffe_id()))
    } else {
        ("inbound", None)
    }
}

/// The IP address a record's `src` (`ip:port`) names.
fn src_ip(record: &weft_tests::ConnRecord) -> Option<std::net::Ipv4Addr> {
    record
        .src
        .parse::<SocketAddrV4>()
        .ok()
        .map(|addr| *addr.ip())
}

const PORT: u16 = 8080;
const BYTES: u64 = 64 * 1024;
const LONG_BYTES: u64 = 1 << 20;
