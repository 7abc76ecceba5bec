//! Circuit breaking: per backend Service, the limits of the connection pool its
//! `TrafficPolicy` sets (`state::traffic::ConnectionPool`): connections open, requests
//! waiting for one, requests and retries in flight. A request over a limit is refused at
//! once (`Error::Overflow`: 503, response flag `UO`); it never queues past the limits.
//! The retry budget (`state::traffic::RetryBudget`) limits retries in flight further, to a
//! share of the requests in flight: a retry over either is not made.
//!
//! The counters live as long as the waypoint (`Breakers`), so a policy change applies to
//! what is already open; the limits are the current snapshot's. Each counted thing holds a
//! `Permit`, which gives its place back when dropped (a closed connection wakes one
//! request waiting for a connection).

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
};

use tokio::sync::Notify;

use super::PerService;
use crate::{
    state::{
        Snapshot, WorkloadRef,
        traffic::{self, ConnectionPool, RetryBudget},
    },
    sync::Mutex,
};

/// The limits of each Service a `TrafficPolicy` gives some.
pub type LimitsByService = HashMap<WorkloadRef, Limits>;

/// What the policies of one Service limit (`None`: not limited).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    pub pool: Option<ConnectionPool>,
    pub retry_budget: Option<RetryBudget>,
}

/// The limits in force in `snapshot` (the oldest policy's, where several target a
/// Service).
pub fn limits(snapshot: &Snapshot) -> LimitsByService {
    let policies = &snapshot.traffic_policies;
    snapshot
        .services
        .keys()
        .filter_map(|service| {
            let limits = Limits {
                pool: traffic::connection_pool(policies, service).map(|(_, p)| *p),
                retry_budget: traffic::retry_budget(policies, service).map(|(_, b)| *b),
            };
            (limits != Limits::default()).then(|| (service.clone(), limits))
        })
        .collect()
}

/// Which limit refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Limit {
    /// `maxConnections` and `maxPendingRequests`: no connection, and no place to wait.
    Pending,
    /// `maxRequests`.
    Requests,
    /// `maxRetries` (the retry is not made; the request is not refused).
    Retries,
    /// `retryBudget` (the retry is not made; the request is not refused).
    RetryBudget,
}

impl Limit {
    /// The metric label and access-log detail.
    pub fn name(self) -> &'static str {
        match self {
            Limit::Pending => "pending_requests",
            Limit::Requests => "requests",
            Limit::Retries => "retries",
            Limit::RetryBudget => "retry_budget",
        }
    }
}

/// The breakers of every backend Service the waypoint has sent to.
#[derive(Default)]
pub struct Breakers {
    by_service: PerService<Breaker>,
}

impl Breakers {
    /// The breaker of `service`, with `limits` (the current policies').
    pub fn of(&self, service: &WorkloadRef, limits: Limits) -> Arc<Breaker> {
        let breaker = self
            .by_service
            .of(service, || Breaker::new(service.clone()));
        *breaker.limits.lock() = limits;
        breaker
    }

    /// Forgets the breakers of services that are gone and hold nothing.
    pub fn retain(&self, keep: impl Fn(&WorkloadRef) -> bool) {
        self.by_service.retain(keep);
    }
}

/// The counters of one backend Service.
pub struct Breaker {
    service: WorkloadRef,
    limits: Mutex<Limits>,
    connections: AtomicU32,
    pending: AtomicU32,
    requests: AtomicU32,
    retries: AtomicU32,
    /// Signalled when a connection closes or goes idle: one waiting request may use it.
    released: Notify,
}

/// What a permit counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Counted {
    Connection,
    Pending,
    Request,
    Retry,
}

/// A place under one of a breaker's limits, given back when dropped.
pub struct Permit {
    breaker: Arc<Breaker>,
    counted: Counted,
}

impl Breaker {
    fn new(service: WorkloadRef) -> Self {
        Self {
            service,
            limits: Mutex::new(Limits::default()),
            connections: AtomicU32::new(0),
            pending: AtomicU32::new(0),
            requests: AtomicU32::new(0),
            retries: AtomicU32::new(0),
            released: Notify::new(),
        }
    }

    /// The Service whose backends this breaker guards.
    pub fn service(&self) -> &WorkloadRef {
        &self.service
    }

