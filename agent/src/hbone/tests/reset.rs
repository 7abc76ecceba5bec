//! RST_STREAM(CONNECT_ERROR) on the wire (docs/hbone.md, "Byte stream and closing"): when
//! either TCP side of a CONNECT is reset, the proxy resets the stream with CONNECT_ERROR
//! (0xa), which Istio's ztunnel reads as "the TCP connection behind this CONNECT was
//! reset". A plain h2 peer stands on the other side and reports the frame's error code.
//! The same peer refuses a CONNECT unprocessed (REFUSED_STREAM), which the pool sends again
//! on another connection, and resets one it processed, which it does not.

use bytes::Bytes;
use h2::Reason;
use tokio::task::JoinHandle;

use super::*;

#[tokio::test]
async fn an_upstream_reset_reaches_the_client_as_rst_stream_connect_error() {
    let mut h = Harness::new().await;
    let (resetter, _task) = reset_server().await;
    h.serve_target(resetter);
    let tls = tls_to_server(&h, weft_client_config(&h)).await;
    let (_send, response, mut body_out) = open_connect(tls, resetter).await;
    // The upstream reads this byte, then resets its connection.
    body_out.send_data(Bytes::from_static(b"x"), false).unwrap();
    let mut body_in = response.into_body();
    let frame = timeout(patience(), body_in.data()).await.expect("no hang");
    let err = frame
        .expect("a reset, not END_STREAM")
        .expect_err("a reset, not data");
    assert_connect_error(&err);
    let finished = timeout(patience(), h.finished.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(finished.error, Some("upstream"), "{finished:?}");
    assert_eq!(finished.sent, 1, "{finished:?}");
}

#[tokio::test]
async fn an_application_reset_reaches_the_server_as_rst_stream_connect_error() {
    // app ⇄ (TCP) copy ⇄ HboneStream ⇄ plain h2 server
    let h = Harness::new().await;
    let (addr, server) = plain_h2_server(&h).await;
    let key = Key {
        address: addr,
        ..h.key()
    };
    let mut hbone = h.connect_with(key, closed_port().await).await.unwrap();
    let (app, mut down) = tcp_pair().await;
    // The application resets its connection (SO_LINGER 0, then close).
    copy::reset(&app);
    drop(app);
    let (sent, received) = (AtomicU64::new(0), AtomicU64::new(0));
    let copied = timeout(
        patience(),
        copy::bidirectional(&mut down, &mut hbone, &sent, &received, patience()),
    )
    .await
    .expect("no hang");
    assert_eq!(copied.unwrap_err().reason(), "downstream");
    let err = timeout(patience(), server)
        .await
        .expect("server finishes in time")
        .unwrap()
        .expect("a reset, not END_STREAM");
    assert_connect_error(&err);
}

/// The peer sent RST_STREAM with CONNECT_ERROR.
#[track_caller]
fn assert_connect_error(err: &h2::Error) {
    assert!(
        err.is_reset() && err.is_remote(),
        "not a peer's reset: {err}"
    );
    assert_eq!(err.reason(), Some(Reason::CONNECT_ERROR), "{err}");
    assert_eq!(u32::from(Reason::CONNECT_ERROR), 0xa);
}

/// A plain h2 server with the harness's server identity: answers the first CONNECT `200`
/// and reads its body; the task ends with the error that ended the body (`None` for
/// END_STREAM).
async fn plain_h2_server(h: &Harness) -> (SocketAddr, JoinHandle<Option<h2::Error>>) {
    let server = H2Server::bind(h).await;
    let addr = server.addr;
    let task = tokio::spawn(async move {
        let (request, mut respond) = server.next_connect().await;
        assert_eq!(request.method(), http::Method::CONNECT);
        respond
            .send_response(http::Response::new(()), false)
            .unwrap();
        let mut body = request.into_body();
        loop {
            match body.data().await {
                Some(Ok(data)) => {
                    let _ = body.flow_control().release_capacity(data.len());
                }
                Some(Err(e)) => return Some(e),
                None => return None,
            }
        }
    });
    (addr, task)
}

/// A TLS listener with the harness's server identity, speaking plain h2.
struct H2Server {
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    addr: SocketAddr,
}

impl H2Server {
    async fn bind(h: &Harness) -> Self {
        let config = server_config(
            Arc::<TestCerts>::clone(&h.server_certs),
            h.server_id.clone(),
        )
        .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        H2Server {
            listener,
            config,
            addr,
        }
    }

    /// The first request of the next connection; the connection keeps being driven.
    async fn next_connect(
        &self,
    ) -> (
        http::Request<h2::RecvStream>,
        h2::server::SendResponse<Bytes>,
    ) {
        let (tcp, _) = self.listener.accept().await.unwrap();
        let tls = tokio_rustls::TlsAcceptor::from(Arc::clone(&self.config))
            .accept(tcp)
            .await
            .unwrap();
        let mut connection = h2::server::handshake(tls).await.unwrap();
        let first = connection.accept().await.unwrap().unwrap();
        tokio::spawn(async move { while connection.accept().await.is_some() {} });
        first
    }
}

/// A plain h2 server whose first connection answers its CONNECT with RST_STREAM(`first`);
/// later connections answer 200. The task returns how many connections it served once
/// `connections` did.
async fn refusing_h2_server(
    h: &Harness,
    first: Reason,
    connections: usize,
) -> (SocketAddr, JoinHandle<usize>) {
    let server = H2Server::bind(h).await;
    let addr = server.addr;
    let task = tokio::spawn(async move {
        for n in 0..connections {
            let (_request, mut respond) = server.next_connect().await;
            if n == 0 {
                respond.send_reset(first);
            } else {
                respond
                    .send_response(http::Response::new(()), false)
                    .unwrap();
            }
        }
        connections
    });
    (addr, task)
}

#[tokio::test]
async fn a_connect_the_peer_refused_unprocessed_goes_again_on_a_new_connection() {
    let h = Harness::new().await;
    let (addr, server) = refusing_h2_server(&h, Reason::REFUSED_STREAM, 2).await;
    let key = Key {
        address: addr,
        ..h.key()
    };
    let opened = h.connect_with(key, closed_port().await).await;
    assert!(opened.is_ok(), "{:?}", opened.err());
    let served = timeout(patience(), server)
        .await
        .expect("second connection")
        .unwrap();
    assert_eq!(served, 2);
    // The refusing connection is retired: the pool holds only the new one.
    assert_eq!(h.pool.stats().handshakes, 2);
}

#[tokio::test]
async fn a_connect_the_peer_processed_and_reset_is_not_sent_again() {
    let h = Harness::new().await;
    let (addr, server) = refusing_h2_server(&h, Reason::CONNECT_ERROR, 1).await;
    let key = Key {
        address: addr,
        ..h.key()
    };
    let err = h.connect_with(key, closed_port().await).await.unwrap_err();
    assert!(
        matches!(err, Error::StreamReset(Reason::CONNECT_ERROR)),
        "{err}"
    );
    assert_eq!(timeout(patience(), server).await.unwrap().unwrap(), 1);
    assert_eq!(
        h.pool.stats().handshakes,
        1,
        "no second connection was opened"
    );
}
