//! The application sees its mesh client's address (issue "Data path v2", item 6). For a
//! connection that came over HBONE or node-locally, the proxy connects to the application
//! from inside the pod *as the client* (IP_TRANSPARENT), and the pod's reply routing
//! (`tcp_fwmark_accept`, a fwmark rule, `local default dev lo` in its table) brings the
//! application's answers back to the proxy. The echo coming back proves the replies reached
//! the proxy; a capture on the server pod's eth0 proves none of them left the pod; many
//! connections at once from one client prove the client-addressed connections do not
//! collide. A plaintext client is not impersonated: its own connection ends inside the pod
//! with the same address, and a second one to the same port could take the 4-tuple of its
//! next connection. Needs root; see `weft_tests::can_run_privileged`.

use std::net::{IpAddr, SocketAddr};

use anyhow::{Result, ensure};
use serde_json::json;
use weft_tests::{
    AgentCommand, ClientServer, TestAgent, TestNode, TestPod,
    app::{self, Mode},
    metrics::Scrape,
    privileged, sys, test_name,
    wire::Capture,
};

const ECHO_PORT: u16 = 7300;
const KIB: u64 = 1024;
/// Connections at once from one client: each takes a port of the client's address inside
/// the server pod.
const CONCURRENT: usize = 200;

/// One client → server echo: the server application must see `expected` as its peer, get
/// every byte and answer; the server side's record must name the client; the capture must
/// show no reply leaving the pod. Then `CONCURRENT` connections at once, each echo checked.
fn check_server_sees(n: &ClientServer, direction: &str, expected: IpAddr) -> Result<()> {
    check_sees(&n.node, &n.client, &n.server, &n.agent, direction, expected)
}

/// `check_server_sees` for any client and server of `node`.
fn check_sees(
    node: &TestNode,
    client: &TestPod,
    server: &TestPod,
    agent: &TestAgent,
    direction: &str,
    expected: IpAddr,
) -> Result<()> {
    let echo = app::serve(server, ECHO_PORT, Mode::Echo)?;
    let to: SocketAddr = server.addr(ECHO_PORT).into();
    // Every packet from the application's port that leaves the server pod.
    let leaving = Capture::on_pod(node, server, "eth0", &format!("tcp src port {ECHO_PORT}"))?;
    let sent = app::send(client, to, 64 * KIB, 7)?;
    ensure!(
        sent.received_bytes == 64 * KIB && sent.received_sha256 == sent.sent_sha256,
        "{direction}: the echo came back different: {sent:?}"
    );
    let got = echo.wait_closed_where(|c| c.received_sha256 == sent.sent_sha256);
    ensure!(
        got.peer.ip() == expected,
        "{direction}: the server application saw {} instead of {expected}",
        got.peer,
    );
    let record = agent.expect_record("the server side's record", |r| {
        r.direction == direction && r.pod == server.pod_ref() && r.bytes_received == 64 * KIB
    });
    ensure!(record.error.is_none(), "{record:?}");
    ensure!(
        record.src.parse::<SocketAddr>()?.ip() == IpAddr::V4(client.ip()),
        "{record:?}"
    );
    // On the wire, only the proxy's own socket of a plaintext connection (the one the
    // client dialled) answers from the application's port, and only to the client's
    // sockets; over HBONE and node-local nothing does.
    let leaving = leaving.stop()?;
    let to_client = leaving.tshark(0, "tcp", &["ip.dst"])?;
    let client_ip = client.ip().to_string();
    if direction == "inbound" {
        ensure!(
            !to_client.is_empty() && to_client.iter().all(|p| p[0] == client_ip),
            "{direction}: packets from the application's port left the pod to another than \
             the client: {to_client:?} ({})",
            leaving.file.display()
        );
    } else {
        ensure!(
            to_client.is_empty(),
            "{direction}: packets from the application's port left the pod: {to_client:?} ({})",
            leaving.file.display()
        );
    }
    app::conns(client, to, CONCURRENT)?;
    Ok(())
}

