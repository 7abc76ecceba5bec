//! Waypoint binding, end to end on simulated nodes (issue 7, "Binding"): a node proxy
//! sends a bound service's traffic to the service's waypoint and fails closed when the
//! waypoint cannot take it; a destination node proxy admits a bound service's target port
//! only from the waypoint's identity, so a client that dials the pod directly (its node
//! does not know the binding) is refused, while the pod's other ports work as before and a
//! removed binding opens the port again.
//!
//! No waypoint process runs here: the traffic that goes through a real waypoint is the
//! waypoint's own e2e test. What these tests show is everything a node proxy decides on
//! its own.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, Result, bail, ensure};
use serde_json::json;
use weft_tests::{
    ConnRecord, Service, TestAgent, TestNode, TestPod,
    app::{self, Mode},
    assert_eventually,
    metrics::Scrape,
    privileged, test_name,
};

/// Node 1: a client pod whose node knows that service `api` is bound to waypoint `wp`
/// (which has no ready address) and that `orphan` is bound to `gone` (no such waypoint).
/// A bound port is never reached, an unbound port of the same pod still is.
#[test]
fn a_bound_service_whose_waypoint_cannot_take_it_fails_closed() -> Result<()> {
    privileged!();
    let node = TestNode::new(test_name!(), 1)?;
    let client = node.pod("client").service_account("client").create()?;
    let server = node.pod("server").service_account("server").create()?;
    add_bound_services(&node, &server);
    node.set_waypoints(json!([{ "name": "wp", "serviceAccount": "waypoint", "ips": [] }]));
    let agent = node.start_agent()?;
    let bound = app::serve(&server, PORT, Mode::Echo)?;
    let orphan = app::serve(&server, ORPHAN_PORT, Mode::Echo)?;
    let _other = app::serve(&server, OTHER_PORT, Mode::Echo)?;

    let vip = SocketAddr::from((VIP, VIP_PORT));
    let pod = sock(server.addr(PORT));
    let orphan_vip = SocketAddr::from((ORPHAN_VIP, VIP_PORT));
    for (dst, service, waypoint) in [
        (vip, "default/api", "default/wp"),
        (pod, "default/api", "default/wp"),
        (vip, "default/api", "default/wp"),
        (orphan_vip, "default/orphan", "default/gone"),
    ] {
        let record = expect_reset_by(&agent, &client, dst, "waypoint_unavailable")?;
        ensure!(
            record.direction == "outbound"
                && record.service.as_deref() == Some(service)
                && record.waypoint.as_deref() == Some(waypoint)
                && record.upstream.is_none(),
            "{dst}: the record names the service and its waypoint, and no upstream: {record:?}"
        );
    }
    // Nothing went around the waypoint to the application.
    ensure!(
        bound.accepted().is_empty() && orphan.accepted().is_empty(),
        "a bound port was reached: {:?} {:?}",
        bound.accepted(),
        orphan.accepted()
    );
    // The pod's port that no bound service targets is reached directly, as before.
    expect_echoed(&client, sock(server.addr(OTHER_PORT)))?;

    // Counted like other failures: response flag UH (no healthy upstream).
    let scrape = Scrape::parse(&agent.metrics()?);
    let flagged = scrape.sum(
        "weft_tcp_connections_closed_total",
        &[("reporter", "source"), ("response_flags", "UH")],
    );
    ensure!(flagged == 4.0, "4 connections flagged UH, got {flagged}");
    let api = scrape.sum(
        "weft_tcp_connections_closed_total",
        &[
            ("response_flags", "UH"),
            ("destination_service_name", "api"),
        ],
    );
    ensure!(api == 3.0, "3 of them to service api, got {api}");
    // In the access log, with the reason spelled out.
    let lines = agent.access_log();
    let gone = lines
        .iter()
        .find(|l| l["error"] == "waypoint_unavailable" && l["dst.addr"] == orphan_vip.to_string())
        .with_context(|| format!("no access-log line for the orphan: {lines:#?}"))?;
    let detail = gone["error_detail"].as_str().unwrap_or_default();
    ensure!(
        detail.contains("default/gone") && detail.contains("is not known"),
        "{detail}"
    );
    ensure!(gone["response_flags"] == "UH", "{gone}");
    // One warning per service and problem, not one per connection.
    let warnings = warning_lines(&agent);
    ensure!(
        warnings.len() == 2
            && warnings
                .iter()
                .any(|l| l.contains("service=default/api") && l.contains("waypoint=default/wp"))
            && warnings.iter().any(
                |l| l.contains("service=default/orphan") && l.contains("waypoint=default/gone")
            ),
        "expected one warning for api and one for orphan, got {warnings:#?}"
    );
    // The waypoint gets a ready address: the agent says so, once.
    node.set_waypoints(
        json!([{ "name": "wp", "serviceAccount": "waypoint", "ips": ["10.1.0.250"] }]),
    );
    agent.reload_and_wait(&node)?;
    assert_eventually(Duration::from_secs(10), || {
        let log = agent.log();
        let ready: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("waypoint ready again"))
            .collect();
        match ready[..] {
            [line]
                if line.contains("service=default/api") && line.contains("waypoint=default/wp") =>
            {
                Ok(())
            }
            _ => Err(format!(
                "expected one ready-again line for api, got {ready:#?}"
            )),
        }
    });
    Ok(())
}

