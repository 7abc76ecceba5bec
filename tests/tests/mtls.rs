//! Mutual TLS between pods, end to end (issue "Mutual TLS between pods"): pod-to-pod
//! traffic crosses nodes as HBONE (HTTP/2 CONNECT over TLS 1.3) with SPIFFE identities on
//! both ends; peers with the wrong identity, an untrusted CA or an expired certificate are
//! refused with the reason logged; STRICT, PERMISSIVE and DISABLED behave as documented;
//! certificates rotate under a busy connection; the CA refuses identities a node does not
//! run; short connections share pooled HBONE connections.
//!
//! Every test checks what crossed the wire (a capture on the node-to-node link, read with
//! tshark), what the applications received (sha256 on both ends) and what the agents
//! recorded (`/debug/connections`, `/status`, the log). Needs root; see
//! `weft_tests::can_run_privileged`.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    process::Command,
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use weft_tests::{
    TestAgent, TestNode, TestPod,
    app::{self, Mode},
    assert_eventually, eventually,
    eventually::patience,
    privileged, scaled, test_name,
    wire::{Capture, TLS13, X25519MLKEM768},
};

#[test]
fn cross_node_traffic_is_tls13_only_with_both_identities_and_no_plaintext() -> Result<()> {
    privileged!();
    let (node1, node2) = two_nodes(test_name!())?;
    let client = node1.pod("client").service_account("client").create()?;
    let server = node2.pod("server").service_account("server").create()?;
    let agent1 = node1.start_agent()?;
    let agent2 = node2.start_agent()?;
    let echo = app::serve(&server, ECHO_PORT, Mode::Echo)?;
    let capture = Capture::on_node(&node1, &node1.link_to(&node2), "tcp")?;

    let to = sock(server.addr(ECHO_PORT));
    let marker = format!("weft-plaintext-marker-{}", std::process::id());
    let text = app::send_text(&client, to, &marker)?;
    assert_eq!(
        text.reply.as_deref(),
        Some(marker.as_str()),
        "echoed intact"
    );
    let bulk = app::send(&client, to, 4 << 20, 7)?;
    assert_eq!(
        bulk.received_sha256, bulk.sent_sha256,
        "4 MiB echoed intact"
    );
    echo.wait_closed_where(|c| c.received_sha256 == bulk.sent_sha256);

    // Not a short capture: it holds at least what the apps sent both ways (TLS only adds).
    let pcap = capture.stop_after(2 * (marker.len() as u64 + (4 << 20)))?;
    ensure!(
        !pcap.contains(marker.as_bytes()),
        "the payload marker crossed the node link in plaintext ({})",
        pcap.file.display()
    );
    let tls = pcap.tls_summary(HBONE_PORT)?;
    ensure!(
        !tls.server_hello_versions.is_empty(),
        "no TLS handshake on the link: {tls:?}"
    );
    ensure!(
        tls.server_hello_versions.iter().all(|v| *v == Some(TLS13)),
        "every handshake must negotiate TLS 1.3: {tls:?}"
    );
    ensure!(
        tls.server_hello_groups
            .iter()
            .all(|g| *g == Some(X25519MLKEM768)),
        "weft to weft prefers the post-quantum hybrid key exchange: {tls:?}"
    );
    ensure!(
        tls.segments_off_port == 0,
        "all data between the nodes goes to HBONE port {HBONE_PORT}: {tls:?}"
    );

    let client_id = spiffe("default", "client");
    let server_id = spiffe("default", "server");
    let out = agent1.expect_record("client's outbound", |r| {
        r.direction == "outbound" && r.dst == to.to_string() && r.error.is_none()
    });
    assert_eq!(out.src_identity.as_deref(), Some(client_id.as_str()));
    assert_eq!(out.dst_identity.as_deref(), Some(server_id.as_str()));
    let inbound = agent2.expect_record("server's HBONE inbound", |r| {
        r.direction == "hbone" && r.dst == to.to_string() && r.error.is_none()
    });
    assert_eq!(inbound.src_identity.as_deref(), Some(client_id.as_str()));
    assert_eq!(inbound.dst_identity.as_deref(), Some(server_id.as_str()));
    assert!(
        inbound.src.starts_with(&format!("{}:", client.ip())),
        "HBONE comes from the client pod's own address: {inbound:?}"
    );

    // Nothing listens on the server's port 9: its proxy answers 503 and the client app
    // sees its connection reset, not a hang.
    let closed_port = sock(server.addr(9));
    let seen = agent1.newest_record_id()?;
    expect_reset(&client, closed_port, "anyone?")?;
    agent1.expect_new_record(seen, "503 from the peer", |r| {
        r.dst == closed_port.to_string() && r.error.as_deref() == Some("upstream_unreachable")
    });
    Ok(())
}

