//! weft's custom resources, `weft.dev/v1alpha1`, as Rust types: the Kubernetes source
//! watches them and `cargo xtask gen` writes their CustomResourceDefinitions (schema,
//! printer columns, status subresource) into the Helm chart from `files()`.
//!
//! - `AccessPolicy`: the file source's `policies:` item as a namespaced resource (the spec is
//!   `source::syntax`'s, so both are the same model and validated by the same code).
//! - `PeerAuthentication`: the mTLS mode (STRICT, PERMISSIVE, DISABLED) of a namespace, or of
//!   the workloads its selector picks. Named and shaped like Istio's resource of the same
//!   job (`spec.selector.matchLabels`, `spec.mtls.mode`), which is where Istio users look.
//! - `ExternalService`: the file source's `externalServices:` item as a namespaced resource
//!   (validated by `source::external`); one that cannot be understood is left out of the
//!   registry and says why in its `Accepted` condition.
//!
//! Those three carry `status.conditions` (type `Accepted`): True when in force as written,
//! False naming the field at fault when the resource fails closed. One elected agent writes
//! it (`accepted`), since one status written by every node would flap.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{
    source::syntax::{RuleSpec, SelectorSpec, TargetRefSpec},
    state::{Action, MtlsMode},
};
// The external services' enums are the state's own: one spelling in the file, the CRD and
// the snapshot.
use crate::state::external::{Protocol, Resolution};

/// Allows or denies connections to the workloads it selects (docs/policy.md).
#[derive(CustomResource, Clone, Debug, PartialEq, Deserialize, Serialize, JsonSchema)]
#[kube(
    group = "weft.dev",
    version = "v1alpha1",
    kind = "AccessPolicy",
    namespaced,
    status = "PolicyStatus",
    shortname = "ap",
    category = "weft",
    printcolumn = r#"{"name":"Action","type":"string","jsonPath":".spec.action"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    doc = "Allows or denies connections to the workloads of its namespace that it selects"
)]
#[serde(rename_all = "camelCase")]
pub struct AccessPolicySpec {
    /// The destination workloads, in the policy's namespace; absent: all of them (unless
    /// `targetRefs` names external services).
    #[serde(default)]
    pub selector: SelectorSpec,
    /// External services of the policy's namespace (group `weft.dev`, kind
    /// `ExternalService`) instead of workloads: the source pods' node proxies then judge
    /// their connections to these services. Exclusive with `selector`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_refs: Vec<TargetRefSpec>,
    /// ALLOW or DENY the connections the rules match. DENY wins; once an ALLOW policy
    /// selects a workload, connections no ALLOW policy matches are denied.
    pub action: Action,
    /// Matched when any rule matches; no rules match nothing.
    #[serde(default)]
    pub rules: Vec<RuleSpec>,
}

/// The mTLS mode of a namespace, or of the workloads its selector picks.
#[derive(CustomResource, Clone, Debug, PartialEq, Deserialize, Serialize, JsonSchema)]
#[kube(
    group = "weft.dev",
    version = "v1alpha1",
    kind = "PeerAuthentication",
    namespaced,
    status = "PolicyStatus",
    shortname = "pa",
    category = "weft",
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mtls.mode"}"#,
    printcolumn = r#"{"name":"Selector","type":"string","jsonPath":".spec.selector.matchLabels","priority":1}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    doc = "How workloads of its namespace treat plaintext: STRICT, PERMISSIVE or DISABLED"
)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthenticationSpec {
    /// The workloads of this namespace the mode applies to; absent: the whole namespace.
    /// A workload's own mode wins over its namespace's, which wins over the mesh default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<SelectorSpec>,
    /// The mode.
    pub mtls: MtlsSpec,
}

/// `spec.mtls` of a `PeerAuthentication`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MtlsSpec {
    /// STRICT: HBONE only; PERMISSIVE: plaintext accepted too; DISABLED: no mTLS.
    pub mode: MtlsMode,
}

