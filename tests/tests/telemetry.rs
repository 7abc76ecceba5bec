//! L4 telemetry end to end across two nodes (issue "Identity-based access policy and L4
//! telemetry"): after a known transfer, the TCP byte counters of both reporters equal what
//! the applications sent and received, exactly, with Istio's labels; the access-log line of
//! each end carries the connection's fields; a denied connection is counted by reason and
//! logged with the policy that denied it.

use std::{
    ffi::CString,
    fs::OpenOptions,
    io::{self, Read},
    net::SocketAddr,
    os::{
        fd::AsRawFd,
        unix::{ffi::OsStrExt, fs::OpenOptionsExt},
    },
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use weft_tests::{
    AgentCommand, TestAgent, TestNode,
    app::{self, Mode},
    eventually,
    metrics::Scrape,
    privileged, test_name,
};

#[test]
fn byte_counters_labels_and_access_log_match_a_known_transfer() -> Result<()> {
    privileged!();
    let node1 = TestNode::new(test_name!(), 1)?;
    let node2 = TestNode::new(test_name!(), 2)?;
    node1.connect(&node2)?;
    let client = node1
        .pod("client")
        .service_account("client")
        .label("app", "shop")
        .label("version", "v1")
        .create()?;
    let server = node2
        .pod("server")
        .service_account("server")
        .label("app", "catalog")
        .label("version", "v2")
        .create()?;
    let agent1 = node1.start_agent()?;
    let agent2 = node2.start_agent()?;
    // The hash server reads everything, then answers one line: the two directions differ.
    let _hash = app::serve(&server, PORT, Mode::Hash)?;

    let to = SocketAddr::V4(server.addr(PORT));
    let report = app::send(&client, to, SENT, 5)?;
    assert_eq!(report.sent_bytes, SENT);
    let answered = report.received_bytes;
    ensure!(answered > 0, "the hash server answered nothing: {report:?}");

    let both = [
        ("source", &agent1, "outbound"),
        ("destination", &agent2, "hbone"),
    ];
    for (reporter, agent, direction) in both {
        let labels = [
            ("reporter", reporter),
            ("source_workload", "client"),
            ("source_workload_namespace", "default"),
            ("source_principal", CLIENT_ID),
            ("source_app", "shop"),
            ("source_version", "v1"),
            ("destination_workload", "server"),
            ("destination_workload_namespace", "default"),
            ("destination_principal", SERVER_ID),
            ("destination_app", "catalog"),
            ("destination_version", "v2"),
            ("connection_security_policy", "mutual_tls"),
            ("response_flags", "-"),
        ];
        // Counters move at close; the proxies close a moment after the apps.
        let scrape = eventually(Duration::from_secs(10), || {
            let scrape = Scrape::parse(&agent.metrics()?);
            ensure!(
                scrape.sum("weft_tcp_connections_closed_total", &labels) == 1.0,
                "{reporter}: no closed connection with the expected labels yet; have:\n{:#?}",
                scrape
                    .matching("weft_tcp_connections_closed_total", &[])
                    .collect::<Vec<_>>()
            );
            Ok(scrape)
        })?;
        // Istio's directions: received = request bytes (client → server), sent = response.
        assert_eq!(
            scrape.sum("weft_tcp_received_bytes_total", &labels),
            SENT as f64,
            "{reporter}: request bytes"
        );
        assert_eq!(
            scrape.sum("weft_tcp_sent_bytes_total", &labels),
            answered as f64,
            "{reporter}: response bytes"
        );
        assert_eq!(
            scrape.sum("weft_tcp_connections_opened_total", &labels),
            1.0,
            "{reporter}: opened"
        );

        let line = access_line(agent, direction, to)?;
        for (key, expected) in [
            ("reporter", json!(reporter)),
            ("src.identity", json!(CLIENT_ID)),
            ("src.workload", json!("client")),
            ("src.namespace", json!("default")),
            ("dst.addr", json!(to.to_string())),
            ("dst.identity", json!(SERVER_ID)),
            ("dst.workload", json!("server")),
            ("dst.namespace", json!("default")),
            ("bytes_sent", json!(SENT)),
            ("bytes_received", json!(answered)),
            ("connection_security_policy", json!("mutual_tls")),
            ("response_flags", json!("-")),
            ("error", Value::Null),
        ] {
            assert_eq!(
                line[key], expected,
                "{reporter} access log `{key}`: {line:#}"
            );
        }
        ensure!(
            line["start_time"].as_str().is_some_and(|t| t.contains('T')),
            "start_time is RFC 3339: {line:#}"
        );
        ensure!(line["duration_ms"].is_u64(), "duration_ms: {line:#}");
    }
    // The source address the server's proxy saw is the client pod's own.
    let inbound = access_line(&agent2, "hbone", to)?;
    ensure!(
        inbound["src.addr"]
            .as_str()
            .is_some_and(|a| a.starts_with(&format!("{}:", client.ip()))),
        "src.addr: {inbound:#}"
    );
    ensure!(inbound["policy"] == json!("allow"), "policy: {inbound:#}");

    // A denial: counted by reason, logged with the policy.
    node2.set_policies(json!([{
        "name": "no-shop", "action": "DENY",
        "rules": [{ "from": [{ "principals": [CLIENT_ID] }] }],
    }]));
    agent2.reload(&node2)?;
    eventually(Duration::from_secs(10), || {
        let r = app::send_text(&client, to, "denied");
        ensure!(r.is_err(), "still allowed: {r:?}");
        Ok(())
    })?;
    let denied = eventually(Duration::from_secs(10), || {
        agent2
            .access_log()
            .into_iter()
            .find(|l| l["policy"] == json!("deny"))
            .context("no access-log line for the denial yet")
    })?;
    assert_eq!(
        denied["policy.name"],
        json!("default/no-shop"),
        "{denied:#}"
    );
    assert_eq!(
        denied["policy.reason"],
        json!("denied_by_policy"),
        "{denied:#}"
    );
    assert_eq!(denied["response_flags"], json!("RBAC"), "{denied:#}");
    assert_eq!(denied["error"], json!("denied_by_policy"), "{denied:#}");
    let scrape = Scrape::parse(&agent2.metrics()?);
    ensure!(
        scrape.sum(
            "weft_agent_denied_connections_total",
            &[("reason", "denied_by_policy")]
        ) >= 1.0,
        "the denial is counted by reason"
    );
    Ok(())
}

/// A log collector that stops reading the agent's stdout (a container's log pipe backed up
/// behind a slow disk) costs access-log lines, each counted, and never a connection. Until
/// the lines were queued for a writer thread, the first full pipe blocked every worker
/// thread that closed a connection, and with them the whole proxy.
#[test]
fn a_stdout_nobody_reads_costs_counted_access_lines_and_no_connection() -> Result<()> {
    privileged!();
    let node = TestNode::new(test_name!(), 1)?;
    let client = node.pod("client").create()?;
    let server = node.pod("server").create()?;
    let fifo = node.dir().join("agent-stdout.fifo");
    let path = CString::new(fifo.as_os_str().as_bytes())?;
    // SAFETY: `path` is a valid NUL-terminated string.
    let made = unsafe { libc::mkfifo(path.as_ptr(), 0o600) };
    ensure!(made == 0, "mkfifo: {}", io::Error::last_os_error());
    // Opened for reading before the agent opens it for writing (that open waits for a
    // reader), then not read: the pipe fills and stays full.
    let mut stdout = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)?;
    node.set_agent_command(AgentCommand::with_stdout_to(&fifo));
    let mut agent = node.start_agent()?;
    let _echo = app::serve(&server, PORT, Mode::Echo)?;
    let to = SocketAddr::V4(server.addr(PORT));

    // Two lines of ~600 bytes per node-local connection (one per side): 2,000 connections
    // are twice what the pipe and the agent's queue hold together.
    app::churn(&client, to, 2_000)?;
    let dropped = dropped_lines(&agent)?;
    ensure!(dropped > 0.0, "nothing dropped: was stdout read after all?");
    let log = agent.current_log();
    let said = |what: &str| {
        log.lines()
            .filter(|l| l.contains(what) && l.contains("output=\"stdout\""))
            .count()
    };
    assert_eq!(said("output is not keeping up"), 1, "said once:\n{log}");

    // The collector reads again: what was queued arrives, and new lines pass.
    // SAFETY: fcntl on a descriptor this test owns.
    ensure!(unsafe { libc::fcntl(stdout.as_raw_fd(), libc::F_SETFL, 0) } == 0);
    let reader = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        stdout.read_to_end(&mut bytes).map(|_| bytes)
    });
    eventually(Duration::from_secs(10), || {
        let log = agent.current_log();
        ensure!(log.contains("output keeps up again"), "not caught up yet");
        Ok(())
    })?;
    app::churn(&client, to, 20)?;
    let closed = eventually(Duration::from_secs(10), || {
        let scrape = Scrape::parse(&agent.metrics()?);
        let closed = scrape.sum("weft_tcp_connections_closed_total", &[]);
        ensure!(
            closed >= 2.0 * 2_020.0,
            "{closed} connections closed so far"
        );
        Ok(closed)
    })?;
    assert_eq!(
        dropped_lines(&agent)?,
        dropped,
        "a pipe that is read drops nothing"
    );

    // The agent ends: its last lines are written before it exits, then the pipe closes.
    agent.sigterm();
    ensure!(agent.wait_exit(Duration::from_secs(30))?.success());
    let bytes = reader.join().expect("reader thread")?;
    let text = String::from_utf8(bytes)?;
    let mut lines = 0.0;
    for line in text.lines() {
        let record: Value =
            serde_json::from_str(line).with_context(|| format!("not one JSON line: {line}"))?;
        ensure!(record["kind"] == "access", "{line}");
        lines += 1.0;
    }
    println!("{closed} connections closed: {lines} access lines written, {dropped} dropped");
    assert_eq!(
        lines + dropped,
        closed,
        "every connection's line was written or counted"
    );
    Ok(())
}

fn dropped_lines(agent: &TestAgent) -> Result<f64> {
    Ok(Scrape::parse(&agent.metrics()?).sum("weft_access_log_lines_dropped_total", &[]))
}

/// The access-log line an agent wrote for the connection to `to` in `direction`.
fn access_line(agent: &TestAgent, direction: &str, to: SocketAddr) -> Result<Value> {
    eventually(Duration::from_secs(10), || {
        agent
            .access_log()
            .into_iter()
            .find(|l| l["direction"] == json!(direction) && l["dst.addr"] == json!(to.to_string()))
            .with_context(|| format!("no {direction} access-log line for {to} yet"))
    })
}

const PORT: u16 = 8080;
/// Request bytes of the known transfer.
const SENT: u64 = 3 * 1024 * 1024 + 7;
const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/server";
