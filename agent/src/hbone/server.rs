//! The server half: TLS accept on a pod's HBONE listener, the client's SPIFFE id from its
//! certificate, HTTP/2, and per CONNECT stream a decision by a `StreamHandler`: refuse with
//! a status, or accept, answer `200` and hand the stream to the accepted `Tunnel`.
//!
//! The node proxy's `ConnectHandler` is one kind of `StreamHandler`: it connects a TCP
//! upstream before the `200` and the tunnel copies bytes both ways. The waypoint's handler
//! takes the stream itself (it speaks HTTP on it).

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, atomic::AtomicU64},
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use h2::{RecvStream, server::SendResponse};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::TlsAcceptor;
use tracing::debug;

use super::{Error, Limits, Role, copy, stream::H2Stream, tls};
use crate::{drain::Drain, identity::SpiffeId};

/// A CONNECT the server received, for the handler to decide on.
#[derive(Debug)]
pub struct InboundConnect {
    /// The client's SPIFFE id, proven by its certificate.
    pub peer_identity: SpiffeId,
    /// The client's address (the peer proxy's).
    pub peer_addr: SocketAddr,
    /// Where the HBONE connection arrived (the pod's address, port 15008).
    pub local_addr: SocketAddr,
    /// `:authority`, the original destination.
    pub target: SocketAddr,
    /// The request headers (`forwarded`, `baggage`, `traceparent`, …).
    pub headers: HeaderMap,
}

/// Why a CONNECT is refused; each maps to a status the client understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The target is not a workload served at this address: 400.
    NotServed,
    /// Policy denies it: 401.
    Denied,
    /// The upstream could not be connected: 503.
    Unreachable,
    /// The destination pod or the node is at its connection limit: 503.
    Overloaded,
}

/// A CONNECT the handler accepted: the upstream, already connected, and the record that
/// observes the transfer.
pub struct Accepted<T> {
    pub upstream: TcpStream,
    pub transfer: T,
}

/// Observes one accepted CONNECT: byte counters updated while bytes move, and the outcome.
pub trait Transfer: Send + 'static {
    /// Why a transfer ended badly: a failed copy, or whatever `stopped` says.
    type Error: From<copy::Error> + Send;

    /// Bytes from the HBONE client to the upstream.
    fn sent(&self) -> &AtomicU64;
    /// Bytes from the upstream to the HBONE client.
    fn received(&self) -> &AtomicU64;
    /// Called once, when both directions are done or the transfer failed.
    fn finish(self, result: Result<(), Self::Error>);
    /// Resolves when the transfer must stop early (policy revoked it): both ends are then
    /// reset and `finish` gets the error. Never, by default.
    fn stopped(&self) -> impl Future<Output = Self::Error> + Send + 'static {
        std::future::pending()
    }
    /// No bytes either way for this long ends the transfer.
    fn idle_timeout(&self) -> Duration;
}

/// Decides on each CONNECT; an accepted one becomes a `Tunnel` that gets the stream once
/// the `200` is sent.
pub trait StreamHandler: Send + Sync + 'static {
    type Tunnel: Tunnel;

    /// Accepts or refuses. The server answers `200` only after this returned `Ok`.
    fn accept(
        &self,
        request: InboundConnect,
    ) -> impl Future<Output = Result<Self::Tunnel, Refusal>> + Send;

    /// A client's TLS handshake failed (the server logged it, rate-limited): count it.
    /// Nothing, by default.
    fn handshake_refused(&self, _error: &Error) {}
}

/// An accepted CONNECT stream's work.
pub trait Tunnel: Send + 'static {
    /// Runs on the stream after the `200`, until the stream is done.
    fn run(self, stream: ServerStream) -> impl Future<Output = ()> + Send;
    /// The client went away before the `200` could be sent.
    fn abandon(self, error: std::io::Error);
}

/// One accepted CONNECT stream on the server side, as bytes (`AsyncRead + AsyncWrite`).
/// `shutdown()` half-closes; `abort()` resets the stream with CONNECT_ERROR.
pub struct ServerStream(H2Stream);

impl ServerStream {
    pub fn abort(&mut self) {
        self.0.abort();
    }
}

