//! The Kubernetes authorizer against a fake API: a `tower_test` mock under a real
//! `kube::Client` that answers the few calls the CA makes (TokenReview, pods, ConfigMaps)
//! the way the API server does, field selectors included, and records every call.

use std::{
    collections::{BTreeMap, HashMap},
    fs,
    path::Path,
    sync::Arc,
    time::Duration,
};

use base64::Engine as _;
use http::{Method, Request, Response};
use http_body_util::BodyExt as _;
use kube::client::Body;
use serde_json::{Value, json};

use super::*;
use crate::{
    ca::{self, Server, tests::TestRoot},
    identity::{
        ca_client::{self, CaClient},
        csr,
    },
    sync::{Mutex, MutexGuard},
};

/// What the fake API knows and how it misbehaves.
#[derive(Default)]
pub(crate) struct FakeState {
    tokens: HashMap<String, FakeToken>,
    pub pods: Vec<FakePod>,
    /// `namespace/name` → the stored object.
    pub config_maps: BTreeMap<String, Value>,
    /// Answer every call with this status (an API error).
    pub failing: Option<u16>,
    /// Never answer (an API that hangs).
    pub hanging: bool,
    /// Authenticate without `status.audiences`, as an audience-unaware authenticator does.
    pub audience_unaware: bool,
    /// List pods as if no field selector had been given (a broken or foreign API).
    pub ignore_field_selectors: bool,
    /// `METHOD path?query` of every call, in order.
    pub calls: Vec<String>,
    /// Answer each TokenReview only after this long (an API server under load).
    pub slow_reviews: Option<Duration>,
    /// TokenReviews being answered now, and the most there ever were at once.
    pub reviews_in_flight: usize,
    pub max_reviews_in_flight: usize,
    resource_version: u64,
}

struct FakeToken {
    username: String,
    audiences: Vec<String>,
    extra: BTreeMap<String, Vec<String>>,
}

#[derive(Clone)]
pub(crate) struct FakePod {
    pub namespace: &'static str,
    pub name: &'static str,
    pub uid: &'static str,
    pub node: &'static str,
    pub service_account: &'static str,
    pub phase: &'static str,
}

/// The fake API; `client` talks to it.
pub(crate) struct FakeApi {
    pub state: Arc<Mutex<FakeState>>,
    pub client: Client,
}

impl FakeApi {
    /// Starts answering; the client's default namespace (the CA's) is `weft`.
    pub fn start(state: FakeState) -> Self {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let state = Arc::new(Mutex::new(state));
        let shared = Arc::clone(&state);
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Some((request, send)) = handle.next_request().await {
                let (parts, body) = request.into_parts();
                let body = body
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                let slow = shared
                    .lock()
                    .slow_reviews
                    .filter(|_| parts.uri.path().ends_with("/tokenreviews"));
                if let Some(delay) = slow {
                    let shared = Arc::clone(&shared);
                    tokio::spawn(async move {
                        {
                            let mut state = shared.lock();
                            state.reviews_in_flight += 1;
                            state.max_reviews_in_flight =
                                state.max_reviews_in_flight.max(state.reviews_in_flight);
                        }
                        tokio::time::sleep(delay).await;
                        let answer = {
                            let mut state = shared.lock();
                            state.reviews_in_flight -= 1;
                            state.answer(&parts.method, &parts.uri, &body)
                        };
                        if let Some(answer) = answer {
                            send.send_response(json_response(answer));
                        }
                    });
                    continue;
                }
                let answer = shared.lock().answer(&parts.method, &parts.uri, &body);
                match answer {
                    Some(answer) => send.send_response(json_response(answer)),
                    // Hanging: keep the responder so the call waits, not fails.
                    None => held.push(send),
                }
            }
        });
        Self {
            state,
            client: Client::new(service, "weft"),
        }
    }

    pub fn state(&self) -> MutexGuard<'_, FakeState> {
        self.state.lock()
    }

    pub fn calls(&self) -> Vec<String> {
        self.state().calls.clone()
    }
}

fn json_response((status, value): (u16, Value)) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(&value).unwrap()))
        .unwrap()
}

impl FakeState {
    /// An API that answers every call with `code`.
    pub fn failing(code: u16) -> Self {
        Self {
            failing: Some(code),
            ..Self::default()
        }
    }