/// With a ready waypoint, the node proxy dials the waypoint's address at 15008 (as the
/// client pod), never the bound endpoint. No waypoint runs here: what answers at the
/// waypoint's address is a plain echo server, so the TLS handshake fails, and the client
/// is reset; the point is where the proxy went.
#[test]
fn a_bound_service_is_dialled_at_its_waypoint_address() -> Result<()> {
    privileged!();
    let node = TestNode::new(test_name!(), 1)?;
    let client = node.pod("client").service_account("client").create()?;
    let server = node.pod("server").service_account("server").create()?;
    let wp = node.pod("wp").enrolled(false).create()?;
    add_bound_services(&node, &server);
    node.set_waypoints(json!([{ "name": "wp", "ips": [wp.ip().to_string()] }]));
    let agent = node.start_agent()?;
    let bound = app::serve(&server, PORT, Mode::Echo)?;
    let not_a_waypoint = app::serve(&wp, HBONE_PORT, Mode::Echo)?;

    let at_waypoint = sock(wp.addr(HBONE_PORT)).to_string();
    for (n, dst) in [SocketAddr::from((VIP, VIP_PORT)), sock(server.addr(PORT))]
        .into_iter()
        .enumerate()
    {
        let seen = agent.connections()?.all().map(|r| r.id).max();
        let result = app::send_text(&client, dst, "should not pass");
        let Err(e) = result else {
            bail!("{dst}: nothing but a waypoint can answer: {result:?}");
        };
        ensure!(app::is_reset(&e), "{dst}: the client is reset: {e:#}");
        let record = agent.expect_record("the connection to the waypoint", |r| {
            Some(r.id) > seen && r.dst == dst.to_string() && r.error.is_some()
        });
        ensure!(
            record.upstream.as_deref() == Some(at_waypoint.as_str())
                && record.waypoint.as_deref() == Some("default/wp")
                && record.service.as_deref() == Some("default/api")
                && record.dst_identity.as_deref()
                    == Some("spiffe://cluster.local/ns/default/sa/wp"),
            "{dst}: dialled the waypoint, requiring its identity: {record:?}"
        );
        let accepted = not_a_waypoint.accepted();
        ensure!(
            accepted.len() == n + 1 && accepted.iter().all(|a| a.peer.ip() == client.ip()),
            "{dst}: the waypoint's address got the connection from the client pod: {accepted:?}"
        );
    }
    ensure!(bound.accepted().is_empty(), "{:?}", bound.accepted());
    Ok(())
}

/// A node without a CA cannot prove anything to a waypoint: its bound traffic fails too,
/// and the reason says so.
#[test]
fn without_mutual_tls_a_bound_service_fails_closed() -> Result<()> {
    privileged!();
    let node = TestNode::new(test_name!(), 1)?;
    node.without_mtls();
    let client = node.pod("client").service_account("client").create()?;
    let server = node.pod("server").service_account("server").create()?;
    add_bound_services(&node, &server);
    node.set_waypoints(json!([{ "name": "wp", "ips": ["10.1.0.250"] }]));
    let agent = node.start_agent()?;
    let bound = app::serve(&server, PORT, Mode::Echo)?;
    let _other = app::serve(&server, OTHER_PORT, Mode::Echo)?;

    let vip = SocketAddr::from((VIP, VIP_PORT));
    expect_reset_by(&agent, &client, vip, "waypoint_unavailable")?;
    let lines = agent.access_log();
    let line = lines
        .iter()
        .find(|l| l["error"] == "waypoint_unavailable")
        .with_context(|| format!("no access-log line: {lines:#?}"))?;
    let detail = line["error_detail"].as_str().unwrap_or_default();
    ensure!(detail.contains("needs mutual TLS"), "{detail}");
    ensure!(bound.accepted().is_empty(), "{:?}", bound.accepted());
    // Unbound traffic stays the plaintext hop of a node without a CA.
    expect_echoed(&client, sock(server.addr(OTHER_PORT)))?;
    Ok(())
}

