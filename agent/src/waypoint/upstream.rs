//! HTTP client connections to backend pods, each over one HBONE CONNECT stream (through
//! `hbone::Pool`, which shares TLS connections), pooled by (endpoint, identity, protocol):
//! HTTP/2 connections are multiplexed, HTTP/1.1 connections are reused once their last
//! response has been read (keep-alive). Connections unused for the idle timeout close.
//!
//! Every connection holds a place under its Service's `maxConnections` (`breaker`). A
//! request that needs a new connection when they are all taken closes an idle one of the
//! same Service (to another endpoint), or waits for one to be released, or, when
//! `maxPendingRequests` are waiting already, is refused.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::{Ipv4Addr, SocketAddr},
    pin::Pin,
    sync::{Arc, Weak},
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::{
    Request, Response,
    body::{Body, Frame, Incoming, SizeHint},
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{net::TcpStream, time::Instant};
use tracing::debug;

use super::{
    Error,
    backend::Endpoint,
    breaker::{Breaker, Permit},
};
use crate::{
    state::WorkloadRef,
    sync::Mutex,
    {hbone, identity::SpiffeId},
};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Every body the waypoint sends, either way.
pub type BoxBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// The HTTP version spoken to a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    Http1,
    Http2,
}

/// The pool of backend connections. Cheap to clone.
#[derive(Clone)]
pub struct Upstreams {
    inner: Arc<Inner>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    endpoint: SocketAddr,
    identity: SpiffeId,
    protocol: Protocol,
    /// The Service whose `maxConnections` the connection counts against.
    service: WorkloadRef,
}

struct Inner {
    hbone: hbone::Pool,
    source: SpiffeId,
    hbone_port: u16,
    idle_timeout: Duration,
    http1: Mutex<HashMap<Key, Vec<IdleHttp1>>>,
    /// One multiplexed connection per key; the async lock makes concurrent first requests
    /// share one handshake.
    http2: Mutex<HashMap<Key, Arc<tokio::sync::Mutex<Option<H2Entry>>>>>,
}

/// An HTTP/1.1 connection waiting for its next request, and since when.
type IdleHttp1 = (Http1Conn, Instant);

/// An HTTP/1.1 connection, its place under `maxConnections`, and the requests it carried.
struct Http1Conn {
    sender: http1::SendRequest<BoxBody>,
    permit: Permit,
    served: u32,
}

struct H2Entry {
    sender: http2::SendRequest<BoxBody>,
    last_used: Instant,
    /// Dropped (the place given back) when the entry is: a connection retired by
    /// `maxRequestsPerConnection` stops counting while its last requests finish.
    _permit: Permit,
    served: u32,
}

/// A connection for a request: one to reuse, or the permit to open one.
enum Checkout<T> {
    Reuse(T),
    Open(Permit),
}

impl Upstreams {
    /// Needs a tokio runtime (it spawns the idle sweeper).
    pub fn new(
        hbone: hbone::Pool,
        source: SpiffeId,
        hbone_port: u16,
        idle_timeout: Duration,
    ) -> Self {
        let inner = Arc::new(Inner {
            hbone,
            source,
            hbone_port,
            idle_timeout,
            http1: Mutex::new(HashMap::new()),
            http2: Mutex::new(HashMap::new()),
        });
        tokio::spawn(sweep(Arc::downgrade(&inner)));
        Self { inner }
    }

    /// Sends `request` to `endpoint`, on a pooled connection or a new one, within the
    /// connection limits of `breaker` (the endpoint's Service's).
    pub async fn send(
        &self,
        endpoint: &Endpoint,
        protocol: Protocol,
        request: Request<BoxBody>,
        breaker: &Arc<Breaker>,
    ) -> Result<Response<BoxBody>, Error> {
        let key = Key {
            endpoint: endpoint.addr,
            identity: endpoint.identity.clone(),
            protocol,
            service: breaker.service().clone(),
        };
        match protocol {
            Protocol::Http2 => {
                let (mut sender, reused) = self.http2_sender(&key, breaker).await?;
                let response = match sender.try_send_request(request).await {
                    Ok(response) => response,
                    Err(mut e) => match e.take_message() {
                        // A pooled connection that closed before the request went out
                        // (the backend went away while idle): once more on a new one.
                        Some(request) if reused => {
                            self.forget_http2(&key).await;
                            let (mut sender, _) = self.http2_sender(&key, breaker).await?;
                            sender
                                .send_request(request)
                                .await
                                .map_err(Error::Upstream)?
                        }
                        _ => return Err(Error::Upstream(e.into_error())),
                    },
                };
                Ok(response.map(|body| body.map_err(BoxError::from).boxed_unsync()))
            }
            Protocol::Http1 => {
                let checkout = self.checkout(breaker, || self.idle_http1(&key)).await?;
                let (mut conn, response) = match checkout {
                    Checkout::Reuse(mut conn) => {
                        match conn.sender.try_send_request(request).await {
                            Ok(response) => (conn, response),
                            Err(mut e) => match e.take_message() {
                                // As above: an idle keep-alive connection the backend closed.
                                // Its place goes to the new one.
                                Some(request) => {
                                    self.send_http1_fresh(&key, conn.permit, request).await?
                                }
                                None => return Err(Error::Upstream(e.into_error())),
                            },
                        }
                    }
                    Checkout::Open(permit) => self.send_http1_fresh(&key, permit, request).await?,
                };
                conn.served += 1;
                let pool = Arc::downgrade(&self.inner);
                Ok(response.map(|body| {
                    KeepAlive {
                        body,
                        conn: Some(conn),
                        pool,
                        key,
                    }
                    .boxed_unsync()
                }))
            }
        }
    }

