//! The Helm chart (`deploy/helm/weft`) as its tests see it (`tests/kubernetes_helm.rs`,
//! `tests/helm_waypoint.rs`): `helm template` with the real `helm`, every rendered object
//! typed by its kind ([`Object`]: the Kubernetes API types of k8s-openapi, Kubernetes 1.33, so
//! a misspelt or misplaced field fails), and the finders, RBAC rules and values the tests
//! assert with.
//!
//! Behind the `helm` feature: only the tests need k8s-openapi, and xtask builds this library.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, Deployment},
        core::v1::{ConfigMap, Container, PodAffinityTerm, PodSpec, Service, ServiceAccount},
        policy::v1::PodDisruptionBudget,
        rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, Subject},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::{Value, json};

/// Skips the test when `helm` is missing, except in CI, where that is a failure.
#[macro_export]
macro_rules! helm_or_skip {
    () => {
        if !$crate::sys::on_path("helm") {
            $crate::skip(
                $crate::test_name!(),
                "`helm` is not installed; run `cargo xtask setup`",
            );
            return Ok(());
        }
    };
}

/// A rendered object, typed by its kind.
#[derive(Debug)]
pub enum Object {
    ClusterRole(ClusterRole),
    ClusterRoleBinding(ClusterRoleBinding),
    ConfigMap(ConfigMap),
    CustomResourceDefinition(CustomResourceDefinition),
    DaemonSet(Box<DaemonSet>),
    Deployment(Box<Deployment>),
    GatewayClass(GatewayClass),
    PodDisruptionBudget(PodDisruptionBudget),
    Role(Role),
    RoleBinding(RoleBinding),
    Service(Service),
    ServiceAccount(ServiceAccount),
    ServiceMonitor(ServiceMonitor),
}

