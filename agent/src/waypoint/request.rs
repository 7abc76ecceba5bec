//! One request through the waypoint: its plan (`plan`: path, route, filters, backend),
//! then the sending: body, policy and an endpoint per try (by the Service's load balancer,
//! from what `hosts` knows), mirrors, retries, the response; each try's outcome goes back
//! to `hosts` for outlier detection.

use std::{net::IpAddr, sync::Arc};

use http::{HeaderMap, HeaderValue, Request, Response, Version, header, request::Parts};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::time::Instant;
use tracing::{debug, info};

use super::{
    Error, Inner, Target, Tunnel, View,
    backend::{self, Endpoint},
    breaker::{Breaker, Limit, Permit},
    fault, filters,
    hosts::{self, Balancing, InFlight, ServiceHosts},
    observe::{Counted, Exchange, Observed},
    plan::{self, Destination, Forward, Outcome, Template, plan},
    retry::{self, Ending, RequestBody},
    upstream::BoxBody,
    wire::{empty, error_response, strip_hop_by_hop},
};
use crate::{
    hbone,
    jwt::Claims,
    policy::RequestFacts,
    state::{
        Location, Service, Target as PolicyTarget, TrafficDistribution, WorkloadRef,
        gateway::ListenerProtocol,
        route::ServiceRef,
        traffic::{RateLimit, RetryPolicy},
    },
};

/// Serves one request of a tunnel; never fails (errors become responses).
pub async fn handle(tunnel: Arc<Tunnel>, request: Request<Incoming>) -> Response<Observed> {
    let inner = &tunnel.inner;
    let view = inner.view();
    let mut exchange = Exchange::start(&tunnel, &view, &request);
    let http1 = request.version() < Version::HTTP_2;
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
    if http1 && inner.drain.is_draining() {
        // The client takes its next request elsewhere. Said by the response itself: the
        // connection's graceful shutdown, which says it too, reaches its task a moment
        // after the drain starts, and a response can be written in between.
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    let status = response.status().as_u16();
    exchange.labels.response_code = status;
    exchange.record.response_code = status;
    let (parts, body) = response.into_parts();
    let body = Observed::new(body, exchange, &parts.headers);
    Response::from_parts(parts, body)
}

/// Plans the request, then answers a redirect or sends it.
async fn forward(
    tunnel: &Tunnel,
    view: &View,
    request: Request<Incoming>,
    exchange: &mut Exchange,
) -> Result<Response<BoxBody>, Error> {
    let (parts, body) = request.into_parts();
    let slashes = tunnel.inner.config.path_escaped_slashes;
    let plan = plan(&tunnel.target, view, &parts, slashes);
    if let Some(route) = plan.route {
        let route = route.to_string();
        exchange.labels.route_name.clone_from(&route);
        exchange.record.route = Some(route);
    }
    match plan.outcome? {
        Outcome::Redirect { status, headers } => {
            let mut response = Response::new(empty());
            *response.status_mut() = status;
            *response.headers_mut() = headers;
            Ok(response)
        }
        Outcome::Forward(mut forward) => {
            exchange.trace.inject(&mut forward.template.headers);
            if let Target::Listener { protocol, .. } = &tunnel.target {
                if let Destination::Service(backend) = &forward.destination {
                    exchange.destination_service(&backend.name);
                }
                forwarded_headers(&mut forward.template.headers, tunnel.source.ip(), *protocol);
            }
            // A gateway's request addresses no Service: the backend's own authentication
            // applies, which no waypoint will check for it.
            let authenticated = match (tunnel.target.service(), &forward.destination) {
                (Some(service), _)
                | (None, Destination::Service(ServiceRef { name: service, .. })) => {
                    Some(service.clone())
                }
                (None, Destination::Pod(..)) => None,
            };
            let user = match &authenticated {
                Some(service) => {
                    authenticate(tunnel, view, service, &parts, &mut forward.template).await?
                }
                None => None,
            };
            let taken = plan.route.map(|route| (route, plan.rule_name));
            let request = Planned {
                parts: &parts,
                forward: &forward,
                taken,
                user: user.as_ref(),
            };
            send(tunnel, view, request, body, exchange).await
        }
    }
}

/// What a gateway tells the backend about its client: `X-Forwarded-For` (the client's
/// address appended to what the client claimed, which is kept but never believed by the
/// gateway) and `X-Forwarded-Proto`.
fn forwarded_headers(headers: &mut HeaderMap, client: IpAddr, protocol: ListenerProtocol) {
    let chain = match headers
        .get(X_FORWARDED_FOR)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.trim().is_empty())
    {
        Some(earlier) => format!("{earlier}, {client}"),
        None => client.to_string(),
    };
    if let Ok(value) = HeaderValue::from_str(&chain) {
        headers.insert(X_FORWARDED_FOR, value);
    }
    let proto = match protocol {
        ListenerProtocol::Https | ListenerProtocol::Tls => "https",
        ListenerProtocol::Http | ListenerProtocol::Tcp => "http",
    };
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
}

