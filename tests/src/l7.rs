//! Typed wrappers around the L7 commands of `weft-testapp` (HTTP/1.1, h2c and gRPC apps for
//! the waypoint tests), and the report types the app prints: the binary serializes these
//! very structs, so the shapes cannot drift.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! # let (client, v1): (weft_tests::TestPod, weft_tests::TestPod) = todo!();
//! use weft_tests::l7::{self, HttpLoad, HttpServe};
//! let backend = l7::http_serve(&v1, &HttpServe::new(8080, "v1").fail_every(2))?;
//! let report = HttpLoad::new("10.96.0.10:80".parse()?, 2_000)
//!     .concurrency(8)
//!     .header("x-canary", "1")
//!     .run(&client)?;
//! assert_eq!(report.by_backend.get("v1"), Some(&2_000));
//! assert_eq!(backend.requests().len(), 2_000);
//! # Ok(()) }
//! ```
//!
//! Every event line the app prints is `<word> <json>`: `listening {..}`, `request {..}`
//! (one per request an `http-serve` answered), `call {..}` (one per `grpc-serve` call),
//! `report {..}` (the client's summary, last).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::{
    app::testapp_bin,
    eventually::{assert_eventually, scaled},
    pod::TestPod,
    process::{Finished, Spawn, TestProcess},
};

/// Header names and values as received (names lowercase; repeated headers keep every value
/// in order).
pub type Headers = BTreeMap<String, Vec<String>>;

/// One request an `http-serve` answered: the JSON body of its response and its log line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServedRequest {
    /// 1 for the server's first request.
    pub seq: u64,
    /// The server's `--name` (also the `x-backend` response header).
    pub backend: String,
    /// The TCP peer of the request's connection.
    pub peer: String,
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub version: String,
    pub method: String,
    /// Path and query, as the request line (or `:path`) had them.
    pub path: String,
    /// `:authority` (HTTP/2) or the `Host` header (HTTP/1.1).
    pub authority: Option<String>,
    pub headers: Headers,
    pub body_bytes: u64,
    /// What the server answered: 200, or 503 for a `--fail-every` turn, or the status the
    /// request asked for; 0 when it asked for no answer (`x-testapp-reset`: the connection
    /// was closed instead).
    pub status: u16,
    /// Requests the server was answering when this one arrived, this one included.
    #[serde(default)]
    pub in_flight: u64,
    /// When the request's head arrived, in microseconds since the server started.
    #[serde(default)]
    pub received_us: u64,
}

/// A request `http-serve` holds (`--delay`, or asked for) before answering: printed as
/// `holding {..}` as the hold starts, so a test knows the request is in flight.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldRequest {
    /// The `seq` its `ServedRequest` will have.
    pub seq: u64,
    pub path: String,
}

/// What `http-load` saw.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HttpLoadReport {
    /// Requests attempted (`--count`).
    pub sent: u64,
    /// Requests that got a complete response, whatever its status.
    pub completed: u64,
    /// Completed responses by `x-backend` value; `""` for responses without one (a proxy's
    /// own 503 or 504, a redirect).
    pub by_backend: BTreeMap<String, u64>,
    /// Completed responses by status code.
    pub by_status: BTreeMap<u16, u64>,
    /// Latency of completed requests (first byte out to last byte in).
    pub latency_ms: Latency,
    /// The same, by status code.
    #[serde(default)]
    pub latency_by_status_ms: BTreeMap<u16, Latency>,
    /// Requests that got no complete response, by reason: `connect`, `reset`, `timeout`,
    /// `http` (a protocol error), `body` (the response body broke off).
    pub errors: BTreeMap<String, u64>,
    /// The first few error messages, for the test's failure message.
    pub error_messages: Vec<String>,
    /// The first completed response in full.
    pub first: Option<SampleResponse>,
    /// Wall time of the whole run.
    pub duration_ms: f64,
    /// Over TLS: the SHA-256 fingerprint ([`crate::tls::fingerprint`]) of the certificate
    /// the server presented on each handshake, in order (verified or not).
    #[serde(default)]
    pub certificates: Vec<String>,
}

