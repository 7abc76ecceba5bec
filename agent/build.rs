//! Builds the eBPF object (`weft-ebpf`, for bpfel-unknown-none, with nightly and bpf-linker)
//! into `OUT_DIR/weft-ebpf`, where `src/ebpf/loader.rs` embeds it. The aya template's way:
//! `aya_build::build_ebpf` runs a nested `cargo +nightly build` with its own target dir.
//!
//! `AYA_BUILD_SKIP=1` skips the eBPF build (e.g. a host-only `cargo check`); the agent then
//! embeds an empty object and refuses to load it at run time.

use std::{env, fs, path::PathBuf};

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest_dir.join("../ebpf/programs");
    let common_dir = manifest_dir.join("../ebpf/common");
    println!("cargo:rerun-if-changed={}", common_dir.display());

    let skip =
        env::var_os("AYA_BUILD_SKIP").is_some_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if !skip {
        preflight()?;
    }
    let root_dir = ebpf_dir
        .to_str()
        .context("non-UTF-8 path to ebpf/programs")?;
    aya_build::build_ebpf(
        [Package {
            name: "weft-ebpf",
            root_dir,
            ..Default::default()
        }],
        Toolchain::Nightly,
    )
    .map_err(|e| {
        anyhow!(
            "building the eBPF programs (weft-ebpf) failed: {e:#}\n\n\
             They need the nightly toolchain with rust-src and bpf-linker on PATH: \
             run `cargo xtask setup`."
        )
    })?;

    // With AYA_BUILD_SKIP nothing was built; embed an empty object so the agent compiles.
    let object = PathBuf::from(env::var("OUT_DIR").context("OUT_DIR")?).join("weft-ebpf");
    if !object.exists() {
        fs::write(&object, []).with_context(|| format!("writing {}", object.display()))?;
    }
    Ok(())
}

/// Fails early, with the fix, when the eBPF toolchain is missing.
fn preflight() -> anyhow::Result<()> {
    let path = env::var_os("PATH").unwrap_or_default();
    let found = env::split_paths(&path).any(|dir| dir.join("bpf-linker").is_file());
    if !found {
        return Err(anyhow!(
            "bpf-linker is not on PATH; it links the eBPF programs. Run `cargo xtask setup` \
             (or `cargo install bpf-linker`), or set AYA_BUILD_SKIP=1 for a build that \
             cannot load eBPF."
        ));
    }
    Ok(())
}
