//! The Helm chart (`deploy/helm/weft`) with the real `helm` (issue 6, item 5): `helm lint`
//! and `helm template` with the default values and with non-default ones; every rendered
//! object is checked against the Kubernetes API types (k8s-openapi, Kubernetes 1.33):
//! deserialized into the type of its kind and serialized back, which must give the rendered
//! JSON exactly, so a misspelt or misplaced field fails (serde alone would drop it); a kind
//! the test does not know fails too. Then what matters is asserted: least privilege (no
//! `privileged`, the exact capability set), the host mounts, tolerations, the readiness
//! probe, the rollout, the agent's configuration against the pod it runs in (and against the
//! real agent's parser), the uninstall hook, RBAC verbs and values.schema.json. The
//! waypoints the chart renders (issue 7) are checked in `helm_waypoint.rs`.
//!
//! `helm` comes from `cargo xtask setup`. Without it these tests fail in CI and are skipped
//! elsewhere, with a message.

use std::{
    collections::{BTreeMap, BTreeSet},
    process::Command,
};

use anyhow::{Context, Result, ensure};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{Value, json};
use weft_tests::{
    helm::{
        DEFAULT_NS, NON_DEFAULT, OTHER_NS, Object, Rule, TWO_GATEWAYS, TWO_WAYPOINTS, agent_pod,
        assert_no_wildcard_and_no_secrets, bindings, ca_trust_bundle_rules, cluster_role,
        config_file, container, containers, crd_files, daemonset, deployment, helm, host_mounts,
        mounted_volume, named, pod_spec_of, pods, render, render_with_file, role, rule, rules,
        selects, service, set, str_at, weft_plurals,
    },
    helm_or_skip,
};

#[test]
fn chart_lints_with_default_and_non_default_values() -> Result<()> {
    helm_or_skip!();
    helm(&["lint", "--strict"], &[])?;
    helm(&["lint", "--strict", "--namespace", OTHER_NS], NON_DEFAULT)?;
    Ok(())
}

#[test]
fn every_rendered_object_is_a_valid_kubernetes_object() -> Result<()> {
    helm_or_skip!();
    for (namespace, values) in [(DEFAULT_NS, &[][..]), (OTHER_NS, NON_DEFAULT)] {
        let objects = render(namespace, values)?;
        for object in &objects {
            let scoped = object.namespace();
            if object.is_cluster_scoped() {
                ensure!(
                    scoped.is_none(),
                    "{}: cluster-scoped, has a namespace",
                    object.id()
                );
            } else {
                ensure!(
                    scoped.as_deref() == Some(namespace),
                    "{}: namespace {scoped:?}, want {namespace}",
                    object.id()
                );
            }
        }
        let ids: BTreeSet<String> = objects.iter().map(Object::id).collect();
        ensure!(ids.len() == objects.len(), "duplicate objects in {ids:?}");
    }
    Ok(())
}

#[test]
fn agent_runs_with_least_privilege_by_default() -> Result<()> {
    helm_or_skip!();
    let objects = render(DEFAULT_NS, &[])?;
    for (owner, pod) in pods(&objects) {
        for c in containers(pod) {
            let sc = c.security_context.clone().unwrap_or_default();
            ensure!(
                sc.privileged != Some(true),
                "{owner}/{}: privileged",
                c.name
            );
        }
    }
    let agent = agent_pod(&objects)?;
    let main = container(agent, "agent")?;
    let sc = main.security_context.clone().unwrap_or_default();
    let caps = sc.capabilities.clone().unwrap_or_default();
    assert_eq!(caps.drop, Some(vec!["ALL".to_string()]));
    assert_eq!(
        set(caps.add.iter().flatten()),
        set([
            "BPF",
            "NET_ADMIN",
            "SYS_ADMIN",
            "SYS_PTRACE",
            "SYS_RESOURCE"
        ]),
        "the agent's capabilities"
    );
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    let installer = container(agent, "cni-installer")?;
    let isc = installer.security_context.clone().unwrap_or_default();
    let icaps = isc.capabilities.unwrap_or_default();
    assert_eq!(icaps.drop, Some(vec!["ALL".to_string()]));
    assert!(
        icaps.add.unwrap_or_default().is_empty(),
        "the installer needs no capability"
    );
    assert_eq!(isc.allow_privilege_escalation, Some(false));

    let ca = deployment(&objects, "weft-ca")?;
    let ca_pod = pod_spec_of(ca.spec.as_ref().map(|s| &s.template))?;
    let ca_sc = container(ca_pod, "ca")?
        .security_context
        .clone()
        .unwrap_or_default();
    assert_eq!(ca_sc.run_as_non_root, Some(true));
    assert_eq!(ca_sc.allow_privilege_escalation, Some(false));
    assert_eq!(ca_sc.read_only_root_filesystem, Some(true));
    let ca_caps = ca_sc.capabilities.unwrap_or_default();
    assert!(
        ca_caps.add.unwrap_or_default().is_empty(),
        "the CA needs no capability"
    );
    assert!(ca_pod.host_network != Some(true) && ca_pod.host_pid != Some(true));
    Ok(())
}