impl Object {
    /// Types `value` by its apiVersion and kind; fails on a kind it does not know, on a field
    /// the type does not have (anywhere in the object), on a value of the wrong type, and on
    /// the API server's validation rules the types cannot express.
    pub fn from_rendered(value: &Value) -> Result<Object> {
        let api_version = value["apiVersion"].as_str().unwrap_or_default();
        let kind = value["kind"].as_str().unwrap_or_default();
        let object = match (api_version, kind) {
            ("v1", "ConfigMap") => Object::ConfigMap(typed(value)?),
            ("v1", "Service") => Object::Service(typed(value)?),
            ("v1", "ServiceAccount") => Object::ServiceAccount(typed(value)?),
            ("apps/v1", "DaemonSet") => Object::DaemonSet(Box::new(typed(value)?)),
            ("apps/v1", "Deployment") => Object::Deployment(Box::new(typed(value)?)),
            ("policy/v1", "PodDisruptionBudget") => Object::PodDisruptionBudget(typed(value)?),
            ("rbac.authorization.k8s.io/v1", "ClusterRole") => Object::ClusterRole(typed(value)?),
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                Object::ClusterRoleBinding(typed(value)?)
            }
            ("rbac.authorization.k8s.io/v1", "Role") => Object::Role(typed(value)?),
            ("rbac.authorization.k8s.io/v1", "RoleBinding") => Object::RoleBinding(typed(value)?),
            ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
                Object::CustomResourceDefinition(typed(value)?)
            }
            ("monitoring.coreos.com/v1", "ServiceMonitor") => Object::ServiceMonitor(typed(value)?),
            ("gateway.networking.k8s.io/v1", "GatewayClass") => Object::GatewayClass(typed(value)?),
            _ => bail!(
                "unknown kind {api_version} {kind}: add it to Object with its API type, or \
                 render a kind the test knows"
            ),
        };
        for (owner, pod) in pods(std::slice::from_ref(&object)) {
            for c in containers(pod) {
                let sc = c.security_context.clone().unwrap_or_default();
                let sys_admin = sc.capabilities.and_then(|c| c.add).is_some_and(|add| {
                    add.iter().any(|c| c == "SYS_ADMIN" || c == "CAP_SYS_ADMIN")
                });
                // The API server's rule (ValidateSecurityContext): such a pod is refused.
                ensure!(
                    !(sc.allow_privilege_escalation == Some(false)
                        && (sys_admin || sc.privileged == Some(true))),
                    "{owner}/{}: allowPrivilegeEscalation: false with privileged or \
                     CAP_SYS_ADMIN is refused by the API server",
                    c.name
                );
            }
        }
        if let Object::Service(svc) = &object {
            let spec = svc.spec.clone().unwrap_or_default();
            let kind = spec.type_.as_deref().unwrap_or("ClusterIP");
            // The API server's rules (ValidateService): such a Service is refused.
            ensure!(
                spec.external_traffic_policy.is_none()
                    || matches!(kind, "LoadBalancer" | "NodePort"),
                "{}: externalTrafficPolicy on a {kind} Service is refused by the API server",
                object.id()
            );
            ensure!(
                spec.load_balancer_source_ranges.is_none() || kind == "LoadBalancer",
                "{}: loadBalancerSourceRanges on a {kind} Service is refused by the API server",
                object.id()
            );
        }
        if let Object::GatewayClass(class) = &object {
            // The CRD's limit (Gateway API v1.5.1).
            let description = class.spec.description.as_deref().unwrap_or_default();
            ensure!(
                description.chars().count() <= 64,
                "{}: a description of more than 64 characters is refused by the CRD",
                object.id()
            );
        }
        Ok(object)
    }

    fn metadata(&self) -> Value {
        let value = match self {
            Object::ClusterRole(o) => serde_json::to_value(&o.metadata),
            Object::ClusterRoleBinding(o) => serde_json::to_value(&o.metadata),
            Object::ConfigMap(o) => serde_json::to_value(&o.metadata),
            Object::CustomResourceDefinition(o) => serde_json::to_value(&o.metadata),
            Object::DaemonSet(o) => serde_json::to_value(&o.metadata),
            Object::Deployment(o) => serde_json::to_value(&o.metadata),
            Object::GatewayClass(o) => serde_json::to_value(&o.metadata),
            Object::PodDisruptionBudget(o) => serde_json::to_value(&o.metadata),
            Object::Role(o) => serde_json::to_value(&o.metadata),
            Object::RoleBinding(o) => serde_json::to_value(&o.metadata),
            Object::Service(o) => serde_json::to_value(&o.metadata),
            Object::ServiceAccount(o) => serde_json::to_value(&o.metadata),
            Object::ServiceMonitor(o) => serde_json::to_value(&o.metadata),
        };
        value.unwrap_or_default()
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Object::ClusterRole(_) => "ClusterRole",
            Object::ClusterRoleBinding(_) => "ClusterRoleBinding",
            Object::ConfigMap(_) => "ConfigMap",
            Object::CustomResourceDefinition(_) => "CustomResourceDefinition",
            Object::DaemonSet(_) => "DaemonSet",
            Object::Deployment(_) => "Deployment",
            Object::GatewayClass(_) => "GatewayClass",
            Object::PodDisruptionBudget(_) => "PodDisruptionBudget",
            Object::Role(_) => "Role",
            Object::RoleBinding(_) => "RoleBinding",
            Object::Service(_) => "Service",
            Object::ServiceAccount(_) => "ServiceAccount",
            Object::ServiceMonitor(_) => "ServiceMonitor",
        }
    }

    pub fn is_cluster_scoped(&self) -> bool {
        matches!(
            self,
            Object::ClusterRole(_)
                | Object::ClusterRoleBinding(_)
                | Object::CustomResourceDefinition(_)
                | Object::GatewayClass(_)
        )
    }

    pub fn namespace(&self) -> Option<String> {
        self.metadata()["namespace"].as_str().map(str::to_string)
    }

    /// `namespace/Kind/name`, or `Kind/name` when cluster-scoped.
    pub fn namespaced_id(&self) -> String {
        match self.namespace() {
            Some(namespace) => format!("{namespace}/{}", self.id()),
            None => self.id(),
        }
    }

    pub fn labels(&self) -> BTreeMap<String, String> {
        serde_json::from_value(self.metadata()["labels"].clone()).unwrap_or_default()
    }

    pub fn id(&self) -> String {
        let name = self.metadata()["name"].as_str().unwrap_or("?").to_string();
        format!("{}/{name}", self.kind())
    }
}

