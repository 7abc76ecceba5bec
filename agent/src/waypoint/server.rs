//! The HBONE side: which CONNECT targets the waypoint serves (a bound service's VIP:port,
//! or the pod IP:port of one of its endpoints), who the client is, and HTTP/1.1 or HTTP/2
//! (by preface) on each accepted stream, every request handed to `request::handle`.
//!
//! The client's address (policy's `ipBlocks`, telemetry) is the CONNECT's `forwarded: for=`
//! only when that names an address of a workload with the peer's own identity: a node proxy
//! forwards for the pods whose identity it proves. Any other claim is not believed (the
//! peer's own address is used), counted and logged: a certificate proves who the peer is,
//! not where it speaks for.

use std::{
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::Arc,
};

use hyper::service::service_fn;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::{net::TcpListener, sync::Notify};
use tracing::debug;

use super::{
    Config, Inner, Metrics, Target, Tunnel, View, breaker, hosts, request, upstream::Upstreams,
};
use crate::{
    drain::Drain,
    hbone,
    identity::SpiffeId,
    jwt::{FetchError, JwksCache},
    policy::PolicyIndex,
    state::{Snapshot, StateHandle},
    sync::Mutex,
    telemetry::{AccessLog, trace::SpanExporter},
};

/// The waypoint: decides on CONNECTs and serves their requests. Cheap to clone.
#[derive(Clone)]
pub struct Waypoint {
    pub(super) inner: Arc<Inner>,
}

impl Waypoint {
    /// A waypoint following `state`; `pool` carries its requests to the backends (it must
    /// hold the waypoint's certificate). Its connections, streams and requests hold guards
    /// of `drain`, and end when it drains (`shutdown`). Fails when the extra roots for key
    /// set fetches (`Config::jwks_ca_file`) cannot be read.
    pub fn new(
        config: Config,
        state: StateHandle,
        pool: hbone::Pool,
        metrics: Metrics,
        access_log: AccessLog,
        exporter: Option<Arc<dyn SpanExporter>>,
        drain: Drain,
    ) -> Result<Self, FetchError> {
        let jwks = JwksCache::new(config.jwks_ca_file.as_deref())?;
        let snapshot = Arc::clone(&state.borrow());
        let policy = PolicyIndex::for_trust_domain(Some(config.identity.trust_domain()));
        let view = View::build(snapshot, &policy);
        let upstreams = Upstreams::new(
            pool,
            config.identity.clone(),
            config.upstream_port,
            config.upstream_idle_timeout,
        );
        Ok(Self {
            inner: Arc::new(Inner {
                trust_domain: config.identity.trust_domain().to_owned(),
                config,
                state,
                view: Mutex::new(Arc::new(view)),
                upstreams,
                breakers: breaker::Breakers::default(),
                buckets: Default::default(),
                hosts: hosts::Hosts::default(),
                metrics,
                access_log,
                exporter,
                drain,
                jwks,
            }),
        })
    }

    /// Serves HBONE on `listener` until the drain starts (then the listener closes) or the
    /// task is dropped: each connection on its own task, holding a drain guard, an accept
    /// error logged and retried after a pause.
    pub async fn serve(self, listener: TcpListener, tls: Arc<rustls::ServerConfig>) {
        let drain = self.inner.drain.clone();
        let handler = Arc::new(self);
        let draining = drain.draining();
        tokio::pin!(draining);
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = &mut draining => return,
            };
            let tcp = match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    crate::warn_limited!(component = "waypoint", error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_RETRY).await;
                    continue;
                }
            };
            // Small HTTP/2 frames must not wait for the peer's delayed ACK (Nagle).
            let _ = tcp.set_nodelay(true);
            let (guard, cut) = (drain.guard(), drain.cut_off());
            let (tls, handler, drain) = (Arc::clone(&tls), Arc::clone(&handler), drain.clone());
            tokio::spawn(async move {
                let limits = hbone::Limits::default();
                // When the drain starts the client gets GOAWAY; when it is cut, the
                // connection is dropped with whatever is still open on it.
                tokio::select! {
                    // Handshake failures are logged (with their reason) by `hbone`.
                    _ = hbone::serve_with(tcp, tls, handler, &limits, &drain) => {}
                    () = cut => {}
                }
                drop(guard);
            });
        }
    }

    /// The drain its connections, streams and requests are tracked by.
    pub fn drain(&self) -> &Drain {
        &self.inner.drain
    }

    /// The snapshot in force (with its routes), for `/config_dump`.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        Arc::clone(&self.inner.view().snapshot)
    }
}

