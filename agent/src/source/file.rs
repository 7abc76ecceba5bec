//! The local YAML file source: parses and validates the whole file into the start-up
//! `agent:` section and a `state::Snapshot` (workloads, services, access policies,
//! waypoints and their bindings, Gateway API routes), then polls the file and publishes
//! each valid change. Field paths in errors follow the YAML (`workloads[1].ips[0]`,
//! `policies[2].rules[0].from[1].ipBlocks[0].cidr`, `routes[0].spec.rules[1].matches[0]`).
//!
//! `routes:` items are `HTTPRoute` and `GRPCRoute` objects as their Kubernetes manifests
//! write them, read by `source::gateway` as the Kubernetes source reads them; so are
//! `gateways:` (`Gateway` objects; one of another class is left out, silently: it is
//! someone else's) and `secrets:` (`Secret`s of type `kubernetes.io/tls`, with `data` in
//! base64 or `stringData`; every one of them is read, and an HTTPS listener naming a
//! certificate the file does not hold is an error).
//! `externalServices:` items are an `ExternalService`'s spec with `name` and `namespace`,
//! checked by `source::external` as the Kubernetes source checks the resource.
//! `namespaces: [{name, waypoint}]` binds every service of a namespace to a waypoint, as
//! the Namespace label does in Kubernetes; a service's own `waypoint` wins, and
//! `waypoint: none` opts it out.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::Deserialize;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::{
    settings::{AgentSection, Error},
    source::{
        SourceStatus, external, gateway,
        kube::crd::{ExternalPortSpec, ExternalServiceSpec},
        syntax::{self, Invalid, RuleSpec, SelectorSpec, TargetRefSpec},
        traffic,
    },
    state::{
        AccessLogSettings, AccessPolicy, Action, ExternalService, Gateway, HttpRoute, Location,
        MeshSettings, MtlsMode, MtlsSettings, OutboundMode, Resolution, RouteKind, SameNode,
        Service, ServicePort, Snapshot, TlsCertificate, TrafficDistribution, TrafficPolicy,
        Waypoint, Workload, WorkloadRef,
    },
};

/// A parsed and validated config file.
#[derive(Clone, Debug, PartialEq)]
pub struct FileDoc {
    /// Start-up settings (a change needs a restart).
    pub agent: AgentSection,
    /// Everything else.
    pub snapshot: Snapshot,
}

/// Reads and validates the file.
pub fn load(path: &Path) -> Result<FileDoc, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(path, &text)
}

/// Validates `text` as the contents of `path`.
pub fn parse(path: &Path, text: &str) -> Result<FileDoc, Error> {
    let raw: RawFile = serde_yaml::from_str(text).map_err(|source| Error::Parse {
        path: path.to_owned(),
        source,
    })?;
    validate(path, raw)
}

/// Reads and validates the file of an agent whose state comes from the Kubernetes API: it
/// may hold the `agent:` and `mesh:` sections only (`workloads`, `services` and `policies`
/// are an error naming the section). The snapshot it returns has the mesh settings only.
pub fn load_settings(path: &Path) -> Result<FileDoc, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_settings(path, &text)
}

/// `load_settings` of `text` as the contents of `path`.
pub fn parse_settings(path: &Path, text: &str) -> Result<FileDoc, Error> {
    let raw: RawFile = serde_yaml::from_str(text).map_err(|source| Error::Parse {
        path: path.to_owned(),
        source,
    })?;
    let sections = [
        ("workloads", raw.workloads.is_empty(), "pods"),
        (
            "services",
            raw.services.is_empty(),
            "Services and EndpointSlices",
        ),
        (
            "policies",
            raw.policies.is_empty(),
            "AccessPolicy resources",
        ),
        (
            "waypoints",
            raw.waypoints.is_empty(),
            "Services labelled weft.dev/role=waypoint",
        ),
        (
            "namespaces",
            raw.namespaces.is_empty(),
            "Namespace labels (weft.dev/use-waypoint)",
        ),
        ("routes", raw.routes.is_empty(), "Gateway API routes"),
        ("gateways", raw.gateways.is_empty(), "Gateway API Gateways"),
        ("secrets", raw.secrets.is_empty(), "Secrets"),
        (
            "trafficPolicies",
            raw.traffic_policies.is_empty(),
            "TrafficPolicy resources",
        ),
        (
            "externalServices",
            raw.external_services.is_empty(),
            "ExternalService resources",
        ),
    ];
    for (field, empty, from) in sections {
        if !empty {
            return Err(Error::Invalid {
                path: path.to_owned(),
                field: field.into(),
                reason: format!(
                    "not allowed with --source kubernetes: {from} come from the Kubernetes \
                     API (remove this section)"
                ),
            });
        }
    }
    validate(path, raw)
}

