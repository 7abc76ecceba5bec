//! `http-serve` and `http-load`: a plaintext HTTP/1.1 + h2c (prior knowledge) backend that
//! echoes each request as JSON, and a load client that reports what answered, in plaintext
//! or over TLS (`--tls-ca`, [`crate::ClientTls`]: HTTP/1.1 or, with `--http2`, h2 by ALPN).

use std::{
    collections::BTreeMap,
    convert::Infallible,
    io,
    net::SocketAddr,
    pin::Pin,
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Either, Full};
use hyper::{
    body::{Body, Frame, Incoming},
    client::conn::{http1, http2},
    service::service_fn,
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use weft_tests::l7::{
    Headers, HeldRequest, HttpLoadReport, Latency, SampleResponse, ServedRequest,
};

use crate::{ClientTls, Flags};

/// How an `http-serve` answers.
#[derive(Clone, Debug, Default)]
pub struct ServeOptions {
    pub name: String,
    /// Every Nth request gets a 503.
    pub fail_every: Option<u64>,
    pub delay: Option<Duration>,
    /// Only requests whose path starts with this are delayed.
    pub delay_path: Option<String>,
}

/// What `http-load` sends.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub to: SocketAddr,
    pub count: u64,
    pub concurrency: u64,
    pub method: Method,
    pub path: String,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub http2: bool,
    pub body_bytes: u64,
    pub slow_body: Option<Duration>,
    /// A pause before each worker's next request (a steady load over a while).
    pub pace: Duration,
    pub timeout: Duration,
    /// TLS to the server (`--tls-ca`), else plaintext.
    pub tls: Option<Arc<ClientTls>>,
    /// A new connection for every request (`--new-connections`), else keep-alive.
    pub new_connections: bool,
}

pub fn serve(flags: &Flags) -> Result<ExitCode, String> {
    let options = ServeOptions {
        name: flags.required("name")?,
        fail_every: flags.optional("fail-every")?,
        delay: flags.optional::<u64>("delay")?.map(Duration::from_millis),
        delay_path: flags.optional("delay-path")?,
    };
    let name = options.name.clone();
    crate::run_server(flags, "http", &name, |listener| {
        serve_listener(listener, options, |served| {
            println!("request {}", crate::json_line(served));
        })
    })
}

/// Answers on `listener` forever; `log` sees every answered request.
pub async fn serve_listener(
    listener: TcpListener,
    options: ServeOptions,
    log: impl Fn(&ServedRequest) + Send + Sync + 'static,
) {
    let backend = Arc::new(Backend {
        options,
        started: Instant::now(),
        seq: AtomicU64::new(0),
        in_flight: AtomicU64::new(0),
        log: Box::new(log),
    });
    crate::accept_loop(listener, move |stream, peer| {
        let backend = Arc::clone(&backend);
        async move {
            let service = service_fn(move |req| {
                let backend = Arc::clone(&backend);
                async move { backend.answer(req, peer).await }
            });
            if let Err(e) = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                println!("connection_error peer={peer} error={e}");
            }
        }
    })
    .await;
}

type Log = Box<dyn Fn(&ServedRequest) + Send + Sync>;

struct Backend {
    options: ServeOptions,
    /// What `received_us` counts from.
    started: Instant,
    seq: AtomicU64,
    /// Requests between arrival and answer.
    in_flight: AtomicU64,
    log: Log,
}