/// Latency percentiles (nearest rank), milliseconds; all 0 when nothing completed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

/// One response as the client received it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SampleResponse {
    pub status: u16,
    pub version: String,
    pub headers: Headers,
    /// The body (UTF-8, lossy).
    pub body: String,
}

/// What `grpc-call` saw.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrpcCallReport {
    /// `/weft.test.Echo/<Method>`.
    pub path: String,
    /// The HTTP/2 `:status` of the response, if one arrived.
    pub http_status: Option<u16>,
    /// The response headers exactly as received.
    pub headers: Headers,
    /// The trailers exactly as received; None if the stream ended without any (or the
    /// status came in a trailers-only response: then it is in `headers`).
    pub trailers: Option<Headers>,
    /// `grpc-status`, from the trailers or a trailers-only response.
    pub grpc_status: Option<String>,
    /// `grpc-message`, likewise.
    pub grpc_message: Option<String>,
    pub messages_sent: u64,
    pub messages_received: u64,
    /// The received messages' payloads (UTF-8, lossy), in order.
    pub messages: Vec<String>,
    /// Why the call broke off (connect error, reset stream, malformed frame), if it did.
    pub error: Option<String>,
}

/// One call a `grpc-serve` answered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServedCall {
    pub seq: u64,
    pub backend: String,
    pub peer: String,
    pub path: String,
    pub headers: Headers,
    pub messages_received: u64,
    pub messages_sent: u64,
    pub grpc_status: u32,
}

/// Options of `http-serve`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpServe {
    pub port: u16,
    pub name: String,
    pub fail_every: Option<u64>,
    pub delay: Option<Duration>,
    pub delay_path: Option<String>,
}

/// An `http-serve` running in a pod.
pub struct HttpServer {
    pub process: TestProcess,
    pub port: u16,
    pub name: String,
}

/// Options of `http-load` (a builder: `HttpLoad::new(to, count).concurrency(8).run(&pod)`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpLoad {
    pub to: SocketAddr,
    pub count: u64,
    pub concurrency: u64,
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub http2: bool,
    pub body_bytes: u64,
    pub slow_body: Option<Duration>,
    pub pace: Duration,
    pub timeout: Duration,
    pub tls: Option<ClientTls>,
    pub new_connections: bool,
}

/// The TLS an L7 client opens (`--tls-ca`, `--sni`): trusting only the CA in `ca` (PEM),
/// checking the server's certificate against `sni` (sent as SNI), else against the address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientTls {
    pub ca: PathBuf,
    pub sni: Option<String>,
}

/// An `http-load` or a `grpc-load` still running (see [`HttpLoad::start`],
/// [`GrpcLoad::start`]); [`RunningLoad::finish`] parses its report.
pub struct RunningLoad<R = HttpLoadReport> {
    process: TestProcess,
    timeout: Duration,
    report: std::marker::PhantomData<R>,
}

/// `grpc-load`: `count` bidi calls of `messages` ping-pongs each (`pace` before every
/// message after the first, so calls stay open a while), `concurrency` at a time, all on
/// one h2c connection as a gRPC channel multiplexes them; a new connection once the server
/// ends it (GOAWAY), and a call the server never processed sent once more, as gRPC clients
/// retry transparently.
#[derive(Clone, Debug)]
pub struct GrpcLoad {
    pub to: SocketAddr,
    pub count: u64,
    pub concurrency: u64,
    pub messages: u64,
    pub pace: Duration,
    pub timeout: Duration,
}

/// What `grpc-load` saw.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrpcLoadReport {
    pub calls: u64,
    /// Calls that ended with grpc-status 0 and every message echoed exactly.
    pub ok: u64,
    pub failed: u64,
    /// Calls sent once more because the server never processed the first attempt.
    pub retried: u64,
    /// h2c connections opened.
    pub connections: u64,
    /// Failures by what broke (`response`, `status`, `messages`, `timeout`, ...).
    pub errors: BTreeMap<String, u64>,
    /// The first few failures in full.
    pub error_messages: Vec<String>,
}

