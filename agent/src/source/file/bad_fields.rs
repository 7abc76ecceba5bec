//! Every field of the config file, set to a value of the wrong type or out of range, must be
//! refused with an error naming that field's path, and a reload with it must keep the last
//! good config. Each string field also gets an unlikely string: refused or not (a node name
//! may be anything), a refusal must name the field. The fields come from the file's own types (their JSON schema), so a new
//! field is tested as soon as it exists.

use std::{sync::Arc, time::Duration};

use serde_json::{Value, json};
use tokio::sync::watch as channel;

use super::{RawFile, load, parse, watch};
use crate::{
    config::{Config, Overrides},
    source::SourceStatus,
};

/// A file that sets every section, so that each field's neighbours are valid.
const BASE: &str = r#"
agent:
  node: node-a
  pinRoot: /sys/fs/bpf/weft-test
  cgroupRoot: /sys/fs/cgroup
  adminAddr: 127.0.0.1:15000
  readinessAddr: 127.0.0.1:15021
  metricsAddr: 127.0.0.1:15020
  metricsPrefix: weft
  proxyMark: 30565
  ports: {outbound: 15001, inbound: 15006, hbone: 15008}
  trustDomain: cluster.local
  certLifetime: 24h
  ca: {inProcess: {cert: /etc/weft/ca.crt, key: /etc/weft/ca.key}}
  cni: {socket: /run/weft/cni.sock, meshNamespacesFile: /run/weft/ns.json, enrollTimeout: 20s}
  discovery: {cgroupRoot: /sys/fs/cgroup, procRoot: /proc, interval: 30s}
mesh:
  excludedPorts: [22]
  excludedCidrs: ["169.254.0.0/16"]
  mtls: {mode: PERMISSIVE, namespaces: {prod: STRICT}}
  defaultDeny: false
  accessLog: {enabled: true, namespaces: {prod: false}}
workloads:
  - name: client
    namespace: default
    serviceAccount: client
    ips: ["10.1.0.2"]
    netns: /proc/self/ns/net
    enrolled: true
    mtlsMode: STRICT
    labels: {app: client}
  - name: api
    namespace: prod
    ips: ["10.2.0.5"]
    podUid: 0b1c2d3e
    probePorts: [8080]
    node: node-b
services:
  - name: echo
    namespace: default
    vips: ["10.96.0.10"]
    ports: [{port: 80, targetPort: 8080}]
    endpoints: ["10.1.0.2"]
    waypoint: wp
    trafficDistribution: PreferClose
waypoints:
  - name: wp
    namespace: default
    serviceAccount: wp
    ips: ["10.1.0.7"]
namespaces:
  - name: prod
    waypoint: none
externalServices:
  - name: api
    namespace: egress
    hosts: [api.example.test]
    resolution: STATIC
    addresses: ["192.0.2.10"]
    ports:
      - {number: 80, name: http, protocol: HTTP, targetPort: 443, tls: {sni: api.example.test}}
