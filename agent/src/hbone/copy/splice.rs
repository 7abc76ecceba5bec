//! One direction between two TCP sockets, through a pipe: `splice(2)` moves the received
//! pages from the source socket into the pipe and from the pipe into the destination
//! socket, so the bytes are never copied into (or out of) this process. The pipe holds at
//! most what one splice read moved, and is emptied before the next read, so a slow
//! destination slows the source as a full buffer would.
//!
//! The pipe is made when the source first has something (an idle connection, or a flood
//! of them, holds none). If no pipe can be made (the open-file limit), that direction is
//! copied through this process instead.

use std::{
    io,
    net::Shutdown,
    os::fd::{AsFd, OwnedFd},
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
                TcpWay::Spliced(spliced) => return spliced.poll(cx, from, to, counter),
                TcpWay::Copied(copied) => return copied.poll(cx, from, to, counter),
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

/// A direction's pipe and where it stands.
pub(super) struct Spliced {
    side: Side,
    read: OwnedFd,
    write: OwnedFd,
    /// Spliced in from the source, not yet out to the destination.
    in_pipe: usize,
    read_eof: bool,
    done: bool,
}

impl Spliced {
    pub(super) fn new(side: Side) -> io::Result<Self> {
        let (read, write) = pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        Ok(Self {
            side,
            read,
            write,
            in_pipe: 0,
            read_eof: false,
            done: false,
        })
    }
}

#[cfg(test)]
impl Spliced {
    pub(super) fn in_pipe(&self) -> usize {
        self.in_pipe
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
                match poll_splice(&*from, cx, Interest::READABLE, &*from, &self.write) {
                    Poll::Ready(Ok(0)) => self.read_eof = true,
                    Poll::Ready(Ok(n)) => self.in_pipe = n,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(read_err(e))),
                    Poll::Pending => return Poll::Pending,
                }
            }
            while self.in_pipe > 0 {
                match poll_splice(&*to, cx, Interest::WRITABLE, &self.read, &*to) {
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
