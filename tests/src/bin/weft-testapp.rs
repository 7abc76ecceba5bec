//! A small TCP application for the end-to-end tests: the "app" inside a simulated pod.
//!
//! The TCP commands are deliberately plain (std only, one thread per connection) so that
//! whatever a test observes is the mesh's doing, not the app's. Every command prints
//! machine-readable lines on stdout, one line per event; the harness parses them.
//!
//! ```text
//! weft-testapp serve   --port P [--bind IP] [--mode echo|hash]
//! weft-testapp send    --to IP:PORT (--bytes N [--seed S] [--duration-ms D] | --text T) [--timeout-ms T]
//! weft-testapp conns   --to IP:PORT [--count 200] [--timeout-ms T]
//! weft-testapp churn   --to IP:PORT [--count 500] [--timeout-ms T]
//! weft-testapp connect --to IP:PORT [--timeout-ms T]
//! weft-testapp sink    --port P
//! weft-testapp hold    --to IP:PORT --count N [--settle-ms S] [--threads T] [--timeout-ms T] [--payload-hex H]
//! weft-testapp hammer  --to IP:PORT [--count 1000] [--duration-ms D] [--payload-hex H] [--timeout-ms T]
//! weft-testapp streams --to IP:PORT --count N --duration-ms D [--chunk B] [--interval-ms I] [--seed S] [--timeout-ms T]
//! weft-testapp connect-loop --to IP:PORT --duration-ms D [--timeout-ms T]
//! weft-testapp http-serve --port P --name NAME [--bind IP] [--fail-every N] [--delay MS] [--delay-path PREFIX]
//! weft-testapp http-load  --to IP:PORT --count N [--concurrency C] [--method M] [--path P]
//!                         [--header name:value]... [--http2] [--body-bytes B] [--slow-body-ms MS]
//!                         [--pace-ms MS] [--timeout-ms T] [--tls-ca PEM [--sni NAME]] [--new-connections]
//! weft-testapp grpc-serve --port P [--name NAME] [--bind IP]
//! weft-testapp grpc-call  --to IP:PORT --mode unary|server-stream|bidi [--messages N] [--method M]
//!                         [--header name:value]... [--pace-ms MS] [--timeout-ms T] [--tls-ca PEM [--sni NAME]]
//! weft-testapp grpc-load  --to IP:PORT --count N [--concurrency C] [--messages M] [--pace-ms MS]
//!                         [--header name:value]... [--timeout-ms T]
//! weft-testapp https-serve --port P --cert PEM --key PEM --file F [--bind IP]
//! weft-testapp https-get   --to IP:PORT --ca PEM [--sni NAME] [--path P]
//! ```
//!
//! - `serve` prints `listening ...`, then per connection `accepted peer=.. local=..` and
//!   `closed peer=.. received_bytes=N received_sha256=H sent_bytes=M`. In `echo` mode it
//!   echoes until the client's FIN, then closes its side. In `hash` mode it reads until the
//!   client's FIN, then answers one line `bytes=N sha256=H peer=IP:PORT` and closes: a reply
//!   can only arrive if the half-close crossed the path intact.
//! - `send` writes N pseudo-random bytes (seeded; spread evenly over `--duration-ms` when
//!   given, to keep one connection busy for that long) or the given text, shuts down its write side, reads the reply
//!   until EOF, and prints `local IP:PORT` and `peer IP:PORT` (its socket's own view),
//!   `sent bytes=N sha256=H`, `received bytes=M sha256=H` and, for a short text reply,
//!   `reply <text>`.
//! - `conns` opens `count` connections at once, then sends a distinct payload on each and
//!   checks each echo: `ok count=N` or `failed ...` (exit 1).
//! - `churn` does the same one connection after another: open, check the echo, close
//!   (short-lived connections, as pooling tests want).
//! - `connect` exits 0 (`connected ...`) once the TCP handshake completes, or 1 with
//!   `error kind=<ErrorKind>`: fail-closed tests expect `ConnectionRefused` or `TimedOut`.
//! - `sink` and `hold` (`flood` module): many idle connections (hostile-input tests).
//! - `hammer` is a hostile pod's tight loop: connect, write the payload (if any), close at
//!   once, again, until `count` attempts or `duration-ms` have passed; then
//!   `hammered attempts=N connected=M failed=F`. Always exits 0: failures are the point.
//! - `streams` and `connect-loop` (`steady` module): long-lived exact echo streams and a
//!   connect loop, counting what a restart or upgrade of the mesh cost.
//!
//! Those print `key=value` lines. The L7 commands (for the waypoint tests) run on tokio and print `<word> <json>` lines
//! whose JSON is a `weft_tests::l7` type (the harness parses them with the same structs):
//!
//! - `http-serve` (`http` module): HTTP/1.1 and h2c on one port. Every response carries
//!   `x-backend: NAME` and a JSON body echoing the request (`ServedRequest`); the same is
//!   printed as `request {..}` before answering. `--fail-every N` answers 503 to every Nth
//!   request; `--delay` holds answers (only under `--delay-path`, if given), printing
//!   `holding {..}` (`HeldRequest`) as each hold starts. A request
//!   can ask for its own answer with headers `x-testapp-status: 502`,
//!   `x-testapp-delay-ms: 800`, `x-testapp-response-bytes: 4096` (a body of that many
//!   bytes instead of the echo).
//! - `http-load`: N requests, C at a time (HTTP/1.1 keep-alive connections, or one h2c
//!   connection with `--http2`), then `report {..}` (`HttpLoadReport`): counts by
//!   `x-backend` and status, latency, errors by reason, and over TLS the certificate of
//!   every handshake. Exit 1 if any request got no response. `--new-connections`: one
//!   connection per request instead of keep-alive.
//! - `grpc-serve` / `grpc-call` (`grpc` module): gRPC over h2c, no gRPC library; the server
//!   prints `call {..}` (`ServedCall`), the client `report {..}` (`GrpcCallReport`) and
//!   exits 1 unless grpc-status was 0. `grpc-load`: N bidi calls, C at a time, on one
//!   shared h2c connection (`weft_tests::l7::GrpcLoad`); prints `report {..}`
//!   (`GrpcLoadReport`), exit 1 if any call failed.
//! - `https-serve` (`https` module): TLS 1.3 (h2 or HTTP/1.1 by ALPN), answering every
//!   request, whatever its path, with the file's content as it is then
//!   (`content-type: application/json`), and printing `fetch {..}`
//!   (`weft_tests::jwt::ServedFile`): the JWKS endpoint of the JWT tests, and the external
//!   hosts of the egress tests, which also print what they saw of each connection
//!   (`accepted`, `hello` with the SNI, `tls_error`). `https-get` is their client in a pod.

