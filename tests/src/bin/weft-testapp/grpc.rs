//! `grpc-serve` and `grpc-call`: gRPC over h2c without a gRPC library, so a test sees the
//! wire as a proxy must pass it (`grpc-call --tls-ca PEM [--sni NAME]`: over TLS, h2 by
//! ALPN, as a gRPC client calls an ingress). Messages are length-prefixed (1 byte compressed flag, 4
//! bytes big-endian length; https://github.com/grpc/grpc/blob/master/doc/PROTOCOL-HTTP2.md),
//! requests carry `content-type: application/grpc` and `te: trailers`, and the status
//! comes in trailers.
//!
//! The service `weft.test.Echo`: every method echoes each request message as it arrives
//! (`x-repeat: N` times, default 1) and ends with trailers `grpc-status: 0`,
//! `grpc-message: ok`, `x-trailer: received=<n>`; `Fail` reads the request and answers
//! `grpc-status: 13` in trailers; a method of another service gets a trailers-only 12.

use std::{
    net::SocketAddr,
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use h2::{RecvStream, server::SendResponse};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use tokio::net::{TcpListener, TcpStream};
use weft_tests::l7::{GRPC_SERVICE, GrpcCallReport, GrpcLoadReport, ServedCall};

use crate::{ClientTls, Flags, http::headers_of};

/// Which RPC shape a call makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Unary,
    ServerStream,
    Bidi,
}

/// What `grpc-call` does.
#[derive(Clone, Debug)]
pub struct CallOptions {
    pub to: SocketAddr,
    pub mode: Mode,
    pub messages: u64,
    pub method: Option<String>,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// A pause before each bidi message after the first (a long-lived call).
    pub pace: Duration,
    pub timeout: Duration,
    /// TLS to the server (`--tls-ca`), else h2c.
    pub tls: Option<Arc<ClientTls>>,
}

pub fn serve(flags: &Flags) -> Result<ExitCode, String> {
    let name: String = flags.optional("name")?.unwrap_or_else(|| "grpc".to_owned());
    crate::run_server(flags, "grpc", &name.clone(), |listener| {
        serve_listener(listener, name, |call| {
            println!("call {}", crate::json_line(call));
        })
    })
}

/// Answers calls on `listener` forever; `log` sees every finished call.
pub async fn serve_listener(
    listener: TcpListener,
    name: String,
    log: impl Fn(&ServedCall) + Send + Sync + 'static,
) {
    let server = Arc::new(Server {
        name,
        seq: AtomicU64::new(0),
        log: Box::new(log),
    });
    crate::accept_loop(listener, move |stream, peer| {
        let server = Arc::clone(&server);
        async move {
            let mut conn = match h2::server::handshake(stream).await {
                Ok(conn) => conn,
                Err(e) => {
                    println!("connection_error peer={peer} error={e}");
                    return;
                }
            };
            while let Some(next) = conn.accept().await {
                match next {
                    Ok((request, respond)) => {
                        let server = Arc::clone(&server);
                        tokio::spawn(async move { server.call(request, respond, peer).await });
                    }
                    Err(e) => {
                        println!("connection_error peer={peer} error={e}");
                        return;
                    }
                }
            }
        }
    })
    .await;
}

struct Server {
    name: String,
    seq: AtomicU64,
    log: Box<dyn Fn(&ServedCall) + Send + Sync>,
}

