//! Lines to stdout or stderr that never make their caller wait. Under a container runtime
//! both are pipes, and a log collector that stops reading (a slow disk, a stuck shim) fills
//! them: a plain write then blocks the thread, and a proxy worker blocked on its log blocks
//! every connection it serves. Callers only queue a line here; one thread per destination
//! writes the queue out in batches. Past `QUEUE_BYTES` waiting, lines are dropped and
//! counted, and the episode is logged when it starts and when it ends.

use std::{
    io::{self, Write},
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};

use prometheus_client::metrics::counter::Counter;
use tracing::{error, info, warn};
use tracing_subscriber::fmt::MakeWriter;

use crate::sync::{Condvar, Mutex};

/// How many bytes of lines may wait for one writer.
pub const QUEUE_BYTES: usize = 1 << 20;

/// How long a process ending waits for its queued lines to be written.
pub const EXIT_FLUSH: Duration = Duration::from_secs(2);

/// The batch buffer a writer keeps between batches; a bigger one (after a burst) is freed.
const KEPT_BATCH_BYTES: usize = 64 << 10;

/// A destination for whole lines. Cloning shares it.
#[derive(Clone)]
pub struct LineWriter {
    producer: Arc<Producer>,
}

/// Held by every clone of one `LineWriter`: when the last goes, its thread writes what is
/// queued and ends.
struct Producer {
    shared: Arc<Shared>,
}

/// What callers and the writer thread share.
struct Shared {
    /// Where the lines go, for the episode's log lines (`stdout`, `stderr`).
    name: &'static str,
    queue: Mutex<Queue>,
    /// Lines were queued, or the last producer went.
    queued: Condvar,
    /// The writer finished a batch.
    written: Condvar,
    /// Lines lost: the queue was full, or the write failed.
    dropped: Counter,
}

#[derive(Default)]
struct Queue {
    /// Whole lines, in order.
    bytes: Vec<u8>,
    /// Lines ever queued, and lines the writer is done with (written or failed).
    queued_lines: u64,
    done_lines: u64,
    /// Lines dropped since the writer last kept up.
    dropping: u64,
    /// No producer is left.
    closed: bool,
}

impl LineWriter {
    /// The process's stdout: one writer for every user in the process.
    pub fn stdout() -> Self {
        STDOUT
            .get_or_init(|| Self::new("stdout", io::stdout()))
            .clone()
    }

    /// The process's stderr, where the logs go.
    pub fn stderr() -> Self {
        STDERR
            .get_or_init(|| Self::new("stderr", io::stderr()))
            .clone()
    }

    /// Lines to `writer`, from a thread of their own; `name` says where they go.
    pub fn new(name: &'static str, writer: impl Write + Send + 'static) -> Self {
        let shared = Arc::new(Shared {
            name,
            queue: Mutex::default(),
            queued: Condvar::default(),
            written: Condvar::default(),
            dropped: Counter::default(),
        });
        let for_writer = Arc::clone(&shared);
        let started = std::thread::Builder::new()
            .name(format!("weft-{name}"))
            .spawn(move || write_lines(&for_writer, writer));
        if let Err(e) = started {
            // Lines then queue up to the limit and are counted as dropped.
            error!(component = "telemetry", output = name, error = %e,
                "cannot start the writer thread; lines to it are dropped");
        }
        Self {
            producer: Arc::new(Producer { shared }),
        }
    }

    /// Queues `line` (one or more whole lines, each ending in a newline). Never waits for
    /// the writer: when the queue is full the line is dropped and counted.
    pub fn write_line(&self, line: &[u8]) {
        let shared = &self.producer.shared;
        let mut queue = shared.queue.lock();
        if queue.bytes.len() + line.len() > QUEUE_BYTES {
            queue.dropping += 1;
            let first = queue.dropping == 1;
            drop(queue);
            shared.dropped.inc();
            if first {
                warn!(
                    component = "telemetry",
                    output = shared.name,
                    queued_bytes = QUEUE_BYTES,
                    "output is not keeping up; lines are dropped and counted until it does"
                );
            }
            return;
        }
        queue.bytes.extend_from_slice(line);
        queue.queued_lines += 1;
        drop(queue);
        shared.queued.notify_one();
    }

