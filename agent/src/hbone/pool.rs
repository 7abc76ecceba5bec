//! The HBONE connection pool: one TLS + HTTP/2 connection per (source identity,
//! destination identity, destination address) carries many CONNECT streams.
//!
//! - A new connection is opened when none has room (ours and the peer's stream limit).
//! - Concurrent first connects to one key share one handshake (single flight).
//! - A connection with no streams for `idle_timeout` is closed; a broken one is dropped
//!   from the pool and never reused.
//! - After the source identity's certificate rotates, a connection opened with the old
//!   one takes no new streams; its open streams finish normally, then it closes.

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::IpAddr,
    net::SocketAddr,
    sync::{
        Arc, Weak,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use serde::Serialize;
use tokio::{net::TcpStream, time::Instant};
use tracing::debug;

use super::{
    Error, Limits, Role,
    client::{self, ConnectRequest, Connection, HboneStream, Lease, TlsIo},
};
use crate::{
    identity::{CertSource, SpiffeId},
    sync::{Mutex, MutexGuard},
};

/// Which connections a stream may share.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    /// The identity we prove (the source pod's).
    pub source: SpiffeId,
    /// The identity the peer must prove.
    pub destination: SpiffeId,
    /// The peer's HBONE address (`<pod ip>:15008`).
    pub address: SocketAddr,
    /// The source pod's address. Connections are dialled from inside one pod, so two pods
    /// with the same identity never share one: the peer sees (and its policy judges) the
    /// real source address of every stream.
    pub local: IpAddr,
}

/// Pool settings.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct PoolConfig {
    /// A connection without streams for this long is closed.
    #[serde(with = "as_humantime")]
    pub idle_timeout: Duration,
    /// Streams per connection before another connection is opened (the peer's
    /// SETTINGS_MAX_CONCURRENT_STREAMS applies too, when lower).
    pub max_streams_per_connection: usize,
    /// TCP connect + TLS handshake.
    #[serde(with = "as_humantime")]
    pub handshake_timeout: Duration,
    /// CONNECT sent → response; the peer answers once it reached the upstream.
    #[serde(with = "as_humantime")]
    pub response_timeout: Duration,
    /// HTTP/2 limits and PING keepalive of the pooled connections.
    pub http2: Limits,
}

/// What the pool holds, for status and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PoolStats {
    /// Connections established and not yet closed (pooled or draining).
    pub connections: usize,
    /// Streams open.
    pub streams: usize,
    /// TLS handshakes completed since start.
    pub handshakes: u64,
    /// TLS handshakes (or dials) that failed since start.
    pub handshake_failures: u64,
}

/// The client side of HBONE for the whole node.
#[derive(Clone)]
pub struct Pool {
    shared: Arc<Shared>,
}

struct Shared {
    certs: Arc<dyn CertSource>,
    config: PoolConfig,
    entries: Mutex<HashMap<Key, Entry>>,
    next_id: AtomicU64,
    connections: AtomicUsize,
    streams: Arc<AtomicUsize>,
    handshakes: AtomicU64,
    handshake_failures: AtomicU64,
}

struct Failure {
    at: Instant,
    reason: &'static str,
    message: String,
}

#[derive(Default)]
struct Entry {
    connections: Vec<Arc<Connection>>,
    /// Held while a connection for this key is being established (single flight); keeps
    /// the last failure so that connects queued behind it fail with it instead of each
    /// waiting out their own handshake timeout.
    dialing: Arc<tokio::sync::Mutex<Option<Failure>>>,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(60),
            max_streams_per_connection: 100,
            handshake_timeout: Duration::from_secs(10),
            response_timeout: Duration::from_secs(30),
            http2: Limits::default(),
        }
    }
}

impl Pool {
    pub fn new(certs: Arc<dyn CertSource>, config: PoolConfig) -> Self {
        Self {
            shared: Arc::new(Shared {
                certs,
                config,
                entries: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(0),
                connections: AtomicUsize::new(0),
                streams: Arc::new(AtomicUsize::new(0)),
                handshakes: AtomicU64::new(0),
                handshake_failures: AtomicU64::new(0),
            }),
        }
    }

