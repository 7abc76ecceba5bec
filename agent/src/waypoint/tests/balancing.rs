//! Outlier detection and load balancing (`TrafficPolicy` `outlierDetection`,
//! `loadBalancer`) against real HBONE backends: an endpoint whose node refuses connections
//! is ejected after its errors in a row, and its Service's gauge goes with the Service.

use super::*;
use crate::state::{
    Target, TrafficPolicy,
    traffic::{LoadBalancer, OutlierDetection},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_cannot_be_reached_is_ejected_and_its_gauge_goes_with_its_service() {
    let h = Harness::new(&["alive"]).await;
    let alive = h.backend("alive").ip;
    // An endpoint whose address nothing listens on: every connection to it is refused.
    let dead = match alive {
        IpAddr::V4(v4) => IpAddr::from([v4.octets()[0], v4.octets()[1], v4.octets()[2], 250]),
        IpAddr::V6(_) => unreachable!("the harness's backends are on IPv4 loopback"),
    };
    h.update(|s| {
        let mut workload = s.workloads[&svc("alive")].clone();
        workload.name = svc("dead");
        workload.ips = vec![dead];
        s.workloads.insert(svc("dead"), workload);
        if let Some(echo) = s.services.get_mut(&svc(SERVICE)) {
            echo.endpoints = vec![alive, dead];
        }
        let targets = vec![Target::Service(svc(SERVICE))];
        s.traffic_policies = vec![TrafficPolicy {
            outlier_detection: Some(OutlierDetection {
                consecutive_5xx_errors: 2,
                consecutive_gateway_errors: 0,
                success_rate: None,
                interval: Duration::from_secs(10),
                base_ejection_time: Duration::from_secs(60),
                max_ejection_percent: 50,
            }),
            load_balancer: Some(LoadBalancer::RoundRobin),
            ..TrafficPolicy::new(svc("echo-health"), targets)
        }];
    });
    let client = h.h1().await;
    let mut statuses = Vec::new();
    for _ in 0..10 {
        statuses.push(client.get("/").await.status.as_u16());
    }
    // Round robin: the dead endpoint's first two turns fail, then it gets no more.
    let failed = statuses.iter().filter(|s| **s != 200).count();
    assert_eq!(failed, 2, "{statuses:?}");
    assert_eq!(h.backend("alive").count.load(Ordering::SeqCst), 8);
    let metrics = h.registry.encode().unwrap();
    let gauge = "weft_waypoint_outlier_ejected_endpoints{destination_service_name=\"echo\"";
    assert!(
        metrics.contains(&format!(
            "{gauge},destination_service_namespace=\"default\"}} 1"
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains("weft_waypoint_outlier_ejections_total{"),
        "{metrics}"
    );

    // The Service goes: so does its gauge, once the waypoint sees the new snapshot.
    h.update(|s| {
        s.services.remove(&svc(SERVICE));
    });
    let _ = client.get("/").await;
    let metrics = h.registry.encode().unwrap();
    assert!(!metrics.contains(gauge), "{metrics}");
}