    /// The current connection-pool limits (`None`: none).
    pub fn limits(&self) -> Option<ConnectionPool> {
        self.limits.lock().pool
    }

    /// A new connection, if `maxConnections` allows one now.
    pub fn try_connection(self: &Arc<Self>) -> Option<Permit> {
        let max = self.limits().and_then(|l| l.max_connections);
        self.take(Counted::Connection, max)
    }

    /// A place in the queue of requests waiting for a connection.
    pub fn try_pending(self: &Arc<Self>) -> Result<Permit, Limit> {
        let max = self.limits().map(|l| l.max_pending_requests);
        self.take(Counted::Pending, max).ok_or(Limit::Pending)
    }

    /// One more request in flight.
    pub fn try_request(self: &Arc<Self>) -> Result<Permit, Limit> {
        let max = self.limits().and_then(|l| l.max_requests);
        self.take(Counted::Request, max).ok_or(Limit::Requests)
    }

    /// One more retry in flight, under `maxRetries` and the retry budget. The budget's
    /// share is of the requests in flight now: tries being answered (the one that asks for
    /// this retry, if it has a response) and requests waiting for a connection.
    pub fn try_retry(self: &Arc<Self>) -> Result<Permit, Limit> {
        let limits = *self.limits.lock();
        let max_retries = limits.pool.and_then(|l| l.max_retries);
        let budget = limits.retry_budget.map(|budget| {
            let active = self
                .requests
                .load(Ordering::Acquire)
                .saturating_add(self.pending.load(Ordering::Acquire));
            budget.max_retries(active)
        });
        // The smaller limit is the one that refuses (the connection pool's on a tie).
        let (max, limit) = match (max_retries, budget) {
            (Some(max), Some(budget)) if budget < max => (Some(budget), Limit::RetryBudget),
            (None, Some(budget)) => (Some(budget), Limit::RetryBudget),
            (max, _) => (max, Limit::Retries),
        };
        self.take(Counted::Retry, max).ok_or(limit)
    }

    /// Requests one connection may carry.
    pub fn requests_per_connection(&self) -> Option<u32> {
        self.limits().and_then(|l| l.max_requests_per_connection)
    }

    /// Resolves once a connection was released after this call (see `Notify::notified`):
    /// enable it before checking for a free place, so no release is missed.
    pub fn released(&self) -> tokio::sync::futures::Notified<'_> {
        self.released.notified()
    }

    /// Signals one waiting request that a connection went idle (it may take or evict it).
    pub fn connection_idle(&self) {
        self.released.notify_one();
    }

    /// Connections open now.
    #[cfg(test)]
    fn open_connections(&self) -> u32 {
        self.connections.load(Ordering::Relaxed)
    }

    fn counter(&self, counted: Counted) -> &AtomicU32 {
        match counted {
            Counted::Connection => &self.connections,
            Counted::Pending => &self.pending,
            Counted::Request => &self.requests,
            Counted::Retry => &self.retries,
        }
    }

    fn take(self: &Arc<Self>, counted: Counted, max: Option<u32>) -> Option<Permit> {
        let max = max.unwrap_or(u32::MAX);
        self.counter(counted)
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        Some(Permit {
            breaker: Arc::clone(self),
            counted,
        })
    }
}

impl Permit {
    /// The breaker it counts against.
    pub fn breaker(&self) -> &Arc<Breaker> {
        &self.breaker
    }

