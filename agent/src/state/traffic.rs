//! Traffic policies: how a waypoint treats the backends of a Service (connection pools and
//! circuit breaking, outlier detection, load balancing, a retry budget, rate limits, who the
//! end user is by JWT: `state::authn`) and the requests of a route (faults, rate limits,
//! which failures are retried, the longest backoff), attached by Gateway API policy
//! attachment (`targetRefs`). Validated by `source::traffic`; enforced by the waypoint.

use std::{collections::HashMap, time::Duration};

use serde::Serialize;

use super::{WorkloadRef, authn::RequestAuthentication};

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
    /// Passive health of each target's endpoints: who is ejected, for how long (Service
    /// targets).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    /// How an endpoint is chosen for each request (Service targets).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
    /// Delays or aborts injected into a share of the requests (route targets).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,
    /// A token bucket the requests must take a token from (route or Service targets).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// How the retries of each target's requests are made (route targets).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
    /// Retries in flight to each target, as a share of its requests in flight (Service
    /// targets).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_budget: Option<RetryBudget>,
    /// End-user authentication of the requests to each target by JWT (Service targets).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_authentication: Option<RequestAuthentication>,
}

impl TrafficPolicy {
    /// A policy with no feature set yet (fill in with struct update syntax).
    pub fn new(name: WorkloadRef, targets: Vec<Target>) -> Self {
        Self {
            name,
            targets,
            connection_pool: None,
            outlier_detection: None,
            load_balancer: None,
            fault: None,
            rate_limit: None,
            retry: None,
            retry_budget: None,
            request_authentication: None,
        }
    }
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
    Feature {
        field: "outlierDetection",
        set_in: |p| p.outlier_detection.is_some(),
    },
    Feature {
        field: "loadBalancer",
        set_in: |p| p.load_balancer.is_some(),
    },
    Feature {
        field: "retry",
        set_in: |p| p.retry.is_some(),
    },
    Feature {
        field: "retryBudget",
        set_in: |p| p.retry_budget.is_some(),
    },
    Feature {
        field: "requestAuthentication",
        set_in: |p| p.request_authentication.is_some(),
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

/// Passive health checking of a Service's endpoints (Istio's `DestinationRule`
/// `trafficPolicy.outlierDetection`, Envoy's outlier detection): an endpoint that fails
/// too often is ejected (gets no requests) for a while, longer each time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetection {
    /// 5xx answers (and connection failures and per-try timeouts) in a row that eject an
    /// endpoint; 0: not this way.
    #[serde(rename = "consecutive5xxErrors")]
    pub consecutive_5xx_errors: u32,
    /// 502, 503 and 504 answers (and connection failures and per-try timeouts) in a row
    /// that eject an endpoint; 0: not this way.
    pub consecutive_gateway_errors: u32,
    /// Ejection of endpoints whose success rate is far below their peers'; `None`: off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub success_rate: Option<SuccessRate>,
    /// How often success rates are judged and an ejection's multiplier decays.
    #[serde(serialize_with = "super::route::humantime")]
    pub interval: Duration,
    /// An ejection lasts this times the number of times the endpoint was ejected.
    #[serde(serialize_with = "super::route::humantime")]
    pub base_ejection_time: Duration,
    /// At most this percentage of the Service's endpoints are ejected at once (one always
    /// may be).
    pub max_ejection_percent: u32,
}

/// Envoy's success-rate outlier detection: once per interval, over the endpoints that
/// served at least `request_volume` requests in it, if there are at least `minimum_hosts`
/// of them, an endpoint whose success rate is below `mean - stdev_factor/1000 × stdev` is
/// ejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SuccessRate {
    pub minimum_hosts: u32,
    pub request_volume: u32,
    /// In thousandths, as Envoy's `success_rate_stdev_factor` (1900: 1.9 deviations).
    pub stdev_factor: u32,
}

/// How one endpoint of a Service is chosen for a request (Istio's `loadBalancer`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum LoadBalancer {
    /// In turn.
    RoundRobin,
    /// The one of two random endpoints with fewer requests in flight (the default).
    LeastRequest,
    /// At random.
    Random,
    /// By a hash of the request's key (session affinity); a request without the key is
    /// balanced as `LeastRequest`.
    ConsistentHash(HashKey),
}

/// What a consistent hash is taken of.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum HashKey {
    /// A request header's value (name lowercase).
    Header(String),
    /// A cookie's value.
    Cookie(String),
    /// The original client's IP address.
    SourceIp,
}

/// How the retries of a route's requests are made: it refines the route rule's Gateway API
/// `retry` (which says how many, the codes and the backoff's base), and never turns retries
/// on for a rule without one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RetryPolicy {
    /// What a try must end with to be retried (any of them), in the order written.
    pub on: Vec<RetryOn>,
    /// No pause between tries is longer than this.
    #[serde(serialize_with = "super::route::humantime")]
    pub max_backoff: Duration,
}

/// A try's ending that may be retried (Envoy's `retry_on` conditions).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum RetryOn {
    /// No connection to the endpoint (HBONE or its handshake failed).
    #[serde(rename = "connect-failure")]
    ConnectFailure,
    /// No response at all: a connection failure, a reset or closed connection, or the
    /// per-try timeout (`backendRequest`) passing.
    #[serde(rename = "reset")]
    Reset,
    /// Any 5xx response, and no response at all (as `reset`).
    #[serde(rename = "5xx")]
    ServerError,
    /// A 502, 503 or 504 response, and no response at all (as `reset`).
    #[serde(rename = "gateway-error")]
    GatewayError,
    /// A response whose status is one of the rule's `retry.codes`.
    #[serde(rename = "retriable-status-codes")]
    RetriableStatusCodes,
}

