//! Properties of policy decisions over a small universe, so that selectors, sources and
//! facts collide often: the real decision path against the documented semantics
//! (`reference`), and invariants a policy change must keep.

use std::{collections::BTreeMap, net::IpAddr};

use proptest::prelude::*;

use super::{
    ip,
    reference::{self, Judge},
    snapshot, workload,
};
use crate::{
    identity::SpiffeId,
    policy::{ConnectionFacts, PolicyIndex, RequestFacts},
    state::{
        AccessPolicy, Action, IpBlock, L7Match, PortRange, Principal, Rule, Service,
        ServiceAccount, ServicePort, Snapshot, Source, Waypoint, Workload, WorkloadRef,
        WorkloadSelector,
    },
};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn the_node_proxy_decides_as_docs_policy_md_says((snapshot, case) in world()) {
        // The agent's path: an index for the node's trust domain, `admit` per connection.
        let index = PolicyIndex::for_trust_domain(Some(TRUST_DOMAIN)).rebuild(&snapshot);
        let facts = case.facts(None);
        let expected = reference::decide(&snapshot, TRUST_DOMAIN, Judge::NodeProxy, &facts);
        let decision = index.admit(&facts);
        prop_assert!(expected.admits(&decision), "docs say {expected:?}, agent decided {decision:?}");
    }

    #[test]
    fn a_waypoint_decides_each_request_as_docs_policy_md_says(
        (snapshot, case, request) in world().prop_flat_map(|(s, c)| (Just(s), Just(c), request()))
    ) {
        // The waypoint's path: the same index, `evaluate` with the request.
        let index = PolicyIndex::for_trust_domain(Some(TRUST_DOMAIN)).rebuild(&snapshot);
        let headers = request.headers();
        let request = RequestFacts { method: request.method, path: request.path, headers: &headers, user: None };
        let facts = case.facts(Some(&request));
        let expected = reference::decide(&snapshot, TRUST_DOMAIN, Judge::Waypoint, &facts);
        let decision = index.evaluate(&facts);
        prop_assert!(expected.admits(&decision), "docs say {expected:?}, waypoint decided {decision:?}");
    }

    #[test]
    fn adding_a_deny_policy_never_turns_a_deny_into_an_allow(
        (snapshot, case, extra) in world().prop_flat_map(|(s, c)| {
            (Just(s), Just(c), access_policy("extra".into()))
        })
    ) {
        let before = PolicyIndex::build(&snapshot).evaluate(&case.facts(None));
        let mut more = snapshot.clone();
        more.policies.insert(extra.name.clone(), AccessPolicy { action: Action::Deny, ..extra });
        let after = PolicyIndex::build(&more).evaluate(&case.facts(None));
        prop_assert!(before.is_allowed() || !after.is_allowed(), "{before:?} became {after:?}");
    }

    #[test]
    fn default_deny_only_changes_unselected_workloads((snapshot, case) in world()) {
        let mut open = snapshot.clone();
        open.mesh.default_deny = false;
        let mut closed = snapshot;
        closed.mesh.default_deny = true;
        let open = PolicyIndex::build(&open).evaluate(&case.facts(None));
        let closed = PolicyIndex::build(&closed).evaluate(&case.facts(None));
        if closed.reason() == Some("default_deny") {
            prop_assert_eq!(open, crate::policy::Decision::Allow);
        } else {
            prop_assert_eq!(open, closed);
        }
    }

    #[test]
    fn plaintext_decisions_ignore_sources_that_need_an_identity(
        (snapshot, case) in world()
    ) {
        let facts = ConnectionFacts { source_identity: None, ..case.facts(None) };
        let decision = PolicyIndex::build(&snapshot).evaluate(&facts);
        // Dropping every source that needs an identity leaves the decision unchanged.
        let mut ip_only = snapshot.clone();
        for policy in ip_only.policies.values_mut() {
            for rule in &mut policy.rules {
                let had_sources = !rule.from.is_empty();
                rule.from.retain(|s| {
                    s.principals.is_empty() && s.service_accounts.is_empty()
                        && s.namespaces.is_empty()
                });
                if had_sources && rule.from.is_empty() {
                    // No source left that could match: the rule matches nothing.
                    rule.from.push(Source {
                        ip_blocks: vec![IpBlock {
                            cidr: "0.0.0.0/32".parse().unwrap(),
                            except: vec![],
                        }],
                        ..Source::default()
                    });
                }
            }
        }
        prop_assert_eq!(decision, PolicyIndex::build(&ip_only).evaluate(&facts));
    }
}

