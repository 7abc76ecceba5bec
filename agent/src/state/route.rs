//! L7 routes: Gateway API `HTTPRoute` and `GRPCRoute` attached to Services (the GAMMA
//! pattern), validated into what a waypoint matches requests against. A `GRPCRoute` is
//! carried in the same shape: its service/method matches are path matches
//! (`/<service>/<method>`), since that is what gRPC puts on the wire.

use std::time::Duration;

use serde::{Serialize, Serializer};

use super::WorkloadRef;

/// One route object, valid as a whole.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRoute {
    /// Namespace and name of the route object.
    pub name: WorkloadRef,
    /// Which Gateway API kind it came from.
    pub kind: RouteKind,
    /// The Services (and ports) the route attaches to.
    pub parents: Vec<ParentRef>,
    /// The Gateways (and listeners) the route attaches to.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub gateway_parents: Vec<super::GatewayParent>,
    /// Host names the route is limited to (the request's `Host` / `:authority` without
    /// port); empty matches every host.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
    /// Rules, in the order of the object.
    pub rules: Vec<RouteRule>,
}

/// The Gateway API kind of a route.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum RouteKind {
    /// `HTTPRoute`.
    #[serde(rename = "HTTPRoute")]
    Http,
    /// `GRPCRoute`.
    #[serde(rename = "GRPCRoute")]
    Grpc,
    /// `TLSRoute`: a gateway's TLS passthrough, by SNI; its rules have backends only.
    #[serde(rename = "TLSRoute")]
    Tls,
    /// `TCPRoute`: a gateway's TCP listener; its rules have backends only.
    #[serde(rename = "TCPRoute")]
    Tcp,
}

/// A Service a route attaches to (`parentRefs` of kind Service).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ParentRef {
    /// The Service.
    pub service: WorkloadRef,
    /// Only this port of the Service; `None` for all of its ports.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

/// One rule: requests that match any of `matches` go to `backends`, after `filters`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteRule {
    /// The rule's `name`, for metrics and logs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Any of these (OR). Empty matches every request (an HTTPRoute rule without
    /// matches is `PathPrefix /`).
    pub matches: Vec<RequestMatch>,
    /// Applied to every request of the rule, in order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<Filter>,
    /// Weighted backends. Empty (or all weights zero) answers 500, as the Gateway API
    /// asks for a rule without a usable backend.
    pub backends: Vec<Backend>,
    /// Request and per-try timeouts.
    pub timeouts: Timeouts,
    /// Retries of failed tries.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry: Option<Retry>,
}

/// Conditions of one match, all of which must hold (AND).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestMatch {
    /// The path (without the query).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    /// The method, uppercase (`GET`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Request headers, each of which must match.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
    /// Query parameters, each of which must match.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub query_params: Vec<QueryParamMatch>,
}

/// How a request path is matched.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum PathMatch {
    /// The whole path, byte for byte.
    Exact(String),
    /// Whole path segments: `/api` matches `/api` and `/api/x`, not `/apix`.
    Prefix(String),
    /// A regular expression matching the whole path.
    Regex(Pattern),
}

/// A request header condition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HeaderMatch {
    /// Header name, lowercase.
    pub name: String,
    /// Condition on the value.
    pub value: ValueMatch,
}

/// A query parameter condition (the first occurrence of the name counts).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct QueryParamMatch {
    /// Parameter name, exact (case-sensitive).
    pub name: String,
    /// Condition on the value.
    pub value: ValueMatch,
}

/// A condition on a header or query-parameter value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum ValueMatch {
    /// Equal, byte for byte.
    Exact(String),
    /// A regular expression matching the whole value.
    Regex(Pattern),
}

/// A compiled regular expression, anchored at both ends, compared and serialized as the
/// text it was written as.
#[derive(Clone, Debug)]
pub struct Pattern {
    /// As written in the route.
    source: String,
    /// `^(?:source)$`.
    regex: regex::Regex,
}

/// A request or response filter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Filter {
    /// Changes the request headers sent to the backend.
    RequestHeaders(HeaderModifier),
    /// Changes the response headers sent to the client.
    ResponseHeaders(HeaderModifier),
    /// Sends a copy of the request to another backend; its response is dropped.
    Mirror(Mirror),
    /// Answers with a redirect instead of forwarding.
    Redirect(Redirect),
    /// Rewrites the host and/or path sent to the backend.
    UrlRewrite(UrlRewrite),
}