/// Which RPC shape `grpc-call` makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrpcMode {
    /// One message each way (`/weft.test.Echo/Unary`).
    Unary,
    /// One request, `messages` responses (`/weft.test.Echo/ServerStream`).
    ServerStream,
    /// `messages` ping-pongs on one stream (`/weft.test.Echo/Bidi`).
    Bidi,
}

/// Options of `grpc-call`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrpcCall {
    pub to: SocketAddr,
    pub mode: GrpcMode,
    pub messages: u64,
    /// Overrides the method name (`Fail` answers grpc-status 13); a value starting with `/`
    /// is a whole path (another service's: trailers-only grpc-status 12).
    pub method: Option<String>,
    pub headers: Vec<(String, String)>,
    pub timeout: Duration,
    pub tls: Option<ClientTls>,
}

/// A `grpc-serve` running in a pod.
pub struct GrpcServer {
    pub process: TestProcess,
    pub port: u16,
}

impl ServedRequest {
    /// The first value of a request header.
    pub fn header(&self, name: &str) -> Option<&str> {
        first_value(&self.headers, name)
    }
}

impl SampleResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        first_value(&self.headers, name)
    }

    /// The backend's echo of the request, when the body is one.
    pub fn echo(&self) -> Option<ServedRequest> {
        serde_json::from_str(&self.body).ok()
    }
}

impl HttpLoadReport {
    /// Completed responses with this status.
    pub fn status(&self, code: u16) -> u64 {
        self.by_status.get(&code).copied().unwrap_or(0)
    }

    /// Completed responses from this backend.
    pub fn backend(&self, name: &str) -> u64 {
        self.by_backend.get(name).copied().unwrap_or(0)
    }

    /// Requests without a complete response.
    pub fn failed(&self) -> u64 {
        self.errors.values().sum()
    }
}

impl GrpcCallReport {
    pub fn header(&self, name: &str) -> Option<&str> {
        first_value(&self.headers, name)
    }

    pub fn trailer(&self, name: &str) -> Option<&str> {
        first_value(self.trailers.as_ref()?, name)
    }
}

impl HttpServe {
    pub fn new(port: u16, name: &str) -> Self {
        Self {
            port,
            name: name.to_owned(),
            fail_every: None,
            delay: None,
            delay_path: None,
        }
    }

    /// Answer 503 to every `n`th request (2: every other one).
    pub fn fail_every(mut self, n: u64) -> Self {
        self.fail_every = Some(n);
        self
    }

    /// Wait this long before answering (only requests under `delay_path`, if set).
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self
    }

    pub fn delay_path(mut self, prefix: &str) -> Self {
        self.delay_path = Some(prefix.to_owned());
        self
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(testapp_bin());
        cmd.args(["http-serve", "--port", &self.port.to_string()]);
        cmd.args(["--name", &self.name]);
        if let Some(n) = self.fail_every {
            cmd.args(["--fail-every", &n.to_string()]);
        }
        if let Some(delay) = self.delay {
            cmd.args(["--delay", &delay.as_millis().to_string()]);
        }
        if let Some(path) = &self.delay_path {
            cmd.args(["--delay-path", path]);
        }
        cmd
    }
}

/// Starts `http-serve` in the pod and waits until it listens.
pub fn http_serve(pod: &TestPod, options: &HttpServe) -> Result<HttpServer> {
    let process = pod.spawn(options.command(), &format!("http-serve-{}", options.port))?;
    wait_listening(&process);
    Ok(HttpServer {
        process,
        port: options.port,
        name: options.name.clone(),
    })
}

impl HttpServer {
    /// Every request answered so far, in order.
    pub fn requests(&self) -> Vec<ServedRequest> {
        events(&self.process, "request")
    }

    /// Every request that was held before its answer (answered since or not), in order.
    pub fn held(&self) -> Vec<HeldRequest> {
        events(&self.process, "holding")
    }

