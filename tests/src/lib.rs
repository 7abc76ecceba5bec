//! The harness of weft's privileged end-to-end tests: simulated nodes and pods on this
//! kernel (network namespaces, veth pairs, a bridge, cgroup v2 groups), the real `weft`
//! agent running against them, and a small test application inside the pods.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use weft_tests::{TestNode, app};
//! if !weft_tests::can_run_privileged("example") { return Ok(()); }
//! let node = TestNode::new("example", 1)?;
//! let client = node.pod("client").service_account("client").create()?;
//! let server = node.pod("server").service_account("server").create()?;
//! let agent = node.start_agent()?;
//! let _srv = app::serve(&server, 8080, app::Mode::Hash)?;
//! let report = app::send(&client, server.addr(8080).into(), 1024, 7)?;
//! let records = agent.connections()?;
//! # Ok(()) }
//! ```
//!
//! Everything a node creates is named after the test and the test process's pid, so tests
//! run in parallel, and is removed when the node is dropped (see [`node`]).

pub mod agent;
pub mod app;
pub mod bench;
pub mod bpf;
pub mod cni;
pub mod eventually;
pub mod fixture;
pub mod gateway;
#[cfg(feature = "helm")]
pub mod helm;
pub mod image;
#[cfg(feature = "jwt")]
pub mod internet;
#[cfg(feature = "jwt")]
pub mod jwt;
pub mod l7;
pub mod metrics;
pub mod node;
pub mod outside;
pub mod pod;
pub mod process;
pub mod standalone;
pub mod steady;
pub mod sys;
#[cfg(feature = "jwt")]
pub mod tls;
pub mod waypoint;
pub mod wire;
pub mod ztunnel;

pub use agent::{AgentCommand, ConnRecord, Connections, TestAgent};
pub use eventually::{assert_eventually, eventually, scaled};
pub use fixture::ClientServer;
pub use node::{CaFiles, Service, TestNode};
pub use pod::{PodBuilder, TestPod};
pub use process::{Spawn, TestProcess};
pub use waypoint::TestWaypoint;

/// The name of the enclosing test function (names the test's namespaces and cgroups).
#[macro_export]
macro_rules! test_name {
    () => {{
        fn f() {}
        let name = std::any::type_name_of_val(&f);
        let name = name.strip_suffix("::f").unwrap_or(name);
        name.rsplit("::").next().unwrap_or(name)
    }};
}

/// Returns `Ok(())` early (skipping, recorded for `cargo xtask test`'s summary) when the
/// test cannot run here; panics instead in CI.
#[macro_export]
macro_rules! privileged {
    () => {
        if !$crate::can_run_privileged($crate::test_name!()) {
            return Ok(());
        }
    };
}

/// Whether this privileged end-to-end test can run here. Not root, or a missing tool or
/// kernel feature: in CI (`CI` set) that is a failure (panic: a test never passes by
/// skipping in CI); elsewhere the test is skipped with a message naming what is missing.
pub fn can_run_privileged(test: &str) -> bool {
    match missing_requirement() {
        None => true,
        Some(missing) => {
            skip(test, &missing);
            false
        }
    }
}

/// Skips `test` because of what is `missing` (a message); panics instead in CI. The skip
/// is recorded for `cargo xtask test`'s summary (see [`weft_test_env`]).
pub fn skip(test: &str, missing: &str) {
    weft_test_env::skip(test, missing);
}

/// What stops privileged tests from running here, if anything.
pub fn missing_requirement() -> Option<String> {
    if !sys::is_root() {
        return Some("needs root (netns, cgroups, eBPF); run `cargo xtask test` as root".into());
    }
    for tool in ["ip", "bpftool", "tcpdump", "nsenter"] {
        if !sys::on_path(tool) {
            return Some(format!(
                "`{tool}` is not installed; run `cargo xtask setup`"
            ));
        }
    }
    if let Some(missing) = missing_kernel_feature() {
        return Some(format!("kernel feature missing: {missing}"));
    }
    if let Err(e) = sys::cgroup2_root() {
        return Some(format!("kernel feature missing: cgroup v2 ({e:#})"));
    }
    if let Err(e) = sys::bpffs_root() {
        return Some(format!("kernel feature missing: bpffs ({e:#})"));
    }
    None
}

/// sk_lookup (5.9), SO_NETNS_COOKIE (5.14) and cgroup.kill (5.14): Linux 5.15 or newer.
fn missing_kernel_feature() -> Option<String> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse::<u32>().ok());
    let version = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if version < (5, 15) {
        return Some(format!(
            "sk_lookup, SO_NETNS_COOKIE and cgroup.kill need Linux 5.15+, this is {}",
            release.trim()
        ));
    }
    None
}
