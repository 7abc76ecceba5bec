//! Outbound: a pod's application connected somewhere, connect4/6 sent it to the proxy's
//! outbound listener. Find where it meant to go, pick the upstream (`route`), and reach it
//! from inside the pod (so the source address is the pod's): over a pooled HBONE
//! connection to the destination pod's 15008 when it is in the mesh, to a waypoint's 15008
//! when the destination is a service bound to one, in plaintext otherwise; copy.

use std::{
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::Arc,
};

use ebpf_common::orig_dst::ConnKey;
use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::{
    CONNECT_TIMEOUT, Direction, Error, PodContext, Proxy,
    admission::{Admission, Facts},
    connections::{PolicyOutcome, Tracked},
    local,
    loop_guard::{self, Hop},
    route::{self, Route},
    socket,
};
use crate::{
    hbone::{self, copy},
    identity::SpiffeId,
    state::{SameNode, TlsOrigination, WorkloadRef},
};

pub async fn handle(proxy: &Proxy, pod: &Arc<PodContext>, mut client: TcpStream, peer: SocketAddr) {
    let dst = match original_destination(proxy, pod, peer) {
        Ok(dst) => dst,
        Err(e) => {
            // Unknown destination: reset rather than guess (and never connect to ourselves).
            let tracked = proxy.connections().open(
                Direction::Outbound,
                pod.workload.to_string(),
                peer,
                client.local_addr().unwrap_or(peer),
            );
            copy::reset(&client);
            proxy.connections().close(&tracked, Some(&e));
            return;
        }
    };
    let tracked =
        proxy
            .connections()
            .open(Direction::Outbound, pod.workload.to_string(), peer, dst);
    let (outbound, source_ip, same_node) = {
        let snapshot = proxy.inner.state.borrow();
        let source = snapshot.workloads.get(&pod.workload);
        // Neither what the pod asked for nor what it resolved to (a VIP's endpoint) may be
        // the proxy itself.
        let not_a_loop = |target| {
            loop_guard::check(
                &snapshot,
                &proxy.inner.ports,
                Hop::Outbound,
                &pod.workload,
                peer,
                target,
            )
        };
        let outbound = not_a_loop(dst)
            .and_then(|()| {
                route::outbound(
                    &snapshot,
                    source,
                    dst,
                    proxy.pick_endpoint(),
                    proxy.inner.hbone_port,
                    proxy.trust_domain(),
                )
            })
            .and_then(|o| match o.route {
                // The waypoint's HBONE port is where this route must go; the authority it
                // carries is `dst`, checked above.
                Route::Waypoint { .. } => Ok(o),
                Route::Hbone { .. } | Route::Passthrough | Route::External { .. } => {
                    not_a_loop(o.upstream).map(|()| o)
                }
            });
        // The pod's own address of the upstream's family, for `forwarded: for=`.
        let v4 = outbound
            .as_ref()
            .map_or(dst.is_ipv4(), |o| o.upstream.is_ipv4());
        let source_ip = source
            .and_then(|w| w.ips.iter().find(|ip| ip.is_ipv4() == v4))
            .copied()
            .unwrap_or(peer.ip());
        (outbound, source_ip, snapshot.mesh.same_node)
    };
    let outbound = match outbound {
        Ok(outbound) => outbound,
        Err(e) => {
            unroutable(proxy, &tracked, &e);
            copy::reset(&client);
            proxy.connections().close(&tracked, Some(&e));
            return;
        }
    };
    tracked.set_upstream(
        outbound.upstream,
        outbound.service.as_ref().map(ToString::to_string),
    );
    if let Route::External { service, tls, http } = &outbound.route {
        let result = async {
            let admission = external(proxy, pod, &tracked, service, source_ip, dst)?;
            let stop = std::pin::pin!(tracked.until_stopped(admission.revoked()));
            let tls = tls.as_ref().map(|tls| (tls, *http));
            direct(
                proxy,
                pod,
                &tracked,
                &mut client,
                outbound.upstream,
                tls,
                stop,
            )
            .await
        }
        .await;
        if result.is_err() {
            copy::reset(&client);
        }
        proxy.connections().close(&tracked, result.err().as_ref());
        return;
    }
    // A Service's connection-pool limit, before anything is dialled. Held until the
    // connection is recorded closed. A bound Service's limits are its waypoint's.
    let _permit = match (&outbound.route, &outbound.service) {
        (Route::Waypoint { .. }, _) | (_, None) => None,
        (_, Some(service)) => match proxy.inner.breakers.acquire(service) {
            Ok(permit) => permit,
            Err(overflow) => {
                let e = Error::Overflow {
                    service: service.clone(),
                    policy: overflow.policy,
                    max_connections: overflow.max_connections,
                };
                copy::reset(&client);
                proxy.connections().close(&tracked, Some(&e));
                return;
            }
        },
    };
    debug!(component = "proxy", src = %peer, dst = %dst, upstream = %outbound.upstream, route = ?outbound.route, "outbound");
    // A destination pod this proxy serves too is handed over in-process when the mesh says so.
    let local_destination = match (&outbound.route, same_node) {
        (Route::Hbone { identity, addr }, SameNode::Local) => proxy.served_pod(addr.ip(), identity),
        _ => None,
    };
    // Over HBONE: to whom (the identity to require), where, and the CONNECT authority.
    let hbone = match outbound.route {
        Route::Passthrough | Route::External { .. } => None,
        Route::Hbone { identity, addr } => Some((identity, addr, outbound.upstream)),
        Route::Waypoint {
            waypoint,
            identity,
            addr,
            authority,
        } => {
            tracked.set_waypoint(Some(waypoint.to_string()));
            Some((identity, addr, authority))
        }
    };
    let result = match hbone {
        None => {
            let stop = std::pin::pin!(tracked.stopped());
            direct(
                proxy,
                pod,
                &tracked,
                &mut client,
                outbound.upstream,
                None,
                stop,
            )
            .await
        }
        Some((identity, addr, target)) => {
            let source = SocketAddr::new(source_ip, peer.port());
            match local_destination {
                Some(destination) => {
                    let request = local::Request {
                        destination_identity: identity,
                        source,
                        hbone_addr: addr,
                        target,
                    };
                    local::connect(proxy, pod, &tracked, &mut client, &destination, request).await
                }
                None => {
                    hbone_to(
                        proxy,
                        pod,
                        &tracked,
                        &mut client,
                        identity,
                        addr,
                        target,
                        source,
                    )
                    .await
                }
            }
        }
    };
    if result.is_err() {
        copy::reset(&client);
    }
    proxy.connections().close(&tracked, result.err().as_ref());
}

