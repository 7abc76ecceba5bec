//! Inbound: connections into the pod. Plaintext: sk_lookup steered a connection addressed
//! to the pod onto the proxy's inbound listener (refused when the pod is STRICT); the
//! accepted socket's local address is the original destination (sk_lookup keeps it).
//! HBONE: a CONNECT stream on the pod's 15008 names the destination in `:authority`. Either
//! way access policy is checked first (`admission`: a denial resets the connection or
//! answers 401), then the proxy connects to the destination from inside the pod over
//! loopback — where sk_lookup does not steer again — and copies until done or until a
//! policy change revokes the connection.
//!
//! A mesh client (HBONE, node-local) is seen by the application at its own address: the
//! proxy's socket to the application is bound to it (IP_TRANSPARENT; the pod's reply
//! routing brings the answers back, `netns::reply_route`). A plaintext client is not: its
//! own connection ends inside the pod with that address, and a second connection from it to
//! the same port could collide with the 4-tuple of the client's next one. The application
//! then sees the pod's own address (so also for an IPv6 client, or a pod without the
//! routing), and the client's is in the proxy's record and access log.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::AtomicU64},
};

use tokio::net::TcpStream;
use tracing::debug;

use super::{
    CONNECT_TIMEOUT, Direction, Error, PodContext, Proxy,
    admission::{Admission, Facts},
    connections::{PolicyOutcome, Tracked},
    loop_guard::Hop,
    route, socket,
};
use crate::{
    hbone::{self, copy},
    identity::SpiffeId,
    policy::DenyReason,
};

pub async fn handle(proxy: &Proxy, pod: &Arc<PodContext>, mut client: TcpStream, peer: SocketAddr) {
    let dst = match client.local_addr() {
        Ok(dst) => dst,
        Err(e) => {
            debug!(component = "proxy", error = %e, "inbound connection gone before handling");
            return;
        }
    };
    let tracked = proxy
        .connections()
        .open(Direction::Inbound, pod.workload.to_string(), peer, dst);
    // First, before STRICT or policy: a loop is refused as such whatever the pod's mode.
    if let Err(e) = proxy.refuse_loop(Hop::Delivery, &pod.workload, peer, dst) {
        copy::reset(&client);
        proxy.connections().close(&tracked, Some(&e));
        return;
    }
    tracked.set_upstream(dst, None);
    let kubelet_probe = is_kubelet_probe(proxy, pod, peer, dst);
    if !accepts_plaintext(proxy, pod) && !kubelet_probe {
        // STRICT: only HBONE gets in. Reset, so the client fails fast instead of hanging.
        crate::warn_limited!(component = "proxy", pod = %pod.workload, src = %peer, dst = %dst,
            reason = Error::PlaintextRefusedStrict.reason(),
            "plaintext connection refused: the pod is STRICT (mutual TLS only)");
        copy::reset(&client);
        proxy
            .connections()
            .close(&tracked, Some(&Error::PlaintextRefusedStrict));
        return;
    }
    // A plaintext peer proves no identity: only IP and port rules can allow it, and never
    // onto a port only a waypoint may reach.
    let admission = match admit(proxy, pod, dst, None, peer, kubelet_probe) {
        Ok(admission) => admission,
        Err(e) => {
            copy::reset(&client);
            proxy.connections().close(&tracked, Some(&e));
            return;
        }
    };
    tracked.set_policy(PolicyOutcome::Allow);
    let result = async {
        // Not as the client: its own connection ends in this pod with that address, so a
        // second one to the same port could take the 4-tuple of its next connection.
        let mut upstream =
            socket::connect_app(pod.sockets.as_ref(), dst, None, CONNECT_TIMEOUT).await?;
        proxy.connections().established(&tracked);
        copy::bidirectional_until(
            &mut client,
            &mut upstream,
            &tracked.sent,
            &tracked.received,
            proxy.idle_timeout(),
            std::pin::pin!(tracked.until_stopped(admission.revoked())),
        )
        .await
    }
    .await;
    if result.is_err() {
        copy::reset(&client);
    }
    proxy.connections().close(&tracked, result.err().as_ref());
}

