//! Pods of mesh namespaces that run outside the mesh, because their node hosts no weft agent
//! (virtual or serverless nodes, such as OKE virtual nodes, run no DaemonSet).
//!
//! Input: the source's caches (namespaces, pods of other nodes, weft's agent pods). A pod is
//! unmeshed when its namespace is in the mesh, it does not opt out, it is scheduled, not
//! finished, not on the host network, and no agent pod runs on its node for
//! `Config::unmeshed_grace` (a new node's agent, or one restarting, needs a moment).
//!
//! Output: `weft_kubernetes_unmeshed_pods{namespace}` (every agent, the same cluster-wide
//! count), and for each unmeshed pod one warning Event (`events.k8s.io/v1`, reason
//! `NotMeshed`) and one warn log line, written by one agent only: the ready agent whose node
//! name is the smallest, so N agents do not write N events, and no lease is needed. The
//! Event's name is derived from the pod's UID: a second writer (a new reporter after the
//! old one's node left, or the same one restarted) gets `409 AlreadyExists` and counts the
//! pod as reported.
//!
//! Fail-safe: while this agent does not see its own pod through `Config::agent_selector`
//! (an agent not installed by the chart, or a selector that matches nothing) it cannot tell
//! which nodes host agents and reports nothing rather than every pod.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::{
    api::{core::v1::ObjectReference, events::v1::Event},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{Api, api::PostParams};
use tokio::time::Instant;
use tracing::{info, warn};

use super::{
    Config, Health,
    project::{DISABLED, MESH_LABEL},
    reflector::{Caches, Stores, next_pass},
    status::CONFLICT,
};

/// A pod outside the mesh.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct UnmeshedPod {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub node: String,
}

/// What the caches say, at one moment.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Found {
    /// Pods on nodes without a running agent, by UID.
    pub pods: BTreeMap<String, UnmeshedPod>,
    /// Every mesh namespace (so the gauge says 0 for one without unmeshed pods).
    pub namespaces: Vec<String>,
    /// This agent is the one that writes the Events.
    pub elected: bool,
    /// This agent sees its own pod: it knows which nodes host agents.
    pub sees_itself: bool,
}

/// Which unmeshed pods have been seen since when, and which have been reported.
#[derive(Debug, Default)]
pub(super) struct Tracker {
    since: HashMap<String, Instant>,
    reported: HashSet<String>,
}

/// The result of one pass of the tracker.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Pass {
    /// Pods past the grace period, by namespace (every mesh namespace present).
    pub counts: BTreeMap<String, u64>,
    /// Pods past the grace period not reported yet.
    pub due: Vec<UnmeshedPod>,
    /// When the next pod's grace period ends.
    pub next: Option<Instant>,
}

/// Reads the caches: unmeshed pods, mesh namespaces, and whether `node` reports.
pub(super) fn find(stores: &Stores, node: &str) -> Found {
    let agents = stores.agents.items.values();
    let hosting: HashSet<&str> = agents
        .clone()
        .filter(|a| a.running)
        .map(|a| a.node.as_str())
        .collect();
    let sees_itself = hosting.contains(node);
    let namespaces: Vec<String> = stores.mesh_namespaces().cloned().collect();
    let mut pods = BTreeMap::new();
    if sees_itself {
        // This node's pods are enrolled here (or refused by the CNI plugin): only other
        // nodes' pods can be outside the mesh.
        for pod in stores.remote_pods.items.values() {
            let enabled = stores
                .namespaces
                .items
                .get(&pod.name.namespace)
                .is_some_and(|ns| ns.enabled);
            let opted_out = pod.labels.get(MESH_LABEL).map(String::as_str) == Some(DISABLED);
            if enabled && !opted_out && !hosting.contains(pod.node.as_str()) {
                pods.insert(
                    pod.uid.clone(),
                    UnmeshedPod {
                        uid: pod.uid.clone(),
                        namespace: pod.name.namespace.clone(),
                        name: pod.name.name.clone(),
                        node: pod.node.clone(),
                    },
                );
            }
        }
    }
    Found {
        pods,
        namespaces,
        elected: elected(stores, node),
        sees_itself,
    }
}

/// Whether the agent of `node` is the one that writes what one agent per cluster writes
/// (these Events, the `Accepted` conditions of `accepted`): the ready agent whose node name
/// is the smallest. No lease: every agent computes the same from the same cache, and a
/// second writer during a change of reporter is harmless (409s, or the same write).
pub(super) fn elected(stores: &Stores, node: &str) -> bool {
    let agents = stores.agents.items.values();
    agents.filter(|a| a.ready).map(|a| a.node.as_str()).min() == Some(node)
}