/// Judges a pod's connection to an external service by the policies naming the service,
/// with the pod's own identity (the node runs the pod) and address.
fn external(
    proxy: &Proxy,
    pod: &PodContext,
    tracked: &Tracked,
    service: &WorkloadRef,
    source_ip: IpAddr,
    dst: SocketAddr,
) -> Result<Admission, Error> {
    let identity = proxy.identity_of(&pod.workload)?;
    tracked.set_external(service.clone());
    let facts = Facts {
        destination: service.clone(),
        egress: true,
        dst_port: dst.port(),
        source_identity: identity,
        source_ip,
        kubelet_probe: false,
    };
    let snapshot = Arc::clone(&proxy.inner.state.borrow());
    let admitted = proxy.inner.admissions.admit(&snapshot, facts);
    match &admitted {
        Ok(_) => tracked.set_policy(PolicyOutcome::Allow),
        Err(e) => {
            crate::warn_limited!(component = "policy", pod = %pod.workload, dst = %dst,
                external_service = %service, reason = e.reason(), error = %e,
                "connection to an external service denied by access policy");
        }
    }
    admitted
}

/// Connects from inside the pod to an upstream reached without HBONE (passthrough, an
/// external host), opens TLS to it when `tls` says so (with whether the port carries
/// HTTP), and copies until both ends finish, or `stop`. `stop` comes pinned by the
/// caller, for the reason `copy::bidirectional_until` gives.
#[allow(
    clippy::too_many_arguments,
    reason = "the pieces are the connection's, not a bundle"
)]
async fn direct(
    proxy: &Proxy,
    pod: &PodContext,
    tracked: &Tracked,
    client: &mut TcpStream,
    upstream: SocketAddr,
    tls: Option<(&TlsOrigination, bool)>,
    stop: Pin<&mut impl Future<Output = Error>>,
) -> Result<(), Error> {
    let tcp = socket::connect_app(pod.sockets.as_ref(), upstream, None, CONNECT_TIMEOUT).await?;
    match tls {
        None => copy_to(proxy, tracked, client, tcp, stop).await,
        Some((tls, http)) => {
            let originator = &proxy.inner.originator;
            let upstream = originator.connect(tcp, tls, http, CONNECT_TIMEOUT).await?;
            copy_to(proxy, tracked, client, upstream, stop).await
        }
    }
}

