//! weft's policy resources (`AccessPolicy`, `PeerAuthentication`) fail closed when they
//! cannot be understood, and say so in their `Accepted` status condition.
//!
//! Fail closed (`POLICY_FAILS_CLOSED`, `MODE_FAILS_CLOSED`, used by the reflector): an object
//! that the API server took but weft cannot read (a principal without `spiffe://`, a CIDR
//! `/33`, a port range `"8080-80"`, a field the schema would refuse) is replaced by a
//! stand-in built from the object alone: an AccessPolicy denies every connection to the
//! workloads it selects, a PeerAuthentication makes them STRICT; either applies to its whole
//! namespace when its selector cannot be read either. Never the last good version: only the
//! agents that saw it would have it, and a restarted one would open what it guarded.
//!
//! Status: `Accepted` is True (reason `Accepted`) while the object is in force as written,
//! False (reason `Invalid`) with the field at fault, the problem and what is in force
//! instead. One agent per cluster writes it, the one elected to report unmeshed pods
//! (`unmeshed::elected`), and only when it differs from what the object has (status,
//! reason, message, `observedGeneration`): a JSON merge patch of the status subresource
//! carrying the object's `resourceVersion` (`status::patch_status`), with field manager
//! `weft-agent`; other controllers' conditions are kept. A write whose own watch event has
//! not arrived yet is not repeated. The same writer writes the `status.ancestors` of
//! TrafficPolicies (`ancestors`), which are not fail-closed resources but want one writer too.
//!
//! An `ExternalService` that cannot be understood is left out (`EXTERNAL_LEFT_OUT`), never
//! kept at its last good version: under `REGISTRY_ONLY` its hosts are then refused, and
//! every agent has the same registry. Its `Accepted` condition says so, as the policies'
//! does; one valid but beyond the snapshot's limit says that instead (reason `TooMany`).

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api,
    core::{ApiResource, DynamicObject},
};
use serde_json::{Value, json};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{
    Config, Kind, Rejected, ancestors, build, crd,
    project::{self, ExternalItem, PeerAuthItem, PolicyItem, StatusOf},
    reflector::{Caches, StandIn, Store, Stores, next_pass},
    status::{CONFLICT, condition, patch_status},
    unmeshed::elected,
    writes::{ACCEPTED, INVALID, Write},
};
use crate::{
    source::external,
    state::{Gateway, TlsCertificate},
};

/// How an AccessPolicy fails closed.
pub(super) const POLICY_FAILS_CLOSED: StandIn<DynamicObject, PolicyItem> = StandIn {
    stand_in: project::access_policy_stand_in,
    keep: never_the_last_good,
    effect: "it fails closed: until it is fixed it denies every connection to the workloads \
             it selects (to its whole namespace if its selector cannot be read)",
};

/// How a PeerAuthentication fails closed.
pub(super) const MODE_FAILS_CLOSED: StandIn<DynamicObject, PeerAuthItem> = StandIn {
    stand_in: project::peer_authentication_stand_in,
    keep: never_the_last_good,
    effect: "it fails closed: until it is fixed the workloads it selects are STRICT (its \
             whole namespace if its selector cannot be read)",
};

/// How an ExternalService that cannot be understood is left out (fail closed: its hosts
/// are not registered, so `REGISTRY_ONLY` refuses them).
pub(super) const EXTERNAL_LEFT_OUT: StandIn<DynamicObject, ExternalItem> = StandIn {
    stand_in: project::external_service_stand_in,
    keep: never_the_last_good,
    effect: "it is left out until it is fixed: its hosts are not registered (refused when \
             the mesh is REGISTRY_ONLY)",
};

/// How the Gateway a gateway serves is left out when it cannot be understood: no listener
/// is served (never its last good version, which a restarted gateway would not have).
pub(super) const GATEWAY_LEFT_OUT: StandIn<DynamicObject, Option<Gateway>> = StandIn {
    stand_in: |_, _| None,
    keep: never_the_last_good,
    effect: "it is left out until it is fixed: none of its listeners is served",
};

