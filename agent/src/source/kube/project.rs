//! API objects → the small items the caches keep: only the fields the snapshot uses, parsed
//! and validated once, when the object arrives. `Ok(None)` is an object the proxy has no use
//! for (an unscheduled or host-network pod, an FQDN slice); `Err` names the field.

use std::{collections::BTreeMap, net::IpAddr};

use k8s_openapi::{
    api::{
        core::v1::{Namespace, Pod, Secret, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::{apis::meta::v1::Time, util::intstr::IntOrString},
};
use kube::{ResourceExt, core::DynamicObject};
use serde::de::DeserializeOwned;

use serde_json::Value;

use super::crd::{
    AccessPolicySpec, ExternalServiceSpec, PeerAuthenticationSpec, TrafficPolicySpec,
};
use crate::{
    source::{
        external,
        gateway::{self, certificate, listeners},
        syntax::{self, Invalid, SelectorSpec},
        traffic,
    },
    state::{
        AccessPolicy, ExternalService, Gateway, HttpRoute, MtlsMode, TlsCertificate,
        TrafficDistribution, TrafficPolicy, WorkloadRef, WorkloadSelector,
        waypoint::USE_WAYPOINT_LABEL,
    },
};

/// A namespace: whether its pods are in the mesh, and the waypoint its services use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct NamespaceItem {
    pub enabled: bool,
    /// Its `weft.dev/use-waypoint` label.
    pub waypoint: Option<String>,
}

/// A pod, on this node or another.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct PodItem {
    /// The key of `NodePods`.
    pub uid: String,
    pub name: WorkloadRef,
    pub service_account: String,
    pub ips: Vec<IpAddr>,
    pub node: String,
    /// All labels: policy and PeerAuthentication selectors match them, and the opt-out
    /// label is one of them.
    pub labels: BTreeMap<String, String>,
    /// The ports of the pod's kubelet probes: plaintext from the node is let into a STRICT
    /// pod on these only.
    pub probe_ports: Vec<u16>,
}

/// One of weft's agent pods: the node it is on, and whether it runs there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct AgentItem {
    pub node: String,
    /// Phase `Running`: the node hosts an agent (one restarting keeps its pods enrolled).
    pub running: bool,
    /// Condition `Ready`: the agent may be elected to report unmeshed pods.
    pub ready: bool,
}

/// A service with a virtual IP (or a headless one, which has none).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct ServiceItem {
    pub name: WorkloadRef,
    pub vips: Vec<IpAddr>,
    /// TCP ports only: the proxy carries TCP.
    pub ports: Vec<ServicePortItem>,
    /// Its `weft.dev/use-waypoint` label, as written (`none` opts out of the namespace's).
    pub waypoint: Option<String>,
    /// Labelled `weft.dev/role: waypoint`: the service account of the waypoint it fronts.
    pub waypoint_account: Option<String>,
    /// `spec.trafficDistribution`, if weft knows the value.
    pub traffic_distribution: Option<TrafficDistribution>,
}

/// A route (`HTTPRoute` or `GRPCRoute`), valid, with what its status is written from.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct RouteItem {
    pub route: HttpRoute,
    /// The object as the API has it (its status echoes `spec.parentRefs`, keeps other
    /// controllers' `status.parents` and carries `metadata.generation`).
    pub object: Value,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct ServicePortItem {
    /// Matches the endpoint slices' port names (None for a service's single unnamed port).
    pub name: Option<String>,
    pub port: u16,
    pub target: TargetPort,
}

/// `spec.ports[].targetPort`: a number, or a container port name the slices resolve.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum TargetPort {
    Number(u16),
    Named(String),
}

/// An endpoint slice: ready endpoint addresses of one service, and their port numbers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct SliceItem {
    pub service: WorkloadRef,
    pub ports: Vec<(Option<String>, u16)>,
    pub addresses: Vec<IpAddr>,
}

/// A PeerAuthentication: the mode of its namespace, or of the workloads it selects.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct PeerAuthItem {
    pub namespace: String,
    /// None: the whole namespace.
    pub selector: Option<BTreeMap<String, String>>,
    pub mode: MtlsMode,
    pub status: StatusOf,
}