impl Server {
    async fn call(
        &self,
        request: Request<RecvStream>,
        mut respond: SendResponse<Bytes>,
        peer: SocketAddr,
    ) {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        let (parts, body) = request.into_parts();
        let path = parts.uri.path().to_owned();
        let mut served = ServedCall {
            seq,
            backend: self.name.clone(),
            peer: peer.to_string(),
            path: path.clone(),
            headers: headers_of(&parts.headers),
            messages_received: 0,
            messages_sent: 0,
            grpc_status: 0,
        };
        let method = path
            .strip_prefix('/')
            .and_then(|p| p.split_once('/'))
            .filter(|(service, _)| *service == GRPC_SERVICE)
            .map(|(_, method)| method.to_owned());
        let is_grpc = parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        let outcome = match (is_grpc, method.as_deref()) {
            (false, _) => {
                let mut response = Response::new(());
                *response.status_mut() = StatusCode::UNSUPPORTED_MEDIA_TYPE;
                respond.send_response(response, true).map(|_| ())
            }
            (true, None) => {
                // Trailers-only: the status in the one HEADERS frame that ends the stream.
                served.grpc_status = UNIMPLEMENTED;
                let mut response = self.response_headers();
                status_into(response.headers_mut(), UNIMPLEMENTED, "unknown method");
                respond.send_response(response, true).map(|_| ())
            }
            (true, Some(method)) => {
                let repeat = parts
                    .headers
                    .get("x-repeat")
                    .and_then(|v| v.to_str().ok()?.parse().ok())
                    .unwrap_or(1u64);
                self.echo(method == "Fail", repeat, body, respond, &mut served)
                    .await
            }
        };
        if let Err(e) = outcome {
            println!("call_error seq={seq} peer={peer} error={e}");
        }
        (self.log)(&served);
    }