#![allow(
    clippy::disallowed_types,
    reason = "a test tool outside the agent: std's Mutex is fine where a poisoned lock means a failed run"
)]

use std::{
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    process::ExitCode,
    str::FromStr,
    thread,
    time::Duration,
};

use sha2::{Digest, Sha256};

// Under weft-testapp/ so cargo does not take them for binaries of their own.
#[path = "weft-testapp/flood.rs"]
mod flood;
#[path = "weft-testapp/grpc.rs"]
mod grpc;
#[path = "weft-testapp/http.rs"]
mod http;
#[cfg(feature = "jwt")]
#[path = "weft-testapp/https.rs"]
mod https;
#[path = "weft-testapp/steady.rs"]
mod steady;

#[cfg(feature = "jwt")]
use https::ClientTls;
#[cfg(not(feature = "jwt"))]
use no_tls::ClientTls;
#[cfg(test)]
#[path = "weft-testapp/tests.rs"]
mod tests;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((command, rest)) = args.split_first() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let flags = match Flags::parse(rest) {
        Ok(flags) => flags,
        Err(e) => {
            eprintln!("weft-testapp: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let result = match command.as_str() {
        "serve" => serve(&flags),
        "send" => send(&flags),
        "conns" => conns(&flags),
        "churn" => churn(&flags),
        "connect" => connect(&flags),
        "sink" => flood::sink(&flags),
        "hold" => flood::hold(&flags),
        "hammer" => hammer(&flags),
        "streams" => steady::streams(&flags),
        "connect-loop" => steady::connect_loop(&flags),
        "http-serve" => http::serve(&flags),
        "http-load" => http::load(&flags),
        "grpc-serve" => grpc::serve(&flags),
        "grpc-call" => grpc::call(&flags),
        "grpc-load" => grpc::load(&flags),
        #[cfg(feature = "jwt")]
        "https-serve" => https::serve(&flags),
        #[cfg(feature = "jwt")]
        "https-get" => https::get(&flags),
        other => Err(format!("unknown command {other:?}")),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("weft-testapp {command}: {e}");
            ExitCode::from(2)
        }
    }
}