/// The part of the Prometheus Operator's `monitoring.coreos.com/v1` ServiceMonitor the chart
/// uses, with the field names of its CRD. Unknown fields are errors here too.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceMonitor {
    pub api_version: String,
    pub kind: String,
    pub metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    pub spec: ServiceMonitorSpec,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceMonitorSpec {
    pub selector: LabelSelector,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<NamespaceSelector>,
    pub endpoints: Vec<MonitorEndpoint>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NamespaceSelector {
    pub match_names: Vec<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MonitorEndpoint {
    pub port: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scrape_timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub relabelings: Vec<Relabeling>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Relabeling {
    pub source_labels: Vec<String>,
    pub target_label: String,
}

/// The Gateway API's `gateway.networking.k8s.io/v1` GatewayClass, with the field names of its
/// CRD (the chart does not install the Gateway API CRDs; the clusters it runs on have them).
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GatewayClass {
    pub api_version: String,
    pub kind: String,
    pub metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    pub spec: GatewayClassSpec,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GatewayClassSpec {
    pub controller_name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// Deserializes into `T`, then requires that serializing `T` gives the same JSON back: a
/// field `T` does not know would be dropped silently by serde, and shows up here by path.
fn typed<T: DeserializeOwned + Serialize>(value: &Value) -> Result<T> {
    let id = format!(
        "{} {}",
        value["kind"].as_str().unwrap_or("?"),
        value["metadata"]["name"].as_str().unwrap_or("?")
    );
    let typed: T = serde_json::from_value(value.clone()).with_context(|| id.clone())?;
    let back = serde_json::to_value(&typed).with_context(|| format!("{id}: serialize"))?;
    let rendered = without_nulls(value);
    if let Some(path) = first_difference(&rendered, &back, "") {
        bail!("{id}: field {path} is not part of the API type (misspelt or misplaced?)");
    }
    Ok(typed)
}

/// The first path where `rendered` and `typed` differ, e.g. `.spec.template.spec.hostNetwrk`.
fn first_difference(rendered: &Value, typed: &Value, path: &str) -> Option<String> {
    match (rendered, typed) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            keys.into_iter().find_map(|k| {
                let at = format!("{path}.{k}");
                match (a.get(k), b.get(k)) {
                    (Some(x), Some(y)) => first_difference(x, y, &at),
                    _ => Some(at),
                }
            })
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => a
            .iter()
            .zip(b)
            .enumerate()
            .find_map(|(i, (x, y))| first_difference(x, y, &format!("{path}[{i}]"))),
        _ if rendered == typed => None,
        _ => Some(format!("{path} (rendered {rendered}, typed {typed})")),
    }
}

/// `key: null` is the same as no key to the API server (and to the typed value).
fn without_nulls(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), without_nulls(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(without_nulls).collect()),
        other => other.clone(),
    }
}

/// `helm template` of the chart into `namespace` (CRDs included), every object typed.
pub fn render(namespace: &str, values: &[&str]) -> Result<Vec<Object>> {
    render_with_file(namespace, None, values)
}

/// [`render`] with a values file (YAML text) too, given before the `--set`s.
pub fn render_with_file(
    namespace: &str,
    values_file: Option<&str>,
    values: &[&str],
) -> Result<Vec<Object>> {
    render_chart(&chart_dir(), namespace, values_file, values)
}

/// [`render_with_file`] of another chart: a directory or a packaged `.tgz`.
pub fn render_chart(
    chart: &Path,
    namespace: &str,
    values_file: Option<&str>,
    values: &[&str],
) -> Result<Vec<Object>> {
    let file = values_file.map(values_tempfile).transpose()?;
    let mut args = vec![
        "template",
        "weft",
        "--namespace",
        namespace,
        "--include-crds",
    ];
    let path = file
        .as_ref()
        .map(|f| f.path().to_string_lossy().into_owned());
    if let Some(path) = &path {
        args.extend(["--values", path.as_str()]);
    }
    let out = helm_chart(chart, &args, values)?;
    let mut objects = Vec::new();
    for document in serde_yaml::Deserializer::from_str(&out) {
        let value = serde_json::to_value(serde_yaml::Value::deserialize(document)?)?;
        if value.is_null() {
            continue;
        }
        objects.push(Object::from_rendered(&value)?);
    }
    ensure!(
        !objects.is_empty(),
        "helm template rendered nothing:\n{out}"
    );
    Ok(objects)
}

/// Runs `helm <args> <chart> [--set key=value]…` and returns its stdout.
pub fn helm(args: &[&str], values: &[&str]) -> Result<String> {
    helm_chart(&chart_dir(), args, values)
}

/// [`helm`] with another chart: a directory or a packaged `.tgz`.
pub fn helm_chart(chart: &Path, args: &[&str], values: &[&str]) -> Result<String> {
    let mut cmd = Command::new("helm");
    cmd.args(args).arg(chart);
    for value in values {
        cmd.arg("--set").arg(value);
    }
    let out = cmd
        .output()
        .context("run helm (is it installed? `cargo xtask setup`)")?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "helm {} failed ({}):\n{stdout}\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}

/// `text` in a temporary `values.yaml`, removed when dropped.
pub fn values_tempfile(text: &str) -> Result<tempfile::NamedTempFile> {
    let mut file = tempfile::Builder::new().suffix(".yaml").tempfile()?;
    std::io::Write::write_all(&mut file, text.as_bytes())?;
    Ok(file)
}

fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/helm/weft")
}

/// The CRDs in the chart's crds/ (none is fine), each file one valid CRD.
pub fn crd_files() -> Result<Vec<CustomResourceDefinition>> {
    let dir = chart_dir().join("crds");
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("read {}", dir.display())),
    };
    let mut crds = Vec::new();
    for entry in entries {
        let path = entry?.path();
        if !path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            continue;
        }
        let text = std::fs::read_to_string(&path)?;
        let value: Value = serde_yaml::from_str(&text)
            .with_context(|| format!("{}: one YAML document", path.display()))?;
        match Object::from_rendered(&value).with_context(|| path.display().to_string())? {
            Object::CustomResourceDefinition(crd) => crds.push(crd),
            other => bail!("{}: a {}, not a CRD", path.display(), other.kind()),
        }
    }
    Ok(crds)
}

