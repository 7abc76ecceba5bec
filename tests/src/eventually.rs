//! Waiting for the system to converge, with patience the environment can scale.
//!
//! `WEFT_TEST_PATIENCE_MS` (default 100) is the poll interval; every deadline is scaled by
//! `WEFT_TEST_PATIENCE_MS / 100`, so a slow machine sets e.g. `WEFT_TEST_PATIENCE_MS=300`
//! to triple all waits (linkerd's `*_TEST_PATIENCE_MS` idea). The scale lives in
//! `weft_test_env`, shared with the agent's unit tests.

use std::{
    fmt::Display,
    process::ExitStatus,
    thread,
    time::{Duration, Instant},
};

/// Calls `f` until it returns `Ok`, for at most `deadline` (scaled), and returns that value.
/// Panics with the last error when time runs out.
#[track_caller]
pub fn assert_eventually<T, E: Display>(
    deadline: Duration,
    mut f: impl FnMut() -> Result<T, E>,
) -> T {
    let deadline = scaled(deadline);
    let start = Instant::now();
    loop {
        match f() {
            Ok(value) => return value,
            Err(e) if start.elapsed() >= deadline => {
                panic!("not true after {deadline:?}: {e:#}")
            }
            Err(_) => thread::sleep(patience()),
        }
    }
}

/// Like [`assert_eventually`], but returns the last error instead of panicking.
pub fn eventually<T, E: Display>(
    deadline: Duration,
    mut f: impl FnMut() -> Result<T, E>,
) -> Result<T, E> {
    let deadline = scaled(deadline);
    let start = Instant::now();
    loop {
        match f() {
            Ok(value) => return Ok(value),
            Err(e) if start.elapsed() >= deadline => return Err(e),
            Err(_) => thread::sleep(patience()),
        }
    }
}

/// Waits, as [`eventually`], for a process to be ready: `probe` returns `Ok(None)` once it
/// is, `Ok(Some(status))` when the process has exited, which ends the wait at once (an
/// exited process never becomes ready), or an error to try again. The error says why
/// `what` is not ready.
pub(crate) fn until_ready(
    what: &str,
    deadline: Duration,
    probe: impl FnMut() -> anyhow::Result<Option<ExitStatus>>,
) -> Result<(), String> {
    match eventually(deadline, probe) {
        Ok(None) => Ok(()),
        Ok(Some(status)) => Err(format!("{what} exited ({status}) before it was ready")),
        Err(e) => Err(format!("{e:#}")),
    }
}

/// One patience scale for every test: the agent's unit tests use the same.
pub use weft_test_env::{patience, scaled};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_the_first_ok_value() {
        let mut calls = 0;
        let v = assert_eventually(Duration::from_secs(5), || {
            calls += 1;
            if calls < 3 { Err("not yet") } else { Ok(calls) }
        });
        assert_eq!(v, 3);
    }

    #[test]
    fn an_exited_process_ends_the_wait_for_ready_at_once() {
        use std::os::unix::process::ExitStatusExt;
        let start = Instant::now();
        let exited = ExitStatus::from_raw(2 << 8);
        let why = until_ready("app", Duration::from_secs(60), || Ok(Some(exited))).unwrap_err();
        assert_eq!(why, "app exited (exit status: 2) before it was ready");
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(
            until_ready("app", Duration::from_secs(1), || Ok(None)),
            Ok(())
        );
    }

    #[test]
    #[should_panic(expected = "not true after")]
    fn panics_with_the_last_error() {
        assert_eventually(Duration::from_millis(1), || Err::<(), _>("never"));
    }
}
