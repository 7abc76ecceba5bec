//! Access policies: which sources may open connections to which workloads. Validated
//! here once (by the source that produced them); `crate::policy` indexes and evaluates them.
//!
//! The serialized shape is the one a user writes (camelCase, empty fields left out), so the
//! same types can serve as the `weft.dev/v1alpha1 AccessPolicy` spec and in `/config_dump`.

use std::{collections::BTreeMap, fmt, net::IpAddr};

use ipnet::IpNet;
use serde::{Serialize, Serializer};

use super::{Workload, WorkloadRef};
use crate::identity::SpiffeId;

/// One access policy: selects destination workloads and allows or denies the connections
/// its rules match.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AccessPolicy {
    /// Namespace and name of the policy itself.
    pub name: WorkloadRef,
    /// The destination workloads the policy applies to.
    pub selector: WorkloadSelector,
    /// What a matching connection gets.
    pub action: Action,
    /// Matched when any rule matches (OR); a policy without rules matches nothing.
    pub rules: Vec<Rule>,
    /// The external services of the policy's namespace it applies to (its `targetRefs`),
    /// by name. Such a policy selects no workload: the node proxy of each *source* pod
    /// judges that pod's connections to these services against it, with the pod's own
    /// identity and address. Empty: the policy selects workloads (`selector`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub external_services: Vec<String>,
    /// Set when the policy's resource cannot be understood (the field at fault and why):
    /// the policy then stands in as a DENY of every connection to what it selects,
    /// whatever it says (`AccessPolicy::fail_closed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub invalid: Option<String>,
}

/// Selects workloads of one namespace by their labels.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    /// Namespace of the selected workloads (the policy's own, for namespaced sources).
    pub namespace: String,
    /// Labels a workload must all carry with these values; empty selects the whole
    /// namespace.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
}

/// What a policy does with the connections it matches.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, serde::Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    /// Matching connections are allowed; once any ALLOW policy selects a workload,
    /// connections that no ALLOW policy matches are denied.
    Allow,
    /// Matching connections are denied, whatever ALLOW policies say.
    Deny,
}

/// One rule: matches a connection when every field it sets matches (AND); an empty rule
/// matches every connection.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    /// Sources, any of which must match (OR); empty matches every source.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<Source>,
    /// Destination ports, any of which must match; empty matches every port.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub to_ports: Vec<PortRange>,
    /// HTTP conditions, which only a waypoint can check. A node proxy treats a rule that
    /// has them as matching nothing in an ALLOW policy and as matching regardless of them
    /// in a DENY policy.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub l7: Option<L7Match>,
}

/// A set of sources: matches when every field it sets matches (AND), each field matching
/// when any of its entries does (OR). Never all empty.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Source {
    /// Peer identities (mTLS only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<Principal>,
    /// Peer service accounts, in the mesh's own trust domain only (mTLS only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<ServiceAccount>,
    /// Namespaces of the peer identity (mTLS only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// Peer IP address ranges (mTLS and plaintext).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ip_blocks: Vec<IpBlock>,
}

/// A SPIFFE id to match, exactly or with one `*` at either end.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Principal {
    /// `*`: any authenticated peer.
    Any,
    /// An exact id.
    Exact(SpiffeId),
    /// `spiffe://cluster.local/ns/prod/*`: ids starting with this text.
    Prefix(String),
    /// `*/sa/admin`: ids ending with this text.
    Suffix(String),
}

/// `namespace/service-account`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServiceAccount {
    /// Namespace of the service account.
    pub namespace: String,
    /// Name of the service account.
    pub name: String,
}

/// An IP range, minus some sub-ranges (Kubernetes NetworkPolicy's `ipBlock`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IpBlock {
    /// The range.
    pub cidr: IpNet,
    /// Ranges inside `cidr` that do not match.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub except: Vec<IpNet>,
}

/// An inclusive range of ports; `start == end` for a single port. Serialized as `8080` or
/// `"8000-8100"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortRange {
    /// First port of the range.
    pub start: u16,
    /// Last port of the range (inclusive).
    pub end: u16,
}

/// HTTP request conditions of a rule (for waypoints).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct L7Match {
    /// Request methods (`GET`), any of which must match.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Request paths, exact or with one `*` at either end, any of which must match.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    /// Request headers by lowercase name, each of which must have one of the values.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, Vec<String>>,
    /// The end user's verified token principal (`<iss>/<sub>`), exactly or with one `*` at
    /// either end, any of which must match; a request without a valid token matches none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub request_principals: Vec<String>,
    /// Claims of the verified token by top-level name, each of which must have one of the
    /// values; a request without a valid token matches none.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub claims: BTreeMap<String, Vec<String>>,
}

impl AccessPolicy {
    /// The stand-in for policy `name` that cannot be understood (`invalid` says why): it
    /// denies every connection to what `selector` selects, so a typo never opens a
    /// workload, and it is built from the object alone, so every agent, restarted or not,
    /// enforces the same.
    pub fn fail_closed(name: WorkloadRef, selector: WorkloadSelector, invalid: String) -> Self {
        Self {
            name,
            selector,
            action: Action::Deny,
            // An empty rule matches every connection.
            rules: vec![Rule::default()],
            external_services: vec![],
            invalid: Some(invalid),
        }
    }