#[test]
fn strict_refuses_plaintext_permissive_accepts_it_disabled_skips_mtls() -> Result<()> {
    privileged!();
    let node = hbone_node(test_name!())?;
    let outsider = node.pod("outsider").enrolled(false).create()?;
    let meshed = node.pod("meshed").service_account("meshed").create()?;
    let legacy = node
        .pod("legacy")
        .service_account("legacy")
        .mtls_mode("DISABLED")
        .create()?;
    let strict = node
        .pod("strict")
        .service_account("strict")
        .mtls_mode("STRICT")
        .create()?;
    let permissive = node
        .pod("permissive")
        .service_account("permissive")
        .create()?;
    let agent = node.start_agent()?;
    let strict_app = app::serve(&strict, ECHO_PORT, Mode::Echo)?;
    let _permissive_app = app::serve(&permissive, ECHO_PORT, Mode::Echo)?;
    let _legacy_app = app::serve(&legacy, ECHO_PORT, Mode::Echo)?;
    let _outsider_app = app::serve(&outsider, ECHO_PORT, Mode::Echo)?;

    // Plaintext from outside the mesh: STRICT resets it, PERMISSIVE lets it in.
    let seen = agent.newest_record_id()?;
    expect_reset(&outsider, sock(strict.addr(ECHO_PORT)), "plaintext")?;
    agent.expect_new_record(seen, "STRICT refusal", |r| {
        r.pod == strict.pod_ref()
            && r.direction == "inbound"
            && r.error.as_deref() == Some("plaintext_refused_strict")
    });
    assert_eventually(Duration::from_secs(5), || {
        ensure!(
            agent
                .log()
                .contains("plaintext connection refused: the pod is STRICT"),
            "no log line for the STRICT refusal"
        );
        Ok(())
    });
    ensure!(
        strict_app.accepted().is_empty(),
        "the STRICT pod's app accepted plaintext: {:?}",
        strict_app.accepted()
    );
    let accepted = app::send_text(&outsider, sock(permissive.addr(ECHO_PORT)), "hello")?;
    assert_eq!(accepted.reply.as_deref(), Some("hello"));

    // From inside the mesh, STRICT is reached over HBONE.
    let to = sock(strict.addr(ECHO_PORT));
    let seen = agent.newest_record_id()?;
    assert_eq!(
        app::send_text(&meshed, to, "hi")?.reply.as_deref(),
        Some("hi")
    );
    let hbone = agent.expect_new_record(seen, "HBONE into STRICT", |r| {
        r.direction == "hbone" && r.dst == to.to_string() && r.error.is_none()
    });
    // Exactly one connection ever reached the STRICT app: this one, not the plaintext.
    let accepted = strict_app.wait_accepted(1);
    ensure!(
        accepted.len() == 1,
        "the STRICT app accepted {accepted:?}, one of them refused plaintext"
    );
    assert_eq!(
        hbone.src_identity.as_deref(),
        Some(spiffe("default", "meshed").as_str())
    );

    // DISABLED on either end: plaintext both ways, no identities.
    // New record ids: the outsider's plaintext into the permissive pod above must not
    // answer for these.
    for (from, to_pod) in [(&legacy, &permissive), (&meshed, &legacy)] {
        let to = sock(to_pod.addr(ECHO_PORT));
        let seen = agent.newest_record_id()?;
        assert_eq!(
            app::send_text(from, to, "plain")?.reply.as_deref(),
            Some("plain")
        );
        let plain = agent.expect_new_record(seen, "plaintext into the destination", |r| {
            r.direction == "inbound" && r.dst == to.to_string() && r.error.is_none()
        });
        assert_eq!(plain.src_identity, None);
        assert_eq!(plain.dst_identity, None);
        ensure!(
            plain.src.starts_with(&format!("{}:", from.ip())),
            "plaintext comes straight from {}: {plain:?}",
            from.name()
        );
    }

    // Outside the mesh: plaintext passthrough.
    let to = sock(outsider.addr(ECHO_PORT));
    let seen = agent.newest_record_id()?;
    assert_eq!(
        app::send_text(&meshed, to, "out")?.reply.as_deref(),
        Some("out")
    );
    let passthrough = agent.expect_new_record(seen, "passthrough", |r| {
        r.direction == "outbound" && r.dst == to.to_string() && r.error.is_none()
    });
    assert_eq!(passthrough.dst_identity, None);
    Ok(())
}