#[test]
fn agent_pod_has_its_host_mounts_tolerations_probe_and_rollout() -> Result<()> {
    helm_or_skip!();
    let objects = render(DEFAULT_NS, &[])?;
    let ds = daemonset(&objects, "weft-agent")?;
    let pod = agent_pod(&objects)?;
    assert_eq!(
        pod.host_network,
        Some(true),
        "hostNetwork: no CNI needed by the agent"
    );
    assert_eq!(pod.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
    assert_eq!(pod.host_pid, Some(true), "cgroup.procs pids are host pids");
    assert_eq!(pod.service_account_name.as_deref(), Some("weft-agent"));

    // Host paths, by container and mount path: exactly these, nothing else of the host.
    assert_eq!(
        host_mounts(pod, "agent")?,
        BTreeMap::from([
            ("/host/proc".to_string(), "/proc".to_string()),
            ("/sys/fs/bpf".to_string(), "/sys/fs/bpf".to_string()),
            ("/sys/fs/cgroup".to_string(), "/sys/fs/cgroup".to_string()),
            ("/var/run/netns".to_string(), "/var/run/netns".to_string()),
            ("/var/run/weft".to_string(), "/var/run/weft".to_string()),
        ])
    );
    assert_eq!(
        host_mounts(pod, "cni-installer")?,
        BTreeMap::from([
            ("/etc/cni/net.d".to_string(), "/etc/cni/net.d".to_string()),
            ("/opt/cni/bin".to_string(), "/opt/cni/bin".to_string()),
            ("/var/run/weft".to_string(), "/var/run/weft".to_string()),
        ])
    );
    let main = container(pod, "agent")?;
    let mount = |path: &str| {
        main.volume_mounts
            .iter()
            .flatten()
            .find(|m| m.mount_path == path)
            .with_context(|| format!("agent mounts nothing at {path}"))
    };
    // Netns bind mounts made after the agent started are only visible with propagation.
    assert_eq!(
        mount("/var/run/netns")?.mount_propagation.as_deref(),
        Some("HostToContainer")
    );
    for read_only in ["/sys/fs/cgroup", "/host/proc", "/var/run/netns"] {
        assert_eq!(
            mount(read_only)?.read_only,
            Some(true),
            "{read_only} read-only"
        );
    }
    assert_ne!(
        mount("/sys/fs/bpf")?.read_only,
        Some(true),
        "the agent pins"
    );

    // Every node, whatever its taints.
    let tolerations = pod.tolerations.clone().unwrap_or_default();
    assert!(
        tolerations
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()),
        "tolerates every taint: {tolerations:?}"
    );
    // But not virtual nodes, which cannot run it.
    let affinity = serde_json::to_value(&pod.affinity)?;
    assert!(
        affinity.to_string().contains("virtual-kubelet"),
        "{affinity}"
    );

    let probe = main
        .readiness_probe
        .clone()
        .context("agent readiness probe")?;
    let get = probe.http_get.context("readiness probe is an HTTP GET")?;
    assert_eq!(get.path.as_deref(), Some("/healthz/ready"));
    assert_eq!(get.port, IntOrString::Int(15021));
    assert!(
        main.liveness_probe.is_none(),
        "a liveness kill fails the node closed"
    );

    let spec = ds.spec.as_ref().context("DaemonSet spec")?;
    let strategy = spec.update_strategy.clone().context("update strategy")?;
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    let rolling = strategy.rolling_update.context("rollingUpdate")?;
    assert_eq!(
        rolling.max_unavailable,
        Some(IntOrString::Int(0)),
        "no node without a serving agent"
    );
    assert_eq!(
        rolling.max_surge,
        Some(IntOrString::Int(1)),
        "the new agent starts beside the old one, and takes over"
    );
    assert!(spec.min_ready_seconds.unwrap_or(0) > 0);
    // Host ports (hostNetwork) would keep the surge pod off the node.
    assert!(
        main.ports.as_ref().is_none_or(|p| p.is_empty()),
        "{:?}",
        main.ports
    );

    // The command line other engineers implement.
    assert_eq!(
        main.args.clone().unwrap_or_default(),
        [
            "agent",
            "--source",
            "kubernetes",
            "--node-name",
            "$(NODE_NAME)",
            "--config",
            "/etc/weft/agent.yaml"
        ]
    );
    let node_name = main
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "NODE_NAME")
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.field_ref.as_ref())
        .map(|f| f.field_path.clone());
    assert_eq!(node_name.as_deref(), Some("spec.nodeName"));
    assert_eq!(
        container(pod, "cni-installer")?
            .args
            .clone()
            .unwrap_or_default(),
        [
            "cni",
            "install",
            "--watch",
            "--bin-dir",
            "/opt/cni/bin",
            "--conf-dir",
            "/etc/cni/net.d",
            "--socket",
            "/var/run/weft/cni.sock"
        ]
    );
    Ok(())
}

