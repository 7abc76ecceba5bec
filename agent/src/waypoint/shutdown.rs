//! Shutdown: the waypoint drains. It stops accepting, sends GOAWAY on every HBONE
//! connection (clients open new streams elsewhere), closes the HTTP connections in its
//! tunnels after the response in progress (HTTP/1.1) or with GOAWAY (HTTP/2), and serves
//! what is open until it ends, `drain_limit` passes or a second signal comes; then it cuts
//! what is left and counts it (`DRAIN_METRICS`).

use tracing::{info, warn};

use super::Waypoint;
use crate::drain::{MetricNames, Outcome};

/// How a drain ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shutdown {
    /// Everything open ended by itself.
    Drained,
    /// The drain limit passed; this much open work was cut.
    LimitPassed { cut: usize },
    /// A second signal came; this much open work was cut.
    Interrupted { cut: usize },
}

impl Shutdown {
    /// How much open work was cut.
    pub fn cut(self) -> usize {
        match self {
            Shutdown::Drained => 0,
            Shutdown::LimitPassed { cut } | Shutdown::Interrupted { cut } => cut,
        }
    }
}

impl Waypoint {
    /// Drains (see the module's doc) and returns how it ended; `second_signal` cuts the
    /// drain short. Readiness is the caller's to clear first.
    pub async fn shut_down(&self, second_signal: impl Future<Output = ()>) -> Shutdown {
        let drain = self.drain();
        let limit = self.inner.config.drain_limit;
        let open = drain.start();
        info!(component = "waypoint", open, limit = %humantime::format_duration(limit),
            "draining: accepting no connection; open requests are served until they end or the limit passes");
        let shutdown = tokio::select! {
            outcome = drain.wait(limit) => match outcome {
                Outcome::Drained => {
                    info!(component = "waypoint", "drained: every connection and request ended");
                    return Shutdown::Drained;
                }
                Outcome::LimitPassed { open } => {
                    warn!(component = "waypoint", open, limit = %humantime::format_duration(limit),
                        "drain limit (--drain-limit) passed: cutting the connections and requests still open");
                    Shutdown::LimitPassed { cut: open }
                }
            },
            () = second_signal => {
                let open = drain.open();
                warn!(component = "waypoint", open,
                    "second signal while draining: exiting now, cutting the connections and requests still open");
                Shutdown::Interrupted { cut: open }
            }
        };
        drain.cut_and_settle(shutdown.cut()).await;
        shutdown
    }
}

/// The waypoint's drain metrics (after the prefix).
pub const DRAIN_METRICS: MetricNames = MetricNames {
    draining: (
        "waypoint_draining",
        "1 while the waypoint drains before it exits: it accepts no new connection",
    ),
    open: (
        "waypoint_drain_open",
        "HBONE connections, their CONNECT streams and the requests in them open (what a drain waits for)",
    ),
    cut: (
        "waypoint_drain_cut",
        "HBONE connections, streams and requests still open when the drain limit passed (or a second signal came), cut",
    ),
};
