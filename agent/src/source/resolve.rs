//! The resolve stage, between a source and the node join (`app`): it publishes each raw
//! snapshot with `resolved_hosts` filled in for the hosts of its `DNS` external services,
//! and keeps them resolved (`dns::Resolver`).
//!
//! - A host is asked again when its answer's TTL ends, the TTL clamped to
//!   [`Settings::min_ttl`, `Settings::max_ttl`] (a TTL of 0 must not become a query loop,
//!   a day-long one must not pin a moved service).
//! - A failed lookup keeps the host's last good answer (stale beats nothing: the proxy
//!   would otherwise stop recognising a registered service) and is retried with a
//!   doubling backoff. Each host logs a warning when its outcome changes, not per retry.
//! - A host no longer named by any external service is forgotten.
//! - At most `max_hosts` hosts (the first by name) and `max_in_flight` lookups at once.
//! - A new snapshot is published only when it differs; one without `DNS` hosts passes
//!   through as it is (the same `Arc`), at no cost.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::Arc,
    time::Duration,
};

use tokio::{sync::watch, task::JoinSet, time::Instant};
use tracing::{debug, info, warn};

use crate::{
    dns::{self, Answer, Resolver},
    state::{Resolution, Snapshot},
};

/// Limits and timings of the stage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// An answer is kept at least this long before it is asked again.
    pub min_ttl: Duration,
    /// And at most this long.
    pub max_ttl: Duration,
    /// The first retry after a failed lookup; each next one waits twice as long.
    pub retry_first: Duration,
    /// The longest wait between retries.
    pub retry_max: Duration,
    /// Distinct hosts resolved; the others (last by name) are not, and are counted.
    pub max_hosts: usize,
    /// Lookups at once.
    pub max_in_flight: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            min_ttl: Duration::from_secs(5),
            max_ttl: Duration::from_secs(300),
            retry_first: Duration::from_secs(1),
            retry_max: Duration::from_secs(30),
            max_hosts: 1024,
            max_in_flight: 8,
        }
    }
}

/// Publishes `raw` to `tx`, with the hosts of its `DNS` external services resolved, until
/// `raw` is closed or `tx` has no receivers. The first snapshot is published at once,
/// before any answer; each answer that changes something is published when it comes.
pub async fn follow(
    mut raw: watch::Receiver<Arc<Snapshot>>,
    tx: watch::Sender<Arc<Snapshot>>,
    resolver: Resolver,
    settings: Settings,
) {
    let max_in_flight = settings.max_in_flight.max(1);
    let mut table = Table::new(settings);
    let mut lookups = JoinSet::new();
    // The host each running lookup is for, so that a lookup that died still frees it.
    let mut running: HashMap<tokio::task::Id, String> = HashMap::new();
    let mut snapshot = Arc::clone(&raw.borrow_and_update());
    table.want(&snapshot, Instant::now());
    let mut dirty = true;
    loop {
        while lookups.len() < max_in_flight {
            let Some(host) = table.start_due(Instant::now()) else {
                break;
            };
            let resolver = resolver.clone();
            let task = lookups.spawn({
                let host = host.clone();
                async move { resolver.lookup(&host).await }
            });
            running.insert(task.id(), host);
        }
        if dirty {
            publish(&tx, &snapshot, &table.resolved());
            let (resolved, over_limit) = table.counts();
            resolver.metrics().set_hosts(resolved, over_limit);
            dirty = false;
        }
        // With every slot taken, a finished lookup (not a timer) is what can start the next.
        let wake = if lookups.len() < max_in_flight {
            table.next_due()
        } else {
            None
        };
        tokio::select! {
            changed = raw.changed() => {
                if changed.is_err() {
                    return;
                }
                snapshot = Arc::clone(&raw.borrow_and_update());
                table.want(&snapshot, Instant::now());
                dirty = true;
            }
            Some(joined) = lookups.join_next_with_id() => {
                let (id, outcome) = match joined {
                    Ok((id, outcome)) => (id, outcome),
                    Err(e) => (e.id(), Err(dns::Error::Bug(e.to_string()))),
                };
                if let Some(host) = running.remove(&id) {
                    dirty |= table.record(&host, outcome, Instant::now());
                }
            }
            () = sleep_until(wake) => {}
            () = tx.closed() => return,
        }
    }
}

/// Every host the stage resolves, and what it knows of each.
struct Table {
    settings: Settings,
    hosts: BTreeMap<String, Host>,
    over_limit: usize,
    // The last configuration error logged (missing resolv.conf…): the same for every host,
    // so it is logged once, not once per host.
    config_error: Option<String>,
}

#[derive(Debug)]
struct Host {
    /// The last good answer.
    addresses: Option<Vec<IpAddr>>,
    /// When to ask next (meaningless while `in_flight`).
    due: Instant,
    in_flight: bool,
    /// Failed lookups since the last good one.
    failures: u32,
    /// The reason of the last failure, until a lookup succeeds: logged when it changes.
    failing: Option<&'static str>,
}

impl Table {
    fn new(settings: Settings) -> Self {
        Self {
            settings,
            hosts: BTreeMap::new(),
            over_limit: 0,
            config_error: None,
        }
    }

