//! Hostile input against the proxy's limits (issue "Hardening", finding 7): a pod that opens
//! 10,000 idle connections to each listener (15001, 15006, 15008) cannot starve its
//! neighbours or the agent's file descriptors; an idle proxied connection is closed after the
//! idle timeout and counted; an HBONE peer holding a valid certificate that speaks hostile
//! HTTP/2 (a huge header list, a CONTINUATION flood, rapid reset, thousands of streams) is
//! answered or cut off within bounds while other pods' traffic flows.
//!
//! Every test checks the neighbour pods' traffic, the agent's file descriptors
//! (`/proc/<pid>/fd`) and the refusal counters on `/metrics`. Needs root; see
//! `weft_tests::can_run_privileged`.

#[path = "support/hbone_peer.rs"]
mod hbone_peer;

use hbone_peer::Identity;

use std::{
    net::SocketAddr,
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, ensure};
use bytes::Bytes;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_tests::{
    TestAgent, TestNode, TestPod, TestProcess,
    app::{self, Mode, testapp_bin},
    assert_eventually, eventually,
    metrics::Scrape,
    privileged, scaled, sys, test_name,
};

/// Per pod and direction, in every test here: small, so that 10,000 connections are far
/// past it and the bound on the agent's descriptors is tight.
const POD_CONNECTIONS: u64 = 500;
const NODE_CONNECTIONS: u64 = 4_000;
/// Connections of one flood.
const FLOOD: u64 = 10_000;
const SINK_PORT: u16 = 7_000;
const ECHO_PORT: u16 = 8_080;
const HBONE_PORT: u16 = 15_008;
const DENIED: &str = "weft_agent_denied_connections_total";

#[test]
fn ten_thousand_idle_connections_to_each_listener_are_capped_and_neighbours_keep_flowing()
-> Result<()> {
    privileged!();
    let node = TestNode::new(test_name!(), 1)?;
    set_limits(&node, json!({}));
    let hostile = node.pod("hostile").service_account("hostile").create()?;
    let outsider = node.pod("outsider").enrolled(false).create()?;
    let target = node
        .pod("target")
        .service_account("target")
        .mtls_mode("PERMISSIVE")
        .create()?;
    let client = node.pod("client").service_account("client").create()?;
    let server = node.pod("server").service_account("server").create()?;
    let agent = node.start_agent()?;
    let pid = agent.pid().context("agent pid")?;
    let _echo = app::serve(&server, ECHO_PORT, Mode::Echo)?;
    app::churn(&client, sock(server.addr(ECHO_PORT)), 20)?;
    let base = fds(pid)?;
    eprintln!(
        "agent before the floods: {base} fds, {} KiB RSS",
        rss_kib(pid)?
    );

    // Each connection of the hostile pod (or into the target) holds at most two descriptors
    // in the agent (its own socket and the upstream), and only `POD_CONNECTIONS` of them
    // are let in; the neighbours' few connections and the agent's timers come on top.
    let bound = base + 2 * POD_CONNECTIONS + 200;
    // (listener, from, to, the pod whose sink answers)
    let floods = [
        // 15001: the hostile pod's own outbound listener, to a sink outside the mesh.
        ("15001", &hostile, sock(outsider.addr(SINK_PORT)), &outsider),
        // 15006: plaintext into a PERMISSIVE pod, from a pod outside the mesh.
        ("15006", &outsider, sock(target.addr(SINK_PORT)), &target),
        // 15008: raw TCP at the target's HBONE port (no TLS ever comes).
        ("15008", &outsider, sock(target.addr(HBONE_PORT)), &target),
    ];
    for (listener, from, to, sink_pod) in floods {
        // A sink holds what it accepts and never closes: it goes with its flood, so that
        // the proxy's half-closed connections end too (else only the idle timeout would).
        let mut sink = sink(sink_pod)?;
        let denied_before = refused_for_the_flood(&agent)?;
        let started = Instant::now();
        let mut flood = app::hold(from, to, FLOOD, Duration::from_secs(3), None, b"")?;
        // The neighbours keep talking while the flood arrives and while it is held.
        app::churn(&client, sock(server.addr(ECHO_PORT)), 50)
            .with_context(|| format!("neighbour traffic during the flood on {listener}"))?;
        let (open, closed) = app::held(&flood)?;
        let (now_fds, rss) = (fds(pid)?, rss_kib(pid)?);
        eprintln!(
            "flood on {listener}: {open} held open, {closed} refused, agent {now_fds} fds \
             (bound {bound}), {rss} KiB RSS, after {:?}",
            started.elapsed()
        );
        app::send(&client, sock(server.addr(ECHO_PORT)), 100_000, 7)
            .with_context(|| format!("neighbour traffic while {listener} is flooded"))?;
        ensure!(
            now_fds <= bound,
            "flood on {listener}: the agent holds {now_fds} fds, more than {bound}"
        );
        ensure!(
            open <= POD_CONNECTIONS + 20,
            "flood on {listener}: {open} hostile connections held open, cap {POD_CONNECTIONS}"
        );
        let refused = refused_for_the_flood(&agent)? - denied_before;
        ensure!(
            refused >= closed.saturating_sub(50) && refused > 0,
            "flood on {listener}: {closed} connections closed but {refused} counted as \
             pod_connection_limit or tls_handshake_timeout"
        );
        flood.kill();
        sink.kill();
        // The hostile pod's connections are gone: its budget comes back.
        assert_eventually(Duration::from_secs(30), || {
            let now = fds(pid).map_err(|e| format!("{e:#}"))?;
            if now <= base + 50 {
                Ok(())
            } else {
                Err(format!(
                    "agent still holds {now} fds after the flood (base {base})"
                ))
            }
        });
    }
    ensure!(
        agent.log().contains("pod_connection_limit"),
        "the refusal is logged with its reason"
    );
    Ok(())
}

