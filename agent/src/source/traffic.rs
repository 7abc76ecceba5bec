//! `weft.dev/v1alpha1 TrafficPolicy` objects → `state::TrafficPolicy`: the one validation,
//! shared by the local file (`trafficPolicies:` items, the objects as their manifests say)
//! and the Kubernetes source (watched objects). Errors name the field below the caller's
//! prefix (`trafficPolicies[1].spec.targetRefs[0].kind`).
//!
//! A target is a Service or an `HTTPRoute` (or one named rule of it, `sectionName`). Each
//! feature says which kinds it applies to; a feature set on a policy with a target of
//! another kind is an error naming the feature's field, never silently ignored.

mod authn;

use std::time::Duration;

use serde_json::Value;

use crate::{
    source::{
        gateway::{self, at, duration},
        kube::crd::{
            ConnectionPoolSpec, FaultSpec, LoadBalancerSpec, OutlierDetectionSpec, RateLimitSpec,
            RetryBudgetSpec, RetrySpec, SimpleLoadBalancer, TrafficPolicySpec,
        },
        syntax::{self, Invalid, TargetRefSpec},
    },
    state::{
        Target, TrafficPolicy, WorkloadRef,
        traffic::{
            ConnectionPool, DEFAULT_MAX_PENDING_REQUESTS, Fault, FaultAbort, FaultDelay, HashKey,
            LoadBalancer, OutlierDetection, RateLimit, RetryBudget, RetryOn, RetryPolicy,
            SuccessRate,
        },
    },
};

/// Most targets one policy names (the CRD's `maxItems`, enforced here for the local file
/// too, which no API server checks).
const MAX_TARGETS: usize = 16;

/// The `apiVersion` of traffic policies.
pub const API_VERSION: &str = "weft.dev/v1alpha1";

/// Validates a whole object (`apiVersion`, `kind`, `metadata`, `spec`) found at `field`; an
/// object without a namespace is in `default_namespace`.
pub fn object(
    field: &str,
    object: &Value,
    default_namespace: &str,
) -> Result<TrafficPolicy, Invalid> {
    gateway::object_type(field, object, API_VERSION, "TrafficPolicy")?;
    let metadata = object.get("metadata").cloned().unwrap_or(Value::Null);
    let name_of = |key: &str| metadata.get(key).and_then(Value::as_str).map(str::to_owned);
    let namespace = syntax::name(
        &at(field, "metadata.namespace"),
        name_of("namespace").unwrap_or_else(|| default_namespace.into()),
    )?;
    let name = syntax::name(
        &at(field, "metadata.name"),
        name_of("name").unwrap_or_default(),
    )?;
    let spec_field = at(field, "spec");
    let raw = object.get("spec").cloned().unwrap_or(Value::Null);
    let spec: TrafficPolicySpec = syntax::decode(&spec_field, &raw)?;
    policy(&spec_field, WorkloadRef::new(namespace, name), spec)
}