#[test]
fn agent_config_matches_the_pod_it_runs_in() -> Result<()> {
    helm_or_skip!();
    let objects = render(DEFAULT_NS, &[])?;
    let pod = agent_pod(&objects)?;
    let config = config_file(&objects, "weft-agent", "agent.yaml")?;
    let keys: BTreeSet<&str> = config
        .as_object()
        .context("agent.yaml is a map")?
        .keys()
        .map(String::as_str)
        .collect();
    // The agent's settings only: workloads, services and policies come from the API.
    assert_eq!(keys, BTreeSet::from(["agent", "mesh"]));
    let agent = &config["agent"];
    assert_eq!(
        agent["adminAddr"], "127.0.0.1:15000",
        "admin stays on the node"
    );
    assert_eq!(agent["readinessAddr"], "0.0.0.0:15021");
    assert_eq!(agent["metricsAddr"], "0.0.0.0:15020");
    assert_eq!(agent["pinRoot"], "/sys/fs/bpf/weft");
    let remote = &agent["ca"]["remote"];
    assert_eq!(remote["addr"], "weft-ca.weft-system.svc:15012");
    assert_eq!(remote["serverName"], "weft-ca.weft-system.svc");

    // The files the config names are where the pod mounts them.
    let main = container(pod, "agent")?;
    let token_file = str_at(remote, "tokenFile")?;
    let (dir, file) = token_file.rsplit_once('/').context("tokenFile path")?;
    let volume = mounted_volume(pod, main, dir)?;
    let token = volume
        .projected
        .as_ref()
        .and_then(|p| p.sources.as_ref())
        .and_then(|s| s.iter().find_map(|s| s.service_account_token.as_ref()))
        .context("the token volume is a projected service-account token")?;
    assert_eq!(token.path, file);
    assert_eq!(
        token.audience.as_deref(),
        Some("weft-ca"),
        "bound to the CA's audience"
    );
    let root_cert = str_at(remote, "rootCert")?;
    let (dir, _) = root_cert.rsplit_once('/').context("rootCert path")?;
    let bundle = mounted_volume(pod, main, dir)?;
    assert_eq!(
        bundle.config_map.as_ref().map(|c| c.name.as_str()),
        Some("weft-trust-bundle"),
        "the agent trusts what the CA publishes"
    );
    assert_eq!(
        mounted_volume(pod, main, "/etc/weft/agent.yaml")?
            .config_map
            .as_ref()
            .map(|c| c.name.as_str()),
        Some("weft-agent")
    );
    assert!(
        str_at(agent, "pinRoot")?.starts_with("/sys/fs/bpf/"),
        "pins under the mounted bpffs"
    );

    // The CA is where the agent dials, and reads its root from the Secret it alone mounts.
    let service = service(&objects, "weft-ca")?;
    let port = service.spec.as_ref().and_then(|s| s.ports.as_ref());
    assert_eq!(port.and_then(|p| p.first()).map(|p| p.port), Some(15012));
    let ca_config = config_file(&objects, "weft-ca", "ca.yaml")?;
    assert_eq!(ca_config["listen"], "0.0.0.0:15012");
    assert!(
        ca_config["serverNames"]
            .as_array()
            .is_some_and(|n| n.contains(&json!("weft-ca.weft-system.svc"))),
        "the CA's certificate names what the agents verify: {ca_config}"
    );
    assert_eq!(ca_config["kubernetes"]["audience"], "weft-ca");
    assert_eq!(
        ca_config["kubernetes"]["agentServiceAccount"],
        "weft-system/weft-agent"
    );
    assert_eq!(
        ca_config["kubernetes"]["trustBundleConfigMap"],
        "weft-trust-bundle"
    );
    let mut secret_mounts = Vec::new();
    for (owner, pod) in pods(&objects) {
        for volume in pod.volumes.iter().flatten() {
            if let Some(secret) = &volume.secret {
                secret_mounts.push((owner.clone(), secret.secret_name.clone()));
            }
        }
    }
    assert_eq!(
        secret_mounts,
        [(
            "Deployment/weft-ca".to_string(),
            Some("weft-ca-root".to_string())
        )]
    );
    Ok(())
}

