//! `Outside`: a network namespace outside the cluster, neither a node nor a pod, linked to
//! one node by a veth pair and reaching the cluster's addresses (`10.0.0.0/8`) through that
//! node, untranslated: the internet of the egress tests ([`crate::internet`], behind the
//! node's default route) and the outside client of the ingress gateway tests
//! ([`crate::gateway`], which calls a gateway pod's address from there).
//!
//! ```text
//!  pod 10.1.0.2 ──br0── node netns ──<node end> <node ip>/24 ─── <far end> <far ip>/24── outside netns
//!                       [default via <far ip>]                   10.0.0.0/8 via <node ip>
//! ```
//!
//! Processes run there outside every cgroup of the test ([`Spawn`]); their output files go
//! to the node's directory. `Drop` kills every process in the namespace and deletes it (the
//! link goes with it); it never panics.

use std::{net::Ipv4Addr, path::PathBuf, process::Command};

use anyhow::{Context, Result};

use crate::{
    node::TestNode,
    process::{Placement, Spawn, TestProcess, unique_path},
    sys,
    wire::Capture,
};

/// A namespace outside the cluster. See the module docs.
pub struct Outside {
    netns: String,
    link: Link,
    dir: PathBuf,
}

/// The veth pair between a node and an [`Outside`], and what routes over it.
#[derive(Clone, Copy, Debug)]
pub struct Link {
    /// The interface in the node's netns.
    pub node_end: &'static str,
    /// The interface in the outside netns.
    pub far_end: &'static str,
    /// The node's address on the link (`/24`).
    pub node_ip: Ipv4Addr,
    /// The outside's address on the link (`/24`): what the cluster sees as its source.
    pub far_ip: Ipv4Addr,
    /// Whether the node's default route goes over the link (the internet) or not (a client
    /// out there, answered over the link's own subnet).
    pub default_route: bool,
}

impl Outside {
    /// Creates the namespace `weft-<test>-<pid>~<name>` and links it to `node` as `link`
    /// says; the node forwards between the link and its pods.
    pub fn new(node: &TestNode, name: &str, link: Link) -> Result<Self> {
        let prefix = node
            .netns_name()
            .rsplit_once('~')
            .map_or(node.netns_name(), |(prefix, _)| prefix);
        let outside = Outside {
            netns: format!("{prefix}~{name}"),
            link,
            dir: node.dir().to_path_buf(),
        };
        // On error the half-built namespace is dropped here, which removes it.
        outside.create(node)?;
        Ok(outside)
    }

    fn create(&self, node: &TestNode) -> Result<()> {
        let (far, node_ns, link) = (self.netns.as_str(), node.netns_name(), &self.link);
        sys::ip(&["netns", "add", far])?;
        sys::ip(&["-n", far, "link", "set", "lo", "up"])?;
        sys::ip(&[
            "-n",
            node_ns,
            "link",
            "add",
            link.node_end,
            "type",
            "veth",
            "peer",
            "name",
            link.far_end,
            "netns",
            far,
        ])?;
        let (node_addr, far_addr) = (
            format!("{}/24", link.node_ip),
            format!("{}/24", link.far_ip),
        );
        let (node_ip, far_ip) = (link.node_ip.to_string(), link.far_ip.to_string());
        for args in [
            vec![
                "-n",
                node_ns,
                "addr",
                "add",
                &node_addr,
                "dev",
                link.node_end,
            ],
            vec!["-n", node_ns, "link", "set", link.node_end, "up"],
            vec!["-n", far, "addr", "add", &far_addr, "dev", link.far_end],
            vec!["-n", far, "link", "set", link.far_end, "up"],
            // The outside routes the cluster's addresses to the node, untranslated.
            vec!["-n", far, "route", "add", "10.0.0.0/8", "via", &node_ip],
        ] {
            sys::ip(&args)?;
        }
        if link.default_route {
            // The node reaches the outside through its default route, as a real node
            // reaches the internet.
            sys::ip(&["-n", node_ns, "route", "add", "default", "via", &far_ip])?;
        }
        sys::in_netns(&node.netns_path(), || {
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").context("enable ip_forward")
        })
    }

    pub fn netns_name(&self) -> &str {
        &self.netns
    }

    pub fn netns_path(&self) -> PathBuf {
        sys::netns_path(&self.netns)
    }

    /// The outside's address on the link: the source address the cluster sees.
    pub fn ip(&self) -> Ipv4Addr {
        self.link.far_ip
    }

    /// Adds `ip/32` to the outside's loopback (one more host out there).
    pub fn add_loopback_address(&self, ip: Ipv4Addr) -> Result<()> {
        let addr = format!("{ip}/32");
        sys::ip(&["-n", &self.netns, "addr", "add", &addr, "dev", "lo"])?;
        Ok(())
    }

    /// Captures on the outside's end of the link (everything that crosses between it and
    /// the node). Run as a process of `node`.
    pub fn capture(&self, node: &TestNode, filter: &str) -> Result<Capture> {
        let name = self.netns.rsplit('~').next().unwrap_or("outside");
        Capture::in_netns(node, &self.netns_path(), name, self.link.far_end, filter)
    }
}

impl Spawn for Outside {
    /// Runs `cmd` in the outside netns, outside every pod's cgroup.
    fn spawn(&self, cmd: Command, name: &str) -> Result<TestProcess> {
        let prefix = self.netns.rsplit('~').next().unwrap_or("outside");
        let name = format!("{prefix}-{name}");
        TestProcess::spawn(
            cmd,
            &name,
            unique_path(&self.dir, &name, "out"),
            &Placement {
                netns: &self.netns_path(),
                cgroup: None,
            },
        )
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        if !sys::netns_path(&self.netns).exists() {
            return;
        }
        if let Ok(pids) = sys::ip(&["netns", "pids", &self.netns]) {
            for pid in pids.split_whitespace().filter_map(|p| p.parse().ok()) {
                sys::kill(pid, libc::SIGKILL);
            }
        }
        // Deleting the namespace takes its end of the link, and so the node's end, along.
        if let Err(e) = sys::ip(&["netns", "delete", &self.netns]) {
            eprintln!("weft-tests: cleanup: {e:#}");
        }
    }
}
