//! What the waypoint knows of each endpoint of each backend Service: requests in flight
//! (for `LEAST_REQUEST`), errors in a row and this interval's success rate, ejection (for
//! `outlierDetection`); and per Service the round-robin turn. It lives as long as the
//! waypoint (`Hosts`), so a policy change applies to what was learnt; a Service that is
//! gone is forgotten (`Hosts::retain`), an endpoint that left its Service too.
//!
//! Outlier detection is Envoy's, as Istio configures it:
//! - an endpoint is **ejected** after `consecutive5xxErrors` 5xx answers in a row, or
//!   `consecutiveGatewayErrors` 502/503/504 answers in a row (a connection failure or a
//!   per-try timeout counts as both), or when success-rate detection finds it far below
//!   its peers at the end of an `interval`;
//! - for `baseEjectionTime` × the times it was ejected (at most 300 s, or
//!   `baseEjectionTime` if that is longer); after an interval back in service, each
//!   interval takes one off that multiplier;
//! - never more than `maxEjectionPercent` of the Service's endpoints at once, except that
//!   one may always be;
//! - it **returns** when its time is up (seen at the next pick).
//!
//! Nothing here does I/O or reads a clock: time comes in as an argument, ejections and
//! returns go out as `Event`s for the caller to log and count.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;

use super::{PerService, backend::Candidate};
use crate::{
    state::{
        Snapshot, WorkloadRef,
        traffic::{self, LoadBalancer, OutlierDetection, SuccessRate},
    },
    sync::Mutex,
};

/// How the endpoints of one Service are chosen, from its policies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Balancing {
    pub load_balancer: LoadBalancer,
    pub outlier: Option<OutlierDetection>,
}

/// The balancing of each Service a `TrafficPolicy` gives one; the others have
/// `DEFAULT_BALANCING`.
pub type Balancings = HashMap<WorkloadRef, Balancing>;

/// What a Service without a policy gets: `LEAST_REQUEST` (Istio's default), no ejection.
pub static DEFAULT_BALANCING: Balancing = Balancing {
    load_balancer: LoadBalancer::LeastRequest,
    outlier: None,
};

/// The balancings in force in `snapshot` (each feature the oldest policy's).
pub fn balancings(snapshot: &Snapshot) -> Balancings {
    let policies = &snapshot.traffic_policies;
    snapshot
        .services
        .keys()
        .filter_map(|service| {
            let load_balancer =
                traffic::for_service(policies, service, |p| p.load_balancer.as_ref())
                    .map(|(_, lb)| lb);
            let outlier = traffic::for_service(policies, service, |p| p.outlier_detection.as_ref())
                .map(|(_, o)| *o);
            if load_balancer.is_none() && outlier.is_none() {
                return None;
            }
            let load_balancer = load_balancer.unwrap_or(&DEFAULT_BALANCING.load_balancer);
            let balancing = Balancing {
                load_balancer: load_balancer.clone(),
                outlier,
            };
            Some((service.clone(), balancing))
        })
        .collect()
}

/// The endpoints of every backend Service the waypoint has sent to.
#[derive(Default)]
pub struct Hosts {
    by_service: PerService<ServiceHosts>,
}

impl Hosts {
    /// The endpoints of `service`.
    pub fn of(&self, service: &WorkloadRef) -> Arc<ServiceHosts> {
        self.by_service
            .of(service, || ServiceHosts::new(service.clone()))
    }

    /// Forgets the Services that are gone and hold nothing.
    pub fn retain(&self, keep: impl Fn(&WorkloadRef) -> bool) {
        self.by_service.retain(keep);
    }
}

/// The endpoints of one Service.
pub struct ServiceHosts {
    service: WorkloadRef,
    turn: AtomicU64,
    table: Mutex<Table>,
}

/// What one answer (or failure) of an endpoint says about its health.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// An answer below 500.
    Success,
    /// A 5xx answer; `gateway` for 502, 503 and 504.
    ServerError { gateway: bool },
    /// No answer: the connection failed, or the per-try timeout passed. Envoy counts it
    /// as a 5xx and a gateway error (its `split_external_local_origin_errors` off).
    LocalError,
}

