//! Node-local connections (`mesh.sameNode: LOCAL`, the default; issue "Data path v2"): two enrolled
//! pods of one node are joined inside the proxy, without HBONE. The tests check what the
//! applications got (sha256 on both ends), that nothing went to a pod's HBONE port, that
//! half-close and resets behave as on a direct TCP connection, that both sides' records,
//! metrics and access-log lines are exact to the byte and say `node_local`, and that the
//! destination's policy still applies: at connect time, and to open connections when it
//! changes. Needs root; see `weft_tests::can_run_privileged`.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener},
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::json;
use sha2::{Digest, Sha256};
use weft_tests::{
    ClientServer, ConnRecord, TestNode, TestPod,
    app::{self, Mode},
    metrics::Scrape,
    privileged, scaled, sys, test_name,
    wire::Capture,
};

/// The server's address at `port`.
fn to(n: &ClientServer, port: u16) -> SocketAddr {
    n.server.addr(port).into()
}

/// The client side's and the server side's records of the connection to `to` that
/// moved `sent` bytes to the server.
fn records(n: &ClientServer, to: SocketAddr, sent: u64) -> (ConnRecord, ConnRecord) {
    let client = n.agent.expect_record("the client side's record", |r| {
        r.direction == "outbound"
            && r.pod == n.client.pod_ref()
            && r.dst == to.to_string()
            && r.bytes_sent == sent
    });
    let server = n.agent.expect_record("the server side's record", |r| {
        r.direction == "local"
            && r.pod == n.server.pod_ref()
            && r.dst == to.to_string()
            && r.bytes_sent == sent
    });
    (client, server)
}

#[test]
fn local_transfers_arrive_whole_with_exact_records_and_never_touch_hbone() -> Result<()> {
    privileged!();
    let n = ClientServer::new(test_name!())?;
    let echo = app::serve(&n.server, ECHO_PORT, Mode::Echo)?;
    let hash = app::serve(&n.server, HASH_PORT, Mode::Hash)?;
    // Nothing may reach a pod's HBONE port, and no byte crosses the node's bridge.
    let hbone = Capture::on_pod(&n.node, &n.server, "any", "tcp port 15008")?;
    let bridge = Capture::on_node(&n.node, "br0", "tcp")?;

    for (i, size) in [1, 64 * KIB, 4 * MIB].into_iter().enumerate() {
        let to = to(&n, ECHO_PORT);
        let sent = app::send(&n.client, to, size, 10 + i as u64)?;
        ensure!(
            sent.received_bytes == size && sent.received_sha256 == sent.sent_sha256,
            "echo of {size} bytes came back different: {sent:?}"
        );
        let got = echo.wait_closed_where(|c| c.received_sha256 == sent.sent_sha256);
        assert_eq!(got.received_bytes, size, "the server app got every byte");
        let (client_side, server_side) = records(&n, to, size);
        for record in [&client_side, &server_side] {
            assert_eq!(record.bytes_received, size, "{record:?}");
            assert_eq!(record.error, None, "{record:?}");
            assert_eq!(record.security.as_deref(), Some("node_local"), "{record:?}");
            assert_eq!(
                record.src_identity.as_deref(),
                Some(CLIENT_ID),
                "{record:?}"
            );
            assert_eq!(
                record.dst_identity.as_deref(),
                Some(SERVER_ID),
                "{record:?}"
            );
        }
    }

    // A bulk transfer, half-closed by the client: the server answers only after its FIN.
    let to = to(&n, HASH_PORT);
    let size = BULK;
    let sent = app::send(&n.client, to, size, 3)?;
    let expected = format!("bytes={size} sha256={} ", sent.sent_sha256);
    let reply = sent.reply.clone().unwrap_or_default();
    ensure!(
        reply.starts_with(&expected),
        "the hash server saw something else than the client sent: {reply:?}, expected {expected:?}"
    );
    hash.wait_closed_where(|c| c.received_sha256 == sent.sent_sha256);
    let (client_side, server_side) = records(&n, to, size);
    assert_eq!(client_side.bytes_received, sent.received_bytes);
    assert_eq!(server_side.bytes_received, sent.received_bytes);

    let hbone = hbone.stop()?;
    ensure!(
        hbone.packet_count() == 0,
        "{} packets went to the server's HBONE port ({})",
        hbone.packet_count(),
        hbone.file.display()
    );
    let bridge = bridge.stop()?;
    ensure!(
        bridge.packet_count() == 0,
        "{} TCP packets crossed the node's bridge ({})",
        bridge.packet_count(),
        bridge.file.display()
    );
    let hbone_records: Vec<ConnRecord> = n
        .agent
        .connections()?
        .all()
        .filter(|r| r.direction == "hbone")
        .cloned()
        .collect();
    ensure!(hbone_records.is_empty(), "HBONE records: {hbone_records:?}");

    // Metrics: both reporters, labelled node_local, exact to the byte (Istio's directions:
    // received = request bytes).
    let requests = (1 + 64 * KIB + 4 * MIB + BULK) as f64;
    let responses = (1 + 64 * KIB + 4 * MIB) as f64 + sent.received_bytes as f64;
    let scrape = Scrape::parse(&n.agent.metrics()?);
    for reporter in ["source", "destination"] {
        let labels = [
            ("reporter", reporter),
            ("connection_security_policy", "node_local"),
            ("source_principal", CLIENT_ID),
            ("destination_principal", SERVER_ID),
        ];
        assert_eq!(
            scrape.sum("weft_tcp_received_bytes_total", &labels),
            requests,
            "{reporter}: request bytes"
        );
        assert_eq!(
            scrape.sum("weft_tcp_sent_bytes_total", &labels),
            responses,
            "{reporter}: response bytes"
        );
        assert_eq!(
            scrape.sum("weft_tcp_connections_closed_total", &labels),
            4.0,
            "{reporter}: connections"
        );
    }
    let lines: Vec<_> = n
        .agent
        .access_log()
        .into_iter()
        .filter(|l| l["dst.addr"] == json!(to.to_string()))
        .collect();
    ensure!(lines.len() == 2, "one access-log line per side: {lines:?}");
    for line in &lines {
        assert_eq!(
            line["connection_security_policy"],
            json!("node_local"),
            "{line}"
        );
        assert_eq!(line["bytes_sent"], json!(size), "{line}");
    }
    Ok(())
}

