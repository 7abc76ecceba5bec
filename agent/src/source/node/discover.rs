//! Pod discovery from the node itself: walks the kubelet's cgroup v2 tree to find every pod
//! running here and, for each, a process whose network namespace is the pod's. This is how
//! the agent learns pods that started while it was down (the CNI plugin tells it of all
//! others), at start-up before the first enrollment and then periodically.
//!
//! Input: the host's cgroup2 mount and the host's /proc as the agent sees them (in a pod:
//! host mounts at configurable paths; the agent must share the host PID namespace so that
//! `cgroup.procs` lists host pids). Output: a [`Scan`] of pods (UID → `/proc/<pid>/ns/net`)
//! and of pods whose netns could not be reached, applied to `NodePods`
//! as `LearnedFrom::Discovery`.
//!
//! Layouts (kubelet `--cgroup-driver`), QoS `burstable` / `besteffort` (guaranteed pods
//! sit directly under the root slice):
//! - systemd: `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid, - as _>.slice/
//!   cri-containerd-<id>.scope` (containerd) or `crio-<id>.scope` (CRI-O; its
//!   `crio-conmon-<id>.scope` holds the monitor, which lives in the host netns);
//! - cgroupfs: `kubepods/<qos>/pod<uid>/<id>` (containerd) or `.../crio-<id>` (CRI-O).
//!
//! `hostNetwork` pods share the node's netns and are skipped.
//!
//! Which process: the oldest one of the pod. The runtime starts the sandbox (pause) process
//! first and it lives as long as the pod, so its netns path stays valid across container
//! restarts; an application container's pid goes away when it restarts.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs, io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Serialize;
use tracing::{debug, info, warn};

use super::{LearnedFrom, NodePod, NodePods, is_pod_uid};

/// Where to look.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Config {
    /// The host's cgroup2 mount (`/sys/fs/cgroup`, or the host mount inside the agent's
    /// pod): `kubepods.slice` (systemd driver) or `kubepods` (cgroupfs driver) lies under it.
    pub cgroup_root: PathBuf,
    /// The host's /proc (`/proc` with `hostPID: true`, or a host mount such as `/host/proc`).
    pub proc_root: PathBuf,
    /// How often the tree is scanned again.
    #[serde(with = "crate::settings::humantime_ms")]
    pub interval: Duration,
}

/// What one walk of the tree found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scan {
    /// Pods with a reachable netns, by UID.
    pub pods: BTreeMap<String, DiscoveredPod>,
    /// Pods with a cgroup but no netns the agent can use, by UID, with the reason.
    pub unreachable: BTreeMap<String, String>,
    /// `hostNetwork` pods: they run in the node's netns, which is never enrolled.
    pub host_network: BTreeSet<String>,
}

/// A pod found on the node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiscoveredPod {
    /// The pod's cgroup directory.
    pub cgroup: PathBuf,
    /// `<proc_root>/<pid>/ns/net` of the pod's oldest process.
    pub netns: PathBuf,
    /// (device, inode) of that netns: two paths naming the same namespace compare equal.
    pub netns_id: (u64, u64),
}

