//! `TestAgent`: the real `weft` binary running as a node's agent.
//!
//! The config (docs/config.md) is generated from the node ([`TestNode::config`]) and
//! written to `<node dir>/weft.yaml`; the agent runs `weft agent --config <file>` with its
//! stdout and stderr in `<node dir>/agent.log`, whose tail is printed when the `TestAgent` is
//! dropped (libtest shows it only for a failed test).
//!
//! The agent process joins the node's netns only (between fork and exec), like a
//! DaemonSet pod with hostNetwork: it is *not* in the pods' cgroup subtree (unless the node
//! says `run_agent_under_hooks`, where a Kubernetes DaemonSet pod is), and it keeps
//! the host's mounts. (`ip netns exec` would not do: it remounts `/sys`, hiding bpffs and
//! the cgroup2 mount from the agent.)
//!
//! The agent is `$WEFT_BIN` unless the node names another [`AgentCommand`] (the runtime
//! image's binary in its own root: see [`crate::image`]).

use std::{
    ffi::OsString,
    net::SocketAddr,
    path::PathBuf,
    process::{Command, ExitStatus},
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};
use serde::Deserialize;
use serde_json::Value;

use crate::{
    app::weft_bin,
    eventually::{assert_eventually, eventually, scaled, until_ready},
    node::TestNode,
    pod::TestPod,
    process::{Placement, TestProcess},
    sys::{self, HttpResponse},
};

/// The agent of one [`TestNode`].
pub struct TestAgent {
    process: Option<TestProcess>,
    netns: PathBuf,
    /// The cgroup the agent joins; None: the test's own (outside the pods' subtree).
    cgroup: Option<PathBuf>,
    config_path: PathBuf,
    log_path: PathBuf,
    /// Length of the log when the current process started.
    log_offset: usize,
    command: AgentCommand,
    /// Extra environment of the agent process (the node's `agent_env`).
    env: Vec<(String, OsString)>,
    show_log_on_drop: bool,
    /// Added to the admin, readiness and metrics ports (a second agent beside the first).
    port_offset: u16,
}

/// How the agent is started: `<program> <args…> agent --config <file>`.
#[derive(Clone, Debug)]
pub struct AgentCommand {
    pub program: PathBuf,
    /// Arguments before the agent's own (a wrapper's, e.g. the chroot into an image).
    pub args: Vec<OsString>,
}

impl AgentCommand {
    /// The agent binary itself: `$WEFT_BIN`, or the one cargo built.
    pub fn binary() -> Self {
        AgentCommand {
            program: weft_bin(),
            args: Vec::new(),
        }
    }

    /// The agent binary in a mount namespace of its own whose `/proc/sys` is read-only, as
    /// container runtimes mount it for a container that is not privileged.
    pub fn with_read_only_proc_sys() -> Self {
        let script = "mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys \
                      && exec \"$@\"";
        AgentCommand {
            program: crate::sys::find_on_path("unshare").unwrap_or_else(|| "unshare".into()),
            args: ["--mount", "sh", "-c", script, "sh"]
                .into_iter()
                .map(OsString::from)
                .chain([weft_bin().into_os_string()])
                .collect(),
        }
    }

    /// The agent binary with its stdout sent to `path` (a FIFO whose reader the test
    /// controls), its stderr to the log as usual.
    pub fn with_stdout_to(path: &std::path::Path) -> Self {
        AgentCommand {
            program: "/bin/sh".into(),
            args: [
                OsString::from("-c"),
                "out=$1; shift; exec \"$@\" > \"$out\"".into(),
                "sh".into(),
                path.as_os_str().to_owned(),
                weft_bin().into_os_string(),
            ]
            .into(),
        }
    }
}

/// `GET /debug/connections`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Connections {
    pub active: Vec<ConnRecord>,
    pub recent: Vec<ConnRecord>,
}

