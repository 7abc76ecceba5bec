//! The waypoints of the Helm chart (issue 7) with the real `helm`, next to the rest of the
//! chart in `kubernetes_helm.rs` and on the same helpers (`weft_tests::helm`): what each
//! `waypoints[]` entry renders and nothing more, its least privilege, probe, env and labels,
//! the agent's CA settings it shares, its RBAC and the CA's Role in its namespace, and the
//! waypoint values that values.schema.json and the templates refuse.
//!
//! `helm` comes from `cargo xtask setup`. Without it these tests fail in CI and are skipped
//! elsewhere, with a message.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, Result, ensure};
use k8s_openapi::{api::core::v1::PodSpec, apimachinery::pkg::util::intstr::IntOrString};
use serde_json::{Value, json};
use weft_tests::{
    helm::{
        DEFAULT_NS, NON_DEFAULT, OTHER_NS, Object, TWO_WAYPOINTS, agent_pod,
        assert_no_wildcard_and_no_secrets, ca_trust_bundle_rules, cluster_role, config_file,
        container, crd_files, env_of, helm, host_mounts, in_namespace, mounted_volume, named,
        pod_spec_of, render, render_with_file, rule, rules, selects, service, set, values_tempfile,
    },
    helm_or_skip,
};

#[test]
fn default_values_render_no_waypoint() -> Result<()> {
    helm_or_skip!();
    for (namespace, values) in [(DEFAULT_NS, &[][..]), (OTHER_NS, NON_DEFAULT)] {
        let objects = render(namespace, values)?;
        let waypoint: Vec<String> = objects
            .iter()
            .filter(|o| o.labels().get(COMPONENT).map(String::as_str) == Some("waypoint"))
            .map(Object::namespaced_id)
            .collect();
        assert!(waypoint.is_empty(), "{namespace}: {waypoint:?}");
        let ca = config_file(&objects, "weft-ca", "ca.yaml")?;
        assert_eq!(ca["kubernetes"].get("trustBundleNamespaces"), None);
    }
    Ok(())
}

