//! Circuit breaking at L4: a TrafficPolicy's `connectionPool.maxConnections` for a Service
//! that is not bound to a waypoint caps the connections this node's pods have open to it.
//! A connection over the cap is reset at once, before anything is dialled, and closes with
//! `overflow` (response flag `UO`). The other `connectionPool` fields are HTTP ones: the
//! waypoint's. A bound Service's connections are the waypoint's to count (no double
//! counting).
//!
//! The limit is per node proxy, as Istio's is per client proxy: each node counts its own
//! pods' connections, so a Service may see up to `nodes × maxConnections` in all.
//!
//! Inputs: each snapshot's traffic policies (`update`, the conflict rule's winner per
//! Service) and each outbound connection to a Service (`acquire`). Outputs: permits, given
//! back when the proxied connection ends; `tcp_overflows_total`, `tcp_pool_connections`;
//! one warning per burst of refusals. Counts outlive snapshots: a policy change applies to
//! new connections, and a Service's entry goes once it has neither a limit nor an open
//! connection.

use std::{collections::HashMap, sync::Arc};

use tracing::{info, warn};

use crate::{
    state::{Snapshot, Target, WorkloadRef, traffic},
    sync::Mutex,
    telemetry::{TcpMetrics, metrics::PoolLabels},
};

/// The connection counts of the Services with a limit (or with connections open under a
/// limit that has gone).
#[derive(Debug)]
pub struct Breakers {
    services: Mutex<HashMap<WorkloadRef, Entry>>,
    metrics: TcpMetrics,
}

/// A connection's place under its Service's limit; given back on drop.
#[derive(Debug)]
pub struct Permit {
    breakers: Arc<Breakers>,
    service: WorkloadRef,
}

/// A refusal: the Service's limit is reached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Overflow {
    /// The TrafficPolicy the limit comes from.
    pub policy: WorkloadRef,
    pub max_connections: u32,
}

#[derive(Debug, Default)]
struct Entry {
    /// The limit in force and the policy it comes from; None: no policy any more (the
    /// entry stays while connections are open, so that a returning limit counts them).
    limit: Option<(WorkloadRef, u32)>,
    open: u32,
    /// Refusals since the last admission: the burst that was logged once.
    refused: u64,
}

impl Breakers {
    pub fn new(metrics: TcpMetrics) -> Arc<Self> {
        Arc::new(Self {
            services: Mutex::default(),
            metrics,
        })
    }

    /// Takes the limits of `snapshot`: the `maxConnections` in force (oldest policy wins)
    /// for each Service that exists and is bound to no waypoint. Open connections keep
    /// their places; the new limits apply to new connections.
    pub fn update(&self, snapshot: &Snapshot) {
        let mut limits: HashMap<WorkloadRef, (WorkloadRef, u32)> =
            traffic::by_target(&snapshot.traffic_policies, |p| p.connection_pool.as_ref())
                .into_iter()
                .filter_map(|(target, (policy, pool))| {
                    let Target::Service(service) = target else {
                        return None;
                    };
                    let unbound = snapshot
                        .services
                        .get(&service)
                        .is_some_and(|s| s.waypoint.is_none());
                    let max = pool.max_connections.filter(|_| unbound)?;
                    Some((service, (policy, max)))
                })
                .collect();
        let mut services = self.services.lock();
        services.retain(|service, entry| {
            entry.limit = limits.remove(service);
            let keep = entry.limit.is_some() || entry.open > 0;
            if !keep {
                self.metrics.pool_connections(&labels(service), None);
            }
            keep
        });
        for (service, limit) in limits {
            self.metrics.pool_connections(&labels(&service), Some(0));
            services.insert(
                service,
                Entry {
                    limit: Some(limit),
                    ..Entry::default()
                },
            );
        }
    }

    /// A place for a new connection to `service`: `None` when nothing limits it, an
    /// `Overflow` (counted, and logged once per burst) when its limit is reached.
    pub fn acquire(self: &Arc<Self>, service: &WorkloadRef) -> Result<Option<Permit>, Overflow> {
        let mut services = self.services.lock();
        let Some(entry) = services.get_mut(service) else {
            return Ok(None);
        };
        if let Some((policy, max)) = &entry.limit
            && entry.open >= *max
        {
            entry.refused += 1;
            self.metrics.overflow(&labels(service));
            if entry.refused == 1 {
                crate::warn_limited!(component = "proxy", service = %service, policy = %policy,
                    max_connections = max, "connections refused: the service's connection pool \
                    is full on this node (TrafficPolicy connectionPool.maxConnections); \
                    counted in tcp_overflows_total, logged once per burst");
            }
            return Err(Overflow {
                policy: policy.clone(),
                max_connections: *max,
            });
        }
        if entry.refused > 0 {
            crate::info_limited!(component = "proxy", service = %service,
                refused = entry.refused, "connection pool has room again: burst of refusals over");
            entry.refused = 0;
        }
        entry.open += 1;
        self.metrics
            .pool_connections(&labels(service), Some(entry.open));
        Ok(Some(Permit {
            breakers: Arc::clone(self),
            service: service.clone(),
        }))
    }