/// How a waypoint treats the backends of the Services it targets (connection pools and
/// circuit breaking, outlier detection, load balancing, retry budgets, rate limits) and the
/// requests of the HTTPRoutes it targets (faults, rate limits, retries); docs/waypoint.md.
#[derive(CustomResource, Clone, Debug, PartialEq, Deserialize, Serialize, JsonSchema)]
#[kube(
    group = "weft.dev",
    version = "v1alpha1",
    kind = "TrafficPolicy",
    namespaced,
    status = "AttachedPolicyStatus",
    shortname = "tp",
    category = "weft",
    printcolumn = r#"{"name":"Target","type":"string","jsonPath":".spec.targetRefs[*].name"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    doc = "Resilience at the waypoint for the Services and HTTPRoutes it targets: connection pools, outlier detection, load balancing, retries, faults, rate limits, end-user authentication by JWT"
)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TrafficPolicySpec {
    /// The Services and HTTPRoutes (in the policy's namespace) it attaches to (Gateway API
    /// policy attachment). Where two policies set the same feature for one target, the
    /// older wins.
    #[schemars(length(min = 1, max = 16))]
    pub target_refs: Vec<TargetRefSpec>,
    /// Limits of the waypoint's connections and requests to each target's endpoints
    /// (Service targets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPoolSpec>,
    /// Passive health checking of each target's endpoints: ejection of those that fail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetectionSpec>,
    /// How an endpoint is chosen for each request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancerSpec>,
    /// Delays or aborts for a share of the requests (HTTPRoute targets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<FaultSpec>,
    /// A local token bucket per target, or per target and client (HTTPRoute or Service
    /// targets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitSpec>,
    /// Which failures of an HTTPRoute's (or rule's) tries are retried, and the longest
    /// pause between tries; refines the rule's `retry` (HTTPRoute targets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetrySpec>,
    /// Retries in flight to the Service as a share of its requests in flight (Service
    /// targets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_budget: Option<RetryBudgetSpec>,
    /// End-user authentication by JWT of the requests to each target (Istio's
    /// `RequestAuthentication`; Service targets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_authentication: Option<RequestAuthenticationSpec>,
}

/// Istio's `HTTPFaultInjection`: a delay, an abort, or both.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelaySpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbortSpec>,
}

/// Hold a share of the requests for `fixedDelay` before sending them on.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultDelaySpec {
    /// A Gateway API duration (`100ms`, `2s`), at most 1h.
    pub fixed_delay: String,
    /// The share of requests, 0 to 100 (`0.5` is one in two hundred).
    #[schemars(range(min = 0.0, max = 100.0))]
    pub percentage: f64,
}

/// Answer a share of the requests with `httpStatus`, without sending them.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultAbortSpec {
    /// 200 to 599.
    #[schemars(range(min = 200, max = 599))]
    pub http_status: u16,
    /// The share of requests, 0 to 100.
    #[schemars(range(min = 0.0, max = 100.0))]
    pub percentage: f64,
}

/// Envoy's `local_ratelimit` token bucket.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RateLimitSpec {
    /// The bucket's size: the burst allowed after a quiet time.
    #[schemars(range(min = 1))]
    pub max_tokens: u32,
    /// Tokens added every `fillInterval` (spread over it); absent: `maxTokens`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub tokens_per_fill: Option<u32>,
    /// A Gateway API duration, at least 1ms.
    pub fill_interval: String,
    /// A bucket per client identity instead of one for every client.
    #[serde(default)]
    pub per_client: bool,
}

/// Istio's `connectionPool` (tcp.maxConnections, http.http1MaxPendingRequests,
/// http.http2MaxRequests, http.maxRequestsPerConnection, http.maxRetries) in one place.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConnectionPoolSpec {
    /// HTTP connections open to the service's endpoints, idle or busy; absent: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_connections: Option<u32>,
    /// Requests waiting for a connection while `maxConnections` are busy; 0: none wait.
    /// Absent: 1024.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<u32>,
    /// Requests in flight to the service at once; absent: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_requests: Option<u32>,
    /// Requests one connection carries before it is closed; absent: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_requests_per_connection: Option<u32>,
    /// Retries in flight to the service at once; 0: no retries. Absent: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
}

