//! Policies indexed by the destination workloads they select, and the ports that only a
//! waypoint may reach.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
};

use tracing::warn;

use super::eval::{ConnectionFacts, Decision, DenyReason, EgressFacts, decide};
use crate::{
    identity::SpiffeId,
    state::{AccessPolicy, Action, Snapshot, Workload, WorkloadRef},
    sync::Mutex,
};

/// The policies of one snapshot, indexed so that evaluating a connection touches only the
/// policies that select its destination. Built once per snapshot; cheap to share (`Arc`).
#[derive(Debug, Default)]
pub struct PolicyIndex {
    /// Every policy, in name order; the lists below point into it.
    policies: Vec<AccessPolicy>,
    /// The policies selecting each workload of the snapshot.
    by_workload: HashMap<WorkloadRef, Selected>,
    /// Candidate policies by namespace, to select for workloads the snapshot did not have.
    by_namespace: HashMap<String, Candidates>,
    /// The policies naming each external service (`targetRefs`).
    by_external: HashMap<WorkloadRef, Selected>,
    default_deny: bool,
    /// The ports only a waypoint may connect to, by workload and port.
    gates: HashMap<WorkloadRef, BTreeMap<u16, WaypointGate>>,
    /// The trust domain waypoint identities are written in; carried over by `rebuild`.
    /// None (no CA on this node): no waypoint identity can be proven, so gated ports
    /// admit nothing.
    trust_domain: Option<String>,
    /// Policies whose L7 rules have been logged; carried over by `rebuild`.
    l7_logged: Arc<Mutex<HashSet<WorkloadRef>>>,
}

/// A port of a workload that services bound to a waypoint target (the workload is one of
/// their endpoints, the port one of their target ports). Connections to it are admitted
/// from the waypoints' identities only, so that a client dialling the pod directly does
/// not skip the waypoint's L7 policy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WaypointGate {
    /// The bound services targeting the port, with the waypoint each names, in service
    /// name order.
    pub bindings: Vec<(WorkloadRef, WorkloadRef)>,
    /// The identities of those waypoints the snapshot knows. Empty when none is known (or
    /// the node has no trust domain): nothing can come through a waypoint then, so
    /// nothing is admitted.
    pub identities: Vec<SpiffeId>,
}

/// The policies selecting one workload, each list in name order.
#[derive(Debug, Default)]
struct Selected {
    /// The labels selection was computed for.
    labels: BTreeMap<String, String>,
    deny: Vec<usize>,
    allow: Vec<usize>,
}

/// The policies of one namespace: those selecting the whole namespace, and the others
/// under one `(key, value)` of their selector, so a workload is checked only against
/// policies that share at least one of its labels.
#[derive(Debug, Default)]
struct Candidates {
    namespace_wide: Vec<usize>,
    by_label: HashMap<String, HashMap<String, Vec<usize>>>,
}

/// The trust domain of [`PolicyIndex::build`] (the agent's default, `agent.trustDomain`).
const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

impl PolicyIndex {
    /// Indexes the policies of `snapshot` by the workloads they select, for a mesh in the
    /// default trust domain (`cluster.local`): tests and tools. The agent starts from
    /// [`PolicyIndex::for_trust_domain`] with its own, then [`PolicyIndex::rebuild`]s.
    pub fn build(snapshot: &Snapshot) -> Self {
        Self::build_with(
            snapshot,
            Some(DEFAULT_TRUST_DOMAIN.to_owned()),
            Arc::default(),
        )
    }

    /// An empty index whose rebuilds write waypoint identities in `trust_domain` (the
    /// node's; None when it has no CA).
    pub fn for_trust_domain(trust_domain: Option<&str>) -> Self {
        Self {
            trust_domain: trust_domain.map(str::to_owned),
            ..Self::default()
        }
    }

    /// Indexes a new snapshot, keeping the trust domain and remembering which policies
    /// were already logged.
    pub fn rebuild(&self, snapshot: &Snapshot) -> Self {
        Self::build_with(
            snapshot,
            self.trust_domain.clone(),
            Arc::clone(&self.l7_logged),
        )
    }

