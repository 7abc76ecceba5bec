//! The certificate authority application: `weft ca`. Signs CSRs for workload identities,
//! for the nodes that run those workloads, and never lets its key out. The signing itself
//! (`identity::signer`, also used in-process by the agent's certificate manager) and the
//! API's wire types (`identity::ca_api`) belong to identity; this module decides who may
//! have which identity and serves the API.
//!
//! - `authz`: which node may have which identity (static tokens, or Kubernetes).
//! - `kubernetes`: the Kubernetes authorizer (TokenReview, then the pods of the node; a
//!   waypoint's own token for its own identity).
//! - `trust_bundle`: publishes the roots in a ConfigMap (Kubernetes mode), in the CA's
//!   namespace and the waypoints'.
//! - `metrics`: refusal and issuance counters, served on `metricsListen`.
//! - `server`: the HTTPS API, `POST /v1/certificates` (see `docs/ca.md`).
//!
//! Inputs: `ca.yaml` ([`Config::load`]). Output: signed chains and the trust bundle.

pub mod authz;
pub mod kubernetes;
pub mod metrics;
pub mod server;
pub mod trust_bundle;

use std::{
    collections::BTreeSet,
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use crate::{
    identity::{
        SpiffeId,
        signer::{self, InitPaths, Signer},
    },
    settings,
};
pub use authz::{Allow, Authorizer, Denied, StaticNode, StaticNodes};
pub use kubernetes::KubernetesAuthorizer;
pub use server::Server;

/// A CA error (loading the root, `weft ca init`, serving).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Root(#[from] signer::Error),
    #[error("cannot listen on {addr}: {source} (is another CA running?)")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set up TLS: {0}")]
    Tls(#[source] rustls::Error),
    // The cause is kube's own chain, printed after this by `{:#}`.
    #[error(
        "cannot connect to the Kubernetes API (in a pod: its service account; elsewhere: \
         KUBECONFIG)"
    )]
    KubeClient(#[source] Box<kube::Error>),
    #[error("cannot {what} in the Kubernetes API (does the CA's RBAC allow it?): {source}")]
    Kubernetes {
        what: String,
        #[source]
        source: Box<kube::Error>,
    },
    #[error("BUG: {0}")]
    Bug(String),
}

/// The validated `ca.yaml`.
#[derive(Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub trust_domain: String,
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    /// Further roots published in the trust bundle during a root rotation (`docs/ca.md`).
    pub trusted_roots: Vec<PathBuf>,
    /// Longest lifetime the CA grants, whatever a request asks for.
    pub max_cert_lifetime: Duration,
    /// DNS names and IP addresses of the CA's own serving certificate.
    pub server_names: Vec<String>,
    /// Where `/metrics` is served over plain HTTP; none: not served.
    pub metrics_listen: Option<SocketAddr>,
    pub authorization: Authorization,
}

/// Which authorizer `ca.yaml` selects: `nodes` (static) or `kubernetes`.
#[derive(Debug)]
pub enum Authorization {
    Static(StaticNodes),
    Kubernetes(kubernetes::Config),
}

/// `weft ca init`: a new self-signed root in `dir` (`ca.crt`, `ca.key`).
pub fn init(dir: &Path, trust_domain: &str) -> Result<InitPaths, Error> {
    Ok(Signer::init(dir, trust_domain)?)
}