/// What applying a scan changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub recorded: Vec<String>,
    pub forgotten: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "cannot read the cgroup tree at {path}: {source} (is the host's /sys/fs/cgroup mounted there? agent.discovery.cgroupRoot)"
    )]
    ReadTree {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path} is not a /proc: {source} (is the host's /proc mounted there? agent.discovery.procRoot)"
    )]
    ProcRoot {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the agent's own network namespace {path}: {source}")]
    HostNetns {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Walks the tree under `config.cgroup_root` (both drivers; a missing root is no pods).
pub fn scan(config: &Config) -> Result<Scan, Error> {
    let uptime = config.proc_root.join("uptime");
    fs::metadata(&uptime).map_err(|source| Error::ProcRoot {
        path: config.proc_root.clone(),
        source,
    })?;
    // The agent runs in the node's netns (hostNetwork): pods sharing it are hostNetwork pods.
    let own = Path::new("/proc/self/ns/net");
    let host = netns_id(own).map_err(|source| Error::HostNetns {
        path: own.to_owned(),
        source,
    })?;
    scan_against(config, host)
}

/// [`scan`], with the node's netns given (device, inode).
fn scan_against(config: &Config, host: (u64, u64)) -> Result<Scan, Error> {
    let mut scan = Scan::default();
    for driver in [Driver::Systemd, Driver::Cgroupfs] {
        let root = config.cgroup_root.join(driver.root());
        for pod_dir in pod_dirs(driver, &root)? {
            let Some(uid) = pod_dir
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| driver.pod_uid(n))
            else {
                continue;
            };
            match pod_netns(&config.proc_root, &pod_dir) {
                Ok((_, netns_id)) if netns_id == host => {
                    scan.host_network.insert(uid);
                }
                Ok((netns, netns_id)) => {
                    scan.pods.insert(
                        uid,
                        DiscoveredPod {
                            cgroup: pod_dir,
                            netns,
                            netns_id,
                        },
                    );
                }
                Err(reason) => {
                    scan.unreachable.insert(uid, reason);
                }
            }
        }
    }
    Ok(scan)
}

/// Brings `pods` in line with `scan`: records discovered pods the node did not know (or
/// knew at a path that no longer names the pod's netns), forgets pods learned by discovery
/// whose cgroup is gone, and pods learned from CNI whose netns path is gone (a DEL missed
/// while the agent was down). Pods the scan could not reach keep what is known of them.
pub fn apply(scan: &Scan, pods: &NodePods) -> Applied {
    let known: HashMap<String, NodePod> = pods.all().into_iter().collect();
    let mut applied = Applied::default();
    for (uid, found) in &scan.pods {
        let still_valid = known
            .get(uid)
            .is_some_and(|pod| netns_id(&pod.netns).is_ok_and(|id| id == found.netns_id));
        if !still_valid {
            pods.record(
                uid.clone(),
                NodePod {
                    netns: found.netns.clone(),
                    ips: Vec::new(),
                    learned_from: LearnedFrom::Discovery,
                },
            );
            applied.recorded.push(uid.clone());
        }
    }
    for (uid, pod) in &known {
        if scan.pods.contains_key(uid) || scan.unreachable.contains_key(uid) {
            continue;
        }
        let gone = match pod.learned_from {
            LearnedFrom::Discovery => true,
            // The CNI plugin tells of pods before their cgroup may be visible: only a netns
            // that no longer exists proves the pod gone.
            LearnedFrom::Cni => !pod.netns.exists(),
        };
        if gone {
            pods.forget(uid);
            applied.forgotten.push(uid.clone());
        }
    }
    applied
}

/// One scan applied to `pods`, logged. Blocking (file-system reads).
pub fn reconcile(config: &Config, pods: &NodePods) -> Result<Applied, Error> {
    let scan = scan(config)?;
    for (uid, reason) in &scan.unreachable {
        warn!(component = "discovery", pod_uid = %uid, reason = %reason,
            "pod found in the cgroup tree but its netns is unusable; it is not enrolled from discovery");
    }
    for uid in &scan.host_network {
        debug!(component = "discovery", pod_uid = %uid, "hostNetwork pod: nothing to enroll");
    }
    let applied = apply(&scan, pods);
    for uid in &applied.recorded {
        let netns = scan.pods.get(uid).map(|p| p.netns.display().to_string());
        info!(component = "discovery", pod_uid = %uid, netns = ?netns, "pod discovered on the node");
    }
    for uid in &applied.forgotten {
        info!(component = "discovery", pod_uid = %uid, "pod gone from the node");
    }
    Ok(applied)
}

/// Scans every `config.interval`, forever (the first scan is the caller's, at start-up).
pub async fn watch(config: Config, pods: std::sync::Arc<NodePods>) {
    let mut ticker = tokio::time::interval(config.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let (config, pods) = (config.clone(), std::sync::Arc::clone(&pods));
        match tokio::task::spawn_blocking(move || reconcile(&config, &pods)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                warn!(component = "discovery", error = %e, "pod discovery failed; will retry")
            }
            Err(e) => warn!(component = "discovery", error = %e, "BUG: pod discovery panicked"),
        }
    }
}

/// The kubelet's cgroup driver, which decides the names in the tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Driver {
    Systemd,
    Cgroupfs,
}

impl Driver {
    fn root(self) -> &'static str {
        match self {
            Self::Systemd => "kubepods.slice",
            Self::Cgroupfs => "kubepods",
        }
    }

    /// The QoS level directory named `name`, if it is one.
    fn is_qos_dir(self, name: &str) -> bool {
        QOS.iter().any(|qos| match self {
            Self::Systemd => name == format!("kubepods-{qos}.slice"),
            Self::Cgroupfs => name == *qos,
        })
    }

    /// The pod UID of the pod directory named `name`, if it is one.
    fn pod_uid(self, name: &str) -> Option<String> {
        let uid = match self {
            Self::Systemd => {
                let inner = name.strip_prefix("kubepods-")?.strip_suffix(".slice")?;
                let inner = QOS
                    .iter()
                    .find_map(|qos| inner.strip_prefix(qos)?.strip_prefix('-'))
                    .unwrap_or(inner);
                // systemd unit names cannot hold '-' inside a component: the kubelet writes
                // the UID's dashes as underscores.
                inner.strip_prefix("pod")?.replace('_', "-")
            }
            Self::Cgroupfs => name.strip_prefix("pod")?.to_owned(),
        };
        is_pod_uid(&uid).then_some(uid)
    }
}