/// The plural names of the `weft.dev` CRDs in crds/, sorted: what the agent and the proxies
/// read.
pub fn weft_plurals() -> Result<Vec<String>> {
    let mut plurals: Vec<String> = crd_files()?
        .iter()
        .filter(|c| c.spec.group == "weft.dev")
        .map(|c| c.spec.names.plural.clone())
        .collect();
    plurals.sort();
    Ok(plurals)
}

/// `helm lint --strict` of the chart with `values` (a values file), and its output.
pub fn lint_with(values: &str) -> Result<String> {
    let file = values_tempfile(values)?;
    let path = file.path().to_string_lossy().into_owned();
    helm(&["lint", "--strict", "--values", &path], &[])
}

/// Every pod template, with its owner (`Kind/name`).
pub fn pods(objects: &[Object]) -> Vec<(String, &PodSpec)> {
    objects
        .iter()
        .filter_map(|o| {
            let template = match o {
                Object::DaemonSet(d) => &d.spec.as_ref()?.template,
                Object::Deployment(d) => &d.spec.as_ref()?.template,
                _ => return None,
            };
            Some((o.id(), template.spec.as_ref()?))
        })
        .collect()
}

pub fn containers(pod: &PodSpec) -> impl Iterator<Item = &Container> {
    pod.containers
        .iter()
        .chain(pod.init_containers.iter().flatten())
}

pub fn container<'a>(pod: &'a PodSpec, name: &str) -> Result<&'a Container> {
    containers(pod)
        .find(|c| c.name == name)
        .with_context(|| format!("no container {name}"))
}

/// A container's env: name → value, or → valueFrom as JSON.
pub fn env_of(c: &Container) -> BTreeMap<String, Value> {
    c.env
        .iter()
        .flatten()
        .map(|e| {
            let value = match (&e.value, &e.value_from) {
                (Some(v), _) => json!(v),
                (None, Some(from)) => serde_json::to_value(from).unwrap_or_default(),
                (None, None) => Value::Null,
            };
            (e.name.clone(), value)
        })
        .collect()
}

/// The object of `kind` named `name`; `pick` gives its typed value.
pub fn named<'a, T: ?Sized>(
    objects: &'a [Object],
    kind: &str,
    name: &str,
    pick: impl Fn(&'a Object) -> Option<&'a T>,
) -> Result<&'a T> {
    let id = format!("{kind}/{name}");
    objects
        .iter()
        .filter(|o| o.id() == id)
        .find_map(pick)
        .with_context(|| format!("no {id}"))
}

/// [`named`], in `namespace` (the chart renders waypoint objects in several).
pub fn in_namespace<'a, T: ?Sized>(
    objects: &'a [Object],
    namespace: &str,
    kind: &str,
    name: &str,
    pick: impl Fn(&'a Object) -> Option<&'a T>,
) -> Result<&'a T> {
    let id = format!("{kind}/{name}");
    let here: Vec<&Object> = objects
        .iter()
        .filter(|o| o.namespace().as_deref() == Some(namespace))
        .collect();
    here.into_iter()
        .filter(|o| o.id() == id)
        .find_map(pick)
        .with_context(|| format!("no {id} in namespace {namespace}"))
}

pub fn daemonset<'a>(objects: &'a [Object], name: &str) -> Result<&'a DaemonSet> {
    named(objects, "DaemonSet", name, |o| match o {
        Object::DaemonSet(x) => Some(&**x),
        _ => None,
    })
}

pub fn agent_pod(objects: &[Object]) -> Result<&PodSpec> {
    pod_spec_of(
        daemonset(objects, "weft-agent")?
            .spec
            .as_ref()
            .map(|s| &s.template),
    )
}

pub fn pod_spec_of(
    template: Option<&k8s_openapi::api::core::v1::PodTemplateSpec>,
) -> Result<&PodSpec> {
    template
        .and_then(|t| t.spec.as_ref())
        .context("no pod template")
}

pub fn deployment<'a>(objects: &'a [Object], name: &str) -> Result<&'a Deployment> {
    named(objects, "Deployment", name, |o| match o {
        Object::Deployment(x) => Some(&**x),
        _ => None,
    })
}

pub fn service<'a>(objects: &'a [Object], name: &str) -> Result<&'a Service> {
    named(objects, "Service", name, |o| match o {
        Object::Service(x) => Some(x),
        _ => None,
    })
}

pub fn cluster_role<'a>(objects: &'a [Object], name: &str) -> Result<&'a ClusterRole> {
    named(objects, "ClusterRole", name, |o| match o {
        Object::ClusterRole(x) => Some(x),
        _ => None,
    })
}

pub fn role<'a>(objects: &'a [Object], name: &str) -> Result<&'a Role> {
    named(objects, "Role", name, |o| match o {
        Object::Role(x) => Some(x),
        _ => None,
    })
}

