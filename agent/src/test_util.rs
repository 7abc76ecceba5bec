//! Helpers shared by the crate's unit tests: a small certificate authority with a fixed
//! certificate source (`ca`), a fake Kubernetes API server (`kube_api`), a real DNS server
//! (`dnsmasq`), and loopback servers to proxy to.

pub mod ca;
pub mod dnsmasq;
pub mod kube_api;

use std::net::SocketAddr;

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

pub use ca::{TestCa, TestCerts};

/// An echo server on 127.0.0.1: every connection gets its bytes back, and its FIN once the
/// client half-closed.
pub async fn echo_server() -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind echo server");
    let addr = listener.local_addr().expect("echo server address");
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = stream.split();
                if tokio::io::copy(&mut read, &mut write).await.is_ok() {
                    let _ = write.shutdown().await;
                }
            });
        }
    });
    (addr, task)
}

/// A server on 127.0.0.1 that reads one byte of each connection and then resets it.
pub async fn reset_server() -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind reset server");
    let addr = listener.local_addr().expect("reset server address");
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut byte = [0u8; 1];
            let _ = stream.read(&mut byte).await;
            crate::hbone::copy::reset(&stream);
        }
    });
    (addr, task)
}

/// A loopback address nothing listens on (bound, then released).
pub async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    listener.local_addr().expect("address")
}

/// A connected pair of TCP streams on loopback.
pub async fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
    (a.expect("connect"), b.expect("accept").0)
}
