//! Upgrades and crashes of the node agent under load (issue 16), on two joined nodes with
//! mutual TLS. Long-lived echo connections of every kind the node proxy carries, with data
//! flowing both ways all along, and connect loops from an enrolled and an unenrolled pod:
//!
//! - a rolling upgrade (a successor agent started beside each node's agent in turn, from its
//!   own copy of the binary, `agent.handover`) refuses, resets, loses and duplicates nothing,
//!   and each old agent exits once its connections end;
//! - so do an upgrade from the previous release's build to this tree's, and its rollback;
//! - a SIGKILL fails closed (the killed proxy's connections are reset, never left hanging or
//!   corrupted), and a new agent serves again: the test prints how long after its start.
//!
//! Needs root; see `weft_tests::can_run_privileged`.

use std::{
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Result, ensure};
use serde_json::json;
use weft_tests::{
    AgentCommand, TestAgent, TestNode, TestPod,
    app::{self, Mode},
    eventually, privileged,
    steady::{self, RunningLoop, RunningStreams, Streamed},
    test_name,
};

/// Both nodes' agents replaced one after the other, as a DaemonSet rollout does, while
/// 200 connections of each kind stream and three connect loops run.
#[test]
fn a_rolling_upgrade_refuses_resets_and_loses_nothing() -> Result<()> {
    privileged!();
    let mesh = Mesh::create(test_name!())?;
    mesh.roll(&[("next", app::weft_bin())], STREAMS)
}

/// The same across builds, as a release and its rollback: both nodes start on the previous
/// release (the main before this tree, `xtask/src/previous.rs`), roll to this tree's agent,
/// then back, under one long run of traffic. Each side hands over to a build it was not
/// built with: the hand-over protocol, the pinned maps and programs, the config and the
/// CNI socket must all be understood both ways.
#[test]
fn an_upgrade_from_the_previous_release_and_its_rollback_lose_nothing() -> Result<()> {
    privileged!();
    let Some(previous) = weft_test_env::previous_release(test_name!()) else {
        return Ok(());
    };
    let mesh = Mesh::create(test_name!())?;
    for node in [&mesh.node1, &mesh.node2] {
        node.set_agent_command(AgentCommand {
            program: previous.clone(),
            args: Vec::new(),
        });
    }
    mesh.roll(
        &[("this-tree", app::weft_bin()), ("rollback", previous)],
        STREAMS_ACROSS_BUILDS,
    )
}

/// SIGKILL of node 1's agent under the same load: every connection through it is reset
/// (never cut with a FIN an application could take for the end of its stream: the proxy's
/// sockets close with a RST until a copy ends cleanly), connects through it fail closed
/// while no agent runs, a path through node 2 only is untouched, and a new agent serves
/// every path again.
#[test]
fn a_killed_agent_fails_closed_and_a_new_one_serves_again() -> Result<()> {
    privileged!();
    let mesh = Mesh::create(test_name!())?;
    let mut agent1 = mesh.node1.start_agent()?;
    let _agent2 = mesh.node2.start_agent()?;
    let _servers = mesh.serve()?;
    // Traffic flows on every connection before the crash.
    let mut streams = mesh.start_streams(KILLED_STREAMS)?;
    let mut loops = mesh.start_loops(LOOP_TIME)?;
    ensure!(
        streams.iter_mut().all(|(_, s)| s.running()),
        "a stream ended before the crash: it would count as surviving it"
    );

    agent1.kill();
    // An outage the loops must see: fail closed, not a blip between two polls.
    std::thread::sleep(Duration::from_secs(1));
    let started = Instant::now();
    agent1.restart()?;
    let ready_after = started.elapsed();
    ensure!(
        loops.iter_mut().all(|(_, l)| l.running()),
        "the connect loops ended before the new agent was ready: nothing shows it serves"
    );

    for (kind, running) in streams {
        let streamed = running.finish()?;
        eprintln!("sigkill: {kind}: {:?}", streamed.failed_kinds);
        // Every connection through the killed proxy was reset: none went on, none hung
        // (finish would time out), none saw a clean end it could take for the real one.
        ensure!(
            streamed.failed == streamed.count
                && streamed.failed_kinds.iter().all(|(k, _)| is_reset(k)),
            "{kind}: not every connection through the killed proxy was reset: {streamed:?}"
        );
    }
    for (i, (path, running)) in loops.into_iter().enumerate() {
        let looped = running.finish()?;
        eprintln!(
            "sigkill: connect loop {path}: longest gap {:?} (1 s of it with no agent): {:?}",
            looped.longest_gap, looped.failed_kinds
        );
        if i == UNTOUCHED_LOOP {
            ensure!(
                looped.failed == 0,
                "connect loop {path} does not cross node 1's proxy, yet it failed: {looped:?}"
            );
            continue;
        }
        // Refused (outbound: nothing listens), dropped (inbound: a SYN to no socket) or
        // reset: never answered by anything but the proxy.
        ensure!(
            looped.failed > 0
                && looped.failed_kinds.iter().all(|(k, _)| {
                    is_reset(k) || k == "connect/ConnectionRefused" || k == "connect/TimedOut"
                }),
            "connect loop {path}: the outage was not failed closed: {looped:?}"
        );
    }
    // After recovery every path works at once.
    for (from, to) in mesh.loop_paths() {
        let report = app::send(from, to, 4096, 5)?;
        ensure!(
            report.received_sha256 == report.sent_sha256,
            "{to}: {report:?}"
        );
    }
    eprintln!("sigkill: the new agent was ready {ready_after:?} after its start");
    Ok(())
}

