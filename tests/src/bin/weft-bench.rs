//! The load tool of `cargo xtask bench`: a server and the clients that measure through it,
//! run inside simulated pods by the harness (`weft_tests::bench`).
//!
//! Plain std threads and blocking sockets: one thread per connection on both sides, so what
//! is measured is the path between the pods (direct, weft, stunnel), not a runtime's
//! scheduling. Each client prints one line `result {json}` on stdout.
//!
//! ```text
//! weft-bench serve --port P [--bind IP]
//! weft-bench tput  --to IP:PORT [--streams 1] [--secs 10]
//! weft-bench rr    --to IP:PORT [--size 1] [--count 50000] [--warmup 1000]
//! weft-bench crr   --to IP:PORT [--secs 5] [--max N]
//! weft-bench hold  --to IP:PORT [--count 1000]
//! weft-bench idle  --to IP:PORT [--count 10000]
//! weft-bench until-denied --to IP:PORT [--secs 30]
//! weft-bench http-serve --port P
//! weft-bench http-load  --to IP:PORT [--rate 1000] [--secs 5] [--conns 8] [--header name:value]...
//! weft-bench jwt --issuer ISS [--valid-secs 86400]
//! weft-bench spin
//! ```
//!
//! The first byte a client sends on a `serve` connection chooses what the server does:
//! - `S` (sink): read until EOF, then answer the byte count (u64, big endian) and close:
//!   throughput is measured on bytes the server actually received;
//! - `E` (echo): echo every byte until EOF (request/response on one connection);
//! - `C` (connect): read one byte, answer it and close first, so TIME_WAIT stays on the
//!   server side and a client can open connections at full rate without running out of ports.
//!
//! `jwt` mints end-user tokens for the waypoint's `requestAuthentication` rows: a fresh RS256
//! and ES256 key each, and prints their JWKS and a token of each (`weft_tests::jwt`).
//!
//! `spin` keeps every CPU busy at nice 19 until killed: an idle vCPU is slow to wake, and
//! the spinner shows how much of a latency figure is that wake-up.
//!
//! `http-serve`/`http-load` are an HTTP/1.1 open-loop pair (requests sent on a fixed
//! schedule whatever the answers do, latency measured from the scheduled send time, so a
//! stalled server cannot hide its queueing): the L7 workload of the waypoint benchmarks.

#![allow(
    clippy::disallowed_types,
    reason = "a test tool outside the agent: std's Mutex is fine where a poisoned lock means a failed run"
)]

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    process::ExitCode,
    sync::{
        Arc, Barrier, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((command, rest)) = args.split_first() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let flags = match Flags::parse(rest) {
        Ok(flags) => flags,
        Err(e) => {
            eprintln!("weft-bench: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    raise_nofile_limit();
    let result = match command.as_str() {
        "serve" => serve(&flags),
        "tput" => tput(&flags),
        "rr" => rr(&flags),
        "crr" => crr(&flags),
        "hold" => hold(&flags),
        "idle" => idle(&flags),
        "until-denied" => until_denied(&flags),
        "http-serve" => http_serve(&flags),
        "http-load" => http_load(&flags),
        #[cfg(feature = "jwt")]
        "jwt" => jwt(&flags),
        "spin" => spin(),
        other => Err(format!("unknown command {other:?}")),
    };
    match result {
        Ok(Some(value)) => {
            println!("result {value}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-bench {command}: {e}");
            ExitCode::FAILURE
        }
    }
}

type Outcome = Result<Option<Value>, String>;

fn serve(flags: &Flags) -> Outcome {
    let port: u16 = flags.required("port")?;
    let bind: std::net::IpAddr = flags.optional("bind")?.unwrap_or([0, 0, 0, 0].into());
    let listener =
        TcpListener::bind((bind, port)).map_err(|e| format!("bind {bind}:{port}: {e}"))?;
    println!("listening addr={bind}:{port}");
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        // Small stacks: `hold` opens a thousand connections at once.
        let _ = thread::Builder::new()
            .stack_size(SERVER_STACK)
            .spawn(move || {
                let _ = serve_one(stream);
            });
    }
    Ok(None)
}

fn serve_one(mut stream: TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut mode = [0u8; 1];
    stream.read_exact(&mut mode)?;
    let mut buf = vec![0u8; BUF];
    match mode[0] {
        b'S' => {
            let mut total: u64 = 0;
            loop {
                let n = stream.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            stream.write_all(&total.to_be_bytes())?;
        }
        b'E' => loop {
            let n = stream.read(&mut buf)?;
            if n == 0 {
                break;
            }
            stream.write_all(&buf[..n])?;
        },
        b'C' => {
            stream.read_exact(&mut buf[..1])?;
            stream.write_all(&buf[..1])?;
        }
        other => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unknown mode byte {other}"),
            ));
        }
    }
    Ok(())
}