    /// Opens a CONNECT stream to `request.target` through the peer at `key.address`,
    /// reusing a pooled connection when one has room. `dial` is called only when a new
    /// connection is needed; it creates the TCP connection (inside the source pod's
    /// network namespace — the pool never creates sockets). A CONNECT the peer did not
    /// process (it is going away: `Error::unprocessed`) goes once more, on another
    /// connection: during an upgrade, the new agent's.
    pub async fn connect<F, Fut>(
        &self,
        key: Key,
        dial: F,
        request: ConnectRequest,
    ) -> Result<HboneStream, Error>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = io::Result<TcpStream>>,
    {
        let timeout = self.shared.config.response_timeout;
        let lease = self.lease(&key, &dial).await?;
        let connection = Arc::clone(&lease.connection);
        match lease.open(&request, timeout).await {
            Err(e) if e.unprocessed() => {
                connection.retire();
                debug!(component = "hbone", dst = %key.address, error = %e,
                    "the peer did not process the CONNECT (it is going away); sending it again on another connection");
                self.lease(&key, &dial).await?.open(&request, timeout).await
            }
            opened => opened,
        }
    }

    /// A stream slot for `key`: on a pooled connection with room, or on a new one (one
    /// dial at a time per key; those waiting share its failure).
    async fn lease<F, Fut>(&self, key: &Key, dial: F) -> Result<Lease, Error>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = io::Result<TcpStream>>,
    {
        let shared = &self.shared;
        // Fail closed: without our own certificate there is nothing to prove.
        let cert = shared
            .certs
            .certificate(&key.source)
            .ok_or_else(|| Error::NoCertificate(key.source.clone()))?;
        if let Some(lease) = shared.checkout(key, &cert.serial) {
            return Ok(lease);
        }
        let queued_at = Instant::now();
        let dialing = shared.dialing(key);
        let mut single_flight = dialing.lock().await;
        if let Some(failure) = single_flight.as_ref().filter(|f| f.at >= queued_at) {
            return Err(Error::ConcurrentConnectFailed {
                reason: failure.reason,
                message: failure.message.clone(),
            });
        }
        if let Some(lease) = shared.checkout(key, &cert.serial) {
            return Ok(lease);
        }
        match self.establish(key, dial, cert.serial.clone()).await {
            Ok(lease) => {
                *single_flight = None;
                Ok(lease)
            }
            Err(e) => {
                *single_flight = Some(Failure {
                    at: Instant::now(),
                    reason: e.reason(),
                    message: e.to_string(),
                });
                Err(e)
            }
        }
    }

    pub fn stats(&self) -> PoolStats {
        let shared = &self.shared;
        PoolStats {
            connections: shared.connections.load(Ordering::Relaxed),
            streams: shared.streams.load(Ordering::Relaxed),
            handshakes: shared.handshakes.load(Ordering::Relaxed),
            handshake_failures: shared.handshake_failures.load(Ordering::Relaxed),
        }
    }

    pub fn config(&self) -> &PoolConfig {
        &self.shared.config
    }