#[test]
fn a_peer_with_another_identity_is_refused_and_logged() -> Result<()> {
    privileged!();
    let (node1, node2) = two_nodes(test_name!())?;
    let client = node1.pod("client").service_account("client").create()?;
    let server = node2.pod("server").service_account("server").create()?;
    let agent1 = node1.start_agent()?;
    let _agent2 = node2.start_agent()?;
    let echo = app::serve(&server, ECHO_PORT, Mode::Echo)?;

    // Node 1 believes the server runs as `payments`; node 2 (rightly) proves `server`.
    let mut config = node1.config();
    for w in config["workloads"].as_array_mut().context("workloads")? {
        if w["name"] == "server" {
            w["serviceAccount"] = json!("payments");
        }
    }
    agent1.rewrite_config(&config)?;
    wait_for_config(&agent1, |dump| dump.contains("payments"))?;

    let to = sock(server.addr(ECHO_PORT));
    let seen = agent1.newest_record_id()?;
    expect_reset(&client, to, "for payments only")?;
    ensure!(echo.accepted().is_empty(), "the server app was reached");
    agent1.expect_new_record(seen, "identity mismatch", |r| {
        r.dst == to.to_string() && r.error.as_deref() == Some("identity_mismatch")
    });
    expect_log(
        &agent1,
        &["identity_mismatch", &spiffe("default", "payments")],
    )?;
    Ok(())
}

#[test]
fn a_peer_from_an_untrusted_ca_is_refused_on_both_sides() -> Result<()> {
    privileged!();
    let (node1, node2) = two_nodes(test_name!())?;
    // Node 2 signs with a CA of its own that node 1 does not trust (and vice versa).
    node2.use_own_ca()?;
    let client = node1.pod("client").service_account("client").create()?;
    let server = node2.pod("server").service_account("server").create()?;
    let agent1 = node1.start_agent()?;
    let agent2 = node2.start_agent()?;
    let echo = app::serve(&server, ECHO_PORT, Mode::Echo)?;

    let to = sock(server.addr(ECHO_PORT));
    let seen = agent1.newest_record_id()?;
    expect_reset(&client, to, "secret")?;
    ensure!(echo.accepted().is_empty(), "the server app was reached");
    agent1.expect_new_record(seen, "client refuses the server", |r| {
        r.dst == to.to_string() && r.error.as_deref() == Some("untrusted_ca")
    });
    expect_log(&agent1, &["untrusted_ca"])?;
    // The server refuses too, or sees the client's alert: either way it logs why.
    expect_log(&agent2, &["HBONE handshake refused"])?;
    Ok(())
}

