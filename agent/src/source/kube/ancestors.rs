//! The status of TrafficPolicies: GEP-713's `status.ancestors`, one entry per target
//! (`ancestorRef {group: "", kind: Service, namespace, name}`, `controllerName:
//! weft.dev/waypoint`) with the condition `Accepted`:
//! - True/Accepted: the policy is in force for that Service;
//! - False/TargetNotFound: no such Service;
//! - False/Conflicted: an older policy sets the same feature for that Service (the message
//!   names it; `state::traffic::conflicts`);
//! - False/Invalid, for every target the object names: it cannot be read (the message names
//!   the field and says whether its last good version stays in force).
//!
//! Entries of other controllers are kept. Written by the node agent elected to write the
//! `Accepted` conditions (`accepted::run`), only when the entries change; a condition keeps
//! its `lastTransitionTime` while its status stays (`status::condition`).

use serde_json::{Value, json};

use super::{
    Rejected, build,
    project::{self, TrafficItem},
    reflector::{StandIn, Stores},
    status::{CONTROLLER_NAME, condition},
    writes::{ACCEPTED, INVALID, Write},
};
use crate::state::{Target, WorkloadRef, traffic};

/// How a TrafficPolicy that cannot be read stays in the cache: its last good version, with
/// what the rejected version says of itself for its status.
pub(super) const KEEPS_LAST_GOOD: StandIn<kube::core::DynamicObject, TrafficItem> = StandIn {
    stand_in: project::traffic_policy_stand_in,
    keep: project::traffic_policy_last_good,
    effect: "its last good version, if it had one, stays in force",
};

/// The writes the TrafficPolicies of `stores` need now.
pub(super) fn plan(stores: &Stores, now: &str) -> Vec<Write> {
    let conflicts = traffic::conflicts(&build::traffic_policies(stores));
    let store = &stores.traffic_policies;
    store
        .items
        .iter()
        .filter_map(|(key, item)| {
            let (namespace, name) = key.split_once('/')?;
            let said = match store.rejected().get(key) {
                Some(rejected) => invalid(item, namespace, rejected),
                None => {
                    let policy = item.policy.as_ref()?;
                    policy
                        .targets
                        .iter()
                        .map(|target| {
                            let loss = conflicts
                                .iter()
                                .find(|c| c.policy == policy.name && c.target == *target);
                            let said = match loss {
                                _ if !exists(stores, target) => (
                                    "False",
                                    TARGET_NOT_FOUND,
                                    format!("{target} does not exist"),
                                ),
                                Some(loss) => (
                                    "False",
                                    CONFLICTED,
                                    format!(
                                        "TrafficPolicy {} sets {} for {target} too and is \
                                         older: it is in force there, this one is not",
                                        loss.winner, loss.feature
                                    ),
                                ),
                                None => ("True", ACCEPTED, format!("In force for {target}")),
                            };
                            (ancestor_ref(target), said)
                        })
                        .collect()
                }
            };
            write_for((namespace, name), item, said, now)
        })
        .collect()
}

/// (ancestorRef, (status, reason, message)) of one target.
type Said = (Value, (&'static str, &'static str, String));

/// What each target named by a rejected object says: why it is rejected.
fn invalid(item: &TrafficItem, namespace: &str, rejected: &Rejected) -> Vec<Said> {
    let in_force = match item.policy {
        Some(_) => "its last good version stays in force",
        None => "nothing of it is in force",
    };
    let message = format!("{}. Until this is fixed, {in_force}", rejected.invalid);
    item.target_refs
        .iter()
        .filter_map(|raw| {
            let text = |key: &str| raw[key].as_str().unwrap_or_default().to_owned();
            let name = raw["name"].as_str()?;
            let ancestor = json!({
                "group": text("group"),
                "kind": text("kind"),
                "namespace": namespace,
                "name": name,
            });
            Some((ancestor, ("False", INVALID, message.clone())))
        })
        .collect()
}

/// The write `item` needs for its entries to say `said`, if they do not already.
fn write_for(
    (namespace, name): (&str, &str),
    item: &TrafficItem,
    mut said: Vec<Said>,
    now: &str,
) -> Option<Write> {
    // A target named twice is one ancestor.
    let mut seen = Vec::new();
    said.retain(|(ancestor, _)| {
        let first = !seen.contains(ancestor);
        seen.push(ancestor.clone());
        first
    });
    let is_ours = |entry: &Value| entry["controllerName"] == CONTROLLER_NAME;
    let generation = json!(item.status.generation);
    let mut ancestors: Vec<Value> = item
        .ancestors
        .iter()
        .filter(|e| !is_ours(e))
        .cloned()
        .collect();
    for (ancestor, said) in said {
        let previous = item
            .ancestors
            .iter()
            .find(|e| is_ours(e) && e["ancestorRef"] == ancestor)
            .and_then(|e| e["conditions"].as_array())
            .map_or(&[][..], Vec::as_slice);
        ancestors.push(json!({
            "ancestorRef": ancestor,
            "controllerName": CONTROLLER_NAME,
            "conditions": [condition(ACCEPTED, said, &generation, previous, now)],
        }));
    }
    (ancestors != item.ancestors).then(|| Write {
        kind: super::Kind::TrafficPolicy,
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        resource_version: item.status.resource_version.clone(),
        status: json!({ "ancestors": ancestors }),
    })
}

fn exists(stores: &Stores, target: &Target) -> bool {
    let key = |name: &WorkloadRef| format!("{}/{}", name.namespace, name.name);
    match target {
        Target::Service(service) => stores.services.items.contains_key(&key(service)),
        Target::Route { route, .. } => stores.http_routes.items.contains_key(&key(route)),
    }
}

/// The target itself: a Service, or the HTTPRoute (with the rule as `sectionName`).
fn ancestor_ref(target: &Target) -> Value {
    match target {
        Target::Service(service) => json!({
            "group": "",
            "kind": "Service",
            "namespace": service.namespace,
            "name": service.name,
        }),
        Target::Route { route, rule } => {
            let mut reference = json!({
                "group": "gateway.networking.k8s.io",
                "kind": "HTTPRoute",
                "namespace": route.namespace,
                "name": route.name,
            });
            if let Some(rule) = rule {
                reference["sectionName"] = json!(rule);
            }
            reference
        }
    }
}

/// The reasons when False (GEP-713's).
const CONFLICTED: &str = "Conflicted";
const TARGET_NOT_FOUND: &str = "TargetNotFound";
