//! The upgrade part (nodes 5 and 6, joined): what replacing and what crashing the agent cost
//! the traffic. Each repetition upgrades both nodes' agents in turn (a successor from a copy
//! of the binary, or of `WEFT_UPGRADE_TO`, another build; beside the running agent,
//! `agent.handover`; then SIGTERM to the old one)
//! while long-lived echo connections stream across both nodes and a connect loop runs: the
//! longest gap the loop saw, its failed connects, and how many connections and bytes came
//! through exact. Then a SIGKILL of node 5's agent: how long after the new agent's start
//! the first connect succeeds again, and when it is ready.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Result, ensure};
use serde_json::json;
use weft_tests::{
    TestAgent, TestNode, TestPod,
    app::{self, Mode},
    steady,
};

use super::{PORT, agent::plain_if_no_ca, plan::Plan, report::Report};

pub fn run(plan: &Plan, report: &mut Report) -> Result<()> {
    let n = plan.upgrade_conns;
    println!(
        "== upgrades: {n} streaming connections and a connect loop across agent replacements =="
    );
    // The cross-node weft path: its column of the report.
    let key = "weft-l4-x";
    let node1 = TestNode::new("bench", 5)?;
    let node2 = TestNode::new("bench", 6)?;
    plain_if_no_ca(&[&node1, &node2]);
    node1.connect(&node2)?;
    for node in [&node1, &node2] {
        let socket = node.dir().join("handover.sock");
        node.set_agent_setting("handover", json!({ "socket": socket }));
    }
    let client = node1.pod("client").create()?;
    let server = node2.pod("server").service_account("server").create()?;
    let mut agents = [node1.start_agent()?, node2.start_agent()?];
    for agent in &mut agents {
        agent.show_log_on_drop(false);
        agent.wait_ready()?;
    }
    let _server = app::serve(&server, PORT, Mode::Echo)?;
    let to = SocketAddr::V4(server.addr(PORT));

    // Another build when asked for (an upgrade between two commits), else this one.
    let next_build = std::env::var_os("WEFT_UPGRADE_TO").map_or_else(app::weft_bin, Into::into);
    for rep in 0..plan.reps {
        let over = plan.upgrade_time;
        let streams = steady::start_streams(&client, to, n, over)?;
        let connects = steady::start_connect_loop(&client, to, over)?;
        // The old agents drain the streams: kept until those end.
        let mut retired = Vec::new();
        for (i, node) in [&node1, &node2].into_iter().enumerate() {
            let mut new = agents[i].upgrade_to(node, &format!("next-{rep}"), &next_build)?;
            new.show_log_on_drop(false);
            retired.push(std::mem::replace(&mut agents[i], new));
        }
        let streamed = streams.finish()?;
        let looped = connects.finish()?;
        for mut old in retired {
            old.wait_exit(Duration::from_secs(60))?;
        }
        println!(
            "  upgrade {rep}: {} of {n} connections exact, {:.1} MB each way; connect loop: {} failed of {}, longest gap {:?}",
            streamed.ok,
            streamed.echoed_bytes as f64 / 1e6,
            looped.failed,
            looped.attempts,
            looped.longest_gap
        );
        if looped.failed > 0 {
            println!(
                "    failed connects by kind: {:?}; first: {:?}",
                looped.failed_kinds,
                looped.failures.first()
            );
        }
        report.add(
            key,
            "connections exact across a rolling upgrade",
            "%",
            100.0 * streamed.ok as f64 / n as f64,
        );
        report.add(
            key,
            "bytes echoed exactly across a rolling upgrade",
            "MB",
            streamed.echoed_bytes as f64 / 1e6,
        );
        report.add(
            key,
            "connect loop: failed connects during the upgrade",
            "count",
            looped.failed as f64,
        );
        report.add(
            key,
            "connect loop: longest gap during the upgrade",
            "ms",
            looped.longest_gap.as_secs_f64() * 1e3,
        );
    }

    for rep in 0..plan.reps {
        let (first_connect, ready) = crash_and_recover(&mut agents[0], &client, to)?;
        println!(
            "  SIGKILL {rep}: the first connect succeeded {:.0} ms after the new agent started (ready after {:.0} ms)",
            first_connect.as_secs_f64() * 1e3,
            ready.as_secs_f64() * 1e3
        );
        report.add(
            key,
            "SIGKILL: first connect after the new agent's start",
            "ms",
            first_connect.as_secs_f64() * 1e3,
        );
        report.add(
            key,
            "SIGKILL: new agent ready after its start",
            "ms",
            ready.as_secs_f64() * 1e3,
        );
    }
    Ok(())
}

/// SIGKILLs `agent`, starts it again at once, and times the first echo that crosses from
/// `client` to `to` after the start, and the readiness.
fn crash_and_recover(
    agent: &mut TestAgent,
    client: &TestPod,
    to: SocketAddr,
) -> Result<(Duration, Duration)> {
    agent.kill();
    let started = Instant::now();
    agent.relaunch()?;
    let first_connect = loop {
        if app::send(client, to, 64, 1).is_ok_and(|r| r.received_sha256 == r.sent_sha256) {
            break started.elapsed();
        }
        ensure!(
            started.elapsed() < Duration::from_secs(60),
            "no connect within 60 s of the start"
        );
        std::thread::sleep(Duration::from_millis(2));
    };
    agent.wait_ready()?;
    Ok((first_connect, started.elapsed()))
}
