//! Policy evaluation: a small policy set and one connection (optionally one HTTP request),
//! built from structured input over a small vocabulary of namespaces, service accounts,
//! labels, addresses and ports, so that rules and connections meet often. The policies go
//! through the file's validation (`source::file::parse`) as a user's would, then
//! `policy::PolicyIndex` decides.
//!
//! Invariants besides "no panic":
//! - DENY wins: the decision is `denied_by_policy` exactly when the DENY policies alone
//!   (without the ALLOW ones and the default-deny switch) give it;
//! - an index rebuilt from the same snapshot decides the same;
//! - without waypoint bindings, `admit` (the node proxy) decides as `evaluate` does.

#![no_main]

use std::{net::IpAddr, path::Path};

use arbitrary::Arbitrary;
use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};
use weft::{
    identity::SpiffeId,
    policy::{ConnectionFacts, Decision, DenyReason, PolicyIndex, RequestFacts},
    source::file,
    state::Snapshot,
};

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    default_deny: bool,
    policies: Vec<Policy>,
    destination: u8,
    port: Port,
    identity: Option<(u8, u8)>,
    source_ip: u8,
    request: Option<Request<'a>>,
}

#[derive(Arbitrary, Debug)]
struct Policy {
    namespace: u8,
    deny: bool,
    selector: Vec<(u8, u8)>,
    rules: Vec<Rule>,
}

#[derive(Arbitrary, Debug)]
struct Rule {
    from: Vec<Source>,
    to_ports: Vec<Port>,
    methods: Vec<u8>,
    paths: Vec<u8>,
    headers: Vec<(u8, u8)>,
}

#[derive(Arbitrary, Debug)]
struct Source {
    principals: Vec<u8>,
    service_accounts: Vec<(u8, u8)>,
    namespaces: Vec<u8>,
    ip_blocks: Vec<(u8, Vec<u8>)>,
}

#[derive(Arbitrary, Clone, Copy, Debug)]
enum Port {
    Known(u8),
    Range(u8, u8),
    Any(u16),
}

#[derive(Arbitrary, Debug)]
struct Request<'a> {
    method: u8,
    path: &'a str,
    headers: Vec<(u8, &'a [u8])>,
}

fuzz_target!(|input: Input<'_>| {
    if input.policies.len() > 8 {
        return;
    }
    let Some(full) = snapshot(&input, true) else {
        return;
    };
    let deny_only =
        snapshot(&input, false).expect("a valid file minus its ALLOW policies is valid");

    let index = PolicyIndex::build(&full);
    let destination = full
        .workloads
        .values()
        .nth(usize::from(input.destination) % WORKLOADS.len())
        .expect("every workload is in the snapshot");
    let identity = input.identity.map(|(ns, sa)| {
        SpiffeId::new(
            "cluster.local",
            pick(NAMESPACES, ns),
            pick(SERVICE_ACCOUNTS, sa),
        )
        .expect("the vocabulary is valid")
    });
    let mut headers = HeaderMap::new();
    let request = input.request.as_ref().map(|r| {
        for (name, value) in &r.headers {
            if let Ok(value) = HeaderValue::from_bytes(value) {
                headers.append(HeaderName::from_static(pick(HEADERS, *name)), value);
            }
        }
        (pick(METHODS, r.method), r.path)
    });
    let request = request.map(|(method, path)| RequestFacts {
        method,
        path,
        headers: &headers,
        user: None,
    });
    let facts = ConnectionFacts {
        destination,
        dst_port: port_number(input.port),
        source_identity: identity.as_ref(),
        source_ip: pick(IPS, input.source_ip)
            .parse::<IpAddr>()
            .expect("vocabulary"),
        request: request.as_ref(),
    };

    let decision = index.evaluate(&facts);
    let denied_by_policy = |d: &Decision| {
        matches!(
            d,
            Decision::Deny {
                reason: DenyReason::DeniedByPolicy,
                ..
            }
        )
    };
    let by_deny_alone = PolicyIndex::build(&deny_only).evaluate(&facts);
    assert_eq!(
        denied_by_policy(&decision),
        denied_by_policy(&by_deny_alone),
        "DENY wins: {decision:?} with every policy, {by_deny_alone:?} with the DENY ones"
    );
    if by_deny_alone.is_allowed() && !input.default_deny {
        // Nothing but ALLOW policies can refuse now, and only with `not_allowed`.
        assert!(
            decision.is_allowed()
                || matches!(
                    decision,
                    Decision::Deny {
                        reason: DenyReason::NotAllowed,
                        ..
                    }
                ),
            "{decision:?}"
        );
    }
    assert_eq!(
        index.rebuild(&full).evaluate(&facts),
        decision,
        "rebuild decides the same"
    );
    assert_eq!(index.admit(&facts), decision, "no gates: admit is evaluate");
});

/// The input as a config file, parsed; `with_allow`: keep the ALLOW policies and the
/// default-deny switch. `None` when the file is refused.
fn snapshot(input: &Input<'_>, with_allow: bool) -> Option<Snapshot> {
    let workloads: Vec<Value> = WORKLOADS
        .iter()
        .enumerate()
        .map(|(i, (namespace, sa, labels))| {
            let labels: serde_json::Map<String, Value> = labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), Value::from(*v)))
                .collect();
            json!({
                "name": format!("w{i}"),
                "namespace": namespace,
                "serviceAccount": sa,
                "ips": [IPS[i]],
                "netns": format!("/var/run/netns/w{i}"),
                "labels": labels,
            })
        })
        .collect();
    let policies: Vec<Value> = input
        .policies
        .iter()
        .enumerate()
        .filter(|(_, p)| with_allow || p.deny)
        .map(|(i, p)| policy(i, p))
        .collect();
    let file = json!({
        "mesh": {"defaultDeny": with_allow && input.default_deny},
        "workloads": workloads,
        "policies": policies,
    });
    file::parse(Path::new("fuzz.yaml"), &file.to_string())
        .ok()
        .map(|doc| doc.snapshot)
}