#[test]
fn an_expired_client_certificate_is_refused_and_logged() -> Result<()> {
    privileged!();
    let node = hbone_node(test_name!())?;
    let server = node.pod("server").service_account("server").create()?;
    let agent = node.start_agent()?;
    let echo = app::serve(&server, ECHO_PORT, Mode::Echo)?;

    // A certificate for a real identity, signed by the real CA, expired an hour ago.
    let ca = node.ensure_ca()?;
    let dir = node.dir().join("expired");
    std::fs::create_dir_all(&dir)?;
    let expired = issue_expired(&ca.cert, &ca.key, &spiffe("default", "client"), &dir)?;
    let mut cmd = Command::new("openssl");
    cmd.args([
        "s_client",
        "-connect",
        &format!("{}:{HBONE_PORT}", server.ip()),
    ]);
    // -ign_eof: stdin is empty, yet openssl reads on until the agent has answered.
    cmd.args(["-tls1_3", "-alpn", "h2", "-ign_eof", "-cert"])
        .arg(&expired.0);
    cmd.arg("-key").arg(&expired.1);
    cmd.arg("-CAfile").arg(&ca.cert);
    let refused_before = agent.denied_total("expired_certificate")?;
    let seen = agent.newest_record_id()?;
    let peer = node
        .spawn(cmd, "openssl-expired")?
        .wait(scaled(Duration::from_secs(20)))?;
    // What came back over the wire: the agent's certificate_expired alert (number 45).
    ensure!(
        peer.output.contains("alert certificate expired")
            && peer.output.contains("SSL alert number 45"),
        "openssl did not receive a certificate_expired alert:\n{}",
        peer.output
    );
    // The agent counted exactly this refusal, and logged why; it never became a connection,
    // and the application was never reached.
    eventually(Duration::from_secs(10), || {
        let refused = agent.denied_total("expired_certificate")?;
        ensure!(
            refused == refused_before + 1,
            "denied_connections_total{{reason=expired_certificate}} is {refused}, was \
             {refused_before}"
        );
        Ok(())
    })?;
    expect_log(&agent, &["HBONE handshake refused", "expired_certificate"])?;
    assert_eq!(
        agent.newest_record_id()?,
        seen,
        "a refused handshake is no connection"
    );
    ensure!(echo.accepted().is_empty(), "the server app was reached");
    Ok(())
}

#[test]
fn a_busy_connection_survives_three_certificate_rotations() -> Result<()> {
    privileged!();
    let node = hbone_node(test_name!())?;
    node.set_agent_setting("certLifetime", json!("10s"));
    let client = node.pod("client").service_account("client").create()?;
    let server = node.pod("server").service_account("server").create()?;
    let agent = node.start_agent()?;
    let echo = app::serve(&server, ECHO_PORT, Mode::Echo)?;

    let client_id = spiffe("default", "client");
    let server_id = spiffe("default", "server");
    let mut serials: [BTreeSet<String>; 2] = Default::default();
    let mut sample = |agent: &TestAgent| -> Result<()> {
        for (id, seen) in [&client_id, &server_id].into_iter().zip(serials.iter_mut()) {
            if let Some(serial) = cert_serial(agent, id)? {
                seen.insert(serial);
            }
        }
        Ok(())
    };

    // 60 s of steady traffic on one connection (8 MiB each way), echoed back.
    let bytes = 8 << 20;
    let running = app::start_send_paced(&client, sock(server.addr(ECHO_PORT)), bytes, 3, BUSY)?;
    let started = std::time::Instant::now();
    while started.elapsed() < BUSY {
        sample(&agent)?;
        std::thread::sleep(patience());
    }
    let report = running.finish()?;
    sample(&agent)?;
    assert_eq!(report.sent_bytes, bytes);
    assert_eq!(report.received_bytes, bytes, "no byte lost");
    assert_eq!(
        report.received_sha256, report.sent_sha256,
        "no byte changed"
    );
    echo.wait_closed_where(|c| c.received_sha256 == report.sent_sha256);
    for (id, seen) in [&client_id, &server_id].into_iter().zip(&serials) {
        ensure!(
            seen.len() >= 4,
            "{id}: expected the first certificate and at least three renewals in 60 s, saw \
             serials {seen:?}"
        );
    }
    let record = agent.expect_record("the busy connection", |r| {
        r.direction == "hbone" && r.bytes_sent == bytes && r.error.is_none()
    });
    assert_eq!(record.src_identity.as_deref(), Some(client_id.as_str()));
    Ok(())
}

