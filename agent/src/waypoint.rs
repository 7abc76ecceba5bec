//! The waypoint: an L7 proxy for the services bound to it (`weft.dev/use-waypoint`).
//!
//! It terminates HBONE (`hbone`'s server, presenting the waypoint's own identity),
//! takes the CONNECT `:authority` as the original destination (a bound service's VIP:port,
//! or the pod IP:port of one of its endpoints), and serves HTTP/1.1, HTTP/2 and gRPC on the
//! tunnelled stream (`server`). Per request, `plan` makes the decisions of steps 1 to 4
//! (pure functions, no I/O) and `request` does the sending:
//!
//! 1. `route`: the Gateway API rule of the service's routes that the request matches
//!    (precedence as the Gateway API orders it); no route at all: the service itself;
//! 2. `filters`: redirect, header modifiers, URL rewrite, mirror;
//! 3. `backend`: a weighted backend, then one of its endpoints at the target port, by the
//!    Service's load balancer, leaving out those outlier detection ejected (`hosts` keeps
//!    what is known of each endpoint);
//! 4. `authn`: the end user's token, checked when the Service addressed has a
//!    `requestAuthentication` (401 when invalid); then L7 access policy
//!    (`policy::PolicyIndex`) for that endpoint, with the client's identity, the end user's
//!    principal and claims, and the request's method, path and headers; a mirror's copy is sent only
//!    once the primary passed, and only if the mirror endpoint's policy admits it too;
//! 5. `retry`: tries with per-try and request timeouts, retries with jittered backoff for
//!    replayable requests;
//! 6. `upstream`: pooled HTTP/1.1 or HTTP/2 client connections over HBONE to the endpoint's
//!    port 15008, as the waypoint's identity;
//! 7. `metrics` and `access_log`: Istio's HTTP metrics, one JSON line per request, a span
//!    when an exporter is configured.
//!
//! Every HBONE connection, CONNECT stream and request holds a guard of the waypoint's
//! `drain::Drain`; `shutdown` drains them (GOAWAY, close after the response) within a limit.
//!
//! Inputs: the snapshot (`state::StateHandle`), certificates (`identity::CertSource`).
//! Outputs: served requests, metrics, access-log lines, spans.

mod access_log;
mod authn;
mod backend;
mod breaker;
mod fault;
mod filters;
mod hosts;
mod listener;
mod metrics;
mod observe;
pub mod path;
mod plan;
mod rate_limit;
mod request;
mod retry;
mod route;
mod server;
mod shutdown;
mod upstream;
mod wire;

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use serde::Serialize;

pub use metrics::Metrics;
pub use route::RouteTable;
pub use server::Waypoint;
pub use shutdown::{DRAIN_METRICS, Shutdown};
#[doc(hidden)] // for the fuzz target `hbone_headers`.
pub use {server::forwarded_for, wire::host_without_port};

use upstream::Upstreams;

use crate::{
    drain::Drain,
    hbone,
    identity::SpiffeId,
    jwt::JwksCache,
    policy::PolicyIndex,
    state::{
        Snapshot, StateHandle, Target as PolicyTarget, WorkloadRef,
        gateway::ListenerProtocol,
        traffic::{self, Fault, RateLimit, RetryPolicy},
    },
    sync::Mutex,
    telemetry::{AccessLog, trace::SpanExporter},
};

