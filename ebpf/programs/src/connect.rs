//! `cgroup/connect4` and `cgroup/connect6`: steer the outbound TCP connects of enrolled pods to
//! the proxy's outbound listener in the pod's own netns, saving the original destination
//! (keyed by socket cookie) for `sock_ops` to hand over.
//!
//! Left alone, in this order: not TCP (UDP and so DNS included), a netns that is not enrolled
//! (or whose pod does not redirect outbound), proxy not configured, the proxy's own sockets
//! (socket cookie registered in `PROXY_SOCKETS` by the agent), destinations that stay in the
//! netns (loopback, unspecified), excluded ports, excluded CIDRs.
//!
//! Refused (EPERM), in `REGISTRY_ONLY` mode only: what is left, when its destination is in
//! neither form of `REGISTRY` (that address at that port, that address at any port). The
//! proxy refuses such a connection too; this is the early, cheap refusal, so every doubt
//! (mode unset or unreadable) steers to the proxy instead.
//!
//! The proxy's sockets still carry `SO_MARK`, but the mark exempts nothing: any container
//! with CAP_NET_RAW can set it. Only the agent can write `PROXY_SOCKETS`, and a socket
//! cookie is unique for the kernel's lifetime, so a pod cannot make its socket look like one
//! of the proxy's.

use core::ptr;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_ANY, bpf_sock_addr},
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    maps::lpm_trie::Key,
    programs::SockAddrContext,
};
use aya_log_ebpf::{debug, trace, warn};
use ebpf_common::{
    config::{AddrKey, PortKey, ProxyConfig},
    netns::POD_FLAG_REDIRECT_OUTBOUND,
    orig_dst::OrigDst,
    registry::{REGISTRY_ANY_PORT, REGISTRY_MODE_REGISTRY_ONLY, RegistryKey},
};

use crate::{
    EXCLUDED_CIDRS, EXCLUDED_PORTS, ORIG_DST_BY_SOCKET, PODS, PROXY_CONFIG, PROXY_SOCKETS,
    REGISTRY, REGISTRY_MODE,
    net::{self, AF_INET, AF_INET6},
    stats::count,
};

/// Verdicts of a `cgroup/connect*` program: 1 lets `connect()` proceed, 0 fails it with `EPERM`
/// (https://github.com/torvalds/linux/blob/v6.18/kernel/bpf/cgroup.c, `__cgroup_bpf_run_filter_sock_addr`).
const ALLOW: i32 = 1;
const REFUSE: i32 = 0;

/// The error arm of connect4/6: the only failure is not being able to save the original
/// destination, and the program then refuses the connect.
pub(crate) enum Error {
    /// `bpf_map_update_elem` on `ORIG_DST_BY_SOCKET` failed (errno, negative).
    SaveOrigDst(i32),
}

pub(crate) fn try_connect4(ctx: &SockAddrContext) -> Result<i32, Error> {
    let sa = ctx.sock_addr;
    let Some(config) = steerable(ctx) else {
        return Ok(ALLOW);
    };
    // SAFETY: `sa` is the kernel's context for this run; user_ip4/user_port are readable in
    // connect4 and hold the application's destination (network order).
    let (ip4, port) = unsafe {
        (
            ptr::read_volatile(&raw const (*sa).user_ip4),
            ptr::read_volatile(&raw const (*sa).user_port),
        )
    };
    let addr = net::mapped_v4(ip4);
    let port = net::port_from_be16_in_u32(port);
    if excluded(ctx, &addr, port) {
        return Ok(ALLOW);
    }
    if unregistered(ctx, &addr, port) {
        return Ok(REFUSE);
    }
    save_orig_dst(ctx, addr, port, AF_INET as u16)?;
    // SAFETY: as above; user_ip4 and user_port are writable (4-byte stores) in connect4, and
    // the kernel connects to what they hold after the program returns.
    unsafe {
        ptr::write_volatile(&raw mut (*sa).user_ip4, net::LOCALHOST_V4);
        ptr::write_volatile(
            &raw mut (*sa).user_port,
            net::port_to_be16_in_u32(config.outbound_port),
        );
    }
    count!(connect_redirected);
    debug!(ctx, "connect4: {:i}:{} steered to outbound", addr, port);
    Ok(ALLOW)
}