const X_FORWARDED_FOR: &str = "x-forwarded-for";
const X_FORWARDED_PROTO: &str = "x-forwarded-proto";

/// The end user of a request to a Service with a `requestAuthentication`; `None` for any
/// other request, and for one without a token.
async fn authenticate(
    tunnel: &Tunnel,
    view: &View,
    service: &WorkloadRef,
    parts: &Parts,
    template: &mut Template,
) -> Result<Option<Claims>, Error> {
    let Some(authenticator) = view.authenticators.get(service) else {
        return Ok(None);
    };
    let inner = &tunnel.inner;
    match authenticator
        .authenticate(&inner.jwks, parts, template)
        .await
    {
        Ok(user) => Ok(user),
        Err(refused) => {
            inner.metrics.authn_failed(service, refused.reason);
            debug!(component = "waypoint", service = %service, policy = %refused.policy,
                reason = refused.reason, "request refused: invalid end-user token");
            Err(refused.into())
        }
    }
}

/// A request to send, as planned: its head, where it goes, the route and rule it took, and
/// its end user.
struct Planned<'a> {
    parts: &'a Parts,
    forward: &'a Forward<'a>,
    taken: Option<(&'a WorkloadRef, Option<&'a str>)>,
    user: Option<&'a Claims>,
}

/// Sends a planned request: the body read or streamed, the tries within the request
/// timeout, the response's headers modified.
async fn send(
    tunnel: &Tunnel,
    view: &View,
    planned: Planned<'_>,
    body: Incoming,
    exchange: &mut Exchange,
) -> Result<Response<BoxBody>, Error> {
    let Planned {
        parts,
        forward,
        taken,
        user,
    } = planned;
    let counted = Counted {
        body,
        count: Arc::clone(&exchange.request_bytes),
    }
    .map_err(Into::into)
    .boxed_unsync();
    let limit = tunnel.inner.config.replay_buffer;
    let mut body = if forward.mirrored {
        RequestBody::read(counted, limit).await?
    } else {
        RequestBody::Streaming(Some(counted))
    };
    if forward.retry.is_some() {
        body = body.recorded(limit);
    }
    let facts = forward.facts(parts, user);
    let key = match &forward.destination {
        Destination::Service(service) => backend::hash_key(
            &view.balancing(&service.name).load_balancer,
            &parts.headers,
            tunnel.source.ip(),
        ),
        Destination::Pod(..) => None,
    };
    let tries = Tries {
        tunnel,
        view,
        forward,
        request: &facts,
        taken,
        key,
    };
    let mut response = match forward.timeouts.request {
        Some(limit) => tokio::time::timeout(limit, tries.run(&mut body, exchange))
            .await
            .unwrap_or(Err(Error::RequestTimeout)),
        None => tries.run(&mut body, exchange).await,
    }?;
    for modifier in &forward.response_headers {
        filters::modify_headers(response.headers_mut(), modifier);
    }
    Ok(response)
}

/// The tries of one request.
struct Tries<'a> {
    tunnel: &'a Tunnel,
    view: &'a View,
    forward: &'a Forward<'a>,
    request: &'a RequestFacts<'a>,
    /// The route and rule the request took, if any.
    taken: Option<(&'a WorkloadRef, Option<&'a str>)>,
    /// The request's consistent-hash key, if its Service hashes and it has the key.
    key: Option<u64>,
}

