//! Unit tests of policy decisions, one documented behaviour each; `properties` checks the
//! whole decision path against `reference`, a model written from docs/policy.md.

use std::{net::IpAddr, path::PathBuf};

use serde_json::json;

use super::*;
use crate::{
    identity::SpiffeId,
    jwt::Claims,
    state::{
        AccessPolicy, Action, IpBlock, L7Match, Location, PortRange, Principal, Rule,
        ServiceAccount, Snapshot, Source, Workload, WorkloadRef, WorkloadSelector,
    },
};

mod properties;
mod reference;

fn workload(namespace: &str, name: &str, labels: &[(&str, &str)]) -> Workload {
    Workload {
        name: WorkloadRef::new(namespace, name),
        service_account: name.into(),
        ips: vec![],
        location: Location::Local {
            netns: PathBuf::from("/run/netns/x"),
        },
        enrolled: true,
        mtls_mode: None,
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

fn policy(
    namespace: &str,
    name: &str,
    labels: &[(&str, &str)],
    action: Action,
    rules: Vec<Rule>,
) -> AccessPolicy {
    AccessPolicy {
        name: WorkloadRef::new(namespace, name),
        selector: WorkloadSelector {
            namespace: namespace.into(),
            match_labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        },
        action,
        rules,
        invalid: None,
        external_services: vec![],
    }
}

fn snapshot(workloads: &[&Workload], policies: Vec<AccessPolicy>) -> Snapshot {
    let mut snapshot = Snapshot::default();
    for w in workloads {
        snapshot.workloads.insert(w.name.clone(), (*w).clone());
    }
    for p in policies {
        snapshot.policies.insert(p.name.clone(), p);
    }
    snapshot
}

fn id(namespace: &str, service_account: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", namespace, service_account).unwrap()
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn from_namespace(namespace: &str) -> Rule {
    Rule {
        from: vec![Source {
            namespaces: vec![namespace.into()],
            ..Source::default()
        }],
        ..Rule::default()
    }
}

fn from_cidr(cidr: &str) -> Rule {
    Rule {
        from: vec![Source {
            ip_blocks: vec![IpBlock {
                cidr: cidr.parse().unwrap(),
                except: vec![],
            }],
            ..Source::default()
        }],
        ..Rule::default()
    }
}

/// An mTLS connection to `dst:port` from `peer` at 10.1.0.2.
fn mtls<'a>(dst: &'a Workload, port: u16, peer: &'a SpiffeId) -> ConnectionFacts<'a> {
    ConnectionFacts {
        destination: dst,
        dst_port: port,
        source_identity: Some(peer),
        source_ip: ip("10.1.0.2"),
        request: None,
    }
}

fn plaintext<'a>(dst: &'a Workload, port: u16, src: &str) -> ConnectionFacts<'a> {
    ConnectionFacts {
        destination: dst,
        dst_port: port,
        source_identity: None,
        source_ip: ip(src),
        request: None,
    }
}

fn deny(policy: Option<(&str, &str)>, reason: DenyReason) -> Decision {
    Decision::Deny {
        policy: policy.map(|(ns, name)| WorkloadRef::new(ns, name)),
        reason,
    }
}

#[test]
fn no_policies_allow_everything() {
    let api = workload("prod", "api", &[]);
    let index = PolicyIndex::build(&snapshot(&[&api], vec![]));
    assert_eq!(
        index.evaluate(&mtls(&api, 80, &id("web", "front"))),
        Decision::Allow
    );
    assert_eq!(
        index.evaluate(&plaintext(&api, 80, "10.9.9.9")),
        Decision::Allow
    );
}

#[test]
fn deny_wins_over_allow() {
    let api = workload("prod", "api", &[("app", "api")]);
    let index = PolicyIndex::build(&snapshot(
        &[&api],
        vec![
            policy(
                "prod",
                "allow-web",
                &[],
                Action::Allow,
                vec![from_namespace("web")],
            ),
            policy(
                "prod",
                "deny-web",
                &[("app", "api")],
                Action::Deny,
                vec![from_namespace("web")],
            ),
        ],
    ));
    let decision = index.evaluate(&mtls(&api, 80, &id("web", "front")));
    assert_eq!(
        decision,
        deny(Some(("prod", "deny-web")), DenyReason::DeniedByPolicy)
    );
    assert_eq!(decision.reason(), Some("denied_by_policy"));
}

#[test]
fn an_allow_policy_denies_what_it_does_not_allow() {
    let api = workload("prod", "api", &[]);
    let other = workload("prod", "other", &[("app", "other")]);
    let index = PolicyIndex::build(&snapshot(
        &[&api, &other],
        vec![policy(
            "prod",
            "allow-web",
            &[("app", "api")],
            Action::Allow,
            vec![from_namespace("web")],
        )],
    ));
    // The selector does not match `api` (no labels): it stays open.
    assert_eq!(
        index.evaluate(&mtls(&api, 80, &id("jobs", "batch"))),
        Decision::Allow
    );
    let api = workload("prod", "api", &[("app", "api")]);
    let index = PolicyIndex::build(&snapshot(
        &[&api, &other],
        vec![policy(
            "prod",
            "allow-web",
            &[("app", "api")],
            Action::Allow,
            vec![from_namespace("web")],
        )],
    ));
    assert_eq!(
        index.evaluate(&mtls(&api, 80, &id("web", "front"))),
        Decision::Allow
    );
    let decision = index.evaluate(&mtls(&api, 80, &id("jobs", "batch")));
    assert_eq!(decision, deny(None, DenyReason::NotAllowed));
    assert_eq!(decision.reason(), Some("not_allowed"));
    // Not selected, not affected.
    assert_eq!(
        index.evaluate(&mtls(&other, 80, &id("jobs", "batch"))),
        Decision::Allow
    );
}

#[test]
fn default_deny_denies_unselected_workloads() {
    let api = workload("prod", "api", &[("app", "api")]);
    let db = workload("prod", "db", &[("app", "db")]);
    let mut snapshot = snapshot(
        &[&api, &db],
        vec![policy(
            "prod",
            "allow-web",
            &[("app", "api")],
            Action::Allow,
            vec![from_namespace("web")],
        )],
    );
    snapshot.mesh.default_deny = true;
    let index = PolicyIndex::build(&snapshot);
    let web = id("web", "front");
    assert_eq!(index.evaluate(&mtls(&api, 80, &web)), Decision::Allow);
    let decision = index.evaluate(&mtls(&db, 80, &web));
    assert_eq!(decision, deny(None, DenyReason::DefaultDeny));
    assert_eq!(decision.reason(), Some("default_deny"));
}

#[test]
fn port_rules_match_only_their_ports() {
    let api = workload("prod", "api", &[]);
    let rule = Rule {
        to_ports: vec![
            PortRange::single(80),
            PortRange {
                start: 8000,
                end: 8100,
            },
        ],
        ..from_namespace("web")
    };
    let index = PolicyIndex::build(&snapshot(
        &[&api],
        vec![policy("prod", "web-http", &[], Action::Allow, vec![rule])],
    ));
    let web = id("web", "front");
    for port in [80, 8000, 8050, 8100] {
        assert!(
            index.evaluate(&mtls(&api, port, &web)).is_allowed(),
            "{port}"
        );
    }
    for port in [81, 443, 7999, 8101] {
        assert!(
            !index.evaluate(&mtls(&api, port, &web)).is_allowed(),
            "{port}"
        );
    }
}

#[test]
fn plaintext_matches_only_ip_rules() {
    let api = workload("prod", "api", &[]);
    let mut from = vec![Source {
        principals: vec![Principal::Any],
        ..Source::default()
    }];
    from.extend(short_forms());
    let identity_rules = Rule {
        from,
        ..Rule::default()
    };
    let index = PolicyIndex::build(&snapshot(
        &[&api],
        vec![
            policy(
                "prod",
                "by-identity",
                &[],
                Action::Allow,
                vec![identity_rules.clone()],
            ),
            policy(
                "prod",
                "by-ip",
                &[],
                Action::Allow,
                vec![from_cidr("192.168.0.0/16")],
            ),
        ],
    ));
    assert!(
        !index
            .evaluate(&plaintext(&api, 80, "10.1.0.2"))
            .is_allowed()
    );
    assert!(
        index
            .evaluate(&plaintext(&api, 80, "192.168.3.4"))
            .is_allowed()
    );
    assert!(
        index
            .evaluate(&mtls(&api, 80, &id("web", "front")))
            .is_allowed()
    );

    // Nor does a plaintext peer meet the identity conditions of a DENY rule.
    let index = PolicyIndex::build(&snapshot(
        &[&api],
        vec![policy(
            "prod",
            "deny-identities",
            &[],
            Action::Deny,
            vec![identity_rules],
        )],
    ));
    assert!(
        index
            .evaluate(&plaintext(&api, 80, "10.1.0.2"))
            .is_allowed()
    );
    assert!(
        !index
            .evaluate(&mtls(&api, 80, &id("web", "front")))
            .is_allowed()
    );
}

#[test]
fn l7_rules_are_conservative() {
    let api = workload("prod", "api", &[]);
    let get_only = L7Match {
        methods: vec!["GET".into()],
        ..L7Match::default()
    };
    // ALLOW GET from web: the node proxy cannot see methods, so it allows nothing.
    let index = PolicyIndex::build(&snapshot(
        &[&api],
        vec![policy(
            "prod",
            "allow-get",
            &[],
            Action::Allow,
            vec![Rule {
                l7: Some(get_only.clone()),
                ..from_namespace("web")
            }],
        )],
    ));
    assert_eq!(
        index.evaluate(&mtls(&api, 80, &id("web", "front"))),
        deny(None, DenyReason::NotAllowed)
    );
    // DENY DELETE from web: denies every connection from web, and only from web.
    let index = PolicyIndex::build(&snapshot(
        &[&api],
        vec![policy(
            "prod",
            "deny-delete",
            &[],
            Action::Deny,
            vec![Rule {
                l7: Some(L7Match {
                    methods: vec!["DELETE".into()],
                    ..L7Match::default()
                }),
                ..from_namespace("web")
            }],
        )],
    ));
    assert_eq!(
        index.evaluate(&mtls(&api, 80, &id("web", "front"))),
        deny(Some(("prod", "deny-delete")), DenyReason::DeniedByPolicy)
    );
    assert!(
        index
            .evaluate(&mtls(&api, 80, &id("jobs", "batch")))
            .is_allowed()
    );
}

#[test]
fn a_waypoint_judges_http_conditions_exactly() {
    let api = workload("prod", "api", &[]);
    let index = PolicyIndex::build(&snapshot(
        &[&api],
        vec![policy(
            "prod",
            "no-admin-writes",
            &[],
            Action::Deny,
            vec![Rule {
                l7: Some(L7Match {
                    methods: vec!["POST".into()],
                    paths: vec!["/admin".into(), "/admin/*".into()],
                    headers: [("x-env".to_string(), vec!["prod".to_string()])].into(),
                    ..L7Match::default()
                }),
                ..Rule::default()
            }],
        )],
    ));
    let peer = id("web", "front");
    let mut prod = http::HeaderMap::new();
    prod.insert("x-env", http::HeaderValue::from_static("prod"));
    let judge = |method: &str, path: &str, headers: &http::HeaderMap| {
        let request = RequestFacts {
            method,
            path,
            headers,
            user: None,
        };
        index.evaluate(&ConnectionFacts {
            request: Some(&request),
            ..mtls(&api, 80, &peer)
        })
    };
    assert_eq!(
        judge("POST", "/admin/users", &prod),
        deny(
            Some(("prod", "no-admin-writes")),
            DenyReason::DeniedByPolicy
        )
    );
    assert!(judge("POST", "/admin", &prod).reason().is_some());
    assert!(judge("GET", "/admin", &prod).is_allowed());
    assert!(judge("POST", "/", &prod).is_allowed());
    assert!(judge("POST", "/adminx", &prod).is_allowed());
    assert!(judge("POST", "/admin", &http::HeaderMap::new()).is_allowed());
    assert!(
        judge("post", "/admin", &prod).is_allowed(),
        "methods are case-sensitive"
    );
}

#[test]
fn end_users_are_judged_by_principal_and_claims_and_no_token_matches_neither() {
    let api = workload("prod", "api", &[]);
    let issuer = "https://issuer.test";
    let index = PolicyIndex::build(&snapshot(
        &[&api],
        vec![policy(
            "prod",
            "users",
            &[],
            Action::Allow,
            vec![
                Rule {
                    l7: Some(L7Match {
                        request_principals: vec![format!("{issuer}/alice"), "*/ops-bob".into()],
                        ..L7Match::default()
                    }),
                    ..Rule::default()
                },
                Rule {
                    l7: Some(L7Match {
                        claims: [
                            ("group".to_string(), vec!["admins".to_string()]),
                            ("level".to_string(), vec!["3".to_string()]),
                        ]
                        .into(),
                        ..L7Match::default()
                    }),
                    ..Rule::default()
                },
            ],
        )],
    ));
    let peer = id("web", "front");
    let headers = http::HeaderMap::new();
    let judge = |user: Option<&Claims>| {
        let request = RequestFacts {
            method: "GET",
            path: "/",
            headers: &headers,
            user,
        };
        index.evaluate(&ConnectionFacts {
            request: Some(&request),
            ..mtls(&api, 80, &peer)
        })
    };
    let user = |claims: serde_json::Value| Claims::for_tests(claims);
    assert!(judge(Some(&user(json!({"iss": issuer, "sub": "alice"})))).is_allowed());
    assert!(
        judge(Some(&user(
            json!({"iss": "https://other", "sub": "ops-bob"})
        )))
        .is_allowed(),
        "a suffix pattern after the issuer"
    );
    assert_eq!(
        judge(Some(&user(json!({"iss": issuer, "sub": "bob"})))),
        deny(None, DenyReason::NotAllowed)
    );
    assert!(
        judge(Some(&user(
            json!({"iss": issuer, "sub": "carol", "group": ["dev", "admins"], "level": 3})
        )))
        .is_allowed(),
        "an array claim holding the value, a number claim by its text"
    );
    assert!(
        !judge(Some(&user(
            json!({"iss": issuer, "sub": "carol", "group": "admins"})
        )))
        .is_allowed(),
        "every claim of the rule must match"
    );
    assert!(
        judge(Some(&user(
            json!({"iss": issuer, "group": "admins", "level": "3"})
        )))
        .is_allowed(),
        "claims match without a subject"
    );
    assert_eq!(
        judge(None),
        deny(None, DenyReason::NotAllowed),
        "no token, no principal"
    );
    // A node proxy cannot see the token: the ALLOW rules grant nothing there.
    assert!(!index.evaluate(&mtls(&api, 80, &peer)).is_allowed());
}

#[test]
fn selectors_stay_in_their_namespace_and_need_every_label() {
    let api = workload("prod", "api", &[("app", "api"), ("tier", "back")]);
    let dev_api = workload("dev", "api", &[("app", "api"), ("tier", "back")]);
    let index = PolicyIndex::build(&snapshot(
        &[&api, &dev_api],
        vec![
            policy(
                "prod",
                "all-labels",
                &[("app", "api"), ("tier", "back")],
                Action::Deny,
                vec![Rule::default()],
            ),
            policy(
                "dev",
                "wrong-value",
                &[("tier", "front")],
                Action::Deny,
                vec![Rule::default()],
            ),
        ],
    ));
    let peer = id("web", "front");
    assert!(!index.evaluate(&mtls(&api, 80, &peer)).is_allowed());
    assert!(index.evaluate(&mtls(&dev_api, 80, &peer)).is_allowed());
    assert_eq!(
        index.policies_for(&api),
        vec![&WorkloadRef::new("prod", "all-labels")]
    );
    assert!(index.policies_for(&dev_api).is_empty());
}

#[test]
fn sources_match_each_field_and_any_entry() {
    let api = workload("prod", "api", &[]);
    let sa = |ns: &str, name: &str| ServiceAccount {
        namespace: ns.into(),
        name: name.into(),
    };
    let rule = Rule {
        from: vec![
            // From web, and from the front service account: both must hold.
            Source {
                namespaces: vec!["web".into()],
                service_accounts: vec![sa("web", "front")],
                ..Source::default()
            },
            Source {
                principals: vec![Principal::Prefix("spiffe://cluster.local/ns/ops/".into())],
                ..Source::default()
            },
            Source {
                principals: vec![Principal::Suffix("/sa/auditor".into())],
                ..Source::default()
            },
            Source {
                principals: vec![Principal::Exact(id("jobs", "batch"))],
                ip_blocks: vec![IpBlock {
                    cidr: "10.0.0.0/8".parse().unwrap(),
                    except: vec!["10.1.0.0/16".parse().unwrap()],
                }],
                ..Source::default()
            },
        ],
        ..Rule::default()
    };
    let index = PolicyIndex::build(&snapshot(
        &[&api],
        vec![policy("prod", "mixed", &[], Action::Allow, vec![rule])],
    ));
    let allowed = |peer: &SpiffeId, src: &str| {
        let facts = ConnectionFacts {
            source_ip: ip(src),
            ..mtls(&api, 80, peer)
        };
        index.evaluate(&facts).is_allowed()
    };
    assert!(allowed(&id("web", "front"), "10.1.0.2"));
    assert!(!allowed(&id("web", "back"), "10.1.0.2"));
    // The short forms name this mesh's identities only.
    let foreign: SpiffeId = "spiffe://other.td/ns/web/sa/front".parse().unwrap();
    assert!(!allowed(&foreign, "10.1.0.2"));
    assert!(allowed(&id("ops", "anyone"), "10.1.0.2"));
    assert!(allowed(&id("billing", "auditor"), "10.1.0.2"));
    assert!(allowed(&id("jobs", "batch"), "10.2.0.2"));
    // The right identity from an excepted range, and vice versa.
    assert!(!allowed(&id("jobs", "batch"), "10.1.0.2"));
    assert!(!allowed(&id("jobs", "other"), "10.2.0.2"));
}

#[test]
fn rules_without_conditions_and_policies_without_rules() {
    let api = workload("prod", "api", &[]);
    let peer = id("web", "front");
    // ALLOW with no rules: selects the workload and allows nothing.
    let index = PolicyIndex::build(&snapshot(
        &[&api],
        vec![policy("prod", "allow-nothing", &[], Action::Allow, vec![])],
    ));
    assert_eq!(
        index.evaluate(&mtls(&api, 80, &peer)),
        deny(None, DenyReason::NotAllowed)
    );
    // DENY with no rules denies nothing; an empty rule matches everything.
    let index = PolicyIndex::build(&snapshot(
        &[&api],
        vec![
            policy("prod", "deny-nothing", &[], Action::Deny, vec![]),
            policy(
                "prod",
                "allow-all",
                &[],
                Action::Allow,
                vec![Rule::default()],
            ),
        ],
    ));
    assert!(index.evaluate(&mtls(&api, 80, &peer)).is_allowed());
    assert!(
        index
            .evaluate(&plaintext(&api, 80, "192.0.2.1"))
            .is_allowed()
    );
}

#[test]
fn the_first_matching_deny_policy_by_name_is_named() {
    let api = workload("prod", "api", &[("app", "api")]);
    let index = PolicyIndex::build(&snapshot(
        &[&api],
        vec![
            policy(
                "prod",
                "b-labelled",
                &[("app", "api")],
                Action::Deny,
                vec![Rule::default()],
            ),
            policy("prod", "c-wide", &[], Action::Deny, vec![Rule::default()]),
            policy(
                "prod",
                "a-other-port",
                &[],
                Action::Deny,
                vec![Rule {
                    to_ports: vec![PortRange::single(9)],
                    ..Rule::default()
                }],
            ),
        ],
    ));
    assert_eq!(
        index.evaluate(&mtls(&api, 80, &id("web", "front"))),
        deny(Some(("prod", "b-labelled")), DenyReason::DeniedByPolicy)
    );
}

#[test]
fn workloads_the_index_does_not_know_are_selected_on_the_spot() {
    let api = workload("prod", "api", &[("app", "api")]);
    let index = PolicyIndex::build(&snapshot(
        &[&api],
        vec![policy(
            "prod",
            "deny-db",
            &[("app", "db")],
            Action::Deny,
            vec![Rule::default()],
        )],
    ));
    let peer = id("web", "front");
    assert!(index.evaluate(&mtls(&api, 80, &peer)).is_allowed());
    // Relabelled since the index was built.
    let relabelled = workload("prod", "api", &[("app", "db")]);
    assert!(!index.evaluate(&mtls(&relabelled, 80, &peer)).is_allowed());
    // Not in the snapshot at all.
    let unknown = workload("prod", "new", &[("app", "db")]);
    assert!(!index.evaluate(&mtls(&unknown, 80, &peer)).is_allowed());
}

#[test]
fn a_new_index_applies_a_new_policy_to_the_same_facts() {
    // How the proxy re-checks open connections: the same facts against the next index.
    let api = workload("prod", "api", &[]);
    let peer = id("web", "front");
    let before = PolicyIndex::build(&snapshot(&[&api], vec![]));
    let facts = mtls(&api, 80, &peer);
    assert!(before.evaluate(&facts).is_allowed());
    let after = before.rebuild(&snapshot(
        &[&api],
        vec![policy(
            "prod",
            "deny-web",
            &[],
            Action::Deny,
            vec![from_namespace("web")],
        )],
    ));
    assert!(!after.evaluate(&facts).is_allowed());
}

#[test]
fn a_policy_that_cannot_be_understood_denies_everything_it_selects_whatever_allows() {
    let api = workload("prod", "api", &[("app", "api")]);
    let web = workload("prod", "web", &[("app", "web")]);
    let selector = WorkloadSelector {
        namespace: "prod".into(),
        match_labels: [("app".to_string(), "api".to_string())].into(),
    };
    let index = PolicyIndex::build(&snapshot(
        &[&api, &web],
        vec![
            policy(
                "prod",
                "allow-all",
                &[],
                Action::Allow,
                vec![Rule::default()],
            ),
            AccessPolicy::fail_closed(
                WorkloadRef::new("prod", "typo"),
                selector,
                "spec.rules[0].toPorts[0]: invalid port \"8080-80\"".into(),
            ),
        ],
    ));
    let invalid = deny(Some(("prod", "typo")), DenyReason::InvalidPolicy);
    let peer = id("web", "front");
    assert_eq!(index.evaluate(&mtls(&api, 8080, &peer)), invalid);
    assert_eq!(index.evaluate(&plaintext(&api, 80, "10.1.0.9")), invalid);
    assert_eq!(invalid.reason(), Some("invalid_policy"));
    // At a waypoint, every request too.
    let headers = http::HeaderMap::new();
    let request = RequestFacts {
        method: "GET",
        path: "/",
        headers: &headers,
        user: None,
    };
    let facts = ConnectionFacts {
        request: Some(&request),
        ..mtls(&api, 8080, &peer)
    };
    assert_eq!(index.evaluate(&facts), invalid);
    // What it does not select is untouched.
    assert!(index.evaluate(&mtls(&web, 8080, &peer)).is_allowed());
}

#[test]
fn service_accounts_and_namespaces_match_only_the_meshs_trust_domain() {
    let api = workload("prod", "api", &[]);
    let by_sa = Source {
        service_accounts: vec![ServiceAccount {
            namespace: "web".into(),
            name: "front".into(),
        }],
        ..Source::default()
    };
    let by_ns = Source {
        namespaces: vec!["web".into()],
        ..Source::default()
    };
    let ours = id("web", "front");
    let theirs = SpiffeId::new("other.domain", "web", "front").unwrap();
    for source in [by_sa, by_ns] {
        for action in [Action::Allow, Action::Deny] {
            let rule = Rule {
                from: vec![source.clone()],
                ..Rule::default()
            };
            let index = PolicyIndex::for_trust_domain(Some("cluster.local")).rebuild(&snapshot(
                &[&api],
                vec![policy("prod", "p", &[], action, vec![rule])],
            ));
            let matches = |peer| {
                index.evaluate(&mtls(&api, 80, peer)).is_allowed() == (action == Action::Allow)
            };
            assert!(
                matches(&ours),
                "{action:?} {source:?} does not match {ours}"
            );
            assert!(!matches(&theirs), "{action:?} {source:?} matches {theirs}");
        }
    }
}

#[test]
fn service_accounts_match_exactly_one_namespace_and_name_of_the_meshs_trust_domain() {
    let api = workload("prod", "api", &[]);
    let rule = Rule {
        from: vec![Source {
            service_accounts: vec![ServiceAccount {
                namespace: "web".into(),
                name: "front".into(),
            }],
            ..Source::default()
        }],
        ..Rule::default()
    };
    let index = PolicyIndex::for_trust_domain(Some("cluster.local")).rebuild(&snapshot(
        &[&api],
        vec![policy("prod", "front-only", &[], Action::Allow, vec![rule])],
    ));
    let allowed = |peer: &str| {
        let peer: SpiffeId = peer.parse().unwrap();
        index.admit(&mtls(&api, 80, &peer)).is_allowed()
    };
    assert!(allowed("spiffe://cluster.local/ns/web/sa/front"));
    for other in [
        // Another account of the namespace, and the same account of another namespace.
        "spiffe://cluster.local/ns/web/sa/back",
        "spiffe://cluster.local/ns/prod/sa/front",
        // Names that the right ones are a prefix or a suffix of.
        "spiffe://cluster.local/ns/web/sa/frontend",
        "spiffe://cluster.local/ns/web/sa/xfront",
        "spiffe://cluster.local/ns/webapp/sa/front",
        "spiffe://cluster.local/ns/myweb/sa/front",
        // Namespace and name swapped.
        "spiffe://cluster.local/ns/front/sa/web",
        // `ns/web/sa/front` of other trust domains, one of them ours with a suffix.
        "spiffe://other.td/ns/web/sa/front",
        "spiffe://cluster.local.evil/ns/web/sa/front",
        "spiffe://local/ns/web/sa/front",
    ] {
        assert!(!allowed(other), "{other} passed a rule for web/front");
    }
    // Plaintext from anywhere carries no service account.
    assert!(!index.admit(&plaintext(&api, 80, "10.1.0.2")).is_allowed());
}

#[test]
fn principals_name_other_trust_domains_where_short_forms_cannot() {
    // `principals` spell the trust domain out, so they (and `*`) may name a peer of a
    // trust domain the bundle also trusts; `serviceAccounts` and `namespaces` never do.
    let api = workload("prod", "api", &[]);
    let foreign: SpiffeId = "spiffe://other.td/ns/web/sa/front".parse().unwrap();
    let index_for = |principal: Principal| {
        let rule = Rule {
            from: vec![Source {
                principals: vec![principal],
                ..Source::default()
            }],
            ..Rule::default()
        };
        PolicyIndex::for_trust_domain(Some("cluster.local")).rebuild(&snapshot(
            &[&api],
            vec![policy("prod", "p", &[], Action::Allow, vec![rule])],
        ))
    };
    for principal in [
        Principal::Any,
        Principal::Exact(foreign.clone()),
        Principal::Prefix("spiffe://other.td/".into()),
        Principal::Suffix("/ns/web/sa/front".into()),
    ] {
        assert!(
            index_for(principal.clone())
                .admit(&mtls(&api, 80, &foreign))
                .is_allowed(),
            "{principal} does not match {foreign}"
        );
    }
    let index = index_for(Principal::Prefix("spiffe://cluster.local/".into()));
    assert!(!index.admit(&mtls(&api, 80, &foreign)).is_allowed());
    assert!(
        index
            .admit(&mtls(&api, 80, &id("web", "front")))
            .is_allowed()
    );
}

#[test]
fn without_a_trust_domain_service_accounts_and_namespaces_match_nothing() {
    let api = workload("prod", "api", &[]);
    let rule = Rule {
        from: short_forms().to_vec(),
        ..Rule::default()
    };
    let snapshot = snapshot(
        &[&api],
        vec![policy(
            "prod",
            "short-forms",
            &[],
            Action::Allow,
            vec![rule],
        )],
    );
    // A node without a CA knows no trust domain (and proves no identity): fail closed.
    let index = PolicyIndex::for_trust_domain(None).rebuild(&snapshot);
    for peer in [id("web", "front"), id("web", "anyone")] {
        assert!(
            !index.evaluate(&mtls(&api, 80, &peer)).is_allowed(),
            "{peer} matched a short form with no trust domain known"
        );
    }
    let index = PolicyIndex::build(&snapshot);
    assert!(
        index
            .evaluate(&mtls(&api, 80, &id("web", "anyone")))
            .is_allowed()
    );
}

/// Sources in the short forms: the service account `web/front`, and the namespace `web`.
fn short_forms() -> [Source; 2] {
    [
        Source {
            service_accounts: vec![ServiceAccount {
                namespace: "web".into(),
                name: "front".into(),
            }],
            ..Source::default()
        },
        Source {
            namespaces: vec!["web".into()],
            ..Source::default()
        },
    ]
}

/// A policy of namespace `egress` naming external services instead of workloads.
fn egress_policy(name: &str, services: &[&str], action: Action, rules: Vec<Rule>) -> AccessPolicy {
    AccessPolicy {
        external_services: services.iter().map(|s| s.to_string()).collect(),
        ..policy("egress", name, &[], action, rules)
    }
}

fn egress_from<'a>(peer: Option<&'a SpiffeId>, src: &str, port: u16) -> EgressFacts<'a> {
    EgressFacts {
        dst_port: port,
        source_identity: peer,
        source_ip: ip(src),
    }
}