    /// The node proxy's decision on a new connection: on a waypoint-gated port the gate
    /// decides alone ([`WaypointGate::decide`]); elsewhere the access policies do
    /// ([`PolicyIndex::evaluate`]).
    pub fn admit(&self, facts: &ConnectionFacts<'_>) -> Decision {
        match self.waypoint_gate(&facts.destination.name, facts.dst_port) {
            Some(gate) => gate.decide(facts.source_identity),
            None => self.evaluate(facts),
        }
    }

    /// The gate on `port` of `workload`, if bound services target it.
    pub fn waypoint_gate(&self, workload: &WorkloadRef, port: u16) -> Option<&WaypointGate> {
        self.gates.get(workload)?.get(&port)
    }

    /// Decides whether the connection may proceed. Costs the policies selecting
    /// `facts.destination`; a workload the index was not built with (or whose labels have
    /// changed since) is selected for on the spot from its namespace's candidates.
    pub fn evaluate(&self, facts: &ConnectionFacts<'_>) -> Decision {
        let destination = facts.destination;
        match self.by_workload.get(&destination.name) {
            Some(selected) if selected.labels == destination.labels => self.decide(selected, facts),
            _ => self.decide(&self.select(destination), facts),
        }
    }

    /// The names of the policies selecting `workload`, DENY first (for status and debugging).
    pub fn policies_for(&self, workload: &Workload) -> Vec<&WorkloadRef> {
        let selected = self.select(workload);
        selected
            .deny
            .iter()
            .chain(&selected.allow)
            .map(|&i| &self.policies[i].name)
            .collect()
    }

    fn decide(&self, selected: &Selected, facts: &ConnectionFacts<'_>) -> Decision {
        decide(
            selected.deny.iter().map(|&i| &self.policies[i]),
            selected.allow.iter().map(|&i| &self.policies[i]),
            self.default_deny,
            self.trust_domain.as_deref(),
            facts.into(),
        )
    }

    /// Decides whether a pod of this node may connect to the external service `service`,
    /// by the policies naming it: a matching DENY refuses; once any ALLOW names it, only
    /// what an ALLOW matches passes. The mesh's default-deny switch is about who may reach
    /// workloads and does not apply (`REGISTRY_ONLY` is the way out's default deny).
    pub fn evaluate_egress(&self, service: &WorkloadRef, facts: &EgressFacts<'_>) -> Decision {
        let Some(selected) = self.by_external.get(service) else {
            return Decision::Allow;
        };
        decide(
            selected.deny.iter().map(|&i| &self.policies[i]),
            selected.allow.iter().map(|&i| &self.policies[i]),
            false,
            self.trust_domain.as_deref(),
            facts.into(),
        )
    }

    fn build_with(
        snapshot: &Snapshot,
        trust_domain: Option<String>,
        l7_logged: Arc<Mutex<HashSet<WorkloadRef>>>,
    ) -> Self {
        let policies: Vec<AccessPolicy> = snapshot.policies.values().cloned().collect();
        let mut by_namespace: HashMap<String, Candidates> = HashMap::new();
        let mut by_external: HashMap<WorkloadRef, Selected> = HashMap::new();
        for (i, policy) in policies.iter().enumerate() {
            if !policy.external_services.is_empty() {
                // Names external services, selects no workload.
                for name in &policy.external_services {
                    let service = WorkloadRef::new(policy.name.namespace.clone(), name.clone());
                    if !policy.targets_external(&service) {
                        continue;
                    }
                    let selected = by_external.entry(service).or_default();
                    let list = match policy.action {
                        Action::Deny => &mut selected.deny,
                        Action::Allow => &mut selected.allow,
                    };
                    // Policies come in name order: the first matching DENY is named.
                    if list.last() != Some(&i) {
                        list.push(i);
                    }
                }
                continue;
            }
            let candidates = by_namespace
                .entry(policy.selector.namespace.clone())
                .or_default();
            // Indexed under any one of its labels: a workload lacking it is not selected.
            match policy.selector.match_labels.iter().next() {
                None => candidates.namespace_wide.push(i),
                Some((k, v)) => candidates
                    .by_label
                    .entry(k.clone())
                    .or_default()
                    .entry(v.clone())
                    .or_default()
                    .push(i),
            }
        }
        let mut index = Self {
            policies,
            by_workload: HashMap::with_capacity(snapshot.workloads.len()),
            by_namespace,
            by_external,
            default_deny: snapshot.mesh.default_deny,
            gates: waypoint_gates(snapshot, trust_domain.as_deref()),
            trust_domain,
            l7_logged,
        };
        for workload in snapshot.workloads.values() {
            let selected = index.select(workload);
            index.by_workload.insert(workload.name.clone(), selected);
        }
        index.log_l7_policies(snapshot);
        index
    }