/// Retries in flight to a Service may be at most `percent` of its requests in flight
/// (tries being answered and requests waiting for a connection), or `min_retry_concurrency`
/// where that is more (Envoy's `retry_budget`). A retry over it is not made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RetryBudget {
    /// 0 to 100.
    pub percent: u32,
    /// Retries in flight that are always allowed, however few requests are.
    pub min_retry_concurrency: u32,
}

impl RetryOn {
    /// Every condition, with its name in the spec.
    pub const ALL: [RetryOn; 5] = [
        RetryOn::ConnectFailure,
        RetryOn::Reset,
        RetryOn::ServerError,
        RetryOn::GatewayError,
        RetryOn::RetriableStatusCodes,
    ];

    /// The name in the spec (Envoy's).
    pub fn name(self) -> &'static str {
        match self {
            RetryOn::ConnectFailure => "connect-failure",
            RetryOn::Reset => "reset",
            RetryOn::ServerError => "5xx",
            RetryOn::GatewayError => "gateway-error",
            RetryOn::RetriableStatusCodes => "retriable-status-codes",
        }
    }
}

impl Default for RetryPolicy {
    /// What a rule's `retry` does without a policy: failures without a response and the
    /// rule's codes are retried, pauses up to 10 s.
    fn default() -> Self {
        Self {
            on: DEFAULT_RETRY_ON.to_vec(),
            max_backoff: DEFAULT_MAX_BACKOFF,
        }
    }
}

impl RetryBudget {
    /// Retries that may be in flight while `active` requests are (rounded down, never under
    /// `min_retry_concurrency`).
    pub fn max_retries(self, active: u32) -> u32 {
        let share = u64::from(active) * u64::from(self.percent.min(100)) / 100;
        u32::try_from(share)
            .unwrap_or(u32::MAX)
            .max(self.min_retry_concurrency)
    }
}

impl Default for RetryBudget {
    /// Envoy's defaults: 20 %, at least 3.
    fn default() -> Self {
        Self {
            percent: 20,
            min_retry_concurrency: 3,
        }
    }
}

/// What a rule's `retry` retries without a policy.
pub const DEFAULT_RETRY_ON: [RetryOn; 2] = [RetryOn::Reset, RetryOn::RetriableStatusCodes];

/// The longest pause between tries without a policy.
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(10);

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

/// The feature `get` reads in force for the Service `service`, and the policy it comes
/// from.
pub fn for_service<'a, T>(
    policies: &'a [TrafficPolicy],
    service: &WorkloadRef,
    get: impl Fn(&'a TrafficPolicy) -> Option<&'a T>,
) -> Option<(&'a WorkloadRef, &'a T)> {
    in_force(policies, &Target::Service(service.clone()), get)
}

/// The connection pool in force for `service`, and the policy it comes from.
pub fn connection_pool<'a>(
    policies: &'a [TrafficPolicy],
    service: &WorkloadRef,
) -> Option<(&'a WorkloadRef, &'a ConnectionPool)> {
    for_service(policies, service, |p| p.connection_pool.as_ref())
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

/// The retry budget in force for `service`, and the policy it comes from.
pub fn retry_budget<'a>(
    policies: &'a [TrafficPolicy],
    service: &WorkloadRef,
) -> Option<(&'a WorkloadRef, &'a RetryBudget)> {
    let target = Target::Service(service.clone());
    in_force(policies, &target, |p| p.retry_budget.as_ref())
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
        let targets = targets
            .iter()
            .map(|t| Target::Service(WorkloadRef::new("prod", *t)))
            .collect();
        TrafficPolicy {
            connection_pool: Some(ConnectionPool {
                max_connections: Some(max_connections),
                ..ConnectionPool::default()
            }),
            ..TrafficPolicy::new(WorkloadRef::new("prod", name), targets)
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
    fn each_feature_has_its_own_winner() {
        let mut balanced = policy("balanced", &["reviews"], 1);
        balanced.connection_pool = None;
        balanced.load_balancer = Some(LoadBalancer::RoundRobin);
        let mut hashed = policy("hashed", &["reviews"], 2);
        hashed.load_balancer = Some(LoadBalancer::ConsistentHash(HashKey::SourceIp));
        let policies = [balanced, hashed];
        let reviews = WorkloadRef::new("prod", "reviews");
        let (from, lb) = for_service(&policies, &reviews, |p| p.load_balancer.as_ref()).unwrap();
        assert_eq!(
            (from.name.as_str(), lb),
            ("balanced", &LoadBalancer::RoundRobin)
        );
        assert_eq!(
            connection_pool(&policies, &reviews).unwrap().0.name,
            "hashed"
        );
        assert!(for_service(&policies, &reviews, |p| p.outlier_detection.as_ref()).is_none());
        let fields: Vec<_> = conflicts(&policies).iter().map(|c| c.feature).collect();
        assert_eq!(fields, ["loadBalancer"]);
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

    #[test]
    fn a_budget_is_a_share_of_the_requests_in_flight_never_under_its_minimum() {
        let budget = RetryBudget {
            percent: 20,
            min_retry_concurrency: 3,
        };
        assert_eq!(budget.max_retries(0), 3);
        assert_eq!(budget.max_retries(15), 3);
        assert_eq!(budget.max_retries(20), 4);
        assert_eq!(budget.max_retries(50), 10);
        // Rounded down: 20 % of 54 is 10.8.
        assert_eq!(budget.max_retries(54), 10);
        assert_eq!(budget.max_retries(u32::MAX), u32::MAX / 5);
        let none = RetryBudget {
            percent: 0,
            min_retry_concurrency: 0,
        };
        assert_eq!(none.max_retries(1000), 0);
        let all = RetryBudget {
            percent: 100,
            min_retry_concurrency: 0,
        };
        assert_eq!(all.max_retries(7), 7);
    }
}