fn policy(i: usize, p: &Policy) -> Value {
    let labels: serde_json::Map<String, Value> = p
        .selector
        .iter()
        .map(|(k, v)| {
            (
                pick(LABEL_KEYS, *k).to_owned(),
                pick(LABEL_VALUES, *v).into(),
            )
        })
        .collect();
    let rules: Vec<Value> = p.rules.iter().map(rule).collect();
    json!({
        "name": format!("p{i}"),
        "namespace": pick(NAMESPACES, p.namespace),
        "selector": {"matchLabels": labels},
        "action": if p.deny { "DENY" } else { "ALLOW" },
        "rules": rules,
    })
}

fn rule(r: &Rule) -> Value {
    let mut rule = serde_json::Map::new();
    let mut set = |key: &str, list: Vec<Value>| {
        if !list.is_empty() {
            rule.insert(key.to_owned(), Value::Array(list));
        }
    };
    set("from", r.from.iter().map(source).collect());
    set(
        "toPorts",
        r.to_ports.iter().map(|p| port_spec(*p)).collect(),
    );
    set(
        "methods",
        r.methods.iter().map(|m| pick(METHODS, *m).into()).collect(),
    );
    set(
        "paths",
        r.paths.iter().map(|p| pick(PATHS, *p).into()).collect(),
    );
    let headers: serde_json::Map<String, Value> = r
        .headers
        .iter()
        .map(|(k, v)| {
            (
                pick(HEADERS, *k).to_owned(),
                json!([pick(HEADER_VALUES, *v)]),
            )
        })
        .collect();
    if !headers.is_empty() {
        rule.insert("headers".into(), Value::Object(headers));
    }
    Value::Object(rule)
}

fn source(s: &Source) -> Value {
    let mut source = serde_json::Map::new();
    let mut set = |key: &str, list: Vec<Value>| {
        if !list.is_empty() {
            source.insert(key.to_owned(), Value::Array(list));
        }
    };
    set(
        "principals",
        s.principals
            .iter()
            .map(|p| pick(PRINCIPALS, *p).into())
            .collect(),
    );
    set(
        "serviceAccounts",
        s.service_accounts
            .iter()
            .map(|(ns, sa)| {
                format!("{}/{}", pick(NAMESPACES, *ns), pick(SERVICE_ACCOUNTS, *sa)).into()
            })
            .collect(),
    );
    set(
        "namespaces",
        s.namespaces
            .iter()
            .map(|n| pick(NAMESPACES, *n).into())
            .collect(),
    );
    set(
        "ipBlocks",
        s.ip_blocks
            .iter()
            .map(|(cidr, except)| {
                let except: Vec<&str> = except.iter().map(|e| pick(CIDRS, *e)).collect();
                json!({"cidr": pick(CIDRS, *cidr), "except": except})
            })
            .collect(),
    );
    Value::Object(source)
}

fn port_spec(port: Port) -> Value {
    match port {
        Port::Known(p) => pick(PORTS, p).into(),
        Port::Range(a, b) => format!("{}-{}", pick(PORTS, a), pick(PORTS, b)).into(),
        Port::Any(p) => p.into(),
    }
}

fn port_number(port: Port) -> u16 {
    match port {
        Port::Known(p) | Port::Range(p, _) => pick(PORTS, p),
        Port::Any(p) => p,
    }
}

fn pick<T: Copy>(list: &[T], i: u8) -> T {
    list[usize::from(i) % list.len()]
}

const NAMESPACES: &[&str] = &["a", "b", "c"];
const SERVICE_ACCOUNTS: &[&str] = &["x", "y"];
const LABEL_KEYS: &[&str] = &["app", "tier"];
const LABEL_VALUES: &[&str] = &["web", "db"];
/// (namespace, service account, labels); workload `w{i}` has address `IPS[i]`.
const WORKLOADS: &[(&str, &str, &[(&str, &str)])] = &[
    ("a", "x", &[("app", "web")]),
    ("a", "y", &[("app", "db")]),
    ("b", "x", &[("app", "web"), ("tier", "db")]),
    ("b", "y", &[]),
];
const IPS: &[&str] = &[
    "10.0.0.1",
    "10.0.0.2",
    "10.1.0.1",
    "fd00::1",
    "192.168.1.1",
    "::1",
];
const CIDRS: &[&str] = &[
    "10.0.0.0/8",
    "10.0.0.0/16",
    "10.0.0.1/32",
    "0.0.0.0/0",
    "fd00::/8",
    "10.0.0.2",
    "::/0",
];
const PORTS: &[u16] = &[80, 8080, 9000, 1, 65535];
const PRINCIPALS: &[&str] = &[
    "*",
    "spiffe://cluster.local/ns/a/sa/x",
    "spiffe://cluster.local/ns/a/*",
    "*/sa/y",
    "spiffe://example.org/ns/a/sa/x",
];
const METHODS: &[&str] = &["GET", "POST", "DELETE"];
const PATHS: &[&str] = &["/admin", "/admin*", "*", "*.json", "/", "/api/*"];
const HEADERS: &[&str] = &["x-user", "x-role"];
const HEADER_VALUES: &[&str] = &["alice", "admin", ""];