#[test]
fn an_hbone_client_is_seen_by_the_application() -> Result<()> {
    privileged!();
    let n = ClientServer::with(test_name!(), Some(json!({ "sameNode": "HBONE" })), true)?;
    check_server_sees(&n, "hbone", IpAddr::V4(n.client.ip()))?;
    // The pod's reply routing, as an operator sees it: in /status, and in the pod.
    ensure!(
        n.agent.keeps_client_addresses(&n.server)? == Some(true),
        "/status does not say the server pod keeps client addresses"
    );
    let netns = n.server.netns_name();
    let rules = sys::ip(&["-n", &netns, "rule", "show"])?;
    ensure!(
        rules.contains("fwmark 0x7766 lookup 30566"),
        "no reply rule in the pod: {rules}"
    );
    let table = sys::ip(&["-n", &netns, "route", "show", "table", "30566"])?;
    ensure!(
        table.contains("local default dev lo"),
        "no local route in the reply table: {table}"
    );
    Ok(())
}

#[test]
fn a_node_local_client_is_seen_by_the_application_also_after_a_restart() -> Result<()> {
    privileged!();
    let mut n = ClientServer::with(test_name!(), None, true)?;
    check_server_sees(&n, "local", IpAddr::V4(n.client.ip()))?;
    // A restarted agent finds the routing in place and keeps using it, and puts right a
    // reply table that something else overwrote (here: unreachable).
    let netns = n.server.netns_name();
    sys::ip(&[
        "-n",
        &netns,
        "route",
        "replace",
        "unreachable",
        "default",
        "table",
        "30566",
    ])?;
    n.agent.restart()?;
    check_server_sees(&n, "local", IpAddr::V4(n.client.ip()))?;
    Ok(())
}

#[test]
fn a_plaintext_client_is_not_impersonated() -> Result<()> {
    privileged!();
    let n = ClientServer::with(test_name!(), None, false)?;
    check_server_sees(&n, "inbound", IpAddr::V4(n.server.ip()))?;
    Ok(())
}

#[test]
fn without_a_writable_proc_sys_connections_work_and_status_says_the_address_is_not_kept()
-> Result<()> {
    privileged!();
    // As in a container that is not privileged: the agent cannot write the sysctl.
    let node = TestNode::new(test_name!(), 1)?;
    node.set_agent_command(AgentCommand::with_read_only_proc_sys());
    let client = node.pod("client").service_account("client").create()?;
    let server = node.pod("server").service_account("server").create()?;
    // A pod whose sysctl someone with a writable /proc/sys set first (the CNI plugin's
    // part): the agent reads it and installs the rest.
    let preset = node.pod("preset").service_account("server").create()?;
    let netns = preset.netns_name();
    sys::ip(&[
        "netns",
        "exec",
        &netns,
        "sysctl",
        "-qw",
        "net.ipv4.tcp_fwmark_accept=1",
    ])?;
    let agent = node.start_agent()?;

    ensure!(
        agent.keeps_client_addresses(&server)? == Some(false),
        "/status must say the server pod does not keep client addresses"
    );
    ensure!(
        agent
            .current_log()
            .contains("cannot route replies inside the pod"),
        "the agent did not log why"
    );
    // The server pod, and the client for the same reason; the preset pod has its routing.
    let without =
        Scrape::parse(&agent.metrics()?).sum("weft_agent_pods_without_client_address", &[]);
    ensure!(
        without == 2.0,
        "weft_agent_pods_without_client_address is {without}, not 2"
    );
    check_sees(
        &node,
        &client,
        &server,
        &agent,
        "local",
        IpAddr::V4(server.ip()),
    )?;

    ensure!(
        agent.keeps_client_addresses(&preset)? == Some(true),
        "/status must say the preset pod keeps client addresses"
    );
    check_sees(
        &node,
        &client,
        &preset,
        &agent,
        "local",
        IpAddr::V4(client.ip()),
    )?;
    Ok(())
}