#[test]
fn two_waypoints_in_two_namespaces_render_exactly_their_objects() -> Result<()> {
    helm_or_skip!();
    let baseline: BTreeSet<String> = render(DEFAULT_NS, &["serviceMonitor.enabled=true"])?
        .iter()
        .map(Object::namespaced_id)
        .collect();
    let objects = render_with_file(DEFAULT_NS, Some(TWO_WAYPOINTS), &[])?;
    let rendered: BTreeSet<String> = objects.iter().map(Object::namespaced_id).collect();
    ensure!(
        rendered.len() == objects.len(),
        "duplicate objects in {rendered:?}"
    );
    assert!(
        rendered.is_superset(&baseline),
        "the rest of the chart stays"
    );
    assert_eq!(
        rendered
            .difference(&baseline)
            .cloned()
            .collect::<BTreeSet<_>>(),
        set([
            "shop/ServiceAccount/shop-waypoint",
            "shop/Deployment/shop-waypoint",
            "shop/Service/shop-waypoint",
            "shop/PodDisruptionBudget/shop-waypoint",
            // replicas 1: no PDB (it would block every drain of its node).
            "payments/ServiceAccount/pay-wp",
            "payments/Deployment/pay",
            "payments/Service/pay",
            "ClusterRole/weft-waypoint",
            "ClusterRoleBinding/weft-waypoint",
            "weft-system/ServiceMonitor/weft-waypoint",
            // The CA publishes the trust bundle where the waypoints run.
            "shop/Role/weft-ca",
            "shop/RoleBinding/weft-ca",
            "payments/Role/weft-ca",
            "payments/RoleBinding/weft-ca",
        ])
    );
    let ca = config_file(&objects, "weft-ca", "ca.yaml")?;
    assert_eq!(
        ca["kubernetes"]["trustBundleNamespaces"],
        json!(["payments", "shop"])
    );

    for (namespace, name, account, replicas) in [
        ("shop", "shop-waypoint", "shop-waypoint", 2),
        ("payments", "pay", "pay-wp", 1),
    ] {
        let deploy = in_namespace(&objects, namespace, "Deployment", name, |o| match o {
            Object::Deployment(d) => Some(&**d),
            _ => None,
        })?;
        let spec = deploy.spec.as_ref().context("Deployment spec")?;
        assert_eq!(spec.replicas, Some(replicas), "{name}");
        let pod_labels = spec
            .template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.clone())
            .unwrap_or_default();
        assert!(selects(Some(&spec.selector), &pod_labels), "{name}");
        let pod = pod_spec_of(Some(&spec.template))?;
        assert_eq!(pod.service_account_name.as_deref(), Some(account));

        // The Service is the waypoint: its name, its role label, its identity's account.
        let svc = in_namespace(&objects, namespace, "Service", name, |o| match o {
            Object::Service(x) => Some(x),
            _ => None,
        })?;
        let svc_labels = svc.metadata.labels.clone().unwrap_or_default();
        assert_eq!(
            svc_labels.get("weft.dev/role").map(String::as_str),
            Some("waypoint")
        );
        assert_eq!(
            svc.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get("weft.dev/service-account"))
                .map(String::as_str),
            Some(account)
        );
        let svc_spec = svc.spec.as_ref().context("Service spec")?;
        let selector = svc_spec.selector.clone().unwrap_or_default();
        ensure!(
            !selector.is_empty() && selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v)),
            "{name}: the Service selects the waypoint's pods"
        );
        let ports: BTreeMap<String, (i32, String)> = svc_spec
            .ports
            .iter()
            .flatten()
            .map(|p| {
                let target = match &p.target_port {
                    Some(IntOrString::String(s)) => s.clone(),
                    other => format!("{other:?}"),
                };
                (p.name.clone().unwrap_or_default(), (p.port, target))
            })
            .collect();
        assert_eq!(
            ports,
            BTreeMap::from([
                ("hbone".to_string(), (15008, "hbone".to_string())),
                ("metrics".to_string(), (15020, "metrics".to_string())),
            ]),
            "{name}: HBONE, and metrics for the ServiceMonitor"
        );
        let account_exists = objects.iter().any(|o| {
            matches!(o, Object::ServiceAccount(_))
                && o.namespaced_id() == format!("{namespace}/ServiceAccount/{account}")
        });
        ensure!(account_exists, "{name}: its ServiceAccount is rendered");
    }
    let pdb = in_namespace(
        &objects,
        "shop",
        "PodDisruptionBudget",
        "shop-waypoint",
        |o| match o {
            Object::PodDisruptionBudget(p) => Some(p),
            _ => None,
        },
    )?;
    let pdb_spec = pdb.spec.as_ref().context("PDB spec")?;
    assert_eq!(pdb_spec.min_available, Some(IntOrString::Int(1)));
    let shop_pods = waypoint_pod_labels(&objects, "shop", "shop-waypoint")?;
    assert!(selects(pdb_spec.selector.as_ref(), &shop_pods));
    assert!(
        !selects(
            pdb_spec.selector.as_ref(),
            &waypoint_pod_labels(&objects, "payments", "pay")?
        ),
        "each waypoint's PDB covers its own pods only"
    );

    // One ServiceMonitor next to the agents', for the waypoint Services of both namespaces.
    let monitor = named(&objects, "ServiceMonitor", "weft-waypoint", |o| match o {
        Object::ServiceMonitor(m) => Some(m),
        _ => None,
    })?;
    assert_eq!(
        monitor
            .spec
            .namespace_selector
            .as_ref()
            .map(|n| &n.match_names),
        Some(&vec!["payments".to_string(), "shop".to_string()])
    );
    for (namespace, name) in [("shop", "shop-waypoint"), ("payments", "pay")] {
        let svc = in_namespace(&objects, namespace, "Service", name, |o| match o {
            Object::Service(x) => Some(x),
            _ => None,
        })?;
        let labels = svc.metadata.labels.clone().unwrap_or_default();
        assert!(selects(Some(&monitor.spec.selector), &labels), "{name}");
    }
    assert_eq!(
        monitor.spec.endpoints.first().map(|e| e.port.as_str()),
        Some("metrics")
    );
    Ok(())
}

