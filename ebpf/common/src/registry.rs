//! The mesh's registry of known destinations, for `REGISTRY_ONLY` outbound mode: connect4/6
//! refuse (EPERM) a TCP connect from an enrolled pod to an address:port that is not in it.
//! The refusal is an early, cheap one: the proxy checks the same registry and stays the
//! authority, so the agent may always fall back to `REGISTRY_MODE_ALLOW_ANY`.

use crate::impl_pod;

/// Key of the registry map: one known destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RegistryKey {
    /// IPv6 address, or IPv4 v4-mapped (`::ffff:a.b.c.d`). Network byte order.
    pub addr: [u8; 16],
    /// Destination port, host byte order; `REGISTRY_ANY_PORT` (0) registers the address
    /// at every port. (No TCP connect reaches port 0, so the two forms never collide.)
    pub port: u16,
    /// Explicit padding, always zero.
    pub _pad: [u8; 2],
}

/// The single entry of the registry mode map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegistryMode {
    /// `REGISTRY_MODE_ALLOW_ANY` or `REGISTRY_MODE_REGISTRY_ONLY`. Host byte order. Any
    /// other value (and the zeroed entry of a fresh map) means allow: the programs then
    /// steer every destination to the proxy, which decides.
    pub mode: u32,
}

/// `RegistryKey::port` of an address known at every port.
pub const REGISTRY_ANY_PORT: u16 = 0;
/// Refuse nothing (steer every destination to the proxy). The zero value, so a map the
/// agent has not written yet refuses nothing.
pub const REGISTRY_MODE_ALLOW_ANY: u32 = 0;
/// Refuse connects to destinations absent from the registry map.
pub const REGISTRY_MODE_REGISTRY_ONLY: u32 = 1;

const _: () = assert!(core::mem::size_of::<RegistryKey>() == 20);
const _: () = assert!(core::mem::size_of::<RegistryMode>() == 4);
impl_pod!(RegistryKey, RegistryMode);