    /// Waits up to `timeout` for every line queued so far to be written (or to fail).
    /// Whether they all were.
    pub fn flush(&self, timeout: Duration) -> bool {
        let shared = &self.producer.shared;
        let deadline = Instant::now() + timeout;
        let mut queue = shared.queue.lock();
        let target = queue.queued_lines;
        while queue.done_lines < target {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            queue = shared.written.wait_timeout(queue, left);
        }
        true
    }

    /// Lines lost so far (the queue was full, or the write failed).
    pub fn dropped_lines(&self) -> Counter {
        self.producer.shared.dropped.clone()
    }
}

/// Waits for the process's queued stdout and stderr lines when it ends.
pub fn flush_at_exit() {
    for writer in [STDOUT.get(), STDERR.get()].into_iter().flatten() {
        writer.flush(EXIT_FLUSH);
    }
}

static STDOUT: OnceLock<LineWriter> = OnceLock::new();
static STDERR: OnceLock<LineWriter> = OnceLock::new();

impl Drop for Producer {
    fn drop(&mut self) {
        self.shared.queue.lock().closed = true;
        self.shared.queued.notify_one();
    }
}

/// The writer thread: takes everything queued as one batch, writes it out, and ends once
/// no producer is left and the queue is empty. A failed batch counts all its lines as lost.
fn write_lines(shared: &Shared, mut writer: impl Write) {
    let mut batch = Vec::new();
    let mut failing = false;
    loop {
        let mut queue = shared.queue.lock();
        while queue.bytes.is_empty() && !queue.closed {
            queue = shared.queued.wait(queue);
        }
        if queue.bytes.is_empty() {
            return;
        }
        std::mem::swap(&mut batch, &mut queue.bytes);
        let (through, lines) = (queue.queued_lines, queue.queued_lines - queue.done_lines);
        drop(queue);
        let result = write_whole_lines(&mut writer, &batch);
        batch.clear();
        batch.shrink_to(KEPT_BATCH_BYTES);
        if result.is_err() {
            // Counted before the lines are marked done: a flush that returns has seen them.
            shared.dropped.inc_by(lines);
        }
        let dropped = {
            let mut queue = shared.queue.lock();
            queue.done_lines = through;
            if result.is_ok() {
                std::mem::take(&mut queue.dropping)
            } else {
                0
            }
        };
        shared.written.notify_all();
        match result {
            Ok(()) if failing || dropped > 0 => {
                failing = false;
                info!(
                    component = "telemetry",
                    output = shared.name,
                    dropped,
                    "output keeps up again"
                );
            }
            Ok(()) => {}
            Err(e) => {
                if !std::mem::replace(&mut failing, true) {
                    warn!(component = "telemetry", output = shared.name, error = %e,
                        "writing failed; lines are dropped and counted");
                }
            }
        }
    }
}

/// Writes `batch` (whole lines) in writes of at most `PIPE_BUF` bytes that each end at a
/// line's end. A pipe takes such a write whole, so a line is never split by another writer
/// of the same pipe (stdout and stderr are one stream under systemd and `2>&1`). A longer
/// line goes alone, as it did when each line was its own write.
fn write_whole_lines(writer: &mut impl Write, batch: &[u8]) -> io::Result<()> {
    let mut rest = batch;
    while !rest.is_empty() {
        let end = if rest.len() <= libc::PIPE_BUF {
            rest.len()
        } else {
            rest[..libc::PIPE_BUF]
                .iter()
                .rposition(|&b| b == b'\n')
                .or_else(|| rest.iter().position(|&b| b == b'\n'))
                .map_or(rest.len(), |i| i + 1)
        };
        let (chunk, tail) = rest.split_at(end);
        writer.write_all(chunk)?;
        rest = tail;
    }
    writer.flush()
}

/// For the log subscriber: each event is formatted into a buffer of its own and queued
/// whole when the subscriber lets go of it.
impl<'a> MakeWriter<'a> for LineWriter {
    type Writer = EventLine<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        EventLine {
            to: self,
            line: Vec::new(),
        }
    }
}

/// One log event being formatted.
pub struct EventLine<'a> {
    to: &'a LineWriter,
    line: Vec<u8>,
}

impl Write for EventLine<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.line.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for EventLine<'_> {
    fn drop(&mut self) {
        if !self.line.is_empty() {
            self.to.write_line(&self.line);
        }
    }
}

#[cfg(test)]
mod tests;