    /// Registers a token (JWT-shaped, `aud` claim set) and returns it.
    pub fn token(&mut self, username: &str, audiences: &[&str], extra: &[(&str, &str)]) -> String {
        let claims = json!({"aud": audiences, "sub": username, "n": self.tokens.len()});
        let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        let token = format!(
            "{}.{}.c2lnbmF0dXJl",
            b64(br#"{"alg":"RS256"}"#),
            b64(claims.to_string().as_bytes())
        );
        self.tokens.insert(
            token.clone(),
            FakeToken {
                username: username.to_owned(),
                audiences: audiences.iter().map(|a| (*a).to_owned()).collect(),
                extra: extra
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), vec![(*v).to_owned()]))
                    .collect(),
            },
        );
        token
    }

    fn answer(&mut self, method: &Method, uri: &http::Uri, body: &[u8]) -> Option<(u16, Value)> {
        self.calls.push(format!(
            "{method} {}",
            uri.path_and_query().map_or("", |p| p.as_str())
        ));
        if self.hanging {
            return None;
        }
        if let Some(code) = self.failing {
            return Some(match code {
                403 => status(
                    code,
                    "Forbidden",
                    "forbidden: User \"system:serviceaccount:weft:weft-ca\" cannot do this",
                ),
                _ => status(code, "InternalError", "etcdserver: request timed out"),
            });
        }
        let body: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let path: Vec<&str> = uri.path().trim_matches('/').split('/').collect();
        let query = query_pairs(uri.query().unwrap_or(""));
        Some(match (method.as_str(), path.as_slice()) {
            ("POST", ["apis", "authentication.k8s.io", "v1", "tokenreviews"]) => {
                self.token_review(body)
            }
            ("GET", ["api", "v1", "namespaces", ns, "pods"]) => self.list_pods(ns, &query),
            ("GET", ["api", "v1", "namespaces", ns, "pods", name]) => {
                match self
                    .pods
                    .iter()
                    .find(|p| p.namespace == *ns && p.name == *name)
                {
                    Some(pod) => (200, pod.to_json()),
                    None => not_found("pods", name),
                }
            }
            ("GET", ["api", "v1", "namespaces", ns, "configmaps", name]) => {
                match self.config_maps.get(&format!("{ns}/{name}")) {
                    Some(cm) => (200, cm.clone()),
                    None => not_found("configmaps", name),
                }
            }
            ("POST", ["api", "v1", "namespaces", ns, "configmaps"]) => {
                let name = body["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                let key = format!("{ns}/{name}");
                if self.config_maps.contains_key(&key) {
                    return Some(status(409, "AlreadyExists", "configmaps already exists"));
                }
                let stored = self.store(ns, body);
                self.config_maps.insert(key, stored.clone());
                (201, stored)
            }
            ("PUT", ["api", "v1", "namespaces", ns, "configmaps", name]) => {
                let key = format!("{ns}/{name}");
                let Some(current) = self.config_maps.get(&key) else {
                    return Some(not_found("configmaps", name));
                };
                if current["metadata"]["resourceVersion"] != body["metadata"]["resourceVersion"] {
                    return Some(status(409, "Conflict", "the object has been modified"));
                }
                let stored = self.store(ns, body);
                self.config_maps.insert(key, stored.clone());
                (200, stored)
            }
            _ => not_found("paths", uri.path()),
        })
    }

    fn token_review(&self, review: Value) -> (u16, Value) {
        let token = review["spec"]["token"].as_str().unwrap_or_default();
        let wanted: Vec<String> =
            serde_json::from_value(review["spec"]["audiences"].clone()).unwrap_or_default();
        let status = match self.tokens.get(token) {
            None => json!({"authenticated": false,
                "error": "[invalid bearer token, square/go-jose: error in cryptographic primitive]"}),
            Some(known) => {
                let common: Vec<&String> = wanted
                    .iter()
                    .filter(|a| known.audiences.contains(a))
                    .collect();
                if common.is_empty() {
                    json!({"authenticated": false, "error": format!(
                        "[invalid bearer token, token audiences {:?} is invalid for the target audiences {wanted:?}]",
                        known.audiences)})
                } else {
                    let mut status = json!({"authenticated": true, "user": {
                        "username": known.username, "uid": "3f1d", "extra": known.extra}});
                    if !self.audience_unaware {
                        status["audiences"] = json!(common);
                    }
                    status
                }
            }
        };
        (
            201,
            json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                "metadata": {}, "spec": review["spec"], "status": status}),
        )
    }

    fn list_pods(&self, namespace: &str, query: &HashMap<String, String>) -> (u16, Value) {
        let mut terms = Vec::new();
        let selector = query
            .get("fieldSelector")
            .filter(|_| !self.ignore_field_selectors);
        for term in selector
            .map(String::as_str)
            .unwrap_or("")
            .split(',')
            .filter(|t| !t.is_empty())
        {
            let (field, negated, value) = match term.split_once("!=") {
                Some((f, v)) => (f, true, v),
                None => match term.split_once('=') {
                    Some((f, v)) => (f, false, v),
                    None => return status(400, "BadRequest", "invalid field selector"),
                },
            };
            if !["spec.nodeName", "spec.serviceAccountName", "status.phase"].contains(&field) {
                return status(400, "BadRequest", "field label not supported");
            }
            terms.push((field.to_owned(), negated, value.to_owned()));
        }
        let limit = query
            .get("limit")
            .and_then(|l| l.parse().ok())
            .unwrap_or(usize::MAX);
        let items: Vec<Value> = self
            .pods
            .iter()
            .filter(|p| p.namespace == namespace)
            .filter(|p| {
                terms.iter().all(|(field, negated, value)| {
                    let actual = match field.as_str() {
                        "spec.nodeName" => p.node,
                        "spec.serviceAccountName" => p.service_account,
                        _ => p.phase,
                    };
                    (actual == value.as_str()) != *negated
                })
            })
            .take(limit)
            .map(FakePod::to_json)
            .collect();
        (
            200,
            json!({"apiVersion": "v1", "kind": "PodList",
                "metadata": {"resourceVersion": "7"}, "items": items}),
        )
    }

    fn store(&mut self, namespace: &str, mut object: Value) -> Value {
        self.resource_version += 1;
        object["metadata"]["namespace"] = json!(namespace);
        object["metadata"]["resourceVersion"] = json!(self.resource_version.to_string());
        object["apiVersion"] = json!("v1");
        object["kind"] = json!("ConfigMap");
        object
    }
}

