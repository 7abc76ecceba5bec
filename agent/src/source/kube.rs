//! The Kubernetes source: list+watch caches (reflectors) of the cluster objects the node
//! proxy needs, joined into the same `state::Snapshot` the file source produces.
//!
//! Inputs, each its own watch with its own cache (`reflector`):
//! - Namespaces: `weft.dev/mesh=enabled` puts a namespace's pods in the mesh.
//! - Pods of this node (`spec.nodeName=NODE`): become local workloads once `NodePods` (fed by
//!   the CNI plugin and discovery) knows their netns; `weft.dev/mesh=disabled` opts one out.
//! - Pods of other nodes (`spec.nodeName!=NODE`): their identity, IPs and labels, so the
//!   proxy reaches them over HBONE as the right peer. Both pod caches keep a small
//!   projection (`project::PodItem`), never the API object, so memory grows with what the
//!   proxy uses (about 1 KiB a pod with a few labels), not with pod specs.
//! - Services and EndpointSlices, cluster-wide: VIPs, ports, ready endpoints.
//! - `AccessPolicy` and `PeerAuthentication` (`crd`).
//! - `TrafficPolicy` (`crd`), by every agent: the waypoint's snapshot carries those that
//!   target a Service bound to it (oldest first, the Gateway API's conflict rule), a node
//!   agent's none; the elected node agent writes their `status.ancestors` (`ancestors`).
//!   Its CRD may be missing after a `helm upgrade` (Helm installs CRDs, never upgrades
//!   them): then it is empty and synced, as the Gateway API's routes are.
//! - `ExternalService` (`crd`), by every agent: the services outside the mesh, by name. One
//!   that cannot be understood is left out (never its last good version), and says why in
//!   its `Accepted` condition; a missing CRD is no services, as for TrafficPolicy.
//! - weft's own agent pods (by the chart's labels, `Config::agent_selector`): which nodes
//!   host an agent. Pods of mesh namespaces on other nodes (virtual or serverless nodes that
//!   run no DaemonSet) run outside the mesh; `unmeshed` counts them and reports each one with
//!   an Event on the pod (node agents only, not a waypoint).
//!
//! - Waypoints: Services labelled `weft.dev/role: waypoint` (service account: annotation
//!   `weft.dev/service-account`, else the name; addresses: the ready endpoints), and the
//!   bindings: a Service's `weft.dev/use-waypoint` label, else its Namespace's (`none` on
//!   the Service opts out).
//! - Gateway API `HTTPRoute` and `GRPCRoute`, only for a waypoint (`Config::routes_for`)
//!   or a gateway (`Config::gateway_for`); node agents never watch them. The snapshot
//!   carries the routes with a parent Service bound to that waypoint, or with a parent
//!   naming that Gateway, converted by `source::gateway`. Without the Gateway API CRDs
//!   (404), routes are empty and synced, logged once at warn, and looked for again every
//!   `backoff.max`; readiness does not wait for them. `status` writes the routes' status
//!   (a waypoint's only: a gateway writes none yet).
//! - For a gateway only (`Config::gateway_for`): its own `Gateway` (by name, in its
//!   namespace; one of another class is not in the snapshot), and the `kubernetes.io/tls`
//!   Secrets it is told to read, each by name in that namespace: one list and watch per
//!   name with the field selector `metadata.name=NAME`, which is all an RBAC rule with
//!   `resourceNames` allows, and which keeps every other Secret out of the agent's memory.
//!   A Gateway or Secret that cannot be understood is left out (never its last good
//!   version: a restarted gateway would not have it), logged once per reason.
//!
//! Output: a snapshot on `tx`, rebuilt at most once per `Config::debounce` after any change
//! (and after `NodePods` changes), published only once every watch has listed in full, and
//! only when it differs from the one in force.
//!
//! Bad objects: an object that fails validation (a malformed AccessPolicy, a service port
//! out of range) is rejected alone, named with the field, logged and counted
//! (`weft_config_rejected_total{source="kubernetes"}`); if an earlier version of that same
//! object was valid, that version stays in force, otherwise the object is left out. The rest
//! of the cluster's state keeps flowing: freezing the whole snapshot on one user's typo would
//! stop every new pod on the node from being enrolled or protected by its policies.
//!
//! Except for the resources that guard workloads, which fail closed (`accepted`): an
//! `AccessPolicy` that cannot be understood denies everything for the workloads it selects
//! (its whole namespace if its selector cannot be read either), a `PeerAuthentication` is
//! STRICT for what it selects. The stand-in is built from the object alone, never from an
//! earlier version, so every agent enforces the same, restarted or not. Counted by
//! `weft_policies_invalid{kind}`; one agent writes each object's `Accepted` condition.
//!
//! Health (`Health`): per kind, whether the first list is done and whether the watch is up.
//! Readiness waits for the first full sync and reports a stale (down) watch by kind; the
//! metrics `weft_kubernetes_watch_stale{kind}`, `weft_kubernetes_objects{kind}` and
//! `weft_kubernetes_watch_errors_total{kind}` say the same to Prometheus.

