//! Byte copying between the application's connection and the upstream one (TCP, or an
//! HBONE stream): both ways at once, counting bytes as they go (so a failed connection
//! still reports what moved), and forwarding half-close: EOF on one side becomes a FIN
//! (shutdown(SHUT_WR), or END_STREAM) on the other, while the other direction keeps
//! flowing. An error on either side aborts both (RST, or RST_STREAM), and so does a
//! connection on which no byte moved either way for the idle timeout.

use std::{
    io,
    pin::Pin,
    sync::atomic::{AtomicU64, Ordering},
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::{Buf, Bytes, BytesMut};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use tokio_util::io::poll_read_buf;

mod splice;

/// Why a transfer ended early: which side failed, or that nothing moved for too long.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the application side failed: {0}")]
    Downstream(#[source] io::Error),
    #[error("the upstream side failed: {0}")]
    Upstream(#[source] io::Error),
    #[error("closed: no bytes either way for {} (agent.limits.idleTimeout)", humantime::format_duration(*.0))]
    IdleTimeout(Duration),
}

impl Error {
    /// The stable `reason` label of metrics and access logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Downstream(_) => "downstream",
            Error::Upstream(_) => "upstream",
            Error::IdleTimeout(_) => "idle_timeout",
        }
    }

    /// The same failure again (kind and message), for a second record of one connection.
    pub fn again(&self) -> Self {
        let again = |e: &io::Error| io::Error::new(e.kind(), e.to_string());
        match self {
            Error::Downstream(e) => Error::Downstream(again(e)),
            Error::Upstream(e) => Error::Upstream(again(e)),
            Error::IdleTimeout(idle) => Error::IdleTimeout(*idle),
        }
    }
}

/// Where one direction's bytes are counted: a connection record's counter, or both records
/// of a connection that each side of this node records (`Both`).
pub trait Counter: Sync {
    fn add(&self, bytes: u64);
    /// What has been counted so far.
    fn total(&self) -> u64;
}

impl Counter for AtomicU64 {
    fn add(&self, bytes: u64) {
        self.fetch_add(bytes, Ordering::Relaxed);
    }

    fn total(&self) -> u64 {
        self.load(Ordering::Relaxed)
    }
}

/// Counts into two counters at once; `total` is the first's.
pub struct Both<'a>(pub &'a AtomicU64, pub &'a AtomicU64);

impl Counter for Both<'_> {
    fn add(&self, bytes: u64) {
        self.0.add(bytes);
        self.1.add(bytes);
    }

    fn total(&self) -> u64 {
        self.0.total()
    }
}

/// One end of a proxied connection: a byte stream that can also be aborted, so that an
/// error on either side resets the other instead of closing it cleanly.
///
/// The copy moves bytes as `Bytes` chunks. A stream whose bytes already sit in buffers of
/// their own (an HBONE stream's DATA frames) hands them over and takes them as they are,
/// so that bulk bytes are not copied in user space between a TCP socket and an HTTP/2
/// frame (small reads are: `ReadBuffer`).
pub trait Stream: AsyncRead + AsyncWrite + Unpin {
    /// Makes the next close an abort: RST for TCP, RST_STREAM for an HBONE stream.
    fn abort(&mut self);

    /// Reads the next bytes as a chunk; an empty chunk is the end of the stream. By
    /// default they are read into `buffer` and taken from it (`ReadBuffer::take`).
    fn poll_read_chunk(
        &mut self,
        cx: &mut Context<'_>,
        buffer: &mut ReadBuffer,
    ) -> Poll<io::Result<Bytes>> {
        let buf = buffer.for_read();
        let offered = buf.capacity();
        ready!(poll_read_buf(Pin::new(&mut *self), cx, buf))?;
        Poll::Ready(Ok(buffer.take(offered)))
    }

    /// Writes from the front of `chunk` and advances it past what was written; `Ok(0)`
    /// only for an empty chunk. By default the bytes are copied (into the socket).
    fn poll_write_chunk(
        &mut self,
        cx: &mut Context<'_>,
        chunk: &mut Bytes,
    ) -> Poll<io::Result<usize>> {
        let n = ready!(Pin::new(&mut *self).poll_write(cx, chunk))?;
        chunk.advance(n);
        Poll::Ready(Ok(n))
    }