/// Counts a request in flight until dropped.
struct InFlight<'a>(&'a AtomicU64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Backend {
    /// The answer to `req`, or `ResetAsked`: hyper then closes the connection (HTTP/1.1)
    /// or resets the stream (h2) without an answer.
    async fn answer(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Result<Response<Full<Bytes>>, ResetAsked> {
        let received_us = u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX);
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        let in_flight = self.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        let _in_flight = InFlight(&self.in_flight);
        let (parts, mut body) = req.into_parts();
        let mut body_bytes = 0u64;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => {
                    if let Some(data) = frame.data_ref() {
                        body_bytes += data.len() as u64;
                    }
                }
                Err(e) => {
                    println!("body_error seq={seq} peer={peer} error={e}");
                    break;
                }
            }
        }
        let path = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        // Per-request asks (header `x-testapp-*`) win over the server's options.
        let asked = |name: &str| -> Option<u64> {
            parts.headers.get(name)?.to_str().ok()?.trim().parse().ok()
        };
        let delayed = self
            .options
            .delay_path
            .as_ref()
            .is_none_or(|prefix| path.starts_with(prefix.as_str()));
        let delay = asked(ASK_DELAY_MS)
            .map(Duration::from_millis)
            .or(self.options.delay.filter(|_| delayed));
        if let Some(delay) = delay {
            let held = HeldRequest {
                seq,
                path: path.clone(),
            };
            println!("holding {}", crate::json_line(&held));
            tokio::time::sleep(delay).await;
        }
        let fail = self
            .options
            .fail_every
            .is_some_and(|n| n > 0 && seq.is_multiple_of(n));
        let status = match asked(ASK_STATUS)
            .and_then(|code| StatusCode::from_u16(u16::try_from(code).ok()?).ok())
        {
            Some(code) => code,
            None if fail => StatusCode::SERVICE_UNAVAILABLE,
            None => StatusCode::OK,
        };
        let reset = parts.headers.contains_key(ASK_RESET);
        let authority = parts.uri.authority().map(|a| a.to_string()).or_else(|| {
            parts
                .headers
                .get(header::HOST)
                .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
        });
        let served = ServedRequest {
            seq,
            backend: self.options.name.clone(),
            peer: peer.to_string(),
            version: format!("{:?}", parts.version),
            method: parts.method.to_string(),
            path,
            authority,
            headers: headers_of(&parts.headers),
            body_bytes,
            status: if reset { 0 } else { status.as_u16() },
            in_flight,
            received_us,
        };
        // Logged before answering: once a client has its response, the line is there.
        (self.log)(&served);
        if reset {
            return Err(ResetAsked);
        }
        let (body, content_type) = match asked(ASK_RESPONSE_BYTES) {
            Some(n) => (
                Bytes::from(vec![b'x'; usize::try_from(n).unwrap_or(0)]),
                "application/octet-stream",
            ),
            None => (Bytes::from(crate::json_line(&served)), "application/json"),
        };
        let mut response = Response::new(Full::new(body));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        if let Ok(name) = HeaderValue::try_from(self.options.name.as_str()) {
            headers.insert(X_BACKEND, name);
        }
        Ok(response)
    }
}

/// A request asked for no answer (`x-testapp-reset`).
#[derive(Debug)]
struct ResetAsked;

impl std::fmt::Display for ResetAsked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the request asked for a reset")
    }
}

impl std::error::Error for ResetAsked {}

