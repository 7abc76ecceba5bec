//! The ingress gateways of the Helm chart (issue 17) with the real `helm`, on the same
//! helpers as `helm_waypoint.rs` (`weft_tests::helm`): what each `gateways[]` entry renders
//! and nothing more; its least privilege: a Role that reads its own Gateway and exactly the
//! Secrets it names (none when it names none), no ClusterRole that reads a Secret, no
//! capability (ports under 1024 through the pod's sysctl); its Service (LoadBalancer of the
//! listener ports by default), command line, probe and CA settings; the GatewayClass; and
//! the gateway values that values.schema.json and the templates refuse.
//!
//! `helm` comes from `cargo xtask setup`. Without it these tests fail in CI and are skipped
//! elsewhere, with a message.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, Result, ensure};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::json;
use weft_tests::{
    helm::{
        DEFAULT_NS, NON_DEFAULT, OTHER_NS, Object, TWO_GATEWAYS, assert_no_wildcard,
        assert_refused, cluster_role, config_file, container, deployment_in, env_of, in_namespace,
        lint_with, named, pod_labels, pod_spec_of, preferred_anti_affinity, proxy_env,
        proxy_monitor_namespaces, proxy_pdb_min_available, proxy_pod, render, render_added,
        render_with_file, role_rules, rule, rules, selects, service_in, service_ports,
        service_selects, set, weft_plurals,
    },
    helm_or_skip,
};

const COMPONENT: &str = "app.kubernetes.io/component";
const READ: [&str; 3] = ["get", "list", "watch"];

#[test]
fn default_values_render_no_gateway_and_no_gateway_class() -> Result<()> {
    helm_or_skip!();
    for (namespace, values) in [(DEFAULT_NS, &[][..]), (OTHER_NS, NON_DEFAULT)] {
        let objects = render(namespace, values)?;
        let gateway: Vec<String> = objects
            .iter()
            .filter(|o| {
                o.labels().get(COMPONENT).map(String::as_str) == Some("gateway")
                    || o.kind() == "GatewayClass"
            })
            .map(Object::namespaced_id)
            .collect();
        assert!(gateway.is_empty(), "{namespace}: {gateway:?}");
    }
    Ok(())
}

#[test]
fn two_gateways_in_two_namespaces_render_exactly_their_objects() -> Result<()> {
    helm_or_skip!();
    let (objects, added) = render_added(TWO_GATEWAYS)?;
    assert_eq!(
        added,
        set([
            "edge/ServiceAccount/public",
            "edge/Deployment/public",
            "edge/Service/public",
            "edge/Service/public-metrics",
            "edge/PodDisruptionBudget/public",
            "edge/Role/weft-gateway-public",
            "edge/RoleBinding/weft-gateway-public",
            "b2b/ServiceAccount/partners-gw",
            "b2b/Deployment/partners",
            "b2b/Service/partners",
            "b2b/Service/partners-metrics",
            "b2b/PodDisruptionBudget/partners",
            "b2b/Role/weft-gateway-partners",
            "b2b/RoleBinding/weft-gateway-partners",
            "ClusterRole/weft-gateway",
            "ClusterRoleBinding/weft-gateway",
            "GatewayClass/weft",
            "weft-system/ServiceMonitor/weft-gateway",
            // The CA publishes the trust bundle where the gateways run.
            "edge/Role/weft-ca",
            "edge/RoleBinding/weft-ca",
            "b2b/Role/weft-ca",
            "b2b/RoleBinding/weft-ca",
        ])
    );
    let ca = config_file(&objects, "weft-ca", "ca.yaml")?;
    assert_eq!(
        ca["kubernetes"]["trustBundleNamespaces"],
        json!(["b2b", "edge"])
    );
    let class = named(&objects, "GatewayClass", "weft", |o| match o {
        Object::GatewayClass(c) => Some(c),
        _ => None,
    })?;
    assert_eq!(class.spec.controller_name, "weft.dev/gateway");

    // Each PDB covers its own gateway's pods, with the minAvailable asked for.
    for (gateway, other, min) in [
        (("edge", "public"), ("b2b", "partners"), 1),
        (("b2b", "partners"), ("edge", "public"), 2),
    ] {
        assert_eq!(
            proxy_pdb_min_available(&objects, gateway, other)?,
            Some(IntOrString::Int(min))
        );
    }

    // One ServiceMonitor next to the agents', for the gateways' headless metrics Services of
    // both namespaces, never their exposed Services.
    assert_eq!(
        proxy_monitor_namespaces(
            &objects,
            "gateway",
            &[("edge", "public-metrics"), ("b2b", "partners-metrics")],
            &[("edge", "public"), ("b2b", "partners")],
        )?,
        ["b2b", "edge"]
    );
    for (namespace, name) in [("edge", "public"), ("b2b", "partners")] {
        let metrics = service_in(&objects, namespace, &format!("{name}-metrics"))?;
        let spec = metrics.spec.as_ref().context("Service spec")?;
        assert_eq!(spec.cluster_ip.as_deref(), Some("None"), "headless");
        assert_eq!(
            service_ports(metrics),
            BTreeMap::from([("metrics".to_string(), (15020, "metrics".to_string()))])
        );
        let pods = pod_labels(deployment_in(&objects, namespace, name)?);
        ensure!(
            service_selects(metrics, &pods),
            "{name}-metrics selects the gateway's pods"
        );
    }
    Ok(())
}

