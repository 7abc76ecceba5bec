//! Route status, written by a waypoint (`Config::routes_for`): for each route with a
//! Service parent bound to this waypoint, one `status.parents[]` entry per Service parent of
//! the waypoint's namespace that is bound to it (or to no waypoint), with
//! `controllerName: weft.dev/waypoint` and the conditions
//! - `Accepted`: True/Accepted; False/NoMatchingParent (the Service does not exist, or is
//!   not bound to this waypoint); False/UnsupportedValue with the validation error;
//! - `ResolvedRefs`: True/ResolvedRefs; False/InvalidKind (a backend that is not a core
//!   Service); False/BackendNotFound (a Service that does not exist).
//!
//! Entries of other controllers, and of other waypoints, are kept as they are. A condition
//! keeps its `lastTransitionTime` while its status stays, so an unchanged route is never
//! written again. Writes are JSON merge patches of the status subresource carrying the
//! object's `resourceVersion` (a concurrent change is a 409, retried with the next pass),
//! with field manager `weft-waypoint`. A rejected route is read with a GET (its last good
//! version is what the cache holds).

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use kube::{
    Api,
    api::{Patch, PatchParams},
    core::{ApiResource, DynamicObject},
};
use serde_json::{Value, json};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::{
    Backoff, Kind,
    build::binding,
    reflector::{Caches, Stores, next_pass},
};
use crate::state::WorkloadRef;

/// The `controllerName` of weft's waypoints in route status.
pub const CONTROLLER_NAME: &str = "weft.dev/waypoint";
/// The field manager of status writes.
pub const FIELD_MANAGER: &str = "weft-waypoint";

/// One route's status to write.
#[derive(Debug, PartialEq)]
pub(super) struct Write {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
    pub resource_version: Option<String>,
    pub parents: Vec<Value>,
}

/// Keeps the status of the waypoint's routes current until its task is aborted.
pub(super) async fn run(
    client: kube::Client,
    waypoint: WorkloadRef,
    caches: Arc<Caches>,
    (debounce, backoff): (Duration, Backoff),
) {
    let mut retry: Option<Instant> = None;
    // Rejected routes as last read (their current version is not in the cache), with the
    // rejection they were read for: read again only when that changes or a write fails.
    let mut fetched: HashMap<(Kind, String, String), (String, Value)> = HashMap::new();
    loop {
        next_pass(caches.changed_for_status(), retry, debounce).await;
        retry = None;
        if !caches.health().all_synced() {
            continue;
        }
        let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
        let (mut writes, rejected) = {
            let stores = caches.lock();
            (plan(&stores, &waypoint, &now), rejected(&stores))
        };
        fetched.retain(|key, _| rejected.iter().any(|(k, _)| k == key));
        for (key, reason) in rejected {
            let (kind, namespace, name) = &key;
            if fetched.get(&key).is_none_or(|(seen, _)| *seen != reason) {
                match api(&client, *kind, namespace).get(name).await {
                    Ok(object) => {
                        let object = serde_json::to_value(&object).unwrap_or_default();
                        fetched.insert(key.clone(), (reason.clone(), object));
                    }
                    Err(e) => {
                        debug!(component = "kubernetes", kind = %kind, route = %format!("{namespace}/{name}"),
                            error = %e, "cannot read a rejected route for its status");
                        continue;
                    }
                }
            }
            if let Some((_, object)) = fetched.get(&key) {
                let stores = caches.lock();
                let invalid = Some(reason.as_str());
                writes.extend(write_for(&stores, &waypoint, *kind, object, invalid, &now));
            }
        }
        for write in writes {
            let key = (write.kind, write.namespace.clone(), write.name.clone());
            match patch(&client, &write).await {
                Ok(object) => {
                    // What the next pass compares with, if the route is a rejected one.
                    if let Some((_, cached)) = fetched.get_mut(&key) {
                        *cached = serde_json::to_value(&object).unwrap_or_default();
                    }
                }
                // The route changed meanwhile: its watch event brings the next pass.
                Err(kube::Error::Api(status)) if status.code == CONFLICT => {
                    fetched.remove(&key);
                    debug!(component = "kubernetes", kind = %write.kind,
                        route = %format!("{}/{}", write.namespace, write.name),
                        "route changed while its status was written; trying again");
                    retry = Some(Instant::now() + debounce);
                }
                Err(e) => {
                    fetched.remove(&key);
                    let route = format!("{}/{}", write.namespace, write.name);
                    warn!(component = "kubernetes", kind = %write.kind, route = %route, error = %e,
                        retry_in = ?backoff.max,
                        "cannot write the route's status (check the waypoint's RBAC: patch httproutes/status and grpcroutes/status)");
                    retry = Some(Instant::now() + backoff.max);
                }
            }
        }
    }
}

