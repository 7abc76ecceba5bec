//! Agent configuration: the start-up settings of the `agent:` section of the config file,
//! overridden by flags (whose defaults come from `WEFT_*` environment variables), parsed
//! into validated per-module configs. The reloadable rest of the file is `source::file`'s.
//!
//! Order of precedence: file < env < flags (clap's `env` gives the last two).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Serialize;

use crate::{
    admin, cni, dns, drain, ebpf, handover, hbone, http,
    identity::{self, CaSource},
    proxy,
    settings::{AgentSection, Error, HttpSection, LimitsSection, humantime_ms, node_name},
    source::node::{cni as node_cni, discover},
    telemetry,
};

/// The agent's start-up configuration, composed of each module's own config.
#[derive(Clone, Debug, Serialize)]
pub struct Config {
    /// Node name, for logs and status.
    pub node: String,
    /// The local config file (workloads, services, mesh settings), polled for changes.
    pub config_path: PathBuf,
    /// How often the config file is checked for changes.
    #[serde(with = "humantime_ms")]
    pub reload_interval: Duration,
    pub ebpf: ebpf::Config,
    pub admin: admin::Config,
    pub proxy: proxy::Config,
    /// Trust domain, certificate lifetime and where certificates come from.
    pub identity: identity::Config,
    /// Metric name prefix.
    pub telemetry: telemetry::Config,
    /// The CNI plugin's socket (`agent.cni`); off without the section.
    pub cni: Option<node_cni::Config>,
    /// Pod discovery from the kubelet's cgroup tree (`agent.discovery`); off without it.
    pub discovery: Option<discover::Config>,
    /// How long shutdown serves open connections (`agent.drain`).
    pub drain: drain::Config,
    /// Listener hand-over to and from another agent on the node (`agent.handover`).
    pub handover: Option<handover::Config>,
    /// Threads of the async runtime that runs the proxy (`agent.workerThreads`).
    pub worker_threads: usize,
    /// Where the hosts of external services are resolved (`--resolv-conf`, `--dns-server`).
    pub dns: dns::Config,
}

/// Flag and environment overrides of the file's `agent:` section.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub pin_root: Option<PathBuf>,
    pub cgroup_root: Option<PathBuf>,
    pub admin_addr: Option<SocketAddr>,
    pub readiness_addr: Option<SocketAddr>,
    pub metrics_addr: Option<SocketAddr>,
    /// `--ca-cert`: with `ca_key`, run the CA in-process from this root (overrides agent.ca).
    pub ca_cert: Option<PathBuf>,
    /// `--ca-key`: the in-process CA's PKCS#8 key.
    pub ca_key: Option<PathBuf>,
    /// `--worker-threads` (overrides agent.workerThreads).
    pub worker_threads: Option<usize>,
    /// `--resolv-conf`: the nameservers of external services' hosts (default
    /// `/etc/resolv.conf`).
    pub resolv_conf: Option<PathBuf>,
    /// `--dns-server`: nameservers (`ip:port`) to ask instead of the resolv.conf's.
    pub dns_servers: Vec<SocketAddr>,
}