/// Header changes, applied as set, then add, then remove.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HeaderModifier {
    /// Replace (or create) these headers; names lowercase.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub set: Vec<(String, String)>,
    /// Append these values; names lowercase.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<(String, String)>,
    /// Remove these headers; names lowercase.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

/// A request mirror.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Mirror {
    /// Where the copies go.
    pub backend: ServiceRef,
    /// Share of requests mirrored, in parts per million (1_000_000 = all).
    pub parts_per_million: u32,
}

/// A redirect answer (`requestRedirect`). Fields left `None` keep the request's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Redirect {
    /// `http` or `https`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    /// The host of the `location`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// How the path changes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathRewrite>,
    /// The port of the `location`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// 301 (the default), 302, 303, 307 or 308.
    pub status: u16,
}

/// A rewrite of what is sent to the backend (`urlRewrite`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UrlRewrite {
    /// Replaces the `Host` / `:authority`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// How the path changes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathRewrite>,
}

/// A path change of a redirect or rewrite.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum PathRewrite {
    /// The whole path becomes this.
    ReplaceFullPath(String),
    /// The part matched by the rule's `Prefix` path match becomes this.
    ReplacePrefixMatch(String),
}

/// A weighted backend of a rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Backend {
    /// The Service and its port.
    pub service: ServiceRef,
    /// Relative weight (Gateway API default 1); 0 takes no traffic.
    pub weight: u32,
    /// Filters for requests sent to this backend only, after the rule's.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<Filter>,
}

/// A Service port a route sends to: requests go to the Service's endpoints at the
/// matching target port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceRef {
    /// Namespace and name of the Service.
    pub name: WorkloadRef,
    /// The Service port.
    pub port: u16,
}

/// Timeouts of a rule (`timeouts`); `None` is no limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Timeouts {
    /// From the request's arrival to its response's headers, all retries included: past
    /// it the client gets 504.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "humantime_opt"
    )]
    pub request: Option<Duration>,
    /// The same for each try at a backend.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "humantime_opt"
    )]
    pub backend_request: Option<Duration>,
}

/// Retries of a rule (`retry`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Retry {
    /// Retries after the first try (so `attempts + 1` tries at most).
    pub attempts: u32,
    /// Response codes that are retried (connection failures and per-try timeouts always
    /// are).
    pub codes: Vec<u16>,
    /// Base of the exponential backoff between tries, with jitter.
    #[serde(serialize_with = "humantime")]
    pub backoff: Duration,
}

impl Pattern {
    /// Compiles `source` to match whole strings only.
    pub fn new(source: &str) -> Result<Self, regex::Error> {
        Ok(Self {
            source: source.to_string(),
            regex: regex::Regex::new(&format!("^(?:{source})$"))?,
        })
    }

    /// Whether `text` matches as a whole.
    pub fn matches(&self, text: &str) -> bool {
        self.regex.is_match(text)
    }

    /// As written in the route.
    pub fn as_str(&self) -> &str {
        &self.source
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Eq for Pattern {}

impl Serialize for Pattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.source)
    }
}

impl std::fmt::Display for RouteKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RouteKind::Http => "HTTPRoute",
            RouteKind::Grpc => "GRPCRoute",
            RouteKind::Tls => "TLSRoute",
            RouteKind::Tcp => "TCPRoute",
        })
    }
}

pub(super) fn humantime<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_duration(*d))
}

fn humantime_opt<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => humantime(d, s),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_whole_strings_and_compare_by_text() {
        let p = Pattern::new("/v[0-9]+/.*").unwrap();
        assert!(p.matches("/v2/users"));
        assert!(!p.matches("/api/v2/users"), "anchored at the start");
        assert!(
            !Pattern::new("a|b").unwrap().matches("ab"),
            "alternation stays inside"
        );
        assert_eq!(p, Pattern::new("/v[0-9]+/.*").unwrap());
        assert_eq!(serde_json::to_string(&p).unwrap(), "\"/v[0-9]+/.*\"");
        assert!(Pattern::new("(").is_err());
    }
}
