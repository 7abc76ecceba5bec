//! Workloads (pods): those on this node, which the agent enrolls, and those on other nodes,
//! which the proxy only needs to know to reach them over HBONE with the right identity.

use std::{collections::BTreeMap, fmt, net::IpAddr, path::PathBuf};

use serde::Serialize;

use super::MtlsMode;
use crate::identity::{InvalidSpiffeId, SpiffeId};

/// `namespace/name` of a workload or service. Serialized as that string.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WorkloadRef {
    /// Kubernetes namespace.
    pub namespace: String,
    /// Name within the namespace.
    pub name: String,
}

/// A pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Workload {
    /// Namespace and name.
    pub name: WorkloadRef,
    /// Service account: with the namespace, the pod's identity.
    pub service_account: String,
    /// Pod IPs (one per family at most in Kubernetes; any number here).
    pub ips: Vec<IpAddr>,
    /// Where the pod runs.
    pub location: Location,
    /// Whether the pod is in the mesh (captured by the agent of its node).
    pub enrolled: bool,
    /// The pod's own mTLS mode, overriding its namespace's.
    pub mtls_mode: Option<MtlsMode>,
    /// Pod labels, which access-policy selectors match.
    pub labels: BTreeMap<String, String>,
}

/// Where a workload runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Location {
    /// On this node; the agent enters the pod through its network namespace.
    Local {
        /// `/run/netns/x` or `/proc/<pid>/ns/net`.
        netns: PathBuf,
    },
    /// A Kubernetes pod of this node, run by the kubelet, known by its pod UID (the
    /// Kubernetes source, or `podUid:` in the local file). `netns` is filled in by
    /// `source::node::join` once the node has seen the pod (CNI ADD or cgroup
    /// discovery); until then the pod cannot be entered.
    Pod {
        /// `metadata.uid` of the pod.
        uid: String,
        /// The pod's network namespace, once the node knows it.
        netns: Option<PathBuf>,
        /// The ports the kubelet's probes of the pod connect to (liveness, readiness and
        /// startup; `httpGet`, `tcpSocket`, `grpc`): plaintext from the node itself to these
        /// is let into a STRICT pod.
        probe_ports: Vec<u16>,
    },
    /// On another node, whose agent enrolls it.
    Remote {
        /// The other node's name.
        node: String,
    },
}

impl Workload {
    /// The pod's network namespace, if it runs on this node.
    pub fn netns(&self) -> Option<&PathBuf> {
        match &self.location {
            Location::Local { netns }
            | Location::Pod {
                netns: Some(netns), ..
            } => Some(netns),
            Location::Pod { netns: None, .. } | Location::Remote { .. } => None,
        }
    }

    /// The ports the kubelet probes the pod on (none for pods not run by a kubelet).
    pub fn probe_ports(&self) -> &[u16] {
        match &self.location {
            Location::Pod { probe_ports, .. } => probe_ports,
            Location::Local { .. } | Location::Remote { .. } => &[],
        }
    }

    /// The Kubernetes pod UID, for a pod of this node known by it.
    pub fn pod_uid(&self) -> Option<&str> {
        match &self.location {
            Location::Pod { uid, .. } => Some(uid),
            Location::Local { .. } | Location::Remote { .. } => None,
        }
    }

    /// The pod's SPIFFE identity in `trust_domain`.
    pub fn identity(&self, trust_domain: &str) -> Result<SpiffeId, InvalidSpiffeId> {
        SpiffeId::new(trust_domain, &self.name.namespace, &self.service_account)
    }
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
