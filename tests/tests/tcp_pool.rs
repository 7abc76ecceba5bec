//! The node proxy's L4 circuit breaking (issue "Resilience and end-user auth at the
//! waypoint", item 1): a TrafficPolicy's `connectionPool.maxConnections` for a plain TCP
//! Service bound to no waypoint caps the connections each node's pods have open to it. A
//! client pod on node 1 calls the Service `echo`, whose backend runs on node 2 and keeps
//! every connection open until the client closes it. What the client kept, what the
//! backend accepted and received (at most how many at once), and what node 1's proxy
//! counted are asserted.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use weft_tests::{
    Service, TestAgent, TestNode, TestPod,
    app::{self, Mode},
    eventually,
    metrics::Scrape,
    privileged, scaled, test_name,
};

/// Node 1: the client. Node 2: the echo backend. Fields drop in order: processes first,
/// then agents, then the nodes.
struct Mesh {
    backend: app::Server,
    agent: TestAgent,
    _agent2: TestAgent,
    client: TestPod,
    _server: TestPod,
    node1: TestNode,
    _node2: TestNode,
}

impl Mesh {
    fn new(test: &str) -> Result<Self> {
        let node1 = TestNode::new(test, 1)?;
        let node2 = TestNode::new(test, 2)?;
        node1.connect(&node2)?;
        let client = node1.pod("client").service_account("client").create()?;
        let server = node2.pod("server").service_account("echo").create()?;
        for node in [&node1, &node2] {
            node.add_service(Service {
                name: SERVICE.into(),
                namespace: "default".into(),
                vips: vec![std::net::Ipv4Addr::new(10, 96, 0, 40)],
                ports: vec![(PORT, APP_PORT)],
                endpoints: vec![server.ip()],
                waypoint: None,
            });
            node.set_traffic_policies(json!([pool_policy(MAX_CONNECTIONS)]));
        }
        let agent = node1.start_agent()?;
        let agent2 = node2.start_agent()?;
        let backend = app::serve(&server, APP_PORT, Mode::Echo)?;
        Ok(Mesh {
            backend,
            agent,
            _agent2: agent2,
            client,
            _server: server,
            node1,
            _node2: node2,
        })
    }

    /// Node 1's `name` series for the `echo` Service (0 when absent).
    fn metric(&self, name: &str) -> Result<f64> {
        let scrape = Scrape::parse(&self.agent.metrics()?);
        Ok(scrape.sum(name, &[("destination_service_name", SERVICE)]))
    }

    /// Waits until node 1's proxy holds `open` connections to `echo` under its limit.
    fn wait_pool(&self, open: f64) -> Result<()> {
        eventually(Duration::from_secs(20), || {
            let now = self.metric("weft_tcp_pool_connections")?;
            ensure!(now == open, "{now} connections counted, waiting for {open}");
            Ok(())
        })
    }
}

#[test]
fn a_pool_of_10_resets_40_of_50_concurrent_connections_and_the_backend_sees_10() -> Result<()> {
    privileged!();
    let mesh = Mesh::new(test_name!())?;
    mesh.wait_pool(0.0)?;
    let payload = b"hello from a client";
    let mut hold = app::hold(&mesh.client, vip(), 50, settle(), Some(50), payload)?;
    let (open, closed) = app::held(&hold)?;
    ensure!(
        (open, closed) == (10, 40),
        "the client keeps 10 connections, 40 are closed by the proxy: open={open} closed={closed}"
    );
    mesh.wait_pool(10.0)?;
    ensure!(
        mesh.metric("weft_tcp_overflows_total")? == 40.0,
        "40 overflows counted"
    );
    // The backend has the 10, and nothing of the others: they were never dialled.
    let accepted = mesh.backend.wait_accepted(10);
    ensure!(
        accepted.len() == 10,
        "the backend accepted exactly 10: {accepted:?}"
    );
    let records = mesh.agent.connections()?;
    let refused: Vec<_> = records
        .all()
        .filter(|r| r.error.as_deref() == Some("overflow"))
        .collect();
    ensure!(
        refused.len() == 40 && refused.iter().all(|r| r.bytes_sent == 0),
        "40 records closed as overflow, no byte sent on: {refused:?}"
    );
    let lines: Vec<_> = mesh
        .agent
        .access_log()
        .into_iter()
        .filter(|l| l["response_flags"] == "UO")
        .collect();
    ensure!(
        lines.len() == 40
            && lines
                .iter()
                .all(|l| l["error"] == "overflow" && l["dst.service"] == "default/echo"),
        "each refusal has its access-log line with flag UO: {lines:?}"
    );
    let uo = [("response_flags", "UO"), ("reporter", "source")];
    let closed_uo =
        Scrape::parse(&mesh.agent.metrics()?).sum("weft_tcp_connections_closed_total", &uo);
    ensure!(closed_uo == 40.0, "40 closes with flag UO, got {closed_uo}");
    let warnings = mesh
        .agent
        .log()
        .lines()
        .filter(|l| l.contains("connection pool is full"))
        .count();
    ensure!(warnings == 1, "one warning for the burst, got {warnings}");
    let per_connection = mesh
        .agent
        .log()
        .lines()
        .filter(|l| l.contains("connection failed") && l.contains("overflow"))
        .count();
    ensure!(
        per_connection == 0,
        "no log line per refused connection, got {per_connection}"
    );

    // The client closes its 10: the backend saw the payload of those 10 only, never more
    // than 10 at once, and the places come back.
    hold.kill();
    let closed = eventually(Duration::from_secs(20), || {
        let closed = mesh.backend.closed();
        ensure!(closed.len() == 10, "{} of 10 closed", closed.len());
        Ok(closed)
    })?;
    let received: u64 = closed.iter().map(|c| c.received_bytes).sum();
    ensure!(
        received == 10 * payload.len() as u64,
        "only the admitted connections' bytes reached the backend: {closed:?}"
    );
    let peak = peak_concurrency(&mesh.backend.process.output());
    ensure!(
        peak == 10,
        "the backend held at most 10 at once, peak {peak}"
    );
    mesh.wait_pool(0.0)?;
    app::conns(&mesh.client, vip(), MAX_CONNECTIONS)
        .context("a full pool of new connections succeeds after the held ones closed")?;
    mesh.wait_pool(0.0)?;
    ensure!(
        mesh.metric("weft_tcp_overflows_total")? == 40.0,
        "no new overflow"
    );
    Ok(())
}