impl FakePod {
    fn to_json(&self) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": self.name, "namespace": self.namespace, "uid": self.uid},
            "spec": {"nodeName": self.node, "serviceAccountName": self.service_account,
                "containers": [{"name": "app"}]},
            "status": {"phase": self.phase}})
    }
}

fn status(code: u16, reason: &str, message: &str) -> (u16, Value) {
    (
        code,
        json!({"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}),
    )
}

fn not_found(kind: &str, name: &str) -> (u16, Value) {
    status(404, "NotFound", &format!("{kind} \"{name}\" not found"))
}

/// `a=b&c=d` with `%XX` and `+` decoded.
fn query_pairs(query: &str) -> HashMap<String, String> {
    let decode = |s: &str| {
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'%' if i + 2 < bytes.len() => {
                    let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                    out.push(u8::from_str_radix(hex, 16).unwrap());
                    i += 3;
                }
                b'+' => {
                    out.push(b' ');
                    i += 1;
                }
                b => {
                    out.push(b);
                    i += 1;
                }
            }
        }
        String::from_utf8(out).unwrap()
    };
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}

pub(crate) const AGENT: &str = "system:serviceaccount:weft:weft-agent";
const NODE_NAME: &str = "authentication.kubernetes.io/node-name";
const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";

pub(crate) fn config() -> Config {
    Config {
        audience: "weft-ca".into(),
        agent_service_account: ServiceAccountRef {
            namespace: "weft".into(),
            name: "weft-agent".into(),
        },
        trust_bundle_config_map: "weft-trust-bundle".into(),
        trust_bundle_namespaces: Vec::new(),
        review_limits: ReviewLimits::default(),
    }
}

fn pod(
    namespace: &'static str,
    service_account: &'static str,
    node: &'static str,
    phase: &'static str,
) -> FakePod {
    FakePod {
        namespace,
        name: service_account,
        uid: "0000",
        node,
        service_account,
        phase,
    }
}

/// default/client runs on node-a, default/server on node-b, other/server on node-a, and a
/// finished default/batch pod is still listed on node-a.
pub(crate) fn cluster() -> FakeState {
    FakeState {
        pods: vec![
            pod("default", "client", "node-a", "Running"),
            pod("default", "server", "node-b", "Pending"),
            pod("other", "server", "node-a", "Running"),
            pod("default", "batch", "node-a", "Succeeded"),
            FakePod {
                namespace: "weft",
                name: "weft-agent-b7x2q",
                uid: "agent-b-uid",
                node: "node-b",
                service_account: "weft-agent",
                phase: "Running",
            },
        ],
        ..FakeState::default()
    }
}

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", ns, sa).unwrap()
}

async fn refusal(authz: &KubernetesAuthorizer, token: &str, identity: &SpiffeId) -> Denied {
    authz.authorize(token, identity).await.unwrap_err()
}