/// One connection as the proxy recorded it.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct ConnRecord {
    pub id: u64,
    /// `outbound`, `inbound` (plaintext, 15006), `hbone` (mutual TLS, 15008) or `local`
    /// (from a pod of the same node, `mesh.sameNode: LOCAL`).
    pub direction: String,
    /// `namespace/name`.
    pub pod: String,
    pub src: String,
    /// The original destination.
    pub dst: String,
    pub upstream: Option<String>,
    /// `namespace/name` of the service, when `dst` was a service VIP.
    #[serde(default)]
    pub service: Option<String>,
    /// `namespace/name` of the waypoint a bound service's traffic goes through (then
    /// `upstream` is the waypoint's address).
    #[serde(default)]
    pub waypoint: Option<String>,
    /// SPIFFE ids proven by mutual TLS (none on a plaintext hop).
    #[serde(default, rename = "src.identity")]
    pub src_identity: Option<String>,
    #[serde(default, rename = "dst.identity")]
    pub dst_identity: Option<String>,
    /// What proved the identities: `mutual_tls`, `node_local` or `none`.
    #[serde(default)]
    pub security: Option<String>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub error: Option<String>,
}

impl Connections {
    /// Every record, active ones first.
    pub fn all(&self) -> impl Iterator<Item = &ConnRecord> {
        self.active.iter().chain(self.recent.iter())
    }
}

impl TestAgent {
    /// Writes the node's config, starts the agent and waits until `/healthz/ready` is 200.
    pub fn start(node: &TestNode) -> Result<Self> {
        let mut agent = Self::spawn_only(node)?;
        agent.wait_ready()?;
        Ok(agent)
    }

    /// Writes the node's config and starts the agent without waiting for readiness (for
    /// tests of start-up failures: see [`TestAgent::wait_exit`]).
    pub fn spawn_only(node: &TestNode) -> Result<Self> {
        if node.inner.mtls.get() {
            node.ensure_ca()?;
        }
        let yaml = serde_yaml::to_string(&node.config()).context("serialise config")?;
        Self::spawn_with_config_text(node, &yaml)
    }

    /// Starts the agent with this exact config text (for tests of bad configs).
    pub fn spawn_with_config_text(node: &TestNode, yaml: &str) -> Result<Self> {
        let dir = node.dir();
        let cgroup = node.agent_cgroup();
        if let Some(dir) = &cgroup {
            std::fs::create_dir_all(dir).with_context(|| format!("mkdir {}", dir.display()))?;
        }
        let mut agent = Self::new_at(node, dir.join("weft.yaml"), dir.join("agent.log"), 0);
        agent.write_config_text(yaml)?;
        agent.launch()?;
        Ok(agent)
    }

    /// Starts a second agent on the node, as a DaemonSet's surge pod would: the node's
    /// config with the admin, readiness and metrics ports moved up by `port_offset`, its own
    /// config file and log (`<name>.yaml`, `<name>.log`). Does not wait for readiness.
    pub fn spawn_beside(node: &TestNode, name: &str, port_offset: u16) -> Result<Self> {
        let mut config = node.config();
        let moved = |addr: &str| -> Result<String> {
            let addr: SocketAddr = addr.parse()?;
            Ok(SocketAddr::new(addr.ip(), addr.port() + port_offset).to_string())
        };
        config["agent"]["adminAddr"] = moved(ADMIN_ADDR)?.into();
        config["agent"]["readinessAddr"] = moved(READINESS_ADDR)?.into();
        config["agent"]["metricsAddr"] = moved(METRICS_ADDR)?.into();
        let dir = node.dir();
        let mut agent = Self::new_at(
            node,
            dir.join(format!("{name}.yaml")),
            dir.join(format!("{name}.log")),
            port_offset,
        );
        agent.rewrite_config(&config)?;
        agent.launch()?;
        Ok(agent)
    }

    fn new_at(node: &TestNode, config_path: PathBuf, log_path: PathBuf, port_offset: u16) -> Self {
        TestAgent {
            process: None,
            netns: node.netns_path(),
            cgroup: node.agent_cgroup(),
            log_path,
            log_offset: 0,
            show_log_on_drop: true,
            config_path,
            command: node.agent_command(),
            env: node.agent_env(),
            port_offset,
        }
    }

