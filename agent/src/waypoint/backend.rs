//! Where a request goes: a backend of the rule by weight, then one endpoint (pod) of the
//! backend's Service at the target port of the Service port it names, with the identity
//! that pod must prove.

use std::net::SocketAddr;

use super::Error;
use crate::{
    identity::SpiffeId,
    state::{
        Snapshot, WorkloadRef,
        route::{Backend, ServiceRef},
    },
};

/// One pod to send a request to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Pod IP and target port (the CONNECT `:authority` towards it).
    pub addr: SocketAddr,
    pub workload: WorkloadRef,
    pub identity: SpiffeId,
    /// The Service it was picked from.
    pub service: WorkloadRef,
}

/// A backend by weight (weight 0 never); `None` when no backend has a weight.
pub fn pick_weighted(backends: &[Backend]) -> Option<&Backend> {
    let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
    if total == 0 {
        return None;
    }
    let mut ticket = fastrand::u64(0..total);
    backends.iter().find(|b| {
        let weight = u64::from(b.weight);
        if ticket < weight {
            true
        } else {
            ticket -= weight;
            false
        }
    })
}

/// One endpoint of `service` (random), at the target port of its port `service.port`.
pub fn resolve(
    snapshot: &Snapshot,
    service: &ServiceRef,
    trust_domain: &str,
) -> Result<Endpoint, Error> {
    let svc = snapshot
        .services
        .get(&service.name)
        .ok_or_else(|| Error::UnknownService(service.name.clone()))?;
    let port = svc
        .ports
        .iter()
        .find(|p| p.port == service.port)
        .ok_or_else(|| Error::UnknownPort {
            service: service.name.clone(),
            port: service.port,
        })?;
    if svc.endpoints.is_empty() {
        return Err(Error::NoEndpoints(service.name.clone()));
    }
    let ip = svc.endpoints[fastrand::usize(0..svc.endpoints.len())];
    pod(
        snapshot,
        SocketAddr::new(ip, port.target_port),
        &service.name,
        trust_domain,
    )
}

/// The pod at `addr` (an endpoint of `service`).
pub fn pod(
    snapshot: &Snapshot,
    addr: SocketAddr,
    service: &WorkloadRef,
    trust_domain: &str,
) -> Result<Endpoint, Error> {
    let workload = snapshot
        .workload_by_ip(addr.ip())
        .ok_or(Error::UnknownEndpoint(addr.ip()))?;
    let identity = workload
        .identity(trust_domain)
        .map_err(|_| Error::UnknownEndpoint(addr.ip()))?;
    Ok(Endpoint {
        addr,
        workload: workload.name.clone(),
        identity,
        service: service.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(name: &str, weight: u32) -> Backend {
        Backend {
            service: ServiceRef {
                name: WorkloadRef::new("default", name),
                port: 80,
            },
            weight,
            filters: Vec::new(),
        }
    }

    #[test]
    fn zero_weights_never_win() {
        let backends = [backend("a", 0), backend("b", 1), backend("c", 0)];
        for _ in 0..1000 {
            assert_eq!(pick_weighted(&backends).unwrap().service.name.name, "b");
        }
        assert!(pick_weighted(&[backend("a", 0)]).is_none());
        assert!(pick_weighted(&[]).is_none());
    }
}
