//! The proxy's limits: per-pod and per-node caps on proxied connections, idle timeouts,
//! TCP keepalive on every proxy socket, and the HTTP/2 limits of HBONE. A pod can exhaust
//! its own budget, never the node's (DESIGN "Limits").
//!
//! A *connection* here is one socket the proxy accepted (15001, 15006, 15008) or one HBONE
//! CONNECT stream it serves; each holds at most two file descriptors (its own and the
//! upstream's). Every pod has two budgets of `pod_connections`: what its application opens
//! (outbound) and what comes into it (plaintext and HBONE), so that a flood aimed at a pod
//! never stops that pod from calling out, and the reverse. Both draw on the node's budget
//! of `node_connections`, which start-up lowers to what RLIMIT_NOFILE can hold.
//!
//! Over a cap the connection is refused at once (reset, or `503` for an HBONE stream),
//! counted in `agent_denied_connections_total{reason}` and logged at a limited rate.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use serde::Serialize;
use tracing::{info, warn};

use super::{Direction, Proxy};
use crate::{
    hbone::{self, InboundConnect, Refusal, ServerStream, StreamHandler, Tunnel},
    state::WorkloadRef,
};

/// The limits, from `agent.limits` (docs/config.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Config {
    /// Connections per pod and direction (outbound; inbound plaintext + HBONE).
    pub pod_connections: usize,
    /// Connections of all pods of the node together.
    pub node_connections: usize,
    /// No bytes either way for this long: both sides are closed.
    #[serde(with = "crate::settings::humantime_ms")]
    pub idle_timeout: Duration,
    /// TCP keepalive on every proxy socket: first probe after this much silence…
    #[serde(with = "crate::settings::humantime_ms")]
    pub keepalive_time: Duration,
    /// …then one probe per interval…
    #[serde(with = "crate::settings::humantime_ms")]
    pub keepalive_interval: Duration,
    /// …and the connection is dropped after this many unanswered probes.
    pub keepalive_retries: u32,
    pub hbone: hbone::Limits,
}

/// Why a connection was refused at a cap: the `reason` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exceeded {
    Pod,
    Node,
}

/// The node's budget, shared by every pod's.
#[derive(Debug)]
pub struct NodeBudget {
    limit: usize,
    used: AtomicUsize,
}

/// One pod's budget for one direction.
#[derive(Debug)]
pub struct PodBudget {
    node: Arc<NodeBudget>,
    limit: usize,
    used: AtomicUsize,
}

/// A connection's place in its pod's and the node's budgets; given back on drop.
#[derive(Debug)]
pub struct Permit {
    budget: Arc<PodBudget>,
}

/// A pod's HBONE `StreamHandler` whose streams each take a place in the pod's inbound
/// budget (each opens an upstream socket); over the cap a CONNECT is answered `503`.
pub struct Limited<H> {
    pub inner: H,
    pub budget: Arc<PodBudget>,
    pub proxy: Proxy,
    pub pod: WorkloadRef,
}

/// An accepted stream with its place in the budget, given back when it ends.
pub struct LimitedTunnel<T> {
    tunnel: T,
    _permit: Permit,
}

impl<H: StreamHandler> StreamHandler for Limited<H> {
    type Tunnel = LimitedTunnel<H::Tunnel>;

    async fn accept(&self, request: InboundConnect) -> Result<Self::Tunnel, Refusal> {
        let permit = self
            .proxy
            .admit_connection(&self.budget, &self.pod, Direction::Hbone, request.peer_addr)
            .ok_or(Refusal::Overloaded)?;
        let tunnel = self.inner.accept(request).await?;
        Ok(LimitedTunnel {
            tunnel,
            _permit: permit,
        })
    }

    fn handshake_refused(&self, error: &hbone::Error) {
        self.inner.handshake_refused(error);
    }
}

impl<T: Tunnel> Tunnel for LimitedTunnel<T> {
    async fn run(self, stream: ServerStream) {
        self.tunnel.run(stream).await;
    }

    fn abandon(self, error: std::io::Error) {
        self.tunnel.abandon(error);
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            pod_connections: 4_096,
            node_connections: 16_384,
            idle_timeout: Duration::from_secs(3_600),
            keepalive_time: Duration::from_secs(60),
            keepalive_interval: Duration::from_secs(15),
            keepalive_retries: 4,
            hbone: hbone::Limits::default(),
        }
    }
}

impl Config {
    /// TCP keepalive settings for a proxy socket.
    pub fn keepalive(&self) -> socket2::TcpKeepalive {
        socket2::TcpKeepalive::new()
            .with_time(self.keepalive_time)
            .with_interval(self.keepalive_interval)
            .with_retries(self.keepalive_retries)
    }
}

