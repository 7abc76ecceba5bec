//! Waypoints: the L7 proxies that services (or whole namespaces) bind to with the label
//! `weft.dev/use-waypoint=<name>`. A node proxy sends a bound service's traffic to its
//! waypoint, and a destination proxy admits that traffic only from the waypoint's identity.

use std::net::IpAddr;

use serde::Serialize;

use super::WorkloadRef;
use crate::identity::{InvalidSpiffeId, SpiffeId};

/// A waypoint proxy, as the node proxies reach it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Waypoint {
    /// Namespace and name: the name is what `weft.dev/use-waypoint` says.
    pub name: WorkloadRef,
    /// The service account the waypoint runs as (in its namespace): its identity.
    pub service_account: String,
    /// Ready waypoint pods, each taking HBONE on its port 15008. Empty: not ready, and
    /// the traffic of the services bound to it fails rather than going around it.
    pub addresses: Vec<IpAddr>,
}

impl Waypoint {
    /// The SPIFFE id the waypoint proves, and the only one that destination proxies
    /// accept a bound service's traffic from.
    pub fn identity(&self, trust_domain: &str) -> Result<SpiffeId, InvalidSpiffeId> {
        SpiffeId::new(trust_domain, &self.name.namespace, &self.service_account)
    }
}

/// The label that binds a Service or a Namespace to a waypoint.
pub const USE_WAYPOINT_LABEL: &str = "weft.dev/use-waypoint";