    fn launch(&mut self) -> Result<()> {
        let program = &self.command.program;
        if !program.is_file() {
            bail!(
                "agent binary {} not found: build it with `cargo build -p weft` or set WEFT_BIN",
                program.display()
            );
        }
        let mut cmd = Command::new(program);
        cmd.args(&self.command.args);
        cmd.arg("agent").arg("--config").arg(&self.config_path);
        // The config file is the whole truth: no flag defaults from the caller's env.
        for var in OVERRIDES {
            cmd.env_remove(var);
        }
        // What the test set on purpose (the node's `agent_env`).
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        // Plain text in the log file (tracing-subscriber honours NO_COLOR).
        cmd.env("NO_COLOR", "1");
        if std::env::var_os("WEFT_LOG").is_none() {
            cmd.env("WEFT_LOG", "info");
        }
        self.log_offset = self.log().len();
        let process = TestProcess::spawn(
            cmd,
            "agent",
            self.log_path.clone(),
            &Placement {
                netns: &self.netns,
                cgroup: self.cgroup.as_deref(),
            },
        )?;
        self.process = Some(process);
        Ok(())
    }

    /// Polls `GET /healthz/ready` until 200; fails at once if the agent exits.
    pub fn wait_ready(&mut self) -> Result<()> {
        let result = until_ready("agent", Duration::from_secs(30), || {
            if let Some(status) = self.try_status() {
                return Ok(Some(status));
            }
            match self.get("/healthz/ready") {
                Ok(r) if r.status == 200 => Ok(None),
                Ok(r) => Err(anyhow!("not ready ({}): {}", r.status, r.body.trim())),
                Err(e) => Err(e),
            }
        });
        result.map_err(|why| {
            anyhow!(
                "agent not ready: {why}\n--- agent log ---\n{}",
                self.current_log()
            )
        })
    }