/// Validates the `spec` (found at `field`) of the policy `name`.
pub fn policy(
    field: &str,
    name: WorkloadRef,
    spec: TrafficPolicySpec,
) -> Result<TrafficPolicy, Invalid> {
    if spec.target_refs.is_empty() || spec.target_refs.len() > MAX_TARGETS {
        return Err(invalid(
            at(field, "targetRefs"),
            format!(
                "{} targets: expected 1 to {MAX_TARGETS}",
                spec.target_refs.len()
            ),
        ));
    }
    let targets = spec
        .target_refs
        .into_iter()
        .enumerate()
        .map(|(i, r)| target(&format!("{}[{i}]", at(field, "targetRefs")), &name, r))
        .collect::<Result<Vec<_>, _>>()?;
    // Each feature: its spec field, the target kinds it applies to, its validation.
    let feature = |key: &str, kinds: Kinds| -> Result<String, Invalid> {
        let field = at(field, key);
        match targets.iter().find(|t| !kinds.allow(t)) {
            Some(t) => Err(invalid(
                field,
                format!("applies to {} targets only, not to {t}", kinds.name()),
            )),
            None => Ok(field),
        }
    };
    Ok(TrafficPolicy {
        connection_pool: spec
            .connection_pool
            .map(|p| connection_pool(&feature("connectionPool", Kinds::Services)?, p))
            .transpose()?,
        outlier_detection: spec
            .outlier_detection
            .map(|o| outlier_detection(&feature("outlierDetection", Kinds::Services)?, o))
            .transpose()?,
        load_balancer: spec
            .load_balancer
            .map(|lb| load_balancer(&feature("loadBalancer", Kinds::Services)?, lb))
            .transpose()?,
        fault: spec
            .fault
            .map(|f| fault(&feature("fault", Kinds::Routes)?, f))
            .transpose()?,
        rate_limit: spec
            .rate_limit
            .map(|r| rate_limit(&feature("rateLimit", Kinds::Any)?, r))
            .transpose()?,
        retry: spec
            .retry
            .map(|r| retry(&feature("retry", Kinds::Routes)?, r))
            .transpose()?,
        retry_budget: spec
            .retry_budget
            .map(|b| retry_budget(&feature("retryBudget", Kinds::Services)?, b))
            .transpose()?,
        request_authentication: spec
            .request_authentication
            .map(|a| {
                authn::request_authentication(
                    &feature("requestAuthentication", Kinds::Services)?,
                    a,
                )
            })
            .transpose()?,
        name,
        targets,
    })
}

/// The target kinds a feature applies to.
#[derive(Clone, Copy)]
enum Kinds {
    Services,
    Routes,
    Any,
}

impl Kinds {
    fn allow(self, target: &Target) -> bool {
        match self {
            Kinds::Services => matches!(target, Target::Service(_)),
            Kinds::Routes => matches!(target, Target::Route { .. }),
            Kinds::Any => true,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kinds::Services => "Service",
            Kinds::Routes => "HTTPRoute",
            Kinds::Any => "Service or HTTPRoute",
        }
    }
}

fn fault(field: &str, raw: FaultSpec) -> Result<Fault, Invalid> {
    if raw.delay.is_none() && raw.abort.is_none() {
        return Err(invalid(
            field.into(),
            "needs a delay, an abort, or both".into(),
        ));
    }
    let delay = match raw.delay {
        Some(d) => {
            let field = at(field, "delay");
            let fixed = duration(&at(&field, "fixedDelay"), &d.fixed_delay)?;
            if fixed > MAX_FAULT_DELAY {
                return Err(invalid(
                    at(&field, "fixedDelay"),
                    format!("at most {}", humantime::format_duration(MAX_FAULT_DELAY)),
                ));
            }
            Some(FaultDelay {
                fixed,
                parts_per_million: share(&at(&field, "percentage"), d.percentage)?,
            })
        }
        None => None,
    };
    let abort = match raw.abort {
        Some(a) => {
            let field = at(field, "abort");
            if !(200..=599).contains(&a.http_status) {
                return Err(invalid(
                    at(&field, "httpStatus"),
                    format!("{}: expected 200 to 599", a.http_status),
                ));
            }
            Some(FaultAbort {
                status: a.http_status,
                parts_per_million: share(&at(&field, "percentage"), a.percentage)?,
            })
        }
        None => None,
    };
    Ok(Fault { delay, abort })
}

/// A percentage (0 to 100) as parts per million.
fn share(field: &str, percentage: f64) -> Result<u32, Invalid> {
    if !(0.0..=100.0).contains(&percentage) {
        return Err(invalid(
            field.into(),
            format!("{percentage}: expected 0 to 100"),
        ));
    }
    // In range, so the product is 0 to 1e6 and the cast exact.
    Ok((percentage * 10_000.0).round() as u32)
}