/// An AccessPolicy in force: the policy, or the fail-closed stand-in of one that cannot be
/// understood (`AccessPolicy::invalid` set).
#[derive(Clone, Debug, PartialEq)]
pub(super) struct PolicyItem {
    pub policy: AccessPolicy,
    pub status: StatusOf,
}

/// A TrafficPolicy: the version in force, and what its status writer needs of the object
/// as the API has it now. While the object is rejected, `policy` is its last good version
/// (`None` if it never had one) and the rest is the rejected version's.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct TrafficItem {
    pub policy: Option<TrafficPolicy>,
    /// `metadata.creationTimestamp`: the older policy wins a conflict.
    pub created: Option<Time>,
    pub status: StatusOf,
    /// `spec.targetRefs`, as written (the ancestors of a policy that cannot be read).
    pub target_refs: Vec<Value>,
    /// `status.ancestors`, as the API has them.
    pub ancestors: Vec<Value>,
}

/// What a weft resource's status says now, for the writer of its `Accepted` condition.
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct StatusOf {
    pub generation: Option<i64>,
    pub resource_version: Option<String>,
    /// `status.conditions`, as the API has them.
    pub conditions: Vec<Value>,
}

pub(super) fn namespace(namespace: Namespace) -> Result<Option<NamespaceItem>, Invalid> {
    let labels = namespace.labels();
    let enabled = labels.get(MESH_LABEL).map(String::as_str) == Some(ENABLED);
    let waypoint = waypoint_label(labels)?.filter(|w| w != NO_WAYPOINT);
    Ok(Some(NamespaceItem { enabled, waypoint }))
}

pub(super) fn pod(pod: Pod) -> Result<Option<PodItem>, Invalid> {
    let name = WorkloadRef::new(pod.namespace().unwrap_or_default(), pod.name_any());
    let uid = pod.uid().unwrap_or_default();
    let labels = pod.metadata.labels.unwrap_or_default();
    let spec = pod.spec.unwrap_or_default();
    let status = pod.status.unwrap_or_default();
    // A host-network pod shares the node's IP and network namespace: never meshed, and its
    // IP must not be mistaken for a pod's.
    if spec.host_network == Some(true) {
        return Ok(None);
    }
    // A finished pod's IP may already belong to a new pod.
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return Ok(None);
    }
    let ips = match status.pod_ips.filter(|ips| !ips.is_empty()) {
        Some(ips) => ips
            .iter()
            .enumerate()
            .map(|(i, ip)| syntax::ip(&format!("status.podIPs[{i}].ip"), &ip.ip))
            .collect::<Result<Vec<_>, _>>()?,
        None => match status.pod_ip.filter(|ip| !ip.is_empty()) {
            Some(ip) => vec![syntax::ip("status.podIP", &ip)?],
            None => Vec::new(),
        },
    };
    let node = spec.node_name.clone().unwrap_or_default();
    // Not scheduled yet: nothing to reach, nothing to enroll. A scheduled pod without an IP
    // is kept: on this node, the CNI plugin's ADD is waiting for it.
    if node.is_empty() || uid.is_empty() {
        return Ok(None);
    }
    let probe_ports = probe_ports(&spec);
    Ok(Some(PodItem {
        uid,
        name,
        service_account: spec
            .service_account_name
            .filter(|sa| !sa.is_empty())
            .unwrap_or_else(|| "default".into()),
        ips,
        node,
        labels,
        probe_ports,
    }))
}

/// An agent pod; `None` while unscheduled or once finished (it hosts nothing any more).
pub(super) fn agent(pod: Pod) -> Result<Option<AgentItem>, Invalid> {
    let node = pod.spec.and_then(|s| s.node_name).filter(|n| !n.is_empty());
    let status = pod.status.unwrap_or_default();
    let phase = status.phase.as_deref();
    let Some(node) = node.filter(|_| !matches!(phase, Some("Succeeded" | "Failed"))) else {
        return Ok(None);
    };
    let ready = status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    Ok(Some(AgentItem {
        node,
        running: phase == Some("Running"),
        ready,
    }))
}

