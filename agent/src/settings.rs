//! What every reader of a config file shares, below every module that has settings: the
//! error that names the file and the offending field (`settings::Error`), the raw sections
//! of the agent's `agent:` block as written (`config` validates them into per-module
//! configs; `source::file` reads the same file for the mesh's state), how a `Duration` is
//! shown in `/config_dump`, and the default node name.

mod agent_section;

use std::path::PathBuf;

pub use agent_section::{
    AgentSection, CaSection, CniSection, DiscoverySection, DrainSection, HttpSection,
    InProcessCaSection, LimitsSection, PortsSection, RemoteCaSection,
};

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

/// This machine's host name, the default node name.
pub fn node_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}

/// Serializes a `Duration` as milliseconds in `/config_dump`.
pub mod humantime_ms {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u128(d.as_millis())
    }
}