#[test]
fn the_service_is_a_load_balancer_of_the_listener_ports_by_default() -> Result<()> {
    helm_or_skip!();
    let objects = render_with_file(DEFAULT_NS, Some(TWO_GATEWAYS), &[])?;
    for (namespace, name, kind, policy, listeners, annotations) in [
        (
            "edge",
            "public",
            "LoadBalancer",
            "Local",
            &[("https", 443), ("http", 80)][..],
            None,
        ),
        (
            "b2b",
            "partners",
            "NodePort",
            "Cluster",
            &[("api", 8443)][..],
            Some(BTreeMap::from([(
                "example.com/lb-scheme".to_string(),
                "internal".to_string(),
            )])),
        ),
    ] {
        let svc = service_in(&objects, namespace, name)?;
        let spec = svc.spec.as_ref().context("Service spec")?;
        assert_eq!(spec.type_.as_deref(), Some(kind), "{name}");
        // Local by default: the client's own address reaches the gateway.
        assert_eq!(spec.external_traffic_policy.as_deref(), Some(policy));
        assert_eq!(svc.metadata.annotations, annotations, "{name}");
        assert_eq!(spec.load_balancer_source_ranges, None);
        // The listeners, at the same port in the pod, and nothing else (no metrics port on
        // a Service that faces the outside).
        let want: BTreeMap<String, (i32, String)> = listeners
            .iter()
            .map(|(n, p)| (n.to_string(), (*p, p.to_string())))
            .collect();
        assert_eq!(service_ports(svc), want, "{name}");
        let deploy = deployment_in(&objects, namespace, name)?;
        ensure!(
            service_selects(svc, &pod_labels(deploy)),
            "{name}: the Service selects the gateway's pods"
        );
        let pod = pod_spec_of(deploy.spec.as_ref().map(|s| &s.template))?;
        let declared: BTreeSet<i32> = container(pod, "gateway")?
            .ports
            .iter()
            .flatten()
            .map(|p| p.container_port)
            .collect();
        for (_, port) in listeners {
            assert!(declared.contains(port), "{name}: container port {port}");
        }
    }

    // Source ranges on a LoadBalancer; a ClusterIP Service has no traffic policy.
    let values = "\
gateways:
  - name: public
    namespace: edge
    listeners: [{name: https, port: 443}]
    service: {loadBalancerSourceRanges: [203.0.113.0/24]}
  - name: inside
    namespace: edge
    listeners: [{name: http, port: 8080}]
    service: {type: ClusterIP}
";
    let objects = render_with_file(DEFAULT_NS, Some(values), &[])?;
    let public = service_in(&objects, "edge", "public")?.spec.clone();
    assert_eq!(
        public.and_then(|s| s.load_balancer_source_ranges),
        Some(vec!["203.0.113.0/24".to_string()])
    );
    let inside = service_in(&objects, "edge", "inside")?
        .spec
        .clone()
        .unwrap_or_default();
    assert_eq!(inside.type_.as_deref(), Some("ClusterIP"));
    assert_eq!(inside.external_traffic_policy, None);
    Ok(())
}