/// Decides on each CONNECT (policy, which workload, connecting the upstream).
pub trait ConnectHandler: Send + Sync + 'static {
    type Transfer: Transfer;

    /// Accepts with a connected upstream, or refuses. The server answers `200` only after
    /// this returned `Ok`, so the client learns that the upstream is reachable.
    fn open(
        &self,
        request: InboundConnect,
    ) -> impl Future<Output = Result<Accepted<Self::Transfer>, Refusal>> + Send;

    /// As [`StreamHandler::handshake_refused`].
    fn handshake_refused(&self, _error: &Error) {}
}

impl<H: ConnectHandler> StreamHandler for H {
    type Tunnel = Accepted<H::Transfer>;

    fn accept(
        &self,
        request: InboundConnect,
    ) -> impl Future<Output = Result<Self::Tunnel, Refusal>> + Send {
        self.open(request)
    }

    fn handshake_refused(&self, error: &Error) {
        ConnectHandler::handshake_refused(self, error);
    }
}

impl<T: Transfer> Tunnel for Accepted<T> {
    async fn run(self, mut stream: ServerStream) {
        let Accepted {
            mut upstream,
            transfer,
        } = self;
        let result = copy::bidirectional_until(
            &mut stream.0,
            &mut upstream,
            transfer.sent(),
            transfer.received(),
            transfer.idle_timeout(),
            std::pin::pin!(transfer.stopped()),
        )
        .await;
        transfer.finish(result);
    }

    fn abandon(self, error: std::io::Error) {
        copy::reset(&self.upstream);
        self.transfer
            .finish(Err(copy::Error::Downstream(error).into()));
    }
}

