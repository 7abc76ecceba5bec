//! Running cargo (and other commands) from xtask: echo the command line, check the status,
//! find the target directory and the agent binary.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
};

use anyhow::{Context, Result, bail};
use weft_test_env::Skip;

/// The workspace root (xtask lives in `<root>/xtask`).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is one level below the workspace root")
        .to_path_buf()
}

/// `cargo` of the toolchain running xtask (the workspace's stable toolchain).
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

/// `cargo +nightly …` through the rustup proxy (the `$CARGO` binary is not a proxy).
pub fn cargo_nightly() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.arg("+nightly").current_dir(root());
    // Set by the rustup proxy that started xtask; it would pin the stable toolchain.
    cmd.env_remove("RUSTUP_TOOLCHAIN");
    cmd
}

/// Prints and runs a command; fails unless it exits 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = show(cmd);
    println!("$ {shown}");
    let status = cmd
        .status()
        .with_context(|| format!("failed to start `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    Ok(())
}

/// Runs a command quietly and returns whether it succeeded (for "is it there?" checks).
pub fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs a command quietly and returns its stdout, if it succeeded.
pub fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Totals of the `test result:` lines of cargo test runs.
#[derive(Clone, Copy, Debug, Default)]
pub struct TestCounts {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
}

impl TestCounts {
    pub fn add(&mut self, other: TestCounts) {
        self.passed += other.passed;
        self.failed += other.failed;
        self.ignored += other.ignored;
    }

    /// Parses `test result: ok. 5 passed; 0 failed; 1 ignored; 0 measured; …`.
    fn parse_line(line: &str) -> Option<TestCounts> {
        let rest = line.trim().strip_prefix("test result: ")?;
        let mut counts = TestCounts::default();
        for part in rest.split(';') {
            let words: Vec<&str> = part.split_whitespace().collect();
            let (Some(n), Some(what)) = (words.len().checked_sub(2), words.last()) else {
                continue;
            };
            let Ok(n) = words[n].parse::<u64>() else {
                continue;
            };
            match *what {
                "passed" => counts.passed = n,
                "failed" => counts.failed = n,
                "ignored" => counts.ignored = n,
                _ => {}
            }
        }
        Some(counts)
    }
}

/// One test binary's results (its `test result:` line).
#[derive(Clone, Debug)]
pub struct BinaryResult {
    /// The binary's name without cargo's hash (`weft`, `mtls`), or `<crate> doc-tests`.
    pub name: String,
    /// What it was built from (`src/lib.rs`, `tests/mtls.rs`).
    pub source: String,
    pub counts: TestCounts,
}

/// From cargo's line before each binary's output, (name, source):
/// `Running unittests src/lib.rs (target/debug/deps/weft-8e3c6d70e398fb6a)`,
/// `Running tests/mtls.rs (target/debug/deps/mtls-941c44ddbe14ae42)`, `Doc-tests weft_tests`.
fn parse_binary(line: &str) -> Option<(String, String)> {
    let line = line.trim();
    if let Some(krate) = line.strip_prefix("Doc-tests ") {
        return Some((format!("{krate} doc-tests"), "doc comments".into()));
    }
    let rest = line.strip_prefix("Running ")?;
    let (source, path) = rest.rsplit_once(" (")?;
    let stem = Path::new(path.strip_suffix(')')?).file_name()?.to_str()?;
    let name = stem.rsplit_once('-').map_or(stem, |(name, _hash)| name);
    let source = source.strip_prefix("unittests ").unwrap_or(source);
    Some((name.to_owned(), source.to_owned()))
}

/// What one `cargo test` run reported.
#[derive(Debug)]
pub struct TestRun {
    pub status: ExitStatus,
    pub counts: TestCounts,
    /// Each test binary's results, in the order they ran.
    pub binaries: Vec<BinaryResult>,
    /// The tests libtest ignored (`#[ignore = "reason"]`), with the reason.
    pub ignored: Vec<Skip>,
}

/// Parses `test a::b ... ignored, reason` (libtest's line for an ignored test).
fn parse_ignored(line: &str) -> Option<Skip> {
    let (test, outcome) = line.strip_prefix("test ")?.split_once(" ... ")?;
    let reason = outcome.strip_prefix("ignored")?;
    let reason = reason.strip_prefix(", ").unwrap_or("#[ignore]");
    Some(Skip {
        test: test.to_owned(),
        reason: reason.to_owned(),
    })
}

/// Runs `cargo test …`, echoing its output, and counts the results.
pub fn run_tests(cmd: &mut Command) -> Result<TestRun> {
    let shown = show(cmd);
    println!("$ {shown}");
    // One pipe for both streams, so cargo's `Running …` (stderr) stays in order with the
    // `test result:` (stdout) of the binary it names.
    let (output, writer) = std::io::pipe().context("create a pipe for cargo test")?;
    let mut child = cmd
        .stdout(writer.try_clone().context("clone the pipe")?)
        .stderr(writer)
        .spawn()
        .with_context(|| format!("failed to start `{shown}`"))?;
    // Drop the command's copies of the write end: reading then ends when cargo exits.
    cmd.stdout(Stdio::inherit()).stderr(Stdio::inherit());
    let mut counts = TestCounts::default();
    let mut ignored = Vec::new();
    let mut binaries = Vec::new();
    let mut binary = None;
    // Lossy: a test's captured output may hold any bytes.
    for line in BufReader::new(output).split(b'\n') {
        let line = line.context("read cargo test output")?;
        let line = String::from_utf8_lossy(&line);
        let line = line.trim_end_matches('\r');
        println!("{line}");
        if let Some(found) = parse_binary(line) {
            binary = Some(found);
        }
        if let Some(c) = TestCounts::parse_line(line) {
            counts.add(c);
            let (name, source) = binary.take().unwrap_or_else(|| ("?".into(), "?".into()));
            binaries.push(BinaryResult {
                name,
                source,
                counts: c,
            });
        }
        ignored.extend(parse_ignored(line));
    }
    let status = child.wait().context("wait for cargo test")?;
    Ok(TestRun {
        status,
        counts,
        binaries,
        ignored,
    })
}

/// `cargo metadata --format-version 1 <args>`, parsed.
pub fn metadata(args: &[&str]) -> Result<serde_json::Value> {
    let out = cargo()
        .args(["metadata", "--format-version", "1"])
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .context("run cargo metadata")?;
    if !out.status.success() {
        bail!("cargo metadata failed ({})", out.status);
    }
    serde_json::from_slice(&out.stdout).context("parse cargo metadata")
}

/// cargo's target directory (`cargo metadata`), honouring `CARGO_TARGET_DIR` and config.
pub fn target_dir() -> Result<PathBuf> {
    let meta = metadata(&["--no-deps"])?;
    let dir = meta["target_directory"]
        .as_str()
        .context("cargo metadata has no target_directory")?;
    Ok(PathBuf::from(dir))
}

/// Builds the agent (agent/build.rs builds the eBPF object) and returns the binary's path.
pub fn build_agent() -> Result<PathBuf> {
    run(cargo().args(["build", "-p", "weft"]))?;
    let bin = target_dir()?.join("debug").join("weft");
    if !bin.is_file() {
        bail!("cargo built weft but {} is missing", bin.display());
    }
    Ok(bin)
}

/// Builds the end-to-end test crate: the test app and the test binaries.
pub fn build_tests() -> Result<PathBuf> {
    run(cargo().args(["build", "-p", "weft-tests", "--bins"]))?;
    run(cargo().args(["test", "-p", "weft-tests", "--no-run"]))?;
    Ok(target_dir()?.join("debug").join("weft-testapp"))
}

/// `cargo xtask build`.
pub fn build_all() -> Result<()> {
    let agent = build_agent()?;
    let testapp = build_tests()?;
    println!(
        "build: ok\n  agent:    {}\n  test app: {}",
        agent.display(),
        testapp.display()
    );
    Ok(())
}

pub fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cargo_test_result_lines() {
        let c = TestCounts::parse_line(
            "test result: FAILED. 12 passed; 2 failed; 3 ignored; 0 measured; 1 filtered out; \
             finished in 0.51s",
        )
        .unwrap();
        assert_eq!((c.passed, c.failed, c.ignored), (12, 2, 3));
        assert!(TestCounts::parse_line("running 3 tests").is_none());
    }

    #[test]
    fn names_each_test_binary_from_cargos_running_line() {
        assert_eq!(
            parse_binary(
                "     Running unittests src/lib.rs (target/debug/deps/weft-8e3c6d70e398fb6a)"
            ),
            Some(("weft".into(), "src/lib.rs".into()))
        );
        assert_eq!(
            parse_binary(
                "     Running tests/policy_match.rs (target/debug/deps/policy_match-6f495580fd4dfee4)"
            ),
            Some(("policy_match".into(), "tests/policy_match.rs".into()))
        );
        assert_eq!(
            parse_binary("   Doc-tests weft_tests"),
            Some(("weft_tests doc-tests".into(), "doc comments".into()))
        );
        assert_eq!(parse_binary("running 3 tests"), None);
    }

    #[test]
    fn parses_ignored_tests_with_their_reason() {
        let with_reason =
            parse_ignored("test source::kube::tests::memory ... ignored, a measurement: run alone")
                .unwrap();
        assert_eq!(
            (with_reason.test.as_str(), with_reason.reason.as_str()),
            ("source::kube::tests::memory", "a measurement: run alone")
        );
        assert_eq!(
            parse_ignored("test a::b ... ignored").unwrap().reason,
            "#[ignore]"
        );
        assert!(parse_ignored("test a::b ... ok").is_none());
        assert!(parse_ignored("test result: ok. 1 passed; 0 failed; 1 ignored").is_none());
    }
}
