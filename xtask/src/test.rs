//! `cargo xtask test`: unit tests of the workspace, then the privileged end-to-end tests
//! of `tests/` against the freshly built agent. Ends with one summary line and fails if
//! anything failed (or did not run to completion).

use std::{ffi::OsString, process::ExitStatus};

use anyhow::Result;

use crate::{
    cargo::{self, TestCounts, cargo, run_tests},
    image, setup,
};

#[derive(clap::Args)]
pub struct Options {
    /// Only the unit tests.
    #[arg(long, conflicts_with = "e2e_only")]
    unit_only: bool,
    /// Only the end-to-end tests.
    #[arg(long)]
    e2e_only: bool,
    /// Arguments for the end-to-end test binary (a name filter, `--test-threads=1`, …).
    #[arg(last = true)]
    e2e_args: Vec<OsString>,
}

pub fn run(options: &Options) -> Result<()> {
    setup::ensure()?;
    let mut total = TestCounts::default();
    let mut broken = Vec::new();
    let mut record = |what: &str, (status, counts): (ExitStatus, TestCounts)| {
        total.add(counts);
        if !status.success() && counts.failed == 0 {
            // A build error or a crashed test binary: no test said "failed", yet it failed.
            total.failed += 1;
            broken.push(format!("{what} did not run to completion ({status})"));
        } else if !status.success() {
            broken.push(format!("{what}: {} failed", counts.failed));
        }
    };

    // The agent first: unit tests of the agent need its embedded eBPF object anyway, and a
    // build error is better reported alone than inside test output.
    let weft_bin = cargo::build_agent()?;

    if !options.e2e_only {
        println!("\n== unit tests ==");
        record(
            "unit tests",
            run_tests(cargo().args([
                "test",
                "--no-fail-fast",
                "--workspace",
                "--exclude",
                "weft-ebpf",
                "--exclude",
                "weft-tests",
            ]))?,
        );
    }

    if !options.unit_only {
        // The runtime image around this agent, for the smoke tests of tests/image.rs.
        let image = image::build_for_tests(&weft_bin)?;
        println!(
            "\n== end-to-end tests (privileged; agent {}, image {}) ==",
            weft_bin.display(),
            image.path.display()
        );
        // Each test builds its own node (netns, cgroup, pin root, agent), so they run in
        // parallel; the harness's own unit tests come along in the same run.
        let mut cmd = cargo();
        // --no-fail-fast: a failing test file must not hide the results of the others.
        cmd.args(["test", "--no-fail-fast", "-p", "weft-tests"])
            .env("WEFT_BIN", &weft_bin)
            .env("WEFT_IMAGE", &image.path);
        if !options.e2e_args.is_empty() {
            cmd.arg("--").args(&options.e2e_args);
        }
        record("end-to-end tests", run_tests(&mut cmd)?);
        // The smoke tests import each new archive into buildah's storage (171 MB each);
        // drop the ones no name points at any more, so the storage does not grow per run.
        let _ = std::process::Command::new("buildah")
            .args(["rmi", "--prune"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }

    for problem in &broken {
        println!("xtask test: {problem}");
    }
    println!(
        "summary: {} passed, {} failed, {} skipped",
        total.passed, total.failed, total.ignored
    );
    if !broken.is_empty() {
        // Already said above; the summary stays the last line of the output.
        return Err(Failed.into());
    }
    Ok(())
}

/// Tests failed and the summary said so: nothing more to print.
#[derive(Debug)]
pub struct Failed;

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("tests failed")
    }
}

impl std::error::Error for Failed {}