#[test]
fn an_idle_proxied_connection_is_closed_after_the_idle_timeout_and_counted() -> Result<()> {
    privileged!();
    let node = TestNode::new(test_name!(), 1)?;
    set_limits(&node, json!({ "idleTimeout": "2s" }));
    let client = node.pod("client").service_account("client").create()?;
    let server = node.pod("server").service_account("server").create()?;
    let agent = node.start_agent()?;
    let _echo = app::serve(&server, ECHO_PORT, Mode::Echo)?;
    let to = sock(server.addr(ECHO_PORT));
    // A busy connection longer than the timeout is not idle: it must survive.
    let busy = app::start_send_paced(&client, to, 200_000, 3, Duration::from_secs(5))?;
    let idle = app::hold(&client, to, 1, Duration::from_secs(8), None, b"")?;
    let (open, closed) = app::held(&idle)?;
    ensure!(
        open == 0 && closed == 1,
        "the idle connection is still open after 8 s (timeout 2 s)"
    );
    let report = busy.finish().context("a busy connection is not idle")?;
    ensure!(report.received_bytes == 200_000, "busy echo: {report:?}");
    let record = agent.expect_record("idle timeout", |r| {
        r.error.as_deref() == Some("idle_timeout")
    });
    eprintln!("closed for idleness: {record:?}");
    assert_eventually(Duration::from_secs(10), || {
        let scrape = Scrape::parse(&agent.metrics().map_err(|e| format!("{e:#}"))?);
        let n = scrape.sum(
            "weft_tcp_connections_closed_total",
            &[("response_flags", "SI")],
        );
        if n >= 1.0 {
            Ok(())
        } else {
            Err("no connection closed with response_flags=SI (idle timeout)".to_string())
        }
    });
    Ok(())
}