    /// Waits until at least `n` requests were answered (a mirror's copies arrive a little
    /// after the client's answers), and returns them all.
    #[track_caller]
    pub fn wait_requests(&self, n: usize) -> Vec<ServedRequest> {
        assert_eventually(Duration::from_secs(30), || {
            let requests = self.requests();
            if requests.len() >= n {
                Ok(requests)
            } else {
                Err(format!(
                    "backend {} answered {} of {n} requests",
                    self.name,
                    requests.len()
                ))
            }
        })
    }
}

impl HttpLoad {
    pub fn new(to: SocketAddr, count: u64) -> Self {
        Self {
            to,
            count,
            concurrency: 1,
            method: "GET".to_owned(),
            path: "/".to_owned(),
            headers: Vec::new(),
            http2: false,
            body_bytes: 0,
            slow_body: None,
            pace: Duration::ZERO,
            timeout: scaled(Duration::from_secs(30)),
            tls: None,
            new_connections: false,
        }
    }

    pub fn concurrency(mut self, c: u64) -> Self {
        self.concurrency = c;
        self
    }

    /// Over TLS (HTTP/1.1, or h2 with [`HttpLoad::http2`], by ALPN): see [`ClientTls`].
    pub fn tls(mut self, ca: &Path, sni: Option<&str>) -> Self {
        self.tls = Some(ClientTls::new(ca, sni));
        self
    }

    /// A new connection (and TLS handshake) for every request instead of keep-alive.
    pub fn new_connections(mut self) -> Self {
        self.new_connections = true;
        self
    }

    pub fn method(mut self, method: &str) -> Self {
        self.method = method.to_owned();
        self
    }

    pub fn path(mut self, path: &str) -> Self {
        self.path = path.to_owned();
        self
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// h2c with prior knowledge instead of HTTP/1.1.
    pub fn http2(mut self) -> Self {
        self.http2 = true;
        self
    }

    /// A request body of `n` bytes, sent over `over` when given (a slow upload).
    pub fn body(mut self, n: u64, over: Option<Duration>) -> Self {
        self.body_bytes = n;
        self.slow_body = over;
        self
    }

    /// A pause before each worker's next request.
    pub fn pace(mut self, pace: Duration) -> Self {
        self.pace = pace;
        self
    }

    /// Per-request timeout of the client.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Runs the load to completion and parses its report. A non-zero exit is not an error
    /// here: the report says what failed.
    pub fn run(&self, at: &impl Spawn) -> Result<HttpLoadReport> {
        let done = at.run(self.command(), "http-load", self.deadline())?;
        report(&done)
    }

    /// Starts the load in the background (long requests in flight while the test changes
    /// something); [`RunningLoad::finish`] collects the report.
    pub fn start(&self, at: &impl Spawn) -> Result<RunningLoad> {
        Ok(RunningLoad {
            process: at.spawn(self.command(), "http-load")?,
            timeout: self.deadline(),
            report: std::marker::PhantomData,
        })
    }

    fn deadline(&self) -> Duration {
        load_deadline(self.count, self.concurrency, self.timeout)
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(testapp_bin());
        cmd.args(["http-load", "--to", &self.to.to_string()]);
        cmd.args(["--count", &self.count.to_string()]);
        cmd.args(["--concurrency", &self.concurrency.to_string()]);
        cmd.args(["--method", &self.method, "--path", &self.path]);
        for (name, value) in &self.headers {
            cmd.args(["--header", &format!("{name}:{value}")]);
        }
        if self.http2 {
            cmd.arg("--http2");
        }
        if self.body_bytes > 0 {
            cmd.args(["--body-bytes", &self.body_bytes.to_string()]);
        }
        if let Some(over) = self.slow_body {
            cmd.args(["--slow-body-ms", &over.as_millis().to_string()]);
        }
        if !self.pace.is_zero() {
            cmd.args(["--pace-ms", &self.pace.as_millis().to_string()]);
        }
        cmd.args(["--timeout-ms", &self.timeout.as_millis().to_string()]);
        if let Some(tls) = &self.tls {
            tls.add_args(&mut cmd);
        }
        if self.new_connections {
            cmd.arg("--new-connections");
        }
        cmd
    }
}

impl ClientTls {
    pub fn new(ca: &Path, sni: Option<&str>) -> Self {
        Self {
            ca: ca.to_path_buf(),
            sni: sni.map(str::to_owned),
        }
    }

