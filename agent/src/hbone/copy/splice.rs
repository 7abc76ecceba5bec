//! One direction between two TCP sockets, through a pipe: `splice(2)` moves the received
//! pages from the source socket into the pipe and from the pipe into the destination
//! socket, so the bytes are never copied into (or out of) this process. The pipe holds at
//! most what one splice read moved, and is emptied before the next read, so a slow
//! destination slows the source as a full buffer would.
//!
//! The pipe is taken when the source first has something (an idle connection, or a flood
//! of them, holds none). If no pipe can be made (the open-file limit), that direction is
//! copied through this process instead. A direction that ends cleanly leaves its pipe
//! empty and gives it back for the next one (see [`SPARE_PIPES`]).

use std::{
    cell::RefCell,
    io,
    net::Shutdown,
    os::fd::{AsFd, OwnedFd},
    sync::atomic::{AtomicUsize, Ordering},
    task::{Context, Poll, ready},
};

use nix::{
    fcntl::{OFlag, SpliceFFlags, splice},
    unistd::pipe2,
};
use tokio::{
    io::{Interest, ReadBuf},
    net::TcpStream,
};

use super::{Counter, Error, OneWay, Side, Way};

/// One direction between two TCP sockets: spliced, or copied when no pipe could be made;
/// undecided until the source first has a byte or its end.
pub(super) enum TcpWay {
    Undecided(Side),
    Spliced(Spliced),
    Copied(OneWay),
    /// Spliced to its end; the pipe was given back.
    Ended,
}

impl TcpWay {
    pub(super) fn new(side: Side) -> Self {
        TcpWay::Undecided(side)
    }
}

impl Way<TcpStream, TcpStream> for TcpWay {
    fn poll<C: Counter + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut TcpStream,
        to: &mut TcpStream,
        counter: &C,
    ) -> Poll<Result<(), Error>> {
        loop {
            match self {
                TcpWay::Spliced(spliced) => {
                    // An error drops the pipe with the way: it may hold bytes.
                    ready!(spliced.poll(cx, from, to, counter))?;
                    if let TcpWay::Spliced(ended) = std::mem::replace(self, TcpWay::Ended) {
                        ended.give_back_pipe();
                    }
                    return Poll::Ready(Ok(()));
                }
                TcpWay::Copied(copied) => return copied.poll(cx, from, to, counter),
                TcpWay::Ended => return Poll::Ready(Ok(())),
                TcpWay::Undecided(side) => {
                    let side = *side;
                    let (read_err, _) = side.error_constructors();
                    // Readiness can be spurious: wait for a byte (or the end) to be there.
                    let mut byte = [0u8; 1];
                    ready!(from.poll_peek(cx, &mut ReadBuf::new(&mut byte))).map_err(read_err)?;
                    *self = match Spliced::new(side) {
                        Ok(spliced) => TcpWay::Spliced(spliced),
                        Err(e) => {
                            crate::warn_limited!(component = "proxy", error = %e,
                                "cannot make a pipe for splice(2) (the open-file limit?): this \
                                 connection is copied through the proxy instead");
                            TcpWay::Copied(OneWay::new(side))
                        }
                    };
                }
            }
        }
    }
}

/// A pipe's two ends.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

thread_local! {
    /// Empty pipes of directions that ended cleanly, for the next ones on this worker
    /// thread: on short node-local connections `pipe2` alone took 3% of the proxy's CPU, and
    /// closing both ends more (BENCHMARKS.md). Per thread, so taking one takes no lock.
    static SPARE_PIPES: RefCell<Spares> = const { RefCell::new(Spares(Vec::new())) };
}

/// Spare pipes of all threads together: at most [`SPARE_PIPES_MAX`], whatever the number
/// of worker threads.
static SPARE_PIPES_HELD: AtomicUsize = AtomicUsize::new(0);

/// Two descriptors each: within the descriptors the connection budget leaves aside
/// (`proxy::limits`), so spares never cost a connection its pipes.
const SPARE_PIPES_MAX: usize = 64;

/// One thread's spare pipes; counted out of [`SPARE_PIPES_HELD`] when the thread ends.
struct Spares(Vec<Pipe>);

impl Drop for Spares {
    fn drop(&mut self) {
        SPARE_PIPES_HELD.fetch_sub(self.0.len(), Ordering::Relaxed);
    }
}

impl Pipe {
    /// A spare pipe of this thread, or a new one.
    fn take() -> io::Result<Pipe> {
        if let Some(pipe) = SPARE_PIPES.with_borrow_mut(|spares| spares.0.pop()) {
            SPARE_PIPES_HELD.fetch_sub(1, Ordering::Relaxed);
            return Ok(pipe);
        }
        let (read, write) = pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        Ok(Pipe { read, write })
    }