/// An ejection or a return, to be logged and counted once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Ejected {
        endpoint: IpAddr,
        /// Times ejected (the multiplier of this ejection).
        ejections: u32,
        duration: Duration,
        /// `consecutive_5xx`, `consecutive_gateway_errors` or `success_rate`.
        reason: &'static str,
        /// Endpoints of the Service ejected now, this one included.
        ejected: usize,
    },
    Returned {
        endpoint: IpAddr,
        ejections: u32,
        /// How long it was out.
        after: Duration,
        ejected: usize,
    },
}

/// An endpoint's place among the requests in flight to it, given back when dropped.
pub struct InFlight {
    hosts: Arc<ServiceHosts>,
    endpoint: IpAddr,
}

impl ServiceHosts {
    fn new(service: WorkloadRef) -> Self {
        Self {
            service,
            turn: AtomicU64::new(0),
            table: Mutex::new(Table::default()),
        }
    }

    /// The Service.
    pub fn service(&self) -> &WorkloadRef {
        &self.service
    }

    /// The next round-robin turn.
    pub fn next_turn(&self) -> u64 {
        self.turn.fetch_add(1, Ordering::Relaxed)
    }

    /// `endpoints` as a pick sees them (`local`: on the waypoint's node). First, the
    /// ejections that are over end (all of them, without `outlier`), success rates are
    /// judged if an interval has passed, and endpoints that left are forgotten.
    pub fn candidates(
        &self,
        endpoints: &[IpAddr],
        outlier: Option<&OutlierDetection>,
        now: Instant,
        local: impl Fn(IpAddr) -> bool,
    ) -> (Vec<Candidate>, Vec<Event>) {
        let mut table = self.table.lock();
        let mut events = table.return_due(outlier, now);
        if let Some(outlier) = outlier {
            match table.next_sweep {
                Some(at) if at > now => {}
                Some(_) => {
                    events.extend(table.sweep(outlier, endpoints.len(), now));
                    table.next_sweep = Some(now + outlier.interval);
                }
                None => table.next_sweep = Some(now + outlier.interval),
            }
        }
        if table.hosts.len() > endpoints.len() {
            table.hosts.retain(|ip, host| {
                endpoints.contains(ip) || host.in_flight > 0 || host.ejection.is_some()
            });
        }
        let candidates = endpoints
            .iter()
            .map(|ip| {
                let host = table.hosts.entry(*ip).or_default();
                Candidate {
                    ip: *ip,
                    in_flight: host.in_flight,
                    ejected: host.ejection.is_some(),
                    local: local(*ip),
                }
            })
            .collect();
        (candidates, events)
    }

    /// Counts a request in flight to `endpoint` until the guard is dropped.
    pub fn start(self: &Arc<Self>, endpoint: IpAddr) -> InFlight {
        let mut table = self.table.lock();
        let host = table.hosts.entry(endpoint).or_default();
        host.in_flight = host.in_flight.saturating_add(1);
        InFlight {
            hosts: Arc::clone(self),
            endpoint,
        }
    }

    /// Learns from one answer of `endpoint` (one of `endpoints` of the Service); an ejection
    /// it causes comes back.
    pub fn record(
        &self,
        endpoint: IpAddr,
        outcome: Outcome,
        outlier: Option<&OutlierDetection>,
        endpoints: usize,
        now: Instant,
    ) -> Option<Event> {
        let outlier = outlier?;
        let mut table = self.table.lock();
        let ejected = table.ejected();
        let host = table.hosts.entry(endpoint).or_default();
        // Answers to requests sent before the ejection say nothing new.
        if host.ejection.is_some() {
            return None;
        }
        let reason = host.learn(outcome, outlier)?;
        if !may_eject(ejected, endpoints, outlier.max_ejection_percent) {
            return None;
        }
        let (ejections, duration) = host.eject(outlier.base_ejection_time, now);
        Some(Event::Ejected {
            endpoint,
            ejections,
            duration,
            reason,
            ejected: ejected + 1,
        })
    }

