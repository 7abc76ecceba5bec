//! Command line: `weft agent`, `weft waypoint`, `weft gateway`, `weft status`, `weft ca`,
//! `weft cni`.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use clap::{Args, Parser, Subcommand};

use crate::{
    admin,
    app::waypoint::{Error, Face, RELOAD_INTERVAL, Settings},
    http,
    identity::{self, CaSource, SpiffeId},
    source,
    state::WorkloadRef,
    telemetry::{self, LogFormat},
    waypoint,
};

#[derive(Debug, Parser)]
#[command(name = "weft", version, about = "weft: sidecarless service mesh")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node agent: eBPF data path, pod enrollment and the node proxy.
    Agent(AgentArgs),
    /// Run a waypoint: the L7 proxy (HTTP routes, retries, L7 policy) of the services
    /// bound to it with `weft.dev/use-waypoint`.
    Waypoint(Box<WaypointArgs>),
    /// Run an ingress gateway: the listeners of a Gateway of class `weft`, its routes'
    /// requests sent into the mesh over HBONE as its own identity.
    Gateway(Box<GatewayArgs>),
    /// Show what the agent on this node is doing (enrolled pods, listeners, eBPF maps).
    Status(StatusArgs),
    /// Run the certificate authority (`--config ca.yaml`), or create its root (`init`).
    Ca(CaArgs),
    /// Remove every eBPF pin and attachment weft left on this node (leaving the mesh).
    Uninstall(UninstallArgs),
    /// The chained CNI plugin (what the runtime runs as `weft-cni`), or its installer.
    Cni(CniArgs),
}

#[derive(Debug, Args)]
pub struct CniArgs {
    /// Without a subcommand: act as the CNI plugin (CNI_* env, config on stdin).
    #[command(subcommand)]
    pub command: Option<CniCommand>,
}

#[derive(Debug, Subcommand)]
pub enum CniCommand {
    /// Copy this binary to the host's CNI bin dir as `weft-cni` and append the plugin to
    /// the primary CNI's conflist (the DaemonSet's installer container runs this).
    Install(CniInstallArgs),
    /// Remove the plugin from every CNI config and `weft-cni` from the bin dir.
    Uninstall(CniDirs),
}