#[tokio::test]
async fn token_of_node_a_gets_only_identities_scheduled_on_node_a() {
    let mut state = cluster();
    let token = state.token(AGENT, &["weft-ca"], &[(NODE_NAME, "node-a")]);
    let api = FakeApi::start(state);
    let authz = KubernetesAuthorizer::new(api.client.clone(), &config());

    assert_eq!(
        authz
            .authorize(&token, &id("default", "client"))
            .await
            .unwrap(),
        "node-a"
    );
    // default/server runs only on node-b; a pod of that name in another namespace on node-a
    // and a finished pod on node-a do not count.
    for identity in [id("default", "server"), id("default", "batch")] {
        let denied = refusal(&authz, &token, &identity).await;
        assert_eq!(denied.reason(), "identity_not_on_node", "{denied}");
        assert_eq!(denied.http_status(), 403);
        assert_eq!(denied.node(), Some("node-a"));
        let message = denied.to_string();
        assert!(message.contains("node-a") && message.contains(identity.service_account()));
    }
    let calls = api.calls();
    assert!(
        calls[0].starts_with("POST /apis/authentication.k8s.io/v1/tokenreviews"),
        "{calls:?}"
    );
    assert!(
        calls[1].starts_with("GET /api/v1/namespaces/default/pods?"),
        "{calls:?}"
    );
    // The API does the filtering (served from its watch cache), one pod at most.
    let query = query_pairs(calls[1].split_once('?').unwrap().1);
    assert_eq!(
        query["fieldSelector"],
        "spec.nodeName=node-a,spec.serviceAccountName=client,\
         status.phase!=Succeeded,status.phase!=Failed"
    );
    assert_eq!(query["limit"], "1");
}

#[tokio::test]
async fn node_comes_from_the_bound_pod_when_the_token_does_not_name_it() {
    let mut state = cluster();
    let token = state.token(
        AGENT,
        &["weft-ca"],
        &[(POD_NAME, "weft-agent-b7x2q"), (POD_UID, "agent-b-uid")],
    );
    let replaced = state.token(
        AGENT,
        &["weft-ca"],
        &[(POD_NAME, "weft-agent-b7x2q"), (POD_UID, "older-uid")],
    );
    let gone = state.token(
        AGENT,
        &["weft-ca"],
        &[(POD_NAME, "weft-agent-gone"), (POD_UID, "x")],
    );
    let api = FakeApi::start(state);
    let authz = KubernetesAuthorizer::new(api.client.clone(), &config());

    assert_eq!(
        authz
            .authorize(&token, &id("default", "server"))
            .await
            .unwrap(),
        "node-b"
    );
    let denied = refusal(&authz, &token, &id("default", "client")).await;
    assert_eq!(denied.reason(), "identity_not_on_node");
    assert!(
        api.calls()
            .iter()
            .any(|c| c == "GET /api/v1/namespaces/weft/pods/weft-agent-b7x2q"),
        "{:?}",
        api.calls()
    );
    for (token, problem) in [(replaced, "replaced"), (gone, "does not exist")] {
        let denied = refusal(&authz, &token, &id("default", "server")).await;
        assert_eq!(denied.reason(), "agent_pod_unknown");
        assert!(denied.to_string().contains(problem), "{denied}");
    }
}

#[tokio::test]
async fn workload_asking_for_another_identity_is_refused_before_any_pod_lookup() {
    let mut state = cluster();
    let token = state.token(
        "system:serviceaccount:default:client",
        &["weft-ca"],
        &[
            (NODE_NAME, "node-a"),
            (POD_NAME, "client"),
            (POD_UID, "0000"),
        ],
    );
    let api = FakeApi::start(state);
    let authz = KubernetesAuthorizer::new(api.client.clone(), &config());
    // Another service account of its namespace, its own name in another namespace: both
    // run on its node, and neither is its own.
    for identity in [id("default", "server"), id("other", "client")] {
        let denied = refusal(&authz, &token, &identity).await;
        assert_eq!(denied.reason(), "not_own_identity", "{denied}");
        assert_eq!(denied.http_status(), 403);
        let message = denied.to_string();
        assert!(
            message.contains("default/client") && message.contains(&identity.to_string()),
            "{message}"
        );
    }
    assert!(
        api.calls().iter().all(|c| c.contains("tokenreviews")),
        "{:?}",
        api.calls()
    );
}

#[tokio::test]
async fn token_of_a_user_or_node_is_refused_as_not_agent() {
    let mut state = cluster();
    let node = state.token("system:node:node-a", &["weft-ca"], &[]);
    let user = state.token("alice", &["weft-ca"], &[]);
    let api = FakeApi::start(state);
    let authz = KubernetesAuthorizer::new(api.client.clone(), &config());
    for (token, username) in [(node, "system:node:node-a"), (user, "alice")] {
        let denied = refusal(&authz, &token, &id("default", "client")).await;
        assert_eq!(denied.reason(), "not_agent_service_account");
        assert_eq!(denied.http_status(), 403);
        let message = denied.to_string();
        assert!(
            message.contains(username) && message.contains("weft/weft-agent"),
            "{message}"
        );
    }
    assert_eq!(api.calls().len(), 2, "{:?}", api.calls());
}

/// shop/cart-waypoint runs on node-b as service account shop/cart-waypoint.
fn waypoint_cluster() -> FakeState {
    let mut state = cluster();
    state.pods.push(FakePod {
        namespace: "shop",
        name: "cart-waypoint-5d9c",
        uid: "wp-uid",
        node: "node-b",
        service_account: "cart-waypoint",
        phase: "Running",
    });
    state
}