const TRUST_DOMAIN: &str = "cluster.local";
const NAMESPACES: [&str; 3] = ["a", "b", "ab"];
const LABEL_KEYS: [&str; 2] = ["app", "tier"];
const LABEL_VALUES: [&str; 2] = ["x", "y"];

fn labels() -> impl Strategy<Value = BTreeMap<String, String>> {
    prop::collection::btree_map(
        prop::sample::select(&LABEL_KEYS[..]).prop_map(String::from),
        prop::sample::select(&LABEL_VALUES[..]).prop_map(String::from),
        0..=2,
    )
}

/// Peers that differ from each other in one part only (trust domain, namespace, service
/// account), some of them a prefix of another.
fn ids() -> Vec<SpiffeId> {
    [
        "spiffe://cluster.local/ns/a/sa/s1",
        "spiffe://cluster.local/ns/a/sa/s2",
        "spiffe://cluster.local/ns/b/sa/s2",
        "spiffe://cluster.local/ns/ab/sa/s1",
        "spiffe://cluster.local/ns/a/sa/s1x",
        "spiffe://other.td/ns/a/sa/s1",
        "spiffe://other.td/ns/b/sa/s2",
        "spiffe://cluster.local.evil/ns/a/sa/s1",
        // The waypoint of namespace `a`, and its names in another trust domain.
        "spiffe://cluster.local/ns/a/sa/wp-sa",
        "spiffe://other.td/ns/a/sa/wp-sa",
    ]
    .iter()
    .map(|id| id.parse().unwrap())
    .collect()
}

/// Mostly empty, so that sources setting a field or two (whose every field can decide)
/// are common.
fn sometimes<T: std::fmt::Debug + Clone + 'static>(
    values: impl Strategy<Value = T> + 'static,
) -> impl Strategy<Value = Vec<T>> {
    prop_oneof![2 => Just(vec![]), 1 => prop::collection::vec(values, 1..=2)]
}

fn source() -> impl Strategy<Value = Source> {
    let principals = sometimes(prop_oneof![
        Just(Principal::Any),
        prop::sample::select(ids()).prop_map(Principal::Exact),
        Just(Principal::Prefix("spiffe://cluster.local/ns/a/".into())),
        Just(Principal::Prefix("spiffe://cluster.local/".into())),
        Just(Principal::Suffix("/sa/s2".into())),
        Just(Principal::Suffix("/ns/a/sa/s1".into())),
    ]);
    let service_accounts = sometimes(
        prop::sample::select(vec![("a", "s1"), ("b", "s2"), ("a", "s2"), ("ab", "s1")]).prop_map(
            |(ns, sa)| ServiceAccount {
                namespace: ns.into(),
                name: sa.into(),
            },
        ),
    );
    let namespaces = sometimes(prop::sample::select(&NAMESPACES[..]).prop_map(String::from));
    let ip_blocks = sometimes(
        prop::sample::select(vec![
            ("10.0.0.0/8", vec!["10.1.0.0/16"]),
            ("10.0.0.0/8", vec!["10.1.0.0/16", "10.0.0.5/32"]),
            ("10.1.0.0/16", vec![]),
            ("10.0.0.5/32", vec![]),
            ("192.168.0.0/16", vec![]),
            ("0.0.0.0/0", vec!["10.0.0.0/8"]),
            ("fd00::/8", vec!["fd00:1::/32"]),
            ("::/0", vec![]),
        ])
        .prop_map(|(cidr, except)| IpBlock {
            cidr: cidr.parse().unwrap(),
            except: except.into_iter().map(|e| e.parse().unwrap()).collect(),
        }),
    );
    (principals, service_accounts, namespaces, ip_blocks)
        .prop_map(
            |(principals, service_accounts, namespaces, ip_blocks)| Source {
                principals,
                service_accounts,
                namespaces,
                ip_blocks,
            },
        )
        // "an entry must set at least one field"
        .prop_filter("a source sets a field", |s| *s != Source::default())
}