    async fn echo(
        &self,
        fail: bool,
        repeat: u64,
        mut body: RecvStream,
        mut respond: SendResponse<Bytes>,
        served: &mut ServedCall,
    ) -> Result<(), h2::Error> {
        // Headers at once: a bidi client may wait for them before its second message.
        let mut send = respond.send_response(self.response_headers(), false)?;
        let mut decoder = Decoder::default();
        let mut broken = None;
        while let Some(chunk) = body.data().await {
            let chunk = chunk?;
            let _ = body.flow_control().release_capacity(chunk.len());
            decoder.push(&chunk);
            loop {
                match decoder.next() {
                    Ok(Some(message)) => {
                        served.messages_received += 1;
                        if fail {
                            continue;
                        }
                        for _ in 0..repeat {
                            send.send_data(frame(&message), false)?;
                            served.messages_sent += 1;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        broken = Some(e);
                        break;
                    }
                }
            }
            if broken.is_some() {
                break;
            }
        }
        if broken.is_none() && !decoder.is_empty() {
            broken = Some("the request ended inside a message".to_owned());
        }
        let mut trailers = HeaderMap::new();
        match (broken, fail) {
            (Some(reason), _) => {
                served.grpc_status = INTERNAL;
                status_into(&mut trailers, INTERNAL, &reason);
            }
            (None, true) => {
                served.grpc_status = INTERNAL;
                status_into(&mut trailers, INTERNAL, "failed on purpose");
            }
            (None, false) => status_into(&mut trailers, OK, "ok"),
        }
        let received = format!("received={}", served.messages_received);
        if let Ok(value) = HeaderValue::try_from(received) {
            trailers.insert("x-trailer", value);
        }
        send.send_trailers(trailers)
    }

    fn response_headers(&self) -> Response<()> {
        let mut response = Response::new(());
        let headers = response.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        if let Ok(name) = HeaderValue::try_from(self.name.as_str()) {
            headers.insert(crate::http::X_BACKEND, name);
        }
        response
    }
}

pub fn call(flags: &Flags) -> Result<ExitCode, String> {
    let mode = match flags.required::<String>("mode")?.as_str() {
        "unary" => Mode::Unary,
        "server-stream" => Mode::ServerStream,
        "bidi" => Mode::Bidi,
        other => return Err(format!("--mode {other:?}: unary|server-stream|bidi")),
    };
    let to = flags.required("to")?;
    let options = CallOptions {
        to,
        mode,
        messages: flags.optional("messages")?.unwrap_or(3),
        method: flags.optional("method")?,
        headers: crate::header_flags(flags)?,
        pace: Duration::from_millis(flags.optional("pace-ms")?.unwrap_or(0)),
        timeout: Duration::from_millis(flags.optional("timeout-ms")?.unwrap_or(30_000)),
        tls: ClientTls::from_flags(flags, to, b"h2")?.map(Arc::new),
    };
    let report = crate::runtime()?.block_on(run_call(options));
    println!("report {}", crate::json_line(&report));
    let ok = report.error.is_none() && report.grpc_status.as_deref() == Some("0");
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Makes one call on a connection of its own and reports everything it saw, including how
/// it broke off.
pub async fn run_call(options: CallOptions) -> GrpcCallReport {
    let timeout = options.timeout;
    let mut report = new_report(&options);
    let call = async {
        let client = connect(options.to, options.tls.as_deref()).await?.0;
        exchange(client, &options, &mut report).await
    };
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => report.error = Some(e.message),
        Err(_) => report.error = Some(format!("timeout: the call did not end in {timeout:?}")),
    }
    status_of(&mut report);
    report
}

fn new_report(options: &CallOptions) -> GrpcCallReport {
    let method = options.method.clone().unwrap_or_else(|| {
        match options.mode {
            Mode::Unary => "Unary",
            Mode::ServerStream => "ServerStream",
            Mode::Bidi => "Bidi",
        }
        .to_owned()
    });
    // A method starting with '/' is a whole path (another service's, say).
    let path = if method.starts_with('/') {
        method
    } else {
        format!("/{GRPC_SERVICE}/{method}")
    };
    GrpcCallReport {
        path,
        http_status: None,
        headers: Default::default(),
        trailers: None,
        grpc_status: None,
        grpc_message: None,
        messages_sent: 0,
        messages_received: 0,
        messages: Vec::new(),
        error: None,
    }
}

/// Fills grpc-status and grpc-message from the trailers, or from a trailers-only response.
fn status_of(report: &mut GrpcCallReport) {
    let status_from = report.trailers.as_ref().unwrap_or(&report.headers);
    report.grpc_status = status_from
        .get("grpc-status")
        .and_then(|v| v.first())
        .cloned();
    report.grpc_message = status_from
        .get("grpc-message")
        .and_then(|v| v.first())
        .cloned();
}

/// An h2c connection (a gRPC channel's), and a flag that turns true when it has ended.
async fn connect(
    to: SocketAddr,
    tls: Option<&ClientTls>,
) -> Result<(h2::client::SendRequest<Bytes>, Arc<AtomicBool>), Broke> {
    let stream = TcpStream::connect(to)
        .await
        .map_err(|e| Broke::processed(format!("connect {to}: {e}")))?;
    let _ = stream.set_nodelay(true);
    let stream: Box<dyn crate::http::Io> = match tls {
        None => Box::new(stream),
        Some(tls) => Box::new(tls.connect(stream).await?),
    };
    let (client, connection) = h2::client::handshake(stream)
        .await
        .map_err(|e| Broke::processed(format!("h2 handshake: {e}")))?;
    let ended = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&ended);
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            println!("connection_error error={e}");
        }
        flag.store(true, Ordering::Release);
    });
    Ok((client, ended))
}

/// Why a call broke off. `unprocessed`: the server provably never saw it (its stream was
/// refused, or opened past a GOAWAY), so a client may send it again (RFC 9113 8.7; gRPC
/// clients retry such calls transparently).
#[derive(Debug)]
struct Broke {
    message: String,
    unprocessed: bool,
}

impl Broke {
    fn processed(message: String) -> Self {
        Self {
            message,
            unprocessed: false,
        }
    }

    /// An h2 error before any response came.
    fn unanswered(what: &str, e: &h2::Error) -> Self {
        let refused = e.reason() == Some(h2::Reason::REFUSED_STREAM);
        let past_goaway = e.is_go_away() && e.is_remote();
        Self {
            message: format!("{what}: {e}"),
            unprocessed: refused || past_goaway,
        }
    }
}

impl From<String> for Broke {
    fn from(message: String) -> Self {
        Self::processed(message)
    }
}

