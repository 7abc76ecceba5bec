//! Rate limits for log lines that a pod or a peer can cause at will (a refused handshake, a
//! refused connection, a cap reached). Without one, a hostile client turns each attempt into
//! a log line and floods the node's logging. Each call site gets its own budget: the first
//! event is logged, then at most one per interval, and that line says how many were left out
//! in between (`suppressed`). Metrics still count every event; the log is only a pointer.
//!
//! ```text
//! warn_limited!(component = "hbone", src = %peer, error = %e, "HBONE handshake refused");
//! ```

use std::{
    sync::{
        OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

/// One call site's budget: lock-free, so a flood of events on many threads never contends
/// on a mutex.
pub struct Limiter {
    interval_ms: u64,
    /// Milliseconds since [`epoch`] of the last line logged, plus one (0: never logged).
    last: AtomicU64,
    /// Events left out since the last line logged.
    suppressed: AtomicU64,
}

impl Limiter {
    /// A budget of one line per [`INTERVAL`].
    pub const fn new() -> Self {
        Self::with_interval(INTERVAL)
    }

    pub const fn with_interval(interval: Duration) -> Self {
        Self {
            interval_ms: interval.as_millis() as u64,
            last: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Whether this event may be logged now; if so, how many were left out before it.
    pub fn check(&self) -> Option<u64> {
        self.check_at(epoch().elapsed().as_millis() as u64 + 1)
    }

    fn check_at(&self, now: u64) -> Option<u64> {
        let last = self.last.load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= self.interval_ms;
        // Exactly one of the threads that see the budget due wins it.
        if due
            && self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

impl Default for Limiter {
    fn default() -> Self {
        Self::new()
    }
}

/// `tracing::warn!` with a per-call-site budget of one line per [`INTERVAL`]; the line
/// carries `suppressed`, the number of events left out since the previous one.
#[macro_export]
macro_rules! warn_limited {
    ($($arg:tt)+) => {
        $crate::log_limited!(warn, $($arg)+)
    };
}

/// `tracing::info!` with the same budget as [`warn_limited!`]: for per-event lines that are
/// only informative (the access log and the metrics carry every event).
#[macro_export]
macro_rules! info_limited {
    ($($arg:tt)+) => {
        $crate::log_limited!(info, $($arg)+)
    };
}

/// The budgeted form of a `tracing` level macro (`warn`, `info`): one static budget per
/// call site.
#[doc(hidden)]
#[macro_export]
macro_rules! log_limited {
    ($level:ident, $($arg:tt)+) => {{
        static LIMIT: $crate::telemetry::log_limit::Limiter =
            $crate::telemetry::log_limit::Limiter::new();
        if let Some(suppressed) = LIMIT.check() {
            ::tracing::$level!(suppressed, $($arg)+);
        }
    }};
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// One line per call site per interval: enough to see that something is happening and
/// what, never enough to fill a disk.
pub const INTERVAL: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_the_first_event_then_one_per_interval_with_the_count_left_out() {
        let limit = Limiter::with_interval(Duration::from_millis(100));
        assert_eq!(limit.check_at(1), Some(0));
        for t in 2..100 {
            assert_eq!(limit.check_at(t), None, "at {t} ms");
        }
        assert_eq!(limit.check_at(101), Some(98));
        assert_eq!(limit.check_at(150), None);
        assert_eq!(limit.check_at(201), Some(1));
    }

    #[test]
    fn a_flood_on_many_threads_logs_one_line() {
        let limit = Limiter::with_interval(Duration::from_secs(3600));
        let (logged, reported) = (AtomicU64::new(0), AtomicU64::new(0));
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..10_000 {
                        if let Some(suppressed) = limit.check() {
                            logged.fetch_add(1, Ordering::Relaxed);
                            reported.fetch_add(suppressed, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(logged.load(Ordering::Relaxed), 1);
        // Events that raced the one line may be counted in it or after it, never lost.
        let pending = limit.suppressed.load(Ordering::Relaxed);
        assert_eq!(reported.load(Ordering::Relaxed) + pending, 39_999);
    }
}
