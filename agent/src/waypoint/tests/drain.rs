//! Draining at shutdown: what is in flight completes, clients are told to go elsewhere
//! (GOAWAY, connection close), the limit cuts what is left and counts it.

use super::*;

/// A waypoint whose drain limit no test outlives, unless it means to.
async fn draining_harness(limit: Duration) -> Harness {
    Harness::with(&["v1"], |config| config.drain_limit = limit).await
}

/// Starts the drain on its own task (no second signal) and waits until it runs.
async fn start_drain(h: &Harness) -> tokio::task::JoinHandle<Shutdown> {
    let waypoint = h.waypoint.clone();
    let shutdown = tokio::spawn(async move { waypoint.shut_down(std::future::pending()).await });
    until("the drain started", || h.waypoint.drain().is_draining()).await;
    shutdown
}

/// An HTTP/2 connection through a CONNECT to the service, spoken with h2 itself: its
/// errors say whether the server sent GOAWAY.
async fn raw_h2(
    h: &Harness,
) -> (
    h2::client::SendRequest<Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let stream = h.connect(Harness::vip()).await.unwrap();
    let (sender, connection) = h2::client::handshake(stream).await.unwrap();
    (sender, tokio::spawn(connection))
}

/// A gRPC stream to the echo backend (it echoes each message, then sends trailers).
fn chat<B>(body: B) -> Request<B> {
    Request::builder()
        .method("POST")
        .uri("http://echo.default/weft.test.Echo/Chat")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body)
        .unwrap()
}

fn get(path: &str) -> Request<()> {
    Request::builder()
        .uri(format!("http://echo.default{path}"))
        .body(())
        .unwrap()
}