#[test]
fn a_hostile_hbone_peer_with_a_valid_certificate_stays_within_bounds() -> Result<()> {
    privileged!();
    let node = TestNode::new(test_name!(), 1)?;
    set_limits(&node, json!({}));
    let target = node.pod("target").service_account("target").create()?;
    let client = node.pod("client").service_account("client").create()?;
    let server = node.pod("server").service_account("server").create()?;
    let agent = node.start_agent()?;
    let pid = agent.pid().context("agent pid")?;
    let _target_sink = sink(&target)?;
    let _echo = app::serve(&server, ECHO_PORT, Mode::Echo)?;
    app::churn(&client, sock(server.addr(ECHO_PORT)), 20)?;
    let base = fds(pid)?;
    let ca = node.ensure_ca()?;
    let identity = Identity::issue(
        &ca.cert,
        &ca.key,
        "spiffe://cluster.local/ns/default/sa/hostile",
    )?;
    let hbone = sock(target.addr(HBONE_PORT));
    let sink_target = target.addr(SINK_PORT).to_string();

    let findings = sys::in_netns(&node.netns_path(), move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(hostile_peer(identity, hbone, sink_target, pid))
    })?;
    eprintln!("hostile HBONE peer: {findings:#?}");
    let (now_fds, rss) = (fds(pid)?, rss_kib(pid)?);
    eprintln!("agent after the hostile peer: {now_fds} fds (base {base}), {rss} KiB RSS");

    ensure!(
        findings.oversized_header_status == Some(431),
        "a CONNECT with a 32 KiB header list is answered 431: got {:?}",
        findings.oversized_header_status
    );
    ensure!(
        matches!(findings.huge_header_status, None | Some(431)),
        "a CONNECT with a 1 MiB header list is refused (431 or the connection ends): got {:?}",
        findings.huge_header_status
    );
    ensure!(
        findings.continuation_bytes_accepted < 512 * 1024,
        "the CONTINUATION flood was read up to {} bytes before the connection was cut",
        findings.continuation_bytes_accepted
    );
    ensure!(
        findings.streams_accepted <= POD_CONNECTIONS + 20,
        "{} CONNECT streams were let through to the target, cap {POD_CONNECTIONS}",
        findings.streams_accepted
    );
    let bound = base + 2 * POD_CONNECTIONS + 200;
    ensure!(
        findings.fds_while_streams_held <= bound,
        "with thousands of streams open the agent held {} fds, bound {bound}",
        findings.fds_while_streams_held
    );
    ensure!(
        denied(&agent, "pod_connection_limit")? > 0,
        "streams past the cap are counted"
    );
    app::send(&client, sock(server.addr(ECHO_PORT)), 100_000, 9)
        .context("neighbour traffic after the hostile peer")?;
    Ok(())
}

/// What the hostile HBONE peer saw.
#[derive(Debug, Default)]
struct Findings {
    /// A CONNECT with 32 KiB of headers: the status, None if the connection failed.
    oversized_header_status: Option<u16>,
    /// The same with 1 MiB.
    huge_header_status: Option<u16>,
    continuation_bytes_accepted: usize,
    rapid_resets_sent: usize,
    rapid_reset_outcome: String,
    streams_accepted: u64,
    streams_refused: u64,
    zero_window_outcome: String,
    fds_while_streams_held: u64,
}

