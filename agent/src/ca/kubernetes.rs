//! The Kubernetes authorizer: the agent presents its projected service account token, and
//! the CA signs only identities of pods scheduled on that agent's node; a waypoint presents
//! its own token and gets only its own identity.
//!
//! Per request:
//! 1. **Authenticate** with a TokenReview (`spec.audiences: [<audience>]`). Not
//!    authenticated, an answer without our audience in `status.audiences` (an authenticator
//!    that ignores audiences), or no answer at all are refusals, never passes.
//! 2. **Agent?** `status.user.username` must be `system:serviceaccount:<ns>:<name>` of the
//!    configured agent service account for steps 3 and 4. A token of any other service
//!    account takes step 5 instead; any other user (a node, a person) is refused.
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
//! 5. **A workload's own identity** (waypoints). A pod that is not the agent (a waypoint: it
//!    is never enrolled, so no agent asks for it) presents its own projected token, with the
//!    same audience, and may get exactly the identity of that token:
//!    `ns/<token's namespace>/sa/<token's service account>`, nothing else
//!    ([`Denied::NotOwnIdentity`]). The token must be bound to a pod (`pod-name` and
//!    `pod-uid` extras), and that pod must exist with that UID, run as that service account
//!    and be `Running` ([`Denied::WorkloadPodUnknown`] otherwise): a token that outlived its
//!    pod, or a legacy Secret token copied out of the cluster, gets nothing.
//!
//! What a compromised workload gains from step 5: a certificate for the identity it already
//! has. That is what SPIFFE workload attestation grants any pod (SPIRE's Kubernetes
//! attestor does the same), and no more than the mesh already lets it use: its node proxy
//! speaks for it with that identity anyway. It cannot get another service account's
//! identity (the API server signs its token's subject, and the CA compares it), nor the
//! identity of a waypoint it is not (a waypoint's identity is its own service account, so
//! only pods running as that service account get it: whoever may create pods with a
//! service account may already act as it). With the certificate it can dial other pods'
//! 15008 directly, as itself: their proxies still judge every connection by that identity,
//! and a service bound to a waypoint still admits only the waypoint's identity, so nothing
//! is bypassed. Step 5 never involves a node, so the node rule (steps 3 and 4) is unchanged:
//! the agent's token still gets only what runs on its node.
//!
//! **Bounded reviews.** Whoever reaches the CA can make it ask the API server, so the
//! reviews are bounded before step 1: a token that cannot be a service account token (not
//! three base64url parts, or longer than [`MAX_TOKEN_LEN`]) is refused as
//! `malformed_token` without a review; at most `maxConcurrentTokenReviews` reviews run at
//! once (more: 503 `token_review_busy`), and at most `tokenReviewsPerSecond` start per
//! second (more: 429 `token_review_rate_limited`). Every refusal is counted by reason. The
//! agent retries a refused request with backoff, so a flood delays certificates rather than
//! denying them, and never reaches the API server beyond the limits.
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
    sync::Arc,
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
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Instant,
};

use super::Denied;
use crate::{
    identity::SpiffeId,
    sync::{Mutex, MutexGuard},
};

/// The `kubernetes:` section of `ca.yaml`, validated.
#[derive(Clone, Debug)]
pub struct Config {
    /// The audience the agent's projected token must carry.
    pub audience: String,
    /// The weft agent's service account: only its tokens may ask for certificates.
    pub agent_service_account: ServiceAccountRef,
    /// The ConfigMap, in the CA's own namespace, the trust bundle is published in.
    pub trust_bundle_config_map: String,
    /// Further namespaces the same ConfigMap is published in: those of the waypoints, which
    /// mount it to verify the CA and their peers (a pod mounts ConfigMaps of its own
    /// namespace only).
    pub trust_bundle_namespaces: Vec<String>,
    /// Bounds on the TokenReviews a flood of requests can cause.
    pub review_limits: ReviewLimits,
}