/// Without the `jwt` feature the clients have no TLS: `--tls-ca` is refused.
#[cfg(not(feature = "jwt"))]
mod no_tls {
    use std::net::SocketAddr;

    #[derive(Debug)]
    pub enum ClientTls {}

    impl ClientTls {
        pub fn from_flags(
            flags: &crate::Flags,
            _to: SocketAddr,
            _alpn: &[u8],
        ) -> Result<Option<Self>, String> {
            match flags.optional::<String>("tls-ca")? {
                Some(_) => Err("--tls-ca: built without TLS (feature jwt)".to_owned()),
                None => Ok(None),
            }
        }

        pub fn host(&self) -> Option<String> {
            match *self {}
        }

        pub async fn connect(
            &self,
            _tcp: tokio::net::TcpStream,
        ) -> Result<tokio::net::TcpStream, String> {
            match *self {}
        }

        pub fn seen(&self) -> Vec<String> {
            match *self {}
        }
    }
}

fn serve(flags: &Flags) -> Result<ExitCode, String> {
    let port: u16 = flags.required("port")?;
    let bind: std::net::IpAddr = flags.optional("bind")?.unwrap_or([0, 0, 0, 0].into());
    let mode: Mode = flags.optional("mode")?.unwrap_or(Mode::Echo);
    let listener =
        TcpListener::bind((bind, port)).map_err(|e| format!("bind {bind}:{port}: {e}"))?;
    println!("listening addr={bind}:{port} mode={mode:?}");
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(stream) => stream,
            Err(e) => {
                println!("accept_error kind={:?} error={e}", e.kind());
                continue;
            }
        };
        thread::spawn(move || serve_one(stream, mode));
    }
    Ok(ExitCode::SUCCESS)
}

fn serve_one(mut stream: TcpStream, mode: Mode) {
    let peer = addr_or_unknown(stream.peer_addr());
    let local = addr_or_unknown(stream.local_addr());
    println!("accepted peer={peer} local={local}");
    let mut hasher = Sha256::new();
    let mut received = 0u64;
    let mut sent = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    let outcome: io::Result<()> = (|| {
        loop {
            let n = stream.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            received += n as u64;
            if mode == Mode::Echo {
                stream.write_all(&buf[..n])?;
                sent += n as u64;
            }
        }
        if mode == Mode::Hash {
            let line = format!(
                "bytes={received} sha256={} peer={peer}\n",
                hex(&hasher.clone().finalize())
            );
            stream.write_all(line.as_bytes())?;
            sent += line.len() as u64;
        }
        stream.shutdown(Shutdown::Write)
    })();
    let status = match outcome {
        Ok(()) => "ok".to_string(),
        Err(e) => format!("{:?}", e.kind()),
    };
    println!(
        "closed peer={peer} received_bytes={received} received_sha256={} sent_bytes={sent} \
         status={status}",
        hex(&hasher.finalize())
    );
}

