//! `cargo xtask test`: unit tests of the workspace, then the privileged end-to-end tests
//! of `tests/` against the freshly built agent. Ends with each test binary's counts, one
//! summary line, then each skipped test with its reason, and fails if anything failed (or
//! did not run to completion).
//!
//! A test that cannot run here (not root, a tool missing) returns early, which libtest
//! counts as passed; it records itself in the skip log (`weft_test_env`) this command
//! names in `$WEFT_TEST_SKIP_LOG`, and the summary counts it as skipped.

use std::{ffi::OsString, path::Path};

use anyhow::{Context, Result};
use weft_test_env::Skip;

use crate::{
    cargo::{self, BinaryResult, TestCounts, TestRun, cargo, run_tests},
    image,
    previous::{self, Previous},
    setup,
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
    let mut ignored = Vec::new();
    let mut binaries = Vec::new();
    let mut broken = Vec::new();
    let mut record = |what: &str, run: TestRun| {
        let TestRun {
            status,
            counts,
            binaries: run_binaries,
            ignored: run_ignored,
        } = run;
        total.add(counts);
        binaries.extend(run_binaries);
        ignored.extend(run_ignored);
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
    // Emptied now: it holds this run's skips only.
    let skip_log = cargo::target_dir()?.join("weft-test-skips.log");
    std::fs::write(&skip_log, "")
        .with_context(|| format!("truncate the skip log {}", skip_log.display()))?;

    if !options.e2e_only {
        println!("\n== unit tests ==");
        record(
            "unit tests",
            run_tests(
                cargo()
                    .args([
                        "test",
                        "--no-fail-fast",
                        "--workspace",
                        "--exclude",
                        "weft-ebpf",
                        "--exclude",
                        "weft-tests",
                    ])
                    .env(weft_test_env::LOG_ENV, &skip_log),
            )?,
        );
    }

    if !options.unit_only {
        // The other side of the upgrade test across builds.
        let previous = previous::build()?;
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
            .env("WEFT_IMAGE", &image.path)
            .env(weft_test_env::LOG_ENV, &skip_log);
        match previous {
            Previous::Built(bin) => cmd.env(weft_test_env::previous::BIN_ENV, bin),
            Previous::Missing(why) => {
                println!("xtask test: {why}; the upgrade test across builds is skipped");
                cmd.env(weft_test_env::previous::MISSING_ENV, why)
            }
        };
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
    let summary = Summary::new(total, &binaries, ignored, read_skips(&skip_log)?);
    print!("{summary}");
    if !broken.is_empty() {
        // Already said above; the summary stays the last thing in the output.
        return Err(Failed.into());
    }
    Ok(())
}

/// The summary: libtest's counts, less the tests that passed by skipping; per test binary,
/// then in total.
#[derive(Debug)]
struct Summary {
    binaries: Vec<BinaryLine>,
    passed: u64,
    failed: u64,
    /// Skipped by the test itself (from the skip log), then ignored by libtest.
    skipped: Vec<Skip>,
}

/// One test binary's line of the summary.
#[derive(Debug)]
struct BinaryLine {
    name: String,
    source: String,
    passed: u64,
    failed: u64,
    skipped: u64,
}

impl BinaryLine {
    /// `result`, with the skips logged by its tests (named `<binary>::…`) moved from passed
    /// to skipped.
    fn new(result: &BinaryResult, skips: &[Skip]) -> Self {
        let prefix = format!("{}::", result.name);
        let logged = skips.iter().filter(|s| s.test.starts_with(&prefix)).count() as u64;
        Self {
            name: result.name.clone(),
            source: result.source.clone(),
            passed: result.counts.passed.saturating_sub(logged),
            failed: result.counts.failed,
            skipped: logged + result.counts.ignored,
        }
    }
}

impl Summary {
    fn new(
        total: TestCounts,
        binaries: &[BinaryResult],
        ignored: Vec<Skip>,
        skipped: Vec<Skip>,
    ) -> Self {
        // Binaries without tests (most doc-tests, `main.rs`) say nothing worth a line.
        let binaries = binaries
            .iter()
            .filter(|b| b.counts.passed + b.counts.failed + b.counts.ignored > 0)
            .map(|b| BinaryLine::new(b, &skipped))
            .collect();
        // Each skip returned early and libtest counted it as passed.
        let passed = total.passed.saturating_sub(skipped.len() as u64);
        let mut all = skipped;
        // libtest's count is the truth for ignored tests; a line it printed that did not
        // parse still counts, without a reason.
        let unnamed = total.ignored.saturating_sub(ignored.len() as u64);
        all.extend(ignored);
        all.extend((0..unnamed).map(|_| Skip {
            test: "(a test libtest ignored)".into(),
            reason: "#[ignore]".into(),
        }));
        Self {
            binaries,
            passed,
            failed: total.failed,
            skipped: all,
        }
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if !self.binaries.is_empty() {
            writeln!(f, "per test binary:")?;
        }
        for b in &self.binaries {
            writeln!(
                f,
                "  {:<24} {:>4} passed {:>3} failed {:>3} skipped  {}{}",
                b.name,
                b.passed,
                b.failed,
                b.skipped,
                b.source,
                if b.failed > 0 { "  FAILED" } else { "" }
            )?;
        }
        writeln!(
            f,
            "summary: {} passed, {} failed, {} skipped",
            self.passed,
            self.failed,
            self.skipped.len()
        )?;
        for skip in &self.skipped {
            writeln!(f, "  skipped {}: {}", skip.test, skip.reason)?;
        }
        Ok(())
    }
}

fn read_skips(log: &Path) -> Result<Vec<Skip>> {
    weft_test_env::read(log).with_context(|| format!("read the skip log {}", log.display()))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn skip(test: &str, reason: &str) -> Skip {
        Skip {
            test: test.into(),
            reason: reason.into(),
        }
    }

    #[test]
    fn skips_count_as_skipped_not_passed_and_are_listed_with_their_reason() {
        let total = TestCounts {
            passed: 40,
            failed: 1,
            ignored: 1,
        };
        let skipped = weft_test_env::parse(
            "mtls::a\tneeds root\nkubernetes_helm::b\t`helm` is not installed\n",
        );
        let ignored = vec![skip("kube::tests::memory", "a measurement")];
        let summary = Summary::new(total, &[], ignored, skipped);
        assert_eq!(
            summary.to_string(),
            "summary: 38 passed, 1 failed, 3 skipped\n\
             \x20 skipped mtls::a: needs root\n\
             \x20 skipped kubernetes_helm::b: `helm` is not installed\n\
             \x20 skipped kube::tests::memory: a measurement\n"
        );
    }

    #[test]
    fn each_binary_is_listed_with_its_own_skips_and_failures() {
        let result = |name: &str, source: &str, passed, failed, ignored| BinaryResult {
            name: name.into(),
            source: source.into(),
            counts: TestCounts {
                passed,
                failed,
                ignored,
            },
        };
        let binaries = [
            result("weft", "src/lib.rs", 10, 0, 1),
            result("mtls", "tests/mtls.rs", 5, 1, 0),
        ];
        let total = TestCounts {
            passed: 15,
            failed: 1,
            ignored: 1,
        };
        let skipped = weft_test_env::parse("mtls::a\tneeds root\nmtls::b\tneeds root\n");
        let text = Summary::new(total, &binaries, Vec::new(), skipped).to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "per test binary:");
        assert_eq!(
            lines[1].split_whitespace().collect::<Vec<_>>(),
            [
                "weft",
                "10",
                "passed",
                "0",
                "failed",
                "1",
                "skipped",
                "src/lib.rs"
            ]
        );
        assert_eq!(
            lines[2].split_whitespace().collect::<Vec<_>>(),
            [
                "mtls",
                "3",
                "passed",
                "1",
                "failed",
                "2",
                "skipped",
                "tests/mtls.rs",
                "FAILED"
            ]
        );
        assert!(
            lines[3].starts_with("summary: 13 passed, 1 failed, 3 skipped"),
            "{text}"
        );
    }

    #[test]
    fn ignored_tests_libtest_counted_but_did_not_name_still_count() {
        let total = TestCounts {
            passed: 3,
            failed: 0,
            ignored: 2,
        };
        let summary = Summary::new(total, &[], vec![skip("a", "slow")], Vec::new());
        assert_eq!((summary.passed, summary.skipped.len()), (3, 2));
    }

    #[test]
    fn a_run_without_skips_reports_all_passed() {
        let total = TestCounts {
            passed: 7,
            failed: 0,
            ignored: 0,
        };
        assert_eq!(
            Summary::new(total, &[], Vec::new(), Vec::new()).to_string(),
            "summary: 7 passed, 0 failed, 0 skipped\n"
        );
    }
}