fn validate(path: &Path, raw: RawFile) -> Result<FileDoc, Error> {
    let node = raw
        .agent
        .node
        .clone()
        .unwrap_or_else(crate::settings::node_name);
    Validator { path, node: &node }.file(raw)
}

/// Polls `path` and publishes every valid change to `tx`; rejects invalid ones, keeping the
/// last good snapshot. Runs until `tx` has no receivers.
pub async fn watch(
    path: PathBuf,
    interval: Duration,
    started_with: FileDoc,
    tx: watch::Sender<Arc<Snapshot>>,
    status: Arc<SourceStatus>,
) {
    // Compared by content, not mtime: editors and ConfigMap mounts swap files by rename.
    // The first read may already differ from what start-up parsed, hence no initial text.
    let mut last_text: Option<String> = None;
    // A change is taken only once two reads one interval apart agree: a file written in
    // place (truncated, then written) must not be applied half written, or empty, which is
    // a valid file without workloads, services or policies.
    let mut unsettled: Option<String> = None;
    let mut ticker = tokio::time::interval(interval);
    // Delay, not Skip: reads stay at least one interval apart after a late tick, as the
    // two-reads rule needs.
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        if tx.is_closed() {
            return;
        }
        let text = match tokio::fs::read_to_string(&path).await {
            Ok(text) => text,
            Err(e) => {
                // Kept quiet after the first report: editors replace files by rename.
                if last_text.take().is_some() {
                    warn!(component = "config", path = %path.display(), error = %e,
                        "config file unreadable; keeping the last good config");
                }
                continue;
            }
        };
        if last_text.as_deref() == Some(text.as_str()) {
            unsettled = None;
            continue;
        }
        if unsettled.as_deref() != Some(text.as_str()) {
            unsettled = Some(text);
            continue;
        }
        unsettled = None;
        last_text = Some(text.clone());
        match parse(&path, &text) {
            Ok(doc) => {
                note_restart_pending(&path, &started_with.agent, &doc.agent, &status);
                if *tx.borrow().as_ref() == doc.snapshot {
                    // Same state (first read, or a change of comments, order or the agent:
                    // section only).
                    if status.view().last_rejection.is_some() {
                        status.recovered();
                    }
                    continue;
                }
                info!(component = "config", path = %path.display(),
                    workloads = doc.snapshot.workloads.len(),
                    services = doc.snapshot.services.len(),
                    policies = doc.snapshot.policies.len(),
                    routes = doc.snapshot.routes.len(),
                    gateways = doc.snapshot.gateways.len(), "config reloaded");
                tx.send_replace(Arc::new(doc.snapshot));
                // After the new state is visible: whoever sees the new generation sees it.
                status.accepted();
            }
            Err(e) => {
                status.rejected(&e);
                error!(component = "config", path = %path.display(), error = %e,
                    "config rejected; keeping the last good config");
            }
        }
    }
}

