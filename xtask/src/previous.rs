//! The previous release of the agent, built from this repository's history: the other
//! side of the upgrade test across builds (`tests/tests/upgrade.rs`), which rolls both
//! nodes from it to this tree's agent and back again.
//!
//! A real older build is what catches what a copy of the same binary cannot: a hand-over
//! protocol, a pinned map, a config field or a log line that one side no longer knows.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};

use crate::cargo::{self, cargo, run};

/// The release the upgrade test starts from: the last main that landed before this tree's
/// changes. Bump it to the newest landed main when a release ships, so that each release
/// is tested against the one before it.
pub const COMMIT: &str = "bff4425d8c58d17bf9b51906bcad602a6a4070fb";

/// Where the previous release can come from.
pub enum Previous {
    /// Its agent, built.
    Built(PathBuf),
    /// Not in this clone's history (a shallow clone): why, for the test's skip.
    Missing(String),
}

/// Builds the previous release's agent (once; later runs reuse it) into
/// `target/previous/<commit>/`, from `git archive` of [`COMMIT`]: no worktree to register
/// or to clean up.
pub fn build() -> Result<Previous> {
    if !in_history(COMMIT) {
        return Ok(Previous::Missing(format!(
            "the previous release {COMMIT} is not in this clone's history (a shallow \
             clone?): `git fetch --unshallow` brings it"
        )));
    }
    let dir = cargo::target_dir()?.join("previous").join(COMMIT);
    let bin = dir.join("target/debug/weft");
    let src = dir.join("src");
    if !src.join("Cargo.toml").is_file() {
        extract(COMMIT, &src)?;
    }
    println!("\n== the previous release's agent ({COMMIT}), for the upgrade test ==");
    run(cargo()
        .current_dir(&src)
        .args(["build", "-p", "weft", "--bin", "weft", "--target-dir"])
        .arg(dir.join("target")))?;
    if !bin.is_file() {
        bail!(
            "cargo built the previous release but {} is missing",
            bin.display()
        );
    }
    Ok(Previous::Built(bin))
}

fn in_history(commit: &str) -> bool {
    cargo::succeeds(
        Command::new("git")
            .args(["cat-file", "-e", &format!("{commit}^{{commit}}")])
            .current_dir(cargo::root()),
    )
}

/// `git archive <commit> | tar -x -C <into>`, through a temporary folder renamed into
/// place, so an interrupted run never leaves half a tree that looks whole.
fn extract(commit: &str, into: &Path) -> Result<()> {
    let partial = into.with_extension("partial");
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial).with_context(|| format!("create {}", partial.display()))?;
    let mut archive = Command::new("git")
        .args(["archive", "--format=tar", commit])
        .current_dir(cargo::root())
        .stdout(Stdio::piped())
        .spawn()
        .context("start git archive")?;
    let stdout = archive.stdout.take().context("git archive's stdout")?;
    let untar = Command::new("tar")
        .arg("-x")
        .arg("-C")
        .arg(&partial)
        .stdin(stdout)
        .status()
        .context("start tar")?;
    let archived = archive.wait().context("wait for git archive")?;
    if !archived.success() || !untar.success() {
        bail!("git archive {commit} | tar -x failed ({archived}, {untar})");
    }
    std::fs::rename(&partial, into)
        .with_context(|| format!("rename {} to {}", partial.display(), into.display()))
}