pub fn load(flags: &Flags) -> Result<ExitCode, String> {
    let to = flags.required("to")?;
    let http2 = flags.switch("http2");
    let alpn: &[u8] = if http2 { b"h2" } else { b"http/1.1" };
    let options = LoadOptions {
        to,
        count: flags.required("count")?,
        concurrency: flags.optional("concurrency")?.unwrap_or(1),
        method: flags.optional("method")?.unwrap_or(Method::GET),
        path: flags.optional("path")?.unwrap_or_else(|| "/".to_owned()),
        headers: crate::header_flags(flags)?,
        http2,
        body_bytes: flags.optional("body-bytes")?.unwrap_or(0),
        slow_body: flags
            .optional::<u64>("slow-body-ms")?
            .map(Duration::from_millis),
        pace: Duration::from_millis(flags.optional("pace-ms")?.unwrap_or(0)),
        timeout: Duration::from_millis(flags.optional("timeout-ms")?.unwrap_or(30_000)),
        tls: ClientTls::from_flags(flags, to, alpn)?.map(Arc::new),
        new_connections: flags.switch("new-connections"),
    };
    let report = crate::runtime()?.block_on(run_load(options));
    println!("report {}", crate::json_line(&report));
    Ok(if report.errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Sends `count` requests, `concurrency` at a time, and tallies what came back.
pub async fn run_load(options: LoadOptions) -> HttpLoadReport {
    let started = Instant::now();
    let options = Arc::new(options);
    let next = Arc::new(AtomicU64::new(0));
    let shared_h2 = Arc::new(tokio::sync::Mutex::new(None));
    let (tx, mut rx) = mpsc::unbounded_channel();
    for _ in 0..options.concurrency.clamp(1, options.count.max(1)) {
        let (options, next, shared_h2, tx) = (
            Arc::clone(&options),
            Arc::clone(&next),
            Arc::clone(&shared_h2),
            tx.clone(),
        );
        tokio::spawn(async move {
            let mut h1 = None;
            while next.fetch_add(1, Ordering::Relaxed) < options.count {
                let sent = Instant::now();
                let outcome = match tokio::time::timeout(options.timeout, async {
                    if options.http2 {
                        let sender = h2_sender(&options, &shared_h2).await?;
                        exchange_h2(&options, sender).await
                    } else {
                        exchange_h1(&options, &mut h1).await
                    }
                })
                .await
                {
                    Ok(outcome) => outcome,
                    Err(_) => Err(Failure::new("timeout", "no complete response in time")),
                };
                if outcome.is_err() {
                    // Never reuse a connection in an unknown state.
                    h1 = None;
                }
                let _ = tx.send(outcome.map(|r| (r, sent.elapsed())));
                if !options.pace.is_zero() {
                    tokio::time::sleep(options.pace).await;
                }
            }
        });
    }
    drop(tx);
    let mut tally = Tally::default();
    while let Some(outcome) = rx.recv().await {
        tally.record(outcome);
    }
    let mut report = tally.report(options.count, started.elapsed());
    report.certificates = options
        .tls
        .as_deref()
        .map(ClientTls::seen)
        .unwrap_or_default();
    report
}

#[derive(Debug)]
struct Failure {
    reason: &'static str,
    message: String,
}

impl Failure {
    fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }

    fn http(e: &hyper::Error) -> Self {
        Self::new(classify(e), format!("{e} ({})", source_chain(e)))
    }
}

type ReqBody = Either<Full<Bytes>, ChannelBody>;

async fn connect(to: SocketAddr) -> Result<TcpStream, Failure> {
    let stream = TcpStream::connect(to)
        .await
        .map_err(|e| Failure::new("connect", format!("connect {to}: {e}")))?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// A connection to the server: TCP, and TLS over it when asked.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

async fn open(options: &LoadOptions) -> Result<Box<dyn Io>, Failure> {
    let stream = connect(options.to).await?;
    match &options.tls {
        None => Ok(Box::new(stream)),
        Some(tls) => match tls.connect(stream).await {
            Ok(tls) => Ok(Box::new(tls)),
            Err(e) => Err(Failure::new("tls", e)),
        },
    }
}

/// The `Host` (`:authority`) a request carries unless one is given: the TLS name, else
/// the address dialled.
fn default_host(options: &LoadOptions) -> String {
    options
        .tls
        .as_deref()
        .and_then(ClientTls::host)
        .unwrap_or_else(|| options.to.to_string())
}

async fn exchange_h1(
    options: &LoadOptions,
    conn: &mut Option<http1::SendRequest<ReqBody>>,
) -> Result<SampleResponse, Failure> {
    let kept = match conn.take() {
        Some(mut sender) => sender.ready().await.is_ok().then_some(sender),
        None => None,
    };
    let reused = kept.is_some();
    let mut sender = match kept {
        Some(sender) => sender,
        None => connect_h1(options).await?,
    };
    let request = || -> Result<Request<ReqBody>, Failure> {
        let mut request = build_request(options, options.path.clone())?;
        if !request.headers().contains_key(header::HOST) {
            let host = HeaderValue::try_from(default_host(options))
                .map_err(|e| Failure::new("http", e.to_string()))?;
            request.headers_mut().insert(header::HOST, host);
        }
        Ok(request)
    };
    let response = match sender.try_send_request(request()?).await {
        Ok(response) => response,
        Err(mut e) => {
            // The peer closed the kept-alive connection before the request went out, or
            // (RFC 9110 9.2.2) before any answer to an idempotent one: once more on a new
            // connection, as browsers and Go's client do, not a failure. A server closing an
            // idle connection cannot know a request is already on its way.
            let closed_before_answer = e.error().is_incomplete_message()
                && options.method.is_idempotent()
                && options.slow_body.is_none();
            let again = match e.take_message() {
                Some(request) => Some(request),
                None if closed_before_answer => Some(request()?),
                None => None,
            };
            match again {
                Some(request) if reused => {
                    sender = connect_h1(options).await?;
                    sender
                        .send_request(request)
                        .await
                        .map_err(|e| Failure::http(&e))?
                }
                _ => return Err(Failure::http(e.error())),
            }
        }
    };
    let sample = read_response(response).await?;
    if !options.new_connections {
        *conn = Some(sender);
    }
    Ok(sample)
}

async fn connect_h1(options: &LoadOptions) -> Result<http1::SendRequest<ReqBody>, Failure> {
    let stream = open(options).await?;
    let (sender, connection) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| Failure::http(&e))?;
    tokio::spawn(connection);
    Ok(sender)
}

/// The one h2c connection every worker shares, (re)opened when it is missing or closed.
async fn h2_sender(
    options: &LoadOptions,
    shared: &tokio::sync::Mutex<Option<http2::SendRequest<ReqBody>>>,
) -> Result<http2::SendRequest<ReqBody>, Failure> {
    let mut shared = shared.lock().await;
    if let Some(sender) = shared.as_ref().filter(|s| !s.is_closed()) {
        return Ok(sender.clone());
    }
    let stream = open(options).await?;
    let (sender, connection) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
        .await
        .map_err(|e| Failure::http(&e))?;
    tokio::spawn(connection);
    *shared = Some(sender.clone());
    Ok(sender)
}

async fn exchange_h2(
    options: &LoadOptions,
    mut sender: http2::SendRequest<ReqBody>,
) -> Result<SampleResponse, Failure> {
    // h2: `:authority` comes from the URI; a `host` header given on the command line wins.
    let authority = options
        .headers
        .iter()
        .find(|(n, _)| n == header::HOST)
        .map_or_else(
            || default_host(options),
            |(_, v)| String::from_utf8_lossy(v.as_bytes()).into_owned(),
        );
    let scheme = if options.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let uri = format!("{scheme}://{authority}{}", options.path);
    let mut request = build_request(options, uri)?;
    request.headers_mut().remove(header::HOST);
    sender.ready().await.map_err(|e| Failure::http(&e))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| Failure::http(&e))?;
    read_response(response).await
}