#[derive(Debug, Args)]
pub struct CniDirs {
    /// The host's CNI bin dir, as mounted here.
    #[arg(long, env = "WEFT_CNI_BIN_DIR", default_value = "/host/opt/cni/bin")]
    pub bin_dir: PathBuf,
    /// The host's CNI conf dir, as mounted here.
    #[arg(long, env = "WEFT_CNI_CONF_DIR", default_value = "/host/etc/cni/net.d")]
    pub conf_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct CniInstallArgs {
    #[command(flatten)]
    pub dirs: CniDirs,
    /// The agent's socket as the runtime on the host sees it.
    #[arg(long, env = "WEFT_CNI_SOCKET", default_value = crate::cni::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// The mesh-namespaces file on the host (default: next to the socket).
    #[arg(long, env = "WEFT_CNI_MESH_NAMESPACES_FILE")]
    pub mesh_namespaces_file: Option<PathBuf>,
    /// Keep running: re-insert the plugin whenever the primary CNI rewrites its config,
    /// and wait for a primary config to appear.
    #[arg(long)]
    pub watch: bool,
    /// How often `--watch` checks the config, humantime.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub interval: Duration,
    #[arg(long, env = "WEFT_LOG_FORMAT", value_enum, default_value_t)]
    pub log_format: LogFormat,
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Local config file (workloads, services, settings); reloaded on change. With
    /// `--source kubernetes`: the agent's own settings only (`agent:`, `mesh:`).
    #[arg(long, env = "WEFT_CONFIG")]
    pub config: PathBuf,
    /// Where workloads, services and policies come from.
    #[arg(long, env = "WEFT_SOURCE", value_enum, default_value_t)]
    pub source: source::Kind,
    /// This node's name in Kubernetes (`spec.nodeName` of its pods); required with
    /// `--source kubernetes` (the Downward API's `spec.nodeName`).
    #[arg(long, env = "WEFT_NODE_NAME", required_if_eq("source", "kubernetes"))]
    pub node_name: Option<String>,
    /// bpffs directory for pinned maps and links (overrides agent.pinRoot).
    #[arg(long, env = "WEFT_PIN_ROOT")]
    pub pin_root: Option<PathBuf>,
    /// cgroup v2 directory holding the pods (overrides agent.cgroupRoot).
    #[arg(long, env = "WEFT_CGROUP_ROOT")]
    pub cgroup_root: Option<PathBuf>,
    /// Admin API address (overrides agent.adminAddr).
    #[arg(long, env = "WEFT_ADMIN_ADDR")]
    pub admin_addr: Option<SocketAddr>,
    /// Readiness address (overrides agent.readinessAddr).
    #[arg(long, env = "WEFT_READINESS_ADDR")]
    pub readiness_addr: Option<SocketAddr>,
    /// Metrics address, `GET /metrics` (overrides agent.metricsAddr).
    #[arg(long, env = "WEFT_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Run the CA in-process from this root certificate (with --ca-key; overrides agent.ca).
    #[arg(long, env = "WEFT_CA_CERT", requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,
    /// The in-process CA's PKCS#8 key (with --ca-cert).
    #[arg(long, env = "WEFT_CA_KEY", requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
    /// Threads that run the proxy (overrides agent.workerThreads; default: the CPUs the
    /// agent may use).
    #[arg(long, env = "WEFT_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
    /// The resolv.conf whose nameservers resolve the hosts of external services (default
    /// /etc/resolv.conf); read at the first lookup.
    #[arg(long, env = "WEFT_RESOLV_CONF")]
    pub resolv_conf: Option<PathBuf>,
    /// A nameserver (IP:PORT) to resolve the hosts of external services with instead of
    /// the resolv.conf's; repeat, or separate with commas.
    #[arg(long = "dns-server", env = "WEFT_DNS_SERVERS", value_delimiter = ',')]
    pub dns_servers: Vec<SocketAddr>,
    #[arg(long, env = "WEFT_LOG_FORMAT", value_enum, default_value_t)]
    pub log_format: LogFormat,
}

#[derive(Debug, Args)]
pub struct WaypointArgs {
    /// The waypoint's name: services labelled `weft.dev/use-waypoint: <name>` in its
    /// namespace are the ones it serves.
    #[arg(long, env = "WEFT_WAYPOINT_NAME")]
    pub name: String,
    /// HBONE listener.
    #[arg(long, env = "WEFT_LISTEN_ADDR", default_value = "0.0.0.0:15008")]
    pub listen_addr: SocketAddr,
    #[command(flatten)]
    pub l7: L7Args,
}

impl WaypointArgs {
    /// The waypoint's validated settings, naming the flag that is wrong.
    pub fn settings(&self) -> Result<Settings, Error> {
        let mut settings = self.l7.settings(&self.name, Face::Waypoint)?;
        settings.waypoint.listen_addr = self.listen_addr;
        Ok(settings)
    }
}

#[derive(Debug, Args)]
pub struct GatewayArgs {
    /// The name of the Gateway object (of class `weft`, in --namespace) it serves.
    #[arg(long, env = "WEFT_GATEWAY_NAME")]
    pub name: String,
    /// The address every listener binds, at the listener's port.
    #[arg(long, env = "WEFT_LISTEN_IP", default_value = "0.0.0.0")]
    pub listen_ip: IpAddr,
    /// With `--source kubernetes`: the only Secrets (in --namespace) it reads, the
    /// certificates its listeners name; repeat, or separate with commas.
    #[arg(long = "tls-secret", env = "WEFT_TLS_SECRETS", value_delimiter = ',')]
    pub tls_secrets: Vec<String>,
    #[command(flatten)]
    pub l7: L7Args,
}

impl GatewayArgs {
    /// The gateway's validated settings, naming the flag that is wrong.
    pub fn settings(&self) -> Result<Settings, Error> {
        self.l7.settings(
            &self.name,
            Face::Gateway {
                listen_ip: self.listen_ip,
                tls_secrets: self.tls_secrets.clone(),
            },
        )
    }
}

/// What a waypoint and a gateway are both configured with.
#[derive(Debug, Args)]
pub struct L7Args {
    /// Local state file (services, workloads, policies, waypoints, routes; the agent's
    /// format), reloaded on change.
    #[arg(long, env = "WEFT_CONFIG", required_unless_present = "source")]
    pub config: Option<PathBuf>,
    /// Where services, workloads, policies and routes come from.
    #[arg(long, env = "WEFT_SOURCE", value_enum)]
    pub source: Option<source::Kind>,
    /// The waypoint's namespace.
    #[arg(long, env = "WEFT_NAMESPACE", default_value = "default")]
    pub namespace: String,
    /// The service account it runs as (its identity); default: the name.
    #[arg(long, env = "WEFT_SERVICE_ACCOUNT")]
    pub service_account: Option<String>,
    /// The node the waypoint pod runs on (the Downward API's `spec.nodeName`); with
    /// `--source kubernetes` only.
    #[arg(long, env = "WEFT_NODE_NAME")]
    pub node_name: Option<String>,
    /// Admin API (`/config_dump`, `/quitquitquit`); keep it on localhost.
    #[arg(long, env = "WEFT_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,
    /// `GET /metrics`.
    #[arg(long, env = "WEFT_METRICS_ADDR", default_value = "0.0.0.0:15020")]
    pub metrics_addr: SocketAddr,
    /// `GET /healthz/ready`.
    #[arg(long, env = "WEFT_READINESS_ADDR", default_value = "0.0.0.0:15021")]
    pub readiness_addr: SocketAddr,
    #[arg(long, env = "WEFT_TRUST_DOMAIN", default_value = crate::identity::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// `weft ca` at `host:port` (with --ca-token-file and --ca-root-cert).
    #[arg(long, env = "WEFT_CA_ADDR", requires_all = ["ca_token_file", "ca_root_cert"], conflicts_with = "ca_cert")]
    pub ca_addr: Option<String>,
    /// Bearer token for the CA, re-read on every request.
    #[arg(long, env = "WEFT_CA_TOKEN_FILE", requires = "ca_addr")]
    pub ca_token_file: Option<PathBuf>,
    /// The CA root (PEM) the CA server's certificate chains to.
    #[arg(long, env = "WEFT_CA_ROOT_CERT", requires = "ca_addr")]
    pub ca_root_cert: Option<PathBuf>,
    /// Name in the CA server's certificate; default: the host of --ca-addr.
    #[arg(long, env = "WEFT_CA_SERVER_NAME", requires = "ca_addr")]
    pub ca_server_name: Option<String>,
    /// Run the CA in-process from this root certificate (with --ca-key).
    #[arg(long, env = "WEFT_CA_CERT", requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,
    /// The in-process CA's PKCS#8 key (with --ca-cert).
    #[arg(long, env = "WEFT_CA_KEY", requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
    /// OTLP/HTTP collector (`http://host:port`) for request spans; no export without it.
    #[arg(long, env = "WEFT_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// First word of every metric name (`weft`, or `istio` for Istio's dashboards).
    #[arg(long, env = "WEFT_METRICS_PREFIX", default_value = "weft", value_parser = parse_prefix)]
    pub metrics_prefix: crate::telemetry::Prefix,
    /// What `%2F`, `%5C` and `\` in a request path mean: `reject` (400), `keep` (not
    /// separators) or `decode` (separators).
    #[arg(long, env = "WEFT_PATH_ESCAPED_SLASHES", value_enum, default_value_t)]
    pub path_escaped_slashes: crate::waypoint::path::EscapedSlashes,
    /// After the signal, how long the waypoint still accepts (not ready) before it drains:
    /// the time every node takes to see its endpoint go.
    #[arg(long, env = "WEFT_LISTEN_GRACE", default_value = "0s", value_parser = humantime::parse_duration)]
    pub listen_grace: Duration,
    /// On shutdown, how long open requests are served; what is still open then is cut.
    #[arg(long, env = "WEFT_DRAIN_LIMIT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub drain_limit: Duration,
    /// PEM certificates to trust, besides the system's, when fetching the key sets (JWKS)
    /// of end-user token issuers over HTTPS.
    #[arg(long, env = "WEFT_JWKS_CA_FILE")]
    pub jwks_ca_file: Option<PathBuf>,
    #[arg(long, env = "WEFT_LOG_FORMAT", value_enum, default_value_t)]
    pub log_format: LogFormat,
}

impl L7Args {
    /// The settings of the waypoint or gateway `name`, naming the flag that is wrong.
    fn settings(&self, name: &str, face: Face) -> Result<Settings, Error> {
        let args = self;
        let source = args.source.unwrap_or_default();
        if source == source::Kind::File && args.config.is_none() {
            return Err(Error::NoConfig);
        }
        let service_account = args.service_account.as_deref().unwrap_or(name);
        let identity = SpiffeId::new(&args.trust_domain, &args.namespace, service_account)
            .map_err(|e| Error::Invalid {
                field: "--service-account",
                reason: e.to_string(),
            })?;
        let ca = match (&args.ca_cert, &args.ca_key, &args.ca_addr) {
            (Some(cert), Some(key), _) => CaSource::InProcess {
                cert: cert.clone(),
                key: key.clone(),
                trusted_roots: Vec::new(),
            },
            (_, _, Some(addr)) => CaSource::Remote {
                addr: addr.clone(),
                server_name: args.ca_server_name.clone().unwrap_or_else(|| {
                    addr.rsplit_once(':')
                        .map_or(addr.as_str(), |(host, _)| host)
                        .to_owned()
                }),
                root_cert: args.ca_root_cert.clone().ok_or(Error::NoCa)?,
                token_file: args.ca_token_file.clone().ok_or(Error::NoCa)?,
            },
            _ => return Err(Error::NoCa),
        };
        admin::require_loopback(args.admin_addr).map_err(|reason| Error::Invalid {
            field: "--admin-addr",
            reason,
        })?;
        let mut waypoint = waypoint::Config::new(WorkloadRef::new(&args.namespace, name), identity);
        waypoint.path_escaped_slashes = args.path_escaped_slashes;
        waypoint.listen_grace = args.listen_grace;
        waypoint.drain_limit = args.drain_limit;
        waypoint.jwks_ca_file.clone_from(&args.jwks_ca_file);
        Ok(Settings {
            waypoint,
            face,
            identity: identity::Config {
                trust_domain: args.trust_domain.clone(),
                cert_lifetime: identity::DEFAULT_CERT_LIFETIME,
                ca,
            },
            admin: admin::Config {
                admin_addr: args.admin_addr,
                readiness_addr: args.readiness_addr,
                metrics_addr: args.metrics_addr,
                http: http::Limits::default(),
            },
            telemetry: telemetry::Config {
                metrics_prefix: args.metrics_prefix.clone(),
            },
            source,
            config_path: args.config.clone(),
            node_name: args.node_name.clone().unwrap_or_default(),
            reload_interval: RELOAD_INTERVAL,
            otlp_endpoint: args.otlp_endpoint.clone(),
        })
    }
}

fn parse_prefix(text: &str) -> Result<crate::telemetry::Prefix, String> {
    crate::telemetry::Prefix::new(text).map_err(|e| e.to_string())
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct CaArgs {
    #[command(subcommand)]
    pub command: Option<CaCommand>,
    /// CA config file (listen address, root, nodes and their tokens).
    #[arg(long, env = "WEFT_CA_CONFIG", required = true)]
    pub config: Option<PathBuf>,
    #[arg(long, env = "WEFT_LOG_FORMAT", value_enum, default_value_t)]
    pub log_format: LogFormat,
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create a self-signed ECDSA P-256 root: DIR/ca.crt and DIR/ca.key (mode 0600).
    Init(CaInitArgs),
}

#[derive(Debug, Args)]
pub struct CaInitArgs {
    /// Directory to write ca.crt and ca.key into; existing files are never overwritten.
    #[arg(long)]
    pub out: PathBuf,
    /// SPIFFE trust domain of the root.
    #[arg(long, default_value = crate::identity::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The agent's admin API.
    #[arg(long, env = "WEFT_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,
    /// Print the raw JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct UninstallArgs {
    /// bpffs directory holding weft's pinned maps and links.
    #[arg(long, env = "WEFT_PIN_ROOT", default_value = "/sys/fs/bpf/weft")]
    pub pin_root: PathBuf,
    /// First wait until no agent answers on this address (its readiness port).
    #[arg(long)]
    pub wait_for_agent: Option<SocketAddr>,
    /// How long to wait for the agent to go away.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub timeout: std::time::Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(args: &[&str]) -> Result<AgentArgs, clap::Error> {
        let argv = ["weft", "agent", "--config", "/etc/weft/agent.yaml"];
        let cli = Cli::try_parse_from(argv.iter().chain(args))?;
        match cli.command {
            Command::Agent(args) => Ok(args),
            _ => unreachable!("parsed the agent subcommand"),
        }
    }

    #[test]
    fn the_file_source_is_the_default() {
        let args = agent(&[]).unwrap();
        assert_eq!(args.source, source::Kind::File);
        assert_eq!(args.node_name, None);
    }

    fn waypoint(args: &[&str]) -> Result<WaypointArgs, clap::Error> {
        let argv = ["weft", "waypoint", "--name", "wp"];
        let cli = Cli::try_parse_from(argv.iter().chain(args))?;
        match cli.command {
            Command::Waypoint(args) => Ok(*args),
            _ => unreachable!("parsed the waypoint subcommand"),
        }
    }

    #[test]
    fn waypoint_flags_default_to_the_fixed_ports() {
        let args = waypoint(&["--config", "/etc/weft/state.yaml"]).unwrap();
        assert_eq!(
            args.l7.path_escaped_slashes,
            crate::waypoint::path::EscapedSlashes::Reject
        );
        assert_eq!(args.listen_addr, "0.0.0.0:15008".parse().unwrap());
        assert_eq!(args.l7.admin_addr, "127.0.0.1:15000".parse().unwrap());
        assert_eq!(args.l7.metrics_addr, "0.0.0.0:15020".parse().unwrap());
        assert_eq!(args.l7.readiness_addr, "0.0.0.0:15021".parse().unwrap());
        assert_eq!(args.l7.trust_domain, "cluster.local");
        assert_eq!(args.l7.metrics_prefix.as_str(), "weft");
        assert_eq!(args.l7.drain_limit, crate::waypoint::DEFAULT_DRAIN_LIMIT);
        let longer = waypoint(&["--config", "x", "--drain-limit", "2m"]).unwrap();
        assert_eq!(longer.l7.drain_limit, Duration::from_secs(120));
        assert!(waypoint(&["--config", "x", "--drain-limit", "soon"]).is_err());
        assert_eq!(args.l7.listen_grace, Duration::ZERO);
        let graced = waypoint(&["--config", "x", "--listen-grace", "5s"]).unwrap();
        assert_eq!(graced.l7.listen_grace, Duration::from_secs(5));
        assert!(waypoint(&[]).is_err(), "a state source is required");
        assert!(waypoint(&["--source", "kubernetes"]).is_ok());
        assert!(waypoint(&["--config", "x", "--ca-addr", "ca:15012"]).is_err());
        assert!(waypoint(&["--config", "x", "--metrics-prefix", "Bad"]).is_err());
        let decode = waypoint(&["--config", "x", "--path-escaped-slashes", "decode"]).unwrap();
        assert_eq!(
            decode.l7.path_escaped_slashes,
            crate::waypoint::path::EscapedSlashes::Decode
        );
        let bad = waypoint(&["--config", "x", "--path-escaped-slashes", "maybe"]).unwrap_err();
        assert!(bad.to_string().contains("--path-escaped-slashes"), "{bad}");
    }

    #[test]
    fn gateway_flags_name_its_listen_address_and_its_secrets() {
        let parse = |args: &[&str]| {
            let argv = ["weft", "gateway", "--name", "public", "--namespace", "edge"];
            match Cli::try_parse_from(argv.iter().chain(args))?.command {
                Command::Gateway(args) => Ok::<_, clap::Error>(*args),
                _ => unreachable!("parsed the gateway subcommand"),
            }
        };
        let args = parse(&["--source", "kubernetes"]).unwrap();
        assert_eq!(args.listen_ip, IpAddr::from([0, 0, 0, 0]));
        assert!(args.tls_secrets.is_empty());
        let args = parse(&[
            "--source",
            "kubernetes",
            "--listen-ip",
            "::",
            "--tls-secret",
            "shop-cert,api-cert",
            "--tls-secret",
            "old-cert",
        ])
        .unwrap();
        assert_eq!(args.tls_secrets, ["shop-cert", "api-cert", "old-cert"]);
        assert!(parse(&["--source", "kubernetes", "--listen-ip", "any"]).is_err());
        let settings = parse(&["--config", "x", "--ca-cert", "c", "--ca-key", "k"])
            .unwrap()
            .settings()
            .unwrap();
        assert_eq!(
            settings.waypoint.identity.to_string(),
            "spiffe://cluster.local/ns/edge/sa/public"
        );
        assert!(matches!(settings.face, Face::Gateway { .. }));
    }

    #[test]
    fn dns_flags_name_a_resolv_conf_and_nameservers() {
        let args = agent(&[]).unwrap();
        assert_eq!(args.resolv_conf, None);
        assert!(args.dns_servers.is_empty());
        let args = agent(&[
            "--resolv-conf",
            "/run/resolv.conf",
            "--dns-server",
            "127.0.0.1:5353,[::1]:53",
            "--dns-server",
            "10.0.0.10:53",
        ])
        .unwrap();
        assert_eq!(args.resolv_conf, Some(PathBuf::from("/run/resolv.conf")));
        assert_eq!(args.dns_servers.len(), 3);
        assert!(
            agent(&["--dns-server", "10.0.0.10"]).is_err(),
            "a port is required"
        );
    }

    #[test]
    fn the_kubernetes_source_needs_the_node_name() {
        let err = agent(&["--source", "kubernetes"]).unwrap_err();
        assert!(err.to_string().contains("--node-name"), "{err}");
        let args = agent(&["--source", "kubernetes", "--node-name", "node-a"]).unwrap();
        assert_eq!(args.source, source::Kind::Kubernetes);
        assert_eq!(args.node_name.as_deref(), Some("node-a"));
        assert!(agent(&["--source", "etcd"]).is_err());
    }
}
