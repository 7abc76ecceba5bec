//! The Kubernetes authorizer: the agent presents its projected service account token, and
//! the CA signs only identities of pods scheduled on that agent's node.
//!
//! Per request:
//! 1. **Authenticate** with a TokenReview (`spec.audiences: [<audience>]`). Not
//!    authenticated, an answer without our audience in `status.audiences` (an authenticator
//!    that ignores audiences), or no answer at all are refusals, never passes.
//! 2. **Agent?** `status.user.username` must be `system:serviceaccount:<ns>:<name>` of the
//!    configured agent service account.
//! 3. **Node.** Pod-bound tokens carry `authentication.kubernetes.io/node-name` in
//!    `status.user.extra` (Kubernetes ≥ 1.32, ServiceAccountTokenPodNodeInfo): the API
//!    server vouches for it, so it is used as is. Older servers give only the bound pod's
//!    `pod-name` and `pod-uid`: then the CA reads that pod (in the agent's namespace), checks
//!    the UID (a pod recreated under the same name is another pod) and takes `spec.nodeName`.
//!    A token bound to no pod (a legacy Secret token) names no node and is refused.
//! 4. **Scheduled?** One `list pods` in the identity's namespace with the field selector
//!    `spec.nodeName=<node>,spec.serviceAccountName=<sa>,status.phase!=Succeeded,
//!    status.phase!=Failed` and `limit=1`, re-checked here (fail closed should a selector be
//!    ignored). Pending counts: the agent asks at CNI ADD, before the pod runs.
//!
//! Why a query per request and not a pod reflector: certificate requests are rare (one per
//! identity per node per half lifetime, plus pod starts), while a reflector holds every pod of
//! the cluster and a watch on them for the CA's whole life. The query is answered from the
//! API server's watch cache by the indexed `spec.nodeName`, and is as fresh as the API
//! itself: a pod scheduled a moment ago gets its certificate at once, with no
//! watch-lag refusal. Positive answers are cached for [`SCHEDULED_CACHE_TTL`] so a node
//! restarting with many identities does not turn into a burst of lists; refusals are never
//! cached, so a retry sees a newly scheduled pod. The cache cannot widen what a node gets:
//! within the TTL the node did run that identity and already held its certificate.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    sync::{Mutex, PoisonError},
    time::Duration,
};

use base64::Engine as _;
use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus},
    core::v1::Pod,
};
use kube::{
    Api, Client,
    api::{ListParams, PostParams},
};
// Tokio's clock, so tests can move the cache's time.
use tokio::time::Instant;

use super::Denied;
use crate::identity::SpiffeId;

/// The `kubernetes:` section of `ca.yaml`, validated.
#[derive(Clone, Debug)]
pub struct Config {
    /// The audience the agent's projected token must carry.
    pub audience: String,
    /// The weft agent's service account: only its tokens may ask for certificates.
    pub agent_service_account: ServiceAccountRef,
    /// The ConfigMap, in the CA's own namespace, the trust bundle is published in.
    pub trust_bundle_config_map: String,
}

/// A service account, `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceAccountRef {
    pub namespace: String,
    pub name: String,
}

/// Authenticates agents by TokenReview and checks identities against the pods of their node.
pub struct KubernetesAuthorizer {
    client: Client,
    audience: String,
    agent: ServiceAccountRef,
    agent_username: String,
    scheduled: Mutex<HashMap<Scheduled, Instant>>,
}

/// A positive "this service account has a pod on this node" answer.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct Scheduled {
    node: String,
    namespace: String,
    service_account: String,
}

impl ServiceAccountRef {
    /// The username the API server gives this service account's tokens.
    pub fn username(&self) -> String {
        format!("system:serviceaccount:{}:{}", self.namespace, self.name)
    }
}

impl fmt::Display for ServiceAccountRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl KubernetesAuthorizer {
    pub fn new(client: Client, config: &Config) -> Self {
        Self {
            client,
            audience: config.audience.clone(),
            agent_username: config.agent_service_account.username(),
            agent: config.agent_service_account.clone(),
            scheduled: Mutex::new(HashMap::new()),
        }
    }