impl Exceeded {
    pub fn reason(self) -> &'static str {
        match self {
            Exceeded::Pod => "pod_connection_limit",
            Exceeded::Node => "node_connection_limit",
        }
    }
}

impl NodeBudget {
    /// The node's budget: `configured`, lowered so that `FDS_PER_CONNECTION` descriptors
    /// per connection plus `RESERVED_FDS` fit under the open-file limit `nofile`.
    pub fn new(configured: usize, nofile: u64) -> Arc<Self> {
        let fits = usize::try_from(nofile.saturating_sub(RESERVED_FDS) / FDS_PER_CONNECTION)
            .unwrap_or(usize::MAX);
        let limit = configured.min(fits);
        if limit < configured {
            warn!(
                component = "proxy",
                configured,
                limit,
                nofile,
                "agent.limits.nodeConnections lowered to fit the open-file limit (RLIMIT_NOFILE)"
            );
        } else {
            info!(component = "proxy", limit, nofile, "node connection limit");
        }
        Arc::new(Self {
            limit,
            used: AtomicUsize::new(0),
        })
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

impl PodBudget {
    pub fn new(node: &Arc<NodeBudget>, limit: usize) -> Arc<Self> {
        Arc::new(Self {
            node: Arc::clone(node),
            limit,
            used: AtomicUsize::new(0),
        })
    }

    /// Takes a place for one connection, or says which cap is reached.
    pub fn try_acquire(self: &Arc<Self>) -> Result<Permit, Exceeded> {
        if !take(&self.used, self.limit) {
            return Err(Exceeded::Pod);
        }
        if !take(&self.node.used, self.node.limit) {
            self.used.fetch_sub(1, Ordering::Relaxed);
            return Err(Exceeded::Node);
        }
        Ok(Permit {
            budget: Arc::clone(self),
        })
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(1, Ordering::Relaxed);
        self.budget.node.used.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Increments `used` unless it is at `limit`.
fn take(used: &AtomicUsize, limit: usize) -> bool {
    used.fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
        (n < limit).then_some(n + 1)
    })
    .is_ok()
}

/// Raises the soft open-file limit to the hard one (a node proxy needs many) and returns
/// the limit in force.
pub fn raise_nofile_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(e) => {
                warn!(component = "proxy", soft, hard, error = %e, "cannot raise the open-file limit");
                soft
            }
        },
        Ok((soft, _)) => soft,
        Err(e) => {
            warn!(component = "proxy", error = %e, "cannot read the open-file limit");
            DEFAULT_NOFILE
        }
    }
}

/// A proxied connection holds its own socket and the upstream's and, between two TCP
/// sockets once bytes move, a pipe (two descriptors) per direction (`copy`'s splice).
const FDS_PER_CONNECTION: u64 = 6;
/// Descriptors kept out of the connection budget: listeners (three or six per pod), the
/// HBONE pool's connections, eBPF maps and links, certificates, the admin servers, and
/// `copy`'s spare pipes (128 descriptors at most).
const RESERVED_FDS: u64 = 1_024;
/// Assumed when the limit cannot be read: the usual soft default.
const DEFAULT_NOFILE: u64 = 1_024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_cannot_take_more_than_its_budget_and_gets_it_back() {
        let node = NodeBudget::new(10, 1_000_000);
        let pod = PodBudget::new(&node, 2);
        let a = pod.try_acquire().unwrap();
        let _b = pod.try_acquire().unwrap();
        assert_eq!(pod.try_acquire().unwrap_err(), Exceeded::Pod);
        drop(a);
        let _c = pod.try_acquire().unwrap();
        assert_eq!(node.used(), 2);
    }

    #[test]
    fn the_node_budget_caps_all_pods_together() {
        let node = NodeBudget::new(3, 1_000_000);
        let (p1, p2) = (PodBudget::new(&node, 2), PodBudget::new(&node, 2));
        let _held = [p1.try_acquire().unwrap(), p1.try_acquire().unwrap()];
        let _one = p2.try_acquire().unwrap();
        assert_eq!(p2.try_acquire().unwrap_err(), Exceeded::Node);
        assert_eq!(p2.used(), 1, "a refusal takes nothing");
    }

    #[test]
    fn the_node_budget_fits_the_open_file_limit() {
        assert_eq!(
            NodeBudget::new(16_384, 20_000).limit(),
            (20_000 - 1_024) / 6
        );
        assert_eq!(NodeBudget::new(100, 20_000).limit(), 100);
        assert_eq!(NodeBudget::new(100, 10).limit(), 0);
    }
}