impl AsyncRead for ServerStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for ServerStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl Refusal {
    pub fn status(self) -> StatusCode {
        match self {
            Refusal::NotServed => StatusCode::BAD_REQUEST,
            Refusal::Denied => StatusCode::UNAUTHORIZED,
            Refusal::Unreachable | Refusal::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// `serve_with` the default limits.
pub async fn serve<H: StreamHandler>(
    tcp: TcpStream,
    tls: Arc<rustls::ServerConfig>,
    handler: Arc<H>,
) -> Result<(), Error> {
    // Nothing drains this one: it is served until the client closes it.
    serve_with(tcp, tls, handler, &Limits::default(), &Drain::default()).await
}

/// Serves one HBONE connection until the client closes it, within `limits`: a silent
/// client is cut at the handshake timeout, a vanished one by PING, header lists, streams
/// and resets are bounded. A refused handshake is logged with its reason and returned;
/// streams run on their own tasks, each holding a guard of `drain`. When `drain` starts,
/// the client gets GOAWAY: the streams it opened run on, it opens no more, and the
/// connection ends with its last stream.
pub async fn serve_with<H: StreamHandler>(
    tcp: TcpStream,
    tls: Arc<rustls::ServerConfig>,
    handler: Arc<H>,
    limits: &Limits,
    drain: &Drain,
) -> Result<(), Error> {
    let peer_addr = tcp.peer_addr().map_err(Error::Socket)?;
    let local_addr = tcp.local_addr().map_err(Error::Socket)?;
    let handshake = async {
        let accept = TlsAcceptor::from(tls).accept(tcp);
        let stream = tokio::time::timeout(limits.handshake_timeout, accept)
            .await
            .map_err(|_| Error::HandshakeTimeout(peer_addr))?
            .map_err(|e| Error::from_io(e, Role::Client))?;
        let peer_identity = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .ok_or(Error::NoPeerCertificate)
            .and_then(|leaf| tls::peer_identity(leaf).map_err(Error::from))?;
        Ok::<_, Error>((stream, peer_identity))
    };
    let (stream, peer_identity) = match handshake.await {
        Ok(accepted) => accepted,
        Err(e) => {
            crate::warn_limited!(component = "hbone", src = %peer_addr, reason = e.reason(), error = %e, "HBONE handshake refused");
            handler.handshake_refused(&e);
            return Err(e);
        }
    };
    debug!(component = "hbone", src = %peer_addr, src.identity = %peer_identity, "HBONE connection accepted");
    // h2 answers a header list over the limit with 431 itself, and bounds CONTINUATION
    // frames by it; the reset limits end rapid-reset floods with GOAWAY.
    let h2_handshake = h2::server::Builder::new()
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(limits.max_header_list_size)
        .max_pending_accept_reset_streams(limits.max_pending_accept_reset_streams)
        .max_local_error_reset_streams(Some(limits.max_local_error_reset_streams))
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .handshake::<_, Bytes>(stream);
    // The client preface is bounded like the TLS handshake: a silent client must not hold
    // the connection forever.
    let mut connection = tokio::time::timeout(limits.handshake_timeout, h2_handshake)
        .await
        .map_err(|_| Error::HandshakeTimeout(peer_addr))?
        .map_err(|e| Error::from_h2(e, None, Role::Client))?;
    let peer = Arc::new(Peer {
        identity: peer_identity,
        addr: peer_addr,
        local_addr,
    });
    let keepalive = super::keepalive(
        connection.ping_pong(),
        limits.ping_interval,
        limits.ping_timeout,
    );
    tokio::pin!(keepalive);
    let draining = drain.draining();
    tokio::pin!(draining);
    let mut going_away = false;
    loop {
        let next = tokio::select! {
            next = connection.accept() => next,
            () = &mut draining, if !going_away => {
                // An idle pooled connection would otherwise hold the drain up for as long
                // as the peer keeps it.
                connection.graceful_shutdown();
                going_away = true;
                continue;
            }
            e = &mut keepalive => {
                debug!(component = "hbone", src = %peer_addr, reason = e.reason(), error = %e, "HBONE connection closed");
                return Err(e);
            }
        };
        let Some(next) = next else { break };
        match next {
            Ok((request, respond)) => {
                let guard = drain.guard();
                let (handler, peer) = (Arc::clone(&handler), Arc::clone(&peer));
                tokio::spawn(async move {
                    stream_task(handler, peer, request, respond).await;
                    drop(guard);
                });
            }
            Err(e) => {
                let e = Error::from_h2(e, None, Role::Client);
                debug!(component = "hbone", src = %peer_addr, reason = e.reason(), error = %e, "HBONE connection failed");
                return Err(e);
            }
        }
    }
    // No more streams will be accepted (the client sent GOAWAY or closed); streams still
    // open need the connection driven until they end.
    std::future::poll_fn(|cx| connection.poll_closed(cx))
        .await
        .map_err(|e| Error::from_h2(e, None, Role::Client))
}

/// The CONNECT target: `:authority` as `ip:port` (Istio's HBONE sends nothing else), or
/// `None`, which the server answers with 400.
#[doc(hidden)] // pub for the fuzz target `hbone_headers`.
pub fn connect_target(uri: &http::Uri) -> Option<SocketAddr> {
    uri.authority()
        .and_then(|authority| authority.as_str().parse::<SocketAddr>().ok())
}

struct Peer {
    identity: SpiffeId,
    addr: SocketAddr,
    local_addr: SocketAddr,
}

async fn stream_task<H: StreamHandler>(
    handler: Arc<H>,
    peer: Arc<Peer>,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    if request.method() != Method::CONNECT {
        reply(&mut respond, StatusCode::METHOD_NOT_ALLOWED);
        return;
    }
    let Some(target) = connect_target(request.uri()) else {
        debug!(component = "hbone", src = %peer.addr, uri = %request.uri(), "CONNECT target is not ip:port");
        reply(&mut respond, StatusCode::BAD_REQUEST);
        return;
    };
    let (parts, body) = request.into_parts();
    let inbound = InboundConnect {
        peer_identity: peer.identity.clone(),
        peer_addr: peer.addr,
        local_addr: peer.local_addr,
        target,
        headers: parts.headers,
    };
    let tunnel = match handler.accept(inbound).await {
        Ok(tunnel) => tunnel,
        Err(refusal) => {
            debug!(component = "hbone", src = %peer.addr, dst = %target, refusal = ?refusal, "CONNECT refused");
            reply(&mut respond, refusal.status());
            return;
        }
    };
    let send = match respond.send_response(response(StatusCode::OK), false) {
        Ok(send) => send,
        Err(e) => {
            // The client went away while the upstream was being connected.
            tunnel.abandon(std::io::Error::other(e));
            return;
        }
    };
    tunnel.run(ServerStream(H2Stream::new(send, body))).await;
}

fn reply(respond: &mut SendResponse<Bytes>, status: StatusCode) {
    // The client may already be gone; nothing to do about it then.
    let _ = respond.send_response(response(status), true);
}

fn response(status: StatusCode) -> Response<()> {
    let mut response = Response::new(());
    *response.status_mut() = status;
    response
}

const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
const MAX_FRAME: u32 = 256 * 1024;