fn rate_limit(field: &str, raw: RateLimitSpec) -> Result<RateLimit, Invalid> {
    if raw.max_tokens == 0 {
        return Err(invalid(at(field, "maxTokens"), "must be at least 1".into()));
    }
    let tokens_per_fill = raw.tokens_per_fill.unwrap_or(raw.max_tokens);
    if tokens_per_fill == 0 {
        return Err(invalid(
            at(field, "tokensPerFill"),
            "must be at least 1".into(),
        ));
    }
    let fill_interval = duration(&at(field, "fillInterval"), &raw.fill_interval)?;
    if fill_interval < Duration::from_millis(1) {
        return Err(invalid(
            at(field, "fillInterval"),
            "must be at least 1ms".into(),
        ));
    }
    Ok(RateLimit {
        max_tokens: raw.max_tokens,
        tokens_per_fill,
        fill_interval,
        per_client: raw.per_client,
    })
}

/// Longest fault delay: a chaos test that holds requests for longer is holding the
/// waypoint's memory, not testing a timeout.
const MAX_FAULT_DELAY: Duration = Duration::from_secs(3600);

fn target(field: &str, policy: &WorkloadRef, raw: TargetRefSpec) -> Result<Target, Invalid> {
    let name = syntax::name(&at(field, "name"), raw.name)?;
    let name = WorkloadRef::new(policy.namespace.clone(), name);
    match (raw.group.as_str(), raw.kind.as_str()) {
        ("" | "core", "Service") => match raw.section_name {
            Some(_) => Err(invalid(
                at(field, "sectionName"),
                "not supported on a Service target".into(),
            )),
            None => Ok(Target::Service(name)),
        },
        (GATEWAY_GROUP, "HTTPRoute") => Ok(Target::Route {
            route: name,
            rule: raw
                .section_name
                .map(|rule| syntax::name(&at(field, "sectionName"), rule))
                .transpose()?,
        }),
        (group, kind) => Err(invalid(
            at(field, "kind"),
            format!(
                "{group}/{kind}: expected a Service (group \"\") or an HTTPRoute (group \
                 {GATEWAY_GROUP:?})"
            ),
        )),
    }
}

const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";

fn connection_pool(field: &str, raw: ConnectionPoolSpec) -> Result<ConnectionPool, Invalid> {
    let at_least_one = |key: &str, value: Option<u32>| match value {
        Some(0) => Err(invalid(
            at(field, key),
            "must be at least 1 (absent: no limit)".into(),
        )),
        other => Ok(other),
    };
    Ok(ConnectionPool {
        max_connections: at_least_one("maxConnections", raw.max_connections)?,
        max_pending_requests: raw
            .max_pending_requests
            .unwrap_or(DEFAULT_MAX_PENDING_REQUESTS),
        max_requests: at_least_one("maxRequests", raw.max_requests)?,
        max_requests_per_connection: at_least_one(
            "maxRequestsPerConnection",
            raw.max_requests_per_connection,
        )?,
        max_retries: raw.max_retries,
    })
}

fn outlier_detection(field: &str, raw: OutlierDetectionSpec) -> Result<OutlierDetection, Invalid> {
    let time = |key: &str, text: Option<String>, default: Duration| match text {
        None => Ok(default),
        Some(text) => match duration(&at(field, key), &text)? {
            Duration::ZERO => Err(invalid(at(field, key), "must be more than 0".into())),
            d => Ok(d),
        },
    };
    let max_ejection_percent = raw.max_ejection_percent.unwrap_or(10);
    if max_ejection_percent > 100 {
        return Err(invalid(
            at(field, "maxEjectionPercent"),
            format!("{max_ejection_percent}: a percentage, 0 to 100"),
        ));
    }
    let success_rate = match raw.success_rate_stdev_factor {
        Some(0) => {
            return Err(invalid(
                at(field, "successRateStdevFactor"),
                "must be at least 1 (thousandths of a standard deviation; absent: off)".into(),
            ));
        }
        Some(stdev_factor) => Some(SuccessRate {
            minimum_hosts: raw.success_rate_minimum_hosts.unwrap_or(5),
            request_volume: raw.success_rate_request_volume.unwrap_or(100),
            stdev_factor,
        }),
        None => {
            let set = [
                ("successRateMinimumHosts", raw.success_rate_minimum_hosts),
                ("successRateRequestVolume", raw.success_rate_request_volume),
            ];
            if let Some((key, _)) = set.iter().find(|(_, v)| v.is_some()) {
                return Err(invalid(
                    at(field, key),
                    "means nothing without successRateStdevFactor, which turns success-rate \
                     detection on"
                        .into(),
                ));
            }
            None
        }
    };
    Ok(OutlierDetection {
        consecutive_5xx_errors: raw.consecutive_5xx_errors.unwrap_or(5),
        consecutive_gateway_errors: raw.consecutive_gateway_errors.unwrap_or(0),
        success_rate,
        interval: time("interval", raw.interval, Duration::from_secs(10))?,
        base_ejection_time: time(
            "baseEjectionTime",
            raw.base_ejection_time,
            Duration::from_secs(30),
        )?,
        max_ejection_percent,
    })
}