impl Tries<'_> {
    async fn run(
        &self,
        body: &mut RequestBody,
        exchange: &mut Exchange,
    ) -> Result<Response<BoxBody>, Error> {
        let inner = &self.tunnel.inner;
        let mut attempt = 0u32;
        // The place of the retry in flight under its Service's `maxRetries`.
        let mut _retrying: Option<Permit> = None;
        // A Service's endpoints are balanced and watched; a pod dialled directly is not.
        // One picker serves every try: the Service and the view do not change between them.
        let picker = match &self.forward.destination {
            Destination::Service(service) => Some(Picker::new(inner, self.view, service)),
            Destination::Pod(..) => None,
        };
        loop {
            let endpoint = self.forward.destination.endpoint(
                &self.view.snapshot,
                &inner.trust_domain,
                |svc| match &picker {
                    Some(picker) => picker.pick(svc, self.key),
                    None => backend::any(svc),
                },
            )?;
            admit(self.tunnel, self.view, &endpoint, self.request)?;
            if attempt == 0 {
                // After policy: a request its policy denies is neither limited nor faulted.
                self.route_policies(exchange).await?;
                // Only a request its policy admitted is copied: a denied one goes nowhere.
                for backend in &self.forward.mirrors {
                    send_mirror(
                        self.tunnel,
                        self.view,
                        &self.forward.template,
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
            let breaker = self.breaker(&endpoint);
            self.service_rate_limit(&endpoint)?;
            let in_flight = breaker.try_request().map_err(|limit| {
                overflowed(self.tunnel, &breaker, limit);
                Error::Overflow(limit)
            })?;
            let at_endpoint = picker.as_ref().map(|p| p.hosts.start(endpoint.addr.ip()));
            let template = &self.forward.template;
            let request = template.build(&endpoint, body.take())?;
            let send = inner
                .upstreams
                .send(&endpoint, template.protocol, request, &breaker);
            let result = match self.forward.timeouts.backend_request {
                Some(limit) => tokio::time::timeout(limit, send)
                    .await
                    .unwrap_or(Err(Error::TryTimeout)),
                None => send.await,
            };
            if let Err(Error::Overflow(limit)) = &result {
                overflowed(self.tunnel, &breaker, *limit);
            }
            if let Some(picker) = &picker {
                picker.record(endpoint.addr.ip(), &result);
            }
            // In flight until the response's body has been read.
            let result =
                result.map(|response| response.map(|body| hold(body, (in_flight, at_endpoint))));
            // Known only now: a recorded body may have outgrown the replay limit.
            let retry = self
                .forward
                .retry
                .filter(|r| attempt < r.attempts && body.replayable());
            let ending = match &result {
                Ok(response) => Some(Ending::Response(response.status().as_u16())),
                Err(e) => e.failure().map(Ending::Failed),
            };
            let r = match (ending, retry) {
                (Some(ending), Some(r)) if retry::retries(r, self.retry_policy(), ending) => {
                    debug!(component = "waypoint", upstream = %endpoint.addr, ?ending, attempt, "retrying");
                    r
                }
                _ => return result,
            };
            // Over `maxRetries` or the retry budget the client gets this try's answer: no
            // retry storm.
            match breaker.try_retry() {
                Ok(permit) => _retrying = Some(permit),
                Err(limit) => {
                    overflowed(self.tunnel, &breaker, limit);
                    return result;
                }
            }
            // The answer is not the client's: its connection is free during the pause.
            drop(result);
            let max = retry::max_backoff(self.retry_policy());
            tokio::time::sleep(retry::backoff(r.backoff, attempt, max)).await;
            attempt += 1;
            exchange.record.retries = attempt;
        }
    }
}

impl Tries<'_> {
    /// The `TrafficPolicy` retry of the rule the request took (`None`: the default), looked
    /// up only when a try might be retried.
    fn retry_policy(&self) -> Option<&RetryPolicy> {
        let (route, rule) = self.taken?;
        View::for_route(&self.view.retries, route, rule).map(|(_, _, retry)| retry)
    }

    /// The rate limit, then the fault, of the route the request took: refused, answered
    /// by the waypoint, or held before its first try.
    async fn route_policies(&self, exchange: &mut Exchange) -> Result<(), Error> {
        let Some((route, rule)) = self.taken else {
            return Ok(());
        };
        if let Some((target, policy, limit)) = View::for_route(&self.view.rate_limits, route, rule)
        {
            self.take_token(target, policy, limit, "route")?;
        }
        let Some((_, policy, fault)) = View::for_route(&self.view.faults, route, rule) else {
            return Ok(());
        };
        let metrics = &self.tunnel.inner.metrics;
        let drawn = fault::draw(fault);
        if let Some(delay) = drawn.delay {
            metrics.fault(policy, "delay");
            exchange.labels.response_flags = "DI";
            tokio::time::sleep(delay).await;
        }
        match drawn.abort {
            Some(status) => {
                metrics.fault(policy, "abort");
                Err(Error::FaultAbort {
                    policy: policy.clone(),
                    status,
                })
            }
            None => Ok(()),
        }
    }

    /// A token from the rate limit of the endpoint's Service, if it has one (every try
    /// loads the backend, so every try takes one).
    fn service_rate_limit(&self, endpoint: &Endpoint) -> Result<(), Error> {
        if self.view.rate_limits.is_empty() {
            return Ok(());
        }
        let target = PolicyTarget::Service(endpoint.service.clone());
        match self.view.rate_limits.get(&target) {
            Some((policy, limit)) => self.take_token(&target, policy, limit, "service"),
            None => Ok(()),
        }
    }

    fn take_token(
        &self,
        target: &PolicyTarget,
        policy: &WorkloadRef,
        limit: &RateLimit,
        kind: &'static str,
    ) -> Result<(), Error> {
        let inner = &self.tunnel.inner;
        let client = &self.tunnel.peer_identity;
        inner
            .buckets
            .take(policy, target, limit, client, Instant::now())
            .map_err(|limited| {
                inner.metrics.rate_limited(policy, kind);
                crate::info_limited!(component = "waypoint", policy = %policy, target = %target,
                    src.identity = %client, "rate limited: answering 429 until a token is back");
                Error::RateLimited {
                    policy: policy.clone(),
                    retry_after: limited.retry_after,
                }
            })
    }

    /// The breaker of the endpoint's Service, with its current limits.
    fn breaker(&self, endpoint: &Endpoint) -> Arc<Breaker> {
        breaker_of(self.tunnel, self.view, endpoint)
    }
}

fn breaker_of(tunnel: &Tunnel, view: &View, endpoint: &Endpoint) -> Arc<Breaker> {
    let limits = view
        .limits
        .get(&endpoint.service)
        .copied()
        .unwrap_or_default();
    tunnel.inner.breakers.of(&endpoint.service, limits)
}

/// Counts a request or retry a limit refused, and logs it (rate-limited).
fn overflowed(tunnel: &Tunnel, breaker: &Breaker, limit: Limit) {
    tunnel.inner.metrics.overflow(breaker.service(), limit);
    match limit {
        Limit::Pending | Limit::Requests => {
            crate::warn_limited!(component = "waypoint", service = %breaker.service(), limit = limit.name(),
                "connection pool limit reached: refusing requests (503, UO) until it frees");
        }
        Limit::Retries | Limit::RetryBudget => {
            crate::warn_limited!(component = "waypoint", service = %breaker.service(), limit = limit.name(),
                "retry limit reached: answering with the try's response instead of retrying");
        }
    }
}

/// Chooses the endpoints of one backend Service, and learns from their answers.
struct Picker<'a> {
    inner: &'a Inner,
    view: &'a View,
    balancing: &'a Balancing,
    hosts: Arc<ServiceHosts>,
}

