//! A reference model of access-policy decisions, written from docs/policy.md alone (not
//! from `policy::eval` or `state::policy`), so that the property tests compare the real
//! decision path with what the documentation promises rather than with itself.
//!
//! It is deliberately naive: every policy and service of the snapshot is looked at for
//! every connection, principals are read back in the form a user writes them (`*`,
//! `spiffe://…/*`, `*/sa/x`), and CIDR containment is done on the address bits by hand.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::{
    identity::SpiffeId,
    policy::{ConnectionFacts, Decision, DenyReason, RequestFacts},
    state::{AccessPolicy, Action, IpBlock, L7Match, Rule, Snapshot, Source, WorkloadRef},
};

/// What the documentation says the decision must be.
#[derive(Debug)]
pub(super) enum Expected {
    Allow,
    /// Some DENY policy matches (an invalid policy counts as a DENY of everything). The
    /// doc does not say which one a decision names when several do, so any of them.
    Deny(Vec<(WorkloadRef, DenyReason)>),
    /// ALLOW policies select the destination and none matches.
    NotAllowed,
    /// Nothing selects the destination with ALLOW and the mesh denies by default.
    DefaultDeny,
    /// The port is a target port of a service bound to a waypoint, and the peer is not
    /// (a known) one of those waypoints.
    WaypointBypassed,
}

/// Who judges: the destination's node proxy (TCP only; "Services bound to a waypoint"
/// applies) or a waypoint judging one HTTP request (which is where those services'
/// traffic is judged against the policies).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Judge {
    NodeProxy,
    Waypoint,
}

impl Expected {
    /// Whether `decision` is what the documentation prescribes.
    pub(super) fn admits(&self, decision: &Decision) -> bool {
        match (self, decision) {
            (Self::Allow, Decision::Allow) => true,
            (
                Self::Deny(candidates),
                Decision::Deny {
                    policy: Some(name),
                    reason,
                },
            ) => candidates.iter().any(|(n, r)| n == name && r == reason),
            (Self::NotAllowed, Decision::Deny { policy, reason }) => {
                policy.is_none() && *reason == DenyReason::NotAllowed
            }
            (Self::DefaultDeny, Decision::Deny { policy, reason }) => {
                policy.is_none() && *reason == DenyReason::DefaultDeny
            }
            (Self::WaypointBypassed, Decision::Deny { policy, reason }) => {
                policy.is_none() && *reason == DenyReason::WaypointBypassed
            }
            _ => false,
        }
    }
}

/// At a node proxy, first "Services bound to a waypoint"; then "Decision": DENY wins,
/// then ALLOW policies if any select the destination, then `mesh.defaultDeny`.
/// `trust_domain` is the mesh's own.
pub(super) fn decide(
    snapshot: &Snapshot,
    trust_domain: &str,
    judge: Judge,
    facts: &ConnectionFacts<'_>,
) -> Expected {
    if judge == Judge::NodeProxy
        && let Some(waypoints) = bound_waypoints(snapshot, trust_domain, facts)
    {
        // Only the waypoint's identity, and then without the workload's policies.
        return match facts.source_identity {
            Some(id) if waypoints.contains(id) => Expected::Allow,
            _ => Expected::WaypointBypassed,
        };
    }
    let selecting: Vec<&AccessPolicy> = snapshot
        .policies
        .values()
        .filter(|p| selects(p, facts))
        .collect();
    let denying: Vec<(WorkloadRef, DenyReason)> = selecting
        .iter()
        .filter_map(|p| {
            if p.invalid.is_some() {
                // "A policy that cannot be understood counts as a DENY of everything."
                Some((p.name.clone(), DenyReason::InvalidPolicy))
            } else if p.action == Action::Deny && policy_matches(p, trust_domain, facts) {
                Some((p.name.clone(), DenyReason::DeniedByPolicy))
            } else {
                None
            }
        })
        .collect();
    if !denying.is_empty() {
        return Expected::Deny(denying);
    }
    let allows: Vec<&&AccessPolicy> = selecting
        .iter()
        .filter(|p| p.action == Action::Allow)
        .collect();
    if !allows.is_empty() {
        return if allows
            .iter()
            .any(|p| policy_matches(p, trust_domain, facts))
        {
            Expected::Allow
        } else {
            Expected::NotAllowed
        };
    }
    if snapshot.mesh.default_deny {
        Expected::DefaultDeny
    } else {
        Expected::Allow
    }
}

/// When the destination port is a target port of services bound to a waypoint that have
/// the destination among their endpoints: the identities of those waypoints the snapshot
/// knows (a binding to an unknown waypoint admits nothing).
fn bound_waypoints(
    snapshot: &Snapshot,
    trust_domain: &str,
    facts: &ConnectionFacts<'_>,
) -> Option<Vec<SpiffeId>> {
    let destination = facts.destination;
    let mut bound = false;
    let mut identities = Vec::new();
    for service in snapshot.services.values() {
        let Some(waypoint) = &service.waypoint else {
            continue;
        };
        let endpoint = service
            .endpoints
            .iter()
            .any(|ip| destination.ips.contains(ip));
        let target = service
            .ports
            .iter()
            .any(|p| p.target_port == facts.dst_port);
        if !(endpoint && target) {
            continue;
        }
        bound = true;
        // `weft.dev/use-waypoint: <name>` names a waypoint of the service's namespace.
        let known = snapshot
            .waypoints
            .values()
            .find(|w| w.name.namespace == service.name.namespace && w.name.name == *waypoint);
        if let Some(w) = known {
            let id = format!(
                "spiffe://{trust_domain}/ns/{}/sa/{}",
                w.name.namespace, w.service_account
            );
            identities.push(id.parse().expect("a waypoint identity parses"));
        }
    }
    bound.then_some(identities)
}

