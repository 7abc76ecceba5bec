//! One request through the waypoint: path, route, filters, backend, policy, mirrors, tries,
//! response.

use std::{net::SocketAddr, sync::Arc};

use http::{
    HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version, header,
    uri::PathAndQuery,
};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tracing::{debug, info};

use super::{
    Error, Target, Tunnel, View,
    backend::{self, Endpoint},
    filters::{self, Effects},
    observe::{Counted, Exchange, Observed},
    path,
    retry::{self, RequestBody},
    route::{RequestView, Routing},
    upstream::{BoxBody, Protocol},
    wire::{authority_of, empty, error_response, host_without_port, strip_hop_by_hop},
};
use crate::{
    policy::{ConnectionFacts, Decision, RequestFacts},
    state::{
        WorkloadRef,
        route::{Retry, RouteRule, ServiceRef, Timeouts},
    },
};

/// Serves one request of a tunnel; never fails (errors become responses).
pub async fn handle(tunnel: Arc<Tunnel>, request: Request<Incoming>) -> Response<Observed> {
    let inner = &tunnel.inner;
    let view = inner.view();
    let mut exchange = Exchange::start(&tunnel, &view, &request);
    let result = forward(&tunnel, &view, request, &mut exchange).await;
    let mut response = match result {
        Ok(response) => response,
        Err(e) => {
            exchange.labels.response_flags = e.response_flags();
            exchange.record.error = Some(e.reason());
            exchange.record.error_detail = Some(e.to_string());
            if let Error::PolicyDenied { reason, policy } = &e {
                let policy = policy.as_ref().map(ToString::to_string);
                info!(component = "waypoint", src.identity = %tunnel.peer_identity, src.addr = %tunnel.source,
                    method = %exchange.record.method, path = %exchange.record.path, reason,
                    policy = ?policy, "request denied by access policy");
                inner
                    .metrics
                    .denied(reason, policy.clone().unwrap_or_default());
                exchange.record.policy_name = policy;
            } else if let Error::Path(e) = &e {
                inner.metrics.rejected(e.reason());
                debug!(component = "waypoint", src.identity = %tunnel.peer_identity,
                    path = %exchange.record.path, reason = e.reason(), "request path refused");
            } else {
                debug!(component = "waypoint", src.identity = %tunnel.peer_identity,
                    reason = e.reason(), error = %e, "request failed");
            }
            error_response(&e, exchange.grpc)
        }
    };
    strip_hop_by_hop(response.headers_mut());
    let status = response.status().as_u16();
    exchange.labels.response_code = status;
    exchange.record.response_code = status;
    let (parts, body) = response.into_parts();
    let body = Observed::new(body, exchange, &parts.headers);
    Response::from_parts(parts, body)
}

/// Where the request goes before any try: the endpoint is picked per try.
enum Destination {
    /// A backend Service port.
    Service(ServiceRef),
    /// A pod the client dialled directly.
    Pod(SocketAddr, WorkloadRef),
}

