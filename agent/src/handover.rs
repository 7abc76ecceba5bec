//! Listener hand-over between two agents on one node (issue 16): the wire format (`app`
//! wires both sides). The running agent sends a size-capped, length-prefixed JSON manifest of its
//! pod listeners, then their file descriptors (SCM_RIGHTS, at most `MAX_FDS_PER_MESSAGE` a
//! message) over a unix stream socket; the successor checks each descriptor against what
//! the manifest declares before it may serve it (`validate`).
//!
//! Every read and write is bounded by the socket's timeouts (set by `prepare`) and every
//! length by a constant below: a stuck or hostile peer fails the hand-over, never hangs it.

use std::{
    io::{self, IoSlice, IoSliceMut, Read, Write},
    net::{SocketAddr, TcpListener},
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::net::UnixStream,
    },
    time::Duration,
};

use ebpf_common::netns::NetnsCookie;
use nix::sys::socket::{self, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{Deserialize, Serialize};

use crate::ebpf;

/// Where the running agent offers its listeners (`agent.handover`; off without it).
#[derive(Clone, Debug, Serialize)]
pub struct Config {
    /// The unix socket (mode 0600).
    pub socket: std::path::PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("hand-over socket I/O failed (is the other agent alive?): {0}")]
    Io(#[source] io::Error),
    #[error("hand-over manifest of {0} bytes is over the limit of {MAX_MANIFEST} bytes")]
    TooLarge(usize),
    #[error("hand-over manifest is not valid: {0}")]
    Manifest(#[source] serde_json::Error),
    #[error("hand-over manifest is version {0}; this agent speaks version {VERSION}")]
    Version(u32),
    #[error("hand-over manifest declares {0} listeners, over the limit of {MAX_LISTENERS}")]
    TooMany(usize),
    #[error("hand-over sent {got} file descriptors for {declared} declared listeners")]
    FdCount { declared: usize, got: usize },
}

/// Why a received descriptor is not the listener the manifest declared. It is then closed,
/// and the successor binds that listener afresh.
#[derive(Debug, thiserror::Error)]
pub enum Invalid {
    #[error("cannot inspect the socket: {0}")]
    Inspect(#[source] io::Error),
    #[error("not a TCP stream socket")]
    NotStream,
    #[error("not listening")]
    NotListening,
    #[error("bound to {0:?}, not the declared address")]
    Address(Option<SocketAddr>),
    #[error("in network namespace {0:?}, not the declared pod's")]
    Netns(NetnsCookie),
}

/// What the running agent declares for each listener it hands over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Declared {
    /// The pod's network namespace (`SO_NETNS_COOKIE`).
    pub netns_cookie: u64,
    /// Where the listener is bound, inside the pod.
    pub addr: SocketAddr,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    version: u32,
    listeners: Vec<Declared>,
}

/// Sets the socket's read and write timeouts: every later call is bounded by them.
pub fn prepare(stream: &UnixStream, timeout: Duration) -> Result<(), Error> {
    stream.set_read_timeout(Some(timeout)).map_err(Error::Io)?;
    stream.set_write_timeout(Some(timeout)).map_err(Error::Io)
}

/// Sends the manifest, then the descriptors in manifest order.
pub fn send(stream: &UnixStream, listeners: &[(Declared, BorrowedFd<'_>)]) -> Result<(), Error> {
    if listeners.len() > MAX_LISTENERS {
        return Err(Error::TooMany(listeners.len()));
    }
    let manifest = Manifest {
        version: VERSION,
        listeners: listeners.iter().map(|(declared, _)| *declared).collect(),
    };
    write_frame(
        stream,
        &serde_json::to_vec(&manifest).map_err(Error::Manifest)?,
    )?;
    for batch in listeners.chunks(MAX_FDS_PER_MESSAGE) {
        let fds: Vec<i32> = batch.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
        // One data byte carries the control message (a message without data is not sent).
        let sent = socket::sendmsg::<()>(
            stream.as_raw_fd(),
            &[IoSlice::new(&[batch.len() as u8])],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::MSG_NOSIGNAL,
            None,
        );
        sent.map_err(|e| Error::Io(e.into()))?;
    }
    Ok(())
}

/// Receives a manifest and its descriptors (owned: closed on drop, close-on-exec).
pub fn receive(stream: &UnixStream) -> Result<Vec<(Declared, OwnedFd)>, Error> {
    let frame = read_frame(stream)?;
    let manifest: Manifest = serde_json::from_slice(&frame).map_err(Error::Manifest)?;
    if manifest.version != VERSION {
        return Err(Error::Version(manifest.version));
    }
    let declared = manifest.listeners.len();
    if declared > MAX_LISTENERS {
        return Err(Error::TooMany(declared));
    }
    let mut fds: Vec<OwnedFd> = Vec::with_capacity(declared);
    while fds.len() < declared {
        let before = fds.len();
        receive_batch(stream, &mut fds)?;
        if fds.len() == before {
            break;
        }
    }
    if fds.len() != declared {
        return Err(Error::FdCount {
            declared,
            got: fds.len(),
        });
    }
    Ok(manifest.listeners.into_iter().zip(fds).collect())
}

/// The successor serves everything it took over: the predecessor may stop accepting. True
/// only when the predecessor confirmed it (it stops accepting); false when it had given up
/// first and serves its pods again.
pub fn say_ready(mut stream: &UnixStream) -> Result<bool, Error> {
    stream.write_all(&[READY]).map_err(Error::Io)?;
    read_ready(stream)
}

/// Waits (within the socket's read timeout) for the successor's `say_ready` and confirms
/// it: false when the successor went away first, or said something else.
pub fn wait_ready(mut stream: &UnixStream) -> Result<bool, Error> {
    if !read_ready(stream)? {
        return Ok(false);
    }
    // Confirmed before this agent stops accepting: a successor that hears nothing knows
    // its predecessor gave up, and stops rather than serve beside it.
    stream.write_all(&[READY]).map_err(Error::Io)?;
    Ok(true)
}

fn read_ready(mut stream: &UnixStream) -> Result<bool, Error> {
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Ok(1) => Ok(byte[0] == READY),
        Ok(_) => Ok(false),
        Err(e) => Err(Error::Io(e)),
    }
}

/// The predecessor closed the hand-over before this agent said it was ready: it gave up
/// waiting and serves its pods again. Never blocks.
pub fn predecessor_gone(stream: &UnixStream) -> bool {
    let mut byte = [0u8; 1];
    let peeked = socket::recv(
        stream.as_raw_fd(),
        &mut byte,
        MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
    );
    // Ok(0): end of stream. EAGAIN: still there, silent. A byte: it never sends one
    // unasked, so it is broken too.
    !matches!(
        peeked,
        Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR)
    )
}

/// Checks that `fd` is the listener `declared` says, and turns it into one.
pub fn validate(declared: &Declared, fd: OwnedFd) -> Result<TcpListener, Invalid> {
    let socket = socket2::SockRef::from(&fd);
    if socket.r#type().map_err(Invalid::Inspect)? != socket2::Type::STREAM {
        return Err(Invalid::NotStream);
    }
    if !socket.is_listener().map_err(Invalid::Inspect)? {
        return Err(Invalid::NotListening);
    }
    let bound = socket.local_addr().map_err(Invalid::Inspect)?.as_socket();
    if bound != Some(declared.addr) {
        return Err(Invalid::Address(bound));
    }
    let cookie = ebpf::netns_cookie_of(&fd).map_err(Invalid::Inspect)?;
    if cookie.0 != declared.netns_cookie {
        return Err(Invalid::Netns(cookie));
    }
    Ok(TcpListener::from(fd))
}

fn receive_batch(stream: &UnixStream, fds: &mut Vec<OwnedFd>) -> Result<(), Error> {
    let mut byte = [0u8; 1];
    let mut iov = [IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([i32; MAX_FDS_PER_MESSAGE]);
    let message = socket::recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(|e| Error::Io(e.into()))?;
    if message.bytes == 0 {
        return Err(Error::Io(io::ErrorKind::UnexpectedEof.into()));
    }
    let mut batch = Vec::new();
    let cmsgs = message.cmsgs().map_err(|e| Error::Io(e.into()))?;
    for cmsg in cmsgs {
        if let ControlMessageOwned::ScmRights(raw) = cmsg {
            for fd in raw {
                // SAFETY: the kernel just installed `fd` in this process for this message
                // (SCM_RIGHTS); nothing else owns it.
                batch.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    // A truncated control message (more descriptors than room) is refused whole: the
    // kernel closed what did not fit, and dropping `batch` closes the rest.
    if message.flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err(Error::Io(io::Error::other(
            "more descriptors than a message may carry",
        )));
    }
    fds.append(&mut batch);
    Ok(())
}

fn write_frame(mut stream: &UnixStream, body: &[u8]) -> Result<(), Error> {
    if body.len() > MAX_MANIFEST {
        return Err(Error::TooLarge(body.len()));
    }
    let len = u32::try_from(body.len()).map_err(|_| Error::TooLarge(body.len()))?;
    stream.write_all(&len.to_be_bytes()).map_err(Error::Io)?;
    stream.write_all(body).map_err(Error::Io)
}

fn read_frame(mut stream: &UnixStream) -> Result<Vec<u8>, Error> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).map_err(Error::Io)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_MANIFEST {
        return Err(Error::TooLarge(len));
    }
    let mut body = vec![0; len];
    stream.read_exact(&mut body).map_err(Error::Io)?;
    Ok(body)
}

pub const DEFAULT_SOCKET: &str = "/var/run/weft/handover.sock";
/// The one byte of `say_ready`.
const READY: u8 = 0x01;
/// Version of the manifest; a successor that speaks another binds its listeners afresh.
pub const VERSION: u32 = 1;
/// SCM_MAX_FD: the kernel refuses more descriptors in one message.
pub const MAX_FDS_PER_MESSAGE: usize = 253;
/// Three listeners (two with dual stack) per pod, for far more pods than a node runs.
pub const MAX_LISTENERS: usize = 5 * 4096;
/// 100 bytes a listener is generous; the cap keeps a hostile peer from making us allocate.
pub const MAX_MANIFEST: usize = 100 * MAX_LISTENERS;

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    fn listeners(n: usize) -> Vec<TcpListener> {
        (0..n)
            .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
            .collect()
    }

    fn declared(listener: &TcpListener) -> Declared {
        Declared {
            netns_cookie: ebpf::own_netns_cookie().unwrap().0,
            addr: listener.local_addr().unwrap(),
        }
    }

    fn hand_over(listeners: &[TcpListener]) -> Result<Vec<(Declared, OwnedFd)>, Error> {
        let (old, new) = UnixStream::pair().unwrap();
        prepare(&new, Duration::from_secs(5)).unwrap();
        let sent: Vec<_> = listeners.iter().map(|l| (declared(l), l.as_fd())).collect();
        std::thread::scope(|s| {
            s.spawn(|| send(&old, &sent).unwrap());
            receive(&new)
        })
    }

    #[test]
    fn listeners_cross_in_batches_and_keep_accepting() {
        // More than one message's worth of descriptors.
        let ours = listeners(MAX_FDS_PER_MESSAGE + 10);
        let received = hand_over(&ours).unwrap();
        assert_eq!(received.len(), ours.len());
        let inherited: Vec<TcpListener> = received
            .into_iter()
            .map(|(declared, fd)| validate(&declared, fd).unwrap())
            .collect();
        // The same socket: a connect queued on it is accepted by the successor.
        let last = inherited.last().unwrap();
        let _client = std::net::TcpStream::connect(last.local_addr().unwrap()).unwrap();
        drop(ours);
        last.accept().unwrap();
    }

    #[test]
    fn a_descriptor_that_is_not_the_declared_listener_is_refused() {
        let ours = listeners(2);
        let (first, second) = (declared(&ours[0]), declared(&ours[1]));
        let check = |declared: &Declared, fd: &dyn AsFd| {
            validate(declared, fd.as_fd().try_clone_to_owned().unwrap()).unwrap_err()
        };
        assert!(matches!(check(&second, &ours[0]), Invalid::Address(_)));
        let elsewhere = Declared {
            netns_cookie: first.netns_cookie + 1,
            ..first
        };
        assert!(matches!(check(&elsewhere, &ours[0]), Invalid::Netns(_)));
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert!(matches!(check(&first, &udp), Invalid::NotStream));
        let connected = std::net::TcpStream::connect(first.addr).unwrap();
        assert!(matches!(check(&first, &connected), Invalid::NotListening));
    }

    #[test]
    fn a_hostile_or_broken_peer_fails_the_hand_over() {
        let frame = |bytes: &[u8]| {
            let (old, new) = UnixStream::pair().unwrap();
            prepare(&new, Duration::from_millis(200)).unwrap();
            (&old).write_all(bytes).unwrap();
            drop(old);
            receive(&new).unwrap_err()
        };
        let huge = u32::try_from(MAX_MANIFEST + 1).unwrap().to_be_bytes();
        assert!(matches!(frame(&huge), Error::TooLarge(_)));
        let body = br#"{"version":2,"listeners":[]}"#;
        let mut v2 = u32::try_from(body.len()).unwrap().to_be_bytes().to_vec();
        v2.extend_from_slice(body);
        assert!(matches!(frame(&v2), Error::Version(2)));
        // A manifest whose descriptors never come: the peer went away.
        let ours = listeners(1);
        let manifest = serde_json::to_vec(&Manifest {
            version: VERSION,
            listeners: vec![declared(&ours[0])],
        })
        .unwrap();
        let mut short = u32::try_from(manifest.len())
            .unwrap()
            .to_be_bytes()
            .to_vec();
        short.extend_from_slice(&manifest);
        assert!(matches!(frame(&short), Error::Io(_)));
        // A silent peer: the read timeout ends the wait.
        let (_old, new) = UnixStream::pair().unwrap();
        prepare(&new, Duration::from_millis(100)).unwrap();
        assert!(matches!(receive(&new), Err(Error::Io(_))));
    }

    #[test]
    fn ready_is_said_and_confirmed() {
        let (old, new) = UnixStream::pair().unwrap();
        prepare(&old, Duration::from_secs(10)).unwrap();
        prepare(&new, Duration::from_secs(10)).unwrap();
        let waiting = std::thread::spawn(move || wait_ready(&old).unwrap());
        assert!(say_ready(&new).unwrap());
        assert!(waiting.join().unwrap());
        // A predecessor that gave up (closed) confirms nothing.
        let (old, new) = UnixStream::pair().unwrap();
        drop(old);
        assert!(!matches!(say_ready(&new), Ok(true)));
    }

    #[test]
    fn a_successor_sees_when_its_predecessor_gives_up() {
        let (old, new) = UnixStream::pair().unwrap();
        prepare(&new, Duration::from_secs(10)).unwrap();
        assert!(
            !predecessor_gone(&new),
            "a silent predecessor is still there"
        );
        drop(old);
        assert!(predecessor_gone(&new));
    }
}