    /// Both directions ended cleanly: the next close is a clean one. (The proxy's TCP
    /// sockets are reset on close until then: `reset_until_finished`.)
    fn finished(&mut self) {}

    /// The TCP socket this stream is, if it is one: two of them are spliced.
    fn as_tcp(&mut self) -> Option<&mut TcpStream> {
        None
    }
}

impl Stream for TcpStream {
    fn abort(&mut self) {
        reset(self);
    }

    fn finished(&mut self) {
        // Failing to clear it leaves a RST after a clean end: the data was all delivered
        // (both FINs crossed) by then.
        let _ = socket2::SockRef::from(&*self).set_linger(None);
    }

    fn as_tcp(&mut self) -> Option<&mut TcpStream> {
        Some(self)
    }
}

/// Copies until both directions have seen EOF. On error, or when no byte moved either way
/// for `idle` (`Error::IdleTimeout`), both ends are aborted (RST, or RST_STREAM for
/// HBONE), so neither peer is left half-open waiting for data that will never come.
///
/// Between two TCP sockets the bytes are spliced (`splice`): moved through a pipe inside
/// the kernel, never copied into this process. A direction that cannot get a pipe (the
/// open-file limit) is copied.
pub async fn bidirectional<D: Stream + ?Sized, U: Stream + ?Sized, C: Counter + ?Sized>(
    downstream: &mut D,
    upstream: &mut U,
    sent: &C,
    received: &C,
    idle: Duration,
) -> Result<(), Error> {
    if let (Some(down), Some(up)) = (downstream.as_tcp(), upstream.as_tcp()) {
        let to_upstream = splice::TcpWay::new(Side::Downstream);
        let to_downstream = splice::TcpWay::new(Side::Upstream);
        return drive(to_upstream, to_downstream, down, up, sent, received, idle).await;
    }
    let to_upstream = OneWay::new(Side::Downstream);
    let to_downstream = OneWay::new(Side::Upstream);
    drive(
        to_upstream,
        to_downstream,
        downstream,
        upstream,
        sent,
        received,
        idle,
    )
    .await
}

/// One direction of a copy, polled by hand so both directions share one task and borrow
/// the two streams without splitting them.
trait Way<R: ?Sized, W: ?Sized> {
    /// Moves what `from` has to `to`, counting it; Ready once `from` ended and `to` was
    /// half-closed.
    fn poll<C: Counter + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut R,
        to: &mut W,
        counter: &C,
    ) -> Poll<Result<(), Error>>;
}

/// Runs both directions under the idle timer, then finishes both ends, or aborts both.
async fn drive<D, U, C>(
    mut to_upstream: impl Way<D, U>,
    mut to_downstream: impl Way<U, D>,
    downstream: &mut D,
    upstream: &mut U,
    sent: &C,
    received: &C,
    idle: Duration,
) -> Result<(), Error>
where
    D: Stream + ?Sized,
    U: Stream + ?Sized,
    C: Counter + ?Sized,
{
    let moved = || sent.total() + received.total();
    let mut last_moved = moved();
    let idle_timer = tokio::time::sleep(idle);
    tokio::pin!(idle_timer);
    let result = std::future::poll_fn(|cx| {
        let up = to_upstream.poll(cx, &mut *downstream, &mut *upstream, sent)?;
        let down = to_downstream.poll(cx, &mut *upstream, &mut *downstream, received)?;
        if let (Poll::Ready(()), Poll::Ready(())) = (up, down) {
            return Poll::Ready(Ok(()));
        }
        let now_moved = moved();
        if now_moved != last_moved {
            last_moved = now_moved;
            if let Some(deadline) = tokio::time::Instant::now().checked_add(idle) {
                idle_timer.as_mut().reset(deadline);
            }
        }
        match idle_timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(Error::IdleTimeout(idle))),
            Poll::Pending => Poll::Pending,
        }
    })
    .await;
    if result.is_ok() {
        downstream.finished();
        upstream.finished();
    } else {
        downstream.abort();
        upstream.abort();
    }
    result
}

/// `bidirectional`, cut short when `stop` resolves first (a policy change revoked the
/// connection): both ends are aborted and `stop`'s error returned. The caller's error type
/// says why it stopped; a failed copy becomes one through `From`.
///
/// `stop` is pinned by the caller (`std::pin::pin!`): a future passed by value would be
/// stored twice in this one's state (an argument's slot stays reserved after it moves),
/// and every open connection holds that state.
pub async fn bidirectional_until<
    D: Stream + ?Sized,
    U: Stream + ?Sized,
    C: Counter + ?Sized,
    E: From<Error>,
