//! Hardening of the agent's own servers (issue "Hardening"): the admin, metrics and
//! readiness HTTP servers hold under slowloris, the admin API cannot be reached or used
//! to stop the agent from outside, and a CA root rotation runs with both roots trusted.
//!
//! Needs root; see `weft_tests::can_run_privileged`.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpSocket,
};
use weft_tests::{
    TestAgent, TestNode,
    app::{self, Mode},
    eventually,
    metrics::Scrape,
    privileged, scaled, sys, test_name,
};

/// Slowloris against the admin (15000), metrics (15020) and readiness (15021) servers:
/// from one address, many connections that never finish their headers (silent, or one
/// byte at a time) or their body. The agent's default limits hold: every such connection
/// is closed within the header or body timeout, no more than the per-address cap are held
/// at once, and a well-behaved client from another address is answered throughout.
#[test]
fn slowloris_on_every_http_server_is_closed_in_time_and_capped_while_others_are_served()
-> Result<()> {
    privileged!();
    let node = TestNode::new(test_name!(), 1)?;
    node.without_mtls();
    let agent = node.start_agent()?;
    let netns = node.netns_path();
    let ports = [ADMIN_PORT, METRICS_PORT, READINESS_PORT];

    let attack = {
        let netns = netns.clone();
        std::thread::spawn(move || {
            sys::in_netns(&netns, move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("runtime")?
                    .block_on(slowloris(&ports))
            })
        })
    };
    // A well-behaved client (another loopback address) while the attack runs.
    let mut answered = 0;
    let mut failures = Vec::new();
    while !attack.is_finished() {
        for (port, path) in [
            (METRICS_PORT, "/metrics"),
            (READINESS_PORT, "/healthz/ready"),
            (ADMIN_PORT, "/healthz/ready"),
        ] {
            match sys::http_get(&netns, loopback(port), path) {
                Ok(r) if r.status == 200 => answered += 1,
                Ok(r) => failures.push(format!("{port}{path}: {}", r.status)),
                Err(e) => failures.push(format!("{port}{path}: {e:#}")),
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let outcomes = attack
        .join()
        .map_err(|_| anyhow::anyhow!("attack thread panicked"))??;
    ensure!(
        failures.is_empty(),
        "well-behaved requests failed during the attack ({answered} answered): {failures:?}"
    );
    ensure!(answered >= 6, "only {answered} well-behaved requests ran");
    for (port, outcome) in ports.iter().zip(&outcomes) {
        eprintln!("port {port}: {outcome:?}");
        ensure!(
            outcome.still_open == 0,
            "port {port}: {} of {ATTACK_CONNECTIONS} slowloris connections still open after {:?} \
             ({outcome:?})",
            outcome.still_open,
            attack_deadline()
        );
        ensure!(
            outcome.held <= PER_IP_CAP,
            "port {port}: {} slowloris connections from one address held at once, cap \
             {PER_IP_CAP} ({outcome:?})",
            outcome.held
        );
        ensure!(
            outcome.longest < HEADER_TIMEOUT + scaled(Duration::from_secs(5)),
            "port {port}: a slowloris connection lived {:?}",
            outcome.longest
        );
    }
    let scrape = Scrape::parse(&agent.metrics()?);
    for server in ["admin", "metrics", "readiness"] {
        for reason in ["connection_limit_per_ip", "header_timeout", "body_timeout"] {
            let n = scrape.sum(
                "weft_http_connections_refused_total",
                &[("server", server), ("reason", reason)],
            );
            ensure!(n > 0.0, "no {server} refusal counted as {reason}");
        }
    }
    Ok(())
}

/// `POST /quitquitquit` without the admin header (what a web page could send) is refused and
/// the agent keeps running; with it, the agent stops.
#[test]
fn quitquitquit_needs_the_admin_header() -> Result<()> {
    privileged!();
    let node = TestNode::new(test_name!(), 1)?;
    node.without_mtls();
    let mut agent = node.start_agent()?;
    let netns = node.netns_path();
    let admin = loopback(ADMIN_PORT);

    let plain = raw_http(
        &netns,
        admin,
        "POST /quitquitquit HTTP/1.1\r\nHost: 127.0.0.1:15000\r\nContent-Length: 0\r\n\
         Connection: close\r\n\r\n",
    )?;
    ensure!(
        plain.starts_with("HTTP/1.1 403"),
        "quit without the header was not refused: {plain}"
    );
    // A page that rebound its name to 127.0.0.1 sends its own name as Host.
    let rebound = raw_http(
        &netns,
        admin,
        "POST /quitquitquit HTTP/1.1\r\nHost: evil.example:15000\r\nWeft-Admin: quit\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n",
    )?;
    ensure!(
        rebound.starts_with("HTTP/1.1 403"),
        "quit with a foreign Host was not refused: {rebound}"
    );
    std::thread::sleep(scaled(Duration::from_secs(1)));
    ensure!(agent.try_status().is_none(), "the agent exited");
    ensure!(
        agent.get("/healthz/ready")?.status == 200,
        "agent not ready"
    );

    let ok = raw_http(
        &netns,
        admin,
        "POST /quitquitquit HTTP/1.1\r\nHost: 127.0.0.1:15000\r\nWeft-Admin: quit\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n",
    )?;
    ensure!(ok.starts_with("HTTP/1.1 200"), "quit refused: {ok}");
    let status = agent.wait_exit(Duration::from_secs(20))?;
    ensure!(status.success(), "agent exited with {status}");
    Ok(())
}

/// An admin address that is not loopback is a configuration error naming the field.
#[test]
fn admin_address_off_loopback_is_refused_at_start() -> Result<()> {
    privileged!();
    let node = TestNode::new(test_name!(), 1)?;
    node.without_mtls();
    node.set_agent_setting("adminAddr", json!("0.0.0.0:15000"));
    let mut agent = TestAgent::spawn_only(&node)?;
    let exited = agent.wait_exit(Duration::from_secs(20));
    ensure!(
        exited.as_ref().is_ok_and(|s| !s.success()),
        "the agent did not refuse adminAddr 0.0.0.0:15000: {exited:?}"
    );
    let log = agent.current_log();
    ensure!(
        log.contains("agent.adminAddr") && log.contains("loopback"),
        "no error naming agent.adminAddr: {log}"
    );
    Ok(())
}

/// A root rotation: node 1's pods hold certificates from root A, node 2's from root B, and
/// both trust {A, B}: HBONE works both ways. Once node 2 trusts B alone, a certificate
/// from A is refused.
#[test]
fn a_root_rotation_trusts_both_roots_then_only_the_new_one() -> Result<()> {
    privileged!();
    let node1 = TestNode::new(test_name!(), 1)?;
    let node2 = TestNode::new(test_name!(), 2)?;
    node1.connect(&node2)?;
    let a = node1.ensure_ca()?;
    let b = node2.use_own_ca()?;
    let in_process = |cert: &Path, key: &Path, trusted: &[&Path]| {
        json!({ "inProcess": {
            "cert": cert.display().to_string(),
            "key": key.display().to_string(),
            "trustedRoots": trusted.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        }})
    };
    node1.set_agent_setting("ca", in_process(&a.cert, &a.key, &[&b.cert]));
    node2.set_agent_setting("ca", in_process(&b.cert, &b.key, &[&a.cert]));
    let pod1 = node1.pod("one").service_account("one").create()?;
    let pod2 = node2.pod("two").service_account("two").create()?;
    let _agent1 = node1.start_agent()?;
    let mut agent2 = node2.start_agent()?;
    let _echo1 = app::serve(&pod1, ECHO_PORT, Mode::Echo)?;
    let _echo2 = app::serve(&pod2, ECHO_PORT, Mode::Echo)?;

    for (from, to, text) in [(&pod1, &pod2, "A to B"), (&pod2, &pod1, "B to A")] {
        let report = app::send_text(from, SocketAddr::V4(to.addr(ECHO_PORT)), text)?;
        ensure!(
            report.reply.as_deref() == Some(text),
            "{text}: not echoed during the rotation: {report:?}"
        );
    }
    agent2.expect_record("HBONE from root A", |r| {
        r.direction == "hbone"
            && r.src_identity
                .as_deref()
                .is_some_and(|i| i.ends_with("/sa/one"))
    });

    // Root A retired on node 2.
    node2.set_agent_setting("ca", in_process(&b.cert, &b.key, &[]));
    agent2.reload(&node2)?;
    agent2.restart()?;
    let to = SocketAddr::V4(pod2.addr(ECHO_PORT));
    let result = app::send_text(&pod1, to, "after A is gone");
    ensure!(
        result.as_ref().map_or(true, |r| r.reply.is_none()),
        "a certificate from the retired root was trusted: {result:?}"
    );
    // Refused at the handshake, so no connection record: the reason is in the log.
    eventually(Duration::from_secs(10), || {
        let log = agent2.current_log();
        ensure!(
            log.lines()
                .any(|l| l.contains("HBONE handshake refused") && l.contains("untrusted_ca")),
            "node 2 logged no refusal of the certificate from root A"
        );
        Ok(())
    })?;
    Ok(())
}

/// What the attacker saw on one port.
#[derive(Debug, Default)]
struct Outcome {
    /// Connections the server kept for more than a second.
    held: usize,
    /// Closed within a second (refused by a cap).
    refused: usize,
    /// Not closed by the deadline.
    still_open: usize,
    /// The longest a connection was kept.
    longest: Duration,
    /// Connect failed.
    connect_failed: usize,
}

/// Opens `ATTACK_CONNECTIONS` slow connections to each port from 127.0.0.2, each
/// silent, dribbling its headers, or dribbling its body, and reports how the server ended
/// them.
async fn slowloris(ports: &[u16]) -> Result<Vec<Outcome>> {
    let mut per_port = Vec::new();
    for &port in ports {
        let mut tasks = tokio::task::JoinSet::new();
        let mut outcome = Outcome::default();
        for i in 0..ATTACK_CONNECTIONS {
            let socket = TcpSocket::new_v4()?;
            socket.bind(SocketAddr::from(([127, 0, 0, 2], 0)))?;
            let Ok(Ok(stream)) = tokio::time::timeout(
                scaled(Duration::from_secs(2)),
                socket.connect(loopback(port)),
            )
            .await
            else {
                outcome.connect_failed += 1;
                continue;
            };
            tasks.spawn(hold(stream, i % 3));
        }
        per_port.push((outcome, tasks));
    }
    let mut outcomes = Vec::new();
    for (mut outcome, mut tasks) in per_port {
        while let Some(lived) = tasks.join_next().await {
            match lived? {
                None => outcome.still_open += 1,
                Some(d) if d < scaled(Duration::from_secs(1)) => outcome.refused += 1,
                Some(d) => {
                    outcome.held += 1;
                    outcome.longest = outcome.longest.max(d);
                }
            }
        }
        outcomes.push(outcome);
    }
    Ok(outcomes)
}

/// Keeps one connection slow until the server closes it (returns how long it lived) or the
/// deadline passes (None). `kind` 0: silent; 1: headers one byte at a time; 2: a body one
/// byte at a time.
async fn hold(mut stream: tokio::net::TcpStream, kind: usize) -> Option<Duration> {
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + attack_deadline();
    let opening: &[u8] = match kind {
        0 => b"",
        1 => b"GET /metrics HTTP/1.1\r\nHost: x\r\n",
        _ => b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 60000\r\n\r\n",
    };
    if stream.write_all(opening).await.is_err() {
        return Some(start.elapsed());
    }
    let mut buf = [0u8; 4096];
    loop {
        tokio::select! {
            read = stream.read(&mut buf) => match read {
                // Closed (a response to a refused body is followed by the close).
                Ok(0) | Err(_) => return Some(start.elapsed()),
                Ok(_) => {}
            },
            () = tokio::time::sleep(DRIBBLE) => {
                if kind != 0 && stream.write_all(b"x").await.is_err() {
                    return Some(start.elapsed());
                }
            }
            () = tokio::time::sleep_until(deadline) => return None,
        }
    }
}

/// One raw HTTP/1.1 exchange from inside `netns`; the response text.
fn raw_http(netns: &Path, addr: SocketAddr, request: &str) -> Result<String> {
    let request = request.to_owned();
    let netns: PathBuf = netns.to_path_buf();
    sys::in_netns(&netns, move || {
        let mut stream = TcpStream::connect_timeout(&addr, scaled(Duration::from_secs(2)))?;
        stream.set_read_timeout(Some(scaled(Duration::from_secs(10))))?;
        stream.write_all(request.as_bytes())?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response)
    })
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn attack_deadline() -> Duration {
    // The header timeout, and room for a loaded machine.
    HEADER_TIMEOUT + scaled(Duration::from_secs(10))
}

const ADMIN_PORT: u16 = 15000;
const METRICS_PORT: u16 = 15020;
const READINESS_PORT: u16 = 15021;
const ECHO_PORT: u16 = 8080;
/// Per server: more than the per-address cap.
const ATTACK_CONNECTIONS: usize = 90;
/// `agent.http` defaults (docs/config.md).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const PER_IP_CAP: usize = 32;
const DRIBBLE: Duration = Duration::from_millis(700);