fn l7() -> impl Strategy<Value = L7Match> {
    let methods = prop::collection::vec(
        prop::sample::select(vec!["GET", "POST"]).prop_map(String::from),
        0..=1,
    );
    let paths = prop::collection::vec(
        prop::sample::select(vec!["/admin", "/admin/*", "*/x"]).prop_map(String::from),
        0..=1,
    );
    let headers = prop::collection::btree_map(
        Just("x-env".to_string()),
        prop::collection::vec(
            prop::sample::select(vec!["prod", "canary"]).prop_map(String::from),
            1..=2,
        ),
        0..=1,
    );
    (methods, paths, headers)
        .prop_map(|(methods, paths, headers)| L7Match {
            methods,
            paths,
            headers,
            ..L7Match::default()
        })
        .prop_filter("a rule with HTTP conditions sets one", |l7| {
            *l7 != L7Match::default()
        })
}

fn rule() -> impl Strategy<Value = Rule> {
    let ports = prop::collection::vec(
        prop::sample::select(vec![(80, 80), (443, 443), (8000, 8100)])
            .prop_map(|(start, end)| PortRange { start, end }),
        0..=2,
    );
    (
        prop::collection::vec(source(), 0..=2),
        ports,
        prop::option::weighted(0.25, l7()),
    )
        .prop_map(|(from, to_ports, l7)| Rule { from, to_ports, l7 })
}

fn access_policy(name: String) -> impl Strategy<Value = AccessPolicy> {
    (
        prop::sample::select(&NAMESPACES[..]),
        labels(),
        prop_oneof![Just(Action::Allow), Just(Action::Deny)],
        prop::collection::vec(rule(), 0..=2),
        prop::bool::weighted(0.08),
    )
        .prop_map(move |(namespace, match_labels, action, rules, invalid)| {
            let name = WorkloadRef::new(namespace, name.clone());
            let selector = WorkloadSelector {
                namespace: namespace.into(),
                match_labels,
            };
            if invalid {
                return AccessPolicy::fail_closed(name, selector, "a typo".into());
            }
            AccessPolicy {
                name,
                selector,
                action,
                rules,
                invalid: None,
                external_services: vec![],
            }
        })
}

fn policies() -> impl Strategy<Value = Vec<AccessPolicy>> {
    prop::collection::vec(prop::sample::select((0..12).collect::<Vec<u32>>()), 0..8).prop_flat_map(
        |names| {
            names
                .into_iter()
                .map(|n| access_policy(format!("p{n}")))
                .collect::<Vec<_>>()
        },
    )
}

fn workloads() -> impl Strategy<Value = Vec<Workload>> {
    prop::collection::vec((prop::sample::select(&NAMESPACES[..]), labels()), 1..6).prop_map(
        |specs| {
            specs
                .into_iter()
                .enumerate()
                .map(|(i, (namespace, labels))| Workload {
                    labels,
                    ips: vec![workload_ip(i)],
                    ..workload(namespace, &format!("w{i}"), &[])
                })
                .collect()
        },
    )
}

/// What the proxy would see: a destination (sometimes relabelled since the snapshot, or
/// unknown to it), a port, a peer.
#[derive(Clone, Debug)]
struct Case {
    destination: Workload,
    port: u16,
    identity: Option<SpiffeId>,
    source_ip: IpAddr,
}

impl Case {
    fn facts<'a>(&'a self, request: Option<&'a RequestFacts<'a>>) -> ConnectionFacts<'a> {
        ConnectionFacts {
            destination: &self.destination,
            dst_port: self.port,
            source_identity: self.identity.as_ref(),
            source_ip: self.source_ip,
            request,
        }
    }
}