/// Two joined nodes, both with `agent.handover`, and their pods: on node 1 an enrolled
/// client, an unenrolled pod ("outside" the mesh), an unenrolled server (passthrough) and an
/// enrolled server; on node 2 an enrolled server.
struct Mesh {
    // Pods before nodes: dropped first.
    client: TestPod,
    outside: TestPod,
    plain: TestPod,
    local: TestPod,
    remote: TestPod,
    node1: TestNode,
    node2: TestNode,
}

impl Mesh {
    fn create(test: &str) -> Result<Self> {
        let node1 = TestNode::new(test, 1)?;
        let node2 = TestNode::new(test, 2)?;
        node1.connect(&node2)?;
        for node in [&node1, &node2] {
            let socket = node.dir().join("handover.sock");
            node.set_agent_setting("handover", json!({ "socket": socket }));
        }
        let server = |node: &TestNode, name: &str| {
            node.pod(name)
                .service_account("server")
                .mtls_mode("PERMISSIVE")
                .create()
        };
        Ok(Self {
            client: node1.pod("client").create()?,
            outside: node1.pod("outside").enrolled(false).create()?,
            plain: node1.pod("plain").enrolled(false).create()?,
            local: server(&node1, "local")?,
            remote: server(&node2, "remote")?,
            node1,
            node2,
        })
    }

    /// Starts both nodes' agents, streams every kind of connection and runs the connect
    /// loops for `over`, and meanwhile rolls both nodes through each of `builds` in turn
    /// (named, for the copies of the binary), node 1 then node 2 each time. Nothing may be
    /// refused, reset, lost or duplicated; every old agent drains and exits cleanly, and
    /// every new one takes every listener over.
    fn roll(&self, builds: &[(&str, PathBuf)], over: Duration) -> Result<()> {
        let mut agents = [self.node1.start_agent()?, self.node2.start_agent()?];
        let _servers = self.serve()?;
        for agent in &agents {
            wait_offering(agent)?;
        }
        // Traffic flows on every connection before the first hand-over.
        let mut streams = self.start_streams(over)?;
        let mut loops = self.start_loops(over)?;

        let mut retired = Vec::new();
        for (build, binary) in builds {
            for (i, node) in [&self.node1, &self.node2].into_iter().enumerate() {
                let new = agents[i].upgrade_to(node, build, binary)?;
                retired.push(std::mem::replace(&mut agents[i], new));
            }
        }
        ensure!(
            streams.iter_mut().all(|(_, s)| s.running())
                && loops.iter_mut().all(|(_, l)| l.running()),
            "the traffic ended before the upgrade did: it proved nothing"
        );

        for (kind, running) in streams {
            let streamed = running.finish()?;
            eprintln!("upgrade: {kind}: {streamed:?}");
            expect_exact(kind, &streamed)?;
        }
        for (path, running) in loops {
            let looped = running.finish()?;
            eprintln!(
                "upgrade: connect loop {path}: {} rounds, longest gap {:?}",
                looped.attempts, looped.longest_gap
            );
            ensure!(
                looped.failed == 0 && looped.ok > 0,
                "connect loop {path} failed across the upgrade: {looped:?}"
            );
        }
        for mut old in retired {
            let status = old.wait_exit(Duration::from_secs(30))?;
            let log = old.current_log();
            ensure!(
                status.success()
                    && log.contains("drained: every open connection ended")
                    && !log.contains("cutting"),
                "an old agent did not drain and exit cleanly ({status}):\n{log}"
            );
        }
        for agent in &agents {
            let log = agent.current_log();
            ensure!(
                log.contains("took over the running agent's pod listeners")
                    && !log.contains("refused="),
                "a new agent did not take every listener over:\n{log}"
            );
        }
        Ok(())
    }

