//! The proxy's own record of its connections: the active ones, the last closed ones (for
//! `/debug/connections`), totals by outcome, and at close the connection's telemetry:
//! Istio-style TCP metrics and one access-log line (`telemetry`).
//!
//! Labels come from the state snapshot when a connection's labels settle (`established`)
//! or at close, never on the byte path: the reporting pod is the record's, the other end
//! is the workload owning the upstream address (outbound) or the client address (inbound
//! and HBONE, whose connections come from the source pod's own IP).

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde::Serialize;
use tokio::sync::watch;
use tracing::debug;

use super::Error;
use crate::{
    policy::Decision,
    state::{Snapshot, StateHandle, Workload, WorkloadRef},
    sync::{Mutex, MutexGuard},
    telemetry::{
        AccessLog, AccessRecord, TcpMetrics,
        metrics::{TcpLabels, Transfer},
    },
};

/// Which listener a connection came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// From the pod's application, steered by connect4/6 (15001).
    Outbound,
    /// Plaintext toward the pod's application, steered by sk_lookup (15006).
    Inbound,
    /// HBONE toward the pod (15008).
    Hbone,
    /// Toward the pod from a pod of this node, inside the proxy (`mesh.sameNode: LOCAL`).
    Local,
}

/// How the two ends of a connection know each other.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Security {
    /// Plaintext: no identity is known.
    #[default]
    None,
    /// HBONE: certificates proved the identities, and the bytes are encrypted.
    MutualTls,
    /// Both pods are on this node, which knows each one's socket: no certificate, and the
    /// bytes, which never leave the node, are not encrypted.
    NodeLocal,
}

impl Security {
    /// The `connection_security_policy` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Security::None => "none",
            Security::MutualTls => "mutual_tls",
            Security::NodeLocal => "node_local",
        }
    }
}

/// Registry of connections.
#[derive(Debug)]
pub struct Connections {
    next_id: AtomicU64,
    inner: Mutex<Registry>,
    state: StateHandle,
    metrics: TcpMetrics,
    access_log: AccessLog,
}

/// What access policy decided for a connection (destination side).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PolicyOutcome {
    Allow,
    Deny {
        /// `namespace/name` of the DENY policy that matched, if one did.
        policy: Option<String>,
        /// `denied_by_policy`, `not_allowed`, `default_deny`.
        reason: &'static str,
    },
}

/// One connection while it is open. Byte counters are updated by the copy loop.
#[derive(Debug)]
pub struct Tracked {
    pub id: u64,
    pub direction: Direction,
    pub pod: String,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub upstream: Mutex<Option<SocketAddr>>,
    pub service: Mutex<Option<String>>,
    /// `namespace/name` of the waypoint the connection goes through (outbound to a bound
    /// service).
    waypoint: Mutex<Option<String>>,
    /// The registered external service an outbound connection goes to.
    external: Mutex<Option<WorkloadRef>>,
    /// SPIFFE ids of both ends, once mutual TLS (or the node) has proven them (None:
    /// plaintext hop).
    identities: Mutex<Identities>,
    /// Application → upstream.
    pub sent: AtomicU64,
    /// Upstream → application.
    pub received: AtomicU64,
    policy: Mutex<Option<PolicyOutcome>>,
    /// Labels fixed when the connection was counted as opened (all but response flags).
    labels: OnceLock<TcpLabels>,
    start_unix_ms: u64,
    started: Instant,
    /// Set when the connection must end (its pod is gone, the drain limit passed): its
    /// copy loop then resets both ends with this error.
    stop: watch::Sender<Option<Stop>>,
}

/// Why the proxy itself ends an open connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// The pod was deleted while connected.
    PodRemoved,
    /// The agent stopped draining (its drain limit passed, or a second signal came) while
    /// the connection was open.
    DrainCut,
}

