//! Hardening (issue 13): a pod or a peer that turns the proxy on itself or floods it.
//!
//! - Finding 1: no connection from inside a pod may make the proxy dial one of its own
//!   listeners. One `connect(127.0.0.1:15006)` used to make the inbound proxy dial itself
//!   until the agent ran out of file descriptors.
//! - Finding 14: warnings a peer can cause at will are rate-limited; metrics count them all.
//! - Hostile inputs: garbage and truncated TLS on every port the agent listens on, and a pod
//!   connecting in a tight loop.
//!
//! Every test checks what matters to the node's other pods: the agent's file descriptors
//! (`/proc/<pid>/fd`) stay near their baseline and a neighbour pod's traffic flows.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    path::Path,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use weft_tests::{
    TestAgent, TestNode, TestPod,
    app::{self, Mode},
    assert_eventually,
    metrics::Scrape,
    privileged, sys, test_name,
};

#[test]
fn a_pod_dialling_the_proxys_own_listeners_is_refused_before_any_dial() -> Result<()> {
    privileged!();
    let node1 = TestNode::new(test_name!(), 1)?;
    let node2 = TestNode::new(test_name!(), 2)?;
    node1.connect(&node2)?;
    let attacker = node1.pod("attacker").service_account("attacker").create()?;
    let neighbour = node1
        .pod("neighbour")
        .service_account("neighbour")
        .create()?;
    let server = node1.pod("server").service_account("server").create()?;
    let remote = node2.pod("remote").service_account("remote").create()?;
    let agent1 = node1.start_agent()?;
    let agent2 = node2.start_agent()?;
    let _echo = app::serve(&server, ECHO_PORT, Mode::Echo)?;
    let _remote_echo = app::serve(&remote, ECHO_PORT, Mode::Echo)?;
    neighbour_flows(&neighbour, &server)?;
    let baseline1 = fds(&agent1)?;
    let baseline2 = fds(&agent2)?;

    let v4 = |ip: Ipv4Addr, port: u16| SocketAddr::from((ip, port));
    let mapped = |port| SocketAddr::from((Ipv4Addr::LOCALHOST.to_ipv6_mapped(), port));
    // (what, where, whether node 1's proxy must count it as a loop). The others never reach
    // a dial at all: the outbound listener finds no original destination for an unsteered
    // connection, the HBONE listener wants TLS, and `::1` has no listener in a v4 pod.
    let targets = [
        ("loopback inbound", v4(Ipv4Addr::LOCALHOST, INBOUND), true),
        (
            "unspecified inbound",
            v4(Ipv4Addr::UNSPECIFIED, INBOUND),
            true,
        ),
        ("v4-mapped loopback inbound", mapped(INBOUND), true),
        (
            "loopback outbound",
            v4(Ipv4Addr::LOCALHOST, OUTBOUND),
            false,
        ),
        (
            "unspecified outbound",
            v4(Ipv4Addr::UNSPECIFIED, OUTBOUND),
            false,
        ),
        ("loopback HBONE", v4(Ipv4Addr::LOCALHOST, HBONE), false),
        (
            "v6 loopback inbound",
            SocketAddr::from((Ipv6Addr::LOCALHOST, INBOUND)),
            false,
        ),
        ("own IP inbound", v4(attacker.ip(), INBOUND), true),
        ("own IP outbound", v4(attacker.ip(), OUTBOUND), true),
        ("own IP HBONE", v4(attacker.ip(), HBONE), true),
        ("neighbour inbound", v4(neighbour.ip(), INBOUND), true),
        ("neighbour outbound", v4(neighbour.ip(), OUTBOUND), true),
        ("neighbour HBONE", v4(neighbour.ip(), HBONE), true),
        ("remote pod inbound", v4(remote.ip(), INBOUND), true),
        ("remote pod outbound", v4(remote.ip(), OUTBOUND), true),
    ];
    let mut most = 0;
    for (what, to, is_loop) in targets {
        let sent = app::send_text(&attacker, to, "loop?");
        // First what the node felt, then what the client saw.
        for (agent, baseline, node) in [(&agent1, baseline1, 1), (&agent2, baseline2, 2)] {
            let peak = peak_fds(agent, scaled_window())?;
            most = most.max(peak - baseline.min(peak));
            ensure!(
                peak <= baseline + FD_SLACK,
                "{what} ({to}): node {node}'s agent held {peak} file descriptors (baseline \
                 {baseline}) and {} KiB RSS: the proxy dialled itself",
                rss_kib(agent).unwrap_or(0)
            );
        }
        // Nothing behind a proxy port may answer like an application; a loop is reset (or
        // refused) at once, and the HBONE port at most answers with a TLS alert.
        let answered = sent.as_ref().is_ok_and(|r| r.reply.is_some());
        let refused = match &sent {
            Ok(r) => r.reply.is_none(),
            Err(e) => app::is_reset(e),
        };
        ensure!(
            if is_loop {
                refused
            } else {
                !answered || to.port() == HBONE
            },
            "{what} ({to}): the client was neither refused nor reset: {sent:?}"
        );
        ensure!(
            sent.as_ref()
                .map_or(true, |r| r.reply.as_deref() != Some("loop?")),
            "{what} ({to}): an echo came back: {sent:?}"
        );
    }
    println!("the agents gained at most {most} file descriptors over their baselines");
    let loops = targets.iter().filter(|(_, _, is_loop)| *is_loop).count() as f64;
    assert_eventually(Duration::from_secs(10), || {
        let counted = denied(&agent1, "proxy_loop")?;
        ensure!(
            counted >= loops,
            "{counted} connections counted as proxy_loop, expected {loops}"
        );
        Ok(())
    });
    agent1.expect_record("loopback loop refused", |r| {
        r.pod == attacker.pod_ref()
            && r.dst == v4(Ipv4Addr::LOCALHOST, INBOUND).to_string()
            && r.upstream.is_none()
            && r.error.as_deref() == Some("proxy_loop")
    });
    ensure!(
        agent1.log().contains("proxy loop refused"),
        "no warning for the refused loop"
    );
    neighbour_flows(&neighbour, &server)?;
    Ok(())
}