    /// Endpoints ejected now.
    #[cfg(test)]
    fn ejected(&self) -> usize {
        self.table.lock().ejected()
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut table = self.hosts.table.lock();
        if let Some(host) = table.hosts.get_mut(&self.endpoint) {
            host.in_flight = host.in_flight.saturating_sub(1);
        }
    }
}

/// How long the `ejections`th ejection lasts: `base` × `ejections`, at most 300 s (Envoy's
/// `max_ejection_time`) unless `base` itself is longer.
pub fn ejection_time(base: Duration, ejections: u32) -> Duration {
    base.saturating_mul(ejections.max(1))
        .min(base.max(MAX_EJECTION_TIME))
}

/// Whether one more of `endpoints` may be ejected while `ejected` are: if that keeps the
/// ejected at or below `max_percent`, or none is ejected yet (Envoy ejects one always).
pub fn may_eject(ejected: usize, endpoints: usize, max_percent: u32) -> bool {
    let max_percent = usize::try_from(max_percent).unwrap_or(usize::MAX);
    ejected == 0 || (ejected + 1).saturating_mul(100) <= endpoints.saturating_mul(max_percent)
}

/// Envoy's success-rate outliers among `(requests, successes)` of an interval: of the
/// endpoints with at least `request_volume` requests, if there are at least
/// `minimum_hosts`, those whose success rate is below `mean - stdev_factor/1000 × stdev`.
/// Returns their indexes.
pub fn success_rate_outliers(stats: &[(u32, u32)], rule: &SuccessRate) -> Vec<usize> {
    let judged: Vec<(usize, f64)> = stats
        .iter()
        .enumerate()
        .filter(|(_, (requests, _))| *requests > 0 && *requests >= rule.request_volume)
        .map(|(i, (requests, successes))| (i, f64::from(*successes) / f64::from(*requests)))
        .collect();
    if judged.is_empty() || judged.len() < usize::try_from(rule.minimum_hosts).unwrap_or(0) {
        return Vec::new();
    }
    // At most a few hundred endpoints: the count is exact in an f64.
    let n = judged.len() as f64;
    let mean = judged.iter().map(|(_, rate)| rate).sum::<f64>() / n;
    let variance = judged
        .iter()
        .map(|(_, rate)| (rate - mean).powi(2))
        .sum::<f64>()
        / n;
    let threshold = mean - f64::from(rule.stdev_factor) / 1000.0 * variance.sqrt();
    judged
        .into_iter()
        .filter(|(_, rate)| *rate < threshold)
        .map(|(i, _)| i)
        .collect()
}

#[derive(Default)]
struct Table {
    hosts: HashMap<IpAddr, Host>,
    /// When success rates are next judged (and multipliers decay).
    next_sweep: Option<Instant>,
}

#[derive(Default)]
struct Host {
    in_flight: u32,
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    /// This interval's answers, and those below 500.
    requests: u32,
    successes: u32,
    /// The multiplier of the next ejection, less one: times ejected, decaying.
    ejections: u32,
    ejection: Option<Ejection>,
    /// When it last came back from an ejection.
    returned: Option<Instant>,
}

#[derive(Clone, Copy)]
struct Ejection {
    since: Instant,
    until: Instant,
}

impl Table {
    fn ejected(&self) -> usize {
        self.hosts.values().filter(|h| h.ejection.is_some()).count()
    }