policies:
  - name: api-allow
    namespace: prod
    selector: {matchLabels: {app: api}}
    action: ALLOW
    rules:
      - from:
          - principals: ["spiffe://cluster.local/ns/default/sa/client"]
            serviceAccounts: [default/client]
            namespaces: [default]
            ipBlocks: [{cidr: 10.0.0.0/8, except: [10.9.0.0/16]}]
        toPorts: [8080, "9000-9100"]
        methods: [GET]
        paths: [/api/*]
        headers: {x-user: [alice]}
"#;

#[test]
fn the_base_file_is_valid() {
    parse(std::path::Path::new("node.yaml"), BASE).unwrap();
}

#[test]
fn the_schema_reaches_every_section() {
    let cases = cases();
    for field in [
        "agent.ports.outbound",
        "agent.ca.remote.tokenFile",
        "agent.discovery.interval",
        "mesh.mtls.namespaces.k",
        "workloads[0].probePorts[0]",
        "services[0].ports[0].targetPort",
        "externalServices[0].ports[0].tls.caCertificates",
        "policies[0].rules[0].from[0].ipBlocks[0].except[0]",
        "policies[0].rules[0].headers.k[0]",
    ] {
        assert!(
            cases.iter().any(|c| c.field == field),
            "no case for {field}"
        );
    }
}

#[test]
fn every_bad_field_is_named_in_the_error() {
    let mut unnamed = Vec::new();
    let cases = cases();
    eprintln!("{} bad values of {} fields", cases.len(), {
        let mut fields: Vec<&str> = cases.iter().map(|c| c.field.as_str()).collect();
        fields.dedup();
        fields.len()
    });
    for case in &cases {
        let path = std::path::Path::new("node.yaml");
        // As the agent reads the file at start-up: the `agent:` section is checked whole by
        // `Config::new` (a reload only compares it).
        let result = parse(path, &case.text)
            .and_then(|doc| Config::new(path, &doc.agent, Overrides::default()).map(|_| doc));
        match result {
            // Free-form text (a node name, a path) may take any string.
            Ok(_) if !case.must_refuse => {}
            Ok(_) => unnamed.push(format!("{} = {}: accepted", case.field, case.bad)),
            Err(e) if !names(&e.to_string(), &case.field) => {
                unnamed.push(format!("{} = {}: {e}", case.field, case.bad));
            }
            Err(_) => {}
        }
    }
    assert!(
        unnamed.is_empty(),
        "{} of {} bad values were not refused with their field's path:\n{}",
        unnamed.len(),
        cases.len(),
        unnamed.join("\n")
    );
}

#[tokio::test]
async fn a_reload_with_any_bad_field_keeps_the_last_good_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.yaml");
    std::fs::write(&path, BASE).unwrap();
    let doc = load(&path).unwrap();
    let good = doc.snapshot.clone();
    let (tx, rx) = channel::channel(Arc::new(doc.snapshot.clone()));
    let status = Arc::new(SourceStatus::default());
    tokio::spawn(watch(
        path.clone(),
        Duration::from_millis(2),
        doc,
        tx,
        Arc::clone(&status),
    ));
    let cases: Vec<Case> = cases().into_iter().filter(|c| c.must_refuse).collect();
    for (i, case) in cases.iter().enumerate() {
        std::fs::write(&path, &case.text).unwrap();
        let rejected = async {
            while status.view().rejected_total <= i as u64 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), rejected)
            .await
            .unwrap_or_else(|_| panic!("{} = {} was not rejected", case.field, case.bad));
        assert_eq!(**rx.borrow(), good, "{} = {}", case.field, case.bad);
        let rejection = status.view().last_rejection.unwrap();
        assert!(names(&rejection, &case.field), "{rejection}");
    }
    assert!(!rx.has_changed().unwrap(), "no bad file was published");
}

#[tokio::test]
async fn a_file_rewritten_in_place_is_not_applied_while_empty() {
    // A writer that truncates, then writes: a read in between sees an empty file, which is
    // a valid file without workloads. Each round gives the watcher a chance (EMPTY_FOR of
    // every INTERVAL) to see it.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.yaml");
    std::fs::write(&path, BASE).unwrap();
    let doc = load(&path).unwrap();
    let (tx, mut rx) = channel::channel(Arc::new(doc.snapshot.clone()));
    tokio::spawn(watch(
        path.clone(),
        INTERVAL,
        doc,
        tx,
        Arc::new(SourceStatus::default()),
    ));
    for round in 1..=ROUNDS {
        let text = BASE.replace("excludedPorts: [22]", &format!("excludedPorts: [{round}]"));
        std::fs::write(&path, "").unwrap();
        tokio::time::sleep(EMPTY_FOR).await;
        std::fs::write(&path, &text).unwrap();
        let published = async {
            loop {
                rx.changed().await.unwrap();
                let snapshot = rx.borrow_and_update().clone();
                assert!(
                    !snapshot.workloads.is_empty(),
                    "round {round}: an empty file was applied"
                );
                if snapshot.mesh.excluded_ports == [round] {
                    return;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), published)
            .await
            .unwrap_or_else(|_| panic!("round {round} was not applied"));
    }
}

/// Rounds of [`a_file_rewritten_in_place_is_not_applied_while_empty`]: without the
/// two-reads rule, at least one sees the empty file with a probability of 1 - 0.84^40.
const ROUNDS: u16 = 40;
const INTERVAL: Duration = Duration::from_millis(50);
const EMPTY_FOR: Duration = Duration::from_millis(8);

/// One bad file: the field's path and the bad value it holds.
struct Case {
    field: String,
    bad: Value,
    text: String,
    /// A value of the wrong type or range: it must be refused. Otherwise an unlikely
    /// string: if refused, the error must still name the field.
    must_refuse: bool,
}

/// A string no address, name, duration or enum value accepts.
const UNLIKELY: &str = "not valid: {}";

/// Whether `error` names `field`: its path, followed by what is wrong.
fn names(error: &str, field: &str) -> bool {
    error.contains(&format!("{field}: "))
}

/// A bad value for every field the schema of the file describes, each in a copy of BASE.
fn cases() -> Vec<Case> {
    let schema = serde_json::to_value(schemars::schema_for!(RawFile)).unwrap();
    let base: Value = serde_yaml::from_str(BASE).unwrap();
    let mut fields = Vec::new();
    walk(&schema, &schema, &mut Vec::new(), &mut fields);
    fields
        .into_iter()
        // An unlikely string is only meaningful next to valid neighbours: BASE must have
        // the field's parent (it has one of `ca.inProcess` and `ca.remote`, for example).
        .filter(|(path, bad)| *bad != json!(UNLIKELY) || has_parent(&base, path))
        .map(|(path, bad)| {
            let mut doc = base.clone();
            set(&mut doc, &path, bad.clone());
            Case {
                field: display(&path),
                must_refuse: bad != json!(UNLIKELY),
                bad,
                // JSON is YAML, and keeps the bad value's type exactly.
                text: doc.to_string(),
            }
        })
        .collect()
}

#[derive(Clone, Debug)]
enum Step {
    Key(String),
    First,
}

/// Collects (path, bad value) for the node `schema` at `path` and everything below it.
fn walk(root: &Value, schema: &Value, path: &mut Vec<Step>, out: &mut Vec<(Vec<Step>, Value)>) {
    let schema = resolve(root, schema);
    // `Option<T>`: `anyOf: [T, null]` or `type: [T, "null"]`.
    if let Some(variants) = schema.get("anyOf").and_then(Value::as_array) {
        for variant in variants {
            if resolve(root, variant).get("type") != Some(&json!("null")) {
                walk(root, variant, path, out);
            }
        }
        return;
    }
    let kind = match schema.get("type") {
        Some(Value::String(kind)) => kind.as_str(),
        Some(Value::Array(kinds)) => kinds
            .iter()
            .filter_map(Value::as_str)
            .find(|k| *k != "null")
            .unwrap_or("null"),
        _ if schema.get("x-kubernetes-int-or-string").is_some() => "int-or-string",
        _ if schema.get("oneOf").is_some() || schema.get("enum").is_some() => "string",
        // Any value (the routes' manifests, checked by source::gateway with their own paths).
        _ => return,
    };
    let mut bad = |value: Value| {
        if !path.is_empty() {
            out.push((path.clone(), value));
        }
    };
    match kind {
        "object" => {
            bad(json!("not-a-mapping"));
            if let Some(properties) = schema.get("properties").and_then(Value::as_object) {
                for (name, property) in properties {
                    path.push(Step::Key(name.clone()));
                    walk(root, property, path, out);
                    path.pop();
                }
            }
            if let Some(values) = schema.get("additionalProperties").filter(|v| v.is_object()) {
                path.push(Step::Key("k".into()));
                walk(root, values, path, out);
                path.pop();
            }
        }
        "array" => {
            bad(json!("not-a-list"));
            if let Some(items) = schema.get("items") {
                path.push(Step::First);
                walk(root, items, path, out);
                path.pop();
            }
        }
        "integer" => {
            bad(json!("not-a-number"));
            if let Some(max) = schema.get("maximum").and_then(Value::as_u64) {
                bad(json!(max + 1));
            }
            if schema.get("minimum").and_then(Value::as_i64) == Some(0) {
                bad(json!(-1));
            }
        }
        "boolean" => bad(json!("maybe")),
        // Strings, and enums of strings (whose every value is a string).
        "string" => {
            bad(json!(["not", "a", "string"]));
            bad(json!(UNLIKELY));
            if schema.get("enum").is_some() || schema.get("oneOf").is_some() {
                bad(json!("NOT_ONE_OF_THEM"));
            }
        }
        "int-or-string" => bad(json!({"not": "a port"})),
        other => panic!(
            "schema type {other} at {}: teach this test about it",
            display(path)
        ),
    }
}

/// Follows `$ref: "#/$defs/Name"`.
fn resolve<'a>(root: &'a Value, schema: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(reference) => {
            let name = reference
                .strip_prefix("#/$defs/")
                .unwrap_or_else(|| panic!("unexpected $ref {reference}"));
            &root["$defs"][name]
        }
        None => schema,
    }
}

/// Sets the value at `path`, creating the mappings and first items on the way.
fn set(doc: &mut Value, path: &[Step], value: Value) {
    let Some((step, rest)) = path.split_first() else {
        *doc = value;
        return;
    };
    let next = match step {
        Step::Key(key) => {
            if !doc.is_object() {
                *doc = json!({});
            }
            doc.as_object_mut()
                .unwrap()
                .entry(key.clone())
                .or_insert(Value::Null)
        }
        Step::First => {
            if !doc.is_array() {
                *doc = json!([]);
            }
            let list = doc.as_array_mut().unwrap();
            if list.is_empty() {
                list.push(Value::Null);
            }
            &mut list[0]
        }
    };
    set(next, rest, value);
}

/// Whether `doc` has the object or list holding `path`'s last step.
fn has_parent(doc: &Value, path: &[Step]) -> bool {
    let Some((_, parent)) = path.split_last() else {
        return true;
    };
    let mut node = doc;
    for step in parent {
        let next = match step {
            Step::Key(key) => node.get(key),
            Step::First => node.get(0),
        };
        match next {
            Some(next) => node = next,
            None => return false,
        }
    }
    true
}

/// `workloads[0].ips[0]`, as errors write paths.
fn display(path: &[Step]) -> String {
    let mut text = String::new();
    for step in path {
        match step {
            Step::Key(key) => {
                if !text.is_empty() {
                    text.push('.');
                }
                text.push_str(key);
            }
            Step::First => text.push_str("[0]"),
        }
    }
    text
}