#[test]
fn a_server_that_half_closes_first_still_gets_every_byte() -> Result<()> {
    privileged!();
    let n = ClientServer::new(test_name!())?;
    // The server says hello and shuts its sending side at once, then reads to the end.
    let server = serve_once(&n.server, PORT, |mut stream| {
        stream.write_all(GREETING)?;
        stream.shutdown(std::net::Shutdown::Write)?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0; 64 * 1024];
        let mut total = 0u64;
        loop {
            let read = stream.read(&mut buf)?;
            if read == 0 {
                break;
            }
            hasher.update(&buf[..read]);
            total += read as u64;
        }
        Ok((total, hex(&hasher.finalize())))
    })?;
    let sent = app::send(&n.client, to(&n, PORT), 4 * MIB, 5)?;
    let (received, sha256) = server.join()?;
    assert_eq!(
        received,
        4 * MIB,
        "the server read every byte after its own FIN"
    );
    assert_eq!(sha256, sent.sent_sha256, "and the bytes are the client's");
    assert_eq!(
        sent.received_bytes,
        GREETING.len() as u64,
        "the client got the greeting, then EOF"
    );
    let (client_side, server_side) = records(&n, to(&n, PORT), 4 * MIB);
    for record in [client_side, server_side] {
        assert_eq!(record.error, None, "a clean end both ways: {record:?}");
        assert_eq!(record.bytes_received, GREETING.len() as u64, "{record:?}");
    }
    Ok(())
}

#[test]
fn a_reset_by_the_server_resets_the_client() -> Result<()> {
    privileged!();
    let n = ClientServer::new(test_name!())?;
    // The server reads a little, then closes with a RST (SO_LINGER 0).
    let server = serve_once(&n.server, PORT, |mut stream| {
        let mut buf = vec![0; 4096];
        stream.read_exact(&mut buf)?;
        socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO))?;
        drop(stream);
        Ok((buf.len() as u64, String::new()))
    })?;
    let running = app::start_send_paced(
        &n.client,
        to(&n, PORT),
        8 * MIB,
        6,
        scaled(Duration::from_secs(4)),
    )?;
    server.join()?;
    app::expect_reset(running.finish(), "a send to a server that reset")?;
    let failed = n
        .agent
        .expect_record("the client side's failed record", |r| {
            r.direction == "outbound" && r.dst == to(&n, PORT).to_string() && r.error.is_some()
        });
    assert_eq!(failed.error.as_deref(), Some("upstream"), "{failed:?}");
    n.agent
        .expect_record("the server side's failed record", |r| {
            r.direction == "local" && r.error.as_deref() == Some("upstream")
        });
    Ok(())
}

