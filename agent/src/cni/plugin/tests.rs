//! The plugin against a fake agent on a unix socket (the real agent: `tests/tests/cni.rs`).

use std::{collections::HashMap, os::unix::net::UnixListener, sync::mpsc, thread};

use super::*;

const UID: &str = "0d5cb5a1-8f2e-4c55-9a43-3b4f3e0e2a11";

struct Case {
    dir: tempfile::TempDir,
}

impl Case {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("cni.sock")
    }

    /// An agent that answers one request with `reply` and hands the request back.
    fn agent(&self, reply: Reply) -> mpsc::Receiver<Request> {
        let listener = UnixListener::bind(self.socket()).unwrap();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut line = String::new();
            BufReader::new(&stream).read_line(&mut line).unwrap();
            tx.send(serde_json::from_str(&line).unwrap()).unwrap();
            let mut out = serde_json::to_vec(&reply).unwrap();
            out.push(b'\n');
            (&stream).write_all(&out).unwrap();
        });
        rx
    }

    fn mesh_namespaces(&self, namespaces: &[&str]) {
        let doc = MeshNamespaces {
            namespaces: namespaces.iter().map(|n| n.to_string()).collect(),
        };
        std::fs::write(
            self.dir.path().join(MESH_NAMESPACES_FILE),
            serde_json::to_vec(&doc).unwrap(),
        )
        .unwrap();
    }

    fn config(&self, prev_result: bool) -> String {
        let mut conf = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "k8s-pod-network",
            "type": "weft-cni",
            "socket": self.socket(),
            "timeout": "5s",
        });
        if prev_result {
            conf["prevResult"] = prev_result_json();
        }
        conf.to_string()
    }

    fn run(&self, command: &str, namespace: &str, prev_result: bool) -> (Outcome, String) {
        let env: HashMap<String, String> = [
            ("CNI_COMMAND", command.to_string()),
            ("CNI_CONTAINERID", "4b825dc642cb6eb9".to_string()),
            ("CNI_NETNS", "/var/run/netns/cni-1234".to_string()),
            ("CNI_IFNAME", "eth0".to_string()),
            ("CNI_PATH", "/opt/cni/bin".to_string()),
            (
                "CNI_ARGS",
                format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME=web-0;K8S_POD_UID={UID}"),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let mut log = Vec::new();
        let outcome = run(self.config(prev_result).as_bytes(), &env, &mut log);
        (outcome, String::from_utf8(log).unwrap())
    }
}

fn prev_result_json() -> Value {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/cni-1234"}],
        "ips": [{"address": "10.244.1.7/24", "gateway": "10.244.1.1", "interface": 0}],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {}
    })
}

fn code(outcome: &Outcome) -> u64 {
    let error: Value = serde_json::from_str(&outcome.stdout).unwrap();
    error["code"].as_u64().unwrap()
}

#[test]
fn add_returns_prev_result_unchanged_once_the_agent_enrolled_the_pod() {
    let case = Case::new();
    let requests = case.agent(Reply::Enrolled);
    let (outcome, log) = case.run("ADD", "shop", true);
    assert_eq!(outcome.code, 0, "{outcome:?} {log}");
    let out: Value = serde_json::from_str(&outcome.stdout).unwrap();
    assert_eq!(out, prev_result_json());
    let request = requests.recv().unwrap();
    assert_eq!(
        request,
        Request {
            command: Command::Add,
            pod: PodInfo {
                namespace: "shop".into(),
                name: "web-0".into(),
                uid: UID.into(),
            },
            container_id: "4b825dc642cb6eb9".into(),
            netns: Some("/var/run/netns/cni-1234".into()),
            ips: vec!["10.244.1.7".parse().unwrap()],
        }
    );
}

#[test]
fn add_fails_the_sandbox_when_enrollment_fails() {
    let case = Case::new();
    let _requests = case.agent(Reply::Failed {
        reason: "listeners: port 15001 taken".into(),
    });
    let (outcome, _) = case.run("ADD", "shop", true);
    assert_ne!(outcome.code, 0);
    assert_eq!(code(&outcome), 100);
    assert!(
        outcome.stdout.contains("port 15001 taken"),
        "{}",
        outcome.stdout
    );
    assert!(outcome.stdout.contains("shop/web-0"), "{}", outcome.stdout);
}

