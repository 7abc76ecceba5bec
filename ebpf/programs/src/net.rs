//! Small address and port helpers. Addresses are handled as the 16-byte, network-order,
//! v4-mapped form that `ebpf-common` keys use; ports as host-order `u16`.

use ebpf_common::config::v4_mapped;

/// `AF_INET` / `AF_INET6`, as the kernel's context structs carry them.
pub(crate) const AF_INET: u32 = 2;
pub(crate) const AF_INET6: u32 = 10;
/// `SOCK_STREAM`, `IPPROTO_TCP`.
pub(crate) const SOCK_STREAM: u32 = 1;
pub(crate) const IPPROTO_TCP: u32 = 6;

/// `127.0.0.1` as the network-order `u32` the context structs store.
pub(crate) const LOCALHOST_V4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
/// `::1` as four network-order `u32` words.
pub(crate) const LOCALHOST_V6: [u32; 4] = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];
/// `::ffff:127.0.0.1` as four network-order `u32` words.
pub(crate) const LOCALHOST_V4_MAPPED: [u32; 4] = [
    0,
    0,
    u32::from_ne_bytes([0, 0, 0xff, 0xff]),
    u32::from_ne_bytes([127, 0, 0, 1]),
];

/// The 16-byte v4-mapped form of an IPv4 address stored as a network-order `u32`.
#[inline(always)]
pub(crate) fn mapped_v4(ip4: u32) -> [u8; 16] {
    v4_mapped(ip4.to_ne_bytes())
}

/// The 16 bytes of an IPv6 address stored as four network-order `u32` words.
#[inline(always)]
pub(crate) fn v6_bytes(ip6: [u32; 4]) -> [u8; 16] {
    let [a, b, c, d] = [
        ip6[0].to_ne_bytes(),
        ip6[1].to_ne_bytes(),
        ip6[2].to_ne_bytes(),
        ip6[3].to_ne_bytes(),
    ];
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]
}

/// Whether a 16-byte address (IPv6 or v4-mapped) is v4-mapped.
#[inline(always)]
pub(crate) fn is_v4_mapped(addr: &[u8; 16]) -> bool {
    addr[..10] == [0; 10] && addr[10] == 0xff && addr[11] == 0xff
}

/// Whether a connection to this address stays inside the netns: loopback (`127/8`, `::1`,
/// v4-mapped `127/8`) or unspecified (`0.0.0.0`, `::`), which Linux connects over loopback
/// (`ip_route_output_key_hash_rcu`, https://github.com/torvalds/linux/blob/v6.18/net/ipv4/route.c;
/// `tcp_v6_connect`, https://github.com/torvalds/linux/blob/v6.18/net/ipv6/tcp_ipv6.c).
#[inline(always)]
pub(crate) fn is_local(addr: &[u8; 16]) -> bool {
    if is_v4_mapped(addr) {
        addr[12] == 127 || addr[12..] == [0; 4]
    } else {
        addr[..15] == [0; 15] && (addr[15] == 1 || addr[15] == 0)
    }
}

/// Host-order port from a context field that stores a network-order 16-bit port in the low
/// half of a `u32` (`bpf_sock_addr.user_port`).
#[inline(always)]
pub(crate) fn port_from_be16_in_u32(port: u32) -> u16 {
    u16::from_be(port as u16)
}

/// The `u32` a context field that stores a network-order 16-bit port expects.
#[inline(always)]
pub(crate) fn port_to_be16_in_u32(port: u16) -> u32 {
    u32::from(port.to_be())
}