#[test]
fn policies_naming_an_external_service_judge_its_clients_and_select_no_workload() {
    let api_service = WorkloadRef::new("egress", "api");
    let db_service = WorkloadRef::new("egress", "db");
    // A pod of the policies' namespace: none of them may select it (an empty selector
    // would otherwise mean "the whole namespace").
    let neighbour = workload("egress", "neighbour", &[]);
    let s = snapshot(
        &[&neighbour],
        vec![
            egress_policy(
                "no-batch",
                &["api"],
                Action::Deny,
                vec![from_namespace("batch")],
            ),
            egress_policy(
                "db-from-app",
                &["db"],
                Action::Allow,
                vec![Rule {
                    to_ports: vec![PortRange::single(5432)],
                    ..from_namespace("app")
                }],
            ),
        ],
    );
    let index = PolicyIndex::build(&s);
    let batch = id("batch", "job");
    let app = id("app", "web");
    assert_eq!(
        index.evaluate_egress(&api_service, &egress_from(Some(&batch), "10.1.0.2", 443)),
        deny(Some(("egress", "no-batch")), DenyReason::DeniedByPolicy)
    );
    assert_eq!(
        index.evaluate_egress(&api_service, &egress_from(Some(&app), "10.1.0.3", 443)),
        Decision::Allow
    );
    // An ALLOW makes the service allow-only: its port and namespace, nothing else.
    assert_eq!(
        index.evaluate_egress(&db_service, &egress_from(Some(&app), "10.1.0.3", 5432)),
        Decision::Allow
    );
    for (peer, port) in [(Some(&app), 5433), (Some(&batch), 5432), (None, 5432)] {
        assert_eq!(
            index.evaluate_egress(&db_service, &egress_from(peer, "10.1.0.3", port)),
            deny(None, DenyReason::NotAllowed),
            "{peer:?} {port}"
        );
    }
    // A service no policy names is open; another namespace's service of the same name is
    // not named by these policies.
    let other = WorkloadRef::new("egress", "other");
    let elsewhere = WorkloadRef::new("batch", "api");
    for service in [&other, &elsewhere] {
        assert_eq!(
            index.evaluate_egress(service, &egress_from(Some(&batch), "10.1.0.2", 443)),
            Decision::Allow
        );
    }
    assert_eq!(
        index.evaluate(&mtls(&neighbour, 443, &batch)),
        Decision::Allow,
        "an egress policy selected a workload"
    );
    // No CA on the node, so no identity for the pod: identity conditions fail closed both
    // ways (the DENY by namespace denies, the ALLOW by namespace does not allow); an
    // address condition still decides on its own.
    assert_eq!(
        index.evaluate_egress(&api_service, &egress_from(None, "10.1.0.3", 443)),
        deny(Some(("egress", "no-batch")), DenyReason::DeniedByPolicy)
    );
    // The mesh's default deny is about reaching workloads, not about the way out.
    let mut closed = s.clone();
    closed.mesh.default_deny = true;
    let index = PolicyIndex::build(&closed);
    assert_eq!(
        index.evaluate_egress(&other, &egress_from(Some(&batch), "10.1.0.2", 443)),
        Decision::Allow
    );
}
