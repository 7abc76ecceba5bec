//! The policy syntax users write, shared by the local file (`policies:` items) and the
//! `weft.dev/v1alpha1 AccessPolicy` custom resource (its `spec`), and its validation into
//! `state` types. Input: the deserialized `*Spec` types (whose JSON schema is the CRD's);
//! output: validated `state::AccessPolicy`, or an `Invalid` naming the field path below the
//! caller's prefix (`policies[2].rules[0].from[1].ipBlocks[0].cidr`, `spec.rules[0].toPorts[1]`).
//! Each source wraps `Invalid` into its own error, with the file or object it came from.

use std::{collections::BTreeMap, fmt, net::IpAddr};

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{
    identity::SpiffeId,
    state::{
        AccessPolicy, Action, IpBlock, L7Match, PortRange, Principal, Rule, ServiceAccount, Source,
        WorkloadRef, WorkloadSelector,
    },
};

/// A field that failed validation, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct Invalid {
    /// Path of the field (`spec.rules[0].toPorts[1]`).
    pub field: String,
    /// What is wrong with it and what is expected.
    pub reason: String,
}

/// Selects the policy's destination workloads (in the policy's namespace) by label.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SelectorSpec {
    /// Labels a workload must all carry; empty or absent selects the whole namespace.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
}

/// One rule: matches a connection when every field it sets matches; an empty rule matches
/// every connection.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RuleSpec {
    /// Sources, any of which must match; absent matches every source.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<SourceSpec>,
    /// Destination ports (`8080`) or ranges (`"8000-8100"`), any of which must match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to_ports: Vec<PortSpec>,
    /// HTTP methods (uppercase); enforced by waypoints only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(regex(pattern = r"^[A-Z]+$")))]
    pub methods: Vec<String>,
    /// HTTP paths, exact or with one `*` at either end; enforced by waypoints only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(regex(pattern = r"^[/*]")))]
    pub paths: Vec<String>,
    /// HTTP headers by lowercase name, each of which must have one of the values; enforced
    /// by waypoints only.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, Vec<String>>,
    /// End users by verified token, `<iss>/<sub>`, `*` (any valid token), or one `*` at
    /// either end; any of which must match. Enforced by waypoints only, after a
    /// TrafficPolicy's `requestAuthentication`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request_principals: Vec<String>,
    /// Claims of the verified token by top-level name, each of which must have one of the
    /// values (a string claim equal to it, or an array claim holding it). Enforced by
    /// waypoints only.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub claims: BTreeMap<String, Vec<String>>,
}

/// A set of sources: matches when every field it sets matches, each field matching when
/// any of its entries does. At least one field must be set.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
// `from: [{}]` would read as "every source": the API server refuses it, as the validator does.
#[schemars(extend("minProperties" = 1))]
pub struct SourceSpec {
    /// SPIFFE ids, `*`, or one `*` at the start or end (`spiffe://cluster.local/ns/web/*`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    /// `namespace/service-account` of the peer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(regex(pattern = r"^[a-z0-9.-]+/[a-z0-9.-]+$")))]
    pub service_accounts: Vec<String>,
    /// Namespaces of the peer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// Peer address ranges.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_blocks: Vec<IpBlockSpec>,
}

/// An address range minus some sub-ranges (NetworkPolicy's `ipBlock`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct IpBlockSpec {
    /// `10.0.0.0/8`, or one address.
    pub cidr: String,
    /// Ranges inside `cidr` that do not match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub except: Vec<String>,
}

/// `8080` or `"8000-8100"` (or `"8080"`), checked by the validator so the error names the
/// field and the value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortSpec {
    /// A port as a number.
    Number(i64),
    /// A port or a range as text.
    Text(String),
}

/// A Gateway API `LocalPolicyTargetReferenceWithSectionName`: a Service (group `""`), or
/// an `HTTPRoute` (group `gateway.networking.k8s.io`) or one named rule of it, for a
/// TrafficPolicy; an `ExternalService` (group `weft.dev`) for an AccessPolicy.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TargetRefSpec {
    /// `""` (core) for a Service, `gateway.networking.k8s.io` for an HTTPRoute, `weft.dev`
    /// for an ExternalService.
    #[serde(default)]
    pub group: String,
    /// `Service`, `HTTPRoute` or `ExternalService`.
    pub kind: String,
    /// The Service's, the route's or the external service's name.
    pub name: String,
    /// For an `HTTPRoute`: the `name` of one of its rules; absent: every rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
}

/// The parts of an access policy as written (`policies[2]` in the file, `spec` in the CRD).
pub struct AccessPolicyParts {
    pub selector: SelectorSpec,
    pub target_refs: Vec<TargetRefSpec>,
    pub action: Action,
    pub rules: Vec<RuleSpec>,
}

