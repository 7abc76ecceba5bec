//! Services: virtual IPs and ports in front of a set of endpoints.

use std::net::IpAddr;

use serde::Serialize;

use super::WorkloadRef;

/// A service the proxy load-balances itself (no kube-proxy on the meshed path).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Service {
    /// Namespace and name.
    pub name: WorkloadRef,
    /// Virtual IPs clients connect to.
    pub vips: Vec<IpAddr>,
    /// Ports of the service.
    pub ports: Vec<ServicePort>,
    /// Endpoint (pod) IPs.
    pub endpoints: Vec<IpAddr>,
    /// The waypoint (in the service's namespace) its traffic goes through: the
    /// service's `weft.dev/use-waypoint` label, else its namespace's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<String>,
}

/// One port of a service and where it lands on the endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ServicePort {
    /// Port on the VIP.
    pub port: u16,
    /// Port on each endpoint.
    pub target_port: u16,
}
