//! Pods, as the data path knows them: a network namespace cookie and a small record.

use crate::impl_pod;

/// Kernel network namespace cookie (`SO_NETNS_COOKIE`, `bpf_get_netns_cookie`), the key of
/// the pod map. Host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NetnsCookie(pub u64);

/// Value of the pod map: one per enrolled pod.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodRecord {
    /// Agent-assigned pod id, stable while the pod is enrolled; shown in logs. Host order.
    pub pod_id: u32,
    /// `POD_FLAG_*` bits. Host order.
    pub flags: u32,
}

/// The loopback device has this index in every network namespace (`LOOPBACK_IFINDEX`,
/// https://github.com/torvalds/linux/blob/v6.18/include/net/flow.h). sk_lookup passes what
/// arrives on it, and the pod's reply routing delivers through it: they must agree.
pub const LOOPBACK_IFINDEX: u32 = 1;

/// Outbound TCP of this pod is steered to the proxy.
pub const POD_FLAG_REDIRECT_OUTBOUND: u32 = 1 << 0;

const _: () = assert!(core::mem::size_of::<NetnsCookie>() == 8);
const _: () = assert!(core::mem::size_of::<PodRecord>() == 8);
impl_pod!(NetnsCookie, PodRecord);
