//! weft's eBPF programs, one ELF: the maps (BTF-defined, so `bpftool map dump` prints named
//! fields), the thin program entry points with their fail-closed error verdicts, the panic
//! handler and the license. The logic lives in one module per program.
//!
//! Every verdict and every error arm increments one `Stats` counter (`stats.rs`).
#![no_std]
#![no_main]

mod connect;
mod host;
mod net;
mod sklookup;
mod sockops;
mod stats;

use aya_ebpf::{
    bindings::sk_action::SK_DROP,
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, SockHash},
    macros::{btf_map, cgroup_sock_addr, sk_lookup, sock_ops},
    programs::{SkLookupContext, SockAddrContext, SockOpsContext},
};
use ebpf_common::{
    config::{AddrKey, HostConfig, ListenerKey, PortKey, ProxyConfig},
    host::HostConnKey,
    maps::{
        MAX_CONNS, MAX_EXCLUSIONS, MAX_HOST_CONNS, MAX_LISTENERS, MAX_PODS, MAX_PROXY_SOCKETS,
        MAX_REGISTRY,
    },
    netns::{NetnsCookie, PodRecord},
    orig_dst::{ConnKey, OrigDst, SocketCookie},
    registry::{RegistryKey, RegistryMode},
    stats::Stats,
};

/// `BPF_F_NO_PREALLOC` (https://github.com/torvalds/linux/blob/v6.18/include/uapi/linux/bpf.h).
const BPF_F_NO_PREALLOC: usize = 1;

// Map names are the `ebpf_common::maps` consts (the statics' identifiers are the names);
// the agent's load-time check and its tests fail if the two ever drift apart.

// The two cookie-keyed maps declare their key as the plain `u64` inside `NetnsCookie` /
// `SocketCookie` (same layout): BTF of a tuple struct would make bpftool print the key as
// `{"__0": 4198}` instead of `4198`.
const _: () = assert!(size_of::<NetnsCookie>() == size_of::<u64>());
const _: () = assert!(size_of::<SocketCookie>() == size_of::<u64>());

#[btf_map]
static PODS: HashMap<u64, PodRecord, { MAX_PODS as usize }> = HashMap::new();

#[btf_map]
static ORIG_DST_BY_SOCKET: LruHashMap<u64, OrigDst, { MAX_CONNS as usize }> = LruHashMap::new();

#[btf_map]
static ORIG_DST: LruHashMap<ConnKey, OrigDst, { MAX_CONNS as usize }> = LruHashMap::new();

#[btf_map]
static INBOUND_LISTENERS: SockHash<ListenerKey, { MAX_LISTENERS as usize }> = SockHash::new();

#[btf_map]
static PROXY_CONFIG: Array<ProxyConfig, 1> = Array::new();

#[btf_map]
static EXCLUDED_PORTS: HashMap<PortKey, u8, { MAX_EXCLUSIONS as usize }> = HashMap::new();

#[btf_map]
static EXCLUDED_CIDRS: LpmTrie<AddrKey, u8, { MAX_EXCLUSIONS as usize }> = LpmTrie::new();

#[btf_map]
static STATS: PerCpuArray<Stats, 1> = PerCpuArray::new();

#[btf_map]
static PROXY_SOCKETS: LruHashMap<u64, u8, { MAX_PROXY_SOCKETS as usize }> = LruHashMap::new();

#[btf_map]
static HOST_CONFIG: Array<HostConfig, 1> = Array::new();

#[btf_map]
static HOST_CONNS: LruHashMap<HostConnKey, u8, { MAX_HOST_CONNS as usize }> = LruHashMap::new();

// Not preallocated: most meshes run ALLOW_ANY and leave it empty, and a full one would
// take megabytes of kernel memory up front. Only the agent inserts, so allocation at
// update time never happens on a connect.
#[btf_map]
static REGISTRY: HashMap<RegistryKey, u8, { MAX_REGISTRY as usize }, BPF_F_NO_PREALLOC> =
    HashMap::new();

#[btf_map]
static REGISTRY_MODE: Array<RegistryMode, 1> = Array::new();

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    match connect::try_connect4(&ctx) {
        Ok(verdict) => verdict,
        Err(error) => connect::refuse(&ctx, error),
    }
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    match connect::try_connect6(&ctx) {
        Ok(verdict) => verdict,
        Err(error) => connect::refuse(&ctx, error),
    }
}

#[sock_ops]
pub fn sock_ops(ctx: SockOpsContext) -> u32 {
    match sockops::try_sock_ops(&ctx) {
        Ok(verdict) => verdict,
        // The connection is already established; sock_ops cannot stop it. Count it: the proxy
        // finds no original destination for it and resets it (fail closed, in user space).
        Err(error) => sockops::missing(&ctx, error),
    }
}

/// Attached to the host's cgroup (`agent.hostCgroup`), not the pods': records the TCP
/// connections that sockets of the node's own netns originate, so the proxy can tell a
/// kubelet probe from masqueraded traffic (`host.rs`).
#[sock_ops]
pub fn host_sock_ops(ctx: SockOpsContext) -> u32 {
    match host::try_host_sock_ops(&ctx) {
        Ok(verdict) => verdict,
        // sock_ops cannot stop the connection; an unrecorded one is simply not the node's
        // to the proxy, which then refuses it as plaintext (fail closed).
        Err(error) => host::unrecorded(&ctx, error),
    }
}

// Not named `sk_lookup`: that is the ELF section's name, and the symbols would clash.
#[sk_lookup]
pub fn steer_inbound(ctx: SkLookupContext) -> u32 {
    match sklookup::try_sk_lookup(&ctx) {
        Ok(verdict) => verdict,
        // Fail closed: no live inbound listener (the proxy is gone, or the pod IP is not
        // registered) must never mean "let the application be reached around the proxy".
        Err(error) => {
            sklookup::dropped(&ctx, error);
            SK_DROP
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    // The verifier rejects any reachable panic path, so this is never part of a program.
    loop {}
}

// GPL-compatible license: bpf_sk_assign, bpf_get_netns_cookie and the sockhash helpers are
// GPL-only.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
