//! Workloads (pods) on this node.

use std::{fmt, net::IpAddr, path::PathBuf};

use serde::Serialize;

/// `namespace/name` of a workload or service. Serialized as that string.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WorkloadRef {
    /// Kubernetes namespace.
    pub namespace: String,
    /// Name within the namespace.
    pub name: String,
}

/// A pod on this node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Workload {
    /// Namespace and name.
    pub name: WorkloadRef,
    /// Service account: with the namespace, the pod's identity.
    pub service_account: String,
    /// Pod IPs (one per family at most in Kubernetes; any number here).
    pub ips: Vec<IpAddr>,
    /// Path of the pod's network namespace (`/run/netns/x` or `/proc/<pid>/ns/net`).
    pub netns: PathBuf,
    /// Whether the pod is in the mesh.
    pub enrolled: bool,
}

impl WorkloadRef {
    /// Builds a reference from its parts.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl Serialize for WorkloadRef {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl fmt::Display for WorkloadRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}