#[test]
fn uninstall_hook_cleans_every_node_after_its_agent_is_gone() -> Result<()> {
    helm_or_skip!();
    let objects = render(DEFAULT_NS, &[])?;
    let hook = daemonset(&objects, "weft-node-cleanup")?;
    let annotations = hook.metadata.annotations.clone().unwrap_or_default();
    assert_eq!(
        annotations.get("helm.sh/hook").map(String::as_str),
        Some("pre-delete")
    );
    let pod = pod_spec_of(hook.spec.as_ref().map(|s| &s.template))?;
    let agent = agent_pod(&objects)?;
    // On every node the agent ran on (and only there), reaching its readiness port.
    assert_eq!(pod.tolerations, agent.tolerations);
    assert_eq!(pod.affinity, agent.affinity);
    assert_eq!(pod.node_selector, agent.node_selector);
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(
        pod.automount_service_account_token,
        Some(false),
        "needs no API access"
    );
    let init: Vec<&str> = pod
        .init_containers
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(
        init,
        ["remove-pins", "remove-cni"],
        "pins first, once the agent is gone"
    );

    let config = config_file(&objects, "weft-agent", "agent.yaml")?;
    let pins = container(pod, "remove-pins")?;
    let readiness = str_at(&config["agent"], "readinessAddr")?.replace("0.0.0.0", "127.0.0.1");
    assert_eq!(
        pins.args.clone().unwrap_or_default(),
        [
            "uninstall",
            "--pin-root",
            str_at(&config["agent"], "pinRoot")?,
            "--wait-for-agent",
            readiness.as_str(),
            "--timeout",
            "10m"
        ]
    );
    let caps = pins
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.clone())
        .unwrap_or_default();
    assert_eq!(caps.add, Some(vec!["BPF".to_string()]), "bpf(2) only");
    assert_eq!(
        host_mounts(pod, "remove-pins")?,
        BTreeMap::from([("/sys/fs/bpf".to_string(), "/sys/fs/bpf".to_string())])
    );
    let cni = container(pod, "remove-cni")?;
    assert_eq!(
        cni.args.clone().unwrap_or_default(),
        [
            "cni",
            "uninstall",
            "--bin-dir",
            "/opt/cni/bin",
            "--conf-dir",
            "/etc/cni/net.d"
        ]
    );
    let mut installer = host_mounts(agent, "cni-installer")?;
    installer.remove("/var/run/weft");
    assert_eq!(
        host_mounts(pod, "remove-cni")?,
        installer,
        "what the installer wrote"
    );

    let without = render(DEFAULT_NS, &["uninstall.enabled=false"])?;
    assert!(daemonset(&without, "weft-node-cleanup").is_err());
    Ok(())
}