pub(crate) fn try_connect6(ctx: &SockAddrContext) -> Result<i32, Error> {
    let sa = ctx.sock_addr;
    let Some(config) = steerable(ctx) else {
        return Ok(ALLOW);
    };
    // SAFETY: as in connect4; user_ip6 is readable word by word in connect6.
    let (ip6, port) = unsafe {
        (
            [
                ptr::read_volatile(&raw const (*sa).user_ip6[0]),
                ptr::read_volatile(&raw const (*sa).user_ip6[1]),
                ptr::read_volatile(&raw const (*sa).user_ip6[2]),
                ptr::read_volatile(&raw const (*sa).user_ip6[3]),
            ],
            ptr::read_volatile(&raw const (*sa).user_port),
        )
    };
    let addr = net::v6_bytes(ip6);
    let port = net::port_from_be16_in_u32(port);
    if excluded(ctx, &addr, port) {
        return Ok(ALLOW);
    }
    if unregistered(ctx, &addr, port) {
        return Ok(REFUSE);
    }
    save_orig_dst(ctx, addr, port, AF_INET6 as u16)?;
    // A dual-stack socket connecting to a v4-mapped address must stay on IPv4: `::1` would
    // be a different (IPv6) connection, and the proxy listens on 127.0.0.1 for it.
    let to = if net::is_v4_mapped(&addr) {
        net::LOCALHOST_V4_MAPPED
    } else {
        net::LOCALHOST_V6
    };
    // SAFETY: as in connect4; user_ip6 words are writable (4-byte stores) in connect6.
    unsafe {
        ptr::write_volatile(&raw mut (*sa).user_ip6[0], to[0]);
        ptr::write_volatile(&raw mut (*sa).user_ip6[1], to[1]);
        ptr::write_volatile(&raw mut (*sa).user_ip6[2], to[2]);
        ptr::write_volatile(&raw mut (*sa).user_ip6[3], to[3]);
        ptr::write_volatile(
            &raw mut (*sa).user_port,
            net::port_to_be16_in_u32(config.outbound_port),
        );
    }
    count!(connect_redirected);
    debug!(ctx, "connect6: [{:i}]:{} steered to outbound", addr, port);
    Ok(ALLOW)
}

/// The error arm: refuse the connect (fail closed: an application whose original destination
/// could not be saved would otherwise reach the proxy without one, or, if left alone, bypass
/// the proxy in plaintext).
pub(crate) fn refuse(ctx: &SockAddrContext, error: Error) -> i32 {
    count!(connect_error_refused);
    match error {
        // Operator-actionable: the LRU map cannot even evict (memory pressure, or a map
        // replaced by something that is not an LRU hash).
        Error::SaveOrigDst(errno) => {
            warn!(
                ctx,
                "connect refused: cannot save original destination (errno {})", errno
            );
        }
    }
    REFUSE
}

