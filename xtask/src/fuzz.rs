//! `cargo xtask fuzz`: builds the cargo-fuzz targets of `fuzz/` once, runs each for a
//! bounded time, and reports per target the inputs run, the time, the speed and whether it
//! found anything. A crash, a panic, a timeout or an out-of-memory input fails the command;
//! libFuzzer writes the input to `fuzz/artifacts/<target>/` (`cargo +nightly fuzz run
//! <target> <file>` replays it).
//!
//! Each run starts from the committed corpus (`fuzz/corpus/<target>`, read only) and writes
//! what it discovers to `target/fuzz/corpus/<target>`, so a run never dirties the checkout;
//! fuzz/README.md says how to fold new inputs into the committed corpus.
//!
//! The build skips the eBPF object (`AYA_BUILD_SKIP=1`): no target loads it, and the fuzz
//! build's sanitizer flags must not reach the nested eBPF build.

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{
    cargo::{self, cargo_nightly, show},
    setup,
};

#[derive(clap::Args)]
pub struct Options {
    /// How long each target runs.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Run this target only (`cargo +nightly fuzz list` names them).
    #[arg(long)]
    target: Option<String>,
}

pub fn run(options: &Options) -> Result<()> {
    if !setup::has_cargo_fuzz() {
        println!("fuzz: cargo-fuzz is missing");
        setup::run()?;
    }
    let root = cargo::root();
    let targets = match &options.target {
        Some(target) => vec![target.clone()],
        None => list()?,
    };
    let started = Instant::now();
    cargo::run(fuzz("build").args(BUILD_FLAGS))?;
    println!("fuzz: built in {}s", started.elapsed().as_secs());

    let work = cargo::target_dir()?.join("fuzz");
    let mut reports = Vec::new();
    for target in &targets {
        reports.push(run_target(&root, &work, target, options.seconds)?);
    }

    println!(
        "\n{:<16} {:>12} {:>7} {:>9} {:>8}  result",
        "target", "runs", "time", "runs/s", "new"
    );
    for r in &reports {
        println!(
            "{:<16} {:>12} {:>6}s {:>9} {:>8}  {}",
            r.target,
            r.runs.map_or("?".into(), |n| n.to_string()),
            r.time.as_secs(),
            r.speed.map_or("?".into(), |n| n.to_string()),
            r.new_inputs.map_or("?".into(), |n| n.to_string()),
            r.found.as_deref().unwrap_or("nothing found"),
        );
    }
    let found: Vec<&Report> = reports.iter().filter(|r| r.found.is_some()).collect();
    if !found.is_empty() {
        bail!(
            "fuzzing found something in {} target(s): {} (inputs in fuzz/artifacts/, logs in {})",
            found.len(),
            found
                .iter()
                .map(|r| r.target.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            work.join("logs").display()
        );
    }
    println!("fuzz: ok");
    Ok(())
}

/// What one target's run showed.
struct Report {
    target: String,
    runs: Option<u64>,
    time: Duration,
    speed: Option<u64>,
    new_inputs: Option<u64>,
    /// What it found (the artifacts it wrote); `None`: nothing.
    found: Option<String>,
}

fn run_target(root: &Path, work: &Path, target: &str, seconds: u64) -> Result<Report> {
    let corpus = work.join("corpus").join(target);
    let logs = work.join("logs");
    // libFuzzer refuses a corpus directory that does not exist (a new target has no seeds).
    let seeds = root.join("fuzz/corpus").join(target);
    for dir in [&corpus, &logs, &seeds] {
        std::fs::create_dir_all(dir).with_context(|| format!("mkdir {}", dir.display()))?;
    }
    let artifacts = root.join("fuzz/artifacts").join(target);
    let before = files(&artifacts);
    let log_path = logs.join(format!("{target}.log"));
    let log = File::create(&log_path).with_context(|| format!("create {}", log_path.display()))?;

    let mut cmd = fuzz("run");
    cmd.arg(target)
        .args(BUILD_FLAGS)
        // New inputs go to the first directory; the committed seeds are only read.
        .arg(&corpus)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-timeout={INPUT_TIMEOUT_SECS}"))
        .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
        .arg(format!("-max_len={MAX_LEN}"))
        .arg("-print_final_stats=1")
        .stdout(log.try_clone().context("dup log file")?)
        .stderr(log);
    println!("\n$ {} > {}", show(&cmd), log_path.display());
    let started = Instant::now();
    let status = cmd
        .status()
        .with_context(|| format!("failed to start `{}`", show(&cmd)))?;
    let time = started.elapsed();

    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    let stat = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("stat::{name}:")))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    let new: Vec<PathBuf> = files(&artifacts)
        .into_iter()
        .filter(|f| !before.contains(f))
        .collect();
    let found = if status.success() {
        None
    } else {
        // Show the end of the log: the panic message and the stack.
        let tail: Vec<&str> = text.lines().rev().take(40).collect();
        println!("{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        Some(if new.is_empty() {
            format!("FAILED ({status}), no artifact: see {}", log_path.display())
        } else {
            format!(
                "FOUND: {}",
                new.iter()
                    .map(|f| f.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" ")
            )
        })
    };
    let report = Report {
        target: target.to_owned(),
        runs: stat("number_of_executed_units"),
        time,
        speed: stat("average_exec_per_sec"),
        new_inputs: stat("new_units_added"),
        found,
    };
    println!(
        "fuzz: {target}: {} runs in {}s, {}",
        report.runs.unwrap_or(0),
        time.as_secs(),
        report.found.as_deref().unwrap_or("nothing found")
    );
    Ok(report)
}

/// The targets `fuzz/Cargo.toml` declares.
fn list() -> Result<Vec<String>> {
    let out = fuzz("list")
        .stderr(Stdio::inherit())
        .output()
        .context("run cargo fuzz list")?;
    if !out.status.success() {
        bail!("`cargo +nightly fuzz list` failed ({})", out.status);
    }
    let targets: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    if targets.is_empty() {
        bail!("`cargo +nightly fuzz list` names no target");
    }
    Ok(targets)
}

fn files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| entries.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default()
}

/// `cargo +nightly fuzz <subcommand>` without the eBPF build.
fn fuzz(subcommand: &str) -> std::process::Command {
    let mut cmd = cargo_nightly();
    cmd.args(["fuzz", subcommand]).env("AYA_BUILD_SKIP", "1");
    cmd
}

/// No sanitizer: the targets are safe Rust, where AddressSanitizer finds little and halves
/// the speed; debug assertions on, so that overflows and `debug_assert!`s count as finds.
const BUILD_FLAGS: [&str; 3] = ["--sanitizer", "none", "--debug-assertions"];
/// An input that takes longer is a find (a hang, or a quadratic parser).
const INPUT_TIMEOUT_SECS: u64 = 10;
const RSS_LIMIT_MB: u64 = 2048;
/// Config files and manifests are small; longer inputs only slow the search down.
const MAX_LEN: u64 = 16 * 1024;
