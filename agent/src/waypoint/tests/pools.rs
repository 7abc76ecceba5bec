//! Connection pools and circuit breaking (`TrafficPolicy` `connectionPool`): the queue of
//! requests waiting for a connection, closing an idle connection for another endpoint,
//! and the limit of multiplexed requests.

use super::*;
use crate::state::{ConnectionPool, Target, TrafficPolicy};

impl Harness {
    /// Gives the `echo` service the connection pool `pool`.
    fn set_pool(&self, pool: ConnectionPool) {
        self.update(|s| {
            s.traffic_policies = vec![TrafficPolicy {
                name: svc("echo-pool"),
                targets: vec![Target::Service(svc(SERVICE))],
                connection_pool: Some(pool),
                fault: None,
                rate_limit: None,
                retry: None,
                retry_budget: None,
            }];
        });
    }
}

/// Sends `n` concurrent requests that the backend holds for `hold_ms`, each on a client
/// of its own (`clients`), and returns their statuses, sorted.
async fn concurrent(clients: &[Client], hold_ms: &str) -> Vec<StatusCode> {
    let mut calls = JoinSet::new();
    for client in clients {
        let client = client.clone();
        let hold_ms = hold_ms.to_owned();
        calls.spawn(async move {
            client
                .call("GET", "/held", &[("x-delay-ms", &hold_ms)])
                .await
                .status
        });
    }
    let mut statuses: Vec<_> = calls.join_all().await;
    statuses.sort();
    statuses
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_requests_get_the_released_connection_and_one_past_the_queue_is_refused() {
    let h = Harness::new(&["a"]).await;
    h.set_pool(ConnectionPool {
        max_connections: Some(1),
        max_pending_requests: 2,
        ..ConnectionPool::default()
    });
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(h.h1().await);
    }
    let statuses = concurrent(&clients, "300").await;
    assert_eq!(
        statuses,
        [
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::SERVICE_UNAVAILABLE
        ],
        "one sent, two waited for its connection, one refused"
    );
    let backend = h.backend("a");
    assert_eq!(backend.count.load(Ordering::SeqCst), 3);
    assert_eq!(
        backend.connects.load(Ordering::SeqCst),
        1,
        "the waiting requests took turns on the one connection"
    );
    let refused: Vec<_> = h
        .access_log()
        .into_iter()
        .filter(|l| l["response_flags"] == "UO")
        .collect();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0]["error"], "overflow");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_to_another_endpoint_closes_an_idle_connection_instead_of_waiting() {
    let h = Harness::new(&["a", "b"]).await;
    let ips = vec![h.backend("a").ip, h.backend("b").ip];
    h.update(|s| s.services.get_mut(&svc(SERVICE)).unwrap().endpoints = ips);
    // No queue: a request that found neither a connection nor a place would be refused.
    h.set_pool(ConnectionPool {
        max_connections: Some(1),
        max_pending_requests: 0,
        ..ConnectionPool::default()
    });
    let client = h.h1().await;
    for _ in 0..20 {
        assert_eq!(client.get("/").await.status, StatusCode::OK);
    }
    let (a, b) = (h.backend("a"), h.backend("b"));
    let sent = [&a.count, &b.count].map(|c| c.load(Ordering::SeqCst));
    let opened = [&a.connects, &b.connects].map(|c| c.load(Ordering::SeqCst));
    assert!(
        sent.iter().all(|&n| n > 0),
        "both endpoints served: {sent:?}"
    );
    // Each switch of endpoint closed the idle connection to the other and opened one.
    assert!(
        opened.iter().sum::<u64>() >= 2,
        "connections opened: {opened:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multiplexed_requests_past_max_requests_are_refused() {
    let h = Harness::new(&["a"]).await;
    h.set_pool(ConnectionPool {
        max_requests: Some(2),
        ..ConnectionPool::default()
    });
    let client = h.h2().await;
    let clients = [client.clone(), client.clone(), client];
    let statuses = concurrent(&clients, "300").await;
    assert_eq!(
        statuses,
        [
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::SERVICE_UNAVAILABLE
        ]
    );
    let text = h.registry.encode().unwrap();
    let overflow = text
        .lines()
        .find(|l| l.starts_with("weft_waypoint_overflows_total{"))
        .unwrap();
    assert!(
        overflow.contains("limit=\"requests\"") && overflow.ends_with(" 1"),
        "{overflow}"
    );
    // Once they are answered, the limit has room again.
    assert_eq!(h.h2().await.get("/").await.status, StatusCode::OK);
}