/// Bindings as ((role name, cluster-wide), roleRef kind, subjects); the role name must be
/// the binding's own name (one binding per role).
pub fn bindings(objects: &[Object]) -> Vec<((String, bool), String, Vec<Subject>)> {
    objects
        .iter()
        .filter_map(|o| {
            let (meta, role_ref, subjects, cluster) = match o {
                Object::ClusterRoleBinding(b) => (&b.metadata, &b.role_ref, &b.subjects, true),
                Object::RoleBinding(b) => (&b.metadata, &b.role_ref, &b.subjects, false),
                _ => return None,
            };
            assert_eq!(meta.name.as_deref(), Some(role_ref.name.as_str()));
            Some((
                (role_ref.name.clone(), cluster),
                role_ref.kind.clone(),
                subjects.clone().unwrap_or_default(),
            ))
        })
        .collect()
}

/// One RBAC rule, order-insensitive.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rule {
    pub api_groups: BTreeSet<String>,
    pub resources: BTreeSet<String>,
    pub verbs: BTreeSet<String>,
    pub resource_names: BTreeSet<String>,
}

/// The CA's Role in its namespace and each waypoint's: create the trust bundle ConfigMap,
/// read and replace that one by name.
pub fn ca_trust_bundle_rules() -> BTreeSet<Rule> {
    BTreeSet::from([
        rule("", &["configmaps"], &["create"], &[]),
        rule(
            "",
            &["configmaps"],
            &["get", "update"],
            &["weft-trust-bundle"],
        ),
    ])
}

pub fn rule(group: &str, resources: &[&str], verbs: &[&str], names: &[&str]) -> Rule {
    Rule {
        api_groups: set([group]),
        resources: set(resources.iter().copied()),
        verbs: set(verbs.iter().copied()),
        resource_names: set(names.iter().copied()),
    }
}

pub fn rules(rules: &Option<Vec<PolicyRule>>) -> BTreeSet<Rule> {
    rules
        .iter()
        .flatten()
        .map(|r| {
            assert!(r.non_resource_urls.is_none(), "no non-resource URL: {r:?}");
            Rule {
                api_groups: set(r.api_groups.iter().flatten()),
                resources: set(r.resources.iter().flatten()),
                verbs: set(r.verbs.iter()),
                resource_names: set(r.resource_names.iter().flatten()),
            }
        })
        .collect()
}

/// Every rule of every Role and ClusterRole, with its role's `namespace/Kind/name`.
pub fn role_rules(objects: &[Object]) -> Vec<(String, Rule)> {
    objects
        .iter()
        .flat_map(|o| {
            let rules = match o {
                Object::ClusterRole(r) => rules(&r.rules),
                Object::Role(r) => rules(&r.rules),
                _ => BTreeSet::new(),
            };
            rules.into_iter().map(|r| (o.namespaced_id(), r))
        })
        .collect()
}

/// No rule of any role has a wildcard.
pub fn assert_no_wildcard(objects: &[Object]) {
    for (role, r) in role_rules(objects) {
        for field in [&r.resources, &r.verbs, &r.api_groups] {
            assert!(!field.contains("*"), "{role}: a wildcard: {r:?}");
        }
    }
}

/// No rule of any role has a wildcard or names Secrets.
pub fn assert_no_wildcard_and_no_secrets(objects: &[Object]) {
    assert_no_wildcard(objects);
    for (role, r) in role_rules(objects) {
        assert!(
            !r.resources.contains("secrets"),
            "{role}: nobody reads Secrets: {r:?}"
        );
    }
}

pub fn set<S: ToString>(items: impl IntoIterator<Item = S>) -> BTreeSet<String> {
    items.into_iter().map(|s| s.to_string()).collect()
}

/// Host paths of `container`'s mounts: mount path → host path.
pub fn host_mounts(pod: &PodSpec, container_name: &str) -> Result<BTreeMap<String, String>> {
    let c = container(pod, container_name)?;
    let mut mounts = BTreeMap::new();
    for m in c.volume_mounts.iter().flatten() {
        let volume = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == m.name)
            .with_context(|| {
                format!("{container_name} mounts a volume {} nobody defines", m.name)
            })?;
        if let Some(host) = &volume.host_path {
            mounts.insert(m.mount_path.clone(), host.path.clone());
        }
    }
    Ok(mounts)
}

/// The volume `container` mounts at `path`.
pub fn mounted_volume<'a>(
    pod: &'a PodSpec,
    container: &Container,
    path: &str,
) -> Result<&'a k8s_openapi::api::core::v1::Volume> {
    let mount = container
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == path)
        .with_context(|| format!("{} mounts nothing at {path}", container.name))?;
    pod.volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .with_context(|| format!("no volume {}", mount.name))
}

/// A YAML file held in a rendered ConfigMap, parsed.
pub fn config_file(objects: &[Object], configmap: &str, key: &str) -> Result<Value> {
    let cm = named(objects, "ConfigMap", configmap, |o| match o {
        Object::ConfigMap(c) => Some(c),
        _ => None,
    })?;
    let text = cm
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .with_context(|| format!("ConfigMap {configmap} has no {key}"))?;
    serde_yaml::from_str(text).with_context(|| format!("{configmap}/{key}: YAML"))
}

