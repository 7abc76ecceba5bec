//! The client half: one TLS + HTTP/2 connection to a peer's HBONE port (`Connection`), and
//! CONNECT streams over it (`HboneStream`). `pool` decides which connection a stream uses.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    sync::Notify,
    time::Instant,
};
use tokio_rustls::TlsConnector;
use tracing::debug;

use super::{
    BAGGAGE, Error, FORWARDED, Key, Limits, Role, TRACEPARENT, copy, stream::H2Stream, tls,
};
use crate::{
    identity::{CertSource, SpiffeId},
    sync::Mutex,
};

/// What one CONNECT asks for.
#[derive(Clone, Debug)]
pub struct ConnectRequest {
    /// The original destination; becomes `:authority` (`ip:port`, IPv6 in brackets).
    pub target: SocketAddr,
    /// The application's address; becomes `forwarded: for=<ip>`.
    pub source: SocketAddr,
    /// W3C baggage, sent as is.
    pub baggage: Option<String>,
    /// W3C trace context, sent as is.
    pub traceparent: Option<String>,
}

/// An open CONNECT stream: the application's bytes to and from the target, through the
/// peer proxy. `shutdown()` half-closes (END_STREAM); dropping it without shutting down
/// resets the stream.
pub struct HboneStream {
    io: H2Stream,
    peer_identity: SpiffeId,
    // Keeps the connection's stream count (idle and capacity decisions) right.
    _lease: Lease,
}

impl HboneStream {
    /// The SPIFFE id the peer proved in the TLS handshake.
    pub fn peer_identity(&self) -> &SpiffeId {
        &self.peer_identity
    }

    /// Resets the stream (RST_STREAM with CONNECT_ERROR): the peer resets its upstream.
    pub fn abort(&mut self) {
        self.io.abort();
    }
}

impl std::fmt::Debug for HboneStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HboneStream")
            .field("peer_identity", &self.peer_identity)
            .field("connection", &self._lease.connection.id)
            .finish()
    }
}

impl copy::Stream for HboneStream {
    fn abort(&mut self) {
        HboneStream::abort(self);
    }

    fn poll_read_chunk(
        &mut self,
        cx: &mut Context<'_>,
        buffer: &mut copy::ReadBuffer,
    ) -> Poll<io::Result<Bytes>> {
        copy::Stream::poll_read_chunk(&mut self.io, cx, buffer)
    }

    fn poll_write_chunk(
        &mut self,
        cx: &mut Context<'_>,
        chunk: &mut Bytes,
    ) -> Poll<io::Result<usize>> {
        copy::Stream::poll_write_chunk(&mut self.io, cx, chunk)
    }
}

impl AsyncRead for HboneStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for HboneStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// One established TLS + HTTP/2 connection.
pub(super) struct Connection {
    pub(super) id: u64,
    send: h2::client::SendRequest<Bytes>,
    pub(super) peer_identity: SpiffeId,
    /// Serial of the source certificate the connection was opened with.
    pub(super) serial: String,
    /// Streams open (or being opened) on it; changed under the pool lock when it grows.
    streams: AtomicUsize,
    last_active: Mutex<Instant>,
    /// No new streams: the connection failed, idled out or its certificate was rotated.
    retired: AtomicBool,
    /// Wakes the connection's task to re-check whether it should close.
    pub(super) wake: Notify,
    /// The first TLS error the connection saw (h2 keeps only a string of it).
    tls_error: Arc<OnceLock<rustls::Error>>,
}

/// A stream's claim on a connection.
pub(super) struct Lease {
    pub(super) connection: Arc<Connection>,
    streams_open: Arc<AtomicUsize>,
}

/// The established connection and the future that drives it.
pub(super) struct Established {
    pub(super) connection: Arc<Connection>,
    pub(super) driver: h2::client::Connection<TlsIo, Bytes>,
}

pub(super) type TlsIo = Recording<tokio_rustls::client::TlsStream<TcpStream>>;

/// Handshakes TLS then HTTP/2 over `tcp`, proving the key's source identity and requiring
/// its destination identity.
pub(super) async fn handshake(
    certs: Arc<dyn CertSource>,
    key: &Key,
    tcp: TcpStream,
    serial: String,
    id: u64,
    timeout: Duration,
    limits: &Limits,
) -> Result<Established, Error> {
    let address = key.address;
    let (config, verifier) =
        tls::client_config_with_verifier(certs, key.source.clone(), key.destination.clone())?;
    let connect = TlsConnector::from(config).connect(tls::server_name(address), tcp);
    let tls = match tokio::time::timeout(timeout, connect).await {
        Err(_) => return Err(Error::HandshakeTimeout(address)),
        Ok(Err(e)) => {
            return Err(match verifier.take_rejection() {
                Some(rejection) => rejection.into(),
                None => Error::from_io(e, Role::Server),
            });
        }
        Ok(Ok(tls)) => tls,
    };
    let peer_identity = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .ok_or(Error::NoPeerCertificate)
        .and_then(|leaf| tls::peer_identity(leaf).map_err(Error::from))?;
    let tls_error = Arc::new(OnceLock::new());
    let io = Recording {
        inner: tls,
        tls_error: Arc::clone(&tls_error),
    };
    let (send, driver) = h2::client::Builder::new()
        .max_header_list_size(limits.max_header_list_size)
        .max_pending_accept_reset_streams(limits.max_pending_accept_reset_streams)
        .max_local_error_reset_streams(Some(limits.max_local_error_reset_streams))
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .enable_push(false)
        .handshake::<_, Bytes>(io)
        .await
        .map_err(|e| Error::from_h2(e, tls_error.get().cloned(), Role::Server))?;
    Ok(Established {
        connection: Arc::new(Connection {
            id,
            send,
            peer_identity,
            serial,
            streams: AtomicUsize::new(0),
            last_active: Mutex::new(Instant::now()),
            retired: AtomicBool::new(false),
            wake: Notify::new(),
            tls_error,
        }),
        driver,
    })
}

