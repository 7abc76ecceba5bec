//! `TestWaypoint`: the real `weft waypoint` running inside a pod of a [`TestNode`], as a
//! Kubernetes waypoint Deployment's pod would: its own netns and cgroup, outside the mesh
//! (the pod is not enrolled: the waypoint owns the pod's 15008), its identity from the
//! node's CA root (in-process, like the test agents').
//!
//! Its state file is the node's agent config (workloads, services, policies, waypoints)
//! plus the routes the test gives, written to `<node dir>/<pod>-waypoint.yaml`; stdout
//! (the JSON access log) and stderr go to `<node dir>/<pod>-waypoint.log`.

use std::{
    net::SocketAddr,
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

/// A waypoint process in a pod.
pub struct TestWaypoint {
    process: Option<TestProcess>,
    netns: PathBuf,
    config_path: PathBuf,
    log_path: PathBuf,
    show_log_on_drop: bool,
}

impl TestWaypoint {
    /// The pod a waypoint named `name` runs in on `node`: its service account is `name`,
    /// and it is not enrolled (the waypoint owns the pod's 15008).
    pub fn pod(node: &TestNode, name: &str) -> Result<TestPod> {
        node.pod(name)
            .service_account(name)
            .enrolled(false)
            .create()
    }

    /// Starts `weft waypoint` in `pod` as `name` (its service account too), with the
    /// node's config plus `routes` (Gateway API objects), and waits until it is ready.
    pub fn start(node: &TestNode, pod: &TestPod, name: &str, routes: Value) -> Result<Self> {
        Self::start_with_args(node, pod, name, routes, &[])
    }

    /// [`TestWaypoint::start`] with more `weft waypoint` flags (`--otlp-endpoint …`).
    pub fn start_with_args(
        node: &TestNode,
        pod: &TestPod,
        name: &str,
        routes: Value,
        args: &[&str],
    ) -> Result<Self> {
        let ca = node.ensure_ca()?;
        let dir = node.dir();
        let mut waypoint = TestWaypoint {
            process: None,
            netns: pod.netns_path(),
            config_path: dir.join(format!("{}-waypoint.yaml", pod.name())),
            log_path: dir.join(format!("{}-waypoint.log", pod.name())),
            show_log_on_drop: true,
        };
        waypoint.write_config(node, routes)?;
        let mut cmd = Command::new(weft_bin());
        cmd.arg("waypoint")
            .arg("--config")
            .arg(&waypoint.config_path)
            .args(["--name", name, "--service-account", name])
            .args(["--namespace", &pod.namespace()])
            .arg("--ca-cert")
            .arg(&ca.cert)
            .arg("--ca-key")
            .arg(&ca.key)
            .args(args);
        for var in crate::agent::OVERRIDES {
            cmd.env_remove(var);
        }
        cmd.env("NO_COLOR", "1");
        if std::env::var_os("WEFT_LOG").is_none() {
            cmd.env("WEFT_LOG", "info");
        }
        let process = TestProcess::spawn(
            cmd,
            "waypoint",
            waypoint.log_path.clone(),
            &Placement {
                netns: &waypoint.netns,
                cgroup: Some(&pod.cgroup()),
            },
        )?;
        waypoint.process = Some(process);
        waypoint.wait_ready()?;
        Ok(waypoint)
    }

    /// Rewrites the state file from the node's config and `routes`; the waypoint picks the
    /// change up on its next poll.
    pub fn write_config(&self, node: &TestNode, routes: Value) -> Result<()> {
        self.write_sections(node, serde_json::json!({ "routes": routes }))
    }

    /// Rewrites the state file from the node's config and `sections` (top-level keys:
    /// `routes`, `trafficPolicies`); the waypoint picks the change up on its next poll.
    pub fn write_sections(&self, node: &TestNode, sections: Value) -> Result<()> {
        let mut config = node.config();
        if let (Some(c), Some(sections)) = (config.as_object_mut(), sections.as_object()) {
            c.extend(sections.clone());
            // The agent's own section means nothing to a waypoint but its node, which tells
            // the node's pods (on the waypoint's node) from the others.
            let node = c.get("agent").and_then(|a| a.get("node")).cloned();
            c.remove("agent");
            if let Some(node) = node {
                c.insert("agent".into(), serde_json::json!({ "node": node }));
            }
        }
        let yaml = serde_yaml::to_string(&config).context("serialise waypoint config")?;
        // Written whole then renamed, so the waypoint never reads half a file.
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

    /// `GET /healthz/ready` until 200; fails at once if the waypoint exits (a flag it does
    /// not know, a config it rejects) rather than after the whole patience.
    pub fn wait_ready(&mut self) -> Result<()> {
        let result = until_ready("waypoint", Duration::from_secs(30), || {
            if let Some(status) = self.process.as_mut().and_then(TestProcess::try_status) {
                return Ok(Some(status));
            }
            let r = sys::http_get(&self.netns, READINESS, "/healthz/ready")?;
            match r.status {
                200 => Ok(None),
                s => Err(anyhow!("not ready ({s}): {}", r.body.trim())),
            }
        });
        result.map_err(|why| anyhow!("waypoint not ready: {why}\n--- log ---\n{}", self.log()))
    }

    /// The waypoint's `/metrics` text.
    pub fn metrics(&self) -> Result<String> {
        let r = self.get(METRICS, "/metrics")?;
        if r.status != 200 {
            bail!("GET /metrics: {}: {}", r.status, r.body);
        }
        Ok(r.body)
    }

    /// The sum of the waypoint's samples of metric `name` with these labels.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        Ok(crate::metrics::Scrape::parse(&self.metrics()?).sum(name, labels))
    }

    /// `GET /config_dump` on the admin port, as JSON.
    pub fn config_dump(&self) -> Result<Value> {
        let r = self.get(ADMIN, "/config_dump")?;
        serde_json::from_str(&r.body).with_context(|| format!("config dump not JSON: {}", r.body))
    }

    /// Every JSON access-log line written so far (one per request).
    pub fn access_log(&self) -> Vec<Value> {
        self.log()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v.get("method").is_some())
            .collect()
    }

    /// Whether the log's tail is printed when the waypoint is dropped (default: yes, as
    /// libtest shows it for a failed test only; the demo and the bench print their own).
    pub fn show_log_on_drop(&mut self, show: bool) {
        self.show_log_on_drop = show;
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().and_then(TestProcess::pid)
    }

    /// Waits for the waypoint to exit (after a signal) and returns its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let process = self.process.as_mut().context("waypoint not running")?;
        Ok(process.wait(scaled(timeout))?.status)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    fn get(&self, addr: SocketAddr, path: &str) -> Result<HttpResponse> {
        sys::http_get(&self.netns, addr, path)
    }
}

/// A Gateway API route of `kind` (`HTTPRoute`, `GRPCRoute`) named `name` in `default`,
/// attached to port `port` of the Service `service` there (GAMMA), with these `rules`:
/// what a waypoint's state file lists under `routes:`.
pub fn route(kind: &str, name: &str, service: &str, port: u16, rules: Value) -> Value {
    serde_json::json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": kind,
        "metadata": { "name": name, "namespace": "default" },
        "spec": {
            "parentRefs": [{ "group": "", "kind": "Service", "name": service, "port": port }],
            "rules": rules,
        },
    })
}

impl Drop for TestWaypoint {
    fn drop(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.signal_and_reap(libc::SIGTERM);
        }
        if self.show_log_on_drop {
            print_log_tail(&self.log_path, "waypoint log");
        }
    }
}

const READINESS: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 15021);
const METRICS: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 15020);
const ADMIN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 15000);
