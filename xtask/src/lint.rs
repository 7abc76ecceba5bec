//! `cargo xtask lint`: what CI checks, in the order a developer wants to hear about it.

use anyhow::Result;

use crate::{
    cargo::{self, cargo, cargo_nightly},
    layers,
};

pub fn run() -> Result<()> {
    // First: it takes a second and names the structural mistakes clippy cannot see.
    layers::run(&cargo::root().join("agent/src"))?;
    cargo::run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    // The fuzz crate is outside the workspace (`--all` does not reach it); `cargo xtask
    // fuzz` builds it, which is its compile check.
    cargo::run(cargo().args(["fmt", "--manifest-path", "fuzz/Cargo.toml", "--", "--check"]))?;
    // Two clippy runs (STYLE: feature unification): the host crates, then the eBPF
    // programs for their own target on nightly.
    cargo::run(cargo().args([
        "clippy",
        "--workspace",
        "--exclude",
        "weft-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    cargo::run(cargo_nightly().args([
        "clippy",
        "-p",
        "weft-ebpf",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--",
        "-D",
        "warnings",
    ]))?;
    println!("lint: ok");
    Ok(())
}