#[test]
fn a_flood_of_refused_connections_logs_a_handful_of_lines_and_counts_them_all() -> Result<()> {
    privileged!();
    let node = TestNode::new(test_name!(), 1)?;
    let outsider = node.pod("outsider").enrolled(false).create()?;
    let strict = node
        .pod("strict")
        .service_account("strict")
        .mtls_mode("STRICT")
        .create()?;
    let agent = node.start_agent()?;
    let _app = app::serve(&strict, ECHO_PORT, Mode::Echo)?;

    // Plaintext into a STRICT pod, and HBONE with garbage instead of a ClientHello.
    flood(
        &outsider.netns_path(),
        strict.addr(ECHO_PORT).into(),
        b"plaintext",
        FLOOD,
    )?;
    flood(
        &outsider.netns_path(),
        strict.addr(HBONE).into(),
        GARBAGE,
        FLOOD,
    )?;

    assert_eventually(Duration::from_secs(30), || {
        let refused = denied(&agent, "plaintext_refused_strict")?;
        ensure!(
            refused >= FLOOD as f64,
            "counted {refused} refused plaintext connections, expected {FLOOD}"
        );
        Ok(())
    });
    // The access log has a line per connection by design (and can be turned off); the
    // rest of the agent's log must not.
    let log = agent.log();
    let log: Vec<&str> = log
        .lines()
        .filter(|l| !l.starts_with(r#"{"kind":"access""#))
        .collect();
    for needle in ["plaintext", "HBONE handshake refused"] {
        let lines = log.iter().filter(|l| l.contains(needle)).count();
        println!("{FLOOD} events: {lines} lines {needle:?}");
        ensure!(
            (1..=MAX_WARNINGS).contains(&lines),
            "{FLOOD} events logged {lines} lines {needle:?}: expected 1 to {MAX_WARNINGS}"
        );
    }
    // Every failed handshake is counted all the same.
    assert_eventually(Duration::from_secs(30), || {
        let handshakes = denied_total(&agent)? - denied(&agent, "plaintext_refused_strict")?;
        ensure!(
            handshakes >= FLOOD as f64,
            "counted {handshakes} failed HBONE handshakes, expected {FLOOD}"
        );
        Ok(())
    });
    Ok(())
}

#[test]
fn garbage_and_truncated_tls_on_every_port_leave_the_agent_serving() -> Result<()> {
    privileged!();
    let node = TestNode::new(test_name!(), 1)?;
    let outsider = node.pod("outsider").enrolled(false).create()?;
    let target = node.pod("target").service_account("target").create()?;
    let neighbour = node
        .pod("neighbour")
        .service_account("neighbour")
        .create()?;
    let server = node.pod("server").service_account("server").create()?;
    let mut agent = node.start_agent()?;
    let _echo = app::serve(&server, ECHO_PORT, Mode::Echo)?;
    let _target_app = app::serve(&target, ECHO_PORT, Mode::Echo)?;
    neighbour_flows(&neighbour, &server)?;
    let baseline = fds(&agent)?;

    let local = |port| SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let pod = |port| SocketAddr::from((target.ip(), port));
    // From inside the pod (its listeners on loopback and its HBONE port), from another pod
    // (steered into 15006, or HBONE), and on the node (admin, metrics, readiness).
    let ports = [
        (target.netns_path(), local(OUTBOUND)),
        (target.netns_path(), local(INBOUND)),
        (target.netns_path(), pod(HBONE)),
        (outsider.netns_path(), pod(INBOUND)),
        (outsider.netns_path(), pod(ECHO_PORT)),
        (outsider.netns_path(), pod(HBONE)),
        (node.netns_path(), local(ADMIN)),
        (node.netns_path(), local(METRICS)),
        (node.netns_path(), local(READINESS)),
    ];
    for (netns, to) in &ports {
        for payload in [GARBAGE, TRUNCATED_CLIENT_HELLO, b""] {
            flood(netns, *to, payload, PER_PORT)?;
        }
        ensure!(
            agent.try_status().is_none(),
            "the agent exited after garbage on {to}"
        );
    }
    neighbour_flows(&neighbour, &server)?;
    let ready = sys::http_get(&node.netns_path(), local(READINESS), "/healthz/ready")?;
    ensure!(
        ready.status == 200,
        "readiness after the garbage: {ready:?}"
    );
    fds_return_to(&agent, baseline)?;
    Ok(())
}

#[test]
fn a_pod_connecting_in_a_tight_loop_does_not_starve_its_neighbours() -> Result<()> {
    privileged!();
    let node = TestNode::new(test_name!(), 1)?;
    let attacker = node.pod("attacker").service_account("attacker").create()?;
    let neighbour = node
        .pod("neighbour")
        .service_account("neighbour")
        .create()?;
    let server = node.pod("server").service_account("server").create()?;
    let agent = node.start_agent()?;
    let _echo = app::serve(&server, ECHO_PORT, Mode::Echo)?;
    neighbour_flows(&neighbour, &server)?;
    let baseline = fds(&agent)?;

    let to = SocketAddr::from(server.addr(ECHO_PORT));
    let running = app::start_hammer(&attacker, to, TIGHT_LOOP_MAX, TIGHT_LOOP, b"")?;
    // The neighbour's traffic flows while the loop runs.
    let started = Instant::now();
    while started.elapsed() < TIGHT_LOOP {
        neighbour_flows(&neighbour, &server)?;
    }
    let hammer = running.finish()?;
    ensure!(
        hammer.connected >= 500,
        "the tight loop barely ran, so it proves nothing: {hammer:?}"
    );
    println!("tight loop: {hammer:?}, baseline {baseline} fds");
    fds_return_to(&agent, baseline)?;
    neighbour_flows(&neighbour, &server)?;
    Ok(())
}

/// A neighbour pod's round trip through the mesh works.
fn neighbour_flows(neighbour: &TestPod, server: &TestPod) -> Result<()> {
    let to = SocketAddr::from(server.addr(ECHO_PORT));
    let sent = app::send_text(neighbour, to, "still here")
        .with_context(|| format!("the neighbour's traffic to {to} stopped"))?;
    ensure!(
        sent.reply.as_deref() == Some("still here"),
        "the neighbour's echo came back wrong: {sent:?}"
    );
    Ok(())
}

/// `count` connections from inside `netns`, one after another: connect, write `payload`,
/// close. Failures to connect are fine (a port may refuse); only the agent's fate counts.
fn flood(netns: &Path, to: SocketAddr, payload: &'static [u8], count: usize) -> Result<()> {
    sys::in_netns(netns, move || {
        for _ in 0..count {
            if let Ok(mut stream) = TcpStream::connect_timeout(&to, Duration::from_secs(2)) {
                let _ = std::io::Write::write_all(&mut stream, payload);
            }
        }
        Ok(())
    })
}

/// The agent's open file descriptors.
fn fds(agent: &TestAgent) -> Result<usize> {
    let pid = agent.pid().context("the agent is not running")?;
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("read /proc/{pid}/fd"))?
        .count())
}

