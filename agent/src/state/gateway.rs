//! Ingress gateways: Gateway API `Gateway` objects of class `weft`, their listeners, and
//! the TLS certificates (Secrets of type `kubernetes.io/tls`) their HTTPS listeners name.
//! A `weft gateway` serves the listeners of one of them and sends what its routes say
//! into the mesh over HBONE, as its own identity.

use std::sync::Arc;

use serde::{Serialize, Serializer};

use super::{RouteKind, WorkloadRef};

/// The `gatewayClassName` weft serves.
pub const GATEWAY_CLASS: &str = "weft";
/// The `controllerName` of that class, and the controller named in status.
pub const CONTROLLER_NAME: &str = "weft.dev/gateway";

/// One Gateway of class `weft`, valid as a whole.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Gateway {
    /// Namespace and name of the Gateway object.
    pub name: WorkloadRef,
    /// Its listeners, in the order of the object; names are unique.
    pub listeners: Vec<Listener>,
}

/// A listener: a port, a protocol, the host names it serves and the routes it admits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Listener {
    /// The listener's `name` (a route's `sectionName` picks it).
    pub name: String,
    pub port: u16,
    pub protocol: ListenerProtocol,
    /// Lowercase; `*.example.com` matches one or more labels in front of `example.com`.
    /// `None`: every host.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Certificates an HTTPS listener terminates TLS with (Secrets in the Gateway's
    /// namespace), picked by SNI; empty for the other protocols.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub certificates: Vec<WorkloadRef>,
    /// Which routes may attach.
    pub allowed_routes: AllowedRoutes,
}

/// A listener's `protocol`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum ListenerProtocol {
    #[serde(rename = "HTTP")]
    Http,
    /// TLS terminated here, then HTTP.
    #[serde(rename = "HTTPS")]
    Https,
    /// TLS passed through to the backend the SNI routes to (`tls.mode: Passthrough`).
    #[serde(rename = "TLS")]
    Tls,
    /// Bytes passed through to the backend of the listener's route.
    #[serde(rename = "TCP")]
    Tcp,
}

impl ListenerProtocol {
    /// The route kinds a listener of this protocol admits when `allowedRoutes.kinds` is
    /// left out.
    pub fn default_kinds(self) -> &'static [RouteKind] {
        match self {
            ListenerProtocol::Http | ListenerProtocol::Https => &[RouteKind::Http, RouteKind::Grpc],
            ListenerProtocol::Tls => &[RouteKind::Tls],
            ListenerProtocol::Tcp => &[RouteKind::Tcp],
        }
    }

    /// As the Gateway API writes it (`HTTPS`).
    pub fn name(self) -> &'static str {
        match self {
            ListenerProtocol::Http => "HTTP",
            ListenerProtocol::Https => "HTTPS",
            ListenerProtocol::Tls => "TLS",
            ListenerProtocol::Tcp => "TCP",
        }
    }

    /// Whether the gateway speaks HTTP on it (the other protocols pass bytes through).
    pub fn is_http(self) -> bool {
        matches!(self, ListenerProtocol::Http | ListenerProtocol::Https)
    }
}

/// A listener's `allowedRoutes`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AllowedRoutes {
    /// Routes from which namespaces.
    pub namespaces: RouteNamespaces,
    /// Route kinds admitted; never empty (the protocol's defaults when left out).
    pub kinds: Vec<RouteKind>,
}

/// `allowedRoutes.namespaces.from`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub enum RouteNamespaces {
    /// The Gateway's own namespace (the spec's default).
    #[default]
    Same,
    /// Every namespace.
    All,
}

/// A route's `parentRefs` entry naming a Gateway.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayParent {
    /// The Gateway (its namespace defaults to the route's).
    pub gateway: WorkloadRef,
    /// Only the listener of this name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
    /// Only the listeners of this port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

/// A TLS certificate and its key, from a Secret of type `kubernetes.io/tls`. Never
/// serialized whole: the config dump shows the certificate's SHA-256 fingerprint only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsCertificate {
    /// Namespace and name of the Secret.
    pub name: WorkloadRef,
    /// The chain, leaf first, DER.
    pub chain: Arc<Vec<Vec<u8>>>,
    /// The private key, PKCS#8, PKCS#1 or SEC1 DER (`key_kind` says which).
    pub key: Arc<Vec<u8>>,
    pub key_kind: KeyKind,
    /// Lowercase hex SHA-256 of the leaf certificate.
    pub fingerprint: String,
}

/// The encoding of a `TlsCertificate`'s key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    Pkcs8,
    Pkcs1,
    Sec1,
}

impl Serialize for TlsCertificate {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut out = s.serialize_struct("TlsCertificate", 2)?;
        out.serialize_field("name", &self.name)?;
        out.serialize_field("sha256", &self.fingerprint)?;
        out.end()
    }
}

/// Whether a request's host (lowercase, without port) is one `pattern` serves: equal, or
/// `*.suffix` and the host ends in `.suffix` with at least one label before it.
pub fn hostname_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => host
            .strip_suffix(suffix)
            .and_then(|front| front.strip_suffix('.'))
            .is_some_and(|front| !front.is_empty()),
        None => pattern == host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wildcard_needs_a_label_in_front() {
        assert!(hostname_matches("*.example.com", "a.example.com"));
        assert!(hostname_matches("*.example.com", "a.b.example.com"));
        assert!(!hostname_matches("*.example.com", "example.com"));
        assert!(!hostname_matches("*.example.com", "aexample.com"));
        assert!(hostname_matches("shop.example.com", "shop.example.com"));
        assert!(!hostname_matches("shop.example.com", "x.shop.example.com"));
    }
}