/// `kubernetes.maxConcurrentTokenReviews` and `kubernetes.tokenReviewsPerSecond`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReviewLimits {
    pub max_concurrent: usize,
    /// Also the burst: a full second's worth may start at once.
    pub per_second: u32,
}

impl Default for ReviewLimits {
    fn default() -> Self {
        Self {
            max_concurrent: 16,
            per_second: 50,
        }
    }
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
    reviews: Arc<Semaphore>,
    review_rate: Mutex<Bucket>,
    per_second: u32,
}

/// A token bucket: `tokens` refill at `per_second`, up to `per_second`.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
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
            reviews: Arc::new(Semaphore::new(config.review_limits.max_concurrent)),
            review_rate: Mutex::new(Bucket {
                tokens: f64::from(config.review_limits.per_second),
                at: Instant::now(),
            }),
            per_second: config.review_limits.per_second,
        }
    }

    /// The node of the agent whose token `credential` is, if a pod of `identity` runs there.
    pub async fn authorize(&self, credential: &str, identity: &SpiffeId) -> Result<String, Denied> {
        if credential.is_empty() {
            return Err(Denied::UnknownCredential);
        }
        if !plausible_token(credential) {
            return Err(Denied::MalformedToken);
        }
        let status = {
            let _permit = self.admit_review()?;
            self.review(credential).await?
        };
        let username = status
            .user
            .as_ref()
            .and_then(|u| u.username.clone())
            .unwrap_or_default();
        if username == self.agent_username {
            let node = self.node_of(status).await?;
            self.check_scheduled(&node, identity).await?;
            return Ok(node);
        }
        match service_account_of(&username) {
            Some(account) => self.check_own_identity(status, account, identity).await,
            None => Err(Denied::NotAgent {
                username,
                expected: self.agent.to_string(),
            }),
        }
    }

    /// A place for one TokenReview under the concurrency and rate limits, held while it runs.
    fn admit_review(&self) -> Result<OwnedSemaphorePermit, Denied> {
        // The concurrency slot first: a request refused as busy takes no rate token.
        let permit = Arc::clone(&self.reviews)
            .try_acquire_owned()
            .map_err(|_| Denied::TokenReviewBusy)?;
        let mut bucket = self.review_rate.lock();
        let now = Instant::now();
        let rate = f64::from(self.per_second);
        bucket.tokens =
            (bucket.tokens + now.duration_since(bucket.at).as_secs_f64() * rate).min(rate);
        bucket.at = now;
        if bucket.tokens < 1.0 {
            return Err(Denied::TokenReviewRateLimited);
        }
        bucket.tokens -= 1.0;
        Ok(permit)
    }

    /// Step 1: the TokenReview (whose token it is is the caller's question).
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
        Ok(status)
    }

    /// Step 5: a workload (a waypoint) asking for the identity of its own token, bound to a
    /// running pod of that service account. Returns the pod's node, for the log.
    async fn check_own_identity(
        &self,
        status: TokenReviewStatus,
        account: ServiceAccountRef,
        identity: &SpiffeId,
    ) -> Result<String, Denied> {
        // Compared before any pod lookup: a request for someone else costs one TokenReview.
        if identity.namespace() != account.namespace || identity.service_account() != account.name {
            return Err(Denied::NotOwnIdentity {
                account: account.to_string(),
                identity: identity.clone(),
            });
        }
        let extra = status.user.and_then(|u| u.extra).unwrap_or_default();
        let unknown = |pod, uid, problem| Denied::WorkloadPodUnknown { pod, uid, problem };
        let found = self.bound_pod(&extra, &account, unknown).await?;
        // Running: it asks from its own container, so it has started; a finished or
        // never-started pod has no business holding a certificate.
        if found.status.and_then(|s| s.phase).as_deref() != Some("Running") {
            let (pod, uid) = (found.metadata.name, found.metadata.uid);
            return Err(unknown(
                format!("{}/{}", account.namespace, pod.unwrap_or_default()),
                uid.unwrap_or_default(),
                "is not running",
            ));
        }
        Ok(found
            .spec
            .and_then(|s| s.node_name)
            .or_else(|| single(&extra, EXTRA_NODE_NAME).map(str::to_owned))
            .unwrap_or_default())
    }

    /// The pod a token is bound to (its `pod-name` and `pod-uid` extras), read in the
    /// account's namespace: it must still be that pod (a pod recreated under the same name is
    /// another pod) and run as that account. `unknown(pod, uid, problem)` builds the refusal.
    async fn bound_pod(
        &self,
        extra: &BTreeMap<String, Vec<String>>,
        account: &ServiceAccountRef,
        unknown: fn(String, String, &'static str) -> Denied,
    ) -> Result<Pod, Denied> {
        let (Some(pod), Some(uid)) = (single(extra, EXTRA_POD_NAME), single(extra, EXTRA_POD_UID))
        else {
            return Err(Denied::NotPodBound {
                username: account.username(),
            });
        };
        let what = format!("get pod {}/{pod}", account.namespace);
        let refuse = |problem| {
            unknown(
                format!("{}/{pod}", account.namespace),
                uid.to_owned(),
                problem,
            )
        };
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &account.namespace);
        let found = ask(&what, api.get_opt(pod))
            .await?
            .ok_or_else(|| refuse("does not exist"))?;
        if found.metadata.uid.as_deref() != Some(uid) {
            return Err(refuse("was replaced by another pod of that name"));
        }
        // The API binds tokens only to pods of their own service account; checked anyway.
        let service_account = found
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.as_deref());
        if service_account != Some(account.name.as_str()) {
            return Err(refuse("runs as another service account"));
        }
        Ok(found)
    }

    /// Step 3: the node the token's pod runs on.
    async fn node_of(&self, status: TokenReviewStatus) -> Result<String, Denied> {
        let user = status.user.unwrap_or_default();
        let extra = user.extra.unwrap_or_default();
        if let Some(node) = single(&extra, EXTRA_NODE_NAME) {
            return Ok(node.to_owned());
        }
        let unknown = |pod, uid, problem| Denied::AgentPodUnknown { pod, uid, problem };
        let found = self.bound_pod(&extra, &self.agent, unknown).await?;
        let (pod, uid) = (found.metadata.name, found.metadata.uid);
        found
            .spec
            .and_then(|s| s.node_name)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| {
                unknown(
                    format!("{}/{}", self.agent.namespace, pod.unwrap_or_default()),
                    uid.unwrap_or_default(),
                    "is not scheduled on a node",
                )
            })
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

    fn cache(&self) -> MutexGuard<'_, HashMap<Scheduled, Instant>> {
        self.scheduled.lock()
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
/// Whether `token` can be a JWT (three base64url parts, header and payload non-empty) of
/// a sane length: anything else is refused without asking the API server.
fn plausible_token(token: &str) -> bool {
    let base64url = |part: &str| {
        part.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'=')
    };
    let mut parts = token.split('.');
    token.len() <= MAX_TOKEN_LEN
        && matches!(
            (parts.next(), parts.next(), parts.next(), parts.next()),
            (Some(header), Some(payload), Some(signature), None)
                if !header.is_empty() && !payload.is_empty()
                    && base64url(header) && base64url(payload) && base64url(signature)
        )
}

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

/// The service account of a service account token's username
/// (`system:serviceaccount:<namespace>:<name>`); none for users, nodes and malformed names.
fn service_account_of(username: &str) -> Option<ServiceAccountRef> {
    let (namespace, name) = username
        .strip_prefix("system:serviceaccount:")?
        .split_once(':')?;
    let label = |s: &str| {
        !s.is_empty()
            && s.len() <= 253
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    };
    (label(namespace) && label(name)).then(|| ServiceAccountRef {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    })
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
/// Longest bearer token sent for review: projected service account tokens are about 1 KiB
/// (a few KiB with many audiences), so anything near this is not one.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;
/// `status.user.extra` keys of pod-bound service account tokens.
const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";
const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";

#[cfg(test)]
pub(crate) mod tests;
