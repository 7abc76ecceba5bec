//! The `agent:` section as written in the file, every field optional. Compared at reload:
//! a change needs a restart.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The `agent:` section itself.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
// The schema lists every field for the bad-field test (source/file/bad_fields.rs).
#[cfg_attr(test, derive(schemars::JsonSchema))]
pub struct AgentSection {
    pub node: Option<String>,
    pub pin_root: Option<PathBuf>,
    pub cgroup_root: Option<PathBuf>,
    /// The cgroup v2 directory holding the kubelet (default `/sys/fs/cgroup`, the host's
    /// root): the node's own connections (kubelet probes) are recognised there.
    pub host_cgroup: Option<PathBuf>,
    pub admin_addr: Option<String>,
    pub readiness_addr: Option<String>,
    /// `GET /metrics` (default `0.0.0.0:15020`).
    pub metrics_addr: Option<String>,
    /// First word of every metric name: `weft` (default), or `istio` so that Istio's
    /// dashboards work unchanged.
    pub metrics_prefix: Option<String>,
    pub proxy_mark: Option<u32>,
    /// Threads that run the proxy (default: the CPUs the agent may use).
    pub worker_threads: Option<usize>,
    #[serde(default)]
    pub ports: PortsSection,
    /// SPIFFE trust domain (default `cluster.local`).
    pub trust_domain: Option<String>,
    /// Workload certificate lifetime, humantime (`24h`, `10m`); renewed at half life.
    pub cert_lifetime: Option<String>,
    /// Where certificates come from; without it the proxy runs without mTLS.
    pub ca: Option<CaSection>,
    /// The CNI plugin's agent side; without it no socket is served.
    pub cni: Option<CniSection>,
    /// Pod discovery from the node's cgroup tree; without it none runs.
    pub discovery: Option<DiscoverySection>,
    /// Connection caps, idle timeouts, keepalives and HTTP/2 limits of the proxy.
    #[serde(default)]
    pub limits: LimitsSection,
    /// Limits of the admin, metrics and readiness servers.
    #[serde(default)]
    pub http: HttpSection,
    /// How shutdown serves the connections still open.
    #[serde(default)]
    pub drain: DrainSection,
    /// Hands the pod listeners to a successor agent; without it none is offered or asked.
    pub handover: Option<HandoverSection>,
}

impl AgentSection {
    /// The fields (`agent.<name>`, as written in the file) whose values differ in `other`.
    pub fn changed_fields(&self, other: &AgentSection) -> Vec<String> {
        let (ours, theirs) = (to_object(self), to_object(other));
        let mut names: Vec<&String> = ours.keys().chain(theirs.keys()).collect();
        names.sort();
        names.dedup();
        names
            .into_iter()
            .filter(|name| ours.get(*name) != theirs.get(*name))
            .map(|name| format!("agent.{name}"))
            .collect()
    }
}

/// The section as a JSON object (None and absent fields compare alike).
fn to_object(section: &AgentSection) -> serde_json::Map<String, serde_json::Value> {
    match serde_json::to_value(section) {
        Ok(serde_json::Value::Object(map)) => map
            .into_iter()
            .filter(|(_, value)| !value.is_null())
            .collect(),
        // A struct of plain fields always serializes to an object.
        _ => serde_json::Map::new(),
    }
}

/// The `agent.limits:` section: every field optional, each default in docs/config.md.
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LimitsSection {
    /// Proxied connections per pod and direction (default 4096).
    pub pod_connections: Option<usize>,
    /// Proxied connections of the whole node (default 16384, lowered to fit RLIMIT_NOFILE).
    pub node_connections: Option<usize>,
    /// No bytes either way for this long closes a connection, humantime (default `1h`).
    pub idle_timeout: Option<String>,
    /// TCP keepalive: silence before the first probe (default `60s`)…
    pub keepalive_time: Option<String>,
    /// …between probes (default `15s`)…
    pub keepalive_interval: Option<String>,
    /// …and unanswered probes before the connection is dropped (default 4).
    pub keepalive_retries: Option<u32>,
    /// HBONE SETTINGS_MAX_HEADER_LIST_SIZE in bytes (default 16384); larger: 431.
    pub max_header_list_size: Option<u32>,
    /// HBONE SETTINGS_MAX_CONCURRENT_STREAMS (default 100).
    pub max_concurrent_streams: Option<u32>,
    /// Client resets of not-yet-accepted HBONE streams before GOAWAY (default 20).
    pub max_pending_accept_reset_streams: Option<usize>,
    /// HBONE streams reset for a peer's protocol errors before GOAWAY (default 1024).
    pub max_local_error_reset_streams: Option<usize>,
    /// TLS handshake and HTTP/2 preface of an HBONE connection (default `10s`).
    pub handshake_timeout: Option<String>,
    /// HTTP/2 PING on idle HBONE connections, both sides (default `30s`)…
    pub ping_interval: Option<String>,
    /// …unanswered for this long closes the connection (default `10s`).
    pub ping_timeout: Option<String>,
}