impl Connection {
    /// Whether a new stream may use this connection: not retired, not closed, and below
    /// both our limit and the peer's SETTINGS_MAX_CONCURRENT_STREAMS.
    pub(super) fn has_room(&self, max_streams: usize) -> bool {
        let limit = max_streams.min(self.send.current_max_send_streams());
        !self.is_retired() && self.streams.load(Ordering::Acquire) < limit
    }

    pub(super) fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    pub(super) fn retire(&self) {
        self.retired.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    pub(super) fn streams(&self) -> usize {
        self.streams.load(Ordering::Acquire)
    }

    pub(super) fn idle_deadline(&self, idle_timeout: Duration) -> Instant {
        *self.last_active.lock() + idle_timeout
    }

    /// Takes a stream slot (the caller holds the pool lock and checked `has_room`).
    pub(super) fn lease(self: &Arc<Self>, streams_open: &Arc<AtomicUsize>) -> Lease {
        self.streams.fetch_add(1, Ordering::AcqRel);
        streams_open.fetch_add(1, Ordering::Relaxed);
        self.touch();
        Lease {
            connection: Arc::clone(self),
            streams_open: Arc::clone(streams_open),
        }
    }

    fn touch(&self) {
        *self.last_active.lock() = Instant::now();
    }

    pub(super) fn tls_error(&self) -> Option<rustls::Error> {
        self.tls_error.get().cloned()
    }
}

impl Lease {
    /// Sends the CONNECT and waits for the answer; only `200` gives a stream.
    pub(super) async fn open(
        self,
        request: &ConnectRequest,
        timeout: Duration,
    ) -> Result<HboneStream, Error> {
        let connection = Arc::clone(&self.connection);
        let h2_error = |e: h2::Error| Error::from_h2(e, connection.tls_error(), Role::Server);
        let request = build_request(request)?;
        let send = connection.send.clone();
        let exchange = async {
            let mut send = send.ready().await.map_err(h2_error)?;
            let (response, body) = send.send_request(request, false).map_err(h2_error)?;
            let response = response.await.map_err(h2_error)?;
            Ok::<_, Error>((response, body))
        };
        let (response, send_stream) = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| Error::ResponseTimeout)??;
        match response.status() {
            StatusCode::OK => {}
            StatusCode::BAD_REQUEST => return Err(Error::BadRequest),
            StatusCode::UNAUTHORIZED => return Err(Error::PolicyDenied),
            StatusCode::SERVICE_UNAVAILABLE => return Err(Error::UpstreamUnreachable),
            other => return Err(Error::UnexpectedStatus(other.as_u16())),
        }
        let peer_identity = connection.peer_identity.clone();
        Ok(HboneStream {
            io: H2Stream::new(send_stream, response.into_body()),
            peer_identity,
            _lease: self,
        })
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.streams_open.fetch_sub(1, Ordering::Relaxed);
        self.connection.touch();
        if self.connection.streams.fetch_sub(1, Ordering::AcqRel) == 1 {
            // Last stream gone: a retired connection can close now, an active one starts
            // its idle countdown.
            self.connection.wake.notify_one();
        }
    }
}

pub(super) fn build_request(request: &ConnectRequest) -> Result<Request<()>, Error> {
    let invalid = |e: &dyn std::fmt::Display| Error::InvalidRequest(e.to_string());
    let authority = match request.target {
        SocketAddr::V4(v4) => format!("{}:{}", v4.ip(), v4.port()),
        // No zone id: it means nothing to the peer.
        SocketAddr::V6(v6) => format!("[{}]:{}", v6.ip(), v6.port()),
    };
    let mut builder = Request::builder()
        .method(Method::CONNECT)
        .uri(authority)
        .header(FORWARDED, forwarded_for(request.source.ip()));
    for (name, value) in [
        (BAGGAGE, &request.baggage),
        (TRACEPARENT, &request.traceparent),
    ] {
        if let Some(value) = value {
            builder = builder.header(name, HeaderValue::from_str(value).map_err(|e| invalid(&e))?);
        }
    }
    builder.body(()).map_err(|e| invalid(&e))
}

/// RFC 7239: an IPv6 node is bracketed and, because of the colons, quoted.
pub(super) fn forwarded_for(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V4(v4) => format!("for={v4}"),
        std::net::IpAddr::V6(v6) => format!("for=\"[{v6}]\""),
    }
}

/// Passes I/O through, keeping the first rustls error (an alert from the peer, typically)
/// so it can be reported with its reason after h2 reduced it to a string.
pub(super) struct Recording<T> {
    inner: T,
    tls_error: Arc<OnceLock<rustls::Error>>,
}

impl<T> Recording<T> {
    fn record<V>(&self, result: Poll<io::Result<V>>) -> Poll<io::Result<V>> {
        if let Poll::Ready(Err(e)) = &result
            && let Some(tls) = super::tls_error_of(e)
        {
            debug!(component = "hbone", error = %tls, "TLS error on HBONE connection");
            let _ = self.tls_error.set(tls.clone());
        }
        result
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Recording<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.record(result)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Recording<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.record(result)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.inner).poll_flush(cx);
        self.record(result)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.record(result)
    }
}

// HTTP/2 windows and frames sized for bulk transfers between proxies, where the default
// 64 KiB stream window caps throughput at one window per round trip.
const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
const MAX_FRAME: u32 = 256 * 1024;
