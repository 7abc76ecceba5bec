//! Empty: this crate's product is the `weft-ebpf` binary (see `main.rs`). The library target
//! exists to let `agent` depend on this crate for rebuild tracking (the aya template's way).
#![no_std]