/// Records (and logs, once per change) which `agent:` fields differ from those in force:
/// they are start-up settings, read at reload but applied only by a restart.
fn note_restart_pending(
    path: &Path,
    in_force: &AgentSection,
    read: &AgentSection,
    status: &SourceStatus,
) {
    let changed = in_force.changed_fields(read);
    if changed == status.view().restart_pending {
        return;
    }
    if changed.is_empty() {
        info!(component = "config", path = %path.display(),
            "the agent: section is again the one in force; no restart pending");
    } else {
        warn!(component = "config", path = %path.display(), fields = ?changed,
            "the agent: section changed; it takes effect after a restart");
    }
    status.set_restart_pending(changed);
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
// The schema lists every field for the bad-field test (source/file/bad_fields.rs).
#[cfg_attr(test, derive(schemars::JsonSchema))]
struct RawFile {
    #[serde(default)]
    agent: AgentSection,
    #[serde(default)]
    mesh: RawMesh,
    #[serde(default)]
    workloads: Vec<RawWorkload>,
    #[serde(default)]
    services: Vec<RawService>,
    #[serde(default)]
    policies: Vec<RawPolicy>,
    #[serde(default)]
    waypoints: Vec<RawWaypoint>,
    /// Namespace-wide settings (the waypoint binding).
    #[serde(default)]
    namespaces: Vec<RawNamespace>,
    /// `HTTPRoute` and `GRPCRoute` objects, as their manifests.
    #[serde(default)]
    routes: Vec<serde_json::Value>,
    /// `Gateway` objects, as their manifests (those of class `weft` are read).
    #[serde(default)]
    gateways: Vec<serde_json::Value>,
    /// `Secret` objects of type `kubernetes.io/tls`, as their manifests.
    #[serde(default)]
    secrets: Vec<serde_json::Value>,
    /// `TrafficPolicy` objects, as their manifests; the first listed counts as the oldest.
    #[serde(default)]
    traffic_policies: Vec<serde_json::Value>,
    /// Services outside the mesh, registered by name.
    #[serde(default)]
    external_services: Vec<RawExternalService>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[cfg_attr(test, derive(schemars::JsonSchema))]
struct RawNamespace {
    name: String,
    /// The waypoint every service of the namespace goes through, unless the service says
    /// otherwise.
    waypoint: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[cfg_attr(test, derive(schemars::JsonSchema))]
struct RawMesh {
    #[serde(default)]
    excluded_ports: Vec<u16>,
    #[serde(default)]
    excluded_cidrs: Vec<String>,
    #[serde(default)]
    mtls: RawMtls,
    #[serde(default)]
    default_deny: bool,
    #[serde(default)]
    access_log: RawAccessLog,
    #[serde(default)]
    same_node: SameNode,
    #[serde(default)]
    outbound_traffic_policy: RawOutboundTrafficPolicy,
}

/// Istio's `meshConfig.outboundTrafficPolicy`.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[cfg_attr(test, derive(schemars::JsonSchema))]
struct RawOutboundTrafficPolicy {
    #[serde(default)]
    mode: OutboundMode,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[cfg_attr(test, derive(schemars::JsonSchema))]
struct RawAccessLog {
    #[serde(default = "enabled_by_default")]
    enabled: bool,
    #[serde(default)]
    namespaces: BTreeMap<String, bool>,
}

impl Default for RawAccessLog {
    fn default() -> Self {
        Self {
            enabled: true,
            namespaces: BTreeMap::new(),
        }
    }
}

fn enabled_by_default() -> bool {
    true
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[cfg_attr(test, derive(schemars::JsonSchema))]
struct RawMtls {
    mode: Option<MtlsMode>,
    #[serde(default)]
    namespaces: BTreeMap<String, MtlsMode>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[cfg_attr(test, derive(schemars::JsonSchema))]
struct RawWorkload {
    name: String,
    namespace: Option<String>,
    service_account: Option<String>,
    #[serde(default)]
    ips: Vec<String>,
    netns: Option<PathBuf>,
    /// Instead of `netns`: the Kubernetes pod UID; the pod becomes local once the node
    /// learns its netns (CNI ADD or discovery).
    pod_uid: Option<String>,
    /// With `pod_uid`: the ports the kubelet's probes use.
    #[serde(default)]
    probe_ports: Vec<u16>,
    node: Option<String>,
    enrolled: Option<bool>,
    mtls_mode: Option<MtlsMode>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[cfg_attr(test, derive(schemars::JsonSchema))]
struct RawService {
    name: String,
    namespace: Option<String>,
    #[serde(default)]
    vips: Vec<String>,
    #[serde(default)]
    ports: Vec<RawServicePort>,
    #[serde(default)]
    endpoints: Vec<String>,
    /// The waypoint (in the service's namespace) its traffic goes through; `none`: not
    /// its namespace's either.
    waypoint: Option<String>,
    /// Kubernetes' `spec.trafficDistribution`: `PreferClose`.
    traffic_distribution: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[cfg_attr(test, derive(schemars::JsonSchema))]
struct RawWaypoint {
    name: String,
    namespace: Option<String>,
    /// Default: the waypoint's name.
    service_account: Option<String>,
    /// Ready waypoint pods (HBONE on 15008); empty means not ready.
    #[serde(default)]
    ips: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[cfg_attr(test, derive(schemars::JsonSchema))]
struct RawServicePort {
    port: u16,
    target_port: Option<u16>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[cfg_attr(test, derive(schemars::JsonSchema))]
struct RawPolicy {
    name: String,
    namespace: Option<String>,
    #[serde(default)]
    selector: SelectorSpec,
    #[serde(default)]
    target_refs: Vec<TargetRefSpec>,
    action: Action,
    #[serde(default)]
    rules: Vec<RuleSpec>,
}

/// An `ExternalService`'s spec with its name and namespace (`source::external` checks it).
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[cfg_attr(test, derive(schemars::JsonSchema))]
struct RawExternalService {
    name: String,
    namespace: Option<String>,
    hosts: Vec<String>,
    #[serde(default)]
    resolution: Resolution,
    #[serde(default)]
    addresses: Vec<String>,
    ports: Vec<ExternalPortSpec>,
}

struct Validator<'a> {
    path: &'a Path,
    /// This node's name: workloads naming another node are remote.
    node: &'a str,
}

impl Validator<'_> {
    /// Validates each item of the list `key` (fields `key[i]`) into a map by name; a
    /// second item of the same name is an error naming it.
    fn named_list<R, T>(
        &self,
        key: &str,
        what: &str,
        raws: Vec<R>,
        validate: impl Fn(&str, R) -> Result<(WorkloadRef, T), Error>,
    ) -> Result<BTreeMap<WorkloadRef, T>, Error> {
        let mut items = BTreeMap::new();
        for (i, raw) in raws.into_iter().enumerate() {
            let field = format!("{key}[{i}]");
            let (name, item) = validate(&field, raw)?;
            if items.contains_key(&name) {
                return Err(
                    self.invalid(format!("{field}.name"), format!("duplicate {what} {name}"))
                );
            }
            items.insert(name, item);
        }
        Ok(items)
    }

    fn file(&self, raw: RawFile) -> Result<FileDoc, Error> {
        let mesh = self.mesh(raw.mesh)?;
        let mut workloads = BTreeMap::new();
        let mut owner_of_ip: HashMap<IpAddr, WorkloadRef> = HashMap::new();
        let mut owner_of_uid: HashMap<String, WorkloadRef> = HashMap::new();
        for (i, raw) in raw.workloads.into_iter().enumerate() {
            let field = format!("workloads[{i}]");
            let workload = self.workload(&field, raw)?;
            if let Some(uid) = workload.pod_uid()
                && let Some(other) = owner_of_uid.insert(uid.to_owned(), workload.name.clone())
            {
                return Err(self.invalid(
                    format!("{field}.podUid"),
                    format!("{uid} is already the UID of workload {other}"),
                ));
            }
            for (j, ip) in workload.ips.iter().enumerate() {
                if let Some(other) = owner_of_ip.insert(*ip, workload.name.clone()) {
                    return Err(self.invalid(
                        format!("{field}.ips[{j}]"),
                        format!("{ip} is already the IP of workload {other}"),
                    ));
                }
            }
            if workloads.contains_key(&workload.name) {
                return Err(self.invalid(
                    format!("{field}.name"),
                    format!("duplicate workload {}", workload.name),
                ));
            }
            workloads.insert(workload.name.clone(), workload);
        }
        let mut namespace_waypoints = BTreeMap::new();
        for (i, ns) in raw.namespaces.into_iter().enumerate() {
            let field = format!("namespaces[{i}]");
            let name = self.name(&format!("{field}.name"), ns.name)?;
            // `none` binds nothing, as the Namespace label's value does in Kubernetes.
            let waypoint = ns
                .waypoint
                .filter(|w| w != NO_WAYPOINT)
                .map(|w| self.name(&format!("{field}.waypoint"), w))
                .transpose()?;
            if namespace_waypoints.insert(name.clone(), waypoint).is_some() {
                return Err(self.invalid(
                    format!("{field}.name"),
                    format!("duplicate namespace {name}"),
                ));
            }
        }
        let mut services = self.named_list("services", "service", raw.services, |field, raw| {
            self.service(field, raw).map(|s| (s.name.clone(), s))
        })?;
        for service in services.values_mut() {
            // The service's own binding wins; `none` opts out of its namespace's.
            service.waypoint = match service.waypoint.take() {
                Some(w) if w == NO_WAYPOINT => None,
                Some(w) => Some(w),
                None => namespace_waypoints
                    .get(&service.name.namespace)
                    .cloned()
                    .flatten(),
            };
        }
        let routes = self.routes(raw.routes)?;
        let tls_certificates = self.objects("secrets", "Secret", &raw.secrets, |field, raw| {
            let certificate = gateway::certificate::certificate(field, raw, DEFAULT)?;
            Ok(Some((certificate.name.clone(), certificate)))
        })?;
        let gateways = self.objects("gateways", "Gateway", &raw.gateways, |field, raw| {
            let gateway = gateway::listeners::gateway(field, raw, DEFAULT)?;
            Ok(gateway.map(|g| (g.name.clone(), g)))
        })?;
        self.certificates_exist(&raw.gateways, &gateways, &tls_certificates)?;
        let traffic_policies = self.traffic_policies(raw.traffic_policies)?;
        let external_services = self.external_services(raw.external_services)?;
        let policies = self.named_list("policies", "policy", raw.policies, |field, raw| {
            self.policy(field, raw).map(|p| (p.name.clone(), p))
        })?;
        let waypoints = self.named_list("waypoints", "waypoint", raw.waypoints, |field, raw| {
            self.waypoint(field, raw).map(|w| (w.name.clone(), w))
        })?;
        Ok(FileDoc {
            agent: raw.agent,
            snapshot: Snapshot {
                mesh,
                workloads,
                services,
                policies,
                waypoints,
                routes,
                traffic_policies,
                external_services,
                gateways,
                tls_certificates,
                resolved_hosts: Default::default(),
                mesh_namespaces: None,
                index: Default::default(),
            },
        })
    }

    fn mesh(&self, raw: RawMesh) -> Result<MeshSettings, Error> {
        for (i, port) in raw.excluded_ports.iter().enumerate() {
            self.port(&format!("mesh.excludedPorts[{i}]"), *port)?;
        }
        let excluded_cidrs = raw
            .excluded_cidrs
            .iter()
            .enumerate()
            .map(|(i, text)| {
                text.parse::<ipnet::IpNet>().map_err(|_| {
                    self.invalid(
                        format!("mesh.excludedCidrs[{i}]"),
                        format!("invalid CIDR {text:?} (expected e.g. 10.0.0.0/8)"),
                    )
                })
            })
            .collect::<Result<_, _>>()?;
        for namespace in raw.access_log.namespaces.keys() {
            self.name(
                &format!("mesh.accessLog.namespaces.{namespace}"),
                namespace.clone(),
            )?;
        }
        for namespace in raw.mtls.namespaces.keys() {
            self.name(
                &format!("mesh.mtls.namespaces.{namespace}"),
                namespace.clone(),
            )?;
        }
        Ok(MeshSettings {
            excluded_ports: raw.excluded_ports,
            excluded_cidrs,
            mtls: MtlsSettings {
                default_mode: raw.mtls.mode.unwrap_or_default(),
                namespaces: raw.mtls.namespaces,
            },
            default_deny: raw.default_deny,
            access_log: AccessLogSettings {
                enabled: raw.access_log.enabled,
                namespaces: raw.access_log.namespaces,
            },
            same_node: raw.same_node,
            outbound: raw.outbound_traffic_policy.mode,
        })
    }

    fn workload(&self, field: &str, raw: RawWorkload) -> Result<Workload, Error> {
        let name = self.object_ref(field, raw.name, raw.namespace)?;
        let service_account = self.name(
            &format!("{field}.serviceAccount"),
            raw.service_account.unwrap_or_else(|| DEFAULT.into()),
        )?;
        if raw.ips.is_empty() {
            return Err(self.invalid(format!("{field}.ips"), "at least one IP is required".into()));
        }
        let ips = self.ips(&format!("{field}.ips"), &raw.ips)?;
        let enrolled = raw.enrolled.unwrap_or(true);
        if !raw.probe_ports.is_empty() && raw.pod_uid.is_none() {
            return Err(self.invalid(
                format!("{field}.probePorts"),
                "only for a pod known by podUid (kubelet probes come with Kubernetes pods)".into(),
            ));
        }
        for (i, port) in raw.probe_ports.iter().enumerate() {
            self.port(&format!("{field}.probePorts[{i}]"), *port)?;
        }
        let location = match (raw.node, raw.netns, raw.pod_uid) {
            (Some(node), _, _) if node != self.node => Location::Remote { node },
            (_, Some(_), Some(_)) => {
                return Err(self.invalid(
                    format!("{field}.podUid"),
                    "set either netns or podUid, not both".into(),
                ));
            }
            (_, None, Some(uid)) => Location::Pod {
                uid: self.pod_uid(&format!("{field}.podUid"), uid)?,
                netns: None,
                probe_ports: raw.probe_ports,
            },
            (_, Some(netns), None) => {
                // Only enrolled pods are entered; checking here turns a typo into a rejected
                // file instead of a pod that silently stays out of the mesh.
                if enrolled && !netns.exists() {
                    return Err(self.invalid(
                        format!("{field}.netns"),
                        format!("{} does not exist", netns.display()),
                    ));
                }
                Location::Local { netns }
            }
            (_, None, None) => {
                return Err(self.invalid(
                    format!("{field}.netns"),
                    "required for a pod on this node (or set `podUid`, or `node` to the node it runs on)".into(),
                ));
            }
        };
        Ok(Workload {
            name,
            service_account,
            ips,
            location,
            enrolled,
            mtls_mode: raw.mtls_mode,
            labels: self.labels(&format!("{field}.labels"), raw.labels)?,
        })
    }

    fn policy(&self, field: &str, raw: RawPolicy) -> Result<AccessPolicy, Error> {
        let name = self.object_ref(field, raw.name, raw.namespace)?;
        let parts = syntax::AccessPolicyParts {
            selector: raw.selector,
            target_refs: raw.target_refs,
            action: raw.action,
            rules: raw.rules,
        };
        syntax::access_policy(field, name, parts).map_err(|e| self.error(e))
    }

    fn labels(
        &self,
        field: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<BTreeMap<String, String>, Error> {
        syntax::labels(field, labels).map_err(|e| self.error(e))
    }

    fn service(&self, field: &str, raw: RawService) -> Result<Service, Error> {
        let name = self.object_ref(field, raw.name, raw.namespace)?;
        let ports = raw
            .ports
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let port = self.port(&format!("{field}.ports[{i}].port"), p.port)?;
                let target_port = self.port(
                    &format!("{field}.ports[{i}].targetPort"),
                    p.target_port.unwrap_or(p.port),
                )?;
                Ok(ServicePort { port, target_port })
            })
            .collect::<Result<_, Error>>()?;
        Ok(Service {
            name,
            vips: self.ips(&format!("{field}.vips"), &raw.vips)?,
            ports,
            endpoints: self.ips(&format!("{field}.endpoints"), &raw.endpoints)?,
            waypoint: raw
                .waypoint
                .map(|w| self.name(&format!("{field}.waypoint"), w))
                .transpose()?,
            traffic_distribution: raw
                .traffic_distribution
                .map(|value| {
                    TrafficDistribution::parse(&value).ok_or_else(|| {
                        self.invalid(
                            format!("{field}.trafficDistribution"),
                            format!("{value:?}: expected \"PreferClose\""),
                        )
                    })
                })
                .transpose()?,
        })
    }

    fn waypoint(&self, field: &str, raw: RawWaypoint) -> Result<Waypoint, Error> {
        let name = self.object_ref(field, raw.name, raw.namespace)?;
        let service_account = self.name(
            &format!("{field}.serviceAccount"),
            raw.service_account.unwrap_or_else(|| name.name.clone()),
        )?;
        Ok(Waypoint {
            name,
            service_account,
            addresses: self.ips(&format!("{field}.ips"), &raw.ips)?,
        })
    }

    /// The routes, sorted by kind, namespace and name (the snapshot's order).
    fn routes(&self, raws: Vec<serde_json::Value>) -> Result<Vec<HttpRoute>, Error> {
        let mut routes: BTreeMap<(RouteKind, WorkloadRef), HttpRoute> = BTreeMap::new();
        for (i, raw) in raws.iter().enumerate() {
            let field = format!("routes[{i}]");
            let route = gateway::route(&field, raw, DEFAULT).map_err(|e| self.error(e))?;
            let key = (route.kind, route.name.clone());
            if routes.contains_key(&key) {
                return Err(self.invalid(
                    format!("{field}.metadata.name"),
                    format!("duplicate {} {}", route.kind, route.name),
                ));
            }
            routes.insert(key, route);
        }
        Ok(routes.into_values().collect())
    }

    /// Validates each object of the list `key` with `convert` into a map by namespace/name
    /// (`None`: someone else's, left out); a second object of one name is an error.
    fn objects<T>(
        &self,
        key: &str,
        what: &str,
        raws: &[serde_json::Value],
        convert: impl Fn(&str, &serde_json::Value) -> Result<Option<(WorkloadRef, T)>, Invalid>,
    ) -> Result<BTreeMap<WorkloadRef, T>, Error> {
        let mut objects = BTreeMap::new();
        for (i, raw) in raws.iter().enumerate() {
            let field = format!("{key}[{i}]");
            let Some((name, object)) = convert(&field, raw).map_err(|e| self.error(e))? else {
                continue;
            };
            if objects.contains_key(&name) {
                return Err(self.invalid(
                    format!("{field}.metadata.name"),
                    format!("duplicate {what} {name}"),
                ));
            }
            objects.insert(name, object);
        }
        Ok(objects)
    }

    /// Every certificate an HTTPS listener names is in `secrets:` (a typo would leave the
    /// listener without a certificate).
    fn certificates_exist(
        &self,
        raws: &[serde_json::Value],
        gateways: &BTreeMap<WorkloadRef, Gateway>,
        certificates: &BTreeMap<WorkloadRef, TlsCertificate>,
    ) -> Result<(), Error> {
        for (i, raw) in raws.iter().enumerate() {
            let name = WorkloadRef::new(
                raw["metadata"]["namespace"].as_str().unwrap_or(DEFAULT),
                raw["metadata"]["name"].as_str().unwrap_or_default(),
            );
            let Some(gateway) = gateways.get(&name) else {
                continue;
            };
            for (j, listener) in gateway.listeners.iter().enumerate() {
                for (k, certificate) in listener.certificates.iter().enumerate() {
                    if !certificates.contains_key(certificate) {
                        return Err(self.invalid(
                            format!(
                                "gateways[{i}].spec.listeners[{j}].tls.certificateRefs[{k}].name"
                            ),
                            format!("no Secret {certificate} in secrets"),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// The traffic policies, in the file's order (which is the conflict rule's age order).
    fn traffic_policies(&self, raws: Vec<serde_json::Value>) -> Result<Vec<TrafficPolicy>, Error> {
        let mut policies: Vec<TrafficPolicy> = Vec::new();
        for (i, raw) in raws.iter().enumerate() {
            let field = format!("trafficPolicies[{i}]");
            let policy = traffic::object(&field, raw, DEFAULT).map_err(|e| self.error(e))?;
            if policies.iter().any(|p| p.name == policy.name) {
                return Err(self.invalid(
                    format!("{field}.metadata.name"),
                    format!("duplicate TrafficPolicy {}", policy.name),
                ));
            }
            policies.push(policy);
        }
        Ok(policies)
    }

    /// The external services, by namespace/name; at most `external::MAX_SERVICES`.
    fn external_services(
        &self,
        raws: Vec<RawExternalService>,
    ) -> Result<BTreeMap<WorkloadRef, ExternalService>, Error> {
        external::total("externalServices", raws.len()).map_err(|e| self.error(e))?;
        self.named_list(
            "externalServices",
            "external service",
            raws,
            |field, raw| {
                let name = self.object_ref(field, raw.name, raw.namespace)?;
                let spec = ExternalServiceSpec {
                    hosts: raw.hosts,
                    resolution: raw.resolution,
                    addresses: raw.addresses,
                    ports: raw.ports,
                };
                let service = external::service(field, name, spec).map_err(|e| self.error(e))?;
                Ok((service.name.clone(), service))
            },
        )
    }

    /// `field.name` and `field.namespace` (default `default`) of a named object.
    fn object_ref(
        &self,
        field: &str,
        name: String,
        namespace: Option<String>,
    ) -> Result<WorkloadRef, Error> {
        Ok(WorkloadRef {
            name: self.name(&format!("{field}.name"), name)?,
            namespace: self.name(
                &format!("{field}.namespace"),
                namespace.unwrap_or_else(|| DEFAULT.into()),
            )?,
        })
    }

    fn ips(&self, field: &str, texts: &[String]) -> Result<Vec<IpAddr>, Error> {
        texts
            .iter()
            .enumerate()
            .map(|(i, text)| syntax::ip(&format!("{field}[{i}]"), text).map_err(|e| self.error(e)))
            .collect()
    }

    fn name(&self, field: &str, name: String) -> Result<String, Error> {
        syntax::name(field, name).map_err(|e| self.error(e))
    }

    /// A pod UID as Kubernetes writes them; the CNI plugin and the cgroup tree spell it
    /// the same way.
    fn pod_uid(&self, field: &str, uid: String) -> Result<String, Error> {
        if !crate::source::node::is_pod_uid(&uid) {
            return Err(self.invalid(
                field.to_owned(),
                format!("{uid:?} is not a pod UID (lowercase hex and '-', e.g. 0d5cb5a1-8f2e-4c55-9a43-3b4f3e0e2a11)"),
            ));
        }
        Ok(uid)
    }

    fn port(&self, field: &str, port: u16) -> Result<u16, Error> {
        syntax::port(field, port).map_err(|e| self.error(e))
    }

    fn error(&self, e: Invalid) -> Error {
        self.invalid(e.field, e.reason)
    }

    fn invalid(&self, field: String, reason: String) -> Error {
        Error::Invalid {
            path: self.path.to_owned(),
            field,
            reason,
        }
    }
}

const DEFAULT: &str = "default";
/// The `waypoint` of a service that opts out of its namespace's (the label's value too).
const NO_WAYPOINT: &str = "none";

#[cfg(test)]
mod bad_fields;

#[cfg(test)]
mod tests;