    /// The policies selecting `workload`, from its namespace's candidates.
    fn select(&self, workload: &Workload) -> Selected {
        let mut selected = Selected {
            labels: workload.labels.clone(),
            ..Selected::default()
        };
        let Some(candidates) = self.by_namespace.get(&workload.name.namespace) else {
            return selected;
        };
        let labelled = workload
            .labels
            .iter()
            .filter_map(|(k, v)| candidates.by_label.get(k)?.get(v));
        for &i in candidates.namespace_wide.iter().chain(labelled.flatten()) {
            let policy = &self.policies[i];
            if policy.selects(workload) {
                match policy.action {
                    Action::Deny => selected.deny.push(i),
                    Action::Allow => selected.allow.push(i),
                }
            }
        }
        // Name order, whatever the label order: the first matching DENY is the one named.
        selected.deny.sort_unstable();
        selected.allow.sort_unstable();
        selected
    }

    /// Says once per policy that its L7 rules are not enforced here, for policies that
    /// select a workload on this node. Forgets policies that are gone, so one that comes
    /// back is logged again.
    fn log_l7_policies(&self, snapshot: &Snapshot) {
        let mut logged = self.l7_logged.lock();
        logged.retain(|name| {
            snapshot
                .policies
                .get(name)
                .is_some_and(AccessPolicy::has_l7_rules)
        });
        let local: Vec<&Selected> = snapshot
            .local_enrolled()
            .filter_map(|w| self.by_workload.get(&w.name))
            .collect();
        for (i, policy) in self.policies.iter().enumerate() {
            if !policy.has_l7_rules() || logged.contains(&policy.name) {
                continue;
            }
            if !local
                .iter()
                .any(|s| s.deny.contains(&i) || s.allow.contains(&i))
            {
                continue;
            }
            logged.insert(policy.name.clone());
            let effect = match policy.action {
                Action::Allow => "its rules with HTTP conditions allow nothing here",
                Action::Deny => "its rules with HTTP conditions deny on their L4 conditions alone",
            };
            warn!(component = "policy", policy = %policy.name, action = ?policy.action, effect,
                "policy has HTTP conditions (methods, paths, headers, request principals, claims) \
                 that only a waypoint can enforce; bind the workload to a waypoint");
        }
    }
}

impl WaypointGate {
    /// The decision for a peer: a waypoint's identity is allowed without the destination's
    /// access policies (the waypoint judged each request against them, with the original
    /// client's identity, L4 and L7); anything else, plaintext included, is denied.
    pub fn decide(&self, source_identity: Option<&SpiffeId>) -> Decision {
        match source_identity {
            Some(id) if self.identities.contains(id) => Decision::Allow,
            _ => Decision::Deny {
                policy: None,
                reason: DenyReason::WaypointBypassed,
            },
        }
    }
}

/// The gated ports of `snapshot`: for each service bound to a waypoint, each of its
/// target ports on each endpoint the snapshot has as a workload.
fn waypoint_gates(
    snapshot: &Snapshot,
    trust_domain: Option<&str>,
) -> HashMap<WorkloadRef, BTreeMap<u16, WaypointGate>> {
    let mut gates: HashMap<WorkloadRef, BTreeMap<u16, WaypointGate>> = HashMap::new();
    for service in snapshot.services.values() {
        let (waypoint, identity) = match snapshot.waypoint_of(service) {
            None => continue,
            Some(Ok(w)) => (
                w.name.clone(),
                trust_domain.and_then(|td| w.identity(td).ok()),
            ),
            // Unknown: its identity cannot be known, so it adds none (fail closed).
            Some(Err(name)) => (name, None),
        };
        let binding = (service.name.clone(), waypoint);
        for ip in &service.endpoints {
            let Some(workload) = snapshot.workload_by_ip(*ip) else {
                continue;
            };
            for port in &service.ports {
                let gate = gates
                    .entry(workload.name.clone())
                    .or_default()
                    .entry(port.target_port)
                    .or_default();
                if !gate.bindings.contains(&binding) {
                    gate.bindings.push(binding.clone());
                }
                if let Some(id) = &identity
                    && !gate.identities.contains(id)
                {
                    gate.identities.push(id.clone());
                }
            }
        }
    }
    gates
}

