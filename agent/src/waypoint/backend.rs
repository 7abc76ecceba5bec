//! Where a request goes: a backend of the rule by weight, then one endpoint (pod) of the
//! backend's Service at the target port of the Service port it names, with the identity
//! that pod must prove.
//!
//! The choice of the endpoint is made here from what `hosts` knows of each (requests in
//! flight, ejected or not, on this node or not): which endpoints may be chosen
//! (`eligible`: ejected ones never, unless all are; this node's first for a `PreferClose`
//! Service), then one of them by the Service's load balancer (`choose`). Pure functions:
//! the randomness comes in as an `Rng`, the round-robin turn as a number.

use std::net::{IpAddr, SocketAddr};

use http::{HeaderMap, header};

use super::Error;
use crate::{
    identity::SpiffeId,
    state::{
        Service, Snapshot, WorkloadRef,
        route::{Backend, ServiceRef},
        traffic::{HashKey, LoadBalancer},
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

/// One endpoint of a Service as a pick sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub ip: IpAddr,
    /// Requests of this waypoint in flight to it.
    pub in_flight: u32,
    /// Ejected by outlier detection.
    pub ejected: bool,
    /// On the waypoint's own node.
    pub local: bool,
}

/// The endpoints a request may go to: those not ejected, or every one when all are
/// (Envoy's panic mode: better a backend that may fail than none at all); of those, the
/// ones on this node if `prefer_close` and there are any. The second value says whether
/// the set is the panic fallback.
pub fn eligible(candidates: &[Candidate], prefer_close: bool) -> (Vec<Candidate>, bool) {
    let in_service: Vec<_> = candidates.iter().filter(|c| !c.ejected).copied().collect();
    let panic = in_service.is_empty();
    let set = if panic {
        candidates.to_vec()
    } else {
        in_service
    };
    if prefer_close && set.iter().any(|c| c.local) {
        (set.into_iter().filter(|c| c.local).collect(), panic)
    } else {
        (set, panic)
    }
}

/// The endpoint `balancer` picks among `eligible` (`None` only when it is empty): `turn`
/// is the Service's round-robin counter, `key` the request's hash key (`hash_key`).
pub fn choose(
    balancer: &LoadBalancer,
    eligible: &[Candidate],
    key: Option<u64>,
    turn: u64,
    rng: &mut fastrand::Rng,
) -> Option<IpAddr> {
    if eligible.is_empty() {
        return None;
    }
    let len = eligible.len();
    let index = match (balancer, key) {
        (LoadBalancer::RoundRobin, _) => {
            // `len` fits a u64 and the remainder is below it: no truncation.
            usize::try_from(turn % len as u64).unwrap_or(0)
        }
        (LoadBalancer::Random, _) => rng.usize(0..len),
        (LoadBalancer::ConsistentHash(_), Some(key)) => rendezvous(key, eligible),
        (LoadBalancer::LeastRequest | LoadBalancer::ConsistentHash(_), _) => {
            least_of_two(eligible, rng)
        }
    };
    Some(eligible[index].ip)
}

/// Power of two choices: of two different endpoints at random, the one with fewer requests
/// in flight (the first on a tie). Never the busiest when it is the only busiest.
pub fn least_of_two(eligible: &[Candidate], rng: &mut fastrand::Rng) -> usize {
    let len = eligible.len();
    if len < 2 {
        return 0;
    }
    let a = rng.usize(0..len);
    // A different second one: an offset of 1..len from the first.
    let b = (a + rng.usize(1..len)) % len;
    if eligible[b].in_flight < eligible[a].in_flight {
        b
    } else {
        a
    }
}

/// Rendezvous (highest random weight) hashing: the endpoint whose score for `key` is
/// highest. Adding an endpoint moves only the keys it now wins (about 1/n of them);
/// removing one (or ejecting it) moves only its own keys. The scores depend on the key
/// and the endpoint's address only, so every waypoint replica picks the same endpoint.
pub fn rendezvous(key: u64, eligible: &[Candidate]) -> usize {
    let score = |c: &Candidate| {
        let ip = match c.ip {
            IpAddr::V4(v4) => hash_bytes(&v4.octets()),
            IpAddr::V6(v6) => hash_bytes(&v6.octets()),
        };
        mix(key ^ mix(ip))
    };
    eligible
        .iter()
        .enumerate()
        .max_by_key(|(_, c)| (score(c), c.ip))
        .map_or(0, |(i, _)| i)
}

/// The request's hash key for a consistent-hash `balancer`: the header's or cookie's
/// value, or the client's address; `None` when the request has no such header or cookie,
/// or the balancer does not hash.
pub fn hash_key(balancer: &LoadBalancer, headers: &HeaderMap, source: IpAddr) -> Option<u64> {
    let LoadBalancer::ConsistentHash(key) = balancer else {
        return None;
    };
    match key {
        HashKey::Header(name) => headers.get(name.as_str()).map(|v| hash_bytes(v.as_bytes())),
        HashKey::Cookie(name) => cookie(headers, name).map(hash_bytes),
        HashKey::SourceIp => Some(match source {
            IpAddr::V4(v4) => hash_bytes(&v4.octets()),
            IpAddr::V6(v6) => hash_bytes(&v6.octets()),
        }),
    }
}

/// The value of cookie `name` in the request's `cookie` headers.
fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h [u8]> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b';'))
        .find_map(|pair| {
            let pair = pair.trim_ascii();
            let eq = pair.iter().position(|b| *b == b'=')?;
            (pair[..eq].trim_ascii() == name.as_bytes()).then(|| pair[eq + 1..].trim_ascii())
        })
}

/// FNV-1a, finished with `mix`: fixed, so a key hashes the same in every process and
/// release (std's hasher promises neither).
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    let fnv = bytes.iter().fold(FNV_OFFSET, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(FNV_PRIME)
    });
    mix(fnv)
}

/// SplitMix64's finalizer: every input bit flips about half the output bits.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The Service port `service` names, and its target port, if the Service has endpoints.
fn service_port<'s>(
    snapshot: &'s Snapshot,
    service: &ServiceRef,
) -> Result<(&'s Service, u16), Error> {
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
    Ok((svc, port.target_port))
}

/// One endpoint of `service`, the one `pick` chooses of its (never empty) endpoints, at
/// the target port of its port `service.port`.
pub fn resolve(
    snapshot: &Snapshot,
    service: &ServiceRef,
    trust_domain: &str,
    pick: impl FnOnce(&Service) -> IpAddr,
) -> Result<Endpoint, Error> {
    let (svc, target_port) = service_port(snapshot, service)?;
    pod(
        snapshot,
        SocketAddr::new(pick(svc), target_port),
        &service.name,
        trust_domain,
    )
}

/// One endpoint at random: for a pick that needs nothing else.
pub fn any(service: &Service) -> IpAddr {
    service.endpoints[fastrand::usize(0..service.endpoints.len())]
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

/// FNV-1a's 64-bit parameters.
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0100_0000_01b3;

#[cfg(test)]
mod tests;
