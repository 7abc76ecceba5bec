//! The node proxy: serves every enrolled pod's listeners. Outbound (15001) connections are
//! matched to their original destination (from the eBPF `ORIG_DST` map), resolved (a
//! service VIP becomes an endpoint) and sent from inside the pod: over HBONE (mutual TLS,
//! `hbone`) to a destination in the mesh, handed to the destination's inbound side
//! in-process when this proxy serves it too (`local`, `mesh.sameNode: LOCAL`), over HBONE
//! to the waypoint of a service bound to one, in plaintext to anything else (`route`
//! decides).
//! HBONE (15008) and plaintext inbound (15006, refused for STRICT pods) connections are
//! delivered to the application over the pod's loopback. Bytes are copied both ways with
//! half-close preserved (spliced between two TCP sockets); errors reset both sides. Every
//! listener is bounded (`limits`): per-pod and per-node connection caps, idle timeouts and
//! keepalives. A Service without a waypoint whose TrafficPolicy sets
//! `connectionPool.maxConnections` is limited per node (`breaker`).
//!
//! Inputs: per-pod listeners and a socket factory for the pod (`PodContext`), the state
//! snapshot, the original-destination table, and — when the node has a CA — the
//! certificates of the pods' identities (`Mtls`). Outputs: proxied connections, their
//! records (`connections`) and one access-log line each.

mod admission;
mod breaker;
pub mod connections;
mod inbound;
pub mod limits;
mod local;
mod loop_guard;
mod originate;
mod outbound;
mod route;
mod socket;

use std::{
    io,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use ebpf_common::netns::NetnsCookie;
use serde::Serialize;
use tokio::{net::TcpListener, task::JoinSet};
use tracing::{Instrument, debug, info, info_span, warn};

pub use connections::{Connections, Direction, Stop};
pub use socket::SocketFactory;

use crate::{
    drain::Drain,
    ebpf::{HostConnTable, OrigDstTable},
    hbone::{self, copy},
    identity::{CertSource, SpiffeId},
    policy::DenyReason,
    state::{StateHandle, WorkloadRef},
};

/// Proxy settings fixed at start-up.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Config {
    pub ports: Ports,
    /// `SO_MARK` on every proxy socket (for operators' routing and firewall rules). It does
    /// not keep the proxy's sockets from being steered: their registered cookies do.
    pub mark: u32,
    /// Connection caps, idle timeouts, keepalives, HTTP/2 limits (`agent.limits`).
    pub limits: limits::Config,
}

/// Listener ports inside each pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Ports {
    pub outbound: u16,
    pub inbound: u16,
    pub hbone: u16,
}

/// A data-path error, with a stable reason for logs and metrics.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no original destination recorded for this connection (was sock_ops attached?)")]
    NoOrigDst,
    #[error("original destination lookup failed: {0}")]
    OrigDstLookup(#[source] crate::ebpf::Error),
    #[error("cannot create a socket in the pod's network namespace: {0}")]
    Socket(#[source] io::Error),
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("connecting to {0} timed out")]
    ConnectTimeout(SocketAddr),
    #[error(transparent)]
    Transfer(#[from] copy::Error),
    #[error("mutual TLS is off on this node (no CA configured); HBONE connection reset")]
    HboneUnsupported,
    #[error(transparent)]
    Hbone(#[from] hbone::Error),
    #[error("the workload has no valid SPIFFE identity: {0}")]
    Identity(#[source] crate::identity::InvalidSpiffeId),
    #[error("the pod is no longer in the state snapshot")]
    UnknownPod,
    #[error("HBONE CONNECT to {0} refused: not a workload served at this address")]
    NotServed(SocketAddr),
    #[error("the destination pod on this node refused the connection ({})", .0.status())]
    DestinationRefused(hbone::Refusal),
    #[error(
        "no valid certificate for {0} yet: a node-local connection needs both ends' (the CA's word that this node may hold them)"
    )]
    NoLocalCertificate(SpiffeId),
    #[error("denied by access policy ({}{})", reason.as_str(), policy.as_ref().map(|p| format!(", policy {p}")).unwrap_or_default())]
    PolicyDenied {
        reason: DenyReason,
        policy: Option<WorkloadRef>,
    },
    #[error("closed: a policy change denies this connection ({}{})", reason.as_str(), policy.as_ref().map(|p| format!(", policy {p}")).unwrap_or_default())]
    PolicyRevoked {
        reason: DenyReason,
        policy: Option<WorkloadRef>,
    },
    #[error("closed: the pod was removed from the mesh's state (deleted) while connected")]
    PodRemoved,
    #[error(
        "closed: the agent stopped draining (its drain limit, agent.drain, passed, or a second signal came)"
    )]
    DrainCut,
    #[error("plaintext connection refused: the destination pod's mTLS mode is STRICT")]
    PlaintextRefusedStrict,
    #[error(
        "refused: {0} is one of the proxy's own listeners, and dialling it would loop (a pod connected to a proxy port)"
    )]
    ProxyLoop(SocketAddr),
    #[error(
        "service {service} is bound to waypoint {waypoint}, which {problem}; connection reset (a bound service's traffic never goes around its waypoint)"
    )]
    WaypointUnavailable {
        service: WorkloadRef,
        waypoint: WorkloadRef,
        problem: WaypointProblem,
    },
    #[error(
        "refused: this node's pods have as many connections open to service {service} as TrafficPolicy {policy} allows ({max_connections}: connectionPool.maxConnections, per node); connection reset"
    )]
    Overflow {
        service: WorkloadRef,
        policy: WorkloadRef,
        max_connections: u32,
    },
    #[error(
        "refused: {0} is no workload, service or registered external service, and the mesh's outboundTrafficPolicy is REGISTRY_ONLY (register it with an ExternalService)"
    )]
    Unregistered(SocketAddr),
    #[error("TLS to external host {sni} failed: {reason}")]
    Originate { sni: String, reason: String },
}