/// Checks what makes a socket a candidate at all (TCP, enrolled netns, proxy configured)
/// and returns the proxy config if it is one. Counts the "left alone" verdicts it decides.
#[inline(always)]
fn steerable(ctx: &SockAddrContext) -> Option<ProxyConfig> {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: `sa` is the kernel's context for this run; type and protocol are readable.
    let (ty, protocol) = unsafe { ((*sa).type_, (*sa).protocol) };
    // SOCK_STREAM is not enough: SCTP has stream sockets too. MPTCP reaches this hook through
    // its TCP subflows, which are IPPROTO_TCP.
    if ty != net::SOCK_STREAM || protocol != net::IPPROTO_TCP {
        count!(connect_not_tcp);
        return None;
    }
    // SAFETY: bpf_get_netns_cookie takes the program's context; sock_addr programs may call it.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let redirect = match PODS.get_ptr(netns) {
        // SAFETY: the pointer is a live PODS value; only the flags word is read, by value.
        Some(pod) => (unsafe { (*pod).flags } & POD_FLAG_REDIRECT_OUTBOUND) != 0,
        None => {
            count!(connect_not_enrolled);
            return None;
        }
    };
    // Proxy config is written before any pod is enrolled; zero means "not configured yet":
    // nothing may be steered to a port that is not known.
    let config = match PROXY_CONFIG.get(0) {
        Some(config) if config.outbound_port != 0 => *config,
        _ => {
            count!(connect_excluded);
            trace!(ctx, "connect: proxy not configured, left alone");
            return None;
        }
    };
    if !redirect {
        // An enrolled pod that opted out of outbound redirection.
        count!(connect_excluded);
        return None;
    }
    // SAFETY: bpf_get_socket_cookie takes the program's context; sock_addr programs may call it.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if PROXY_SOCKETS.get_ptr(cookie).is_some() {
        // The proxy's own upstream socket (the agent registered it just before connecting):
        // steering it would send the proxy to itself. The entry is left for LRU eviction,
        // not deleted here: while an agent replaces its links, two copies of this program
        // run for one connect, and the second must see it too.
        count!(connect_proxy_socket);
        trace!(ctx, "connect: proxy socket, left alone");
        return None;
    }
    Some(config)
}

/// Whether a connect to `addr:port` is left alone because of an exclusion. Counts it.
#[inline(always)]
fn excluded(ctx: &SockAddrContext, addr: &[u8; 16], port: u16) -> bool {
    let excluded = net::is_local(addr)
        || EXCLUDED_PORTS
            .get_ptr(PortKey { port, _pad: [0; 2] })
            .is_some()
        || EXCLUDED_CIDRS
            .get(&Key::new(128, AddrKey { addr: *addr }))
            .is_some();
    if excluded {
        count!(connect_excluded);
        trace!(ctx, "connect: {:i}:{} excluded", *addr, port);
    }
    excluded
}

/// Whether `REGISTRY_ONLY` mode refuses a connect to `addr:port`: it is in neither form of
/// the registry (at this port, at every port). Counts the refusal.
#[inline(always)]
fn unregistered(ctx: &SockAddrContext, addr: &[u8; 16], port: u16) -> bool {
    let registry_only = match REGISTRY_MODE.get(0) {
        Some(mode) => mode.mode == REGISTRY_MODE_REGISTRY_ONLY,
        // Index 0 of a one-entry array always exists; were it missing, steer: the proxy
        // refuses unregistered destinations too, and it must never refuse a registered one
        // on a guess.
        None => false,
    };
    if !registry_only {
        return false;
    }
    let known = |port| {
        REGISTRY
            .get_ptr(RegistryKey {
                addr: *addr,
                port,
                _pad: [0; 2],
            })
            .is_some()
    };
    if known(port) || known(REGISTRY_ANY_PORT) {
        return false;
    }
    count!(connect_unregistered_refused);
    debug!(ctx, "connect: {:i}:{} not registered, refused", *addr, port);
    true
}

/// Saves the original destination under the socket's cookie, for `sock_ops`.
#[inline(always)]
fn save_orig_dst(
    ctx: &SockAddrContext,
    addr: [u8; 16],
    port: u16,
    family: u16,
) -> Result<(), Error> {
    // SAFETY: bpf_get_socket_cookie takes the program's context; sock_addr programs may call it.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = OrigDst {
        addr,
        port,
        family,
        _pad: [0; 4],
    };
    ORIG_DST_BY_SOCKET
        .insert(cookie, orig, u64::from(BPF_ANY))
        .map_err(Error::SaveOrigDst)
}
