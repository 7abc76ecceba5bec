//! The node data path, end to end (issue "Node data path"): enrolled pods' connections go
//! through the node proxy (outbound via connect4 → 15001; inbound from an enrolled pod of
//! the node joined inside the proxy, or in plaintext via sk_lookup → 15006 from any other
//! pod) with their bytes
//! intact; unenrolled pods are left alone; the path fails closed when
//! the agent dies and comes back when it restarts; enrollment changes and bad configs are
//! handled at reload.
//!
//! Each test builds its own simulated node (netns + bridge + cgroup + pin root) and runs the
//! real agent on it, so the tests run in parallel. Every test checks two independent views:
//! what the applications received (sha256 computed by sender and receiver), and what the
//! proxy recorded (`/debug/connections`). Needs root; see `weft_tests::can_run_privileged`.

use std::{
    collections::HashSet,
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use serde::Deserialize;
use serde_json::Value;
use weft_tests::{
    ConnRecord, Service, TestAgent, TestNode, TestPod,
    app::{self, Connect, Mode},
    assert_eventually, bpf, eventually, privileged, scaled, test_name,
    wire::Capture,
};

/// `agent.workerThreads` sizes the runtime that runs the proxy: the agent says how many
/// workers it runs, and one carries a transfer whole.
#[test]
fn the_proxy_runs_on_the_worker_threads_it_is_given() -> Result<()> {
    privileged!();
    let node = TestNode::new(test_name!(), 1)?;
    node.set_agent_setting("workerThreads", 1.into());
    let client = node.pod("client").service_account("client").create()?;
    let server = node.pod("server").service_account("server").create()?;
    let agent = node.start_agent()?;
    let _echo = app::serve(&server, ECHO_PORT, Mode::Echo)?;
    assert_eq!(agent.status()?["worker_threads"], 1);
    let sent = app::send(&client, sock(server.addr(ECHO_PORT)), 1 << 20, 1)?;
    assert_echoed(&sent, 1 << 20);
    Ok(())
}

#[test]
fn enrolled_pod_to_pod_goes_through_proxy_with_payload_intact() -> Result<()> {
    privileged!();
    let node = TestNode::new(test_name!(), 1)?;
    let client = node.pod("client").service_account("client").create()?;
    let server = node.pod("server").service_account("server").create()?;
    let agent = node.start_agent()?;
    let echo = app::serve(&server, ECHO_PORT, Mode::Echo)?;
    let hash = app::serve(&server, HASH_PORT, Mode::Hash)?;

    for (i, &size) in SIZES.iter().enumerate() {
        // Echo: the payload crosses both proxies twice, and each side hashes what it got.
        let to = sock(server.addr(ECHO_PORT));
        let sent = app::send(&client, to, size, 10 + i as u64)?;
        assert_echoed(&sent, size);
        let got = echo.wait_closed_where(|c| c.received_sha256 == sent.sent_sha256);
        assert_eq!(
            got.received_bytes, size,
            "server app received the whole payload"
        );
        agent.expect_record("outbound echo", |r| {
            is(r, "outbound", &client, to) && r.bytes_sent == size && r.bytes_received == size
        });
        // Both pods are in the mesh and on this node: the proxy joins them itself
        // (node-local, `mesh.sameNode: LOCAL`), and the server side keeps its record.
        agent.expect_record("node-local inbound echo", |r| {
            is(r, "local", &server, to) && r.bytes_sent == size && r.bytes_received == size
        });

        // Hash: the server answers only after the client's FIN crossed both proxies.
        let to = sock(server.addr(HASH_PORT));
        let sent = app::send(&client, to, size, 20 + i as u64)?;
        let expected = format!("bytes={size} sha256={} ", sent.sent_sha256);
        let reply = sent.reply.clone().unwrap_or_default();
        assert!(
            reply.starts_with(&expected),
            "hash server saw something else than the client sent ({size} bytes): \
             reply {reply:?}, expected it to start with {expected:?}"
        );
        hash.wait_closed_where(|c| c.received_sha256 == sent.sent_sha256);
        agent.expect_record("outbound hash", |r| {
            is(r, "outbound", &client, to)
                && r.bytes_sent == size
                && r.bytes_received == sent.received_bytes
        });
    }
    Ok(())
}

#[test]
fn enrolled_pod_to_service_vip_goes_through_proxy() -> Result<()> {
    privileged!();
    let node = TestNode::new(test_name!(), 1)?;
    let client = node.pod("client").service_account("client").create()?;
    let server = node.pod("server").service_account("server").create()?;
    node.add_service(Service {
        name: "echo".into(),
        namespace: "default".into(),
        vips: vec![VIP],
        ports: vec![(VIP_PORT, ECHO_PORT)],
        endpoints: vec![server.ip()],
        waypoint: None,
    });
    let agent = node.start_agent()?;
    let echo = app::serve(&server, ECHO_PORT, Mode::Echo)?;
    let vip = SocketAddr::from((VIP, VIP_PORT));

    let sent = app::send(&client, vip, 64 * KIB, 7)?;
    assert_echoed(&sent, 64 * KIB);
    echo.wait_closed_where(|c| c.received_sha256 == sent.sent_sha256);
    let record = agent.expect_record("outbound to the VIP", |r| {
        is(r, "outbound", &client, vip) && r.bytes_sent == 64 * KIB
    });
    assert_eq!(
        record.upstream.as_deref(),
        Some(server.addr(ECHO_PORT).to_string().as_str()),
        "the proxy resolved the VIP to the endpoint at targetPort: {record:?}"
    );
    assert_eq!(
        record.service.as_deref(),
        Some("default/echo"),
        "{record:?}"
    );

    // 200 connections in flight at once, each with its own payload, each echo checked.
    app::conns(&client, vip, CONCURRENT)?;
    assert_eventually(Duration::from_secs(20), || {
        let records = agent.connections().map_err(|e| e.to_string())?;
        let done: Vec<&ConnRecord> = records
            .recent
            .iter()
            .filter(|r| is(r, "outbound", &client, vip) && r.bytes_sent > 0)
            .collect();
        let failed: Vec<&&ConnRecord> = done.iter().filter(|r| r.error.is_some()).collect();
        if !failed.is_empty() {
            return Err(format!("proxy recorded errors: {failed:?}"));
        }
        // +1: the 64 KiB transfer above.
        if done.len() < CONCURRENT + 1 {
            return Err(format!(
                "{} of {} VIP connections recorded",
                done.len(),
                CONCURRENT + 1
            ));
        }
        Ok(())
    });
    Ok(())
}

#[test]
fn unenrolled_pod_traffic_does_not_touch_proxy() -> Result<()> {
    privileged!();
    let node = TestNode::new(test_name!(), 1)?;
    let client = node.pod("client").service_account("client").create()?;
    let legacy = node.pod("legacy").enrolled(false).create()?;
    let other = node.pod("other").enrolled(false).create()?;
    let agent = node.start_agent()?;
    let echo = app::serve(&other, ECHO_PORT, Mode::Echo)?;
    let to = sock(other.addr(ECHO_PORT));

    // Unenrolled → unenrolled: direct. The app's socket really is connected to the peer.
    let sent = app::send(&legacy, to, 64 * KIB, 3)?;
    assert_echoed(&sent, 64 * KIB);
    assert_eq!(
        sent.peer, to,
        "unenrolled app is connected to its destination directly"
    );
    assert_eq!(sent.local, sock(legacy.addr(sent.local.port())));
    let got = echo.wait_closed_where(|c| c.received_sha256 == sent.sent_sha256);
    assert_eq!(
        got.peer, sent.local,
        "server sees the client's own address and port"
    );

    // Outside the mesh the bytes cross the wire as they are, and a capture sees them: the
    // mirror image of the mTLS tests' "no plaintext on the wire", and a check that the
    // capture helper really captures (on the node's bridge and in the pod).
    let filter = format!("tcp port {ECHO_PORT}");
    let on_bridge = Capture::on_node(&node, "br0", &filter)?;
    let in_pod = Capture::on_pod(&node, &legacy, "eth0", &filter)?;
    let marker = format!("weft-plaintext-marker-{}", std::process::id());
    let sent = app::send_text(&legacy, to, &marker)?;
    assert_eq!(sent.reply.as_deref(), Some(marker.as_str()), "echoed");
    for pcap in [on_bridge.stop()?, in_pod.stop()?] {
        assert!(
            pcap.contains(marker.as_bytes()),
            "{} ({} packets) lacks the plaintext marker",
            pcap.file.display(),
            pcap.packet_count()
        );
    }

    // Contrast, and a marker that the proxy is recording: enrolled → unenrolled is
    // proxied outbound (passthrough), with no inbound side.
    let sent_enrolled = app::send(&client, to, KIB, 4)?;
    assert_echoed(&sent_enrolled, KIB);
    agent.expect_record("enrolled client's outbound", |r| {
        is(r, "outbound", &client, to)
    });

    let records = agent.connections()?;
    let touching: Vec<&ConnRecord> = records
        .all()
        .filter(|r| r.pod == legacy.pod_ref() || r.pod == other.pod_ref())
        .collect();
    assert!(
        touching.is_empty(),
        "the proxy handled unenrolled pods' traffic: {touching:?}"
    );
    let legacy_src: Vec<&ConnRecord> = records
        .all()
        .filter(|r| r.src.starts_with(&format!("{}:", legacy.ip())))
        .collect();
    assert!(
        legacy_src.is_empty(),
        "records from the unenrolled pod: {legacy_src:?}"
    );
    Ok(())
}

#[test]
fn unenrolled_pod_to_enrolled_pod_arrives_through_inbound_proxy() -> Result<()> {
    privileged!();
    let node = TestNode::new(test_name!(), 1)?;
    let legacy = node.pod("legacy").enrolled(false).create()?;
    let server = node.pod("server").service_account("server").create()?;
    let agent = node.start_agent()?;
    let echo = app::serve(&server, ECHO_PORT, Mode::Echo)?;
    let to = sock(server.addr(ECHO_PORT));

    let sent = app::send(&legacy, to, 64 * KIB, 5)?;
    assert_echoed(&sent, 64 * KIB);
    let got = echo.wait_closed_where(|c| c.received_sha256 == sent.sent_sha256);
    assert_eq!(got.received_bytes, 64 * KIB);
    let record = agent.expect_record("inbound via 15006", |r| {
        is(r, "inbound", &server, to) && r.bytes_sent == 64 * KIB && r.bytes_received == 64 * KIB
    });
    assert_eq!(record.error, None);
    let outbound = agent
        .connections()?
        .all()
        .filter(|r| r.direction == "outbound")
        .count();
    assert_eq!(outbound, 0, "an unenrolled client has no outbound side");
    Ok(())
}

#[test]
fn agent_killed_fails_closed_and_restart_recovers() -> Result<()> {
    privileged!();
    let node = TestNode::new(test_name!(), 1)?;
    let client = node.pod("client").service_account("client").create()?;
    let server = node.pod("server").service_account("server").create()?;
    let legacy = node.pod("legacy").enrolled(false).create()?;
    let mut agent = node.start_agent()?;
    let echo = app::serve(&server, ECHO_PORT, Mode::Echo)?;
    let _legacy_echo = app::serve(&legacy, ECHO_PORT, Mode::Echo)?;
    let to_server = sock(server.addr(ECHO_PORT));
    let to_legacy = sock(legacy.addr(ECHO_PORT));
    assert_echoed(&app::send(&client, to_server, KIB, 1)?, KIB);
    assert_echoed(&app::send(&legacy, to_server, KIB, 2)?, KIB);
    assert_attachments(&node, &[&client, &server], &[&legacy])?;

    agent.kill();

    // Outbound from an enrolled pod: connect4 still steers to 15001, which is gone.
    for to in [to_server, to_legacy] {
        let outcome = app::connect(&client, to, scaled(Duration::from_secs(2)))?;
        assert_eq!(
            outcome,
            Connect::Failed("ConnectionRefused".into()),
            "enrolled client → {to} with the agent dead must be refused, never sent direct"
        );
    }
    // Inbound to an enrolled pod: sk_lookup finds no 15006 socket and returns SK_DROP. The
    // connection must fail and must not reach the application around the proxy. (For TCP
    // the kernel answers an SK_DROP verdict with a RST, so "refused" is what the client
    // sees; a timeout would do as well.)
    let accepted_before = echo.accepted().len();
    let outcome = app::connect(&legacy, to_server, scaled(Duration::from_secs(2)))?;
    assert!(
        matches!(&outcome, Connect::Failed(kind) if kind == "ConnectionRefused" || kind == "TimedOut"),
        "unenrolled client → enrolled pod with the agent dead must fail, got {outcome:?}"
    );
    let accepted = echo.accepted();
    assert_eq!(
        accepted.len(),
        accepted_before,
        "the application accepted a connection while the proxy was down (plaintext \
         bypass): {:?}",
        &accepted[accepted_before.min(accepted.len())..]
    );
    // Unenrolled pods among themselves are not affected.
    let outcome = app::connect(&legacy, to_legacy, scaled(Duration::from_secs(2)))?;
    assert_eq!(
        outcome,
        Connect::Connected,
        "legacy → legacy with the agent dead"
    );

    agent.restart()?;
    let sent = assert_eventually(Duration::from_secs(15), || {
        app::send(&client, to_server, KIB, 3)
    });
    assert_echoed(&sent, KIB);
    let sent = app::send(&legacy, to_server, KIB, 4)?;
    assert_echoed(&sent, KIB);
    // Counted once more, after the restart: a bypass during the outage that was accepted
    // late (after the check above) would make one too many.
    let accepted = echo.wait_accepted(accepted_before + 2);
    assert_eq!(
        accepted.len(),
        accepted_before + 2,
        "the application accepted a connection while the proxy was down: {:?}",
        &accepted[accepted_before..]
    );
    agent.expect_record("outbound after restart", |r| {
        is(r, "outbound", &client, to_server)
    });
    agent.expect_record("inbound after restart", |r| {
        is(r, "inbound", &server, to_server) && r.bytes_sent == KIB
    });
    // Re-adopting pinned state must not stack a second copy of any program.
    assert_attachments(&node, &[&client, &server], &[&legacy])?;
    Ok(())
}

#[test]
fn unenrolling_pods_restores_direct_traffic() -> Result<()> {
    privileged!();
    let node = TestNode::new(test_name!(), 1)?;
    let client = node.pod("client").service_account("client").create()?;
    let server = node.pod("server").service_account("server").create()?;
    let agent = node.start_agent()?;
    let echo = app::serve(&server, ECHO_PORT, Mode::Echo)?;
    let to = sock(server.addr(ECHO_PORT));
    assert_echoed(&app::send(&client, to, KIB, 1)?, KIB);
    agent.expect_record("outbound while enrolled", |r| {
        is(r, "outbound", &client, to)
    });
    agent.expect_record("node-local inbound while enrolled", |r| {
        is(r, "local", &server, to)
    });

    client.set_enrolled(false);
    server.set_enrolled(false);
    agent.reload(&node)?;
    // The kernel's view: both pods leave the pod map and lose their sk_lookup link.
    let pods_map = node.pin_root().join("PODS");
    assert_eventually(Duration::from_secs(15), || -> Result<()> {
        let entries = bpf::map_dump(&pods_map)?;
        ensure!(
            entries.is_empty(),
            "PODS still has {} entries: {entries:?}",
            entries.len()
        );
        for pod in [&client, &server] {
            let links = bpf::sk_lookup_links_in(&pod.netns_path())?;
            ensure!(
                links.is_empty(),
                "{} still has sk_lookup links {links:?}",
                pod.name()
            );
        }
        Ok(())
    });

    let before = record_ids(&agent)?;
    let sent = app::send(&client, to, 64 * KIB, 2)?;
    assert_echoed(&sent, 64 * KIB);
    assert_eq!(
        sent.peer, to,
        "the app is connected to the server directly again"
    );
    let got = echo.wait_closed_where(|c| c.received_sha256 == sent.sent_sha256);
    assert_eq!(
        got.peer, sent.local,
        "the server sees the client's own socket"
    );
    // No wait needed: a proxy that carried the connection has its record from accept on,
    // and the server app has already seen the connection close.
    let new: Vec<ConnRecord> = agent
        .connections()?
        .all()
        .filter(|r| !before.contains(&r.id))
        .cloned()
        .collect();
    assert!(
        new.is_empty(),
        "the proxy handled traffic of unenrolled pods: {new:?}"
    );
    Ok(())
}

#[test]
fn relabelling_enrolled_pods_leaves_their_open_connections_alone() -> Result<()> {
    privileged!();
    let node = TestNode::new(test_name!(), 1)?;
    let client = node.pod("client").service_account("client").create()?;
    let server = node
        .pod("server")
        .service_account("server")
        .label("app", "echo")
        .create()?;
    let agent = node.start_agent()?;
    let echo = app::serve(&server, ECHO_PORT, Mode::Echo)?;
    let to = sock(server.addr(ECHO_PORT));
    let enrolled_before = enrolled_pods(&agent)?;

    // One connection kept busy through both pods' listeners while both are relabelled.
    let bytes = 2 * KIB * KIB;
    let running = app::start_send_paced(&client, to, bytes, 7, scaled(Duration::from_secs(6)))?;
    let open = active_local(&agent, to, |r| r.bytes_sent > 0)?;
    client.set_label("tier", Some("web"));
    server.set_label("app", Some("echo-v2"));
    agent.reload(&node)?;
    assert_eventually(Duration::from_secs(15), || -> Result<()> {
        let dump = agent.get("/config_dump")?.body;
        ensure!(
            dump.contains("echo-v2"),
            "the new labels are not applied yet"
        );
        Ok(())
    });
    // The relabel has applied, and the connection is still open, carrying bytes: the agent
    // counts more of them on the same record afterwards.
    let at_relabel = active_local(&agent, to, |r| r.id == open.id)?;
    ensure!(
        at_relabel.bytes_sent < bytes,
        "the transfer ended before the relabel applied, so it proves nothing: {at_relabel:?}"
    );
    active_local(&agent, to, |r| {
        r.id == open.id && r.bytes_sent > at_relabel.bytes_sent
    })?;

    let report = running.finish()?;
    assert_eq!(report.received_bytes, bytes, "no byte lost");
    assert_eq!(report.received_sha256, report.sent_sha256);
    echo.wait_closed_where(|c| c.received_sha256 == report.sent_sha256);
    // Neither pod was taken out and enrolled again (which would leave it unsteered for a
    // moment): same pod ids, same listeners.
    assert_eq!(enrolled_pods(&agent)?, enrolled_before);
    // Closed (in `recent`), whole and clean.
    let done = eventually(Duration::from_secs(10), || {
        let connections = agent.connections()?;
        connections
            .recent
            .iter()
            .find(|r| r.id == open.id)
            .cloned()
            .with_context(|| format!("record {} not closed yet: {connections:#?}", open.id))
    })?;
    assert_eq!(
        (done.bytes_sent, done.error.as_deref()),
        (bytes, None),
        "{done:?}"
    );
    Ok(())
}

#[test]
fn bad_config_at_startup_stops_the_agent_naming_the_field() -> Result<()> {
    privileged!();
    let node = TestNode::new(test_name!(), 1)?;
    let _client = node.pod("client").service_account("client").create()?;
    for bad in bad_configs(&node) {
        let yaml = serde_yaml::to_string(&bad.config)?;
        let mut agent = TestAgent::spawn_with_config_text(&node, &yaml)?;
        let status = agent.wait_exit(Duration::from_secs(20))?;
        let log = agent.current_log();
        assert_eq!(
            status.code(),
            Some(2),
            "{}: the agent must exit with code 2 (docs/config.md); log:\n{log}",
            bad.what
        );
        for needle in bad.message {
            assert!(
                log.contains(needle),
                "{}: start-up error must name {needle:?}; log:\n{log}",
                bad.what
            );
        }
    }
    Ok(())
}

#[test]
fn bad_config_at_reload_is_rejected_and_previous_config_stays() -> Result<()> {
    privileged!();
    let node = TestNode::new(test_name!(), 1)?;
    let client = node.pod("client").service_account("client").create()?;
    let server = node.pod("server").service_account("server").create()?;
    let mut agent = node.start_agent()?;
    let _echo = app::serve(&server, ECHO_PORT, Mode::Echo)?;
    let to = sock(server.addr(ECHO_PORT));
    assert_echoed(&app::send(&client, to, KIB, 1)?, KIB);
    agent.expect_record("outbound before reloads", |r| {
        is(r, "outbound", &client, to)
    });

    for (i, bad) in bad_configs(&node).into_iter().enumerate() {
        agent.rewrite_config(&bad.config)?;
        let rejection = assert_eventually(Duration::from_secs(15), || -> Result<String> {
            let status = agent.status()?;
            let rejection = status["config"]["last_rejection"]
                .as_str()
                .unwrap_or_default();
            ensure!(
                bad.message.iter().all(|m| rejection.contains(m)),
                "{}: /status config.last_rejection {rejection:?} does not name {:?} \
                 (status.config = {})",
                bad.what,
                bad.message,
                status["config"]
            );
            Ok(rejection.to_string())
        });
        assert!(
            agent.current_log().contains(&rejection),
            "{}: the rejection {rejection:?} is not in the agent log",
            bad.what
        );
        assert_eq!(
            agent.try_status(),
            None,
            "{}: the agent exited on a bad reload",
            bad.what
        );

        // The previous config stays in force: still enrolled, still proxied.
        let before = record_ids(&agent)?;
        let sent = app::send(&client, to, KIB, 10 + i as u64)?;
        assert_echoed(&sent, KIB);
        agent.expect_record("outbound after a rejected reload", |r| {
            is(r, "outbound", &client, to) && !before.contains(&r.id)
        });
    }
    Ok(())
}

/// A broken config and what the error must say.
struct BadConfig {
    what: &'static str,
    config: Value,
    message: &'static [&'static str],
}

