//! Traffic policies: how a waypoint treats the backends of a Service (connection pools and
//! circuit breaking so far), attached to the Service by Gateway API policy attachment
//! (`targetRefs`). Validated by `source::traffic`; enforced by the waypoint.

use std::{collections::HashMap, time::Duration};

use serde::Serialize;

use super::WorkloadRef;

/// One `TrafficPolicy`, valid as a whole.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicy {
    /// Namespace and name of the policy object.
    pub name: WorkloadRef,
    /// What it attaches to (in the policy's namespace).
    pub targets: Vec<Target>,
    /// Limits of the waypoint's connections and requests to each target's endpoints
    /// (Service targets).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPool>,
    /// Delays or aborts injected into a share of the requests (route targets).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,
    /// A token bucket the requests must take a token from (route or Service targets).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
}

/// Fault injection for chaos tests (Istio's `VirtualService` `fault`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Fault {
    /// Held this long before being sent on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    /// Answered by the waypoint with this status, never sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

/// A fixed delay for a share of the requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultDelay {
    #[serde(serialize_with = "super::route::humantime")]
    pub fixed: Duration,
    /// The share of requests delayed, in parts per million.
    pub parts_per_million: u32,
}

/// An abort for a share of the requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultAbort {
    /// The HTTP status answered (gRPC requests get the matching `grpc-status`).
    pub status: u16,
    /// The share of requests aborted, in parts per million.
    pub parts_per_million: u32,
}

/// A local token bucket (Envoy's `local_ratelimit`): it holds at most `max_tokens`, and
/// gains `tokens_per_fill` every `fill_interval`, continuously. A request takes a token or
/// is answered 429.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    pub max_tokens: u32,
    pub tokens_per_fill: u32,
    #[serde(serialize_with = "super::route::humantime")]
    pub fill_interval: Duration,
    /// A bucket per client identity (the HBONE peer's SPIFFE ID) instead of one shared.
    pub per_client: bool,
}

/// What a policy attaches to (Gateway API policy attachment).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Target {
    /// A Service: what the waypoint sends to it as a backend.
    Service(WorkloadRef),
    /// An `HTTPRoute`, or one named rule of it (`sectionName`): the requests it matches.
    Route {
        route: WorkloadRef,
        #[serde(skip_serializing_if = "Option::is_none")]
        rule: Option<String>,
    },
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Service(service) => write!(f, "Service {service}"),
            Target::Route { route, rule: None } => write!(f, "HTTPRoute {route}"),
            Target::Route {
                route,
                rule: Some(rule),
            } => write!(f, "HTTPRoute {route} rule {rule}"),
        }
    }
}

/// One feature a policy may set, by name (for status messages) and how to read it.
pub struct Feature {
    /// The spec field: `connectionPool`.
    pub field: &'static str,
    /// Whether a policy sets it.
    pub set_in: fn(&TrafficPolicy) -> bool,
}

/// Every feature, for the conflict rule (one winner per feature and target).
pub const FEATURES: &[Feature] = &[
    Feature {
        field: "connectionPool",
        set_in: |p| p.connection_pool.is_some(),
    },
    Feature {
        field: "fault",
        set_in: |p| p.fault.is_some(),
    },
    Feature {
        field: "rateLimit",
        set_in: |p| p.rate_limit.is_some(),
    },
];

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
    pub target: Target,
    /// The feature both set (its spec field).
    pub feature: &'static str,
    /// The policy in force there.
    pub winner: WorkloadRef,
}

/// The first policy (oldest first, as `policies` is ordered) that targets `target` and
/// sets the feature `get` reads, with that feature.
pub fn in_force<'a, T>(
    policies: &'a [TrafficPolicy],
    target: &Target,
    get: impl Fn(&'a TrafficPolicy) -> Option<&'a T>,
) -> Option<(&'a WorkloadRef, &'a T)> {
    policies.iter().find_map(|p| {
        let feature = get(p)?;
        p.targets.contains(target).then_some((&p.name, feature))
    })
}

/// The connection pool in force for `service`, and the policy it comes from.
pub fn connection_pool<'a>(
    policies: &'a [TrafficPolicy],
    service: &WorkloadRef,
) -> Option<(&'a WorkloadRef, &'a ConnectionPool)> {
    let target = Target::Service(service.clone());
    in_force(policies, &target, |p| p.connection_pool.as_ref())
}

/// Each target's `feature` (read by `get`) and the policy it comes from, the oldest
/// policy's where several set it: what a waypoint looks up per request.
pub fn by_target<T: Clone>(
    policies: &[TrafficPolicy],
    get: impl Fn(&TrafficPolicy) -> Option<&T>,
) -> HashMap<Target, (WorkloadRef, T)> {
    let mut out = HashMap::new();
    for policy in policies {
        if let Some(feature) = get(policy) {
            for target in &policy.targets {
                out.entry(target.clone())
                    .or_insert_with(|| (policy.name.clone(), feature.clone()));
            }
        }
    }
    out
}

/// Every (policy, target, feature) where an older policy wins (the Gateway API's conflict
/// rule: oldest wins, and the loser is marked).
pub fn conflicts(policies: &[TrafficPolicy]) -> Vec<Conflict> {
    let mut out = Vec::new();
    for feature in FEATURES {
        for (i, policy) in policies.iter().enumerate() {
            if !(feature.set_in)(policy) {
                continue;
            }
            for target in &policy.targets {
                let older = policies[..i]
                    .iter()
                    .find(|p| (feature.set_in)(p) && p.targets.contains(target));
                if let Some(winner) = older {
                    out.push(Conflict {
                        policy: policy.name.clone(),
                        target: target.clone(),
                        feature: feature.field,
                        winner: winner.name.clone(),
                    });
                }
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
                .map(|t| Target::Service(WorkloadRef::new("prod", *t)))
                .collect(),
            connection_pool: Some(ConnectionPool {
                max_connections: Some(max_connections),
                ..ConnectionPool::default()
            }),
            fault: None,
            rate_limit: None,
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
                target: Target::Service(reviews),
                feature: "connectionPool",
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