#[test]
fn the_real_agent_accepts_the_rendered_agent_yaml() -> Result<()> {
    helm_or_skip!();
    // The agent parses and validates its whole config file before it touches the kernel, and
    // exits 2 on a config error (docs/config.md). With a pin root that is not on bpffs it then
    // stops at the first kernel step, exit 1: so exit 1 naming bpffs means the file was valid.
    for (namespace, values) in [(DEFAULT_NS, &[][..]), (OTHER_NS, NON_DEFAULT)] {
        let objects = render(namespace, values)?;
        let stderr = run_with_rendered_config(&objects, "weft-agent", "agent.yaml", |cmd, dir| {
            cmd.arg("agent")
                .arg("--pin-root")
                .arg(dir.join("pins"))
                .arg("--cgroup-root")
                .arg(dir);
        })?;
        assert!(stderr.contains("bpffs"), "{namespace}: {stderr}");
    }
    Ok(())
}

#[test]
fn the_real_ca_accepts_the_rendered_ca_yaml() -> Result<()> {
    helm_or_skip!();
    // `weft ca` validates ca.yaml whole first (exit 2 naming the field); a valid file in
    // Kubernetes mode then needs the API, which this machine has not: exit 1 saying so.
    // With waypoints or gateways, ca.yaml also names their namespaces (trustBundleNamespaces).
    for (namespace, file, values) in [
        (DEFAULT_NS, None, &[][..]),
        (OTHER_NS, None, NON_DEFAULT),
        (DEFAULT_NS, Some(TWO_WAYPOINTS), &[][..]),
        (DEFAULT_NS, Some(TWO_GATEWAYS), &[][..]),
    ] {
        let objects = render_with_file(namespace, file, values)?;
        let stderr = run_with_rendered_config(&objects, "weft-ca", "ca.yaml", |cmd, _| {
            cmd.arg("ca");
        })?;
        assert!(
            stderr.contains("cannot connect to the Kubernetes API"),
            "{namespace}: {stderr}"
        );
    }
    Ok(())
}

/// Runs the real `weft` with the rendered `configmap/key` as `--config` (after the
/// arguments `args` adds, given a scratch directory) and returns its stderr; fails unless
/// it exited 1, i.e. got past its config.
fn run_with_rendered_config(
    objects: &[Object],
    configmap: &str,
    key: &str,
    args: impl FnOnce(&mut Command, &std::path::Path),
) -> Result<String> {
    let bin = weft_tests::app::weft_bin();
    ensure!(
        bin.is_file(),
        "agent binary {} not found: `cargo build -p weft` (or set WEFT_BIN)",
        bin.display()
    );
    let text = serde_yaml::to_string(&config_file(objects, configmap, key)?)?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join(key);
    std::fs::write(&path, text)?;
    let mut cmd = Command::new(&bin);
    args(&mut cmd, dir.path());
    cmd.arg("--config").arg(&path);
    // The file is the whole truth: no flag defaults from the caller's environment.
    for var in weft_tests::agent::OVERRIDES {
        cmd.env_remove(var);
    }
    cmd.env_remove("KUBECONFIG");
    let out = cmd.output().context("run weft")?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(
        out.status.code() == Some(1),
        "{configmap}/{key}: exit {:?}: {stderr}",
        out.status.code()
    );
    Ok(stderr)
}

