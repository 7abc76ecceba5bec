//! Settings changed in a running agent's config file (docs/config.md): the reloadable `mesh:`
//! settings take effect without a restart, and a changed `agent:` section is reported as
//! waiting for one while it changes nothing.
//!
//! "Steered or not" is judged by the hash server, which cannot be fooled: a connect that
//! went around the proxy arrives from the very address the client's socket has
//! (`getsockname`), while a steered one arrives from the proxy's own upstream socket.
//! Needs root; see `weft_tests::can_run_privileged`.

use std::{net::SocketAddr, process::Command, time::Duration};

use anyhow::{Context, Result, bail, ensure};
use serde_json::json;
use weft_tests::{
    TestAgent, TestNode, TestPod,
    app::{self, Mode},
    eventually,
    metrics::Scrape,
    privileged, test_name,
};

#[test]
fn excluded_ports_and_cidrs_are_applied_and_lifted_at_reload() -> Result<()> {
    privileged!();
    let node = TestNode::new(test_name!(), 1)?;
    node.without_mtls();
    let client = node.pod("client").create()?;
    let server = node.pod("server").enrolled(false).create()?;
    let agent = node.start_agent()?;
    let _first = app::serve(&server, PORT, Mode::Hash)?;
    let _second = app::serve(&server, OTHER_PORT, Mode::Hash)?;
    let (first, second) = (
        SocketAddr::V4(server.addr(PORT)),
        SocketAddr::V4(server.addr(OTHER_PORT)),
    );
    let server_cidr = format!("{}/32", server.ip());

    let steps = [
        (json!({ "excludedPorts": [22] }), [Path::Proxy, Path::Proxy]),
        (
            json!({ "excludedPorts": [PORT] }),
            [Path::Direct, Path::Proxy],
        ),
        (
            json!({ "excludedCidrs": [server_cidr] }),
            [Path::Direct, Path::Direct],
        ),
        (json!({}), [Path::Proxy, Path::Proxy]),
    ];
    for (i, (mesh, want)) in steps.into_iter().enumerate() {
        // The first step is the config the agent started with.
        if i > 0 {
            node.set_mesh(mesh.clone());
            agent.reload_and_wait(&node)?;
        }
        // The data path follows the published config a moment later.
        eventually(Duration::from_secs(10), || {
            let seen = [path_of(&client, first)?, path_of(&client, second)?];
            ensure!(seen == want, "mesh {mesh}: {seen:?}, want {want:?}");
            Ok(())
        })?;
        // And stays there.
        for _ in 0..3 {
            let seen = [path_of(&client, first)?, path_of(&client, second)?];
            ensure!(seen == want, "mesh {mesh}: {seen:?} after {want:?}");
        }
    }
    Ok(())
}

#[test]
fn namespace_mtls_modes_are_applied_at_reload() -> Result<()> {
    privileged!();
    let node = TestNode::new(test_name!(), 1)?;
    let insider = node.pod("insider").service_account("client").create()?;
    let outsider = node.pod("outsider").enrolled(false).create()?;
    let server = node
        .pod("server")
        .namespace("payments")
        .service_account("server")
        .create()?;
    let agent = node.start_agent()?;
    let hash = app::serve(&server, PORT, Mode::Hash)?;
    let to = SocketAddr::V4(server.addr(PORT));

    // PERMISSIVE by default: plaintext from outside the mesh gets in.
    transfer(&outsider, to, 1)?;
    transfer(&insider, to, 2)?;

    node.set_mesh(json!({ "mtls": { "namespaces": { "payments": "STRICT" } } }));
    agent.reload_and_wait(&node)?;
    eventually(Duration::from_secs(10), || {
        let seen = hash.closed().len();
        match app::send(&outsider, to, SENT, 3) {
            Ok(report) => bail!("plaintext still accepted: {report:?}"),
            Err(e) => {
                ensure!(app::is_reset(&e), "refused, but not by a reset: {e:#}");
                ensure!(
                    hash.closed().len() == seen,
                    "the server saw the refused connection: {:?}",
                    hash.closed().last()
                );
                Ok(())
            }
        }
    })?;
    // Mutual TLS still gets in, and the refusal is counted as STRICT's.
    transfer(&insider, to, 4)?;
    let scrape = Scrape::parse(&agent.metrics()?);
    ensure!(
        scrape.sum(
            "weft_agent_denied_connections_total",
            &[("reason", "plaintext_refused_strict")]
        ) >= 1.0,
        "the STRICT refusal is not counted: {:?}",
        scrape
            .matching("weft_agent_denied_connections_total", &[])
            .collect::<Vec<_>>()
    );

    // The namespace's exception removed: PERMISSIVE again.
    node.set_mesh(json!({}));
    agent.reload_and_wait(&node)?;
    eventually(Duration::from_secs(10), || transfer(&outsider, to, 5))?;
    Ok(())
}

