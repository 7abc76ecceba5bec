//! Verdict and error counters of the eBPF programs. One per-CPU entry; the agent sums the
//! CPUs and exports each field as a metric. Every field is a host-order `u64`.

use crate::impl_pod;

/// Counters, one per verdict or error arm. Field names are the metric label values.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// connect4/6: destination rewritten to the proxy.
    pub connect_redirected: u64,
    /// connect4/6: socket of a pod that is not enrolled (left alone).
    pub connect_not_enrolled: u64,
    /// connect4/6: excluded (loopback, port or CIDR).
    pub connect_excluded: u64,
    /// connect4/6: not TCP (UDP, DNS included): left alone.
    pub connect_not_tcp: u64,
    /// connect4/6 error arm: original destination could not be saved; connect refused
    /// (fail closed: never bypass the proxy).
    pub connect_error_refused: u64,
    /// sock_ops: original destination handed over to the proxy's map.
    pub sockops_handed_over: u64,
    /// sock_ops error arm: no saved destination for a connection to the outbound port,
    /// or the hand-over failed; the proxy will reset that connection.
    pub sockops_error_missing: u64,
    /// sk_lookup: inbound connection steered to the pod's inbound listener.
    pub sklookup_steered: u64,
    /// sk_lookup: left to the normal lookup (loopback, HBONE port, not TCP).
    pub sklookup_passed: u64,
    /// sk_lookup error arm: no live inbound listener for the pod IP; dropped (fail closed:
    /// never reach the application around the proxy).
    pub sklookup_error_dropped: u64,
    /// connect4/6: one of the proxy's own sockets (its cookie is in `PROXY_SOCKETS`): left
    /// alone.
    pub connect_proxy_socket: u64,
    /// host_sock_ops: a connection originated by a node socket, recorded in `HOST_CONNS`.
    pub host_conn_recorded: u64,
    /// host_sock_ops error arm: a node connection could not be recorded (map full or the
    /// close callback could not be requested). It is then not recognised as the node's, so
    /// a probe on it is refused like any other plaintext (fail closed).
    pub host_conn_error_unrecorded: u64,
    /// connect4/6: refused (EPERM) in `REGISTRY_ONLY` mode, the destination being absent
    /// from `REGISTRY`.
    pub connect_unregistered_refused: u64,
}

const _: () = assert!(core::mem::size_of::<Stats>() == 112);
impl_pod!(Stats);
