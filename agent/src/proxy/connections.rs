//! The proxy's own record of its connections: the active ones, the last closed ones (for
//! `/debug/connections`), totals by outcome, and one access-log line per connection.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::SocketAddr,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use serde::Serialize;
use tracing::info;

use super::Error;

/// Which listener a connection came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// From the pod's application, steered by connect4/6 (15001).
    Outbound,
    /// Plaintext toward the pod's application, steered by sk_lookup (15006).
    Inbound,
    /// HBONE toward the pod (15008).
    Hbone,
}

/// Registry of connections.
#[derive(Debug, Default)]
pub struct Connections {
    next_id: AtomicU64,
    inner: Mutex<Registry>,
}

/// One connection while it is open. Byte counters are updated by the copy loop.
#[derive(Debug)]
pub struct Tracked {
    pub id: u64,
    pub direction: Direction,
    pub pod: String,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub upstream: Mutex<Option<SocketAddr>>,
    pub service: Mutex<Option<String>>,
    /// SPIFFE ids of both ends, once mutual TLS has proven them (None: plaintext hop).
    identities: Mutex<Identities>,
    /// Application → upstream.
    pub sent: AtomicU64,
    /// Upstream → application.
    pub received: AtomicU64,
    start_unix_ms: u64,
    started: Instant,
}

/// A connection as `/debug/connections` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct ConnectionView {
    pub id: u64,
    pub direction: Direction,
    pub pod: String,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub upstream: Option<SocketAddr>,
    pub service: Option<String>,
    #[serde(rename = "src.identity")]
    pub src_identity: Option<String>,
    #[serde(rename = "dst.identity")]
    pub dst_identity: Option<String>,
    pub start_unix_ms: u64,
    pub duration_ms: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub error: Option<&'static str>,
}

/// Snapshot of the registry.
#[derive(Debug, Serialize)]
pub struct ConnectionsView {
    pub active: Vec<ConnectionView>,
    pub recent: Vec<ConnectionView>,
    /// Closed connections by outcome (`ok` or an error reason).
    pub closed_total: BTreeMap<&'static str, u64>,
}

/// Identities of the two ends of a connection.
#[derive(Clone, Debug, Default)]
struct Identities {
    src: Option<String>,
    dst: Option<String>,
}

#[derive(Debug, Default)]
struct Registry {
    active: HashMap<u64, Arc<Tracked>>,
    recent: VecDeque<ConnectionView>,
    closed_total: BTreeMap<&'static str, u64>,
}

impl Connections {
    /// Records a new connection.
    pub fn open(
        &self,
        direction: Direction,
        pod: String,
        src: SocketAddr,
        dst: SocketAddr,
    ) -> Arc<Tracked> {
        let tracked = Arc::new(Tracked {
            id: self.next_id.fetch_add(1, Ordering::Relaxed) + 1,
            direction,
            pod,
            src,
            dst,
            upstream: Mutex::new(None),
            service: Mutex::new(None),
            identities: Mutex::default(),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            start_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            started: Instant::now(),
        });
        self.lock().active.insert(tracked.id, Arc::clone(&tracked));
        tracked
    }

    /// Records the end of a connection and writes its access-log line.
    pub fn close(&self, tracked: &Tracked, error: Option<&Error>) {
        let view = tracked.view(error.map(Error::reason));
        match error {
            None => info!(target: "weft::access", component = "proxy",
                id = view.id, direction = ?view.direction, pod = %view.pod,
                src = %view.src, dst = %view.dst, upstream = ?view.upstream,
                service = ?view.service, src.identity = ?view.src_identity,
                dst.identity = ?view.dst_identity, bytes_sent = view.bytes_sent,
                bytes_received = view.bytes_received, duration_ms = view.duration_ms,
                "connection closed"),
            Some(e) => info!(target: "weft::access", component = "proxy",
                id = view.id, direction = ?view.direction, pod = %view.pod,
                src = %view.src, dst = %view.dst, upstream = ?view.upstream,
                service = ?view.service, src.identity = ?view.src_identity,
                dst.identity = ?view.dst_identity, bytes_sent = view.bytes_sent,
                bytes_received = view.bytes_received, duration_ms = view.duration_ms,
                error = e.reason(), detail = %e, "connection failed"),
        }
        let mut registry = self.lock();
        registry.active.remove(&tracked.id);
        *registry
            .closed_total
            .entry(view.error.unwrap_or("ok"))
            .or_default() += 1;
        if registry.recent.len() == RECENT {
            registry.recent.pop_front();
        }
        registry.recent.push_back(view);
    }