impl Config {
    /// Builds the start-up config from the file's `agent:` section and the overrides.
    pub fn new(
        config_path: &Path,
        agent: &AgentSection,
        overrides: Overrides,
    ) -> Result<Self, Error> {
        let invalid = |field: &str, reason: String| Error::Invalid {
            path: config_path.to_owned(),
            field: field.to_owned(),
            reason,
        };
        let addr = |field: &str, value: Option<&String>, default: &str| {
            let text = value.map(String::as_str).unwrap_or(default);
            text.parse::<SocketAddr>()
                .map_err(|_| invalid(field, format!("invalid socket address {text:?}")))
        };
        let port = |field: &str, value: Option<u16>, default: u16| match value.unwrap_or(default) {
            0 => Err(invalid(field, "port must be between 1 and 65535".into())),
            p => Ok(p),
        };

        let ports = proxy::Ports {
            outbound: port("agent.ports.outbound", agent.ports.outbound, OUTBOUND_PORT)?,
            inbound: port("agent.ports.inbound", agent.ports.inbound, INBOUND_PORT)?,
            hbone: port("agent.ports.hbone", agent.ports.hbone, HBONE_PORT)?,
        };
        if ports.outbound == ports.inbound
            || ports.outbound == ports.hbone
            || ports.inbound == ports.hbone
        {
            return Err(invalid(
                "agent.ports",
                "the three proxy ports must differ".into(),
            ));
        }
        let mark = agent.proxy_mark.unwrap_or(PROXY_MARK);
        if mark == 0 {
            return Err(invalid(
                "agent.proxyMark",
                "must not be 0 (0 is every unmarked socket)".into(),
            ));
        }
        if mark == crate::netns::reply_route::REPLY_MARK {
            return Err(invalid(
                "agent.proxyMark",
                format!(
                    "must not be {mark:#x}: weft marks the replies to connections it makes as \
                     the client with it"
                ),
            ));
        }
        let cgroup_root = overrides
            .cgroup_root
            .or_else(|| agent.cgroup_root.clone())
            .ok_or_else(|| {
                invalid(
                    "agent.cgroupRoot",
                    "required: the cgroup v2 directory holding the pods".into(),
                )
            })?;
        let admin_addr = match overrides.admin_addr {
            Some(a) => a,
            None => addr("agent.adminAddr", agent.admin_addr.as_ref(), ADMIN_ADDR)?,
        };
        admin::require_loopback(admin_addr).map_err(|reason| invalid("agent.adminAddr", reason))?;
        let readiness_addr = match overrides.readiness_addr {
            Some(a) => a,
            None => addr(
                "agent.readinessAddr",
                agent.readiness_addr.as_ref(),
                READINESS_ADDR,
            )?,
        };
        let metrics_addr = match overrides.metrics_addr {
            Some(a) => a,
            None => addr(
                "agent.metricsAddr",
                agent.metrics_addr.as_ref(),
                METRICS_ADDR,
            )?,
        };
        let metrics_prefix = telemetry::Prefix::new(
            agent
                .metrics_prefix
                .as_deref()
                .unwrap_or(telemetry::metrics::DEFAULT_PREFIX),
        )
        .map_err(|e| invalid("agent.metricsPrefix", e.to_string()))?;
        let identity = identity_config(agent, overrides.ca_cert, overrides.ca_key)
            .map_err(|(field, reason)| invalid(field, reason))?;
        let duration = |field: &str, value: Option<&str>, default: Duration| match value {
            None => Ok(default),
            Some(text) => match humantime::parse_duration(text) {
                Ok(d) if !d.is_zero() => Ok(d),
                Ok(_) => Err(invalid(field, "must be more than 0".into())),
                Err(e) => Err(invalid(field, format!("{text:?}: {e}"))),
            },
        };
        let http = http_limits(&agent.http, &duration, &invalid)?;
        let cni = match &agent.cni {
            None => None,
            Some(section) => {
                let socket = section
                    .socket
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(cni::DEFAULT_SOCKET));
                Some(node_cni::Config {
                    mesh_namespaces_file: section
                        .mesh_namespaces_file
                        .clone()
                        .unwrap_or_else(|| cni::plugin::default_mesh_namespaces_file(&socket)),
                    socket,
                    enroll_timeout: duration(
                        "agent.cni.enrollTimeout",
                        section.enroll_timeout.as_deref(),
                        CNI_ENROLL_TIMEOUT,
                    )?,
                    request_timeout: duration(
                        "agent.cni.requestTimeout",
                        section.request_timeout.as_deref(),
                        CNI_REQUEST_TIMEOUT,
                    )?,
                    max_connections: match section.max_connections {
                        Some(0) => {
                            return Err(invalid(
                                "agent.cni.maxConnections",
                                "must be at least 1".into(),
                            ));
                        }
                        Some(n) => n,
                        None => CNI_MAX_CONNECTIONS,
                    },
                })
            }
        };
        let discovery = match &agent.discovery {
            None => None,
            Some(section) => Some(discover::Config {
                cgroup_root: section
                    .cgroup_root
                    .clone()
                    .unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup")),
                proc_root: section
                    .proc_root
                    .clone()
                    .unwrap_or_else(|| PathBuf::from("/proc")),
                interval: duration(
                    "agent.discovery.interval",
                    section.interval.as_deref(),
                    DISCOVERY_INTERVAL,
                )?,
            }),
        };
        let limits = limits_config(&agent.limits, &duration, &invalid)?;
        let drain = drain::Config {
            limit: duration(
                "agent.drain.limit",
                agent.drain.limit.as_deref(),
                drain::DEFAULT_LIMIT,
            )?,
            limit_without_successor: duration(
                "agent.drain.limitWithoutSuccessor",
                agent.drain.limit_without_successor.as_deref(),
                drain::DEFAULT_LIMIT_WITHOUT_SUCCESSOR,
            )?,
        };
        let worker_threads = match overrides.worker_threads.or(agent.worker_threads) {
            None => available_cpus(),
            Some(n) if (1..=MAX_WORKER_THREADS).contains(&n) => n,
            Some(n) => {
                return Err(invalid(
                    "agent.workerThreads",
                    format!("{n} is not between 1 and {MAX_WORKER_THREADS}"),
                ));
            }
        };
        if cni.is_some() && discovery.is_none() {
            // Fail closed: the pods the plugin told a previous agent about are known to a
            // restarted one only through discovery; without it they would be dropped from
            // the pinned state and run unmeshed.
            return Err(invalid(
                "agent.discovery",
                "required with agent.cni: a restarted agent finds the pods enrolled through CNI by discovery".into(),
            ));
        }
        Ok(Self {
            node: agent.node.clone().unwrap_or_else(node_name),
            config_path: config_path.to_owned(),
            reload_interval: RELOAD_INTERVAL,
            ebpf: ebpf::Config {
                pin_root: overrides
                    .pin_root
                    .or_else(|| agent.pin_root.clone())
                    .unwrap_or_else(|| PathBuf::from(PIN_ROOT)),
                cgroup_root,
                host_cgroup: agent
                    .host_cgroup
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(HOST_CGROUP)),
            },
            admin: admin::Config {
                admin_addr,
                readiness_addr,
                metrics_addr,
                http,
            },
            proxy: proxy::Config {
                ports,
                mark,
                limits,
            },
            identity,
            telemetry: telemetry::Config { metrics_prefix },
            cni,
            discovery,
            drain,
            handover: agent.handover.as_ref().map(|section| handover::Config {
                socket: section
                    .socket
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(handover::DEFAULT_SOCKET)),
            }),
            worker_threads,
            dns: dns::Config {
                resolv_conf: overrides
                    .resolv_conf
                    .unwrap_or_else(|| PathBuf::from(dns::DEFAULT_RESOLV_CONF)),
                nameservers: overrides.dns_servers,
                timeout: dns::DEFAULT_TIMEOUT,
            },
        })
    }
}