pub fn str_at<'a>(value: &'a Value, key: &str) -> Result<&'a str> {
    value[key]
        .as_str()
        .with_context(|| format!("{key} is not a string in {value}"))
}

/// Whether `selector` (matchLabels only, as the chart writes them) selects `labels`.
pub fn selects(selector: Option<&LabelSelector>, labels: &BTreeMap<String, String>) -> bool {
    selector.is_some_and(|s| {
        s.match_expressions.is_none()
            && s.match_labels
                .as_ref()
                .is_some_and(|m| !m.is_empty() && m.iter().all(|(k, v)| labels.get(k) == Some(v)))
    })
}

/// Whether `svc` selects pods with `labels` (a selector that is not empty).
pub fn service_selects(svc: &Service, labels: &BTreeMap<String, String>) -> bool {
    let selector = svc.spec.as_ref().and_then(|s| s.selector.as_ref());
    selector.is_some_and(|m| !m.is_empty() && m.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

/// A Service's ports: name → (port, target port as written).
pub fn service_ports(svc: &Service) -> BTreeMap<String, (i32, String)> {
    svc.spec
        .iter()
        .flat_map(|s| s.ports.iter().flatten())
        .map(|p| {
            let target = match &p.target_port {
                Some(IntOrString::String(s)) => s.clone(),
                Some(IntOrString::Int(i)) => i.to_string(),
                None => String::new(),
            };
            (p.name.clone().unwrap_or_default(), (p.port, target))
        })
        .collect()
}

/// The Deployment `namespace/name` (a waypoint's or a gateway's).
pub fn deployment_in<'a>(
    objects: &'a [Object],
    namespace: &str,
    name: &str,
) -> Result<&'a Deployment> {
    in_namespace(objects, namespace, "Deployment", name, |o| match o {
        Object::Deployment(d) => Some(&**d),
        _ => None,
    })
}

/// The Service `namespace/name`.
pub fn service_in<'a>(objects: &'a [Object], namespace: &str, name: &str) -> Result<&'a Service> {
    in_namespace(objects, namespace, "Service", name, |o| match o {
        Object::Service(x) => Some(x),
        _ => None,
    })
}

/// The labels of a Deployment's pods.
pub fn pod_labels(deploy: &Deployment) -> BTreeMap<String, String> {
    deploy
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .unwrap_or_default()
}

/// The chart with `values` (a values file) and with `serviceMonitor.enabled` alone, both into
/// [`DEFAULT_NS`]: the objects of the first, each once, and the `namespace/Kind/name` of those
/// the values add (the rest of the chart must stay).
pub fn render_added(values: &str) -> Result<(Vec<Object>, BTreeSet<String>)> {
    let baseline: BTreeSet<String> = render(DEFAULT_NS, &["serviceMonitor.enabled=true"])?
        .iter()
        .map(Object::namespaced_id)
        .collect();
    let objects = render_with_file(DEFAULT_NS, Some(values), &[])?;
    let rendered: BTreeSet<String> = objects.iter().map(Object::namespaced_id).collect();
    ensure!(
        rendered.len() == objects.len(),
        "duplicate objects in {rendered:?}"
    );
    ensure!(
        rendered.is_superset(&baseline),
        "the rest of the chart stays: {:?} are gone",
        baseline.difference(&rendered).collect::<Vec<_>>()
    );
    let added = rendered.difference(&baseline).cloned().collect();
    Ok((objects, added))
}