/// A connection as `/debug/connections` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct ConnectionView {
    pub id: u64,
    pub direction: Direction,
    pub pod: String,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub upstream: Option<SocketAddr>,
    pub service: Option<String>,
    /// The waypoint a bound service's traffic goes through (then `upstream` is the
    /// waypoint's address).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<String>,
    /// `namespace/name` of the registered external service the connection goes to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external_service: Option<String>,
    #[serde(rename = "src.identity")]
    pub src_identity: Option<String>,
    #[serde(rename = "dst.identity")]
    pub dst_identity: Option<String>,
    /// What proved the identities: `mutual_tls`, `node_local` or `none`.
    pub security: Security,
    pub start_unix_ms: u64,
    pub duration_ms: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub error: Option<&'static str>,
}

/// Snapshot of the registry.
#[derive(Debug, Serialize)]
pub struct ConnectionsView {
    pub active: Vec<ConnectionView>,
    pub recent: Vec<ConnectionView>,
    /// Closed connections by outcome (`ok` or an error reason).
    pub closed_total: BTreeMap<&'static str, u64>,
}

/// Identities of the two ends of a connection.
#[derive(Clone, Debug, Default)]
struct Identities {
    src: Option<String>,
    dst: Option<String>,
    security: Security,
}

#[derive(Debug, Default)]
struct Registry {
    active: HashMap<u64, Arc<Tracked>>,
    recent: VecDeque<ConnectionView>,
    closed_total: BTreeMap<&'static str, u64>,
}

impl Connections {
    /// A registry that labels from `state` and counts into `metrics`; access-log lines go
    /// to stdout.
    pub fn new(state: StateHandle, metrics: TcpMetrics) -> Self {
        Self {
            next_id: AtomicU64::new(0),
            inner: Mutex::default(),
            state,
            metrics,
            access_log: AccessLog::stdout(),
        }
    }

    /// Sends access-log lines to `access_log` instead of stdout.
    pub fn with_access_log(mut self, access_log: AccessLog) -> Self {
        self.access_log = access_log;
        self
    }

    /// The metrics connections are counted in (for the proxy's other counters).
    pub fn metrics(&self) -> &TcpMetrics {
        &self.metrics
    }

    /// Records a new connection.
    pub fn open(
        &self,
        direction: Direction,
        pod: String,
        src: SocketAddr,
        dst: SocketAddr,
    ) -> Arc<Tracked> {
        let tracked = Arc::new(Tracked {
            id: self.next_id.fetch_add(1, Ordering::Relaxed) + 1,
            direction,
            pod,
            src,
            dst,
            upstream: Mutex::new(None),
            service: Mutex::new(None),
            waypoint: Mutex::new(None),
            external: Mutex::new(None),
            identities: Mutex::default(),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            policy: Mutex::default(),
            labels: OnceLock::new(),
            start_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            started: Instant::now(),
            stop: watch::Sender::new(None),
        });
        self.lock().active.insert(tracked.id, Arc::clone(&tracked));
        tracked
    }

    /// Counts the connection as opened, with the labels it has now: call once the
    /// upstream is connected, after `set_upstream`, `set_identities` and `set_policy`.
    /// Idempotent; `close` does it for a connection that never got this far.
    pub fn established(&self, tracked: &Tracked) {
        self.labels(tracked);
    }

    /// Counts a connection this node refused before it became one (a failed HBONE
    /// handshake, a connection cap reached): the denied counter only, no record and no
    /// access-log line, so that a flood of them costs a counter increment each.
    pub fn refused(&self, reason: &'static str) {
        self.metrics.denied(reason);
    }