/// `streams` connections send as fast as they can for `secs`; the rate is what the server
/// received, timed until the last count came back.
fn tput(flags: &Flags) -> Outcome {
    let to: SocketAddr = flags.required("to")?;
    let streams: usize = flags.optional("streams")?.unwrap_or(1);
    let secs: f64 = flags.optional("secs")?.unwrap_or(10.0);
    let barrier = Arc::new(Barrier::new(streams + 1));
    let start = Arc::new(Mutex::new(None::<Instant>));
    let mut handles = Vec::new();
    for _ in 0..streams {
        let barrier = Arc::clone(&barrier);
        let start = Arc::clone(&start);
        handles.push(thread::spawn(move || -> Result<u64, String> {
            let mut stream = TcpStream::connect(to).map_err(|e| format!("connect {to}: {e}"))?;
            stream.write_all(b"S").map_err(|e| e.to_string())?;
            let buf = vec![0x5au8; BUF];
            barrier.wait();
            let begin = start
                .lock()
                .map_err(|_| "poisoned")?
                .ok_or("no start time")?;
            let end = begin + Duration::from_secs_f64(secs);
            while Instant::now() < end {
                stream.write_all(&buf).map_err(|e| format!("write: {e}"))?;
            }
            stream
                .shutdown(Shutdown::Write)
                .map_err(|e| e.to_string())?;
            let mut count = [0u8; 8];
            stream
                .read_exact(&mut count)
                .map_err(|e| format!("read count: {e}"))?;
            Ok(u64::from_be_bytes(count))
        }));
    }
    *start.lock().map_err(|_| "poisoned")? = Some(Instant::now());
    let begin = Instant::now();
    barrier.wait();
    let mut bytes = 0;
    for h in handles {
        bytes += h.join().map_err(|_| "stream thread panicked")??;
    }
    let elapsed = begin.elapsed().as_secs_f64();
    Ok(Some(json!({
        "bytes": bytes,
        "secs": elapsed,
        "gbit_per_s": bytes as f64 * 8.0 / elapsed / 1e9,
    })))
}

/// Request/response on one connection: `count` round trips of `size` bytes each way.
fn rr(flags: &Flags) -> Outcome {
    let to: SocketAddr = flags.required("to")?;
    let size: usize = flags.optional("size")?.unwrap_or(1);
    let count: usize = flags.optional("count")?.unwrap_or(50_000);
    let warmup: usize = flags.optional("warmup")?.unwrap_or(1_000);
    let mut stream = TcpStream::connect(to).map_err(|e| format!("connect {to}: {e}"))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    stream.write_all(b"E").map_err(|e| e.to_string())?;
    let out = vec![0xa5u8; size.max(1)];
    let mut back = vec![0u8; size.max(1)];
    let mut samples = Vec::with_capacity(count);
    for i in 0..warmup + count {
        let t = Instant::now();
        stream.write_all(&out).map_err(|e| format!("write: {e}"))?;
        stream
            .read_exact(&mut back)
            .map_err(|e| format!("read: {e}"))?;
        if i >= warmup {
            samples.push(t.elapsed());
        }
    }
    Ok(Some(latency_json(&mut samples, None)))
}