fn case(workloads: &[Workload]) -> impl Strategy<Value = Case> + use<> {
    let destination = prop_oneof![
        4 => prop::sample::select(workloads.to_vec()),
        1 => (prop::sample::select(workloads.to_vec()), labels())
            .prop_map(|(w, labels)| Workload { labels, ..w }),
        1 => (prop::sample::select(&NAMESPACES[..]), labels())
            .prop_map(|(namespace, labels)| Workload { labels, ..workload(namespace, "new", &[]) }),
    ];
    (
        destination,
        prop::sample::select(vec![80u16, 443, 7999, 8000, 8050, 8100, 8101, 9000]),
        prop::option::of(prop::sample::select(ids())),
        prop::sample::select(vec![
            ip("10.0.0.5"),
            ip("10.0.0.6"),
            ip("10.1.0.5"),
            ip("10.1.255.255"),
            ip("10.2.0.0"),
            ip("192.168.1.1"),
            ip("172.16.0.1"),
            ip("fd00::5"),
            ip("fd00:1::5"),
        ]),
    )
        .prop_map(|(destination, port, identity, source_ip)| Case {
            destination,
            port,
            identity,
            source_ip,
        })
}

fn workload_ip(i: usize) -> IpAddr {
    IpAddr::from([10, 9, 0, u8::try_from(i + 1).expect("a few workloads")])
}

/// Services with some of the workloads as endpoints, some bound to a waypoint: `wp`, which
/// only namespace `a` has, or `gone`, which none has.
fn services(workloads: usize) -> impl Strategy<Value = Vec<Service>> {
    let service = (
        prop::sample::select(&NAMESPACES[..]),
        prop::sample::subsequence((0..workloads).collect::<Vec<_>>(), 0..=workloads),
        prop::sample::subsequence(vec![80u16, 8050, 9000], 1..=2),
        prop::option::weighted(0.7, prop::sample::select(vec!["wp", "gone"])),
    );
    prop::collection::vec(service, 0..=2).prop_map(|specs| {
        specs
            .into_iter()
            .enumerate()
            .map(|(n, (namespace, endpoints, ports, waypoint))| Service {
                name: WorkloadRef::new(namespace, format!("s{n}")),
                vips: vec![],
                ports: ports
                    .into_iter()
                    .map(|target_port| ServicePort {
                        port: 80,
                        target_port,
                    })
                    .collect(),
                endpoints: endpoints.into_iter().map(workload_ip).collect(),
                waypoint: waypoint.map(String::from),
                traffic_distribution: None,
            })
            .collect()
    })
}

fn world() -> impl Strategy<Value = (Snapshot, Case)> {
    (workloads(), policies(), any::<bool>())
        .prop_flat_map(|(workloads, policies, default_deny)| {
            let services = services(workloads.len());
            (
                Just(workloads),
                Just(policies),
                Just(default_deny),
                services,
            )
        })
        .prop_flat_map(|(workloads, policies, default_deny, services)| {
            let mut snapshot = snapshot(&workloads.iter().collect::<Vec<_>>(), policies);
            snapshot.mesh.default_deny = default_deny;
            for service in services {
                snapshot.services.insert(service.name.clone(), service);
            }
            let waypoint = Waypoint {
                name: WorkloadRef::new("a", "wp"),
                service_account: "wp-sa".into(),
                addresses: vec![ip("10.9.1.1")],
            };
            snapshot.waypoints.insert(waypoint.name.clone(), waypoint);
            (Just(snapshot), case(&workloads))
        })
}

/// An HTTP request as a waypoint sees it (path already normalised).
#[derive(Clone, Debug)]
struct Request {
    method: &'static str,
    path: &'static str,
    env: Option<&'static str>,
}

impl Request {
    fn headers(&self) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        if let Some(env) = self.env {
            headers.insert("x-env", http::HeaderValue::from_static(env));
        }
        headers
    }
}

fn request() -> impl Strategy<Value = Request> {
    (
        prop::sample::select(vec!["GET", "POST", "DELETE"]),
        prop::sample::select(vec!["/", "/admin", "/admin/users", "/adminx", "/a/x"]),
        prop::option::of(prop::sample::select(vec!["prod", "canary", "dev"])),
    )
        .prop_map(|(method, path, env)| Request { method, path, env })
}
