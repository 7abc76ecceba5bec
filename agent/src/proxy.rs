//! The node proxy: serves every enrolled pod's listeners. Outbound (15001) connections are
//! matched to their original destination (from the eBPF `ORIG_DST` map), resolved (a
//! service VIP becomes an endpoint) and connected from inside the pod; inbound (15006)
//! connections are delivered to the application over the pod's loopback. Bytes are copied
//! both ways with half-close preserved; errors reset both sides.
//!
//! Inputs: per-pod listeners and a socket factory for the pod (`PodContext`), the state
//! snapshot, the original-destination table. Outputs: proxied connections, their records
//! (`connections`) and one access-log line each.

pub mod connections;
pub mod copy;
mod inbound;
mod outbound;
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
use tracing::{Instrument, debug, info_span, warn};

pub use connections::{Connections, Direction};
pub use socket::SocketFactory;

use crate::{
    ebpf::OrigDstTable,
    state::{StateHandle, WorkloadRef},
};

/// Proxy settings fixed at start-up.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Config {
    pub ports: Ports,
    /// `SO_MARK` on every proxy socket, so the eBPF programs never steer the proxy itself.
    pub mark: u32,
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
    #[error("the application side failed: {0}")]
    Downstream(#[source] io::Error),
    #[error("the upstream side failed: {0}")]
    Upstream(#[source] io::Error),
    #[error("HBONE (mutual TLS) is not served by this agent version; connection reset")]
    HboneUnsupported,
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
            Error::Downstream(_) => "downstream",
            Error::Upstream(_) => "upstream",
            Error::HboneUnsupported => "hbone_unsupported",
        }
    }
}

/// The listeners of one pod, created inside its namespace by enrollment.
pub struct PodListeners {
    pub outbound: Vec<TcpListener>,
    pub inbound: Vec<TcpListener>,
    pub hbone: Vec<TcpListener>,
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
}

/// The shared proxy: everything a connection handler needs.
#[derive(Clone)]
pub struct Proxy {
    inner: Arc<Inner>,
}

struct Inner {
    state: StateHandle,
    orig_dst: OrigDstTable,
    connections: Arc<Connections>,
    /// Round-robin position for service endpoints.
    next_endpoint: AtomicUsize,
}

impl Proxy {
    pub fn new(state: StateHandle, orig_dst: OrigDstTable, connections: Arc<Connections>) -> Self {
        Self {
            inner: Arc::new(Inner {
                state,
                orig_dst,
                connections,
                next_endpoint: AtomicUsize::new(0),
            }),
        }
    }

    pub fn connections(&self) -> &Arc<Connections> {
        &self.inner.connections
    }

    /// Starts the accept loops of a pod.
    pub fn serve(&self, pod: PodContext, listeners: PodListeners) -> PodHandle {
        let pod = Arc::new(pod);
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
                tasks.spawn(
                    accept_loop(self.clone(), Arc::clone(&pod), direction, listener)
                        .instrument(span),
                );
            }
        }
        PodHandle { tasks, addresses }
    }

    fn pick_endpoint(&self) -> usize {
        self.inner.next_endpoint.fetch_add(1, Ordering::Relaxed)
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
    listener: TcpListener,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // EMFILE/ENFILE/ENOBUFS: back off instead of spinning; the kernel keeps
                // the backlog meanwhile.
                warn!(component = "proxy", error = %e, "accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        if let Err(e) = stream.set_nodelay(true) {
            debug!(component = "proxy", error = %e, "cannot set TCP_NODELAY");
        }
        let proxy = proxy.clone();
        let pod = Arc::clone(&pod);
        tokio::spawn(async move {
            match direction {
                Direction::Outbound => outbound::handle(&proxy, &pod, stream, peer).await,
                Direction::Inbound => inbound::handle(&proxy, &pod, stream, peer).await,
                Direction::Hbone => inbound::refuse_hbone(&proxy, &pod, stream, peer),
            }
        });
    }
}

/// Connect timeout toward upstreams: long enough for a busy node, short enough that an
/// application sees a reset rather than hanging.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