async fn forward(
    tunnel: &Tunnel,
    view: &View,
    request: Request<Incoming>,
    exchange: &mut Exchange,
) -> Result<Response<BoxBody>, Error> {
    let inner = &tunnel.inner;
    let (parts, body) = request.into_parts();
    // Routes, policy, mirrors and the backend all see the one normal form of the path.
    let raw = parts.uri.path_and_query().map_or("/", PathAndQuery::as_str);
    let normal = path::normalize_path_and_query(raw, inner.config.path_escaped_slashes)?;
    let path_and_query =
        PathAndQuery::try_from(normal).map_err(|e| Error::BadRequest(e.to_string()))?;
    let authority = authority_of(&parts.uri, &parts.headers);
    let host = authority.as_deref().map(host_without_port);
    let mut effects = Effects::default();
    let mut rule: Option<&RouteRule> = None;
    let mut matched = None;
    let destination = match &tunnel.target {
        Target::Pod { addr, service } => Destination::Pod(*addr, service.clone()),
        Target::Service { service, port } => {
            let lowered = host.as_deref().map(str::to_ascii_lowercase);
            let view_of_request = RequestView {
                method: parts.method.as_str(),
                path: path_and_query.path(),
                query: path_and_query.query(),
                headers: &parts.headers,
                host: lowered.as_deref(),
            };
            match view
                .routes
                .select(&view.snapshot, service, *port, &view_of_request)
            {
                Routing::Unrouted => Destination::Service(ServiceRef {
                    name: service.clone(),
                    port: *port,
                }),
                Routing::NoMatch => return Err(Error::NoRoute),
                Routing::Rule(selected) => {
                    let route = selected.route.name.to_string();
                    exchange.labels.route_name.clone_from(&route);
                    exchange.record.route = Some(route);
                    rule = Some(selected.rule);
                    matched = selected.matched;
                    effects.extend(&selected.rule.filters);
                    if effects.redirect.is_none() {
                        let backend = backend::pick_weighted(&selected.rule.backends)
                            .ok_or(Error::NoBackend)?;
                        effects.extend(&backend.filters);
                        Destination::Service(backend.service.clone())
                    } else {
                        Destination::Service(ServiceRef {
                            name: service.clone(),
                            port: *port,
                        })
                    }
                }
            }
        }
    };
    if let Some(redirect) = effects.redirect {
        let scheme = parts.uri.scheme_str().unwrap_or("http");
        let port = authority
            .as_deref()
            .and_then(|a| a.rsplit_once(':'))
            .and_then(|(_, p)| p.parse().ok());
        let location = filters::location(
            redirect,
            scheme,
            host.as_deref().unwrap_or_default(),
            port,
            &path_and_query,
            matched,
        );
        let mut response = Response::new(empty());
        *response.status_mut() =
            StatusCode::from_u16(redirect.status).unwrap_or(StatusCode::MOVED_PERMANENTLY);
        if let Ok(location) = HeaderValue::from_str(&location) {
            response.headers_mut().insert(header::LOCATION, location);
        }
        for modifier in &effects.response_headers {
            filters::modify_headers(response.headers_mut(), modifier);
        }
        return Ok(response);
    }

    // The request to the backend: headers filtered, rewritten, trace context injected.
    let mut headers = parts.headers.clone();
    strip_hop_by_hop(&mut headers);
    for modifier in &effects.request_headers {
        filters::modify_headers(&mut headers, modifier);
    }
    let mut upstream_authority = authority.clone();
    let mut upstream_pq = path_and_query.as_str().to_owned();
    if let Some(rewrite) = effects.rewrite {
        if let Some(hostname) = &rewrite.hostname {
            upstream_authority = Some(hostname.clone());
        }
        if let Some(path) = &rewrite.path {
            upstream_pq = filters::rewrite_path_and_query(&path_and_query, path, matched);
        }
    }
    exchange.trace.inject(&mut headers);
    let protocol = if exchange.grpc || parts.version == Version::HTTP_2 {
        Protocol::Http2
    } else {
        Protocol::Http1
    };
    let template = Template {
        method: parts.method.clone(),
        authority: upstream_authority,
        path_and_query: upstream_pq,
        headers,
        protocol,
    };

    let retry_policy = rule.and_then(|r| r.retry.as_ref());
    let timeouts = rule.map(|r| r.timeouts).unwrap_or_default();
    let counted = Counted {
        body,
        count: Arc::clone(&exchange.request_bytes),
    }
    .map_err(Into::into)
    .boxed_unsync();
    let limit = inner.config.replay_buffer;
    let mut body = if effects.mirrors.is_empty() {
        RequestBody::Streaming(Some(counted))
    } else {
        RequestBody::read(counted, limit).await?
    };
    if retry_policy.is_some() {
        body = body.recorded(limit);
    }
    let mirrors: Vec<&ServiceRef> = effects
        .mirrors
        .iter()
        .filter(|m| fastrand::u32(0..1_000_000) < m.parts_per_million)
        .map(|m| &m.backend)
        .collect();
    let facts_request = RequestFacts {
        method: parts.method.as_str(),
        path: path_and_query.path(),
        headers: &parts.headers,
    };
    let tries = Tries {
        tunnel,
        view,
        destination: &destination,
        template: &template,
        retry: retry_policy,
        timeouts,
        request: &facts_request,
        mirrors: &mirrors,
    };
    let mut response = match timeouts.request {
        Some(limit) => tokio::time::timeout(limit, tries.run(&mut body, exchange))
            .await
            .unwrap_or(Err(Error::RequestTimeout)),
        None => tries.run(&mut body, exchange).await,
    }?;
    for modifier in &effects.response_headers {
        filters::modify_headers(response.headers_mut(), modifier);
    }
    Ok(response)
}

/// The request to the backend, without its body (each try gets one).
struct Template {
    method: Method,
    authority: Option<String>,
    path_and_query: String,
    headers: HeaderMap,
    protocol: Protocol,
}

impl Template {
    fn build(&self, endpoint: &Endpoint, body: BoxBody) -> Result<Request<BoxBody>, Error> {
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

/// The tries of one request.
struct Tries<'a> {
    tunnel: &'a Tunnel,
    view: &'a View,
    destination: &'a Destination,
    template: &'a Template,
    retry: Option<&'a Retry>,
    timeouts: Timeouts,
    request: &'a RequestFacts<'a>,
    /// Mirror backends sampled for this request: sent once the first try passed policy.
    mirrors: &'a [&'a ServiceRef],
}

