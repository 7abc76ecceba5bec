//! Which route rule a request takes: the routes whose parents name the service (and the
//! port, if they set one), or the gateway listener; then the Gateway API precedence among
//! the matches that hold: exact path over prefix (longest first) over regex, then a method
//! match, then the most header matches, then the most query matches; ties go to the
//! earlier route and rule.
//!
//! A gateway's request first picks its listener: among the listeners of the port it came
//! in on, the one whose hostname matches the request's host most specifically (exact, then
//! the longest wildcard, then a listener without hostname). Routes attach to a listener
//! when a parentRef names the Gateway (and the listener's name or port, if it sets them),
//! the listener admits the route's namespace and kind, and, when both name hosts, one of
//! the route's hostnames meets the listener's.

use std::collections::HashMap;

use http::HeaderMap;

use crate::state::{
    HttpRoute, Snapshot, WorkloadRef,
    gateway::{
        Gateway, GatewayParent, Listener, ListenerProtocol, RouteNamespaces, hostname_matches,
    },
    route::{PathMatch, RequestMatch, RouteRule, ValueMatch},
};

/// Routes by the service or gateway they attach to, built once per snapshot.
#[derive(Debug, Default)]
pub struct RouteTable {
    /// Service → (index into `snapshot.routes`, the parent's port).
    by_service: HashMap<WorkloadRef, Vec<(usize, Option<u16>)>>,
    /// Gateway → (index into `snapshot.routes`, the parentRef).
    by_gateway: HashMap<WorkloadRef, Vec<(usize, GatewayParent)>>,
}

/// The parts of a request that matches look at.
#[derive(Clone, Copy, Debug)]
pub struct RequestView<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
    /// Host without port, lowercase.
    pub host: Option<&'a str>,
}

/// The rule a request takes.
#[derive(Clone, Copy, Debug)]
pub struct Selected<'s> {
    pub route: &'s HttpRoute,
    pub rule: &'s RouteRule,
    /// The match that held (`None`: the rule has no matches, i.e. `PathPrefix /`).
    pub matched: Option<&'s RequestMatch>,
}

/// The outcome of routing for one service port.
#[derive(Debug)]
pub enum Routing<'s> {
    /// No route attaches to the service port: its own endpoints serve.
    Unrouted,
    /// Routes attach, but none of their rules matches: 404.
    NoMatch,
    Rule(Selected<'s>),
}

impl RouteTable {
    pub fn build(snapshot: &Snapshot) -> Self {
        let mut table = Self::default();
        for (index, route) in snapshot.routes.iter().enumerate() {
            for parent in &route.parents {
                table
                    .by_service
                    .entry(parent.service.clone())
                    .or_default()
                    .push((index, parent.port));
            }
            for parent in &route.gateway_parents {
                table
                    .by_gateway
                    .entry(parent.gateway.clone())
                    .or_default()
                    .push((index, parent.clone()));
            }
        }
        table
    }

    /// The rule for a request to `service`'s `port`.
    pub fn select<'s>(
        &self,
        snapshot: &'s Snapshot,
        service: &WorkloadRef,
        port: u16,
        request: &RequestView<'_>,
    ) -> Routing<'s> {
        let Some(parents) = self.by_service.get(service) else {
            return Routing::Unrouted;
        };
        let attached = parents
            .iter()
            .filter(|(_, parent_port)| parent_port.is_none_or(|p| p == port))
            .map(|&(index, _)| index);
        best_rule(snapshot, attached, request)
    }

    /// The rule for a request that came in on `listener` of `gateway`: `Unrouted` when no
    /// route attaches to the listener (the gateway answers 404 then too).
    pub fn select_for_listener<'s>(
        &self,
        snapshot: &'s Snapshot,
        gateway: &Gateway,
        listener: &Listener,
        request: &RequestView<'_>,
    ) -> Routing<'s> {
        let Some(parents) = self.by_gateway.get(&gateway.name) else {
            return Routing::Unrouted;
        };
        let attached = parents
            .iter()
            .filter(|(index, parent)| {
                snapshot
                    .routes
                    .get(*index)
                    .is_some_and(|route| attaches(gateway, listener, parent, route))
            })
            .map(|&(index, _)| index);
        best_rule(snapshot, attached, request)
    }
}

