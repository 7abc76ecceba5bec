//! Connections the node itself originated: how the proxy tells a kubelet probe from a
//! client that kube-proxy masqueraded to a node address. Both carry a node address as their
//! source; only the first was created by a socket of the node's own network namespace.

use crate::impl_pod;

/// Key of `HOST_CONNS`: one TCP connection, as the node's socket sees it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HostConnKey {
    /// The node socket's local address: IPv6, or IPv4 v4-mapped. Network byte order.
    pub local_addr: [u8; 16],
    /// The address it connected to (a pod IP): IPv6, or IPv4 v4-mapped. Network byte order.
    pub remote_addr: [u8; 16],
    /// The node socket's local port. Host byte order.
    pub local_port: u16,
    /// The port it connected to. Host byte order.
    pub remote_port: u16,
    /// Explicit padding, always zero.
    pub _pad: [u8; 4],
}

const _: () = assert!(core::mem::size_of::<HostConnKey>() == 40);
impl_pod!(HostConnKey);