    /// A connection to reuse (`reuse`), else a place for a new one: taken from the limit,
    /// or from an idle HTTP/1.1 connection of the same Service, which is closed; else the
    /// request waits, if `maxPendingRequests` allows, for a connection to be released.
    async fn checkout<T>(
        &self,
        breaker: &Arc<Breaker>,
        mut reuse: impl FnMut() -> Option<T>,
    ) -> Result<Checkout<T>, Error> {
        let mut waiting: Option<Permit> = None;
        loop {
            let released = breaker.released();
            tokio::pin!(released);
            // Enabled before looking, so a release between the look and the wait counts.
            released.as_mut().enable();
            if let Some(conn) = reuse() {
                return Ok(Checkout::Reuse(conn));
            }
            if let Some(permit) = breaker.try_connection() {
                return Ok(Checkout::Open(permit));
            }
            if self.close_idle_http1(breaker) {
                continue;
            }
            if waiting.is_none() {
                waiting = Some(breaker.try_pending().map_err(Error::Overflow)?);
            }
            released.await;
        }
    }

    /// Closes one idle HTTP/1.1 connection counted against `breaker`, if there is one.
    fn close_idle_http1(&self, breaker: &Arc<Breaker>) -> bool {
        let mut pool = self.inner.http1.lock();
        let closed = pool
            .values_mut()
            .find_map(|idle| {
                let i = idle.iter().position(|(c, _)| c.permit.is_of(breaker))?;
                Some(idle.swap_remove(i))
            })
            .is_some();
        pool.retain(|_, idle| !idle.is_empty());
        closed
    }

    /// Sends on a new HTTP/1.1 connection, which holds `permit`; the connection goes back
    /// to the pool with the body.
    async fn send_http1_fresh(
        &self,
        key: &Key,
        permit: Permit,
        request: Request<BoxBody>,
    ) -> Result<(Http1Conn, Response<Incoming>), Error> {
        let mut sender = self.dial_http1(key).await?;
        let response = sender
            .send_request(request)
            .await
            .map_err(Error::Upstream)?;
        let conn = Http1Conn {
            sender,
            permit,
            served: 0,
        };
        Ok((conn, response))
    }

    fn idle_http1(&self, key: &Key) -> Option<Http1Conn> {
        let mut pool = self.inner.http1.lock();
        let idle = pool.get_mut(key)?;
        while let Some((conn, since)) = idle.pop() {
            if conn.sender.is_ready() && since.elapsed() < self.inner.idle_timeout {
                return Some(conn);
            }
        }
        None
    }

    async fn dial_http1(&self, key: &Key) -> Result<http1::SendRequest<BoxBody>, Error> {
        let stream = self.connect(key).await?;
        let (sender, connection) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(Error::Handshake)?;
        drive(connection, key.endpoint, "HTTP/1.1");
        Ok(sender)
    }

    /// The multiplexed connection for `key`, and whether it was pooled already.
    async fn http2_sender(
        &self,
        key: &Key,
        breaker: &Arc<Breaker>,
    ) -> Result<(http2::SendRequest<BoxBody>, bool), Error> {
        let slot = Arc::clone(self.inner.http2.lock().entry(key.clone()).or_default());
        let mut slot = slot.lock().await;
        if let Some(entry) = slot.as_mut().filter(|e| !e.sender.is_closed()) {
            entry.last_used = Instant::now();
            entry.served += 1;
            let sender = entry.sender.clone();
            if breaker
                .requests_per_connection()
                .is_some_and(|max| entry.served >= max)
            {
                // Retired: the next request opens a new connection.
                *slot = None;
            }
            return Ok((sender, true));
        }
        // A closed connection gives its place back before a new one asks for it.
        *slot = None;
        let permit = match self.checkout(breaker, || None::<Infallible>).await? {
            Checkout::Reuse(never) => match never {},
            Checkout::Open(permit) => permit,
        };
        let stream = self.connect(key).await?;
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .adaptive_window(true)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(Error::Handshake)?;
        drive(connection, key.endpoint, "HTTP/2");
        let retired = breaker.requests_per_connection() == Some(1);
        *slot = (!retired).then(|| H2Entry {
            sender: sender.clone(),
            last_used: Instant::now(),
            _permit: permit,
            served: 1,
        });
        Ok((sender, false))
    }