/// A peer with a valid certificate of this mesh's CA, misbehaving in HTTP/2 in every way
/// listed in the issue.
async fn hostile_peer(
    identity: Identity,
    hbone: SocketAddr,
    target: String,
    agent_pid: u32,
) -> Result<Findings> {
    let tls = tls_connector(&identity)?;
    // 1. CONNECTs whose header lists are over the limit: 32 KiB (a few frames: h2 lets the
    // server answer) and 1 MiB (dozens of CONTINUATION frames: h2 ends the connection).
    let mut findings = Findings {
        oversized_header_status: oversized_connect(&tls, hbone, &target, 4).await?,
        huge_header_status: oversized_connect(&tls, hbone, &target, 128).await?,
        ..Findings::default()
    };

    // 2. A CONTINUATION flood: HEADERS without END_HEADERS, then CONTINUATION frames that
    // never end the block, in raw frames (h2 would not send these).
    {
        let tcp = tokio::net::TcpStream::connect(hbone).await?;
        let mut io = tls.connect(server_name(hbone), tcp).await?;
        io.write_all(PREFACE).await?;
        io.write_all(&frame(0x4, 0, 0, &[])).await?; // SETTINGS
        // HEADERS on stream 1: `:method: CONNECT` (static index 2 is GET; a literal here).
        let block = hpack_literal(":method", "CONNECT");
        io.write_all(&frame(0x1, 0x0, 1, &block)).await?;
        let chunk = hpack_literal("x-flood", &"y".repeat(16 * 1024 - 64));
        let mut sent = 0usize;
        let deadline = Instant::now() + scaled(Duration::from_secs(20));
        while sent < 8 * 1024 * 1024 && Instant::now() < deadline {
            match tokio::time::timeout(
                scaled(Duration::from_secs(5)),
                io.write_all(&frame(0x9, 0x0, 1, &chunk)),
            )
            .await
            {
                Ok(Ok(())) => sent += chunk.len(),
                _ => break,
            }
            // Stop once the server has answered (GOAWAY) or closed.
            let mut buf = [0u8; 4096];
            if let Ok(r) = tokio::time::timeout(Duration::from_millis(1), io.read(&mut buf)).await {
                match r {
                    Ok(0) | Err(_) => break,
                    Ok(n) if goaway_in(&buf[..n]) => break,
                    Ok(_) => {}
                }
            }
        }
        findings.continuation_bytes_accepted = sent;
    }

    // 3. Rapid reset: open and reset thousands of CONNECT streams as fast as h2 lets us.
    {
        let mut h2 = h2_connect(&tls, hbone, h2::client::Builder::new()).await?;
        let started = Instant::now();
        let mut outcome = String::from("connection stayed open");
        for _ in 0..5_000 {
            match h2.clone().ready().await {
                Ok(ready) => h2 = ready,
                Err(e) => {
                    outcome = format!("connection closed by the server: {e}");
                    break;
                }
            }
            match h2.send_request(connect_request(&target), false) {
                Ok((_, mut send)) => {
                    send.send_reset(h2::Reason::CANCEL);
                    findings.rapid_resets_sent += 1;
                }
                Err(e) => {
                    outcome = format!("connection closed by the server: {e}");
                    break;
                }
            }
        }
        findings.rapid_reset_outcome = format!("{outcome} after {:?}", started.elapsed());
    }

    // 4. Zero windows: a connection that never grants the server any window, with a
    // stream whose upstream would answer.
    let mut builder = h2::client::Builder::new();
    builder.initial_window_size(0);
    findings.zero_window_outcome = match h2_connect(&tls, hbone, builder).await {
        Ok(mut h2) => match h2.send_request(connect_request(&target), false) {
            Ok((response, mut send)) => {
                let _ = send.send_data(Bytes::from(vec![0u8; 64 * 1024]), false);
                match tokio::time::timeout(scaled(Duration::from_secs(5)), response).await {
                    Ok(Ok(r)) => format!("status {}", r.status()),
                    Ok(Err(e)) => format!("error {e}"),
                    Err(_) => "no answer".into(),
                }
            }
            Err(e) => format!("refused {e}"),
        },
        Err(e) => format!("connect failed {e:#}"),
    };
    // 5. Thousands of streams: 30 connections of up to 100 CONNECTs each, all kept open.
    {
        let mut kept = Vec::new();
        for _ in 0..30 {
            let Ok(h2) = h2_connect(&tls, hbone, h2::client::Builder::new()).await else {
                continue;
            };
            let mut responses = Vec::new();
            for _ in 0..100 {
                let Ok(mut ready) = h2.clone().ready().await else {
                    break;
                };
                match ready.send_request(connect_request(&target), false) {
                    Ok((response, send)) => responses.push((response, send)),
                    Err(_) => break,
                }
            }
            for (response, send) in responses {
                match tokio::time::timeout(scaled(Duration::from_secs(10)), response).await {
                    Ok(Ok(r)) if r.status() == 200 => {
                        findings.streams_accepted += 1;
                        kept.push((r, send));
                    }
                    _ => findings.streams_refused += 1,
                }
            }
            // Dropping the handle leaves the connection open while its streams are.
            drop(h2);
        }
        findings.fds_while_streams_held = fds(agent_pid)?;
        drop(kept);
    }
    Ok(findings)
}

/// Sends a CONNECT with `pads` headers of 8 KiB each; the response status, or None when
/// the connection ended first.
async fn oversized_connect(
    tls: &tokio_rustls::TlsConnector,
    hbone: SocketAddr,
    target: &str,
    pads: usize,
) -> Result<Option<u16>> {
    let mut h2 = h2_connect(tls, hbone, h2::client::Builder::new()).await?;
    let mut request = connect_request(target);
    let pad = "x".repeat(8 * 1024);
    for i in 0..pads {
        let name = format!("x-pad-{i}").parse::<http::HeaderName>()?;
        request.headers_mut().insert(name, pad.parse()?);
    }
    let (response, _send) = h2.send_request(request, false)?;
    Ok(
        match tokio::time::timeout(scaled(Duration::from_secs(10)), response).await {
            Ok(Ok(r)) => Some(r.status().as_u16()),
            Ok(Err(e)) => {
                eprintln!("CONNECT with {pads} x 8 KiB of headers: {e}");
                None
            }
            Err(_) => None,
        },
    )
}

