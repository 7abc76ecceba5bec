//! The pods of this node as the node itself sees them: each pod's network namespace, by pod
//! UID. The Kubernetes API knows a pod's name, labels and IPs but not where its netns is; the
//! node learns that from the CNI plugin at sandbox creation (`CNI_NETNS`) and, for pods that
//! started while the agent was down, from the kubelet's cgroup tree. The Kubernetes source
//! joins the two: an API pod on this node becomes a local workload once its netns is here.
//!
//! Input: `record` / `forget` from the CNI server and from discovery. Output: `netns(uid)`
//! and a change counter that the Kubernetes source watches to rebuild its snapshot.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Mutex, MutexGuard, PoisonError},
};

use tokio::sync::watch;

/// Pod UID → network namespace path, shared by whoever learns and whoever reads.
#[derive(Debug)]
pub struct NodePods {
    pods: Mutex<HashMap<String, NodePod>>,
    changes: watch::Sender<u64>,
}

/// What the node knows of one of its pods.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodePod {
    /// `/var/run/netns/cni-…` (from the CNI plugin) or `/proc/<pid>/ns/net` (discovery).
    pub netns: PathBuf,
    /// Who told us: shown in `weft status` and logs.
    pub learned_from: LearnedFrom,
}

/// How the agent learned a pod's netns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LearnedFrom {
    /// The CNI plugin, at CNI ADD.
    Cni,
    /// A scan of the kubelet's cgroup tree (pods that started while the agent was down).
    Discovery,
}

impl NodePods {
    pub fn new() -> Self {
        Self {
            pods: Mutex::default(),
            changes: watch::Sender::new(0),
        }
    }

    /// Records (or replaces) where pod `uid` lives; wakes watchers if anything changed.
    pub fn record(&self, uid: impl Into<String>, pod: NodePod) {
        let changed = self.lock().insert(uid.into(), pod.clone()).as_ref() != Some(&pod);
        if changed {
            self.changes.send_modify(|n| *n += 1);
        }
    }

    /// Forgets pod `uid` (CNI DEL, or its cgroup is gone).
    pub fn forget(&self, uid: &str) {
        if self.lock().remove(uid).is_some() {
            self.changes.send_modify(|n| *n += 1);
        }
    }

    /// Where pod `uid` lives, if the node knows it.
    pub fn netns(&self, uid: &str) -> Option<PathBuf> {
        self.lock().get(uid).map(|p| p.netns.clone())
    }

    /// A copy of every entry, for status output.
    pub fn all(&self) -> Vec<(String, NodePod)> {
        let mut all: Vec<_> = self
            .lock()
            .iter()
            .map(|(uid, pod)| (uid.clone(), pod.clone()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// A receiver whose value moves on every change.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, NodePod>> {
        // A poisoned lock only means a panic elsewhere while holding plain data: still valid.
        self.pods.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Default for NodePods {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(netns: &str) -> NodePod {
        NodePod {
            netns: netns.into(),
            learned_from: LearnedFrom::Cni,
        }
    }

    #[test]
    fn records_and_forgets_pods_and_counts_only_real_changes() {
        let pods = NodePods::new();
        let changes = pods.changes();
        pods.record("uid-1", pod("/var/run/netns/cni-1"));
        assert_eq!(pods.netns("uid-1"), Some("/var/run/netns/cni-1".into()));
        assert_eq!(*changes.borrow(), 1);
        // The same fact again (discovery after CNI ADD) is no change.
        pods.record("uid-1", pod("/var/run/netns/cni-1"));
        assert_eq!(*changes.borrow(), 1);
        pods.record("uid-1", pod("/proc/42/ns/net"));
        assert_eq!(*changes.borrow(), 2);
        pods.forget("uid-1");
        pods.forget("uid-1");
        assert_eq!(pods.netns("uid-1"), None);
        assert_eq!(*changes.borrow(), 3);
    }
}