    /// Whether the policy applies to connections to `workload`.
    pub fn selects(&self, workload: &Workload) -> bool {
        self.external_services.is_empty() && self.selector.selects(workload)
    }

    /// Whether the policy applies to connections to the external service `service`.
    pub fn targets_external(&self, service: &WorkloadRef) -> bool {
        self.invalid.is_none()
            && service.namespace == self.name.namespace
            && self.external_services.contains(&service.name)
    }

    /// Whether some rule carries HTTP conditions, which a node proxy cannot enforce.
    pub fn has_l7_rules(&self) -> bool {
        self.rules.iter().any(|r| r.l7.is_some())
    }
}

impl WorkloadSelector {
    /// Whether `workload` is in the namespace and carries every label.
    pub fn selects(&self, workload: &Workload) -> bool {
        workload.name.namespace == self.namespace
            && self
                .match_labels
                .iter()
                .all(|(k, v)| workload.labels.get(k) == Some(v))
    }
}

impl Principal {
    /// Whether `id` matches; `text` gives `id` as a string, and is only called by the `*`
    /// forms (so a caller matching many principals can format the id once, lazily).
    pub fn matches<'a>(&self, id: &SpiffeId, text: impl FnOnce() -> &'a str) -> bool {
        match self {
            Principal::Any => true,
            Principal::Exact(exact) => exact == id,
            Principal::Prefix(prefix) => text().starts_with(prefix.as_str()),
            Principal::Suffix(suffix) => text().ends_with(suffix.as_str()),
        }
    }
}

impl ServiceAccount {
    /// Whether `id` has this service account's names (the policy evaluation also requires
    /// the mesh's trust domain).
    pub fn matches(&self, id: &SpiffeId) -> bool {
        id.namespace() == self.namespace && id.service_account() == self.name
    }
}

impl IpBlock {
    /// Whether `ip` is in the range and in none of the exceptions.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.cidr.contains(&ip) && !self.except.iter().any(|e| e.contains(&ip))
    }
}

impl PortRange {
    /// A single port.
    pub fn single(port: u16) -> Self {
        Self {
            start: port,
            end: port,
        }
    }

    /// Whether `port` is in the range.
    pub fn contains(&self, port: u16) -> bool {
        (self.start..=self.end).contains(&port)
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Principal::Any => f.write_str("*"),
            Principal::Exact(id) => write!(f, "{id}"),
            Principal::Prefix(prefix) => write!(f, "{prefix}*"),
            Principal::Suffix(suffix) => write!(f, "*{suffix}"),
        }
    }
}

impl Serialize for Principal {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl fmt::Display for ServiceAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl Serialize for ServiceAccount {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.start == self.end {
            write!(f, "{}", self.start)
        } else {
            write!(f, "{}-{}", self.start, self.end)
        }
    }
}

impl Serialize for PortRange {
    // A number for one port, as users write it; a string for a range.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.start == self.end {
            s.serialize_u16(self.start)
        } else {
            s.collect_str(self)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes_in_the_shape_users_write() {
        let policy = AccessPolicy {
            name: WorkloadRef::new("prod", "api"),
            selector: WorkloadSelector {
                namespace: "prod".into(),
                match_labels: BTreeMap::from([("app".into(), "api".into())]),
            },
            action: Action::Allow,
            rules: vec![Rule {
                from: vec![Source {
                    principals: vec![Principal::Prefix("spiffe://td/ns/web/".into())],
                    service_accounts: vec![ServiceAccount {
                        namespace: "web".into(),
                        name: "front".into(),
                    }],
                    ip_blocks: vec![IpBlock {
                        cidr: "10.0.0.0/8".parse().unwrap(),
                        except: vec![],
                    }],
                    ..Source::default()
                }],
                to_ports: vec![
                    PortRange::single(80),
                    PortRange {
                        start: 8000,
                        end: 8100,
                    },
                ],
                l7: Some(L7Match {
                    methods: vec!["GET".into()],
                    ..L7Match::default()
                }),
            }],
            invalid: None,
            external_services: vec![],
        };
        let json = serde_json::to_value(&policy).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "name": "prod/api",
                "selector": {"namespace": "prod", "matchLabels": {"app": "api"}},
                "action": "ALLOW",
                "rules": [{
                    "from": [{
                        "principals": ["spiffe://td/ns/web/*"],
                        "serviceAccounts": ["web/front"],
                        "ipBlocks": [{"cidr": "10.0.0.0/8"}],
                    }],
                    "toPorts": [80, "8000-8100"],
                    "methods": ["GET"],
                }],
            })
        );
    }

    #[test]
    fn ip_block_exceptions_do_not_match() {
        let block = IpBlock {
            cidr: "10.0.0.0/8".parse().unwrap(),
            except: vec!["10.1.0.0/16".parse().unwrap()],
        };
        assert!(block.contains("10.2.0.1".parse().unwrap()));
        assert!(!block.contains("10.1.0.1".parse().unwrap()));
        assert!(!block.contains("11.0.0.1".parse().unwrap()));
    }
}