fn metric(h: &Harness, name: &str) -> u64 {
    let text = h.registry.encode().unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_when_the_drain_starts_complete_with_their_whole_body() {
    let h = draining_harness(patience()).await;
    // HTTP/1.1: an upload whose body is half sent when the drain starts.
    let Client::H1(h1) = h.h1().await else {
        unreachable!("h1 client")
    };
    let (upload_tx, upload_rx) = mpsc::channel(4);
    let upload = tokio::spawn(async move {
        let request = Request::builder()
            .method("POST")
            .uri("/upload")
            .header("host", "echo.default")
            .header("content-length", "8")
            .body(ChannelBody(upload_rx).boxed_unsync())
            .unwrap();
        let response = h1.lock().await.send_request(request).await.unwrap();
        let (parts, body) = response.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        (parts, body)
    });
    upload_tx
        .send(Frame::data(Bytes::from_static(b"1234")))
        .await
        .unwrap();
    // gRPC: a stream whose response is half sent when the drain starts.
    let Client::H2(mut h2) = h.h2().await else {
        unreachable!("h2 client")
    };
    let (tx, rx) = mpsc::channel(4);
    let response = h2
        .send_request(chat(ChannelBody(rx).boxed_unsync()))
        .await
        .unwrap();
    let mut body = response.into_body();
    let first = Bytes::from_static(b"\0\0\0\0\x01a");
    tx.send(Frame::data(first.clone())).await.unwrap();
    let echoed = timeout(patience(), body.frame()).await.unwrap();
    assert_eq!(echoed.unwrap().unwrap().into_data().unwrap(), first);
    until("the upload reached the backend", || {
        h.backend("v1").count.load(Ordering::SeqCst) == 2
    })
    .await;

    let shutdown = start_drain(&h).await;
    assert_eq!(metric(&h, "weft_waypoint_draining"), 1);
    let second = Bytes::from_static(b"\0\0\0\0\x01b");
    tx.send(Frame::data(second.clone())).await.unwrap();
    drop(tx);
    let mut rest = Vec::new();
    let mut trailers = None;
    while let Some(frame) = timeout(patience(), body.frame()).await.unwrap() {
        match frame.unwrap().into_data() {
            Ok(data) => rest.extend_from_slice(&data),
            Err(frame) => trailers = frame.into_trailers().ok(),
        }
    }
    assert_eq!(rest, second, "the rest of the stream");
    assert_eq!(trailers.expect("trailers")["grpc-status"], "0");
    upload_tx
        .send(Frame::data(Bytes::from_static(b"5678")))
        .await
        .unwrap();
    drop(upload_tx);
    let (parts, body) = timeout(patience(), upload).await.unwrap().unwrap();
    assert_eq!(parts.status, StatusCode::OK);
    assert_eq!(body, "v1 POST /upload 8");
    // The keep-alive connection closes after this response: the next request goes elsewhere.
    assert_eq!(parts.headers["connection"], "close");
    // Nothing else was open: the drain ends by itself, nothing cut.
    assert_eq!(shutdown.await.unwrap(), Shutdown::Drained);
    assert_eq!(h.waypoint.drain().open(), 0);
    assert_eq!(metric(&h, "weft_waypoint_drain_cut_total"), 0);
    assert_eq!(h.requests_by_code().get(&200), Some(&2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_sends_goaway_and_serves_no_new_request_on_the_connection() {
    let h = draining_harness(patience()).await;
    let (sender, connection) = raw_h2(&h).await;
    // A stream the test ends holds the connection open through the drain.
    let mut held = sender.clone().ready().await.unwrap();
    let (response, mut request_body) = held.send_request(chat(()), false).unwrap();
    let response = timeout(patience(), response).await.unwrap().unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    let shutdown = start_drain(&h).await;
    // Until the GOAWAY reaches the client a new stream may still be served (h2 accepts
    // streams until its second GOAWAY); from then on none is.
    let mut served = 0;
    let deadline = Instant::now() + patience();
    let refusal = loop {
        assert!(
            Instant::now() < deadline,
            "no GOAWAY after {:?}",
            patience()
        );
        match probe(&sender).await {
            Ok(status) => {
                assert_eq!(status, StatusCode::OK);
                served += 1;
            }
            Err(e) => break e,
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert!(refusal.is_go_away() && refusal.is_remote(), "{refusal:?}");
    assert_eq!(refusal.reason(), Some(h2::Reason::NO_ERROR), "{refusal:?}");
    let again = probe(&sender).await.unwrap_err();
    assert!(again.is_go_away(), "{again:?}");
    assert_eq!(
        h.backend("v1").count.load(Ordering::SeqCst),
        1 + served,
        "no refused request reached the backend"
    );

    // The held stream still completes, then the connection closes gracefully.
    let last = Bytes::from_static(b"\0\0\0\0\x01z");
    request_body.send_data(last.clone(), true).unwrap();
    let mut body = response.into_body();
    let mut echoed = Vec::new();
    while let Some(data) = timeout(patience(), body.data()).await.unwrap() {
        let data = data.unwrap();
        let _ = body.flow_control().release_capacity(data.len());
        echoed.extend_from_slice(&data);
    }
    assert_eq!(echoed, last);
    let trailers = timeout(patience(), body.trailers()).await.unwrap().unwrap();
    assert_eq!(trailers.expect("trailers")["grpc-status"], "0");
    // No protocol error: the end is GOAWAY's. (The client's h2 may still fail to half-close
    // the tunnel, which the waypoint has already closed: an I/O error.)
    let closed = timeout(patience(), connection).await.unwrap().unwrap();
    assert!(
        closed.as_ref().map_or_else(h2::Error::is_io, |()| true),
        "{closed:?}"
    );
    assert_eq!(shutdown.await.unwrap(), Shutdown::Drained);
    // The listener is closed and the HBONE connection went away too: no new CONNECT.
    let deadline = Instant::now() + patience();
    while h.connect(Harness::vip()).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "CONNECTs still served after the drain"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_opened_during_the_drain_serves_the_request_it_carries() {
    let h = draining_harness(patience()).await;
    // A second HBONE listener of the same waypoint, which nothing drains: its CONNECT is
    // accepted after the drain started, as one that crossed the GOAWAY is.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (tls, waypoint) = (Arc::clone(&h.waypoint_tls), Arc::new(h.waypoint.clone()));
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let _ = hbone::serve(tcp, tls, waypoint).await;
    });
    let _shutdown = start_drain(&h).await;
    let stream = h.connect_at(address, Harness::vip()).await.unwrap();
    let (mut sender, connection) = http1::handshake(TokioIo::new(stream)).await.unwrap();
    let connection = tokio::spawn(connection);
    let request = Request::get("/late")
        .header("host", "echo.default")
        .body(empty())
        .unwrap();
    let response = timeout(patience(), sender.send_request(request))
        .await
        .unwrap()
        .unwrap();
    let (parts, body) = response.into_parts();
    assert_eq!(parts.status, StatusCode::OK);
    assert_eq!(parts.headers["connection"], "close");
    assert_eq!(body.collect().await.unwrap().to_bytes(), "v1 GET /late 0");
    // And then the connection closes: the next request goes elsewhere. (The client may
    // fail to half-close the tunnel the waypoint has already closed.)
    let closed = timeout(patience(), connection).await.unwrap().unwrap();
    assert!(
        closed
            .as_ref()
            .map_or_else(hyper::Error::is_shutdown, |()| true),
        "{closed:?}"
    );
}

/// One GET on the connection: its status, or why h2 would not send or answer it.
async fn probe(sender: &h2::client::SendRequest<Bytes>) -> Result<StatusCode, h2::Error> {
    let mut sender = sender.clone().ready().await?;
    let (response, _) = sender.send_request(get("/probe"), true)?;
    let response = timeout(patience(), response).await.expect("an answer")?;
    Ok(response.status())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_limit_cuts_what_is_left_and_counts_it() {
    let h = draining_harness(Duration::from_millis(200)).await;
    let forever = in_flight_forever(&h).await;
    let open = h.waypoint.drain().open();
    let shutdown = h.waypoint.shut_down(std::future::pending()).await;
    assert_eq!(shutdown, Shutdown::LimitPassed { cut: open });
    assert_eq!(
        metric(&h, "weft_waypoint_drain_cut_total"),
        u64::try_from(open).unwrap()
    );
    // The client sees its request fail, not answered as if it had ended.
    let result = timeout(patience(), forever).await.unwrap().unwrap();
    assert!(result.is_err(), "{result:?}");
    until("the cut work ended", || h.waypoint.drain().open() == 0).await;
    assert_eq!(metric(&h, "weft_waypoint_drain_open"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_cuts_at_once() {
    let h = draining_harness(patience()).await;
    let forever = in_flight_forever(&h).await;
    let open = h.waypoint.drain().open();
    let shutdown = h.waypoint.shut_down(async {}).await;
    assert_eq!(shutdown, Shutdown::Interrupted { cut: open });
    assert!(
        timeout(patience(), forever)
            .await
            .unwrap()
            .unwrap()
            .is_err()
    );
    until("the cut work ended", || h.waypoint.drain().open() == 0).await;
}

/// A request the backend never answers, once it reached the backend.
async fn in_flight_forever(
    h: &Harness,
) -> tokio::task::JoinHandle<Result<StatusCode, hyper::Error>> {
    let Client::H2(mut sender) = h.h2().await else {
        unreachable!("h2 client")
    };
    let request = Request::builder()
        .uri("http://echo.default/forever")
        .header("x-delay-ms", FOREVER_MS)
        .body(empty())
        .unwrap();
    let forever =
        tokio::spawn(async move { sender.send_request(request).await.map(|r| r.status()) });
    until("the request reached the backend", || {
        h.backend("v1").count.load(Ordering::SeqCst) == 1
    })
    .await;
    forever
}