    /// The node of the agent whose token `credential` is, if a pod of `identity` runs there.
    pub async fn authorize(&self, credential: &str, identity: &SpiffeId) -> Result<String, Denied> {
        if credential.is_empty() {
            return Err(Denied::UnknownCredential);
        }
        let status = self.review(credential).await?;
        let node = self.node_of(status).await?;
        self.check_scheduled(&node, identity).await?;
        Ok(node)
    }

    /// Steps 1 and 2: the TokenReview, and whose token it is.
    async fn review(&self, credential: &str) -> Result<TokenReviewStatus, Denied> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(credential.to_owned()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..TokenReview::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let answer = ask(
            "create tokenreviews.authentication.k8s.io",
            api.create(&PostParams::default(), &review),
        )
        .await?;
        let status = answer.status.ok_or_else(|| Denied::ApiUnavailable {
            what: "create tokenreviews.authentication.k8s.io".into(),
            error: "the answer carries no status".into(),
        })?;
        if status.authenticated != Some(true) {
            // Name the likely cause: a token minted for another audience. The claim is read
            // unverified, only to choose the refusal's reason; the refusal stands either way.
            if let Some(found) = unverified_audiences(credential)
                && !found.contains(&self.audience)
            {
                return Err(Denied::WrongAudience {
                    expected: self.audience.clone(),
                    found,
                });
            }
            return Err(Denied::Unauthenticated {
                error: status
                    .error
                    .clone()
                    .unwrap_or_else(|| "no reason given".into()),
            });
        }
        // An authenticator that ignores audiences answers without them: the token may be
        // meant for anyone (the API server itself), so it is not proof of asking us.
        let audiences = status.audiences.clone().unwrap_or_default();
        if !audiences.contains(&self.audience) {
            return Err(Denied::WrongAudience {
                expected: self.audience.clone(),
                found: audiences,
            });
        }
        let username = status
            .user
            .as_ref()
            .and_then(|u| u.username.clone())
            .unwrap_or_default();
        if username != self.agent_username {
            return Err(Denied::NotAgent {
                username,
                expected: self.agent.to_string(),
            });
        }
        Ok(status)
    }

    /// Step 3: the node the token's pod runs on.
    async fn node_of(&self, status: TokenReviewStatus) -> Result<String, Denied> {
        let user = status.user.unwrap_or_default();
        let extra = user.extra.unwrap_or_default();
        if let Some(node) = single(&extra, EXTRA_NODE_NAME) {
            return Ok(node.to_owned());
        }
        let (Some(pod), Some(uid)) = (
            single(&extra, EXTRA_POD_NAME),
            single(&extra, EXTRA_POD_UID),
        ) else {
            return Err(Denied::NotPodBound {
                username: user.username.unwrap_or_default(),
            });
        };
        let what = format!("get pod {}/{pod}", self.agent.namespace);
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &self.agent.namespace);
        let unknown = |problem| Denied::AgentPodUnknown {
            pod: format!("{}/{pod}", self.agent.namespace),
            uid: uid.to_owned(),
            problem,
        };
        let found = ask(&what, api.get_opt(pod))
            .await?
            .ok_or_else(|| unknown("does not exist"))?;
        if found.metadata.uid.as_deref() != Some(uid) {
            return Err(unknown("was replaced by another pod of that name"));
        }
        let spec = found.spec.unwrap_or_default();
        // The API binds tokens only to pods of their own service account; checked anyway.
        if spec.service_account_name.as_deref() != Some(self.agent.name.as_str()) {
            return Err(unknown("runs as another service account"));
        }
        spec.node_name
            .filter(|n| !n.is_empty())
            .ok_or_else(|| unknown("is not scheduled on a node"))
    }

    /// Step 4: a pending or running pod of `identity` on `node`.
    async fn check_scheduled(&self, node: &str, identity: &SpiffeId) -> Result<(), Denied> {
        let key = Scheduled {
            node: node.to_owned(),
            namespace: identity.namespace().to_owned(),
            service_account: identity.service_account().to_owned(),
        };
        let now = Instant::now();
        if self
            .cache()
            .get(&key)
            .is_some_and(|at| now.duration_since(*at) < SCHEDULED_CACHE_TTL)
        {
            return Ok(());
        }
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &key.namespace);
        let params = ListParams::default()
            .fields(&format!(
                "spec.nodeName={},spec.serviceAccountName={},status.phase!=Succeeded,status.phase!=Failed",
                key.node, key.service_account
            ))
            .limit(1);
        let what = format!("list pods in namespace {}", key.namespace);
        let pods = ask(&what, api.list(&params)).await?;
        if !pods.items.iter().any(|pod| runs(pod, &key)) {
            return Err(Denied::NotOnNode {
                node: key.node,
                identity: identity.clone(),
            });
        }
        let mut cache = self.cache();
        // Bounded by what nodes run; drop expired answers before it grows past that.
        if cache.len() >= SCHEDULED_CACHE_PRUNE_AT {
            cache.retain(|_, at| now.duration_since(*at) < SCHEDULED_CACHE_TTL);
        }
        cache.insert(key, now);
        Ok(())
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<Scheduled, Instant>> {
        self.scheduled
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl fmt::Debug for KubernetesAuthorizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubernetesAuthorizer")
            .field("audience", &self.audience)
            .field("agent", &self.agent)
            .finish_non_exhaustive()
    }
}