impl Tries<'_> {
    async fn run(
        &self,
        body: &mut RequestBody,
        exchange: &mut Exchange,
    ) -> Result<Response<BoxBody>, Error> {
        let inner = &self.tunnel.inner;
        let mut attempt = 0u32;
        loop {
            let endpoint = self.endpoint()?;
            admit(self.tunnel, self.view, &endpoint, self.request)?;
            if attempt == 0 {
                // Only a request its policy admitted is copied: a denied one goes nowhere.
                for backend in self.mirrors {
                    send_mirror(
                        self.tunnel,
                        self.view,
                        self.template,
                        backend,
                        body,
                        self.request,
                    );
                }
            }
            exchange.record.upstream_host = Some(endpoint.addr.to_string());
            exchange.record.dst_workload = Some(endpoint.workload.to_string());
            exchange
                .labels
                .destination_workload
                .clone_from(&endpoint.workload.name);
            exchange
                .labels
                .destination_workload_namespace
                .clone_from(&endpoint.workload.namespace);
            exchange.labels.destination_principal = endpoint.identity.to_string();
            let request = self.template.build(&endpoint, body.take())?;
            let send = inner
                .upstreams
                .send(&endpoint, self.template.protocol, request);
            let result = match self.timeouts.backend_request {
                Some(limit) => tokio::time::timeout(limit, send)
                    .await
                    .unwrap_or(Err(Error::TryTimeout)),
                None => send.await,
            };
            // Known only now: a recorded body may have outgrown the replay limit.
            let retry = self
                .retry
                .filter(|r| attempt < r.attempts && body.replayable());
            let r = match (result, retry) {
                (Ok(response), Some(r)) if retry::retries_status(r, response.status().as_u16()) => {
                    debug!(component = "waypoint", upstream = %endpoint.addr, status = response.status().as_u16(), attempt, "retrying");
                    r
                }
                (Err(e), Some(r)) if e.retriable() => {
                    debug!(component = "waypoint", upstream = %endpoint.addr, reason = e.reason(), attempt, "retrying");
                    r
                }
                (result, _) => return result,
            };
            tokio::time::sleep(retry::backoff(r.backoff, attempt)).await;
            attempt += 1;
            exchange.record.retries = attempt;
        }
    }

    fn endpoint(&self) -> Result<Endpoint, Error> {
        let snapshot = &self.view.snapshot;
        let td = &self.tunnel.inner.trust_domain;
        match self.destination {
            Destination::Service(service) => backend::resolve(snapshot, service, td),
            Destination::Pod(addr, service) => backend::pod(snapshot, *addr, service, td),
        }
    }
}

/// L7 access policy of the endpoint's workload, for the original client.
fn admit(
    tunnel: &Tunnel,
    view: &View,
    endpoint: &Endpoint,
    request: &RequestFacts<'_>,
) -> Result<(), Error> {
    let Some(workload) = view.snapshot.workloads.get(&endpoint.workload) else {
        return Err(Error::UnknownEndpoint(endpoint.addr.ip()));
    };
    let decision = view.policy.evaluate(&ConnectionFacts {
        destination: workload,
        dst_port: endpoint.addr.port(),
        source_identity: Some(&tunnel.peer_identity),
        source_ip: tunnel.source.ip(),
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

/// Sends a copy to a mirror backend, fire and forget: its response is read and dropped.
/// The copy is a request to the mirror's endpoint like any other: that endpoint's policy
/// must admit it, for the original client, or it is not sent.
fn send_mirror(
    tunnel: &Tunnel,
    view: &View,
    template: &Template,
    backend: &ServiceRef,
    body: &RequestBody,
    request: &RequestFacts<'_>,
) {
    let inner = Arc::clone(&tunnel.inner);
    let skipped = |reason: &'static str| {
        inner.metrics.mirror_skipped(reason);
        debug!(component = "waypoint", mirror = %backend.name, reason, "mirror not sent");
    };
    let Some(body) = body.copy() else {
        return skipped("body_too_big");
    };
    let endpoint = match backend::resolve(&view.snapshot, backend, &inner.trust_domain)
        .and_then(|endpoint| admit(tunnel, view, &endpoint, request).map(|()| endpoint))
    {
        Ok(endpoint) => endpoint,
        Err(e) => return skipped(e.reason()),
    };
    let request = match template.build(&endpoint, body) {
        Ok(request) => request,
        Err(e) => return skipped(e.reason()),
    };
    let protocol = template.protocol;
    tokio::spawn(async move {
        match inner.upstreams.send(&endpoint, protocol, request).await {
            Ok(response) => {
                // Read to the end so the connection can be reused.
                let _ = response.into_body().collect().await;
            }
            Err(e) => {
                debug!(component = "waypoint", mirror = %endpoint.addr, reason = e.reason(), "mirror failed");
            }
        }
    });
}
