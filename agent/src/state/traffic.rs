//! Traffic policies: how a waypoint treats the backends of a Service (connection pools and
//! circuit breaking so far), attached to the Service by Gateway API policy attachment
//! (`targetRefs`). Validated by `source::traffic`; enforced by the waypoint.

use serde::Serialize;

use super::WorkloadRef;

/// One `TrafficPolicy`, valid as a whole.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicy {
    /// Namespace and name of the policy object.
    pub name: WorkloadRef,
    /// The Services it attaches to (in the policy's namespace).
    pub targets: Vec<WorkloadRef>,
    /// Limits of the waypoint's connections and requests to each target's endpoints.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPool>,
}

/// Limits of what a waypoint sends to one Service, all its endpoints together (Istio's
/// `DestinationRule` `trafficPolicy.connectionPool`). A request over a limit is answered
/// 503 at once, with response flag `UO`. An absent limit is no limit, except for the
/// queue of requests waiting for a connection, which always has one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionPool {
    /// HTTP connections open to the service's endpoints, idle or busy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Requests waiting for a connection while `max_connections` are open and busy.
    pub max_pending_requests: u32,
    /// Requests in flight to the service at once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
    /// Requests one connection carries before it is closed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_requests_per_connection: Option<u32>,
    /// Retries in flight to the service at once; a retry over it is not made.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
}

/// Requests that may wait for a connection when a policy sets `maxConnections` but not
/// `maxPendingRequests`: a queue without a limit is memory an overloaded backend hands to
/// its clients.
pub const DEFAULT_MAX_PENDING_REQUESTS: u32 = 1024;

/// A policy that lost a conflict: another, older one sets the same feature for the same
/// target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    /// The losing policy.
    pub policy: WorkloadRef,
    /// The target both attach to.
    pub target: WorkloadRef,
    /// The policy in force there.
    pub winner: WorkloadRef,
}

/// The connection pool in force for `service`, and the policy it comes from: the first
/// policy (oldest first, as `policies` is ordered) that targets the service and sets one.
pub fn connection_pool<'a>(
    policies: &'a [TrafficPolicy],
    service: &WorkloadRef,
) -> Option<(&'a WorkloadRef, &'a ConnectionPool)> {
    policies.iter().find_map(|p| {
        let pool = p.connection_pool.as_ref()?;
        p.targets.contains(service).then_some((&p.name, pool))
    })
}

/// Every (policy, target) pair where an older policy's connection pool wins (the Gateway
/// API's conflict rule: oldest wins, and the loser is marked).
pub fn conflicts(policies: &[TrafficPolicy]) -> Vec<Conflict> {
    let mut out = Vec::new();
    for (i, policy) in policies.iter().enumerate() {
        if policy.connection_pool.is_none() {
            continue;
        }
        for target in &policy.targets {
            if let Some((winner, _)) = connection_pool(&policies[..i], target) {
                out.push(Conflict {
                    policy: policy.name.clone(),
                    target: target.clone(),
                    winner: winner.clone(),
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(name: &str, targets: &[&str], max_connections: u32) -> TrafficPolicy {
        TrafficPolicy {
            name: WorkloadRef::new("prod", name),
            targets: targets
                .iter()
                .map(|t| WorkloadRef::new("prod", *t))
                .collect(),
            connection_pool: Some(ConnectionPool {
                max_connections: Some(max_connections),
                ..ConnectionPool::default()
            }),
        }
    }

    #[test]
    fn the_oldest_policy_wins_and_the_younger_is_marked() {
        let policies = [
            policy("old", &["reviews"], 10),
            policy("young", &["reviews", "ratings"], 20),
        ];
        let reviews = WorkloadRef::new("prod", "reviews");
        let (from, pool) = connection_pool(&policies, &reviews).unwrap();
        assert_eq!(
            (from.name.as_str(), pool.max_connections),
            ("old", Some(10))
        );
        let ratings = WorkloadRef::new("prod", "ratings");
        let (from, _) = connection_pool(&policies, &ratings).unwrap();
        assert_eq!(from.name, "young");
        assert_eq!(
            conflicts(&policies),
            [Conflict {
                policy: WorkloadRef::new("prod", "young"),
                target: reviews,
                winner: WorkloadRef::new("prod", "old"),
            }]
        );
    }

    #[test]
    fn a_policy_without_a_pool_neither_wins_nor_conflicts() {
        let mut empty = policy("empty", &["reviews"], 1);
        empty.connection_pool = None;
        let policies = [empty, policy("pool", &["reviews"], 5)];
        let reviews = WorkloadRef::new("prod", "reviews");
        assert_eq!(connection_pool(&policies, &reviews).unwrap().0.name, "pool");
        assert!(conflicts(&policies).is_empty());
    }
}
