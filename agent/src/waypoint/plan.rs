//! What one request asks of the waypoint, decided before any I/O: the path in its normal
//! form (`path`), the rule it takes (`route`), that rule's filters and a backend by weight
//! (`filters`, `backend`), then either a redirect to answer with or the request to send:
//! where, rewritten how, with which retries, timeouts and sampled mirrors. Then the two
//! decisions each try makes: an endpoint of the destination, and whether that endpoint's
//! L7 access policy admits the request for the original client.
//!
//! Inputs: the CONNECT's target, the snapshot's view, the request's head. Output: a
//! [`Plan`]. Nothing here touches a socket; `request` sends what the plan says.

use std::net::{IpAddr, SocketAddr};

use http::{
    HeaderMap, HeaderValue, Method, Request, StatusCode, Uri, Version, header, request::Parts,
    uri::PathAndQuery,
};

use super::{
    Error, Target, View,
    backend::{self, Endpoint},
    filters::{self, Effects},
    path::{self, EscapedSlashes},
    route::{self, RequestView, Routing},
    upstream::Protocol,
    wire::{authority_of, host_without_port, is_grpc, strip_hop_by_hop},
};
use crate::{
    identity::SpiffeId,
    jwt::Claims,
    policy::{ConnectionFacts, Decision, RequestFacts},
    state::{
        Service, Snapshot, WorkloadRef,
        route::{HeaderModifier, Redirect, RequestMatch, Retry, RouteRule, ServiceRef, Timeouts},
    },
};

/// What the waypoint does with one request.
#[derive(Debug)]
pub struct Plan<'v> {
    /// The route whose rule the request took (metrics, access log), named even when that
    /// rule then fails the request.
    pub route: Option<&'v WorkloadRef>,
    /// That rule's `name`, if it has one (a policy may target it as a `sectionName`).
    pub rule_name: Option<&'v str>,
    pub outcome: Result<Outcome<'v>, Error>,
}

/// Answered here, or sent on.
#[derive(Debug)]
pub enum Outcome<'v> {
    /// The rule redirects: the waypoint answers (with an empty body), no backend is asked.
    Redirect {
        status: StatusCode,
        headers: HeaderMap,
    },
    /// The request goes to a backend (boxed: it is most of the size).
    Forward(Box<Forward<'v>>),
}

/// A request to send to a backend.
#[derive(Debug)]
pub struct Forward<'v> {
    pub destination: Destination,
    /// The request to the backend without its body; the trace context is not in it yet.
    pub template: Template,
    /// The path in normal form (access policy judges it).
    pub path_and_query: PathAndQuery,
    pub retry: Option<&'v Retry>,
    pub timeouts: Timeouts,
    /// The rule mirrors: the body is read whole first (a mirror needs a copy), whether or
    /// not this request was sampled for a mirror.
    pub mirrored: bool,
    /// The mirror backends sampled for this request: sent once the first try passed policy.
    pub mirrors: Vec<&'v ServiceRef>,
    /// Applied to the backend's response.
    pub response_headers: Vec<&'v HeaderModifier>,
}

/// Where the request goes before any try: the endpoint is picked per try.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Destination {
    /// A backend Service port.
    Service(ServiceRef),
    /// A pod the client dialled directly.
    Pod(SocketAddr, WorkloadRef),
}

/// The request to the backend, without its body (each try gets one).
#[derive(Debug)]
pub struct Template {
    pub method: Method,
    /// `None`: the endpoint's address.
    pub authority: Option<String>,
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub protocol: Protocol,
}

/// The plan for a request with head `request` on a CONNECT to `target`.
pub fn plan<'v>(
    target: &Target,
    view: &'v View,
    request: &Parts,
    slashes: EscapedSlashes,
) -> Plan<'v> {
    let mut taken = None;
    let outcome = outcome(target, view, request, slashes, &mut taken);
    Plan {
        route: taken.map(|(route, _)| route),
        rule_name: taken.and_then(|(_, rule)| rule),
        outcome,
    }
}

