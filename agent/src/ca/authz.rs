//! Authorization of certificate requests: may the node presenting this credential have
//! this identity? Two variants behind one `authorize`: a static table from `ca.yaml` (node
//! token → allowed namespaces and service accounts), and Kubernetes (`super::kubernetes`:
//! TokenReview of the agent's service account token, then "is a pod with this service
//! account scheduled on that node?"; or a waypoint's own token, for its own identity only).
//!
//! Input: the bearer token and the identity asked for. Output: the node's name, or a
//! [`Denied`] whose `reason()` is the API's `error` field and the refusal metric's label.

use std::fmt;

use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

use super::kubernetes::KubernetesAuthorizer;
use crate::identity::SpiffeId;

/// Decides which identities a requesting node may get.
#[derive(Debug)]
pub enum Authorizer {
    /// Per-node bearer tokens and allow lists from the CA's config file.
    Static(StaticNodes),
    /// The agent's projected service account token, checked by the Kubernetes API.
    Kubernetes(Box<KubernetesAuthorizer>),
}

/// Why a request was refused. `reason()` is the API's `error` field.
#[derive(Debug, thiserror::Error)]
pub enum Denied {
    #[error("the bearer token is missing or belongs to no known node")]
    UnknownCredential,
    #[error(
        "node {node} may not have identity {identity}: it is not among the node's allowed identities"
    )]
    IdentityNotAllowed { node: String, identity: SpiffeId },
    #[error(
        "the Kubernetes API did not authenticate the token ({error}): present the agent's \
         projected service account token, unexpired, of a pod that still exists"
    )]
    Unauthenticated { error: String },
    #[error(
        "the token is for audiences {found:?}, not {expected:?}: give the agent's projected \
         token the audience {expected:?} (ca.yaml kubernetes.audience)"
    )]
    WrongAudience {
        expected: String,
        found: Vec<String>,
    },
    #[error(
        "the token belongs to {username}, which is neither the weft agent's service account \
         {expected} (ca.yaml kubernetes.agentServiceAccount) nor any service account"
    )]
    NotAgent { username: String, expected: String },
    #[error(
        "the token of {username} is bound to no pod, so its node is unknown: the agent must \
         present a projected service account token, not a legacy Secret token"
    )]
    NotPodBound { username: String },
    #[error(
        "the token is bound to agent pod {pod} (uid {uid}), which {problem}: is the agent pod \
         being replaced?"
    )]
    AgentPodUnknown {
        pod: String,
        uid: String,
        problem: &'static str,
    },
    #[error(
        "node {node} may not have identity {identity}: no pending or running pod with service \
         account {} in namespace {} is scheduled on it",
        .identity.service_account(),
        .identity.namespace()
    )]
    NotOnNode { node: String, identity: SpiffeId },
    #[error(
        "service account {account} may have only its own identity, not {identity}: a waypoint \
         asks for ns/<its namespace>/sa/<its service account> (is --service-account / \
         waypoints[].serviceAccount the pod's service account?)"
    )]
    NotOwnIdentity { account: String, identity: SpiffeId },
    #[error(
        "the token is bound to pod {pod} (uid {uid}), which {problem}: only a running pod gets \
         its own identity"
    )]
    WorkloadPodUnknown {
        pod: String,
        uid: String,
        problem: &'static str,
    },
    #[error(
        "cannot {what} in the Kubernetes API: {error} (is the API server reachable, and does the \
         CA's RBAC allow it?); refused, never passed"
    )]
    ApiUnavailable { what: String, error: String },
    #[error(
        "the bearer token is not a service account token (a JWT of three base64url parts, at \
         most {} bytes); it was not sent for review",
        super::kubernetes::MAX_TOKEN_LEN
    )]
    MalformedToken,
    #[error(
        "too many token reviews at once (ca.yaml kubernetes.maxConcurrentTokenReviews): retry \
         shortly"
    )]
    TokenReviewBusy,
    #[error(
        "too many token reviews per second (ca.yaml kubernetes.tokenReviewsPerSecond): retry \
         shortly"
    )]
    TokenReviewRateLimited,
}

/// The static table: nodes, their tokens (kept as SHA-256 digests) and allow lists.
#[derive(Default)]
pub struct StaticNodes {
    nodes: Vec<StaticNode>,
}

/// One `nodes[]` entry of `ca.yaml`.
pub struct StaticNode {
    pub name: String,
    token_digest: [u8; 32],
    pub allow: Vec<Allow>,
}

/// One `allow[]` entry: a namespace and a service account in it (`None` = any, `*`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allow {
    pub namespace: String,
    pub service_account: Option<String>,
}

impl Authorizer {
    /// The name of the node `credential` authenticates, if that node may have `identity`.
    pub async fn authorize(&self, credential: &str, identity: &SpiffeId) -> Result<String, Denied> {
        match self {
            Self::Static(nodes) => nodes.authorize(credential, identity),
            Self::Kubernetes(kubernetes) => kubernetes.authorize(credential, identity).await,
        }
    }
}

impl StaticNodes {
    pub fn new(nodes: Vec<StaticNode>) -> Self {
        Self { nodes }
    }

    fn authorize(&self, credential: &str, identity: &SpiffeId) -> Result<String, Denied> {
        let node = self
            .authenticate(credential)
            .ok_or(Denied::UnknownCredential)?;
        if node.allow.iter().any(|a| a.allows(identity)) {
            Ok(node.name.clone())
        } else {
            Err(Denied::IdentityNotAllowed {
                node: node.name.clone(),
                identity: identity.clone(),
            })
        }
    }

