//! A real Istio ztunnel (`../shared/tools/ztunnel/`, or `WEFT_ZTUNNEL`) serving one pod, as
//! its dedicated mode runs it: inside the pod's netns, with a local workloads file instead
//! of istiod, and its in-process CA signing under the root in `ca/` that weft's agent can
//! use too. Its outbound capture is ztunnel's own (iptables REDIRECT in the pod), not weft's.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};

use crate::{eventually::eventually, node::CaFiles, pod::TestPod, process::TestProcess, sys};

/// The ztunnel binary: `WEFT_ZTUNNEL`, else `shared/tools/ztunnel/ztunnel` in the nearest
/// directory above this checkout that has one (the layout this project is developed in).
pub fn binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("WEFT_ZTUNNEL") {
        return Some(PathBuf::from(path));
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .map(|dir| dir.join("shared/tools/ztunnel/ztunnel"))
        .find(|path| path.is_file())
}

/// The root ztunnel's in-process CA signs under, beside the binary (`ca/`): a weft agent
/// given it trusts ztunnel, and ztunnel trusts the agent.
pub fn ca(binary: &Path) -> CaFiles {
    let dir = binary.parent().unwrap_or(Path::new(".")).join("ca");
    CaFiles {
        cert: dir.join("ca.crt"),
        key: dir.join("ca.key"),
    }
}

/// The binary, or what stops ztunnel from running here.
pub fn available() -> Result<PathBuf, String> {
    let bin = binary().ok_or_else(|| {
        "no ztunnel binary: set WEFT_ZTUNNEL, or put one at ../shared/tools/ztunnel/ztunnel"
            .to_string()
    })?;
    if !bin.is_file() {
        return Err(format!(
            "no ztunnel binary at {} (WEFT_ZTUNNEL)",
            bin.display()
        ));
    }
    if !sys::on_path("iptables") {
        return Err("`iptables` is not installed (ztunnel's own capture needs it)".into());
    }
    Ok(bin)
}

/// ztunnel's mark on its own sockets, which its capture rule skips.
const PACKET_MARK: u32 = 0x539;

/// A ztunnel serving one pod.
pub struct Ztunnel {
    process: TestProcess,
    netns: PathBuf,
}

impl Ztunnel {
    /// Starts ztunnel for `pod`, knowing `peers` (weft's pods) as HBONE workloads,
    /// and waits until it is ready.
    pub fn start(binary: &Path, pod: &TestPod, peers: &[&TestPod]) -> Result<Self> {
        let workloads: Vec<Value> = std::iter::once(pod)
            .chain(peers.iter().copied())
            .map(|p| {
                json!({
                    "uid": format!("Kubernetes//Pod/{}/{}", p.namespace(), p.name()),
                    "name": p.name(),
                    "namespace": p.namespace(),
                    "serviceAccount": p.service_account(),
                    "workloadIps": [p.ip().to_string()],
                    "protocol": "HBONE",
                    "node": p.node_name(),
                    "network": "",
                    "trustDomain": "cluster.local",
                    "services": {},
                })
            })
            .collect();
        let file = pod
            .dir()
            .join(format!("{}-ztunnel-workloads.yaml", pod.name()));
        let doc = json!({ "workloads": workloads, "policies": [], "services": [] });
        std::fs::write(&file, serde_yaml::to_string(&doc)?)
            .with_context(|| format!("write {}", file.display()))?;

        let mut capture = Command::new("iptables");
        capture.args([
            "-w", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "!", "-o", "lo",
        ]);
        capture.args([
            "-m",
            "mark",
            "!",
            "--mark",
            &format!("{PACKET_MARK:#x}/0xfff"),
        ]);
        capture.args(["-j", "REDIRECT", "--to-ports", "15001"]);
        let done = pod.run(capture, "ztunnel-capture", Duration::from_secs(10))?;
        ensure!(done.status.success(), "iptables: {}", done.output);

        let mut cmd = Command::new(binary);
        let info = format!(
            "{}/{}/{}",
            pod.namespace(),
            pod.name(),
            pod.service_account()
        );
        cmd.envs([
            ("PROXY_MODE", "dedicated"),
            ("PROXY_WORKLOAD_INFO", info.as_str()),
            ("FAKE_CA", "true"),
            ("CA_ADDRESS", ""),
            ("XDS_ADDRESS", ""),
            ("PACKET_MARK", &PACKET_MARK.to_string()),
            ("ENABLE_ORIG_SRC", "false"),
            ("TRUST_DOMAIN", "cluster.local"),
            ("CLUSTER_ID", "Kubernetes"),
            ("RUST_LOG", "info"),
        ])
        .env("LOCAL_XDS_PATH", &file);
        let process = pod.spawn(cmd, "ztunnel")?;
        let ztunnel = Ztunnel {
            process,
            netns: pod.netns_path(),
        };
        eventually(Duration::from_secs(30), || {
            let r = sys::http_get(&ztunnel.netns, addr(15021), "/healthz/ready")?;
            ensure!(
                r.status == 200,
                "ztunnel not ready ({}): {}",
                r.status,
                r.body
            );
            Ok(())
        })
        .with_context(|| format!("ztunnel log:\n{}", ztunnel.log()))?;
        Ok(ztunnel)
    }

    /// Its Prometheus metrics (`:15020/metrics`).
    pub fn metrics(&self) -> Result<String> {
        Ok(sys::http_get(&self.netns, addr(15020), "/metrics")?.body)
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// What it has printed so far.
    pub fn log(&self) -> String {
        self.process.output()
    }
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}