    fn add_args(&self, cmd: &mut Command) {
        cmd.arg("--tls-ca").arg(&self.ca);
        if let Some(sni) = &self.sni {
            cmd.args(["--sni", sni]);
        }
    }
}

impl<R: DeserializeOwned> RunningLoad<R> {
    /// Whether it still runs (a test checks the load outlived what it did).
    pub fn running(&mut self) -> bool {
        self.process.try_status().is_none()
    }

    /// Waits for the load to end and parses its report.
    pub fn finish(mut self) -> Result<R> {
        let done = self.process.wait(self.timeout)?;
        report(&done)
    }
}

impl GrpcLoad {
    pub fn new(to: SocketAddr, count: u64) -> Self {
        Self {
            to,
            count,
            concurrency: 1,
            messages: 5,
            pace: Duration::ZERO,
            timeout: scaled(Duration::from_secs(30)),
        }
    }

    pub fn concurrency(mut self, c: u64) -> Self {
        self.concurrency = c;
        self
    }

    /// Each call's ping-pongs, `pace` apart.
    pub fn messages(mut self, n: u64, pace: Duration) -> Self {
        self.messages = n;
        self.pace = pace;
        self
    }

    /// Starts the load in the background; [`RunningLoad::finish`] collects the report.
    pub fn start(&self, pod: &TestPod) -> Result<RunningLoad<GrpcLoadReport>> {
        let mut cmd = Command::new(testapp_bin());
        cmd.args(["grpc-load", "--to", &self.to.to_string()]);
        cmd.args(["--count", &self.count.to_string()]);
        cmd.args(["--concurrency", &self.concurrency.to_string()]);
        cmd.args(["--messages", &self.messages.to_string()]);
        cmd.args(["--pace-ms", &self.pace.as_millis().to_string()]);
        cmd.args(["--timeout-ms", &self.timeout.as_millis().to_string()]);
        Ok(RunningLoad {
            process: pod.spawn(cmd, "grpc-load")?,
            timeout: load_deadline(self.count, self.concurrency, self.timeout),
            report: std::marker::PhantomData,
        })
    }
}

/// Starts `grpc-serve` in the pod and waits until it listens.
pub fn grpc_serve(pod: &TestPod, port: u16, name: &str) -> Result<GrpcServer> {
    let mut cmd = Command::new(testapp_bin());
    cmd.args(["grpc-serve", "--port", &port.to_string(), "--name", name]);
    let process = pod.spawn(cmd, &format!("grpc-serve-{port}"))?;
    wait_listening(&process);
    Ok(GrpcServer { process, port })
}

impl GrpcServer {
    /// Every call answered so far, in order.
    pub fn calls(&self) -> Vec<ServedCall> {
        events(&self.process, "call")
    }
}

impl GrpcCall {
    pub fn new(to: SocketAddr, mode: GrpcMode) -> Self {
        Self {
            to,
            mode,
            messages: 3,
            method: None,
            headers: Vec::new(),
            timeout: scaled(Duration::from_secs(30)),
            tls: None,
        }
    }

    /// Over TLS (h2 by ALPN): see [`ClientTls`].
    pub fn tls(mut self, ca: &Path, sni: Option<&str>) -> Self {
        self.tls = Some(ClientTls::new(ca, sni));
        self
    }

    pub fn messages(mut self, n: u64) -> Self {
        self.messages = n;
        self
    }