/// The CPUs this process may run on: its affinity and its cgroup's CPU quota (a container's
/// CPU limit) both count, so a limited agent on a large node does not start a thread per
/// core of the node.
fn available_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

/// Parses a humantime field (field path, text, default).
type DurationField<'a> = dyn Fn(&str, Option<&str>, Duration) -> Result<Duration, Error> + 'a;

/// The `agent.limits` section, over the defaults of `proxy::limits::Config`.
fn limits_config(
    section: &LimitsSection,
    duration: &DurationField<'_>,
    invalid: &dyn Fn(&str, String) -> Error,
) -> Result<proxy::limits::Config, Error> {
    let defaults = proxy::limits::Config::default();
    let at_least = |field: &str, value: Option<usize>, default: usize, min: usize| {
        at_least(invalid, field, value, default, min)
    };
    let (s, h) = (section, defaults.hbone);
    let limits = proxy::limits::Config {
        pod_connections: at_least(
            "agent.limits.podConnections",
            s.pod_connections,
            defaults.pod_connections,
            1,
        )?,
        node_connections: at_least(
            "agent.limits.nodeConnections",
            s.node_connections,
            defaults.node_connections,
            1,
        )?,
        idle_timeout: duration(
            "agent.limits.idleTimeout",
            s.idle_timeout.as_deref(),
            defaults.idle_timeout,
        )?,
        keepalive_time: duration(
            "agent.limits.keepaliveTime",
            s.keepalive_time.as_deref(),
            defaults.keepalive_time,
        )?,
        keepalive_interval: duration(
            "agent.limits.keepaliveInterval",
            s.keepalive_interval.as_deref(),
            defaults.keepalive_interval,
        )?,
        keepalive_retries: at_least(
            "agent.limits.keepaliveRetries",
            s.keepalive_retries.map(|n| n as usize),
            defaults.keepalive_retries as usize,
            1,
        )? as u32,
        hbone: hbone::Limits {
            // CONNECT carries `forwarded`, `baggage` and `traceparent`: leave them room.
            max_header_list_size: at_least(
                "agent.limits.maxHeaderListSize",
                s.max_header_list_size.map(|n| n as usize),
                h.max_header_list_size as usize,
                1_024,
            )? as u32,
            max_concurrent_streams: at_least(
                "agent.limits.maxConcurrentStreams",
                s.max_concurrent_streams.map(|n| n as usize),
                h.max_concurrent_streams as usize,
                1,
            )? as u32,
            max_pending_accept_reset_streams: at_least(
                "agent.limits.maxPendingAcceptResetStreams",
                s.max_pending_accept_reset_streams,
                h.max_pending_accept_reset_streams,
                1,
            )?,
            max_local_error_reset_streams: at_least(
                "agent.limits.maxLocalErrorResetStreams",
                s.max_local_error_reset_streams,
                h.max_local_error_reset_streams,
                1,
            )?,
            handshake_timeout: duration(
                "agent.limits.handshakeTimeout",
                s.handshake_timeout.as_deref(),
                h.handshake_timeout,
            )?,
            ping_interval: duration(
                "agent.limits.pingInterval",
                s.ping_interval.as_deref(),
                h.ping_interval,
            )?,
            ping_timeout: duration(
                "agent.limits.pingTimeout",
                s.ping_timeout.as_deref(),
                h.ping_timeout,
            )?,
        },
    };
    if limits.pod_connections > limits.node_connections {
        return Err(invalid(
            "agent.limits.podConnections",
            format!(
                "{} is more than agent.limits.nodeConnections ({}): one pod could take the whole node",
                limits.pod_connections, limits.node_connections
            ),
        ));
    }
    Ok(limits)
}