/// Why a bound service's waypoint cannot take a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WaypointProblem {
    /// The snapshot has no waypoint of that name (not deployed, or not labelled
    /// `weft.dev/role: waypoint`).
    Unknown,
    /// The waypoint has no ready address.
    NotReady,
    /// Its identity cannot be written as a SPIFFE id.
    InvalidIdentity,
    /// This node has no CA: a waypoint is reached over mutual TLS only.
    NoMtls,
}

impl Error {
    /// Stable, snake_case reason: metric label and access-log `error` field.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::NoOrigDst => "no_orig_dst",
            Error::OrigDstLookup(_) => "orig_dst_lookup",
            Error::Socket(_) => "socket",
            Error::Connect { .. } => "upstream_connect",
            Error::ConnectTimeout(_) => "upstream_connect_timeout",
            Error::Transfer(e) => e.reason(),
            Error::HboneUnsupported => "hbone_unsupported",
            Error::Hbone(e) => e.reason(),
            Error::Identity(_) => "invalid_identity",
            Error::UnknownPod => "unknown_pod",
            Error::NotServed(_) => "not_served",
            Error::DestinationRefused(_) => "destination_refused",
            Error::NoLocalCertificate(_) => "no_certificate",
            Error::PolicyDenied { reason, .. } => reason.as_str(),
            Error::PolicyRevoked { .. } => "policy_revoked",
            Error::PodRemoved => "pod_removed",
            Error::DrainCut => "drain_cut",
            Error::PlaintextRefusedStrict => "plaintext_refused_strict",
            Error::ProxyLoop(_) => "proxy_loop",
            Error::WaypointUnavailable { .. } => "waypoint_unavailable",
            Error::Overflow { .. } => "overflow",
            Error::Unregistered(_) => "unregistered_destination",
            Error::Originate { .. } => "tls_origination_failed",
        }
    }
}

impl Error {
    /// Back to an I/O error, for callers that speak `io::Result` (the HBONE pool's dialer).
    fn into_io(self) -> io::Error {
        match self {
            Error::Socket(e) | Error::Connect { source: e, .. } => e,
            Error::ConnectTimeout(addr) => io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connecting to {addr} timed out"),
            ),
            other => io::Error::other(other.to_string()),
        }
    }
}

impl std::fmt::Display for WaypointProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WaypointProblem::Unknown => {
                "is not known (is it deployed? a Service labelled weft.dev/role: waypoint, or an \
                 entry of `waypoints` in the local file)"
            }
            WaypointProblem::NotReady => "has no ready address",
            WaypointProblem::InvalidIdentity => {
                "has no valid SPIFFE identity (check its service account)"
            }
            WaypointProblem::NoMtls => {
                "cannot be used: a waypoint needs mutual TLS and this node has no CA"
            }
        })
    }
}

