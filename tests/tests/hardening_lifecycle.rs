//! Hardening of the agent's lifecycle (issue "Hardening", findings 9, 10 and 16): an upgrade
//! that changes a pinned map's layout, a pod's enrollment changing, a pod disappearing, and a
//! cgroup root that does not hold the pods. (The migration's details, a pin that cannot be
//! read, and exclusion updates (finding 15) are proven on the kernel by
//! `agent/src/ebpf/tests.rs`.)
//!
//! "Unproxied" is judged by the server, which cannot be fooled: a connect that went around
//! the proxy arrives from the very address the client's socket has (`getsockname`), while a
//! steered one arrives from the proxy's own upstream socket (and the client's socket is
//! bound to loopback, where connect4 sent it). Needs root; see `weft_tests::can_run_privileged`.

use std::{collections::HashSet, net::SocketAddr, process::Command, time::Duration};

use anyhow::{Context, Result, anyhow};
use serde_json::{Value, json};
use weft_tests::{
    TestAgent, TestNode, TestPod,
    app::{self, Mode},
    assert_eventually, eventually, privileged, sys, test_name,
};

#[test]
fn an_upgrade_that_changes_the_pod_map_layout_leaves_no_connect_unsteered() -> Result<()> {
    privileged!();
    let node = TestNode::new(test_name!(), 1)?;
    node.without_mtls();
    let client = node.pod("client").create()?;
    let server = node.pod("server").enrolled(false).create()?;
    let mut agent = node.start_agent()?;
    let echo = app::serve(&server, PORT, Mode::Echo)?;
    let cookie = agent.status()?["pods"]["enrolled"][0]["netns_cookie"]
        .as_u64()
        .context("the client's netns cookie in /status")?;

    // The old agent goes, leaving a pod map of another layout.
    agent.kill();
    pin_old_layout_pods(&node, cookie)?;

    // The pod connects all along while the new agent starts.
    let mut loops = vec![connect_loop_from(&client, server.addr(PORT).into(), 0)?];
    agent.restart()?;
    let before = echo.accepted().len();
    assert_eventually(Duration::from_secs(20), || {
        let now = echo.accepted().len();
        if now > before + 50 {
            Ok(())
        } else {
            Err(format!(
                "only {} connects since the new agent is ready",
                now - before
            ))
        }
    });
    let client_sockets = stop_loops(&mut loops)?;
    let accepted: Vec<SocketAddr> = echo.accepted().iter().map(|a| a.peer).collect();
    eprintln!(
        "{} connects reached the server, {} client sockets recorded ({} not on loopback)",
        accepted.len(),
        client_sockets.len(),
        client_sockets
            .iter()
            .filter(|a| !a.ip().is_loopback())
            .count()
    );
    let direct: Vec<&SocketAddr> = accepted
        .iter()
        .filter(|peer| client_sockets.contains(peer))
        .collect();
    assert!(
        direct.is_empty(),
        "{} of {} connects of the enrolled pod reached the server around the proxy during \
         the upgrade: {direct:?}",
        direct.len(),
        accepted.len()
    );
    Ok(())
}

#[test]
fn an_upgraded_agent_that_dies_before_enrolling_leaves_the_pods_steered() -> Result<()> {
    privileged!();
    let node = TestNode::new(test_name!(), 1)?;
    node.without_mtls();
    let client = node.pod("client").create()?;
    let server = node.pod("server").enrolled(false).create()?;
    let mut agent = node.start_agent()?;
    let echo = app::serve(&server, PORT, Mode::Echo)?;
    let cookie = agent.status()?["pods"]["enrolled"][0]["netns_cookie"]
        .as_u64()
        .context("the client's netns cookie in /status")?;
    agent.kill();
    pin_old_layout_pods(&node, cookie)?;

    // The new agent loads its programs, then stops before its first enrollment (here: its
    // pod discovery cannot read the node; as well the API server could be down): nothing
    // but the migrated map can keep the pod steered.
    node.set_agent_setting(
        "discovery",
        json!({"cgroupRoot": "/nonexistent/cgroup", "procRoot": "/nonexistent/proc"}),
    );
    let mut upgraded = TestAgent::spawn_only(&node)?;
    let status = upgraded.wait_exit(Duration::from_secs(30))?;
    assert!(!status.success(), "the agent cannot start: {status}");
    let mut loops = vec![connect_loop_from(&client, server.addr(PORT).into(), 0)?];
    assert_eventually(Duration::from_secs(20), || {
        let tried = loops[0].lines_starting("error").len() + loops[0].lines_starting("ok").len();
        if tried >= 100 {
            Ok(())
        } else {
            Err(format!("only {tried} connects tried"))
        }
    });
    let client_sockets = stop_loops(&mut loops)?;
    let accepted: Vec<SocketAddr> = echo.accepted().iter().map(|a| a.peer).collect();
    let direct: Vec<&SocketAddr> = accepted
        .iter()
        .filter(|peer| client_sockets.contains(peer))
        .collect();
    assert!(
        direct.is_empty(),
        "{} of {} connects of the enrolled pod reached the server around the proxy after \
         the upgraded agent stopped, e.g. {:?}",
        direct.len(),
        accepted.len(),
        &direct[..direct.len().min(5)]
    );
    Ok(())
}