    /// Records the end of a connection: metrics, access-log line, error log line.
    pub fn close(&self, tracked: &Tracked, error: Option<&Error>) {
        let view = tracked.view(error.map(Error::reason));
        let labels = self.labels(tracked);
        // A policy error says more than the admission's outcome (a revoked connection was
        // allowed first).
        let policy = error.and_then(policy_of_error).or_else(|| tracked.policy());
        let flags = response_flags(view.error, policy.as_ref());
        let transfer = Transfer {
            request_bytes: view.bytes_sent,
            response_bytes: view.bytes_received,
            duration_seconds: tracked.started.elapsed().as_secs_f64(),
        };
        self.metrics.closed(
            &TcpLabels {
                response_flags: flags,
                ..labels.clone()
            },
            transfer,
        );
        if let Some(reason) = denial(view.error, policy.as_ref()) {
            self.metrics.denied(reason);
        }
        self.write_access_log(&view, &labels, policy.as_ref(), flags, error);
        match error {
            None => debug!(component = "proxy", id = view.id, direction = ?view.direction,
                pod = %view.pod, src = %view.src, dst = %view.dst, upstream = ?view.upstream,
                bytes_sent = view.bytes_sent, bytes_received = view.bytes_received,
                duration_ms = view.duration_ms, "connection closed"),
            // A connection-pool refusal: its burst is logged once (`breaker`), and the
            // access log and metrics have every one.
            Some(e @ Error::Overflow { .. }) => debug!(component = "proxy", error = e.reason(),
                detail = %e, id = view.id, pod = %view.pod, src = %view.src, dst = %view.dst,
                service = ?view.service, "connection refused"),
            // The error log line: reason first, for grep and alerts. Rate-limited: a client
            // can fail connections at will, and the access log and metrics have every one.
            Some(e) => crate::info_limited!(component = "proxy", error = e.reason(), detail = %e,
                id = view.id, direction = ?view.direction, pod = %view.pod,
                src = %view.src, dst = %view.dst, upstream = ?view.upstream,
                service = ?view.service, src.identity = ?view.src_identity,
                dst.identity = ?view.dst_identity, bytes_sent = view.bytes_sent,
                bytes_received = view.bytes_received, duration_ms = view.duration_ms,
                response_flags = flags, "connection failed"),
        }
        let mut registry = self.lock();
        registry.active.remove(&tracked.id);
        *registry
            .closed_total
            .entry(view.error.unwrap_or("ok"))
            .or_default() += 1;
        if registry.recent.len() == RECENT {
            registry.recent.pop_front();
        }
        registry.recent.push_back(view);
    }

    /// Closes every open connection of `pod` (a pod deleted while its connections ran:
    /// its processes may live on, but nothing vouches for them any more). Each copy loop
    /// resets both ends and records the close as `pod_removed`. Returns how many there were.
    pub fn close_pod(&self, pod: &str) -> usize {
        self.stop_where(|t| t.pod == pod, Stop::PodRemoved)
    }

    /// Closes every open connection (the drain ended), as `close_pod` does.
    pub fn close_all(&self, why: Stop) -> usize {
        self.stop_where(|_| true, why)
    }

    fn stop_where(&self, which: impl Fn(&Tracked) -> bool, why: Stop) -> usize {
        let registry = self.lock();
        let mut closed = 0;
        for tracked in registry.active.values().filter(|t| which(t)) {
            tracked.stop.send_replace(Some(why));
            closed += 1;
        }
        closed
    }