#[test]
fn rbac_grants_exactly_what_each_component_needs() -> Result<()> {
    helm_or_skip!();
    let weft_plurals = weft_plurals()?;
    let read = ["get", "list", "watch"];

    for (namespace, values, gateway) in
        [(DEFAULT_NS, &[][..], false), (OTHER_NS, NON_DEFAULT, true)]
    {
        let objects = render(namespace, values)?;
        let mut agent = vec![
            rule("", &["namespaces", "pods", "services"], &read, &[]),
            rule("discovery.k8s.io", &["endpointslices"], &read, &[]),
            rule("events.k8s.io", &["events"], &["create"], &[]),
        ];
        if !weft_plurals.is_empty() {
            let plurals: Vec<&str> = weft_plurals.iter().map(String::as_str).collect();
            agent.push(rule("weft.dev", &plurals, &read, &[]));
            // The Accepted condition of policies that fail closed (issue 13, finding 2).
            let status: Vec<String> = plurals.iter().map(|p| format!("{p}/status")).collect();
            let status: Vec<&str> = status.iter().map(String::as_str).collect();
            agent.push(rule("weft.dev", &status, &["patch"], &[]));
        }
        if gateway {
            agent.push(rule(
                "gateway.networking.k8s.io",
                &["httproutes"],
                &read,
                &[],
            ));
        }
        assert_eq!(
            rules(&cluster_role(&objects, "weft-agent")?.rules),
            agent.into_iter().collect::<BTreeSet<Rule>>()
        );
        assert_eq!(
            rules(&cluster_role(&objects, "weft-ca")?.rules),
            BTreeSet::from([
                rule("authentication.k8s.io", &["tokenreviews"], &["create"], &[]),
                rule("", &["pods"], &read, &[]),
            ])
        );
        assert_eq!(
            rules(&role(&objects, "weft-ca")?.rules),
            ca_trust_bundle_rules()
        );

        // Every binding gives its role to its own component's service account, and nobody is
        // given Secrets or wildcards.
        for (name, role_kind, subjects) in bindings(&objects) {
            assert_eq!(role_kind, if name.1 { "ClusterRole" } else { "Role" });
            let sa = subjects
                .iter()
                .map(|s| {
                    (
                        s.kind.as_str(),
                        s.name.as_str(),
                        s.namespace.as_deref().unwrap_or(""),
                    )
                })
                .collect::<Vec<_>>();
            assert_eq!(sa, [("ServiceAccount", name.0.as_str(), namespace)]);
            ensure!(
                objects.iter().any(|o| matches!(o, Object::ServiceAccount(s)
                    if s.metadata.name.as_deref() == Some(name.0.as_str()))),
                "binding {} names a service account the chart does not create",
                name.0
            );
        }
        assert_no_wildcard_and_no_secrets(&objects);
    }
    Ok(())
}

#[test]
fn non_default_values_render_monitor_pdb_privileged_and_another_namespace() -> Result<()> {
    helm_or_skip!();
    let objects = render(OTHER_NS, NON_DEFAULT)?;
    let pod = agent_pod(&objects)?;
    let sc = container(pod, "agent")?
        .security_context
        .clone()
        .unwrap_or_default();
    assert_eq!(sc.privileged, Some(true), "agent.privileged=true");
    assert!(
        sc.capabilities.is_none(),
        "privileged has every capability already"
    );
    // The CNI directories move on the host, not inside the installer.
    assert_eq!(
        host_mounts(pod, "cni-installer")?
            .get("/opt/cni/bin")
            .map(String::as_str),
        Some("/home/kubernetes/bin")
    );
    let image = &container(pod, "agent")?.image;
    assert_eq!(image.as_deref(), Some("registry.test/weft:1.2.3"));
    let config = config_file(&objects, "weft-agent", "agent.yaml")?;
    assert_eq!(
        config["agent"]["ca"]["remote"]["addr"],
        format!("weft-ca.{OTHER_NS}.svc:15012")
    );
    assert_eq!(config["mesh"]["mtls"]["mode"], "STRICT");
    assert_eq!(config["mesh"]["excludedPorts"], json!([22, 3306]));
    assert_eq!(
        config["mesh"]["outboundTrafficPolicy"]["mode"],
        "REGISTRY_ONLY"
    );

    let ca = deployment(&objects, "weft-ca")?;
    let ca_labels = ca
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    assert_eq!(ca.spec.as_ref().and_then(|s| s.replicas), Some(2));
    // podDisruptionBudget.enabled and serviceMonitor.enabled render these.
    let pdb = named(&objects, "PodDisruptionBudget", "weft-ca", |o| match o {
        Object::PodDisruptionBudget(p) => Some(p),
        _ => None,
    })?;
    let pdb_spec = pdb.spec.as_ref().context("PDB spec")?;
    assert_eq!(pdb_spec.min_available, Some(IntOrString::Int(1)));
    assert!(
        selects(pdb_spec.selector.as_ref(), &ca_labels),
        "the PDB covers the CA"
    );

    let monitor = named(&objects, "ServiceMonitor", "weft-agent", |o| match o {
        Object::ServiceMonitor(m) => Some(m),
        _ => None,
    })?;
    assert_eq!(
        monitor
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("release")),
        Some(&"prometheus".to_string())
    );
    let metrics = service(&objects, "weft-agent-metrics")?;
    let service_labels = metrics.metadata.labels.clone().unwrap_or_default();
    assert!(selects(Some(&monitor.spec.selector), &service_labels));
    let endpoint = monitor.spec.endpoints.first().context("an endpoint")?;
    let port = metrics
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .and_then(|p| {
            p.iter()
                .find(|p| p.name.as_deref() == Some(endpoint.port.as_str()))
        })
        .context("the monitor's port is the Service's")?;
    assert_eq!(port.port, 15020);
    let agent_labels = daemonset(&objects, "weft-agent")?
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    let selector = metrics.spec.as_ref().and_then(|s| s.selector.clone());
    ensure!(
        selector
            .unwrap_or_default()
            .iter()
            .all(|(k, v)| agent_labels.get(k) == Some(v)),
        "the metrics Service selects the agent pods"
    );
    Ok(())
}