/// A request the waypoint could not forward, with a stable reason.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no route rule matches the request")]
    NoRoute,
    #[error("the route rule has no backend with a weight above 0")]
    NoBackend,
    #[error("service {0} is not in the snapshot")]
    UnknownService(WorkloadRef),
    #[error("service {service} has no port {port}")]
    UnknownPort { service: WorkloadRef, port: u16 },
    #[error("service {0} has no endpoints")]
    NoEndpoints(WorkloadRef),
    #[error("endpoint {0} is not a known workload (its identity is unknown)")]
    UnknownEndpoint(std::net::IpAddr),
    #[error("denied by access policy ({reason})")]
    PolicyDenied {
        reason: &'static str,
        policy: Option<WorkloadRef>,
    },
    #[error("cannot open an HBONE stream to the backend: {0}")]
    Hbone(#[from] hbone::Error),
    #[error("HTTP handshake with the backend failed: {0}")]
    Handshake(#[source] hyper::Error),
    #[error("the backend failed the request: {0}")]
    Upstream(#[source] hyper::Error),
    #[error("the backend did not answer within the per-try timeout")]
    TryTimeout,
    #[error("the request did not complete within the route's request timeout")]
    RequestTimeout,
    #[error("cannot build the request to the backend: {0}")]
    BadRequest(String),
    #[error("reading the request body failed: {0}")]
    Downstream(String),
    #[error("refused the request's path: {0}")]
    Path(#[from] path::Error),
    #[error("the backend service's connection pool is full ({})", .0.name())]
    Overflow(breaker::Limit),
    #[error("rate limited by TrafficPolicy {policy}; a token is back in {retry_after:?}")]
    RateLimited {
        policy: WorkloadRef,
        retry_after: Duration,
    },
    #[error("fault injected by TrafficPolicy {policy}: abort with {status}")]
    FaultAbort { policy: WorkloadRef, status: u16 },
    #[error("the end-user token is not valid for TrafficPolicy {policy} ({reason})")]
    Unauthenticated {
        policy: WorkloadRef,
        reason: &'static str,
    },
}

impl Error {
    /// Stable, snake_case reason: access-log `error`, metric-free detail.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::NoRoute => "no_route",
            Error::NoBackend => "no_backend",
            Error::UnknownService(_) => "unknown_service",
            Error::UnknownPort { .. } => "unknown_port",
            Error::NoEndpoints(_) => "no_endpoints",
            Error::UnknownEndpoint(_) => "unknown_endpoint",
            Error::PolicyDenied { .. } => "policy_denied",
            Error::Hbone(e) => e.reason(),
            Error::Handshake(_) => "upstream_handshake",
            Error::Upstream(_) => "upstream_failed",
            Error::TryTimeout => "try_timeout",
            Error::RequestTimeout => "request_timeout",
            Error::BadRequest(_) => "bad_request",
            Error::Downstream(_) => "downstream",
            Error::Path(e) => e.reason(),
            Error::Overflow(_) => "overflow",
            Error::RateLimited { .. } => "rate_limited",
            Error::FaultAbort { .. } => "fault_abort",
            Error::Unauthenticated { .. } => "unauthenticated",
        }
    }

    /// Envoy-style `response_flags` of a request that failed with this error.
    pub fn response_flags(&self) -> &'static str {
        match self {
            Error::NoRoute => "NR",
            Error::NoBackend | Error::UnknownService(_) | Error::UnknownPort { .. } => "NR",
            Error::NoEndpoints(_) | Error::UnknownEndpoint(_) => "UH",
            Error::PolicyDenied { .. } => "RBAC",
            Error::Hbone(_) | Error::Handshake(_) => "UF",
            Error::Upstream(_) => "UC",
            Error::TryTimeout | Error::RequestTimeout => "UT",
            Error::BadRequest(_) | Error::Downstream(_) | Error::Path(_) => "DPE",
            Error::Overflow(_) => "UO",
            Error::RateLimited { .. } => "RL",
            Error::FaultAbort { .. } => "FI",
            // Envoy has no flag for a JWT refusal: the 401 and the access log's error say it.
            Error::Unauthenticated { .. } => "-",
        }
    }

    /// How a try that failed so ended, for the retry conditions; `None`: another try
    /// would end the same (or is not for the retry conditions to decide).
    pub fn failure(&self) -> Option<retry::Failure> {
        match self {
            // The backend's proxy refused the waypoint by policy: another try gets the same.
            Error::Hbone(hbone::Error::PolicyDenied) => None,
            Error::Hbone(_) | Error::Handshake(_) => Some(retry::Failure::Connect),
            Error::Upstream(_) | Error::TryTimeout => Some(retry::Failure::Reset),
            _ => None,
        }
    }
}