async fn exchange(
    client: h2::client::SendRequest<Bytes>,
    options: &CallOptions,
    report: &mut GrpcCallReport,
) -> Result<(), Broke> {
    let (scheme, authority) = match options.tls.as_deref() {
        Some(tls) => (
            "https",
            tls.host().unwrap_or_else(|| options.to.to_string()),
        ),
        None => ("http", options.to.to_string()),
    };
    let mut client = client
        .ready()
        .await
        .map_err(|e| Broke::unanswered("h2", &e))?;
    let mut request = Request::builder()
        .method(Method::POST)
        .uri(format!("{scheme}://{authority}{}", report.path))
        .body(())
        .map_err(|e| format!("bad request: {e}"))?;
    let headers = request.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
    let (sending, repeat) = match options.mode {
        Mode::ServerStream => (1, options.messages),
        Mode::Unary => (1, 1),
        Mode::Bidi => (options.messages, 1),
    };
    if repeat != 1 {
        headers.insert("x-repeat", HeaderValue::from(repeat));
    }
    for (name, value) in &options.headers {
        headers.append(name.clone(), value.clone());
    }
    let (response, mut send) = client
        .send_request(request, false)
        .map_err(|e| Broke::unanswered("send request", &e))?;
    // Ping-pong (each echo awaited before the next message) proves the stream is relayed
    // both ways at once; with another method the messages go out back to back.
    let ping_pong = options.mode == Mode::Bidi && options.method.is_none();
    if ping_pong && sending > 0 {
        send.send_data(frame(&message(0)), false)
            .map_err(|e| Broke::unanswered("send message 0", &e))?;
        report.messages_sent += 1;
        let reader = Reader::new(response_headers(response, report).await?);
        return Ok(ping_pong_rest(options, report, send, reader).await?);
    }
    let mut unsent = None;
    for i in 0..sending {
        if let Err(e) = send.send_data(frame(&message(i)), i + 1 == sending) {
            unsent = Some(Broke::unanswered(&format!("send message {i}"), &e));
            break;
        }
        report.messages_sent += 1;
    }
    if sending == 0
        && let Err(e) = send.send_data(Bytes::new(), true)
    {
        unsent = Some(Broke::unanswered("end request", &e));
    }
    // A server may answer and close the stream before it reads the request (a
    // trailers-only error), and then sending fails. Its answer still counts, as it does for
    // a gRPC client; only when no answer came is the send the error.
    let headers = response_headers(response, report)
        .await
        .map_err(|broke| unsent.unwrap_or(broke))?;
    let mut reader = Reader::new(headers);
    Ok(read_to_end(report, &mut reader).await?)
}

/// `grpc-load`: see `weft_tests::l7::GrpcLoad`.
pub fn load(flags: &Flags) -> Result<ExitCode, String> {
    let call = CallOptions {
        to: flags.required("to")?,
        mode: Mode::Bidi,
        messages: flags.optional("messages")?.unwrap_or(5),
        method: None,
        headers: crate::header_flags(flags)?,
        pace: Duration::from_millis(flags.optional("pace-ms")?.unwrap_or(0)),
        timeout: Duration::from_millis(flags.optional("timeout-ms")?.unwrap_or(30_000)),
        tls: None,
    };
    let count: u64 = flags.required("count")?;
    let concurrency: u64 = flags.optional("concurrency")?.unwrap_or(1);
    let report = crate::runtime()?.block_on(run_load(call, count, concurrency));
    println!("report {}", crate::json_line(&report));
    Ok(if report.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub async fn run_load(call: CallOptions, count: u64, concurrency: u64) -> GrpcLoadReport {
    let call = Arc::new(call);
    let channel = Arc::new(Channel {
        to: call.to,
        current: tokio::sync::Mutex::new(None),
        opened: AtomicU64::new(0),
    });
    let next = Arc::new(AtomicU64::new(0));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for _ in 0..concurrency.clamp(1, count.max(1)) {
        let (call, channel, next, tx) = (
            Arc::clone(&call),
            Arc::clone(&channel),
            Arc::clone(&next),
            tx.clone(),
        );
        tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < count {
                let _ = tx.send(one_call(&channel, &call).await);
            }
        });
    }
    drop(tx);
    let mut report = GrpcLoadReport {
        calls: count,
        ..GrpcLoadReport::default()
    };
    while let Some((outcome, retried)) = rx.recv().await {
        report.retried += u64::from(retried);
        match outcome {
            Ok(()) => report.ok += 1,
            Err((what, message)) => {
                report.failed += 1;
                *report.errors.entry(what.to_owned()).or_default() += 1;
                if report.error_messages.len() < 10 {
                    report.error_messages.push(message);
                }
            }
        }
    }
    report.connections = channel.opened.load(Ordering::Relaxed);
    report
}