/// The writes the valid routes of `stores` need now.
pub(super) fn plan(stores: &Stores, waypoint: &WorkloadRef, now: &str) -> Vec<Write> {
    let kinds = [
        (Kind::HttpRoute, &stores.http_routes),
        (Kind::GrpcRoute, &stores.grpc_routes),
    ];
    let mut writes = Vec::new();
    for (kind, store) in kinds {
        for (key, item) in &store.items {
            // A rejected route's last good version is not what the API has.
            if store.rejected().contains_key(key) {
                continue;
            }
            writes.extend(write_for(stores, waypoint, kind, &item.object, None, now));
        }
    }
    writes
}

/// ((kind, namespace, name), validation error) of the rejected routes.
fn rejected(stores: &Stores) -> Vec<((Kind, String, String), String)> {
    let kinds = [
        (Kind::HttpRoute, &stores.http_routes),
        (Kind::GrpcRoute, &stores.grpc_routes),
    ];
    let mut out = Vec::new();
    for (kind, store) in kinds {
        for (key, rejected) in store.rejected() {
            if let Some((namespace, name)) = key.split_once('/') {
                out.push((
                    (kind, namespace.to_owned(), name.to_owned()),
                    rejected.invalid.to_string(),
                ));
            }
        }
    }
    out.sort();
    out
}