/// `plan`'s outcome; `taken` (the route and rule name) is set as soon as a rule is taken,
/// so an error after it still names the route.
fn outcome<'v>(
    target: &Target,
    view: &'v View,
    request: &Parts,
    slashes: EscapedSlashes,
    taken: &mut Option<(&'v WorkloadRef, Option<&'v str>)>,
) -> Result<Outcome<'v>, Error> {
    // Routes, policy, mirrors and the backend all see the one normal form of the path.
    let raw = request
        .uri
        .path_and_query()
        .map_or("/", PathAndQuery::as_str);
    let normal = path::normalize_path_and_query(raw, slashes)?;
    let path_and_query =
        PathAndQuery::try_from(normal).map_err(|e| Error::BadRequest(e.to_string()))?;
    let authority = authority_of(&request.uri, &request.headers);
    let host = authority.as_deref().map(host_without_port);
    let mut effects = Effects::default();
    let mut rule: Option<&RouteRule> = None;
    let mut matched = None;
    let lowered = host.as_deref().map(str::to_ascii_lowercase);
    let view_of_request = RequestView {
        method: request.method.as_str(),
        path: path_and_query.path(),
        query: path_and_query.query(),
        headers: &request.headers,
        host: lowered.as_deref(),
    };
    let (routing, itself) = match target {
        Target::Pod { addr, service } => (
            Routing::Unrouted,
            Some(Destination::Pod(*addr, service.clone())),
        ),
        Target::Service { service, port } => (
            view.routes
                .select(&view.snapshot, service, *port, &view_of_request),
            Some(Destination::Service(ServiceRef {
                name: service.clone(),
                port: *port,
            })),
        ),
        // A gateway serves only what its routes say: nothing is "itself".
        Target::Listener {
            gateway,
            port,
            protocol,
        } => {
            let routing = view
                .snapshot
                .gateways
                .get(gateway)
                .and_then(|gateway| {
                    let listener =
                        route::listener_for(gateway, *port, *protocol, lowered.as_deref())?;
                    Some(view.routes.select_for_listener(
                        &view.snapshot,
                        gateway,
                        listener,
                        &view_of_request,
                    ))
                })
                .unwrap_or(Routing::NoMatch);
            (routing, None)
        }
    };
    let destination = match routing {
        Routing::Unrouted => Some(itself.ok_or(Error::NoRoute)?),
        Routing::NoMatch => return Err(Error::NoRoute),
        Routing::Rule(selected) => {
            *taken = Some((&selected.route.name, selected.rule.name.as_deref()));
            rule = Some(selected.rule);
            matched = selected.matched;
            effects.extend(&selected.rule.filters);
            if effects.redirect.is_none() {
                let backend =
                    backend::pick_weighted(&selected.rule.backends).ok_or(Error::NoBackend)?;
                effects.extend(&backend.filters);
                Some(Destination::Service(backend.service.clone()))
            } else {
                // Redirected: answered here, no destination.
                None
            }
        }
    };
    let head = Head {
        request,
        path_and_query,
        authority,
        host,
        matched,
    };
    if let Some(to) = effects.redirect {
        return Ok(redirect(&head, to, &effects.response_headers));
    }
    let destination = destination.ok_or(Error::NoBackend)?;
    Ok(Outcome::Forward(Box::new(forward(
        head,
        destination,
        rule,
        effects,
    ))))
}

/// The request as `plan` has read it so far.
struct Head<'r, 'v> {
    request: &'r Parts,
    /// Normal form.
    path_and_query: PathAndQuery,
    authority: Option<String>,
    /// Without its port.
    host: Option<String>,
    /// The match of the rule that held.
    matched: Option<&'v RequestMatch>,
}

/// The answer to a request whose rule redirects.
fn redirect<'v>(
    head: &Head<'_, 'v>,
    redirect: &Redirect,
    response_headers: &[&HeaderModifier],
) -> Outcome<'v> {
    let scheme = head.request.uri.scheme_str().unwrap_or("http");
    let port = head
        .authority
        .as_deref()
        .and_then(|a| a.rsplit_once(':'))
        .and_then(|(_, p)| p.parse().ok());
    let location = filters::location(
        redirect,
        scheme,
        head.host.as_deref().unwrap_or_default(),
        port,
        &head.path_and_query,
        head.matched,
    );
    let mut headers = HeaderMap::new();
    if let Ok(location) = HeaderValue::from_str(&location) {
        headers.insert(header::LOCATION, location);
    }
    for modifier in response_headers {
        filters::modify_headers(&mut headers, modifier);
    }
    Outcome::Redirect {
        status: StatusCode::from_u16(redirect.status).unwrap_or(StatusCode::MOVED_PERMANENTLY),
        headers,
    }
}