/// The waypoint's settings, fixed at start-up.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Config {
    /// Namespace and name: services bound with `weft.dev/use-waypoint: <name>` in that
    /// namespace are the ones served.
    pub name: WorkloadRef,
    /// The identity the waypoint proves, both ways.
    pub identity: SpiffeId,
    /// HBONE listener.
    pub listen_addr: SocketAddr,
    /// The backends' HBONE port (15008; tests use another).
    pub upstream_port: u16,
    /// Pooled HTTP connections to a backend idle this long are closed.
    #[serde(with = "humantime_serde")]
    pub upstream_idle_timeout: Duration,
    /// Largest request body kept for retries and mirrors; bigger ones are streamed once.
    pub replay_buffer: usize,
    /// What a path's `%2F`, `%5C` and `\` mean (`path`): refused by default.
    pub path_escaped_slashes: path::EscapedSlashes,
    /// After the signal, how long the waypoint still accepts (not ready) before its drain
    /// starts: Kubernetes removes its endpoint as it signals it, and every node's agent
    /// sends it connections until it has seen that.
    #[serde(with = "humantime_serde")]
    pub listen_grace: Duration,
    /// How long a drain (shutdown) serves what is open; what is still open then is cut.
    #[serde(with = "humantime_serde")]
    pub drain_limit: Duration,
    /// PEM certificates trusted for fetching end-user token key sets (JWKS), besides the
    /// system's roots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwks_ca_file: Option<std::path::PathBuf>,
}

impl Config {
    /// Defaults for everything but who the waypoint is.
    pub fn new(name: WorkloadRef, identity: SpiffeId) -> Self {
        Self {
            name,
            identity,
            listen_addr: SocketAddr::from(([0, 0, 0, 0], hbone::PORT)),
            upstream_port: hbone::PORT,
            upstream_idle_timeout: Duration::from_secs(90),
            replay_buffer: 64 * 1024,
            path_escaped_slashes: path::EscapedSlashes::default(),
            listen_grace: Duration::ZERO,
            drain_limit: DEFAULT_DRAIN_LIMIT,
            jwks_ca_file: None,
        }
    }
}

/// Serializes `Duration` as humantime text.
mod humantime_serde {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }
}

/// What the waypoint's tunnels and requests share: settings, the view of the current
/// snapshot, the upstream pool, telemetry.
struct Inner {
    pub config: Config,
    pub trust_domain: String,
    state: StateHandle,
    view: Mutex<Arc<View>>,
    pub upstreams: Upstreams,
    /// Connection-pool limits and counters, per backend Service.
    pub breakers: breaker::Breakers,
    /// Rate-limit token buckets.
    pub buckets: rate_limit::Buckets,
    /// Requests in flight, errors and ejections, per endpoint of each backend Service.
    pub hosts: hosts::Hosts,
    pub metrics: Metrics,
    pub access_log: AccessLog,
    pub exporter: Option<Arc<dyn SpanExporter>>,
    /// Tracks HBONE connections, their streams and the requests in them, for shutdown.
    pub drain: Drain,
    /// The key sets of end-user token issuers, fetched over HTTPS.
    pub jwks: JwksCache,
}

/// What one snapshot means for routing: the snapshot, its routes by service, its
/// policies by workload.
struct View {
    pub snapshot: Arc<Snapshot>,
    pub routes: RouteTable,
    pub policy: PolicyIndex,
    /// The connection pool and retry budget of each Service a `TrafficPolicy` gives one.
    pub limits: breaker::LimitsByService,
    /// Faults by target (HTTPRoute or rule), with the policy each comes from.
    pub faults: Attached<Fault>,
    /// Rate limits by target (Service, HTTPRoute or rule), with their policy.
    pub rate_limits: Attached<RateLimit>,
    /// The load balancer and outlier detection of each Service a `TrafficPolicy` gives one.
    pub balancings: hosts::Balancings,
    /// Retry conditions and maximum backoff by target (HTTPRoute or rule), with their
    /// policy.
    pub retries: Attached<RetryPolicy>,
    /// End-user authentication of each Service a `TrafficPolicy` gives one.
    pub authenticators: authn::Authenticators,
}

/// A feature of `TrafficPolicy` by target, with the policy in force there.
type Attached<T> = HashMap<PolicyTarget, (WorkloadRef, T)>;