/// The pod and container of the proxy Deployment `namespace/name` (`component`: `waypoint`
/// or `gateway`), once what every proxy shares is checked: labelled with its component and
/// never enrolled; nothing of the host; one container, named after the component,
/// unprivileged (non-root, read-only root, no capability, RuntimeDefault seccomp); ready on
/// `/healthz/ready` of its `readiness` port, no liveness probe; and the agent's trust bundle
/// and a projected token of the CA's audience mounted as the agent mounts them.
pub fn proxy_pod<'a>(
    objects: &'a [Object],
    namespace: &str,
    name: &str,
    component: &str,
) -> Result<(&'a PodSpec, &'a Container)> {
    let deploy = deployment_in(objects, namespace, name)?;
    let labels = pod_labels(deploy);
    let label = |key: &str| labels.get(key).map(String::as_str);
    ensure!(
        label("weft.dev/mesh") == Some("disabled"),
        "{name}: never enrolled"
    );
    ensure!(label("app.kubernetes.io/component") == Some(component));
    let pod = pod_spec_of(deploy.spec.as_ref().map(|s| &s.template))?;
    ensure!(
        pod.host_network != Some(true) && pod.host_pid != Some(true) && pod.host_ipc != Some(true),
        "{name}: no host namespace"
    );
    ensure!(pod.containers.len() == 1, "{name}: one container");
    ensure!(pod.init_containers.is_none(), "{name}: no init container");
    let c = container(pod, component)?;
    ensure!(
        host_mounts(pod, component)?.is_empty(),
        "{name}: no hostPath"
    );
    let sc = c.security_context.clone().unwrap_or_default();
    assert_eq!(sc.privileged, Some(false), "{name}");
    assert_eq!(sc.allow_privilege_escalation, Some(false), "{name}");
    assert_eq!(sc.run_as_non_root, Some(true), "{name}");
    assert_ne!(sc.run_as_user, Some(0), "{name}");
    assert_eq!(sc.read_only_root_filesystem, Some(true), "{name}");
    let caps = sc.capabilities.unwrap_or_default();
    assert_eq!(caps.drop, Some(vec!["ALL".to_string()]), "{name}");
    assert!(
        caps.add.unwrap_or_default().is_empty(),
        "{name}: a proxy needs no capability"
    );
    assert_eq!(
        sc.seccomp_profile.map(|p| p.type_).as_deref(),
        Some("RuntimeDefault")
    );
    let probe = c
        .readiness_probe
        .as_ref()
        .and_then(|p| p.http_get.as_ref())
        .context("an HTTP readiness probe")?;
    assert_eq!(probe.path.as_deref(), Some("/healthz/ready"));
    assert_eq!(probe.port, IntOrString::String("readiness".into()));
    assert!(c.liveness_probe.is_none(), "{name}");

    // The files the CA env names: the same trust bundle ConfigMap and the same projected
    // token (the CA's audience) as the agent's, from this pod.
    let agent_pod = agent_pod(objects)?;
    let agent_container = container(agent_pod, "agent")?;
    for path in ["/etc/weft/ca", "/var/run/secrets/weft"] {
        assert_eq!(
            serde_json::to_value(mounted_volume(pod, c, path)?)?,
            serde_json::to_value(mounted_volume(agent_pod, agent_container, path)?)?,
            "{name}: {path}"
        );
    }
    let token = mounted_volume(pod, c, "/var/run/secrets/weft")?;
    let audience = token
        .projected
        .as_ref()
        .and_then(|p| p.sources.as_ref())
        .and_then(|s| s.first())
        .and_then(|s| s.service_account_token.as_ref())
        .and_then(|t| t.audience.clone());
    let ca = config_file(objects, "weft-ca", "ca.yaml")?;
    assert_eq!(audience.as_deref(), ca["kubernetes"]["audience"].as_str());
    Ok((pod, c))
}

/// The environment every proxy gets from the chart besides its own: its namespace and node
/// from the downward API, the trust domain, the CA exactly as the agent reaches it (from the
/// rendered agent.yaml), and the log filter.
pub fn proxy_env(objects: &[Object]) -> Result<BTreeMap<String, Value>> {
    let agent = config_file(objects, "weft-agent", "agent.yaml")?;
    let remote = &agent["agent"]["ca"]["remote"];
    let field = |path: &str| json!({"fieldRef": {"fieldPath": path}});
    Ok(BTreeMap::from([
        ("WEFT_NAMESPACE".into(), field("metadata.namespace")),
        ("WEFT_NODE_NAME".into(), field("spec.nodeName")),
        (
            "WEFT_TRUST_DOMAIN".into(),
            agent["agent"]["trustDomain"].clone(),
        ),
        ("WEFT_CA_ADDR".into(), remote["addr"].clone()),
        ("WEFT_CA_SERVER_NAME".into(), remote["serverName"].clone()),
        ("WEFT_CA_ROOT_CERT".into(), remote["rootCert"].clone()),
        ("WEFT_CA_TOKEN_FILE".into(), remote["tokenFile"].clone()),
        ("WEFT_LOG".into(), json!("info")),
    ]))
}

/// The minAvailable of the PodDisruptionBudget of the proxy `namespace/name`, once checked
/// that it covers that proxy's pods and not those of `other` (another proxy's).
pub fn proxy_pdb_min_available(
    objects: &[Object],
    (namespace, name): (&str, &str),
    other: (&str, &str),
) -> Result<Option<IntOrString>> {
    let pdb = in_namespace(
        objects,
        namespace,
        "PodDisruptionBudget",
        name,
        |o| match o {
            Object::PodDisruptionBudget(p) => Some(p),
            _ => None,
        },
    )?;
    let spec = pdb.spec.as_ref().context("PDB spec")?;
    let own = pod_labels(deployment_in(objects, namespace, name)?);
    ensure!(
        selects(spec.selector.as_ref(), &own),
        "{name}: its own pods"
    );
    let others = pod_labels(deployment_in(objects, other.0, other.1)?);
    ensure!(
        !selects(spec.selector.as_ref(), &others),
        "{name}: its own pods only, not {}'s",
        other.1
    );
    Ok(spec.min_available.clone())
}