/// The ports the kubelet's liveness, readiness and startup probes connect to (`httpGet`,
/// `tcpSocket`, `grpc`), a named port resolved among the container's ports; sorted, once.
fn probe_ports(spec: &k8s_openapi::api::core::v1::PodSpec) -> Vec<u16> {
    let mut ports = Vec::new();
    for container in &spec.containers {
        let named = |name: &str| {
            container
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name))
                .and_then(|p| u16::try_from(p.container_port).ok())
        };
        let resolve = |port: &IntOrString| match port {
            IntOrString::Int(n) => u16::try_from(*n).ok(),
            IntOrString::String(name) => named(name),
        };
        let probes = [
            &container.liveness_probe,
            &container.readiness_probe,
            &container.startup_probe,
        ];
        for probe in probes.into_iter().flatten() {
            let port = probe
                .http_get
                .as_ref()
                .and_then(|h| resolve(&h.port))
                .or_else(|| probe.tcp_socket.as_ref().and_then(|t| resolve(&t.port)))
                .or_else(|| probe.grpc.as_ref().and_then(|g| u16::try_from(g.port).ok()));
            ports.extend(port.filter(|p| *p != 0));
        }
    }
    ports.sort_unstable();
    ports.dedup();
    ports
}

pub(super) fn service(service: Service) -> Result<Option<ServiceItem>, Invalid> {
    let name = WorkloadRef::new(service.namespace().unwrap_or_default(), service.name_any());
    let spec = service.spec.unwrap_or_default();
    if spec.type_.as_deref() == Some("ExternalName") {
        return Ok(None);
    }
    let cluster_ips = match spec.cluster_ips.filter(|ips| !ips.is_empty()) {
        Some(ips) => ips,
        None => spec.cluster_ip.into_iter().collect(),
    };
    let vips = cluster_ips
        .iter()
        .enumerate()
        .filter(|(_, ip)| !ip.is_empty() && ip.as_str() != "None")
        .map(|(i, ip)| syntax::ip(&format!("spec.clusterIPs[{i}]"), ip))
        .collect::<Result<_, _>>()?;
    let mut ports = Vec::new();
    for (i, port) in spec.ports.unwrap_or_default().into_iter().enumerate() {
        if port.protocol.as_deref().is_some_and(|p| p != "TCP") {
            continue;
        }
        let number = port_number(&format!("spec.ports[{i}].port"), port.port)?;
        let target = match port.target_port {
            None => TargetPort::Number(number),
            Some(IntOrString::Int(n)) => {
                TargetPort::Number(port_number(&format!("spec.ports[{i}].targetPort"), n)?)
            }
            Some(IntOrString::String(name)) => TargetPort::Named(name),
        };
        ports.push(ServicePortItem {
            name: port.name.filter(|n| !n.is_empty()),
            port: number,
            target,
        });
    }
    let labels = service.metadata.labels.clone().unwrap_or_default();
    let waypoint = waypoint_label(&labels)?;
    let waypoint_account = match labels.get(ROLE_LABEL).map(String::as_str) {
        Some(ROLE_WAYPOINT) => {
            let annotation = service
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(SERVICE_ACCOUNT_ANNOTATION))
                .cloned();
            let field = format!("metadata.annotations.{SERVICE_ACCOUNT_ANNOTATION}");
            Some(match annotation {
                Some(account) => syntax::name(&field, account)?,
                None => name.name.clone(),
            })
        }
        _ => None,
    };
    let traffic_distribution = spec
        .traffic_distribution
        .as_deref()
        .and_then(TrafficDistribution::parse);
    Ok(Some(ServiceItem {
        name,
        vips,
        ports,
        waypoint,
        waypoint_account,
        traffic_distribution,
    }))
}

/// An `HTTPRoute`, validated by `source::gateway`.
pub(super) fn http_route(object: DynamicObject) -> Result<Option<RouteItem>, Invalid> {
    route(object, gateway::http_route)
}