impl Inner {
    /// The view of the current snapshot, rebuilt when the snapshot changed: a new
    /// snapshot applies to the next request.
    pub fn view(&self) -> Arc<View> {
        let snapshot = Arc::clone(&self.state.borrow());
        let mut view = self.view.lock();
        if !Arc::ptr_eq(&view.snapshot, &snapshot) {
            self.breakers
                .retain(|service| snapshot.services.contains_key(service));
            let policies = &snapshot.traffic_policies;
            self.buckets
                .retain(|policy| policies.iter().any(|p| p.name == *policy));
            self.hosts
                .retain(|service| snapshot.services.contains_key(service));
            for gone in view
                .balancings
                .keys()
                .filter(|s| !snapshot.services.contains_key(*s))
            {
                self.metrics.service_gone(gone);
            }
            *view = Arc::new(View::build(snapshot, &view.policy));
        }
        Arc::clone(&view)
    }

    /// The original client of a CONNECT (see the module's doc).
    fn client_address(&self, snapshot: &Snapshot, request: &hbone::InboundConnect) -> SocketAddr {
        let Some(ip) = forwarded_for(&request.headers) else {
            return request.peer_addr;
        };
        match vouched_for(snapshot, &self.trust_domain, &request.peer_identity, ip) {
            Ok(()) if ip == request.peer_addr.ip() => request.peer_addr,
            Ok(()) => SocketAddr::new(ip, 0),
            Err(reason) => {
                self.metrics.forwarded_ignored(reason);
                crate::warn_limited!(component = "waypoint", src = %request.peer_addr,
                    src.identity = %request.peer_identity, forwarded_for = %ip, reason,
                    "forwarded: for= names no workload of the peer's identity; judged on the peer's address");
                request.peer_addr
            }
        }
    }

    /// The target a CONNECT names, if this waypoint serves it.
    pub fn target(&self, snapshot: &Snapshot, addr: SocketAddr) -> Option<Target> {
        let bound = |service: &crate::state::Service| {
            service.name.namespace == self.config.name.namespace
                && service.waypoint.as_deref() == Some(self.config.name.name.as_str())
        };
        if let Some((name, _)) = snapshot.services_by_vip(addr.ip()).find(|(_, service)| {
            bound(service) && service.ports.iter().any(|p| p.port == addr.port())
        }) {
            return Some(Target::Service {
                service: name.clone(),
                port: addr.port(),
            });
        }
        snapshot
            .services
            .values()
            .find(|service| {
                bound(service)
                    && service.endpoints.contains(&addr.ip())
                    && service.ports.iter().any(|p| p.target_port == addr.port())
            })
            .map(|service| Target::Pod {
                addr,
                service: service.name.clone(),
            })
    }
}

impl hbone::StreamHandler for Waypoint {
    type Tunnel = Tunnel;

    async fn accept(&self, request: hbone::InboundConnect) -> Result<Tunnel, hbone::Refusal> {
        let view = self.inner.view();
        let Some(target) = self.inner.target(&view.snapshot, request.target) else {
            crate::warn_limited!(component = "waypoint", src = %request.peer_addr, src.identity = %request.peer_identity,
                target = %request.target, "CONNECT refused: not a service (or pod) bound to this waypoint");
            return Err(hbone::Refusal::NotServed);
        };
        let source = self.inner.client_address(&view.snapshot, &request);
        Ok(Tunnel {
            inner: Arc::clone(&self.inner),
            target,
            peer_identity: request.peer_identity,
            source,
        })
    }
}

impl hbone::Tunnel for Tunnel {
    async fn run(self, stream: hbone::ServerStream) {
        self.serve_http(stream).await;
    }

    fn abandon(self, error: std::io::Error) {
        debug!(component = "waypoint", src = %self.source, error = %error, "client left before the CONNECT was answered");
    }
}

impl Tunnel {
    /// Serves HTTP/1.1 or HTTP/2 (by preface) on `stream`, every request through
    /// `request::handle`, until the client closes, the drain closes it after the request in
    /// progress, or the drain's limit cuts it.
    pub(super) async fn serve_http<S>(self, stream: S)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let tunnel = Arc::new(self);
        let first_request = Arc::new(Notify::new());
        let service = {
            let (tunnel, first_request) = (Arc::clone(&tunnel), Arc::clone(&first_request));
            service_fn(move |req| {
                first_request.notify_one();
                let tunnel = Arc::clone(&tunnel);
                async move { Ok::<_, Infallible>(request::handle(tunnel, req).await) }
            })
        };
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder.http2().adaptive_window(true);
        // A client that starts a request head must finish it: slow heads hold memory.
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT);
        let drain = tunnel.inner.drain.clone();
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        // A tunnel opened while draining (its CONNECT crossed the GOAWAY) carries a request
        // its client has already sent: it closes after that one, not before it.
        let close: Pin<Box<dyn Future<Output = ()> + Send>> = if drain.is_draining() {
            Box::pin(async move { first_request.notified().await })
        } else {
            Box::pin(drain.draining())
        };
        let cut = drain.cut_off();
        tokio::pin!(connection, cut);
        let mut close = close;
        let mut closing = false;
        let result = loop {
            tokio::select! {
                result = &mut connection => break result,
                // HTTP/1.1 closes after the response in progress, HTTP/2 sends GOAWAY: the
                // client takes its next request elsewhere.
                () = &mut close, if !closing => {
                    connection.as_mut().graceful_shutdown();
                    closing = true;
                }
                // Dropping the connection drops the requests still in it.
                () = &mut cut => return,
            }
        };
        if let Err(e) = result
            && !(closing && cancelled(&*e))
        {
            tunnel.inner.metrics.connection_error("downstream_http");
            debug!(component = "waypoint", src = %tunnel.source, src.identity = %tunnel.peer_identity,
                reason = "downstream_http", error = %e, "client HTTP connection ended with an error");
        }
    }
}