#[test]
fn the_ca_refuses_an_identity_the_node_does_not_run() -> Result<()> {
    privileged!();
    // Both pods on this node, joined node-locally (the default): without the CA's
    // certificate the node does not vouch for the client either.
    let node = TestNode::new(test_name!(), 1)?;
    let ca = node.ensure_ca()?;
    // A standalone CA on the node's loopback: the node may have `default/server` only.
    let token = "node1-token-for-tests";
    let dir = node.dir().join("ca-server");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("token"), token)?;
    let ca_yaml = json!({
        "listen": CA_ADDR,
        "trustDomain": "cluster.local",
        "caCert": ca.cert.display().to_string(),
        "caKey": ca.key.display().to_string(),
        "serverNames": ["127.0.0.1"],
        "nodes": [{
            "name": node.node_name(),
            "token": token,
            "allow": [{ "namespace": "default", "serviceAccount": "server" }],
        }],
    });
    std::fs::write(dir.join("ca.yaml"), serde_yaml::to_string(&ca_yaml)?)?;
    let mut cmd = Command::new(app::weft_bin());
    cmd.args(["ca", "--config"]).arg(dir.join("ca.yaml"));
    cmd.env("NO_COLOR", "1");
    let ca_server = node.spawn(cmd, "weft-ca")?;
    eventually(Duration::from_secs(10), || {
        ensure!(
            ca_server.output().contains("listening"),
            "CA not listening yet: {}",
            ca_server.output()
        );
        Ok(())
    })?;

    node.without_mtls();
    node.set_agent_setting(
        "ca",
        json!({ "remote": {
            "addr": CA_ADDR,
            "serverName": "127.0.0.1",
            "rootCert": ca.cert.display().to_string(),
            "tokenFile": dir.join("token").display().to_string(),
        }}),
    );
    let client = node.pod("client").service_account("client").create()?;
    let server = node.pod("server").service_account("server").create()?;
    let agent = TestAgent::spawn_only(&node)?;
    let echo = app::serve(&server, ECHO_PORT, Mode::Echo)?;

    let server_id = spiffe("default", "server");
    let client_id = spiffe("default", "client");
    assert_eventually(Duration::from_secs(20), || {
        ensure!(
            cert_serial(&agent, &server_id)?.is_some(),
            "the allowed identity has no certificate yet"
        );
        let state = cert_field(&agent, &client_id, "lastError")?.unwrap_or_default();
        ensure!(
            state.contains("identity_not_allowed"),
            "the refused identity should say why: {state:?}"
        );
        Ok(())
    });
    ensure!(
        cert_serial(&agent, &client_id)?.is_none(),
        "the CA signed it"
    );
    assert_eventually(Duration::from_secs(5), || {
        let log = ca_server.output();
        ensure!(
            log.contains("identity_not_allowed") && log.contains(client_id.as_str()),
            "the CA did not log the refusal:\n{log}"
        );
        Ok(())
    });
    // The pod without a certificate fails closed: its mesh traffic is reset, never sent
    // in plaintext.
    let to = sock(server.addr(ECHO_PORT));
    let seen = agent.newest_record_id()?;
    expect_reset(&client, to, "no cert, no entry")?;
    ensure!(echo.accepted().is_empty(), "the server app was reached");
    agent.expect_new_record(seen, "no certificate", |r| {
        r.dst == to.to_string() && r.error.as_deref() == Some("no_certificate")
    });
    Ok(())
}

#[test]
fn short_connections_share_a_handful_of_pooled_hbone_connections() -> Result<()> {
    privileged!();
    let (node1, node2) = two_nodes(test_name!())?;
    let client = node1.pod("client").service_account("client").create()?;
    let server = node2.pod("server").service_account("server").create()?;
    let agent1 = node1.start_agent()?;
    let agent2 = node2.start_agent()?;
    let echo = app::serve(&server, ECHO_PORT, Mode::Echo)?;
    let capture = Capture::on_node(&node1, &node1.link_to(&node2), "tcp")?;

    let to = sock(server.addr(ECHO_PORT));
    app::churn(&client, to, CHURN)?;
    // The client's agent agrees: a handful of handshakes for all those connections.
    let pool = &agent1.status()?["hbone_pool"];
    let handshakes = pool["handshakes"]
        .as_u64()
        .context("hbone_pool.handshakes")?;
    ensure!(
        (1..=3).contains(&handshakes),
        "{CHURN} connections took {handshakes} TLS handshakes: {pool}"
    );
    let pcap = capture.stop()?;
    let tls = pcap.tls_summary(HBONE_PORT)?;
    ensure!(
        (1..=3).contains(&tls.connections),
        "{CHURN} short connections should ride on a handful of HBONE connections, the link \
         saw {} TCP connections to {HBONE_PORT}: {tls:?}",
        tls.connections
    );
    assert_eq!(
        echo.closed().len(),
        CHURN,
        "the server app saw every connection"
    );
    let records = agent2.connections()?;
    let streams = records
        .all()
        .filter(|r| r.direction == "hbone" && r.dst == to.to_string() && r.error.is_none())
        .count();
    assert_eq!(
        streams, CHURN,
        "one HBONE stream per application connection"
    );
    Ok(())
}