/// Validates one access policy named `name`; `field` is the path of the item holding its
/// parts.
pub fn access_policy(
    field: &str,
    name: WorkloadRef,
    parts: AccessPolicyParts,
) -> Result<AccessPolicy, Invalid> {
    let AccessPolicyParts {
        selector,
        target_refs,
        action,
        rules,
    } = parts;
    let match_labels = labels(
        &format!("{field}.selector.matchLabels"),
        selector.match_labels,
    )?;
    if !target_refs.is_empty() && !match_labels.is_empty() {
        return Err(invalid(
            format!("{field}.targetRefs"),
            "a policy selects workloads (selector) or names external services (targetRefs), \
             not both"
                .into(),
        ));
    }
    if target_refs.len() > MAX_POLICY_TARGETS {
        return Err(invalid(
            format!("{field}.targetRefs"),
            format!(
                "{} targets: at most {MAX_POLICY_TARGETS}",
                target_refs.len()
            ),
        ));
    }
    let external_services = target_refs
        .into_iter()
        .enumerate()
        .map(|(i, raw)| external_target(&format!("{field}.targetRefs[{i}]"), raw))
        .collect::<Result<_, _>>()?;
    let rules = rules
        .into_iter()
        .enumerate()
        .map(|(i, raw)| rule(&format!("{field}.rules[{i}]"), raw))
        .collect::<Result<_, _>>()?;
    Ok(AccessPolicy {
        // A policy selects workloads of its own namespace only, as the CRD does: a
        // namespace's owner cannot open or close another namespace's workloads.
        selector: WorkloadSelector {
            namespace: name.namespace.clone(),
            match_labels,
        },
        name,
        action,
        rules,
        external_services,
        invalid: None,
    })
}

/// One `targetRefs` entry of an access policy: an ExternalService of the policy's
/// namespace, by name.
fn external_target(field: &str, raw: TargetRefSpec) -> Result<String, Invalid> {
    if raw.group != WEFT_GROUP || raw.kind != "ExternalService" {
        return Err(invalid(
            format!("{field}.kind"),
            format!(
                "{}/{}: an access policy targets an ExternalService (group {WEFT_GROUP:?}); \
                 workloads are chosen with selector",
                raw.group, raw.kind
            ),
        ));
    }
    if raw.section_name.is_some() {
        return Err(invalid(
            format!("{field}.sectionName"),
            "not supported on an ExternalService target".into(),
        ));
    }
    name(&format!("{field}.name"), raw.name)
}

/// At most this many `targetRefs` per access policy, as Gateway API policies allow.
const MAX_POLICY_TARGETS: usize = 16;
const WEFT_GROUP: &str = "weft.dev";

/// One IP address.
pub fn ip(field: &str, text: &str) -> Result<IpAddr, Invalid> {
    text.parse()
        .map_err(|_| invalid(field.into(), format!("invalid IP address {text:?}")))
}

impl<'de> Deserialize<'de> for PortSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = PortSpec;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#"a port (8080) or a port range ("8000-8100")"#)
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<PortSpec, E> {
                Ok(PortSpec::Number(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<PortSpec, E> {
                Ok(PortSpec::Number(i64::try_from(v).unwrap_or(i64::MAX)))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<PortSpec, E> {
                Ok(PortSpec::Text(v.to_owned()))
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl Serialize for PortSpec {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            PortSpec::Number(n) => s.serialize_i64(*n),
            PortSpec::Text(text) => s.serialize_str(text),
        }
    }
}

impl JsonSchema for PortSpec {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "PortSpec".into()
    }

    // Kubernetes' int-or-string: the API server accepts both, the validator checks ranges.
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "x-kubernetes-int-or-string": true,
            "description": "a port (8080) or an inclusive port range (\"8000-8100\")",
        })
    }
}