#[test]
fn connect_close_cycles_leave_no_place_held_and_a_policy_change_applies_to_new_connections()
-> Result<()> {
    privileged!();
    let mesh = Mesh::new(test_name!())?;
    mesh.wait_pool(0.0)?;
    // A hostile client: connect, write, close at once, in a tight loop; and honest short
    // connections after one another.
    let hammered = app::hammer(
        &mesh.client,
        vip(),
        1_000,
        scaled(Duration::from_secs(5)),
        b"x",
    )?;
    ensure!(hammered.connected > 0, "{hammered:?}");
    // The proxy gives a place back once it has seen the close: not before the client's
    // next connect, so the hammer may overflow the pool itself, and the honest client
    // waits for the count to settle.
    mesh.wait_pool(0.0)?;
    app::churn(&mesh.client, vip(), 100)?;
    mesh.wait_pool(0.0)?;
    println!(
        "hammer: {hammered:?}; overflows counted {}",
        mesh.metric("weft_tcp_overflows_total")?
    );
    // Every place came back: the full pool at once still works.
    app::conns(&mesh.client, vip(), MAX_CONNECTIONS)?;
    mesh.wait_pool(0.0)?;

    // Lowered to 3 while 10 are held: they stay, and new connections wait for room.
    let mut hold = app::hold(&mesh.client, vip(), 10, settle(), Some(10), b"")?;
    ensure!(
        app::held(&hold)? == (10, 0),
        "10 held under the first limit"
    );
    let overflows = mesh.metric("weft_tcp_overflows_total")?;
    mesh.node1.set_traffic_policies(json!([pool_policy(3)]));
    mesh.agent.reload_and_wait(&mesh.node1)?;
    mesh.wait_pool(10.0)?;
    let refused = app::send(&mesh.client, vip(), 10, 1);
    app::expect_reset(refused, "a connection over the lowered limit")?;
    ensure!(mesh.metric("weft_tcp_overflows_total")? == overflows + 1.0);
    hold.kill();
    mesh.wait_pool(0.0)?;
    app::conns(&mesh.client, vip(), 3)?;
    mesh.wait_pool(0.0)?;
    Ok(())
}

/// The most connections a `serve` held at once, from its `accepted` and `closed` lines in
/// the order it printed them.
fn peak_concurrency(output: &str) -> i64 {
    let (mut now, mut peak) = (0i64, 0i64);
    for line in output.lines() {
        if line.starts_with("accepted ") {
            now += 1;
            peak = peak.max(now);
        } else if line.starts_with("closed ") {
            now -= 1;
        }
    }
    peak
}

/// A TrafficPolicy limiting `echo` to `max` connections per node.
fn pool_policy(max: usize) -> Value {
    json!({
        "apiVersion": "weft.dev/v1alpha1", "kind": "TrafficPolicy",
        "metadata": { "name": "echo-pool", "namespace": "default" },
        "spec": {
            "targetRefs": [{ "group": "", "kind": "Service", "name": SERVICE }],
            "connectionPool": { "maxConnections": max },
        },
    })
}

/// How long `hold` waits before it looks which connections the proxy closed.
fn settle() -> Duration {
    scaled(Duration::from_secs(2))
}

fn vip() -> SocketAddr {
    SocketAddr::from(([10, 96, 0, 40], PORT))
}

const SERVICE: &str = "echo";
const MAX_CONNECTIONS: usize = 10;
const PORT: u16 = 80;
const APP_PORT: u16 = 8080;