    /// Ends the ejections that are over (every one, without `outlier`).
    fn return_due(&mut self, outlier: Option<&OutlierDetection>, now: Instant) -> Vec<Event> {
        let due: Vec<IpAddr> = self
            .hosts
            .iter()
            .filter(|(_, h)| {
                h.ejection
                    .is_some_and(|e| outlier.is_none() || e.until <= now)
            })
            .map(|(ip, _)| *ip)
            .collect();
        let mut events = Vec::new();
        for ip in due {
            let ejected = self.ejected() - 1;
            let Some(host) = self.hosts.get_mut(&ip) else {
                continue;
            };
            let Some(ejection) = host.ejection.take() else {
                continue;
            };
            host.returned = Some(now);
            events.push(Event::Returned {
                endpoint: ip,
                ejections: host.ejections,
                after: now.saturating_duration_since(ejection.since),
                ejected,
            });
        }
        events
    }

    /// The end of an interval: success rates judged (and reset), multipliers decayed.
    fn sweep(&mut self, outlier: &OutlierDetection, endpoints: usize, now: Instant) -> Vec<Event> {
        let mut events = Vec::new();
        if let Some(rule) = &outlier.success_rate {
            let in_service: Vec<IpAddr> = self
                .hosts
                .iter()
                .filter(|(_, h)| h.ejection.is_none())
                .map(|(ip, _)| *ip)
                .collect();
            let stats: Vec<(u32, u32)> = in_service
                .iter()
                .map(|ip| {
                    self.hosts
                        .get(ip)
                        .map_or((0, 0), |h| (h.requests, h.successes))
                })
                .collect();
            for i in success_rate_outliers(&stats, rule) {
                let ejected = self.ejected();
                if !may_eject(ejected, endpoints, outlier.max_ejection_percent) {
                    break;
                }
                let Some(host) = self.hosts.get_mut(&in_service[i]) else {
                    continue;
                };
                let (ejections, duration) = host.eject(outlier.base_ejection_time, now);
                events.push(Event::Ejected {
                    endpoint: in_service[i],
                    ejections,
                    duration,
                    reason: "success_rate",
                    ejected: ejected + 1,
                });
            }
        }
        for host in self.hosts.values_mut() {
            host.requests = 0;
            host.successes = 0;
            let settled = host
                .returned
                .is_some_and(|r| now.saturating_duration_since(r) >= outlier.interval);
            if host.ejection.is_none() && settled {
                host.ejections = host.ejections.saturating_sub(1);
            }
        }
        events
    }
}

impl Host {
    /// Counts `outcome`; the reason to eject, if it is one.
    fn learn(&mut self, outcome: Outcome, outlier: &OutlierDetection) -> Option<&'static str> {
        self.requests = self.requests.saturating_add(1);
        let (server, gateway) = match outcome {
            Outcome::Success => {
                self.successes = self.successes.saturating_add(1);
                (false, false)
            }
            Outcome::ServerError { gateway } => (true, gateway),
            Outcome::LocalError => (true, true),
        };
        self.consecutive_5xx = if server { self.consecutive_5xx + 1 } else { 0 };
        self.consecutive_gateway = if gateway {
            self.consecutive_gateway + 1
        } else {
            0
        };
        let reached = |count: u32, limit: u32| limit > 0 && count >= limit;
        let reason = if reached(self.consecutive_5xx, outlier.consecutive_5xx_errors) {
            "consecutive_5xx"
        } else if reached(self.consecutive_gateway, outlier.consecutive_gateway_errors) {
            "consecutive_gateway_errors"
        } else {
            return None;
        };
        // Counted again from 0, whether the cap lets the ejection happen or not (Envoy).
        self.consecutive_5xx = 0;
        self.consecutive_gateway = 0;
        Some(reason)
    }

    /// Ejects it from `now`: its multiplier and the ejection's length.
    fn eject(&mut self, base: Duration, now: Instant) -> (u32, Duration) {
        self.ejections = self.ejections.saturating_add(1);
        let duration = ejection_time(base, self.ejections);
        self.ejection = Some(Ejection {
            since: now,
            until: now + duration,
        });
        self.consecutive_5xx = 0;
        self.consecutive_gateway = 0;
        (self.ejections, duration)
    }
}

/// Envoy's default `max_ejection_time`.
const MAX_EJECTION_TIME: Duration = Duration::from_secs(300);

#[cfg(test)]
mod tests;