mod accepted;
mod ancestors;
mod build;
pub mod crd;
mod project;
mod reflector;
mod status;
#[cfg(test)]
mod tests;
mod unmeshed;
mod writes;

use std::{collections::BTreeMap, fmt, sync::Arc, time::Duration};

use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Secret, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api,
    core::{ApiResource, DynamicObject},
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
};
use serde::Serialize;
use tokio::{
    sync::{Notify, watch},
    task::JoinSet,
};
use tracing::{debug, info};

use crate::{
    readiness::Ready,
    source::{SourceStatus, syntax::Invalid},
    state::{MeshSettings, Snapshot, WorkloadRef},
    sync::{Mutex, MutexGuard},
};

pub use reflector::Backoff;

/// Errors of setting the source up. Watch errors are not errors of the source: they are
/// retried with backoff and reported through `Health`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "cannot find Kubernetes API credentials (the pod's service account, or KUBECONFIG \
         outside a cluster): {0}"
    )]
    Credentials(#[source] kube::config::InferConfigError),
    #[error("cannot build the Kubernetes API client: {0}")]
    Client(#[source] kube::Error),
}

/// An object the source could not use, named with the field at fault.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{} {object} rejected: {invalid}", .kind.api_kind())]
pub struct Rejected {
    pub kind: Kind,
    /// `namespace/name` (or `name` for cluster-scoped objects).
    pub object: String,
    pub invalid: Invalid,
}

/// The source's settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// This node's name as the API knows it (`spec.nodeName` of its pods).
    pub node: String,
    /// Changes within this long of each other make one snapshot.
    pub debounce: Duration,
    /// Retry delays after API errors.
    pub backoff: Backoff,
    /// Objects per page of a list (bounds the memory a first sync needs at once).
    pub page_size: u32,
    /// How long the API server keeps one watch open before the source re-opens it.
    pub watch_timeout_secs: u32,
    /// Label selector of weft's agent pods (the chart's component labels).
    pub agent_selector: String,
    /// How long a mesh pod must be on a node without a running agent before it is reported
    /// as unmeshed (a new node's agent, or a restarting one, is not there at once).
    pub unmeshed_grace: Duration,
    /// The waypoint (namespace/name) this source serves: its routes are watched, carried
    /// in the snapshot and given status. `None` (node agents): routes are not watched.
    pub routes_for: Option<WorkloadRef>,
    /// The Gateway this source serves (a `weft gateway`): it, its certificates and the
    /// routes naming it are watched and carried in the snapshot. `None`: not a gateway.
    /// (Boxed: `Config` travels in enums, and most agents are not gateways.)
    pub gateway_for: Option<Box<GatewayFor>>,
}