>(
    downstream: &mut D,
    upstream: &mut U,
    sent: &C,
    received: &C,
    idle: Duration,
    stop: Pin<&mut impl Future<Output = E>>,
) -> Result<(), E> {
    let stopped = tokio::select! {
        result = bidirectional(&mut *downstream, &mut *upstream, sent, received, idle) => return result.map_err(E::from),
        e = stop => e,
    };
    downstream.abort();
    upstream.abort();
    Err(stopped)
}

/// Makes the proxy's end of an application's connection, from its accept or connect on,
/// close with a RST until `bidirectional` finishes it cleanly: a refusal, an error, a cut,
/// and the proxy's own crash (the kernel closes a killed process's sockets as their
/// SO_LINGER says) are then all resets, so that an application never takes a lost proxy
/// for the clean end of its stream.
pub fn reset_until_finished(stream: &TcpStream) {
    reset(stream);
}

/// Aborts a connection with RST instead of FIN.
pub fn reset(stream: &TcpStream) {
    // SO_LINGER 0 turns the close into a RST (without blocking: there is nothing to wait
    // for); failing to set it only downgrades the close to a FIN.
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

#[derive(Clone, Copy)]
enum Side {
    /// Reading from the application, writing upstream.
    Downstream,
    /// Reading from upstream, writing to the application.
    Upstream,
}

/// Builds an `Error` from an I/O error of one side.
type ErrorFn = fn(io::Error) -> Error;

impl Side {
    /// Which side a read error and a write error belong to.
    fn error_constructors(self) -> (ErrorFn, ErrorFn) {
        match self {
            Side::Downstream => (Error::Downstream, Error::Upstream),
            Side::Upstream => (Error::Upstream, Error::Downstream),
        }
    }
}

/// The buffer one direction reads into. It costs nothing while the connection is idle: it
/// is freed whenever everything read has been written and the source has nothing more for
/// now, and comes back on the next read — small for request/response traffic, `BUF_SIZE`
/// once reads fill it (bulk). A node holding thousands of quiet connections then holds no
/// copy buffers for them.
///
/// A read that filled at least half the room it had is split off as a chunk without a copy
/// (bulk traffic), and the buffer takes the allocation back once the chunk has been written
/// and dropped. A smaller read is copied out, and the room kept for the next read. A chunk
/// can wait in a queue (an HBONE stream's, behind a slow peer) while more is read, so a
/// chunk never pins an allocation more than twice its size: a pod's stream of small writes
/// cannot make the proxy hold 4 KiB for every few bytes. Its spare capacity is never zeroed.
#[derive(Default)]
pub struct ReadBuffer {
    buf: BytesMut,
    /// The last read filled the size wanted: the next buffer is a large one.
    bulk: bool,
}

impl ReadBuffer {
    /// Empty, with room for the next read: allocated on demand, sized by recent traffic.
    fn for_read(&mut self) -> &mut BytesMut {
        let wanted = self.wanted();
        self.buf.reserve(wanted);
        &mut self.buf
    }

    fn wanted(&self) -> usize {
        if self.bulk { BUF_SIZE } else { SMALL_BUF_SIZE }
    }

    /// What a read into `for_read`'s buffer, which had room for `offered`, brought. A read
    /// that filled the wanted size marks the traffic as bulk.
    fn take(&mut self, offered: usize) -> Bytes {
        self.bulk = self.buf.len() >= self.wanted();
        if self.buf.len() * 2 >= offered {
            return self.buf.split().freeze();
        }
        let chunk = Bytes::copy_from_slice(&self.buf);
        self.buf.clear();
        chunk
    }

    /// Nothing to write and nothing to read for now: let the allocation go.
    fn release(&mut self) {
        self.buf = BytesMut::new();
    }
}

/// One direction of the copy through a buffer of this process (`ReadBuffer`), between any
/// two streams.
struct OneWay {
    side: Side,
    buffer: ReadBuffer,
    /// Read but not yet written.
    pending: Bytes,
    read_eof: bool,
    unflushed: bool,
    done: bool,
}

impl OneWay {
    fn new(side: Side) -> Self {
        Self {
            side,
            buffer: ReadBuffer::default(),
            pending: Bytes::new(),
            read_eof: false,
            unflushed: false,
            done: false,
        }
    }
}

impl<R: Stream + ?Sized, W: Stream + ?Sized> Way<R, W> for OneWay {
    fn poll<C: Counter + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut R,
        to: &mut W,
        counter: &C,
    ) -> Poll<Result<(), Error>> {
        let (read_err, write_err) = self.side.error_constructors();
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            if self.pending.is_empty() && !self.read_eof {
                match from.poll_read_chunk(cx, &mut self.buffer) {
                    Poll::Ready(Ok(chunk)) if chunk.is_empty() => {
                        self.read_eof = true;
                        self.buffer.release();
                    }
                    Poll::Ready(Ok(chunk)) => self.pending = chunk,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(read_err(e))),
                    Poll::Pending => {
                        self.buffer.release();
                        // Nothing more to read for now: push out what was written.
                        if self.unflushed {
                            match Pin::new(&mut *to).poll_flush(cx) {
                                Poll::Ready(Ok(())) => self.unflushed = false,
                                Poll::Ready(Err(e)) => return Poll::Ready(Err(write_err(e))),
                                Poll::Pending => {}
                            }
                        }
                        return Poll::Pending;
                    }
                }
            }
            while !self.pending.is_empty() {
                let written = match to.poll_write_chunk(cx, &mut self.pending) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(write_err(io::ErrorKind::WriteZero.into())));
                    }
                    Poll::Ready(Ok(n)) => n,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(write_err(e))),
                    Poll::Pending => return Poll::Pending,
                };
                self.unflushed = true;
                counter.add(written as u64);
            }
            if self.read_eof {
                // Half-close: pass the FIN on and keep the other direction open.
                match Pin::new(&mut *to).poll_shutdown(cx) {
                    Poll::Ready(Ok(())) => self.done = true,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(write_err(e))),
                    Poll::Pending => return Poll::Pending,
                }
            }
        }
    }
}