/// The one connection every call of a load shares, opened again once it has ended.
struct Channel {
    to: SocketAddr,
    current: tokio::sync::Mutex<Option<(h2::client::SendRequest<Bytes>, Arc<AtomicBool>)>>,
    opened: AtomicU64,
}

impl Channel {
    async fn client(&self) -> Result<(h2::client::SendRequest<Bytes>, Arc<AtomicBool>), Broke> {
        let mut current = self.current.lock().await;
        if let Some((client, ended)) = current.as_ref()
            && !ended.load(Ordering::Acquire)
        {
            return Ok((client.clone(), Arc::clone(ended)));
        }
        let (client, ended) = connect(self.to, None).await?;
        self.opened.fetch_add(1, Ordering::Relaxed);
        *current = Some((client.clone(), Arc::clone(&ended)));
        Ok((client, ended))
    }
}

/// One call of a load, checked: grpc-status 0 and every message echoed in order. A call
/// the server never processed goes once more, on a new connection. Returns the outcome
/// (on failure: what broke, and how) and whether it was sent again.
async fn one_call(
    channel: &Channel,
    options: &CallOptions,
) -> (Result<(), (&'static str, String)>, bool) {
    let mut retried = false;
    loop {
        let mut report = new_report(options);
        let attempt = async {
            let (client, ended) = channel.client().await?;
            let result = exchange(client, options, &mut report).await;
            if result.as_ref().is_err_and(|b| b.unprocessed) {
                // Its server said it takes no more streams: the next call needs another.
                ended.store(true, Ordering::Release);
            }
            result
        };
        let broke = match tokio::time::timeout(options.timeout, attempt).await {
            Ok(Ok(())) => {
                status_of(&mut report);
                return (check(&report, options), retried);
            }
            Ok(Err(broke)) => broke,
            Err(_) => {
                let timeout = options.timeout;
                return (
                    Err(("timeout", format!("the call did not end in {timeout:?}"))),
                    retried,
                );
            }
        };
        if broke.unprocessed && !retried {
            retried = true;
            continue;
        }
        return (Err(("broke", broke.message)), retried);
    }
}

fn check(report: &GrpcCallReport, options: &CallOptions) -> Result<(), (&'static str, String)> {
    if report.grpc_status.as_deref() != Some("0") {
        return Err(("status", format!("grpc-status {:?}", report.grpc_status)));
    }
    let sent: Vec<String> = (0..options.messages)
        .map(|i| String::from_utf8_lossy(&message(i)).into_owned())
        .collect();
    if report.messages != sent {
        return Err((
            "messages",
            format!("sent {sent:?}, echoed {:?}", report.messages),
        ));
    }
    Ok(())
}

/// The bidi loop after the first message: read its echo, send the next, … then end.
async fn ping_pong_rest(
    options: &CallOptions,
    report: &mut GrpcCallReport,
    mut send: h2::SendStream<Bytes>,
    mut reader: Reader,
) -> Result<(), String> {
    while let Some(m) = reader.message().await? {
        record(report, &m);
        let next = report.messages_sent;
        if next == options.messages {
            send.send_data(Bytes::new(), true)
                .map_err(|e| format!("end request: {e}"))?;
            break;
        }
        if !options.pace.is_zero() {
            tokio::time::sleep(options.pace).await;
        }
        send.send_data(frame(&message(next)), false)
            .map_err(|e| format!("send message {next}: {e}"))?;
        report.messages_sent += 1;
    }
    read_to_end(report, &mut reader).await
}

/// The remaining messages, then the trailers.
async fn read_to_end(report: &mut GrpcCallReport, reader: &mut Reader) -> Result<(), String> {
    while let Some(m) = reader.message().await? {
        record(report, &m);
    }
    report.trailers = reader.trailers().await?;
    Ok(())
}

fn record(report: &mut GrpcCallReport, message: &Bytes) {
    report.messages_received += 1;
    report
        .messages
        .push(String::from_utf8_lossy(message).into_owned());
}

fn message(i: u64) -> Bytes {
    Bytes::from(format!("msg-{i}"))
}

async fn response_headers(
    response: h2::client::ResponseFuture,
    report: &mut GrpcCallReport,
) -> Result<RecvStream, Broke> {
    let response = response
        .await
        .map_err(|e| Broke::unanswered("response", &e))?;
    report.http_status = Some(response.status().as_u16());
    report.headers = headers_of(response.headers());
    Ok(response.into_body())
}

/// Reads messages off a response body.
struct Reader {
    body: RecvStream,
    decoder: Decoder,
}

impl Reader {
    fn new(body: RecvStream) -> Self {
        Self {
            body,
            decoder: Decoder::default(),
        }
    }

    /// The next whole message; None at the end of the body.
    async fn message(&mut self) -> Result<Option<Bytes>, String> {
        loop {
            if let Some(message) = self.decoder.next()? {
                return Ok(Some(message));
            }
            match self.body.data().await {
                Some(Ok(chunk)) => {
                    let _ = self.body.flow_control().release_capacity(chunk.len());
                    self.decoder.push(&chunk);
                }
                Some(Err(e)) => return Err(format!("response body: {e}")),
                None if self.decoder.is_empty() => return Ok(None),
                None => return Err("the response ended inside a message".to_owned()),
            }
        }
    }

    async fn trailers(&mut self) -> Result<Option<weft_tests::l7::Headers>, String> {
        let trailers = self
            .body
            .trailers()
            .await
            .map_err(|e| format!("trailers: {e}"))?;
        Ok(trailers.as_ref().map(headers_of))
    }
}

/// Splits a byte stream into gRPC messages.
#[derive(Default)]
struct Decoder {
    buf: BytesMut,
}

impl Decoder {
    fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    fn next(&mut self) -> Result<Option<Bytes>, String> {
        if self.buf.len() < PREFIX_LEN {
            return Ok(None);
        }
        if self.buf[0] != 0 {
            return Err(format!(
                "compressed flag {} (compression is not supported)",
                self.buf[0]
            ));
        }
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if len > MAX_MESSAGE {
            return Err(format!("message of {len} bytes (at most {MAX_MESSAGE})"));
        }
        if self.buf.len() < PREFIX_LEN + len {
            return Ok(None);
        }
        self.buf.advance(PREFIX_LEN);
        Ok(Some(self.buf.split_to(len).freeze()))
    }
}

/// A length-prefixed, uncompressed message.
fn frame(payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(PREFIX_LEN + payload.len());
    out.put_u8(0);
    out.put_u32(u32::try_from(payload.len()).expect("test messages are far below 4 GiB"));
    out.put_slice(payload);
    out.freeze()
}

fn status_into(headers: &mut HeaderMap, code: u32, message: &str) {
    headers.insert("grpc-status", HeaderValue::from(code));
    if let Ok(message) = HeaderValue::try_from(message) {
        headers.insert("grpc-message", message);
    }
}

const PREFIX_LEN: usize = 5;
const MAX_MESSAGE: usize = 4 << 20;
/// grpc status codes (https://grpc.github.io/grpc/core/md_doc_statuscodes.html).
const OK: u32 = 0;
const UNIMPLEMENTED: u32 = 12;
const INTERNAL: u32 = 13;