fn build_request(options: &LoadOptions, uri: String) -> Result<Request<ReqBody>, Failure> {
    let body = match options.slow_body {
        None => Either::Left(Full::new(Bytes::from(vec![
            b'x';
            usize::try_from(
                options.body_bytes
            )
            .unwrap_or(0)
        ]))),
        Some(over) => Either::Right(ChannelBody::slow(options.body_bytes, over)),
    };
    let mut request = Request::builder()
        .method(options.method.clone())
        .uri(uri)
        .body(body)
        .map_err(|e| Failure::new("http", format!("bad request: {e}")))?;
    let headers = request.headers_mut();
    for (name, value) in &options.headers {
        headers.append(name.clone(), value.clone());
    }
    if options.slow_body.is_some() {
        headers.insert(
            header::CONTENT_LENGTH,
            HeaderValue::from(options.body_bytes),
        );
    }
    Ok(request)
}

async fn read_response(response: Response<Incoming>) -> Result<SampleResponse, Failure> {
    let (parts, body) = response.into_parts();
    let body = body
        .collect()
        .await
        .map_err(|e| Failure::new("body", format!("{e} ({})", source_chain(&e))))?
        .to_bytes();
    Ok(SampleResponse {
        status: parts.status.as_u16(),
        version: format!("{:?}", parts.version),
        headers: headers_of(&parts.headers),
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// A request body sent in ten pieces spread evenly over a duration (a slow upload).
pub struct ChannelBody(mpsc::Receiver<Bytes>);

impl ChannelBody {
    fn slow(bytes: u64, over: Duration) -> Self {
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(async move {
            let pieces = SLOW_BODY_PIECES.min(bytes.max(1));
            let pause = over / u32::try_from(pieces).unwrap_or(1);
            let mut left = bytes;
            for i in 0..pieces {
                tokio::time::sleep(pause).await;
                let n = if i + 1 == pieces {
                    left
                } else {
                    bytes / pieces
                };
                left -= n;
                let piece = Bytes::from(vec![b'x'; usize::try_from(n).unwrap_or(0)]);
                // The request was given up on: stop feeding it.
                if tx.send(piece).await.is_err() {
                    return;
                }
            }
        });
        Self(rx)
    }
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.get_mut()
            .0
            .poll_recv(cx)
            .map(|piece| piece.map(|b| Ok(Frame::data(b))))
    }
}

#[derive(Default)]
struct Tally {
    completed: u64,
    by_backend: BTreeMap<String, u64>,
    by_status: BTreeMap<u16, u64>,
    latencies: Vec<f64>,
    latencies_by_status: BTreeMap<u16, Vec<f64>>,
    errors: BTreeMap<String, u64>,
    error_messages: Vec<String>,
    first: Option<SampleResponse>,
}

impl Tally {
    fn record(&mut self, outcome: Result<(SampleResponse, Duration), Failure>) {
        match outcome {
            Ok((response, latency)) => {
                self.completed += 1;
                let backend = response.header(X_BACKEND).unwrap_or("").to_owned();
                *self.by_backend.entry(backend).or_default() += 1;
                *self.by_status.entry(response.status).or_default() += 1;
                self.latencies.push(millis(latency));
                self.latencies_by_status
                    .entry(response.status)
                    .or_default()
                    .push(millis(latency));
                self.first.get_or_insert(response);
            }
            Err(failure) => {
                *self.errors.entry(failure.reason.to_owned()).or_default() += 1;
                if self.error_messages.len() < MAX_ERROR_MESSAGES {
                    self.error_messages
                        .push(format!("{}: {}", failure.reason, failure.message));
                }
            }
        }
    }

    fn report(mut self, sent: u64, elapsed: Duration) -> HttpLoadReport {
        HttpLoadReport {
            sent,
            completed: self.completed,
            by_backend: self.by_backend,
            by_status: self.by_status,
            latency_ms: latency(&mut self.latencies),
            latency_by_status_ms: self
                .latencies_by_status
                .into_iter()
                .map(|(status, mut values)| (status, latency(&mut values)))
                .collect(),
            errors: self.errors,
            error_messages: self.error_messages,
            first: self.first,
            duration_ms: millis(elapsed),
            certificates: Vec::new(),
        }
    }
}

/// Percentiles of `values` (sorted here).
fn latency(values: &mut [f64]) -> Latency {
    values.sort_by(f64::total_cmp);
    Latency {
        p50: percentile(values, 50),
        p99: percentile(values, 99),
        max: values.last().copied().unwrap_or(0.0),
    }
}

/// Milliseconds, to the microsecond.
fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

/// Nearest rank of sorted values.
fn percentile(sorted: &[f64], p: usize) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p * sorted.len()).div_ceil(100).max(1);
    sorted[rank.min(sorted.len()) - 1]
}

