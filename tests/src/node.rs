//! `TestNode`: one simulated Kubernetes node on this kernel.
//!
//! A node is a network namespace `weft-<test>-<pid>~<node>` holding a bridge `br0`
//! (`10.<node>.0.1/16`); each pod is a network namespace `weft-<test>-<pid>~<node>~<pod>`
//! whose `eth0` is a veth joined to that bridge, with IP `10.<node>.0.<pod>/16`. Nothing
//! is created in the host netns, so parallel tests cannot collide on interface names.
//!
//! Alongside: a cgroup v2 subtree `<cgroup2>/weft-<test>-<pid>-<node>/pods/<pod>` (the
//! agent's `cgroupRoot` is `.../pods`; its `hostCgroup` is the node's cgroup itself, and the
//! node's own processes, the "kubelet" among them, run in `.../host`), a bpffs pin root
//! `/sys/fs/bpf/weft-test-<test>-<pid>-<node>` (never under `/sys/fs/bpf/weft`, the real
//! agent's), and a directory for the agent config and every process's output (kept when
//! the test panics or `WEFT_TEST_KEEP` is set).
//!
//! `Drop` kills every process in the node's namespaces and cgroups, then deletes cgroups
//! (leaf first), namespaces (which takes veths and the bridge along) and pins. It never
//! panics: a cleanup failure is printed.
//!
//! Guards are `!Send` (an `Rc` inside): a node belongs to the test thread that built it.

use std::{
    cell::{Cell, RefCell},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    rc::{Rc, Weak},
    sync::Once,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::{
    agent::{AgentCommand, TestAgent},
    pod::{PodBuilder, PodSpec},
    process::{Placement, TestProcess, unique_path},
    sys,
};

/// One simulated node. See the module docs for what it creates.
pub struct TestNode {
    pub(crate) inner: Rc<NodeInner>,
}

pub(crate) struct NodeInner {
    pub test: String,
    pub index: u8,
    pub netns: String,
    /// `<cgroup2>/weft-<test>-<pid>-<node>`.
    pub cgroup_node: PathBuf,
    pub pin_root: PathBuf,
    pub dir: RefCell<Option<tempfile::TempDir>>,
    pub dir_path: PathBuf,
    pub pods: RefCell<Vec<PodSpec>>,
    pub services: RefCell<Vec<Service>>,
    pub mesh: RefCell<Value>,
    /// The config's `policies:` list.
    pub policies: RefCell<Value>,
    /// The config's `waypoints:` list.
    pub waypoints: RefCell<Value>,
    /// The config's `trafficPolicies:` list.
    pub traffic_policies: RefCell<Value>,
    /// The config's `externalServices:` list (left out of the config while empty).
    pub external_services: RefCell<Value>,
    /// Environment variables of the agent process (`WEFT_RESOLV_CONF`, …).
    pub agent_env: RefCell<Vec<(String, std::ffi::OsString)>>,
    /// Extra keys of the config's `agent:` section (`certLifetime`, `ca`, …).
    pub agent_settings: RefCell<serde_json::Map<String, Value>>,
    /// Mutual TLS between pods: on by default, with an in-process CA (see `ensure_ca`).
    pub mtls: Cell<bool>,
    /// The CA root the agent signs with (in-process), shared by joined nodes.
    pub ca: RefCell<Option<Rc<CaFiles>>>,
    /// Nodes joined to this one by `connect`: their pods appear in this node's config as
    /// remote workloads. Weak, so two joined nodes still drop (and clean up).
    pub peers: RefCell<Vec<Weak<NodeInner>>>,
    /// Run the agent inside the pods' cgroup subtree, as a Kubernetes DaemonSet pod is
    /// (under the same kubepods root the hooks attach to), instead of outside it.
    pub agent_under_hooks: Cell<bool>,
    /// How the agent is started (default: the `weft` binary, see `AgentCommand::binary`).
    pub agent_command: RefCell<Option<AgentCommand>>,
    netns_created: Cell<bool>,
}

/// A CA root made by `weft ca init`.
#[derive(Debug)]
pub struct CaFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A Kubernetes Service as the agent's config describes it.
#[derive(Clone, Debug)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub vips: Vec<Ipv4Addr>,
    /// (port, targetPort)
    pub ports: Vec<(u16, u16)>,
    pub endpoints: Vec<Ipv4Addr>,
    /// The waypoint (in the service's namespace) the service is bound to.
    pub waypoint: Option<String>,
}

