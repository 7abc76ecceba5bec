//! Original destinations: saved at connect time, handed to the proxy at accept time.

use crate::impl_pod;

/// Kernel socket cookie (`bpf_get_socket_cookie`). Host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SocketCookie(pub u64);

/// The destination an application asked for before connect4/6 rewrote it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrigDst {
    /// IPv6 address, or IPv4 v4-mapped (`::ffff:a.b.c.d`). Network byte order.
    pub addr: [u8; 16],
    /// Destination port. Host byte order.
    pub port: u16,
    /// `AF_INET` or `AF_INET6`: the family of the application's socket. Host byte order.
    pub family: u16,
    /// Explicit padding, always zero.
    pub _pad: [u8; 4],
}

/// How the proxy finds the original destination of a connection it accepted on its
/// outbound port: the pod's netns plus the client's (ephemeral) port, unique among the
/// connections to the proxy's single outbound address in that netns.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// Netns cookie of the pod. Host byte order.
    pub netns_cookie: u64,
    /// The application's local port. Host byte order.
    pub client_port: u16,
    /// `AF_INET` or `AF_INET6`: the family of the connection as the proxy's listener sees it
    /// (a dual-stack socket connected to a v4-mapped address is `AF_INET`; it reaches the
    /// IPv4 listener), since `127.0.0.1:p` and `[::1]:p` are different clients. Host order.
    pub family: u16,
    /// Explicit padding, always zero.
    pub _pad: [u8; 4],
}

const _: () = assert!(core::mem::size_of::<SocketCookie>() == 8);
const _: () = assert!(core::mem::size_of::<OrigDst>() == 24);
const _: () = assert!(core::mem::size_of::<ConnKey>() == 16);
impl_pod!(SocketCookie, OrigDst, ConnKey);