#[test]
fn waypoint_pod_runs_unprivileged_with_its_probe_env_labels_and_the_agents_ca_settings()
-> Result<()> {
    helm_or_skip!();
    let objects = render_with_file(DEFAULT_NS, Some(TWO_WAYPOINTS), &[])?;
    let agent = config_file(&objects, "weft-agent", "agent.yaml")?;
    let remote = &agent["agent"]["ca"]["remote"];
    let ca = config_file(&objects, "weft-ca", "ca.yaml")?;
    let agent_pod = agent_pod(&objects)?;
    let agent_container = container(agent_pod, "agent")?;

    for (namespace, name, env) in [
        (
            "shop",
            "shop-waypoint",
            [
                ("WEFT_SERVICE_ACCOUNT", "shop-waypoint"),
                ("WEFT_METRICS_PREFIX", "weft"),
                ("WEFT_LOG_FORMAT", "json"),
            ]
            .as_slice(),
        ),
        (
            "payments",
            "pay",
            [
                ("WEFT_SERVICE_ACCOUNT", "pay-wp"),
                ("WEFT_METRICS_PREFIX", "istio"),
                ("WEFT_LOG_FORMAT", "text"),
                (
                    "WEFT_OTLP_ENDPOINT",
                    "http://otel-collector.observability:4318",
                ),
            ]
            .as_slice(),
        ),
    ] {
        let deploy = in_namespace(&objects, namespace, "Deployment", name, |o| match o {
            Object::Deployment(d) => Some(&**d),
            _ => None,
        })?;
        let template = &deploy.spec.as_ref().context("spec")?.template;
        let pod = pod_spec_of(Some(template))?;
        let labels = template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.clone())
            .unwrap_or_default();
        assert_eq!(
            labels.get("weft.dev/mesh").map(String::as_str),
            Some("disabled")
        );
        assert_eq!(labels.get(COMPONENT).map(String::as_str), Some("waypoint"));

        // No privilege of any kind, and nothing of the host.
        assert!(pod.host_network != Some(true) && pod.host_pid != Some(true));
        assert!(pod.host_ipc != Some(true));
        assert_eq!(pod.containers.len(), 1, "{name}: one container");
        ensure!(pod.init_containers.is_none(), "{name}: no init container");
        let c = container(pod, "waypoint")?;
        assert!(
            host_mounts(pod, "waypoint")?.is_empty(),
            "{name}: no hostPath"
        );
        let sc = c.security_context.clone().unwrap_or_default();
        assert_eq!(sc.privileged, Some(false));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_ne!(sc.run_as_user, Some(0));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        let caps = sc.capabilities.unwrap_or_default();
        assert_eq!(caps.drop, Some(vec!["ALL".to_string()]));
        assert!(
            caps.add.unwrap_or_default().is_empty(),
            "{name}: the waypoint needs no capability"
        );
        assert_eq!(
            sc.seccomp_profile.map(|p| p.type_),
            Some("RuntimeDefault".to_string())
        );

        assert_eq!(
            c.args,
            Some(vec![
                "waypoint".to_string(),
                "--source".to_string(),
                "kubernetes".to_string()
            ])
        );
        let ports: BTreeMap<String, i32> = c
            .ports
            .iter()
            .flatten()
            .map(|p| (p.name.clone().unwrap_or_default(), p.container_port))
            .collect();
        assert_eq!(
            ports,
            BTreeMap::from([
                ("hbone".to_string(), 15008),
                ("metrics".to_string(), 15020),
                ("readiness".to_string(), 15021),
            ])
        );
        let probe = c
            .readiness_probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .context("an HTTP readiness probe")?;
        assert_eq!(probe.path.as_deref(), Some("/healthz/ready"));
        assert_eq!(probe.port, IntOrString::String("readiness".into()));
        assert!(c.liveness_probe.is_none());
        assert_eq!(pod.termination_grace_period_seconds, Some(30), "{name}");

        // The env: the waypoint's name, its namespace from the downward API, its account,
        // and the CA exactly as the agent reaches it.
        let mut want: BTreeMap<String, Value> = BTreeMap::from([
            ("WEFT_WAYPOINT_NAME".to_string(), json!(name)),
            (
                "WEFT_NAMESPACE".to_string(),
                json!({"fieldRef": {"fieldPath": "metadata.namespace"}}),
            ),
            (
                "WEFT_NODE_NAME".to_string(),
                json!({"fieldRef": {"fieldPath": "spec.nodeName"}}),
            ),
            (
                "WEFT_TRUST_DOMAIN".to_string(),
                agent["agent"]["trustDomain"].clone(),
            ),
            ("WEFT_CA_ADDR".to_string(), remote["addr"].clone()),
            (
                "WEFT_CA_SERVER_NAME".to_string(),
                remote["serverName"].clone(),
            ),
            ("WEFT_CA_ROOT_CERT".to_string(), remote["rootCert"].clone()),
            (
                "WEFT_CA_TOKEN_FILE".to_string(),
                remote["tokenFile"].clone(),
            ),
            ("WEFT_LOG".to_string(), json!("info")),
            ("WEFT_LISTEN_GRACE".to_string(), json!("5s")),
            ("WEFT_DRAIN_LIMIT".to_string(), json!("10s")),
        ]);
        for (key, value) in env {
            want.insert((*key).to_string(), json!(value));
        }
        assert_eq!(env_of(c), want, "{name}");
        // The files those paths name: the same trust bundle ConfigMap and the same
        // projected token (the CA's audience) as the agent's, from this pod.
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
        assert_eq!(audience.as_deref(), ca["kubernetes"]["audience"].as_str());

        // Spread over nodes, by default, between this waypoint's own pods.
        let anti = pod
            .affinity
            .as_ref()
            .and_then(|a| a.pod_anti_affinity.as_ref())
            .and_then(|a| {
                a.preferred_during_scheduling_ignored_during_execution
                    .as_ref()
            })
            .and_then(|p| p.first())
            .context("preferred pod anti-affinity")?;
        assert_eq!(
            anti.pod_affinity_term.topology_key,
            "kubernetes.io/hostname"
        );
        assert!(selects(
            anti.pod_affinity_term.label_selector.as_ref(),
            &labels
        ));
    }
    // Per-waypoint values, merged over waypointDefaults.
    let pay = in_namespace(&objects, "payments", "Deployment", "pay", |o| match o {
        Object::Deployment(d) => Some(&**d),
        _ => None,
    })?;
    let pay_pod = pod_spec_of(pay.spec.as_ref().map(|s| &s.template))?;
    assert_eq!(
        pay_pod.node_selector,
        Some(BTreeMap::from([
            ("kubernetes.io/os".to_string(), "linux".to_string()),
            ("pool".to_string(), "edge".to_string()),
        ]))
    );
    assert_eq!(pay_pod.tolerations.as_ref().map(Vec::len), Some(1));
    let resources = container(pay_pod, "waypoint")?
        .resources
        .clone()
        .unwrap_or_default();
    assert_eq!(
        serde_json::to_value(resources)?,
        json!({"requests": {"cpu": "250m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}})
    );
    Ok(())
}

#[test]
fn waypoint_rbac_grants_exactly_the_snapshot_reads_and_route_status() -> Result<()> {
    helm_or_skip!();
    let objects = render_with_file(DEFAULT_NS, Some(TWO_WAYPOINTS), &[])?;
    let read = ["get", "list", "watch"];
    let mut weft_plurals: Vec<String> = crd_files()?
        .iter()
        .filter(|c| c.spec.group == "weft.dev")
        .map(|c| c.spec.names.plural.clone())
        .collect();
    weft_plurals.sort();
    let plurals: Vec<&str> = weft_plurals.iter().map(String::as_str).collect();
    assert_eq!(
        plurals,
        [
            "accesspolicies",
            "externalservices",
            "peerauthentications",
            "trafficpolicies"
        ]
    );
    assert_eq!(
        rules(&cluster_role(&objects, "weft-waypoint")?.rules),
        BTreeSet::from([
            rule("", &["namespaces", "pods", "services"], &read, &[]),
            rule("discovery.k8s.io", &["endpointslices"], &read, &[]),
            rule("weft.dev", &plurals, &read, &[]),
            rule(
                "gateway.networking.k8s.io",
                &["httproutes", "grpcroutes"],
                &read,
                &[]
            ),
            rule(
                "gateway.networking.k8s.io",
                &["httproutes/status", "grpcroutes/status"],
                &["patch", "update"],
                &[]
            ),
        ])
    );
    let binding = named(
        &objects,
        "ClusterRoleBinding",
        "weft-waypoint",
        |o| match o {
            Object::ClusterRoleBinding(b) => Some(b),
            _ => None,
        },
    )?;
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(binding.role_ref.name, "weft-waypoint");
    let subjects: BTreeSet<(String, String, String)> = binding
        .subjects
        .iter()
        .flatten()
        .map(|s| {
            (
                s.kind.clone(),
                s.namespace.clone().unwrap_or_default(),
                s.name.clone(),
            )
        })
        .collect();
    let account = |ns: &str, name: &str| ("ServiceAccount".into(), ns.into(), name.into());
    assert_eq!(
        subjects,
        BTreeSet::from([
            account("shop", "shop-waypoint"),
            account("payments", "pay-wp")
        ])
    );
    // The CA may write the trust bundle, and nothing else, in each waypoint namespace.
    for namespace in ["shop", "payments"] {
        let ca_role = in_namespace(&objects, namespace, "Role", "weft-ca", |o| match o {
            Object::Role(r) => Some(r),
            _ => None,
        })?;
        assert_eq!(rules(&ca_role.rules), ca_trust_bundle_rules());
        let ca_binding =
            in_namespace(&objects, namespace, "RoleBinding", "weft-ca", |o| match o {
                Object::RoleBinding(b) => Some(b),
                _ => None,
            })?;
        assert_eq!(
            ca_binding
                .subjects
                .iter()
                .flatten()
                .map(|s| (s.name.as_str(), s.namespace.as_deref()))
                .collect::<Vec<_>>(),
            [("weft-ca", Some(DEFAULT_NS))]
        );
    }
    assert_no_wildcard_and_no_secrets(&objects);
    Ok(())
}

#[test]
fn waypoints_in_the_release_namespace_share_an_account_and_add_no_ca_role() -> Result<()> {
    helm_or_skip!();
    let values = "waypoints:\n\
                  - {name: a, namespace: weft-system, serviceAccount: edge,\n\
                     podDisruptionBudget: {enabled: false}}\n\
                  - {name: b, namespace: weft-system, serviceAccount: edge, replicas: 3}\n";
    let objects = render_with_file(DEFAULT_NS, Some(values), &[])?;
    let ids: Vec<String> = objects.iter().map(Object::namespaced_id).collect();
    let count = |id: &str| ids.iter().filter(|i| *i == id).count();
    assert_eq!(count("weft-system/ServiceAccount/edge"), 1, "{ids:?}");
    assert_eq!(count("weft-system/Role/weft-ca"), 1, "{ids:?}");
    // A false in an entry wins over waypointDefaults' true.
    assert_eq!(count("weft-system/PodDisruptionBudget/a"), 0, "{ids:?}");
    assert_eq!(count("weft-system/PodDisruptionBudget/b"), 1, "{ids:?}");
    let ca = config_file(&objects, "weft-ca", "ca.yaml")?;
    assert_eq!(ca["kubernetes"].get("trustBundleNamespaces"), None);
    // No ServiceMonitor unless asked for; no metrics port on the Service then.
    assert_eq!(count("weft-system/ServiceMonitor/weft-waypoint"), 0);
    let svc = service(&objects, "a")?;
    assert_eq!(
        svc.spec
            .as_ref()
            .and_then(|s| s.ports.as_ref())
            .map(Vec::len),
        Some(1)
    );
    Ok(())
}

#[test]
fn bad_waypoint_values_are_refused_naming_the_field() -> Result<()> {
    helm_or_skip!();
    for (values, words) in [
        (
            "waypoints: [{name: shop-waypoint}]",
            &["/waypoints/0", "namespace"][..],
        ),
        (
            "waypoints: [{name: Shop_Waypoint, namespace: shop}]",
            &["/waypoints/0/name"],
        ),
        (
            "waypoints: [{name: 1st, namespace: shop}]",
            &["/waypoints/0/name"],
        ),
        (
            "waypoints: [{name: wp, namespace: Shop}]",
            &["/waypoints/0/namespace"],
        ),
        (
            "waypoints: [{name: wp, namespace: shop, replicas: 0}]",
            &["/waypoints/0/replicas"],
        ),
        (
            "waypoints: [{name: wp, namespace: shop, metricsPrefix: envoy}]",
            &["/waypoints/0/metricsPrefix"],
        ),
        (
            "waypoints: [{name: wp, namespace: shop, replica: 2}]",
            &["/waypoints/0", "replica"],
        ),
        (
            "waypoints: [{name: wp, namespace: shop}, {name: wp, namespace: shop}]",
            &["waypoints[1]", "shop/wp", "twice"],
        ),
        (
            "waypoints: [{name: weft-ca, namespace: weft-system}]",
            &["waypoints[0].name", "weft-ca"],
        ),
        (
            "waypoints: [{name: wp, namespace: shop, podDisruptionBudget: {minAvailable: 2}}]",
            &["waypoints[0].podDisruptionBudget.minAvailable", "2 of 2"],
        ),
    ] {
        let err = render_with_file(DEFAULT_NS, Some(values), &[]).expect_err(values);
        let message = format!("{err:#}");
        for word in words {
            assert!(message.contains(word), "{values}: {word:?} in {message}");
        }
    }
    // helm lint refuses them too.
    let file = values_tempfile("waypoints: [{name: shop-waypoint}]")?;
    let path = file.path().to_string_lossy().into_owned();
    let err = helm(&["lint", "--strict", "--values", &path], &[]).expect_err("lint");
    assert!(format!("{err:#}").contains("namespace"), "{err:#}");
    helm(&["lint", "--strict", "--namespace", DEFAULT_NS], &[])?;
    let file = values_tempfile(TWO_WAYPOINTS)?;
    let path = file.path().to_string_lossy().into_owned();
    helm(&["lint", "--strict", "--values", &path], &[])?;
    Ok(())
}

/// The labels of a waypoint Deployment's pods.
fn waypoint_pod_labels(
    objects: &[Object],
    namespace: &str,
    name: &str,
) -> Result<BTreeMap<String, String>> {
    let deploy = in_namespace(objects, namespace, "Deployment", name, |o| match o {
        Object::Deployment(d) => Some(&**d),
        _ => None,
    })?;
    Ok(deploy
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .unwrap_or_default())
}

/// A waypoint's listen grace and drain limit reach it as WEFT_LISTEN_GRACE and
/// WEFT_DRAIN_LIMIT, and its pod's grace period must outlast both together, as the agent's
/// must outlast its drain.
#[test]
fn a_waypoints_grace_period_covers_its_drain_limit() -> Result<()> {
    helm_or_skip!();
    let err = render_with_file(
        DEFAULT_NS,
        Some(TWO_WAYPOINTS),
        &["waypointDefaults.drainLimitSeconds=25"],
    )
    .expect_err("5 s of grace and a 25 s drain in a 30 s grace period");
    let err = format!("{err:#}");
    assert!(
        err.contains(
            "terminationGracePeriodSeconds (30) must be more than its listenGraceSeconds and \
             drainLimitSeconds together (30)"
        ),
        "{err}"
    );
    let objects = render_with_file(
        DEFAULT_NS,
        Some(TWO_WAYPOINTS),
        &[
            "waypointDefaults.drainLimitSeconds=60",
            "waypointDefaults.listenGraceSeconds=8",
            "waypointDefaults.terminationGracePeriodSeconds=90",
        ],
    )?;
    let pod = shop_waypoint_pod(&objects)?;
    assert_eq!(pod.termination_grace_period_seconds, Some(90));
    let env = env_of(container(pod, "waypoint")?);
    assert_eq!(env.get("WEFT_LISTEN_GRACE"), Some(&json!("8s")));
    assert_eq!(env.get("WEFT_DRAIN_LIMIT"), Some(&json!("60s")));
    Ok(())
}

const COMPONENT: &str = "app.kubernetes.io/component";

#[test]
fn a_jwks_ca_config_map_is_mounted_read_only_and_named_to_the_waypoint() -> Result<()> {
    helm_or_skip!();
    let objects = render_with_file(
        DEFAULT_NS,
        Some(TWO_WAYPOINTS),
        &["waypointDefaults.jwksCaConfigMap=issuer-ca"],
    )?;
    let pod = shop_waypoint_pod(&objects)?;
    let c = container(pod, "waypoint")?;
    let env = env_of(c);
    assert_eq!(
        env.get("WEFT_JWKS_CA_FILE"),
        Some(&json!("/etc/weft/jwks-ca/ca.crt"))
    );
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == "jwks-ca")
        .context("the jwks-ca mount")?;
    assert_eq!(mount.mount_path, "/etc/weft/jwks-ca");
    assert_eq!(mount.read_only, Some(true));
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "jwks-ca")
        .context("the jwks-ca volume")?;
    let config_map = volume.config_map.as_ref().context("a ConfigMap volume")?;
    assert_eq!(config_map.name, "issuer-ca");

    // Without it: no variable, no volume (the system roots only).
    let objects = render_with_file(DEFAULT_NS, Some(TWO_WAYPOINTS), &[])?;
    let pod = shop_waypoint_pod(&objects)?;
    ensure!(!env_of(container(pod, "waypoint")?).contains_key("WEFT_JWKS_CA_FILE"));
    ensure!(
        !pod.volumes.iter().flatten().any(|v| v.name == "jwks-ca"),
        "no jwks-ca volume by default"
    );
    Ok(())
}

/// The pod template of the `shop-waypoint` Deployment of `TWO_WAYPOINTS`.
fn shop_waypoint_pod(objects: &[Object]) -> Result<&PodSpec> {
    let deploy = in_namespace(
        objects,
        "shop",
        "Deployment",
        "shop-waypoint",
        |o| match o {
            Object::Deployment(d) => Some(&**d),
            _ => None,
        },
    )?;
    pod_spec_of(Some(&deploy.spec.as_ref().context("spec")?.template))
}
