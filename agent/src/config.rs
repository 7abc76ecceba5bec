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

use serde::{Deserialize, Serialize};

use crate::{admin, ebpf, proxy};

/// A configuration error. `field` is the path of the offending field in the file
/// (`workloads[1].ips[0]`), so the message tells the operator exactly what to fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("config file {path}: {field}: {reason}")]
    Invalid {
        path: PathBuf,
        field: String,
        reason: String,
    },
}

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
}

/// Flag and environment overrides of the file's `agent:` section.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub pin_root: Option<PathBuf>,
    pub cgroup_root: Option<PathBuf>,
    pub admin_addr: Option<SocketAddr>,
    pub readiness_addr: Option<SocketAddr>,
}

/// The `agent:` section as written in the file. Compared at reload: a change needs a restart.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AgentSection {
    pub node: Option<String>,
    pub pin_root: Option<PathBuf>,
    pub cgroup_root: Option<PathBuf>,
    pub admin_addr: Option<String>,
    pub readiness_addr: Option<String>,
    pub proxy_mark: Option<u32>,
    #[serde(default)]
    pub ports: PortsSection,
}

/// The `agent.ports:` section.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PortsSection {
    pub outbound: Option<u16>,
    pub inbound: Option<u16>,
    pub hbone: Option<u16>,
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
        let readiness_addr = match overrides.readiness_addr {
            Some(a) => a,
            None => addr(
                "agent.readinessAddr",
                agent.readiness_addr.as_ref(),
                READINESS_ADDR,
            )?,
        };
        Ok(Self {
            node: agent.node.clone().unwrap_or_else(hostname),
            config_path: config_path.to_owned(),
            reload_interval: RELOAD_INTERVAL,
            ebpf: ebpf::Config {
                pin_root: overrides
                    .pin_root
                    .or_else(|| agent.pin_root.clone())
                    .unwrap_or_else(|| PathBuf::from(PIN_ROOT)),
                cgroup_root,
            },
            admin: admin::Config {
                admin_addr,
                readiness_addr,
            },
            proxy: proxy::Config { ports, mark },
        })
    }
}

/// This machine's host name, the default node name.
pub fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}

/// Serializes a `Duration` as milliseconds in `/config_dump`.
mod humantime_ms {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u128(d.as_millis())
    }
}

const PIN_ROOT: &str = "/sys/fs/bpf/weft";
const ADMIN_ADDR: &str = "127.0.0.1:15000";
const READINESS_ADDR: &str = "0.0.0.0:15021";
const OUTBOUND_PORT: u16 = ebpf_common::config::OUTBOUND_PORT;
const INBOUND_PORT: u16 = ebpf_common::config::INBOUND_PORT;
const HBONE_PORT: u16 = ebpf_common::config::HBONE_PORT;
/// "we" in ASCII: distinctive in `ss -e` and packet marks, unlikely to collide with a CNI's.
const PROXY_MARK: u32 = 0x7765;
const RELOAD_INTERVAL: Duration = Duration::from_millis(500);

#[cfg(test)]
mod tests {
    use super::*;

    fn section(yaml: &str) -> AgentSection {
        serde_yaml::from_str(yaml).unwrap()
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
        assert_eq!(cfg.proxy.ports.outbound, 15_001);
        assert_eq!(cfg.admin.admin_addr, "127.0.0.1:15000".parse().unwrap());
    }

    #[test]
    fn missing_cgroup_root_names_the_field() {
        let err = Config::new(Path::new("n.yaml"), &section("{}"), Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("agent.cgroupRoot"), "{err}");
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
}