#[test]
fn access_log_namespaces_are_applied_at_reload() -> Result<()> {
    privileged!();
    let node = TestNode::new(test_name!(), 1)?;
    node.without_mtls();
    let quiet = node.pod("quiet").namespace("quiet").create()?;
    let loud = node.pod("loud").create()?;
    let server = node.pod("server").enrolled(false).create()?;
    let agent = node.start_agent()?;
    let _hash = app::serve(&server, PORT, Mode::Hash)?;
    let to = SocketAddr::V4(server.addr(PORT));

    // On by default, for every namespace.
    eventually(Duration::from_secs(10), || {
        transfer(&quiet, to, 1)?;
        transfer(&loud, to, 2)?;
        let pods: Vec<String> = agent
            .access_log()
            .iter()
            .filter(|l| l["reporter"] == json!("source"))
            .filter_map(|l| l["pod"].as_str().map(String::from))
            .collect();
        ensure!(
            pods.contains(&quiet.pod_ref()) && pods.contains(&loud.pod_ref()),
            "lines of {pods:?}"
        );
        Ok(())
    })?;

    node.set_mesh(json!({ "accessLog": { "namespaces": { "quiet": false } } }));
    agent.reload_and_wait(&node)?;
    eventually(Duration::from_secs(10), || {
        access_logged(&agent, &loud, &quiet, to)
    })?;

    // Off by default, with the namespace as the exception.
    node.set_mesh(json!({ "accessLog": { "enabled": false, "namespaces": { "quiet": true } } }));
    agent.reload_and_wait(&node)?;
    eventually(Duration::from_secs(10), || {
        access_logged(&agent, &quiet, &loud, to)
    })?;
    Ok(())
}

#[test]
fn an_agent_section_change_at_reload_waits_for_a_restart_and_changes_nothing() -> Result<()> {
    privileged!();
    let node = TestNode::new(test_name!(), 1)?;
    node.without_mtls();
    let client = node.pod("client").create()?;
    let server = node.pod("server").enrolled(false).create()?;
    let mut agent = node.start_agent()?;
    let _hash = app::serve(&server, PORT, Mode::Hash)?;
    let to = SocketAddr::V4(server.addr(PORT));

    // Start-up settings only: the metric names and the outbound port would both change.
    node.set_agent_setting("metricsPrefix", json!("istio"));
    node.set_agent_setting("ports", json!({ "outbound": 15101 }));
    agent.reload(&node)?;
    let pending = json!(["agent.metricsPrefix", "agent.ports"]);
    eventually(Duration::from_secs(10), || {
        let config = agent.status()?["config"].clone();
        ensure!(
            config["restart_pending"] == pending,
            "restart_pending: {config}"
        );
        Ok(())
    })?;
    let log = agent.log();
    let warnings = log
        .lines()
        .filter(|l| l.contains("the agent: section changed; it takes effect after a restart"))
        .count();
    ensure!(warnings == 1, "{warnings} warnings, want one:\n{log}");
    // What an operator sees.
    let mut status = Command::new(app::weft_bin());
    status.arg("status");
    let shown = node
        .spawn(status, "weft-status")?
        .wait(weft_tests::scaled(Duration::from_secs(10)))?;
    ensure!(
        shown.status.success()
            && shown.output.contains(
                "RESTART PENDING: changed since start-up, not applied: agent.metricsPrefix, agent.ports"
            ),
        "weft status:\n{}",
        shown.output
    );
    assert_eq!(agent.generation()?, 1, "nothing new was published");

    // Nothing changed: the old prefix, the old outbound port, the proxy on the path.
    let metrics = agent.metrics()?;
    let scrape = Scrape::parse(&metrics);
    ensure!(
        scrape.sum("weft_agent_config_restart_pending", &[]) == 2.0,
        "{metrics}"
    );
    ensure!(
        !metrics.contains("istio_"),
        "the new prefix is in use:\n{metrics}"
    );
    ensure!(path_of(&client, to)? == Path::Proxy, "no longer steered");
    let listeners = outbound_listeners(&agent)?;
    ensure!(
        !listeners.is_empty() && listeners.iter().all(|l| l.ends_with(":15001")),
        "the outbound listener moved: {listeners:?}"
    );

    // A restart applies them, and nothing is pending any more.
    agent.restart()?;
    ensure!(
        agent.status()?["config"]["restart_pending"] == json!([]),
        "still pending after the restart"
    );
    let metrics = agent.metrics()?;
    ensure!(
        metrics.contains("istio_agent_config_generation"),
        "the new prefix is not in use:\n{metrics}"
    );
    let listeners = outbound_listeners(&agent)?;
    ensure!(
        !listeners.is_empty() && listeners.iter().all(|l| l.ends_with(":15101")),
        "the outbound listener did not move: {listeners:?}"
    );
    ensure!(
        path_of(&client, to)? == Path::Proxy,
        "not steered after the restart"
    );
    Ok(())
}

