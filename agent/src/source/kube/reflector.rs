//! One list+watch per kind into a cache of projected items (a reflector that stores only
//! what `project` keeps). Lists page by page, then watches from the list's resourceVersion
//! (with bookmarks, so a quiet kind's version stays fresh); a `410 Gone` re-lists, any other
//! error is retried with exponential backoff and marks the kind's watch down in `Health`
//! until the next list or watch opens.
//!
//! A kind may also be watched one object at a time (`Spawner::watch_named`: Secrets, whose
//! RBAC grants names only): several list+watches by name share the kind's store, each
//! re-list replacing its own object only, and its health (synced once all have listed).
//!
//! A re-list replaces the cache whole (objects deleted while the watch was down disappear),
//! except that an object whose new version is rejected keeps its last good version, or, for
//! a kind with a stand-in (`StandIn`), is replaced by it: a policy that fails closed, or a
//! TrafficPolicy's last good version told what the rejected one says of itself (its status).

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Debug,
    sync::Arc,
    time::Duration,
};

use http_body_util::BodyExt;
use kube::{
    Api, Resource, ResourceExt,
    api::{ListParams, WatchEvent, WatchParams},
    core::Status,
};
use serde::{Serialize, de::DeserializeOwned};
use tokio::{sync::Notify, task::JoinSet};
use tracing::{debug, info, warn};

use super::{
    Config, Health, Kind, Rejected,
    project::{
        AgentItem, ExternalItem, NamespaceItem, PeerAuthItem, PodItem, PolicyItem, RouteItem,
        ServiceItem, SliceItem, TrafficItem,
    },
};
use crate::{
    source::{SourceStatus, syntax::Invalid},
    state::{Gateway, TlsCertificate, WorkloadRef},
    sync::{Mutex, MutexGuard},
};

/// Retry delays after an API error: doubling from `initial` up to `max`, reset by success.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

/// Every kind's cache, behind one lock so a snapshot is built from one consistent view.
pub(super) struct Caches {
    stores: Mutex<Stores>,
    changed: Notify,
    /// The same changes, for the unmeshed-pod reporter (a `Notify` wakes one waiter).
    changed_for_report: Notify,
    /// The same changes, for the route status writer.
    changed_for_status: Notify,
    health: Arc<Health>,
    status: Arc<SourceStatus>,
}

#[derive(Default)]
pub(super) struct Stores {
    pub namespaces: Store<NamespaceItem>,
    pub local_pods: Store<PodItem>,
    pub remote_pods: Store<PodItem>,
    pub services: Store<ServiceItem>,
    pub slices: Store<SliceItem>,
    pub policies: Store<PolicyItem>,
    pub peer_authentications: Store<PeerAuthItem>,
    /// weft's agent pods, by the chart's labels: which nodes host an agent.
    pub agents: Store<AgentItem>,
    /// Gateway API routes (a waypoint's source only).
    pub http_routes: Store<RouteItem>,
    pub grpc_routes: Store<RouteItem>,
    pub tls_routes: Store<RouteItem>,
    pub tcp_routes: Store<RouteItem>,
    /// weft's `TrafficPolicy`s (a rejected one: its last good version, if any, stays).
    pub traffic_policies: Store<TrafficItem>,
    /// weft's `ExternalService`s (a rejected one: its status only, nothing in force).
    pub external_services: Store<ExternalItem>,
    /// The Gateway a gateway serves (`None`: rejected, left out).
    pub gateways: Store<Option<Gateway>>,
    /// The certificates a gateway reads, by Secret (`None`: rejected, left out).
    pub tls_secrets: Store<Option<TlsCertificate>>,
}

/// Items of one kind by `namespace/name`, and the objects currently rejected.
pub(super) struct Store<T> {
    pub items: BTreeMap<String, T>,
    rejected: HashMap<String, Rejected>,
}

/// Converts an API object into what the cache keeps; `Ok(None)`: nothing the proxy needs
/// (a pod without an IP yet, a slice of no service).
pub(super) type Project<K, T> = fn(K) -> Result<Option<T>, Invalid>;