#[test]
fn a_restarted_agent_that_cannot_open_a_wanted_pods_namespace_keeps_it_steered() -> Result<()> {
    privileged!();
    let node = TestNode::new(test_name!(), 1)?;
    node.without_mtls();
    let client = node.pod("client").create()?;
    let server = node.pod("server").enrolled(false).create()?;
    let mut agent = node.start_agent()?;
    let echo = app::serve(&server, PORT, Mode::Echo)?;
    agent.kill();

    // The new agent still wants the pod but cannot open its namespace (a file that is no
    // namespace here; a runtime race or a vanished pid in a cluster), so it cannot tell the
    // pod's entry in the pinned map from a stale one. It must keep it.
    let not_a_netns = node.dir().join("not-a-netns");
    std::fs::write(&not_a_netns, "").context("write a file that is no namespace")?;
    let mut config = node.config();
    set_workload(&mut config, "client", |w| {
        w["netns"] = json!(not_a_netns.display().to_string());
    });
    let mut restarted =
        TestAgent::spawn_with_config_text(&node, &weft_tests::agent::config_yaml(&config)?)?;
    assert_eventually(Duration::from_secs(20), || {
        if restarted.current_log().contains("pod enrollment failed") {
            Ok(())
        } else {
            Err("the restarted agent has not tried the pod yet".to_string())
        }
    });
    let mut loops = vec![connect_loop_from(&client, server.addr(PORT).into(), 0)?];
    assert_eventually(Duration::from_secs(20), || {
        let tried = loops[0].lines_starting("error").len() + loops[0].lines_starting("ok").len();
        if tried >= 100 {
            Ok(())
        } else {
            Err(format!("only {tried} connects tried"))
        }
    });
    let client_sockets = stop_loops(&mut loops)?;
    let direct = echo
        .accepted()
        .iter()
        .filter(|a| client_sockets.contains(&a.peer))
        .count();
    assert_eq!(
        direct, 0,
        "connects of the enrolled pod reached the server around the proxy after the \
         restarted agent dropped the pod's entry"
    );
    restarted.kill();
    Ok(())
}

#[test]
fn re_enrolment_keeps_every_connect_of_the_pod_steered() -> Result<()> {
    privileged!();
    let node = TestNode::new(test_name!(), 1)?;
    node.without_mtls();
    let client = node.pod("client").service_account("client").create()?;
    let server = node.pod("server").enrolled(false).create()?;
    let agent = node.start_agent()?;
    let echo = app::serve(&server, PORT, Mode::Echo)?;
    let loops: Vec<_> = (0..LOOPS)
        .map(|i| connect_loop(&client, server.addr(PORT).into(), i))
        .collect::<Result<_>>()?;

    // A changed identity re-enrolls the pod (its HBONE server presents another
    // certificate); so would changed IPs. Back and forth, while the loops connect.
    let mut config = node.config();
    for round in 0..ROUNDS {
        let account = if round % 2 == 0 { "client-b" } else { "client" };
        set_workload(&mut config, "client", |w| {
            w["serviceAccount"] = json!(account)
        });
        apply(&agent, &config)?;
    }
    let mut loops = loops;
    let client_sockets = stop_loops(&mut loops)?;
    let accepted: Vec<SocketAddr> = echo.accepted().iter().map(|a| a.peer).collect();
    eprintln!(
        "{} connects reached the server, {} client sockets recorded",
        accepted.len(),
        client_sockets.len()
    );
    let direct: Vec<&SocketAddr> = accepted
        .iter()
        .filter(|peer| client_sockets.contains(peer))
        .collect();
    assert!(
        direct.is_empty(),
        "{} of {} connects of the enrolled pod reached the server around the proxy while it \
         was re-enrolled {ROUNDS} times: {direct:?}",
        direct.len(),
        accepted.len()
    );
    assert!(
        accepted.len() >= ROUNDS,
        "the loops got only {} connects through: the test proves nothing",
        accepted.len()
    );
    Ok(())
}

