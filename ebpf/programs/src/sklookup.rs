//! `sk_lookup`, attached to each enrolled pod's netns: steers TCP connections that arrive from
//! outside the pod (not to a loopback address, not from the pod IP to itself), to any port but
//! HBONE's, to the pod's inbound listener,
//! found by the local (pod) IP in `INBOUND_LISTENERS`. The accepted socket keeps the original
//! destination as its local address, so inbound needs no lookup map.
//!
//! The sockhash is keyed by IP rather than netns cookie because `bpf_get_netns_cookie` is not
//! offered to sk_lookup programs.

use core::ptr;

use aya_ebpf::{
    bindings::{BPF_SK_LOOKUP_F_REPLACE, sk_action::SK_PASS},
    programs::SkLookupContext,
};
use aya_log_ebpf::{debug, trace};
use ebpf_common::{config::ListenerKey, netns::LOOPBACK_IFINDEX};

use crate::{
    INBOUND_LISTENERS, PROXY_CONFIG,
    net::{self, AF_INET, IPPROTO_TCP},
    stats::count,
};

/// The error arms of sk_lookup; each ends in `SK_DROP`.
pub(crate) enum Error {
    /// The proxy config is missing (never expected: the agent writes it before it attaches
    /// this program to any netns).
    NotConfigured,
    /// No listener for the pod IP, or `bpf_sk_assign` refused it (negative errno): the proxy
    /// is gone, or the IP is not registered.
    NoListener(i32),
}

pub(crate) fn try_sk_lookup(ctx: &SkLookupContext) -> Result<u32, Error> {
    let lookup = ctx.lookup;
    // SAFETY: `lookup` is the kernel's context for this run and these fields are readable.
    // Every field is read up front with its own constant-offset load: the verifier rejects
    // loads through a context pointer the compiler offset in a shared branch.
    let (protocol, ifindex, local_port, family, local_ip4, local_ip6, remote_ip4, remote_ip6) = unsafe {
        let word = |p: *const u32| ptr::read_volatile(p);
        (
            word(&raw const (*lookup).protocol),
            word(&raw const (*lookup).ingress_ifindex),
            word(&raw const (*lookup).local_port),
            word(&raw const (*lookup).family),
            word(&raw const (*lookup).local_ip4),
            [
                word(&raw const (*lookup).local_ip6[0]),
                word(&raw const (*lookup).local_ip6[1]),
                word(&raw const (*lookup).local_ip6[2]),
                word(&raw const (*lookup).local_ip6[3]),
            ],
            word(&raw const (*lookup).remote_ip4),
            [
                word(&raw const (*lookup).remote_ip6[0]),
                word(&raw const (*lookup).remote_ip6[1]),
                word(&raw const (*lookup).remote_ip6[2]),
                word(&raw const (*lookup).remote_ip6[3]),
            ],
        )
    };
    if protocol != IPPROTO_TCP {
        count!(sklookup_passed);
        return Ok(SK_PASS);
    }
    // Connections to a loopback address arrive with lo's index.
    if ifindex == LOOPBACK_IFINDEX {
        count!(sklookup_passed);
        return Ok(SK_PASS);
    }
    let config = match PROXY_CONFIG.get(0) {
        Some(config) if config.hbone_port != 0 => config,
        _ => return Err(Error::NotConfigured),
    };
    // local_port is host order in bpf_sk_lookup. HBONE from other proxies goes to the
    // proxy's own 15008 listener by the normal lookup.
    if local_port == u32::from(config.hbone_port) {
        count!(sklookup_passed);
        return Ok(SK_PASS);
    }
    let (addr, remote) = if family == AF_INET {
        (net::mapped_v4(local_ip4), net::mapped_v4(remote_ip4))
    } else {
        (net::v6_bytes(local_ip6), net::v6_bytes(remote_ip6))
    };
    // A connection from the pod to its own IP also travels over lo, but reports the index of
    // the device that owns the address (`ip_route_output_key_hash_rcu` keeps the FIB result
    // device as the input interface: https://github.com/torvalds/linux/blob/v6.18/net/ipv4/route.c).
    // Its source is the destination itself (the kernel's choice for an unbound socket), which
    // no packet from outside can carry: IPv4 drops it as a martian source.
    if remote == addr {
        count!(sklookup_passed);
        return Ok(SK_PASS);
    }
    // F_REPLACE: another sk_lookup program of this netns may have run first (during an agent
    // restart two of ours briefly are attached); ours must win, never fail with EEXIST.
    INBOUND_LISTENERS
        .redirect_sk_lookup(
            ctx,
            ListenerKey { addr },
            u64::from(BPF_SK_LOOKUP_F_REPLACE),
        )
        .map_err(Error::NoListener)?;
    count!(sklookup_steered);
    trace!(
        ctx,
        "sk_lookup: {:i}:{} steered to inbound", addr, local_port
    );
    Ok(SK_PASS)
}

/// The error arm (the caller returns `SK_DROP`): count it. Per-connection attempts, so
/// `debug!`: the counter is what operators watch.
pub(crate) fn dropped(ctx: &SkLookupContext, error: Error) {
    count!(sklookup_error_dropped);
    match error {
        Error::NotConfigured => debug!(ctx, "sk_lookup: dropped, proxy not configured"),
        Error::NoListener(errno) => {
            debug!(
                ctx,
                "sk_lookup: dropped, no inbound listener (errno {})", errno
            );
        }
    }
}
