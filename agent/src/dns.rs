//! The agent's DNS resolver, for the hosts of `DNS` external services (`source::resolve`
//! keeps their answers in the snapshot): one lookup asks A and AAAA at once and gives the
//! addresses with the time they stay valid (the smallest TTL of the answer).
//!
//! Built on hickory-resolver (tokio, UDP with TCP on truncation). The nameservers, `options
//! timeout:` and `attempts:` come from a resolv.conf at a configurable path, read at the
//! first lookup (not at start: an agent whose snapshot names no DNS host never needs it),
//! and again after a failed read; or from an explicit list of `ip:port` (a resolv.conf
//! cannot name a port). Search domains and `/etc/hosts` never apply: hosts are asked as
//! absolute names, of the nameservers only. hickory's cache is off: the caller re-asks
//! when the TTL ends, and must then see the server's new answer.
//!
//! Limits: a name is checked (RFC 1123, `name`) before any query; a lookup ends after
//! `Config::timeout`; at most `MAX_ADDRESSES` addresses are kept per host, the lowest,
//! so that a server rotating a large set does not change the answer on every lookup.

mod name;

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use hickory_resolver::{
    TokioResolver,
    config::{NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts},
    lookup::Lookup,
    net::{DnsError, NetError, runtime::TokioRuntimeProvider},
    proto::{
        op::ResponseCode,
        rr::{Name, RData, RecordType},
    },
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
};
use serde::Serialize;
use tokio::sync::OnceCell;

/// Where the resolver finds its nameservers, and how long a lookup may take.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Config {
    /// The resolv.conf whose `nameserver` lines (and `options timeout:`/`attempts:`) are
    /// used, unless `nameservers` is set.
    pub resolv_conf: PathBuf,
    /// Nameservers to ask instead of the resolv.conf's, with their ports.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<SocketAddr>,
    /// The longest one lookup (A and AAAA, every server and attempt) may take.
    #[serde(with = "crate::settings::humantime_ms")]
    pub timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{host:?} is not a valid host name: {reason}")]
    InvalidName { host: String, reason: &'static str },
    #[error(
        "cannot read the nameservers from {}: {source} (set --resolv-conf or --dns-server)",
        path.display()
    )]
    ResolvConf {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot use the nameservers of {}: {reason}", path.display())]
    BadResolvConf { path: PathBuf, reason: String },
    #[error("{host} does not exist (NXDOMAIN)")]
    NoSuchHost { host: String },
    #[error("{host} has no A or AAAA record")]
    NoAddresses { host: String },
    #[error("no answer for {host} within {after:?}; is a nameserver reachable?")]
    Timeout { host: String, after: Duration },
    #[error("lookup of {host} failed: {source}")]
    Lookup {
        host: String,
        #[source]
        source: Box<NetError>,
    },
    #[error("BUG: a DNS lookup ended without an outcome: {0}")]
    Bug(String),
}

impl Error {
    /// A stable, snake_case name of the failure, for logs and metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::InvalidName { .. } => "invalid_name",
            Error::ResolvConf { .. } | Error::BadResolvConf { .. } => "resolv_conf",
            Error::NoSuchHost { .. } => "no_such_host",
            Error::NoAddresses { .. } => "no_addresses",
            Error::Timeout { .. } => "timeout",
            Error::Lookup { .. } => "lookup",
            Error::Bug(_) => "bug",
        }
    }

    /// Whether the failure is the resolver's configuration, the same for every host.
    pub fn is_config(&self) -> bool {
        matches!(self, Error::ResolvConf { .. } | Error::BadResolvConf { .. })
    }
}

/// What a host resolved to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// Its A and AAAA addresses, sorted, without duplicates, at most `MAX_ADDRESSES`.
    pub addresses: Vec<IpAddr>,
    /// How long the answer is valid: the smallest TTL among its records.
    pub ttl: Duration,
}

/// The resolver; clones share the nameserver connections and the metrics.
#[derive(Clone)]
pub struct Resolver {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    // Built at the first lookup that needs it; a failed build is tried again next time.
    resolver: OnceCell<TokioResolver>,
    metrics: Metrics,
}

/// `<prefix>_dns_lookups_total{result="ok|error|timeout"}`, and the hosts the agent keeps
/// resolving (`source::resolve` sets those).
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    lookups: Family<ResultLabels, Counter>,
    hosts: Gauge,
    hosts_over_limit: Gauge,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

impl Metrics {
    pub fn new(registry: &mut prometheus_client::registry::Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "dns_lookups",
            "DNS lookups (A and AAAA) of external services' hosts, by result",
            metrics.lookups.clone(),
        );
        registry.register(
            "dns_hosts",
            "Hosts of external services the agent keeps resolving",
            metrics.hosts.clone(),
        );
        registry.register(
            "dns_hosts_over_limit",
            "Hosts of external services not resolved: past the limit of hosts per agent",
            metrics.hosts_over_limit.clone(),
        );
        metrics
    }

    /// Records how many hosts are resolved, and how many are left out by the limit.
    pub fn set_hosts(&self, resolved: usize, over_limit: usize) {
        self.hosts.set(i64::try_from(resolved).unwrap_or(i64::MAX));
        self.hosts_over_limit
            .set(i64::try_from(over_limit).unwrap_or(i64::MAX));
    }

    /// The hosts resolved and those left out, as last set.
    pub fn hosts(&self) -> (i64, i64) {
        (self.hosts.get(), self.hosts_over_limit.get())
    }

    /// Lookups counted with `result` (`ok`, `error`, `timeout`).
    pub fn lookups(&self, result: &'static str) -> u64 {
        self.lookups.get_or_create(&ResultLabels { result }).get()
    }

    fn count(&self, outcome: &Result<Answer, Error>) {
        let result = match outcome {
            Ok(_) => "ok",
            Err(Error::Timeout { .. }) => "timeout",
            Err(_) => "error",
        };
        self.lookups.get_or_create(&ResultLabels { result }).inc();
    }
}

