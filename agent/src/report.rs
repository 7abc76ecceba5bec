//! What the agent reports about its own work, for readers that sit below or beside the
//! writer: admin's `/status`, the CNI server (which waits for a pod to be enrolled before
//! it answers ADD) and `weft status`. Enrollment publishes an `EnrollStatus` after every
//! pass; nothing here holds a lock or a handle to the enroller.

use std::{collections::BTreeMap, net::SocketAddr};

use serde::Serialize;

use crate::proxy::Direction;

/// An enrolled pod as `weft status` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct PodStatus {
    pub pod: String,
    pub service_account: String,
    pub ips: Vec<std::net::IpAddr>,
    pub netns: String,
    pub netns_cookie: u64,
    pub pod_id: u32,
    /// The application sees its mesh clients' addresses: the pod's reply routing is
    /// installed (docs/datapath.md, "The client's address").
    pub client_address: bool,
    pub listeners: Vec<ListenerStatus>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ListenerStatus {
    pub direction: Direction,
    pub addr: SocketAddr,
}

/// What enrollment reports.
#[derive(Clone, Debug, Default, Serialize)]
pub struct EnrollStatus {
    pub enrolled: Vec<PodStatus>,
    /// Pods that should be enrolled but are not, with the reason.
    pub failed: BTreeMap<String, String>,
}