/// What a `weft gateway`'s source reads besides the mesh.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayFor {
    /// The Gateway (namespace/name), watched alone.
    pub gateway: WorkloadRef,
    /// The names of the Secrets of its namespace it may read (its listeners'
    /// certificates), each watched alone.
    pub tls_secrets: Vec<String>,
}

/// The kinds of object the source watches, one watch each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Namespace,
    /// Pods of this node.
    LocalPod,
    /// Pods of other nodes.
    RemotePod,
    Service,
    EndpointSlice,
    AccessPolicy,
    PeerAuthentication,
    TrafficPolicy,
    ExternalService,
    /// weft's agent pods.
    AgentPod,
    /// Gateway API `HTTPRoute`s (waypoints only).
    HttpRoute,
    /// Gateway API `GRPCRoute`s (waypoints only).
    GrpcRoute,
    /// Gateway API `TLSRoute`s (gateways only).
    TlsRoute,
    /// Gateway API `TCPRoute`s (gateways only).
    TcpRoute,
    /// The Gateway API `Gateway` a gateway serves.
    Gateway,
    /// The `kubernetes.io/tls` Secrets a gateway reads.
    TlsSecret,
}

/// What each watch is doing, for readiness, metrics and status.
#[derive(Debug, Default)]
pub struct Health {
    kinds: Mutex<BTreeMap<Kind, WatchHealth>>,
    notify: Notify,
    /// Pods outside the mesh, by mesh namespace (every mesh namespace, 0 if none).
    unmeshed: Mutex<BTreeMap<String, u64>>,
}

/// The state of one watch.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct WatchHealth {
    /// The first full list is done (the cache has been complete at least once).
    pub synced: bool,
    /// The watch is open (false while retrying after an error).
    pub up: bool,
    /// Objects in the cache.
    pub objects: u64,
    /// Objects currently rejected (left out, or held at their last good version).
    pub rejected: u64,
    /// API errors since start-up.
    pub errors_total: u64,
    /// The most recent API error, cleared when the watch is up again.
    pub last_error: Option<String>,
    /// The most recent rejection of an object of this kind, while any is rejected.
    pub last_rejection: Option<String>,
    /// For a kind watched one object at a time (`Spawner::watch_named`): each watch's
    /// state, by `namespace/name`; the kind is synced once all are, up while all are.
    #[serde(skip)]
    parts: BTreeMap<String, PartHealth>,
}

/// The state of one of the watches of a kind watched one object at a time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct PartHealth {
    synced: bool,
    up: bool,
}

/// Where the source reports how it is doing.
#[derive(Clone, Debug)]
pub struct Report {
    /// Snapshots accepted and objects rejected (`weft status`, `config_rejected_total`).
    pub status: Arc<SourceStatus>,
    /// Per-kind watch state (metrics).
    pub health: Arc<Health>,
    /// Its condition `kubernetes` is pending until every watch has synced and while any
    /// watch is down.
    pub ready: Ready,
}

/// Metrics of the source, read from `Health` at every scrape.
#[derive(Debug)]
pub struct Metrics(Arc<Health>);

/// Builds the API client: in-cluster service account, else KUBECONFIG / ~/.kube/config.
pub async fn client() -> Result<kube::Client, Error> {
    client_from(kube::Config::infer().await.map_err(Error::Credentials)?)
}

/// Builds the API client from `config`.
pub fn client_from(mut config: kube::Config) -> Result<kube::Client, Error> {
    // The watches retry with their own backoff and report a stale cache while they do;
    // kube's built-in retry of 429/503/504 (up to 15 times, minutes in all) would hide an
    // API server outage from readiness and metrics.
    config.default_retry = false;
    kube::Client::try_from(config).map_err(Error::Client)
}

