use std::{
    fs::File,
    io::{BufRead, BufReader},
    sync::mpsc,
};

use nix::{fcntl::OFlag, unistd::pipe2};

use super::*;

/// A line of about the size of an access-log record, numbered.
fn line(id: u64) -> Vec<u8> {
    format!("line {id} {}\n", "x".repeat(500)).into_bytes()
}

/// Writes lines `ids` on a thread of their own; fails rather than hangs if any write waits
/// for the reader.
fn write_without_waiting(writer: &LineWriter, ids: std::ops::Range<u64>) {
    let (done, finished) = mpsc::channel();
    let writer = writer.clone();
    std::thread::spawn(move || {
        for id in ids {
            writer.write_line(&line(id));
        }
        let _ = done.send(());
    });
    finished
        .recv_timeout(Duration::from_secs(30))
        .expect("queueing a line waited for the reader");
}

#[test]
fn an_output_nobody_reads_costs_counted_lines_and_never_a_wait() {
    // A real pipe, as stdout is under a container runtime; its reader stops reading.
    let (read, write) = pipe2(OFlag::O_CLOEXEC).unwrap();
    let writer = LineWriter::new("test", File::from(write));
    // ~5 MB of lines: many times the pipe's 64 KiB and the 1 MiB queue.
    let stuck = 10_000;
    write_without_waiting(&writer, 0..stuck);
    let dropped = writer.dropped_lines().get();
    assert!(
        dropped > 0 && dropped < stuck,
        "{dropped} of {stuck} lines dropped"
    );
    assert!(
        !writer.flush(Duration::from_millis(50)),
        "nothing can be flushed into a pipe nobody reads"
    );

    // The reader comes back: what was queued arrives, and new lines pass again.
    let reader = std::thread::spawn(move || {
        BufReader::new(File::from(read))
            .lines()
            .map(Result::unwrap)
            .collect::<Vec<_>>()
    });
    assert!(writer.flush(Duration::from_secs(10)));
    write_without_waiting(&writer, stuck..stuck + 100);
    assert_eq!(
        writer.dropped_lines().get(),
        dropped,
        "a pipe that is read drops nothing"
    );
    // The last clone gone: the thread writes the rest and closes the pipe.
    drop(writer);
    let lines = reader.join().unwrap();

    let ids: Vec<u64> = lines
        .iter()
        .map(|l| {
            let mut words = l.split(' ');
            assert_eq!(words.next(), Some("line"), "{l}");
            let id = words.next().unwrap().parse().unwrap();
            assert_eq!(
                l.as_bytes(),
                &line(id)[..line(id).len() - 1],
                "whole lines only"
            );
            id
        })
        .collect();
    assert_eq!(
        ids.len() as u64 + dropped,
        stuck + 100,
        "each line written or counted"
    );
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "lines stay in order");
    assert_eq!(ids.last(), Some(&(stuck + 99)));
}

#[test]
fn lines_a_failing_output_cannot_take_are_counted_as_dropped() {
    struct Broken;
    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let writer = LineWriter::new("test", Broken);
    write_without_waiting(&writer, 0..50);
    assert!(writer.flush(Duration::from_secs(10)));
    assert_eq!(writer.dropped_lines().get(), 50);
}

#[test]
fn a_log_event_is_queued_as_one_line_and_the_thread_ends_with_the_last_clone() {
    let bytes = Arc::new(Mutex::new(Vec::new()));
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let writer = LineWriter::new("test", Shared(Arc::clone(&bytes)));
    let weak = Arc::downgrade(&writer.producer.shared);
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(writer.clone())
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        info!(component = "test", n = 1, "first event");
        warn!(component = "test", n = 2, "second event");
    });
    assert!(writer.flush(Duration::from_secs(10)));
    let text = String::from_utf8(bytes.lock().clone()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines[0].contains("first event") && lines[0].contains("n=1"),
        "{text}"
    );
    assert!(lines[1].contains("second event"), "{text}");

    drop(writer);
    let deadline = Instant::now() + Duration::from_secs(10);
    while weak.strong_count() > 0 {
        assert!(
            Instant::now() < deadline,
            "the writer thread outlived its last clone"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_batch_goes_out_in_pipe_sized_writes_of_whole_lines() {
    /// Records each write it is given.
    struct Writes(Vec<Vec<u8>>);
    impl Write for Writes {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let long = format!("{}\n", "y".repeat(3 * libc::PIPE_BUF)).into_bytes();
    let mut batch: Vec<u8> = (0..20).flat_map(line).collect();
    batch.extend_from_slice(&long);
    batch.extend(line(20));
    let mut writes = Writes(Vec::new());
    write_whole_lines(&mut writes, &batch).unwrap();

    assert_eq!(writes.0.concat(), batch, "every byte, in order");
    assert!(
        writes.0.len() < 20,
        "lines are batched: {} writes",
        writes.0.len()
    );
    for write in &writes.0 {
        assert!(write.ends_with(b"\n"), "a write ends at a line's end");
        assert!(
            write.len() <= libc::PIPE_BUF || *write == long,
            "only a line longer than PIPE_BUF exceeds it"
        );
    }
}