/// What stands in for a rejected object of a kind, instead of leaving it out or keeping its
/// last good version as it was. A kind whose objects guard something fails closed: its
/// stand-in is built from the object alone (never the last good version, which only the
/// agents that saw it would have), so that every agent, restarted or not, enforces the same.
/// A kind whose status is written from the cache keeps what its last good version put in
/// force, with what the rejected version says of itself (its resourceVersion, its status).
pub(super) struct StandIn<K, T> {
    /// The item that stands in for a rejected object, from the object alone.
    pub stand_in: fn(&K, &Invalid) -> T,
    /// What the cache keeps: from the stand-in and the item it replaces, if any (the last
    /// good version, or an earlier stand-in).
    pub keep: fn(T, Option<T>) -> T,
    /// What the stand-in does, for the log line.
    pub effect: &'static str,
}

/// An object as the cache takes it: an item, nothing, or a rejection.
type Projected<T> = Result<Option<T>, Rejection<T>>;

/// A rejected object, and its stand-in (kinds with one only).
struct Rejection<T> {
    invalid: Invalid,
    stand_in: Option<Standing<T>>,
}

/// A stand-in built from a rejected object, not yet merged with the item it replaces.
struct Standing<T> {
    item: T,
    keep: fn(T, Option<T>) -> T,
    effect: &'static str,
}

/// Picks a kind's store out of `Stores`.
pub(super) type StoreOf<T> = fn(&mut Stores) -> &mut Store<T>;

/// Starts watches into `caches`.
pub(super) struct Spawner<'a> {
    pub config: &'a Config,
    pub caches: &'a Arc<Caches>,
    pub watches: &'a mut JoinSet<()>,
}

impl Caches {
    pub fn new(health: Arc<Health>, status: Arc<SourceStatus>) -> Self {
        Self {
            stores: Mutex::default(),
            changed: Notify::new(),
            changed_for_report: Notify::new(),
            changed_for_status: Notify::new(),
            health,
            status,
        }
    }

    /// Resolves after the next change of any cache (at once if one happened since the
    /// last call: changes are never lost, and a burst of them wakes the builder once).
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// As `changed`, for the unmeshed-pod reporter.
    pub async fn changed_for_report(&self) {
        self.changed_for_report.notified().await;
    }

    /// As `changed`, for the route status writer.
    pub async fn changed_for_status(&self) {
        self.changed_for_status.notified().await;
    }

    /// The watches' health.
    pub fn health(&self) -> &Health {
        &self.health
    }

    fn notify(&self) {
        self.changed.notify_one();
        self.changed_for_report.notify_one();
        self.changed_for_status.notify_one();
    }