fn load_balancer(field: &str, raw: LoadBalancerSpec) -> Result<LoadBalancer, Invalid> {
    match (raw.simple, raw.consistent_hash) {
        (Some(_), Some(_)) => Err(invalid(
            at(field, "consistentHash"),
            "set either simple or consistentHash, not both".into(),
        )),
        (None, None) => Err(invalid(
            field.to_owned(),
            "set simple or consistentHash".into(),
        )),
        (Some(simple), None) => Ok(match simple {
            SimpleLoadBalancer::RoundRobin => LoadBalancer::RoundRobin,
            SimpleLoadBalancer::LeastRequest => LoadBalancer::LeastRequest,
            SimpleLoadBalancer::Random => LoadBalancer::Random,
        }),
        (None, Some(hash)) => {
            let field = at(field, "consistentHash");
            let mut keys = Vec::new();
            if let Some(name) = hash.http_header_name {
                let key = at(&field, "httpHeaderName");
                let name = http::HeaderName::try_from(name.as_str())
                    .map_err(|e| invalid(key, format!("{name:?}: {e}")))?;
                keys.push(HashKey::Header(name.as_str().to_owned()));
            }
            if let Some(cookie) = hash.http_cookie {
                if !is_cookie_name(&cookie.name) {
                    return Err(invalid(
                        at(&field, "httpCookie.name"),
                        format!("{:?}: not a cookie name (RFC 6265 token)", cookie.name),
                    ));
                }
                keys.push(HashKey::Cookie(cookie.name));
            }
            match hash.use_source_ip {
                Some(true) => keys.push(HashKey::SourceIp),
                Some(false) => {
                    return Err(invalid(
                        at(&field, "useSourceIp"),
                        "false means nothing: leave it out".into(),
                    ));
                }
                None => {}
            }
            let mut keys = keys.into_iter();
            match (keys.next(), keys.next()) {
                (Some(key), None) => Ok(LoadBalancer::ConsistentHash(key)),
                _ => Err(invalid(
                    field,
                    "set exactly one of httpHeaderName, httpCookie, useSourceIp".into(),
                )),
            }
        }
    }
}

/// An RFC 6265 `cookie-name` (an RFC 7230 token).
fn is_cookie_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn retry(field: &str, raw: RetrySpec) -> Result<RetryPolicy, Invalid> {
    let defaults = RetryPolicy::default();
    let on = match raw.on {
        None => defaults.on,
        Some(names) if names.is_empty() => {
            return Err(invalid(
                at(field, "on"),
                "at least one condition is needed (absent: reset, retriable-status-codes)".into(),
            ));
        }
        Some(names) => {
            let mut on = Vec::with_capacity(names.len());
            for (i, name) in names.iter().enumerate() {
                let Some(condition) = RetryOn::ALL.into_iter().find(|c| c.name() == name) else {
                    let known: Vec<_> = RetryOn::ALL.iter().map(|c| c.name()).collect();
                    return Err(invalid(
                        format!("{}[{i}]", at(field, "on")),
                        format!("{name:?} is not a retry condition ({})", known.join(", ")),
                    ));
                };
                if !on.contains(&condition) {
                    on.push(condition);
                }
            }
            on
        }
    };
    let max = raw.backoff.and_then(|b| b.max);
    let max_backoff = match max {
        None => defaults.max_backoff,
        Some(text) => {
            let field = at(field, "backoff.max");
            let max = duration(&field, &text)?;
            if max.is_zero() {
                return Err(invalid(
                    field,
                    "must be above 0 (no pause at all: a retry storm)".into(),
                ));
            }
            max
        }
    };
    Ok(RetryPolicy { on, max_backoff })
}