    /// Drops the pooled connection of `key` (it failed).
    async fn forget_http2(&self, key: &Key) {
        let slot = self.inner.http2.lock().get(key).map(Arc::clone);
        if let Some(slot) = slot {
            *slot.lock().await = None;
        }
    }

    /// One HBONE stream to the endpoint's pod, as the waypoint's identity.
    async fn connect(&self, key: &Key) -> Result<hbone::HboneStream, Error> {
        // The stream carries many clients' requests: the waypoint is its source.
        let source = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0));
        self.stream(key.endpoint, &key.identity, source).await
    }

    /// One HBONE stream to `endpoint` for one client's bytes (a gateway's passthrough):
    /// `client` is said in the CONNECT's `forwarded`.
    pub async fn tunnel(
        &self,
        endpoint: &Endpoint,
        client: SocketAddr,
    ) -> Result<hbone::HboneStream, Error> {
        self.stream(endpoint.addr, &endpoint.identity, client).await
    }

    async fn stream(
        &self,
        endpoint: SocketAddr,
        identity: &SpiffeId,
        source: SocketAddr,
    ) -> Result<hbone::HboneStream, Error> {
        let inner = &self.inner;
        let address = SocketAddr::new(endpoint.ip(), inner.hbone_port);
        let pool_key = hbone::Key {
            source: inner.source.clone(),
            destination: identity.clone(),
            address,
            local: Ipv4Addr::UNSPECIFIED.into(),
        };
        let request = hbone::ConnectRequest {
            target: endpoint,
            source,
            baggage: None,
            traceparent: None,
        };
        Ok(inner
            .hbone
            .connect(pool_key, move || dial(address), request)
            .await?)
    }
}

/// Runs a backend HTTP connection until it ends; its failure concerns only the requests
/// on it, which see it themselves.
fn drive(
    connection: impl Future<Output = hyper::Result<()>> + Send + 'static,
    endpoint: SocketAddr,
    protocol: &'static str,
) {
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            debug!(component = "waypoint", upstream = %endpoint, protocol, error = %e, "backend connection failed");
        }
    });
}

/// A TCP connection to a backend's HBONE port, with small writes sent at once: every
/// request and response crosses it as a few small HTTP/2 frames.
async fn dial(address: SocketAddr) -> std::io::Result<TcpStream> {
    let stream = TcpStream::connect(address).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// A backend's HTTP/1.1 response body; once it has been read to its end, the connection
/// goes back to the pool.
struct KeepAlive {
    body: Incoming,
    conn: Option<Http1Conn>,
    pool: Weak<Inner>,
    key: Key,
}

impl KeepAlive {
    /// Back to the pool, unless it carried `maxRequestsPerConnection` (then it closes).
    fn release(&mut self) {
        let (Some(conn), Some(pool)) = (self.conn.take(), self.pool.upgrade()) else {
            return;
        };
        let breaker = conn.permit.breaker();
        if breaker
            .requests_per_connection()
            .is_some_and(|max| conn.served >= max)
        {
            return;
        }
        let breaker = Arc::clone(breaker);
        pool.http1
            .lock()
            .entry(self.key.clone())
            .or_default()
            .push((conn, Instant::now()));
        breaker.connection_idle();
    }
}

impl Body for KeepAlive {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.release(),
            Poll::Ready(Some(Err(_))) => self.conn = None,
            _ => {}
        }
        polled.map_err(BoxError::from)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        // Read to the end (an empty body may never be polled): reusable.
        if self.body.is_end_stream() {
            self.release();
        }
    }
}

/// Closes idle connections every half idle timeout, until the pool is gone.
async fn sweep(pool: Weak<Inner>) {
    let period = match pool.upgrade() {
        Some(pool) => (pool.idle_timeout / 2).max(Duration::from_millis(10)),
        None => return,
    };
    loop {
        tokio::time::sleep(period).await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        let idle = pool.idle_timeout;
        pool.http1.lock().retain(|_, senders| {
            senders.retain(|(conn, since)| !conn.sender.is_closed() && since.elapsed() < idle);
            !senders.is_empty()
        });
        pool.http2.lock().retain(|_, slot| match slot.try_lock() {
            Ok(mut entry) => {
                let keep = entry
                    .as_ref()
                    .is_some_and(|e| !e.sender.is_closed() && e.last_used.elapsed() < idle);
                if !keep {
                    // In-flight requests hold their own handle: dropping ours closes the
                    // connection only once they are done.
                    *entry = None;
                }
                keep
            }
            // Someone is dialing or checking out right now: not idle.
            Err(_) => true,
        });
    }
}