/// The client's node (1) does not know the binding; the server's node (2) does. The
/// client dialling the pod's bound port directly is refused by node 2 (HBONE: 401; a
/// plaintext client too, though the pod is PERMISSIVE); the pod's other port works; once
/// node 2's config drops the binding, the bound port takes the client again.
#[test]
fn the_destination_refuses_what_goes_around_the_waypoint_until_the_binding_is_gone() -> Result<()> {
    privileged!();
    let c = Cluster::new(test_name!(), true)?;
    let (client, outsider) = (&c.client, &c.outsider);

    c.expect_denied(client, PORT, "hbone")?;
    c.expect_denied(outsider, PORT, "inbound")?;
    c.expect_allowed(client, OTHER_PORT)?;
    c.expect_allowed(outsider, OTHER_PORT)?;
    ensure!(
        c.bound.accepted().is_empty(),
        "the bound port was reached: {:?}",
        c.bound.accepted()
    );
    let scrape = Scrape::parse(&c.agent2.metrics()?);
    let denied = scrape.sum(
        "weft_agent_denied_connections_total",
        &[("reason", "waypoint_bypassed")],
    );
    ensure!(
        denied == 2.0,
        "2 connections denied as waypoint_bypassed, got {denied}"
    );
    assert_eventually(Duration::from_secs(10), || {
        let log = c.agent2.log();
        log.lines()
            .any(|l| {
                l.contains("only the waypoint may connect")
                    && l.contains("default/api")
                    && l.contains("default/wp")
            })
            .then_some(())
            .ok_or("no refusal log line naming the service and the waypoint")
    });
    // The binding is visible in the destination's config dump.
    let dump = c.agent2.get_json("/config_dump")?;
    ensure!(
        dump["state"]["services"]["default/api"]["waypoint"] == "wp"
            && dump["state"]["waypoints"]["default/wp"]["serviceAccount"] == "waypoint",
        "binding not in /config_dump: {:#}",
        dump["state"]
    );

    // The binding goes away (config reload): the port is the policies' business again.
    c.node2.set_service_waypoint("default", "api", None);
    c.reload()?;
    c.expect_allowed(client, PORT)?;
    c.expect_allowed(outsider, PORT)?;
    Ok(())
}

/// A binding that appears closes the open connections that went around the waypoint (the
/// same revocation as a policy change), and refuses the next one.
#[test]
fn a_new_binding_closes_the_open_connections_around_the_waypoint() -> Result<()> {
    privileged!();
    let c = Cluster::new(test_name!(), false)?;
    let to = c.to(PORT);
    let running = app::start_send_paced(&c.client, to, 4 << 20, 1, Duration::from_secs(30))?;
    c.agent2.expect_record("the open connection", |r| {
        r.direction == "hbone" && r.dst == to.to_string()
    });
    c.node2.set_service_waypoint("default", "api", Some("wp"));
    c.reload()?;
    let result = running.finish();
    let Err(e) = result else {
        bail!("the transfer should have been cut by the new binding: {result:?}");
    };
    ensure!(app::is_reset(&e), "a revoked connection is reset: {e:#}");
    c.agent2.expect_record("the revoked connection", |r| {
        r.dst == to.to_string() && r.error.as_deref() == Some("policy_revoked")
    });
    c.expect_denied(&c.client, PORT, "hbone")?;
    Ok(())
}

/// Two nodes: on node 1 a client and a pod outside the mesh, on node 2 the server with a
/// bound port (8080, service `api` → waypoint `wp`) and an unbound one (9090). Only node
/// 2's config has the service and the waypoint.
/// Fields drop in order: apps and agents stop before the nodes are torn down.
struct Cluster {
    bound: app::Server,
    _other: app::Server,
    _agent1: TestAgent,
    agent2: TestAgent,
    client: TestPod,
    outsider: TestPod,
    server: TestPod,
    node2: TestNode,
    _node1: TestNode,
}

impl Cluster {
    fn new(test: &str, bound: bool) -> Result<Self> {
        let node1 = TestNode::new(test, 1)?;
        let node2 = TestNode::new(test, 2)?;
        node1.connect(&node2)?;
        let client = node1.pod("client").service_account("client").create()?;
        let outsider = node1.pod("outsider").enrolled(false).create()?;
        let server = node2.pod("server").service_account("server").create()?;
        node2.add_service(Service {
            name: "api".into(),
            namespace: "default".into(),
            vips: vec![VIP],
            ports: vec![(VIP_PORT, PORT)],
            endpoints: vec![server.ip()],
            waypoint: bound.then(|| "wp".into()),
        });
        node2.set_waypoints(json!([{ "name": "wp", "serviceAccount": "waypoint", "ips": [] }]));
        let agent1 = node1.start_agent()?;
        let agent2 = node2.start_agent()?;
        Ok(Cluster {
            bound: app::serve(&server, PORT, Mode::Echo)?,
            _other: app::serve(&server, OTHER_PORT, Mode::Echo)?,
            _agent1: agent1,
            agent2,
            client,
            outsider,
            server,
            node2,
            _node1: node1,
        })
    }

