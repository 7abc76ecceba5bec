//! A container runtime's view of weft's chained CNI plugin: a bin dir and a conf dir with a
//! primary conflist, into which `weft cni install` put the plugin, and the plugin run as
//! libcni runs it. Pods created with a `pod_uid` become local to the agent only when ADD
//! tells it their netns, which is how the kubelet's probe ports reach the agent too.

use std::{
    io::Write,
    path::PathBuf,
    process::{Command, Output, Stdio},
};

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};

use crate::{app::weft_bin, node::TestNode, pod::TestPod};

/// A CNI setup as a container runtime has it: a bin dir and a conf dir with a primary
/// conflist, into which `weft cni install` put the plugin.
pub struct CniRuntime {
    _dir: tempfile::TempDir,
    bin: PathBuf,
    conflist: Value,
    /// The agent's CNI socket (the mesh-namespaces file lives beside it).
    pub socket: PathBuf,
}

impl CniRuntime {
    /// Installs the plugin with the real installer and points the node's agent at the
    /// same socket.
    pub fn install(node: &TestNode) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let (bin, conf) = (dir.path().join("bin"), dir.path().join("net.d"));
        std::fs::create_dir_all(&conf)?;
        std::fs::write(conf.join("10-bridge.conflist"), PRIMARY)?;
        // Short: a unix socket path holds at most 107 bytes, and node dirs are long.
        let socket = dir.path().join("run/cni.sock");
        let out = Command::new(weft_bin())
            .args(["cni", "install", "--bin-dir"])
            .arg(&bin)
            .arg("--conf-dir")
            .arg(&conf)
            .arg("--socket")
            .arg(&socket)
            .output()?;
        ensure!(out.status.success(), "weft cni install: {}", show(&out));
        let conflist: Value =
            serde_json::from_slice(&std::fs::read(conf.join("10-bridge.conflist"))?)?;
        node.set_agent_setting("cni", json!({ "socket": socket.display().to_string() }));
        // Required with `cni`; the node's cgroup tree has no kubelet layout here (the
        // discovery test builds one).
        node.set_agent_setting(
            "discovery",
            json!({ "cgroupRoot": node.cgroup_root().display().to_string() }),
        );
        Ok(Self {
            _dir: dir,
            bin,
            conflist,
            socket,
        })
    }

    /// What the primary plugin (bridge + host-local) would have returned for `pod`.
    pub fn prev_result(&self, pod: &TestPod) -> Value {
        json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "sandbox": pod.netns_path()}],
            "ips": [{"address": format!("{}/16", pod.ip()), "interface": 0}],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dns": {}
        })
    }

    /// Runs the last plugin of the conflist as libcni does: `<bin>/<type>`, no arguments,
    /// the plugin's entry plus the list's `cniVersion` and `name` and `prevResult` on stdin.
    pub fn call(&self, command: &str, pod: &TestPod, namespace: &str, uid: &str) -> Result<Output> {
        let plugins = self.conflist["plugins"].as_array().context("plugins")?;
        let mut conf = plugins.last().context("no plugins")?.clone();
        conf["cniVersion"] = self.conflist["cniVersion"].clone();
        conf["name"] = self.conflist["name"].clone();
        if command != "DEL" {
            conf["prevResult"] = self.prev_result(pod);
        }
        let plugin_type = conf["type"].as_str().context("type")?;
        let mut child = Command::new(self.bin.join(plugin_type))
            .env_clear()
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", format!("sandbox-{}", pod.name()))
            .env("CNI_NETNS", pod.netns_path())
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", &self.bin)
            .env(
                "CNI_ARGS",
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID=sandbox;K8S_POD_UID={uid}",
                    pod.name()
                ),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("exec the plugin")?;
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(conf.to_string().as_bytes())?;
        Ok(child.wait_with_output()?)
    }
}

/// A finished command's status and both outputs, for failure messages.
pub fn show(out: &Output) -> String {
    format!(
        "{}; stdout {}; stderr {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A primary conflist as the reference bridge plugin setup writes it.
const PRIMARY: &str = r#"{
  "cniVersion": "1.0.0",
  "name": "weft-test-bridge",
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": true,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.1.0.0/16"}]]}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}"#;
