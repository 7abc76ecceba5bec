//! The CNI request, both ends of it:
//! - the agent's CNI server decoding one request line from its socket (any process that
//!   can reach the socket writes it), and encoding its reply;
//! - the plugin (`cni::plugin::run`) reading the network config on stdin, as the container
//!   runtime hands it over, for each CNI command.
//!
//! The first byte picks the end (and the plugin's command); the rest is the input. The
//! plugin's `socket` and `meshNamespacesFile` are pointed at a path that does not exist, so
//! that a run touches nothing on the machine: the plugin then takes its agent-down path.

#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use weft::cni::{MAX_MESSAGE, Reply, Request, plugin};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, input)) = data.split_first() else {
        return;
    };
    match selector % 5 {
        0 => server(input),
        n => run_plugin(
            ["ADD", "CHECK", "DEL", "VERSION"][usize::from(n - 1)],
            input,
        ),
    }
});

fn server(line: &[u8]) {
    if line.len() > MAX_MESSAGE {
        return;
    }
    let Ok(line) = std::str::from_utf8(line) else {
        return;
    };
    let reply = match serde_json::from_str::<Request>(line) {
        Ok(request) => {
            let encoded = serde_json::to_string(&request).expect("a request encodes");
            let again: Request = serde_json::from_str(&encoded).expect("a request round-trips");
            assert_eq!(request, again);
            Reply::Forgotten
        }
        Err(e) => Reply::Failed {
            reason: format!("bad request from the CNI plugin: {e}"),
        },
    };
    serde_json::to_vec(&reply).expect("a reply encodes");
}

fn run_plugin(command: &str, stdin: &[u8]) {
    let stdin = match serde_json::from_slice::<Value>(stdin) {
        Ok(Value::Object(mut conf)) => {
            conf.insert("socket".into(), NOWHERE_SOCKET.into());
            conf.insert("meshNamespacesFile".into(), NOWHERE_FILE.into());
            Value::Object(conf).to_string().into_bytes()
        }
        _ => stdin.to_vec(),
    };
    let env: HashMap<String, String> = [
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", "fuzz"),
        ("CNI_NETNS", "/var/run/netns/fuzz"),
        ("CNI_IFNAME", "eth0"),
        (
            "CNI_ARGS",
            "K8S_POD_NAMESPACE=default;K8S_POD_NAME=fuzz;K8S_POD_UID=fuzz-uid",
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let mut log = Vec::new();
    let outcome = plugin::run(stdin.as_slice(), &env, &mut log);
    if outcome.code != 0 {
        // A failure is a CNI error object the runtime can read.
        let error: Value =
            serde_json::from_str(&outcome.stdout).expect("the plugin's error is JSON");
        assert!(
            error.get("code").is_some() && error.get("msg").is_some(),
            "{error}"
        );
    }
}

const NOWHERE_SOCKET: &str = "/nonexistent/weft-fuzz/cni.sock";
const NOWHERE_FILE: &str = "/nonexistent/weft-fuzz/mesh-namespaces.json";