/// The listener of `gateway` a request on `port` over `protocol` belongs to: the most
/// specific hostname match of `host` (see the module's doc).
pub fn listener_for<'g>(
    gateway: &'g Gateway,
    port: u16,
    protocol: ListenerProtocol,
    host: Option<&str>,
) -> Option<&'g Listener> {
    gateway
        .listeners
        .iter()
        .filter(|l| l.port == port && l.protocol == protocol)
        .filter_map(|l| {
            let specificity = match (&l.hostname, host) {
                (None, _) => 0,
                (Some(name), Some(host)) if hostname_matches(name, host) => {
                    if name.starts_with("*.") {
                        name.len()
                    } else {
                        usize::MAX
                    }
                }
                _ => return None,
            };
            Some((specificity, l))
        })
        // Ties keep the earlier listener.
        .fold(
            None,
            |best: Option<(usize, &Listener)>, (s, l)| match best {
                Some((b, _)) if b >= s => best,
                _ => Some((s, l)),
            },
        )
        .map(|(_, l)| l)
}

/// Whether `route`, through `parent`, attaches to `listener` of `gateway`.
fn attaches(
    gateway: &Gateway,
    listener: &Listener,
    parent: &GatewayParent,
    route: &HttpRoute,
) -> bool {
    let named = parent
        .section_name
        .as_deref()
        .is_none_or(|name| name == listener.name)
        && parent.port.is_none_or(|port| port == listener.port);
    let namespace_admitted = match listener.allowed_routes.namespaces {
        RouteNamespaces::Same => route.name.namespace == gateway.name.namespace,
        RouteNamespaces::All => true,
    };
    let kind_admitted = listener.allowed_routes.kinds.contains(&route.kind);
    let hosts_meet = match &listener.hostname {
        None => true,
        Some(listener_host) => {
            route.hostnames.is_empty()
                || route
                    .hostnames
                    .iter()
                    .any(|h| hostnames_intersect(listener_host, h))
        }
    };
    named && namespace_admitted && kind_admitted && hosts_meet
}

/// Whether some host matches both names (each exact or `*.` wildcard).
fn hostnames_intersect(a: &str, b: &str) -> bool {
    let concrete = |name: &str| {
        name.strip_prefix("*.")
            .map_or(name.to_owned(), |s| format!("x.{s}"))
    };
    hostname_matches(a, &concrete(b)) || hostname_matches(b, &concrete(a))
}

/// The best rule among the routes at `attached` (indexes into `snapshot.routes`).
fn best_rule<'s>(
    snapshot: &'s Snapshot,
    attached: impl Iterator<Item = usize>,
    request: &RequestView<'_>,
) -> Routing<'s> {
    let mut any_attached = false;
    let mut best: Option<(Precedence, Selected<'s>)> = None;
    for index in attached {
        let Some(route) = snapshot.routes.get(index) else {
            continue;
        };
        any_attached = true;
        if !host_matches(&route.hostnames, request.host) {
            continue;
        }
        for (rule_index, rule) in route.rules.iter().enumerate() {
            let order = (index, rule_index);
            let candidates: Vec<Option<&RequestMatch>> = if rule.matches.is_empty() {
                vec![None]
            } else {
                rule.matches.iter().map(Some).collect()
            };
            for candidate in candidates {
                if !candidate.is_none_or(|m| matches(m, request)) {
                    continue;
                }
                let precedence = Precedence::of(candidate, order);
                if best.as_ref().is_none_or(|(b, _)| precedence > *b) {
                    best = Some((
                        precedence,
                        Selected {
                            route,
                            rule,
                            matched: candidate,
                        },
                    ));
                }
            }
        }
    }
    match best {
        Some((_, selected)) => Routing::Rule(selected),
        None if any_attached => Routing::NoMatch,
        None => Routing::Unrouted,
    }
}

/// Ordered so that the greater one wins.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Precedence {
    /// 3 exact, 2 prefix, 1 regex.
    path_kind: u8,
    path_len: usize,
    method: bool,
    headers: usize,
    query: usize,
    /// Earlier route and rule first: reversed.
    order: std::cmp::Reverse<(usize, usize)>,
}

