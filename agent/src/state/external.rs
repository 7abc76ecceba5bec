//! External services: hosts outside the mesh that enrolled pods reach, registered by name
//! (`weft.dev/v1alpha1 ExternalService`, or `externalServices:` in the local file), after
//! Istio's ServiceEntry. A registered host is recognised by its addresses: the static ones
//! it lists, or what the agent's resolver last found for its DNS names
//! (`Snapshot::resolved_hosts`). The node proxy then names it in telemetry, lets access
//! policy name it, originates TLS to it when a port asks, and lets it through when the mesh
//! is `REGISTRY_ONLY`.

use std::net::IpAddr;

use serde::Serialize;

use super::WorkloadRef;

/// A service outside the mesh, validated.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ExternalService {
    /// Namespace and name of the resource.
    pub name: WorkloadRef,
    /// DNS names (lower case, no trailing dot, no wildcard), at least one. The first is
    /// the name telemetry reports.
    pub hosts: Vec<String>,
    /// The ports it serves, at least one.
    pub ports: Vec<ExternalPort>,
    /// How its addresses are found.
    pub resolution: Resolution,
    /// `STATIC`: its addresses (at least one). `DNS`: empty.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<IpAddr>,
}

/// How the addresses of an external service are found.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "UPPERCASE")]
pub enum Resolution {
    /// The agent resolves every host (A and AAAA) and again when the answer's TTL ends.
    #[default]
    Dns,
    /// The addresses listed in `addresses`.
    Static,
}

/// One port of an external service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ExternalPort {
    /// The port applications connect to.
    pub number: u16,
    /// Its name (may be empty).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// What it carries.
    pub protocol: Protocol,
    /// The port the proxy connects to on the host (`number` unless set).
    pub target_port: u16,
    /// Set when the proxy opens TLS to the host: the application speaks plaintext.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsOrigination>,
}

/// The protocol of an external port, for telemetry and for what the proxy may do with it.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    /// Opaque TCP.
    #[default]
    Tcp,
    /// TLS from the application, passed through.
    Tls,
    /// Plain HTTP.
    Http,
    /// HTTPS from the application, passed through.
    Https,
}

/// TLS the proxy originates to the external host (Istio's DestinationRule `tls.mode:
/// SIMPLE`): the server's certificate must chain to `ca_certificates` (the system roots
/// when unset) and name `sni`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TlsOrigination {
    /// The name sent as SNI and checked against the certificate (the service's first host
    /// unless set).
    pub sni: String,
    /// PEM certificates of the CAs trusted for this host; the system's roots when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_certificates: Option<String>,
}

/// Whether enrolled pods may connect to destinations the mesh does not know (Istio's
/// `outboundTrafficPolicy.mode`).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OutboundMode {
    /// Any destination; one the mesh does not know is reached in plaintext (passthrough).
    #[default]
    AllowAny,
    /// Only mesh workloads, services, waypoints and registered external services; any
    /// other destination is refused at connect time and counted.
    RegistryOnly,
}

impl ExternalService {
    /// The port `port` of this service, if it serves it.
    pub fn port(&self, port: u16) -> Option<&ExternalPort> {
        self.ports.iter().find(|p| p.number == port)
    }

    /// The name telemetry and the access log report for it: its first host.
    pub fn host(&self) -> &str {
        self.hosts.first().map(String::as_str).unwrap_or_default()
    }
}

#[cfg(test)]
impl ExternalService {
    /// A service for tests: `namespace/name` with `hosts` and `ports`, `STATIC` at
    /// `addresses`, or `DNS` when there are none.
    pub fn for_test(
        name: WorkloadRef,
        hosts: &[&str],
        ports: Vec<ExternalPort>,
        addresses: &[&str],
    ) -> Self {
        Self {
            name,
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            ports,
            resolution: match addresses {
                [] => Resolution::Dns,
                _ => Resolution::Static,
            },
            addresses: addresses.iter().map(|a| a.parse().unwrap()).collect(),
        }
    }
}

#[cfg(test)]
impl ExternalPort {
    /// Port `number` carrying `protocol`, to the same port on the host, no TLS origination.
    pub fn for_test(number: u16, protocol: Protocol) -> Self {
        Self {
            number,
            name: String::new(),
            protocol,
            target_port: number,
            tls: None,
        }
    }
}
