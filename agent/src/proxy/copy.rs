//! Byte copying between the application's connection and the upstream one: both ways at
//! once, counting bytes as they go (so a failed connection still reports what moved), and
//! forwarding half-close: EOF on one side becomes a FIN (shutdown(SHUT_WR)) on the other,
//! while the other direction keeps flowing.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpStream,
        tcp::{ReadHalf, WriteHalf},
    },
};

use super::Error;

/// Copies until both directions have seen EOF. On error, both sockets are reset (RST), so
/// neither peer is left half-open waiting for data that will never come.
pub async fn bidirectional(
    downstream: &mut TcpStream,
    upstream: &mut TcpStream,
    sent: &AtomicU64,
    received: &AtomicU64,
) -> Result<(), Error> {
    let result = {
        let (down_read, down_write) = downstream.split();
        let (up_read, up_write) = upstream.split();
        tokio::try_join!(
            one_way(down_read, up_write, sent, Side::Downstream),
            one_way(up_read, down_write, received, Side::Upstream),
        )
    };
    if result.is_err() {
        reset(downstream);
        reset(upstream);
    }
    result.map(|_| ())
}

/// Aborts a connection with RST instead of FIN.
pub fn reset(stream: &TcpStream) {
    // SO_LINGER 0 turns the close into a RST (without blocking: there is nothing to wait
    // for); failing to set it only downgrades the close to a FIN.
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

#[derive(Clone, Copy)]
enum Side {
    /// Reading from the application, writing upstream.
    Downstream,
    /// Reading from upstream, writing to the application.
    Upstream,
}

/// Builds an `Error` from an I/O error of one side.
type ErrorFn = fn(std::io::Error) -> Error;

impl Side {
    /// Which side a read error and a write error belong to.
    fn error_constructors(self) -> (ErrorFn, ErrorFn) {
        match self {
            Side::Downstream => (Error::Downstream, Error::Upstream),
            Side::Upstream => (Error::Upstream, Error::Downstream),
        }
    }
}

async fn one_way(
    mut from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    counter: &AtomicU64,
    side: Side,
) -> Result<(), Error> {
    let (read_err, write_err) = side.error_constructors();
    // One buffer per direction for the connection's lifetime; never per read.
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        let n = from.read(&mut buf).await.map_err(read_err)?;
        if n == 0 {
            // Half-close: pass the FIN on and keep the other direction open.
            to.shutdown().await.map_err(write_err)?;
            return Ok(());
        }
        to.write_all(&buf[..n]).await.map_err(write_err)?;
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Large enough that a bulk transfer moves in few syscalls on loopback.
const BUF_SIZE: usize = 64 * 1024;

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (a.unwrap(), b.unwrap().0)
    }

    #[tokio::test]
    async fn copies_both_ways_and_forwards_half_close() {
        // app <-> (down) proxy (up) <-> server
        let (mut app, mut down) = pair().await;
        let (mut up, mut server) = pair().await;
        let sent = AtomicU64::new(0);
        let received = AtomicU64::new(0);
        let proxy = async { bidirectional(&mut down, &mut up, &sent, &received).await };
        let peers = async {
            let payload = vec![7u8; 1_000_000];
            app.write_all(&payload).await.unwrap();
            app.shutdown().await.unwrap();
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, payload);
            // The server still answers after the client's FIN.
            server.write_all(b"bye").await.unwrap();
            server.shutdown().await.unwrap();
            let mut reply = Vec::new();
            app.read_to_end(&mut reply).await.unwrap();
            assert_eq!(reply, b"bye");
        };
        let (result, ()) = tokio::join!(proxy, peers);
        result.unwrap();
        assert_eq!(sent.load(Ordering::Relaxed), 1_000_000);
        assert_eq!(received.load(Ordering::Relaxed), 3);
    }

    #[tokio::test]
    async fn upstream_reset_resets_the_application() {
        let (mut app, mut down) = pair().await;
        let (mut up, server) = pair().await;
        reset(&server);
        drop(server);
        let sent = AtomicU64::new(0);
        let received = AtomicU64::new(0);
        app.write_all(b"x").await.unwrap();
        let result = bidirectional(&mut down, &mut up, &sent, &received).await;
        assert!(
            matches!(result, Err(Error::Upstream(_)) | Err(Error::Downstream(_))),
            "{result:?}"
        );
        drop(down);
        let mut buf = [0u8; 1];
        let err = app.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
    }
}
