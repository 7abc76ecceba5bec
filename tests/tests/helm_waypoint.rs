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
use serde_json::json;
use weft_tests::{
    helm::{
        DEFAULT_NS, NON_DEFAULT, OTHER_NS, Object, TWO_WAYPOINTS,
        assert_no_wildcard_and_no_secrets, assert_refused, ca_trust_bundle_rules, cluster_role,
        config_file, container, deployment_in, env_of, helm, in_namespace, lint_with, named,
        pod_labels, pod_spec_of, preferred_anti_affinity, proxy_env, proxy_monitor_namespaces,
        proxy_pdb_min_available, proxy_pod, render, render_added, render_with_file, rule, rules,
        selects, service, service_in, service_ports, service_selects, set, weft_plurals,
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
    let (objects, added) = render_added(TWO_WAYPOINTS)?;
    assert_eq!(
        added,
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
        let deploy = deployment_in(&objects, namespace, name)?;
        let spec = deploy.spec.as_ref().context("Deployment spec")?;
        assert_eq!(spec.replicas, Some(replicas), "{name}");
        let pod_labels = pod_labels(deploy);
        assert!(selects(Some(&spec.selector), &pod_labels), "{name}");
        let pod = pod_spec_of(Some(&spec.template))?;
        assert_eq!(pod.service_account_name.as_deref(), Some(account));

        // The Service is the waypoint: its name, its role label, its identity's account.
        let svc = service_in(&objects, namespace, name)?;
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
        ensure!(
            service_selects(svc, &pod_labels),
            "{name}: the Service selects the waypoint's pods"
        );
        assert_eq!(
            service_ports(svc),
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
    assert_eq!(
        proxy_pdb_min_available(&objects, ("shop", "shop-waypoint"), ("payments", "pay"))?,
        Some(IntOrString::Int(1))
    );

    // One ServiceMonitor next to the agents', for the waypoint Services of both namespaces.
    assert_eq!(
        proxy_monitor_namespaces(
            &objects,
            "waypoint",
            &[("shop", "shop-waypoint"), ("payments", "pay")],
            &[]
        )?,
        ["payments", "shop"]
    );
    Ok(())
}

#[test]
fn waypoint_pod_runs_unprivileged_with_its_probe_env_labels_and_the_agents_ca_settings()
-> Result<()> {
    helm_or_skip!();
    let objects = render_with_file(DEFAULT_NS, Some(TWO_WAYPOINTS), &[])?;

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
        // Unprivileged, never enrolled, nothing of the host, the agent's CA files: as every
        // proxy of the chart.
        let (pod, c) = proxy_pod(&objects, namespace, name, "waypoint")?;
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
        assert_eq!(pod.termination_grace_period_seconds, Some(30), "{name}");

        // The env: what every proxy gets (its namespace, the CA exactly as the agent reaches
        // it), the waypoint's name, its account and its own settings.
        let mut want = proxy_env(&objects)?;
        want.insert("WEFT_WAYPOINT_NAME".to_string(), json!(name));
        want.insert("WEFT_LISTEN_GRACE".to_string(), json!("5s"));
        want.insert("WEFT_DRAIN_LIMIT".to_string(), json!("10s"));
        for (key, value) in env {
            want.insert((*key).to_string(), json!(value));
        }
        assert_eq!(env_of(c), want, "{name}");

        // Spread over nodes, by default, between this waypoint's own pods.
        let anti = preferred_anti_affinity(pod)?;
        let labels = pod_labels(deployment_in(&objects, namespace, name)?);
        assert!(selects(anti.label_selector.as_ref(), &labels));
    }
    // Per-waypoint values, merged over waypointDefaults.
    let pay = deployment_in(&objects, "payments", "pay")?;
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
    let weft_plurals = weft_plurals()?;
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
    assert_refused(&[
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
    ]);
    // helm lint refuses them too.
    let err = lint_with("waypoints: [{name: shop-waypoint}]").expect_err("lint");
    assert!(format!("{err:#}").contains("namespace"), "{err:#}");
    helm(&["lint", "--strict", "--namespace", DEFAULT_NS], &[])?;
    lint_with(TWO_WAYPOINTS)?;
    Ok(())
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
    let deploy = deployment_in(objects, "shop", "shop-waypoint")?;
    pod_spec_of(deploy.spec.as_ref().map(|s| &s.template))
}
