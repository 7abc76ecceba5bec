//! The local YAML file source: parses and validates the whole file into the start-up
//! `agent:` section and a `state::Snapshot` (workloads, services, access policies), then
//! polls the file and publishes each valid change. Field paths in errors follow the YAML
//! (`workloads[1].ips[0]`, `policies[2].rules[0].from[1].ipBlocks[0].cidr`).

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Deserializer};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::{
    config::{AgentSection, Error},
    identity::SpiffeId,
    source::SourceStatus,
    state::{
        AccessLogSettings, AccessPolicy, Action, IpBlock, L7Match, Location, MeshSettings,
        MtlsMode, MtlsSettings, PortRange, Principal, Rule, Service, ServiceAccount, ServicePort,
        Snapshot, Source, Workload, WorkloadRef, WorkloadSelector,
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
    let node = raw
        .agent
        .node
        .clone()
        .unwrap_or_else(crate::config::hostname);
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
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
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
            continue;
        }
        last_text = Some(text.clone());
        match parse(&path, &text) {
            Ok(doc) if *tx.borrow().as_ref() == doc.snapshot => {
                // Same state (first read, or a change of comments or order only).
                if status.view().last_rejection.is_some() {
                    status.recovered();
                }
            }
            Ok(doc) => {
                if doc.agent != started_with.agent {
                    warn!(component = "config", path = %path.display(),
                        "the agent: section changed; it takes effect after a restart");
                }
                info!(component = "config", path = %path.display(),
                    workloads = doc.snapshot.workloads.len(),
                    services = doc.snapshot.services.len(),
                    policies = doc.snapshot.policies.len(), "config reloaded");
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
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
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
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
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
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
struct RawMtls {
    mode: Option<MtlsMode>,
    #[serde(default)]
    namespaces: BTreeMap<String, MtlsMode>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
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
struct RawService {
    name: String,
    namespace: Option<String>,
    #[serde(default)]
    vips: Vec<String>,
    #[serde(default)]
    ports: Vec<RawServicePort>,
    #[serde(default)]
    endpoints: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawServicePort {
    port: u16,
    target_port: Option<u16>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawPolicy {
    name: String,
    namespace: Option<String>,
    #[serde(default)]
    selector: RawSelector,
    action: Action,
    #[serde(default)]
    rules: Vec<RawRule>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawSelector {
    #[serde(default)]
    match_labels: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawRule {
    #[serde(default)]
    from: Vec<RawSource>,
    #[serde(default)]
    to_ports: Vec<RawPort>,
    #[serde(default)]
    methods: Vec<String>,
    #[serde(default)]
    paths: Vec<String>,
    #[serde(default)]
    headers: BTreeMap<String, Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawSource {
    #[serde(default)]
    principals: Vec<String>,
    #[serde(default)]
    service_accounts: Vec<String>,
    #[serde(default)]
    namespaces: Vec<String>,
    #[serde(default)]
    ip_blocks: Vec<RawIpBlock>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawIpBlock {
    cidr: String,
    #[serde(default)]
    except: Vec<String>,
}

/// `8080` or `"8000-8100"` (or `"8080"`), checked by the validator so the error names the
/// field and the value.
enum RawPort {
    Number(i64),
    Text(String),
}

impl<'de> Deserialize<'de> for RawPort {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = RawPort;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#"a port (8080) or a port range ("8000-8100")"#)
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<RawPort, E> {
                Ok(RawPort::Number(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<RawPort, E> {
                Ok(RawPort::Number(i64::try_from(v).unwrap_or(i64::MAX)))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawPort, E> {
                Ok(RawPort::Text(v.to_owned()))
            }
        }
        d.deserialize_any(Visitor)
    }
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
        let services = self.named_list("services", "service", raw.services, |field, raw| {
            self.service(field, raw).map(|s| (s.name.clone(), s))
        })?;
        let policies = self.named_list("policies", "policy", raw.policies, |field, raw| {
            self.policy(field, raw).map(|p| (p.name.clone(), p))
        })?;
        Ok(FileDoc {
            agent: raw.agent,
            snapshot: Snapshot {
                mesh,
                workloads,
                services,
                policies,
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
        })
    }

    fn workload(&self, field: &str, raw: RawWorkload) -> Result<Workload, Error> {
        let name = self.name(&format!("{field}.name"), raw.name)?;
        let namespace = self.name(
            &format!("{field}.namespace"),
            raw.namespace.unwrap_or_else(|| DEFAULT.into()),
        )?;
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
            name: WorkloadRef { namespace, name },
            service_account,
            ips,
            location,
            enrolled,
            mtls_mode: raw.mtls_mode,
            labels: self.labels(&format!("{field}.labels"), raw.labels)?,
        })
    }

    fn policy(&self, field: &str, raw: RawPolicy) -> Result<AccessPolicy, Error> {
        let name = self.name(&format!("{field}.name"), raw.name)?;
        let namespace = self.name(
            &format!("{field}.namespace"),
            raw.namespace.unwrap_or_else(|| DEFAULT.into()),
        )?;
        let match_labels = self.labels(
            &format!("{field}.selector.matchLabels"),
            raw.selector.match_labels,
        )?;
        let rules = raw
            .rules
            .into_iter()
            .enumerate()
            .map(|(i, rule)| self.rule(&format!("{field}.rules[{i}]"), rule))
            .collect::<Result<_, _>>()?;
        Ok(AccessPolicy {
            // A policy selects workloads of its own namespace only, as the CRD will: a
            // namespace's owner cannot open or close another namespace's workloads.
            selector: WorkloadSelector {
                namespace: namespace.clone(),
                match_labels,
            },
            name: WorkloadRef { namespace, name },
            action: raw.action,
            rules,
        })
    }

    fn rule(&self, field: &str, raw: RawRule) -> Result<Rule, Error> {
        let from = raw
            .from
            .into_iter()
            .enumerate()
            .map(|(i, source)| self.source(&format!("{field}.from[{i}]"), source))
            .collect::<Result<_, _>>()?;
        let to_ports = raw
            .to_ports
            .iter()
            .enumerate()
            .map(|(i, port)| self.port_range(&format!("{field}.toPorts[{i}]"), port))
            .collect::<Result<_, _>>()?;
        for (i, method) in raw.methods.iter().enumerate() {
            if method.is_empty() || !method.chars().all(|c| c.is_ascii_uppercase()) {
                return Err(self.invalid(
                    format!("{field}.methods[{i}]"),
                    format!("{method:?} is not an HTTP method (uppercase, e.g. GET)"),
                ));
            }
        }
        for (i, path) in raw.paths.iter().enumerate() {
            self.pattern(&format!("{field}.paths[{i}]"), path)?;
            if !path.starts_with('/') && !path.starts_with('*') {
                return Err(self.invalid(
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
                return Err(self.invalid(
                    format!("{field}.headers.{name}"),
                    format!("{name:?} is not a lowercase header name"),
                ));
            }
            if values.is_empty() {
                return Err(self.invalid(
                    format!("{field}.headers.{name}"),
                    "at least one value is required".into(),
                ));
            }
        }
        let l7 = (!raw.methods.is_empty() || !raw.paths.is_empty() || !raw.headers.is_empty())
            .then_some(L7Match {
                methods: raw.methods,
                paths: raw.paths,
                headers: raw.headers,
            });
        Ok(Rule { from, to_ports, l7 })
    }

    fn source(&self, field: &str, raw: RawSource) -> Result<Source, Error> {
        if raw.principals.is_empty()
            && raw.service_accounts.is_empty()
            && raw.namespaces.is_empty()
            && raw.ip_blocks.is_empty()
        {
            return Err(self.invalid(
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
            .map(|(i, text)| self.principal(&format!("{field}.principals[{i}]"), text))
            .collect::<Result<_, _>>()?;
        let service_accounts =
            raw.service_accounts
                .into_iter()
                .enumerate()
                .map(|(i, text)| {
                    let field = format!("{field}.serviceAccounts[{i}]");
                    let Some((namespace, name)) = text.split_once('/') else {
                        return Err(self
                            .invalid(field, format!("{text:?} is not namespace/service-account")));
                    };
                    Ok(ServiceAccount {
                        namespace: self.name(&field, namespace.into())?,
                        name: self.name(&field, name.into())?,
                    })
                })
                .collect::<Result<_, _>>()?;
        let namespaces = raw
            .namespaces
            .into_iter()
            .enumerate()
            .map(|(i, ns)| self.name(&format!("{field}.namespaces[{i}]"), ns))
            .collect::<Result<_, _>>()?;
        let ip_blocks = raw
            .ip_blocks
            .iter()
            .enumerate()
            .map(|(i, block)| self.ip_block(&format!("{field}.ipBlocks[{i}]"), block))
            .collect::<Result<_, _>>()?;
        Ok(Source {
            principals,
            service_accounts,
            namespaces,
            ip_blocks,
        })
    }

    fn principal(&self, field: &str, text: &str) -> Result<Principal, Error> {
        if text == "*" {
            return Ok(Principal::Any);
        }
        self.pattern(field, text)?;
        if let Some(prefix) = text.strip_suffix('*') {
            if !prefix.starts_with("spiffe://") {
                return Err(self.invalid(
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
            .map_err(|e| self.invalid(field.into(), e.to_string()))
    }

    /// Exact text, or one `*` at the start or the end.
    fn pattern(&self, field: &str, text: &str) -> Result<(), Error> {
        let inner = text.strip_prefix('*').or_else(|| text.strip_suffix('*'));
        if text.is_empty() || inner.unwrap_or(text).contains('*') {
            return Err(self.invalid(
                field.into(),
                format!("{text:?}: '*' is allowed only once, at the start or the end"),
            ));
        }
        Ok(())
    }

    fn ip_block(&self, field: &str, raw: &RawIpBlock) -> Result<IpBlock, Error> {
        let cidr = self.cidr(&format!("{field}.cidr"), &raw.cidr)?;
        let except = raw
            .except
            .iter()
            .enumerate()
            .map(|(i, text)| {
                let field = format!("{field}.except[{i}]");
                let except = self.cidr(&field, text)?;
                if !cidr.contains(&except) {
                    return Err(self.invalid(field, format!("{except} is not inside {cidr}")));
                }
                Ok(except)
            })
            .collect::<Result<_, _>>()?;
        Ok(IpBlock { cidr, except })
    }

    /// A CIDR, or a bare address for a single host; host bits are cleared.
    fn cidr(&self, field: &str, text: &str) -> Result<ipnet::IpNet, Error> {
        text.parse::<ipnet::IpNet>()
            .or_else(|_| text.parse::<IpAddr>().map(ipnet::IpNet::from))
            .map(|net| net.trunc())
            .map_err(|_| {
                self.invalid(
                    field.into(),
                    format!("invalid CIDR {text:?} (expected e.g. 10.0.0.0/8)"),
                )
            })
    }

    fn port_range(&self, field: &str, raw: &RawPort) -> Result<PortRange, Error> {
        let invalid = |text: String| {
            self.invalid(
                field.into(),
                format!("invalid port {text} (expected a port 1-65535 or a range \"8000-8100\")"),
            )
        };
        let port = |text: &str| text.trim().parse::<u16>().ok().filter(|p| *p != 0);
        let (start, end) = match raw {
            RawPort::Number(n) => {
                let p = u16::try_from(*n)
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| invalid(n.to_string()))?;
                (p, p)
            }
            RawPort::Text(text) => {
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
    fn labels(
        &self,
        field: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<BTreeMap<String, String>, Error> {
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
                && prefix.chars().all(|c| {
                    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.')
                });
            let key_ok = !name.is_empty()
                && segment_ok(name)
                && prefix_ok
                && (prefix.is_empty() != key.contains('/'));
            if !key_ok {
                return Err(self.invalid(
                    format!("{field}.{key}"),
                    format!("{key:?} is not a valid label key"),
                ));
            }
            if !segment_ok(value) {
                return Err(self.invalid(
                    format!("{field}.{key}"),
                    format!("{value:?} is not a valid label value"),
                ));
            }
        }
        Ok(labels)
    }

    fn service(&self, field: &str, raw: RawService) -> Result<Service, Error> {
        let name = self.name(&format!("{field}.name"), raw.name)?;
        let namespace = self.name(
            &format!("{field}.namespace"),
            raw.namespace.unwrap_or_else(|| DEFAULT.into()),
        )?;
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
            name: WorkloadRef { namespace, name },
            vips: self.ips(&format!("{field}.vips"), &raw.vips)?,
            ports,
            endpoints: self.ips(&format!("{field}.endpoints"), &raw.endpoints)?,
        })
    }

    fn ips(&self, field: &str, texts: &[String]) -> Result<Vec<IpAddr>, Error> {
        texts
            .iter()
            .enumerate()
            .map(|(i, text)| {
                text.parse().map_err(|_| {
                    self.invalid(
                        format!("{field}[{i}]"),
                        format!("invalid IP address {text:?}"),
                    )
                })
            })
            .collect()
    }

    fn name(&self, field: &str, name: String) -> Result<String, Error> {
        let valid = !name.is_empty()
            && name.len() <= 253
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
        if valid {
            Ok(name)
        } else {
            Err(self.invalid(
                field.into(),
                format!("{name:?} is not a valid name (lowercase letters, digits, '-', '.')"),
            ))
        }
    }

    /// A pod UID as Kubernetes writes them; the CNI plugin and the cgroup tree spell it
    /// the same way.
    fn pod_uid(&self, field: &str, uid: String) -> Result<String, Error> {
        if !crate::source::node_pods::is_pod_uid(&uid) {
            return Err(self.invalid(
                field.to_owned(),
                format!("{uid:?} is not a pod UID (lowercase hex and '-', e.g. 0d5cb5a1-8f2e-4c55-9a43-3b4f3e0e2a11)"),
            ));
        }
        Ok(uid)
    }

    fn port(&self, field: &str, port: u16) -> Result<u16, Error> {
        if port == 0 {
            return Err(self.invalid(field.into(), "port must be between 1 and 65535".into()));
        }
        Ok(port)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(yaml: &str) -> Result<FileDoc, String> {
        parse(Path::new("node.yaml"), yaml).map_err(|e| e.to_string())
    }

    const GOOD: &str = r#"
agent:
  cgroupRoot: /sys/fs/cgroup
mesh:
  excludedPorts: [22]
  excludedCidrs: ["169.254.0.0/16"]
  mtls:
    mode: PERMISSIVE
    namespaces: {prod: STRICT}
workloads:
  - name: client
    namespace: default
    serviceAccount: client
    ips: ["10.1.0.2"]
    netns: /proc/self/ns/net
  - name: legacy
    ips: ["10.1.0.9"]
    netns: /does/not/matter
    enrolled: false
  - name: api
    namespace: prod
    ips: ["10.2.0.5"]
    node: node-b
    mtlsMode: DISABLED
services:
  - name: echo
    vips: ["10.96.0.10"]
    ports: [{port: 80, targetPort: 8080}, {port: 81}]
    endpoints: ["10.1.0.3"]
"#;

    #[test]
    fn a_full_file_parses_with_defaults() {
        let doc = parse_str(GOOD).unwrap();
        let legacy = &doc.snapshot.workloads[&WorkloadRef::new("default", "legacy")];
        assert!(!legacy.enrolled);
        assert_eq!(legacy.service_account, "default");
        let echo = &doc.snapshot.services[&WorkloadRef::new("default", "echo")];
        assert_eq!(echo.ports[1].target_port, 81);
        assert_eq!(doc.snapshot.mesh.excluded_ports, vec![22]);
        let api = &doc.snapshot.workloads[&WorkloadRef::new("prod", "api")];
        assert_eq!(
            api.location,
            Location::Remote {
                node: "node-b".into()
            }
        );
        assert_eq!(doc.snapshot.mtls_mode(api), MtlsMode::Disabled);
        assert_eq!(doc.snapshot.mesh.mtls.namespaces["prod"], MtlsMode::Strict);
        assert_eq!(doc.snapshot.local_enrolled().count(), 1);
    }

    #[test]
    fn access_log_is_on_by_default_and_switchable_per_namespace() {
        let doc = parse_str(GOOD).unwrap();
        assert!(doc.snapshot.mesh.access_log.enabled_for("default"));
        let doc = parse_str(&GOOD.replace(
            "  mtls:\n",
            "  accessLog: {enabled: false, namespaces: {prod: true}}\n  mtls:\n",
        ))
        .unwrap();
        let access_log = &doc.snapshot.mesh.access_log;
        assert!(!access_log.enabled_for("default"));
        assert!(access_log.enabled_for("prod"));
        let err = parse_str(&GOOD.replace(
            "  mtls:\n",
            "  accessLog: {namespaces: {Bad_NS: false}}\n  mtls:\n",
        ))
        .unwrap_err();
        assert!(err.contains("mesh.accessLog.namespaces.Bad_NS"), "{err}");
    }

    #[test]
    fn unknown_mtls_mode_is_named() {
        let err = parse_str(&GOOD.replace("mode: PERMISSIVE", "mode: LAX")).unwrap_err();
        assert!(err.contains("mesh.mtls.mode"), "{err}");
        assert!(err.contains("STRICT"), "{err}");
    }

    #[test]
    fn a_local_pod_needs_a_netns() {
        let err = parse_str(&GOOD.replace("    node: node-b\n", "")).unwrap_err();
        assert!(err.contains("workloads[2].netns"), "{err}");
    }

    #[test]
    fn a_local_pod_may_be_known_by_uid_until_the_node_learns_its_netns() {
        let uid = "0d5cb5a1-8f2e-4c55-9a43-3b4f3e0e2a11";
        let text = GOOD.replace("netns: /proc/self/ns/net", &format!("podUid: {uid}"));
        let doc = parse_str(&text).unwrap();
        let client = &doc.snapshot.workloads[&WorkloadRef::new("default", "client")];
        assert_eq!(client.pod_uid(), Some(uid));
        assert_eq!(client.netns(), None);
        // Not enrollable until `node_pods::join` fills in the netns.
        assert_eq!(doc.snapshot.local_enrolled().count(), 0);

        let err = parse_str(&GOOD.replace(
            "netns: /proc/self/ns/net",
            "netns: /proc/self/ns/net\n    podUid: 0d5cb5a1-8f2e-4c55-9a43-3b4f3e0e2a11",
        ))
        .unwrap_err();
        assert!(err.contains("workloads[0].podUid"), "{err}");
        assert!(err.contains("not both"), "{err}");
        let probed = parse_str(&text.replace(
            &format!("podUid: {uid}"),
            &format!("podUid: {uid}\n    probePorts: [8080, 9090]"),
        ))
        .unwrap();
        let client = &probed.snapshot.workloads[&WorkloadRef::new("default", "client")];
        assert_eq!(client.probe_ports(), [8080, 9090]);
        let err = parse_str(&GOOD.replace(
            "netns: /proc/self/ns/net",
            "netns: /proc/self/ns/net\n    probePorts: [8080]",
        ))
        .unwrap_err();
        assert!(err.contains("workloads[0].probePorts"), "{err}");
        let err = parse_str(&text.replace(
            &format!("podUid: {uid}"),
            &format!("podUid: {uid}\n    probePorts: [0]"),
        ))
        .unwrap_err();
        assert!(err.contains("workloads[0].probePorts[0]"), "{err}");
        let err =
            parse_str(&GOOD.replace("netns: /proc/self/ns/net", "podUid: Pod_1")).unwrap_err();
        assert!(err.contains("workloads[0].podUid"), "{err}");
        assert!(err.contains("\"Pod_1\" is not a pod UID"), "{err}");
        let twice = text.replace("netns: /does/not/matter", &format!("podUid: {uid}"));
        let err = parse_str(&twice).unwrap_err();
        assert!(err.contains("workloads[1].podUid"), "{err}");
        assert!(
            err.contains("already the UID of workload default/client"),
            "{err}"
        );
    }

    #[test]
    fn unknown_field_is_named() {
        let err = parse_str(&GOOD.replace("serviceAccount: client", "serviceAcount: client"))
            .unwrap_err();
        assert!(err.contains("serviceAcount"), "{err}");
        assert!(err.contains("workloads[0]"), "{err}");
    }

    #[test]
    fn bad_ip_names_the_field_and_the_value() {
        let err = parse_str(&GOOD.replace("10.1.0.2", "10.1.0.300")).unwrap_err();
        assert!(err.contains("workloads[0].ips[0]"), "{err}");
        assert!(err.contains("10.1.0.300"), "{err}");
    }

    #[test]
    fn missing_netns_of_an_enrolled_pod_is_rejected() {
        let err = parse_str(&GOOD.replace("/proc/self/ns/net", "/run/netns/nope")).unwrap_err();
        assert!(err.contains("workloads[0].netns"), "{err}");
        assert!(err.contains("/run/netns/nope does not exist"), "{err}");
    }

    #[test]
    fn duplicate_ip_is_rejected() {
        let err = parse_str(&GOOD.replace("10.1.0.9", "10.1.0.2")).unwrap_err();
        assert!(err.contains("workloads[1].ips[0]"), "{err}");
    }

    #[test]
    fn bad_cidr_and_zero_port_are_named() {
        let err = parse_str(&GOOD.replace("169.254.0.0/16", "169.254.0.0/33")).unwrap_err();
        assert!(err.contains("mesh.excludedCidrs[0]"), "{err}");
        let err = parse_str(&GOOD.replace("{port: 81}", "{port: 0}")).unwrap_err();
        assert!(err.contains("services[0].ports[1].port"), "{err}");
    }

    const POLICIES: &str = r#"
policies:
  - name: api-allow
    namespace: prod
    selector:
      matchLabels: {app: api}
    action: ALLOW
    rules:
      - from:
          - principals:
              - "spiffe://cluster.local/ns/web/sa/front"
              - "spiffe://cluster.local/ns/ops/*"
          - serviceAccounts: ["jobs/batch"]
            ipBlocks: [{cidr: 10.0.0.0/8, except: ["10.9.0.0/16"]}]
          - namespaces: [monitoring]
        toPorts: [8080, "9000-9100"]
  - name: deny-delete
    namespace: prod
    action: DENY
    rules:
      - methods: [DELETE]
        paths: ["/admin/*"]
        headers: {x-env: [canary]}
"#;

    fn with_policies(yaml: &str) -> Result<FileDoc, String> {
        let file = GOOD
            .replace(
                "    mtlsMode: DISABLED\n",
                "    mtlsMode: DISABLED\n    labels: {app: api, weft.dev/tier: back}\n",
            )
            .replace("  mtls:\n", "  defaultDeny: true\n  mtls:\n");
        parse_str(&format!("{file}{yaml}"))
    }

    #[test]
    fn policies_labels_and_default_deny_parse() {
        let doc = with_policies(POLICIES).unwrap();
        let snapshot = &doc.snapshot;
        assert!(snapshot.mesh.default_deny);
        let api = &snapshot.workloads[&WorkloadRef::new("prod", "api")];
        assert_eq!(api.labels["weft.dev/tier"], "back");

        let allow = &snapshot.policies[&WorkloadRef::new("prod", "api-allow")];
        assert!(allow.selects(api));
        assert_eq!(allow.action, Action::Allow);
        let rule = &allow.rules[0];
        assert_eq!(rule.from.len(), 3);
        assert_eq!(
            rule.from[0].principals[1],
            Principal::Prefix("spiffe://cluster.local/ns/ops/".into())
        );
        assert_eq!(rule.from[1].service_accounts[0].to_string(), "jobs/batch");
        assert!(!rule.from[1].ip_blocks[0].contains("10.9.1.1".parse().unwrap()));
        assert_eq!(
            rule.to_ports[1],
            PortRange {
                start: 9000,
                end: 9100
            }
        );
        assert_eq!(rule.l7, None);

        let deny = &snapshot.policies[&WorkloadRef::new("prod", "deny-delete")];
        assert!(deny.selector.match_labels.is_empty());
        assert!(deny.selects(api));
        let l7 = deny.rules[0].l7.as_ref().unwrap();
        assert_eq!(l7.methods, vec!["DELETE"]);
        assert_eq!(l7.headers["x-env"], vec!["canary"]);
    }

    #[test]
    fn policy_errors_name_the_field() {
        let cases = [
            (
                "10.0.0.0/8",
                "10.0.0/8",
                "policies[0].rules[0].from[1].ipBlocks[0].cidr",
                "10.0.0/8",
            ),
            (
                "\"10.9.0.0/16\"",
                "\"11.0.0.0/16\"",
                ".ipBlocks[0].except[0]",
                "not inside",
            ),
            (
                "\"spiffe://cluster.local/ns/web/sa/front\"",
                "\"spiffe://cluster.local/web\"",
                "policies[0].rules[0].from[0].principals[0]",
                "/ns/",
            ),
            ("ns/ops/*", "ns/*/x", "from[0].principals[1]", "'*'"),
            (
                "jobs/batch",
                "jobs",
                "from[1].serviceAccounts[0]",
                "namespace/service-account",
            ),
            (
                "[monitoring]",
                "[Monitoring]",
                "from[2].namespaces[0]",
                "Monitoring",
            ),
            (
                "\"9000-9100\"",
                "\"9100-9000\"",
                "policies[0].rules[0].toPorts[1]",
                "9100-9000",
            ),
            (
                "[8080,",
                "[0,",
                "policies[0].rules[0].toPorts[0]",
                "invalid port 0",
            ),
            (
                "{app: api}",
                "{app: -api}",
                "policies[0].selector.matchLabels.app",
                "label value",
            ),
            (
                "action: DENY",
                "action: REJECT",
                "policies[1].action",
                "ALLOW",
            ),
            (
                "[DELETE]",
                "[delete]",
                "policies[1].rules[0].methods[0]",
                "HTTP method",
            ),
            (
                "[\"/admin/*\"]",
                "[admin]",
                "policies[1].rules[0].paths[0]",
                "'/'",
            ),
            (
                "- namespaces: [monitoring]",
                "- {}",
                "policies[0].rules[0].from[2]",
                "no source",
            ),
            (
                "toPorts:",
                "ports:",
                "policies[0].rules[0]",
                "unknown field `ports`",
            ),
            (
                "name: deny-delete",
                "name: api-allow",
                "policies[1].name",
                "duplicate policy",
            ),
        ];
        for (from, to, field, reason) in cases {
            assert!(POLICIES.contains(from), "{from}");
            let err = with_policies(&POLICIES.replacen(from, to, 1)).unwrap_err();
            assert!(err.contains(field), "{from} -> {to}: {err}");
            assert!(err.contains(reason), "{from} -> {to}: {err}");
        }
        let err =
            parse_str(&GOOD.replace("mtlsMode: DISABLED", "labels: {\"a/b/c\": x}")).unwrap_err();
        assert!(err.contains("workloads[2].labels.a/b/c"), "{err}");
    }

    #[test]
    fn the_examples_of_the_policy_docs_parse() {
        let docs = include_str!("../../../docs/policy.md");
        let blocks: Vec<&str> = docs
            .split("```yaml\n")
            .skip(1)
            .filter_map(|rest| rest.split_once("```").map(|(block, _)| block))
            .collect();
        assert!(blocks.len() >= 3);
        for block in blocks {
            let yaml = if block.starts_with("policies:") {
                block.to_owned()
            } else {
                format!("policies:\n{block}")
            };
            if let Err(e) = parse_str(&yaml) {
                panic!("{e}\n{yaml}");
            }
        }
    }

    #[tokio::test]
    async fn a_bad_policy_keeps_the_previous_policies_in_force() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.yaml");
        let good = format!("{GOOD}{POLICIES}");
        std::fs::write(&path, &good).unwrap();
        let doc = load(&path).unwrap();
        let started = doc.snapshot.clone();
        let (tx, mut rx) = watch::channel(Arc::new(doc.snapshot.clone()));
        let status = Arc::new(SourceStatus::default());
        tokio::spawn(watch(
            path.clone(),
            Duration::from_millis(5),
            doc,
            tx,
            Arc::clone(&status),
        ));

        // The first policy is fine and the second is not: neither is taken.
        let bad = good
            .replace("action: ALLOW", "action: DENY")
            .replace("[DELETE]", "[delete]");
        std::fs::write(&path, bad).unwrap();
        let rejected = async {
            while status.view().rejected_total == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), rejected)
            .await
            .unwrap();
        assert!(!rx.has_changed().unwrap());
        assert_eq!(**rx.borrow(), started);
        let rejection = status.view().last_rejection.unwrap();
        assert!(
            rejection.contains("policies[1].rules[0].methods[0]"),
            "{rejection}"
        );

        std::fs::write(&path, good.replace("action: ALLOW", "action: DENY")).unwrap();
        tokio::time::timeout(Duration::from_secs(10), rx.changed())
            .await
            .unwrap()
            .unwrap();
        let policy = rx.borrow().policies[&WorkloadRef::new("prod", "api-allow")].clone();
        assert_eq!(policy.action, Action::Deny);
    }

    #[tokio::test]
    async fn a_bad_reload_keeps_the_last_good_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.yaml");
        std::fs::write(&path, GOOD).unwrap();
        let doc = load(&path).unwrap();
        let (tx, mut rx) = watch::channel(Arc::new(doc.snapshot.clone()));
        let status = Arc::new(SourceStatus::default());
        tokio::spawn(watch(
            path.clone(),
            Duration::from_millis(5),
            doc,
            tx,
            Arc::clone(&status),
        ));

        std::fs::write(&path, GOOD.replace("10.1.0.2", "bad-ip")).unwrap();
        let rejected = async {
            while status.view().rejected_total == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), rejected)
            .await
            .unwrap();
        assert!(!rx.has_changed().unwrap());
        assert!(
            status
                .view()
                .last_rejection
                .unwrap()
                .contains("workloads[0].ips[0]")
        );

        std::fs::write(&path, GOOD.replace("10.1.0.2", "10.1.0.5")).unwrap();
        tokio::time::timeout(Duration::from_secs(10), rx.changed())
            .await
            .unwrap()
            .unwrap();
        let client = rx.borrow().workloads[&WorkloadRef::new("default", "client")].clone();
        assert_eq!(client.ips, vec!["10.1.0.5".parse::<IpAddr>().unwrap()]);
        assert_eq!(status.view().last_rejection, None);
    }
}