impl TestNode {
    /// Builds node number `index` (1..=254) for the test `test`.
    pub fn new(test: &str, index: u8) -> Result<Self> {
        if index == 0 || index == 255 {
            bail!("node index must be 1..=254, got {index}");
        }
        static SWEEP: Once = Once::new();
        SWEEP.call_once(sweep_stale);

        let test = sanitize(test);
        let pid = std::process::id();
        let prefix = format!("weft-{test}-{pid}");
        let cgroup_node = sys::cgroup2_root()?.join(format!("{prefix}-{index}"));
        let pin_root = sys::bpffs_root()?.join(format!("weft-test-{test}-{pid}-{index}"));
        let dir = tempfile::Builder::new()
            .prefix(&format!("{prefix}-{index}-"))
            .tempdir()
            .context("create node directory")?;
        let node = TestNode {
            inner: Rc::new(NodeInner {
                netns: format!("{prefix}~{index}"),
                test,
                index,
                cgroup_node,
                pin_root,
                dir_path: dir.path().to_path_buf(),
                dir: RefCell::new(Some(dir)),
                pods: RefCell::new(Vec::new()),
                services: RefCell::new(Vec::new()),
                mesh: RefCell::new(json!({ "excludedPorts": [22] })),
                policies: RefCell::new(json!([])),
                waypoints: RefCell::new(json!([])),
                traffic_policies: RefCell::new(json!([])),
                external_services: RefCell::new(json!([])),
                agent_env: RefCell::default(),
                agent_settings: RefCell::default(),
                mtls: Cell::new(true),
                ca: RefCell::new(None),
                peers: RefCell::new(Vec::new()),
                agent_under_hooks: Cell::new(false),
                agent_command: RefCell::new(None),
                netns_created: Cell::new(false),
            }),
        };
        // On error the half-built node is dropped here, which removes what was created.
        node.create()?;
        Ok(node)
    }

    fn create(&self) -> Result<()> {
        let n = &self.inner;
        sys::ip(&["netns", "add", &n.netns])?;
        n.netns_created.set(true);
        let bridge_ip = format!("{}/16", self.bridge_ip());
        // A fixed address: a bridge without one takes its lowest port's, so a pod created
        // later could change the gateway's MAC under the running pods, which then send to
        // the old one (dropped as not for this host) until their neighbour entry expires.
        let bridge_mac = format!("02:00:0a:{:02x}:00:01", n.index);
        for args in [
            vec!["link", "set", "lo", "up"],
            vec![
                "link",
                "add",
                BRIDGE,
                "address",
                &bridge_mac,
                "type",
                "bridge",
            ],
            vec!["addr", "add", &bridge_ip, "dev", BRIDGE],
            vec!["link", "set", BRIDGE, "up"],
        ] {
            let mut full = vec!["-n", &n.netns];
            full.extend(args);
            sys::ip(&full)?;
        }
        for dir in [self.cgroup_root(), self.host_cgroup()] {
            std::fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        }
        std::fs::create_dir_all(&n.pin_root)
            .with_context(|| format!("mkdir {}", n.pin_root.display()))?;
        Ok(())
    }