/// Pod directories under `root`: directly (guaranteed QoS) and one level down (the others).
fn pod_dirs(driver: Driver, root: &Path) -> Result<Vec<PathBuf>, Error> {
    let mut pods = Vec::new();
    for (name, path) in subdirs(root)? {
        if driver.is_qos_dir(&name) {
            for (name, path) in subdirs(&path)? {
                if driver.pod_uid(&name).is_some() {
                    pods.push(path);
                }
            }
        } else if driver.pod_uid(&name).is_some() {
            pods.push(path);
        }
    }
    Ok(pods)
}

/// The netns of the pod in `pod_dir`: that of its oldest process. Errors are the reason
/// the pod cannot be reached, for logs and status.
fn pod_netns(proc_root: &Path, pod_dir: &Path) -> Result<(PathBuf, (u64, u64)), String> {
    let containers = subdirs(pod_dir).map_err(|e| e.to_string())?;
    let mut oldest: Option<(u64, u32)> = None;
    let mut vanished = 0;
    for (name, dir) in containers {
        if !is_container_dir(&name) {
            continue;
        }
        let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) else {
            continue;
        };
        for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
            if pid == 0 {
                // cgroup.procs lists processes outside the reader's PID namespace as 0.
                return Err(
                    "its processes are in another PID namespace: run the agent with hostPID".into(),
                );
            }
            match start_time(proc_root, pid) {
                Ok(start) => {
                    if oldest.is_none_or(|o| (start, pid) < o) {
                        oldest = Some((start, pid));
                    }
                }
                // Exited between the two reads.
                Err(_) => vanished += 1,
            }
        }
    }
    let Some((_, pid)) = oldest else {
        return Err(if vanished > 0 {
            "its processes exited while being read".into()
        } else {
            "no process in the pod's cgroup (sandbox not started yet, or pod terminating)".into()
        });
    };
    let netns = proc_root.join(pid.to_string()).join("ns/net");
    let id = netns_id(&netns).map_err(|e| format!("cannot open {}: {e}", netns.display()))?;
    Ok((netns, id))
}

/// Whether the directory `name` inside a pod's cgroup holds a container's processes.
fn is_container_dir(name: &str) -> bool {
    // The CRI-O monitor (conmon) runs in the host netns: never take its pid.
    if name.contains("conmon") {
        return false;
    }
    let id = ["cri-containerd-", "crio-", "docker-"]
        .iter()
        .find_map(|prefix| name.strip_prefix(prefix)?.strip_suffix(".scope"))
        .or_else(|| name.strip_prefix("crio-"))
        .unwrap_or(name);
    !id.is_empty() && id.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Start time of `pid` in clock ticks since boot (`/proc/<pid>/stat` field 22).
fn start_time(proc_root: &Path, pid: u32) -> io::Result<u64> {
    let stat = fs::read_to_string(proc_root.join(pid.to_string()).join("stat"))?;
    // The command name (field 2) may hold spaces and parentheses: count after the last ')'.
    let after_comm = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    after_comm
        .split_whitespace()
        .nth(19)
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "malformed /proc/<pid>/stat"))
}

/// (device, inode) of the namespace a `ns/net` link names.
fn netns_id(path: &Path) -> io::Result<(u64, u64)> {
    let meta = fs::metadata(path)?;
    Ok((meta.dev(), meta.ino()))
}

/// Subdirectories of `dir` by name; a missing `dir` has none.
fn subdirs(dir: &Path) -> Result<Vec<(String, PathBuf)>, Error> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(Error::ReadTree {
                path: dir.to_owned(),
                source,
            });
        }
    };
    let mut dirs = Vec::new();
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir())
            && let Ok(name) = entry.file_name().into_string()
        {
            dirs.push((name, entry.path()));
        }
    }
    dirs.sort();
    Ok(dirs)
}

const QOS: [&str; 2] = ["burstable", "besteffort"];

#[cfg(test)]
mod tests;