/// Large enough that a bulk transfer moves in few syscalls on loopback.
const BUF_SIZE: usize = 64 * 1024;
/// Enough for most requests and responses of request/response protocols.
const SMALL_BUF_SIZE: usize = 4 * 1024;

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (a.unwrap(), b.unwrap().0)
    }

    /// Polls one direction until it has nothing to do.
    async fn settle(
        way: &mut impl Way<TcpStream, TcpStream>,
        from: &mut TcpStream,
        to: &mut TcpStream,
    ) {
        let counter = AtomicU64::new(0);
        // Let the bytes written by the test cross loopback first.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        std::future::poll_fn(|cx| {
            assert!(way.poll(cx, &mut *from, &mut *to, &counter).is_pending());
            Poll::Ready(())
        })
        .await;
    }

    #[tokio::test]
    async fn idle_connections_hold_no_copy_buffer() {
        let (mut app, mut down) = pair().await;
        let (mut up, mut server) = pair().await;
        let mut way = OneWay::new(Side::Downstream);

        app.write_all(b"ping").await.unwrap();
        settle(&mut way, &mut down, &mut up).await;
        let mut got = [0u8; 4];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        assert_eq!(way.buffer.buf.capacity(), 0, "buffer freed once idle");
        assert!(!way.buffer.bulk);

        // A read that fills the small buffer marks the traffic as bulk.
        app.write_all(&[1u8; 3 * SMALL_BUF_SIZE]).await.unwrap();
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; 3 * SMALL_BUF_SIZE];
            server.read_exact(&mut got).await.unwrap();
        });
        settle(&mut way, &mut down, &mut up).await;
        reader.await.unwrap();
        assert_eq!(way.buffer.buf.capacity(), 0, "freed again after the burst");
    }

    #[tokio::test]
    async fn small_reads_are_copied_and_large_ones_handed_over_in_their_buffer() {
        let (mut app, mut down) = pair().await;
        let mut buffer = ReadBuffer::default();
        let mut read = async |buffer: &mut ReadBuffer, payload: &[u8]| {
            app.write_all(payload).await.unwrap();
            // All of it in the socket's queue before the read.
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            let chunk = std::future::poll_fn(|cx| down.poll_read_chunk(cx, buffer))
                .await
                .unwrap();
            assert!(
                chunk[..] == payload[..],
                "{} of {} bytes",
                chunk.len(),
                payload.len()
            );
            chunk
        };

        // A few bytes are copied out: a queued chunk must not pin the whole buffer.
        let small = read(&mut buffer, b"ping").await;
        let room = buffer.buf.as_ptr();
        assert_ne!(small.as_ptr(), room);
        // A read that fills the buffer is handed over in it, without a copy.
        let full = read(&mut buffer, &[1u8; SMALL_BUF_SIZE]).await;
        assert_eq!(full.as_ptr(), room);
        assert!(buffer.bulk);
        // Once a chunk was written (and dropped), the buffer takes its allocation back:
        // bulk reads that fill it reuse one allocation from its start.
        drop(full);
        let fill = |buffer: &mut ReadBuffer| {
            let room = buffer.for_read();
            let (start, offered) = (room.as_ptr(), room.capacity());
            room.extend_from_slice(&vec![2u8; offered]);
            let chunk = buffer.take(offered);
            assert_eq!(chunk.as_ptr(), start, "handed over without a copy");
            start
        };
        fill(&mut buffer);
        assert_eq!(fill(&mut buffer), fill(&mut buffer));

        app.shutdown().await.unwrap();
        let eof = std::future::poll_fn(|cx| down.poll_read_chunk(cx, &mut buffer)).await;
        assert!(eof.unwrap().is_empty(), "EOF is an empty chunk");
    }

    #[tokio::test]
    async fn copies_both_ways_and_forwards_half_close() {
        // app <-> (down) proxy (up) <-> server
        let (mut app, mut down) = pair().await;
        let (mut up, mut server) = pair().await;
        let sent = AtomicU64::new(0);
        let received = AtomicU64::new(0);
        let proxy = async { bidirectional(&mut down, &mut up, &sent, &received, IDLE).await };
        let peers = async {
            let payload = vec![7u8; 1_000_000];
            app.write_all(&payload).await.unwrap();
            app.shutdown().await.unwrap();
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, payload);
            // The server still answers after the client's FIN.
            server.write_all(b"bye").await.unwrap();
            server.shutdown().await.unwrap();
            let mut reply = Vec::new();
            app.read_to_end(&mut reply).await.unwrap();
            assert_eq!(reply, b"bye");
        };
        let (result, ()) = tokio::join!(proxy, peers);
        result.unwrap();
        assert_eq!(sent.load(Ordering::Relaxed), 1_000_000);
        assert_eq!(received.load(Ordering::Relaxed), 3);
    }

    #[tokio::test]
    async fn upstream_reset_resets_the_application() {
        let (mut app, mut down) = pair().await;
        let (mut up, server) = pair().await;
        reset(&server);
        drop(server);
        let sent = AtomicU64::new(0);
        let received = AtomicU64::new(0);
        app.write_all(b"x").await.unwrap();
        let result = bidirectional(&mut down, &mut up, &sent, &received, IDLE).await;
        assert!(
            matches!(result, Err(Error::Upstream(_)) | Err(Error::Downstream(_))),
            "{result:?}"
        );
        drop(down);
        let mut buf = [0u8; 1];
        let err = app.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
    }

    #[tokio::test]
    async fn an_idle_connection_is_reset_after_the_idle_timeout_and_a_busy_one_is_not() {
        let (mut app, mut down) = pair().await;
        let (mut up, mut server) = pair().await;
        let sent = AtomicU64::new(0);
        let received = AtomicU64::new(0);
        let idle = std::time::Duration::from_millis(400);
        let peers = async {
            // A byte every 250 ms for a second keeps it open past the 400 ms timeout…
            for _ in 0..4 {
                app.write_all(b"x").await.unwrap();
                let mut got = [0u8; 1];
                server.read_exact(&mut got).await.unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
        };
        let started = tokio::time::Instant::now();
        let (result, ()) = tokio::join!(
            bidirectional(&mut down, &mut up, &sent, &received, idle),
            peers
        );
        // …then silence ends it, 400 ms after the last byte.
        assert!(matches!(result, Err(Error::IdleTimeout(_))), "{result:?}");
        let elapsed = started.elapsed();
        assert!(
            elapsed >= std::time::Duration::from_millis(1_150),
            "{elapsed:?}"
        );
        assert_eq!(sent.load(Ordering::Relaxed), 4);
        drop(down);
        let mut buf = [0u8; 1];
        let err = app.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
    }

    #[tokio::test]
    async fn a_tcp_direction_takes_a_pipe_only_once_bytes_arrive() {
        let (mut app, mut down) = pair().await;
        let (mut up, mut server) = pair().await;
        let mut way = splice::TcpWay::new(Side::Downstream);
        settle(&mut way, &mut down, &mut up).await;
        assert!(
            matches!(way, splice::TcpWay::Undecided(_)),
            "an idle connection holds no pipe"
        );
        app.write_all(b"ping").await.unwrap();
        settle(&mut way, &mut down, &mut up).await;
        assert!(matches!(way, splice::TcpWay::Spliced(_)));
        let mut got = [0u8; 4];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
    }

    /// `tokio::test` runs on one thread, so the spare pipes this test sees are its own.
    #[tokio::test]
    async fn a_pipe_is_reused_only_after_its_direction_ended_cleanly() {
        let (mut app, mut down) = pair().await;
        let (mut up, mut server) = pair().await;
        let mut way = splice::TcpWay::new(Side::Downstream);
        app.write_all(b"first").await.unwrap();
        settle(&mut way, &mut down, &mut up).await;
        let first_pipe = spliced(&way).pipe_id();
        app.shutdown().await.unwrap();
        let counter = AtomicU64::new(0);
        std::future::poll_fn(|cx| way.poll(cx, &mut down, &mut up, &counter))
            .await
            .unwrap();
        assert!(matches!(way, splice::TcpWay::Ended));
        assert_eq!(splice::Spliced::spare_pipes(), 1);
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"first", "the bytes, then the FIN");

        // The next direction takes that pipe, and it carries that direction's bytes only.
        let (mut app, mut down) = pair().await;
        let (mut up, mut server) = pair().await;
        let mut next = splice::TcpWay::new(Side::Downstream);
        app.write_all(b"second").await.unwrap();
        settle(&mut next, &mut down, &mut up).await;
        assert_eq!(spliced(&next).pipe_id(), first_pipe);
        assert_eq!(splice::Spliced::spare_pipes(), 0);
        let mut got = [0u8; 6];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"second");

        // Cut with bytes still in its pipe (a destination that does not read): the pipe
        // is closed, never given to another connection.
        let chunk = vec![7u8; 1 << 20];
        let writer = tokio::spawn(async move {
            for _ in 0..16 {
                if app.write_all(&chunk).await.is_err() {
                    break;
                }
            }
        });
        for _ in 0..10 {
            settle(&mut next, &mut down, &mut up).await;
        }
        assert!(spliced(&next).in_pipe() > 0, "the pipe holds bytes");
        drop(next);
        assert_eq!(splice::Spliced::spare_pipes(), 0);
        writer.abort();
    }

    fn spliced(way: &splice::TcpWay) -> &splice::Spliced {
        match way {
            splice::TcpWay::Spliced(spliced) => spliced,
            _ => panic!("the direction holds no pipe"),
        }
    }

    #[tokio::test]
    async fn a_spliced_direction_holds_at_most_a_pipe_for_a_destination_that_does_not_read() {
        let (mut app, mut down) = pair().await;
        let (mut up, mut server) = pair().await;
        let mut way = splice::Spliced::new(Side::Downstream).unwrap();
        let writer = tokio::spawn(async move {
            // Far more than the sockets' buffers hold: the writer must be held back.
            let chunk = vec![1u8; 1 << 20];
            for _ in 0..64 {
                if app.write_all(&chunk).await.is_err() {
                    break;
                }
            }
            app
        });
        for _ in 0..10 {
            settle(&mut way, &mut down, &mut up).await;
        }
        assert!(
            way.in_pipe() <= 64 * 1024,
            "{} bytes in the pipe",
            way.in_pipe()
        );
        assert!(!writer.is_finished(), "the source was held back");
        // The server reads: everything flows again, every byte once.
        let mut got = vec![0u8; 1 << 20];
        server.read_exact(&mut got).await.unwrap();
        assert!(got.iter().all(|&b| b == 1));
        writer.abort();
    }

    const IDLE: std::time::Duration = std::time::Duration::from_secs(3_600);
}