    /// Calls `/weft.test.Echo/<method>` instead of the mode's own (`Fail`: status 13).
    pub fn method(mut self, method: &str) -> Self {
        self.method = Some(method.to_owned());
        self
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Makes the call and parses its report (a failed call is a report, not an error).
    pub fn run(&self, at: &impl Spawn) -> Result<GrpcCallReport> {
        let mut cmd = Command::new(testapp_bin());
        cmd.args(["grpc-call", "--to", &self.to.to_string(), "--mode"]);
        cmd.arg(match self.mode {
            GrpcMode::Unary => "unary",
            GrpcMode::ServerStream => "server-stream",
            GrpcMode::Bidi => "bidi",
        });
        cmd.args(["--messages", &self.messages.to_string()]);
        if let Some(method) = &self.method {
            cmd.args(["--method", method]);
        }
        for (name, value) in &self.headers {
            cmd.args(["--header", &format!("{name}:{value}")]);
        }
        cmd.args(["--timeout-ms", &self.timeout.as_millis().to_string()]);
        if let Some(tls) = &self.tls {
            tls.add_args(&mut cmd);
        }
        let done = at.run(
            cmd,
            "grpc-call",
            self.timeout + scaled(Duration::from_secs(30)),
        )?;
        report(&done)
    }
}

/// Parses the `<word> <json>` lines of a process's output.
pub fn parse_events<T: DeserializeOwned>(output: &str, word: &str) -> Vec<T> {
    let prefix = format!("{word} ");
    output
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|json| serde_json::from_str(json).ok())
        .collect()
}

fn events<T: DeserializeOwned>(process: &TestProcess, word: &str) -> Vec<T> {
    parse_events(&process.output(), word)
}

/// How long a load may run: every request or call may take up to its timeout,
/// `concurrency` at a time.
fn load_deadline(count: u64, concurrency: u64, timeout: Duration) -> Duration {
    let rounds = count.div_ceil(concurrency.max(1)).max(1);
    let rounds = u32::try_from(rounds).unwrap_or(u32::MAX);
    scaled(Duration::from_secs(60)) + timeout.saturating_mul(rounds)
}

fn report<T: DeserializeOwned>(done: &Finished) -> Result<T> {
    let Some(line) = done
        .output
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("report "))
    else {
        bail!("no report ({}):\n{}", done.status, done.output);
    };
    serde_json::from_str(line).with_context(|| format!("parse report:\n{}", done.output))
}

#[track_caller]
fn wait_listening(process: &TestProcess) {
    assert_eventually(Duration::from_secs(10), || {
        if process
            .output()
            .lines()
            .any(|l| l.starts_with("listening "))
        {
            Ok(())
        } else {
            Err(format!("not listening yet: {:?}", process.output()))
        }
    });
}

fn first_value<'a>(headers: &'a Headers, name: &str) -> Option<&'a str> {
    headers
        .get(&name.to_ascii_lowercase())
        .and_then(|v| v.first())
        .map(String::as_str)
}

pub const GRPC_SERVICE: &str = "weft.test.Echo";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_lines_parse_and_other_lines_are_skipped() {
        let output = "listening addr=0.0.0.0:8080 name=v1 protocol=http\n\
            request {\"seq\":1,\"backend\":\"v1\",\"peer\":\"10.1.1.2:4000\",\"version\":\"HTTP/1.1\",\
            \"method\":\"GET\",\"path\":\"/a?b=1\",\"authority\":\"svc:80\",\
            \"headers\":{\"x-a\":[\"1\",\"2\"]},\"body_bytes\":0,\"status\":503}\n\
            connection_error peer=10.1.1.2:4000 error=reset\n\
            request {not json}\n";
        let requests: Vec<ServedRequest> = parse_events(output, "request");
        assert_eq!(requests.len(), 1);
        assert_eq!(requests[0].status, 503);
        assert_eq!(requests[0].header("X-A"), Some("1"));
    }

    #[test]
    fn load_command_carries_every_option() {
        let load = HttpLoad::new("10.96.0.1:80".parse().unwrap(), 10)
            .concurrency(3)
            .method("POST")
            .path("/slow")
            .header("x-canary", "1")
            .http2()
            .body(100, Some(Duration::from_millis(500)))
            .timeout(Duration::from_secs(2));
        let cmd = load.command();
        let args: Vec<_> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let joined = args.join(" ");
        assert_eq!(
            joined,
            "http-load --to 10.96.0.1:80 --count 10 --concurrency 3 --method POST --path /slow \
             --header x-canary:1 --http2 --body-bytes 100 --slow-body-ms 500 --timeout-ms 2000"
        );
        // 4 rounds of at most 2 s each, plus slack.
        assert!(load.deadline() >= Duration::from_secs(8));
    }
}