const WAYPOINT: &str = "system:serviceaccount:shop:cart-waypoint";

/// The waypoint's projected token, bound to its running pod.
fn waypoint_token(state: &mut FakeState) -> String {
    state.token(
        WAYPOINT,
        &["weft-ca"],
        &[(POD_NAME, "cart-waypoint-5d9c"), (POD_UID, "wp-uid")],
    )
}

#[tokio::test]
async fn waypoint_gets_its_own_identity_with_its_own_token() {
    let mut state = waypoint_cluster();
    let token = waypoint_token(&mut state);
    let api = FakeApi::start(state);
    let authz = KubernetesAuthorizer::new(api.client.clone(), &config());
    assert_eq!(
        authz
            .authorize(&token, &id("shop", "cart-waypoint"))
            .await
            .unwrap(),
        "node-b"
    );
    // One review and one read of the bound pod, in the token's namespace; no node query.
    let calls = api.calls();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(
        calls[1],
        "GET /api/v1/namespaces/shop/pods/cart-waypoint-5d9c"
    );
}

#[tokio::test]
async fn waypoint_asking_for_another_identity_is_refused_as_not_own_identity() {
    let mut state = waypoint_cluster();
    let token = waypoint_token(&mut state);
    let api = FakeApi::start(state);
    let authz = KubernetesAuthorizer::new(api.client.clone(), &config());
    // A workload of its namespace, a workload of its node, the agent's own identity.
    for identity in [
        id("shop", "cart"),
        id("default", "server"),
        id("weft", "weft-agent"),
    ] {
        let denied = refusal(&authz, &token, &identity).await;
        assert_eq!(denied.reason(), "not_own_identity", "{denied}");
        assert_eq!(denied.http_status(), 403);
        assert!(
            denied.to_string().contains("shop/cart-waypoint"),
            "{denied}"
        );
    }
}

#[tokio::test]
async fn waypoint_token_must_be_bound_to_its_running_pod() {
    let mut state = waypoint_cluster();
    state.pods.push(FakePod {
        namespace: "shop",
        name: "cart-waypoint-done",
        uid: "done-uid",
        node: "node-b",
        service_account: "cart-waypoint",
        phase: "Succeeded",
    });
    state.pods.push(FakePod {
        namespace: "shop",
        name: "cart-waypoint-other",
        uid: "other-uid",
        node: "node-b",
        service_account: "cart",
        phase: "Running",
    });
    let mut bound = |pod: &str, uid: &str| {
        state.token(WAYPOINT, &["weft-ca"], &[(POD_NAME, pod), (POD_UID, uid)])
    };
    let cases = [
        (bound("cart-waypoint-5d9c", "older-uid"), "replaced"),
        (bound("cart-waypoint-gone", "x"), "does not exist"),
        (bound("cart-waypoint-done", "done-uid"), "is not running"),
        (
            bound("cart-waypoint-other", "other-uid"),
            "another service account",
        ),
    ];
    // A legacy Secret token: authenticated, bound to no pod.
    let unbound = state.token(WAYPOINT, &["weft-ca"], &[]);
    let api = FakeApi::start(state);
    let authz = KubernetesAuthorizer::new(api.client.clone(), &config());
    let own = id("shop", "cart-waypoint");
    for (token, problem) in cases {
        let denied = refusal(&authz, &token, &own).await;
        assert_eq!(denied.reason(), "workload_pod_unknown", "{denied}");
        assert_eq!(denied.http_status(), 403);
        assert!(denied.to_string().contains(problem), "{denied}");
    }
    let denied = refusal(&authz, &unbound, &own).await;
    assert_eq!(denied.reason(), "token_not_pod_bound", "{denied}");
}

#[tokio::test]
async fn waypoint_token_for_another_audience_is_refused() {
    let mut state = waypoint_cluster();
    let token = state.token(
        WAYPOINT,
        &["https://kubernetes.default.svc"],
        &[(POD_NAME, "cart-waypoint-5d9c"), (POD_UID, "wp-uid")],
    );
    let api = FakeApi::start(state);
    let authz = KubernetesAuthorizer::new(api.client.clone(), &config());
    let denied = refusal(&authz, &token, &id("shop", "cart-waypoint")).await;
    assert_eq!(denied.reason(), "wrong_audience", "{denied}");
}

