//! Circuit breaking: per backend Service, the limits of the connection pool its
//! `TrafficPolicy` sets (`state::traffic::ConnectionPool`): connections open, requests
//! waiting for one, requests and retries in flight. A request over a limit is refused at
//! once (`Error::Overflow`: 503, response flag `UO`); it never queues past the limits.
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
        traffic::{self, ConnectionPool},
    },
    sync::Mutex,
};

/// The connection pool of each Service a `TrafficPolicy` gives one.
pub type Pools = HashMap<WorkloadRef, ConnectionPool>;

/// The pools in force in `snapshot` (the oldest policy's, where several target a Service).
pub fn pools(snapshot: &Snapshot) -> Pools {
    snapshot
        .services
        .keys()
        .filter_map(|service| {
            let (_, pool) = traffic::connection_pool(&snapshot.traffic_policies, service)?;
            Some((service.clone(), *pool))
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
}

impl Limit {
    /// The metric label and access-log detail.
    pub fn name(self) -> &'static str {
        match self {
            Limit::Pending => "pending_requests",
            Limit::Requests => "requests",
            Limit::Retries => "retries",
        }
    }
}

/// The breakers of every backend Service the waypoint has sent to.
#[derive(Default)]
pub struct Breakers {
    by_service: PerService<Breaker>,
}

impl Breakers {
    /// The breaker of `service`, with `limits` (the current policy's; `None`: no limits).
    pub fn of(&self, service: &WorkloadRef, limits: Option<ConnectionPool>) -> Arc<Breaker> {
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
    limits: Mutex<Option<ConnectionPool>>,
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
            limits: Mutex::new(None),
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

    /// The current limits (`None`: none).
    pub fn limits(&self) -> Option<ConnectionPool> {
        *self.limits.lock()
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

    /// One more retry in flight.
    pub fn try_retry(self: &Arc<Self>) -> Result<Permit, Limit> {
        let max = self.limits().and_then(|l| l.max_retries);
        self.take(Counted::Retry, max).ok_or(Limit::Retries)
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

    #[test]
    fn each_limit_refuses_past_it_and_a_dropped_permit_gives_its_place_back() {
        let breakers = Breakers::default();
        let service = WorkloadRef::new("prod", "reviews");
        let breaker = breakers.of(&service, Some(pool(2, 1)));
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
        let breaker = breakers.of(&service, None);
        let open: Vec<_> = (0..100)
            .map(|_| breaker.try_connection().unwrap())
            .collect();
        // Now limited to 10 while 100 are open: nothing more until 91 close.
        let breaker = breakers.of(&service, Some(pool(10, 0)));
        assert!(breaker.try_connection().is_none());
        drop(open);
        assert!(breaker.try_connection().is_some());
    }

    #[tokio::test]
    async fn a_closed_connection_wakes_a_waiting_request() {
        let breakers = Breakers::default();
        let breaker = breakers.of(&WorkloadRef::new("prod", "reviews"), Some(pool(1, 1)));
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
