//! The chained CNI plugin and its agent side. Closes the start-up race of a new pod: the
//! container runtime runs the plugin (`/opt/cni/bin/weft-cni`, the `weft` binary under that
//! name) after the primary CNI has wired the sandbox's network namespace and before any of
//! the pod's containers start; the plugin asks the agent to enroll the pod and lets the
//! sandbox come up only once it is enrolled. No pod of a mesh namespace sends a byte
//! unmeshed.
//!
//! - [`plugin`]: the CNI side (spec 1.0: ADD, DEL, CHECK, VERSION). Input: the network
//!   config on stdin (with `prevResult`), `CNI_*` variables. Output: `prevResult` unchanged,
//!   or a CNI error on stdout and a non-zero exit.
//! - the agent side, a unix socket (default [`DEFAULT_SOCKET`]), is `source::node::cni`:
//!   it is one of the two ways a pod enters the node's knowledge. Input: one [`Request`]
//!   per connection. Output: one [`Reply`], after the enroller has enrolled the pod
//!   (bounded wait), or at once when the state says the pod is not in the mesh.
//! - [`install`]: `weft cni install` / `uninstall`, run by the DaemonSet's installer
//!   container: the binary into the host's CNI bin dir, the plugin at the end of the
//!   primary CNI's conflist, kept there.
//!
//! When the agent is down: ADD and CHECK fail (the runtime retries the sandbox) for pods of
//! namespaces listed in the mesh-namespaces file the agent keeps next to its socket, and
//! for every pod when that file cannot be read (after a node reboot, until the agent has
//! run once: fail closed); pods of other namespaces (kube-system, say) pass, so a node
//! whose agent is down still runs what is not in the mesh. DEL always succeeds: a sandbox
//! must be deletable whatever the agent's state.
//!
//! The wire between plugin and agent: one JSON line each way, then close.

pub mod install;
pub mod plugin;

use std::{
    collections::BTreeSet,
    io,
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

/// What the plugin asks the agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Request {
    pub command: Command,
    pub pod: PodInfo,
    /// `CNI_CONTAINERID`: the sandbox's id, for logs.
    pub container_id: String,
    /// `CNI_NETNS` (ADD, CHECK); DEL may come without one.
    pub netns: Option<PathBuf>,
    /// The pod's IPs from `prevResult` (for logs; the state has the authoritative ones).
    #[serde(default)]
    pub ips: Vec<IpAddr>,
}

/// The CNI command being run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Command {
    Add,
    Check,
    Del,
}

/// The pod, from `CNI_ARGS` (`K8S_POD_NAMESPACE`, `K8S_POD_NAME`, `K8S_POD_UID`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// The agent's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", tag = "verdict")]
pub enum Reply {
    /// The pod is enrolled: its traffic goes through the proxy from its first packet.
    Enrolled,
    /// The state says the pod is not in the mesh: it may start as it is.
    NotInMesh,
    /// DEL done: the agent forgot the pod's netns.
    Forgotten,
    /// The agent cannot answer yet (starting up); the runtime should retry.
    NotReady { reason: String },
    /// The pod is in the mesh but could not be enrolled: the sandbox must fail.
    Failed { reason: String },
}

impl std::fmt::Display for PodInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{} (uid {})", self.namespace, self.name, self.uid)
    }
}

/// The mesh-namespaces file's contents.
#[derive(Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshNamespaces {
    pub namespaces: BTreeSet<String>,
}

/// Writes the file by rename, so the plugin never reads half of it.
pub fn write_mesh_namespaces(path: &Path, namespaces: &BTreeSet<String>) -> io::Result<()> {
    let doc = MeshNamespaces {
        namespaces: namespaces.clone(),
    };
    let text = serde_json::to_vec_pretty(&doc).map_err(io::Error::other)?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// Where the agent listens unless told otherwise (plugin config `socket`, `agent.cni.socket`).
pub const DEFAULT_SOCKET: &str = "/var/run/weft/cni.sock";
/// The file, next to the socket, listing the mesh namespaces for when the agent is down.
pub const MESH_NAMESPACES_FILE: &str = "mesh-namespaces.json";
/// The plugin's `type` in the CNI config, and its file name in the CNI bin dir.
pub const PLUGIN_TYPE: &str = "weft-cni";
/// Longest request or reply line accepted.
pub const MAX_MESSAGE: usize = 64 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mesh_namespaces_file_is_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mesh-namespaces.json");
        let set: BTreeSet<String> = ["shop".to_string()].into();
        write_mesh_namespaces(&path, &set).unwrap();
        let doc: MeshNamespaces = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(doc.namespaces, set);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
