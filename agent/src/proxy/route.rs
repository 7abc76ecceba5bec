//! The mesh decisions of the proxy, as pure functions of the snapshot: does an outbound
//! connection go over HBONE (and to which identity) or in plaintext, and may a plaintext
//! connection into a pod be accepted.

use std::net::SocketAddr;

use crate::{
    identity::{self, SpiffeId},
    state::{MtlsMode, Snapshot, Workload},
};

/// How an outbound connection reaches its upstream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// Mutual TLS to the destination pod's HBONE port, which must prove `identity`.
    Hbone {
        identity: SpiffeId,
        /// The destination pod's HBONE listener.
        addr: SocketAddr,
    },
    /// Plaintext, straight to the upstream: the destination is outside the mesh, or one
    /// end has mTLS `DISABLED`, or this node runs without a CA.
    Passthrough,
}

/// Where an outbound connection from `source` to `upstream` goes. `trust_domain` is None
/// when the node has no CA (mutual TLS off). An error (a destination whose identity
/// cannot be written as a SPIFFE id) fails the connection closed: never plaintext to a pod
/// that expects mTLS.
pub fn outbound(
    snapshot: &Snapshot,
    source: Option<&Workload>,
    upstream: SocketAddr,
    hbone_port: u16,
    trust_domain: Option<&str>,
) -> Result<Route, identity::Error> {
    let Some(trust_domain) = trust_domain else {
        return Ok(Route::Passthrough);
    };
    let Some(destination) = snapshot
        .workload_by_ip(upstream.ip())
        .filter(|w| w.enrolled)
    else {
        return Ok(Route::Passthrough);
    };
    let disabled = |w: &Workload| snapshot.mtls_mode(w) == MtlsMode::Disabled;
    if disabled(destination) || source.is_some_and(disabled) {
        return Ok(Route::Passthrough);
    }
    Ok(Route::Hbone {
        identity: destination.identity(trust_domain)?,
        addr: SocketAddr::new(upstream.ip(), hbone_port),
    })
}

/// Whether a plaintext connection into `pod` (its 15006 listener) is accepted: not when
/// the pod is `STRICT`.
pub fn accepts_plaintext(snapshot: &Snapshot, pod: &Workload, mtls_on: bool) -> bool {
    !mtls_on || snapshot.mtls_mode(pod) != MtlsMode::Strict
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::state::{Location, WorkloadRef};

    fn pod(name: &str, ip: &str, enrolled: bool, mode: Option<MtlsMode>) -> Workload {
        Workload {
            name: WorkloadRef::new("default", name),
            service_account: name.to_string(),
            ips: vec![ip.parse().unwrap()],
            location: Location::Local {
                netns: PathBuf::from("/run/netns/x"),
            },
            enrolled,
            mtls_mode: mode,
            labels: Default::default(),
        }
    }

    fn snapshot(workloads: Vec<Workload>) -> Snapshot {
        let mut s = Snapshot::default();
        for w in workloads {
            s.workloads.insert(w.name.clone(), w);
        }
        s
    }

    const TD: Option<&str> = Some("cluster.local");

    #[test]
    fn enrolled_destinations_go_over_hbone_to_their_identity() {
        let s = snapshot(vec![
            pod("a", "10.1.0.2", true, None),
            pod("b", "10.1.0.3", true, None),
        ]);
        let src = s.workload_by_ip("10.1.0.2".parse().unwrap());
        let route = outbound(&s, src, "10.1.0.3:80".parse().unwrap(), 15008, TD).unwrap();
        assert_eq!(
            route,
            Route::Hbone {
                identity: "spiffe://cluster.local/ns/default/sa/b".parse().unwrap(),
                addr: "10.1.0.3:15008".parse().unwrap(),
            }
        );
    }

    #[test]
    fn outside_the_mesh_disabled_or_no_ca_is_plaintext() {
        let s = snapshot(vec![
            pod("a", "10.1.0.2", true, None),
            pod("off", "10.1.0.3", false, None),
            pod("legacy", "10.1.0.4", true, Some(MtlsMode::Disabled)),
            pod("b", "10.1.0.5", true, None),
        ]);
        let src = s.workload_by_ip("10.1.0.2".parse().unwrap());
        let legacy = s.workload_by_ip("10.1.0.4".parse().unwrap());
        for (source, dst, td) in [
            (src, "10.1.0.3:80", TD),    // not enrolled
            (src, "192.0.2.1:80", TD),   // unknown
            (src, "10.1.0.4:80", TD),    // destination DISABLED
            (legacy, "10.1.0.5:80", TD), // source DISABLED
            (src, "10.1.0.5:80", None),  // no CA on this node
        ] {
            assert_eq!(
                outbound(&s, source, dst.parse().unwrap(), 15008, td).unwrap(),
                Route::Passthrough,
                "{dst}"
            );
        }
    }

    #[test]
    fn only_strict_refuses_plaintext() {
        let s = snapshot(vec![]);
        let strict = pod("s", "10.1.0.2", true, Some(MtlsMode::Strict));
        assert!(!accepts_plaintext(&s, &strict, true));
        assert!(
            accepts_plaintext(&s, &strict, false),
            "no CA: nothing to insist on"
        );
        assert!(accepts_plaintext(
            &s,
            &pod("p", "10.1.0.3", true, None),
            true
        ));
    }
}