    /// Joins this node and `other` as two machines of one cluster: a veth link between the
    /// node namespaces (`10.255.0.<node>/24` on each end), each node routing the other's
    /// pod subnet over it, and each node's pods listed in the other's config as remote
    /// workloads (`node: <name>`). The link goes away with either node's namespace.
    pub fn connect(&self, other: &TestNode) -> Result<()> {
        let (a, b) = (&self.inner, &other.inner);
        let (a_end, b_end) = (format!("nd{}", b.index), format!("nd{}", a.index));
        sys::ip(&[
            "-n", &a.netns, "link", "add", &a_end, "type", "veth", "peer", "name", &b_end, "netns",
            &b.netns,
        ])?;
        for (node, end, peer) in [(a, &a_end, b), (b, &b_end, a)] {
            let addr = format!("10.255.0.{}/24", node.index);
            let subnet = format!("10.{}.0.0/16", peer.index);
            let via = format!("10.255.0.{}", peer.index);
            sys::ip(&["-n", &node.netns, "addr", "add", &addr, "dev", end])?;
            sys::ip(&["-n", &node.netns, "link", "set", end, "up"])?;
            sys::ip(&["-n", &node.netns, "route", "add", &subnet, "via", &via])?;
            // A node forwards between its bridge and the link, as a real node routes pods.
            sys::in_netns(&sys::netns_path(&node.netns), || {
                std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").context("enable ip_forward")
            })?;
        }
        a.peers.borrow_mut().push(Rc::downgrade(b));
        b.peers.borrow_mut().push(Rc::downgrade(a));
        // One cluster, one trust root: both agents sign with the same CA key.
        if a.mtls.get() && b.mtls.get() {
            let ca = self.ensure_ca()?;
            *b.ca.borrow_mut() = Some(ca);
        }
        Ok(())
    }

    /// Turns mutual TLS off for this node: no CA, so its agent runs the plaintext hop.
    pub fn without_mtls(&self) {
        self.inner.mtls.set(false);
        *self.inner.ca.borrow_mut() = None;
    }

    /// Sets a key of the config's `agent:` section (`certLifetime`, `ca`, …).
    pub fn set_agent_setting(&self, key: &str, value: Value) {
        self.inner
            .agent_settings
            .borrow_mut()
            .insert(key.to_string(), value);
    }

    /// Gives this node a CA root of its own (after `connect` shared one): the agents of the
    /// two nodes then do not trust each other.
    pub fn use_own_ca(&self) -> Result<Rc<CaFiles>> {
        *self.inner.ca.borrow_mut() = None;
        self.ensure_ca()
    }

    /// Makes `ca` this node's CA root (before `connect`, which shares it): e.g. the root a
    /// ztunnel's CA signs under.
    pub fn use_ca(&self, ca: CaFiles) {
        *self.inner.ca.borrow_mut() = Some(Rc::new(ca));
    }

    /// The node's CA root, created with `weft ca init` the first time it is needed.
    pub fn ensure_ca(&self) -> Result<Rc<CaFiles>> {
        if let Some(ca) = self.inner.ca.borrow().as_ref() {
            return Ok(Rc::clone(ca));
        }
        let dir = self.dir().join("ca");
        let out = Command::new(crate::app::weft_bin())
            .args(["ca", "init", "--out"])
            .arg(&dir)
            .output()
            .context("run weft ca init")?;
        if !out.status.success() {
            bail!(
                "weft ca init failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let ca = Rc::new(CaFiles {
            cert: dir.join("ca.crt"),
            key: dir.join("ca.key"),
        });
        *self.inner.ca.borrow_mut() = Some(Rc::clone(&ca));
        Ok(ca)
    }

    /// The node's name in its agent config (and in the other nodes' configs).
    pub fn node_name(&self) -> String {
        self.inner.node_name()
    }

    /// The name of the interface on this node that leads to `other` (after `connect`):
    /// where a capture sees what crosses between the two nodes.
    pub fn link_to(&self, other: &TestNode) -> String {
        format!("nd{}", other.inner.index)
    }