/// Mutual TLS inputs: present when the node has a CA.
pub struct Mtls {
    /// SPIFFE trust domain of the mesh (`cluster.local`).
    pub trust_domain: String,
    /// The pods' certificates and the trust bundle, read at each handshake.
    pub certs: Arc<dyn CertSource>,
    /// Outbound HBONE connections, shared by every pod of the node.
    pub pool: hbone::Pool,
}

/// The listeners of one pod, created inside its namespace by enrollment. Shared, so that a
/// re-enrollment serves the same sockets with a new `PodContext` before the old accept
/// loops stop, and no connect finds the ports closed.
#[derive(Clone)]
pub struct PodListeners {
    pub outbound: Vec<Arc<TcpListener>>,
    pub inbound: Vec<Arc<TcpListener>>,
    pub hbone: Vec<Arc<TcpListener>>,
}

/// What the proxy knows of a pod it serves.
pub struct PodContext {
    pub workload: WorkloadRef,
    pub pod_id: u32,
    pub netns_cookie: NetnsCookie,
    /// Creates sockets inside the pod's namespace, marked.
    pub sockets: Arc<dyn SocketFactory>,
}

/// The running accept loops of one pod; dropping it stops accepting (open connections
/// finish on their own).
pub struct PodHandle {
    tasks: JoinSet<()>,
    addresses: Vec<(Direction, SocketAddr)>,
    /// Node-local connections reach the pod while this is held.
    _local: local::Registration,
}

/// The shared proxy: everything a connection handler needs.
#[derive(Clone)]
pub struct Proxy {
    inner: Arc<Inner>,
}

struct Inner {
    state: StateHandle,
    orig_dst: OrigDstTable,
    /// Connections the node's own sockets made: kubelet probes are recognised here.
    host_conns: HostConnTable,
    connections: Arc<Connections>,
    mtls: Option<Mtls>,
    hbone_port: u16,
    /// The pods' listener ports, which the proxy must never dial (`loop_guard`).
    ports: Ports,
    admissions: Arc<admission::Admissions>,
    /// Connection counts of the Services under a `maxConnections` limit.
    breakers: Arc<breaker::Breakers>,
    /// Bound services whose waypoint was last seen unavailable (to warn once per change).
    waypoint_warnings: route::WaypointWarnings,
    /// Round-robin position for service endpoints and waypoint addresses.
    next_endpoint: AtomicUsize,
    /// TLS to the external services whose ports originate it.
    originator: originate::Originator,
    limits: limits::Config,
    /// Every pod's budgets draw on this one.
    node_budget: Arc<limits::NodeBudget>,
    /// The pods served here, for node-local connections.
    local_pods: Arc<local::LocalPods>,
    /// Every connection task and HBONE stream holds a guard, so shutdown can wait for them.
    /// The outbound HBONE pool's connections hold none: they carry only streams of
    /// outbound connections, which do, and are idle once those end.
    drain: Drain,
}

impl Proxy {
    pub fn new(
        config: &Config,
        state: StateHandle,
        orig_dst: OrigDstTable,
        host_conns: HostConnTable,
        connections: Arc<Connections>,
        mtls: Option<Mtls>,
        drain: Drain,
    ) -> Self {
        let trust_domain = mtls.as_ref().map(|m| m.trust_domain.clone());
        let breakers = breaker::Breakers::new(connections.metrics().clone());
        Self {
            inner: Arc::new(Inner {
                state,
                orig_dst,
                host_conns,
                connections,
                mtls,
                hbone_port: config.ports.hbone,
                ports: config.ports,
                admissions: Arc::new(admission::Admissions::new(trust_domain)),
                breakers,
                waypoint_warnings: route::WaypointWarnings::default(),
                next_endpoint: AtomicUsize::new(0),
                originator: originate::Originator::default(),
                limits: config.limits,
                local_pods: Arc::default(),
                node_budget: limits::NodeBudget::new(
                    config.limits.node_connections,
                    limits::raise_nofile_limit(),
                ),
                drain,
            }),
        }
    }

    pub fn connections(&self) -> &Arc<Connections> {
        &self.inner.connections
    }

    /// Applies a new snapshot's access policies: to new connections at once, and to open
    /// ones, which are closed when the new policy denies them (a new waypoint binding
    /// included). Also takes the connection limits of Services without a waypoint (for
    /// new connections), and forgets the waypoint failures the snapshot fixed, saying
    /// which waypoints are ready again.
    pub fn apply_policies(&self, snapshot: &Arc<crate::state::Snapshot>) {
        self.inner.admissions.update(snapshot);
        self.inner.breakers.update(snapshot);
        for (service, waypoint) in self.inner.waypoint_warnings.update(snapshot) {
            info!(component = "proxy", service = %service, waypoint = %waypoint,
                "waypoint ready again: the bound service's traffic goes to it");
        }
    }

