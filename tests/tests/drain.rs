//! Graceful shutdown (issue 16, `agent.drain`): on SIGTERM the agent closes every pod
//! listener at once (the pinned steering keeps the pods fail closed) and keeps serving the
//! connections already open, byte-exact both ways, until they end or the drain limit
//! passes; readiness and metrics say it drains. A second signal ends the drain at once.
//! With `agent.handover`, a second agent started beside it takes the listeners over first,
//! so that no connect is refused across the switch.
//! Needs root; see `weft_tests::can_run_privileged`.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Result, ensure};
use serde_json::json;
use weft_tests::{
    TestAgent, TestNode, TestPod,
    app::{self, Connect, Mode, RunningSend},
    eventually, privileged, scaled, test_name,
};

/// A plaintext passthrough (to an unenrolled server), an HBONE connection (between two
/// enrolled pods) and a plaintext inbound one (15006, from the unenrolled pod) open at
/// SIGTERM carry every byte both ways; a new connect on any of these paths fails, never
/// reaching a server around the proxy; readiness and metrics show the drain; the agent
/// exits by itself once the connections end.
#[test]
fn open_connections_outlive_sigterm_and_new_ones_fail_closed() -> Result<()> {
    privileged!();
    let node = TestNode::new(test_name!(), 1)?;
    let pods = Pods::create(&node)?;
    let mut agent = node.start_agent()?;
    let [plain_server, mesh_server] = pods.serve()?;
    let paths = pods.paths();
    let sends = paths.map(|(from, to)| long_send(from, to, TRANSFER));
    wait_active(&agent, "outbound", 2)?;
    wait_active(&agent, "inbound", 1)?;
    // Delivered, not only recorded: the servers' counts below must hold these alone.
    plain_server.wait_accepted(1);
    mesh_server.wait_accepted(2);

    agent.sigterm();
    eventually(Duration::from_secs(10), || {
        let ready = agent.get("/healthz/ready")?;
        ensure!(
            ready.status == 503 && ready.body.contains("draining"),
            "readiness {}: {}",
            ready.status,
            ready.body
        );
        let metrics = agent.metrics()?;
        ensure!(
            metrics.contains("weft_agent_draining 1\n"),
            "no weft_agent_draining 1 in:\n{metrics}"
        );
        Ok(())
    })?;
    for (from, to) in paths {
        let connect = app::connect(from, to, Duration::from_secs(2))?;
        ensure!(
            matches!(connect, Connect::Failed(_)),
            "a new connect from {} to {to} during the drain: {connect:?}",
            from.name()
        );
    }
    // Only the connections opened before the signal: nothing went around the proxy.
    for (server, before) in [(&plain_server, 1), (&mesh_server, 2)] {
        ensure!(
            server.accepted().len() == before,
            "a server got a connection during the drain: {:?}",
            server.accepted()
        );
    }
    ensure!(
        agent.try_status().is_none(),
        "the agent exited while draining"
    );

    for (send, (_, to)) in sends.into_iter().zip(paths) {
        let report = send?.finish()?;
        ensure!(
            report.sent_bytes == TRANSFER
                && report.received_bytes == TRANSFER
                && report.received_sha256 == report.sent_sha256,
            "to {to}: not every byte came back: {report:?}"
        );
    }
    let status = agent.wait_exit(Duration::from_secs(15))?;
    ensure!(status.success(), "agent exit: {status}");
    let log = agent.current_log();
    ensure!(
        log.contains("draining the open connections") && log.contains("drained"),
        "no drain in the log:\n{log}"
    );
    Ok(())
}

/// With a short limit, a connection left open is cut when it passes: the agent exits about
/// then, says how many it cut, and the client sees a reset, not a clean end.
#[test]
fn the_drain_limit_cuts_what_is_still_open() -> Result<()> {
    privileged!();
    let node = TestNode::new(test_name!(), 1)?;
    node.set_agent_setting("drain", json!({ "limitWithoutSuccessor": "2s" }));
    let pods = Pods::create(&node)?;
    let mut agent = node.start_agent()?;
    let _server = app::serve(&pods.plain, PORT, Mode::Echo)?;
    let send = long_send(&pods.client, pods.plain_addr(), TRANSFER)?;
    wait_active(&agent, "outbound", 1)?;

    let started = Instant::now();
    agent.sigterm();
    agent.wait_exit(Duration::from_secs(20))?;
    let took = started.elapsed();
    ensure!(
        took >= Duration::from_secs(2),
        "the agent exited {took:?} after SIGTERM, before the 2s limit"
    );
    let log = agent.current_log();
    ensure!(
        log.contains("drain limit (agent.drain.limitWithoutSuccessor) passed")
            && log.contains("connections=1"),
        "the cut is not logged with its number:\n{log}"
    );
    app::expect_reset(send.finish(), "a connection cut by the drain limit")
}