    /// Starts describing a pod; `.create()` builds it.
    pub fn pod(&self, name: &str) -> PodBuilder<'_> {
        PodBuilder::new(self, name)
    }

    /// Adds a service to the node's config (written when the agent starts or reloads).
    pub fn add_service(&self, service: Service) {
        self.inner.services.borrow_mut().push(service);
    }

    /// Replaces the config's `policies:` list (AccessPolicy, see docs/policy.md); written when
    /// the agent starts or reloads.
    pub fn set_policies(&self, policies: Value) {
        *self.inner.policies.borrow_mut() = policies;
    }

    /// Replaces the config's `trafficPolicies:` list (TrafficPolicy manifests, see
    /// docs/waypoint.md); written when the agent starts or reloads.
    pub fn set_traffic_policies(&self, policies: Value) {
        *self.inner.traffic_policies.borrow_mut() = policies;
    }

    /// Replaces the config's `externalServices:` list (ExternalService items, see
    /// docs/egress.md and `crate::internet::ExternalService`); written when the agent
    /// starts or reloads. An empty list leaves the key out of the config.
    pub fn set_external_services(&self, services: Value) {
        *self.inner.external_services.borrow_mut() = services;
    }

    /// Sets `mesh.outboundTrafficPolicy.mode` (`ALLOW_ANY` or `REGISTRY_ONLY`), keeping the
    /// rest of the `mesh:` section; written when the agent starts or reloads.
    pub fn set_outbound_mode(&self, mode: &str) {
        self.inner.mesh.borrow_mut()["outboundTrafficPolicy"] = json!({ "mode": mode });
    }

    /// Sets an environment variable of the agent process, from its next start on (e.g.
    /// `WEFT_RESOLV_CONF`: see `crate::internet::Internet::serve_dns_to`).
    pub fn set_agent_env(&self, key: &str, value: impl Into<std::ffi::OsString>) {
        let mut env = self.inner.agent_env.borrow_mut();
        env.retain(|(k, _)| k != key);
        env.push((key.to_owned(), value.into()));
    }

    /// The agent process's extra environment (see [`TestNode::set_agent_env`]).
    pub fn agent_env(&self) -> Vec<(String, std::ffi::OsString)> {
        self.inner.agent_env.borrow().clone()
    }

    /// Replaces the config's `waypoints:` list (`[{name, namespace, serviceAccount, ips}]`);
    /// written when the agent starts or reloads.
    pub fn set_waypoints(&self, waypoints: Value) {
        *self.inner.waypoints.borrow_mut() = waypoints;
    }

    /// Binds the node's service `namespace/name` to `waypoint` (None: unbinds it); written
    /// when the agent starts or reloads.
    pub fn set_service_waypoint(&self, namespace: &str, name: &str, waypoint: Option<&str>) {
        for s in self.inner.services.borrow_mut().iter_mut() {
            if s.namespace == namespace && s.name == name {
                s.waypoint = waypoint.map(str::to_owned);
            }
        }
    }

    /// Replaces the config's `mesh:` section (default `{excludedPorts: [22]}`).
    pub fn set_mesh(&self, mesh: Value) {
        *self.inner.mesh.borrow_mut() = mesh;
    }

    /// Starts the real agent in this node's netns and waits until it is ready.
    pub fn start_agent(&self) -> Result<TestAgent> {
        TestAgent::start(self)
    }

    /// The agent's YAML config for the node as it is now (see docs/config.md).
    pub fn config(&self) -> Value {
        let n = &self.inner;
        let workloads: Vec<Value> = n
            .pods
            .borrow()
            .iter()
            .map(|p| {
                let mut workload = json!({
                    "name": p.name,
                    "namespace": p.namespace,
                    "serviceAccount": p.service_account,
                    "ips": [p.ip.to_string()],
                    "netns": sys::netns_path(&p.netns).display().to_string(),
                    "node": n.node_name(),
                    "enrolled": p.enrolled.get(),
                    "mtlsMode": p.mtls_mode,
                    "labels": *p.labels.borrow(),
                });
                if let Some(uid) = &p.pod_uid {
                    workload["podUid"] = json!(uid);
                    if !p.probe_ports.is_empty() {
                        workload["probePorts"] = json!(p.probe_ports);
                    }
                    if let Some(w) = workload.as_object_mut() {
                        w.remove("netns");
                    }
                }
                workload
            })
            .chain(self.remote_workloads())
            .collect();
        let services: Vec<Value> = n
            .services
            .borrow()
            .iter()
            .map(|s| {
                let mut service = json!({
                    "name": s.name,
                    "namespace": s.namespace,
                    "vips": s.vips.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "ports": s.ports.iter().map(|(port, target)| json!({
                        "port": port,
                        "targetPort": target,
                    })).collect::<Vec<_>>(),
                    "endpoints": s.endpoints.iter().map(ToString::to_string).collect::<Vec<_>>(),
                });
                if let Some(waypoint) = &s.waypoint {
                    service["waypoint"] = json!(waypoint);
                }
                service
            })
            .collect();
        let mut agent = json!({
            "node": n.node_name(),
            "pinRoot": n.pin_root.display().to_string(),
            "cgroupRoot": self.cgroup_root().display().to_string(),
            "hostCgroup": n.cgroup_node.display().to_string(),
            "adminAddr": crate::agent::ADMIN_ADDR,
            "readinessAddr": crate::agent::READINESS_ADDR,
            "metricsAddr": crate::agent::METRICS_ADDR,
        });
        if let Some(ca) = n.ca.borrow().as_ref() {
            agent["ca"] = json!({ "inProcess": {
                "cert": ca.cert.display().to_string(),
                "key": ca.key.display().to_string(),
            }});
        }
        for (key, value) in n.agent_settings.borrow().iter() {
            agent[key] = value.clone();
        }
        let mut config = json!({
            "agent": agent,
            "mesh": n.mesh.borrow().clone(),
            "workloads": workloads,
            "services": services,
            "policies": n.policies.borrow().clone(),
            "waypoints": n.waypoints.borrow().clone(),
            "trafficPolicies": n.traffic_policies.borrow().clone(),
        });
        // Only when there are some: an agent that predates external services rejects the
        // key, and every other test's config stays what it was.
        let external = n.external_services.borrow();
        if external.as_array().is_some_and(|a| !a.is_empty()) {
            config["externalServices"] = external.clone();
        }
        config
    }

    /// Runs a process of the node itself (tcpdump, `weft status`, the kubelet): in the
    /// node's netns and its host cgroup, outside every pod's cgroup.
    pub fn spawn(&self, cmd: Command, name: &str) -> Result<TestProcess> {
        TestProcess::spawn(
            cmd,
            name,
            unique_path(self.dir(), name, "out"),
            &Placement {
                netns: &self.netns_path(),
                cgroup: Some(&self.host_cgroup()),
            },
        )
    }

    /// Runs the agent inside the pods' cgroup subtree (`<cgroupRoot>/weft-agent`), where a
    /// Kubernetes DaemonSet pod is: the cgroup hooks then see the agent's own sockets too.
    pub fn run_agent_under_hooks(&self) {
        self.inner.agent_under_hooks.set(true);
    }

    /// Starts the agent with `command` instead of the `weft` binary (e.g. the image's).
    pub fn set_agent_command(&self, command: AgentCommand) {
        *self.inner.agent_command.borrow_mut() = Some(command);
    }

    /// How the agent is started.
    pub fn agent_command(&self) -> AgentCommand {
        self.inner
            .agent_command
            .borrow()
            .clone()
            .unwrap_or_else(AgentCommand::binary)
    }

    /// The cgroup the agent joins, if not the test's own (see `run_agent_under_hooks`).
    pub fn agent_cgroup(&self) -> Option<PathBuf> {
        self.inner
            .agent_under_hooks
            .get()
            .then(|| self.cgroup_root().join("weft-agent"))
    }

    pub fn index(&self) -> u8 {
        self.inner.index
    }

    pub fn test_name(&self) -> &str {
        &self.inner.test
    }

    pub fn netns_name(&self) -> &str {
        &self.inner.netns
    }

    pub fn netns_path(&self) -> PathBuf {
        sys::netns_path(&self.inner.netns)
    }

    /// The agent's `cgroupRoot`: every pod's cgroup is a child of it.
    pub fn cgroup_root(&self) -> PathBuf {
        self.inner.cgroup_node.join("pods")
    }

    /// The node's own processes' cgroup (the kubelet's, in a real node): `<node>/host`.
    pub fn host_cgroup(&self) -> PathBuf {
        self.inner.cgroup_node.join("host")
    }

    pub fn pin_root(&self) -> &Path {
        &self.inner.pin_root
    }

    /// Directory holding the agent config, its log and every process's output.
    pub fn dir(&self) -> &Path {
        &self.inner.dir_path
    }

    pub fn bridge_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, self.inner.index, 0, 1)
    }
}