    pub fn lock(&self) -> MutexGuard<'_, Stores> {
        self.stores.lock()
    }

    /// Applies an added or modified object.
    fn apply<T>(&self, kind: Kind, store: StoreOf<T>, key: String, item: Projected<T>) {
        let mut stores = self.lock();
        let store = store(&mut stores);
        match item {
            Ok(Some(item)) => {
                store.items.insert(key.clone(), item);
                store.rejected.remove(&key);
            }
            Ok(None) => {
                store.items.remove(&key);
                store.rejected.remove(&key);
            }
            Err(Rejection { invalid, stand_in }) => {
                // A new version with the same fault (a status or label change) is the same
                // rejection, counted once; its stand-in follows the new version.
                let seen = store
                    .rejected
                    .get(&key)
                    .is_some_and(|r| r.invalid == invalid);
                let effect = stand_in.map(|standing| {
                    let replaced = store.items.remove(&key);
                    store
                        .items
                        .insert(key.clone(), (standing.keep)(standing.item, replaced));
                    standing.effect
                });
                if !seen {
                    self.reject(kind, store, key, invalid, effect);
                }
            }
        }
        let counts = store.counts();
        drop(stores);
        self.health.update(kind, |h| set_counts(h, counts));
        self.notify();
    }

    fn delete<T>(&self, kind: Kind, store: StoreOf<T>, key: &str) {
        let mut stores = self.lock();
        let store = store(&mut stores);
        store.items.remove(key);
        store.rejected.remove(key);
        let counts = store.counts();
        drop(stores);
        self.health.update(kind, |h| set_counts(h, counts));
        self.notify();
    }

    /// Replaces a kind's cache with a full list; `part`: the list of this one object
    /// (`namespace/name`) only, which replaces it alone.
    fn replace<T>(
        &self,
        kind: Kind,
        store: StoreOf<T>,
        listed: Vec<(String, Projected<T>)>,
        part: Option<&str>,
    ) {
        let mut stores = self.lock();
        let store = store(&mut stores);
        let (mut old, old_rejected): (BTreeMap<_, _>, HashMap<_, _>) = match part {
            None => (
                std::mem::take(&mut store.items),
                std::mem::take(&mut store.rejected),
            ),
            Some(key) => (
                store.items.remove_entry(key).into_iter().collect(),
                store.rejected.remove_entry(key).into_iter().collect(),
            ),
        };
        for (key, item) in listed {
            match item {
                Ok(Some(item)) => {
                    store.items.insert(key, item);
                }
                Ok(None) => {}
                Err(Rejection { invalid, stand_in }) => {
                    let effect = match stand_in {
                        Some(standing) => {
                            let replaced = old.remove(&key);
                            let item = (standing.keep)(standing.item, replaced);
                            store.items.insert(key.clone(), item);
                            Some(standing.effect)
                        }
                        None => {
                            if let Some(last_good) = old.remove(&key) {
                                store.items.insert(key.clone(), last_good);
                            }
                            None
                        }
                    };
                    // Counted once per new reason, not again at every re-list.
                    match old_rejected.get(&key) {
                        Some(seen) if seen.invalid == invalid => {
                            store.rejected.insert(key, seen.clone());
                        }
                        _ => self.reject(kind, store, key, invalid, effect),
                    }
                }
            }
        }
        let counts = store.counts();
        drop(stores);
        self.health.update(kind, |h| {
            set_counts(h, counts);
            h.set_listed(part);
        });
        self.notify();
    }

    /// Records and logs a rejection; `stood_in`: what the stand-in in force does.
    fn reject<T>(
        &self,
        kind: Kind,
        store: &mut Store<T>,
        key: String,
        invalid: Invalid,
        stood_in: Option<&'static str>,
    ) {
        let rejected = Rejected {
            kind,
            object: key.clone(),
            invalid,
        };
        let kept = match stood_in {
            Some(effect) => effect,
            None if store.items.contains_key(&key) => "its last good version stays in force",
            None => "it is left out",
        };
        warn!(component = "kubernetes", kind = kind.api_kind(), object = %key,
            error = %rejected.invalid, "object rejected; {kept}");
        self.status.rejected(&rejected);
        let message = rejected.to_string();
        self.health
            .update(kind, |h| h.last_rejection = Some(message));
        store.rejected.insert(key, rejected);
    }
}