/// One API call with a deadline; every failure is a refusal.
async fn ask<T>(
    what: &str,
    call: impl Future<Output = Result<T, kube::Error>>,
) -> Result<T, Denied> {
    let unavailable = |error: String| Denied::ApiUnavailable {
        what: what.to_owned(),
        error,
    };
    match tokio::time::timeout(API_TIMEOUT, call).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(e)) => Err(unavailable(e.to_string())),
        Err(_) => Err(unavailable(format!(
            "no answer within {}",
            humantime::format_duration(API_TIMEOUT)
        ))),
    }
}

/// Does `pod` match the query (node, service account, not finished)?
fn runs(pod: &Pod, key: &Scheduled) -> bool {
    let spec = pod.spec.as_ref();
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    pod.metadata.namespace.as_deref() == Some(key.namespace.as_str())
        && spec.and_then(|s| s.node_name.as_deref()) == Some(key.node.as_str())
        && spec.and_then(|s| s.service_account_name.as_deref())
            == Some(key.service_account.as_str())
        && !matches!(phase, Some("Succeeded" | "Failed"))
}

/// The only value of `extra[key]`; none when absent or ambiguous.
fn single<'a>(extra: &'a BTreeMap<String, Vec<String>>, key: &str) -> Option<&'a str> {
    match extra.get(key).map(Vec::as_slice) {
        Some([value]) if !value.is_empty() => Some(value.as_str()),
        _ => None,
    }
}

/// The `aud` claim of a JWT, unverified (only to explain a refusal).
fn unverified_audiences(token: &str) -> Option<Vec<String>> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Audience {
        One(String),
        Many(Vec<String>),
    }
    #[derive(serde::Deserialize)]
    struct Claims {
        aud: Audience,
    }
    let payload = token.split('.').nth(1)?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    match serde_json::from_slice::<Claims>(&json).ok()?.aud {
        Audience::One(one) => Some(vec![one]),
        Audience::Many(many) => Some(many),
    }
}

/// How long a positive "scheduled on this node" answer is reused.
pub const SCHEDULED_CACHE_TTL: Duration = Duration::from_secs(10);
const SCHEDULED_CACHE_PRUNE_AT: usize = 4096;
/// Deadline of each API call; past it the request is refused (the agent retries).
const API_TIMEOUT: Duration = Duration::from_secs(10);
/// `status.user.extra` keys of pod-bound service account tokens.
const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";
const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";

#[cfg(test)]
pub(crate) mod tests;
