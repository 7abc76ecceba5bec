//! The proxy never dials itself. A connection from inside a pod can name one of the proxy's
//! own listeners as its destination: `127.0.0.1:15006` from the pod's loopback (not
//! steered, so it reaches the inbound listener directly), the pod's own address at 15001,
//! another enrolled pod's 15008. The proxy connects to the destination it was given, so it
//! would connect to itself, accept that, connect again, and so on until the agent runs out
//! of file descriptors and every pod of the node loses its traffic. Every path about to dial
//! a destination that a pod or a peer chose asks [`check`] first: the outbound route (the
//! original destination and the upstream it resolved to), plaintext inbound delivery and the
//! target of an HBONE CONNECT. A loop is refused before any dial, counted as `proxy_loop`
//! and logged, rate-limited.
//!
//! A destination is a proxy listener when its port is one of the proxy's ports (in an
//! enrolled pod's namespace they belong to the proxy, never to the application) and its
//! address reaches a namespace where the proxy listens on it:
//! - on delivery, any address: the proxy dials from inside the destination pod itself;
//! - outbound, loopback or the unspecified address (the source pod itself), and the address
//!   of any enrolled workload, on this node or another (its namespace has the listeners
//!   too; the refusal then happens at the first hop rather than at the far proxy).
//!
//! A pod outside the mesh keeps its ports: a destination that is not an enrolled workload
//! may serve on 15001 like any other port.

use std::net::SocketAddr;

use super::{Error, Ports, Proxy};
use crate::state::{Snapshot, WorkloadRef};

/// Where the proxy is about to dial.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hop {
    /// From the source pod toward the destination it chose.
    Outbound,
    /// Inside the destination pod, to its application (plaintext inbound, HBONE CONNECT).
    Delivery,
}

/// Refuses a dial of `target` that would reach one of the proxy's own listeners; logs it
/// (rate-limited) with the pod and the client that asked. The caller records the error,
/// which counts it.
pub fn check(
    snapshot: &Snapshot,
    ports: &Ports,
    hop: Hop,
    pod: &WorkloadRef,
    src: SocketAddr,
    target: SocketAddr,
) -> Result<(), Error> {
    if !reaches_proxy(snapshot, ports, hop, target) {
        return Ok(());
    }
    let e = Error::ProxyLoop(target);
    crate::warn_limited!(component = "proxy", pod = %pod, src = %src, dst = %target,
        hop = ?hop, reason = e.reason(),
        "proxy loop refused: the destination is one of the proxy's own listeners");
    Err(e)
}

impl Proxy {
    /// [`check`] against the current snapshot.
    pub(super) fn refuse_loop(
        &self,
        hop: Hop,
        pod: &WorkloadRef,
        src: SocketAddr,
        target: SocketAddr,
    ) -> Result<(), Error> {
        let snapshot = self.inner.state.borrow();
        check(&snapshot, &self.inner.ports, hop, pod, src, target)
    }
}

/// Whether dialling `target` on `hop` would reach a proxy listener.
fn reaches_proxy(snapshot: &Snapshot, ports: &Ports, hop: Hop, target: SocketAddr) -> bool {
    if ![ports.outbound, ports.inbound, ports.hbone].contains(&target.port()) {
        return false;
    }
    // `::ffff:127.0.0.1` is 127.0.0.1 to the kernel.
    let ip = target.ip().to_canonical();
    match hop {
        Hop::Delivery => true,
        Hop::Outbound => {
            ip.is_loopback()
                || ip.is_unspecified()
                || snapshot.workload_by_ip(ip).is_some_and(|w| w.enrolled)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::{IpAddr, Ipv4Addr, Ipv6Addr},
        path::PathBuf,
    };

    use super::*;
    use crate::state::{Location, Workload};

    const PORTS: Ports = Ports {
        outbound: 15001,
        inbound: 15006,
        hbone: 15008,
    };

    fn at(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
        SocketAddr::new(ip.into(), port)
    }

    fn pod(name: &str, ip: [u8; 4], enrolled: bool) -> Workload {
        Workload {
            name: WorkloadRef::new("default", name),
            service_account: name.to_string(),
            ips: vec![Ipv4Addr::from(ip).into()],
            location: Location::Local {
                netns: PathBuf::from("/run/netns/x"),
            },
            enrolled,
            mtls_mode: None,
            labels: Default::default(),
        }
    }

    /// An enrolled pod (10.1.0.2) and one outside the mesh (10.1.0.9).
    fn mesh() -> Snapshot {
        let mut s = Snapshot::default();
        for w in [
            pod("pod", [10, 1, 0, 2], true),
            pod("outside", [10, 1, 0, 9], false),
        ] {
            s.workloads.insert(w.name.clone(), w);
        }
        s
    }

    #[test]
    fn every_local_address_of_a_proxy_port_is_a_loop_outbound() {
        let snapshot = mesh();
        for port in [15001, 15006, 15008] {
            for target in [
                at(Ipv4Addr::LOCALHOST, port),
                at(Ipv4Addr::new(127, 0, 0, 2), port),
                at(Ipv4Addr::UNSPECIFIED, port),
                at(Ipv6Addr::LOCALHOST, port),
                at(Ipv6Addr::UNSPECIFIED, port),
                at(Ipv4Addr::LOCALHOST.to_ipv6_mapped(), port),
                at(Ipv4Addr::new(10, 1, 0, 2), port),
                at(Ipv4Addr::new(10, 1, 0, 2).to_ipv6_mapped(), port),
            ] {
                assert!(
                    reaches_proxy(&snapshot, &PORTS, Hop::Outbound, target),
                    "{target}"
                );
            }
        }
    }

    #[test]
    fn other_ports_and_pods_outside_the_mesh_are_not_loops_outbound() {
        let snapshot = mesh();
        for target in [
            at(Ipv4Addr::new(10, 1, 0, 2), 8080),
            at(Ipv4Addr::LOCALHOST, 15000),
            at(Ipv4Addr::new(10, 1, 0, 9), 15006),
            at(Ipv4Addr::new(192, 0, 2, 1), 15001),
        ] {
            assert!(
                !reaches_proxy(&snapshot, &PORTS, Hop::Outbound, target),
                "{target}"
            );
        }
    }

    #[test]
    fn delivery_to_any_address_at_a_proxy_port_is_a_loop() {
        let snapshot = mesh();
        for target in [
            at(Ipv4Addr::new(10, 1, 0, 2), 15006),
            at(Ipv4Addr::new(10, 99, 0, 1), 15001),
            at(Ipv4Addr::LOCALHOST, 15008),
        ] {
            assert!(
                reaches_proxy(&snapshot, &PORTS, Hop::Delivery, target),
                "{target}"
            );
        }
        assert!(!reaches_proxy(
            &snapshot,
            &PORTS,
            Hop::Delivery,
            at(Ipv4Addr::new(10, 1, 0, 2), 8080)
        ));
    }

    #[test]
    fn a_loop_is_refused_with_its_own_reason() {
        let pod = WorkloadRef::new("default", "pod");
        let target = at(Ipv4Addr::LOCALHOST, 15006);
        let e = check(&mesh(), &PORTS, Hop::Delivery, &pod, target, target).unwrap_err();
        assert_eq!(e.reason(), "proxy_loop");
    }
}
