//! What weft's eBPF programs and its agent share: map names and the `#[repr(C)]` keys and
//! values stored in those maps.
//!
//! Rules, because both sides read the same bytes:
//! - every type is `#[repr(C)]`, padded explicitly (`_pad`), never holds a `bool`, and has a
//!   compile-time size check;
//! - every field says its byte order;
//! - addresses are always 16 bytes: IPv4 is stored v4-mapped (`::ffff:a.b.c.d`), so one key
//!   type serves both families;
//! - with the `user` feature each type implements `aya::Pod` for the agent.
#![no_std]

pub mod config;
pub mod host;
pub mod maps;
pub mod netns;
pub mod orig_dst;
pub mod registry;
pub mod stats;

/// Implements `aya::Pod` for types that are plain old data by the rules above.
macro_rules! impl_pod {
    ($($ty:ty),+ $(,)?) => {
        $(
            #[cfg(feature = "user")]
            // SAFETY: the type is `#[repr(C)]`, `Copy`, has explicit padding and no
            // invalid bit patterns (integers and byte arrays only).
            unsafe impl aya::Pod for $ty {}
        )+
    };
}
pub(crate) use impl_pod;