    /// Follows the hosts `snapshot` names: new ones are due now, gone ones are forgotten.
    fn want(&mut self, snapshot: &Snapshot, now: Instant) {
        let named: BTreeSet<&str> = snapshot
            .external_services
            .values()
            .filter(|e| e.resolution == Resolution::Dns)
            .flat_map(|e| e.hosts.iter().map(String::as_str))
            .collect();
        let over_limit = named.len().saturating_sub(self.settings.max_hosts);
        if over_limit != self.over_limit {
            if over_limit > 0 {
                warn!(
                    component = "dns",
                    hosts = named.len(),
                    limit = self.settings.max_hosts,
                    not_resolved = over_limit,
                    "external services name more hosts than the agent resolves; the last by name are not resolved"
                );
            }
            self.over_limit = over_limit;
        }
        let wanted: BTreeSet<&str> = named.into_iter().take(self.settings.max_hosts).collect();
        self.hosts.retain(|host, _| wanted.contains(host.as_str()));
        for host in wanted {
            if !self.hosts.contains_key(host) {
                self.hosts.insert(
                    host.to_owned(),
                    Host {
                        addresses: None,
                        due: now,
                        in_flight: false,
                        failures: 0,
                        failing: None,
                    },
                );
            }
        }
    }

    /// A host due at `now` and not being looked up, now marked as being looked up.
    fn start_due(&mut self, now: Instant) -> Option<String> {
        let (name, host) = self
            .hosts
            .iter_mut()
            .filter(|(_, h)| !h.in_flight && h.due <= now)
            .min_by_key(|(_, h)| h.due)?;
        host.in_flight = true;
        Some(name.clone())
    }

    /// When the next host not being looked up is due.
    fn next_due(&self) -> Option<Instant> {
        self.hosts
            .values()
            .filter(|h| !h.in_flight)
            .map(|h| h.due)
            .min()
    }

    /// Takes a lookup's outcome; whether the host's addresses changed.
    fn record(&mut self, name: &str, outcome: Result<Answer, dns::Error>, now: Instant) -> bool {
        let settings = &self.settings;
        // Forgotten while it was looked up: the answer is for nobody.
        let Some(host) = self.hosts.get_mut(name) else {
            return false;
        };
        host.in_flight = false;
        match outcome {
            Ok(answer) => {
                if host.failing.take().is_some() {
                    info!(component = "dns", host = name, "resolves again");
                }
                self.config_error = None;
                host.failures = 0;
                host.due = now + answer.ttl.clamp(settings.min_ttl, settings.max_ttl);
                if host.addresses.as_ref() == Some(&answer.addresses) {
                    return false;
                }
                debug!(component = "dns", host = name, addresses = ?answer.addresses, ttl = ?answer.ttl, "resolved");
                host.addresses = Some(answer.addresses);
                true
            }
            Err(error) => {
                host.failures = host.failures.saturating_add(1);
                host.due = now + backoff(settings, host.failures);
                let reason = error.reason();
                if error.is_config() {
                    let message = error.to_string();
                    if self.config_error.as_ref() != Some(&message) {
                        warn!(component = "dns", error = %message, "cannot resolve the hosts of external services");
                        self.config_error = Some(message);
                    }
                } else if host.failing != Some(reason) {
                    let kept = host.addresses.as_ref().map_or(0, Vec::len);
                    warn!(component = "dns", host = name, %error, kept_addresses = kept,
                        "lookup failed; the last good answer stays in force, retrying");
                }
                host.failing = Some(reason);
                false
            }
        }
    }

    /// Each host's last good answer.
    fn resolved(&self) -> BTreeMap<String, Vec<IpAddr>> {
        self.hosts
            .iter()
            .filter_map(|(name, h)| Some((name.clone(), h.addresses.clone()?)))
            .collect()
    }

    /// Hosts with an answer, and hosts left out by the limit.
    fn counts(&self) -> (usize, usize) {
        let resolved = self.hosts.values().filter(|h| h.addresses.is_some());
        (resolved.count(), self.over_limit)
    }
}

/// `raw` with `resolved` as its resolved hosts, sent only when it differs from what `tx`
/// holds. `raw` itself when it already has them (no `DNS` host: both empty).
fn publish(
    tx: &watch::Sender<Arc<Snapshot>>,
    raw: &Arc<Snapshot>,
    resolved: &BTreeMap<String, Vec<IpAddr>>,
) {
    let next = if raw.resolved_hosts == *resolved {
        Arc::clone(raw)
    } else {
        let mut with = (**raw).clone();
        with.resolved_hosts.clone_from(resolved);
        // Derived lookups are rebuilt on first use (they may hold the old addresses).
        with.index = Default::default();
        Arc::new(with)
    };
    tx.send_if_modified(|current| {
        if Arc::ptr_eq(current, &next) || **current == *next {
            return false;
        }
        *current = next;
        true
    });
}

/// The wait after the `failures`th failed lookup in a row: `retry_first`, doubled each
/// time, at most `retry_max`.
fn backoff(settings: &Settings, failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    settings
        .retry_first
        .saturating_mul(1 << doublings)
        .min(settings.retry_max)
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests;
