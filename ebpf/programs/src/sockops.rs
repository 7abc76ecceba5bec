//! `sock_ops`: when a steered connection is established (active side, i.e. the application's
//! socket), moves its saved original destination from the socket-cookie map to `ORIG_DST`
//! keyed by what the proxy sees when it accepts: netns cookie, client port, family.

use core::ptr;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_ANY, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB},
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::SockOpsContext,
};
use aya_log_ebpf::{debug, trace};
use ebpf_common::orig_dst::ConnKey;

use crate::{
    ORIG_DST, ORIG_DST_BY_SOCKET, PROXY_CONFIG,
    net::{self, AF_INET, AF_INET6},
    stats::count,
};

/// sock_ops return value; ignored by the kernel for the callbacks used here.
const DONE: u32 = 1;

/// The error arm of sock_ops.
pub(crate) enum Error {
    /// `bpf_map_update_elem` on `ORIG_DST` failed (errno, negative).
    HandOver(i32),
}

pub(crate) fn try_sock_ops(ctx: &SockOpsContext) -> Result<u32, Error> {
    // ACTIVE_ESTABLISHED_CB is called for every socket of the cgroup without having to set
    // callback flags (https://github.com/torvalds/linux/blob/v6.18/net/ipv4/tcp_input.c,
    // `tcp_init_transfer`); every other op is not ours.
    if ctx.op() != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        return Ok(DONE);
    }
    // SAFETY: sock_ops programs may call bpf_get_socket_cookie with their context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // Every context field is read up front, each with a constant offset: the verifier
    // rejects loads through a context pointer the compiler offset in a shared branch.
    let conn = Conn::read(ctx);
    let Some(orig) = ORIG_DST_BY_SOCKET.get_ptr(cookie) else {
        if to_outbound_listener(&conn) {
            // Steered (it reached the outbound port on loopback) but its record is gone
            // (evicted from the LRU map): the proxy will reset it.
            count!(sockops_error_missing);
            debug!(
                ctx,
                "sock_ops: no original destination for client port {}", conn.local_port
            );
        }
        return Ok(DONE);
    };
    // SAFETY: the pointer is a live map value; it is copied out before the map is changed.
    let orig = unsafe { *orig };
    let key = ConnKey {
        // SAFETY: sock_ops programs may call bpf_get_netns_cookie with their context.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        client_port: conn.local_port,
        family: connection_family(&conn),
        _pad: [0; 4],
    };
    ORIG_DST
        .insert(key, orig, u64::from(BPF_ANY))
        .map_err(Error::HandOver)?;
    // Ignoring a failed delete is safe: the entry is in an LRU map and ages out, and a socket
    // cookie is never reused.
    let _ = ORIG_DST_BY_SOCKET.remove(cookie);
    count!(sockops_handed_over);
    trace!(ctx, "sock_ops: handed over client port {}", key.client_port);
    Ok(DONE)
}

/// The error arm: count it; the connection proceeds and the proxy, finding no original
/// destination, resets it (fail closed).
pub(crate) fn missing(ctx: &SockOpsContext, error: Error) -> u32 {
    count!(sockops_error_missing);
    match error {
        Error::HandOver(errno) => {
            debug!(ctx, "sock_ops: hand-over failed (errno {})", errno);
        }
    }
    DONE
}

/// The context fields sock_ops needs, copied out.
pub(crate) struct Conn {
    pub(crate) family: u32,
    pub(crate) remote_ip4: u32,
    pub(crate) local_ip4: u32,
    pub(crate) remote_ip6: [u32; 4],
    pub(crate) local_ip6: [u32; 4],
    /// Host order.
    pub(crate) remote_port: u16,
    /// Host order.
    pub(crate) local_port: u16,
}

impl Conn {
    #[inline(always)]
    pub(crate) fn read(ctx: &SockOpsContext) -> Self {
        let ops = ctx.ops;
        // SAFETY: `ops` is the kernel's context for this run and every field read here is
        // readable in sock_ops; each read is a separate 4-byte load at a constant offset.
        unsafe {
            let word = |p: *const u32| ptr::read_volatile(p);
            Self {
                family: word(&raw const (*ops).family),
                remote_ip4: word(&raw const (*ops).remote_ip4),
                local_ip4: word(&raw const (*ops).local_ip4),
                remote_ip6: [
                    word(&raw const (*ops).remote_ip6[0]),
                    word(&raw const (*ops).remote_ip6[1]),
                    word(&raw const (*ops).remote_ip6[2]),
                    word(&raw const (*ops).remote_ip6[3]),
                ],
                local_ip6: [
                    word(&raw const (*ops).local_ip6[0]),
                    word(&raw const (*ops).local_ip6[1]),
                    word(&raw const (*ops).local_ip6[2]),
                    word(&raw const (*ops).local_ip6[3]),
                ],
                // remote_port holds the network-order port in its upper 16 bits on
                // little-endian hosts (`sock_ops_convert_ctx_access`,
                // https://github.com/torvalds/linux/blob/v6.18/net/core/filter.c), so the
                // whole u32 converts from big endian.
                remote_port: u32::from_be(word(&raw const (*ops).remote_port)) as u16,
                // local_port is host order.
                local_port: word(&raw const (*ops).local_port) as u16,
            }
        }
    }
}

/// The family of the connection as the proxy's listener sees it: a dual-stack socket that
/// connected to a v4-mapped address reaches the IPv4 listener, so it counts as `AF_INET`.
#[inline(always)]
fn connection_family(conn: &Conn) -> u16 {
    if conn.family == AF_INET6 && net::is_v4_mapped(&net::v6_bytes(conn.local_ip6)) {
        AF_INET as u16
    } else {
        conn.family as u16
    }
}

/// Whether the connection goes to the proxy's outbound port on loopback.
#[inline(always)]
fn to_outbound_listener(conn: &Conn) -> bool {
    let Some(config) = PROXY_CONFIG.get(0) else {
        return false;
    };
    if config.outbound_port == 0 || conn.remote_port != config.outbound_port {
        return false;
    }
    let remote = if conn.family == AF_INET {
        net::mapped_v4(conn.remote_ip4)
    } else {
        net::v6_bytes(conn.remote_ip6)
    };
    net::is_local(&remote)
}