impl Config {
    /// Reads and validates `ca.yaml`. Errors name the offending field.
    pub fn load(path: &Path) -> Result<Self, settings::Error> {
        let text = fs::read_to_string(path).map_err(|source| settings::Error::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_yaml(path, &text)
    }

    /// Validates `ca.yaml` text; `path` is for messages and relative `tokenFile`s are read
    /// as given (relative to the working directory).
    pub fn from_yaml(path: &Path, text: &str) -> Result<Self, settings::Error> {
        let file: ConfigFile =
            serde_yaml::from_str(text).map_err(|source| settings::Error::Parse {
                path: path.to_owned(),
                source,
            })?;
        let invalid = |field: &str, reason: String| settings::Error::Invalid {
            path: path.to_owned(),
            field: field.to_owned(),
            reason,
        };
        let required = |field: &str, what: &str| invalid(field, format!("required: {what}"));

        let listen_text = file.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
        let listen = listen_text
            .parse()
            .map_err(|_| invalid("listen", format!("invalid socket address {listen_text:?}")))?;
        let trust_domain = file
            .trust_domain
            .unwrap_or_else(|| crate::identity::DEFAULT_TRUST_DOMAIN.to_owned());
        if SpiffeId::new(&trust_domain, "ns", "sa").is_err() {
            return Err(invalid(
                "trustDomain",
                "lowercase letters, digits, '-', '.', '_'".into(),
            ));
        }
        let ca_cert = file
            .ca_cert
            .ok_or_else(|| required("caCert", "the CA certificate (PEM) from `weft ca init`"))?;
        let ca_key = file
            .ca_key
            .ok_or_else(|| required("caKey", "the CA key (PKCS#8 PEM) from `weft ca init`"))?;
        let max_cert_lifetime = match file.max_cert_lifetime.as_deref() {
            None => crate::identity::DEFAULT_CERT_LIFETIME,
            Some(text) => humantime::parse_duration(text)
                .map_err(|e| invalid("maxCertLifetime", format!("{text:?}: {e}")))?,
        };
        if max_cert_lifetime < crate::identity::MIN_CERT_LIFETIME {
            return Err(invalid(
                "maxCertLifetime",
                format!(
                    "must be at least {}",
                    humantime::format_duration(crate::identity::MIN_CERT_LIFETIME)
                ),
            ));
        }
        if file.server_names.is_empty() {
            return Err(required(
                "serverNames",
                "DNS names or IPs clients use to reach the CA (its serving certificate's SANs)",
            ));
        }
        for (i, name) in file.server_names.iter().enumerate() {
            if name.is_empty() || rustls::pki_types::ServerName::try_from(name.as_str()).is_err() {
                return Err(invalid(
                    &format!("serverNames[{i}]"),
                    format!("{name:?} is not a DNS name or IP address"),
                ));
            }
        }

        let metrics_listen = match file.metrics_listen.as_deref() {
            None => None,
            Some(text) => Some(text.parse().map_err(|_| {
                invalid("metricsListen", format!("invalid socket address {text:?}"))
            })?),
        };
        let authorization = match file.kubernetes {
            Some(_) if !file.nodes.is_empty() => {
                return Err(invalid(
                    "kubernetes",
                    "give either nodes (static tokens) or kubernetes, not both".into(),
                ));
            }
            Some(section) => Authorization::Kubernetes(kubernetes_config(section, &invalid)?),
            None => Authorization::Static(static_nodes(file.nodes, &trust_domain, &invalid)?),
        };
        Ok(Self {
            listen,
            trust_domain,
            ca_cert,
            ca_key,
            trusted_roots: file.trusted_roots,
            max_cert_lifetime,
            server_names: file.server_names,
            metrics_listen,
            authorization,
        })
    }
}

/// Validates the static `nodes[]`.
fn static_nodes(
    nodes_file: Vec<NodeFile>,
    trust_domain: &str,
    invalid: &dyn Fn(&str, String) -> settings::Error,
) -> Result<StaticNodes, settings::Error> {
    let mut names = BTreeSet::new();
    let mut tokens = BTreeSet::new();
    let mut nodes = Vec::with_capacity(nodes_file.len());
    for (i, node) in nodes_file.into_iter().enumerate() {
        let at = |field: &str| format!("nodes[{i}].{field}");
        if node.name.is_empty() {
            return Err(invalid(&at("name"), "must not be empty".into()));
        }
        if !names.insert(node.name.clone()) {
            return Err(invalid(
                &at("name"),
                format!("duplicate node {:?}", node.name),
            ));
        }
        let token = match (node.token, node.token_file) {
            (Some(token), None) => token,
            (None, Some(file)) => fs::read_to_string(&file)
                .map_err(|e| invalid(&at("tokenFile"), format!("{}: {e}", file.display())))?
                .trim()
                .to_owned(),
            _ => {
                return Err(invalid(
                    &format!("nodes[{i}]"),
                    "exactly one of token and tokenFile is required".into(),
                ));
            }
        };
        if token.len() < MIN_TOKEN_LEN {
            return Err(invalid(
                &at("token"),
                format!("must be at least {MIN_TOKEN_LEN} characters"),
            ));
        }
        if !tokens.insert(token.clone()) {
            return Err(invalid(
                &at("token"),
                "the same token is used by another node".into(),
            ));
        }
        let mut allow = Vec::with_capacity(node.allow.len());
        for (j, entry) in node.allow.into_iter().enumerate() {
            let field = |f: &str| format!("nodes[{i}].allow[{j}].{f}");
            if SpiffeId::new(trust_domain, &entry.namespace, "sa").is_err() {
                return Err(invalid(
                    &field("namespace"),
                    format!("{:?} is not a valid namespace", entry.namespace),
                ));
            }
            let service_account = match entry.service_account.as_str() {
                "*" => None,
                sa if SpiffeId::new(trust_domain, "ns", sa).is_ok() => Some(sa.to_owned()),
                sa => {
                    return Err(invalid(
                        &field("serviceAccount"),
                        format!("{sa:?} is not a valid service account name or \"*\""),
                    ));
                }
            };
            allow.push(Allow {
                namespace: entry.namespace,
                service_account,
            });
        }
        nodes.push(StaticNode::new(node.name, &token, allow));
    }
    Ok(StaticNodes::new(nodes))
}

/// Validates the `kubernetes:` section.
fn kubernetes_config(
    section: KubernetesFile,
    invalid: &dyn Fn(&str, String) -> settings::Error,
) -> Result<kubernetes::Config, settings::Error> {
    let audience = section
        .audience
        .unwrap_or_else(|| DEFAULT_AUDIENCE.to_owned());
    if audience.is_empty() || audience.chars().any(char::is_whitespace) {
        return Err(invalid(
            "kubernetes.audience",
            format!("{audience:?} must be non-empty, without spaces"),
        ));
    }
    let text = section.agent_service_account.ok_or_else(|| {
        invalid(
            "kubernetes.agentServiceAccount",
            "required: the weft agent's service account, namespace/name".into(),
        )
    })?;
    let agent_service_account = match text.split_once('/') {
        Some((namespace, name)) if is_dns_label(namespace) && is_dns_subdomain(name) => {
            kubernetes::ServiceAccountRef {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            }
        }
        _ => {
            return Err(invalid(
                "kubernetes.agentServiceAccount",
                format!("{text:?} is not namespace/name (for example weft/weft-agent)"),
            ));
        }
    };
    let trust_bundle_config_map = section
        .trust_bundle_config_map
        .unwrap_or_else(|| DEFAULT_TRUST_BUNDLE_CONFIG_MAP.to_owned());
    if !is_dns_subdomain(&trust_bundle_config_map) {
        return Err(invalid(
            "kubernetes.trustBundleConfigMap",
            format!("{trust_bundle_config_map:?} is not a valid ConfigMap name"),
        ));
    }
    let mut trust_bundle_namespaces: Vec<String> = Vec::new();
    for (i, namespace) in section.trust_bundle_namespaces.into_iter().enumerate() {
        if !is_dns_label(&namespace) {
            return Err(invalid(
                &format!("kubernetes.trustBundleNamespaces[{i}]"),
                format!("{namespace:?} is not a namespace name"),
            ));
        }
        if !trust_bundle_namespaces.contains(&namespace) {
            trust_bundle_namespaces.push(namespace);
        }
    }
    let defaults = kubernetes::ReviewLimits::default();
    let review_limits = kubernetes::ReviewLimits {
        max_concurrent: match section.max_concurrent_token_reviews {
            Some(0) => {
                return Err(invalid(
                    "kubernetes.maxConcurrentTokenReviews",
                    "must be at least 1".into(),
                ));
            }
            Some(n) => n,
            None => defaults.max_concurrent,
        },
        per_second: match section.token_reviews_per_second {
            Some(0) => {
                return Err(invalid(
                    "kubernetes.tokenReviewsPerSecond",
                    "must be at least 1".into(),
                ));
            }
            Some(n) => n,
            None => defaults.per_second,
        },
    };
    Ok(kubernetes::Config {
        audience,
        agent_service_account,
        trust_bundle_config_map,
        trust_bundle_namespaces,
        review_limits,
    })
}

/// RFC 1123 label (namespaces): lowercase alphanumerics and '-', at most 63.
fn is_dns_label(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 63
        && text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !text.starts_with('-')
        && !text.ends_with('-')
}

/// RFC 1123 subdomain (service account and ConfigMap names): labels joined by '.', at most 253.
fn is_dns_subdomain(text: &str) -> bool {
    text.len() <= 253 && text.split('.').all(is_dns_label)
}

/// `ca.yaml` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ConfigFile {
    listen: Option<String>,
    trust_domain: Option<String>,
    ca_cert: Option<PathBuf>,
    ca_key: Option<PathBuf>,
    #[serde(default)]
    trusted_roots: Vec<PathBuf>,
    max_cert_lifetime: Option<String>,
    #[serde(default)]
    server_names: Vec<String>,
    metrics_listen: Option<String>,
    #[serde(default)]
    nodes: Vec<NodeFile>,
    kubernetes: Option<KubernetesFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct KubernetesFile {
    audience: Option<String>,
    agent_service_account: Option<String>,
    trust_bundle_config_map: Option<String>,
    #[serde(default)]
    trust_bundle_namespaces: Vec<String>,
    max_concurrent_token_reviews: Option<usize>,
    token_reviews_per_second: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct NodeFile {
    name: String,
    token: Option<String>,
    token_file: Option<PathBuf>,
    #[serde(default)]
    allow: Vec<AllowFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct AllowFile {
    namespace: String,
    service_account: String,
}

/// Istio's CA port (istiod 15012), so a firewall rule written for one fits the other.
const DEFAULT_LISTEN: &str = "0.0.0.0:15012";
const MIN_TOKEN_LEN: usize = 16;
/// The audience of the agent's projected token in Kubernetes mode.
pub const DEFAULT_AUDIENCE: &str = "weft-ca";
const DEFAULT_TRUST_BUNDLE_CONFIG_MAP: &str = "weft-trust-bundle";

#[cfg(test)]
pub(crate) mod tests;