    /// The outbound HBONE pool, when mutual TLS is on (for status).
    pub fn hbone_pool(&self) -> Option<hbone::Pool> {
        self.inner.mtls.as_ref().map(|m| m.pool.clone())
    }

    /// Starts the accept loops of a pod.
    pub fn serve(&self, pod: PodContext, listeners: PodListeners) -> PodHandle {
        let hbone = self.hbone_server(&pod.workload);
        let pod = Arc::new(pod);
        // What the pod opens and what comes into it are budgeted apart: a flood aimed at
        // the pod never stops it from calling out, and the reverse.
        let pod_limit = self.inner.limits.pod_connections;
        let outbound_budget = limits::PodBudget::new(&self.inner.node_budget, pod_limit);
        let inbound_budget = limits::PodBudget::new(&self.inner.node_budget, pod_limit);
        let registration = self.inner.local_pods.register(local::LocalPod {
            pod: Arc::clone(&pod),
            budget: Arc::clone(&inbound_budget),
        });
        let mut tasks = JoinSet::new();
        let mut addresses = Vec::new();
        let all = [
            (Direction::Outbound, listeners.outbound),
            (Direction::Inbound, listeners.inbound),
            (Direction::Hbone, listeners.hbone),
        ];
        for (direction, group) in all {
            for listener in group {
                if let Ok(addr) = listener.local_addr() {
                    addresses.push((direction, addr));
                }
                let span =
                    info_span!("listener", pod = %pod.workload, direction = direction.as_str());
                let budget = match direction {
                    Direction::Outbound => &outbound_budget,
                    Direction::Inbound | Direction::Hbone | Direction::Local => &inbound_budget,
                };
                tasks.spawn(
                    accept_loop(
                        self.clone(),
                        Arc::clone(&pod),
                        direction,
                        listener,
                        hbone.clone(),
                        Arc::clone(budget),
                    )
                    .instrument(span),
                );
            }
        }
        PodHandle {
            tasks,
            addresses,
            _local: registration,
        }
    }

    /// Whether this node runs mutual TLS (it has a CA to get certificates from).
    fn mtls_on(&self) -> bool {
        self.inner.mtls.is_some()
    }

    /// The trust domain, when mutual TLS is on.
    fn trust_domain(&self) -> Option<&str> {
        self.inner.mtls.as_ref().map(|m| m.trust_domain.as_str())
    }

    /// The SPIFFE id of a workload in the current snapshot.
    fn identity_of(&self, workload: &WorkloadRef) -> Result<Option<SpiffeId>, Error> {
        let Some(trust_domain) = self.trust_domain() else {
            return Ok(None);
        };
        let snapshot = self.inner.state.borrow();
        let w = snapshot.workloads.get(workload).ok_or(Error::UnknownPod)?;
        w.identity(trust_domain).map(Some).map_err(Error::Identity)
    }

    /// The TLS server of a pod's HBONE listener: its own certificate (no SNI: the listener
    /// is the pod's, so the certificate is chosen by the address it arrived at). None when
    /// mutual TLS is off or the pod's identity is unusable (its HBONE port then refuses).
    fn hbone_server(&self, workload: &WorkloadRef) -> Option<Arc<rustls::ServerConfig>> {
        let mtls = self.inner.mtls.as_ref()?;
        let built = self
            .identity_of(workload)
            .and_then(|id| id.ok_or(Error::HboneUnsupported))
            .and_then(|id| hbone::server_config(Arc::clone(&mtls.certs), id).map_err(Error::Hbone));
        match built {
            Ok(config) => Some(config),
            Err(e) => {
                warn!(component = "proxy", pod = %workload, error = %e, "no HBONE server for this pod; its mTLS port refuses connections");
                None
            }
        }
    }

    /// The pod at `ip`, when this proxy serves it and it has `identity` (what the route
    /// expects of it): a node-local connection's destination.
    fn served_pod(&self, ip: std::net::IpAddr, identity: &SpiffeId) -> Option<local::LocalPod> {
        let workload = self.inner.state.borrow().workload_by_ip(ip)?.name.clone();
        let served = self.inner.local_pods.get(&workload)?;
        let actual = self.identity_of(&workload).ok().flatten()?;
        (actual == *identity).then_some(served)
    }

