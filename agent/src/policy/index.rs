//! Policies indexed by the destination workloads they select.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, Mutex, PoisonError},
};

use tracing::warn;

use super::eval::{ConnectionFacts, Decision, decide};
use crate::state::{AccessPolicy, Action, Snapshot, Workload, WorkloadRef};

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
    default_deny: bool,
    /// Policies whose L7 rules have been logged; carried over by `rebuild`.
    l7_logged: Arc<Mutex<HashSet<WorkloadRef>>>,
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

impl PolicyIndex {
    /// Indexes the policies of `snapshot` by the workloads they select. On a later
    /// snapshot, use [`PolicyIndex::rebuild`], which logs each L7 policy only once.
    pub fn build(snapshot: &Snapshot) -> Self {
        Self::build_with(snapshot, Arc::default())
    }

    /// Indexes a new snapshot, remembering which policies were already logged.
    pub fn rebuild(&self, snapshot: &Snapshot) -> Self {
        Self::build_with(snapshot, Arc::clone(&self.l7_logged))
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
            facts,
        )
    }

    fn build_with(snapshot: &Snapshot, l7_logged: Arc<Mutex<HashSet<WorkloadRef>>>) -> Self {
        let policies: Vec<AccessPolicy> = snapshot.policies.values().cloned().collect();
        let mut by_namespace: HashMap<String, Candidates> = HashMap::new();
        for (i, policy) in policies.iter().enumerate() {
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
            default_deny: snapshot.mesh.default_deny,
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
        let mut logged = self
            .l7_logged
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
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
                "policy has HTTP conditions (methods, paths, headers) that only a waypoint \
                 can enforce; bind the workload to a waypoint");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io,
        path::PathBuf,
        sync::{Arc, Mutex},
    };

    use super::*;
    use crate::state::{L7Match, Location, Rule, WorkloadSelector};

    /// Collects formatted log lines.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
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
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.matches("only a waypoint").count(), 2, "{text}");
        assert!(text.contains("policy=prod/get-only"), "{text}");
        assert!(text.contains("component=\"policy\""), "{text}");
    }
}