    pub fn view(&self) -> ConnectionsView {
        let registry = self.lock();
        let mut active: Vec<_> = registry.active.values().map(|t| t.view(None)).collect();
        active.sort_by_key(|c| c.id);
        ConnectionsView {
            active,
            recent: registry.recent.iter().cloned().collect(),
            closed_total: registry.closed_total.clone(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Tracked {
    pub fn set_upstream(&self, upstream: SocketAddr, service: Option<String>) {
        *self.upstream.lock().unwrap_or_else(PoisonError::into_inner) = Some(upstream);
        *self.service.lock().unwrap_or_else(PoisonError::into_inner) = service;
    }

    /// Records the identities mutual TLS proved (either may be unknown, e.g. a plaintext
    /// client of a PERMISSIVE pod).
    pub fn set_identities(&self, src: Option<String>, dst: Option<String>) {
        *self
            .identities
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Identities { src, dst };
    }

    fn view(&self, error: Option<&'static str>) -> ConnectionView {
        let identities = self
            .identities
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        ConnectionView {
            id: self.id,
            direction: self.direction,
            pod: self.pod.clone(),
            src: self.src,
            dst: self.dst,
            upstream: *self.upstream.lock().unwrap_or_else(PoisonError::into_inner),
            service: self
                .service
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
            src_identity: identities.src,
            dst_identity: identities.dst,
            start_unix_ms: self.start_unix_ms,
            duration_ms: self.started.elapsed().as_millis() as u64,
            bytes_sent: self.sent.load(Ordering::Relaxed),
            bytes_received: self.received.load(Ordering::Relaxed),
            error,
        }
    }
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
            Direction::Hbone => "hbone",
        }
    }
}

/// Closed connections kept for `/debug/connections`.
const RECENT: usize = 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closed_connections_move_to_recent_with_their_outcome() {
        let registry = Connections::default();
        let a = registry.open(
            Direction::Outbound,
            "default/client".into(),
            "127.0.0.1:40000".parse().unwrap(),
            "10.1.0.3:80".parse().unwrap(),
        );
        let b = registry.open(
            Direction::Inbound,
            "default/server".into(),
            "10.1.0.2:40001".parse().unwrap(),
            "10.1.0.3:80".parse().unwrap(),
        );
        a.sent.store(5, Ordering::Relaxed);
        registry.close(&a, None);
        registry.close(&b, Some(&Error::NoOrigDst));
        let view = registry.view();
        assert!(view.active.is_empty());
        assert_eq!(view.recent.len(), 2);
        assert_eq!(view.recent[0].bytes_sent, 5);
        assert_eq!(view.recent[1].error, Some("no_orig_dst"));
        assert_eq!(view.closed_total["ok"], 1);
        assert_eq!(view.closed_total["no_orig_dst"], 1);
    }

    #[test]
    fn recent_is_bounded() {
        let registry = Connections::default();
        for _ in 0..RECENT + 10 {
            let c = registry.open(
                Direction::Outbound,
                "p".into(),
                "127.0.0.1:1".parse().unwrap(),
                "10.0.0.1:1".parse().unwrap(),
            );
            registry.close(&c, None);
        }
        assert_eq!(registry.view().recent.len(), RECENT);
    }
}