/// The `agent.http:` section: limits of the admin, metrics and readiness servers
/// (`http::Limits`; defaults there).
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpSection {
    /// humantime (default `10s`).
    pub header_timeout: Option<String>,
    /// humantime (default `10s`).
    pub body_timeout: Option<String>,
    pub max_body_bytes: Option<usize>,
    pub max_connections: Option<usize>,
    pub max_connections_per_ip: Option<usize>,
}

/// The `agent.drain:` section.
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DrainSection {
    /// After a hand-over to a successor agent, open connections are served this long at
    /// most, humantime (default `1h`); what is still open then is cut.
    pub limit: Option<String>,
    /// After SIGTERM or `/quitquitquit` with no successor, humantime (default `30s`): the
    /// node's enrolled pods cannot open connections meanwhile, so it is short.
    pub limit_without_successor: Option<String>,
}

/// The `agent.handover:` section.
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HandoverSection {
    /// The unix socket (default `/var/run/weft/handover.sock`).
    pub socket: Option<PathBuf>,
}

/// The `agent.cni:` section.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[cfg_attr(test, derive(schemars::JsonSchema))]
pub struct CniSection {
    /// The unix socket the plugin connects to (default `/var/run/weft/cni.sock`).
    pub socket: Option<PathBuf>,
    /// Where the agent lists the mesh namespaces for the plugin to read while the agent
    /// is down (default `mesh-namespaces.json` next to the socket).
    pub mesh_namespaces_file: Option<PathBuf>,
    /// How long a CNI ADD waits for the pod's enrollment, humantime (default `20s`).
    pub enroll_timeout: Option<String>,
    /// How long the plugin may take to send its request, humantime (default `10s`).
    pub request_timeout: Option<String>,
    /// Requests served at once (default 128); more are answered "not ready".
    pub max_connections: Option<usize>,
}

/// The `agent.discovery:` section.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[cfg_attr(test, derive(schemars::JsonSchema))]
pub struct DiscoverySection {
    /// The host's cgroup2 mount as the agent sees it (default `/sys/fs/cgroup`).
    pub cgroup_root: Option<PathBuf>,
    /// The host's /proc as the agent sees it (default `/proc`, with `hostPID`).
    pub proc_root: Option<PathBuf>,
    /// How often the tree is scanned again, humantime (default `30s`).
    pub interval: Option<String>,
}

/// The `agent.ca:` section: exactly one of `inProcess` and `remote`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[cfg_attr(test, derive(schemars::JsonSchema))]
pub struct CaSection {
    pub in_process: Option<InProcessCaSection>,
    pub remote: Option<RemoteCaSection>,
}

/// `agent.ca.inProcess`: the agent signs its own certificates with a local root.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[cfg_attr(test, derive(schemars::JsonSchema))]
pub struct InProcessCaSection {
    /// CA certificate, PEM (`weft ca init` writes `ca.crt`).
    pub cert: PathBuf,
    /// CA key, PKCS#8 PEM (`ca.key`).
    pub key: PathBuf,
    /// Further roots (PEM files) trusted besides `cert`, during a root rotation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trusted_roots: Vec<PathBuf>,
}

/// `agent.ca.remote`: `weft ca` over HTTPS.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[cfg_attr(test, derive(schemars::JsonSchema))]
pub struct RemoteCaSection {
    /// `host:port` of the CA.
    pub addr: String,
    /// Name the CA's serving certificate carries (one of its `serverNames`).
    pub server_name: String,
    /// The CA root certificate, PEM.
    pub root_cert: PathBuf,
    /// File holding this node's bearer token; re-read on every request.
    pub token_file: PathBuf,
}

/// The `agent.ports:` section.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[cfg_attr(test, derive(schemars::JsonSchema))]
pub struct PortsSection {
    pub outbound: Option<u16>,
    pub inbound: Option<u16>,
    pub hbone: Option<u16>,
}