/// The write `object` needs, if it is this waypoint's and its status differs.
pub(super) fn write_for(
    stores: &Stores,
    waypoint: &WorkloadRef,
    kind: Kind,
    object: &Value,
    invalid: Option<&str>,
    now: &str,
) -> Option<Write> {
    let namespace = object["metadata"]["namespace"].as_str()?.to_owned();
    let name = object["metadata"]["name"].as_str()?.to_owned();
    let generation = object["metadata"]["generation"].clone();
    let current: Vec<Value> = object["status"]["parents"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    // None: no such Service; Some(binding).
    let service_binding = |service: &WorkloadRef| {
        stores
            .services
            .items
            .get(&format!("{}/{}", service.namespace, service.name))
            .map(|item| binding(stores, item))
    };
    let refs: Vec<(Value, WorkloadRef)> = object["spec"]["parentRefs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|raw| Some((raw.clone(), service_parent(raw, &namespace)?)))
        .filter(|(_, service)| service.namespace == waypoint.namespace)
        .collect();
    let bound = |service: &WorkloadRef| {
        service_binding(service).flatten().as_deref() == Some(waypoint.name.as_str())
    };
    let unbound = |service: &WorkloadRef| service_binding(service).flatten().is_none();
    let has_entry = |service: &WorkloadRef| {
        current
            .iter()
            .any(|e| is_ours(e) && entry_service(e, &namespace).as_ref() == Some(service))
    };
    if !refs.iter().any(|(_, s)| bound(s)) && !refs.iter().any(|(_, s)| has_entry(s)) {
        return None;
    }
    let ours: Vec<&(Value, WorkloadRef)> = refs
        .iter()
        .filter(|(_, s)| bound(s) || unbound(s))
        .collect();
    let resolved = resolved_refs(object, &namespace, |s| service_binding(s).is_some());
    let mut parents: Vec<Value> = current
        .iter()
        .filter(|e| {
            if !is_ours(e) {
                return true;
            }
            // Ours to rewrite: entries of the Services we now answer for, and of parents
            // of this namespace the route no longer has.
            entry_service(e, &namespace).is_none_or(|s| {
                s.namespace != waypoint.namespace
                    || (!ours.iter().any(|(_, o)| *o == s) && refs.iter().any(|(_, r)| *r == s))
            })
        })
        .cloned()
        .collect();
    for (raw, service) in &ours {
        let accepted = if !bound(service) {
            let why = match service_binding(service) {
                None => format!("Service {service} does not exist"),
                Some(_) => format!(
                    "Service {service} is not bound to waypoint {waypoint} (label weft.dev/use-waypoint)"
                ),
            };
            ("False", "NoMatchingParent", why)
        } else if let Some(message) = invalid {
            ("False", "UnsupportedValue", message.to_owned())
        } else {
            (
                "True",
                "Accepted",
                format!("Route accepted by waypoint {waypoint}"),
            )
        };
        let previous = current
            .iter()
            .find(|e| is_ours(e) && entry_service(e, &namespace).as_ref() == Some(service))
            .and_then(|p| p["conditions"].as_array())
            .map_or(&[][..], Vec::as_slice);
        let conditions = [("Accepted", accepted), ("ResolvedRefs", resolved.clone())]
            .into_iter()
            .map(|(kind, said)| condition(kind, said, &generation, previous, now))
            .collect::<Vec<_>>();
        parents.push(json!({
            "parentRef": parent_ref(raw),
            "controllerName": CONTROLLER_NAME,
            "conditions": conditions,
        }));
    }
    (parents != current).then(|| Write {
        kind,
        namespace,
        name,
        resource_version: object["metadata"]["resourceVersion"]
            .as_str()
            .map(str::to_owned),
        parents,
    })
}

/// A status condition `type_` saying `(status, reason, message)` of `generation`. It keeps
/// the `lastTransitionTime` of the same type in `previous` (the conditions the object has)
/// while its status stays, so an unchanged object compares equal and is not written again.
pub(super) fn condition(
    type_: &str,
    (status, reason, message): (&str, &str, String),
    generation: &Value,
    previous: &[Value],
    now: &str,
) -> Value {
    let since = previous
        .iter()
        .find(|c| c["type"] == type_ && c["status"] == status)
        .map_or_else(|| now.into(), |c| c["lastTransitionTime"].clone());
    json!({
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": since,
    })
}

/// Writes `status` into the status subresource of `name` through `api`: a JSON merge patch
/// that carries `resource_version`, so that a concurrent change is a `409` (retried with the
/// next pass), with the field manager `manager`.
pub(super) async fn patch_status(
    api: &Api<DynamicObject>,
    name: &str,
    resource_version: Option<&str>,
    status: Value,
    manager: &str,
) -> Result<DynamicObject, kube::Error> {
    let body = json!({
        "metadata": {"resourceVersion": resource_version},
        "status": status,
    });
    let params = PatchParams {
        field_manager: Some(manager.into()),
        ..PatchParams::default()
    };
    api.patch_status(name, &params, &Patch::Merge(&body)).await
}

async fn patch(client: &kube::Client, write: &Write) -> Result<DynamicObject, kube::Error> {
    let object = patch_status(
        &api(client, write.kind, &write.namespace),
        &write.name,
        write.resource_version.as_deref(),
        json!({"parents": write.parents}),
        FIELD_MANAGER,
    )
    .await?;
    debug!(component = "kubernetes", kind = %write.kind,
        route = %format!("{}/{}", write.namespace, write.name), "route status written");
    Ok(object)
}

fn api(client: &kube::Client, kind: Kind, namespace: &str) -> Api<DynamicObject> {
    use gateway_api::experimental::{grpcroutes::GrpcRoute, httproutes::HttpRoute};
    let resource = match kind {
        Kind::GrpcRoute => ApiResource::erase::<GrpcRoute>(&()),
        _ => ApiResource::erase::<HttpRoute>(&()),
    };
    Api::namespaced_with(client.clone(), namespace, &resource)
}

/// The Service a parentRef names (`None` for other parents: Gateways).
fn service_parent(raw: &Value, namespace: &str) -> Option<WorkloadRef> {
    let group = raw["group"].as_str().unwrap_or_default();
    if !matches!(group, "" | "core") || raw["kind"] != "Service" {
        return None;
    }
    Some(WorkloadRef::new(
        raw["namespace"].as_str().unwrap_or(namespace),
        raw["name"].as_str()?,
    ))
}

/// The parentRef of a status entry, as written in the spec (namespace made explicit).
fn parent_ref(raw: &Value) -> Value {
    let mut out = BTreeMap::new();
    for key in ["group", "kind", "name", "namespace", "port", "sectionName"] {
        if !raw[key].is_null() {
            out.insert(key, raw[key].clone());
        }
    }
    json!(out)
}

fn is_ours(entry: &Value) -> bool {
    entry["controllerName"] == CONTROLLER_NAME
}

fn entry_service(entry: &Value, namespace: &str) -> Option<WorkloadRef> {
    service_parent(&entry["parentRef"], namespace)
}

/// `ResolvedRefs` of a route: (status, reason, message), from its spec as written.
fn resolved_refs(
    object: &Value,
    namespace: &str,
    exists: impl Fn(&WorkloadRef) -> bool,
) -> (&'static str, &'static str, String) {
    let rules = object["spec"]["rules"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut refs = Vec::new();
    for rule in &rules {
        let filters = |v: &Value| v["filters"].as_array().cloned().unwrap_or_default();
        let mut mirrors = filters(rule);
        for backend in rule["backendRefs"].as_array().into_iter().flatten() {
            refs.push(backend.clone());
            mirrors.extend(filters(backend));
        }
        refs.extend(
            mirrors
                .iter()
                .map(|f| f["requestMirror"]["backendRef"].clone())
                .filter(|r| !r.is_null()),
        );
    }
    for raw in &refs {
        let group = raw["group"].as_str().unwrap_or_default();
        let kind = raw["kind"].as_str().unwrap_or("Service");
        if !matches!(group, "" | "core") || kind != "Service" {
            return (
                "False",
                "InvalidKind",
                format!(
                    "backend {:?} is a {group}/{kind}: only Services are backends",
                    raw["name"]
                ),
            );
        }
    }
    for raw in &refs {
        let service = WorkloadRef::new(
            raw["namespace"].as_str().unwrap_or(namespace),
            raw["name"].as_str().unwrap_or_default(),
        );
        if !exists(&service) {
            return (
                "False",
                "BackendNotFound",
                format!("Service {service} does not exist"),
            );
        }
    }
    ("True", "ResolvedRefs", "All references resolved".into())
}

pub(super) const CONFLICT: u16 = 409;