/// The node's config broken three ways: an unknown field (a typo), an invalid IP, and a
/// netns path that does not exist.
fn bad_configs(node: &TestNode) -> Vec<BadConfig> {
    let mut typo = node.config();
    typo["workloads"][0]["enroled"] = Value::Bool(true);
    let mut bad_ip = node.config();
    bad_ip["workloads"][0]["ips"][0] = Value::from("10.1.0.300");
    let mut no_netns = node.config();
    no_netns["workloads"][0]["netns"] = Value::from("/run/netns/weft-test-does-not-exist");
    vec![
        BadConfig {
            what: "unknown field",
            config: typo,
            message: &["enroled"],
        },
        BadConfig {
            what: "invalid IP",
            config: bad_ip,
            message: &["workloads[0].ips[0]", "10.1.0.300"],
        },
        BadConfig {
            what: "missing netns path",
            config: no_netns,
            message: &["workloads[0].netns", "/run/netns/weft-test-does-not-exist"],
        },
    ]
}

/// Exactly one connect4, connect6 and sock_ops on the cgroup root; exactly one sk_lookup
/// link in each enrolled pod's netns and none in the others (the kernel's view, bpftool).
fn assert_attachments(node: &TestNode, enrolled: &[&TestPod], not: &[&TestPod]) -> Result<()> {
    let attached = bpf::cgroup_attachments(&node.cgroup_root())?;
    for kind in ["connect4", "connect6", "sock_ops"] {
        let n = attached.iter().filter(|a| a.attach_type == kind).count();
        assert_eq!(
            n,
            1,
            "{kind} attachments on {}: {attached:?}",
            node.cgroup_root().display()
        );
    }
    for pod in enrolled {
        let links = bpf::sk_lookup_links_in(&pod.netns_path())?;
        assert_eq!(
            links.len(),
            1,
            "sk_lookup links in enrolled {}: {links:?}",
            pod.name()
        );
    }
    for pod in not {
        let links = bpf::sk_lookup_links_in(&pod.netns_path())?;
        assert!(
            links.is_empty(),
            "sk_lookup links in unenrolled {}: {links:?}",
            pod.name()
        );
    }
    Ok(())
}