/// "selector": workloads of the policy's own namespace, carrying every label of
/// `matchLabels` with its value.
fn selects(policy: &AccessPolicy, facts: &ConnectionFacts<'_>) -> bool {
    let workload = facts.destination;
    workload.name.namespace == policy.name.namespace
        && policy
            .selector
            .match_labels
            .iter()
            .all(|(key, value)| workload.labels.get(key) == Some(value))
}

/// "the policy matches a connection when any rule matches"; no rules, no match.
fn policy_matches(policy: &AccessPolicy, trust_domain: &str, facts: &ConnectionFacts<'_>) -> bool {
    policy
        .rules
        .iter()
        .any(|rule| rule_matches(rule, policy.action, trust_domain, facts))
}

/// "A rule matches when every field it sets matches"; HTTP conditions as "HTTP conditions
/// (waypoints)" says: judged at a waypoint, and at a node proxy (no request) an ALLOW rule
/// with them matches nothing while a DENY rule matches on its other fields alone.
fn rule_matches(
    rule: &Rule,
    action: Action,
    trust_domain: &str,
    facts: &ConnectionFacts<'_>,
) -> bool {
    let from = rule.from.is_empty()
        || rule
            .from
            .iter()
            .any(|source| source_matches(source, trust_domain, facts));
    let port = facts.dst_port;
    let ports = rule.to_ports.is_empty()
        || rule
            .to_ports
            .iter()
            .any(|range| range.start <= port && port <= range.end);
    let http = match (&rule.l7, facts.request) {
        (None, _) => true,
        (Some(l7), Some(request)) => http_matches(l7, request),
        (Some(_), None) => action == Action::Deny,
    };
    from && ports && http
}

/// "every field set in an entry must match, each field matching when any of its values
/// does"; identity fields never match plaintext ("Plaintext connections").
fn source_matches(source: &Source, trust_domain: &str, facts: &ConnectionFacts<'_>) -> bool {
    let identity = facts.source_identity;
    let in_mesh = |id: &SpiffeId| id.trust_domain() == trust_domain;
    let principals = source.principals.is_empty()
        || identity.is_some_and(|id| {
            source
                .principals
                .iter()
                .any(|p| wildcard_matches(&p.to_string(), &id.to_string()))
        });
    let service_accounts = source.service_accounts.is_empty()
        || identity.is_some_and(|id| {
            in_mesh(id)
                && source
                    .service_accounts
                    .iter()
                    .any(|sa| sa.namespace == id.namespace() && sa.name == id.service_account())
        });
    let namespaces = source.namespaces.is_empty()
        || identity.is_some_and(|id| {
            in_mesh(id) && source.namespaces.iter().any(|ns| ns == id.namespace())
        });
    let ip_blocks = source.ip_blocks.is_empty()
        || source
            .ip_blocks
            .iter()
            .any(|block| block_contains(block, facts.source_ip));
    principals && service_accounts && namespaces && ip_blocks
}

/// A principal or path as the user writes it: exact, `*`, a prefix ending in `*`, or a
/// suffix starting with `*`.
fn wildcard_matches(written: &str, id: &str) -> bool {
    if written == "*" {
        true
    } else if let Some(prefix) = written.strip_suffix('*') {
        id.starts_with(prefix)
    } else if let Some(suffix) = written.strip_prefix('*') {
        id.ends_with(suffix)
    } else {
        written == id
    }
}

/// "`cidr`, minus the ranges in `except`".
fn block_contains(block: &IpBlock, ip: IpAddr) -> bool {
    within(ip, &block.cidr) && !block.except.iter().any(|e| within(ip, e))
}

/// Whether the first `prefix_len` bits of `ip` are those of `net` (same family only).
fn within(ip: IpAddr, net: &IpNet) -> bool {
    let bits = |ip: IpAddr| match ip {
        IpAddr::V4(a) => (u128::from(u32::from(a)), 32),
        IpAddr::V6(a) => (u128::from(a), 128),
    };
    let ((address, width), (network, net_width)) = (bits(ip), bits(net.addr()));
    if width != net_width {
        return false;
    }
    let host_bits = u32::from(width - net.prefix_len());
    (address ^ network).checked_shr(host_bits).unwrap_or(0) == 0
}

/// `methods` (any), `paths` (exact, or one `*` at either end), `headers` (each name must
/// carry one of its values).
fn http_matches(l7: &L7Match, request: &RequestFacts<'_>) -> bool {
    let method = l7.methods.is_empty() || l7.methods.iter().any(|m| m == request.method);
    let path = l7.paths.is_empty()
        || l7
            .paths
            .iter()
            .any(|written| wildcard_matches(written, request.path));
    let headers = l7.headers.iter().all(|(name, values)| {
        request.headers.get_all(name.as_str()).iter().any(|v| {
            values
                .iter()
                .any(|accepted| v.as_bytes() == accepted.as_bytes())
        })
    });
    method && path && headers
}
