//! Matching one connection against policies, and the decision rules.

use std::{cell::OnceCell, net::IpAddr};

use http::HeaderMap;

use crate::{
    identity::SpiffeId,
    jwt::Claims,
    state::{AccessPolicy, Action, L7Match, Rule, Source, Workload, WorkloadRef},
};

/// What the destination proxy knows about a new connection.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionFacts<'a> {
    /// The workload connected to (from the snapshot the index was built from).
    pub destination: &'a Workload,
    /// The destination port on the workload.
    pub dst_port: u16,
    /// The peer's verified identity; `None` for plaintext.
    pub source_identity: Option<&'a SpiffeId>,
    /// The peer's IP address.
    pub source_ip: IpAddr,
    /// The HTTP request, when a waypoint judges one; `None` at a node proxy, which judges
    /// connections and treats HTTP conditions conservatively (see `Rule::l7`).
    pub request: Option<&'a RequestFacts<'a>>,
}

/// What a source pod's node proxy knows about that pod's new connection to an external
/// service: the pod's own identity (which the node vouches for, as it runs the pod) and
/// address.
#[derive(Clone, Copy, Debug)]
pub struct EgressFacts<'a> {
    /// The external service's port the pod connected to.
    pub dst_port: u16,
    /// The source pod's identity; `None` when the node has no trust domain (no CA): then
    /// every rule with an identity condition matches in a DENY and not in an ALLOW.
    pub source_identity: Option<&'a SpiffeId>,
    /// The source pod's IP address.
    pub source_ip: IpAddr,
}

/// What a waypoint knows about one HTTP request.
#[derive(Clone, Copy, Debug)]
pub struct RequestFacts<'a> {
    /// The method, as sent (`GET`).
    pub method: &'a str,
    /// The path, without the query.
    pub path: &'a str,
    /// The request headers.
    pub headers: &'a HeaderMap,
    /// The end user's verified token, if the request carried one its Service's
    /// `requestAuthentication` accepted.
    pub user: Option<&'a Claims>,
}

/// Whether a connection may proceed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The connection may proceed.
    Allow,
    /// The connection must be reset.
    Deny {
        /// The DENY policy that matched, for `DeniedByPolicy` and `InvalidPolicy`.
        policy: Option<WorkloadRef>,
        /// Why.
        reason: DenyReason,
    },
}

/// Why a connection was denied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DenyReason {
    /// A DENY policy matched.
    DeniedByPolicy,
    /// A policy that cannot be understood selects the destination: it denies everything
    /// (`AccessPolicy::fail_closed`).
    InvalidPolicy,
    /// ALLOW policies select the destination, and none matched.
    NotAllowed,
    /// No ALLOW policy selects the destination, and the mesh denies by default.
    DefaultDeny,
    /// The destination port is a bound service's target port, and the peer is not that
    /// service's waypoint (see `WaypointGate`).
    WaypointBypassed,
}

impl Decision {
    /// Whether the connection may proceed.
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow)
    }

    /// The stable reason of a denial (metric label, access-log `error`); `None` if allowed.
    pub fn reason(&self) -> Option<&'static str> {
        match self {
            Decision::Allow => None,
            Decision::Deny { reason, .. } => Some(reason.as_str()),
        }
    }
}

impl DenyReason {
    /// Stable snake_case name: `denied_by_policy`, `invalid_policy`, `not_allowed`,
    /// `default_deny`, `waypoint_bypassed`.
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::DeniedByPolicy => "denied_by_policy",
            DenyReason::InvalidPolicy => "invalid_policy",
            DenyReason::NotAllowed => "not_allowed",
            DenyReason::DefaultDeny => "default_deny",
            DenyReason::WaypointBypassed => "waypoint_bypassed",
        }
    }
}

impl std::fmt::Display for DenyReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The decision rules, given the DENY and the ALLOW policies that select the destination
/// (each in a stable order: the first matching DENY is the one named).
pub(crate) fn decide<'p>(
    deny: impl IntoIterator<Item = &'p AccessPolicy>,
    allow: impl IntoIterator<Item = &'p AccessPolicy>,
    default_deny: bool,
    trust_domain: Option<&str>,
    facts: Subject<'_>,
) -> Decision {
    let peer = Peer::new(facts, trust_domain);
    if let Some(policy) = deny.into_iter().find(|p| peer.matches(p)) {
        let reason = match policy.invalid {
            Some(_) => DenyReason::InvalidPolicy,
            None => DenyReason::DeniedByPolicy,
        };
        return Decision::Deny {
            policy: Some(policy.name.clone()),
            reason,
        };
    }
    let mut allow = allow.into_iter().peekable();
    if allow.peek().is_some() {
        if allow.any(|p| peer.matches(p)) {
            return Decision::Allow;
        }
        return Decision::Deny {
            policy: None,
            reason: DenyReason::NotAllowed,
        };
    }
    if default_deny {
        return Decision::Deny {
            policy: None,
            reason: DenyReason::DefaultDeny,
        };
    }
    Decision::Allow
}

/// What rules match on, from either side's facts.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Subject<'a> {
    /// A source pod's own connection out (`EgressFacts`), not a peer arriving.
    egress: bool,
    dst_port: u16,
    source_identity: Option<&'a SpiffeId>,
    source_ip: IpAddr,
    request: Option<&'a RequestFacts<'a>>,
}

impl<'a> From<&ConnectionFacts<'a>> for Subject<'a> {
    fn from(facts: &ConnectionFacts<'a>) -> Self {
        Self {
            egress: false,
            dst_port: facts.dst_port,
            source_identity: facts.source_identity,
            source_ip: facts.source_ip,
            request: facts.request,
        }
    }
}