fn is(r: &ConnRecord, direction: &str, pod: &TestPod, dst: SocketAddr) -> bool {
    r.direction == direction && r.pod == pod.pod_ref() && r.dst == dst.to_string()
}

/// One entry of `/status` `pods.enrolled`: every field is required, so a missing one is
/// an error, not an empty value that compares equal to another empty value.
#[derive(Debug, PartialEq, Eq, Deserialize)]
struct EnrolledPod {
    pod: String,
    pod_id: u64,
    listeners: Vec<Listener>,
}

#[derive(Debug, PartialEq, Eq, Deserialize)]
struct Listener {
    direction: String,
    addr: SocketAddr,
}

/// Every enrolled pod, by name, from `/status`; each has its listeners.
fn enrolled_pods(agent: &TestAgent) -> Result<Vec<EnrolledPod>> {
    let status = agent.status()?;
    let mut pods: Vec<EnrolledPod> = serde_json::from_value(status["pods"]["enrolled"].clone())
        .with_context(|| format!("pods.enrolled in /status: {status}"))?;
    pods.sort_by(|a, b| a.pod.cmp(&b.pod));
    for pod in &pods {
        ensure!(
            !pod.listeners.is_empty(),
            "an enrolled pod without listeners: {pod:?}"
        );
    }
    Ok(pods)
}

