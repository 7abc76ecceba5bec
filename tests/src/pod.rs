//! `TestPod`: a pod of a [`TestNode`]: a network namespace joined to the node's bridge, a
//! cgroup v2 leaf under the agent's `cgroupRoot`, and the workload entry of the agent config.
//!
//! Processes started with [`TestPod::spawn`] join the pod's cgroup and netns before they
//! exec. That matters: the cgroup socket hooks fire for sockets created by processes in
//! the pods' cgroup subtree, so a client app must be its own process spawned this way.

use std::{
    cell::{Cell, RefCell},
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    process::Command,
    rc::Rc,
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::{
    node::{NodeInner, TestNode},
    process::{Finished, Placement, Spawn, TestProcess, unique_path},
    sys,
};

/// Describes a pod; [`PodBuilder::create`] builds it.
pub struct PodBuilder<'a> {
    node: &'a TestNode,
    name: String,
    namespace: String,
    service_account: String,
    enrolled: bool,
    mtls_mode: Option<String>,
    labels: BTreeMap<String, String>,
    pod_uid: Option<String>,
    probe_ports: Vec<u16>,
}

/// A pod of a node. Cheap handle; the node owns (and deletes) what the pod is made of.
pub struct TestPod {
    node: Rc<NodeInner>,
    slot: usize,
}

/// What the node remembers of each pod.
pub(crate) struct PodSpec {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub enrolled: Cell<bool>,
    /// The workload's own `mtlsMode` (`STRICT`, `PERMISSIVE`, `DISABLED`), if set.
    pub mtls_mode: Option<String>,
    /// Kubernetes labels (policies select workloads by them).
    pub labels: RefCell<BTreeMap<String, String>>,
    /// Known to the agent by pod UID (`podUid:`) instead of by netns path: the agent
    /// learns the netns from the CNI plugin or from discovery.
    pub pod_uid: Option<String>,
    /// With `pod_uid`: the ports the kubelet's probes use (`probePorts:`).
    pub probe_ports: Vec<u16>,
    pub ip: Ipv4Addr,
    pub netns: String,
    pub cgroup: PathBuf,
}

impl<'a> PodBuilder<'a> {
    pub(crate) fn new(node: &'a TestNode, name: &str) -> Self {
        PodBuilder {
            node,
            name: name.to_string(),
            namespace: "default".to_string(),
            service_account: "default".to_string(),
            enrolled: true,
            mtls_mode: None,
            labels: BTreeMap::new(),
            pod_uid: None,
            probe_ports: Vec::new(),
        }
    }

    pub fn namespace(mut self, namespace: &str) -> Self {
        self.namespace = namespace.to_string();
        self
    }

    pub fn service_account(mut self, service_account: &str) -> Self {
        self.service_account = service_account.to_string();
        self
    }

    /// In the mesh (the default) or not.
    pub fn enrolled(mut self, enrolled: bool) -> Self {
        self.enrolled = enrolled;
        self
    }

    /// The pod's own mTLS mode (`STRICT`, `PERMISSIVE` or `DISABLED`), overriding the
    /// namespace's.
    pub fn mtls_mode(mut self, mode: &str) -> Self {
        self.mtls_mode = Some(mode.to_string());
        self
    }

    /// Adds a Kubernetes label.
    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.to_string(), value.to_string());
        self
    }

    /// Names the pod by Kubernetes UID in the agent config instead of by netns path.
    pub fn pod_uid(mut self, uid: &str) -> Self {
        self.pod_uid = Some(uid.to_string());
        self
    }

    /// The ports the kubelet would probe (with [`PodBuilder::pod_uid`]).
    pub fn probe_ports(mut self, ports: &[u16]) -> Self {
        self.probe_ports = ports.to_vec();
        self
    }

    /// Creates the pod's netns, veth, addresses and cgroup.
    pub fn create(self) -> Result<TestPod> {
        let node = &self.node.inner;
        let slot = node.pods.borrow().len();
        // .1 is the bridge; pods are .2, .3, …
        let host = u8::try_from(slot + 2)
            .ok()
            .filter(|h| *h < 255)
            .context("too many pods on one node")?;
        if node.pods.borrow().iter().any(|p| p.name == self.name) {
            bail!("pod {} exists already", self.name);
        }
        let netns = format!("{}~{}", node.netns, self.name);
        let ip = Ipv4Addr::new(10, node.index, 0, host);
        let cgroup = self.node.cgroup_root().join(&self.name);
        // Registered before anything exists, so the node's Drop removes whatever of it
        // was created, even if a step below fails.
        node.pods.borrow_mut().push(PodSpec {
            name: self.name.clone(),
            namespace: self.namespace,
            service_account: self.service_account,
            enrolled: Cell::new(self.enrolled),
            mtls_mode: self.mtls_mode,
            labels: RefCell::new(self.labels),
            pod_uid: self.pod_uid,
            probe_ports: self.probe_ports,
            ip,
            netns: netns.clone(),
            cgroup: cgroup.clone(),
        });

        let veth = format!("vp{host}");
        let cidr = format!("{ip}/16");
        let gateway = self.node.bridge_ip().to_string();
        sys::ip(&["netns", "add", &netns])?;
        sys::ip(&[
            "-n",
            &node.netns,
            "link",
            "add",
            &veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &netns,
        ])?;
        sys::ip(&[
            "-n",
            &node.netns,
            "link",
            "set",
            &veth,
            "master",
            "br0",
            "up",
        ])?;
        sys::ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        sys::ip(&["-n", &netns, "addr", "add", &cidr, "dev", "eth0"])?;
        sys::ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
        sys::ip(&["-n", &netns, "route", "add", "default", "via", &gateway])?;
        std::fs::create_dir_all(&cgroup).with_context(|| format!("mkdir {}", cgroup.display()))?;
        Ok(TestPod {
            node: Rc::clone(node),
            slot,
        })
    }
}