impl TestNode {
    /// The pods of joined nodes, as remote workloads of this node's config.
    fn remote_workloads(&self) -> Vec<Value> {
        let peers: Vec<Rc<NodeInner>> = self
            .inner
            .peers
            .borrow()
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        peers
            .iter()
            .flat_map(|peer| {
                peer.pods
                    .borrow()
                    .iter()
                    .map(|p| {
                        json!({
                            "name": p.name,
                            "namespace": p.namespace,
                            "serviceAccount": p.service_account,
                            "ips": [p.ip.to_string()],
                            "node": peer.node_name(),
                            "enrolled": p.enrolled.get(),
                            "mtlsMode": p.mtls_mode,
                            "labels": *p.labels.borrow(),
                        })
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

impl NodeInner {
    pub(crate) fn node_name(&self) -> String {
        format!("{}-node{}", self.test, self.index)
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        let n = &self.inner;
        let pods: Vec<String> = n.pods.borrow().iter().map(|p| p.netns.clone()).collect();
        let mut namespaces = pods;
        if n.netns_created.get() {
            namespaces.push(n.netns.clone());
        }
        teardown(&namespaces, &n.cgroup_node, &n.pin_root);
        let keep = thread::panicking() || std::env::var_os("WEFT_TEST_KEEP").is_some();
        if keep && let Some(dir) = n.dir.borrow_mut().take() {
            let kept = dir.keep();
            eprintln!(
                "weft-tests: node {} files kept in {}",
                n.index,
                kept.display()
            );
        }
    }
}

/// Kills everything inside, then removes cgroups, namespaces and pins. Never panics.
fn teardown(namespaces: &[String], cgroup_node: &Path, pin_root: &Path) {
    // 1. Processes: everything in our cgroup subtree and in our namespaces.
    if cgroup_node.exists() {
        // cgroup.kill (Linux 5.14+) SIGKILLs the whole subtree at once.
        let _ = std::fs::write(cgroup_node.join("cgroup.kill"), "1");
    }
    for ns in namespaces {
        if let Ok(pids) = sys::ip(&["netns", "pids", ns]) {
            for pid in pids.split_whitespace().filter_map(|p| p.parse().ok()) {
                sys::kill(pid, libc::SIGKILL);
            }
        }
    }
    // 2. cgroups, leaf first; a killed process may take a moment to leave.
    if cgroup_node.exists() {
        let mut dirs = Vec::new();
        collect_dirs(cgroup_node, &mut dirs);
        // Deepest first.
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for dir in dirs {
            let deadline = Instant::now() + crate::scaled(Duration::from_secs(5));
            loop {
                match std::fs::remove_dir(&dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(e) if Instant::now() > deadline => {
                        eprintln!("weft-tests: cleanup: rmdir {}: {e}", dir.display());
                        break;
                    }
                    Err(_) => thread::sleep(Duration::from_millis(20)),
                }
            }
        }
    }
    // 3. Namespaces: deleting the last reference takes the veths and the bridge along.
    for ns in namespaces {
        if sys::netns_path(ns).exists()
            && let Err(e) = sys::ip(&["netns", "delete", ns])
        {
            eprintln!("weft-tests: cleanup: {e:#}");
        }
    }
    // 4. Pins: unpinning detaches the links nobody holds any more.
    if pin_root.exists()
        && let Err(e) = std::fs::remove_dir_all(pin_root)
    {
        eprintln!("weft-tests: cleanup: rm -r {}: {e}", pin_root.display());
    }
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                collect_dirs(&entry.path(), out);
            }
        }
    }
    out.push(dir.to_path_buf());
}

/// Removes what earlier test processes left when they were killed before their `Drop` ran:
/// namespaces, cgroups and pin roots whose name carries the pid of a process that is gone.
pub fn sweep_stale() {
    let alive = |pid: &str| Path::new("/proc").join(pid).exists();
    // Names: netns `weft-<test>-<pid>~<node>[~<pod>]`, cgroup `weft-<test>-<pid>-<node>`,
    // pin root `weft-test-<test>-<pid>-<node>`.
    let netns_pid = |name: &str| -> Option<String> {
        let head = name.strip_prefix("weft-")?.split('~').next()?;
        Some(head.rsplit('-').next()?.to_string())
    };
    let dashed_pid = |name: &str| -> Option<String> {
        let mut parts = name.rsplit('-');
        parts.next()?;
        Some(parts.next()?.to_string())
    };
    let numeric = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());

    let mut stale_ns = Vec::new();
    if let Ok(list) = std::fs::read_dir("/run/netns") {
        for entry in list.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.contains('~') {
                continue;
            }
            if let Some(pid) = netns_pid(&name).filter(|p| numeric(p))
                && !alive(&pid)
            {
                stale_ns.push(name);
            }
        }
    }
    let mut stale_cgroups = Vec::new();
    if let Ok(root) = sys::cgroup2_root()
        && let Ok(list) = std::fs::read_dir(&root)
    {
        for entry in list.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with("weft-") {
                continue;
            }
            if let Some(pid) = dashed_pid(&name).filter(|p| numeric(p))
                && !alive(&pid)
            {
                stale_cgroups.push(entry.path());
            }
        }
    }
    let mut stale_pins = Vec::new();
    if let Ok(root) = sys::bpffs_root()
        && let Ok(list) = std::fs::read_dir(&root)
    {
        for entry in list.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with("weft-test-") {
                continue;
            }
            if let Some(pid) = dashed_pid(&name).filter(|p| numeric(p))
                && !alive(&pid)
            {
                stale_pins.push(entry.path());
            }
        }
    }
    if stale_ns.is_empty() && stale_cgroups.is_empty() && stale_pins.is_empty() {
        return;
    }
    eprintln!(
        "weft-tests: removing leftovers of earlier runs: {} netns, {} cgroups, {} pin roots",
        stale_ns.len(),
        stale_cgroups.len(),
        stale_pins.len()
    );
    teardown(
        &stale_ns,
        Path::new("/nonexistent"),
        Path::new("/nonexistent"),
    );
    for cgroup in stale_cgroups {
        teardown(&[], &cgroup, Path::new("/nonexistent"));
    }
    for pins in stale_pins {
        teardown(&[], Path::new("/nonexistent"), &pins);
    }
}

/// Test names become part of netns, cgroup and pin names: keep `[a-z0-9_]`.
fn sanitize(test: &str) -> String {
    // `module::test_name` → `test_name`.
    let last = test.rsplit("::").next().unwrap_or(test);
    let s: String = last
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    // Keep names well under NAME_MAX with room for pid and indices.
    s.chars().take(64).collect()
}

const BRIDGE: &str = "br0";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitizes_test_names() {
        assert_eq!(sanitize("datapath::Outbound-To Pod"), "outbound_to_pod");
    }
}