    /// Waits for the agent to exit by itself (a start-up failure) and returns its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let process = self.process.as_mut().context("agent not running")?;
        Ok(process.wait(scaled(timeout))?.status)
    }

    /// `GET path` on the admin API.
    pub fn get(&self, path: &str) -> Result<HttpResponse> {
        let admin = admin_addr();
        let admin = SocketAddr::new(admin.ip(), admin.port() + self.port_offset);
        sys::http_get(&self.netns, admin, path)
    }

    /// `GET path` on the admin API, expecting 200 and JSON.
    pub fn get_json(&self, path: &str) -> Result<Value> {
        let r = self.get(path)?;
        if r.status != 200 {
            bail!("GET {path}: status {}: {}", r.status, r.body);
        }
        serde_json::from_str(&r.body).with_context(|| format!("GET {path}: not JSON: {}", r.body))
    }

    /// `GET /debug/connections`, parsed.
    pub fn connections(&self) -> Result<Connections> {
        let v = self.get_json("/debug/connections")?;
        serde_json::from_value(v.clone())
            .with_context(|| format!("unexpected /debug/connections shape: {v:#}"))
    }

    /// The id of the newest connection record, if any. Ids grow with every connection, so
    /// a record with a larger id is one of what the test did after asking.
    pub fn newest_record_id(&self) -> Result<Option<u64>> {
        Ok(self.connections()?.all().map(|r| r.id).max())
    }

    /// Waits for a record matching `pred` that is newer than `after` (see
    /// [`TestAgent::newest_record_id`]), so an earlier connection's record cannot answer.
    #[track_caller]
    pub fn expect_new_record(
        &self,
        after: Option<u64>,
        what: &str,
        pred: impl Fn(&ConnRecord) -> bool,
    ) -> ConnRecord {
        self.expect_record(what, |r| Some(r.id) > after && pred(r))
    }

    /// `<prefix>_agent_denied_connections_total{reason}` now: connections this node's
    /// proxy refused for `reason`, including TLS handshakes it refused (which leave no
    /// connection record).
    pub fn denied_total(&self, reason: &str) -> Result<u64> {
        let total = crate::metrics::Scrape::parse(&self.metrics()?)
            .sum("weft_agent_denied_connections_total", &[("reason", reason)]);
        // A counter: a whole number (and +0 when the agent has not counted any yet).
        Ok(total.abs() as u64)
    }

    /// Waits (up to 10 s) for a connection record matching `pred` and returns it (a record
    /// lands in `recent` on close); panics naming `what` and listing the records otherwise.
    #[track_caller]
    pub fn expect_record(&self, what: &str, pred: impl Fn(&ConnRecord) -> bool) -> ConnRecord {
        assert_eventually(Duration::from_secs(10), || {
            let records = self.connections().map_err(|e| format!("{e:#}"))?;
            records.all().find(|r| pred(r)).cloned().ok_or_else(|| {
                format!(
                    "no {what} record in /debug/connections; have: {:#?}",
                    records.all().collect::<Vec<_>>()
                )
            })
        })
    }

    /// `GET /metrics` on the metrics port (OpenMetrics text).
    pub fn metrics(&self) -> Result<String> {
        let addr: SocketAddr = METRICS_ADDR.parse().context("METRICS_ADDR")?;
        let addr = SocketAddr::new(addr.ip(), addr.port() + self.port_offset);
        let r = sys::http_get(&self.netns, addr, "/metrics")?;
        if r.status != 200 {
            bail!("GET /metrics: status {}: {}", r.status, r.body);
        }
        Ok(r.body)
    }

    /// The access-log records written so far: the agent's stdout lines that are JSON
    /// objects of `"kind":"access"` (docs/telemetry.md).
    pub fn access_log(&self) -> Vec<Value> {
        self.log()
            .lines()
            .filter(|l| l.starts_with(r#"{"kind":"access""#))
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// `GET /status`.
    pub fn status(&self) -> Result<Value> {
        self.get_json("/status")
    }

    /// Whether `pod`'s application sees its mesh clients' addresses: `client_address` in
    /// `/status` (None: the pod is not enrolled).
    pub fn keeps_client_addresses(&self, pod: &TestPod) -> Result<Option<bool>> {
        let status = self.status()?;
        Ok(status["pods"]["enrolled"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["pod"] == pod.pod_ref().as_str())
            .and_then(|p| p["client_address"].as_bool()))
    }

    /// The number of config snapshots the agent has accepted (`/status`
    /// `config.generation`): it grows when a reload is applied.
    pub fn generation(&self) -> Result<u64> {
        self.status()?["config"]["generation"]
            .as_u64()
            .context("no config.generation in /status")
    }

    /// Rewrites the config from `node` and waits until the agent applied it (its
    /// generation grew).
    pub fn reload_and_wait(&self, node: &TestNode) -> Result<()> {
        let before = self.generation()?;
        self.reload(node)?;
        eventually(Duration::from_secs(10), || {
            let now = self.generation()?;
            if now > before {
                Ok(())
            } else {
                Err(anyhow!("config generation still {now}"))
            }
        })
    }

    /// SIGKILL, as a crash or an OOM kill would. Pinned eBPF state stays.
    pub fn kill(&mut self) {
        if let Some(p) = self.process.as_mut() {
            p.kill();
        }
    }

    /// Replaces this agent as a rolling upgrade does: a successor run from its own copy of
    /// `binary` (as a new image brings it) starts beside it with the node's config and the
    /// same ports and takes its listeners over (`agent.handover`); once it is ready and this
    /// agent has stopped accepting, this one gets SIGTERM (the kubelet deleting its pod) and
    /// drains. Returns the successor.
    pub fn upgrade_to(
        &self,
        node: &TestNode,
        name: &str,
        binary: &std::path::Path,
    ) -> Result<TestAgent> {
        let next = node.dir().join(format!("weft-{name}"));
        std::fs::copy(binary, &next)
            .with_context(|| format!("copy the agent binary {}", binary.display()))?;
        node.set_agent_command(AgentCommand {
            program: next,
            args: Vec::new(),
        });
        let mut new = TestAgent::spawn_beside(node, name, 0)?;
        new.wait_ready()?;
        eventually(Duration::from_secs(30), || {
            let switched = self.current_log().contains("this one stops accepting");
            anyhow::ensure!(switched, "the running agent has not handed over");
            Ok(())
        })?;
        self.sigterm();
        Ok(new)
    }

    /// SIGTERM, as the kubelet sends when it deletes the pod: the agent drains.
    pub fn sigterm(&self) {
        if let Some(pid) = self.pid() {
            sys::kill(pid, libc::SIGTERM);
        }
    }

    /// Starts the agent again with the current config file and waits until ready.
    pub fn restart(&mut self) -> Result<()> {
        self.relaunch()?;
        self.wait_ready()
    }

    /// Kills the agent if it runs and starts it again, without waiting for readiness.
    pub fn relaunch(&mut self) -> Result<()> {
        self.kill();
        self.note("restarting agent");
        self.launch()
    }

    /// Writes `config` (serialised as YAML) to the config file.
    pub fn rewrite_config(&self, config: &Value) -> Result<()> {
        self.write_config_text(&config_yaml(config)?)
    }

    /// Writes raw YAML to the config file (for tests of bad configs). Written to a
    /// temporary file and renamed, so the agent's poller never reads half a file.
    pub fn write_config_text(&self, yaml: &str) -> Result<()> {
        let tmp = self.config_path.with_extension("yaml.tmp");
        std::fs::write(&tmp, yaml).with_context(|| format!("write {}", tmp.display()))?;
        std::fs::rename(&tmp, &self.config_path)
            .with_context(|| format!("rename to {}", self.config_path.display()))?;
        self.note(&format!("config rewritten:\n{yaml}"));
        Ok(())
    }

    /// Rewrites the config from the node's current state (e.g. after `set_enrolled`).
    pub fn reload(&self, node: &TestNode) -> Result<()> {
        self.rewrite_config(&node.config())
    }

    pub fn config_path(&self) -> &PathBuf {
        &self.config_path
    }

    /// The agent's output so far (all starts).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Whether dropping the agent prints its log's tail (default: yes, for tests).
    pub fn show_log_on_drop(&mut self, show: bool) {
        self.show_log_on_drop = show;
    }

    /// The output of the current (or last) agent process only.
    pub fn current_log(&self) -> String {
        let log = self.log();
        log.get(self.log_offset..).unwrap_or(&log).to_string()
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().and_then(TestProcess::pid)
    }

    /// The exit status, if the agent has exited.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.process.as_mut().and_then(TestProcess::try_status)
    }

    /// A marker line in the agent log, so a reader sees what the test did when.
    fn note(&self, what: &str) {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.log_path)
        {
            let _ = writeln!(f, "=== weft-tests: {what}");
        }
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        if let Some(mut p) = self.process.take() {
            // Graceful first, so a clean shutdown path gets exercised too.
            p.signal_and_reap(libc::SIGTERM);
        }
        // Always printed: libtest captures a test's output and shows it only when the test
        // fails, which includes a test that returns `Err` (its guards are dropped before
        // libtest sees the error, so `thread::panicking()` cannot tell).
        if self.show_log_on_drop {
            print_log_tail(&self.log_path, "agent log");
        }
    }
}