#[test]
fn an_agent_that_is_not_ready_means_try_again_later() {
    let case = Case::new();
    let _requests = case.agent(Reply::NotReady {
        reason: "starting".into(),
    });
    let (outcome, _) = case.run("ADD", "shop", true);
    assert_eq!((outcome.code, code(&outcome)), (1, 11));
}

#[test]
fn with_the_agent_down_only_pods_outside_the_mesh_namespaces_pass() {
    let case = Case::new();
    // No mesh-namespaces file (a node just rebooted): every pod waits.
    let (outcome, log) = case.run("ADD", "kube-system", true);
    assert_eq!(code(&outcome), 11, "{log}");
    assert!(outcome.stdout.contains("unreadable"), "{}", outcome.stdout);

    case.mesh_namespaces(&["shop"]);
    let (outcome, _) = case.run("ADD", "shop", true);
    assert_eq!(code(&outcome), 11);
    assert!(
        outcome.stdout.contains("namespace shop is in the mesh"),
        "{}",
        outcome.stdout
    );
    let (outcome, _) = case.run("CHECK", "shop", true);
    assert_eq!(code(&outcome), 11);

    let (outcome, _) = case.run("ADD", "kube-system", true);
    assert_eq!(outcome.code, 0, "{outcome:?}");
    assert_eq!(
        serde_json::from_str::<Value>(&outcome.stdout).unwrap(),
        prev_result_json()
    );
}

#[test]
fn del_succeeds_even_with_the_agent_down() {
    let case = Case::new();
    let (outcome, log) = case.run("DEL", "shop", false);
    assert_eq!(
        outcome,
        Outcome {
            stdout: String::new(),
            code: 0
        }
    );
    assert!(log.contains("agent not told"), "{log}");

    let requests = case.agent(Reply::Forgotten);
    let (outcome, _) = case.run("DEL", "shop", false);
    assert_eq!(outcome.code, 0);
    assert_eq!(requests.recv().unwrap().command, Command::Del);
}

#[test]
fn check_prints_nothing_when_the_pod_is_enrolled() {
    let case = Case::new();
    let requests = case.agent(Reply::Enrolled);
    let (outcome, _) = case.run("CHECK", "shop", true);
    assert_eq!(
        outcome,
        Outcome {
            stdout: String::new(),
            code: 0
        }
    );
    assert_eq!(requests.recv().unwrap().command, Command::Check);
}

#[test]
fn a_plugin_without_prev_result_is_misconfigured() {
    let case = Case::new();
    let (outcome, _) = case.run("ADD", "shop", false);
    assert_eq!(code(&outcome), 7);
    assert!(
        outcome.stdout.contains("chained plugin"),
        "{}",
        outcome.stdout
    );
}

#[test]
fn version_lists_the_supported_versions() {
    let env: HashMap<String, String> = [("CNI_COMMAND".to_string(), "VERSION".to_string())].into();
    let outcome = run(
        r#"{"cniVersion":"1.0.0"}"#.as_bytes(),
        &env,
        &mut Vec::new(),
    );
    assert_eq!(outcome.code, 0);
    let out: Value = serde_json::from_str(&outcome.stdout).unwrap();
    assert_eq!(out["cniVersion"], "1.0.0");
    assert!(
        out["supportedVersions"]
            .as_array()
            .unwrap()
            .contains(&"0.4.0".into())
    );
}

#[test]
fn bad_input_gets_the_spec_error_code() {
    let case = Case::new();
    let env: HashMap<String, String> = [
        ("CNI_COMMAND".to_string(), "ADD".to_string()),
        ("CNI_CONTAINERID".to_string(), "c".to_string()),
    ]
    .into();
    let outcome = run(
        r#"{"cniVersion":"0.2.0","type":"weft-cni"}"#.as_bytes(),
        &env,
        &mut Vec::new(),
    );
    assert_eq!(code(&outcome), 1);
    let outcome = run("{".as_bytes(), &env, &mut Vec::new());
    assert_eq!(code(&outcome), 6);
    // No K8S_POD_* in CNI_ARGS.
    let outcome = run(case.config(true).as_bytes(), &env, &mut Vec::new());
    assert_eq!(code(&outcome), 4);
    assert!(
        outcome.stdout.contains("K8S_POD_NAMESPACE"),
        "{}",
        outcome.stdout
    );
}