/// Istio's `outlierDetection` (and Envoy's success-rate detection, which Istio does not
/// expose): an endpoint that fails too often gets no requests for a while.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OutlierDetectionSpec {
    /// 5xx answers (and connection failures, per-try timeouts) in a row that eject an
    /// endpoint; 0: off. Absent: 5.
    #[serde(
        rename = "consecutive5xxErrors",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub consecutive_5xx_errors: Option<u32>,
    /// 502, 503, 504 answers (and connection failures, per-try timeouts) in a row that
    /// eject an endpoint; 0 or absent: off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_gateway_errors: Option<u32>,
    /// How often success rates are judged (`10s`, `500ms`). Absent: 10s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    /// An ejection lasts this times the number of times the endpoint was ejected. Absent:
    /// 30s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_ejection_time: Option<String>,
    /// At most this percentage of the endpoints are ejected at once (one always may be).
    /// Absent: 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 100))]
    pub max_ejection_percent: Option<u32>,
    /// Success-rate detection: endpoints with at least `successRateRequestVolume` requests
    /// in an interval are judged, if there are at least this many of them. Absent: 5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success_rate_minimum_hosts: Option<u32>,
    /// Requests an endpoint must have served in the interval to be judged. Absent: 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success_rate_request_volume: Option<u32>,
    /// Turns success-rate detection on: an endpoint whose rate is below the mean minus this
    /// many thousandths of a standard deviation (1900: 1.9 σ) is ejected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub success_rate_stdev_factor: Option<u32>,
}

/// Istio's `loadBalancer`: `simple` or `consistentHash`, not both.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LoadBalancerSpec {
    /// `ROUND_ROBIN`, `LEAST_REQUEST` (the default) or `RANDOM`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub simple: Option<SimpleLoadBalancer>,
    /// Session affinity: one of `httpHeaderName`, `httpCookie`, `useSourceIp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistent_hash: Option<ConsistentHashSpec>,
}

/// Istio's `simple` load balancers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SimpleLoadBalancer {
    RoundRobin,
    LeastRequest,
    Random,
}

/// What a consistent hash is taken of: set exactly one.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConsistentHashSpec {
    /// A request header's value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_header_name: Option<String>,
    /// A cookie's value (the waypoint does not set the cookie).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_cookie: Option<HttpCookieSpec>,
    /// The original client's IP address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_source_ip: Option<bool>,
}

/// The cookie a consistent hash is taken of.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpCookieSpec {
    pub name: String,
}

/// Istio's `retries.retryOn` and Envoy's `retry_back_off.max_interval` for a route.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RetrySpec {
    /// Retried when a try ends with any of: `connect-failure`, `reset`, `5xx`,
    /// `gateway-error`, `retriable-status-codes` (the rule's `retry.codes`). Absent:
    /// `reset` and `retriable-status-codes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 5))]
    pub on: Option<Vec<String>>,
    /// The pauses between tries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<BackoffSpec>,
}

/// The pauses between tries: random up to the rule's `retry.backoff` × 2^n, capped.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BackoffSpec {
    /// No pause is longer (a Gateway API duration: `2s`, `500ms`); absent: 10s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<String>,
}

/// Envoy's `retry_budget`: retries in flight at most `percent` of the requests in flight,
/// or `minRetryConcurrency` where that is more.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RetryBudgetSpec {
    /// 0 to 100; absent: 20.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 100))]
    pub percent: Option<u32>,
    /// Retries in flight always allowed; absent: 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_retry_concurrency: Option<u32>,
}

/// Istio's `RequestAuthentication`: the issuers whose tokens are accepted.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RequestAuthenticationSpec {
    /// One per issuer. A request without a token passes unauthenticated (an AccessPolicy
    /// with `requestPrincipals` can require one); an invalid token is answered 401.
    #[schemars(length(min = 1, max = 8))]
    pub jwt_rules: Vec<JwtRuleSpec>,
}

