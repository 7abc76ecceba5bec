//! Install and uninstall on temp CNI dirs holding the configs real CNIs write.

use super::*;

/// What Calico's install-cni writes (trimmed of nothing that matters here).
const CALICO: &str = r#"{
  "name": "k8s-pod-network",
  "cniVersion": "0.3.1",
  "plugins": [
    {
      "type": "calico",
      "log_level": "info",
      "datastore_type": "kubernetes",
      "nodename": "node-1",
      "mtu": 0,
      "ipam": {"type": "calico-ipam"},
      "policy": {"type": "k8s"},
      "kubernetes": {"kubeconfig": "/etc/cni/net.d/calico-kubeconfig"}
    },
    {"type": "portmap", "snat": true, "capabilities": {"portMappings": true}},
    {"type": "bandwidth", "capabilities": {"bandwidth": true}}
  ]
}"#;

/// A single-plugin `.conf` (the bridge plugin, as kubeadm guides and kind's older
/// releases write it).
const BRIDGE_CONF: &str = r#"{
  "cniVersion": "0.4.0",
  "name": "bridge",
  "type": "bridge",
  "bridge": "cni0",
  "isGateway": true,
  "ipMasq": true,
  "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.0.0/16"}]]}
}"#;

fn plugin() -> Plugin {
    Plugin {
        socket: "/var/run/weft/cni.sock".into(),
        mesh_namespaces_file: None,
    }
}

fn types(doc: &Value) -> Vec<String> {
    doc["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["type"].as_str().unwrap().to_string())
        .collect()
}

fn json(path: &Path) -> Value {
    serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
}

#[test]
fn the_entry_goes_last_in_the_primary_conflist_and_stays_there() {
    let dir = tempfile::tempdir().unwrap();
    let primary = dir.path().join("10-calico.conflist");
    fs::write(&primary, CALICO).unwrap();
    // Picked after the primary by name: never touched.
    fs::write(
        dir.path().join("99-loopback.conf"),
        r#"{"cniVersion":"0.3.1","name":"lo","type":"loopback"}"#,
    )
    .unwrap();
    fs::write(dir.path().join("calico-kubeconfig"), "not a cni config").unwrap();

    assert_eq!(
        ensure(dir.path(), &plugin()).unwrap(),
        Change::Inserted(primary.clone())
    );
    let doc = json(&primary);
    assert_eq!(types(&doc), ["calico", "portmap", "bandwidth", "weft-cni"]);
    assert_eq!(doc["plugins"][3]["socket"], "/var/run/weft/cni.sock");
    // Calico's own settings are intact.
    let original: Value = serde_json::from_str(CALICO).unwrap();
    assert_eq!(doc["plugins"][0], original["plugins"][0]);
    assert_eq!(doc["name"], "k8s-pod-network");
    assert_eq!(
        ensure(dir.path(), &plugin()).unwrap(),
        Change::Unchanged(primary.clone())
    );

    // Calico rewrites its file (upgrade, restart): the entry goes back in.
    fs::write(&primary, CALICO).unwrap();
    assert_eq!(
        ensure(dir.path(), &plugin()).unwrap(),
        Change::Inserted(primary.clone())
    );
    assert_eq!(types(&json(&primary)).last().unwrap(), "weft-cni");

    // Someone appended a plugin after weft: weft moves back to the end, once.
    let mut doc = json(&primary);
    doc["plugins"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"type": "tuning"}));
    fs::write(&primary, doc.to_string()).unwrap();
    ensure(dir.path(), &plugin()).unwrap();
    assert_eq!(
        types(&json(&primary)),
        ["calico", "portmap", "bandwidth", "tuning", "weft-cni"]
    );

    let untouched = fs::read_to_string(dir.path().join("99-loopback.conf")).unwrap();
    assert!(!untouched.contains("weft"));
    // No temporary file left where a runtime could pick it.
    let names: Vec<String> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(names.iter().all(|n| !n.contains("tmp")), "{names:?}");
}

#[test]
fn a_single_conf_becomes_a_conflist_and_a_rewritten_conf_is_converted_again() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("10-bridge.conf");
    fs::write(&conf, BRIDGE_CONF).unwrap();
    let list = dir.path().join("10-bridge.conflist");
    assert_eq!(
        ensure(dir.path(), &plugin()).unwrap(),
        Change::Converted {
            from: conf.clone(),
            to: list.clone()
        }
    );
    assert!(!conf.exists());
    let doc = json(&list);
    assert_eq!(doc["cniVersion"], "0.4.0");
    assert_eq!(doc["name"], "bridge");
    assert_eq!(types(&doc), ["bridge", "weft-cni"]);
    assert_eq!(doc["plugins"][0]["ipam"]["type"], "host-local");
    assert!(doc["plugins"][0].get("name").is_none());

    // The primary CNI writes its .conf again: it sorts first, so it is converted again.
    fs::write(&conf, BRIDGE_CONF).unwrap();
    assert!(matches!(
        ensure(dir.path(), &plugin()).unwrap(),
        Change::Converted { .. }
    ));
    assert_eq!(types(&json(&list)), ["bridge", "weft-cni"]);
}

#[test]
fn uninstall_removes_the_entry_and_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    let (conf_dir, bin_dir) = (dir.path().join("net.d"), dir.path().join("bin"));
    fs::create_dir_all(&conf_dir).unwrap();
    let primary = conf_dir.join("10-calico.conflist");
    fs::write(&primary, CALICO).unwrap();
    let source = dir.path().join("weft");
    fs::write(&source, b"\x7fELF not really").unwrap();

    let binary = install_binary(&source, &bin_dir).unwrap();
    assert_eq!(binary, bin_dir.join("weft-cni"));
    assert_eq!(
        fs::metadata(&binary).unwrap().permissions().mode() & 0o777,
        0o755
    );
    ensure(
        &conf_dir,
        &Plugin {
            socket: "/run/weft/cni.sock".into(),
            mesh_namespaces_file: Some("/run/weft/ns.json".into()),
        },
    )
    .unwrap();
    assert_eq!(
        json(&primary)["plugins"][3]["meshNamespacesFile"],
        "/run/weft/ns.json"
    );

    assert_eq!(
        uninstall(&conf_dir, &bin_dir).unwrap(),
        vec![primary.clone()]
    );
    assert_eq!(
        json(&primary),
        serde_json::from_str::<Value>(CALICO).unwrap()
    );
    assert!(!binary.exists());
    // Twice is fine.
    assert!(uninstall(&conf_dir, &bin_dir).unwrap().is_empty());
}

#[test]
fn broken_or_missing_configs_are_reported_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let err = ensure(dir.path(), &plugin()).unwrap_err().to_string();
    assert!(
        err.contains("primary CNI has not written its config"),
        "{err}"
    );
    let primary = dir.path().join("05-cilium.conflist");
    fs::write(&primary, "{\"plugins\": ").unwrap();
    let err = ensure(dir.path(), &plugin()).unwrap_err().to_string();
    assert!(
        err.contains("05-cilium.conflist") && err.contains("not valid JSON"),
        "{err}"
    );
    assert_eq!(fs::read_to_string(&primary).unwrap(), "{\"plugins\": ");
}