#[tokio::test]
async fn agent_token_still_gets_only_what_runs_on_its_node() {
    // The waypoint runs on node-b: the agent of node-a may not have its identity, the
    // agent of node-b may (it would be the one asking for an enrolled pod of that account).
    let mut state = waypoint_cluster();
    let agent_a = state.token(AGENT, &["weft-ca"], &[(NODE_NAME, "node-a")]);
    let agent_b = state.token(AGENT, &["weft-ca"], &[(NODE_NAME, "node-b")]);
    let api = FakeApi::start(state);
    let authz = KubernetesAuthorizer::new(api.client.clone(), &config());
    let waypoint = id("shop", "cart-waypoint");
    let denied = refusal(&authz, &agent_a, &waypoint).await;
    assert_eq!(denied.reason(), "identity_not_on_node", "{denied}");
    assert_eq!(
        authz.authorize(&agent_b, &waypoint).await.unwrap(),
        "node-b"
    );
    assert_eq!(
        authz
            .authorize(&agent_a, &id("default", "client"))
            .await
            .unwrap(),
        "node-a"
    );
}

#[tokio::test]
async fn token_for_another_audience_is_refused_as_wrong_audience() {
    let mut state = cluster();
    let token = state.token(
        AGENT,
        &["https://kubernetes.default.svc"],
        &[(NODE_NAME, "node-a")],
    );
    let api = FakeApi::start(state);
    let authz = KubernetesAuthorizer::new(api.client.clone(), &config());
    let denied = refusal(&authz, &token, &id("default", "client")).await;
    assert_eq!(denied.reason(), "wrong_audience", "{denied}");
    assert_eq!(denied.http_status(), 401);
    assert!(denied.to_string().contains("weft-ca"), "{denied}");
    // The CA asked for its audience, so the API could refuse the token.
    assert!(api.calls()[0].starts_with("POST"), "{:?}", api.calls());
}

#[tokio::test]
async fn authenticator_that_ignores_audiences_is_not_trusted() {
    let mut state = cluster();
    state.audience_unaware = true;
    let token = state.token(AGENT, &["weft-ca"], &[(NODE_NAME, "node-a")]);
    let api = FakeApi::start(state);
    let authz = KubernetesAuthorizer::new(api.client.clone(), &config());
    let denied = refusal(&authz, &token, &id("default", "client")).await;
    assert_eq!(denied.reason(), "wrong_audience", "{denied}");
}

#[tokio::test]
async fn unauthenticated_token_is_refused_with_the_api_reason() {
    let api = FakeApi::start(cluster());
    let authz = KubernetesAuthorizer::new(api.client.clone(), &config());
    // JWT-shaped (anything else is refused before a review), unknown to the API.
    let denied = refusal(
        &authz,
        "eyJhbGciOiJSUzI1NiJ9.e30.c2ln",
        &id("default", "client"),
    )
    .await;
    assert_eq!(denied.reason(), "unauthenticated");
    assert_eq!(denied.http_status(), 401);
    assert!(
        denied.to_string().contains("invalid bearer token"),
        "{denied}"
    );
    // No token at all: refused without asking the API.
    let denied = refusal(&authz, "", &id("default", "client")).await;
    assert_eq!(denied.reason(), "unknown_credential");
    assert_eq!(api.calls().len(), 1);
}

#[tokio::test]
async fn pods_an_api_returns_despite_the_selector_do_not_count() {
    let mut state = cluster();
    state.ignore_field_selectors = true;
    state
        .pods
        .insert(0, pod("default", "batch", "node-a", "Failed"));
    let token = state.token(AGENT, &["weft-ca"], &[(NODE_NAME, "node-a")]);
    let api = FakeApi::start(state);
    let authz = KubernetesAuthorizer::new(api.client.clone(), &config());
    // The first pod listed is a finished default/batch on node-a: not a running batch.
    let denied = refusal(&authz, &token, &id("default", "batch")).await;
    assert_eq!(denied.reason(), "identity_not_on_node");
    // The next is default/client on node-a: not default/server.
    api.state().pods.remove(0);
    let denied = refusal(&authz, &token, &id("default", "server")).await;
    assert_eq!(denied.reason(), "identity_not_on_node");
}

#[tokio::test]
async fn token_bound_to_no_pod_is_refused() {
    let mut state = cluster();
    let token = state.token(AGENT, &["weft-ca"], &[]);
    let api = FakeApi::start(state);
    let authz = KubernetesAuthorizer::new(api.client.clone(), &config());
    let denied = refusal(&authz, &token, &id("default", "client")).await;
    assert_eq!(denied.reason(), "token_not_pod_bound");
}