    pub fn view(&self) -> ConnectionsView {
        let registry = self.lock();
        let mut active: Vec<_> = registry.active.values().map(|t| t.view(None)).collect();
        active.sort_by_key(|c| c.id);
        ConnectionsView {
            active,
            recent: registry.recent.iter().cloned().collect(),
            closed_total: registry.closed_total.clone(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        self.inner.lock()
    }

    /// The connection's labels, resolved (and counted as opened) the first time.
    fn labels(&self, tracked: &Tracked) -> TcpLabels {
        let mut first = false;
        let labels = tracked.labels.get_or_init(|| {
            first = true;
            let view = tracked.view(None);
            let snapshot = Arc::clone(&self.state.borrow());
            Ends::resolve(&snapshot, &view).labels(&view)
        });
        if first {
            self.metrics.opened(labels);
        }
        labels.clone()
    }

    fn write_access_log(
        &self,
        view: &ConnectionView,
        labels: &TcpLabels,
        policy: Option<&PolicyOutcome>,
        response_flags: &'static str,
        error: Option<&Error>,
    ) {
        let snapshot = Arc::clone(&self.state.borrow());
        let namespace = pod_ref(&view.pod).map(|p| p.namespace);
        if !snapshot
            .mesh
            .access_log
            .enabled_for(namespace.as_deref().unwrap_or_default())
        {
            return;
        }
        let known = |value: &str| (value != UNKNOWN).then(|| value.to_owned());
        let start = UNIX_EPOCH + Duration::from_millis(view.start_unix_ms);
        self.access_log.write(&AccessRecord {
            kind: "access",
            start_time: humantime::format_rfc3339_millis(start).to_string(),
            duration_ms: view.duration_ms,
            direction: view.direction.as_str(),
            reporter: labels.reporter,
            pod: view.pod.clone(),
            id: view.id,
            src_addr: view.src,
            src_identity: view.src_identity.clone(),
            src_workload: known(&labels.source_workload),
            src_namespace: known(&labels.source_workload_namespace),
            dst_addr: view.dst,
            dst_identity: view.dst_identity.clone(),
            dst_workload: known(&labels.destination_workload),
            dst_namespace: known(&labels.destination_workload_namespace),
            dst_service: known(&labels.destination_service_name)
                .map(|name| format!("{}/{name}", labels.destination_service_namespace)),
            upstream: view.upstream,
            bytes_sent: view.bytes_sent,
            bytes_received: view.bytes_received,
            connection_security_policy: labels.connection_security_policy,
            policy: policy.map(|p| match p {
                PolicyOutcome::Allow => "allow",
                PolicyOutcome::Deny { .. } => "deny",
            }),
            policy_name: match policy {
                Some(PolicyOutcome::Deny { policy, .. }) => policy.clone(),
                _ => None,
            },
            policy_reason: match policy {
                Some(PolicyOutcome::Deny { reason, .. }) => Some(reason),
                _ => None,
            },
            response_flags,
            error: view.error,
            error_detail: error.map(ToString::to_string),
        });
    }
}

impl Default for Connections {
    /// A registry with an empty snapshot, unregistered metrics and no access log (for
    /// tests).
    fn default() -> Self {
        let (_, state) = watch::channel(Arc::new(Snapshot::default()));
        Self::new(state, TcpMetrics::default())
            .with_access_log(AccessLog::to_writer(std::io::sink()))
    }
}

impl Tracked {
    pub fn set_upstream(&self, upstream: SocketAddr, service: Option<String>) {
        *self.upstream.lock() = Some(upstream);
        *self.service.lock() = service;
    }

    /// Records the service alone (a connection that failed before it had an upstream).
    pub fn set_service(&self, service: Option<String>) {
        *self.service.lock() = service;
    }

    /// Records the registered external service the connection goes to: telemetry names
    /// its host as the destination service.
    pub fn set_external(&self, service: WorkloadRef) {
        *self.external.lock() = Some(service);
    }

    /// Records the waypoint the connection goes through.
    pub fn set_waypoint(&self, waypoint: Option<String>) {
        *self.waypoint.lock() = waypoint;
    }

    /// Records the identities mutual TLS proved (either may be unknown, e.g. a plaintext
    /// client of a PERMISSIVE pod).
    pub fn set_identities(&self, src: Option<String>, dst: Option<String>) {
        let security = if src.is_some() || dst.is_some() {
            Security::MutualTls
        } else {
            Security::None
        };
        *self.identities.lock() = Identities { src, dst, security };
    }

    /// Records the identities of two pods of this node, which the node itself vouches for.
    pub fn set_node_local_identities(&self, src: String, dst: String) {
        *self.identities.lock() = Identities {
            src: Some(src),
            dst: Some(dst),
            security: Security::NodeLocal,
        };
    }

    /// Records what access policy decided (the destination side calls this for every
    /// connection it evaluates; a denial also closes with the matching error).
    pub fn set_policy(&self, outcome: impl Into<PolicyOutcome>) {
        *self.policy.lock() = Some(outcome.into());
    }

    /// Resolves once the proxy ends the connection (`Connections::close_pod`,
    /// `close_all`), or never: the `stop` of a copy loop.
    pub fn stopped(&self) -> impl Future<Output = Error> + Send + 'static {
        let mut stop = self.stop.subscribe();
        async move {
            match stop
                .wait_for(Option::is_some)
                .await
                .ok()
                .and_then(|why| *why)
            {
                Some(Stop::PodRemoved) => Error::PodRemoved,
                Some(Stop::DrainCut) => Error::DrainCut,
                // The record is gone, hence the connection too.
                None => std::future::pending::<Error>().await,
            }
        }
    }

    /// `stop`, or the proxy ending the connection, whichever comes first.
    pub fn until_stopped(
        &self,
        stop: impl Future<Output = Error> + Send + 'static,
    ) -> impl Future<Output = Error> + Send + 'static {
        let removed = self.stopped();
        async move {
            tokio::select! {
                e = stop => e,
                e = removed => e,
            }
        }
    }

