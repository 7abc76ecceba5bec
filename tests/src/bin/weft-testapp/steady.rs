//! `streams` and `connect-loop`: steady traffic across a restart or an upgrade of the mesh,
//! counting exactly what it cost (the upgrade tests and the bench's upgrade scenario).
//!
//! - `streams --to IP:PORT --count N --duration-ms D [--chunk B] [--interval-ms I]
//!   [--seed S] [--timeout-ms T]` opens N echo connections (`connected count=N`), then on
//!   each, every I ms
//!   (default 100), writes B bytes (default 1024) of that connection's own seeded stream and
//!   reads their echo back, checking every byte against what it sent (a lost, duplicated or
//!   reordered byte is a mismatch; `flowing count=N` once every connection had its first
//!   echo), for D ms; then half-closes and expects a clean EOF with
//!   nothing more. Prints one `failed conn=i stage=.. error=..` per failed connection (the
//!   first 20) and then `streamed count=N ok=K failed=F sent_bytes=S echoed_bytes=E
//!   failed_kinds=stage/kind:n,..` (every failure, by stage and error kind). Exit 0 only
//!   when every connection was exact.
//! - `connect-loop --to IP:PORT --duration-ms D [--timeout-ms T]`: connect, echo 64 bytes,
//!   close, again, until D has passed. Prints the first 20 `failure at_ms=.. stage=..
//!   kind=..` and then `looped attempts=A ok=K failed=F longest_gap_ms=G failed_kinds=..`:
//!   the longest time without a successful round, from the start and to the end included,
//!   and every failure by stage and error kind. Always exits 0.

use std::{
    collections::BTreeMap,
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use super::{Flags, Rng};

pub fn streams(flags: &Flags) -> Result<ExitCode, String> {
    let plan = Plan {
        to: flags.required("to")?,
        duration: Duration::from_millis(flags.required("duration-ms")?),
        chunk: flags.optional("chunk")?.unwrap_or(1024),
        interval: Duration::from_millis(flags.optional("interval-ms")?.unwrap_or(100)),
        timeout: Duration::from_millis(flags.optional("timeout-ms")?.unwrap_or(10_000)),
    };
    let count: usize = flags.required("count")?;
    let seed: u64 = flags.optional("seed")?.unwrap_or(1);
    super::flood::raise_nofile();
    // Every connection open before any traffic: all of them live across what the test does.
    let mut opened = Vec::with_capacity(count);
    for _ in 0..count {
        opened.push(TcpStream::connect_timeout(&plan.to, plan.timeout));
    }
    println!("connected count={count}");
    let flowing = Arc::new(Flowing {
        count,
        echoed: AtomicUsize::new(0),
    });
    let start = Instant::now() + plan.interval;
    let workers: Vec<_> = opened
        .into_iter()
        .enumerate()
        .map(|(i, stream)| {
            // Spread over one interval, so the connections do not all write at once.
            let first = start + plan.interval.mul_f64(i as f64 / count.max(1) as f64);
            let rng = Rng::new(seed.wrapping_mul(1_000_003).wrapping_add(i as u64));
            let flowing = Arc::clone(&flowing);
            thread::Builder::new()
                .stack_size(STACK)
                .spawn(move || -> Result<Streamed, Failure> {
                    let stream = stream.map_err(|e| Failure::io("connect", &e))?;
                    plan.run(stream, first, rng, &flowing)
                })
                .map_err(|e| format!("spawn: {e}"))
        })
        .collect::<Result<_, _>>()?;
    let (mut ok, mut sent, mut echoed) = (0, 0, 0);
    let mut failed = Kinds::default();
    for (i, worker) in workers.into_iter().enumerate() {
        match worker.join() {
            Ok(Ok(done)) => {
                ok += 1;
                sent += done.sent;
                echoed += done.echoed;
            }
            Ok(Err(failure)) => {
                if failed.count(&failure) <= 20 {
                    println!("failed conn={i} {failure}");
                }
            }
            Err(_) => return Err("BUG: connection thread panicked".to_string()),
        }
    }
    println!(
        "streamed count={count} ok={ok} failed={} sent_bytes={sent} echoed_bytes={echoed} failed_kinds={failed}",
        failed.total
    );
    let failed = failed.total;
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[derive(Clone, Copy)]
struct Plan {
    to: SocketAddr,
    duration: Duration,
    chunk: usize,
    interval: Duration,
    timeout: Duration,
}

struct Streamed {
    sent: u64,
    echoed: u64,
}

impl Plan {
    /// One connection's life: paced chunks, each echoed exactly, then a clean end.
    fn run(
        &self,
        mut stream: TcpStream,
        first: Instant,
        mut rng: Rng,
        flowing: &Flowing,
    ) -> Result<Streamed, Failure> {
        let io = |stage, e: io::Error| Failure::io(stage, &e);
        stream
            .set_read_timeout(Some(self.timeout))
            .map_err(|e| io("setup", e))?;
        let end = first + self.duration;
        let (mut out, mut back) = (vec![0u8; self.chunk], vec![0u8; self.chunk]);
        let mut done = Streamed { sent: 0, echoed: 0 };
        let mut next = first;
        while next < end {
            thread::sleep(next.saturating_duration_since(Instant::now()));
            rng.fill(&mut out);
            stream.write_all(&out).map_err(|e| io("write", e))?;
            done.sent += out.len() as u64;
            stream.read_exact(&mut back).map_err(|e| io("read", e))?;
            if back != out {
                return Err(Failure {
                    stage: "echo",
                    kind: "Mismatch".into(),
                    detail: format!("after {} exact bytes", done.echoed),
                });
            }
            if done.echoed == 0 {
                flowing.echoed_once();
            }
            done.echoed += back.len() as u64;
            next += self.interval;
        }
        stream
            .shutdown(Shutdown::Write)
            .map_err(|e| io("shutdown", e))?;
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).map_err(|e| io("close", e))?;
        if !rest.is_empty() {
            return Err(Failure {
                stage: "close",
                kind: "ExtraBytes".into(),
                detail: format!("{} bytes after the last echo", rest.len()),
            });
        }
        Ok(done)
    }
}

/// Says `flowing` once every connection has had its first echo: from then on all of them
/// carry traffic both ways.
struct Flowing {
    count: usize,
    echoed: AtomicUsize,
}

impl Flowing {
    fn echoed_once(&self) {
        if self.echoed.fetch_add(1, Ordering::AcqRel) + 1 == self.count {
            println!("flowing count={}", self.count);
        }
    }
}

/// Why one connection or round failed.
struct Failure {
    stage: &'static str,
    /// An `io::ErrorKind`, or what the check found.
    kind: String,
    detail: String,
}

impl Failure {
    fn io(stage: &'static str, e: &io::Error) -> Self {
        Failure {
            stage,
            kind: format!("{:?}", e.kind()),
            detail: e.to_string(),
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "stage={} kind={} error={}",
            self.stage, self.kind, self.detail
        )
    }
}

/// Failures counted by `stage/kind`, printed as `stage/kind:n,...` (`-` for none).
#[derive(Default)]
struct Kinds {
    total: u64,
    by_kind: BTreeMap<String, u64>,
}

impl Kinds {
    /// Counts `failure`; returns how many failures there are now.
    fn count(&mut self, failure: &Failure) -> u64 {
        *self
            .by_kind
            .entry(format!("{}/{}", failure.stage, failure.kind))
            .or_default() += 1;
        self.total += 1;
        self.total
    }
}

impl std::fmt::Display for Kinds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.by_kind.is_empty() {
            return f.write_str("-");
        }
        let parts: Vec<String> = self
            .by_kind
            .iter()
            .map(|(k, n)| format!("{k}:{n}"))
            .collect();
        f.write_str(&parts.join(","))
    }
}