fn send(flags: &Flags) -> Result<ExitCode, String> {
    let to: SocketAddr = flags.required("to")?;
    // A fixed text (something to look for in a capture), or N pseudo-random bytes.
    let text: Option<String> = flags.optional("text")?;
    let bytes: u64 = match &text {
        Some(text) => text.len() as u64,
        None => flags.required("bytes")?,
    };
    let seed: u64 = flags.optional("seed")?.unwrap_or(1);
    let timeout = Duration::from_millis(flags.optional("timeout-ms")?.unwrap_or(10_000));
    let pace = flags
        .optional::<u64>("duration-ms")?
        .map(|ms| Pace::new(bytes, Duration::from_millis(ms)));
    let stream = match TcpStream::connect_timeout(&to, timeout) {
        Ok(stream) => stream,
        Err(e) => return Ok(report_error("connect", &e)),
    };
    // What the application sees of its own connection (a mesh may have rewritten it).
    println!("local {}", addr_or_unknown(stream.local_addr()));
    println!("peer {}", addr_or_unknown(stream.peer_addr()));
    // A stalled transfer must fail the test, not hang it.
    let idle = Some(Duration::from_secs(60));
    stream.set_read_timeout(idle).map_err(|e| e.to_string())?;
    stream.set_write_timeout(idle).map_err(|e| e.to_string())?;

    let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
    let text_given = text.is_some();
    let sender = thread::spawn(move || -> io::Result<String> {
        let mut rng = Rng::new(seed);
        let mut hasher = Sha256::new();
        if let Some(text) = text {
            hasher.update(text.as_bytes());
            writer.write_all(text.as_bytes())?;
        }
        let mut chunk = vec![0u8; 64 * 1024];
        let mut left = if text_given { 0 } else { bytes };
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            rng.fill(&mut chunk[..n]);
            hasher.update(&chunk[..n]);
            writer.write_all(&chunk[..n])?;
            left -= n as u64;
            if let Some(pace) = &pace {
                pace.wait(bytes - left);
            }
        }
        writer.shutdown(Shutdown::Write)?;
        Ok(hex(&hasher.finalize()))
    });

    let mut reader = stream;
    let mut hasher = Sha256::new();
    let mut received = 0u64;
    let mut head = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let read_result: io::Result<()> = (|| {
        loop {
            let n = reader.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            hasher.update(&buf[..n]);
            received += n as u64;
            if head.len() < MAX_REPLY_TEXT {
                let take = n.min(MAX_REPLY_TEXT - head.len());
                head.extend_from_slice(&buf[..take]);
            }
        }
    })();
    let sent_hash = match sender.join() {
        Ok(Ok(hash)) => hash,
        Ok(Err(e)) => return Ok(report_error("write", &e)),
        Err(_) => return Err("BUG: sender thread panicked".to_string()),
    };
    println!("sent bytes={bytes} sha256={sent_hash}");
    println!(
        "received bytes={received} sha256={}",
        hex(&hasher.finalize())
    );
    if received as usize <= MAX_REPLY_TEXT
        && let Ok(text) = std::str::from_utf8(&head)
    {
        println!("reply {}", text.trim_end());
    }
    if let Err(e) = read_result {
        return Ok(report_error("read", &e));
    }
    Ok(ExitCode::SUCCESS)
}