/// A `GRPCRoute`, validated by `source::gateway`.
pub(super) fn grpc_route(object: DynamicObject) -> Result<Option<RouteItem>, Invalid> {
    route(object, gateway::grpc_route)
}

/// A `TLSRoute`, validated by `source::gateway`.
pub(super) fn tls_route(object: DynamicObject) -> Result<Option<RouteItem>, Invalid> {
    route(object, gateway::passthrough::tls_route)
}

/// A `TCPRoute`, validated by `source::gateway`.
pub(super) fn tcp_route(object: DynamicObject) -> Result<Option<RouteItem>, Invalid> {
    route(object, gateway::passthrough::tcp_route)
}

// The kind comes from the watch, not the object: list items may leave `kind` out.
fn route(
    object: DynamicObject,
    convert: fn(&str, &Value, &str) -> Result<HttpRoute, Invalid>,
) -> Result<Option<RouteItem>, Invalid> {
    let object = reencode(&object)?;
    let namespace = object["metadata"]["namespace"].as_str().unwrap_or_default();
    let route = convert("", &object, namespace)?;
    Ok(Some(RouteItem { route, object }))
}

/// The Gateway a gateway serves, validated by `source::gateway::listeners`; `Ok(None)`:
/// of another class, not in the cache.
pub(super) fn gateway(object: DynamicObject) -> Result<Option<Option<Gateway>>, Invalid> {
    let mut object = reencode(&object)?;
    // The kind comes from the watch: list items may leave it out.
    object["apiVersion"] = gateway::API_VERSION.into();
    object["kind"] = "Gateway".into();
    let namespace = object["metadata"]["namespace"].as_str().unwrap_or_default();
    Ok(listeners::gateway("", &object, namespace)?.map(Some))
}

/// A Secret a gateway reads, validated by `source::gateway::certificate`.
pub(super) fn tls_secret(secret: Secret) -> Result<Option<Option<TlsCertificate>>, Invalid> {
    let namespace = secret.namespace().unwrap_or_default();
    let object = reencode(&secret)?;
    Ok(Some(Some(certificate::certificate(
        "", &object, &namespace,
    )?)))
}

fn reencode(object: &impl serde::Serialize) -> Result<Value, Invalid> {
    serde_json::to_value(object).map_err(|e| Invalid {
        field: "metadata".into(),
        reason: format!("BUG: cannot re-encode the object: {e}"),
    })
}

/// The `weft.dev/use-waypoint` label of an object, a valid name if set.
fn waypoint_label(labels: &BTreeMap<String, String>) -> Result<Option<String>, Invalid> {
    labels
        .get(USE_WAYPOINT_LABEL)
        .map(|w| syntax::name(&format!("metadata.labels.{USE_WAYPOINT_LABEL}"), w.clone()))
        .transpose()
}

pub(super) fn endpoint_slice(slice: EndpointSlice) -> Result<Option<SliceItem>, Invalid> {
    if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
        return Ok(None);
    }
    let Some(service) = slice.labels().get(SERVICE_NAME_LABEL).cloned() else {
        return Ok(None);
    };
    let service = WorkloadRef::new(slice.namespace().unwrap_or_default(), service);
    let mut ports = Vec::new();
    for (i, port) in slice.ports.unwrap_or_default().into_iter().enumerate() {
        if port.protocol.as_deref().is_some_and(|p| p != "TCP") {
            continue;
        }
        // No port number means "all ports", which only headless selectorless slices use.
        let Some(number) = port.port else { continue };
        let number = port_number(&format!("ports[{i}].port"), number)?;
        ports.push((port.name.filter(|n| !n.is_empty()), number));
    }
    let mut addresses = Vec::new();
    for (i, endpoint) in slice.endpoints.iter().enumerate() {
        // Unset readiness means ready (the EndpointSlice API's rule).
        let ready = endpoint.conditions.as_ref().and_then(|c| c.ready) != Some(false);
        if !ready {
            continue;
        }
        for (j, address) in endpoint.addresses.iter().enumerate() {
            addresses.push(syntax::ip(
                &format!("endpoints[{i}].addresses[{j}]"),
                address,
            )?);
        }
    }
    Ok(Some(SliceItem {
        service,
        ports,
        addresses,
    }))
}