/// `value` (or `default` when unset), refused naming `field` when below `min`.
fn at_least(
    invalid: &dyn Fn(&str, String) -> Error,
    field: &str,
    value: Option<usize>,
    default: usize,
    min: usize,
) -> Result<usize, Error> {
    let value = value.unwrap_or(default);
    if value < min {
        return Err(invalid(field, format!("must be at least {min}")));
    }
    Ok(value)
}

/// `agent.http`, over `http::Limits`'s defaults; counts must be at least 1.
fn http_limits(
    section: &HttpSection,
    duration: &DurationField<'_>,
    invalid: &dyn Fn(&str, String) -> Error,
) -> Result<http::Limits, Error> {
    let defaults = http::Limits::default();
    let count = |field: &str, value: Option<usize>, default: usize| {
        at_least(invalid, field, value, default, 1)
    };
    Ok(http::Limits {
        header_timeout: duration(
            "agent.http.headerTimeout",
            section.header_timeout.as_deref(),
            defaults.header_timeout,
        )?,
        body_timeout: duration(
            "agent.http.bodyTimeout",
            section.body_timeout.as_deref(),
            defaults.body_timeout,
        )?,
        max_body_bytes: count(
            "agent.http.maxBodyBytes",
            section.max_body_bytes,
            defaults.max_body_bytes,
        )?,
        max_connections: count(
            "agent.http.maxConnections",
            section.max_connections,
            defaults.max_connections,
        )?,
        max_connections_per_ip: count(
            "agent.http.maxConnectionsPerIp",
            section.max_connections_per_ip,
            defaults.max_connections_per_ip,
        )?,
    })
}

/// The identity part of the `agent:` section, with the `--ca-cert`/`--ca-key` overrides.
/// Errors are (field, reason).
fn identity_config(
    agent: &AgentSection,
    ca_cert: Option<PathBuf>,
    ca_key: Option<PathBuf>,
) -> Result<identity::Config, (&'static str, String)> {
    let trust_domain = agent
        .trust_domain
        .clone()
        .unwrap_or_else(|| identity::DEFAULT_TRUST_DOMAIN.to_owned());
    if identity::SpiffeId::new(&trust_domain, "ns", "sa").is_err() {
        return Err((
            "agent.trustDomain",
            format!("{trust_domain:?}: lowercase letters, digits, '-', '.', '_'"),
        ));
    }
    let cert_lifetime = match agent.cert_lifetime.as_deref() {
        None => identity::DEFAULT_CERT_LIFETIME,
        Some(text) => humantime::parse_duration(text)
            .map_err(|e| ("agent.certLifetime", format!("{text:?}: {e}")))?,
    };
    if cert_lifetime < identity::MIN_CERT_LIFETIME {
        return Err((
            "agent.certLifetime",
            format!(
                "must be at least {}",
                humantime::format_duration(identity::MIN_CERT_LIFETIME)
            ),
        ));
    }
    let ca = match (ca_cert, ca_key, &agent.ca) {
        (Some(cert), Some(key), _) => CaSource::InProcess {
            cert,
            key,
            trusted_roots: Vec::new(),
        },
        (Some(_), None, _) | (None, Some(_), _) => {
            return Err((
                "agent.ca",
                "--ca-cert and --ca-key (WEFT_CA_CERT, WEFT_CA_KEY) go together".into(),
            ));
        }
        (None, None, None) => CaSource::None,
        (None, None, Some(section)) => match (&section.in_process, &section.remote) {
            (Some(local), None) => CaSource::InProcess {
                cert: local.cert.clone(),
                key: local.key.clone(),
                trusted_roots: local.trusted_roots.clone(),
            },
            (None, Some(remote)) => {
                if !remote
                    .addr
                    .rsplit_once(':')
                    .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
                {
                    return Err((
                        "agent.ca.remote.addr",
                        format!("{:?} is not host:port", remote.addr),
                    ));
                }
                if rustls::pki_types::ServerName::try_from(remote.server_name.as_str()).is_err() {
                    return Err((
                        "agent.ca.remote.serverName",
                        format!("{:?} is not a DNS name or IP address", remote.server_name),
                    ));
                }
                CaSource::Remote {
                    addr: remote.addr.clone(),
                    server_name: remote.server_name.clone(),
                    root_cert: remote.root_cert.clone(),
                    token_file: remote.token_file.clone(),
                }
            }
            _ => {
                return Err((
                    "agent.ca",
                    "exactly one of inProcess and remote is required".into(),
                ));
            }
        },
    };
    Ok(identity::Config {
        trust_domain,
        cert_lifetime,
        ca,
    })
}

