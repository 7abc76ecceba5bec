//! Patience the environment can scale: `WEFT_TEST_PATIENCE_MS` (default 100) is the poll
//! interval of the harness's waits, and every deadline of every test is scaled by
//! `WEFT_TEST_PATIENCE_MS / 100`, so a slow machine sets e.g. `WEFT_TEST_PATIENCE_MS=300`
//! to triple all waits (linkerd's `*_TEST_PATIENCE_MS` idea).

use std::time::Duration;

/// `d` scaled by `WEFT_TEST_PATIENCE_MS / 100`.
pub fn scaled(d: Duration) -> Duration {
    d.mul_f64(patience().as_millis() as f64 / DEFAULT_PATIENCE_MS as f64)
}

/// The poll interval: `WEFT_TEST_PATIENCE_MS`, default 100 ms.
pub fn patience() -> Duration {
    let ms = std::env::var("WEFT_TEST_PATIENCE_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|ms| *ms > 0)
        .unwrap_or(DEFAULT_PATIENCE_MS);
    Duration::from_millis(ms)
}

const DEFAULT_PATIENCE_MS: u64 = 100;
