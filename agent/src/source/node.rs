//! The pods of this node as the node itself sees them, and the two ways a pod enters that
//! knowledge. The Kubernetes API (or the local file) says which pods exist, their labels and
//! IPs; only the node knows where a pod's network namespace is. A pod enters:
//!
//! 1. at sandbox creation, from the CNI plugin (`cni`: the agent side of `weft-cni`, whose
//!    ADD also waits until the pod is enrolled), or
//! 2. for a pod that started while the agent was down, from the kubelet's cgroup tree
//!    (`discover`, at start-up and then periodically).
//!
//! Both record the pod's netns by UID in `NodePods` (`pods`); `join` makes every API pod
//! whose netns is here a local workload of the snapshot, which enrollment then acts on.
//!
//! The CNI server's intake lives here rather than in `cni` because it is a source of node
//! knowledge like discovery, feeding the same table; `cni` keeps what the plugin and the
//! agent share (the wire messages, the mesh-namespaces file) and the plugin itself, which
//! runs outside the agent.

pub mod cni;
pub mod discover;
mod pods;

pub use pods::{LearnedFrom, NodePod, NodePods, follow, is_pod_uid, join, join_shared};