fn retry_budget(field: &str, raw: RetryBudgetSpec) -> Result<RetryBudget, Invalid> {
    let defaults = RetryBudget::default();
    let percent = raw.percent.unwrap_or(defaults.percent);
    if percent > 100 {
        return Err(invalid(
            at(field, "percent"),
            format!("{percent} is not a percentage (0-100)"),
        ));
    }
    Ok(RetryBudget {
        percent,
        min_retry_concurrency: raw
            .min_retry_concurrency
            .unwrap_or(defaults.min_retry_concurrency),
    })
}

fn invalid(field: String, reason: String) -> Invalid {
    Invalid { field, reason }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn manifest(spec: Value) -> Value {
        json!({
            "apiVersion": API_VERSION, "kind": "TrafficPolicy",
            "metadata": {"name": "pool", "namespace": "prod"},
            "spec": spec,
        })
    }

    /// The policy `spec` makes (the manifest's namespace is `prod`).
    fn read(spec: Value) -> TrafficPolicy {
        object("", &manifest(spec), "default").unwrap()
    }

    #[test]
    fn a_service_target_and_its_pool_are_read() {
        let policy = object(
            "trafficPolicies[0]",
            &manifest(json!({
                "targetRefs": [{"group": "", "kind": "Service", "name": "reviews"}],
                "connectionPool": {"maxConnections": 10, "maxPendingRequests": 0, "maxRetries": 3},
            })),
            "default",
        )
        .unwrap();
        assert_eq!(policy.name, WorkloadRef::new("prod", "pool"));
        assert_eq!(
            policy.targets,
            [Target::Service(WorkloadRef::new("prod", "reviews"))]
        );
        assert_eq!(
            policy.connection_pool,
            Some(ConnectionPool {
                max_connections: Some(10),
                max_pending_requests: 0,
                max_retries: Some(3),
                ..ConnectionPool::default()
            })
        );
    }

    #[test]
    fn a_rule_gets_a_fault_and_a_rate_limit() {
        let policy = object(
            "",
            &manifest(json!({
                "targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": "web", "sectionName": "api"}],
                "fault": {"delay": {"fixedDelay": "100ms", "percentage": 0.5}, "abort": {"httpStatus": 500, "percentage": 10}},
                "rateLimit": {"maxTokens": 10, "fillInterval": "1s", "perClient": true},
            })),
            "default",
        )
        .unwrap();
        assert_eq!(
            policy.targets,
            [Target::Route {
                route: WorkloadRef::new("prod", "web"),
                rule: Some("api".into())
            }]
        );
        let fault = policy.fault.unwrap();
        assert_eq!(
            fault.delay,
            Some(FaultDelay {
                fixed: Duration::from_millis(100),
                parts_per_million: 5_000
            })
        );
        assert_eq!(fault.abort.unwrap().parts_per_million, 100_000);
        let limit = policy.rate_limit.unwrap();
        assert_eq!((limit.tokens_per_fill, limit.per_client), (10, true));
    }

    #[test]
    fn the_pending_queue_has_a_limit_even_when_none_is_written() {
        let policy = read(json!({
            "targetRefs": [{"kind": "Service", "name": "reviews"}],
            "connectionPool": {"maxConnections": 10},
        }));
        let pool = policy.connection_pool.unwrap();
        assert_eq!(pool.max_pending_requests, DEFAULT_MAX_PENDING_REQUESTS);
    }

    #[test]
    fn outlier_detection_and_load_balancer_are_read_with_istios_defaults() {
        let policy = read(json!({
            "targetRefs": [{"kind": "Service", "name": "reviews"}],
            "outlierDetection": {"consecutiveGatewayErrors": 3, "baseEjectionTime": "2s"},
            "loadBalancer": {"consistentHash": {"httpHeaderName": "X-User"}},
        }));
        assert_eq!(
            policy.outlier_detection,
            Some(OutlierDetection {
                consecutive_5xx_errors: 5,
                consecutive_gateway_errors: 3,
                success_rate: None,
                interval: Duration::from_secs(10),
                base_ejection_time: Duration::from_secs(2),
                max_ejection_percent: 10,
            })
        );
        assert_eq!(
            policy.load_balancer,
            Some(LoadBalancer::ConsistentHash(HashKey::Header(
                "x-user".into()
            )))
        );
        let simple = read(json!({
            "targetRefs": [{"kind": "Service", "name": "reviews"}],
            "outlierDetection": {"successRateStdevFactor": 1900},
            "loadBalancer": {"simple": "ROUND_ROBIN"},
        }));
        assert_eq!(simple.load_balancer, Some(LoadBalancer::RoundRobin));
        let rate = simple.outlier_detection.unwrap().success_rate.unwrap();
        assert_eq!((rate.minimum_hosts, rate.request_volume), (5, 100));
    }

    #[test]
    fn outlier_and_load_balancer_errors_name_the_field() {
        let service = json!([{"kind": "Service", "name": "r"}]);
        let route =
            json!([{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": "r"}]);
        let cases = [
            (
                json!({"targetRefs": route, "outlierDetection": {}}),
                "outlierDetection",
            ),
            (
                json!({"targetRefs": route, "loadBalancer": {"simple": "RANDOM"}}),
                "loadBalancer",
            ),
            (
                json!({"targetRefs": service, "outlierDetection": {"interval": "soon"}}),
                "outlierDetection.interval",
            ),
            (
                json!({"targetRefs": service, "outlierDetection": {"baseEjectionTime": "0s"}}),
                "outlierDetection.baseEjectionTime",
            ),
            (
                json!({"targetRefs": service, "outlierDetection": {"maxEjectionPercent": 101}}),
                "outlierDetection.maxEjectionPercent",
            ),
            (
                json!({"targetRefs": service, "outlierDetection": {"consecutive5xxErrors": -1}}),
                "outlierDetection.consecutive5xxErrors",
            ),
            (
                json!({"targetRefs": service, "outlierDetection": {"consecutive5xx": 3}}),
                "outlierDetection",
            ),
            (
                json!({"targetRefs": service, "outlierDetection": {"successRateStdevFactor": 0}}),
                "outlierDetection.successRateStdevFactor",
            ),
            (
                json!({"targetRefs": service, "outlierDetection": {"successRateRequestVolume": 10}}),
                "outlierDetection.successRateRequestVolume",
            ),
            (
                json!({"targetRefs": service, "loadBalancer": {}}),
                "loadBalancer",
            ),
            (
                json!({"targetRefs": service, "loadBalancer": {"simple": "LEAST_CONN"}}),
                "loadBalancer.simple",
            ),
            (
                json!({"targetRefs": service, "loadBalancer": {"simple": "RANDOM", "consistentHash": {"useSourceIp": true}}}),
                "loadBalancer.consistentHash",
            ),
            (
                json!({"targetRefs": service, "loadBalancer": {"consistentHash": {}}}),
                "loadBalancer.consistentHash",
            ),
            (
                json!({"targetRefs": service, "loadBalancer": {"consistentHash": {"useSourceIp": true, "httpHeaderName": "x"}}}),
                "loadBalancer.consistentHash",
            ),
            (
                json!({"targetRefs": service, "loadBalancer": {"consistentHash": {"httpHeaderName": "bad header"}}}),
                "loadBalancer.consistentHash.httpHeaderName",
            ),
            (
                json!({"targetRefs": service, "loadBalancer": {"consistentHash": {"httpCookie": {"name": "a;b"}}}}),
                "loadBalancer.consistentHash.httpCookie.name",
            ),
            (
                json!({"targetRefs": service, "loadBalancer": {"consistentHash": {"useSourceIp": false}}}),
                "loadBalancer.consistentHash.useSourceIp",
            ),
        ];
        for (spec, field) in cases {
            let e = object("trafficPolicies[0]", &manifest(spec.clone()), "default").unwrap_err();
            assert_eq!(
                e.field,
                format!("trafficPolicies[0].spec.{field}"),
                "{spec}: {e}"
            );
        }
    }

    #[test]
    fn a_route_retry_and_a_service_budget_are_read_with_their_defaults() {
        let route = json!([{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute",
            "name": "reviews", "sectionName": "canary"}]);
        let policy = object(
            "",
            &manifest(json!({
                "targetRefs": route,
                "retry": {"on": ["5xx", "reset", "5xx"], "backoff": {"max": "2s"}},
            })),
            "default",
        )
        .unwrap();
        assert_eq!(
            policy.retry,
            Some(RetryPolicy {
                on: vec![RetryOn::ServerError, RetryOn::Reset],
                max_backoff: std::time::Duration::from_secs(2),
            })
        );
        let policy = object(
            "",
            &manifest(json!({"targetRefs": route, "retry": {}})),
            "default",
        )
        .unwrap();
        assert_eq!(policy.retry, Some(RetryPolicy::default()));
        let service = json!([{"kind": "Service", "name": "reviews"}]);
        let budget = |spec: Value| {
            object(
                "",
                &manifest(json!({"targetRefs": service, "retryBudget": spec})),
                "default",
            )
            .unwrap()
            .retry_budget
        };
        assert_eq!(
            budget(json!({"percent": 50})),
            Some(RetryBudget {
                percent: 50,
                min_retry_concurrency: 3
            })
        );
        assert_eq!(budget(json!({})), Some(RetryBudget::default()));
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                json!({"targetRefs": []}),
                "trafficPolicies[0].spec.targetRefs",
            ),
            (
                json!({"targetRefs": (0..17).map(|i| json!({"kind": "Service", "name": format!("s{i}")})).collect::<Vec<_>>()}),
                "trafficPolicies[0].spec.targetRefs",
            ),
            (
                json!({"targetRefs": [{"group": "", "kind": "Pod", "name": "r"}]}),
                "trafficPolicies[0].spec.targetRefs[0].kind",
            ),
            (
                json!({"targetRefs": [{"kind": "Service", "name": "r", "sectionName": "http"}]}),
                "trafficPolicies[0].spec.targetRefs[0].sectionName",
            ),
            (
                json!({"targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": "r"}],
                       "connectionPool": {"maxConnections": 1}}),
                "trafficPolicies[0].spec.connectionPool",
            ),
            (
                json!({"targetRefs": [{"kind": "Service", "name": "Bad_Name"}]}),
                "trafficPolicies[0].spec.targetRefs[0].name",
            ),
            (
                json!({"targetRefs": [{"kind": "Service", "name": "r"}], "connectionPool": {"maxConnections": 0}}),
                "trafficPolicies[0].spec.connectionPool.maxConnections",
            ),
            (
                json!({"targetRefs": [{"kind": "Service", "name": "r"}], "connectionPool": {"maxConections": 5}}),
                "trafficPolicies[0].spec.connectionPool",
            ),
            (
                json!({"targetRefs": [{"kind": "Service", "name": "r"}], "connectionPool": {"maxRequests": -1}}),
                "trafficPolicies[0].spec.connectionPool.maxRequests",
            ),
        ];
        let route = json!([{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": "web", "sectionName": "api"}]);
        let service = json!([{"kind": "Service", "name": "r"}]);
        let more = [
            (
                json!({"targetRefs": service, "fault": {"abort": {"httpStatus": 503, "percentage": 1}}}),
                "trafficPolicies[0].spec.fault",
            ),
            (
                json!({"targetRefs": route, "fault": {}}),
                "trafficPolicies[0].spec.fault",
            ),
            (
                json!({"targetRefs": route, "fault": {"abort": {"httpStatus": 700, "percentage": 1}}}),
                "trafficPolicies[0].spec.fault.abort.httpStatus",
            ),
            (
                json!({"targetRefs": route, "fault": {"abort": {"httpStatus": 503, "percentage": 101}}}),
                "trafficPolicies[0].spec.fault.abort.percentage",
            ),
            (
                json!({"targetRefs": route, "fault": {"delay": {"fixedDelay": "soon", "percentage": 1}}}),
                "trafficPolicies[0].spec.fault.delay.fixedDelay",
            ),
            (
                json!({"targetRefs": route, "fault": {"delay": {"fixedDelay": "2h", "percentage": 1}}}),
                "trafficPolicies[0].spec.fault.delay.fixedDelay",
            ),
            (
                json!({"targetRefs": route, "rateLimit": {"maxTokens": 0, "fillInterval": "1s"}}),
                "trafficPolicies[0].spec.rateLimit.maxTokens",
            ),
            (
                json!({"targetRefs": route, "rateLimit": {"maxTokens": 1, "tokensPerFill": 0, "fillInterval": "1s"}}),
                "trafficPolicies[0].spec.rateLimit.tokensPerFill",
            ),
            (
                json!({"targetRefs": route, "rateLimit": {"maxTokens": 1, "fillInterval": "0s"}}),
                "trafficPolicies[0].spec.rateLimit.fillInterval",
            ),
            (
                json!({"targetRefs": [{"kind": "Service", "name": "r"}], "retry": {"on": ["5xx"]}}),
                "trafficPolicies[0].spec.retry",
            ),
            (
                json!({"targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": "r"}],
                       "retryBudget": {"percent": 20}}),
                "trafficPolicies[0].spec.retryBudget",
            ),
            (
                json!({"targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": "r"}],
                       "retry": {"on": ["5xx", "retriable-4xx"]}}),
                "trafficPolicies[0].spec.retry.on[1]",
            ),
            (
                json!({"targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": "r"}],
                       "retry": {"on": []}}),
                "trafficPolicies[0].spec.retry.on",
            ),
            (
                json!({"targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": "r"}],
                       "retry": {"backoff": {"max": "2 seconds"}}}),
                "trafficPolicies[0].spec.retry.backoff.max",
            ),
            (
                json!({"targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": "r"}],
                       "retry": {"backoff": {"max": "0s"}}}),
                "trafficPolicies[0].spec.retry.backoff.max",
            ),
            (
                json!({"targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": "r"}],
                       "retry": {"backoff": {"base": "1s"}}}),
                "trafficPolicies[0].spec.retry.backoff",
            ),
            (
                json!({"targetRefs": [{"kind": "Service", "name": "r"}], "retryBudget": {"percent": 101}}),
                "trafficPolicies[0].spec.retryBudget.percent",
            ),
            (
                json!({"targetRefs": [{"kind": "Service", "name": "r"}], "retryBudget": {"percent": -5}}),
                "trafficPolicies[0].spec.retryBudget.percent",
            ),
            (
                json!({"targetRefs": [{"kind": "Service", "name": "r"}], "retryBudget": {"minRetryConcurency": 5}}),
                "trafficPolicies[0].spec.retryBudget",
            ),
        ];
        for (spec, field) in cases.into_iter().chain(more) {
            let e = object("trafficPolicies[0]", &manifest(spec.clone()), "default").unwrap_err();
            assert_eq!(e.field, field, "{spec}: {e}");
        }
        let mut wrong_kind = manifest(json!({}));
        wrong_kind["kind"] = json!("DestinationRule");
        let e = object("trafficPolicies[0]", &wrong_kind, "default").unwrap_err();
        assert_eq!(e.field, "trafficPolicies[0].kind");
    }
}
