//! Fault injection: which of a policy's faults one request gets, drawn independently for
//! the delay and the abort (a request may get both: held, then answered by the waypoint).

use std::time::Duration;

use crate::state::traffic::Fault;

/// What one request gets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Drawn {
    pub delay: Option<Duration>,
    pub abort: Option<u16>,
}

/// Draws `fault`'s delay and abort for one request, each with its own share.
pub fn draw(fault: &Fault) -> Drawn {
    let hit = |parts_per_million: u32| fastrand::u32(0..1_000_000) < parts_per_million;
    Drawn {
        delay: fault
            .delay
            .filter(|d| hit(d.parts_per_million))
            .map(|d| d.fixed),
        abort: fault
            .abort
            .filter(|a| hit(a.parts_per_million))
            .map(|a| a.status),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::traffic::{FaultAbort, FaultDelay};

    #[test]
    fn shares_are_drawn_as_configured() {
        let fault = Fault {
            delay: Some(FaultDelay {
                fixed: Duration::from_millis(5),
                parts_per_million: 1_000_000,
            }),
            abort: Some(FaultAbort {
                status: 503,
                parts_per_million: 100_000,
            }),
        };
        let draws: Vec<_> = (0..100_000).map(|_| draw(&fault)).collect();
        assert!(
            draws
                .iter()
                .all(|d| d.delay == Some(Duration::from_millis(5)))
        );
        let aborts = draws.iter().filter(|d| d.abort == Some(503)).count();
        // 10 %, with a margin of many standard deviations (σ ≈ 95).
        assert!((9_000..11_000).contains(&aborts), "{aborts}");
        let none = Fault {
            delay: None,
            abort: Some(FaultAbort {
                status: 500,
                parts_per_million: 0,
            }),
        };
        assert!((0..10_000).all(|_| draw(&none) == Drawn::default()));
    }
}
