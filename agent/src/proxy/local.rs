//! Node-local connections (`mesh.sameNode: LOCAL`): a pod connects to an enrolled pod that
//! this proxy also serves. Instead of a CONNECT over TLS to the destination's own listener
//! on this node, the proxy hands the connection to the destination side in-process: the
//! same checks as for an HBONE stream (target, loop, access policy, the destination's
//! connection budget), with the client's identity known from its socket's network
//! namespace rather than from a certificate. Then it copies between the two application
//! sockets: two loopback hops instead of four, and no encryption. Each side keeps its
//! record (reporter source and destination), counted from the one copy.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Weak},
    time::SystemTime,
};

use tokio::net::TcpStream;

use super::{Direction, Error, PodContext, Proxy, connections::Tracked, inbound, limits};
use crate::{
    hbone::{self, Transfer, copy},
    identity::{CertSource, SpiffeId},
    state::WorkloadRef,
    sync::Mutex,
};

/// The pods this proxy serves, by name: where a node-local connection is handed over.
#[derive(Default)]
pub struct LocalPods {
    pods: Mutex<HashMap<WorkloadRef, LocalPod>>,
}

/// A served pod, and the budget its inbound connections take a place in.
#[derive(Clone)]
pub struct LocalPod {
    pub pod: Arc<PodContext>,
    pub budget: Arc<limits::PodBudget>,
}

/// Keeps a pod in `LocalPods` while its listeners are served. A re-enrollment registers the
/// new context before the old one's registration drops, which then leaves it in place.
pub struct Registration {
    pods: Weak<LocalPods>,
    pod: Arc<PodContext>,
}

impl LocalPods {
    pub fn register(self: &Arc<Self>, served: LocalPod) -> Registration {
        let pod = Arc::clone(&served.pod);
        self.pods.lock().insert(pod.workload.clone(), served);
        Registration {
            pods: Arc::downgrade(self),
            pod,
        }
    }

    pub fn get(&self, workload: &WorkloadRef) -> Option<LocalPod> {
        self.pods.lock().get(workload).cloned()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let Some(pods) = self.pods.upgrade() else {
            return;
        };
        let mut pods = pods.pods.lock();
        if pods
            .get(&self.pod.workload)
            .is_some_and(|served| Arc::ptr_eq(&served.pod, &self.pod))
        {
            pods.remove(&self.pod.workload);
        }
    }
}

/// What the client side knows of a node-local connection.
pub struct Request {
    /// The identity the route expects of the destination.
    pub destination_identity: SpiffeId,
    /// The client's address as the destination sees it (the pod's IP, the client's port).
    pub source: SocketAddr,
    /// The destination pod's HBONE address, where the connection would otherwise go.
    pub hbone_addr: SocketAddr,
    /// The original destination.
    pub target: SocketAddr,
}