/// Waits for an open (active) server-side record of a node-local connection to `to` that
/// `pred` accepts.
fn active_local(
    agent: &TestAgent,
    to: SocketAddr,
    pred: impl Fn(&ConnRecord) -> bool,
) -> Result<ConnRecord> {
    eventually(Duration::from_secs(15), || {
        let connections = agent.connections()?;
        connections
            .active
            .iter()
            .find(|r| r.direction == "local" && r.dst == to.to_string() && pred(r))
            .cloned()
            .with_context(|| format!("no such open node-local record: {:#?}", connections.active))
    })
}

fn record_ids(agent: &TestAgent) -> Result<HashSet<u64>> {
    Ok(agent.connections()?.all().map(|r| r.id).collect())
}

#[track_caller]
fn assert_echoed(sent: &app::SendReport, size: u64) {
    assert_eq!(sent.sent_bytes, size);
    assert_eq!(
        (sent.received_bytes, sent.received_sha256.as_str()),
        (size, sent.sent_sha256.as_str()),
        "the echo is not what was sent"
    );
}

fn sock(addr: std::net::SocketAddrV4) -> SocketAddr {
    SocketAddr::V4(addr)
}

const ECHO_PORT: u16 = 8080;
const HASH_PORT: u16 = 8081;
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const VIP_PORT: u16 = 80;
const KIB: u64 = 1024;
const SIZES: &[u64] = &[1, 64 * KIB, 100 * KIB * KIB];
const CONCURRENT: usize = 200;