/// Copies between the application and `upstream` until both ends finish, or `stop`.
async fn copy_to<U: copy::Stream>(
    proxy: &Proxy,
    tracked: &Tracked,
    client: &mut TcpStream,
    mut upstream: U,
    stop: Pin<&mut impl Future<Output = Error>>,
) -> Result<(), Error> {
    proxy.connections().established(tracked);
    copy::bidirectional_until(
        client,
        &mut upstream,
        &tracked.sent,
        &tracked.received,
        proxy.idle_timeout(),
        stop,
    )
    .await
}

/// Says why a connection cannot be routed, once per change for a service whose waypoint
/// is unavailable (every failure is counted and in the access log anyway).
fn unroutable(proxy: &Proxy, tracked: &Tracked, e: &Error) {
    if let Error::Unregistered(dst) = e {
        crate::warn_limited!(component = "proxy", pod = %tracked.pod, dst = %dst,
            reason = e.reason(), "connection refused: the destination is not registered and the \
            mesh's outboundTrafficPolicy is REGISTRY_ONLY");
    }
    if let Error::WaypointUnavailable {
        service,
        waypoint,
        problem,
    } = e
    {
        tracked.set_service(Some(service.to_string()));
        tracked.set_waypoint(Some(waypoint.to_string()));
        if proxy
            .inner
            .waypoint_warnings
            .failed(service, waypoint, *problem)
        {
            warn!(component = "proxy", service = %service, waypoint = %waypoint,
                reason = e.reason(), error = %e, "bound service unreachable: its waypoint is unavailable");
        }
    }
}

/// Sends the application's connection as one CONNECT stream over a pooled HBONE connection
/// opened from inside the pod, proving the pod's identity and requiring the destination's.
#[allow(
    clippy::too_many_arguments,
    reason = "one call site; the pieces are the connection's, not a bundle"
)]
async fn hbone_to(
    proxy: &Proxy,
    pod: &Arc<PodContext>,
    tracked: &Tracked,
    client: &mut TcpStream,
    destination: SpiffeId,
    addr: SocketAddr,
    target: SocketAddr,
    source: SocketAddr,
) -> Result<(), Error> {
    let mtls = proxy.inner.mtls.as_ref().ok_or(Error::HboneUnsupported)?;
    let own = proxy
        .identity_of(&pod.workload)?
        .ok_or(Error::HboneUnsupported)?;
    tracked.set_identities(Some(own.to_string()), Some(destination.to_string()));
    let key = hbone::Key {
        source: own,
        destination,
        address: addr,
        local: source.ip(),
    };
    let sockets = Arc::clone(&pod.sockets);
    let dial = move || {
        let sockets = Arc::clone(&sockets);
        async move {
            socket::connect(sockets.as_ref(), addr, None, CONNECT_TIMEOUT)
                .await
                .map_err(Error::into_io)
        }
    };
    let request = hbone::ConnectRequest {
        target,
        source,
        baggage: None,
        traceparent: None,
    };
    // Boxed: the handshake's state (5 KB) is needed only until the stream opens, and a
    // connection task holds its future for as long as the connection lives.
    let mut stream = Box::pin(mtls.pool.connect(key, dial, request)).await?;
    proxy.connections().established(tracked);
    copy::bidirectional_until(
        client,
        &mut stream,
        &tracked.sent,
        &tracked.received,
        proxy.idle_timeout(),
        std::pin::pin!(tracked.stopped()),
    )
    .await
}

/// Takes the connection's original destination out of the eBPF table. The key's family is
/// the family of the socket in the application; a v6 socket talking to a v4-mapped address
/// arrives on the v4 listener, so the other family is tried when the first misses.
fn original_destination(
    proxy: &Proxy,
    pod: &PodContext,
    peer: SocketAddr,
) -> Result<SocketAddr, Error> {
    let families = if peer.is_ipv4() {
        [AF_INET, AF_INET6]
    } else {
        [AF_INET6, AF_INET]
    };
    for family in families {
        let key = ConnKey {
            netns_cookie: pod.netns_cookie.0,
            client_port: peer.port(),
            family,
            _pad: [0; 4],
        };
        if let Some(orig) = proxy
            .inner
            .orig_dst
            .take(key)
            .map_err(Error::OrigDstLookup)?
        {
            return Ok(orig);
        }
    }
    Err(Error::NoOrigDst)
}

const AF_INET: u16 = libc::AF_INET as u16;
const AF_INET6: u16 = libc::AF_INET6 as u16;