/// New connections one after the other: connect, one 1-byte round trip, close.
fn crr(flags: &Flags) -> Outcome {
    let to: SocketAddr = flags.required("to")?;
    let secs: f64 = flags.optional("secs")?.unwrap_or(5.0);
    let max: usize = flags.optional("max")?.unwrap_or(usize::MAX);
    let begin = Instant::now();
    let end = begin + Duration::from_secs_f64(secs);
    let mut samples = Vec::new();
    let mut errors = 0u64;
    let mut byte = [0u8; 2];
    while Instant::now() < end && samples.len() < max {
        let t = Instant::now();
        match one_connection(to, &mut byte) {
            Ok(()) => samples.push(t.elapsed()),
            Err(e) => {
                errors += 1;
                if errors > 100 {
                    return Err(format!("too many failed connections, last: {e}"));
                }
            }
        }
    }
    let elapsed = begin.elapsed().as_secs_f64();
    let rate = samples.len() as f64 / elapsed;
    let mut value = latency_json(&mut samples, Some(rate));
    value["errors"] = json!(errors);
    Ok(Some(value))
}

/// New connections one after the other, as `crr`, until one fails: prints `connecting`
/// after the first success (the loop runs), and as its result the wall-clock time (Unix
/// seconds) when the first failure was seen, how many connections succeeded before, and the
/// error. A policy change that denies the client is timed against that clock.
fn until_denied(flags: &Flags) -> Outcome {
    let to: SocketAddr = flags.required("to")?;
    let secs: f64 = flags.optional("secs")?.unwrap_or(30.0);
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let mut allowed = 0u64;
    let mut byte = [0u8; 2];
    while Instant::now() < end {
        match one_connection(to, &mut byte) {
            Ok(()) => {
                allowed += 1;
                if allowed == 1 {
                    println!("connecting to={to}");
                    io::stdout().flush().map_err(|e| e.to_string())?;
                }
            }
            Err(e) if allowed > 0 => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_err(|e| e.to_string())?;
                return Ok(Some(json!({
                    "denied_unix_s": now.as_secs_f64(),
                    "allowed_before": allowed,
                    "error": format!("{:?}: {e}", e.kind()),
                })));
            }
            Err(e) => return Err(format!("the first connection failed already: {e}")),
        }
    }
    Err(format!(
        "no connection failed within {secs} s ({allowed} succeeded)"
    ))
}

/// Connect, one 1-byte round trip, close: the unit of `crr` and `until-denied`.
fn one_connection(to: SocketAddr, byte: &mut [u8; 2]) -> io::Result<()> {
    let mut stream = TcpStream::connect(to)?;
    stream.set_nodelay(true)?;
    stream.write_all(b"C\x01")?;
    stream.read_exact(&mut byte[..1])?;
    // The server closes first; wait for its FIN so TIME_WAIT is on its side.
    let _ = stream.read(byte)?;
    Ok(())
}

/// Opens `count` connections (each proven end to end by a 1-byte round trip), prints `held
/// N` and keeps them open until killed.
fn hold(flags: &Flags) -> Outcome {
    let to: SocketAddr = flags.required("to")?;
    let count: usize = flags.optional("count")?.unwrap_or(1_000);
    let mut held = Vec::with_capacity(count);
    let mut byte = [0u8; 1];
    for i in 0..count {
        let mut stream = TcpStream::connect(to).map_err(|e| format!("connect {to} (#{i}): {e}"))?;
        stream.write_all(b"E\x01").map_err(|e| e.to_string())?;
        stream.read_exact(&mut byte).map_err(|e| e.to_string())?;
        held.push(stream);
    }
    println!("held {}", held.len());
    io::stdout().flush().map_err(|e| e.to_string())?;
    loop {
        thread::sleep(Duration::from_secs(3600));
    }
}