    fn policy(&self) -> Option<PolicyOutcome> {
        self.policy.lock().clone()
    }

    fn view(&self, error: Option<&'static str>) -> ConnectionView {
        let identities = self.identities.lock().clone();
        ConnectionView {
            id: self.id,
            direction: self.direction,
            pod: self.pod.clone(),
            src: self.src,
            dst: self.dst,
            upstream: *self.upstream.lock(),
            service: self.service.lock().clone(),
            waypoint: self.waypoint.lock().clone(),
            external_service: self.external.lock().as_ref().map(ToString::to_string),
            src_identity: identities.src,
            dst_identity: identities.dst,
            security: identities.security,
            start_unix_ms: self.start_unix_ms,
            duration_ms: self.started.elapsed().as_millis() as u64,
            bytes_sent: self.sent.load(Ordering::Relaxed),
            bytes_received: self.received.load(Ordering::Relaxed),
            error,
        }
    }
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
            Direction::Hbone => "hbone",
            Direction::Local => "local",
        }
    }
}

impl Direction {
    /// Istio's `reporter`: the client's proxy reports as `source`, the server's as
    /// `destination`.
    pub fn reporter(self) -> &'static str {
        match self {
            Direction::Outbound => "source",
            Direction::Inbound | Direction::Hbone | Direction::Local => "destination",
        }
    }
}

impl From<&Decision> for PolicyOutcome {
    fn from(decision: &Decision) -> Self {
        match decision {
            Decision::Allow => PolicyOutcome::Allow,
            Decision::Deny { policy, reason } => PolicyOutcome::Deny {
                policy: policy.as_ref().map(ToString::to_string),
                reason: reason.as_str(),
            },
        }
    }
}

impl From<Decision> for PolicyOutcome {
    fn from(decision: Decision) -> Self {
        PolicyOutcome::from(&decision)
    }
}

/// Both ends of a connection as the snapshot knows them.
struct Ends<'a> {
    src: End<'a>,
    dst: End<'a>,
    service: Option<WorkloadRef>,
    /// The registered external service: its host and its resource's namespace.
    external: Option<(&'a str, &'a str)>,
}

/// One end: the workload when the snapshot has it, else at least the reporting pod's name.
struct End<'a> {
    name: Option<WorkloadRef>,
    workload: Option<&'a Workload>,
}

