//! Where the proxy's upstream sockets come from: a factory per pod that creates sockets
//! inside the pod's network namespace (ztunnel's in-pod socket seam), so upstream
//! connections carry the pod's own source address, each registered as the proxy's own so
//! it is never steered back to the proxy.

use std::{io, net::SocketAddr, time::Duration};

use socket2::{Domain, Socket};
use tokio::net::{TcpSocket, TcpStream};

use super::Error;

/// Creates TCP sockets for a pod.
pub trait SocketFactory: Send + Sync + 'static {
    /// A new, non-blocking TCP socket of `domain`, in the pod's namespace, registered as the
    /// proxy's own (connect4/6 leaves it alone) and marked.
    fn tcp(&self, domain: Domain) -> io::Result<Socket>;
}

/// Connects a socket from `factory` to `addr`, bounded by `timeout`.
pub async fn connect(
    factory: &dyn SocketFactory,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<TcpStream, Error> {
    let socket = factory
        .tcp(Domain::for_address(addr))
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
    timeout: Duration,
) -> Result<TcpStream, Error> {
    let stream = connect(factory, addr, timeout).await?;
    crate::hbone::copy::reset_until_finished(&stream);
    Ok(stream)
}
