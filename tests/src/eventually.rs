//! Waiting for the system to converge, with patience the environment can scale.
//!
//! `WEFT_TEST_PATIENCE_MS` (default 100) is the poll interval; every deadline is scaled by
//! `WEFT_TEST_PATIENCE_MS / 100`, so a slow machine sets e.g. `WEFT_TEST_PATIENCE_MS=300`
//! to triple all waits (linkerd's `*_TEST_PATIENCE_MS` idea). The scale lives in
//! `weft_test_env`, shared with the agent's unit tests.

use std::{
    fmt::Display,
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
    #[should_panic(expected = "not true after")]
    fn panics_with_the_last_error() {
        assert_eventually(Duration::from_millis(1), || Err::<(), _>("never"));
    }
}