impl<'a> Picker<'a> {
    fn new(inner: &'a Inner, view: &'a View, service: &ServiceRef) -> Self {
        Self {
            inner,
            view,
            balancing: view.balancing(&service.name),
            hosts: inner.hosts.of(&service.name),
        }
    }

    /// One of the endpoints of `svc` (not empty), for a request with hash `key`.
    fn pick(&self, svc: &Service, key: Option<u64>) -> IpAddr {
        let snapshot = &self.view.snapshot;
        let prefer_close = svc.traffic_distribution == Some(TrafficDistribution::PreferClose);
        // The waypoint's own node: the pods its snapshot does not place on another node
        // (the file source's pods of its `agent.node`, the Kubernetes source's of
        // `--node-name`).
        let local = |ip| {
            prefer_close
                && snapshot
                    .workload_by_ip(ip)
                    .is_some_and(|w| !matches!(w.location, Location::Remote { .. }))
        };
        let outlier = self.balancing.outlier.as_ref();
        let (candidates, events) =
            self.hosts
                .candidates(&svc.endpoints, outlier, Instant::now(), local);
        report(self.inner, self.hosts.service(), events);
        let (eligible, panic) = backend::eligible(&candidates, prefer_close);
        if panic {
            debug!(component = "waypoint", service = %svc.name,
                "every endpoint is ejected: balancing over all of them (panic)");
        }
        let turn = self.hosts.next_turn();
        let mut rng = fastrand::Rng::new();
        backend::choose(
            &self.balancing.load_balancer,
            &eligible,
            key,
            turn,
            &mut rng,
        )
        .unwrap_or_else(|| backend::any(svc))
    }