/// A second SIGTERM during a (long) drain exits at once.
#[test]
fn a_second_sigterm_ends_the_drain_at_once() -> Result<()> {
    privileged!();
    let node = TestNode::new(test_name!(), 1)?;
    let pods = Pods::create(&node)?;
    let mut agent = node.start_agent()?;
    let _server = app::serve(&pods.plain, PORT, Mode::Echo)?;
    let _send = long_send(&pods.client, pods.plain_addr(), TRANSFER)?;
    wait_active(&agent, "outbound", 1)?;

    agent.sigterm();
    eventually(Duration::from_secs(10), || {
        let ready = agent.get("/healthz/ready")?;
        ensure!(
            ready.body.contains("draining"),
            "not draining: {}",
            ready.body
        );
        Ok(())
    })?;
    ensure!(
        agent.try_status().is_none(),
        "the agent exited on the first signal"
    );
    // The drain's limit is an hour: an exit within the wait is the second signal's doing.
    agent.sigterm();
    agent.wait_exit(Duration::from_secs(10))?;
    let log = agent.current_log();
    ensure!(
        log.contains("second signal while draining"),
        "no second signal in the log:\n{log}"
    );
    Ok(())
}

/// A successor agent (same config and ports, `agent.handover`) takes the running agent's
/// pod listeners over, and binds the admin ports beside it: a connect loop (outbound from
/// the enrolled pod, inbound from the unenrolled one) sees no failure across the switch.
/// Then, as the kubelet does, the old agent gets SIGTERM: the long-lived connections still
/// end byte-exact (one signal after a hand-over does not cut), the old agent exits once
/// they end, and only the new one answers on the admin ports. A third agent takes over
/// from the second, whose drain limit (1 s) cuts the connection it still serves: it then
/// waits for its signal, since an exit would restart its container and the old build would
/// take the pods back.
#[test]
fn a_successor_takes_the_listeners_over_without_a_failed_connect() -> Result<()> {
    privileged!();
    let node = TestNode::new(test_name!(), 1)?;
    let socket = node.dir().join("handover.sock");
    node.set_agent_setting("handover", json!({ "socket": socket }));
    let pods = Pods::create(&node)?;
    let mut old = node.start_agent()?;
    let _servers = pods.serve()?;
    let paths = pods.paths();
    let sends = paths
        .map(|(from, to)| app::start_send_paced(from, to, TRANSFER, 11, Duration::from_secs(12)));
    wait_active(&old, "outbound", 2)?;
    wait_active(&old, "inbound", 1)?;
    wait_offering(&old)?;

    // The successor's own drain after its hand-over (the third phase) lasts 1 s at most.
    node.set_agent_setting("drain", json!({ "limit": "1s" }));
    let mut new = TestAgent::spawn_beside(&node, "successor", 0)?;
    let attempts = connect_until_switch(&pods, &mut new, &old)?;
    // The kubelet deletes the old pod once the new one is ready.
    old.sigterm();
    new.wait_ready()?;
    // While the old agent drains, only the new one answers on the shared ports: were both
    // listening, twenty fresh connections would almost surely (1 - 2^-19) reach both.
    for _ in 0..20 {
        let answer = new.get("/healthz/ready")?;
        ensure!(
            answer.status == 200,
            "an agent other than the successor answered: {answer:?}"
        );
    }
    ensure!(old.try_status().is_none(), "the old agent stopped draining");
    for (send, (_, to)) in sends.into_iter().zip(paths) {
        let report = send?.finish()?;
        ensure!(
            report.received_bytes == TRANSFER && report.received_sha256 == report.sent_sha256,
            "to {to}: not every byte came back: {report:?}"
        );
    }
    let status = old.wait_exit(Duration::from_secs(20))?;
    ensure!(status.success(), "old agent exit: {status}");
    let log = old.current_log();
    ensure!(
        log.contains("signal while draining after a hand-over")
            && log.contains("drained: every open connection ended")
            && !log.contains("cutting"),
        "the old agent's drain was cut or did not happen:\n{log}"
    );
    let log = new.current_log();
    ensure!(
        log.contains("took over the running agent's pod listeners") && !log.contains("refused="),
        "the successor did not take every listener:\n{log}"
    );
    // Alone now: new connections on every path go through the successor.
    let before = new.newest_record_id()?;
    for (from, to) in paths {
        echo_once(from, to)?;
    }
    new.expect_new_record(before, "hbone", |r| r.direction == "hbone");
    eprintln!("handover: {attempts} connects across the switch, none failed");

    // A connection still open when the drain limit passes is cut, and the second agent
    // then waits for its signal all the same.
    wait_offering(&new)?;
    let held = long_send(&pods.client, pods.plain_addr(), TRANSFER)?;
    wait_active(&new, "outbound", 1)?;
    let mut third = TestAgent::spawn_beside(&node, "third", 0)?;
    connect_until_switch(&pods, &mut third, &new)?;
    eventually(Duration::from_secs(10), || {
        let log = new.current_log();
        ensure!(
            log.contains("drain limit (agent.drain.limit) passed")
                && log.contains("waiting for a signal to exit"),
            "the handed-over agent did not cut at its limit and wait for its signal"
        );
        Ok(())
    })?;
    app::expect_reset(held.finish(), "the connection the drain limit cut")?;
    third.wait_ready()?;
    // Still there after the third agent's start-up, though it has nothing left to serve.
    ensure!(
        new.try_status().is_none(),
        "the handed-over agent exited without a signal"
    );
    new.sigterm();
    let status = new.wait_exit(Duration::from_secs(10))?;
    ensure!(status.success(), "second agent exit: {status}");
    for (from, to) in paths {
        echo_once(from, to)?;
    }
    Ok(())
}