    fn authenticate(&self, credential: &str) -> Option<&StaticNode> {
        if credential.is_empty() {
            return None;
        }
        // Compare digests in constant time, and look at every node, so neither the token's
        // length nor which node it matched shows in the response time.
        let presented: [u8; 32] = Sha256::digest(credential.as_bytes()).into();
        let mut found = None;
        for node in &self.nodes {
            if bool::from(node.token_digest.ct_eq(&presented)) {
                found = Some(node);
            }
        }
        found
    }
}

impl StaticNode {
    pub fn new(name: String, token: &str, allow: Vec<Allow>) -> Self {
        Self {
            name,
            token_digest: Sha256::digest(token.as_bytes()).into(),
            allow,
        }
    }
}

impl fmt::Debug for StaticNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StaticNode")
            .field("name", &self.name)
            .field("allow", &self.allow)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for StaticNodes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(&self.nodes).finish()
    }
}

impl Allow {
    fn allows(&self, identity: &SpiffeId) -> bool {
        self.namespace == identity.namespace()
            && self
                .service_account
                .as_deref()
                .is_none_or(|sa| sa == identity.service_account())
    }
}

impl Denied {
    /// Stable snake_case reason: the API's `error` field and the log's `reason`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::UnknownCredential => "unknown_credential",
            Self::IdentityNotAllowed { .. } => "identity_not_allowed",
            Self::Unauthenticated { .. } => "unauthenticated",
            Self::WrongAudience { .. } => "wrong_audience",
            Self::NotAgent { .. } => "not_agent_service_account",
            Self::NotPodBound { .. } => "token_not_pod_bound",
            Self::AgentPodUnknown { .. } => "agent_pod_unknown",
            Self::NotOnNode { .. } => "identity_not_on_node",
            Self::NotOwnIdentity { .. } => "not_own_identity",
            Self::WorkloadPodUnknown { .. } => "workload_pod_unknown",
            Self::ApiUnavailable { .. } => "api_unavailable",
            Self::MalformedToken => "malformed_token",
            Self::TokenReviewBusy => "token_review_busy",
            Self::TokenReviewRateLimited => "token_review_rate_limited",
        }
    }

    /// 401: who are you?; 403: known, but not this identity; 429 and 503: ask again later.
    pub fn http_status(&self) -> u16 {
        match self {
            Self::UnknownCredential
            | Self::Unauthenticated { .. }
            | Self::WrongAudience { .. }
            | Self::MalformedToken => 401,
            Self::TokenReviewRateLimited => 429,
            Self::TokenReviewBusy => 503,
            Self::IdentityNotAllowed { .. }
            | Self::NotAgent { .. }
            | Self::NotPodBound { .. }
            | Self::AgentPodUnknown { .. }
            | Self::NotOnNode { .. }
            | Self::NotOwnIdentity { .. }
            | Self::WorkloadPodUnknown { .. } => 403,
            Self::ApiUnavailable { .. } => 503,
        }
    }

    /// The requesting node, where the refusal got far enough to know it (for logs).
    pub fn node(&self) -> Option<&str> {
        match self {
            Self::IdentityNotAllowed { node, .. } | Self::NotOnNode { node, .. } => Some(node),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authorizer() -> Authorizer {
        let allow = |ns: &str, sa: Option<&str>| Allow {
            namespace: ns.into(),
            service_account: sa.map(Into::into),
        };
        Authorizer::Static(StaticNodes::new(vec![
            StaticNode::new(
                "node-a".into(),
                "token-a",
                vec![allow("default", Some("client")), allow("shop", None)],
            ),
            StaticNode::new(
                "node-b".into(),
                "token-b",
                vec![allow("default", Some("server"))],
            ),
        ]))
    }

    fn id(ns: &str, sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", ns, sa).unwrap()
    }

    #[tokio::test]
    async fn allowed_identity_names_the_node() {
        let authz = authorizer();
        assert_eq!(
            authz
                .authorize("token-a", &id("default", "client"))
                .await
                .unwrap(),
            "node-a"
        );
        assert_eq!(
            authz
                .authorize("token-b", &id("default", "server"))
                .await
                .unwrap(),
            "node-b"
        );
    }

    #[tokio::test]
    async fn wildcard_service_account_allows_the_whole_namespace() {
        let authz = authorizer();
        assert!(
            authz
                .authorize("token-a", &id("shop", "anything"))
                .await
                .is_ok()
        );
        assert!(
            authz
                .authorize("token-b", &id("shop", "anything"))
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn identity_of_another_node_is_not_allowed() {
        let err = authorizer()
            .authorize("token-a", &id("default", "server"))
            .await
            .unwrap_err();
        assert_eq!(err.reason(), "identity_not_allowed");
        assert_eq!(err.http_status(), 403);
        let message = err.to_string();
        assert!(
            message.contains("node-a") && message.contains("sa/server"),
            "{message}"
        );
    }

    #[tokio::test]
    async fn unknown_or_empty_token_is_unknown_credential() {
        for token in ["nope", "", "token-a "] {
            let err = authorizer()
                .authorize(token, &id("default", "client"))
                .await
                .unwrap_err();
            assert_eq!(err.reason(), "unknown_credential");
            assert_eq!(err.http_status(), 401);
        }
    }

    #[test]
    fn tokens_do_not_show_in_debug_output() {
        assert!(!format!("{:?}", authorizer()).contains("token-a"));
    }
}