impl Precedence {
    fn of(candidate: Option<&RequestMatch>, order: (usize, usize)) -> Self {
        let (path_kind, path_len) = match candidate.and_then(|m| m.path.as_ref()) {
            Some(PathMatch::Exact(p)) => (3, p.len()),
            Some(PathMatch::Prefix(p)) => (2, p.len()),
            Some(PathMatch::Regex(_)) => (1, 0),
            // No path condition is `PathPrefix /`.
            None => (2, 1),
        };
        Self {
            path_kind,
            path_len,
            method: candidate.is_some_and(|m| m.method.is_some()),
            headers: candidate.map_or(0, |m| m.headers.len()),
            query: candidate.map_or(0, |m| m.query_params.len()),
            order: std::cmp::Reverse(order),
        }
    }
}

fn matches(m: &RequestMatch, request: &RequestView<'_>) -> bool {
    if let Some(path) = &m.path
        && !path_matches(path, request.path)
    {
        return false;
    }
    if m.method
        .as_deref()
        .is_some_and(|want| want != request.method)
    {
        return false;
    }
    let headers_hold = m.headers.iter().all(|h| {
        // Several values of one header compare as their comma-joined list.
        let values: Vec<&str> = request
            .headers
            .get_all(h.name.as_str())
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        !values.is_empty() && value_matches(&h.value, &values.join(","))
    });
    headers_hold
        && m.query_params.iter().all(|q| {
            query_param(request.query, &q.name).is_some_and(|v| value_matches(&q.value, &v))
        })
}

pub(super) fn path_matches(path_match: &PathMatch, path: &str) -> bool {
    match path_match {
        PathMatch::Exact(want) => path == want,
        PathMatch::Prefix(prefix) => prefix_matches(prefix, path),
        PathMatch::Regex(pattern) => pattern.matches(path),
    }
}

/// Whole segments: `/api` matches `/api`, `/api/` and `/api/x`, not `/apix`.
pub(super) fn prefix_matches(prefix: &str, path: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        return true;
    }
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

fn value_matches(value: &ValueMatch, text: &str) -> bool {
    match value {
        ValueMatch::Exact(want) => text == want,
        ValueMatch::Regex(pattern) => pattern.matches(text),
    }
}

