//! Drain: tracks open work (proxied connections, HBONE streams) so that shutdown can stop
//! accepting, serve what is open until it ends or a limit passes, and say how much it cut.
//!
//! `Drain` is shared by whoever opens work (each unit holds a `Guard` while it runs) and
//! whoever shuts down (`start`, then `wait`). Work that must react to the drain, such as an
//! HBONE connection sending GOAWAY, awaits `draining`; work that must end when the drain is
//! cut, rather than be cut from outside, awaits `cut_off`. Its `Metrics` report the drain at
//! scrape time, under the names its owner gives (`MetricNames`): whether it runs, what is
//! still open, what the limit cut.

use std::{
    fmt,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
};
use serde::Serialize;
use tokio::sync::watch;

/// Drain settings (`agent.drain`): how long open connections are served after shutdown
/// starts; what is still open then is cut.
#[derive(Clone, Copy, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Config {
    /// After a hand-over: a successor serves the pods, so waiting costs nothing but the old
    /// process.
    #[serde(with = "crate::settings::humantime_ms")]
    pub limit: Duration,
    /// With no successor, the node's enrolled pods fail closed until the next agent starts,
    /// which may be only once this one is gone.
    #[serde(with = "crate::settings::humantime_ms")]
    pub limit_without_successor: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            limit: DEFAULT_LIMIT,
            limit_without_successor: DEFAULT_LIMIT_WITHOUT_SUCCESSOR,
        }
    }
}

/// The tracker. Cheap to clone; every clone is the same tracker.
#[derive(Clone, Debug, Default)]
pub struct Drain {
    inner: Arc<Inner>,
}

/// One unit of open work; dropping it ends the unit.
#[derive(Debug)]
#[must_use = "the work counts as open only while its guard lives"]
pub struct Guard {
    inner: Arc<Inner>,
}

/// How a `wait` ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing is open any more.
    Drained,
    /// The limit passed with this much still open.
    LimitPassed { open: usize },
}

/// `/metrics` view of a drain.
#[derive(Clone, Debug)]
pub struct Metrics {
    drain: Drain,
    names: &'static MetricNames,
}

/// What a drain's metrics are called and say (after the registry's prefix).
#[derive(Debug)]
pub struct MetricNames {
    /// Gauge: 1 while draining.
    pub draining: (&'static str, &'static str),
    /// Gauge: units of work open.
    pub open: (&'static str, &'static str),
    /// Counter (`_total` is added): units of work cut.
    pub cut: (&'static str, &'static str),
}

#[derive(Debug)]
struct Inner {
    open: watch::Sender<usize>,
    started: watch::Sender<bool>,
    cut_off: watch::Sender<bool>,
    cut: AtomicU64,
}

impl Drain {
    /// Counts a new unit of work as open until the guard drops.
    pub fn guard(&self) -> Guard {
        self.inner.open.send_modify(|open| *open += 1);
        Guard {
            inner: Arc::clone(&self.inner),
        }
    }

    /// Units of work open now.
    pub fn open(&self) -> usize {
        *self.inner.open.borrow()
    }

    /// Starts the drain (once; later calls change nothing). Returns what is open now.
    pub fn start(&self) -> usize {
        self.inner.started.send_replace(true);
        self.open()
    }

    pub fn is_draining(&self) -> bool {
        *self.inner.started.borrow()
    }

