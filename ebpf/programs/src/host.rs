//! `host_sock_ops`, attached to the host's cgroup (`agent.hostCgroup`): records each TCP
//! connection that a socket of the node's own network namespace originates, keyed by its
//! 4-tuple, from the moment it is established until it closes. The proxy looks a plaintext
//! connection into a STRICT pod up there: found, it was made by a process on the node (the
//! kubelet's probe); not found, it merely carries a node address (kube-proxy masqueraded a
//! NodePort or LoadBalancer client to it) and is refused.
//!
//! Why it cannot be imitated: forwarded (and so masqueraded) packets are never seen by a
//! socket hook of the forwarding node; only a local socket runs this program. A recorded
//! tuple belongs to a live node socket, and while it lives the kernel gives no other
//! connection the same tuple (conntrack's NAT picks unused tuples, and the pod's TCP stack
//! treats a second SYN on it as part of the first). The entry goes when the socket closes,
//! or when the proxy takes it at accept, whichever comes first.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_ANY, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_TCP_CLOSE,
    },
    helpers::generated::bpf_get_netns_cookie,
    programs::SockOpsContext,
};
use aya_log_ebpf::{debug, trace};
use ebpf_common::host::HostConnKey;

use crate::{
    HOST_CONFIG, HOST_CONNS,
    net::{self, AF_INET},
    sockops::Conn,
    stats::count,
};

/// sock_ops return value; ignored by the kernel for the callbacks used here.
const DONE: u32 = 1;

/// The error arm of host_sock_ops.
pub(crate) enum Error {
    /// `bpf_sock_ops_cb_flags_set` failed (errno, negative): the close could not be seen, so
    /// the connection is not recorded (a stale entry could outlive its socket).
    CloseCallback(i32),
    /// `bpf_map_update_elem` on `HOST_CONNS` failed (errno, negative).
    Record(i32),
}

pub(crate) fn try_host_sock_ops(ctx: &SockOpsContext) -> Result<u32, Error> {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_STATE_CB {
        return Ok(DONE);
    }
    // Only the node's own namespace: pods (meshed or not) and other containers on the host
    // connect through the node too, but from their own namespaces, and are not the kubelet.
    let node = match HOST_CONFIG.get(0) {
        Some(config) if config.node_netns_cookie != 0 => config.node_netns_cookie,
        _ => return Ok(DONE),
    };
    // SAFETY: sock_ops programs may call bpf_get_netns_cookie with their context.
    if unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } != node {
        return Ok(DONE);
    }
    let key = key(&Conn::read(ctx));
    if op == BPF_SOCK_OPS_STATE_CB {
        // args[1] is the new state (`tcp_set_state`,
        // https://github.com/torvalds/linux/blob/v6.18/net/ipv4/tcp.c).
        if ctx.arg(1) == BPF_TCP_CLOSE {
            // Already taken by the proxy, or never recorded: nothing to forget.
            let _ = HOST_CONNS.remove(key);
        }
        return Ok(DONE);
    }
    // The close callback first: an entry that could outlive its socket is never written.
    // The flags of other programs (a CNI's) are kept.
    ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32)
        .map_err(Error::CloseCallback)?;
    // The entry is in place before this side sends its final ACK, so before the pod's proxy
    // can accept the connection (`tcp_finish_connect` runs the callback first,
    // https://github.com/torvalds/linux/blob/v6.18/net/ipv4/tcp_input.c).
    HOST_CONNS
        .insert(key, 1, u64::from(BPF_ANY))
        .map_err(Error::Record)?;
    count!(host_conn_recorded);
    trace!(ctx, "host_sock_ops: recorded local port {}", key.local_port);
    Ok(DONE)
}

/// The error arm: count it; the connection goes on, unrecognised as the node's, so a probe
/// on it is refused like any plaintext (fail closed).
pub(crate) fn unrecorded(ctx: &SockOpsContext, error: Error) -> u32 {
    count!(host_conn_error_unrecorded);
    match error {
        Error::CloseCallback(errno) | Error::Record(errno) => {
            debug!(
                ctx,
                "host_sock_ops: connection not recorded (errno {})", errno
            );
        }
    }
    DONE
}

/// The connection's 4-tuple as the node's socket sees it (addresses v4-mapped for IPv4).
#[inline(always)]
fn key(conn: &Conn) -> HostConnKey {
    let (local_addr, remote_addr) = if conn.family == AF_INET {
        (
            net::mapped_v4(conn.local_ip4),
            net::mapped_v4(conn.remote_ip4),
        )
    } else {
        (
            net::v6_bytes(conn.local_ip6),
            net::v6_bytes(conn.remote_ip6),
        )
    };
    HostConnKey {
        local_addr,
        remote_addr,
        local_port: conn.local_port,
        remote_port: conn.remote_port,
        _pad: [0; 4],
    }
}