const PIN_ROOT: &str = "/sys/fs/bpf/weft";
const ADMIN_ADDR: &str = "127.0.0.1:15000";
const READINESS_ADDR: &str = "0.0.0.0:15021";
const METRICS_ADDR: &str = "0.0.0.0:15020";
const OUTBOUND_PORT: u16 = ebpf_common::config::OUTBOUND_PORT;
const INBOUND_PORT: u16 = ebpf_common::config::INBOUND_PORT;
const HBONE_PORT: u16 = ebpf_common::config::HBONE_PORT;
/// "we" in ASCII: distinctive in `ss -e` and packet marks, unlikely to collide with a CNI's.
const PROXY_MARK: u32 = 0x7765;
/// `agent.hostCgroup`: the host's cgroup2 mount, which holds the kubelet on every layout.
const HOST_CGROUP: &str = "/sys/fs/cgroup";
const RELOAD_INTERVAL: Duration = Duration::from_millis(500);
/// More threads than any node has cores would only add wake-ups.
const MAX_WORKER_THREADS: usize = 1024;
const CNI_ENROLL_TIMEOUT: Duration = Duration::from_secs(20);
const CNI_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Above a node's pod starts at once (kubelet starts pods a few at a time), far below a
/// task flood.
const CNI_MAX_CONNECTIONS: usize = 128;
const DISCOVERY_INTERVAL: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use super::*;

    fn section(yaml: &str) -> AgentSection {
        serde_yaml::from_str(yaml).unwrap()
    }

    /// The config of an `agent:` section holding `yaml` beside the required cgroup root.
    fn with_cgroup_root(yaml: &str, overrides: Overrides) -> Result<Config, Error> {
        Config::new(
            Path::new("n.yaml"),
            &section(&format!("cgroupRoot: /a\n{yaml}")),
            overrides,
        )
    }

    #[test]
    fn defaults_fill_everything_but_the_cgroup_root() {
        let cfg = Config::new(
            Path::new("n.yaml"),
            &section("cgroupRoot: /sys/fs/cgroup/pods"),
            Overrides::default(),
        )
        .unwrap();
        assert_eq!(cfg.ebpf.pin_root, PathBuf::from("/sys/fs/bpf/weft"));
        assert_eq!(cfg.ebpf.host_cgroup, PathBuf::from("/sys/fs/cgroup"));
        assert_eq!(cfg.proxy.ports.outbound, 15_001);
        assert_eq!(cfg.admin.admin_addr, "127.0.0.1:15000".parse().unwrap());
    }

    #[test]
    fn the_host_cgroup_is_where_the_config_says() {
        let cfg = Config::new(
            Path::new("n.yaml"),
            &section("cgroupRoot: /a\nhostCgroup: /sys/fs/cgroup/system.slice/kubelet.service"),
            Overrides::default(),
        )
        .unwrap();
        assert_eq!(
            cfg.ebpf.host_cgroup,
            PathBuf::from("/sys/fs/cgroup/system.slice/kubelet.service")
        );
    }

    #[test]
    fn cni_and_discovery_are_off_unless_configured_and_get_defaults() {
        let off = Config::new(
            Path::new("n.yaml"),
            &section("cgroupRoot: /a"),
            Overrides::default(),
        )
        .unwrap();
        assert!(off.cni.is_none() && off.discovery.is_none());
        let on = Config::new(
            Path::new("n.yaml"),
            &section(
                "cgroupRoot: /a\ncni: {socket: /run/w/cni.sock}\ndiscovery: {procRoot: /host/proc}",
            ),
            Overrides::default(),
        )
        .unwrap();
        let cni = on.cni.unwrap();
        assert_eq!(
            cni.mesh_namespaces_file,
            PathBuf::from("/run/w/mesh-namespaces.json")
        );
        assert_eq!(cni.enroll_timeout, Duration::from_secs(20));
        let discovery = on.discovery.unwrap();
        assert_eq!(discovery.cgroup_root, PathBuf::from("/sys/fs/cgroup"));
        assert_eq!(discovery.proc_root, PathBuf::from("/host/proc"));
        let err = Config::new(
            Path::new("n.yaml"),
            &section("cgroupRoot: /a\ncni: {enrollTimeout: soon}"),
            Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("agent.cni.enrollTimeout"), "{err}");
        let err = Config::new(
            Path::new("n.yaml"),
            &section("cgroupRoot: /a\ncni: {}"),
            Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("agent.discovery: required with agent.cni"),
            "{err}"
        );
    }

    #[test]
    fn missing_cgroup_root_names_the_field() {
        let err = Config::new(Path::new("n.yaml"), &section("{}"), Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("agent.cgroupRoot"), "{err}");
    }

    #[test]
    fn dns_defaults_to_the_system_resolv_conf_and_takes_the_flags() {
        let cfg = Config::new(
            Path::new("n.yaml"),
            &section("cgroupRoot: /a"),
            Overrides::default(),
        )
        .unwrap();
        assert_eq!(cfg.dns, dns::Config::default());
        assert_eq!(cfg.dns.resolv_conf, PathBuf::from("/etc/resolv.conf"));
        let server: SocketAddr = "127.0.0.1:5353".parse().unwrap();
        let cfg = Config::new(
            Path::new("n.yaml"),
            &section("cgroupRoot: /a"),
            Overrides {
                resolv_conf: Some("/run/weft/resolv.conf".into()),
                dns_servers: vec![server],
                ..Overrides::default()
            },
        )
        .unwrap();
        assert_eq!(cfg.dns.resolv_conf, PathBuf::from("/run/weft/resolv.conf"));
        assert_eq!(cfg.dns.nameservers, [server]);
    }

    #[test]
    fn flags_override_the_file() {
        let cfg = Config::new(
            Path::new("n.yaml"),
            &section("cgroupRoot: /a\npinRoot: /sys/fs/bpf/a"),
            Overrides {
                pin_root: Some("/sys/fs/bpf/b".into()),
                ..Overrides::default()
            },
        )
        .unwrap();
        assert_eq!(cfg.ebpf.pin_root, PathBuf::from("/sys/fs/bpf/b"));
    }

    #[test]
    fn admin_address_off_loopback_is_refused_naming_the_field() {
        for (yaml, overrides) in [
            (
                "cgroupRoot: /a\nadminAddr: 0.0.0.0:15000",
                Overrides::default(),
            ),
            (
                "cgroupRoot: /a",
                Overrides {
                    admin_addr: Some("10.0.0.1:15000".parse().unwrap()),
                    ..Overrides::default()
                },
            ),
        ] {
            let err = Config::new(Path::new("n.yaml"), &section(yaml), overrides)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("agent.adminAddr") && err.contains("loopback"),
                "{err}"
            );
        }
    }

    #[test]
    fn http_limits_have_defaults_and_bad_ones_name_the_field() {
        let cfg = Config::new(
            Path::new("n.yaml"),
            &section("cgroupRoot: /a\nhttp: {headerTimeout: 2s, maxConnectionsPerIp: 4}"),
            Overrides::default(),
        )
        .unwrap();
        assert_eq!(cfg.admin.http.header_timeout, Duration::from_secs(2));
        assert_eq!(cfg.admin.http.max_connections_per_ip, 4);
        assert_eq!(
            cfg.admin.http.max_connections,
            http::Limits::default().max_connections
        );
        for (yaml, field) in [
            ("http: {headerTimeout: soon}", "agent.http.headerTimeout"),
            ("http: {bodyTimeout: 0s}", "agent.http.bodyTimeout"),
            ("http: {maxConnections: 0}", "agent.http.maxConnections"),
            ("http: {maxBodyBytes: 0}", "agent.http.maxBodyBytes"),
        ] {
            let err = with_cgroup_root(yaml, Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(err.contains(field), "{yaml}: {err}");
        }
    }

    #[test]
    fn bad_admin_address_names_the_field() {
        let err = Config::new(
            Path::new("n.yaml"),
            &section("cgroupRoot: /a\nadminAddr: nowhere"),
            Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("agent.adminAddr"), "{err}");
    }

    fn identity_error(yaml: &str, overrides: Overrides) -> String {
        Config::new(Path::new("n.yaml"), &section(yaml), overrides)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn identity_defaults_to_cluster_local_and_no_ca() {
        let cfg = Config::new(
            Path::new("n.yaml"),
            &section("cgroupRoot: /a"),
            Overrides::default(),
        )
        .unwrap();
        assert_eq!(cfg.identity, identity::Config::default());
        assert_eq!(cfg.identity.trust_domain, "cluster.local");
    }

    #[test]
    fn remote_ca_section_is_parsed() {
        let cfg = Config::new(
            Path::new("n.yaml"),
            &section(
                "cgroupRoot: /a\ntrustDomain: example.org\ncertLifetime: 1h\nca:\n  remote:\n    \
                 addr: ca.weft:15012\n    serverName: ca.weft\n    rootCert: /etc/weft/ca.crt\n    \
                 tokenFile: /var/run/weft/token",
            ),
            Overrides::default(),
        )
        .unwrap();
        assert_eq!(cfg.identity.trust_domain, "example.org");
        assert_eq!(cfg.identity.cert_lifetime, Duration::from_secs(3600));
        assert!(
            matches!(cfg.identity.ca, CaSource::Remote { ref addr, .. } if addr == "ca.weft:15012")
        );
    }

    #[test]
    fn ca_flags_switch_to_the_in_process_ca() {
        let cfg = Config::new(
            Path::new("n.yaml"),
            &section("cgroupRoot: /a\nca: {inProcess: {cert: /x/ca.crt, key: /x/ca.key}}"),
            Overrides {
                ca_cert: Some("/y/ca.crt".into()),
                ca_key: Some("/y/ca.key".into()),
                ..Overrides::default()
            },
        )
        .unwrap();
        assert_eq!(
            cfg.identity.ca,
            CaSource::InProcess {
                cert: "/y/ca.crt".into(),
                key: "/y/ca.key".into(),
                trusted_roots: Vec::new(),
            }
        );
    }

    #[test]
    fn identity_errors_name_the_field() {
        for (yaml, field) in [
            ("cgroupRoot: /a\nca: {}", "agent.ca"),
            (
                "cgroupRoot: /a\nca: {inProcess: {cert: a, key: b}, remote: {addr: 'h:1', serverName: h, rootCert: r, tokenFile: t}}",
                "agent.ca",
            ),
            (
                "cgroupRoot: /a\nca: {remote: {addr: nowhere, serverName: h, rootCert: r, tokenFile: t}}",
                "agent.ca.remote.addr",
            ),
            ("cgroupRoot: /a\ncertLifetime: 1s", "agent.certLifetime"),
            ("cgroupRoot: /a\ncertLifetime: soon", "agent.certLifetime"),
            (
                "cgroupRoot: /a\ntrustDomain: Bad/Domain",
                "agent.trustDomain",
            ),
        ] {
            let err = identity_error(yaml, Overrides::default());
            assert!(err.contains(field), "{yaml}: {err}");
        }
        let err = identity_error(
            "cgroupRoot: /a",
            Overrides {
                ca_cert: Some("/y/ca.crt".into()),
                ..Overrides::default()
            },
        );
        assert!(
            err.contains("agent.ca") && err.contains("--ca-key"),
            "{err}"
        );
    }

    #[test]
    fn metrics_default_to_15020_and_the_weft_prefix() {
        let cfg = Config::new(
            Path::new("n.yaml"),
            &section("cgroupRoot: /a"),
            Overrides::default(),
        )
        .unwrap();
        assert_eq!(cfg.admin.metrics_addr, "0.0.0.0:15020".parse().unwrap());
        assert_eq!(cfg.telemetry.metrics_prefix.as_str(), "weft");
        let cfg = Config::new(
            Path::new("n.yaml"),
            &section("cgroupRoot: /a\nmetricsPrefix: istio\nmetricsAddr: 127.0.0.1:9090"),
            Overrides {
                metrics_addr: Some("127.0.0.1:9091".parse().unwrap()),
                ..Overrides::default()
            },
        )
        .unwrap();
        assert_eq!(cfg.telemetry.metrics_prefix.as_str(), "istio");
        assert_eq!(cfg.admin.metrics_addr, "127.0.0.1:9091".parse().unwrap());
    }

    #[test]
    fn bad_metrics_settings_name_the_field() {
        for (yaml, field) in [
            (
                "cgroupRoot: /a\nmetricsPrefix: Weft-1",
                "agent.metricsPrefix",
            ),
            ("cgroupRoot: /a\nmetricsAddr: nowhere", "agent.metricsAddr"),
        ] {
            let err = Config::new(Path::new("n.yaml"), &section(yaml), Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(err.contains(field), "{yaml}: {err}");
        }
    }

    #[test]
    fn limits_default_and_bad_ones_name_the_field() {
        let cfg = Config::new(
            Path::new("n.yaml"),
            &section("cgroupRoot: /a\nlimits: {podConnections: 10, idleTimeout: 2s}"),
            Overrides::default(),
        )
        .unwrap();
        assert_eq!(cfg.proxy.limits.pod_connections, 10);
        assert_eq!(cfg.proxy.limits.idle_timeout, Duration::from_secs(2));
        assert_eq!(cfg.proxy.limits.hbone.max_header_list_size, 16 * 1024);
        for (yaml, field) in [
            ("limits: {podConnections: 0}", "agent.limits.podConnections"),
            (
                "limits: {podConnections: 20000}",
                "agent.limits.podConnections",
            ),
            ("limits: {idleTimeout: never}", "agent.limits.idleTimeout"),
            ("limits: {pingTimeout: 0s}", "agent.limits.pingTimeout"),
            (
                "limits: {maxHeaderListSize: 10}",
                "agent.limits.maxHeaderListSize",
            ),
            (
                "limits: {keepaliveRetries: 0}",
                "agent.limits.keepaliveRetries",
            ),
        ] {
            let err = with_cgroup_root(yaml, Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(err.contains(field), "{yaml}: {err}");
        }
    }

    #[test]
    fn worker_threads_default_to_the_cpus_the_agent_may_use_and_a_bad_count_names_the_field() {
        let parse = |yaml: &str, flag: Option<usize>| {
            with_cgroup_root(
                yaml,
                Overrides {
                    worker_threads: flag,
                    ..Overrides::default()
                },
            )
        };
        let cpus = std::thread::available_parallelism().unwrap().get();
        assert_eq!(parse("", None).unwrap().worker_threads, cpus);
        assert_eq!(parse("workerThreads: 3", None).unwrap().worker_threads, 3);
        assert_eq!(
            parse("workerThreads: 3", Some(1)).unwrap().worker_threads,
            1,
            "the flag wins"
        );
        for (yaml, flag) in [("workerThreads: 0", None), ("", Some(100_000))] {
            let err = parse(yaml, flag).unwrap_err().to_string();
            assert!(
                err.contains("agent.workerThreads"),
                "{yaml} {flag:?}: {err}"
            );
        }
    }

    #[test]
    fn drain_limit_defaults_long_and_a_bad_one_names_the_field() {
        let parse = |yaml: &str| with_cgroup_root(yaml, Overrides::default());
        let defaults = parse("").unwrap().drain;
        assert_eq!(defaults.limit, Duration::from_secs(3600));
        assert_eq!(defaults.limit_without_successor, Duration::from_secs(30));
        let set = parse("drain: {limit: 90s, limitWithoutSuccessor: 5s}")
            .unwrap()
            .drain;
        assert_eq!(set.limit, Duration::from_secs(90));
        assert_eq!(set.limit_without_successor, Duration::from_secs(5));
        for (yaml, field) in [
            ("drain: {limit: soon}", "agent.drain.limit"),
            ("drain: {limit: 0s}", "agent.drain.limit"),
            (
                "drain: {limitWithoutSuccessor: 0s}",
                "agent.drain.limitWithoutSuccessor",
            ),
        ] {
            let err = parse(yaml).unwrap_err().to_string();
            assert!(err.contains(field), "{yaml}: {err}");
        }
    }

    #[test]
    fn equal_ports_are_rejected() {
        let err = Config::new(
            Path::new("n.yaml"),
            &section("cgroupRoot: /a\nports: {outbound: 15006}"),
            Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("agent.ports"), "{err}");
    }

    #[test]
    fn the_proxy_mark_is_neither_zero_nor_the_reply_mark() {
        for mark in [0, crate::netns::reply_route::REPLY_MARK] {
            let err = with_cgroup_root(&format!("proxyMark: {mark}"), Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(err.contains("agent.proxyMark"), "{mark}: {err}");
        }
    }
}