#[test]
fn crd_files_are_valid_apiextensions_v1_and_installed_by_the_chart() -> Result<()> {
    helm_or_skip!();
    // Whatever `cargo xtask gen` wrote (or nothing yet): each file is one valid CRD, and the
    // chart installs exactly these.
    let files = crd_files()?;
    for crd in &files {
        let name = crd.metadata.name.clone().unwrap_or_default();
        assert_eq!(
            name,
            format!("{}.{}", crd.spec.names.plural, crd.spec.group),
            "a CRD's name is <plural>.<group>"
        );
        ensure!(!crd.spec.versions.is_empty(), "{name}: no versions");
        ensure!(
            crd.spec.versions.iter().filter(|v| v.storage).count() == 1,
            "{name}: exactly one storage version"
        );
        for version in &crd.spec.versions {
            ensure!(
                version
                    .schema
                    .as_ref()
                    .and_then(|s| s.open_api_v3_schema.as_ref())
                    .is_some(),
                "{name}/{}: apiextensions/v1 requires a structural schema",
                version.name
            );
        }
    }
    let rendered: BTreeSet<String> = render(DEFAULT_NS, &[])?
        .iter()
        .filter_map(|o| match o {
            Object::CustomResourceDefinition(c) => c.metadata.name.clone(),
            _ => None,
        })
        .collect();
    let shipped: BTreeSet<String> = files
        .iter()
        .filter_map(|c| c.metadata.name.clone())
        .collect();
    assert_eq!(rendered, shipped);
    Ok(())
}

#[test]
fn bad_values_are_refused_naming_the_field() -> Result<()> {
    helm_or_skip!();
    // values.schema.json: a typo or a wrong value fails the render, never renders nonsense.
    for (value, field) in [
        ("agent.privilege=true", "/agent"),
        ("agent.mesh.mtlsMode=STRICTT", "/agent/mesh/mtlsMode"),
        ("ca.port=0", "/ca/port"),
        ("agent.pinRoot=/tmp/weft", "/agent/pinRoot"),
        ("logFormat=yaml", "/logFormat"),
    ] {
        let err = render(DEFAULT_NS, &[value]).expect_err(value);
        assert!(format!("{err:#}").contains(field), "{value}: {err:#}");
    }
    Ok(())
}