/// The addresses of the enrolled pods' outbound listeners, from `/status`.
fn outbound_listeners(agent: &TestAgent) -> Result<Vec<String>> {
    let status = agent.status()?;
    let pods = status["pods"]["enrolled"]
        .as_array()
        .context("enrolled pods")?;
    let mut addrs = Vec::new();
    for pod in pods {
        for listener in pod["listeners"].as_array().context("listeners")? {
            if listener["direction"] == json!("outbound") {
                addrs.push(listener["addr"].as_str().context("addr")?.to_string());
            }
        }
    }
    Ok(addrs)
}

/// How a connection reached the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    /// From the client's own socket: not steered.
    Direct,
    /// From another socket: the proxy's.
    Proxy,
}

/// Sends a few bytes to the hash server at `to`; checks they arrived whole and says how.
fn path_of(client: &TestPod, to: SocketAddr) -> Result<Path> {
    let report = app::send(client, to, SENT, 7)?;
    let reply = report.reply.clone().context("no reply")?;
    let fields: Vec<(&str, &str)> = reply
        .split_whitespace()
        .filter_map(|f| f.split_once('='))
        .collect();
    let field = |name: &str| {
        fields
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| *v)
            .with_context(|| format!("no {name} in {reply:?}"))
    };
    ensure!(
        field("bytes")? == SENT.to_string() && field("sha256")? == report.sent_sha256,
        "the server received other bytes than were sent: {reply:?} vs {report:?}"
    );
    let peer: SocketAddr = field("peer")?.parse()?;
    Ok(if peer == report.local {
        Path::Direct
    } else {
        Path::Proxy
    })
}

/// One transfer from `client` to the hash server at `to`, which must arrive whole.
fn transfer(client: &TestPod, to: SocketAddr, seed: u64) -> Result<()> {
    let report = app::send(client, to, SENT, seed)?;
    let reply = report.reply.clone().context("no reply")?;
    ensure!(
        reply.starts_with(&format!("bytes={SENT} sha256={} ", report.sent_sha256)),
        "the server received other bytes than were sent: {reply:?} vs {report:?}"
    );
    Ok(())
}

/// One connection from each pod to `to`: `on`'s gets an access-log line, `off`'s none. The
/// absence is judged after `off`'s connection was closed (the closed-connections counter
/// moved) and `on`'s line, written later, is there.
fn access_logged(agent: &TestAgent, on: &TestPod, off: &TestPod, to: SocketAddr) -> Result<()> {
    let lines = |pod: &TestPod| -> usize {
        agent
            .access_log()
            .iter()
            .filter(|l| l["pod"] == json!(pod.pod_ref()) && l["reporter"] == json!("source"))
            .count()
    };
    let closed = |pod: &TestPod| -> Result<f64> {
        Ok(Scrape::parse(&agent.metrics()?).sum(
            "weft_tcp_connections_closed_total",
            &[
                ("reporter", "source"),
                ("source_workload", &pod.name()),
                ("source_workload_namespace", &pod.namespace()),
            ],
        ))
    };
    let (off_before, on_before) = (lines(off), lines(on));
    let closed_before = closed(off)?;
    transfer(off, to, 9)?;
    eventually(Duration::from_secs(10), || {
        ensure!(
            closed(off)? > closed_before,
            "{} not closed yet",
            off.pod_ref()
        );
        Ok(())
    })?;
    transfer(on, to, 10)?;
    eventually(Duration::from_secs(10), || {
        ensure!(
            lines(on) > on_before,
            "no access-log line for {}",
            on.pod_ref()
        );
        Ok(())
    })?;
    ensure!(
        lines(off) == off_before,
        "{} logged despite the setting",
        off.pod_ref()
    );
    Ok(())
}

const PORT: u16 = 8080;
const OTHER_PORT: u16 = 9090;
const SENT: u64 = 1000;