/// The namespaces the ServiceMonitor `weft-<component>` looks in, once checked that it
/// scrapes the port `metrics` of the Services `scraped` and of none of `not_scraped` (each
/// `(namespace, name)`).
pub fn proxy_monitor_namespaces(
    objects: &[Object],
    component: &str,
    scraped: &[(&str, &str)],
    not_scraped: &[(&str, &str)],
) -> Result<Vec<String>> {
    let name = format!("weft-{component}");
    let monitor = named(objects, "ServiceMonitor", &name, |o| match o {
        Object::ServiceMonitor(m) => Some(m),
        _ => None,
    })?;
    let selects_service = |(namespace, name): &(&str, &str)| -> Result<bool> {
        let labels = service_in(objects, namespace, name)?
            .metadata
            .labels
            .clone();
        Ok(selects(
            Some(&monitor.spec.selector),
            &labels.unwrap_or_default(),
        ))
    };
    for service in scraped {
        ensure!(selects_service(service)?, "{name} scrapes {service:?}");
    }
    for service in not_scraped {
        ensure!(
            !selects_service(service)?,
            "{name} leaves {service:?} alone"
        );
    }
    let ports: Vec<&str> = monitor
        .spec
        .endpoints
        .iter()
        .map(|e| e.port.as_str())
        .collect();
    ensure!(ports == ["metrics"], "{name}: endpoints {ports:?}");
    Ok(monitor
        .spec
        .namespace_selector
        .as_ref()
        .map(|n| n.match_names.clone())
        .unwrap_or_default())
}

/// The chart's default spread of a proxy's pods: preferred anti-affinity between them.
pub fn preferred_anti_affinity(pod: &PodSpec) -> Result<&PodAffinityTerm> {
    let term = pod
        .affinity
        .as_ref()
        .and_then(|a| a.pod_anti_affinity.as_ref())
        .and_then(|a| {
            a.preferred_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .and_then(|p| p.first())
        .context("preferred pod anti-affinity")?;
    ensure!(term.pod_affinity_term.topology_key == "kubernetes.io/hostname");
    Ok(&term.pod_affinity_term)
}

/// Each values file (YAML text) fails to render, with every one of its words in the error.
pub fn assert_refused<V: AsRef<str>>(cases: &[(V, &[&str])]) {
    for (values, words) in cases {
        let values = values.as_ref();
        let err = render_with_file(DEFAULT_NS, Some(values), &[]).expect_err(values);
        let message = format!("{err:#}");
        for word in *words {
            assert!(message.contains(word), "{values}: {word:?} in {message}");
        }
    }
}

pub const DEFAULT_NS: &str = "weft-system";
/// Two waypoints in two namespaces: one with the defaults, one with every value changed.
pub const TWO_WAYPOINTS: &str = "\
serviceMonitor:
  enabled: true
waypoints:
  - name: shop-waypoint
    namespace: shop
  - name: pay
    namespace: payments
    replicas: 1
    serviceAccount: pay-wp
    logFormat: text
    metricsPrefix: istio
    otlpEndpoint: http://otel-collector.observability:4318
    resources:
      requests:
        cpu: 250m
    nodeSelector:
      pool: edge
    tolerations:
      - {key: edge, operator: Exists, effect: NoSchedule}
";
/// Two gateways in two namespaces: one with the defaults (and two TLS Secrets), one with
/// every gateway value changed (and none).
pub const TWO_GATEWAYS: &str = "\
serviceMonitor:
  enabled: true
gateways:
  - name: public
    namespace: edge
    listeners:
      - {name: https, port: 443}
      - {name: http, port: 80}
    tlsSecrets: [shop-cert, api-cert]
  - name: partners
    namespace: b2b
    replicas: 3
    serviceAccount: partners-gw
    listeners:
      - {name: api, port: 8443}
    service:
      type: NodePort
      externalTrafficPolicy: Cluster
      annotations: {example.com/lb-scheme: internal}
    resources:
      requests:
        cpu: 500m
    logFormat: text
    listenGraceSeconds: 8
    drainLimitSeconds: 60
    terminationGracePeriodSeconds: 90
    nodeSelector:
      pool: edge
    tolerations:
      - {key: edge, operator: Exists, effect: NoSchedule}
    affinity:
      nodeAffinity:
        requiredDuringSchedulingIgnoredDuringExecution:
          nodeSelectorTerms:
            - matchExpressions: [{key: pool, operator: In, values: [edge]}]
    podDisruptionBudget:
      minAvailable: 2
";
pub const OTHER_NS: &str = "mesh-prod";
/// Every optional part on, and values that move things around.
pub const NON_DEFAULT: &[&str] = &[
    "serviceMonitor.enabled=true",
    "serviceMonitor.labels.release=prometheus",
    "podDisruptionBudget.enabled=true",
    "ca.replicas=2",
    "agent.privileged=true",
    "agent.gatewayApi=true",
    "agent.mesh.mtlsMode=STRICT",
    "agent.mesh.excludedPorts={22,3306}",
    "agent.mesh.outboundTrafficPolicy=REGISTRY_ONLY",
    "agent.workerThreads=2",
    "cni.binDir=/home/kubernetes/bin",
    "image.repository=registry.test/weft",
    "image.tag=1.2.3",
];
