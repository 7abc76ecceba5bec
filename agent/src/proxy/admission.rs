//! Admission of connections into this node's pods: access policy, evaluated at the
//! destination proxy for every new connection (HBONE and plaintext), and of this node's
//! pods' connections to external services (the policies naming them), and kept track of
//! afterwards, so that a policy change closes the open connections it now denies. A port
//! that a service bound to a waypoint targets admits only the waypoint
//! (`PolicyIndex::admit`), so a binding that appears also closes the connections that
//! went around the waypoint.
//!
//! Inputs: each new snapshot (`update`), and per connection the facts policy looks at.
//! Outputs: an `Admission` (a live ticket whose `revoked()` resolves when a later policy
//! denies the connection) or the denial.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::sync::watch;
use tracing::info;

use super::Error;
use crate::{
    identity::SpiffeId,
    policy::{ConnectionFacts, Decision, DenyReason, EgressFacts, PolicyIndex},
    state::{Snapshot, WorkloadRef},
    sync::Mutex,
};

/// Policy for the connections into this node's pods.
pub struct Admissions {
    /// The index and the snapshot it was built from: a connection is always judged by the
    /// policies of the snapshot it was routed with, even before `update` ran.
    index: Mutex<(Option<Arc<Snapshot>>, Arc<PolicyIndex>)>,
    admitted: Mutex<HashMap<u64, Admitted>>,
    next_id: AtomicU64,
}

/// What policy looks at, owned so it can be judged again by a later policy.
#[derive(Clone, Debug)]
pub struct Facts {
    /// The workload connected to; with `egress`, the external service.
    pub destination: WorkloadRef,
    /// A pod of this node connecting out to the external service `destination`: judged by
    /// the policies that name the service, with the pod's own identity and address.
    pub egress: bool,
    pub dst_port: u16,
    /// The peer's proven identity; None for plaintext.
    pub source_identity: Option<SpiffeId>,
    pub source_ip: IpAddr,
    /// A kubelet probe (plaintext from the node to a port the pod's probes use): the
    /// access policies judge it, but a waypoint gate does not stop it, or a bound
    /// service's pods could never become ready.
    pub kubelet_probe: bool,
}

/// An admitted connection. Dropping it (when the connection ends) forgets the connection.
pub struct Admission {
    id: u64,
    owner: Arc<Admissions>,
    revoked: watch::Receiver<Option<Denial>>,
}

/// Why policy denies a connection, and which policy did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denial {
    pub reason: DenyReason,
    pub policy: Option<WorkloadRef>,
}

struct Admitted {
    facts: Facts,
    revoke: watch::Sender<Option<Denial>>,
}

impl Admissions {
    /// Admissions for a node whose mesh is `trust_domain` (the identities waypoints
    /// prove); None when the node has no CA, where waypoint-gated ports admit nothing.
    pub fn new(trust_domain: Option<String>) -> Self {
        let index = PolicyIndex::for_trust_domain(trust_domain.as_deref());
        Self {
            index: Mutex::new((None, Arc::new(index))),
            admitted: Mutex::default(),
            next_id: AtomicU64::new(0),
        }
    }

    /// The bound services (and their waypoints) whose gate is on `port` of `workload`,
    /// to name them when a connection is refused.
    pub fn waypoints_for(
        &self,
        snapshot: &Arc<Snapshot>,
        workload: &WorkloadRef,
        port: u16,
    ) -> Vec<(WorkloadRef, WorkloadRef)> {
        self.index_for(snapshot)
            .waypoint_gate(workload, port)
            .map(|gate| gate.bindings.clone())
            .unwrap_or_default()
    }

    /// Takes a new snapshot's policies: new connections are judged by them at once, and
    /// every open connection they deny is revoked (its copy loop resets both ends).
    pub fn update(&self, snapshot: &Arc<Snapshot>) {
        let index = self.index_for(snapshot);
        let admitted = self.admitted.lock();
        for (id, conn) in admitted.iter() {
            // A pod gone from the snapshot is unenrolled: its connections end with it.
            let Some(decision) = judge(&index, snapshot, &conn.facts) else {
                continue;
            };
            if let Err(denial) = decision {
                conn.revoke.send_if_modified(|slot| {
                    let first = slot.is_none();
                    if first {
                        info!(component = "policy", id, pod = %conn.facts.destination,
                            src.identity = ?conn.facts.source_identity.as_ref().map(ToString::to_string),
                            src = %conn.facts.source_ip, reason = denial.reason.as_str(),
                            policy = ?denial.policy.as_ref().map(ToString::to_string),
                            "open connection closed: the new policy denies it");
                        *slot = Some(denial);
                    }
                    first
                });
            }
        }
    }