#[test]
fn a_pod_removed_from_the_config_has_its_open_connections_closed() -> Result<()> {
    privileged!();
    let node = TestNode::new(test_name!(), 1)?;
    let client = node.pod("client").service_account("client").create()?;
    let server = node.pod("server").service_account("server").create()?;
    let agent = node.start_agent()?;
    let _echo = app::serve(&server, PORT, Mode::Echo)?;
    let to: SocketAddr = server.addr(PORT).into();
    // One connection kept busy far longer than the test.
    let send = app::start_send_paced(&client, to, 1024 * 1024, 1, Duration::from_secs(600))?;
    assert_eventually(Duration::from_secs(20), || {
        let open = open_of(&agent, &client.pod_ref())?;
        if open > 0 {
            Ok(())
        } else {
            Err("the client's connection is not open yet".to_string())
        }
    });

    // Force-deleted: the pod is gone from the source, its processes may still run.
    let mut config = node.config();
    if let Some(workloads) = config["workloads"].as_array_mut() {
        workloads.retain(|w| w["name"] != "client");
    }
    apply(&agent, &config)?;

    assert_eventually(Duration::from_secs(10), || {
        let open = open_of(&agent, &client.pod_ref())?;
        if open == 0 {
            Ok(())
        } else {
            Err(format!(
                "{open} connections of the removed pod are still open"
            ))
        }
    });
    let closed = agent.get_json("/debug/connections")?["closed_total"]["pod_removed"]
        .as_u64()
        .unwrap_or(0);
    assert!(closed >= 1, "closed connections are counted as pod_removed");
    let result = send.finish();
    assert!(
        result.as_ref().is_err_and(app::is_reset),
        "the removed pod's application sees its connection reset: {result:?}"
    );
    Ok(())
}

#[test]
fn a_cgroup_root_that_does_not_hold_the_pods_fails_readiness() -> Result<()> {
    privileged!();
    let node = TestNode::new(test_name!(), 1)?;
    node.without_mtls();
    // A real cgroup v2 directory, but not the one the pods are in.
    let wrong = node
        .cgroup_root()
        .parent()
        .context("cgroup root has a parent")?
        .join("elsewhere");
    std::fs::create_dir_all(&wrong).with_context(|| format!("mkdir {}", wrong.display()))?;
    node.set_agent_setting("cgroupRoot", json!(wrong.display().to_string()));
    let client = node.pod("client").create()?;
    // A process in the pod, so that the pod has a cgroup at all.
    let _app = app::serve(&client, PORT, Mode::Echo)?;
    let mut agent = TestAgent::spawn_only(&node)?;
    agent.show_log_on_drop(true);

    // Once the pod is enrolled, readiness says what is wrong, and keeps saying it.
    let body = eventually(Duration::from_secs(30), || {
        if agent.status()?["pods"]["enrolled"]
            .as_array()
            .is_none_or(Vec::is_empty)
        {
            return Err(anyhow!("client not enrolled yet"));
        }
        let ready = sys::http_get(&node.netns_path(), READINESS.parse()?, "/healthz/ready")?;
        if ready.status == 503 && ready.body.contains("agent.cgroupRoot") {
            Ok(ready.body)
        } else {
            Err(anyhow!(
                "readiness answers {} {:?}, not 503 naming agent.cgroupRoot",
                ready.status,
                ready.body
            ))
        }
    })?;
    assert!(body.contains(&client.pod_ref()), "names the pod: {body}");
    let ready = sys::http_get(&node.netns_path(), READINESS.parse()?, "/healthz/ready")?;
    assert_eq!(ready.status, 503, "still not ready: {}", ready.body);
    Ok(())
}