impl View {
    /// What `snapshot` means, with `policy` (rebuilt from the previous view's index).
    fn build(snapshot: Arc<Snapshot>, policy: &PolicyIndex) -> Self {
        Self {
            routes: RouteTable::build(&snapshot),
            policy: policy.rebuild(&snapshot),
            limits: breaker::limits(&snapshot),
            faults: traffic::by_target(&snapshot.traffic_policies, |p| p.fault.as_ref()),
            rate_limits: traffic::by_target(&snapshot.traffic_policies, |p| p.rate_limit.as_ref()),
            balancings: hosts::balancings(&snapshot),
            retries: traffic::by_target(&snapshot.traffic_policies, |p| p.retry.as_ref()),
            authenticators: authn::authenticators(&snapshot),
            snapshot,
        }
    }

    /// A route-attached feature for a request that took `route`'s rule `rule`: the rule's
    /// own (`sectionName`) first, else the whole route's; with its target and policy.
    fn for_route<'a, T>(
        attached: &'a Attached<T>,
        route: &WorkloadRef,
        rule: Option<&str>,
    ) -> Option<(&'a PolicyTarget, &'a WorkloadRef, &'a T)> {
        if attached.is_empty() {
            return None;
        }
        let of_rule = rule.map(|rule| PolicyTarget::Route {
            route: route.clone(),
            rule: Some(rule.to_owned()),
        });
        let of_route = PolicyTarget::Route {
            route: route.clone(),
            rule: None,
        };
        of_rule
            .and_then(|t| attached.get_key_value(&t))
            .or_else(|| attached.get_key_value(&of_route))
            .map(|(target, (policy, feature))| (target, policy, feature))
    }

    /// How the endpoints of `service` are chosen.
    fn balancing(&self, service: &WorkloadRef) -> &hosts::Balancing {
        self.balancings
            .get(service)
            .unwrap_or(&hosts::DEFAULT_BALANCING)
    }
}

/// Something kept per backend Service for as long as the waypoint runs (`Breakers`,
/// `Hosts`), forgotten once the Service is gone and nothing holds it.
struct PerService<T> {
    by_service: Mutex<HashMap<WorkloadRef, Arc<T>>>,
}

impl<T> Default for PerService<T> {
    fn default() -> Self {
        Self {
            by_service: Mutex::new(HashMap::new()),
        }
    }
}

impl<T> PerService<T> {
    /// The one of `service`, made by `new` the first time.
    fn of(&self, service: &WorkloadRef, new: impl FnOnce() -> T) -> Arc<T> {
        let mut by_service = self.by_service.lock();
        let item = by_service
            .entry(service.clone())
            .or_insert_with(|| Arc::new(new()));
        Arc::clone(item)
    }

    /// Forgets those of Services `keep` refuses that nothing holds.
    fn retain(&self, keep: impl Fn(&WorkloadRef) -> bool) {
        self.by_service
            .lock()
            .retain(|service, item| keep(service) || Arc::strong_count(item) > 1);
    }
}

/// The original destination of a CONNECT.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Target {
    /// A bound service's VIP and port: routed.
    Service { service: WorkloadRef, port: u16 },
    /// One pod of a bound service, at a target port: that pod only, no routes.
    Pod {
        addr: SocketAddr,
        service: WorkloadRef,
    },
    /// A port of a gateway's listeners, over plain HTTP or TLS: routed by the routes of
    /// the listener the request's host picks.
    Listener {
        gateway: WorkloadRef,
        port: u16,
        protocol: ListenerProtocol,
    },
}

impl Target {
    /// The Service the client addressed (directly, or through one of its pods); `None`
    /// for a gateway listener, which addresses no Service.
    fn service(&self) -> Option<&WorkloadRef> {
        match self {
            Target::Service { service, .. } | Target::Pod { service, .. } => Some(service),
            Target::Listener { .. } => None,
        }
    }
}

/// One accepted CONNECT stream: who sent it and where it was going.
pub struct Tunnel {
    inner: Arc<Inner>,
    target: Target,
    peer_identity: SpiffeId,
    /// The original client: `forwarded: for=` when it names a workload of the peer's
    /// identity, else the peer's own address.
    source: SocketAddr,
}

/// Fits Kubernetes' default grace period (30 s) with room for the process to exit.
pub const DEFAULT_DRAIN_LIMIT: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests;
