//! Whether the enrolled pods run where the cgroup programs are attached. connect4/6 and
//! sock_ops see only sockets of processes in the subtree of `agent.cgroupRoot`; a pod whose
//! processes all sit elsewhere is enrolled but its outbound connections are not steered.
//! That is a configuration error, and the agent must not call itself ready with it.
//!
//! Input: the cgroup root, the host's /proc as the agent sees it, and the enrolled pods'
//! network namespaces. Output: the pods that have processes, none of them under the root.
//! Processes are matched to pods by network namespace (`/proc/<pid>/ns/net`); a pod with no
//! process at all cannot be judged and is not reported.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    fs, io,
    os::unix::fs::MetadataExt as _,
    path::Path,
};

/// A network namespace's identity: device and inode of its nsfs file.
pub type NetnsId = (u64, u64);

/// The keys of `pods` that have at least one process and none under `cgroup_root`.
pub fn outside_root<K: Clone + Ord>(
    cgroup_root: &Path,
    proc_root: &Path,
    pods: &BTreeMap<NetnsId, K>,
) -> io::Result<Vec<K>> {
    if pods.is_empty() {
        return Ok(Vec::new());
    }
    let mut under = HashSet::new();
    collect_pids(cgroup_root, &mut under)?;
    let mut inside = BTreeSet::new();
    let mut outside = BTreeSet::new();
    for entry in fs::read_dir(proc_root)? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // Processes come and go while we look; one that is gone tells nothing.
        let Ok(meta) = fs::metadata(entry.path().join("ns/net")) else {
            continue;
        };
        let Some(pod) = pods.get(&(meta.dev(), meta.ino())) else {
            continue;
        };
        if under.contains(&pid) {
            inside.insert(pod.clone());
        } else {
            outside.insert(pod.clone());
        }
    }
    Ok(outside.difference(&inside).cloned().collect())
}

/// Every pid in the cgroup and its descendants.
fn collect_pids(cgroup: &Path, pids: &mut HashSet<u32>) -> io::Result<()> {
    let procs = fs::read_to_string(cgroup.join("cgroup.procs"))?;
    pids.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
    for entry in fs::read_dir(cgroup)? {
        let entry = entry?;
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            // A child removed while we walk: skip it.
            match collect_pids(&entry.path(), pids) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                other => other?,
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_pods_whose_processes_are_all_outside_the_root() {
        let own_netns = fs::metadata("/proc/self/ns/net").expect("own netns");
        let id = (own_netns.dev(), own_netns.ino());
        let pods = BTreeMap::from([(id, "here")]);
        let empty = tempfile::tempdir().expect("tempdir");
        fs::write(empty.path().join("cgroup.procs"), "").expect("write");
        // Our own netns has processes (this one), none of them in an empty "cgroup".
        assert_eq!(
            outside_root(empty.path(), Path::new("/proc"), &pods).expect("scan"),
            vec!["here"]
        );
        fs::write(
            empty.path().join("cgroup.procs"),
            format!("{}\n", std::process::id()),
        )
        .expect("write");
        assert!(
            outside_root(empty.path(), Path::new("/proc"), &pods)
                .expect("scan")
                .is_empty(),
            "one process under the root is enough"
        );
    }
}