/// Runs `LOOP_PY` in the pod: connects to `to` over and over, printing each socket's own
/// address, until killed.
fn connect_loop(pod: &TestPod, to: SocketAddr, i: usize) -> Result<weft_tests::TestProcess> {
    let mut cmd = Command::new("python3");
    cmd.args([
        "-u",
        "-c",
        LOOP_PY,
        &to.ip().to_string(),
        &to.port().to_string(),
    ]);
    let process = pod.spawn(cmd, &format!("connect-loop-{i}"))?;
    assert_eventually(Duration::from_secs(10), || {
        if process.output().contains("ok ") {
            Ok(())
        } else {
            Err(format!("no connect yet: {}", process.output()))
        }
    });
    Ok(process)
}

/// Starts `LOOP_PY` in the pod (its connects may all fail for now).
fn connect_loop_from(pod: &TestPod, to: SocketAddr, i: usize) -> Result<weft_tests::TestProcess> {
    let mut cmd = Command::new("python3");
    cmd.args([
        "-u",
        "-c",
        LOOP_PY,
        &to.ip().to_string(),
        &to.port().to_string(),
    ]);
    pod.spawn(cmd, &format!("connect-loop-{i}"))
}

/// Replaces the pinned pod map with one whose record is 12 bytes, not 8 (what an agent with
/// another layout would have pinned), holding the pod of netns `cookie`.
fn pin_old_layout_pods(node: &TestNode, cookie: u64) -> Result<()> {
    let pods = node.pin_root().join("PODS");
    std::fs::remove_file(&pods).with_context(|| format!("unpin {}", pods.display()))?;
    let path = pods.display().to_string();
    bpftool(&[
        "map", "create", &path, "type", "hash", "key", "8", "value", "12", "entries", "1024",
        "name", "PODS",
    ])?;
    let key = hex_bytes(&cookie.to_le_bytes());
    let value = hex_bytes(&[1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
    let mut update = vec!["map", "update", "pinned", &path, "key", "hex"];
    update.extend(key.iter().map(String::as_str));
    update.extend(["value", "hex"]);
    update.extend(value.iter().map(String::as_str));
    bpftool(&update).map(drop)
}

fn bpftool(args: &[&str]) -> Result<String> {
    sys::run(Command::new("bpftool").args(args))
}

fn hex_bytes(bytes: &[u8]) -> Vec<String> {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Stops the loops and returns every local address their sockets had.
fn stop_loops(loops: &mut [weft_tests::TestProcess]) -> Result<HashSet<SocketAddr>> {
    let mut sockets = HashSet::new();
    for process in loops {
        process.kill();
        for line in process.lines_starting("ok") {
            let addr = line
                .split_whitespace()
                .nth(1)
                .context("ok line without an address")?;
            sockets.insert(addr.parse().with_context(|| format!("address {addr}"))?);
        }
    }
    Ok(sockets)
}

/// Writes `config` and waits until the agent applied it.
fn apply(agent: &TestAgent, config: &Value) -> Result<()> {
    let before = agent.generation()?;
    agent.rewrite_config(config)?;
    eventually(Duration::from_secs(10), || {
        let now = agent.generation()?;
        if now > before {
            Ok(())
        } else {
            Err(anyhow!("config generation still {now}"))
        }
    })
}

fn set_workload(config: &mut Value, name: &str, f: impl FnOnce(&mut Value)) {
    if let Some(w) = config["workloads"]
        .as_array_mut()
        .and_then(|ws| ws.iter_mut().find(|w| w["name"] == name))
    {
        f(w);
    }
}

/// Open connections the agent records for `pod` (either direction).
fn open_of(agent: &TestAgent, pod: &str) -> Result<usize, String> {
    let connections = agent.connections().map_err(|e| e.to_string())?;
    Ok(connections.active.iter().filter(|c| c.pod == pod).count())
}

const PORT: u16 = 7070;
const LOOPS: usize = 2;
const ROUNDS: usize = 20;
const READINESS: &str = "127.0.0.1:15021";

/// `python3 -c LOOP_PY <ip> <port>`: connect, print `ok <local addr>`, close; every 2 ms.
const LOOP_PY: &str = r#"
import socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
while True:
    s = socket.socket()
    s.settimeout(1)
    try:
        s.connect((host, port))
        ip, p = s.getsockname()[:2]
        print("ok %s:%d" % (ip, p))
    except OSError as e:
        print("error", e)
    finally:
        s.close()
    # Paced, so that the proxy and the agent's admin API keep up on a loaded machine.
    time.sleep(0.002)
"#;