/// Prints the end of a process's log to stderr, which libtest shows for a failed test.
pub(crate) fn print_log_tail(path: &std::path::Path, what: &str) {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
    eprintln!(
        "--- {what} ({}, last {} of {} lines) ---\n{}\n--- end of {what} ---",
        path.display(),
        tail.len(),
        lines.len(),
        tail.join("\n")
    );
}

/// `config` as the YAML text [`TestAgent::rewrite_config`] writes (to time the write alone).
pub fn config_yaml(config: &Value) -> Result<String> {
    serde_yaml::to_string(config).context("serialise config")
}

/// The admin API address inside the node netns.
pub fn admin_addr() -> SocketAddr {
    ADMIN_ADDR
        .parse()
        .expect("ADMIN_ADDR is a valid socket address")
}

pub(crate) const ADMIN_ADDR: &str = "127.0.0.1:15000";
pub(crate) const READINESS_ADDR: &str = "127.0.0.1:15021";
pub(crate) const METRICS_ADDR: &str = "127.0.0.1:15020";
const LOG_TAIL_LINES: usize = 300;
/// `WEFT_*` variables that would override the config file (docs/config.md).
pub const OVERRIDES: &[&str] = &[
    "WEFT_CONFIG",
    "WEFT_PIN_ROOT",
    "WEFT_CGROUP_ROOT",
    "WEFT_ADMIN_ADDR",
    "WEFT_READINESS_ADDR",
    "WEFT_METRICS_ADDR",
    "WEFT_CA_CERT",
    "WEFT_CA_KEY",
    "WEFT_WORKER_THREADS",
];