impl TestPod {
    fn with<T>(&self, f: impl FnOnce(&PodSpec) -> T) -> T {
        f(&self.node.pods.borrow()[self.slot])
    }

    pub fn name(&self) -> String {
        self.with(|p| p.name.clone())
    }

    pub fn namespace(&self) -> String {
        self.with(|p| p.namespace.clone())
    }

    /// `namespace/name`, as the agent's records name pods.
    pub fn pod_ref(&self) -> String {
        self.with(|p| format!("{}/{}", p.namespace, p.name))
    }

    pub fn service_account(&self) -> String {
        self.with(|p| p.service_account.clone())
    }

    /// The node's name, as agent configs (and ztunnel's workloads) name it.
    pub fn node_name(&self) -> String {
        self.node.node_name()
    }

    /// The node's directory, for files the pod's processes read.
    pub fn dir(&self) -> PathBuf {
        self.node.dir_path.clone()
    }

    /// The SPIFFE id the pod's certificate carries (the test CA's trust domain).
    pub fn spiffe_id(&self) -> String {
        self.with(|p| {
            format!(
                "spiffe://cluster.local/ns/{}/sa/{}",
                p.namespace, p.service_account
            )
        })
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.with(|p| p.ip)
    }

    pub fn addr(&self, port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(self.ip(), port)
    }

    pub fn netns_name(&self) -> String {
        self.with(|p| p.netns.clone())
    }

    pub fn netns_path(&self) -> PathBuf {
        sys::netns_path(&self.netns_name())
    }

    pub fn cgroup(&self) -> PathBuf {
        self.with(|p| p.cgroup.clone())
    }

    pub fn enrolled(&self) -> bool {
        self.with(|p| p.enrolled.get())
    }

    /// Changes the pod's `enrolled` flag in the node's config; the agent sees it at the next
    /// `TestAgent::reload()`.
    pub fn set_enrolled(&self, enrolled: bool) {
        self.with(|p| p.enrolled.set(enrolled));
    }

    /// Sets (or with `None` removes) a label in the node's config; the agent sees it at the
    /// next `TestAgent::reload()`.
    pub fn set_label(&self, key: &str, value: Option<&str>) {
        self.with(|p| {
            let mut labels = p.labels.borrow_mut();
            match value {
                Some(v) => labels.insert(key.to_string(), v.to_string()),
                None => labels.remove(key),
            };
        });
    }

    /// Starts a process inside the pod (its cgroup and its netns).
    pub fn spawn(&self, cmd: Command, name: &str) -> Result<TestProcess> {
        self.spawn_in_cgroup(cmd, name, &self.cgroup())
    }

    /// Starts a process in the pod's netns but in `cgroup` (a directory the caller made
    /// under the node's cgroup root, e.g. laid out as the kubelet lays out pods).
    pub fn spawn_in_cgroup(
        &self,
        cmd: Command,
        name: &str,
        cgroup: &std::path::Path,
    ) -> Result<TestProcess> {
        let netns = self.netns_path();
        let name = format!("{}-{name}", self.name());
        TestProcess::spawn(
            cmd,
            &name,
            unique_path(&self.node.dir_path, &name, "out"),
            &Placement {
                netns: &netns,
                cgroup: Some(cgroup),
            },
        )
    }

    /// Runs a process inside the pod to completion (killed after `timeout`).
    pub fn run(&self, cmd: Command, name: &str, timeout: Duration) -> Result<Finished> {
        self.spawn(cmd, name)?.wait(timeout)
    }
}

impl Spawn for TestPod {
    fn spawn(&self, cmd: Command, name: &str) -> Result<TestProcess> {
        TestPod::spawn(self, cmd, name)
    }
}