    /// Whether this permit counts against `breaker`.
    pub fn is_of(&self, breaker: &Arc<Breaker>) -> bool {
        Arc::ptr_eq(&self.breaker, breaker)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.breaker
            .counter(self.counted)
            .fetch_sub(1, Ordering::AcqRel);
        if self.counted == Counted::Connection {
            self.breaker.released.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(max_connections: u32, max_pending_requests: u32) -> ConnectionPool {
        ConnectionPool {
            max_connections: Some(max_connections),
            max_pending_requests,
            max_requests: Some(3),
            max_retries: Some(0),
            ..ConnectionPool::default()
        }
    }

    fn limited(pool: ConnectionPool) -> Limits {
        Limits {
            pool: Some(pool),
            retry_budget: None,
        }
    }

    #[test]
    fn the_retry_budget_follows_the_requests_in_flight_and_the_smaller_limit_refuses() {
        let breakers = Breakers::default();
        let service = WorkloadRef::new("prod", "reviews");
        let budget = RetryBudget {
            percent: 20,
            min_retry_concurrency: 1,
        };
        let limits = Limits {
            pool: None,
            retry_budget: Some(budget),
        };
        let breaker = breakers.of(&service, limits);
        // No request in flight: the minimum.
        let first = breaker.try_retry().unwrap();
        assert_eq!(breaker.try_retry().err(), Some(Limit::RetryBudget));
        // 10 in flight: 20 % is 2.
        let requests: Vec<_> = (0..10).map(|_| breaker.try_request().unwrap()).collect();
        let second = breaker.try_retry().unwrap();
        assert_eq!(breaker.try_retry().err(), Some(Limit::RetryBudget));
        // Requests waiting for a connection count too: 15 in all, still 3 at most.
        let waiting: Vec<_> = (0..5).map(|_| breaker.try_pending().unwrap()).collect();
        let third = breaker.try_retry().unwrap();
        assert_eq!(breaker.try_retry().err(), Some(Limit::RetryBudget));
        // Fewer in flight: the retries already made stay, no new one until they end.
        drop((requests, waiting));
        assert_eq!(breaker.try_retry().err(), Some(Limit::RetryBudget));
        drop((first, second, third));
        // `maxRetries` is smaller than the budget: it refuses, and is the one counted.
        let breaker = breakers.of(
            &service,
            Limits {
                pool: Some(ConnectionPool {
                    max_retries: Some(0),
                    ..ConnectionPool::default()
                }),
                ..limits
            },
        );
        assert_eq!(breaker.try_retry().err(), Some(Limit::Retries));
    }

    #[test]
    fn each_limit_refuses_past_it_and_a_dropped_permit_gives_its_place_back() {
        let breakers = Breakers::default();
        let service = WorkloadRef::new("prod", "reviews");
        let breaker = breakers.of(&service, limited(pool(2, 1)));
        let connections = [breaker.try_connection(), breaker.try_connection()];
        assert!(connections.iter().all(Option::is_some));
        assert!(breaker.try_connection().is_none());
        let waiting = breaker.try_pending().unwrap();
        assert_eq!(breaker.try_pending().err(), Some(Limit::Pending));
        drop(waiting);
        assert!(breaker.try_pending().is_ok());
        let requests: Vec<_> = (0..3).map(|_| breaker.try_request().unwrap()).collect();
        assert_eq!(breaker.try_request().err(), Some(Limit::Requests));
        drop(requests);
        assert!(breaker.try_request().is_ok());
        assert_eq!(breaker.try_retry().err(), Some(Limit::Retries));
        drop(connections);
        assert_eq!(breaker.open_connections(), 0);
    }

    #[test]
    fn no_policy_is_no_limit_and_a_policy_change_applies_to_the_same_counters() {
        let breakers = Breakers::default();
        let service = WorkloadRef::new("prod", "reviews");
        let breaker = breakers.of(&service, Limits::default());
        let open: Vec<_> = (0..100)
            .map(|_| breaker.try_connection().unwrap())
            .collect();
        // Now limited to 10 while 100 are open: nothing more until 91 close.
        let breaker = breakers.of(&service, limited(pool(10, 0)));
        assert!(breaker.try_connection().is_none());
        drop(open);
        assert!(breaker.try_connection().is_some());
    }

    #[tokio::test]
    async fn a_closed_connection_wakes_a_waiting_request() {
        let breakers = Breakers::default();
        let breaker = breakers.of(&WorkloadRef::new("prod", "reviews"), limited(pool(1, 1)));
        let open = breaker.try_connection().unwrap();
        let waiter = {
            let breaker = Arc::clone(&breaker);
            tokio::spawn(async move {
                let released = breaker.released();
                tokio::pin!(released);
                released.as_mut().enable();
                if breaker.try_connection().is_none() {
                    released.await;
                }
                breaker.try_connection().is_some()
            })
        };
        tokio::task::yield_now().await;
        drop(open);
        assert!(waiter.await.unwrap());
    }
}