impl Tracker {
    /// Takes in what the caches say at `now`: pods that left are forgotten.
    pub fn pass(&mut self, found: &Found, now: Instant, grace: Duration) -> Pass {
        self.since.retain(|uid, _| found.pods.contains_key(uid));
        self.reported.retain(|uid| found.pods.contains_key(uid));
        let mut pass = Pass {
            counts: found.namespaces.iter().map(|ns| (ns.clone(), 0)).collect(),
            ..Pass::default()
        };
        for (uid, pod) in &found.pods {
            let since = *self.since.entry(uid.clone()).or_insert(now);
            let due_at = since + grace;
            if due_at > now {
                pass.next = Some(pass.next.map_or(due_at, |next| next.min(due_at)));
                continue;
            }
            *pass.counts.entry(pod.namespace.clone()).or_default() += 1;
            if !self.reported.contains(uid) {
                pass.due.push(pod.clone());
            }
        }
        pass
    }

    /// `uid` has its Event: it is not due again while it stays unmeshed.
    pub fn reported(&mut self, uid: &str) {
        self.reported.insert(uid.to_owned());
    }
}

/// Keeps the gauge current and, when elected, writes one Event per unmeshed pod. Runs until
/// its task is aborted.
pub(super) async fn run(
    client: kube::Client,
    config: Config,
    caches: Arc<Caches>,
    health: Arc<Health>,
) {
    let mut tracker = Tracker::default();
    let mut wake: Option<Instant> = None;
    let mut told_blind = false;
    loop {
        next_pass(caches.changed_for_report(), wake, config.debounce).await;
        wake = None;
        if !health.all_synced() {
            continue;
        }
        let found = find(&caches.lock(), &config.node);
        if !found.sees_itself && !told_blind {
            info!(component = "kubernetes", selector = %config.agent_selector,
                "no running agent pod of this node matches the agent selector; pods on nodes \
                 without an agent are not reported");
        }
        told_blind = !found.sees_itself;
        let pass = tracker.pass(&found, Instant::now(), config.unmeshed_grace);
        health.set_unmeshed(pass.counts);
        wake = pass.next;
        for pod in pass.due {
            if !found.elected {
                continue;
            }
            match report(&client, &config.node, &pod).await {
                Ok(()) => tracker.reported(&pod.uid),
                Err(e) => {
                    warn!(component = "kubernetes", pod = %format!("{}/{}", pod.namespace, pod.name),
                        error = %e, retry_in = ?config.backoff.max,
                        "cannot write the NotMeshed event (check the agent's RBAC: create events.k8s.io events)");
                    let retry = Instant::now() + config.backoff.max;
                    wake = Some(wake.map_or(retry, |w| w.min(retry)));
                }
            }
        }
    }
}

/// Writes the Event of `pod` and logs it; an Event already there (another reporter, or this
/// one before a restart) counts as written.
async fn report(client: &kube::Client, node: &str, pod: &UnmeshedPod) -> Result<(), kube::Error> {
    let api: Api<Event> = Api::namespaced(client.clone(), &pod.namespace);
    match api.create(&PostParams::default(), &event(node, pod)).await {
        Ok(_) => {
            warn!(component = "kubernetes", pod = %format!("{}/{}", pod.namespace, pod.name),
                node = %pod.node, "pod of a mesh namespace runs outside the mesh: its node runs no weft agent");
            Ok(())
        }
        Err(kube::Error::Api(status)) if status.code == CONFLICT => Ok(()),
        Err(e) => Err(e),
    }
}

/// The Event of `pod`, written by the agent of `node`.
pub(super) fn event(node: &str, pod: &UnmeshedPod) -> Event {
    Event {
        metadata: ObjectMeta {
            name: Some(format!("weft-not-meshed.{}", pod.uid)),
            namespace: Some(pod.namespace.clone()),
            ..ObjectMeta::default()
        },
        event_time: Some(MicroTime(Timestamp::now())),
        type_: Some("Warning".into()),
        reason: Some(REASON.into()),
        action: Some("Enroll".into()),
        reporting_controller: Some("weft.dev/agent".into()),
        // At most 128 characters; node names are at most 63 in practice, 253 in theory.
        reporting_instance: Some(format!("weft-agent-{node}").chars().take(128).collect()),
        regarding: Some(ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            namespace: Some(pod.namespace.clone()),
            name: Some(pod.name.clone()),
            uid: Some(pod.uid.clone()),
            ..ObjectReference::default()
        }),
        note: Some(format!(
            "Node {} runs no weft agent (a virtual or serverless node?), so this pod runs \
             outside the mesh: no identity, no mutual TLS, and STRICT destinations refuse \
             its connections. Keep the namespace's workloads off such nodes with node \
             affinity (see weft's docs/kubernetes.md), or opt the pod out with the label \
             weft.dev/mesh=disabled.",
            pod.node
        )),
        ..Event::default()
    }
}