fn conns(flags: &Flags) -> Result<ExitCode, String> {
    let to: SocketAddr = flags.required("to")?;
    let count: usize = flags.optional("count")?.unwrap_or(200);
    let timeout = Duration::from_millis(flags.optional("timeout-ms")?.unwrap_or(10_000));
    // Open every connection before any sends, so they are all in flight at once.
    let mut streams = Vec::with_capacity(count);
    for i in 0..count {
        match TcpStream::connect_timeout(&to, timeout) {
            Ok(stream) => streams.push(stream),
            Err(e) => {
                println!(
                    "failed conn={i} stage=connect kind={:?} error={e}",
                    e.kind()
                );
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    let workers: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(i, stream)| thread::spawn(move || echo_check(i, stream, timeout)))
        .collect();
    let mut failures = 0;
    for worker in workers {
        match worker.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                failures += 1;
                println!("failed {e}");
            }
            Err(_) => return Err("BUG: connection thread panicked".to_string()),
        }
    }
    if failures > 0 {
        println!("failed count={failures} of={count}");
        return Ok(ExitCode::FAILURE);
    }
    println!("ok count={count}");
    Ok(ExitCode::SUCCESS)
}

fn echo_check(i: usize, mut stream: TcpStream, timeout: Duration) -> Result<(), String> {
    let mut payload = format!("conn-{i:04}:").into_bytes();
    let mut random = vec![0u8; 1000 + i * 7];
    Rng::new(i as u64 + 1).fill(&mut random);
    payload.extend_from_slice(&random);
    let io = (|| -> io::Result<Vec<u8>> {
        stream.set_read_timeout(Some(timeout))?;
        stream.write_all(&payload)?;
        stream.shutdown(Shutdown::Write)?;
        let mut echoed = Vec::new();
        stream.read_to_end(&mut echoed)?;
        Ok(echoed)
    })();
    match io {
        Ok(echoed) if echoed == payload => Ok(()),
        Ok(echoed) => Err(format!(
            "conn={i} stage=echo sent={} received={} (payload mismatch)",
            payload.len(),
            echoed.len()
        )),
        Err(e) => Err(format!("conn={i} stage=io kind={:?} error={e}", e.kind())),
    }
}

fn connect(flags: &Flags) -> Result<ExitCode, String> {
    let to: SocketAddr = flags.required("to")?;
    let timeout = Duration::from_millis(flags.optional("timeout-ms")?.unwrap_or(2_000));
    match TcpStream::connect_timeout(&to, timeout) {
        Ok(stream) => {
            println!(
                "connected local={} peer={}",
                addr_or_unknown(stream.local_addr()),
                addr_or_unknown(stream.peer_addr())
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Ok(report_error("connect", &e)),
    }
}

fn hammer(flags: &Flags) -> Result<ExitCode, String> {
    let to: SocketAddr = flags.required("to")?;
    let count: u64 = flags.optional("count")?.unwrap_or(1_000);
    let duration = flags
        .optional::<u64>("duration-ms")?
        .map(Duration::from_millis);
    let timeout = Duration::from_millis(flags.optional("timeout-ms")?.unwrap_or(1_000));
    let payload = match flags.optional::<String>("payload-hex")? {
        Some(hex) => decode_hex(&hex)?,
        None => Vec::new(),
    };
    let started = std::time::Instant::now();
    let (mut attempts, mut connected, mut failed) = (0u64, 0u64, 0u64);
    while attempts < count && duration.is_none_or(|d| started.elapsed() < d) {
        attempts += 1;
        match TcpStream::connect_timeout(&to, timeout) {
            Ok(mut stream) => {
                connected += 1;
                // The far side may reset first; that is what a hostile client expects.
                let _ = stream.write_all(&payload);
            }
            Err(_) => failed += 1,
        }
    }
    println!("hammered attempts={attempts} connected={connected} failed={failed}");
    Ok(ExitCode::SUCCESS)
}

fn decode_hex(hex: &str) -> Result<Vec<u8>, String> {
    if !hex.len().is_multiple_of(2) {
        return Err(format!("--payload-hex {hex:?}: odd length"));
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&hex[i..i + 2], 16)
                .map_err(|e| format!("--payload-hex {hex:?}: {e}"))
        })
        .collect()
}