pub(super) fn access_policy(object: DynamicObject) -> Result<Option<PolicyItem>, Invalid> {
    let name = WorkloadRef::new(object.namespace().unwrap_or_default(), object.name_any());
    let spec: AccessPolicySpec = spec_of(&object)?;
    let parts = syntax::AccessPolicyParts {
        selector: spec.selector,
        target_refs: spec.target_refs,
        action: spec.action,
        rules: spec.rules,
    };
    let policy = syntax::access_policy("spec", name, parts)?;
    Ok(Some(PolicyItem {
        policy,
        status: StatusOf::of(&object),
    }))
}

/// The stand-in of an AccessPolicy that cannot be understood: a DENY of everything for the
/// workloads its selector picks, or for its whole namespace when the selector cannot be
/// read either. Whatever its action: an unreadable ALLOW must not open what it guarded,
/// and an unreadable DENY must not open what it closed.
pub(super) fn access_policy_stand_in(object: &DynamicObject, invalid: &Invalid) -> PolicyItem {
    let namespace = object.namespace().unwrap_or_default();
    let selector = WorkloadSelector {
        namespace: namespace.clone(),
        match_labels: readable_selector(object).unwrap_or_default(),
    };
    let name = WorkloadRef::new(namespace, object.name_any());
    PolicyItem {
        policy: AccessPolicy::fail_closed(name, selector, invalid.to_string()),
        status: StatusOf::of(object),
    }
}

pub(super) fn peer_authentication(object: DynamicObject) -> Result<Option<PeerAuthItem>, Invalid> {
    let spec: PeerAuthenticationSpec = spec_of(&object)?;
    let selector = spec
        .selector
        .map(|s| syntax::labels("spec.selector.matchLabels", s.match_labels))
        .transpose()?
        // An empty selector selects the whole namespace, as no selector does.
        .filter(|labels| !labels.is_empty());
    Ok(Some(PeerAuthItem {
        namespace: object.namespace().unwrap_or_default(),
        selector,
        mode: spec.mtls.mode,
        status: StatusOf::of(&object),
    }))
}

/// The stand-in of a PeerAuthentication that cannot be understood: STRICT, the strictest
/// mode, for the workloads its selector picks, or for its whole namespace when the selector
/// cannot be read either. Plaintext never reaches a workload because of a typo.
pub(super) fn peer_authentication_stand_in(object: &DynamicObject, _: &Invalid) -> PeerAuthItem {
    PeerAuthItem {
        namespace: object.namespace().unwrap_or_default(),
        selector: readable_selector(object).filter(|labels| !labels.is_empty()),
        mode: MtlsMode::Strict,
        status: StatusOf::of(object),
    }
}

/// A `TrafficPolicy`, validated by `source::traffic`.
pub(super) fn traffic_policy(object: DynamicObject) -> Result<Option<TrafficItem>, Invalid> {
    let name = WorkloadRef::new(object.namespace().unwrap_or_default(), object.name_any());
    let spec: TrafficPolicySpec = spec_of(&object)?;
    let policy = traffic::policy("spec", name, spec)?;
    Ok(Some(TrafficItem {
        policy: Some(policy),
        ..TrafficItem::of(&object)
    }))
}

/// A rejected `TrafficPolicy` as the object says of itself, nothing in force yet
/// (`traffic_policy_last_good` adds its last good version).
pub(super) fn traffic_policy_stand_in(object: &DynamicObject, _: &Invalid) -> TrafficItem {
    TrafficItem::of(object)
}

/// What stays of a rejected `TrafficPolicy`: the version the item it replaces had in force
/// (its last good version), with what the rejected version says of itself.
pub(super) fn traffic_policy_last_good(
    stand_in: TrafficItem,
    replaced: Option<TrafficItem>,
) -> TrafficItem {
    TrafficItem {
        policy: replaced.and_then(|item| item.policy),
        ..stand_in
    }
}