fn wait_offering(agent: &TestAgent) -> Result<()> {
    eventually(Duration::from_secs(10), || {
        let offering = agent.current_log().contains("offering the pod listeners");
        ensure!(offering, "the running agent does not offer its listeners");
        Ok(())
    })
}

/// Connects on the outbound and the inbound path, one echo each, until `from` said it
/// stopped accepting and five rounds more went by: every connect must succeed. Returns
/// how many there were.
fn connect_until_switch(pods: &Pods, to: &mut TestAgent, from: &TestAgent) -> Result<usize> {
    let (plain, mesh) = (pods.plain_addr(), pods.mesh_addr());
    let (mut attempts, mut failures, mut after_switch) = (0, Vec::new(), 0);
    let deadline = Instant::now() + scaled(Duration::from_secs(60));
    while after_switch < 5 {
        ensure!(Instant::now() < deadline, "no switch within 60 s");
        ensure!(to.try_status().is_none(), "the successor exited");
        for (client, server) in [(&pods.client, plain), (&pods.plain, mesh)] {
            attempts += 1;
            if let Err(e) = echo_once(client, server) {
                failures.push(format!("{} -> {server}: {e:#}", client.name()));
            }
        }
        if from.current_log().contains("this one stops accepting") {
            after_switch += 1;
        }
    }
    ensure!(
        failures.is_empty(),
        "{} of {attempts} connects failed across the switch: {failures:#?}",
        failures.len()
    );
    Ok(attempts)
}

/// One small echo exchange, checked byte for byte.
fn echo_once(from: &TestPod, to: SocketAddr) -> Result<()> {
    let report = app::send(from, to, 4096, 3)?;
    ensure!(
        report.received_bytes == 4096 && report.received_sha256 == report.sent_sha256,
        "echo not intact: {report:?}"
    );
    Ok(())
}

/// An enrolled client, an unenrolled server (plaintext passthrough) and an enrolled one
/// (HBONE).
struct Pods {
    client: TestPod,
    plain: TestPod,
    mesh: TestPod,
}

impl Pods {
    /// The pods, on a node whose same-node mesh traffic goes over HBONE (`mesh.sameNode`):
    /// an HBONE connection is the one whose drain has the most to keep (TLS, HTTP/2).
    fn create(node: &TestNode) -> Result<Self> {
        node.set_mesh(json!({ "excludedPorts": [22], "sameNode": "HBONE" }));
        Ok(Self {
            client: node.pod("client").create()?,
            plain: node.pod("plain").enrolled(false).create()?,
            mesh: node
                .pod("mesh")
                .service_account("server")
                .mtls_mode("PERMISSIVE")
                .create()?,
        })
    }

    /// Echo servers in the unenrolled and the enrolled server pod.
    fn serve(&self) -> Result<[app::Server; 2]> {
        Ok([
            app::serve(&self.plain, PORT, Mode::Echo)?,
            app::serve(&self.mesh, PORT, Mode::Echo)?,
        ])
    }

    /// Outbound plaintext passthrough, outbound HBONE, inbound plaintext (15006).
    fn paths(&self) -> [(&TestPod, SocketAddr); 3] {
        let (plain, mesh) = (self.plain_addr(), self.mesh_addr());
        [
            (&self.client, plain),
            (&self.client, mesh),
            (&self.plain, mesh),
        ]
    }

    fn plain_addr(&self) -> SocketAddr {
        SocketAddr::V4(self.plain.addr(PORT))
    }

    fn mesh_addr(&self) -> SocketAddr {
        SocketAddr::V4(self.mesh.addr(PORT))
    }
}

/// A paced echo transfer that keeps one connection busy both ways across the signal.
fn long_send(client: &TestPod, to: SocketAddr, bytes: u64) -> Result<RunningSend> {
    app::start_send_paced(client, to, bytes, 7, TRANSFER_TIME)
}

/// Waits until the proxy records `n` open connections of `direction`.
fn wait_active(agent: &TestAgent, direction: &str, n: usize) -> Result<()> {
    eventually(Duration::from_secs(10), || {
        let active = agent.connections()?.active;
        let open = active.iter().filter(|c| c.direction == direction).count();
        ensure!(open >= n, "{open} {direction} connections open: {active:?}");
        Ok(())
    })
}

const PORT: u16 = 8080;
const TRANSFER: u64 = 512 * 1024;
const TRANSFER_TIME: Duration = Duration::from_secs(6);