pub fn connect_loop(flags: &Flags) -> Result<ExitCode, String> {
    let to: SocketAddr = flags.required("to")?;
    let duration = Duration::from_millis(flags.required("duration-ms")?);
    let timeout = Duration::from_millis(flags.optional("timeout-ms")?.unwrap_or(2_000));
    let start = Instant::now();
    let (mut attempts, mut ok) = (0u64, 0u64);
    let mut failed = Kinds::default();
    let (mut last_ok, mut longest_gap) = (start, Duration::ZERO);
    while start.elapsed() < duration {
        attempts += 1;
        match round(to, timeout, attempts) {
            Ok(()) => {
                ok += 1;
                longest_gap = longest_gap.max(last_ok.elapsed());
                last_ok = Instant::now();
            }
            Err(failure) => {
                if failed.count(&failure) <= 20 {
                    let at = start.elapsed().as_millis();
                    println!("failure at_ms={at} {failure}");
                }
                // A refusal returns at once: do not spin on it.
                thread::sleep(Duration::from_millis(5));
            }
        }
    }
    longest_gap = longest_gap.max(last_ok.elapsed());
    println!(
        "looped attempts={attempts} ok={ok} failed={} longest_gap_ms={} failed_kinds={failed}",
        failed.total,
        longest_gap.as_millis()
    );
    Ok(ExitCode::SUCCESS)
}

/// One connect, 64 bytes echoed and checked, and a clean close.
fn round(to: SocketAddr, timeout: Duration, n: u64) -> Result<(), Failure> {
    let mut stream =
        TcpStream::connect_timeout(&to, timeout).map_err(|e| Failure::io("connect", &e))?;
    let io = |stage, e: io::Error| Failure::io(stage, &e);
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| io("setup", e))?;
    let mut payload = [0u8; 64];
    Rng::new(n).fill(&mut payload);
    stream.write_all(&payload).map_err(|e| io("write", e))?;
    stream
        .shutdown(Shutdown::Write)
        .map_err(|e| io("write", e))?;
    let mut echoed = Vec::with_capacity(64);
    stream.read_to_end(&mut echoed).map_err(|e| io("read", e))?;
    if echoed != payload {
        return Err(Failure {
            stage: "echo",
            kind: "Mismatch".into(),
            detail: format!("{} bytes came back for 64", echoed.len()),
        });
    }
    Ok(())
}

/// Threads that only write, read and compare a chunk need little stack.
const STACK: usize = 128 * 1024;