async fn h2_connect(
    tls: &tokio_rustls::TlsConnector,
    hbone: SocketAddr,
    builder: h2::client::Builder,
) -> Result<h2::client::SendRequest<Bytes>> {
    let tcp = tokio::net::TcpStream::connect(hbone).await?;
    let io = tls.connect(server_name(hbone), tcp).await?;
    let (send, connection) = builder.handshake::<_, Bytes>(io).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(send)
}

fn connect_request(target: &str) -> http::Request<()> {
    http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(target)
        .body(())
        .expect("a CONNECT request with an ip:port authority is valid")
}

fn tls_connector(identity: &Identity) -> Result<tokio_rustls::TlsConnector> {
    let config = identity.client_config()?;
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

fn server_name(addr: SocketAddr) -> rustls::pki_types::ServerName<'static> {
    rustls::pki_types::ServerName::IpAddress(addr.ip().into())
}

/// One HTTP/2 frame: 24-bit length, type, flags, stream id, payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// An HPACK "literal header field without indexing, new name" with 7-bit-prefix lengths.
fn hpack_literal(name: &str, value: &str) -> Vec<u8> {
    let mut out = vec![0x00];
    hpack_int(&mut out, name.len());
    out.extend_from_slice(name.as_bytes());
    hpack_int(&mut out, value.len());
    out.extend_from_slice(value.as_bytes());
    out
}

fn hpack_int(out: &mut Vec<u8>, mut n: usize) {
    if n < 0x7f {
        out.push(n as u8);
        return;
    }
    out.push(0x7f);
    n -= 0x7f;
    while n >= 0x80 {
        out.push((n % 0x80) as u8 | 0x80);
        n /= 0x80;
    }
    out.push(n as u8);
}

/// Whether a GOAWAY frame starts anywhere in these bytes (good enough: the server's first
/// frames are SETTINGS, WINDOW_UPDATE, then GOAWAY).
fn goaway_in(bytes: &[u8]) -> bool {
    let mut at = 0;
    while at + 9 <= bytes.len() {
        let len = u32::from_be_bytes([0, bytes[at], bytes[at + 1], bytes[at + 2]]) as usize;
        if bytes[at + 3] == 0x7 {
            return true;
        }
        at += 9 + len;
    }
    false
}

/// The limits every test here runs with, plus `extra`. With `WEFT_TEST_NO_LIMITS` set
/// none are written, so that the same tests measure an agent that has no `agent.limits`
/// (the state before issue "Hardening").
fn set_limits(node: &TestNode, extra: serde_json::Value) {
    if std::env::var_os("WEFT_TEST_NO_LIMITS").is_some() {
        return;
    }
    let mut limits = json!({
        "podConnections": POD_CONNECTIONS,
        "nodeConnections": NODE_CONNECTIONS,
    });
    if let (Some(limits), Some(extra)) = (limits.as_object_mut(), extra.as_object()) {
        limits.extend(extra.clone());
    }
    node.set_agent_setting("limits", limits);
}

/// `weft-testapp sink` on `SINK_PORT`, listening.
fn sink(pod: &TestPod) -> Result<TestProcess> {
    let mut cmd = Command::new(testapp_bin());
    cmd.args(["sink", "--port", &SINK_PORT.to_string()]);
    let process = pod.spawn(cmd, "sink")?;
    eventually(Duration::from_secs(10), || {
        if process.output().contains("sink_listening") {
            Ok(())
        } else {
            Err(anyhow!("sink not listening: {}", process.output()))
        }
    })?;
    Ok(process)
}

/// What the agent counted as refusing the flood's connections: over the cap, or, on 15008,
/// admitted but closed when no TLS came within the handshake timeout (10 s: a flood held
/// that long on a loaded machine reaches it).
fn refused_for_the_flood(agent: &TestAgent) -> Result<u64> {
    Ok(denied(agent, "pod_connection_limit")? + denied(agent, "tls_handshake_timeout")?)
}

fn denied(agent: &TestAgent, reason: &str) -> Result<u64> {
    Ok(Scrape::parse(&agent.metrics()?).sum(DENIED, &[("reason", reason)]) as u64)
}

/// The agent's open file descriptors.
fn fds(pid: u32) -> Result<u64> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64)
}

/// The agent's resident memory, KiB.
fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmRSS in /proc/<pid>/status")
}

fn sock(addr: std::net::SocketAddrV4) -> SocketAddr {
    SocketAddr::V4(addr)
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
