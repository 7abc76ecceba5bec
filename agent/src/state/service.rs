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
    /// Its `spec.trafficDistribution`: which endpoints a waypoint prefers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traffic_distribution: Option<TrafficDistribution>,
}

/// Kubernetes' `spec.trafficDistribution` of a Service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum TrafficDistribution {
    /// Endpoints close to the client first: a waypoint sends to the endpoints on its own
    /// node while any is in service (weft knows nodes, not zones).
    PreferClose,
}

impl TrafficDistribution {
    /// The Kubernetes value: `PreferClose` (`None` for a value weft does not know, which
    /// Kubernetes says to ignore).
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "PreferClose" => Some(TrafficDistribution::PreferClose),
            _ => None,
        }
    }
}

/// One port of a service and where it lands on the endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ServicePort {
    /// Port on the VIP.
    pub port: u16,
    /// Port on each endpoint.
    pub target_port: u16,
}