#[test]
fn a_policy_change_revokes_an_open_local_connection() -> Result<()> {
    privileged!();
    let n = ClientServer::new(test_name!())?;
    let _echo = app::serve(&n.server, ECHO_PORT, Mode::Echo)?;
    let to = to(&n, ECHO_PORT);
    let running =
        app::start_send_paced(&n.client, to, 4 * MIB, 1, scaled(Duration::from_secs(30)))?;
    let open = n.agent.expect_record("the open connection", |r| {
        r.direction == "local" && r.dst == to.to_string()
    });
    n.node.set_policies(json!([{
        "name": "deny-client", "action": "DENY",
        "selector": { "matchLabels": { "app": "server" } },
        "rules": [{ "from": [{ "principals": [CLIENT_ID] }] }],
    }]));
    n.agent.reload_and_wait(&n.node)?;
    let result = running.finish();
    let Err(e) = result else {
        bail!("the transfer should have been cut by the new policy: {result:?}");
    };
    ensure!(app::is_reset(&e), "a revoked connection is reset: {e:#}");
    let revoked = n.agent.expect_record("the revoked connection", |r| {
        r.direction == "local" && r.error.as_deref() == Some("policy_revoked")
    });
    assert_eq!(revoked.id, open.id, "the connection open before the change");
    n.agent.expect_record("the client side of it", |r| {
        r.direction == "outbound"
            && r.dst == to.to_string()
            && r.error.as_deref() == Some("upstream")
    });
    // The next connection is refused outright, and the application never sees it.
    let refused = app::send(&n.client, to, KIB, 2);
    app::expect_reset(refused, "a send the policy denies")?;
    n.agent.expect_record("the refused connection", |r| {
        r.direction == "local" && r.error.as_deref() == Some("denied_by_policy")
    });
    n.agent.expect_record("its client side", |r| {
        r.direction == "outbound" && r.error.as_deref() == Some("destination_refused")
    });
    Ok(())
}

#[test]
fn a_strict_pod_takes_node_local_connections_and_still_refuses_plaintext() -> Result<()> {
    privileged!();
    let node = TestNode::new(test_name!(), 1)?;
    let client = node.pod("client").service_account("client").create()?;
    let outsider = node.pod("outsider").enrolled(false).create()?;
    let strict = node
        .pod("strict")
        .service_account("server")
        .mtls_mode("STRICT")
        .create()?;
    let agent = node.start_agent()?;
    let echo = app::serve(&strict, ECHO_PORT, Mode::Echo)?;
    let to: SocketAddr = strict.addr(ECHO_PORT).into();

    // The node vouches for the client: a STRICT pod takes it.
    let sent = app::send_text(&client, to, "hi")?;
    assert_eq!(sent.reply.as_deref(), Some("hi"));
    let record = agent.expect_record("the node-local connection", |r| {
        r.direction == "local" && r.dst == to.to_string() && r.error.is_none()
    });
    assert_eq!(
        record.src_identity.as_deref(),
        Some(CLIENT_ID),
        "{record:?}"
    );
    // Plaintext from outside the mesh proves nothing: refused, never delivered.
    let refused = app::send_text(&outsider, to, "plain");
    app::expect_reset(refused, "plaintext into a STRICT pod")?;
    agent.expect_record("the STRICT refusal", |r| {
        r.direction == "inbound" && r.error.as_deref() == Some("plaintext_refused_strict")
    });
    assert_eq!(
        echo.accepted().len(),
        1,
        "only the node-local connection arrived"
    );
    Ok(())
}

/// A one-connection server inside `pod` (its netns), run on a thread: the proxy delivers to
/// it as to any application.
fn serve_once<F>(pod: &TestPod, port: u16, handle: F) -> Result<OneShot>
where
    F: FnOnce(std::net::TcpStream) -> std::io::Result<(u64, String)> + Send + 'static,
{
    let addr: SocketAddr = pod.addr(port).into();
    let listener = sys::in_netns(&pod.netns_path(), move || {
        TcpListener::bind(addr).with_context(|| format!("bind {addr}"))
    })?;
    let thread = std::thread::spawn(move || -> Result<(u64, String)> {
        let (stream, _) = listener.accept()?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        Ok(handle(stream)?)
    });
    Ok(OneShot(thread))
}

struct OneShot(std::thread::JoinHandle<Result<(u64, String)>>);

impl OneShot {
    fn join(self) -> Result<(u64, String)> {
        self.0
            .join()
            .map_err(|_| anyhow::anyhow!("the server thread panicked"))?
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

const ECHO_PORT: u16 = 7000;
const HASH_PORT: u16 = 7001;
const PORT: u16 = 7002;
const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
/// The bulk transfer: large enough to cross many full buffers and windows.
const BULK: u64 = 1024 * MIB;
const GREETING: &[u8] = b"hello, and goodbye\n";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/server";
