//! Where the proxy's upstream sockets come from: a factory per pod that creates sockets
//! inside the pod's network namespace (ztunnel's in-pod socket seam), so upstream
//! connections carry the pod's own source address, each registered as the proxy's own so
//! it is never steered back to the proxy. A connection into the pod's application may
//! instead carry the client's address, so the application sees who connected.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use socket2::{Domain, Socket};
use tokio::net::{TcpSocket, TcpStream};

use super::Error;

/// Creates TCP sockets for a pod.
pub trait SocketFactory: Send + Sync + 'static {
    /// A new, non-blocking TCP socket of `domain`, in the pod's namespace, registered as the
    /// proxy's own (connect4/6 leaves it alone) and marked. With `as_client`, bound to that
    /// address when the pod routes the replies back to the proxy and the address can be
    /// impersonated; otherwise the kernel picks the pod's own address at connect.
    fn tcp(&self, domain: Domain, as_client: Option<IpAddr>) -> io::Result<Socket>;
}

/// Connects a socket from `factory` to `addr` (as `as_client`, if it can), bounded by
/// `timeout`.
pub async fn connect(
    factory: &dyn SocketFactory,
    addr: SocketAddr,
    as_client: Option<IpAddr>,
    timeout: Duration,
) -> Result<TcpStream, Error> {
    let socket = factory
        .tcp(Domain::for_address(addr), as_client)
        .map_err(Error::Socket)?;
    let socket = TcpSocket::from_std_stream(socket.into());
    let stream = tokio::time::timeout(timeout, socket.connect(addr))
        .await
        .map_err(|_| Error::ConnectTimeout(addr))?
        .map_err(|source| Error::Connect { addr, source })?;
    // Best effort: latency of small writes matters more than packet count here.
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// `connect` to an application's server (not a peer proxy): its close is a RST until the
/// copy finishes it cleanly (`copy::reset_until_finished`).
pub async fn connect_app(
    factory: &dyn SocketFactory,
    addr: SocketAddr,
    as_client: Option<IpAddr>,
    timeout: Duration,
) -> Result<TcpStream, Error> {
    let stream = connect(factory, addr, as_client, timeout).await?;
    crate::hbone::copy::reset_until_finished(&stream);
    Ok(stream)
}