/// Runs the source until `tx` has no receivers: watches every kind, rebuilds the snapshot
/// (debounced) on changes of the caches, and publishes it. This node's pods are in it by
/// pod UID (`Location::Pod`); `source::node::follow` joins in their netns. `mesh` holds
/// the mesh-wide settings of the config file (`PeerAuthentication`s add to its mTLS modes).
pub async fn run(
    client: kube::Client,
    config: Config,
    mesh: MeshSettings,
    tx: watch::Sender<Arc<Snapshot>>,
    report: Report,
) {
    let Report {
        status,
        health,
        ready,
    } = report;
    ready.block(
        READY_CONDITION,
        "first sync of the Kubernetes watches pending",
    );
    let caches = Arc::new(reflector::Caches::new(
        Arc::clone(&health),
        Arc::clone(&status),
    ));
    let mut watches = JoinSet::new();
    let node = &config.node;
    let mut spawn = reflector::Spawner {
        config: &config,
        caches: &caches,
        watches: &mut watches,
    };
    spawn.watch(
        Api::<Namespace>::all(client.clone()),
        Kind::Namespace,
        (None, None),
        project::namespace,
        |c| &mut c.namespaces,
    );
    spawn.watch(
        Api::<Pod>::all(client.clone()),
        Kind::LocalPod,
        (Some(format!("spec.nodeName={node}")), None),
        project::pod,
        |c| &mut c.local_pods,
    );
    spawn.watch(
        Api::<Pod>::all(client.clone()),
        Kind::RemotePod,
        (Some(format!("spec.nodeName!={node}")), None),
        project::pod,
        |c| &mut c.remote_pods,
    );
    spawn.watch(
        Api::<Service>::all(client.clone()),
        Kind::Service,
        (None, None),
        project::service,
        |c| &mut c.services,
    );
    spawn.watch(
        Api::<EndpointSlice>::all(client.clone()),
        Kind::EndpointSlice,
        (None, None),
        project::endpoint_slice,
        |c| &mut c.slices,
    );
    // The weft resources are read as untyped objects and converted one by one, so one
    // that does not fit the Rust type is rejected alone instead of failing the whole list.
    // Both guard workloads: one that cannot be understood fails closed (`accepted`).
    spawn.watch_fail_closed(
        untyped::<crd::AccessPolicy>(&client),
        Kind::AccessPolicy,
        (project::access_policy, accepted::POLICY_FAILS_CLOSED),
        |c| &mut c.policies,
    );
    spawn.watch_fail_closed(
        untyped::<crd::PeerAuthentication>(&client),
        Kind::PeerAuthentication,
        (project::peer_authentication, accepted::MODE_FAILS_CLOSED),
        |c| &mut c.peer_authentications,
    );
    // Read by every agent: a waypoint for its snapshot, the elected node agent for their
    // status. A rejected one keeps its last good version (it guards no workload).
    spawn.watch_optional(
        untyped::<crd::TrafficPolicy>(&client),
        Kind::TrafficPolicy,
        (project::traffic_policy, Some(ancestors::KEEPS_LAST_GOOD)),
        |c| &mut c.traffic_policies,
        TRAFFIC_POLICY_INSTALL,
    );
    // Read by every agent: the node proxy's registry, and the elected one's status writes.
    // A rejected one is left out (`accepted::EXTERNAL_LEFT_OUT`).
    spawn.watch_optional(
        untyped::<crd::ExternalService>(&client),
        Kind::ExternalService,
        (project::external_service, Some(accepted::EXTERNAL_LEFT_OUT)),
        |c| &mut c.external_services,
        EXTERNAL_SERVICE_INSTALL,
    );
    spawn.watch(
        Api::<Pod>::all(client.clone()),
        Kind::AgentPod,
        (None, Some(config.agent_selector.clone())),
        project::agent,
        |c| &mut c.agents,
    );
    if config.routes_for.is_some() || config.gateway_for.is_some() {
        spawn.watch_optional(
            untyped::<gateway_api::experimental::httproutes::HttpRoute>(&client),
            Kind::HttpRoute,
            (project::http_route, None),
            |c| &mut c.http_routes,
            GATEWAY_API_INSTALL,
        );
        spawn.watch_optional(
            untyped::<gateway_api::experimental::grpcroutes::GrpcRoute>(&client),
            Kind::GrpcRoute,
            (project::grpc_route, None),
            |c| &mut c.grpc_routes,
            GATEWAY_API_INSTALL,
        );
    }
    if let Some(gateway) = &config.gateway_for {
        // The routes of its passthrough and TCP listeners; TCPRoute is in the Gateway API's
        // experimental channel only, and may well not be installed.
        spawn.watch_optional(
            untyped::<gateway_api::experimental::tlsroutes::TlsRoute>(&client),
            Kind::TlsRoute,
            (project::tls_route, None),
            |c| &mut c.tls_routes,
            GATEWAY_API_INSTALL,
        );
        spawn.watch_optional(
            untyped::<gateway_api::experimental::tcproutes::TcpRoute>(&client),
            Kind::TcpRoute,
            (project::tcp_route, None),
            |c| &mut c.tcp_routes,
            GATEWAY_API_INSTALL,
        );
        let namespace = &gateway.gateway.namespace;
        spawn.watch_named(
            Api::<DynamicObject>::namespaced_with(
                client.clone(),
                namespace,
                &ApiResource::erase::<gateway_api::experimental::gateways::Gateway>(&()),
            ),
            Kind::Gateway,
            &gateway.gateway,
            (project::gateway, Some(accepted::GATEWAY_LEFT_OUT)),
            |c| &mut c.gateways,
            Some(GATEWAY_API_INSTALL),
        );
        // One watch per name: RBAC's resourceNames allow no wider list. A name given twice
        // is one watch (two would share one object's part of the store).
        let names: std::collections::BTreeSet<&String> = gateway.tls_secrets.iter().collect();
        for name in names {
            spawn.watch_named(
                Api::<Secret>::namespaced(client.clone(), namespace),
                Kind::TlsSecret,
                &WorkloadRef::new(namespace.as_str(), name.as_str()),
                (project::tls_secret, Some(accepted::CERTIFICATE_LEFT_OUT)),
                |c| &mut c.tls_secrets,
                None,
            );
        }
    }
    if let Some(waypoint) = &config.routes_for {
        watches.spawn(status::run(
            client.clone(),
            waypoint.clone(),
            Arc::clone(&caches),
            (config.debounce, config.backoff),
        ));
    }
    // Reporting unmeshed pods is the node agents' job: a waypoint or gateway on the
    // reporting agent's node would be elected too, and it may not write Events.
    if config.routes_for.is_none() && config.gateway_for.is_none() {
        watches.spawn(unmeshed::run(
            client.clone(),
            config.clone(),
            Arc::clone(&caches),
            Arc::clone(&health),
        ));
        // Elected as the unmeshed-pod reporter is: one writer per cluster.
        watches.spawn(accepted::run(
            client.clone(),
            config.clone(),
            Arc::clone(&caches),
        ));
    }

    loop {
        tokio::select! {
            () = caches.changed() => {}
            () = tx.closed() => break,
            // Readiness follows the watches even when no object changes.
            () = health.changed() => {}
        }
        // Debounce: a burst of events (a deployment rolling, a first sync) makes one
        // snapshot. Changes that arrive meanwhile are in the caches when we build.
        tokio::time::sleep(config.debounce).await;
        let readiness = health.readiness();
        if !health.all_synced() {
            ready.set(READY_CONDITION, readiness);
            continue;
        }
        let snapshot = build::snapshot(
            &caches.lock(),
            &mesh,
            config.routes_for.as_ref(),
            config.gateway_for.as_ref().map(|g| &g.gateway),
        );
        if *tx.borrow().as_ref() != snapshot || status.view().generation == 0 {
            info!(
                component = "kubernetes",
                workloads = snapshot.workloads.len(),
                services = snapshot.services.len(),
                policies = snapshot.policies.len(),
                traffic_policies = snapshot.traffic_policies.len(),
                external_services = snapshot.external_services.len(),
                gateways = snapshot.gateways.len(),
                "snapshot built from the cluster"
            );
            tx.send_replace(Arc::new(snapshot));
            // After the new state is visible: whoever sees the new generation sees it.
            status.accepted();
        } else {
            debug!(
                component = "kubernetes",
                "cluster changes leave the snapshot as it was"
            );
        }
        // Ready only once a snapshot of the fully synced caches is published.
        ready.set(READY_CONDITION, readiness);
    }
    watches.shutdown().await;
}