/// Access policy for a new connection into the pod; a denial is logged with its reason.
fn admit(
    proxy: &Proxy,
    pod: &PodContext,
    dst: SocketAddr,
    source_identity: Option<&SpiffeId>,
    peer: SocketAddr,
    kubelet_probe: bool,
) -> Result<Admission, Error> {
    let facts = Facts {
        destination: pod.workload.clone(),
        egress: false,
        dst_port: dst.port(),
        source_identity: source_identity.cloned(),
        source_ip: peer.ip(),
        kubelet_probe,
    };
    let snapshot = Arc::clone(&proxy.inner.state.borrow());
    let admissions = &proxy.inner.admissions;
    admissions.admit(&snapshot, facts).inspect_err(|e| {
        let src_identity = source_identity.map(ToString::to_string);
        if e.reason() == DenyReason::WaypointBypassed.as_str() {
            let bindings = admissions.waypoints_for(&snapshot, &pod.workload, dst.port());
            let services: Vec<String> = bindings.iter().map(|(s, _)| s.to_string()).collect();
            let waypoints: Vec<String> = bindings.iter().map(|(_, w)| w.to_string()).collect();
            crate::warn_limited!(component = "policy", pod = %pod.workload, src = %peer, dst = %dst,
                src.identity = ?src_identity, reason = e.reason(), ?services, ?waypoints,
                "connection refused: this port is a target of services bound to a waypoint, \
                 and only the waypoint may connect (does the client's node know the binding?)");
        } else {
            crate::warn_limited!(component = "policy", pod = %pod.workload, src = %peer, dst = %dst,
                src.identity = ?src_identity, reason = e.reason(), error = %e,
                "connection denied by access policy");
        }
    })
}

/// Decides on the CONNECT streams of one pod's HBONE listener.
pub struct HboneHandler {
    pub proxy: Proxy,
    pub pod: Arc<PodContext>,
}

/// The record of one HBONE stream or node-local connection into the pod: its counters move
/// with the bytes, and it closes with the outcome.
pub struct MeshTransfer {
    proxy: Proxy,
    tracked: Arc<Tracked>,
    /// Held while the stream is open: a later policy may revoke it.
    admission: Admission,
}

impl hbone::ConnectHandler for HboneHandler {
    type Transfer = MeshTransfer;

    async fn open(
        &self,
        request: hbone::InboundConnect,
    ) -> Result<hbone::Accepted<MeshTransfer>, hbone::Refusal> {
        open_from_mesh(&self.proxy, &self.pod, Direction::Hbone, request).await
    }

    fn handshake_refused(&self, error: &hbone::Error) {
        self.proxy.connections().refused(error.reason());
    }
}

/// A mesh peer asks for this pod: over HBONE (`Direction::Hbone`: its certificate proved
/// `peer_identity`), or from a pod of this node (`Direction::Local`: the node knows which
/// pod's socket it is). Checks that the target is this pod and that policy allows it, then
/// connects to the application.
pub(super) async fn open_from_mesh(
    proxy: &Proxy,
    pod: &Arc<PodContext>,
    direction: Direction,
    request: hbone::InboundConnect,
) -> Result<hbone::Accepted<MeshTransfer>, hbone::Refusal> {
    let tracked = proxy.connections().open(
        direction,
        pod.workload.to_string(),
        request.peer_addr,
        request.target,
    );
    let own = proxy.identity_of(&pod.workload).ok().flatten();
    let peer_identity = request.peer_identity.to_string();
    match (direction, own) {
        (Direction::Local, Some(own)) => {
            tracked.set_node_local_identities(peer_identity, own.to_string());
        }
        (_, own) => tracked.set_identities(Some(peer_identity), own.map(|id| id.to_string())),
    }
    // Never into one of the proxy's ports (the HBONE port included), whatever else.
    if let Err(e) = proxy.refuse_loop(
        Hop::Delivery,
        &pod.workload,
        request.peer_addr,
        request.target,
    ) {
        proxy.connections().close(&tracked, Some(&e));
        return Err(hbone::Refusal::NotServed);
    }
    tracked.set_upstream(request.target, None);
    // Only this pod, at the address the connection arrived at: never a relay to
    // anywhere else.
    if request.target.ip() != request.local_addr.ip() {
        crate::warn_limited!(component = "proxy", pod = %pod.workload, src = %request.peer_addr,
            src.identity = %request.peer_identity, target = %request.target,
            "HBONE CONNECT refused: not a workload served at this address");
        proxy
            .connections()
            .close(&tracked, Some(&Error::NotServed(request.target)));
        return Err(hbone::Refusal::NotServed);
    }
    let admission = match admit(
        proxy,
        pod,
        request.target,
        Some(&request.peer_identity),
        request.peer_addr,
        false,
    ) {
        Ok(admission) => admission,
        Err(e) => {
            proxy.connections().close(&tracked, Some(&e));
            return Err(hbone::Refusal::Denied);
        }
    };
    tracked.set_policy(PolicyOutcome::Allow);
    // As the client: the HBONE peer's address (the client pod's own: a peer proxy connects
    // from inside the pod), or the node-local client pod's.
    let as_client = Some(request.peer_addr.ip());
    match socket::connect_app(
        pod.sockets.as_ref(),
        request.target,
        as_client,
        CONNECT_TIMEOUT,
    )
    .await
    {
        Ok(upstream) => {
            proxy.connections().established(&tracked);
            Ok(hbone::Accepted {
                upstream,
                transfer: MeshTransfer {
                    proxy: proxy.clone(),
                    tracked,
                    admission,
                },
            })
        }
        Err(e) => {
            proxy.connections().close(&tracked, Some(&e));
            Err(hbone::Refusal::Unreachable)
        }
    }
}