/// An `ExternalService`, validated by `source::external`; while the object is rejected,
/// `service` is `None` (left out of the snapshot, never its last good version) and the
/// status is the rejected version's.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct ExternalItem {
    pub service: Option<ExternalService>,
    pub status: StatusOf,
}

pub(super) fn external_service(object: DynamicObject) -> Result<Option<ExternalItem>, Invalid> {
    let name = WorkloadRef::new(object.namespace().unwrap_or_default(), object.name_any());
    let spec: ExternalServiceSpec = spec_of(&object)?;
    let service = external::service("spec", name, spec)?;
    Ok(Some(ExternalItem {
        service: Some(service),
        status: StatusOf::of(&object),
    }))
}

/// What stands in for an `ExternalService` that cannot be understood: nothing in force,
/// only its status. Left out, its hosts are not registered: under `REGISTRY_ONLY` they are
/// refused, which fails closed, and no agent keeps a version the others may not have.
pub(super) fn external_service_stand_in(object: &DynamicObject, _: &Invalid) -> ExternalItem {
    ExternalItem {
        service: None,
        status: StatusOf::of(object),
    }
}

impl TrafficItem {
    /// `object`'s item, with nothing in force.
    fn of(object: &DynamicObject) -> Self {
        let list = |value: Option<&Value>, key: &str| {
            value
                .and_then(|v| v.get(key))
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
        };
        Self {
            policy: None,
            created: object.metadata.creation_timestamp.clone(),
            status: StatusOf::of(object),
            target_refs: list(object.data.get("spec"), "targetRefs"),
            ancestors: list(object.data.get("status"), "ancestors"),
        }
    }
}

impl StatusOf {
    fn of(object: &DynamicObject) -> Self {
        Self {
            generation: object.metadata.generation,
            resource_version: object.metadata.resource_version.clone(),
            conditions: object
                .data
                .get("status")
                .and_then(|s| s.get("conditions"))
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default(),
        }
    }
}

/// The labels of a weft resource's `spec.selector` (empty when it has none: the whole
/// namespace); `None` when they cannot be read.
fn readable_selector(object: &DynamicObject) -> Option<BTreeMap<String, String>> {
    let field = "spec.selector";
    match object.data.get("spec").and_then(|s| s.get("selector")) {
        None | Some(Value::Null) => Some(BTreeMap::new()),
        Some(raw) => {
            let selector: SelectorSpec = syntax::decode(field, raw).ok()?;
            syntax::labels("spec.selector.matchLabels", selector.match_labels).ok()
        }
    }
}

/// The `spec` of a weft resource as `S`, errors naming the field (`spec.rules[0]`).
fn spec_of<S: DeserializeOwned>(object: &DynamicObject) -> Result<S, Invalid> {
    let Some(spec) = object.data.get("spec") else {
        return Err(Invalid {
            field: "spec".into(),
            reason: "missing".into(),
        });
    };
    syntax::decode("spec", spec)
}

fn port_number(field: &str, port: i32) -> Result<u16, Invalid> {
    u16::try_from(port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| Invalid {
            field: field.into(),
            reason: format!("{port} is not a port (1-65535)"),
        })
}

/// The enrollment label of namespaces (`enabled`) and pods (`disabled` opts out).
pub(super) const MESH_LABEL: &str = "weft.dev/mesh";
pub(super) const ENABLED: &str = "enabled";
pub(super) const DISABLED: &str = "disabled";
/// The `weft.dev/use-waypoint` value of a Service that opts out of its namespace's.
pub(super) const NO_WAYPOINT: &str = "none";
/// The label that makes a Service the front of a waypoint.
pub(super) const ROLE_LABEL: &str = "weft.dev/role";
const ROLE_WAYPOINT: &str = "waypoint";
/// The annotation naming a waypoint's service account (default: the Service's name).
pub(super) const SERVICE_ACCOUNT_ANNOTATION: &str = "weft.dev/service-account";
/// The label that ties an EndpointSlice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