fn report_error(stage: &str, e: &io::Error) -> ExitCode {
    println!("error stage={stage} kind={:?} error={e}", e.kind());
    ExitCode::FAILURE
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Echo,
    Hash,
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "echo" => Ok(Mode::Echo),
            "hash" => Ok(Mode::Hash),
            other => Err(format!("unknown mode {other:?} (echo|hash)")),
        }
    }
}

/// `--name value` pairs, and the value-less `SWITCHES`.
struct Flags(Vec<(String, String)>);

impl Flags {
    fn parse(args: &[String]) -> Result<Self, String> {
        let mut pairs = Vec::new();
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let name = arg
                .strip_prefix("--")
                .ok_or_else(|| format!("expected --flag, got {arg:?}"))?;
            if SWITCHES.contains(&name) {
                pairs.push((name.to_string(), "true".to_string()));
                continue;
            }
            let value = it.next().ok_or_else(|| format!("--{name} needs a value"))?;
            pairs.push((name.to_string(), value.clone()));
        }
        Ok(Flags(pairs))
    }

    /// Every value of a repeatable flag, in order.
    fn all(&self, name: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    fn switch(&self, name: &str) -> bool {
        self.0.iter().any(|(n, _)| n == name)
    }

    fn optional<T: FromStr>(&self, name: &str) -> Result<Option<T>, String>
    where
        T::Err: std::fmt::Display,
    {
        match self.0.iter().rev().find(|(n, _)| n == name) {
            None => Ok(None),
            Some((_, v)) => v
                .parse()
                .map(Some)
                .map_err(|e| format!("--{name} {v:?}: {e}")),
        }
    }

    fn required<T: FromStr>(&self, name: &str) -> Result<T, String>
    where
        T::Err: std::fmt::Display,
    {
        self.optional(name)?
            .ok_or_else(|| format!("--{name} is required"))
    }
}

/// xorshift64*: deterministic, fast enough, and no dependency.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        // Zero is the one state xorshift never leaves.
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn fill(&mut self, out: &mut [u8]) {
        for chunk in out.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let word = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn churn(flags: &Flags) -> Result<ExitCode, String> {
    let to: SocketAddr = flags.required("to")?;
    let count: usize = flags.optional("count")?.unwrap_or(500);
    let timeout = Duration::from_millis(flags.optional("timeout-ms")?.unwrap_or(10_000));
    for i in 0..count {
        let result = TcpStream::connect_timeout(&to, timeout)
            .map_err(|e| format!("conn={i} stage=connect kind={:?} error={e}", e.kind()))
            .and_then(|stream| echo_check(i, stream, timeout));
        if let Err(e) = result {
            println!("failed {e}");
            return Ok(ExitCode::FAILURE);
        }
    }
    println!("ok count={count}");
    Ok(ExitCode::SUCCESS)
}

/// Spreads `total` bytes evenly over a duration: after each write, sleep until the time
/// the bytes written so far are due.
struct Pace {
    start: std::time::Instant,
    total: u64,
    duration: Duration,
}

impl Pace {
    fn new(total: u64, duration: Duration) -> Self {
        Pace {
            start: std::time::Instant::now(),
            total: total.max(1),
            duration,
        }
    }

    fn wait(&self, written: u64) {
        let due = self.duration.mul_f64(written as f64 / self.total as f64);
        if let Some(ahead) = due.checked_sub(self.start.elapsed()) {
            thread::sleep(ahead);
        }
    }
}

/// `--header name:value`, repeatable.
fn header_flags(flags: &Flags) -> Result<Vec<(::http::HeaderName, ::http::HeaderValue)>, String> {
    flags
        .all("header")
        .into_iter()
        .map(|pair| {
            let (name, value) = pair
                .split_once(':')
                .ok_or_else(|| format!("--header {pair:?}: expected name:value"))?;
            let name = ::http::HeaderName::try_from(name.trim())
                .map_err(|e| format!("--header {pair:?}: {e}"))?;
            let value = ::http::HeaderValue::try_from(value.trim_start())
                .map_err(|e| format!("--header {pair:?}: {e}"))?;
            Ok((name, value))
        })
        .collect()
}

/// Binds `--bind` (default 0.0.0.0) : `--port` on the L7 runtime, prints `listening ...`
/// and serves the listener until killed.
fn run_server<F>(
    flags: &Flags,
    protocol: &str,
    name: &str,
    serve: impl FnOnce(tokio::net::TcpListener) -> F,
) -> Result<ExitCode, String>
where
    F: std::future::Future<Output = ()>,
{
    let port: u16 = flags.required("port")?;
    let bind: std::net::IpAddr = flags.optional("bind")?.unwrap_or([0, 0, 0, 0].into());
    runtime()?.block_on(async {
        let listener = tokio::net::TcpListener::bind((bind, port))
            .await
            .map_err(|e| format!("bind {bind}:{port}: {e}"))?;
        println!("listening addr={bind}:{port} name={name} protocol={protocol}");
        serve(listener).await;
        Ok(ExitCode::SUCCESS)
    })
}

/// Accepts forever, each connection on a task of its own. An accept error (out of file
/// descriptors) is printed and retried after a pause.
async fn accept_loop<F>(
    listener: tokio::net::TcpListener,
    handle: impl Fn(tokio::net::TcpStream, SocketAddr) -> F,
) where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                tokio::spawn(handle(stream, peer));
            }
            Err(e) => {
                println!("accept_error kind={:?} error={e}", e.kind());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// The L7 commands' runtime: two workers are plenty for a test app.
fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("start tokio: {e}"))
}