#[cfg(test)]
mod tests {
    use std::{io, path::PathBuf, sync::Arc};

    use super::*;
    use crate::state::{L7Match, Location, Rule, Service, ServicePort, Waypoint, WorkloadSelector};

    /// Collects formatted log lines.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn snapshot(with_l7_policy: bool) -> Snapshot {
        let mut snapshot = Snapshot::default();
        let api = Workload {
            name: WorkloadRef::new("prod", "api"),
            service_account: "api".into(),
            ips: vec![],
            location: Location::Local {
                netns: PathBuf::from("/run/netns/api"),
            },
            enrolled: true,
            mtls_mode: None,
            labels: BTreeMap::new(),
        };
        snapshot.workloads.insert(api.name.clone(), api);
        if with_l7_policy {
            let policy = AccessPolicy {
                name: WorkloadRef::new("prod", "get-only"),
                selector: WorkloadSelector {
                    namespace: "prod".into(),
                    match_labels: BTreeMap::new(),
                },
                action: Action::Allow,
                rules: vec![Rule {
                    l7: Some(L7Match {
                        methods: vec!["GET".into()],
                        ..L7Match::default()
                    }),
                    ..Rule::default()
                }],
                invalid: None,
                external_services: vec![],
            };
            snapshot.policies.insert(policy.name.clone(), policy);
        }
        snapshot
    }

    #[test]
    fn l7_policies_are_logged_once_until_they_go_away() {
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let index = PolicyIndex::build(&snapshot(true));
            let index = index.rebuild(&snapshot(true));
            let index = index.rebuild(&snapshot(false));
            let _index = index.rebuild(&snapshot(true));
        });
        let text = String::from_utf8(lines.0.lock().clone()).unwrap();
        assert_eq!(text.matches("only a waypoint").count(), 2, "{text}");
        assert!(text.contains("policy=prod/get-only"), "{text}");
        assert!(text.contains("component=\"policy\""), "{text}");
    }

    /// Pods `prod/api` (10.1.0.3) and `prod/worker` (10.1.0.4); services `front` (both,
    /// 80 → 8080, bound to `wp`), `admin` (api, 81 → 9090, bound to `wp2`), `back` (api,
    /// 82 → 8080, bound to `gone`, unknown) and `plain` (worker, 83 → 7070, unbound).
    fn bound_snapshot() -> Snapshot {
        let mut snapshot = Snapshot::default();
        for (name, ip) in [("api", "10.1.0.3"), ("worker", "10.1.0.4")] {
            let w = Workload {
                name: WorkloadRef::new("prod", name),
                service_account: name.into(),
                ips: vec![ip.parse().unwrap()],
                location: Location::Remote { node: "n2".into() },
                enrolled: true,
                mtls_mode: None,
                labels: BTreeMap::new(),
            };
            snapshot.workloads.insert(w.name.clone(), w);
        }
        for (name, endpoints, port, target, waypoint) in [
            ("front", &["10.1.0.3", "10.1.0.4"][..], 80, 8080, Some("wp")),
            ("admin", &["10.1.0.3"][..], 81, 9090, Some("wp2")),
            ("back", &["10.1.0.3"][..], 82, 8080, Some("gone")),
            ("plain", &["10.1.0.4"][..], 83, 7070, None),
        ] {
            let service = Service {
                name: WorkloadRef::new("prod", name),
                vips: vec![],
                ports: vec![ServicePort {
                    port,
                    target_port: target,
                }],
                endpoints: endpoints.iter().map(|ip| ip.parse().unwrap()).collect(),
                waypoint: waypoint.map(str::to_owned),
                traffic_distribution: None,
            };
            snapshot.services.insert(service.name.clone(), service);
        }
        for (name, sa) in [("wp", "wp-sa"), ("wp2", "wp2")] {
            let waypoint = Waypoint {
                name: WorkloadRef::new("prod", name),
                service_account: sa.into(),
                addresses: vec![],
            };
            snapshot.waypoints.insert(waypoint.name.clone(), waypoint);
        }
        snapshot
    }

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", "prod", sa).unwrap()
    }

    #[test]
    fn bound_target_ports_of_endpoints_are_gated_by_their_waypoints() {
        let snapshot = bound_snapshot();
        let index = PolicyIndex::for_trust_domain(Some("cluster.local")).rebuild(&snapshot);
        let (api, worker) = (
            WorkloadRef::new("prod", "api"),
            WorkloadRef::new("prod", "worker"),
        );
        let bind = |s: &str, w: &str| (WorkloadRef::new("prod", s), WorkloadRef::new("prod", w));

        // Two bound services on one port: both bindings, the known waypoint's identity.
        let gate = index.waypoint_gate(&api, 8080).expect("api:8080 is gated");
        assert_eq!(gate.bindings, [bind("back", "gone"), bind("front", "wp")]);
        assert_eq!(gate.identities, [id("wp-sa")]);
        assert_eq!(
            index.waypoint_gate(&api, 9090).unwrap().identities,
            [id("wp2")]
        );
        assert_eq!(
            index.waypoint_gate(&worker, 8080).unwrap().bindings,
            [bind("front", "wp")]
        );
        // Ports that no bound service targets are not gated.
        assert!(index.waypoint_gate(&api, 7070).is_none());
        assert!(index.waypoint_gate(&worker, 7070).is_none());
        assert!(index.waypoint_gate(&worker, 9090).is_none());
    }

    #[test]
    fn the_gate_admits_its_waypoints_only_and_evaluate_ignores_it() {
        let mut snapshot = bound_snapshot();
        snapshot.mesh.default_deny = true;
        let index = PolicyIndex::for_trust_domain(Some("cluster.local")).rebuild(&snapshot);
        let api = &snapshot.workloads[&WorkloadRef::new("prod", "api")];
        let (wp, wp2, client) = (id("wp-sa"), id("wp2"), id("client"));
        fn facts<'a>(
            api: &'a Workload,
            port: u16,
            identity: Option<&'a SpiffeId>,
        ) -> ConnectionFacts<'a> {
            ConnectionFacts {
                destination: api,
                dst_port: port,
                source_identity: identity,
                source_ip: "10.1.0.2".parse().unwrap(),
                request: None,
            }
        }
        let facts = |port, identity| facts(api, port, identity);
        // Allowed though default-deny would deny: the waypoint judged the request.
        assert_eq!(index.admit(&facts(8080, Some(&wp))), Decision::Allow);
        assert_eq!(index.admit(&facts(9090, Some(&wp2))), Decision::Allow);
        let bypassed = Decision::Deny {
            policy: None,
            reason: DenyReason::WaypointBypassed,
        };
        // The other service's waypoint is not this port's.
        assert_eq!(index.admit(&facts(9090, Some(&wp))), bypassed);
        assert_eq!(index.admit(&facts(8080, Some(&client))), bypassed);
        assert_eq!(index.admit(&facts(8080, None)), bypassed);
        // Elsewhere, and for a waypoint's own per-request check, the policies decide.
        assert_eq!(
            index.admit(&facts(7070, Some(&wp))).reason(),
            Some("default_deny")
        );
        assert_eq!(
            index.evaluate(&facts(8080, Some(&wp))).reason(),
            Some("default_deny")
        );
    }

    #[test]
    fn without_a_trust_domain_a_gate_admits_nothing() {
        let snapshot = bound_snapshot();
        let index = PolicyIndex::for_trust_domain(None).rebuild(&snapshot);
        let api = WorkloadRef::new("prod", "api");
        let gate = index.waypoint_gate(&api, 8080).unwrap();
        assert!(gate.identities.is_empty());
        assert!(!gate.decide(Some(&id("wp-sa"))).is_allowed());
    }
}