fn rule(field: &str, raw: RuleSpec) -> Result<Rule, Invalid> {
    let from = raw
        .from
        .into_iter()
        .enumerate()
        .map(|(i, raw)| source(&format!("{field}.from[{i}]"), raw))
        .collect::<Result<_, _>>()?;
    let to_ports = raw
        .to_ports
        .iter()
        .enumerate()
        .map(|(i, port)| port_range(&format!("{field}.toPorts[{i}]"), port))
        .collect::<Result<_, _>>()?;
    for (i, method) in raw.methods.iter().enumerate() {
        if method.is_empty() || !method.chars().all(|c| c.is_ascii_uppercase()) {
            return Err(invalid(
                format!("{field}.methods[{i}]"),
                format!("{method:?} is not an HTTP method (uppercase, e.g. GET)"),
            ));
        }
    }
    for (i, path) in raw.paths.iter().enumerate() {
        pattern(&format!("{field}.paths[{i}]"), path)?;
        if !path.starts_with('/') && !path.starts_with('*') {
            return Err(invalid(
                format!("{field}.paths[{i}]"),
                format!("{path:?} must start with '/' (or '*')"),
            ));
        }
    }
    for (name, values) in &raw.headers {
        let valid = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !valid {
            return Err(invalid(
                format!("{field}.headers.{name}"),
                format!("{name:?} is not a lowercase header name"),
            ));
        }
        if values.is_empty() {
            return Err(invalid(
                format!("{field}.headers.{name}"),
                "at least one value is required".into(),
            ));
        }
    }
    for (i, principal) in raw.request_principals.iter().enumerate() {
        pattern(&format!("{field}.requestPrincipals[{i}]"), principal)?;
    }
    for (name, values) in &raw.claims {
        if name.is_empty() {
            return Err(invalid(
                format!("{field}.claims"),
                "a claim name must not be empty".into(),
            ));
        }
        if values.is_empty() {
            return Err(invalid(
                format!("{field}.claims.{name}"),
                "at least one value is required".into(),
            ));
        }
    }
    let l7 = (!raw.methods.is_empty()
        || !raw.paths.is_empty()
        || !raw.headers.is_empty()
        || !raw.request_principals.is_empty()
        || !raw.claims.is_empty())
    .then_some(L7Match {
        methods: raw.methods,
        paths: raw.paths,
        headers: raw.headers,
        request_principals: raw.request_principals,
        claims: raw.claims,
    });
    Ok(Rule { from, to_ports, l7 })
}

fn source(field: &str, raw: SourceSpec) -> Result<Source, Invalid> {
    if raw.principals.is_empty()
        && raw.service_accounts.is_empty()
        && raw.namespaces.is_empty()
        && raw.ip_blocks.is_empty()
    {
        return Err(invalid(
            field.into(),
            "names no source (set principals, serviceAccounts, namespaces or ipBlocks; \
             leave `from` out to match every source)"
                .into(),
        ));
    }
    let principals = raw
        .principals
        .iter()
        .enumerate()
        .map(|(i, text)| principal(&format!("{field}.principals[{i}]"), text))
        .collect::<Result<_, _>>()?;
    let service_accounts = raw
        .service_accounts
        .into_iter()
        .enumerate()
        .map(|(i, text)| {
            let field = format!("{field}.serviceAccounts[{i}]");
            let Some((namespace, account)) = text.split_once('/') else {
                return Err(invalid(
                    field,
                    format!("{text:?} is not namespace/service-account"),
                ));
            };
            Ok(ServiceAccount {
                namespace: name(&field, namespace.into())?,
                name: name(&field, account.into())?,
            })
        })
        .collect::<Result<_, _>>()?;
    let namespaces = raw
        .namespaces
        .into_iter()
        .enumerate()
        .map(|(i, ns)| name(&format!("{field}.namespaces[{i}]"), ns))
        .collect::<Result<_, _>>()?;
    let ip_blocks = raw
        .ip_blocks
        .iter()
        .enumerate()
        .map(|(i, block)| ip_block(&format!("{field}.ipBlocks[{i}]"), block))
        .collect::<Result<_, _>>()?;
    Ok(Source {
        principals,
        service_accounts,
        namespaces,
        ip_blocks,
    })
}

fn principal(field: &str, text: &str) -> Result<Principal, Invalid> {
    if text == "*" {
        return Ok(Principal::Any);
    }
    pattern(field, text)?;
    if let Some(prefix) = text.strip_suffix('*') {
        if !prefix.starts_with("spiffe://") {
            return Err(invalid(
                field.into(),
                format!("{text:?}: a prefix must start with spiffe://"),
            ));
        }
        return Ok(Principal::Prefix(prefix.into()));
    }
    if let Some(suffix) = text.strip_prefix('*') {
        return Ok(Principal::Suffix(suffix.into()));
    }
    text.parse::<SpiffeId>()
        .map(Principal::Exact)
        .map_err(|e| invalid(field.into(), e.to_string()))
}

/// Exact text, or one `*` at the start or the end.
fn pattern(field: &str, text: &str) -> Result<(), Invalid> {
    let inner = text.strip_prefix('*').or_else(|| text.strip_suffix('*'));
    if text.is_empty() || inner.unwrap_or(text).contains('*') {
        return Err(invalid(
            field.into(),
            format!("{text:?}: '*' is allowed only once, at the start or the end"),
        ));
    }
    Ok(())
}

