//! HTTP client connections to backend pods, each over one HBONE CONNECT stream (through
//! `hbone::Pool`, which shares TLS connections), pooled by (endpoint, identity, protocol):
//! HTTP/2 connections are multiplexed, HTTP/1.1 connections are reused once their last
//! response has been read (keep-alive). Connections unused for the idle timeout close.

use std::{
    collections::HashMap,
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

use super::{Error, backend::Endpoint};
use crate::{
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
type IdleHttp1 = (http1::SendRequest<BoxBody>, Instant);

struct H2Entry {
    sender: http2::SendRequest<BoxBody>,
    last_used: Instant,
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

    /// Sends `request` to `endpoint`, on a pooled connection or a new one.
    pub async fn send(
        &self,
        endpoint: &Endpoint,
        protocol: Protocol,
        request: Request<BoxBody>,
    ) -> Result<Response<BoxBody>, Error> {
        let key = Key {
            endpoint: endpoint.addr,
            identity: endpoint.identity.clone(),
            protocol,
        };
        match protocol {
            Protocol::Http2 => {
                let (mut sender, reused) = self.http2_sender(&key).await?;
                let response = match sender.try_send_request(request).await {
                    Ok(response) => response,
                    Err(mut e) => match e.take_message() {
                        // A pooled connection that closed before the request went out
                        // (the backend went away while idle): once more on a new one.
                        Some(request) if reused => {
                            self.forget_http2(&key).await;
                            let (mut sender, _) = self.http2_sender(&key).await?;
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
                let (sender, response) = match self.idle_http1(&key) {
                    Some(mut sender) => match sender.try_send_request(request).await {
                        Ok(response) => (sender, response),
                        Err(mut e) => match e.take_message() {
                            // As above: an idle keep-alive connection the backend closed.
                            Some(request) => self.send_http1_fresh(&key, request).await?,
                            None => return Err(Error::Upstream(e.into_error())),
                        },
                    },
                    None => self.send_http1_fresh(&key, request).await?,
                };
                let pool = Arc::downgrade(&self.inner);
                Ok(response.map(|body| {
                    KeepAlive {
                        body,
                        sender: Some(sender),
                        pool,
                        key,
                    }
                    .boxed_unsync()
                }))
            }
        }
    }

    /// Sends on a new HTTP/1.1 connection; the sender goes back to the pool with the body.
    async fn send_http1_fresh(
        &self,
        key: &Key,
        request: Request<BoxBody>,
    ) -> Result<(http1::SendRequest<BoxBody>, Response<Incoming>), Error> {
        let mut sender = self.dial_http1(key).await?;
        let response = sender
            .send_request(request)
            .await
            .map_err(Error::Upstream)?;
        Ok((sender, response))
    }

    fn idle_http1(&self, key: &Key) -> Option<http1::SendRequest<BoxBody>> {
        let mut pool = self.inner.http1.lock();
        let idle = pool.get_mut(key)?;
        while let Some((sender, since)) = idle.pop() {
            if sender.is_ready() && since.elapsed() < self.inner.idle_timeout {
                return Some(sender);
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
    async fn http2_sender(&self, key: &Key) -> Result<(http2::SendRequest<BoxBody>, bool), Error> {
        let slot = Arc::clone(self.inner.http2.lock().entry(key.clone()).or_default());
        let mut slot = slot.lock().await;
        if let Some(entry) = slot.as_mut().filter(|e| !e.sender.is_closed()) {
            entry.last_used = Instant::now();
            return Ok((entry.sender.clone(), true));
        }
        let stream = self.connect(key).await?;
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .adaptive_window(true)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(Error::Handshake)?;
        drive(connection, key.endpoint, "HTTP/2");
        *slot = Some(H2Entry {
            sender: sender.clone(),
            last_used: Instant::now(),
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
        let inner = &self.inner;
        let address = SocketAddr::new(key.endpoint.ip(), inner.hbone_port);
        let pool_key = hbone::Key {
            source: inner.source.clone(),
            destination: key.identity.clone(),
            address,
            local: Ipv4Addr::UNSPECIFIED.into(),
        };
        let request = hbone::ConnectRequest {
            target: key.endpoint,
            // The stream carries many clients' requests: the waypoint is its source.
            source: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
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
    sender: Option<http1::SendRequest<BoxBody>>,
    pool: Weak<Inner>,
    key: Key,
}

impl KeepAlive {
    fn release(&mut self) {
        if let (Some(sender), Some(pool)) = (self.sender.take(), self.pool.upgrade()) {
            pool.http1
                .lock()
                .entry(self.key.clone())
                .or_default()
                .push((sender, Instant::now()));
        }
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
            Poll::Ready(Some(Err(_))) => self.sender = None,
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
            senders.retain(|(sender, since)| !sender.is_closed() && since.elapsed() < idle);
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