/// Waits for the next pass of a task that follows the caches (a status writer, the
/// unmeshed-pod reporter): `changed` (its change notification) or the instant `at` (a retry
/// or a deadline), then `debounce`, so that a burst of changes makes one pass.
pub(super) async fn next_pass(
    changed: impl Future<Output = ()>,
    at: Option<tokio::time::Instant>,
    debounce: Duration,
) {
    let timer = async {
        match at {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        () = changed => {}
        () = timer => {}
    }
    tokio::time::sleep(debounce).await;
}

impl Stores {
    /// The names of the namespaces in the mesh (`weft.dev/mesh=enabled`).
    pub fn mesh_namespaces(&self) -> impl Iterator<Item = &String> {
        self.namespaces
            .items
            .iter()
            .filter(|(_, n)| n.enabled)
            .map(|(name, _)| name)
    }
}

impl<T> Store<T> {
    /// The objects currently rejected, by key.
    pub fn rejected(&self) -> &HashMap<String, Rejected> {
        &self.rejected
    }

    /// (items, rejected objects).
    fn counts(&self) -> (u64, u64) {
        (self.items.len() as u64, self.rejected.len() as u64)
    }
}

/// Records a kind's counts; a kind with no rejected object has no last rejection.
fn set_counts(health: &mut super::WatchHealth, (objects, rejected): (u64, u64)) {
    health.objects = objects;
    health.rejected = rejected;
    if rejected == 0 {
        health.last_rejection = None;
    }
}

impl<T> Default for Store<T> {
    fn default() -> Self {
        Self {
            items: BTreeMap::new(),
            rejected: HashMap::new(),
        }
    }
}

impl Spawner<'_> {
    /// Starts the list+watch of `kind` through `api` (restricted by `field_selector` and
    /// `label_selector`), projecting objects with `project` into the store `store` picks.
    pub fn watch<K, T>(
        &mut self,
        api: Api<K>,
        kind: Kind,
        (field_selector, label_selector): (Option<String>, Option<String>),
        project: Project<K, T>,
        store: StoreOf<T>,
    ) where
        K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
        T: Send + 'static,
    {
        self.spawn(
            api,
            kind,
            (field_selector, label_selector),
            (project, None),
            store,
            None,
        );
    }

    /// As `watch`, for a kind with a stand-in (one that fails closed): a rejected object is
    /// replaced by the stand-in of `stand_in`.
    pub fn watch_fail_closed<K, T>(
        &mut self,
        api: Api<K>,
        kind: Kind,
        (project, stand_in): (Project<K, T>, StandIn<K, T>),
        store: StoreOf<T>,
    ) where
        K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
        T: Send + 'static,
    {
        self.spawn(
            api,
            kind,
            (None, None),
            (project, Some(stand_in)),
            store,
            None,
        );
    }

    /// As `watch`, for a kind whose API may not be installed (a CRD of another project):
    /// while its list answers 404, the kind is synced and empty, which is logged once at
    /// warn with `install` (what to install), and the list is retried every `backoff.max`.
    /// `stand_in`: as for `watch_fail_closed`, if the kind has one.
    pub fn watch_optional<K, T>(
        &mut self,
        api: Api<K>,
        kind: Kind,
        (project, stand_in): (Project<K, T>, Option<StandIn<K, T>>),
        store: StoreOf<T>,
        install: &'static str,
    ) where
        K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
        T: Send + 'static,
    {
        self.spawn(
            api,
            kind,
            (None, None),
            (project, stand_in),
            store,
            Some(install),
        );
    }

    /// As `watch` (or `watch_optional` with `install`), for the one object `name` of
    /// `api` (namespaced in its namespace): the list and watch select it with
    /// `metadata.name=NAME`. Several of a kind share its store and health.
    pub fn watch_named<K, T>(
        &mut self,
        api: Api<K>,
        kind: Kind,
        name: &WorkloadRef,
        (project, stand_in): (Project<K, T>, Option<StandIn<K, T>>),
        store: StoreOf<T>,
        install: Option<&'static str>,
    ) where
        K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
        T: Send + 'static,
    {
        let part = name.to_string();
        self.caches
            .health
            .update(kind, |h| h.add_part(Some(part.as_str())));
        self.spawn_part(
            api,
            kind,
            (Some(format!("metadata.name={}", name.name)), None),
            (project, stand_in),
            store,
            (install, Some(part)),
        );
    }

    fn spawn<K, T>(
        &mut self,
        api: Api<K>,
        kind: Kind,
        selectors: (Option<String>, Option<String>),
        projection: (Project<K, T>, Option<StandIn<K, T>>),
        store: StoreOf<T>,
        install: Option<&'static str>,
    ) where
        K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
        T: Send + 'static,
    {
        // Known from the start, so readiness waits for its first list.
        self.caches.health.update(kind, |_| {});
        self.spawn_part(api, kind, selectors, projection, store, (install, None));
    }

    fn spawn_part<K, T>(
        &mut self,
        api: Api<K>,
        kind: Kind,
        (field_selector, label_selector): (Option<String>, Option<String>),
        (project, stand_in): (Project<K, T>, Option<StandIn<K, T>>),
        store: StoreOf<T>,
        (install, part): (Option<&'static str>, Option<String>),
    ) where
        K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
        T: Send + 'static,
    {
        let reflector = Reflector {
            client: api.clone().into_client(),
            api,
            kind,
            install,
            part,
            field_selector,
            label_selector,
            project,
            stand_in,
            store,
            caches: Arc::clone(self.caches),
            page_size: self.config.page_size,
            watch_timeout_secs: self.config.watch_timeout_secs,
            backoff: self.config.backoff,
        };
        self.watches.spawn(reflector.run());
    }
}

struct Reflector<K, T> {
    api: Api<K>,
    client: kube::Client,
    kind: Kind,
    /// Set for an optional kind: what to install when its API is missing (404).
    install: Option<&'static str>,
    /// Set for a watch of one object (`namespace/name`) of a kind watched so.
    part: Option<String>,
    field_selector: Option<String>,
    label_selector: Option<String>,
    project: Project<K, T>,
    stand_in: Option<StandIn<K, T>>,
    store: StoreOf<T>,
    caches: Arc<Caches>,
    page_size: u32,
    watch_timeout_secs: u32,
    backoff: Backoff,
}

/// How one list or watch ended, when it did not fail.
enum Ended {
    /// Listed in full at this resourceVersion.
    Listed(String),
    /// The server closed the watch (its timeout): re-open from the version we have.
    Closed,
    /// The version we have is too old (410 Gone): list again.
    Expired,
}

#[derive(Debug, thiserror::Error)]
enum WatchError {
    #[error("{0}")]
    Api(#[from] kube::Error),
    #[error("API server error {}: {}", .0.code, .0.message)]
    Status(Box<Status>),
    #[error("cannot decode a watch event: {0}")]
    Decode(#[source] serde_json::Error),
}

impl<K, T> Reflector<K, T>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    T: Send + 'static,
{
    async fn run(self) {
        let mut version: Option<String> = None;
        let mut delay = self.backoff.initial;
        let mut missing_reported = false;
        loop {
            let ended = match &version {
                None => self.list().await,
                Some(v) => self.watch(v.clone(), &mut version).await,
            };
            match ended {
                Ok(Ended::Listed(v)) => {
                    debug!(component = "kubernetes", kind = %self.kind, version = %v, "listed");
                    version = Some(v);
                    delay = self.backoff.initial;
                    missing_reported = false;
                }
                Ok(Ended::Closed) => delay = self.backoff.initial,
                Ok(Ended::Expired) => {
                    info!(component = "kubernetes", kind = %self.kind,
                        "watch version expired (410 Gone); listing again");
                    version = None;
                }
                Err(e) if version.is_none() && self.install.is_some() && is_not_found(&e) => {
                    // Not installed: nothing of this kind exists, which is a full sync; it
                    // must not hold readiness forever. Looked for again, slowly.
                    if !missing_reported {
                        missing_reported = true;
                        warn!(component = "kubernetes", kind = %self.kind, error = %e,
                            install = self.install.unwrap_or_default(),
                            "API not installed; treating it as empty until it is");
                    }
                    self.caches
                        .replace(self.kind, self.store, Vec::new(), self.part.as_deref());
                    tokio::time::sleep(self.backoff.max).await;
                }
                Err(e) => {
                    // An optional API removed while watched: list again, which finds it gone.
                    if is_gone(&e) || (self.install.is_some() && is_not_found(&e)) {
                        version = None;
                    }
                    warn!(component = "kubernetes", kind = %self.kind, error = %e,
                        retry_in = ?delay, "Kubernetes API request failed; the cache of this kind is stale until it recovers");
                    let message = e.to_string();
                    self.caches.health.update(self.kind, |h| {
                        h.set_up(self.part.as_deref(), false);
                        h.errors_total += 1;
                        h.last_error = Some(message);
                    });
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(self.backoff.max);
                }
            }
        }
    }

    /// Lists every object, page by page, projecting each page as it arrives.
    async fn list(&self) -> Result<Ended, WatchError> {
        let mut listed = Vec::new();
        let mut params = ListParams {
            field_selector: self.field_selector.clone(),
            label_selector: self.label_selector.clone(),
            limit: Some(self.page_size),
            ..ListParams::default()
        };
        loop {
            let page = self.api.list(&params).await?;
            for object in page.items {
                listed.push((key(&object), self.projected(object)));
            }
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(token) => params.continue_token = Some(token),
                None => {
                    let version = page.metadata.resource_version.unwrap_or_default();
                    self.caches
                        .replace(self.kind, self.store, listed, self.part.as_deref());
                    return Ok(Ended::Listed(version));
                }
            }
        }
    }

    /// Watches from `from` until the server closes the watch; keeps `version` current.
    async fn watch(&self, from: String, version: &mut Option<String>) -> Result<Ended, WatchError> {
        let mut body = self.open_watch(&from).await?;
        self.caches
            .health
            .update(self.kind, |h| h.set_up(self.part.as_deref(), true));
        let mut pending: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame?.into_data() else {
                continue;
            };
            pending.extend_from_slice(&data);
            while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let event: WatchEvent<K> =
                    serde_json::from_slice(&line).map_err(WatchError::Decode)?;
                if let Some(ended) = self.event(event, version)? {
                    return Ok(ended);
                }
            }
        }
        Ok(Ended::Closed)
    }

    /// `object` as the cache takes it, with its stand-in if it is rejected and the kind
    /// has one.
    fn projected(&self, object: K) -> Projected<T> {
        let Some(stand_in) = &self.stand_in else {
            return (self.project)(object).map_err(|invalid| Rejection {
                invalid,
                stand_in: None,
            });
        };
        // The projection consumes the object; the stand-in is built from it too.
        (self.project)(object.clone()).map_err(|invalid| Rejection {
            stand_in: Some(Standing {
                item: (stand_in.stand_in)(&object, &invalid),
                keep: stand_in.keep,
                effect: stand_in.effect,
            }),
            invalid,
        })
    }

    /// Opens a watch from `from`. Done here rather than with `Api::watch`, which reads an
    /// error response (a 503 of an API server in trouble) as a watch without events and so
    /// would hide the outage.
    async fn open_watch(&self, from: &str) -> Result<kube::client::Body, WatchError> {
        let params = WatchParams {
            field_selector: self.field_selector.clone(),
            label_selector: self.label_selector.clone(),
            timeout: Some(self.watch_timeout_secs),
            bookmarks: true,
            ..WatchParams::default()
        };
        let request = kube::core::Request::new(self.api.resource_url())
            .watch(&params, from)
            .map_err(|e| WatchError::Api(kube::Error::BuildRequest(e)))?;
        let response = self
            .client
            .send(request.map(kube::client::Body::from))
            .await?;
        let code = response.status();
        if code.is_success() {
            return Ok(response.into_body());
        }
        let text = response.into_body().collect().await?.to_bytes();
        let status = serde_json::from_slice::<Status>(&text).unwrap_or_else(|_| {
            Status::failure(&String::from_utf8_lossy(&text), "").with_code(code.as_u16())
        });
        Err(WatchError::Status(Box::new(status)))
    }

    /// Applies one watch event; `Some` when it ends the watch.
    fn event(
        &self,
        event: WatchEvent<K>,
        version: &mut Option<String>,
    ) -> Result<Option<Ended>, WatchError> {
        match event {
            WatchEvent::Added(object) | WatchEvent::Modified(object) => {
                *version = object.resource_version();
                let key = key(&object);
                self.caches
                    .apply(self.kind, self.store, key, self.projected(object));
            }
            WatchEvent::Deleted(object) => {
                *version = object.resource_version();
                self.caches.delete(self.kind, self.store, &key(&object));
            }
            WatchEvent::Bookmark(bookmark) => {
                *version = Some(bookmark.metadata.resource_version);
            }
            WatchEvent::Error(status) if status.code == GONE => return Ok(Some(Ended::Expired)),
            WatchEvent::Error(status) => return Err(WatchError::Status(status)),
        }
        Ok(None)
    }
}

fn key<K: Resource>(object: &K) -> String {
    match object.namespace() {
        Some(namespace) => format!("{namespace}/{}", object.name_any()),
        None => object.name_any(),
    }
}

fn is_gone(e: &WatchError) -> bool {
    match e {
        WatchError::Api(kube::Error::Api(status)) | WatchError::Status(status) => {
            status.code == GONE
        }
        WatchError::Api(_) | WatchError::Decode(_) => false,
    }
}

fn is_not_found(e: &WatchError) -> bool {
    match e {
        WatchError::Api(kube::Error::Api(status)) | WatchError::Status(status) => {
            status.code == NOT_FOUND
        }
        WatchError::Api(_) | WatchError::Decode(_) => false,
    }
}

const GONE: u16 = 410;
const NOT_FOUND: u16 = 404;