impl<'a> Ends<'a> {
    fn resolve(snapshot: &'a Snapshot, view: &ConnectionView) -> Self {
        let own = pod_ref(&view.pod).map(|name| End {
            workload: snapshot.workloads.get(&name),
            name: Some(name),
        });
        let peer = |ip: IpAddr| {
            let workload = snapshot.workload_by_ip(ip);
            End {
                name: workload.map(|w| w.name.clone()),
                workload,
            }
        };
        let own = own.unwrap_or(End {
            name: None,
            workload: None,
        });
        match view.direction {
            Direction::Outbound => {
                let target = view.upstream.unwrap_or(view.dst);
                let service = view
                    .service
                    .as_deref()
                    .and_then(pod_ref)
                    .or_else(|| service_of(snapshot, target.ip()));
                let external = view
                    .external_service
                    .as_deref()
                    .and_then(pod_ref)
                    .and_then(|name| snapshot.external_services.get(&name))
                    .map(|e| (e.host(), e.name.namespace.as_str()));
                Ends {
                    src: own,
                    dst: peer(target.ip()),
                    service,
                    external,
                }
            }
            Direction::Inbound | Direction::Hbone | Direction::Local => Ends {
                src: peer(view.src.ip()),
                dst: own,
                service: service_of(snapshot, view.dst.ip()),
                external: None,
            },
        }
    }

    fn labels(&self, view: &ConnectionView) -> TcpLabels {
        let or_unknown = |v: Option<&String>| v.cloned().unwrap_or_else(|| UNKNOWN.to_owned());
        TcpLabels {
            reporter: view.direction.reporter(),
            source_workload: self.src.workload_name(),
            source_workload_namespace: self.src.namespace(),
            source_principal: or_unknown(view.src_identity.as_ref()),
            source_app: self.src.label(APP_LABELS),
            source_version: self.src.label(VERSION_LABELS),
            destination_workload: self.dst.workload_name(),
            destination_workload_namespace: self.dst.namespace(),
            destination_principal: or_unknown(view.dst_identity.as_ref()),
            destination_app: self.dst.label(APP_LABELS),
            destination_version: self.dst.label(VERSION_LABELS),
            destination_service: match (&self.service, self.external) {
                (Some(s), _) => format!("{}.{}.svc.{CLUSTER_DOMAIN}", s.name, s.namespace),
                // Istio names a ServiceEntry's destination by its host.
                (None, Some((host, _))) => host.to_owned(),
                (None, None) => UNKNOWN.to_owned(),
            },
            destination_service_name: match (&self.service, self.external) {
                (Some(s), _) => s.name.clone(),
                (None, Some((host, _))) => host.to_owned(),
                (None, None) => UNKNOWN.to_owned(),
            },
            destination_service_namespace: match (&self.service, self.external) {
                (Some(s), _) => s.namespace.clone(),
                (None, Some((_, namespace))) => namespace.to_owned(),
                (None, None) => UNKNOWN.to_owned(),
            },
            connection_security_policy: view.security.as_str(),
            response_flags: NO_FLAGS,
        }
    }
}

impl End<'_> {
    // The workload name is the pod's: the file source has no owner (Deployment) names.
    fn workload_name(&self) -> String {
        self.name
            .as_ref()
            .map_or_else(|| UNKNOWN.to_owned(), |n| n.name.clone())
    }

    fn namespace(&self) -> String {
        self.name
            .as_ref()
            .map_or_else(|| UNKNOWN.to_owned(), |n| n.namespace.clone())
    }

    /// The first of `keys` the workload has as a label.
    fn label(&self, keys: &[&str]) -> String {
        self.workload
            .and_then(|w| keys.iter().find_map(|k| w.labels.get(*k)))
            .cloned()
            .unwrap_or_else(|| UNKNOWN.to_owned())
    }
}

/// `namespace/name` back into its parts.
fn pod_ref(text: &str) -> Option<WorkloadRef> {
    let (namespace, name) = text.split_once('/')?;
    Some(WorkloadRef::new(namespace, name))
}