/// The request to send: headers filtered and modified, host and path rewritten, mirrors
/// sampled.
fn forward<'v>(
    head: Head<'_, 'v>,
    destination: Destination,
    rule: Option<&'v RouteRule>,
    effects: Effects<'v>,
) -> Forward<'v> {
    let request = head.request;
    let mut headers = request.headers.clone();
    strip_hop_by_hop(&mut headers);
    for modifier in &effects.request_headers {
        filters::modify_headers(&mut headers, modifier);
    }
    let mut authority = head.authority;
    let mut path_and_query = head.path_and_query.as_str().to_owned();
    if let Some(rewrite) = effects.rewrite {
        if let Some(hostname) = &rewrite.hostname {
            authority = Some(hostname.clone());
        }
        if let Some(path) = &rewrite.path {
            path_and_query =
                filters::rewrite_path_and_query(&head.path_and_query, path, head.matched);
        }
    }
    let protocol = if is_grpc(&request.headers) || request.version == Version::HTTP_2 {
        Protocol::Http2
    } else {
        Protocol::Http1
    };
    let mirrors = effects
        .mirrors
        .iter()
        .filter(|m| fastrand::u32(0..1_000_000) < m.parts_per_million)
        .map(|m| &m.backend)
        .collect();
    Forward {
        destination,
        template: Template {
            method: request.method.clone(),
            authority,
            path_and_query,
            headers,
            protocol,
        },
        path_and_query: head.path_and_query,
        retry: rule.and_then(|r| r.retry.as_ref()),
        timeouts: rule.map(|r| r.timeouts).unwrap_or_default(),
        mirrored: !effects.mirrors.is_empty(),
        mirrors,
        response_headers: effects.response_headers,
    }
}

impl Forward<'_> {
    /// What access policy judges of the request (`request` is its head, as planned; `user`
    /// its verified end user).
    pub fn facts<'a>(&'a self, request: &'a Parts, user: Option<&'a Claims>) -> RequestFacts<'a> {
        RequestFacts {
            method: request.method.as_str(),
            path: self.path_and_query.path(),
            headers: &request.headers,
            user,
        }
    }
}

impl Destination {
    /// One endpoint to try: the pod, or the one of a Service's endpoints `pick` chooses.
    pub fn endpoint(
        &self,
        snapshot: &Snapshot,
        trust_domain: &str,
        pick: impl FnOnce(&Service) -> IpAddr,
    ) -> Result<Endpoint, Error> {
        match self {
            Destination::Service(service) => {
                backend::resolve(snapshot, service, trust_domain, pick)
            }
            Destination::Pod(addr, service) => backend::pod(snapshot, *addr, service, trust_domain),
        }
    }
}

impl Template {
    /// The request for one try (or a mirror) to `endpoint`, with `body`.
    pub fn build<B>(&self, endpoint: &Endpoint, body: B) -> Result<Request<B>, Error> {
        let authority = self
            .authority
            .clone()
            .unwrap_or_else(|| endpoint.addr.to_string());
        let uri = match self.protocol {
            Protocol::Http2 => format!("http://{authority}{}", self.path_and_query),
            Protocol::Http1 => self.path_and_query.clone(),
        };
        let uri: Uri = uri
            .parse()
            .map_err(|e: http::uri::InvalidUri| Error::BadRequest(e.to_string()))?;
        let mut request = Request::new(body);
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = uri;
        *request.headers_mut() = self.headers.clone();
        match self.protocol {
            Protocol::Http2 => {
                *request.version_mut() = Version::HTTP_2;
                request.headers_mut().remove(header::HOST);
            }
            Protocol::Http1 => {
                let host = HeaderValue::from_str(&authority)
                    .map_err(|e| Error::BadRequest(e.to_string()))?;
                request.headers_mut().insert(header::HOST, host);
            }
        }
        Ok(request)
    }
}

/// L7 access policy of the endpoint's workload, for the original client: the tunnel's
/// peer (`peer`) speaking for `source`.
pub fn admit(
    view: &View,
    endpoint: &Endpoint,
    peer: &SpiffeId,
    source: IpAddr,
    request: &RequestFacts<'_>,
) -> Result<(), Error> {
    let Some(workload) = view.snapshot.workloads.get(&endpoint.workload) else {
        return Err(Error::UnknownEndpoint(endpoint.addr.ip()));
    };
    let decision = view.policy.evaluate(&ConnectionFacts {
        destination: workload,
        dst_port: endpoint.addr.port(),
        source_identity: Some(peer),
        source_ip: source,
        request: Some(request),
    });
    match decision {
        Decision::Allow => Ok(()),
        Decision::Deny { policy, reason } => Err(Error::PolicyDenied {
            reason: reason.as_str(),
            policy,
        }),
    }
}

#[cfg(test)]
mod tests;