/// How a certificate Secret is left out when it cannot be understood: the listeners naming
/// it do not have it (never its last good version, as for the Gateway).
pub(super) const CERTIFICATE_LEFT_OUT: StandIn<Secret, Option<TlsCertificate>> = StandIn {
    stand_in: |_, _| None,
    keep: never_the_last_good,
    effect: "it is left out until it is fixed: the listeners naming it do not serve it",
};

/// The reason of `Accepted` False for a valid ExternalService beyond the snapshot's limit.
const TOO_MANY: &str = "TooMany";

/// The field manager of the writes.
pub const FIELD_MANAGER: &str = "weft-agent";

/// Keeps the `Accepted` conditions (and TrafficPolicies' ancestors) current while this
/// agent is elected, until its task is aborted.
pub(super) async fn run(client: kube::Client, config: Config, caches: Arc<Caches>) {
    let mut retry: Option<Instant> = None;
    // Written, by (kind, key): the resourceVersion the write was made on. While the cache
    // still has that version, the write's own watch event has not come back yet.
    let mut written: HashMap<(Kind, String), Option<String>> = HashMap::new();
    loop {
        next_pass(caches.changed_for_status(), retry, config.debounce).await;
        retry = None;
        if !caches.health().all_synced() {
            continue;
        }
        let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
        let writes = {
            let stores = caches.lock();
            if !elected(&stores, &config.node) {
                written.clear();
                continue;
            }
            let mut writes = plan(&stores, &now);
            writes.extend(ancestors::plan(&stores, &now));
            writes
        };
        written.retain(|key, _| writes.iter().any(|w| w.key() == *key));
        for write in writes {
            let key = write.key();
            if written.get(&key) == Some(&write.resource_version) {
                continue;
            }
            let api = api(&client, write.kind, &write.namespace);
            let object = format!("{}/{}", write.namespace, write.name);
            match patch_status(
                &api,
                &write.name,
                write.resource_version.as_deref(),
                write.status,
                FIELD_MANAGER,
            )
            .await
            {
                Ok(_) => {
                    info!(component = "kubernetes", kind = %write.kind, object = %object,
                        "status written");
                    written.insert(key, write.resource_version);
                }
                // The object changed meanwhile: its watch event brings the next pass.
                Err(kube::Error::Api(status)) if status.code == CONFLICT => {
                    debug!(component = "kubernetes", kind = %write.kind, object = %object,
                        "object changed while its status was written; trying again");
                    retry = Some(Instant::now() + config.debounce);
                }
                Err(e) => {
                    warn!(component = "kubernetes", kind = %write.kind, object = %object,
                        error = %e, retry_in = ?config.backoff.max,
                        "cannot write the object's status (check the agent's RBAC: patch \
                         accesspolicies/status, peerauthentications/status, \
                         trafficpolicies/status and externalservices/status)");
                    retry = Some(Instant::now() + config.backoff.max);
                }
            }
        }
    }
}

/// The writes the policy resources of `stores` need now.
pub(super) fn plan(stores: &Stores, now: &str) -> Vec<Write> {
    let policies = said(Kind::AccessPolicy, &stores.policies, |item| {
        let scope = match item.policy.selector.match_labels.is_empty() {
            true => format!(
                "every workload of namespace {}",
                item.policy.selector.namespace
            ),
            false => "the workloads it selects".into(),
        };
        (&item.status, format!("denies every connection to {scope}"))
    });
    let modes = said(
        Kind::PeerAuthentication,
        &stores.peer_authentications,
        |item| {
            let scope = match item.selector {
                None => format!("every workload of namespace {}", item.namespace),
                Some(_) => "the workloads it selects".into(),
            };
            (&item.status, format!("makes {scope} STRICT"))
        },
    );
    policies
        .into_iter()
        .chain(modes)
        .chain(external_services(stores))
        .filter_map(|said| write_for(said, now))
        .collect()
}

