//! `sink` and `hold`: many idle connections, for the hostile-input tests.
//!
//! - `sink --port P` accepts and keeps every connection without reading (one thread, no
//!   thread per connection), printing `sink_listening` and then `sink accepted=N` each time
//!   the count grew during the last second.
//! - `hold --to IP:PORT --count N [--settle-ms S] [--threads T] [--timeout-ms T]
//!   [--payload-hex H]` opens N connections (T at a time, writing the payload on each),
//!   prints `connected ok=A failed=B`, waits S ms, then prints
//!   `held open=X closed=Y` (closed: the peer reset or closed it), and keeps the open ones
//!   until killed. Raises its own RLIMIT_NOFILE first (as root it may).

use std::{
    io::{self, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    process::ExitCode,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use super::Flags;

pub fn sink(flags: &Flags) -> Result<ExitCode, String> {
    let port: u16 = flags.required("port")?;
    raise_nofile();
    let listener = TcpListener::bind(("0.0.0.0", port)).map_err(|e| format!("bind {port}: {e}"))?;
    println!("sink_listening port={port}");
    let mut held = Vec::new();
    let mut reported = Instant::now();
    let mut last = 0;
    for stream in listener.incoming() {
        if let Ok(stream) = stream {
            held.push(stream);
        }
        if reported.elapsed() >= Duration::from_secs(1) && held.len() != last {
            last = held.len();
            reported = Instant::now();
            println!("sink accepted={last}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn hold(flags: &Flags) -> Result<ExitCode, String> {
    let to: SocketAddr = flags.required("to")?;
    let count: usize = flags.required("count")?;
    let settle = Duration::from_millis(flags.optional("settle-ms")?.unwrap_or(3_000));
    let threads: usize = flags.optional("threads")?.unwrap_or(16);
    let timeout = Duration::from_millis(flags.optional("timeout-ms")?.unwrap_or(3_000));
    let payload = match flags.optional::<String>("payload-hex")? {
        Some(hex) => Arc::new(super::decode_hex(&hex)?),
        None => Arc::new(Vec::new()),
    };
    raise_nofile();
    let next = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let streams = Arc::new(Mutex::new(Vec::with_capacity(count)));
    let workers: Vec<_> = (0..threads.max(1))
        .map(|_| {
            let (next, failed, streams) =
                (Arc::clone(&next), Arc::clone(&failed), Arc::clone(&streams));
            let payload = Arc::clone(&payload);
            thread::spawn(move || {
                while next.fetch_add(1, Ordering::Relaxed) < count {
                    match TcpStream::connect_timeout(&to, timeout) {
                        Ok(mut s) => {
                            // A write the proxy refused fails or is lost: `is_open` tells.
                            if !payload.is_empty() {
                                let _ = s.write_all(&payload);
                            }
                            streams.lock().unwrap_or_else(|e| e.into_inner()).push(s);
                        }
                        Err(_) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    let mut streams = std::mem::take(&mut *streams.lock().unwrap_or_else(|e| e.into_inner()));
    println!(
        "connected ok={} failed={}",
        streams.len(),
        failed.load(Ordering::Relaxed)
    );
    thread::sleep(settle);
    streams.retain(is_open);
    println!(
        "held open={} closed={}",
        streams.len(),
        count - failed.load(Ordering::Relaxed) - streams.len()
    );
    // Keep the open ones, quietly, until the test kills us.
    loop {
        thread::sleep(Duration::from_secs(3600));
    }
}

/// Still open: nothing to read yet (a FIN reads 0, a RST fails).
fn is_open(stream: &TcpStream) -> bool {
    if stream.set_nonblocking(true).is_err() {
        return false;
    }
    let mut buf = [0u8; 1];
    let open = match (&*stream).read(&mut buf) {
        Ok(0) => false,
        Ok(_) => true,
        Err(e) => e.kind() == io::ErrorKind::WouldBlock,
    };
    let _ = stream.set_nonblocking(false);
    open
}

/// As many file descriptors as the kernel allows this process (root may raise the hard limit).
pub fn raise_nofile() {
    let wanted = libc::rlimit {
        rlim_cur: NOFILE,
        rlim_max: NOFILE,
    };
    // SAFETY: setrlimit reads a valid rlimit struct; failure leaves the old limit.
    let _ = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) };
}

const NOFILE: libc::rlim_t = 65_536;