    fn serve(&self) -> Result<[app::Server; 3]> {
        Ok([
            app::serve(&self.plain, PORT, Mode::Echo)?,
            app::serve(&self.local, PORT, Mode::Echo)?,
            app::serve(&self.remote, PORT, Mode::Echo)?,
        ])
    }

    /// Every kind of connection the node proxy carries, named.
    fn stream_paths(&self) -> [(&'static str, &TestPod, SocketAddr); 4] {
        [
            ("passthrough", &self.client, addr(&self.plain)),
            ("inbound 15006", &self.outside, addr(&self.local)),
            (
                "mesh same node (node-local)",
                &self.client,
                addr(&self.local),
            ),
            ("HBONE cross node", &self.client, addr(&self.remote)),
        ]
    }

    /// Enrolled outbound (both nodes' proxies) and unenrolled inbound (each node's; the
    /// last one, `UNTOUCHED_LOOP`, crosses node 2's proxy only).
    fn loop_paths(&self) -> [(&TestPod, SocketAddr); 3] {
        [
            (&self.client, addr(&self.remote)),
            (&self.outside, addr(&self.local)),
            (&self.outside, addr(&self.remote)),
        ]
    }

    fn start_streams(&self, over: Duration) -> Result<Vec<(&'static str, RunningStreams)>> {
        self.stream_paths()
            .into_iter()
            .map(|(kind, from, to)| Ok((kind, steady::start_streams(from, to, COUNT, over)?)))
            .collect()
    }

    fn start_loops(&self, over: Duration) -> Result<Vec<(String, RunningLoop)>> {
        self.loop_paths()
            .into_iter()
            .map(|(from, to)| {
                let path = format!("{} -> {to}", from.name());
                Ok((path, steady::start_connect_loop(from, to, over)?))
            })
            .collect()
    }
}

/// Every connection exact: all bytes echoed, none lost, duplicated or reset.
fn expect_exact(kind: &str, streamed: &Streamed) -> Result<()> {
    ensure!(
        streamed.count == COUNT as u64
            && streamed.ok == streamed.count
            && streamed.failed == 0
            && streamed.sent_bytes > 0
            && streamed.echoed_bytes == streamed.sent_bytes,
        "{kind}: not every connection came through exact: {streamed:?}"
    );
    Ok(())
}

/// A failure kind (`stage/ErrorKind`) that is the application seeing a RST.
fn is_reset(kind: &str) -> bool {
    kind.ends_with("/ConnectionReset") || kind.ends_with("/BrokenPipe")
}

fn wait_offering(agent: &TestAgent) -> Result<()> {
    eventually(Duration::from_secs(10), || {
        let offering = agent.current_log().contains("offering the pod listeners");
        ensure!(offering, "the agent does not offer its listeners");
        Ok(())
    })
}

fn addr(pod: &TestPod) -> SocketAddr {
    SocketAddr::V4(pod.addr(PORT))
}

/// Of each kind.
const COUNT: usize = 200;
/// The connect loop that does not cross node 1's proxy.
const UNTOUCHED_LOOP: usize = 2;
const PORT: u16 = 8080;
/// Long enough to span both nodes' upgrades (checked: the traffic still runs after them).
const STREAMS: Duration = Duration::from_secs(25);
/// The same for four hand-overs: the upgrade and the rollback of both nodes.
const STREAMS_ACROSS_BUILDS: Duration = Duration::from_secs(45);
/// Far longer than the set-up of all four kinds on a loaded machine (the first kind
/// streams while the others start); every kind crosses the killed proxy, so the crash ends
/// them all and the length costs nothing.
const KILLED_STREAMS: Duration = Duration::from_secs(120);
/// Long enough to span the crash and the new agent's start (checked likewise).
const LOOP_TIME: Duration = Duration::from_secs(15);
