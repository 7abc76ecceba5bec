//! Access-policy evaluation at the destination proxy.
//!
//! Job: decide whether a new inbound connection (HBONE or plaintext) to a workload on this
//! node is allowed by the snapshot's `AccessPolicy`s (`state::policy` holds the model).
//!
//! Inputs: a `state::Snapshot` (its `policies`, `workloads` and `mesh.default_deny`), turned
//! into a [`PolicyIndex`] once per snapshot; then, per connection, [`ConnectionFacts`]: the
//! destination workload and port, the peer's SPIFFE id (mTLS only) and the peer's IP.
//!
//! Output: a [`Decision`]; a denial carries a stable snake_case reason for metrics and
//! logs. Resetting, counting and closing open connections a new snapshot denies is the
//! proxy's part: it re-evaluates their facts against the new index.
//!
//! Semantics, in order:
//! 1. a DENY policy selecting the destination with a matching rule denies
//!    (`denied_by_policy`); a policy that cannot be understood is indexed as a DENY of
//!    everything it selects (`invalid_policy`), so a typo never opens a workload;
//! 2. if any ALLOW policy selects the destination, the connection is allowed only when one
//!    of them has a matching rule (`not_allowed` otherwise);
//! 3. otherwise the mesh-wide default-deny switch decides (`default_deny` when on).
//!
//! A rule with HTTP conditions (methods, paths, headers) cannot be checked by a node proxy:
//! in an ALLOW policy it matches nothing, in a DENY policy it matches on its L4 conditions
//! alone, so the node proxy never allows more than the policy means. Such policies are
//! logged once (`component = "policy"`) when the index first meets them.
//!
//! Waypoint gates, before all of that at a node proxy (`PolicyIndex::admit`): a port that
//! a service bound to a waypoint targets (the workload is one of the service's endpoints)
//! admits the waypoint's identity only, without the access policies (the waypoint judged
//! each request against them with the original client's identity), and denies everything
//! else with `waypoint_bypassed`, plaintext included. A binding to a waypoint the snapshot
//! does not know denies everything on those ports: no identity could come through it.
//! `PolicyIndex::evaluate` (a waypoint's own check of a request) ignores gates.
//!
//! A plaintext connection has no identity: sources naming principals, service accounts or
//! namespaces never match it, only IP blocks do. The source IP is not mapped to a pod's
//! namespace: an address proves nothing, and identity-based rules exist to require proof.
//!
//! External services (`PolicyIndex::evaluate_egress`): a policy whose `targetRefs` name
//! ExternalServices of its namespace selects no workload. The node proxy of the *source*
//! pod judges that pod's connections to those services against it, with the same rules
//! (DENY wins; any ALLOW makes it allow-only), the pod's own identity (the node runs the
//! pod, so it knows who it is without a handshake) and address. There is no default deny
//! for them: the mesh's `REGISTRY_ONLY` mode is what closes the way out.
//!
//! Cost: `evaluate` touches only the policies that select the destination (precomputed per
//! workload by `PolicyIndex::build`), never the whole policy set.

pub mod eval;
pub mod index;

pub use eval::{ConnectionFacts, Decision, DenyReason, EgressFacts, RequestFacts};
pub use index::{PolicyIndex, WaypointGate};

#[cfg(test)]
mod tests;