/// One JSON line (the report types serialize without fail: strings, numbers and maps).
fn json_line(value: &impl serde::Serialize) -> String {
    serde_json::to_string(value).unwrap_or_else(|e| format!("{{\"bug\":\"serialize: {e}\"}}"))
}

fn addr_or_unknown(addr: io::Result<SocketAddr>) -> String {
    addr.map_or_else(|_| "unknown".to_string(), |a| a.to_string())
}

const MAX_REPLY_TEXT: usize = 4096;
/// Flags without a value.
const SWITCHES: [&str; 2] = ["http2", "new-connections"];

const USAGE: &str = "usage:
  weft-testapp serve   --port P [--bind IP] [--mode echo|hash]
  weft-testapp send    --to IP:PORT (--bytes N [--seed S] [--duration-ms D] | --text T) [--timeout-ms T]
  weft-testapp conns   --to IP:PORT [--count 200] [--timeout-ms T]
  weft-testapp churn   --to IP:PORT [--count 500] [--timeout-ms T]
  weft-testapp connect --to IP:PORT [--timeout-ms T]
  weft-testapp sink    --port P
  weft-testapp hold    --to IP:PORT --count N [--settle-ms S] [--threads T] [--timeout-ms T]
  weft-testapp hammer  --to IP:PORT [--count 1000] [--duration-ms D] [--payload-hex H] [--timeout-ms T]
  weft-testapp http-serve --port P --name NAME [--bind IP] [--fail-every N] [--delay MS] [--delay-path PREFIX]
  weft-testapp http-load  --to IP:PORT --count N [--concurrency C] [--method M] [--path P]
                          [--header name:value]... [--http2] [--body-bytes B] [--slow-body-ms MS] [--timeout-ms T]
                          [--tls-ca PEM [--sni NAME]] [--new-connections]
  weft-testapp grpc-serve --port P [--name NAME] [--bind IP]
  weft-testapp grpc-call  --to IP:PORT --mode unary|server-stream|bidi [--messages N] [--method M]
                          [--header name:value]... [--timeout-ms T] [--tls-ca PEM [--sni NAME]]
  weft-testapp https-serve --port P --cert PEM --key PEM --file F [--bind IP]
  weft-testapp https-get   --to IP:PORT --ca PEM [--sni NAME] [--path P]";