/// The first value of `name` in a query string, percent-decoded.
fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(key) == name).then(|| percent_decode(value))
    })
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Route hostnames (lowercase, as the source reads them): exact, or `*.example.com` for
/// any subdomain; none: every host.
fn host_matches(hostnames: &[String], host: Option<&str>) -> bool {
    if hostnames.is_empty() {
        return true;
    }
    host.is_some_and(|host| hostnames.iter().any(|name| hostname_matches(name, host)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{
        RouteKind,
        route::{Backend, HeaderMatch, ParentRef, ServiceRef},
    };

    fn rule(name: &str, matches: Vec<RequestMatch>) -> RouteRule {
        RouteRule {
            name: Some(name.to_owned()),
            matches,
            backends: vec![Backend {
                service: ServiceRef {
                    name: WorkloadRef::new("default", name),
                    port: 80,
                },
                weight: 1,
                filters: Vec::new(),
            }],
            ..RouteRule::default()
        }
    }

    fn http_route(
        name: &str,
        port: Option<u16>,
        hostnames: &[&str],
        rules: Vec<RouteRule>,
    ) -> HttpRoute {
        HttpRoute {
            name: WorkloadRef::new("default", name),
            kind: RouteKind::Http,
            gateway_parents: Vec::new(),
            parents: vec![ParentRef {
                service: WorkloadRef::new("default", "echo"),
                port,
            }],
            hostnames: hostnames.iter().map(|h| (*h).to_owned()).collect(),
            rules,
        }
    }

    fn pick(
        snapshot: &Snapshot,
        port: u16,
        method: &str,
        path: &str,
        headers: &HeaderMap,
        host: Option<&str>,
    ) -> Option<String> {
        let table = RouteTable::build(snapshot);
        let request = RequestView {
            method,
            path,
            query: None,
            headers,
            host,
        };
        match table.select(
            snapshot,
            &WorkloadRef::new("default", "echo"),
            port,
            &request,
        ) {
            Routing::Rule(selected) => selected.rule.name.clone(),
            Routing::NoMatch => Some("404".into()),
            Routing::Unrouted => None,
        }
    }

    #[test]
    fn parent_ports_and_hostnames_limit_a_route() {
        let snapshot = Snapshot {
            routes: vec![
                http_route("on-81", Some(81), &[], vec![rule("port-81", vec![])]),
                http_route(
                    "shop",
                    None,
                    &["shop.example", "*.shop.example"],
                    vec![rule("shop", vec![])],
                ),
            ],
            ..Snapshot::default()
        };
        let none = HeaderMap::new();
        assert_eq!(
            pick(&snapshot, 81, "GET", "/", &none, None).as_deref(),
            Some("port-81")
        );
        assert_eq!(
            pick(&snapshot, 80, "GET", "/", &none, Some("api.shop.example")).as_deref(),
            Some("shop")
        );
        assert_eq!(
            pick(&snapshot, 80, "GET", "/", &none, Some("other")).as_deref(),
            Some("404")
        );
        let unrouted = Snapshot {
            routes: vec![http_route(
                "on-81",
                Some(81),
                &[],
                vec![rule("port-81", vec![])],
            )],
            ..Snapshot::default()
        };
        assert_eq!(
            pick(&unrouted, 80, "GET", "/", &none, None),
            None,
            "no route for port 80"
        );
    }

    #[test]
    fn method_then_headers_then_order_break_path_ties() {
        let header = |name: &str| HeaderMatch {
            name: name.into(),
            value: ValueMatch::Exact("1".into()),
        };
        let at = |method: Option<&str>, headers: Vec<HeaderMatch>| RequestMatch {
            path: Some(PathMatch::Prefix("/a".into())),
            method: method.map(str::to_owned),
            headers,
            ..RequestMatch::default()
        };
        let snapshot = Snapshot {
            routes: vec![http_route(
                "r",
                None,
                &[],
                vec![
                    rule("first", vec![at(None, vec![])]),
                    rule("second", vec![at(None, vec![])]),
                    rule(
                        "two-headers",
                        vec![at(None, vec![header("x"), header("y")])],
                    ),
                    rule("method", vec![at(Some("PUT"), vec![header("x")])]),
                ],
            )],
            ..Snapshot::default()
        };
        let mut headers = HeaderMap::new();
        assert_eq!(
            pick(&snapshot, 80, "GET", "/a", &headers, None).as_deref(),
            Some("first")
        );
        headers.insert("x", "1".parse().unwrap());
        headers.insert("y", "1".parse().unwrap());
        assert_eq!(
            pick(&snapshot, 80, "GET", "/a", &headers, None).as_deref(),
            Some("two-headers")
        );
        assert_eq!(
            pick(&snapshot, 80, "PUT", "/a", &headers, None).as_deref(),
            Some("method")
        );
    }

    #[test]
    fn prefixes_match_whole_segments() {
        assert!(prefix_matches("/api", "/api"));
        assert!(prefix_matches("/api/", "/api/x"));
        assert!(prefix_matches("/api", "/api/x"));
        assert!(!prefix_matches("/api", "/apix"));
        assert!(prefix_matches("/", "/anything"));
    }

    #[test]
    fn query_params_are_decoded_and_first_wins() {
        assert_eq!(
            query_param(Some("a=1&b=x%20y&a=2"), "a").as_deref(),
            Some("1")
        );
        assert_eq!(
            query_param(Some("a=1&b=x%20y"), "b").as_deref(),
            Some("x y")
        );
        assert_eq!(query_param(Some("a=1"), "c"), None);
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }

    #[test]
    fn wildcard_hostnames_match_subdomains_only() {
        let names = vec!["*.example.com".to_owned()];
        assert!(host_matches(&names, Some("a.example.com")));
        assert!(!host_matches(&names, Some("example.com")));
        assert!(host_matches(&[], None));
    }
}