#[test]
fn the_grace_period_covers_both_drain_limits_and_hand_over_goes_with_surge() -> Result<()> {
    helm_or_skip!();
    let drain = |objects: &[Object]| -> Result<Value> {
        Ok(config_file(objects, "weft-agent", "agent.yaml")?["agent"]["drain"].clone())
    };
    let defaults = render(DEFAULT_NS, &[])?;
    assert_eq!(
        drain(&defaults)?,
        json!({ "limit": "3600s", "limitWithoutSuccessor": "20s" })
    );
    assert_eq!(
        config_file(&defaults, "weft-agent", "agent.yaml")?["agent"]["handover"],
        json!({ "socket": "/var/run/weft/handover.sock" })
    );
    assert_eq!(
        agent_pod(&defaults)?.termination_grace_period_seconds,
        Some(3630)
    );
    for (set, named) in [
        ("agent.drainLimitSeconds=3630", "(3630)"),
        ("agent.drainLimitWithoutSuccessorSeconds=4000", "(4000)"),
    ] {
        let err = format!("{:#}", render(DEFAULT_NS, &[set]).expect_err(set));
        assert!(
            err.contains("agent.terminationGracePeriodSeconds (3630)") && err.contains(named),
            "{set}: {err}"
        );
    }
    let objects = render(
        DEFAULT_NS,
        &[
            "agent.drainLimitSeconds=7200",
            "agent.terminationGracePeriodSeconds=7230",
        ],
    )?;
    assert_eq!(drain(&objects)?["limit"], "7200s");
    assert_eq!(
        agent_pod(&objects)?.termination_grace_period_seconds,
        Some(7230)
    );

    // Without hand-over a surge agent could not share the node: refused, unless the
    // strategy says one at a time.
    let err = format!(
        "{:#}",
        render(DEFAULT_NS, &["agent.handover=false"]).expect_err("surge without hand-over")
    );
    assert!(
        err.contains("maxSurge is 1 but agent.handover is off"),
        "{err}"
    );
    let objects = render(
        DEFAULT_NS,
        &[
            "agent.handover=false",
            "agent.updateStrategy.rollingUpdate.maxSurge=0",
            "agent.updateStrategy.rollingUpdate.maxUnavailable=1",
        ],
    )?;
    assert!(
        config_file(&objects, "weft-agent", "agent.yaml")?["agent"]
            .get("handover")
            .is_none()
    );
    Ok(())
}

#[test]
fn validation_rejects_unknown_fields_unknown_kinds_and_wrong_types() {
    // The checks above are only worth something if this one fails on what it must.
    let typo = json!({
        "apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": "x", "namespace": "y"},
        "automountServiceAcountToken": false,
    });
    let err = Object::from_rendered(&typo).expect_err("a misspelt field");
    assert!(
        format!("{err:#}").contains("automountServiceAcountToken"),
        "{err:#}"
    );
    let nested = json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "x", "namespace": "y", "labelz": {}},
    });
    let err = Object::from_rendered(&nested).expect_err("an unknown nested field");
    assert!(format!("{err:#}").contains("metadata.labelz"), "{err:#}");
    let kind = json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {}});
    let err = Object::from_rendered(&kind).expect_err("an unknown kind");
    assert!(
        format!("{err:#}").contains("example.com/v1 Widget"),
        "{err:#}"
    );
    let wrong_type = json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "x", "namespace": "y"}, "data": {"port": 15020},
    });
    assert!(
        Object::from_rendered(&wrong_type).is_err(),
        "data values are strings"
    );
    let escalation = json!({
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": "x", "namespace": "y"},
        "spec": {"selector": {}, "template": {"spec": {"containers": [{
            "name": "c",
            "securityContext": {
                "allowPrivilegeEscalation": false,
                "capabilities": {"add": ["SYS_ADMIN"]},
            },
        }]}}},
    });
    let err = Object::from_rendered(&escalation).expect_err("API validation rule");
    assert!(
        format!("{err:#}").contains("allowPrivilegeEscalation"),
        "{err:#}"
    );
    // The API server's rules for Services and the Gateway API CRD's for GatewayClass.
    let service = |spec: Value| {
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "x", "namespace": "y"}, "spec": spec})
    };
    for (object, word) in [
        (
            service(json!({"type": "ClusterIP", "externalTrafficPolicy": "Local"})),
            "externalTrafficPolicy",
        ),
        (
            service(json!({"type": "NodePort", "loadBalancerSourceRanges": ["10.0.0.0/8"]})),
            "loadBalancerSourceRanges",
        ),
        (
            json!({
                "apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass",
                "metadata": {"name": "x"},
                "spec": {"controllerName": "weft.dev/gateway", "description": "d".repeat(65)},
            }),
            "64 characters",
        ),
    ] {
        let err = Object::from_rendered(&object).expect_err(word);
        assert!(format!("{err:#}").contains(word), "{err:#}");
    }
    let ok = json!({
        "apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": "x", "namespace": "y", "labels": {"a": "b"}},
    });
    Object::from_rendered(&ok).expect("a valid object");
}