/// A connection from `from` to `to` is refused: the application sees its connection reset,
/// not an answer, a clean close or a hang.
fn expect_reset(from: &TestPod, to: SocketAddr, text: &str) -> Result<()> {
    match app::send_text(from, to, text) {
        Ok(report) => bail!("{} → {to} should be refused, got {report:?}", from.name()),
        Err(e) => {
            ensure!(
                app::is_reset(&e),
                "{} → {to}: a refusal must reset the connection: {e:#}",
                from.name()
            );
            Ok(())
        }
    }
}

/// One node whose pods talk to each other over HBONE too (`mesh.sameNode: HBONE`): what
/// these tests check is the mutual TLS.
fn hbone_node(test: &str) -> Result<TestNode> {
    let node = TestNode::new(test, 1)?;
    node.set_mesh(json!({ "excludedPorts": [22], "sameNode": "HBONE" }));
    Ok(node)
}

/// Two joined nodes with mutual TLS (one CA).
fn two_nodes(test: &str) -> Result<(TestNode, TestNode)> {
    let node1 = TestNode::new(test, 1)?;
    let node2 = TestNode::new(test, 2)?;
    node1.connect(&node2)?;
    Ok((node1, node2))
}

/// Issues a certificate for `identity` signed by the CA, whose validity ended an hour ago;
/// returns the paths of the certificate and its key.
fn issue_expired(
    ca_cert: &std::path::Path,
    ca_key: &std::path::Path,
    identity: &str,
    dir: &std::path::Path,
) -> Result<(std::path::PathBuf, std::path::PathBuf)> {
    let ca_key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(ca_key)?)?;
    let issuer = rcgen::Issuer::from_ca_cert_pem(&std::fs::read_to_string(ca_cert)?, ca_key)?;
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(identity.try_into()?)];
    let now = SystemTime::now();
    params.not_before = (now - Duration::from_secs(2 * 3600)).into();
    params.not_after = (now - Duration::from_secs(3600)).into();
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
    ];
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let cert = params.signed_by(&key, &issuer)?;
    let (cert_path, key_path) = (dir.join("expired.crt"), dir.join("expired.key"));
    std::fs::write(&cert_path, cert.pem())?;
    std::fs::write(&key_path, key.serialize_pem())?;
    Ok((cert_path, key_path))
}

/// The serial of the current certificate of `identity` in the agent's `/status`.
fn cert_serial(agent: &TestAgent, identity: &str) -> Result<Option<String>> {
    cert_field(agent, identity, "serial")
}

fn cert_field(agent: &TestAgent, identity: &str, field: &str) -> Result<Option<String>> {
    let status = agent.status()?;
    let certs = status["certificates"]
        .as_array()
        .with_context(|| format!("no `certificates` in /status: {status:#}"))?;
    Ok(certs
        .iter()
        .find(|c| c["identity"] == identity)
        .and_then(|c| match &c[field] {
            Value::Null => None,
            Value::String(s) => Some(s.clone()),
            other => Some(other.to_string()),
        }))
}

/// Waits until the agent's `/config_dump` satisfies `pred` (a reload was applied).
fn wait_for_config(agent: &TestAgent, pred: impl Fn(&str) -> bool) -> Result<()> {
    eventually(Duration::from_secs(10), || {
        let dump = agent.get("/config_dump")?.body;
        if pred(&dump) {
            Ok(())
        } else {
            bail!("reload not applied yet")
        }
    })
}

fn expect_log(agent: &TestAgent, needles: &[&str]) -> Result<()> {
    eventually(Duration::from_secs(10), || {
        let log = agent.log();
        let found = log.lines().any(|l| needles.iter().all(|n| l.contains(n)));
        ensure!(found, "no log line with all of {needles:?}");
        Ok(())
    })
}

fn spiffe(namespace: &str, service_account: &str) -> String {
    format!("spiffe://cluster.local/ns/{namespace}/sa/{service_account}")
}

fn sock(addr: std::net::SocketAddrV4) -> SocketAddr {
    SocketAddr::V4(addr)
}

const ECHO_PORT: u16 = 8080;
const HBONE_PORT: u16 = 15008;
const CA_ADDR: &str = "127.0.0.1:15012";
const CHURN: usize = 500;
/// How long the rotation test keeps one connection busy (10 s certificates: ≥ 3 renewals).
const BUSY: Duration = Duration::from_secs(60);