#[test]
fn gateway_pod_runs_unprivileged_with_its_command_line_probe_and_the_agents_ca_settings()
-> Result<()> {
    helm_or_skip!();
    let objects = render_with_file(DEFAULT_NS, Some(TWO_GATEWAYS), &[])?;
    for (namespace, name, args, sysctl, grace, env) in [
        (
            "edge",
            "public",
            &[
                "gateway",
                "--source",
                "kubernetes",
                "--name",
                "public",
                "--tls-secret",
                "shop-cert",
                "--tls-secret",
                "api-cert",
            ][..],
            // Port 80 is its lowest listener.
            Some("80"),
            30,
            [
                ("WEFT_SERVICE_ACCOUNT", "public"),
                ("WEFT_LOG_FORMAT", "json"),
                ("WEFT_LISTEN_GRACE", "5s"),
                ("WEFT_DRAIN_LIMIT", "10s"),
            ],
        ),
        (
            "b2b",
            "partners",
            &["gateway", "--source", "kubernetes", "--name", "partners"][..],
            // 8443 needs no sysctl.
            None,
            90,
            [
                ("WEFT_SERVICE_ACCOUNT", "partners-gw"),
                ("WEFT_LOG_FORMAT", "text"),
                ("WEFT_LISTEN_GRACE", "8s"),
                ("WEFT_DRAIN_LIMIT", "60s"),
            ],
        ),
    ] {
        // Unprivileged (no capability, not even NET_BIND_SERVICE), never enrolled, nothing
        // of the host, the agent's CA files: as every proxy of the chart.
        let (pod, c) = proxy_pod(&objects, namespace, name, "gateway")?;
        assert_eq!(pod.termination_grace_period_seconds, Some(grace), "{name}");
        // Ports under 1024 through this pod's own sysctl, from its lowest listener up.
        let sysctls: Vec<(String, String)> = pod
            .security_context
            .as_ref()
            .and_then(|s| s.sysctls.clone())
            .unwrap_or_default()
            .into_iter()
            .map(|s| (s.name, s.value))
            .collect();
        let want: Vec<(String, String)> = sysctl
            .map(|v| ("net.ipv4.ip_unprivileged_port_start".into(), v.into()))
            .into_iter()
            .collect();
        assert_eq!(sysctls, want, "{name}");
        let want: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        assert_eq!(c.args.as_ref(), Some(&want));
        let named_ports: BTreeMap<String, i32> = c
            .ports
            .iter()
            .flatten()
            .filter_map(|p| Some((p.name.clone()?, p.container_port)))
            .collect();
        assert_eq!(
            named_ports,
            BTreeMap::from([("metrics".into(), 15020), ("readiness".into(), 15021)])
        );
        // The env: what every proxy gets (its namespace, the CA exactly as the agent reaches
        // it), its account and its own settings.
        let mut want = proxy_env(&objects)?;
        for (key, value) in env {
            want.insert(key.to_string(), json!(value));
        }
        assert_eq!(env_of(c), want, "{name}");
    }

    // Defaults: two replicas, spread over nodes. Per-gateway values, merged over
    // gatewayDefaults.
    let public = deployment_in(&objects, "edge", "public")?;
    assert_eq!(public.spec.as_ref().and_then(|s| s.replicas), Some(2));
    let pod = pod_spec_of(public.spec.as_ref().map(|s| &s.template))?;
    let anti = preferred_anti_affinity(pod)?;
    assert!(selects(anti.label_selector.as_ref(), &pod_labels(public)));
    let partners = deployment_in(&objects, "b2b", "partners")?;
    assert_eq!(partners.spec.as_ref().and_then(|s| s.replicas), Some(3));
    let pod = pod_spec_of(partners.spec.as_ref().map(|s| &s.template))?;
    assert_eq!(pod.service_account_name.as_deref(), Some("partners-gw"));
    assert_eq!(
        pod.node_selector,
        Some(BTreeMap::from([
            ("kubernetes.io/os".to_string(), "linux".to_string()),
            ("pool".to_string(), "edge".to_string()),
        ]))
    );
    assert_eq!(pod.tolerations.as_ref().map(Vec::len), Some(1));
    let affinity = pod.affinity.clone().unwrap_or_default();
    assert!(affinity.node_affinity.is_some() && affinity.pod_anti_affinity.is_none());
    let resources = container(pod, "gateway")?.resources.clone();
    assert_eq!(
        serde_json::to_value(resources)?,
        json!({"requests": {"cpu": "500m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}})
    );
    Ok(())
}

#[test]
fn gateway_rbac_reads_its_own_gateway_and_exactly_the_secrets_it_names() -> Result<()> {
    helm_or_skip!();
    // A waypoint too: the gateway reads what the waypoint reads, without its status writes.
    let objects = render_with_file(
        DEFAULT_NS,
        Some(TWO_GATEWAYS),
        &["waypoints[0].name=wp", "waypoints[0].namespace=shop"],
    )?;
    let weft_plurals = weft_plurals()?;
    let plurals: Vec<&str> = weft_plurals.iter().map(String::as_str).collect();
    let gateway_rules = rules(&cluster_role(&objects, "weft-gateway")?.rules);
    assert_eq!(
        gateway_rules,
        BTreeSet::from([
            rule("", &["namespaces", "pods", "services"], &READ, &[]),
            rule("discovery.k8s.io", &["endpointslices"], &READ, &[]),
            rule("weft.dev", &plurals, &READ, &[]),
            rule(
                "gateway.networking.k8s.io",
                &["httproutes", "grpcroutes"],
                &READ,
                &[]
            ),
            rule(
                "gateway.networking.k8s.io",
                &["tlsroutes", "tcproutes"],
                &READ,
                &[]
            ),
        ])
    );
    let waypoint_rules = rules(&cluster_role(&objects, "weft-waypoint")?.rules);
    // The waypoint has the gateway's reads but the passthrough routes', plus status writes.
    assert_eq!(
        gateway_rules
            .difference(&waypoint_rules)
            .collect::<Vec<_>>(),
        [&rule(
            "gateway.networking.k8s.io",
            &["tlsroutes", "tcproutes"],
            &READ,
            &[]
        )]
    );
    assert_eq!(
        waypoint_rules
            .difference(&gateway_rules)
            .collect::<Vec<_>>(),
        [&rule(
            "gateway.networking.k8s.io",
            &["httproutes/status", "grpcroutes/status"],
            &["patch", "update"],
            &[]
        )]
    );

    // In its namespace: its own Gateway, and the Secrets it names; none when it names none.
    for (namespace, name, secrets) in [
        ("edge", "public", &["shop-cert", "api-cert"][..]),
        ("b2b", "partners", &[][..]),
    ] {
        let role_name = format!("weft-gateway-{name}");
        let role = in_namespace(&objects, namespace, "Role", &role_name, |o| match o {
            Object::Role(r) => Some(r),
            _ => None,
        })?;
        let mut want = BTreeSet::from([rule(
            "gateway.networking.k8s.io",
            &["gateways"],
            &READ,
            &[name],
        )]);
        if !secrets.is_empty() {
            want.insert(rule("", &["secrets"], &READ, secrets));
        }
        assert_eq!(rules(&role.rules), want, "{namespace}/{role_name}");
    }
    // Who is bound to what: each gateway's account, to its own Role and to weft-gateway.
    for (namespace, name, account) in [
        ("edge", "public", "public"),
        ("b2b", "partners", "partners-gw"),
    ] {
        let role_name = format!("weft-gateway-{name}");
        let binding = in_namespace(
            &objects,
            namespace,
            "RoleBinding",
            &role_name,
            |o| match o {
                Object::RoleBinding(b) => Some(b),
                _ => None,
            },
        )?;
        assert_eq!(
            (
                binding.role_ref.kind.as_str(),
                binding.role_ref.name.as_str()
            ),
            ("Role", role_name.as_str())
        );
        assert_eq!(
            subjects(binding.subjects.as_deref()),
            set([format!("{namespace}/{account}")])
        );
    }
    let binding = named(
        &objects,
        "ClusterRoleBinding",
        "weft-gateway",
        |o| match o {
            Object::ClusterRoleBinding(b) => Some(b),
            _ => None,
        },
    )?;
    assert_eq!(binding.role_ref.name, "weft-gateway");
    assert_eq!(
        subjects(binding.subjects.as_deref()),
        set(["edge/public", "b2b/partners-gw"])
    );

    // Across the whole chart: no wildcard, and Secrets only in that one Role, by name, read.
    assert_no_wildcard(&objects);
    let secret_rules: Vec<(String, BTreeSet<String>, BTreeSet<String>)> = role_rules(&objects)
        .into_iter()
        .filter(|(_, r)| r.resources.contains("secrets"))
        .map(|(role, r)| (role, r.resource_names, r.verbs))
        .collect();
    assert_eq!(
        secret_rules,
        [(
            "edge/Role/weft-gateway-public".to_string(),
            set(["shop-cert", "api-cert"]),
            set(READ)
        )]
    );
    Ok(())
}

#[test]
fn the_pdb_and_the_metrics_render_only_when_enabled() -> Result<()> {
    helm_or_skip!();
    let objects = render_with_file(
        DEFAULT_NS,
        Some(TWO_GATEWAYS),
        &[
            "serviceMonitor.enabled=false",
            "gatewayDefaults.podDisruptionBudget.enabled=false",
        ],
    )?;
    let ids: BTreeSet<String> = objects.iter().map(Object::namespaced_id).collect();
    for gone in [
        "edge/PodDisruptionBudget/public",
        "b2b/PodDisruptionBudget/partners",
        "edge/Service/public-metrics",
        "b2b/Service/partners-metrics",
        "weft-system/ServiceMonitor/weft-gateway",
    ] {
        assert!(!ids.contains(gone), "{gone} in {ids:?}");
    }
    // One replica: no PDB either (it would block every drain of its node).
    let objects = render_with_file(DEFAULT_NS, Some(TWO_GATEWAYS), &["gateways[0].replicas=1"])?;
    let ids: BTreeSet<String> = objects.iter().map(Object::namespaced_id).collect();
    assert!(!ids.contains("edge/PodDisruptionBudget/public"), "{ids:?}");
    assert!(ids.contains("b2b/PodDisruptionBudget/partners"), "{ids:?}");
    Ok(())
}

#[test]
fn the_gateway_class_renders_once_for_all_gateways_and_can_be_left_out() -> Result<()> {
    helm_or_skip!();
    let count = |objects: &[Object]| {
        objects
            .iter()
            .filter(|o| o.kind() == "GatewayClass")
            .count()
    };
    assert_eq!(
        count(&render_with_file(DEFAULT_NS, Some(TWO_GATEWAYS), &[])?),
        1
    );
    let without = render_with_file(
        DEFAULT_NS,
        Some(TWO_GATEWAYS),
        &["gatewayClass.enabled=false"],
    )?;
    assert_eq!(count(&without), 0);
    deployment_in(&without, "edge", "public")?;
    Ok(())
}

#[test]
fn bad_gateway_values_are_refused_naming_the_field() -> Result<()> {
    helm_or_skip!();
    let listeners = "listeners: [{name: https, port: 443}]";
    assert_refused(&[
        (
            "gateways: [{name: gw, namespace: edge}]".to_string(),
            &["/gateways/0", "listeners"][..],
        ),
        (
            format!("gateways: [{{name: gw, namespace: edge, {listeners}, replica: 2}}]"),
            &["/gateways/0", "replica"],
        ),
        (
            "gateways: [{name: gw, namespace: edge, listeners: [{name: https, port: 0}]}]".into(),
            &["/gateways/0/listeners/0/port"],
        ),
        (
            "gateways: [{name: gw, namespace: edge, listeners: [{name: https, port: 70000}]}]"
                .into(),
            &["/gateways/0/listeners/0/port"],
        ),
        (
            "gateways: [{name: gw, namespace: edge, listeners: [{name: https, port: '443'}]}]"
                .into(),
            &["/gateways/0/listeners/0/port"],
        ),
        (
            "gateways: [{name: gw, namespace: edge, listeners: [{name: a.b, port: 443}]}]".into(),
            &["/gateways/0/listeners/0/name"],
        ),
        (
            "gateways: [{name: gw, namespace: edge, listeners: [{name: https, port: 443, \
             protocol: HTTPS}]}]"
                .into(),
            &["/gateways/0/listeners/0", "protocol"],
        ),
        (
            format!("gateways: [{{name: gw, namespace: edge, {listeners}, tlsSecrets: [a, a]}}]"),
            &["/gateways/0/tlsSecrets"],
        ),
        (
            format!("gateways: [{{name: gw, namespace: edge, {listeners}, tlsSecrets: [A_b]}}]"),
            &["/gateways/0/tlsSecrets/0"],
        ),
        (
            format!(
                "gateways: [{{name: gw, namespace: edge, {listeners}, service: {{type: External}}}}]"
            ),
            &["/gateways/0/service/type"],
        ),
        (
            format!(
                "gateways: [{{name: {}, namespace: edge, {listeners}}}]",
                "g".repeat(56)
            ),
            &["/gateways/0/name"],
        ),
        (
            "gateways: [{name: gw, namespace: edge, listeners: [{name: a, port: 443}, \
             {name: b, port: 443}]}]"
                .into(),
            &["gateways[0].listeners[1].port", "443 is given twice"],
        ),
        (
            "gateways: [{name: gw, namespace: edge, listeners: [{name: a, port: 443}, \
             {name: a, port: 80}]}]"
                .into(),
            &["gateways[0].listeners[1].name", "given twice"],
        ),
        (
            "gateways: [{name: gw, namespace: edge, listeners: [{name: m, port: 15020}]}]".into(),
            &[
                "gateways[0].listeners[0].port",
                "15020 is the gateway's own",
            ],
        ),
        (
            format!(
                "gateways: [{{name: gw, namespace: edge, {listeners}, service: {{type: ClusterIP, \
                 loadBalancerSourceRanges: [10.0.0.0/8]}}}}]"
            ),
            &["gateways[0].service.loadBalancerSourceRanges"],
        ),
        (
            format!(
                "gateways: [{{name: gw, namespace: edge, {listeners}, podDisruptionBudget: \
                 {{minAvailable: 2}}}}]"
            ),
            &["gateways[0].podDisruptionBudget.minAvailable", "2 of 2"],
        ),
        (
            format!(
                "gateways: [{{name: gw, namespace: edge, {listeners}, drainLimitSeconds: 25}}]"
            ),
            &["gateways[0].terminationGracePeriodSeconds (30)"],
        ),
        (
            format!(
                "gateways: [{{name: gw, namespace: edge, {listeners}}}, \
                 {{name: gw, namespace: edge, {listeners}}}]"
            ),
            &["gateways[1]", "edge/gw", "twice"],
        ),
        // A waypoint's name, or its identity: the services bound to that waypoint admit it.
        (
            format!(
                "waypoints: [{{name: gw, namespace: edge}}]\n\
                 gateways: [{{name: gw, namespace: edge, {listeners}}}]"
            ),
            &["gateways[0].name", "edge/gw", "waypoint"],
        ),
        (
            format!(
                "serviceMonitor: {{enabled: true}}\n\
                 gateways: [{{name: gw, namespace: edge, {listeners}}}, \
                 {{name: gw-metrics, namespace: edge, {listeners}}}]"
            ),
            &["gateways[0].name", "edge/gw-metrics", "metrics Service"],
        ),
        (
            format!(
                "waypoints: [{{name: wp, namespace: edge}}]\n\
                 gateways: [{{name: gw, namespace: edge, serviceAccount: wp, {listeners}}}]"
            ),
            &["gateways[0].serviceAccount", "edge/wp", "waypoint's"],
        ),
        (
            format!(
                "gateways: [{{name: gw, namespace: edge, {listeners}}}]\ngatewayClass: {{name: x}}"
            ),
            &["/gatewayClass", "name"],
        ),
    ]);
    // helm lint refuses them too, and passes the good ones.
    let err = lint_with("gateways: [{name: gw, namespace: edge}]").expect_err("lint");
    assert!(format!("{err:#}").contains("listeners"), "{err:#}");
    lint_with(TWO_GATEWAYS)?;
    Ok(())
}

/// A binding's subjects as `namespace/name`; each must be a ServiceAccount.
fn subjects(subjects: Option<&[k8s_openapi::api::rbac::v1::Subject]>) -> BTreeSet<String> {
    subjects
        .into_iter()
        .flatten()
        .map(|s| {
            assert_eq!(s.kind, "ServiceAccount");
            format!("{}/{}", s.namespace.as_deref().unwrap_or_default(), s.name)
        })
        .collect()
}