#[tokio::test(start_paused = true)]
async fn api_that_errs_or_hangs_is_a_refusal_never_a_pass() {
    for (failing, hanging, words) in [
        (Some(500), false, "etcdserver"),
        (Some(403), false, "forbidden"),
        (None, true, "no answer within"),
    ] {
        let mut state = cluster();
        let token = state.token(AGENT, &["weft-ca"], &[(NODE_NAME, "node-a")]);
        state.failing = failing;
        state.hanging = hanging;
        let api = FakeApi::start(state);
        let authz = KubernetesAuthorizer::new(api.client.clone(), &config());
        let denied = refusal(&authz, &token, &id("default", "client")).await;
        assert_eq!(denied.reason(), "api_unavailable", "{denied}");
        assert_eq!(denied.http_status(), 503);
        let message = denied.to_string();
        assert!(
            message.contains(words) && message.contains("tokenreviews"),
            "{message}"
        );
    }
    // The pod query failing after a good TokenReview is a refusal too.
    let mut state = cluster();
    let token = state.token(AGENT, &["weft-ca"], &[(NODE_NAME, "node-a")]);
    let api = FakeApi::start(state);
    let authz = KubernetesAuthorizer::new(api.client.clone(), &config());
    authz.review(&token).await.unwrap();
    api.state().failing = Some(503);
    let denied = refusal(&authz, &token, &id("default", "client")).await;
    assert_eq!(denied.reason(), "api_unavailable", "{denied}");
}

