//! Hardening (issue 13): the mesh recognises a party by something it cannot forge.
//!
//! - Finding 3: plaintext into a STRICT pod's probe port, or into a port only a waypoint may
//!   reach, passes as a kubelet probe only when a process of the node itself made the
//!   connection. A client from outside the cluster that kube-proxy masqueraded to the node's
//!   address carries the same source address and must still be refused (and counted).
//!   "Outside" here is a second node's netns whose traffic node 1 forwards and masquerades
//!   (nftables, inside node 1's own netns), as kube-proxy does for NodePort traffic.
//! - Finding 11: a pod process with CAP_NET_RAW that sets the proxy's `SO_MARK` is still
//!   steered through the proxy, while the agent runs where a Kubernetes DaemonSet pod runs
//!   (inside the cgroup subtree the hooks attach to) and its own connections keep working.

use std::{
    net::{Ipv4Addr, SocketAddr},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::json;
use weft_tests::{
    ConnRecord, Service, TestAgent, TestNode, TestPod,
    app::{self, Mode, send_from_node},
    cni::{CniRuntime, show},
    metrics::Scrape,
    privileged, scaled, sys, test_name,
};

const STRICT_UID: &str = "3c1f1f0e-0d1e-4a43-9b7c-5d0c9f1e2a01";
const BOUND_UID: &str = "3c1f1f0e-0d1e-4a43-9b7c-5d0c9f1e2a02";
const PROBE_PORT: u16 = 8081;
const APP_PORT: u16 = 8080;
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
/// The agent's default `agent.proxyMark` (docs/config.md).
const PROXY_MARK: u32 = 0x7765;

/// Node 1 runs a STRICT pod and a PERMISSIVE pod whose probe port is the target of service
/// `api`, bound to waypoint `wp`. The "kubelet" (a process of node 1, in its host cgroup)
/// reaches both probe ports in plaintext; a client on node 2, masqueraded by node 1 to node
/// 1's own bridge address, reaches neither: STRICT refuses it on one, the waypoint gate on
/// the other, and both refusals are counted.
#[test]
fn a_masqueraded_client_is_no_kubelet_probe_but_the_nodes_own_probe_is() -> Result<()> {
    privileged!();
    ensure!(
        sys::on_path("nft"),
        "`nft` is not installed (the test masquerades like kube-proxy); run `cargo xtask setup`"
    );
    let node = TestNode::new(test_name!(), 1)?;
    let outside = TestNode::new(test_name!(), 2)?;
    node.connect(&outside)?;
    let strict = node
        .pod("strict")
        .service_account("server")
        .pod_uid(STRICT_UID)
        .mtls_mode("STRICT")
        .probe_ports(&[PROBE_PORT])
        .create()?;
    let bound = node
        .pod("bound")
        .service_account("api")
        .pod_uid(BOUND_UID)
        .mtls_mode("PERMISSIVE")
        .probe_ports(&[PROBE_PORT])
        .create()?;
    node.add_service(Service {
        name: "api".into(),
        namespace: "default".into(),
        vips: vec![VIP],
        ports: vec![(80, PROBE_PORT)],
        endpoints: vec![bound.ip()],
        waypoint: Some("wp".into()),
    });
    node.set_waypoints(json!([{ "name": "wp", "serviceAccount": "waypoint", "ips": [] }]));
    let runtime = CniRuntime::install(&node)?;
    let agent = node.start_agent()?;
    let _servers = [
        app::serve(&strict, PROBE_PORT, Mode::Echo)?,
        app::serve(&strict, APP_PORT, Mode::Echo)?,
        app::serve(&bound, PROBE_PORT, Mode::Echo)?,
    ];
    for (pod, uid) in [(&strict, STRICT_UID), (&bound, BOUND_UID)] {
        let add = runtime.call("ADD", pod, "default", uid)?;
        ensure!(add.status.success(), "ADD {}: {}", pod.name(), show(&add));
    }
    masquerade_forwarded_traffic(&node, &outside)?;

    let node_addr = node.bridge_ip().to_string();
    for (pod, refusal) in [
        (&strict, "plaintext_refused_strict"),
        (&bound, "waypoint_bypassed"),
    ] {
        let to = SocketAddr::from(pod.addr(PROBE_PORT));
        // The kubelet's probe: made by a socket of the node itself.
        let probe = send_from_node(&node, to)?;
        ensure!(
            probe.is_ok(),
            "{to}: the node's own probe refused: {probe:?}"
        );
        let record = agent.expect_record("the probe", |r| {
            r.direction == "inbound" && r.dst == to.to_string() && r.error.is_none()
        });
        ensure!(
            record.src.starts_with(&format!("{node_addr}:")),
            "{to}: the probe comes from the node's address: {record:?}"
        );

        // The masqueraded client: same source address, not made by the node.
        let seen = newest_id(&agent)?;
        let masqueraded = send_from_node(&outside, to)?;
        ensure!(
            masqueraded.is_err(),
            "{to}: a client masqueraded to the node's address got in as a kubelet probe: \
             {masqueraded:?}"
        );
        let record = agent.expect_record("the masqueraded connection", |r| {
            Some(r.id) > seen && r.dst == to.to_string() && r.error.is_some()
        });
        ensure!(
            record.src.starts_with(&format!("{node_addr}:"))
                && record.error.as_deref() == Some(refusal),
            "{to}: masqueraded to {node_addr} and refused as {refusal}: {record:?}"
        );
    }
    // The node's other ports stay closed to the node itself (STRICT).
    let other = send_from_node(&node, strict.addr(APP_PORT).into())?;
    ensure!(
        other.is_err(),
        "the node got into a non-probe port: {other:?}"
    );

    let recorded = ebpf_events(&agent, "host_conn_recorded")?;
    ensure!(
        recorded >= 2.0,
        "the node's probes were recorded: {recorded}"
    );
    let scrape = Scrape::parse(&agent.metrics()?);
    for (reason, expected) in [
        ("plaintext_refused_strict", 2.0),
        ("waypoint_bypassed", 1.0),
    ] {
        let counted = scrape.sum("weft_agent_denied_connections_total", &[("reason", reason)]);
        ensure!(
            counted == expected,
            "{reason}: {expected} refusals counted, got {counted}"
        );
    }
    Ok(())
}

/// A client pod sets `SO_MARK` to the proxy's mark (it has CAP_NET_RAW) and connects to a
/// server pod: the connection still goes through the proxy (an outbound record, HBONE into
/// the server with the client's identity, and a `connect_redirected` count). The agent runs
/// under the hooks, as in Kubernetes, and its own connections (HBONE, delivery into the
/// server) still work, so nothing steers the proxy back into itself.
#[test]
fn a_pod_that_sets_the_proxys_mark_is_still_steered() -> Result<()> {
    privileged!();
    let node = TestNode::new(test_name!(), 1)?;
    node.run_agent_under_hooks();
    let client = node.pod("client").service_account("client").create()?;
    let server = node.pod("server").service_account("server").create()?;
    let agent = node.start_agent()?;
    let _echo = app::serve(&server, APP_PORT, Mode::Echo)?;
    let to = SocketAddr::from(server.addr(APP_PORT));

    // The proxy's own connections, with the agent under the hooks: an ordinary connection
    // crosses it end to end.
    let report = app::send_text(&client, to, "unmarked")?;
    ensure!(
        report.reply.as_deref() == Some("unmarked"),
        "an unmarked connection through the proxy: {report:?}"
    );

    let redirected = |agent: &TestAgent| ebpf_events(agent, "connect_redirected");
    let before = redirected(&agent)?;
    let local = send_marked(&client, to, "marked")?;
    let record = agent.expect_record("the marked connection, outbound", |r| {
        r.direction == "outbound" && r.src == local.to_string()
    });
    ensure!(
        record.dst == to.to_string() && record.error.is_none(),
        "the marked connection was proxied to its destination: {record:?}"
    );
    agent.expect_record("the marked connection, into the server (node-local)", |r| {
        r.direction == "local"
            && r.pod == server.pod_ref()
            && r.src_identity.as_deref() == Some("spiffe://cluster.local/ns/default/sa/client")
            && r.bytes_sent >= "marked".len() as u64
    });
    let after = redirected(&agent)?;
    ensure!(
        after > before,
        "connect_redirected did not move for the marked connect ({before} → {after})"
    );
    // The hooks saw the agent's own upstream sockets, and recognised them by their cookies.
    let own = ebpf_events(&agent, "connect_proxy_socket")?;
    ensure!(own > 0.0, "no proxy socket recognised under the hooks");
    Ok(())
}

/// Node 1 masquerades what it forwards from `outside` into its pods to its bridge address,
/// as kube-proxy does for NodePort and LoadBalancer traffic. The rule lives in node 1's
/// netns and goes with it.
fn masquerade_forwarded_traffic(node: &TestNode, outside: &TestNode) -> Result<()> {
    let rules = format!(
        "add table ip weft_test; \
         add chain ip weft_test post {{ type nat hook postrouting priority 100; }}; \
         add rule ip weft_test post ip saddr 10.255.0.{}/32 oifname \"br0\" masquerade",
        outside.index()
    );
    let out = Command::new("nsenter")
        .arg(format!("--net={}", node.netns_path().display()))
        .args(["nft", &rules])
        .output()
        .context("run nft")?;
    ensure!(out.status.success(), "nft: {}", show(&out));
    Ok(())
}

/// From `pod`, with `SO_MARK` set to the proxy's mark: connect to `to`, send `text`,
/// half-close and expect it echoed. Returns the client's local address.
fn send_marked(pod: &TestPod, to: SocketAddr, text: &str) -> Result<SocketAddr> {
    let mut cmd = Command::new("python3");
    cmd.args([
        "-c",
        MARKED_SEND_PY,
        &to.ip().to_string(),
        &to.port().to_string(),
        &PROXY_MARK.to_string(),
        text,
    ]);
    let done = pod.run(cmd, "marked", scaled(Duration::from_secs(30)))?;
    let output = &done.output;
    if !done.status.success() {
        bail!("the marked send failed ({}):\n{output}", done.status);
    }
    ensure!(
        output.lines().any(|l| l == format!("reply {text}")),
        "no echo of the marked send:\n{output}"
    );
    output
        .lines()
        .find_map(|l| l.strip_prefix("local "))
        .context("no `local` line")?
        .parse()
        .context("local address")
}

/// The agent's `agent_ebpf_events` counter for `event` (a `Stats` field).
fn ebpf_events(agent: &TestAgent, event: &str) -> Result<f64> {
    let scrape = Scrape::parse(&agent.metrics()?);
    Ok(scrape.sum("weft_agent_ebpf_events_total", &[("event", event)]))
}

/// The id of the newest record, if any.
fn newest_id(agent: &TestAgent) -> Result<Option<u64>> {
    Ok(agent.connections()?.all().map(|r: &ConnRecord| r.id).max())
}

/// `python3 -c MARKED_SEND_PY <ip> <port> <mark> <text>`. SO_MARK needs CAP_NET_RAW or
/// CAP_NET_ADMIN, which the test's root process has.
const MARKED_SEND_PY: &str = r#"
import socket, sys
ip, port, mark, text = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, 36, mark)  # SO_MARK
s.settimeout(20)
s.connect((ip, port))
print("local %s:%d" % s.getsockname(), flush=True)
s.sendall(text.encode())
s.shutdown(socket.SHUT_WR)
reply = b""
while True:
    chunk = s.recv(4096)
    if not chunk:
        break
    reply += chunk
print("reply " + reply.decode(), flush=True)
"#;