/// A connection the drain closed before its first bytes (hyper-util's version sniffing
/// ends "cancelled"): not the client's fault.
fn cancelled(error: &(dyn std::error::Error + 'static)) -> bool {
    error
        .downcast_ref::<std::io::Error>()
        .is_some_and(|e| e.kind() == std::io::ErrorKind::Interrupted)
}

/// Whether a peer of identity `peer` may speak for `ip`: a workload with that identity has
/// it. Otherwise the reason, for the metric: `unknown_address` (no workload has it) or
/// `identity_mismatch` (a workload of another identity has it).
fn vouched_for(
    snapshot: &Snapshot,
    trust_domain: &str,
    peer: &SpiffeId,
    ip: IpAddr,
) -> Result<(), &'static str> {
    let workload = snapshot.workload_by_ip(ip).ok_or("unknown_address")?;
    match workload.identity(trust_domain) {
        Ok(identity) if identity == *peer => Ok(()),
        _ => Err("identity_mismatch"),
    }
}

/// The IP of `forwarded: for=<ip>` (RFC 7239; quoted, bracketed or with a port too).
#[doc(hidden)] // pub for the fuzz target `hbone_headers`.
pub fn forwarded_for(headers: &http::HeaderMap) -> Option<IpAddr> {
    let value = headers.get(hbone::FORWARDED)?.to_str().ok()?;
    let element = value.split(',').next()?;
    let node = element.split(';').find_map(|pair| {
        let (key, value) = pair.trim().split_once('=')?;
        key.eq_ignore_ascii_case("for").then_some(value)
    })?;
    let node = node.trim_matches('"');
    node.parse::<IpAddr>()
        .ok()
        .or_else(|| node.parse::<SocketAddr>().ok().map(|a| a.ip()))
        .or_else(|| {
            node.strip_prefix('[')
                .and_then(|rest| rest.split(']').next())
                .and_then(|ip| ip.parse().ok())
        })
}

pub(super) const ACCEPT_RETRY: std::time::Duration = std::time::Duration::from_millis(100);
/// How long an HTTP/1.1 client may take to send a request head.
const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::WorkloadRef;

    #[test]
    fn forwarded_for_takes_the_first_client_address() {
        let mut headers = http::HeaderMap::new();
        headers.insert("forwarded", "for=10.1.0.7".parse().unwrap());
        assert_eq!(forwarded_for(&headers), Some("10.1.0.7".parse().unwrap()));
        headers.insert(
            "forwarded",
            "for=\"[2001:db8::1]:4711\";proto=http, for=10.0.0.1"
                .parse()
                .unwrap(),
        );
        assert_eq!(
            forwarded_for(&headers),
            Some("2001:db8::1".parse().unwrap())
        );
        headers.insert("forwarded", "by=x".parse().unwrap());
        assert_eq!(forwarded_for(&headers), None);
    }

    fn snapshot_with(name: &str, service_account: &str, ip: &str) -> Snapshot {
        let mut snapshot = Snapshot::default();
        let workload = crate::state::Workload {
            name: WorkloadRef::new("default", name),
            service_account: service_account.to_owned(),
            ips: vec![ip.parse().unwrap()],
            location: crate::state::Location::Remote { node: "b".into() },
            enrolled: true,
            mtls_mode: None,
            labels: Default::default(),
        };
        snapshot.workloads.insert(workload.name.clone(), workload);
        snapshot
    }

    #[test]
    fn only_a_workload_of_the_peers_identity_is_vouched_for() {
        let snapshot = snapshot_with("client-1", "client", "10.1.0.7");
        let id = |sa| SpiffeId::new("cluster.local", "default", sa).unwrap();
        let ip = "10.1.0.7".parse().unwrap();
        assert_eq!(
            vouched_for(&snapshot, "cluster.local", &id("client"), ip),
            Ok(())
        );
        assert_eq!(
            vouched_for(&snapshot, "cluster.local", &id("intruder"), ip),
            Err("identity_mismatch")
        );
        // Same namespace and service account in another trust domain is another identity.
        assert_eq!(
            vouched_for(&snapshot, "example.org", &id("client"), ip),
            Err("identity_mismatch")
        );
        assert_eq!(
            vouched_for(
                &snapshot,
                "cluster.local",
                &id("client"),
                "10.9.9.9".parse().unwrap()
            ),
            Err("unknown_address")
        );
    }
}