    /// Judges a new connection by the current policy; admitted connections are watched
    /// for later revocation until the `Admission` is dropped.
    pub fn admit(
        self: &Arc<Self>,
        snapshot: &Arc<Snapshot>,
        facts: Facts,
    ) -> Result<Admission, Error> {
        let index = self.index_for(snapshot);
        match judge(&index, snapshot, &facts) {
            Some(Ok(())) => {}
            Some(Err(Denial { reason, policy })) => {
                return Err(Error::PolicyDenied { reason, policy });
            }
            None => return Err(Error::UnknownPod),
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (revoke, revoked) = watch::channel(None);
        self.admitted.lock().insert(id, Admitted { facts, revoke });
        Ok(Admission {
            id,
            owner: Arc::clone(self),
            revoked,
        })
    }
}

impl Admissions {
    /// The index of `snapshot`'s policies, built once per snapshot.
    fn index_for(&self, snapshot: &Arc<Snapshot>) -> Arc<PolicyIndex> {
        let mut current = self.index.lock();
        if !current
            .0
            .as_ref()
            .is_some_and(|built_from| Arc::ptr_eq(built_from, snapshot))
        {
            let index = Arc::new(current.1.rebuild(snapshot));
            *current = (Some(Arc::clone(snapshot)), index);
        }
        Arc::clone(&current.1)
    }
}

impl Admission {
    /// Resolves with the reason once a later policy denies this connection (never, if
    /// none does).
    pub fn revoked(&self) -> impl Future<Output = Error> + Send + 'static {
        let mut revoked = self.revoked.clone();
        async move {
            let denial = match revoked.wait_for(Option::is_some).await {
                Ok(slot) => slot.clone(),
                // The sender lives in the map until the admission is dropped.
                Err(_) => None,
            };
            match denial {
                Some(Denial { reason, policy }) => Error::PolicyRevoked { reason, policy },
                None => std::future::pending().await,
            }
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.owner.admitted.lock().remove(&self.id);
    }
}

/// The decision for `facts` under `index`; None when the destination pod is unknown.
fn judge(index: &PolicyIndex, snapshot: &Snapshot, facts: &Facts) -> Option<Result<(), Denial>> {
    if facts.egress {
        // A service gone from the registry leaves its open connections be, as a pod's
        // do when it disappears: REGISTRY_ONLY refuses new ones.
        snapshot.external_services.get(&facts.destination)?;
        let egress = EgressFacts {
            dst_port: facts.dst_port,
            source_identity: facts.source_identity.as_ref(),
            source_ip: facts.source_ip,
        };
        return Some(denial(index.evaluate_egress(&facts.destination, &egress)));
    }
    let destination = snapshot.workloads.get(&facts.destination)?;
    let connection = ConnectionFacts {
        destination,
        dst_port: facts.dst_port,
        source_identity: facts.source_identity.as_ref(),
        source_ip: facts.source_ip,
        request: None,
    };
    let decision = if facts.kubelet_probe {
        index.evaluate(&connection)
    } else {
        index.admit(&connection)
    };
    Some(denial(decision))
}

fn denial(decision: Decision) -> Result<(), Denial> {
    match decision {
        Decision::Allow => Ok(()),
        Decision::Deny { policy, reason } => Err(Denial { reason, policy }),
    }
}

#[cfg(test)]
mod tests {
    use std::{path::Path, time::Duration};

    use super::*;
    use crate::source::file;

    /// A node with pod `default/server` (remote, so no netns is needed) and `policies`.
    fn snapshot(policies: &str) -> Arc<Snapshot> {
        snapshot_with(policies, "[]", "[]")
    }

    /// The same, with `services` and `waypoints` too.
    fn snapshot_with(policies: &str, services: &str, waypoints: &str) -> Arc<Snapshot> {
        let yaml = format!(
            "agent: {{node: n1}}\n\
             workloads:\n\
             - {{name: server, serviceAccount: server, ips: [10.1.0.3], node: n2}}\n\
             policies: {policies}\n\
             services: {services}\n\
             waypoints: {waypoints}\n"
        );
        Arc::new(
            file::parse(Path::new("node.yaml"), &yaml)
                .expect("test config parses")
                .snapshot,
        )
    }