    /// Resolves once the drain has started.
    pub fn draining(&self) -> impl Future<Output = ()> + Send + use<> {
        let mut started = self.inner.started.subscribe();
        async move {
            // The sender lives in `Inner`, which this future's receiver does not keep
            // alive: if it is gone, so is every drain that could start.
            if started.wait_for(|started| *started).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Tells the work still open to end now (once; later calls change nothing).
    pub fn cut(&self) {
        self.inner.cut_off.send_replace(true);
    }

    /// Ends the drain early: counts `open` as cut, tells the work awaiting `cut_off` to
    /// end, and gives what was cut a moment (`CUT_GRACE`) to reset its peers (an
    /// application must not take the cut for a clean end) and write its access-log lines
    /// before the process exits.
    pub async fn cut_and_settle(&self, open: usize) {
        self.count_cut(open);
        self.cut();
        let _ = self.wait(CUT_GRACE).await;
    }

    /// Resolves once the drain has been cut.
    pub fn cut_off(&self) -> impl Future<Output = ()> + Send + use<> {
        let mut cut = self.inner.cut_off.subscribe();
        async move {
            // As in `draining`: no sender, no cut to come.
            if cut.wait_for(|cut| *cut).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Waits until nothing is open, or `limit` passed.
    pub async fn wait(&self, limit: Duration) -> Outcome {
        let mut open = self.inner.open.subscribe();
        let drained = tokio::time::timeout(limit, open.wait_for(|open| *open == 0)).await;
        match drained {
            Ok(_) => Outcome::Drained,
            Err(_) => Outcome::LimitPassed { open: self.open() },
        }
    }

    /// Counts work cut short by the end of the drain (for `/metrics`).
    pub fn count_cut(&self, n: usize) {
        self.inner.cut.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// The metrics under the agent's names (`agent_draining`, …).
    pub fn metrics(&self) -> Metrics {
        self.metrics_named(&AGENT_METRICS)
    }

    /// The metrics under `names`.
    pub fn metrics_named(&self, names: &'static MetricNames) -> Metrics {
        Metrics {
            drain: self.clone(),
            names,
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.inner
            .open
            .send_modify(|open| *open = open.saturating_sub(1));
    }
}

impl Default for Inner {
    fn default() -> Self {
        Self {
            open: watch::Sender::new(0),
            started: watch::Sender::new(false),
            cut_off: watch::Sender::new(false),
            cut: AtomicU64::new(0),
        }
    }
}

impl Collector for Metrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let names = self.names;
        let gauges = [
            (names.draining, i64::from(self.drain.is_draining())),
            (
                names.open,
                i64::try_from(self.drain.open()).unwrap_or(i64::MAX),
            ),
        ];
        for ((name, help), value) in gauges {
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        let cut = ConstCounter::new(self.drain.inner.cut.load(Ordering::Relaxed));
        let (name, help) = names.cut;
        cut.encode(encoder.encode_descriptor(name, help, None, cut.metric_type())?)
    }
}

/// The node agent's drain metrics.
pub const AGENT_METRICS: MetricNames = MetricNames {
    draining: (
        "agent_draining",
        "1 while the agent drains before it exits: it accepts nothing new",
    ),
    open: (
        "agent_drain_open_connections",
        "Proxied connections and HBONE streams open (those a drain waits for)",
    ),
    cut: (
        "agent_drain_cut_connections",
        "Connections still open when the drain limit passed (or a second signal came), cut",
    ),
};

/// How long cut work gets to end before the process exits.
const CUT_GRACE: Duration = Duration::from_millis(500);

/// Long: a drain should outlive ordinary long-lived connections (issue 16: hours).
pub const DEFAULT_LIMIT: Duration = Duration::from_secs(60 * 60);
pub const DEFAULT_LIMIT_WITHOUT_SUCCESSOR: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn wait_returns_when_the_last_guard_drops() {
        let drain = Drain::default();
        let (a, b) = (drain.guard(), drain.guard());
        assert_eq!(drain.start(), 2);
        let waiter = tokio::spawn({
            let drain = drain.clone();
            async move { drain.wait(Duration::from_secs(60)).await }
        });
        drop(a);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!waiter.is_finished());
        assert_eq!(drain.open(), 1);
        drop(b);
        assert_eq!(waiter.await.unwrap(), Outcome::Drained);
        assert_eq!(drain.open(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn wait_stops_at_the_limit_and_says_what_is_open() {
        let drain = Drain::default();
        let _guard = drain.guard();
        let started = tokio::time::Instant::now();
        let outcome = drain.wait(Duration::from_secs(2)).await;
        assert_eq!(outcome, Outcome::LimitPassed { open: 1 });
        assert_eq!(started.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_open_drains_at_once() {
        let drain = Drain::default();
        drop(drain.guard());
        assert_eq!(drain.wait(Duration::ZERO).await, Outcome::Drained);
    }

    #[tokio::test]
    async fn waiters_hear_the_drain_start() {
        let drain = Drain::default();
        let heard = drain.draining();
        assert!(!drain.is_draining());
        drain.start();
        heard.await;
        assert!(drain.is_draining());
    }

    #[tokio::test]
    async fn work_hears_the_cut() {
        let drain = Drain::default();
        let heard = drain.cut_off();
        drain.start();
        drain.cut();
        heard.await;
        // A cut heard late is still heard.
        drain.cut_off().await;
    }

    #[test]
    fn metrics_show_draining_open_and_cut() {
        let drain = Drain::default();
        let _guard = drain.guard();
        drain.start();
        drain.count_cut(3);
        let mut registry = prometheus_client::registry::Registry::with_prefix("weft");
        registry.register_collector(Box::new(drain.metrics()));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("weft_agent_draining 1\n"), "{text}");
        assert!(
            text.contains("weft_agent_drain_open_connections 1\n"),
            "{text}"
        );
        assert!(
            text.contains("weft_agent_drain_cut_connections_total 3\n"),
            "{text}"
        );
    }
}
