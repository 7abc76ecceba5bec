//! The pods of this node as the node itself sees them: each pod's network namespace, by pod
//! UID. The Kubernetes API knows a pod's name, labels and IPs but not where its netns is; the
//! node learns that from the CNI plugin at sandbox creation (`CNI_NETNS`) and, for pods that
//! started while the agent was down, from the kubelet's cgroup tree. The Kubernetes source
//! joins the two: an API pod on this node becomes a local workload once its netns is here.
//!
//! Input: `record` / `forget` from the CNI server and from discovery. Output: `netns(uid)`
//! and a change counter that the Kubernetes source watches to rebuild its snapshot;
//! [`join`] is that rebuild (one function, used by every source whose workloads are known by
//! pod UID), and [`follow`] runs it for a source that publishes raw snapshots.

use std::{collections::HashMap, net::IpAddr, path::PathBuf, sync::Arc};

use tokio::sync::watch;

use crate::{
    state::{Location, Snapshot},
    sync::{Mutex, MutexGuard},
};

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
    /// The pod's IPs as the CNI plugin saw them (`prevResult`): the kubelet reports them
    /// to the API only after ADD returns, and ADD waits for the enrollment. Empty from
    /// discovery, whose pods the API already knows with their IPs.
    pub ips: Vec<IpAddr>,
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
        self.pods.lock()
    }
}

impl Default for NodePods {
    fn default() -> Self {
        Self::new()
    }
}

/// Whether `uid` is spelled as Kubernetes spells pod UIDs: a lowercase UUID (or, for
/// static pods, a 32-digit hash). The kubelet's cgroup names and `K8S_POD_UID` use the same.
pub fn is_pod_uid(uid: &str) -> bool {
    (1..=36).contains(&uid.len())
        && uid
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b) || b == b'-')
}

/// `snapshot` with the netns of every pod known by UID (`Location::Pod`) filled in from
/// what the node knows now, and cleared for pods the node does not (or no longer) know: a
/// pod becomes local, and can be enrolled, exactly when its netns is here.
pub fn join(snapshot: &Snapshot, pods: &NodePods) -> Snapshot {
    let known = pods.lock();
    let mut joined = snapshot.clone();
    // Derived lookups are rebuilt on first use (they may hold the unjoined workloads).
    joined.index = Default::default();
    for workload in joined.workloads.values_mut() {
        if let Location::Pod { uid, netns, .. } = &mut workload.location {
            let pod = known.get(uid.as_str());
            *netns = pod.map(|p| p.netns.clone());
            // Until the API has the pod's IPs, those its CNI ADD reported.
            if workload.ips.is_empty() {
                workload.ips = pod.map(|p| p.ips.clone()).unwrap_or_default();
            }
        }
    }
    joined
}

/// [`join`], without copying a snapshot that has no pod known by UID (a local file that
/// names every netns): a state of thousands of workloads is then passed on as it is, with
/// its address index, instead of cloned and compared on every change.
pub fn join_shared(snapshot: &Arc<Snapshot>, pods: &NodePods) -> Arc<Snapshot> {
    let by_uid = snapshot
        .workloads
        .values()
        .any(|w| matches!(w.location, Location::Pod { .. }));
    if by_uid {
        Arc::new(join(snapshot, pods))
    } else {
        Arc::clone(snapshot)
    }
}

/// Publishes `join(raw, pods)` to `tx` whenever the raw snapshot or the node's pods change.
/// Runs until `raw` is closed or `tx` has no receivers.
pub async fn follow(
    mut raw: watch::Receiver<Arc<Snapshot>>,
    pods: Arc<NodePods>,
    tx: watch::Sender<Arc<Snapshot>>,
) {
    let mut changes = pods.changes();
    loop {
        let joined = join_shared(&raw.borrow_and_update(), &pods);
        changes.borrow_and_update();
        tx.send_if_modified(|current| {
            if Arc::ptr_eq(current, &joined) || **current == *joined {
                return false;
            }
            *current = joined;
            true
        });
        tokio::select! {
            changed = raw.changed() => if changed.is_err() { return },
            changed = changes.changed() => if changed.is_err() { return },
            () = tx.closed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Workload, WorkloadRef};

    fn by_uid(name: &str, uid: &str) -> Workload {
        Workload {
            name: WorkloadRef::new("default", name),
            service_account: "default".into(),
            ips: vec!["10.1.0.2".parse().unwrap()],
            location: Location::Pod {
                uid: uid.into(),
                netns: None,
                probe_ports: vec![],
            },
            enrolled: true,
            mtls_mode: None,
            labels: Default::default(),
        }
    }

    #[test]
    fn a_pod_known_by_uid_is_local_exactly_while_the_node_knows_its_netns() {
        let pods = NodePods::new();
        let mut raw = Snapshot::default();
        let w = by_uid("web", "uid-1");
        raw.workloads.insert(w.name.clone(), w);
        assert_eq!(join(&raw, &pods).local_enrolled().count(), 0);

        pods.record("uid-1", pod("/var/run/netns/cni-1"));
        let joined = join(&raw, &pods);
        let local: Vec<_> = joined.local_enrolled().collect();
        assert_eq!(local.len(), 1);
        assert_eq!(
            local[0].netns(),
            Some(&PathBuf::from("/var/run/netns/cni-1"))
        );
        assert_eq!(local[0].pod_uid(), Some("uid-1"));

        pods.forget("uid-1");
        assert_eq!(join(&raw, &pods).local_enrolled().count(), 0);
    }

    #[tokio::test]
    async fn follow_republishes_when_the_node_learns_a_pod() {
        let pods = Arc::new(NodePods::new());
        let mut raw = Snapshot::default();
        let w = by_uid("web", "uid-1");
        raw.workloads.insert(w.name.clone(), w);
        let (_raw_tx, raw_rx) = watch::channel(Arc::new(raw));
        let (tx, mut rx) = watch::channel(Arc::new(Snapshot::default()));
        tokio::spawn(follow(raw_rx, Arc::clone(&pods), tx));
        rx.changed().await.unwrap();
        assert_eq!(rx.borrow_and_update().local_enrolled().count(), 0);
        pods.record("uid-1", pod("/proc/7/ns/net"));
        rx.changed().await.unwrap();
        assert_eq!(rx.borrow_and_update().local_enrolled().count(), 1);
    }

    fn pod(netns: &str) -> NodePod {
        NodePod {
            netns: netns.into(),
            ips: Vec::new(),
            learned_from: LearnedFrom::Cni,
        }
    }

    #[test]
    fn a_snapshot_without_pods_known_by_uid_is_passed_on_uncopied() {
        let pods = NodePods::new();
        let mut by_netns = by_uid("web", "uid-1");
        by_netns.location = Location::Local {
            netns: "/run/netns/web".into(),
        };
        let mut raw = Snapshot::default();
        raw.workloads.insert(by_netns.name.clone(), by_netns);
        let raw = Arc::new(raw);
        assert!(Arc::ptr_eq(&join_shared(&raw, &pods), &raw));

        let mut with_uid = (*raw).clone();
        let w = by_uid("api", "uid-2");
        with_uid.workloads.insert(w.name.clone(), w);
        let with_uid = Arc::new(with_uid);
        pods.record("uid-2", pod("/var/run/netns/cni-2"));
        let joined = join_shared(&with_uid, &pods);
        assert!(!Arc::ptr_eq(&joined, &with_uid));
        assert_eq!(joined.local_enrolled().count(), 2);
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
