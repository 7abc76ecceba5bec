//! `weft uninstall` end to end (issue 6, item 6: uninstall removes every pin and attachment):
//! what the Helm chart's pre-delete hook runs on each node. It waits while the agent still
//! answers, then leaves nothing of weft in the kernel: no program on the pods' cgroup, no
//! sk_lookup link in any pod's netns, no pin. Checked through bpftool, not the agent.

use std::{process::Command, thread, time::Duration};

use anyhow::{Result, ensure};
use weft_tests::{TestNode, app::weft_bin, bpf, privileged, scaled, test_name};

#[test]
fn uninstall_waits_for_the_agent_then_removes_every_pin_and_attachment() -> Result<()> {
    privileged!();
    let node = TestNode::new(test_name!(), 1)?;
    let client = node.pod("client").service_account("client").create()?;
    let server = node.pod("server").service_account("server").create()?;
    let mut agent = node.start_agent()?;
    let attached = bpf::cgroup_attachments(&node.cgroup_root())?;
    ensure!(
        attached.len() == 3,
        "connect4, connect6, sock_ops: {attached:?}"
    );
    for pod in [&client, &server] {
        ensure!(bpf::sk_lookup_links_in(&pod.netns_path())?.len() == 1);
    }

    let uninstall = || {
        let mut cmd = Command::new(weft_bin());
        cmd.arg("uninstall")
            .arg("--pin-root")
            .arg(node.pin_root())
            .args(["--wait-for-agent", READINESS_ADDR, "--timeout", "60s"]);
        cmd
    };
    let mut running = node.spawn(uninstall(), "uninstall")?;
    thread::sleep(scaled(Duration::from_secs(3)));
    assert!(
        running.try_status().is_none(),
        "uninstall must wait while the agent answers: {}",
        running.output()
    );
    assert!(
        node.pin_root().join("links").exists(),
        "nothing removed yet"
    );

    // What deleting the DaemonSet does to the agent; pins stay (fail closed) until uninstall.
    agent.kill();
    let finished = running.wait(scaled(Duration::from_secs(30)))?;
    assert!(finished.status.success(), "uninstall: {}", finished.output);
    assert!(
        finished.output.contains("removed every weft link and map"),
        "{}",
        finished.output
    );

    assert!(!node.pin_root().exists(), "pin root removed");
    let attached = bpf::cgroup_attachments(&node.cgroup_root())?;
    assert!(
        attached.is_empty(),
        "programs left on the cgroup: {attached:?}"
    );
    for pod in [&client, &server] {
        let links = bpf::sk_lookup_links_in(&pod.netns_path())?;
        assert!(
            links.is_empty(),
            "sk_lookup left in {}: {links:?}",
            pod.name()
        );
    }

    // Idempotent: the hook may run again (a retried pod, a second uninstall).
    let mut again = node.spawn(uninstall(), "uninstall-again")?;
    let finished = again.wait(scaled(Duration::from_secs(30)))?;
    assert!(
        finished.status.success(),
        "second uninstall: {}",
        finished.output
    );
    assert!(
        finished.output.contains("nothing to remove"),
        "{}",
        finished.output
    );
    Ok(())
}

/// Where the harness's agents serve readiness (inside the node's netns).
const READINESS_ADDR: &str = "127.0.0.1:15021";