/// Istio's `JWTRule`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct JwtRuleSpec {
    /// The token's `iss`, exactly.
    pub issuer: String,
    /// The token's `aud` must name one of these; absent or empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub audiences: Vec<String>,
    /// An HTTPS URL of the issuer's JSON Web Key Set; set this or `jwks`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_uri: Option<String>,
    /// The JSON Web Key Set itself, as JSON text; set this or `jwksUri`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks: Option<String>,
    /// How long a fetched key set is kept (`20m`); at least 1s. Absent: 20m.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_refresh_interval: Option<String>,
    /// How long one fetch of the key set may take (`5s`). Absent: 5s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_timeout: Option<String>,
    /// Headers the token may be in. Absent: `Authorization: Bearer <token>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 8))]
    pub from_headers: Option<Vec<JwtHeaderSpec>>,
    /// Query parameters the token may be in. Absent: `access_token` (when `fromHeaders` is
    /// absent too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 8))]
    pub from_params: Option<Vec<String>>,
    /// Leave the token in the request sent on. Absent: false (it is removed).
    #[serde(default)]
    pub forward_original_token: bool,
    /// Claims copied into request headers for the backend.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub output_claim_to_headers: Vec<ClaimToHeaderSpec>,
}

/// A header a token is read from.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct JwtHeaderSpec {
    pub name: String,
    /// Text before the token (`Bearer `); absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
}

/// A claim copied into a request header.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ClaimToHeaderSpec {
    pub header: String,
    /// A top-level claim.
    pub claim: String,
}

/// Status of a policy attached with `targetRefs`: GEP-713's `PolicyStatus`, one entry per
/// target (the ancestor, for a policy attached to a Service).
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AttachedPolicyStatus {
    /// Per target: `Accepted` True, or False with reason `Conflicted`, `TargetNotFound` or
    /// `Invalid`.
    #[serde(default)]
    pub ancestors: Vec<PolicyAncestorStatus>,
}

/// One ancestor's conditions (GEP-713).
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyAncestorStatus {
    /// The target.
    pub ancestor_ref: AncestorRef,
    /// `weft.dev/waypoint`.
    pub controller_name: String,
    /// `Accepted`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// A Gateway API `ParentReference` to the policy's target.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AncestorRef {
    pub group: String,
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

/// Status of a weft policy resource.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    /// `Accepted`: True once the policy is in force, False with the validation error.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// A service outside the mesh that enrolled pods reach by name (Istio's `ServiceEntry` with
/// `location: MESH_EXTERNAL`): the node proxy recognises its addresses, names it in
/// telemetry, lets access policy name it, originates TLS to it when a port asks, and lets
/// it through when the mesh is `REGISTRY_ONLY`. Validated by `source::external`, as the
/// file's `externalServices:` items are.
#[derive(CustomResource, Clone, Debug, PartialEq, Deserialize, Serialize, JsonSchema)]
#[kube(
    group = "weft.dev",
    version = "v1alpha1",
    kind = "ExternalService",
    namespaced,
    status = "PolicyStatus",
    shortname = "extsvc",
    category = "weft",
    printcolumn = r#"{"name":"Hosts","type":"string","jsonPath":".spec.hosts"}"#,
    printcolumn = r#"{"name":"Resolution","type":"string","jsonPath":".spec.resolution"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    doc = "A service outside the mesh (DNS names, ports, TLS origination) that enrolled pods may reach, by name"
)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ExternalServiceSpec {
    /// DNS names, no wildcard, no IP address; the first is what telemetry reports.
    #[schemars(length(min = 1, max = 16))]
    pub hosts: Vec<String>,
    /// DNS (default): the agent resolves every host; STATIC: the `addresses`.
    #[serde(default)]
    pub resolution: Resolution,
    /// STATIC only: the IP addresses of the hosts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub addresses: Vec<String>,
    /// The ports it serves, numbers unique.
    #[schemars(length(min = 1, max = 16))]
    pub ports: Vec<ExternalPortSpec>,
}