fn ip_block(field: &str, raw: &IpBlockSpec) -> Result<IpBlock, Invalid> {
    let range = cidr(&format!("{field}.cidr"), &raw.cidr)?;
    let except = raw
        .except
        .iter()
        .enumerate()
        .map(|(i, text)| {
            let field = format!("{field}.except[{i}]");
            let except = cidr(&field, text)?;
            if !range.contains(&except) {
                return Err(invalid(field, format!("{except} is not inside {range}")));
            }
            Ok(except)
        })
        .collect::<Result<_, _>>()?;
    Ok(IpBlock {
        cidr: range,
        except,
    })
}

/// A CIDR, or a bare address for a single host; host bits are cleared.
fn cidr(field: &str, text: &str) -> Result<ipnet::IpNet, Invalid> {
    text.parse::<ipnet::IpNet>()
        .or_else(|_| text.parse::<IpAddr>().map(ipnet::IpNet::from))
        .map(|net| net.trunc())
        .map_err(|_| {
            invalid(
                field.into(),
                format!("invalid CIDR {text:?} (expected e.g. 10.0.0.0/8)"),
            )
        })
}

fn port_range(field: &str, raw: &PortSpec) -> Result<PortRange, Invalid> {
    let invalid = |text: String| {
        invalid(
            field.into(),
            format!("invalid port {text} (expected a port 1-65535 or a range \"8000-8100\")"),
        )
    };
    let port = |text: &str| text.trim().parse::<u16>().ok().filter(|p| *p != 0);
    let (start, end) = match raw {
        PortSpec::Number(n) => {
            let p = u16::try_from(*n)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| invalid(n.to_string()))?;
            (p, p)
        }
        PortSpec::Text(text) => {
            let (start, end) = text.split_once('-').unwrap_or((text, text));
            match (port(start), port(end)) {
                (Some(start), Some(end)) if start <= end => (start, end),
                _ => return Err(invalid(format!("{text:?}"))),
            }
        }
    };
    Ok(PortRange { start, end })
}

/// Kubernetes label keys (`[prefix/]name`) and values.
pub fn labels(
    field: &str,
    labels: BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, Invalid> {
    // Name part and value: at most 63 of [A-Za-z0-9-_.], alphanumeric at both ends.
    let segment_ok = |s: &str| {
        s.len() <= 63
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && s.chars().next().is_none_or(|c| c.is_ascii_alphanumeric())
            && s.chars().last().is_none_or(|c| c.is_ascii_alphanumeric())
    };
    for (key, value) in &labels {
        let (prefix, name) = key.rsplit_once('/').unwrap_or(("", key));
        let prefix_ok = prefix.len() <= 253
            && prefix
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.'));
        let key_ok = !name.is_empty()
            && segment_ok(name)
            && prefix_ok
            && (prefix.is_empty() != key.contains('/'));
        if !key_ok {
            return Err(invalid(
                format!("{field}.{key}"),
                format!("{key:?} is not a valid label key"),
            ));
        }
        if !segment_ok(value) {
            return Err(invalid(
                format!("{field}.{key}"),
                format!("{value:?} is not a valid label value"),
            ));
        }
    }
    Ok(labels)
}

/// Decodes `value` (found at `field`) as `T`, an error naming the field at fault
/// (`field.rules[0].toPorts[1]`). Read through serde_yaml (JSON is YAML) because its errors
/// carry the path of the field and serde_json's do not.
pub fn decode<T: serde::de::DeserializeOwned>(
    field: &str,
    value: &serde_json::Value,
) -> Result<T, Invalid> {
    let text = value.to_string();
    serde_yaml::from_str(&text).map_err(|e| {
        let message = e.to_string();
        // "at line 1 column 80" points into our re-encoding, not into the user's object.
        let message = message
            .rsplit_once(" at line ")
            .map_or(message.as_str(), |(m, _)| m);
        let join = |path: &str| match (field.is_empty(), path == ".") {
            (true, _) => path.to_owned(),
            (false, true) => field.to_owned(),
            (false, false) => format!("{field}.{path}"),
        };
        match message.split_once(": ") {
            Some((path, reason)) if !path.contains(' ') => invalid(join(path), reason.into()),
            _ => invalid(field.into(), message.into()),
        }
    })
}

pub fn name(field: &str, name: String) -> Result<String, Invalid> {
    let valid = !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
    if valid {
        Ok(name)
    } else {
        Err(invalid(
            field.into(),
            format!("{name:?} is not a valid name (lowercase letters, digits, '-', '.')"),
        ))
    }
}

pub fn port(field: &str, port: u16) -> Result<u16, Invalid> {
    if port == 0 {
        return Err(invalid(
            field.into(),
            "port must be between 1 and 65535".into(),
        ));
    }
    Ok(port)
}

fn invalid(field: String, reason: String) -> Invalid {
    Invalid { field, reason }
}