/// The reason of the Event.
pub(super) const REASON: &str = "NotMeshed";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        source::kube::project::{AgentItem, NamespaceItem, PodItem},
        state::WorkloadRef,
    };

    fn stores(agents: &[(&str, bool, bool)], pods: &[(&str, &str, &str, bool)]) -> Stores {
        let mut stores = Stores::default();
        for (ns, enabled) in [("prod", true), ("dev", false)] {
            stores.namespaces.items.insert(
                ns.into(),
                NamespaceItem {
                    enabled,
                    waypoint: None,
                },
            );
        }
        for (node, running, ready) in agents {
            stores.agents.items.insert(
                format!("weft-system/agent-{node}"),
                AgentItem {
                    node: (*node).into(),
                    running: *running,
                    ready: *ready,
                },
            );
        }
        for (ns, name, node, opted_out) in pods {
            let mut labels = BTreeMap::new();
            if *opted_out {
                labels.insert(MESH_LABEL.into(), DISABLED.into());
            }
            stores.remote_pods.items.insert(
                format!("{ns}/{name}"),
                PodItem {
                    uid: format!("uid-{name}"),
                    name: WorkloadRef::new(*ns, *name),
                    service_account: "default".into(),
                    ips: Vec::new(),
                    node: (*node).into(),
                    labels,
                    probe_ports: Vec::new(),
                },
            );
        }
        stores
    }

    #[test]
    fn only_mesh_pods_on_nodes_without_a_running_agent_are_unmeshed() {
        let stores = stores(
            &[("a", true, true), ("b", true, false), ("c", false, false)],
            &[
                ("prod", "on-b", "b", false),
                ("prod", "on-c", "c", false),
                ("prod", "virtual", "vn-1", false),
                ("prod", "opted-out", "vn-1", true),
                ("dev", "not-mesh", "vn-1", false),
            ],
        );
        let found = find(&stores, "a");
        let names: Vec<&str> = found.pods.values().map(|p| p.name.as_str()).collect();
        // An agent pod not running (yet, or any more) does not host the node's pods.
        assert_eq!(names, ["on-c", "virtual"]);
        assert_eq!(found.namespaces, ["prod"]);
        assert!(found.elected && found.sees_itself);
        // b is not ready: a is the smallest ready agent, so b does not report.
        assert!(!find(&stores, "b").elected);
    }

    #[test]
    fn an_agent_that_does_not_see_itself_reports_nothing() {
        let stores = stores(&[("a", true, true)], &[("prod", "virtual", "vn-1", false)]);
        let found = find(&stores, "z");
        assert!(!found.sees_itself && !found.elected);
        assert!(found.pods.is_empty());
    }

    #[test]
    fn pods_are_counted_after_the_grace_period_and_due_once() {
        let stores = stores(&[("a", true, true)], &[("prod", "virtual", "vn-1", false)]);
        let found = find(&stores, "a");
        let grace = Duration::from_secs(60);
        let start = Instant::now();
        let mut tracker = Tracker::default();

        let pass = tracker.pass(&found, start, grace);
        assert_eq!(pass.counts, BTreeMap::from([("prod".into(), 0)]));
        assert!(pass.due.is_empty());
        assert_eq!(pass.next, Some(start + grace));

        let pass = tracker.pass(&found, start + grace, grace);
        assert_eq!(pass.counts, BTreeMap::from([("prod".into(), 1)]));
        assert_eq!(pass.due.len(), 1);
        tracker.reported(&pass.due[0].uid);
        let pass = tracker.pass(&found, start + grace * 2, grace);
        assert_eq!(pass.counts["prod"], 1);
        assert!(pass.due.is_empty(), "reported once");

        // Gone, then back (a new grace period, a new report).
        let pass = tracker.pass(&Found::default(), start + grace * 3, grace);
        assert!(pass.counts.is_empty() && pass.due.is_empty());
        let pass = tracker.pass(&found, start + grace * 3, grace);
        assert_eq!(pass.counts["prod"], 0);
    }

    #[test]
    fn the_event_names_the_pod_the_node_and_the_fix() {
        let pod = UnmeshedPod {
            uid: "0b3c".into(),
            namespace: "prod".into(),
            name: "api-1".into(),
            node: "virtual-node-1".into(),
        };
        let event = event("node-a", &pod);
        assert_eq!(event.metadata.name.as_deref(), Some("weft-not-meshed.0b3c"));
        assert_eq!(event.reason.as_deref(), Some(REASON));
        assert_eq!(event.type_.as_deref(), Some("Warning"));
        let regarding = event.regarding.unwrap();
        assert_eq!(regarding.uid.as_deref(), Some("0b3c"));
        assert_eq!(regarding.name.as_deref(), Some("api-1"));
        let note = event.note.unwrap();
        assert!(note.contains("virtual-node-1") && note.contains("node affinity"));
        assert!(note.len() <= 1024, "the API limits notes to 1 kB");
    }
}
