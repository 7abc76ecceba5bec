//! The programs of the eBPF object by name, and where their links are pinned: what the
//! loader loads and the attacher attaches, kept in one place.

use std::path::{Path, PathBuf};

/// Program names in the object (the entry points' identifiers in `weft-ebpf`).
pub const CONNECT4: &str = "connect4";
pub const CONNECT6: &str = "connect6";
pub const SOCK_OPS: &str = "sock_ops";
pub const HOST_SOCK_OPS: &str = "host_sock_ops";
pub const SK_LOOKUP: &str = "steer_inbound";

/// Every link's pin lives below this directory.
pub fn links_dir(pin_root: &Path) -> PathBuf {
    pin_root.join("links")
}

pub fn sk_lookup_dir(pin_root: &Path) -> PathBuf {
    links_dir(pin_root).join("sk_lookup")
}
