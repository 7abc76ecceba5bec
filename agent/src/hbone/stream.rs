//! One CONNECT stream as a byte stream: h2's send and receive halves behind tokio's
//! `AsyncRead + AsyncWrite`, with flow control released as the reader consumes.
//!
//! `shutdown()` sends END_STREAM (a half-close); `abort()` resets the stream with
//! CONNECT_ERROR, which RFC 9113 §8.5 defines as "the TCP connection behind this CONNECT
//! was reset or abnormally closed". A reset from the peer, whatever its code, is a
//! `ConnectionReset` error for the reader and the writer, never an EOF: the application on
//! the other end must see a reset, not a clean close.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::copy;

pub(crate) struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received but not yet read.
    pending: Bytes,
    write_closed: bool,
}

impl H2Stream {
    pub(crate) fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self {
            send,
            recv,
            pending: Bytes::new(),
            write_closed: false,
        }
    }

    /// Resets the stream (both directions) with CONNECT_ERROR.
    pub(crate) fn abort(&mut self) {
        self.send.send_reset(Reason::CONNECT_ERROR);
        self.write_closed = true;
    }
}

impl H2Stream {
    /// Waits until `pending` holds received bytes, or stays empty at the end of the stream.
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.pending.is_empty() {
            match ready!(self.recv.poll_data(cx)) {
                None => break,
                Some(Ok(data)) => self.pending = data,
                Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Takes `n` bytes off `pending`.
    fn take_received(&mut self, n: usize) -> Bytes {
        // The window opens as the bytes are taken, so a slow reader slows the sender.
        let _ = self.recv.flow_control().release_capacity(n);
        self.pending.split_to(n)
    }

    /// Waits for send capacity, and returns how many of `len` bytes may be sent now.
    fn poll_send_capacity(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<usize>> {
        if self.write_closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if len == 0 {
            return Poll::Ready(Ok(0));
        }
        if let Poll::Ready(reset) = self.send.poll_reset(cx) {
            return Poll::Ready(Err(match reset {
                Ok(reason) => reset_error(reason),
                Err(e) => to_io(e),
            }));
        }
        self.send.reserve_capacity(len.min(MAX_WRITE));
        loop {
            let capacity = self.send.capacity();
            if capacity > 0 {
                return Poll::Ready(Ok(capacity.min(len)));
            }
            match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
                // The stream left the sending state: reset by the peer or the connection
                // went away.
                None => return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into())),
            }
        }
    }

    /// Sends `data` as DATA, within the capacity `poll_send_capacity` gave.
    fn queue_data(&mut self, data: Bytes) -> io::Result<usize> {
        let n = data.len();
        if n > 0 {
            self.send.send_data(data, false).map_err(to_io)?;
        }
        Ok(n)
    }
}

impl AsyncRead for H2Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_pending(cx))?;
        let n = this.pending.len().min(buf.remaining());
        buf.put_slice(&this.take_received(n));
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let n = ready!(this.poll_send_capacity(cx, buf.len()))?;
        Poll::Ready(this.queue_data(Bytes::copy_from_slice(&buf[..n])))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection task writes frames out as soon as they are queued.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.write_closed {
            self.write_closed = true;
            self.send.send_data(Bytes::new(), true).map_err(to_io)?;
        }
        Poll::Ready(Ok(()))
    }
}

/// DATA payloads cross without a copy: a received frame's bytes are handed over as h2
/// holds them, and the bytes read from the other side become the next frame as they are.
impl copy::Stream for H2Stream {
    fn abort(&mut self) {
        H2Stream::abort(self);
    }

    fn poll_read_chunk(
        &mut self,
        cx: &mut Context<'_>,
        _buffer: &mut copy::ReadBuffer,
    ) -> Poll<io::Result<Bytes>> {
        ready!(self.poll_pending(cx))?;
        Poll::Ready(Ok(self.take_received(self.pending.len())))
    }

    fn poll_write_chunk(
        &mut self,
        cx: &mut Context<'_>,
        chunk: &mut Bytes,
    ) -> Poll<io::Result<usize>> {
        let n = ready!(self.poll_send_capacity(cx, chunk.len()))?;
        Poll::Ready(self.queue_data(chunk.split_to(n)))
    }
}

fn reset_error(reason: Reason) -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionReset,
        format!("HBONE stream reset by peer: {reason}"),
    )
}

fn to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::ErrorKind::ConnectionReset.into());
    }
    let kind = if e.is_reset() || e.is_go_away() {
        io::ErrorKind::ConnectionReset
    } else {
        io::ErrorKind::Other
    };
    io::Error::new(kind, e)
}

/// Upper bound of one write's reservation, so one stream cannot pin the whole connection
/// window.
const MAX_WRITE: usize = 256 * 1024;