    fn pick_endpoint(&self) -> usize {
        self.inner.next_endpoint.fetch_add(1, Ordering::Relaxed)
    }

    /// No bytes either way for this long closes a proxied connection.
    fn idle_timeout(&self) -> Duration {
        self.inner.limits.idle_timeout
    }

    /// Takes a place in `budget` for a new connection, or counts and logs the refusal.
    fn admit_connection(
        &self,
        budget: &Arc<limits::PodBudget>,
        pod: &WorkloadRef,
        direction: Direction,
        peer: SocketAddr,
    ) -> Option<limits::Permit> {
        match budget.try_acquire() {
            Ok(permit) => Some(permit),
            Err(exceeded) => {
                self.connections().refused(exceeded.reason());
                crate::warn_limited!(component = "proxy", pod = %pod,
                    direction = direction.as_str(), src = %peer, reason = exceeded.reason(),
                    pod_limit = self.inner.limits.pod_connections,
                    node_limit = self.inner.node_budget.limit(),
                    "connection refused: connection limit reached (agent.limits)");
                None
            }
        }
    }
}

impl PodHandle {
    /// Listener addresses (inside the pod), for status.
    pub fn addresses(&self) -> &[(Direction, SocketAddr)] {
        &self.addresses
    }

    /// Stops accepting.
    pub fn stop(mut self) {
        self.tasks.abort_all();
    }
}

async fn accept_loop(
    proxy: Proxy,
    pod: Arc<PodContext>,
    direction: Direction,
    listener: Arc<TcpListener>,
    hbone_tls: Option<Arc<rustls::ServerConfig>>,
    budget: Arc<limits::PodBudget>,
) {
    // Every CONNECT stream opens an upstream socket: it takes a place in the pod's inbound
    // budget like a plaintext connection does.
    let hbone_handler = Arc::new(limits::Limited {
        inner: inbound::HboneHandler {
            proxy: proxy.clone(),
            pod: Arc::clone(&pod),
        },
        budget: Arc::clone(&budget),
        proxy: proxy.clone(),
        pod: pod.workload.clone(),
    });
    let keepalive = proxy.inner.limits.keepalive();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // EMFILE/ENFILE/ENOBUFS: back off instead of spinning; the kernel keeps
                // the backlog meanwhile.
                crate::warn_limited!(component = "proxy", error = %e, "accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        // Over the cap: closed at once with a RST, before any work or record.
        let Some(permit) = proxy.admit_connection(&budget, &pod.workload, direction, peer) else {
            copy::reset(&stream);
            continue;
        };
        if let Err(e) = stream.set_nodelay(true) {
            debug!(component = "proxy", error = %e, "cannot set TCP_NODELAY");
        }
        if direction != Direction::Hbone {
            copy::reset_until_finished(&stream);
        }
        // A peer that vanished without FIN or RST is found by keepalive probes.
        if let Err(e) = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive) {
            debug!(component = "proxy", error = %e, "cannot set TCP keepalive");
        }
        let proxy = proxy.clone();
        let pod = Arc::clone(&pod);
        let hbone = hbone_tls
            .clone()
            .map(|tls| (tls, Arc::clone(&hbone_handler)));
        let http2 = proxy.inner.limits.hbone;
        let guard = proxy.inner.drain.guard();
        tokio::spawn(async move {
            let _permit = permit;
            let _guard = guard;
            match (direction, hbone) {
                (Direction::Outbound, _) => outbound::handle(&proxy, &pod, stream, peer).await,
                (Direction::Inbound, _) => inbound::handle(&proxy, &pod, stream, peer).await,
                (Direction::Hbone, Some((tls, handler))) => {
                    // Failures are logged by the server with their reason; streams record
                    // themselves through the handler.
                    // Boxed: an HBONE connection's state (5 KB) would otherwise size the
                    // task of every plain connection too.
                    let _ = Box::pin(hbone::serve_with(
                        stream,
                        tls,
                        handler,
                        &http2,
                        &proxy.inner.drain,
                    ))
                    .await;
                }
                (Direction::Hbone, None) => inbound::refuse_hbone(&proxy, &pod, stream, peer),
                // Node-local connections are handed over in-process: no listener has this
                // direction.
                (Direction::Local, _) => copy::reset(&stream),
            }
        });
    }
}

/// Connect timeout toward upstreams: long enough for a busy node, short enough that an
/// application sees a reset rather than hanging.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