/// The most file descriptors the agent held, sampled over `window`.
fn peak_fds(agent: &TestAgent, window: Duration) -> Result<usize> {
    let started = Instant::now();
    let mut peak = fds(agent)?;
    while started.elapsed() < window {
        thread::sleep(Duration::from_millis(50));
        peak = peak.max(fds(agent)?);
    }
    Ok(peak)
}

/// Waits until the agent is back near `baseline` file descriptors.
fn fds_return_to(agent: &TestAgent, baseline: usize) -> Result<()> {
    assert_eventually(Duration::from_secs(30), || {
        let now = fds(agent)?;
        ensure!(
            now <= baseline + FD_SLACK,
            "the agent holds {now} file descriptors, baseline {baseline}"
        );
        Ok(())
    });
    Ok(())
}

fn rss_kib(agent: &TestAgent) -> Result<u64> {
    let pid = agent.pid().context("the agent is not running")?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")
}

fn denied(agent: &TestAgent, reason: &str) -> Result<f64> {
    Ok(Scrape::parse(&agent.metrics()?).sum(DENIED, &[("reason", reason)]))
}

fn denied_total(agent: &TestAgent) -> Result<f64> {
    Ok(Scrape::parse(&agent.metrics()?).sum(DENIED, &[]))
}

/// How long a loop would need to show: the old proxy reached 20,000 descriptors within one
/// second.
fn scaled_window() -> Duration {
    weft_tests::scaled(Duration::from_millis(1_500))
}

const DENIED: &str = "weft_agent_denied_connections_total";
const ECHO_PORT: u16 = 8080;
const OUTBOUND: u16 = 15001;
const INBOUND: u16 = 15006;
const HBONE: u16 = 15008;
const ADMIN: u16 = 15000;
const METRICS: u16 = 15020;
const READINESS: u16 = 15021;
/// Descriptors the agent may gain beyond its baseline (pooled HBONE connections, a
/// connection still closing, a metrics scrape).
const FD_SLACK: usize = 64;
const FLOOD: usize = 2_000;
const PER_PORT: usize = 50;
/// Lines per warning for a flood that lasts well under a minute (the budget is one per 10 s).
const MAX_WARNINGS: usize = 6;
const TIGHT_LOOP: Duration = Duration::from_secs(4);
const TIGHT_LOOP_MAX: u64 = 50_000;
const GARBAGE: &[u8] = b"\x00\xff\x16\x03\x03GET / HTTP/1.1\r\n\r\n\x80\x00garbage\xde\xad\xbe\xef";
/// A TLS record header announcing a 512-byte ClientHello, and only its first bytes.
const TRUNCATED_CLIENT_HELLO: &[u8] = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\x00\x01\x02";