impl Resolver {
    /// A resolver that reads its configuration at the first lookup; this never fails.
    pub fn new(config: Config, metrics: Metrics) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                resolver: OnceCell::new(),
                metrics,
            }),
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// The A and AAAA addresses of `host`. Either family may be empty; a failure of either
    /// fails the lookup, so that a caller keeping the last good answer never trades it for
    /// half of one.
    pub async fn lookup(&self, host: &str) -> Result<Answer, Error> {
        let outcome = self.lookup_uncounted(host).await;
        self.inner.metrics.count(&outcome);
        outcome
    }

    async fn lookup_uncounted(&self, host: &str) -> Result<Answer, Error> {
        if let Some(reason) = name::invalid(host) {
            return Err(Error::InvalidName {
                host: host.to_owned(),
                reason,
            });
        }
        // Absolute: no search domain is ever tried.
        let absolute = if host.ends_with('.') {
            host.to_owned()
        } else {
            format!("{host}.")
        };
        let name = Name::from_ascii(&absolute).map_err(|_| Error::InvalidName {
            host: host.to_owned(),
            reason: "not a DNS name",
        })?;
        let resolver = self
            .inner
            .resolver
            .get_or_try_init(|| build(&self.inner.config))
            .await?;
        let after = self.inner.config.timeout;
        let both = async {
            tokio::join!(
                resolver.lookup(name.clone(), RecordType::A),
                resolver.lookup(name.clone(), RecordType::AAAA),
            )
        };
        let (v4, v6) = tokio::time::timeout(after, both)
            .await
            .map_err(|_| Error::Timeout {
                host: host.to_owned(),
                after,
            })?;
        let mut answer = Answer {
            addresses: Vec::new(),
            ttl: Duration::MAX,
        };
        for family in [v4, v6] {
            match family {
                Ok(lookup) => add(&mut answer, &lookup),
                Err(e) => family_error(host, after, e)?,
            }
        }
        if answer.addresses.is_empty() {
            return Err(Error::NoAddresses {
                host: host.to_owned(),
            });
        }
        answer.addresses.sort_unstable();
        answer.addresses.dedup();
        answer.addresses.truncate(MAX_ADDRESSES);
        Ok(answer)
    }
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            resolv_conf: PathBuf::from(DEFAULT_RESOLV_CONF),
            nameservers: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// Adds the A/AAAA records of one answer (a CNAME chain's other records are skipped) and
/// lowers the TTL to the smallest record's, CNAMEs included: the chain may change too.
fn add(answer: &mut Answer, lookup: &Lookup) {
    for record in lookup.answers() {
        answer.ttl = answer.ttl.min(Duration::from_secs(u64::from(record.ttl)));
        match &record.data {
            RData::A(a) => answer.addresses.push(IpAddr::V4(a.0)),
            RData::AAAA(aaaa) => answer.addresses.push(IpAddr::V6(aaaa.0)),
            _ => {}
        }
    }
}

/// A family that failed: no record of that type is no failure (a host with only IPv4);
/// anything else fails the lookup.
fn family_error(host: &str, after: Duration, e: NetError) -> Result<(), Error> {
    match &e {
        NetError::Dns(DnsError::NoRecordsFound(none)) => match none.response_code {
            ResponseCode::NXDomain => Err(Error::NoSuchHost {
                host: host.to_owned(),
            }),
            _ => Ok(()),
        },
        NetError::Timeout => Err(Error::Timeout {
            host: host.to_owned(),
            after,
        }),
        _ => Err(Error::Lookup {
            host: host.to_owned(),
            source: Box::new(e),
        }),
    }
}

async fn build(config: &Config) -> Result<TokioResolver, Error> {
    let (servers, mut options) = if config.nameservers.is_empty() {
        from_resolv_conf(config).await?
    } else {
        let servers = config
            .nameservers
            .iter()
            .map(|addr| {
                let mut server = NameServerConfig::udp_and_tcp(addr.ip());
                for connection in &mut server.connections {
                    connection.port = addr.port();
                }
                server
            })
            .collect();
        (servers, ResolverOpts::default())
    };
    options.cache_size = 0;
    options.use_hosts_file = ResolveHosts::Never;
    // Never wait on one server longer than the whole lookup may take.
    options.timeout = options.timeout.min(config.timeout);
    let mut builder = TokioResolver::builder_with_config(
        ResolverConfig::from_name_servers(servers),
        TokioRuntimeProvider::default(),
    );
    *builder.options_mut() = options;
    builder.build().map_err(|e| Error::BadResolvConf {
        path: config.resolv_conf.clone(),
        reason: e.to_string(),
    })
}

async fn from_resolv_conf(config: &Config) -> Result<(Vec<NameServerConfig>, ResolverOpts), Error> {
    let path = &config.resolv_conf;
    let text = tokio::fs::read(path)
        .await
        .map_err(|source| Error::ResolvConf {
            path: path.clone(),
            source,
        })?;
    let (parsed, options) =
        hickory_resolver::system_conf::parse_resolv_conf(text).map_err(|e| {
            Error::BadResolvConf {
                path: path.clone(),
                reason: e.to_string(),
            }
        })?;
    Ok((parsed.into_parts().2, options))
}

/// The resolv.conf read unless another is configured.
pub const DEFAULT_RESOLV_CONF: &str = "/etc/resolv.conf";
/// How long one lookup may take unless configured.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Addresses kept per host (the lowest, sorted).
pub const MAX_ADDRESSES: usize = 32;

#[cfg(test)]
mod tests;