/// The first service (by name) with `ip` among its endpoints.
fn service_of(snapshot: &Snapshot, ip: IpAddr) -> Option<WorkloadRef> {
    snapshot.service_with_endpoint(ip).cloned()
}

/// The policy outcome an error carries, for a caller that closed without `set_policy`.
fn policy_of_error(error: &Error) -> Option<PolicyOutcome> {
    match error {
        Error::PolicyDenied { reason, policy } | Error::PolicyRevoked { reason, policy } => {
            Some(PolicyOutcome::Deny {
                policy: policy.as_ref().map(ToString::to_string),
                reason: reason.as_str(),
            })
        }
        _ => None,
    }
}

/// The reason this node refused the connection, if it did (for the denied counter).
fn denial(error: Option<&'static str>, policy: Option<&PolicyOutcome>) -> Option<&'static str> {
    match (policy, error) {
        (Some(PolicyOutcome::Deny { reason, .. }), _) => Some(reason),
        (_, Some(reason))
            if DENIAL_REASONS.contains(&reason)
                || reason == PROXY_LOOP
                || reason == UNREGISTERED =>
        {
            Some(reason)
        }
        _ => None,
    }
}

/// Envoy-style response flags (docs/telemetry.md): what went wrong, in the codes Istio's
/// dashboards know.
fn response_flags(error: Option<&'static str>, policy: Option<&PolicyOutcome>) -> &'static str {
    if matches!(policy, Some(PolicyOutcome::Deny { .. })) {
        return "RBAC";
    }
    let Some(reason) = error else {
        return NO_FLAGS;
    };
    if DENIAL_REASONS.contains(&reason) || reason == "policy_denied" {
        return "RBAC";
    }
    match reason {
        "downstream" => "DC",
        "upstream" | "stream_reset" | "http2" => "UC",
        "response_timeout" => "UT",
        // Envoy's stream idle timeout.
        "idle_timeout" => "SI",
        // Envoy's "no healthy upstream": the bound service's waypoint is not there.
        "waypoint_unavailable" => "UH",
        // Envoy's upstream overflow (circuit breaking): a connection-pool limit.
        "overflow" => "UO",
        "no_orig_dst" | "orig_dst_lookup" | "not_served" | "unknown_pod" | "hbone_unsupported"
        | PROXY_LOOP | UNREGISTERED => "NR",
        "bad_request" | "invalid_request" => "DPE",
        "unexpected_status" => "UPE",
        // Connect, TLS and identity failures, and anything newer: the upstream connection
        // could not be made.
        _ => "UF",
    }
}

/// Closed connections kept for `/debug/connections`.
const RECENT: usize = 1024;

/// Reasons that mean this node's proxy refused the connection.
const DENIAL_REASONS: [&str; 6] = [
    "denied_by_policy",
    "not_allowed",
    "default_deny",
    "policy_revoked",
    "plaintext_refused_strict",
    "waypoint_bypassed",
];

/// Refused (and counted as denied) without being a matter of policy: the destination is
/// the proxy itself (`loop_guard`).
const PROXY_LOOP: &str = "proxy_loop";

/// Refused because the mesh is `REGISTRY_ONLY` and the destination is not registered:
/// no route, as Envoy's `NR` says (Istio's BlackHoleCluster).
const UNREGISTERED: &str = "unregistered_destination";

/// Istio's value for a label the proxy cannot know.
const UNKNOWN: &str = "unknown";
const NO_FLAGS: &str = "-";
/// Kubernetes' default cluster domain, for `destination_service`.
const CLUSTER_DOMAIN: &str = "cluster.local";
/// Workload labels Istio reads `app` and `version` from, in order.
const APP_LABELS: &[&str] = &["app", "app.kubernetes.io/name"];
const VERSION_LABELS: &[&str] = &["version", "app.kubernetes.io/version"];

#[cfg(test)]
mod tests;