/// Connects `client` to the destination pod's application through the destination side's
/// checks, and copies until both directions end, a side's policy or pod removal stops it,
/// or it fails. The client side's record is `tracked`; the destination side's is made here.
pub async fn connect(
    proxy: &Proxy,
    pod: &PodContext,
    tracked: &Tracked,
    client: &mut TcpStream,
    destination: &LocalPod,
    request: Request,
) -> Result<(), Error> {
    let Request {
        destination_identity,
        source,
        hbone_addr,
        target,
    } = request;
    let source_identity = proxy
        .identity_of(&pod.workload)?
        .ok_or(Error::HboneUnsupported)?;
    // The CA vouches that this node may hold an identity when it signs its certificate:
    // without both ends' certificates, no node-local connection either (as over HBONE).
    let certs = &proxy
        .inner
        .mtls
        .as_ref()
        .ok_or(Error::HboneUnsupported)?
        .certs;
    for identity in [&source_identity, &destination_identity] {
        if !has_valid_certificate(certs.as_ref(), identity) {
            return Err(Error::NoLocalCertificate(identity.clone()));
        }
    }
    tracked.set_node_local_identities(
        source_identity.to_string(),
        destination_identity.to_string(),
    );
    let _permit = proxy
        .admit_connection(
            &destination.budget,
            &destination.pod.workload,
            Direction::Local,
            source,
        )
        .ok_or(Error::DestinationRefused(hbone::Refusal::Overloaded))?;
    let connect = hbone::InboundConnect {
        peer_identity: source_identity,
        peer_addr: source,
        local_addr: hbone_addr,
        target,
        headers: Default::default(),
    };
    let hbone::Accepted {
        mut upstream,
        transfer,
    } = inbound::open_from_mesh(proxy, &destination.pod, Direction::Local, connect)
        .await
        .map_err(Error::DestinationRefused)?;
    proxy.connections().established(tracked);
    let client_stopped = tracked.stopped();
    let destination_stopped = transfer.stopped();
    let stop = async {
        tokio::select! {
            e = client_stopped => Ended::ClientSide(e),
            e = destination_stopped => Ended::DestinationSide(e),
        }
    };
    let result = copy::bidirectional_until(
        client,
        &mut upstream,
        &copy::Both(&tracked.sent, transfer.sent()),
        &copy::Both(&tracked.received, transfer.received()),
        proxy.idle_timeout(),
        std::pin::pin!(stop),
    )
    .await;
    // Each side records its own cause; the other sees its peer reset, as over HBONE.
    let (client_side, destination_side) = match result {
        Ok(()) => (Ok(()), Ok(())),
        Err(Ended::Copy(e)) => (Err(Error::Transfer(e.again())), Err(Error::Transfer(e))),
        Err(Ended::ClientSide(e)) => (Err(e), Err(peer_reset(copy::Error::Downstream))),
        Err(Ended::DestinationSide(e)) => (Err(peer_reset(copy::Error::Upstream)), Err(e)),
    };
    transfer.finish(destination_side);
    client_side
}

/// Whether the CA has signed a certificate for `identity` that is valid now.
fn has_valid_certificate(certs: &dyn CertSource, identity: &SpiffeId) -> bool {
    certs
        .certificate(identity)
        .is_some_and(|cert| cert.valid_at(SystemTime::now()))
}

/// Why a node-local copy ended early.
enum Ended {
    Copy(copy::Error),
    /// The client side's record was stopped (its pod removed, the drain cut).
    ClientSide(Error),
    /// The destination side stopped it (policy revoked, its pod removed, the drain cut).
    DestinationSide(Error),
}

impl From<copy::Error> for Ended {
    fn from(e: copy::Error) -> Self {
        Ended::Copy(e)
    }
}

/// What one side records when the other side's proxy cut the connection.
fn peer_reset(side: fn(std::io::Error) -> copy::Error) -> Error {
    Error::Transfer(side(std::io::Error::new(
        std::io::ErrorKind::ConnectionReset,
        "the other side of this node-local connection was closed by the proxy",
    )))
}

#[cfg(test)]
mod tests {
    use std::{io, net::IpAddr};

    use ebpf_common::netns::NetnsCookie;
    use socket2::{Domain, Socket};

    use super::*;
    use crate::proxy::SocketFactory;

    struct NoSockets;

    impl SocketFactory for NoSockets {
        fn tcp(&self, _domain: Domain, _as_client: Option<IpAddr>) -> io::Result<Socket> {
            Err(io::ErrorKind::Unsupported.into())
        }
    }

    fn served(name: &str, pod_id: u32) -> LocalPod {
        let node = limits::NodeBudget::new(10, 10);
        LocalPod {
            pod: Arc::new(PodContext {
                workload: WorkloadRef::new("default", name),
                pod_id,
                netns_cookie: NetnsCookie(u64::from(pod_id)),
                sockets: Arc::new(NoSockets),
            }),
            budget: limits::PodBudget::new(&node, 10),
        }
    }

    #[test]
    fn a_pod_is_served_while_registered_and_a_re_enrollment_outlives_the_old_registration() {
        let pods = Arc::new(LocalPods::default());
        let name = WorkloadRef::new("default", "server");
        let first = pods.register(served("server", 1));
        assert_eq!(pods.get(&name).map(|p| p.pod.pod_id), Some(1));
        // Re-enrolled: the new context is registered before the old one lets go.
        let second = pods.register(served("server", 2));
        drop(first);
        assert_eq!(
            pods.get(&name).map(|p| p.pod.pod_id),
            Some(2),
            "the old registration must not remove its successor"
        );
        drop(second);
        assert!(
            pods.get(&name).is_none(),
            "a pod no longer served is not reachable"
        );
    }
}