    /// Rewrites node 2's config and waits until its agent applied it.
    fn reload(&self) -> Result<()> {
        self.agent2.reload_and_wait(&self.node2)
    }

    fn to(&self, port: u16) -> SocketAddr {
        sock(self.server.addr(port))
    }

    fn expect_allowed(&self, from: &TestPod, port: u16) -> Result<()> {
        expect_echoed(from, self.to(port))
            .with_context(|| format!("{} → :{port} should be allowed", from.name()))
    }

    /// `from` → the server's `port` is reset, and node 2 records the refusal on its
    /// `direction` listener (`hbone` or `inbound`) as `waypoint_bypassed`.
    fn expect_denied(&self, from: &TestPod, port: u16, direction: &str) -> Result<()> {
        let record = expect_reset_by(&self.agent2, from, self.to(port), "waypoint_bypassed")
            .with_context(|| format!("{} → :{port}", from.name()))?;
        ensure!(record.direction == direction, "{record:?}");
        Ok(())
    }
}

/// The services of the single-node tests: `api` (VIP:80 → server:8080) bound to `wp`, and
/// `orphan` (ORPHAN_VIP:80 → server:7070) bound to `gone`, a waypoint nobody defines.
fn add_bound_services(node: &TestNode, server: &TestPod) {
    node.add_service(Service {
        name: "api".into(),
        namespace: "default".into(),
        vips: vec![VIP],
        ports: vec![(VIP_PORT, PORT)],
        endpoints: vec![server.ip()],
        waypoint: Some("wp".into()),
    });
    node.add_service(Service {
        name: "orphan".into(),
        namespace: "default".into(),
        vips: vec![ORPHAN_VIP],
        ports: vec![(VIP_PORT, ORPHAN_PORT)],
        endpoints: vec![server.ip()],
        waypoint: Some("gone".into()),
    });
}

/// `from` → `to` echoes its text back.
fn expect_echoed(from: &TestPod, to: SocketAddr) -> Result<()> {
    let text = format!("hello from {}", from.name());
    let report = app::send_text(from, to, &text)?;
    ensure!(
        report.reply.as_deref() == Some(text.as_str()),
        "{} → {to}: echo missing: {report:?}",
        from.name()
    );
    Ok(())
}

/// `from` → `to` fails with a reset (no data, no clean close, no hang), and `agent` has
/// recorded a connection to `to` that ended with `reason`; returns that record.
fn expect_reset_by(
    agent: &TestAgent,
    from: &TestPod,
    to: SocketAddr,
    reason: &str,
) -> Result<ConnRecord> {
    let seen = agent.connections()?.all().map(|r| r.id).max();
    match app::send_text(from, to, "should not pass") {
        Ok(report) => bail!(
            "{} → {to} should fail ({reason}), got {report:?}",
            from.name()
        ),
        Err(e) => ensure!(
            app::is_reset(&e),
            "{} → {to} must be reset: {e:#}",
            from.name()
        ),
    }
    let record = agent.expect_record(reason, |r| {
        Some(r.id) > seen && r.dst == to.to_string() && r.error.is_some()
    });
    ensure!(
        record.error.as_deref() == Some(reason),
        "{} → {to}: expected {reason}, got {record:?}",
        from.name()
    );
    Ok(record)
}

/// The agent's warnings about bound services whose waypoint is unavailable.
fn warning_lines(agent: &TestAgent) -> Vec<String> {
    agent
        .log()
        .lines()
        .filter(|l| l.contains("bound service unreachable"))
        .map(str::to_owned)
        .collect()
}

fn sock(addr: std::net::SocketAddrV4) -> SocketAddr {
    SocketAddr::V4(addr)
}

const VIP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 96, 0, 20);
const ORPHAN_VIP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 96, 0, 21);
const VIP_PORT: u16 = 80;
/// The bound service's target port.
const PORT: u16 = 8080;
/// The orphan's target port.
const ORPHAN_PORT: u16 = 7070;
/// Where waypoints take HBONE.
const HBONE_PORT: u16 = 15008;
/// A port of the server that no bound service targets.
const OTHER_PORT: u16 = 9090;