    /// Tells outlier detection how `endpoint` answered (or failed) one try.
    fn record(&self, endpoint: IpAddr, result: &Result<http::Response<BoxBody>, Error>) {
        let Some(outlier) = &self.balancing.outlier else {
            return;
        };
        let outcome = match result {
            Ok(response) => match response.status().as_u16() {
                502..=504 => hosts::Outcome::ServerError { gateway: true },
                500..=599 => hosts::Outcome::ServerError { gateway: false },
                _ => hosts::Outcome::Success,
            },
            // The endpoint's node refused the waypoint: the pod is not at fault.
            Err(Error::Hbone(hbone::Error::PolicyDenied)) => return,
            Err(Error::Hbone(_) | Error::Handshake(_) | Error::Upstream(_) | Error::TryTimeout) => {
                hosts::Outcome::LocalError
            }
            // Refused or failed here (overflow, a bad request, the client): not the endpoint.
            Err(_) => return,
        };
        let endpoints = self
            .view
            .snapshot
            .services
            .get(self.hosts.service())
            .map_or(0, |s| s.endpoints.len());
        let event = self
            .hosts
            .record(endpoint, outcome, Some(outlier), endpoints, Instant::now());
        report(self.inner, self.hosts.service(), event);
    }
}

/// Logs and counts each ejection and return, once.
fn report(inner: &Inner, service: &WorkloadRef, events: impl IntoIterator<Item = hosts::Event>) {
    for event in events {
        match event {
            hosts::Event::Ejected {
                endpoint,
                ejections,
                duration,
                reason,
                ejected,
            } => {
                info!(component = "waypoint", service = %service, endpoint = %endpoint, ejections,
                    duration = %humantime::format_duration(duration), reason, ejected,
                    "endpoint ejected by outlier detection");
                inner.metrics.ejected(service, ejected);
            }
            hosts::Event::Returned {
                endpoint,
                ejections,
                after,
                ejected,
            } => {
                info!(component = "waypoint", service = %service, endpoint = %endpoint, ejections,
                    duration = %humantime::format_duration(after), ejected,
                    "ejected endpoint back in service");
                inner.metrics.ejected_now(service, ejected);
            }
        }
    }
}

/// `body`, holding `permits` until it has been read or dropped.
fn hold(body: BoxBody, permits: (Permit, Option<InFlight>)) -> BoxBody {
    Holding {
        body,
        _permits: permits,
    }
    .boxed_unsync()
}

/// A response body, the request's place under `maxRequests`, and its count among the
/// endpoint's requests in flight.
struct Holding {
    body: BoxBody,
    _permits: (Permit, Option<InFlight>),
}

impl hyper::body::Body for Holding {
    type Data = bytes::Bytes;
    type Error = super::upstream::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// `plan::admit` for the tunnel's client.
fn admit(
    tunnel: &Tunnel,
    view: &View,
    endpoint: &Endpoint,
    request: &RequestFacts<'_>,
) -> Result<(), Error> {
    plan::admit(
        view,
        endpoint,
        &tunnel.peer_identity,
        tunnel.source.ip(),
        request,
    )
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
    let picker = Picker::new(&inner, view, backend);
    let endpoint = match backend::resolve(&view.snapshot, backend, &inner.trust_domain, |svc| {
        picker.pick(svc, None)
    })
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
    let breaker = breaker_of(tunnel, view, &endpoint);
    let in_flight = match breaker.try_request() {
        Ok(permit) => permit,
        Err(limit) => {
            overflowed(tunnel, &breaker, limit);
            return skipped("overflow");
        }
    };
    tokio::spawn(async move {
        let _in_flight = in_flight;
        match inner
            .upstreams
            .send(&endpoint, protocol, request, &breaker)
            .await
        {
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