#[tokio::test]
async fn a_flood_of_bogus_tokens_is_bounded_and_a_good_request_is_still_served() {
    let mut state = cluster();
    let good = state.token(AGENT, &["weft-ca"], &[(NODE_NAME, "node-a")]);
    state.slow_reviews = Some(Duration::from_millis(300));
    let api = FakeApi::start(state);
    let authz = Arc::new(KubernetesAuthorizer::new(api.client.clone(), &config()));
    let b64 = |v: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    let mut flood = tokio::task::JoinSet::new();
    for i in 0..FLOOD {
        let token = match i % 4 {
            // JWT-shaped, signed by nobody: only the API server can tell.
            0 | 1 => format!(
                "{}.{}.c2ln",
                b64(r#"{"alg":"RS256"}"#),
                b64(&format!("{{\"n\":{i}}}"))
            ),
            2 => format!("not a token {i}"),
            _ => "A".repeat(1 << 20),
        };
        let authz = Arc::clone(&authz);
        flood.spawn(async move {
            authz
                .authorize(&token, &id("default", "client"))
                .await
                .unwrap_err()
        });
    }
    let mut reasons: BTreeMap<&'static str, usize> = BTreeMap::new();
    while let Some(denied) = flood.join_next().await {
        let denied = denied.unwrap();
        if matches!(
            denied.reason(),
            "token_review_busy" | "token_review_rate_limited"
        ) {
            assert!(matches!(denied.http_status(), 429 | 503), "{denied}");
        }
        *reasons.entry(denied.reason()).or_default() += 1;
    }
    let (max, reviews) = {
        let state = api.state();
        let reviews = state
            .calls
            .iter()
            .filter(|c| c.contains("tokenreviews"))
            .count();
        (state.max_reviews_in_flight, reviews)
    };
    assert!(
        max <= MAX_CONCURRENT_REVIEWS,
        "{max} TokenReviews at once for {FLOOD} bogus tokens (limit {MAX_CONCURRENT_REVIEWS}); \
         {reviews} in all; refusals {reasons:?}"
    );
    // Malformed and oversized tokens cost no review at all.
    assert_eq!(
        reasons.get("malformed_token"),
        Some(&(FLOOD / 2)),
        "{reasons:?}"
    );
    assert!(reviews <= FLOOD / 2, "{reviews} reviews");
    assert!(
        reasons.get("token_review_busy").is_some_and(|n| *n > 0),
        "{reasons:?}"
    );
    // The flood is over: the agent's good token is served.
    assert_eq!(
        authz
            .authorize(&good, &id("default", "client"))
            .await
            .unwrap(),
        "node-a"
    );
}

const FLOOD: usize = 400;
const MAX_CONCURRENT_REVIEWS: usize = 16;

#[tokio::test(start_paused = true)]
async fn positive_answers_are_reused_briefly_and_refusals_never() {
    let mut state = cluster();
    let token = state.token(AGENT, &["weft-ca"], &[(NODE_NAME, "node-a")]);
    let api = FakeApi::start(state);
    let authz = KubernetesAuthorizer::new(api.client.clone(), &config());
    let lists = || api.calls().iter().filter(|c| c.contains("/pods?")).count();

    authz
        .authorize(&token, &id("default", "client"))
        .await
        .unwrap();
    authz
        .authorize(&token, &id("default", "client"))
        .await
        .unwrap();
    assert_eq!(lists(), 1);
    tokio::time::advance(SCHEDULED_CACHE_TTL + Duration::from_secs(1)).await;
    authz
        .authorize(&token, &id("default", "client"))
        .await
        .unwrap();
    assert_eq!(lists(), 2);

    // Refused, then the pod is scheduled: the next request sees it.
    refusal(&authz, &token, &id("shop", "cart")).await;
    api.state()
        .pods
        .push(pod("shop", "cart", "node-a", "Pending"));
    assert_eq!(
        authz.authorize(&token, &id("shop", "cart")).await.unwrap(),
        "node-a"
    );
    // Each request was authenticated anew (tokens are revoked with their pod).
    let reviews = api
        .calls()
        .iter()
        .filter(|c| c.contains("tokenreviews"))
        .count();
    assert_eq!(reviews, 5);
}

#[test]
fn unverified_audience_claim_is_read_from_string_or_list() {
    let b64 = |v: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    let jwt = |claims: &str| format!("{}.{}.sig", b64("{}"), b64(claims));
    assert_eq!(
        unverified_audiences(&jwt(r#"{"aud":"a"}"#)),
        Some(vec!["a".to_owned()])
    );
    assert_eq!(
        unverified_audiences(&jwt(r#"{"aud":["a","b"]}"#)),
        Some(vec!["a".to_owned(), "b".to_owned()])
    );
    assert_eq!(unverified_audiences("opaque-token"), None);
    assert_eq!(unverified_audiences(&jwt(r#"{"sub":"x"}"#)), None);
}

/// The whole CA in Kubernetes mode: HTTPS API, authorizer, trust bundle and metrics.
#[tokio::test]
async fn ca_in_kubernetes_mode_signs_for_the_node_publishes_the_bundle_and_counts_refusals() {
    let root = TestRoot::new();
    let mut state = waypoint_cluster();
    let token = state.token(AGENT, &["weft-ca"], &[(NODE_NAME, "node-a")]);
    let waypoint_token = waypoint_token(&mut state);
    let api = FakeApi::start(state);
    let yaml = format!(
        "listen: 127.0.0.1:0\nmetricsListen: 127.0.0.1:0\ncaCert: {}\ncaKey: {}\n\
         serverNames: [localhost]\nkubernetes:\n  agentServiceAccount: weft/weft-agent\n  \
         trustBundleNamespaces: [shop, weft]\n",
        root.cert.display(),
        root.key.display(),
    );
    let config = ca::Config::from_yaml(Path::new("ca.yaml"), &yaml).unwrap();
    let server = Server::bind_with_client(config, Some(api.client.clone()))
        .await
        .unwrap();
    let (addr, metrics_addr) = (server.local_addr().unwrap(), server.metrics_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));

    let token_file = root.dir.path().join("token");
    fs::write(&token_file, &token).unwrap();
    let client = CaClient::new(&ca_client::Config {
        addr: addr.to_string(),
        server_name: "localhost".into(),
        root_cert: root.cert.clone(),
        token_file: token_file.clone(),
    })
    .unwrap();
    let wanted = id("default", "client");
    let request = csr::generate(&wanted).unwrap();
    client
        .sign(&wanted, &request.csr_pem, Duration::from_secs(600))
        .await
        .unwrap();
    let elsewhere = id("default", "server");
    let request = csr::generate(&elsewhere).unwrap();
    let err = client
        .sign(&elsewhere, &request.csr_pem, Duration::from_secs(600))
        .await
        .unwrap_err();
    assert_eq!(
        (err.status(), err.ca_reason()),
        (Some(403), "identity_not_on_node"),
        "{err}"
    );

    // A waypoint, with its own token: its own identity, and nothing else.
    fs::write(&token_file, &waypoint_token).unwrap();
    let own = id("shop", "cart-waypoint");
    let request = csr::generate(&own).unwrap();
    client
        .sign(&own, &request.csr_pem, Duration::from_secs(600))
        .await
        .unwrap();
    let err = client
        .sign(
            &wanted,
            &csr::generate(&wanted).unwrap().csr_pem,
            Duration::from_secs(600),
        )
        .await
        .unwrap_err();
    assert_eq!(
        (err.status(), err.ca_reason()),
        (Some(403), "not_own_identity"),
        "{err}"
    );

    // The bundle is published at start, in the CA's namespace, with the root.
    let root_pem = fs::read_to_string(&root.cert).unwrap();
    // Also in the waypoints' namespace; the CA's own is listed again and published once.
    for key in ["weft/weft-trust-bundle", "shop/weft-trust-bundle"] {
        let mut published = None;
        for _ in 0..200 {
            published = api.state().config_maps.get(key).cloned();
            if published.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let published = published.expect("the trust bundle ConfigMap is created at start");
        assert_eq!(
            published["data"][super::super::trust_bundle::KEY]
                .as_str()
                .unwrap()
                .trim(),
            root_pem.trim()
        );
    }

    let text = scrape(metrics_addr).await;
    assert!(
        text.contains("weft_ca_certificates_issued_total 2"),
        "{text}"
    );
    assert!(
        text.contains(r#"weft_ca_requests_refused_total{reason="identity_not_on_node"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"weft_ca_trust_bundle_publish_total{result="created"} 2"#),
        "{text}"
    );
    stop.send(()).unwrap();
    running.await.unwrap();
}

/// `GET /metrics` over plain HTTP.
async fn scrape(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nhost: ca\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    tcp.read_to_string(&mut text).await.unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    text
}