impl hbone::Transfer for MeshTransfer {
    type Error = Error;

    fn sent(&self) -> &AtomicU64 {
        &self.tracked.sent
    }

    fn received(&self) -> &AtomicU64 {
        &self.tracked.received
    }

    fn finish(self, result: Result<(), Error>) {
        self.proxy
            .connections()
            .close(&self.tracked, result.err().as_ref());
    }

    fn stopped(&self) -> impl Future<Output = Error> + Send + 'static {
        self.tracked.until_stopped(self.admission.revoked())
    }

    fn idle_timeout(&self) -> std::time::Duration {
        self.proxy.idle_timeout()
    }
}

/// Whether the pod takes plaintext (it is not STRICT, or this node has no CA). A pod gone
/// from the snapshot takes nothing.
fn accepts_plaintext(proxy: &Proxy, pod: &PodContext) -> bool {
    let snapshot = proxy.inner.state.borrow();
    snapshot
        .workloads
        .get(&pod.workload)
        .is_some_and(|w| route::accepts_plaintext(&snapshot, w, proxy.mtls_on()))
}

/// Kubelet probes come in plaintext from the node itself, so a STRICT pod would fail them:
/// let exactly those in — connections that a socket of the node's own network namespace
/// made (recorded by the host-side `host_sock_ops` program) to a port the pod's probes use.
/// A node *address* proves nothing: kube-proxy masquerades NodePort and LoadBalancer
/// clients to one (docs/cni.md). Policy still applies to what is let in.
fn is_kubelet_probe(proxy: &Proxy, pod: &PodContext, peer: SocketAddr, dst: SocketAddr) -> bool {
    let probed = proxy
        .inner
        .state
        .borrow()
        .workloads
        .get(&pod.workload)
        .is_some_and(|w| w.probe_ports().contains(&dst.port()));
    if !probed {
        return false;
    }
    match proxy.inner.host_conns.take(peer, dst) {
        Ok(from_node) => from_node,
        Err(e) => {
            // Fail closed: unable to tell a probe from a masqueraded client, let neither in.
            crate::warn_limited!(component = "proxy", error = %e,
                "cannot look up the node's own connections; refusing a possible kubelet probe");
            false
        }
    }
}

/// Mutual TLS is off on this node (no CA): the HBONE listener exists (so the port is owned
/// and steering is exact) but refuses loudly instead of accepting and hanging.
pub fn refuse_hbone(proxy: &Proxy, pod: &Arc<PodContext>, client: TcpStream, peer: SocketAddr) {
    let dst = client.local_addr().unwrap_or(peer);
    let tracked = proxy
        .connections()
        .open(Direction::Hbone, pod.workload.to_string(), peer, dst);
    crate::warn_limited!(component = "proxy", pod = %pod.workload, src = %peer, "HBONE connection refused: mutual TLS is off on this node (no CA)");
    copy::reset(&client);
    proxy
        .connections()
        .close(&tracked, Some(&Error::HboneUnsupported));
}