/// A hostile pod hoarding sockets: opens `count` connections and sends nothing. After a
/// settle time it prints `result {opened, refused, open}` (`open`: those the other side
/// has not closed or reset) and keeps them until killed.
fn idle(flags: &Flags) -> Outcome {
    let to: SocketAddr = flags.required("to")?;
    let count: usize = flags.optional("count")?.unwrap_or(10_000);
    let mut held = Vec::with_capacity(count);
    let mut refused = 0usize;
    for _ in 0..count {
        match TcpStream::connect_timeout(&to, IDLE_CONNECT_TIMEOUT) {
            Ok(stream) => held.push(stream),
            Err(_) => refused += 1,
        }
    }
    thread::sleep(IDLE_SETTLE);
    let mut byte = [0u8; 1];
    let open = held
        .iter()
        .filter(|s| {
            // Nothing to read, no EOF, no reset: the connection is still held open.
            s.set_nonblocking(true).is_ok()
                && matches!(s.peek(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
        })
        .count();
    let result = json!({ "opened": held.len(), "refused": refused, "open": open });
    println!("result {result}");
    io::stdout().flush().map_err(|e| e.to_string())?;
    loop {
        thread::sleep(Duration::from_secs(3600));
    }
}

/// A tiny HTTP/1.1 server: every request gets `200` with a 2-byte body, keep-alive.
fn http_serve(flags: &Flags) -> Outcome {
    let port: u16 = flags.required("port")?;
    let listener =
        TcpListener::bind(("0.0.0.0", port)).map_err(|e| format!("bind port {port}: {e}"))?;
    println!("listening addr=0.0.0.0:{port}");
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let _ = thread::Builder::new()
            .stack_size(SERVER_STACK)
            .spawn(move || {
                let _ = http_serve_one(stream);
            });
    }
    Ok(None)
}

fn http_serve_one(stream: TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        // Request line and headers; the load generator sends no body.
        let mut blank = false;
        let mut any = false;
        while !blank {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            any = true;
            blank = line == "\r\n";
        }
        if any {
            writer.write_all(HTTP_RESPONSE)?;
        }
    }
}

/// Open-loop HTTP/1.1 load: `rate` requests/s spread over `conns` keep-alive connections,
/// each sent at its scheduled time; latency counts from that time to the end of the answer.
fn http_load(flags: &Flags) -> Outcome {
    let to: SocketAddr = flags.required("to")?;
    let rate: f64 = flags.optional("rate")?.unwrap_or(1_000.0);
    let secs: f64 = flags.optional("secs")?.unwrap_or(5.0);
    let conns: usize = flags.optional("conns")?.unwrap_or(8);
    let request: Arc<[u8]> = http_request(&flags.all("header"))?.into();
    let per_conn = rate / conns as f64;
    let interval = Duration::from_secs_f64(1.0 / per_conn);
    let total = (per_conn * secs) as usize;
    let begin = Instant::now() + Duration::from_millis(50);
    let mut handles = Vec::new();
    for c in 0..conns {
        let request = Arc::clone(&request);
        handles.push(thread::spawn(move || -> Result<Vec<Duration>, String> {
            let stream = TcpStream::connect(to).map_err(|e| format!("connect {to}: {e}"))?;
            stream.set_nodelay(true).map_err(|e| e.to_string())?;
            let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
            let mut reader = BufReader::new(stream);
            // Connections start staggered so the aggregate schedule is even.
            let offset = interval.mul_f64(c as f64 / conns as f64);
            let mut samples = Vec::with_capacity(total);
            let mut line = String::new();
            for i in 0..total {
                let scheduled = begin + offset + interval.mul_f64(i as f64);
                if let Some(wait) = scheduled.checked_duration_since(Instant::now()) {
                    thread::sleep(wait);
                }
                writer
                    .write_all(&request)
                    .map_err(|e| format!("write: {e}"))?;
                let mut length = 0usize;
                loop {
                    line.clear();
                    if reader.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
                        return Err("server closed".into());
                    }
                    if line == "\r\n" {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().map_err(|_| "bad content-length")?;
                    }
                }
                let mut body = vec![0u8; length];
                reader.read_exact(&mut body).map_err(|e| e.to_string())?;
                samples.push(scheduled.elapsed());
            }
            Ok(samples)
        }));
    }
    let mut samples = Vec::new();
    for h in handles {
        samples.extend(h.join().map_err(|_| "load thread panicked")??);
    }
    let elapsed = begin.elapsed().as_secs_f64();
    let achieved = samples.len() as f64 / elapsed;
    let mut value = latency_json(&mut samples, Some(achieved));
    value["offered_per_s"] = json!(rate);
    Ok(Some(value))
}

/// One busy thread per CPU at nice 19, until killed.
fn spin() -> Outcome {
    // SAFETY: setpriority(2) on this process (who = 0) has no memory-safety preconditions.
    // Threads spawned afterwards inherit the nice value.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, 19);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let cpus = thread::available_parallelism().map_or(1, usize::from);
    let handles: Vec<_> = (0..cpus)
        .map(|_| {
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        })
        .collect();
    println!("spinning cpus={cpus}");
    let _ = io::stdout().flush();
    for h in handles {
        let _ = h.join();
    }
    Ok(None)
}