    /// Connections open to `service` under a limit (None: not tracked).
    #[cfg(test)]
    fn open(&self, service: &WorkloadRef) -> Option<u32> {
        self.services.lock().get(service).map(|e| e.open)
    }

    fn release(&self, service: &WorkloadRef) {
        let mut services = self.services.lock();
        let Some(entry) = services.get_mut(service) else {
            // Every permit's entry lives until its count is 0.
            warn!(component = "proxy", service = %service, "BUG: a connection-pool permit without its entry");
            return;
        };
        entry.open = entry.open.saturating_sub(1);
        if entry.limit.is_none() && entry.open == 0 {
            services.remove(service);
            self.metrics.pool_connections(&labels(service), None);
            info!(component = "proxy", service = %service, "connection pool no longer tracked: no limit, no connection");
        } else {
            self.metrics
                .pool_connections(&labels(service), Some(entry.open));
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.breakers.release(&self.service);
    }
}

fn labels(service: &WorkloadRef) -> PoolLabels {
    PoolLabels {
        destination_service_name: service.name.clone(),
        destination_service_namespace: service.namespace.clone(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::{
        state::{ConnectionPool, Service, TrafficPolicy},
        telemetry::Registry,
    };

    fn service(name: &str, waypoint: Option<&str>) -> Service {
        Service {
            name: WorkloadRef::new("prod", name),
            vips: Vec::new(),
            ports: Vec::new(),
            endpoints: Vec::new(),
            waypoint: waypoint.map(Into::into),
            traffic_distribution: None,
        }
    }

    fn pool(name: &str, target: &str, max_connections: Option<u32>) -> TrafficPolicy {
        TrafficPolicy {
            connection_pool: Some(ConnectionPool {
                max_connections,
                max_pending_requests: 7,
                max_requests: Some(1),
                ..ConnectionPool::default()
            }),
            ..TrafficPolicy::new(
                WorkloadRef::new("prod", name),
                vec![Target::Service(WorkloadRef::new("prod", target))],
            )
        }
    }

    fn snapshot(policies: Vec<TrafficPolicy>) -> Snapshot {
        let services = [
            service("reviews", None),
            service("ratings", None),
            service("bound", Some("wp")),
        ];
        Snapshot {
            services: services
                .into_iter()
                .map(|s| (s.name.clone(), s))
                .collect::<BTreeMap<_, _>>(),
            traffic_policies: policies,
            ..Snapshot::default()
        }
    }

    fn breakers() -> (Arc<Breakers>, Registry) {
        let mut registry = Registry::default();
        let metrics = TcpMetrics::new(&mut registry);
        (Breakers::new(metrics), registry)
    }

    fn reviews() -> WorkloadRef {
        WorkloadRef::new("prod", "reviews")
    }

    fn metric(registry: &Registry, line_start: &str) -> Option<String> {
        let text = registry.encode().unwrap();
        text.lines()
            .find(|l| l.starts_with(line_start))
            .map(|l| l.rsplit(' ').next().unwrap_or_default().to_owned())
    }

    #[test]
    fn the_limit_refuses_the_connection_over_it_and_a_drop_gives_the_place_back() {
        let (b, registry) = breakers();
        b.update(&snapshot(vec![pool("p", "reviews", Some(2))]));
        let first = b.acquire(&reviews()).unwrap().unwrap();
        let _second = b.acquire(&reviews()).unwrap().unwrap();
        let over = b.acquire(&reviews()).unwrap_err();
        assert_eq!(
            over,
            Overflow {
                policy: WorkloadRef::new("prod", "p"),
                max_connections: 2
            }
        );
        assert!(b.acquire(&reviews()).is_err());
        drop(first);
        assert_eq!(b.open(&reviews()), Some(1));
        let _third = b.acquire(&reviews()).unwrap().unwrap();
        assert_eq!(
            metric(
                &registry,
                "weft_tcp_overflows_total{destination_service_name=\"reviews\""
            )
            .as_deref(),
            Some("2")
        );
        assert_eq!(
            metric(
                &registry,
                "weft_tcp_pool_connections{destination_service_name=\"reviews\""
            )
            .as_deref(),
            Some("2")
        );
    }

    #[test]
    fn unlimited_bound_and_unknown_services_are_not_counted() {
        let (b, _registry) = breakers();
        b.update(&snapshot(vec![
            pool("no-max", "reviews", None),
            pool("bound", "bound", Some(1)),
            pool("ghost", "ghost", Some(1)),
        ]));
        for name in ["reviews", "bound", "ghost", "ratings"] {
            let service = WorkloadRef::new("prod", name);
            for _ in 0..3 {
                assert!(b.acquire(&service).unwrap().is_none(), "{name}");
            }
            assert_eq!(b.open(&service), None, "{name}");
        }
    }

    #[test]
    fn the_oldest_policy_sets_the_limit() {
        let (b, _registry) = breakers();
        b.update(&snapshot(vec![
            pool("old", "reviews", Some(1)),
            pool("young", "reviews", Some(5)),
        ]));
        let _one = b.acquire(&reviews()).unwrap().unwrap();
        assert_eq!(b.acquire(&reviews()).unwrap_err().policy.name, "old");
    }

    #[test]
    fn a_policy_change_applies_to_new_connections_and_counts_survive_it() {
        let (b, _registry) = breakers();
        b.update(&snapshot(vec![pool("p", "reviews", Some(3))]));
        let held: Vec<_> = (0..3)
            .map(|_| b.acquire(&reviews()).unwrap().unwrap())
            .collect();
        // Lowered under what is open: nothing is closed, nothing new admitted.
        b.update(&snapshot(vec![pool("p", "reviews", Some(1))]));
        assert_eq!(b.open(&reviews()), Some(3));
        assert!(b.acquire(&reviews()).is_err());
        // Removed: not limited, but the open ones are still counted…
        b.update(&snapshot(Vec::new()));
        assert_eq!(b.open(&reviews()), Some(3));
        let extra = b.acquire(&reviews()).unwrap().unwrap();
        // …so a limit that comes back knows them.
        b.update(&snapshot(vec![pool("p", "reviews", Some(4))]));
        assert!(b.acquire(&reviews()).is_err());
        drop(extra);
        let _again = b.acquire(&reviews()).unwrap().unwrap();
        drop(held);
        assert_eq!(b.open(&reviews()), Some(1));
    }

    #[test]
    fn a_service_without_limit_or_connection_is_forgotten() {
        let (b, registry) = breakers();
        b.update(&snapshot(vec![
            pool("a", "reviews", Some(2)),
            pool("b", "ratings", Some(2)),
        ]));
        let held = b.acquire(&reviews()).unwrap().unwrap();
        b.update(&snapshot(Vec::new()));
        // No connection: gone at once, its series too.
        let ratings = WorkloadRef::new("prod", "ratings");
        assert_eq!(b.open(&ratings), None);
        assert_eq!(
            metric(
                &registry,
                "weft_tcp_pool_connections{destination_service_name=\"ratings\""
            ),
            None
        );
        // One open: gone when it closes.
        assert_eq!(b.open(&reviews()), Some(1));
        drop(held);
        assert_eq!(b.open(&reviews()), None);
        assert!(b.services.lock().is_empty());
        assert_eq!(
            metric(
                &registry,
                "weft_tcp_pool_connections{destination_service_name=\"reviews\""
            ),
            None
        );
        // A binding to a waypoint takes the Service out too.
        let mut bound = snapshot(vec![pool("a", "reviews", Some(2))]);
        b.update(&bound);
        assert_eq!(b.open(&reviews()), Some(0));
        if let Some(s) = bound.services.get_mut(&reviews()) {
            s.waypoint = Some("wp".into());
        }
        b.update(&bound);
        assert_eq!(b.open(&reviews()), None);
    }

    #[test]
    fn many_opens_and_closes_from_many_threads_leave_nothing_held() {
        let (b, _registry) = breakers();
        b.update(&snapshot(vec![pool("p", "reviews", Some(4))]));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let b = Arc::clone(&b);
                std::thread::spawn(move || {
                    let (mut admitted, mut refused) = (0, 0);
                    for _ in 0..2_000 {
                        match b.acquire(&reviews()) {
                            Ok(Some(permit)) => {
                                admitted += 1;
                                assert!(b.open(&reviews()).unwrap() <= 4);
                                drop(permit);
                            }
                            Ok(None) => unreachable!("limited"),
                            Err(_) => refused += 1,
                        }
                    }
                    (admitted, refused)
                })
            })
            .collect();
        let admitted: u32 = threads.into_iter().map(|t| t.join().unwrap().0).sum();
        assert!(admitted > 0);
        assert_eq!(b.open(&reviews()), Some(0));
    }
}