    /// Keeps an empty pipe for the next direction (or closes it, past the limit).
    fn give_back(self) {
        let held = SPARE_PIPES_HELD.fetch_add(1, Ordering::Relaxed);
        if held >= SPARE_PIPES_MAX {
            SPARE_PIPES_HELD.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        SPARE_PIPES.with_borrow_mut(|spares| spares.0.push(self));
    }
}

/// A direction's pipe and where it stands.
pub(super) struct Spliced {
    side: Side,
    pipe: Pipe,
    /// Spliced in from the source, not yet out to the destination.
    in_pipe: usize,
    read_eof: bool,
    done: bool,
}

impl Spliced {
    pub(super) fn new(side: Side) -> io::Result<Self> {
        Ok(Self {
            side,
            pipe: Pipe::take()?,
            in_pipe: 0,
            read_eof: false,
            done: false,
        })
    }

    /// Gives the pipe of a direction that ended cleanly back: only then is it known empty.
    fn give_back_pipe(self) {
        if self.done && self.in_pipe == 0 {
            self.pipe.give_back();
        }
    }
}

#[cfg(test)]
impl Spliced {
    pub(super) fn in_pipe(&self) -> usize {
        self.in_pipe
    }

    /// The pipe's read end, to tell one pipe from another.
    pub(super) fn pipe_id(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd as _;
        self.pipe.read.as_raw_fd()
    }

    /// How many spare pipes this thread holds.
    pub(super) fn spare_pipes() -> usize {
        SPARE_PIPES.with_borrow(|spares| spares.0.len())
    }
}

impl Way<TcpStream, TcpStream> for Spliced {
    fn poll<C: Counter + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut TcpStream,
        to: &mut TcpStream,
        counter: &C,
    ) -> Poll<Result<(), Error>> {
        let (read_err, write_err) = self.side.error_constructors();
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            if self.in_pipe == 0 && !self.read_eof {
                // Only into an empty pipe: then EAGAIN can only mean the socket has nothing.
                match poll_splice(&*from, cx, Interest::READABLE, &*from, &self.pipe.write) {
                    Poll::Ready(Ok(0)) => self.read_eof = true,
                    Poll::Ready(Ok(n)) => self.in_pipe = n,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(read_err(e))),
                    Poll::Pending => return Poll::Pending,
                }
            }
            while self.in_pipe > 0 {
                match poll_splice(&*to, cx, Interest::WRITABLE, &self.pipe.read, &*to) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(write_err(io::ErrorKind::WriteZero.into())));
                    }
                    Poll::Ready(Ok(n)) => {
                        self.in_pipe -= n.min(self.in_pipe);
                        counter.add(n as u64);
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(write_err(e))),
                    Poll::Pending => return Poll::Pending,
                }
            }
            if self.read_eof {
                // Half-close: pass the FIN on and keep the other direction open.
                socket2::SockRef::from(&*to)
                    .shutdown(Shutdown::Write)
                    .map_err(write_err)?;
                self.done = true;
            }
        }
    }
}

/// Splices from `input` to `output` (one of them a pipe, the other `socket`) as much as the
/// pipe holds, once `socket` is ready for `interest`; Pending (and woken on readiness)
/// while the socket would block.
fn poll_splice(
    socket: &TcpStream,
    cx: &mut Context<'_>,
    interest: Interest,
    input: impl AsFd,
    output: impl AsFd,
) -> Poll<io::Result<usize>> {
    loop {
        if interest.is_readable() {
            ready!(socket.poll_read_ready(cx))?;
        } else {
            ready!(socket.poll_write_ready(cx))?;
        }
        // `try_io` clears the readiness it saw when the splice would block, so the next
        // poll waits for the socket again.
        let spliced = socket.try_io(interest, || {
            splice(
                input.as_fd(),
                None,
                output.as_fd(),
                None,
                PIPE_BYTES,
                SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK,
            )
            .map_err(io::Error::from)
        });
        match spliced {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            result => return Poll::Ready(result),
        }
    }
}

/// What one splice moves at most: a default pipe's capacity (16 pages).
const PIPE_BYTES: usize = 64 * 1024;

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Barrier};

    use super::*;

    #[test]
    fn spare_pipes_stay_under_one_cap_for_all_threads_together() {
        const THREADS: usize = 4;
        let all_given_back = Arc::new(Barrier::new(THREADS + 1));
        let threads: Vec<_> = (0..THREADS)
            .map(|_| {
                let all_given_back = Arc::clone(&all_given_back);
                std::thread::spawn(move || {
                    let pipes: Vec<Pipe> = (0..SPARE_PIPES_MAX)
                        .map(|_| Pipe::take().unwrap())
                        .collect();
                    pipes.into_iter().for_each(Pipe::give_back);
                    let kept = SPARE_PIPES.with_borrow(|spares| spares.0.len());
                    // Held until every thread has given its pipes back.
                    all_given_back.wait();
                    kept
                })
            })
            .collect();
        all_given_back.wait();
        let kept: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert!(
            kept > 0 && kept <= SPARE_PIPES_MAX,
            "{THREADS} threads kept {kept} spare pipes"
        );
        assert!(SPARE_PIPES_HELD.load(Ordering::Relaxed) <= SPARE_PIPES_MAX);
    }
}
