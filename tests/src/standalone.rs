//! `Standalone`: one of weft's L7 proxies that run as pods of their own (`weft waypoint`,
//! `weft gateway`), started from the real binary inside a pod of a [`TestNode`]: its own
//! netns and cgroup, outside the mesh, its identity from the node's CA root (in-process,
//! like the test agents'). [`crate::TestWaypoint`] and [`crate::gateway::TestGateway`] are
//! this with their own command line and state.
//!
//! Its state file is the node's agent config (workloads, services, policies, waypoints)
//! plus the sections the test gives (`routes`, `gateways`, `secrets`, ...), written to
//! `<node dir>/<pod>-<command>.yaml`; stdout (the JSON access log) and stderr go to
//! `<node dir>/<pod>-<command>.log`. Its admin (15000), metrics (15020) and readiness
//! (15021) ports are read from inside the pod.

use std::{
    ffi::OsString,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::{Command, ExitStatus},
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

use crate::{
    agent::print_log_tail,
    app::weft_bin,
    eventually::{eventually, scaled, until_ready},
    node::TestNode,
    pod::TestPod,
    process::{Placement, TestProcess},
    sys::{self, HttpResponse},
};

/// A `weft waypoint` or `weft gateway` process in a pod.
pub struct Standalone {
    /// `waypoint` or `gateway`: the subcommand, and what messages call it.
    command: &'static str,
    process: Option<TestProcess>,
    netns: PathBuf,
    config_path: PathBuf,
    log_path: PathBuf,
    show_log_on_drop: bool,
}

impl Standalone {
    /// Writes the state file (the node's config plus `sections`), starts `weft <command>
    /// --config <file> <args> --ca-cert .. --ca-key ..` in `pod`, and waits until it is
    /// ready.
    pub fn start(
        node: &TestNode,
        pod: &TestPod,
        command: &'static str,
        sections: Value,
        args: &[OsString],
    ) -> Result<Self> {
        let ca = node.ensure_ca()?;
        let dir = node.dir();
        let mut proxy = Standalone {
            command,
            process: None,
            netns: pod.netns_path(),
            config_path: dir.join(format!("{}-{command}.yaml", pod.name())),
            log_path: dir.join(format!("{}-{command}.log", pod.name())),
            show_log_on_drop: true,
        };
        proxy.write_sections(node, sections)?;
        let mut cmd = Command::new(weft_bin());
        cmd.arg(command)
            .arg("--config")
            .arg(&proxy.config_path)
            .args(args)
            .arg("--ca-cert")
            .arg(&ca.cert)
            .arg("--ca-key")
            .arg(&ca.key);
        for var in crate::agent::OVERRIDES {
            cmd.env_remove(var);
        }
        cmd.env("NO_COLOR", "1");
        if std::env::var_os("WEFT_LOG").is_none() {
            cmd.env("WEFT_LOG", "info");
        }
        let process = TestProcess::spawn(
            cmd,
            command,
            proxy.log_path.clone(),
            &Placement {
                netns: &proxy.netns,
                cgroup: Some(&pod.cgroup()),
            },
        )?;
        proxy.process = Some(process);
        proxy.wait_ready()?;
        Ok(proxy)
    }

    /// Rewrites the state file from the node's config and `sections` (top-level keys:
    /// `routes`, `trafficPolicies`, `gateways`, `secrets`, ...); the proxy picks the change
    /// up on its next poll.
    pub fn write_sections(&self, node: &TestNode, sections: Value) -> Result<()> {
        let mut config = node.config();
        if let (Some(c), Some(sections)) = (config.as_object_mut(), sections.as_object()) {
            c.extend(sections.clone());
            // The agent's own section means nothing to the proxy but its node, which tells
            // the node's pods (on the proxy's node) from the others.
            let node = c.get("agent").and_then(|a| a.get("node")).cloned();
            c.remove("agent");
            if let Some(node) = node {
                c.insert("agent".into(), serde_json::json!({ "node": node }));
            }
        }
        let yaml = serde_yaml::to_string(&config)
            .with_context(|| format!("serialise the {} state", self.command))?;
        // Written whole then renamed, so the proxy never reads half a file.
        let tmp = self.config_path.with_extension("yaml.tmp");
        std::fs::write(&tmp, yaml).with_context(|| format!("write {}", tmp.display()))?;
        std::fs::rename(&tmp, &self.config_path)
            .with_context(|| format!("rename to {}", self.config_path.display()))
    }

    /// `write_sections`, then waits until the config dump shows `shows` (in force).
    pub fn apply_sections(&self, node: &TestNode, sections: Value, shows: &str) -> Result<()> {
        self.write_sections(node, sections)?;
        eventually(Duration::from_secs(10), || {
            let dump = self.config_dump()?.to_string();
            if dump.contains(shows) {
                Ok(())
            } else {
                Err(anyhow!("config not applied yet: no {shows:?} in the dump"))
            }
        })
    }

    /// `GET /healthz/ready` until 200; fails at once if the process exits (a flag it does
    /// not know, a config it rejects) rather than after the whole patience.
    pub fn wait_ready(&mut self) -> Result<()> {
        let command = self.command;
        let result = until_ready(command, Duration::from_secs(30), || {
            if let Some(status) = self.process.as_mut().and_then(TestProcess::try_status) {
                return Ok(Some(status));
            }
            let r = sys::http_get(&self.netns, READINESS, "/healthz/ready")?;
            match r.status {
                200 => Ok(None),
                s => Err(anyhow!("not ready ({s}): {}", r.body.trim())),
            }
        });
        result.map_err(|why| anyhow!("{command} not ready: {why}\n--- log ---\n{}", self.log()))
    }

    /// The `/metrics` text.
    pub fn metrics(&self) -> Result<String> {
        let r = self.get(METRICS, "/metrics")?;
        if r.status != 200 {
            bail!("GET /metrics: {}: {}", r.status, r.body);
        }
        Ok(r.body)
    }

    /// The sum of the samples of metric `name` with these labels.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        Ok(crate::metrics::Scrape::parse(&self.metrics()?).sum(name, labels))
    }

    /// `GET /config_dump` on the admin port, as JSON.
    pub fn config_dump(&self) -> Result<Value> {
        let r = self.get(ADMIN, "/config_dump")?;
        serde_json::from_str(&r.body).with_context(|| format!("config dump not JSON: {}", r.body))
    }

    /// Every JSON access-log line written so far (one per request: `kind: "access"`, or
    /// a line with a `method`).
    pub fn access_log(&self) -> Vec<Value> {
        self.log()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v.get("method").is_some() || v["kind"] == "access")
            .collect()
    }

    /// Whether the log's tail is printed when the proxy is dropped (default: yes, as
    /// libtest shows it for a failed test only; the demo and the bench print their own).
    pub fn show_log_on_drop(&mut self, show: bool) {
        self.show_log_on_drop = show;
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().and_then(TestProcess::pid)
    }

    /// Waits for the process to exit (after a signal) and returns its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let process = self
            .process
            .as_mut()
            .with_context(|| format!("{} not running", self.command))?;
        Ok(process.wait(scaled(timeout))?.status)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    fn get(&self, addr: SocketAddr, path: &str) -> Result<HttpResponse> {
        sys::http_get(&self.netns, addr, path)
    }
}

impl Drop for Standalone {
    fn drop(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.signal_and_reap(libc::SIGTERM);
        }
        if self.show_log_on_drop {
            print_log_tail(&self.log_path, &format!("{} log", self.command));
        }
    }
}

const READINESS: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15021);
const METRICS: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15020);
const ADMIN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15000);