    fn admissions() -> Arc<Admissions> {
        Arc::new(Admissions::new(Some("cluster.local".into())))
    }

    fn facts(sa: &str) -> Facts {
        Facts {
            destination: WorkloadRef::new("default", "server"),
            egress: false,
            dst_port: 8080,
            source_identity: Some(SpiffeId::new("cluster.local", "default", sa).unwrap()),
            source_ip: "10.1.0.2".parse().unwrap(),
            kubelet_probe: false,
        }
    }

    fn at(port: u16, facts: Facts) -> Facts {
        Facts {
            dst_port: port,
            ..facts
        }
    }

    fn plaintext() -> Facts {
        Facts {
            source_identity: None,
            ..facts("client")
        }
    }

    fn reason(result: Result<Admission, Error>) -> &'static str {
        match result {
            Ok(_) => "admitted",
            Err(e) => e.reason(),
        }
    }

    const DENY_CLIENT: &str = "[{name: no-client, action: DENY, rules: [{from: \
        [{principals: [spiffe://cluster.local/ns/default/sa/client]}]}]}]";
    /// Only the client may connect: the waypoint is not allowed by it.
    const ALLOW_CLIENT: &str = "[{name: only-client, action: ALLOW, rules: [{from: \
        [{principals: [spiffe://cluster.local/ns/default/sa/client]}]}]}]";
    /// `api` targets the server's 8080 (not 9090), bound to `wp`.
    const BOUND_API: &str = "[{name: api, vips: [10.96.0.10], ports: [{port: 80, targetPort: \
        8080}], endpoints: [10.1.0.3], waypoint: wp}]";
    const UNBOUND_API: &str = "[{name: api, vips: [10.96.0.10], ports: [{port: 80, targetPort: \
        8080}], endpoints: [10.1.0.3]}]";
    const WAYPOINT: &str = "[{name: wp, serviceAccount: wp-sa, ips: [10.1.0.9]}]";

    #[test]
    fn a_denied_connection_is_refused_with_the_policy_reason() {
        let admissions = admissions();
        let snapshot = snapshot(DENY_CLIENT);
        admissions.update(&snapshot);
        let Err(e) = admissions.admit(&snapshot, facts("client")) else {
            panic!("client should be denied");
        };
        assert_eq!(e.reason(), "denied_by_policy");
        assert!(admissions.admit(&snapshot, facts("other")).is_ok());
    }

    #[test]
    fn a_bound_port_admits_only_the_waypoint_whatever_the_policies_say() {
        let admissions = admissions();
        let snapshot = snapshot_with(ALLOW_CLIENT, BOUND_API, WAYPOINT);
        // The waypoint judged the request against the policies already.
        assert_eq!(
            reason(admissions.admit(&snapshot, facts("wp-sa"))),
            "admitted"
        );
        // Everyone else went around it: even the client the policy allows.
        assert_eq!(
            reason(admissions.admit(&snapshot, facts("client"))),
            "waypoint_bypassed"
        );
        assert_eq!(
            reason(admissions.admit(&snapshot, facts("other"))),
            "waypoint_bypassed"
        );
        assert_eq!(
            reason(admissions.admit(&snapshot, plaintext())),
            "waypoint_bypassed"
        );
        // Another port of the same pod is the policies' business, as before.
        assert_eq!(
            reason(admissions.admit(&snapshot, at(9090, facts("client")))),
            "admitted"
        );
        assert_eq!(
            reason(admissions.admit(&snapshot, at(9090, facts("wp-sa")))),
            "not_allowed"
        );
    }

    #[test]
    fn an_unbound_service_leaves_its_ports_to_the_policies() {
        let admissions = admissions();
        let snapshot = snapshot_with(ALLOW_CLIENT, UNBOUND_API, WAYPOINT);
        assert_eq!(
            reason(admissions.admit(&snapshot, facts("client"))),
            "admitted"
        );
        assert_eq!(
            reason(admissions.admit(&snapshot, facts("wp-sa"))),
            "not_allowed"
        );
        let open = snapshot_with("[]", UNBOUND_API, WAYPOINT);
        assert_eq!(reason(admissions.admit(&open, plaintext())), "admitted");
    }