/// What `Accepted` must say of each ExternalService: as for the policies, and False for a
/// valid one beyond the snapshot's limit.
fn external_services(stores: &Stores) -> Vec<Said<'_>> {
    let mut said = said(Kind::ExternalService, &stores.external_services, |item| {
        (
            &item.status,
            "leaves this ExternalService out of the registry: its hosts are not \
             registered (so they are refused when the mesh is REGISTRY_ONLY)"
                .into(),
        )
    });
    let over: HashSet<&str> = build::over_the_limit(stores).map(String::as_str).collect();
    for entry in said.iter_mut().filter(|s| over.contains(s.key)) {
        entry.condition = (
            "False",
            TOO_MANY,
            format!(
                "the cluster has more than {} valid ExternalServices; weft takes the first \
                 by namespace/name and leaves this one out: its hosts are not registered",
                external::MAX_SERVICES
            ),
        );
    }
    said
}

/// What `Accepted` must say of one object.
struct Said<'s> {
    kind: Kind,
    key: &'s str,
    status: &'s StatusOf,
    /// (status, reason, message).
    condition: (&'static str, &'static str, String),
}

/// What `Accepted` must say of each object of `store`; `fail_closed` gives an item's status
/// and what it does when it stands in for a rejected object.
fn said<'s, T>(
    kind: Kind,
    store: &'s Store<T>,
    fail_closed: impl Fn(&'s T) -> (&'s StatusOf, String),
) -> Vec<Said<'s>> {
    store
        .items
        .iter()
        .map(|(key, item)| {
            let (status, effect) = fail_closed(item);
            let condition = match store.rejected().get(key) {
                Some(Rejected { invalid, .. }) => (
                    "False",
                    INVALID,
                    format!("{invalid}. Until this is fixed, weft fails closed: it {effect}"),
                ),
                None => ("True", ACCEPTED, "In force on every weft agent".into()),
            };
            Said {
                kind,
                key,
                status,
                condition,
            }
        })
        .collect()
}

/// The write an object needs for `Accepted` to say what it must, if it does not already.
fn write_for(said: Said<'_>, now: &str) -> Option<Write> {
    let Said {
        kind,
        key,
        status,
        condition: said,
    } = said;
    let (namespace, name) = key.split_once('/')?;
    let generation = json!(status.generation);
    let ours = condition(ACCEPTED, said, &generation, &status.conditions, now);
    let current = status.conditions.iter().find(|c| c["type"] == ACCEPTED);
    if current == Some(&ours) {
        return None;
    }
    let mut conditions: Vec<Value> = status
        .conditions
        .iter()
        .filter(|c| c["type"] != ACCEPTED)
        .cloned()
        .collect();
    conditions.push(ours);
    Some(Write {
        kind,
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        resource_version: status.resource_version.clone(),
        status: json!({ "conditions": conditions }),
    })
}

impl Write {
    fn key(&self) -> (Kind, String) {
        (self.kind, format!("{}/{}", self.namespace, self.name))
    }
}

fn api(client: &kube::Client, kind: Kind, namespace: &str) -> Api<DynamicObject> {
    let resource = match kind {
        Kind::PeerAuthentication => ApiResource::erase::<crd::PeerAuthentication>(&()),
        Kind::TrafficPolicy => ApiResource::erase::<crd::TrafficPolicy>(&()),
        Kind::ExternalService => ApiResource::erase::<crd::ExternalService>(&()),
        _ => ApiResource::erase::<crd::AccessPolicy>(&()),
    };
    Api::namespaced_with(client.clone(), namespace, &resource)
}

/// What a fail-closed kind keeps of a rejected object: its stand-in, never the last good
/// version.
fn never_the_last_good<T>(stand_in: T, _replaced: Option<T>) -> T {
    stand_in
}