/// `reset` when the peer (or a proxy) closed or reset the connection or stream, `timeout`,
/// else `http`.
fn classify(e: &hyper::Error) -> &'static str {
    if e.is_timeout() {
        return "timeout";
    }
    if e.is_incomplete_message() || e.is_canceled() || e.is_closed() {
        return "reset";
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<io::Error>()
            && matches!(
                io.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::UnexpectedEof
                    | io::ErrorKind::ConnectionAborted
            )
        {
            return "reset";
        }
        if let Some(h2) = s.downcast_ref::<h2::Error>()
            && (h2.is_reset() || h2.is_go_away() || h2.is_io())
        {
            return "reset";
        }
        source = s.source();
    }
    "http"
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut out = Vec::new();
    let mut source = e.source();
    while let Some(s) = source {
        out.push(s.to_string());
        source = s.source();
    }
    out.join(": ")
}

pub fn headers_of(map: &HeaderMap) -> Headers {
    let mut headers = Headers::new();
    for (name, value) in map {
        headers
            .entry(name.as_str().to_owned())
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    headers
}

pub const X_BACKEND: &str = "x-backend";
/// Request headers that ask `http-serve` for one answer: this status, after this delay,
/// with a body of this many bytes instead of the echo.
const ASK_STATUS: &str = "x-testapp-status";
const ASK_DELAY_MS: &str = "x-testapp-delay-ms";
const ASK_RESPONSE_BYTES: &str = "x-testapp-response-bytes";
/// A request header (any value) that asks `http-serve` to close the connection (reset the
/// h2 stream) instead of answering.
const ASK_RESET: &str = "x-testapp-reset";
const SLOW_BODY_PIECES: u64 = 10;
const MAX_ERROR_MESSAGES: usize = 10;