    async fn establish<F, Fut>(&self, key: &Key, dial: F, serial: String) -> Result<Lease, Error>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = io::Result<TcpStream>>,
    {
        let shared = &self.shared;
        let timeout = shared.config.handshake_timeout;
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let attempt = async {
            let tcp = tokio::time::timeout(timeout, dial())
                .await
                .map_err(|_| Error::HandshakeTimeout(key.address))?
                .map_err(|source| Error::Dial {
                    addr: key.address,
                    source,
                })?;
            let http2 = &shared.config.http2;
            client::handshake(
                Arc::clone(&shared.certs),
                key,
                tcp,
                serial,
                id,
                timeout,
                http2,
            )
            .await
        };
        let established = match attempt.await {
            Ok(established) => established,
            Err(e) => {
                shared.handshake_failures.fetch_add(1, Ordering::Relaxed);
                crate::warn_limited!(
                    component = "hbone",
                    dst = %key.address,
                    src.identity = %key.source,
                    dst.identity = %key.destination,
                    reason = e.reason(),
                    error = %e,
                    "HBONE connection failed"
                );
                return Err(e);
            }
        };
        shared.handshakes.fetch_add(1, Ordering::Relaxed);
        shared.connections.fetch_add(1, Ordering::Relaxed);
        debug!(component = "hbone", dst = %key.address, dst.identity = %key.destination, connection = id, "HBONE connection established");
        let connection = established.connection;
        let lease = {
            let mut entries = shared.lock();
            entries
                .entry(key.clone())
                .or_default()
                .connections
                .push(Arc::clone(&connection));
            connection.lease(&shared.streams)
        };
        tokio::spawn(drive(
            Arc::downgrade(shared),
            key.clone(),
            connection,
            established.driver,
            shared.config.idle_timeout,
            shared.config.http2,
        ));
        Ok(lease)
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, HashMap<Key, Entry>> {
        self.entries.lock()
    }

    /// A stream slot on a pooled connection with room, if there is one. Connections opened
    /// with another certificate than `serial` are retired on the way.
    fn checkout(&self, key: &Key, serial: &str) -> Option<Lease> {
        let mut entries = self.lock();
        let entry = entries.get_mut(key)?;
        entry.connections.retain(|connection| {
            if connection.serial != serial {
                connection.retire();
            }
            !connection.is_retired()
        });
        let max = self.config.max_streams_per_connection;
        let connection = entry.connections.iter().find(|c| c.has_room(max))?;
        Some(connection.lease(&self.streams))
    }

    fn dialing(&self, key: &Key) -> Arc<tokio::sync::Mutex<Option<Failure>>> {
        Arc::clone(&self.lock().entry(key.clone()).or_default().dialing)
    }

    /// Removes `connection` from the pool if it has no streams and is retired or idle for
    /// long enough; true if it should close. Under the pool lock, so no stream can be
    /// leased between the check and the removal.
    fn close_if_idle(&self, key: &Key, connection: &Arc<Connection>, idle: Duration) -> bool {
        let mut entries = self.lock();
        let idle_out = Instant::now() >= connection.idle_deadline(idle);
        if connection.streams() > 0 || !(connection.is_retired() || idle_out) {
            return false;
        }
        connection.retire();
        remove(&mut entries, key, connection);
        true
    }

    fn closed(&self, key: &Key, connection: &Arc<Connection>) {
        remove(&mut self.lock(), key, connection);
        self.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

fn remove(entries: &mut HashMap<Key, Entry>, key: &Key, connection: &Arc<Connection>) {
    if let Some(entry) = entries.get_mut(key) {
        entry.connections.retain(|c| !Arc::ptr_eq(c, connection));
        // Forget the key once nothing uses it (nobody dialing either).
        if entry.connections.is_empty() && Arc::strong_count(&entry.dialing) == 1 {
            entries.remove(key);
        }
    }
}

/// Drives one connection until it fails, or closes it once idle or retired and empty.
async fn drive(
    pool: Weak<Shared>,
    key: Key,
    connection: Arc<Connection>,
    mut driver: h2::client::Connection<TlsIo, Bytes>,
    idle_timeout: Duration,
    http2: Limits,
) {
    // A peer that vanished without a FIN or RST is found by PING, not only by TCP
    // keepalive, which takes minutes.
    let keepalive = super::keepalive(driver.ping_pong(), http2.ping_interval, http2.ping_timeout);
    tokio::pin!(driver);
    tokio::pin!(keepalive);
    let outcome = loop {
        let deadline = connection.idle_deadline(idle_timeout);
        let idle = connection.streams() == 0;
        tokio::select! {
            result = &mut driver => break result.map_err(|e| Error::from_h2(e, connection.tls_error(), Role::Server)),
            e = &mut keepalive => break Err(e),
            () = tokio::time::sleep_until(deadline), if idle => {}
            () = connection.wake.notified() => {}
        }
        let Some(pool) = pool.upgrade() else {
            // The pool is gone; close once the last stream is done.
            if connection.streams() == 0 {
                break Ok(());
            }
            continue;
        };
        if pool.close_if_idle(&key, &connection, idle_timeout) {
            break Ok(());
        }
    };
    // Dropping the driver closes the socket; a failed connection never takes new streams.
    connection.retire();
    match &outcome {
        Ok(()) => {
            debug!(component = "hbone", dst = %key.address, connection = connection.id, "HBONE connection closed");
        }
        // A TLS failure after the handshake is the server refusing our certificate (TLS
        // 1.3 clients finish first): as loud as a refused handshake.
        Err(e) if connection.tls_error().is_some() => {
            crate::warn_limited!(component = "hbone", dst = %key.address, src.identity = %key.source, dst.identity = %key.destination, reason = e.reason(), error = %e, "HBONE connection refused by the peer");
        }
        Err(e) => {
            debug!(component = "hbone", dst = %key.address, connection = connection.id, reason = e.reason(), error = %e, "HBONE connection failed");
        }
    }
    if let Some(pool) = pool.upgrade() {
        pool.closed(&key, &connection);
    }
}

/// `Duration` as humantime text in the config dump.
mod as_humantime {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }
}
