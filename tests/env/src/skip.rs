//! Skips. A test that cannot run here (not root, a tool or kernel feature missing) returns
//! early, and libtest counts it as passed. [`skip`] makes such a skip visible:
//!
//! - in CI (`CI` set) [`skip`] panics instead: a test never passes by skipping there;
//! - elsewhere it says why on stderr, and appends one line, `test<TAB>reason`, to the file
//!   `$WEFT_TEST_SKIP_LOG` names, if set. `cargo xtask test` sets it for the unit and the
//!   end-to-end tests, and counts those tests as skipped, not passed ([`read`]).
//!
//! Writer and reader of that file share this module, so they share its format.

use std::{fs::OpenOptions, io::Write as _, path::Path};

/// The variable naming the skip log.
pub const LOG_ENV: &str = "WEFT_TEST_SKIP_LOG";

/// One skipped test, as the log holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skip {
    /// `binary::module::test`, e.g. `mtls::plaintext_is_refused` or
    /// `weft::ebpf::tests::connect4_steers`.
    pub test: String,
    /// What is missing here.
    pub reason: String,
}

/// Skips the running test because `reason`; panics instead in CI. `test` names it when
/// the thread does not (libtest names each test's thread after the test).
pub fn skip(test: &str, reason: &str) {
    let test = full_name(test);
    if std::env::var_os("CI").is_some() {
        panic!("{test}: cannot run in CI: {reason}");
    }
    record(&test, reason);
}

/// Skips the running test for want of something no setup step can install (a binary
/// from outside this repository, such as Istio's ztunnel): recorded and counted as a skip
/// like [`skip`], but in CI too, where it does not fail the test.
pub fn skip_optional(test: &str, reason: &str) {
    record(&full_name(test), reason);
}

/// Says why `test` is skipped, and appends it to the log.
fn record(test: &str, reason: &str) {
    eprintln!("skipping {test}: {reason}");
    let Some(log) = std::env::var_os(LOG_ENV) else {
        return;
    };
    // One write of one line with O_APPEND: parallel tests' lines do not interleave.
    let line = format!("{test}\t{}\n", one_line(reason));
    let written = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    // A skip the summary cannot count would look like a pass: that is the bug this
    // crate exists to fix, so it fails the test.
    if let Err(e) = written {
        panic!("{test}: skipped ({reason}), but cannot record it in {log:?}: {e}");
    }
}

/// The skips in the log at `path` (none when it does not exist), one per test.
pub fn read(path: &Path) -> std::io::Result<Vec<Skip>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(parse(&text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// Parses the log's lines; a test that skipped twice counts once.
pub fn parse(text: &str) -> Vec<Skip> {
    let mut skips: Vec<Skip> = Vec::new();
    for line in text.lines() {
        let Some((test, reason)) = line.split_once('\t') else {
            continue;
        };
        if skips.iter().all(|s| s.test != test) {
            skips.push(Skip {
                test: test.to_owned(),
                reason: reason.to_owned(),
            });
        }
    }
    skips
}

/// `binary::thread` (libtest's thread name is the test's path in its binary), or
/// `binary::test` when the thread has no name of its own.
fn full_name(test: &str) -> String {
    let thread = std::thread::current();
    let name = match thread.name() {
        Some(name) if name != "main" => name,
        _ => test,
    };
    // Test binaries are named `<target>-<hash>`.
    let binary = std::env::current_exe()
        .ok()
        .and_then(|p| Some(p.file_stem()?.to_string_lossy().into_owned()))
        .map(|stem| match stem.rsplit_once('-') {
            Some((target, _hash)) => target.to_owned(),
            None => stem,
        });
    match binary {
        Some(binary) => format!("{binary}::{name}"),
        None => name.to_owned(),
    }
}

/// The reason on one line: the log holds one skip per line.
fn one_line(reason: &str) -> String {
    reason.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_one_skip_per_test_with_its_reason() {
        let log = "mtls::a\tneeds root\nmtls::b\t`helm` is not installed\nmtls::a\tneeds root\n\
                   a line without a tab\n";
        assert_eq!(
            parse(log),
            [
                Skip {
                    test: "mtls::a".into(),
                    reason: "needs root".into()
                },
                Skip {
                    test: "mtls::b".into(),
                    reason: "`helm` is not installed".into()
                },
            ]
        );
    }

    #[test]
    fn a_missing_log_holds_no_skips() {
        let dir = std::env::temp_dir().join(format!("weft-test-env-{}", std::process::id()));
        assert_eq!(read(&dir.join("absent")).unwrap(), []);
    }

    #[test]
    fn names_the_test_by_binary_and_libtest_thread() {
        let name = full_name("ignored");
        assert!(
            name.starts_with("weft_test_env::")
                && name.ends_with("tests::names_the_test_by_binary_and_libtest_thread"),
            "{name}"
        );
    }

    /// Runs the test `child` (`skip::tests::…`) in a child test process that logs its skips
    /// to `log`, under CI or not; returns its success.
    fn run_child(child: &str, log: &Path, ci: bool) -> bool {
        let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
        cmd.args(["--exact", child, "--test-threads=1"])
            .env(CHILD_ENV, "1")
            .env(LOG_ENV, log)
            .env_remove("CI")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        if ci {
            cmd.env("CI", "true");
        }
        cmd.status().unwrap().success()
    }

    /// The child of [`a_skip_is_logged_outside_ci_and_fails_in_ci`]; does nothing alone.
    #[test]
    fn child_skips() {
        if std::env::var_os(CHILD_ENV).is_some() {
            skip("unused", "needs\nroot");
        }
    }

    #[test]
    fn an_optional_skip_is_logged_in_ci_too() {
        let dir = std::env::temp_dir().join(format!("weft-test-env-opt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("skips.log");
        let passed = run_child("skip::tests::child_skips_optionally", &log, true);
        let skips = read(&log).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(passed, "an optional skip passes in CI");
        assert_eq!(
            skips,
            [Skip {
                test: "weft_test_env::skip::tests::child_skips_optionally".into(),
                reason: "no ztunnel".into()
            }]
        );
    }

    /// The child of [`an_optional_skip_is_logged_in_ci_too`]; does nothing alone.
    #[test]
    fn child_skips_optionally() {
        if std::env::var_os(CHILD_ENV).is_some() {
            skip_optional("unused", "no ztunnel");
        }
    }

    #[test]
    fn a_skip_is_logged_outside_ci_and_fails_in_ci() {
        let dir = std::env::temp_dir().join(format!("weft-test-env-child-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("skips.log");
        let _ = std::fs::remove_file(&log);
        let passed = run_child("skip::tests::child_skips", &log, false);
        let in_ci = run_child("skip::tests::child_skips", &log, true);
        let skips = read(&log).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(passed, "outside CI a skip passes");
        assert!(!in_ci, "in CI a skip fails the test");
        assert_eq!(
            skips,
            [Skip {
                test: "weft_test_env::skip::tests::child_skips".into(),
                reason: "needs root".into()
            }],
            "one line, from the run outside CI only"
        );
    }

    const CHILD_ENV: &str = "WEFT_TEST_ENV_SKIP_CHILD";

    #[test]
    fn reasons_are_one_line() {
        assert_eq!(
            one_line("kernel feature\nmissing:  bpffs"),
            "kernel feature missing: bpffs"
        );
    }
}