impl Config {
    /// Production settings for node `node`.
    pub fn new(node: impl Into<String>) -> Self {
        Self {
            node: node.into(),
            debounce: Duration::from_millis(100),
            backoff: Backoff {
                initial: Duration::from_millis(500),
                max: Duration::from_secs(30),
            },
            page_size: 500,
            // The API server's own default is 30-60 minutes; shorter re-watches spread the
            // load and notice a silently dead connection sooner.
            watch_timeout_secs: 290,
            agent_selector: "app.kubernetes.io/name=weft,app.kubernetes.io/component=agent".into(),
            unmeshed_grace: Duration::from_secs(60),
            routes_for: None,
            gateway_for: None,
        }
    }
}

impl Health {
    /// A copy of every watch's state.
    pub fn view(&self) -> BTreeMap<Kind, WatchHealth> {
        self.lock().clone()
    }

    /// Whether every watch has completed its first full list.
    pub fn all_synced(&self) -> bool {
        let kinds = self.lock();
        watched(&kinds).all(|kind| kinds.get(&kind).is_some_and(|h| h.synced))
    }

    /// Ok once every watch has synced and is up; else which ones are not, and why.
    pub fn readiness(&self) -> Result<(), String> {
        let kinds = self.lock();
        let mut not_synced = Vec::new();
        let mut stale = Vec::new();
        for kind in watched(&kinds) {
            match kinds.get(&kind) {
                Some(h) if !h.synced => not_synced.push(kind.to_string()),
                Some(h) if !h.up => stale.push(match &h.last_error {
                    Some(e) => format!("{kind} ({e})"),
                    None => kind.to_string(),
                }),
                Some(_) => {}
                None => not_synced.push(kind.to_string()),
            }
        }
        let mut problems = Vec::new();
        if !not_synced.is_empty() {
            problems.push(format!("not synced yet: {}", not_synced.join(", ")));
        }
        if !stale.is_empty() {
            problems.push(format!(
                "watch down, cache stale (check the API server and the agent's RBAC): {}",
                stale.join(", ")
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(format!("Kubernetes watches: {}", problems.join("; ")))
        }
    }

    /// Pods outside the mesh, by mesh namespace.
    pub fn unmeshed(&self) -> BTreeMap<String, u64> {
        self.unmeshed.lock().clone()
    }

    fn set_unmeshed(&self, counts: BTreeMap<String, u64>) {
        *self.unmeshed.lock() = counts;
    }

    /// Resolves on the next change of any watch's state (sync, up/down, last error).
    async fn changed(&self) {
        self.notify.notified().await;
    }

    fn update(&self, kind: Kind, f: impl FnOnce(&mut WatchHealth)) {
        let mut kinds = self.lock();
        let created = !kinds.contains_key(&kind);
        let health = kinds.entry(kind).or_default();
        let before = (health.synced, health.up, health.last_error.clone());
        f(health);
        // What readiness says changed (a reason names the last error).
        if created || before != (health.synced, health.up, health.last_error.clone()) {
            self.notify.notify_one();
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<Kind, WatchHealth>> {
        self.kinds.lock()
    }
}

impl WatchHealth {
    /// Adds the watch of `part` (a kind watched one object at a time), not listed yet.
    fn add_part(&mut self, part: Option<&str>) {
        if let Some(part) = part {
            self.parts.entry(part.to_owned()).or_default();
            self.synced = false;
            self.up = false;
        }
    }

    /// Records that the watch of `part` (`None`: the kind's one watch) is up or down.
    fn set_up(&mut self, part: Option<&str>, up: bool) {
        match part {
            None => self.up = up,
            Some(part) => {
                self.parts.entry(part.to_owned()).or_default().up = up;
                self.up = self.parts.values().all(|p| p.up);
            }
        }
        if self.up {
            self.last_error = None;
        }
    }

    /// Records a full list of `part` (`None`: of the kind's one watch).
    fn set_listed(&mut self, part: Option<&str>) {
        match part {
            None => self.synced = true,
            Some(name) => {
                self.parts.entry(name.to_owned()).or_default().synced = true;
                self.synced = self.parts.values().all(|p| p.synced);
            }
        }
        self.set_up(part, true);
    }
}

impl Kind {
    /// Every kind every source watches, in the order of `Ord` (a waypoint's also watches
    /// the route kinds; a gateway's the route kinds, its Gateway and its Secrets).
    pub const ALL: [Kind; 10] = [
        Kind::Namespace,
        Kind::LocalPod,
        Kind::RemotePod,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::AccessPolicy,
        Kind::PeerAuthentication,
        Kind::TrafficPolicy,
        Kind::ExternalService,
        Kind::AgentPod,
    ];

    /// The metric label and the name in readiness reasons.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Namespace => "namespace",
            Kind::LocalPod => "local_pod",
            Kind::RemotePod => "remote_pod",
            Kind::Service => "service",
            Kind::EndpointSlice => "endpoint_slice",
            Kind::AccessPolicy => "access_policy",
            Kind::PeerAuthentication => "peer_authentication",
            Kind::TrafficPolicy => "traffic_policy",
            Kind::ExternalService => "external_service",
            Kind::AgentPod => "agent_pod",
            Kind::HttpRoute => "http_route",
            Kind::GrpcRoute => "grpc_route",
            Kind::TlsRoute => "tls_route",
            Kind::TcpRoute => "tcp_route",
            Kind::Gateway => "gateway",
            Kind::TlsSecret => "tls_secret",
        }
    }

    /// The API kind, for messages naming an object (`AccessPolicy prod/api`).
    fn api_kind(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::LocalPod | Kind::RemotePod | Kind::AgentPod => "Pod",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::AccessPolicy => "AccessPolicy",
            Kind::PeerAuthentication => "PeerAuthentication",
            Kind::TrafficPolicy => "TrafficPolicy",
            Kind::ExternalService => "ExternalService",
            Kind::HttpRoute => "HTTPRoute",
            Kind::GrpcRoute => "GRPCRoute",
            Kind::TlsRoute => "TLSRoute",
            Kind::TcpRoute => "TCPRoute",
            Kind::Gateway => "Gateway",
            Kind::TlsSecret => "Secret",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Metrics {
    pub fn new(health: Arc<Health>) -> Self {
        Self(health)
    }
}

impl Collector for Metrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let kinds = self.0.view();
        let gauge = |encoder: &mut DescriptorEncoder,
                     name: &str,
                     help: &str,
                     value: &dyn Fn(&WatchHealth) -> i64|
         -> Result<(), fmt::Error> {
            let mut metric = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for kind in watched(&kinds) {
                let health = kinds.get(&kind).cloned().unwrap_or_default();
                ConstGauge::new(value(&health))
                    .encode(metric.encode_family(&[("kind", kind.as_str())])?)?;
            }
            Ok(())
        };
        gauge(
            &mut encoder,
            "kubernetes_watch_stale",
            "1 while the cache of this kind is stale (not synced yet, or its watch is down)",
            &|h| i64::from(!h.synced || !h.up),
        )?;
        gauge(
            &mut encoder,
            "kubernetes_objects",
            "Objects of this kind in the agent's cache",
            &|h| i64::try_from(h.objects).unwrap_or(i64::MAX),
        )?;
        gauge(
            &mut encoder,
            "kubernetes_rejected_objects",
            "Objects of this kind rejected by validation (left out or held at their last good version)",
            &|h| i64::try_from(h.rejected).unwrap_or(i64::MAX),
        )?;
        let mut metric = encoder.encode_descriptor(
            "kubernetes_watch_errors",
            "Kubernetes API errors of this kind's list and watch (each retried with backoff)",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for kind in watched(&kinds) {
            let errors = kinds.get(&kind).map_or(0, |h| h.errors_total);
            ConstCounter::new(errors).encode(metric.encode_family(&[("kind", kind.as_str())])?)?;
        }
        // Every rejected object of these kinds is in force as its fail-closed stand-in.
        let mut metric = encoder.encode_descriptor(
            "policies_invalid",
            "Policy resources that cannot be understood, in force as fail closed: an \
             AccessPolicy denies everything it selects, a PeerAuthentication makes it STRICT",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for kind in [Kind::AccessPolicy, Kind::PeerAuthentication] {
            let invalid = kinds.get(&kind).map_or(0, |h| h.rejected);
            ConstGauge::new(i64::try_from(invalid).unwrap_or(i64::MAX))
                .encode(metric.encode_family(&[("kind", kind.as_str())])?)?;
        }
        let mut metric = encoder.encode_descriptor(
            "kubernetes_unmeshed_pods",
            "Pods of this mesh namespace on nodes that run no weft agent (virtual or serverless \
             nodes): outside the mesh. Every agent reports the cluster-wide count",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (namespace, count) in self.0.unmeshed() {
            ConstGauge::new(i64::try_from(count).unwrap_or(i64::MAX))
                .encode(metric.encode_family(&[("namespace", namespace.as_str())])?)?;
        }
        Ok(())
    }
}

/// The kinds of `kinds` (the watches started) and those every source watches, in order.
fn watched(kinds: &BTreeMap<Kind, WatchHealth>) -> impl Iterator<Item = Kind> + '_ {
    let mut all: Vec<Kind> = Kind::ALL.into_iter().chain(kinds.keys().copied()).collect();
    all.sort_unstable();
    all.dedup();
    all.into_iter()
}

/// What a cluster without the Gateway API CRDs needs, for the warning.
const GATEWAY_API_INSTALL: &str = "the Gateway API CRDs, experimental channel \
    (kubectl apply --server-side -f https://github.com/kubernetes-sigs/gateway-api/releases/download/v1.3.0/experimental-install.yaml)";

/// What a cluster upgraded without the TrafficPolicy CRD needs, for the warning.
const TRAFFIC_POLICY_INSTALL: &str = "weft's TrafficPolicy CRD, which `helm upgrade` does not \
    install (kubectl apply --server-side -f deploy/helm/weft/crds/trafficpolicies.weft.dev.yaml)";

/// What a cluster upgraded without the ExternalService CRD needs, for the warning.
const EXTERNAL_SERVICE_INSTALL: &str = "weft's ExternalService CRD, which `helm upgrade` does \
    not install (kubectl apply --server-side -f deploy/helm/weft/crds/externalservices.weft.dev.yaml)";

/// The cluster-wide API of `K`'s objects, read as untyped objects.
fn untyped<K: kube::Resource<DynamicType = ()>>(client: &kube::Client) -> Api<DynamicObject> {
    Api::all_with(client.clone(), &ApiResource::erase::<K>(&()))
}

/// The readiness condition of this source.
pub const READY_CONDITION: &str = "kubernetes";