/// Percentiles in microseconds (and a rate, when there is one).
fn latency_json(samples: &mut [Duration], rate: Option<f64>) -> Value {
    samples.sort_unstable();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let pick = |q: f64| -> f64 {
        if samples.is_empty() {
            return 0.0;
        }
        let i = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
        us(samples[i])
    };
    let mean = if samples.is_empty() {
        0.0
    } else {
        samples.iter().map(|d| us(*d)).sum::<f64>() / samples.len() as f64
    };
    let mut value = json!({
        "count": samples.len(),
        "p50_us": pick(0.50),
        "p90_us": pick(0.90),
        "p99_us": pick(0.99),
        "p999_us": pick(0.999),
        "mean_us": mean,
        "min_us": samples.first().map_or(0.0, |d| us(*d)),
        "max_us": samples.last().map_or(0.0, |d| us(*d)),
    });
    if let Some(rate) = rate {
        value["rate_per_s"] = json!(rate);
    }
    value
}

/// `hold` and the servers need more than the usual 1024 descriptors.
fn raise_nofile_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// The load's GET request, with `headers` (`name:value` each).
fn http_request(headers: &[&str]) -> Result<Vec<u8>, String> {
    let mut request = b"GET / HTTP/1.1\r\nHost: bench\r\n".to_vec();
    for header in headers {
        let (name, value) = header
            .split_once(':')
            .ok_or_else(|| format!("--header {header:?}: expected name:value"))?;
        request.extend_from_slice(format!("{}: {}\r\n", name.trim(), value.trim()).as_bytes());
    }
    request.extend_from_slice(b"\r\n");
    Ok(request)
}

/// Keys, their JWKS and a token of each, valid for `--valid-secs`.
#[cfg(feature = "jwt")]
fn jwt(flags: &Flags) -> Outcome {
    use weft_tests::jwt::{Issuer, SigningKey, jwks, unix_now};
    let issuer_name: String = flags.required("issuer")?;
    let valid: u64 = flags.optional("valid-secs")?.unwrap_or(86_400);
    let issuer = Issuer::new(&issuer_name);
    let mut claims = issuer.claims("bench-user", &[]);
    claims["exp"] = json!(unix_now() + valid);
    let mut out = serde_json::Map::new();
    for key in [SigningKey::rsa("bench-rsa"), SigningKey::ec("bench-ec")] {
        let key = key.map_err(|e| e.to_string())?;
        let token = issuer
            .mint(&key, claims.clone())
            .map_err(|e| e.to_string())?;
        out.insert(
            key.alg().to_owned(),
            json!({ "jwks": jwks(&[&key]).to_string(), "token": token }),
        );
    }
    Ok(Some(Value::Object(out)))
}

/// `--key value` pairs.
struct Flags(Vec<(String, String)>);

impl Flags {
    fn parse(args: &[String]) -> Result<Self, String> {
        let mut pairs = Vec::new();
        let mut it = args.iter();
        while let Some(key) = it.next() {
            let key = key
                .strip_prefix("--")
                .ok_or_else(|| format!("expected --flag, got {key:?}"))?;
            let value = it.next().ok_or_else(|| format!("--{key} needs a value"))?;
            pairs.push((key.to_string(), value.clone()));
        }
        Ok(Flags(pairs))
    }

    fn optional<T: std::str::FromStr>(&self, key: &str) -> Result<Option<T>, String> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.parse().map_err(|_| format!("bad --{key} {v:?}")))
            .transpose()
    }

    /// Every value of a repeatable flag, in order.
    fn all(&self, key: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    fn required<T: std::str::FromStr>(&self, key: &str) -> Result<T, String> {
        self.optional(key)?
            .ok_or_else(|| format!("--{key} is required"))
    }
}

const BUF: usize = 128 * 1024;
const SERVER_STACK: usize = 256 * 1024;
const HTTP_RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
const IDLE_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Long enough for a proxy to refuse what is over its caps.
const IDLE_SETTLE: Duration = Duration::from_secs(2);
const USAGE: &str = "usage: weft-bench serve|tput|rr|crr|hold|idle|until-denied|http-serve|http-load|jwt|spin \
     [--flag value]...";