    #[test]
    fn a_bound_port_with_no_known_waypoint_identity_admits_nothing() {
        // The waypoint is unknown: nothing can come through it.
        let unknown = snapshot_with("[]", BOUND_API, "[]");
        let admissions = admissions();
        for facts in [facts("wp-sa"), facts("client"), plaintext()] {
            assert_eq!(
                reason(admissions.admit(&unknown, facts)),
                "waypoint_bypassed"
            );
        }
        assert_eq!(
            reason(admissions.admit(&unknown, at(9090, facts("client")))),
            "admitted"
        );
        // No CA on this node: no identity can be proven at all.
        let no_ca = Arc::new(Admissions::new(None));
        let known = snapshot_with("[]", BOUND_API, WAYPOINT);
        assert_eq!(
            reason(no_ca.admit(&known, plaintext())),
            "waypoint_bypassed"
        );
        assert_eq!(
            reason(no_ca.admit(&known, at(9090, plaintext()))),
            "admitted"
        );
    }

    #[test]
    fn a_kubelet_probe_passes_the_waypoint_gate_but_not_the_policies() {
        let admissions = admissions();
        let probe = Facts {
            kubelet_probe: true,
            ..plaintext()
        };
        let open = snapshot_with("[]", BOUND_API, WAYPOINT);
        assert_eq!(reason(admissions.admit(&open, probe.clone())), "admitted");
        let closed = snapshot_with(ALLOW_CLIENT, BOUND_API, WAYPOINT);
        assert_eq!(reason(admissions.admit(&closed, probe)), "not_allowed");
    }

    #[test]
    fn refusals_name_the_bound_services_and_their_waypoints() {
        let admissions = admissions();
        let snapshot = snapshot_with("[]", BOUND_API, WAYPOINT);
        let server = WorkloadRef::new("default", "server");
        assert_eq!(
            admissions.waypoints_for(&snapshot, &server, 8080),
            [(
                WorkloadRef::new("default", "api"),
                WorkloadRef::new("default", "wp")
            )]
        );
        assert!(
            admissions
                .waypoints_for(&snapshot, &server, 9090)
                .is_empty()
        );
    }

    #[tokio::test]
    async fn a_policy_change_revokes_open_connections_it_denies() {
        let admissions = admissions();
        let before = snapshot("[]");
        admissions.update(&before);
        let client = admissions.admit(&before, facts("client")).unwrap();
        let other = admissions.admit(&before, facts("other")).unwrap();

        admissions.update(&snapshot(DENY_CLIENT));
        let revoked = tokio::time::timeout(Duration::from_secs(1), client.revoked())
            .await
            .expect("the client's connection is revoked");
        assert_eq!(revoked.reason(), "policy_revoked");
        assert!(
            tokio::time::timeout(Duration::from_millis(50), other.revoked())
                .await
                .is_err(),
            "a connection the new policy allows stays open"
        );
    }

    #[tokio::test]
    async fn a_new_binding_revokes_the_connections_that_went_around_the_waypoint() {
        let admissions = admissions();
        let before = snapshot_with("[]", UNBOUND_API, WAYPOINT);
        admissions.update(&before);
        let direct = admissions.admit(&before, facts("client")).unwrap();
        let other_port = admissions
            .admit(&before, at(9090, facts("client")))
            .unwrap();
        let via_waypoint = admissions.admit(&before, facts("wp-sa")).unwrap();

        admissions.update(&snapshot_with("[]", BOUND_API, WAYPOINT));
        let revoked = tokio::time::timeout(Duration::from_secs(1), direct.revoked())
            .await
            .expect("the direct connection is revoked");
        assert_eq!(revoked.reason(), "policy_revoked");
        assert!(
            revoked.to_string().contains("waypoint_bypassed"),
            "{revoked}"
        );
        // `update` revokes synchronously: what it left alone stays open.
        for (what, kept) in [("other port", other_port), ("waypoint", via_waypoint)] {
            assert!(
                kept.revoked.borrow().is_none(),
                "the {what}'s connection stays open"
            );
        }
    }

    #[test]
    fn ended_connections_are_forgotten() {
        let admissions = admissions();
        let snapshot = snapshot("[]");
        drop(admissions.admit(&snapshot, facts("client")).unwrap());
        assert!(admissions.admitted.lock().is_empty());
    }
}