/// One port of an `ExternalService`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ExternalPortSpec {
    /// The port applications connect to.
    #[schemars(range(min = 1))]
    pub number: u16,
    /// Its name (lowercase letters, digits, '-', '.'); absent: none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// TCP (default), TLS, HTTP or HTTPS.
    #[serde(default)]
    pub protocol: Protocol,
    /// The port the proxy connects to on the host; absent: `number`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub target_port: Option<u16>,
    /// TLS origination: the application speaks plaintext (TCP or HTTP ports only), the
    /// proxy opens TLS to the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsOriginationSpec>,
}

/// The TLS the proxy opens to an external host.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TlsOriginationSpec {
    /// The name sent as SNI and checked against the server's certificate; absent: the
    /// first host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    /// PEM certificates of the CAs the server's certificate must chain to; absent: the
    /// system's roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 65536))]
    pub ca_certificates: Option<String>,
}

/// The CRD manifests of the chart, as (file name, YAML), in a stable order.
pub fn files() -> Vec<(String, String)> {
    [
        AccessPolicy::crd(),
        PeerAuthentication::crd(),
        TrafficPolicy::crd(),
        ExternalService::crd(),
    ]
    .into_iter()
    .map(|crd| {
        let name = format!("{}.yaml", crd.metadata.name.as_deref().unwrap_or("unnamed"));
        // Serializing generated API types into YAML cannot fail (no maps with non-string
        // keys, no non-finite floats).
        let yaml = serde_yaml::to_string(&crd).expect("BUG: CRD serializes to YAML");
        (name, format!("{HEADER}{yaml}"))
    })
    .collect()
}

/// Where the chart's CRDs live, relative to the workspace root.
pub const CHART_CRD_DIR: &str = "deploy/helm/weft/crds";

const HEADER: &str =
    "# Generated by `cargo xtask gen` from agent/src/source/kube/crd.rs: do not edit.\n";

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn generated_crds_in_the_chart_are_current() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(CHART_CRD_DIR);
        for (name, yaml) in files() {
            let path = dir.join(&name);
            let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                on_disk == yaml,
                "{} is stale or missing: run `cargo xtask gen` and commit the result",
                path.display()
            );
        }
    }

    #[test]
    fn schemas_validate_what_the_api_server_can_check() {
        let crd = serde_json::to_value(AccessPolicy::crd()).unwrap();
        let version = &crd["spec"]["versions"][0];
        assert_eq!(version["name"], "v1alpha1");
        assert!(version["subresources"]["status"].is_object());
        let spec = &version["schema"]["openAPIV3Schema"]["properties"]["spec"];
        assert_eq!(spec["required"], serde_json::json!(["action"]));
        assert_eq!(
            spec["properties"]["action"]["enum"],
            serde_json::json!(["ALLOW", "DENY"])
        );
        let rule = &spec["properties"]["rules"]["items"]["properties"];
        assert_eq!(rule["toPorts"]["items"]["x-kubernetes-int-or-string"], true);
        assert_eq!(rule["methods"]["items"]["pattern"], "^[A-Z]+$");
        assert_eq!(rule["from"]["items"]["minProperties"], 1);
        let columns: Vec<_> = version["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(columns, ["Action", "Accepted", "Age"]);

        let crd = serde_json::to_value(PeerAuthentication::crd()).unwrap();
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        assert_eq!(
            spec["properties"]["mtls"]["properties"]["mode"]["enum"],
            serde_json::json!(["STRICT", "PERMISSIVE", "DISABLED"])
        );
    }

    #[test]
    fn a_policy_resource_reads_the_file_syntax() {
        let policy: AccessPolicy = serde_yaml::from_str(
            r#"
apiVersion: weft.dev/v1alpha1
kind: AccessPolicy
metadata: {name: api-allow, namespace: prod}
spec:
  selector: {matchLabels: {app: api}}
  action: ALLOW
  rules:
    - from: [{serviceAccounts: ["web/front"]}]
      toPorts: [8080, "9000-9100"]
"#,
        )
        .unwrap();
        assert_eq!(policy.spec.action, Action::Allow);
        assert_eq!(policy.spec.rules[0].to_ports.len(), 2);
    }
}
