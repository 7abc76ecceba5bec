//! `cargo xtask`: weft's front door.
//!
//! - `setup`: install what is missing (apt packages, nightly + rust-src, bpf-linker, helm) and
//!   mount bpffs and cgroup v2; idempotent, says what it does.
//! - `build`: the agent (its build.rs builds the eBPF object) and the test binaries.
//! - `test`: unit tests, then the privileged end-to-end tests against the real agent.
//! - `lint`: the layer check of the agent's modules, rustfmt check and clippy in two runs
//!   (host workspace, then the eBPF crate).
//! - `gen`: regenerate files derived from Rust types (the Helm chart's CRDs).
//! - `demo`: two simulated nodes with a few pods, the real agents, mTLS traffic, explained.
//! - `image`: the runtime image as an OCI archive, built from Debian packages with mmdebstrap
//!   and buildah (no Docker Hub), reproducible per commit.
//! - `fuzz`: each cargo-fuzz target of `fuzz/` for a bounded time (`--seconds`, `--target`).
//! - `bench`: weft against direct traffic and a stunnel mTLS tunnel, in one run
//!   (`target/bench/`: results.json, results.md, charts).
//! - `release`: `dist/` with the release binary, the packaged Helm chart, the image archive,
//!   an SBOM of the binary's crates and SHA256SUMS (docs/kubernetes.md, "Installing from a
//!   release").
//!
//! `test`, `demo` and `bench` run `setup` first when its fast check finds something missing.

mod bench;
mod cargo;
mod demo;
mod fuzz;
mod generate;
mod image;
mod layers;
mod lint;
mod previous;
mod release;
mod setup;
mod test;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "weft's build, test and demo tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install the toolchain and system packages weft needs, mount bpffs and cgroup v2.
    Setup,
    /// Build the agent (with its eBPF object) and the end-to-end test binaries.
    Build,
    /// Run unit tests, then the privileged end-to-end tests (needs root).
    Test(test::Options),
    /// The layer check, rustfmt check, clippy on the workspace and on the eBPF programs.
    Lint,
    /// Regenerate files derived from Rust types: the Helm chart's CRDs.
    Gen,
    /// Build two simulated nodes, run the agents, send traffic and explain what happened.
    Demo,
    /// Build the runtime image (Debian 12 root by mmdebstrap, buildah) as an OCI archive.
    Image(image::Args),
    /// Run each fuzz target of `fuzz/` for a bounded time; fails if one finds anything.
    Fuzz(fuzz::Options),
    /// Measure weft against direct traffic and a stunnel mTLS tunnel (needs root).
    Bench(bench::Options),
    /// Write dist/: the release binary, the Helm chart, the image archive, SBOM, SHA256SUMS.
    Release(release::Options),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup => setup::run(),
        Command::Build => cargo::build_all(),
        Command::Test(options) => test::run(&options),
        Command::Lint => lint::run(),
        Command::Gen => generate::run(),
        Command::Demo => demo::run(),
        Command::Image(args) => image::run(&args),
        Command::Fuzz(options) => fuzz::run(&options),
        Command::Bench(options) => bench::run(&options),
        Command::Release(options) => release::run(&options),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<test::Failed>() => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
