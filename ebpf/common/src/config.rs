//! Values the agent writes and the programs read: ports, mark, exclusions, listener keys.

use crate::impl_pod;

/// The single entry of the proxy config map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProxyConfig {
    /// `SO_MARK` carried by every socket of the proxy. It no longer exempts a socket from
    /// steering (any pod with CAP_NET_RAW can set it): `PROXY_SOCKETS` does. Host byte order.
    /// Zero means "not configured yet": programs then steer nothing.
    pub proxy_mark: u32,
    /// Outbound listener port in each pod netns (15001). Host byte order.
    pub outbound_port: u16,
    /// Inbound plaintext listener port (15006). Host byte order.
    pub inbound_port: u16,
    /// HBONE listener port (15008): inbound connections to it are not steered. Host order.
    pub hbone_port: u16,
    /// Explicit padding, always zero.
    pub _pad: [u8; 6],
}

/// The single entry of the host config map: what `host_sock_ops` needs to tell the node's
/// own sockets from the pods'.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostConfig {
    /// Netns cookie of the node's (the agent's) network namespace. Host byte order. Zero
    /// means "not configured yet": nothing is recorded, so no plaintext passes as a probe.
    pub node_netns_cookie: u64,
}

/// Key of the excluded-ports map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortKey {
    /// Destination port. Host byte order.
    pub port: u16,
    /// Explicit padding, always zero.
    pub _pad: [u8; 2],
}

/// Data part of the excluded-CIDRs LPM trie key (the prefix length is aya's `Key`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AddrKey {
    /// IPv6 address, or IPv4 v4-mapped. Network byte order.
    pub addr: [u8; 16],
}

/// Key of the inbound-listener sockhash: the pod IP the connection is addressed to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ListenerKey {
    /// IPv6 address, or IPv4 v4-mapped. Network byte order.
    pub addr: [u8; 16],
}

/// Builds the v4-mapped form of an IPv4 address given as network-order octets.
pub const fn v4_mapped(octets: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, octets[0], octets[1], octets[2], octets[3],
    ]
}

/// Prefix length an IPv4 CIDR of length `len` has once v4-mapped.
pub const V4_MAPPED_PREFIX: u32 = 96;

/// Default ports, as DESIGN fixes them.
pub const OUTBOUND_PORT: u16 = 15_001;
pub const INBOUND_PORT: u16 = 15_006;
pub const HBONE_PORT: u16 = 15_008;

const _: () = assert!(core::mem::size_of::<ProxyConfig>() == 16);
const _: () = assert!(core::mem::size_of::<HostConfig>() == 8);
const _: () = assert!(core::mem::size_of::<PortKey>() == 4);
const _: () = assert!(core::mem::size_of::<AddrKey>() == 16);
const _: () = assert!(core::mem::size_of::<ListenerKey>() == 16);
impl_pod!(ProxyConfig, HostConfig, PortKey, AddrKey, ListenerKey);