impl<'a> From<&EgressFacts<'a>> for Subject<'a> {
    fn from(facts: &EgressFacts<'a>) -> Self {
        Self {
            egress: true,
            dst_port: facts.dst_port,
            source_identity: facts.source_identity,
            source_ip: facts.source_ip,
            // No waypoint is on the way out: HTTP conditions are judged as a node proxy
            // judges them.
            request: None,
        }
    }
}

/// The connection as rules see it, with the peer id's text formatted at most once.
struct Peer<'f, 'a> {
    facts: Subject<'a>,
    /// The mesh's trust domain: `serviceAccounts` and `namespaces` name identities of this
    /// domain only (None: the node has no CA, so no peer has an identity to match).
    trust_domain: Option<&'f str>,
    id_text: OnceCell<String>,
}

impl<'f, 'a> Peer<'f, 'a> {
    fn new(facts: Subject<'a>, trust_domain: Option<&'f str>) -> Self {
        Self {
            facts,
            trust_domain,
            id_text: OnceCell::new(),
        }
    }

    fn matches(&self, policy: &AccessPolicy) -> bool {
        policy.rules.iter().any(|r| self.rule(r, policy.action))
    }

    fn rule(&self, rule: &Rule, action: Action) -> bool {
        match (&rule.l7, self.facts.request) {
            (Some(l7), Some(request)) if !l7_matches(l7, request) => return false,
            // HTTP conditions are the waypoint's; the node proxy errs on the closed side: an
            // ALLOW rule it cannot check grants nothing, a DENY rule denies on its L4 part.
            (Some(_), None) if action == Action::Allow => return false,
            _ => {}
        }
        (rule.to_ports.is_empty()
            || rule
                .to_ports
                .iter()
                .any(|p| p.contains(self.facts.dst_port)))
            && (rule.from.is_empty() || rule.from.iter().any(|s| self.source(s, action)))
    }

    fn source(&self, source: &Source, action: Action) -> bool {
        let ip = self.facts.source_ip;
        if !source.ip_blocks.is_empty() && !source.ip_blocks.iter().any(|b| b.contains(ip)) {
            return false;
        }
        let needs_identity = !source.principals.is_empty()
            || !source.service_accounts.is_empty()
            || !source.namespaces.is_empty();
        if !needs_identity {
            return true;
        }
        // Plaintext: nothing proves who the peer is, so no identity condition holds. A pod
        // of this node going out without an identity (the node has no CA) is not a stranger
        // but one whose name cannot be written: identity conditions then fail closed both
        // ways, a DENY denies it and an ALLOW does not allow it.
        let Some(id) = self.facts.source_identity else {
            return self.facts.egress && action == Action::Deny;
        };
        let text = || self.id_text.get_or_init(|| id.to_string()).as_str();
        // `ns/x/sa/y` of another mesh is another workload, whatever its names: the short
        // forms match this mesh's identities only (principals spell the domain out), and
        // nothing where the mesh's trust domain is unknown (fail closed).
        let in_mesh = self.trust_domain.is_some_and(|td| id.trust_domain() == td);
        if !in_mesh && (!source.service_accounts.is_empty() || !source.namespaces.is_empty()) {
            return false;
        }
        (source.principals.is_empty() || source.principals.iter().any(|p| p.matches(id, text)))
            && (source.service_accounts.is_empty()
                || source.service_accounts.iter().any(|sa| sa.matches(id)))
            && (source.namespaces.is_empty()
                || source.namespaces.iter().any(|ns| ns == id.namespace()))
    }
}

/// Whether a request meets a rule's HTTP conditions: each field it sets must match, by
/// any of its entries. Methods compare exactly (HTTP methods are case-sensitive), paths
/// and request principals exactly or with one `*` at either end, header values and claims
/// exactly.
fn l7_matches(l7: &L7Match, request: &RequestFacts<'_>) -> bool {
    (l7.methods.is_empty() || l7.methods.iter().any(|m| m == request.method))
        && (l7.paths.is_empty() || l7.paths.iter().any(|p| pattern_matches(p, request.path)))
        && l7.headers.iter().all(|(name, values)| {
            request.headers.get_all(name.as_str()).iter().any(|v| {
                v.to_str()
                    .is_ok_and(|v| values.iter().any(|want| want == v))
            })
        })
        && user_matches(l7, request.user)
}

/// The end-user conditions: none set, or a verified token that meets them all.
fn user_matches(l7: &L7Match, user: Option<&Claims>) -> bool {
    if l7.request_principals.is_empty() && l7.claims.is_empty() {
        return true;
    }
    let Some(user) = user else {
        return false;
    };
    (l7.request_principals.is_empty()
        || user.principal().is_some_and(|principal| {
            l7.request_principals
                .iter()
                .any(|p| pattern_matches(p, principal))
        }))
        && l7.claims.iter().all(|(name, values)| {
            user.values(name)
                .iter()
                .any(|have| values.iter().any(|want| want == have))
        })
}

/// `*`, `prefix*`, `*suffix` or an exact text.
fn pattern_matches(pattern: &str, path: &str) -> bool {
    if pattern == "*" {
        true
    } else if let Some(prefix) = pattern.strip_suffix('*') {
        path.starts_with(prefix)
    } else if let Some(suffix) = pattern.strip_prefix('*') {
        path.ends_with(suffix)
    } else {
        pattern == path
    }
}
