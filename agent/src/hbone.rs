//! HBONE: HTTP/2 CONNECT over mutual TLS 1.3 between node proxies (Istio's wire format).
//!
//! A client proxy opens (or reuses, `pool`) one TLS connection per (source identity,
//! destination identity, destination address) to the peer's port 15008, and sends one
//! `CONNECT ip:port` stream per application connection. The server (`server`) checks the
//! client's SPIFFE id and asks a `StreamHandler` whether to accept: the node proxy's
//! `ConnectHandler` connects the upstream, so `200` means it is reachable, then bytes are
//! copied (`copy`, the loop every proxy shares); the waypoint takes the stream itself and
//! speaks HTTP on it. `tls` builds both rustls configurations and the SPIFFE verifiers.
//! docs/hbone.md describes the wire format. The node proxy and the waypoint are siblings
//! on top of this module.
//!
//! Inputs: certificates and roots from a `CertSource` (at handshake time), sockets from the
//! caller (created in the pod's namespace). Outputs: `HboneStream`s, served CONNECTs, and a
//! `reason()` for every failure.

mod client;
pub mod copy;
mod pool;
mod server;
mod stream;
pub mod tls;

use std::{io, time::Duration};

use h2::Reason;
use rustls::{AlertDescription, CertificateError};
use serde::Serialize;

pub use client::{ConnectRequest, HboneStream};
pub use pool::{Key, Pool, PoolConfig, PoolStats};
#[doc(hidden)] // for the fuzz target `hbone_headers`.
pub use server::connect_target;
pub use server::{
    Accepted, ConnectHandler, InboundConnect, Refusal, ServerStream, StreamHandler, Transfer,
    Tunnel, serve, serve_with,
};
pub use tls::{client_config, server_config};

use crate::identity::SpiffeId;

/// An HBONE error, with a stable reason for logs and metrics.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no certificate for our own identity {0} yet; refusing to connect without one")]
    NoCertificate(SpiffeId),
    #[error("no certificate for this pod's identity yet; refusing HBONE until one is issued")]
    NoOwnCertificate,
    #[error("cannot connect to the HBONE port {addr}: {source}")]
    Dial {
        addr: std::net::SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("the HBONE socket failed before the handshake: {0}")]
    Socket(#[source] io::Error),
    #[error("{message} (a concurrent connect to the same peer failed; not retried)")]
    ConcurrentConnectFailed {
        reason: &'static str,
        message: String,
    },
    #[error("TLS handshake with {0} timed out")]
    HandshakeTimeout(std::net::SocketAddr),
    #[error("TLS handshake failed: {0}")]
    TlsHandshake(#[source] rustls::Error),
    #[error("peer identity mismatch: expected {expected}, peer presented {actual}")]
    IdentityMismatch { expected: String, actual: String },
    #[error(
        "peer {peer} is not in this mesh's trust domain {trust_domain} (a federated mesh's \
         root in the trust bundle does not admit its identities)"
    )]
    ForeignTrustDomain { peer: String, trust_domain: String },
    #[error("peer certificate does not chain to the trust bundle (check the mesh CA): {0}")]
    UntrustedCa(String),
    #[error("peer certificate has expired (is its certificate manager renewing?): {0}")]
    ExpiredCertificate(String),
    #[error("peer certificate is not valid yet (clock skew?): {0}")]
    NotYetValidCertificate(String),
    #[error("peer presented no certificate")]
    NoPeerCertificate,
    #[error("peer certificate is not a SPIFFE certificate weft accepts: {0}")]
    BadCertificate(String),
    #[error("the {peer} refused the TLS handshake with alert {alert:?} (see its log for why)")]
    PeerAlert { alert: AlertDescription, peer: Role },
    #[error("HTTP/2 error: {0}")]
    Http2(#[source] h2::Error),
    #[error("HBONE stream reset by peer: {0:?}")]
    StreamReset(Reason),
    #[error("peer refused the CONNECT: not a workload it serves at that address (400)")]
    BadRequest,
    #[error("peer denied the CONNECT by policy (401)")]
    PolicyDenied,
    #[error("peer could not connect to the upstream (503)")]
    UpstreamUnreachable,
    #[error("peer answered the CONNECT with unexpected status {0}")]
    UnexpectedStatus(u16),
    #[error("no response to the CONNECT in time")]
    ResponseTimeout,
    #[error("the peer did not answer an HTTP/2 PING in time: it is gone or stalled")]
    KeepaliveTimeout,
    #[error("invalid CONNECT target: {0}")]
    InvalidRequest(String),
    #[error("BUG: TLS configuration rejected: {0}")]
    BugTlsConfig(#[source] rustls::Error),
}

impl Error {
    /// The peer did not process the CONNECT, so it may go again on another connection
    /// (RFC 9113, section 8.7): a GOAWAY left it out (a peer going away, as a draining
    /// agent's does) or it was refused with REFUSED_STREAM.
    pub fn unprocessed(&self) -> bool {
        match self {
            Error::StreamReset(reason) => *reason == Reason::REFUSED_STREAM,
            Error::Http2(e) => e.is_go_away() && e.is_remote(),
            _ => false,
        }
    }

    /// Stable, snake_case reason: metric label and access-log `error` field.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::NoCertificate(_) | Error::NoOwnCertificate => "no_certificate",
            Error::Dial { .. } => "hbone_dial",
            Error::Socket(_) => "socket",
            Error::ConcurrentConnectFailed { reason, .. } => reason,
            Error::HandshakeTimeout(_) => "tls_handshake_timeout",
            Error::TlsHandshake(_) => "tls_handshake",
            Error::IdentityMismatch { .. } => "identity_mismatch",
            Error::ForeignTrustDomain { .. } => "foreign_trust_domain",
            Error::UntrustedCa(_) => "untrusted_ca",
            Error::ExpiredCertificate(_) => "expired_certificate",
            Error::NotYetValidCertificate(_) => "not_yet_valid_certificate",
            Error::NoPeerCertificate => "no_peer_certificate",
            Error::BadCertificate(_) => "bad_certificate",
            Error::PeerAlert { alert, peer } => alert_reason(*alert, *peer),
            Error::Http2(_) => "http2",
            Error::StreamReset(_) => "stream_reset",
            Error::BadRequest => "bad_request",
            Error::PolicyDenied => "policy_denied",
            Error::UpstreamUnreachable => "upstream_unreachable",
            Error::UnexpectedStatus(_) => "unexpected_status",
            Error::ResponseTimeout => "response_timeout",
            Error::KeepaliveTimeout => "keepalive_timeout",
            Error::InvalidRequest(_) => "invalid_request",
            Error::BugTlsConfig(_) => "bug",
        }
    }

    /// Classifies a rustls error: our verifiers' rejections keep their own variant,
    /// certificate problems get theirs, an alert from the peer says what the peer refused.
    /// `peer` is the other end of the connection (who sent an alert, if one came).
    pub(crate) fn from_tls(e: rustls::Error, peer: Role) -> Error {
        use rustls::Error as E;
        match e {
            E::InvalidCertificate(ref cert) => match cert {
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    Error::ExpiredCertificate(e.to_string())
                }
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    Error::NotYetValidCertificate(e.to_string())
                }
                #[allow(
                    deprecated,
                    reason = "rustls still returns BadSignature from some paths"
                )]
                CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                    Error::UntrustedCa(e.to_string())
                }
                CertificateError::Other(other) => match other.0.downcast_ref::<tls::Rejection>() {
                    Some(rejection) => rejection.clone().into(),
                    None => Error::BadCertificate(e.to_string()),
                },
                _ => Error::BadCertificate(e.to_string()),
            },
            E::NoCertificatesPresented => Error::NoPeerCertificate,
            E::AlertReceived(alert) => Error::PeerAlert { alert, peer },
            // rustls's error when our resolver had no certificate for the pod (server side;
            // the client side checks before dialing).
            E::General(ref message) if message == "no server certificate chain resolved" => {
                Error::NoOwnCertificate
            }
            e => Error::TlsHandshake(e),
        }
    }

    /// Classifies an I/O error of the TLS stream (tokio-rustls wraps rustls errors in it).
    pub(crate) fn from_io(e: io::Error, peer: Role) -> Error {
        match tls_error_of(&e) {
            Some(tls) => Error::from_tls(tls.clone(), peer),
            None => Error::TlsHandshake(rustls::Error::General(e.to_string())),
        }
    }

    /// Classifies an h2 error: a stream reset, or a connection failure (whose TLS cause,
    /// when there is one, the caller passes from the connection's record).
    pub(crate) fn from_h2(e: h2::Error, tls_cause: Option<rustls::Error>, peer: Role) -> Error {
        if let Some(tls) = tls_cause {
            return Error::from_tls(tls, peer);
        }
        match e.reason() {
            Some(reason) if e.is_reset() => Error::StreamReset(reason),
            _ => Error::Http2(e),
        }
    }
}

impl From<tls::Rejection> for Error {
    fn from(r: tls::Rejection) -> Self {
        match r {
            tls::Rejection::IdentityMismatch { expected, actual } => {
                Error::IdentityMismatch { expected, actual }
            }
            tls::Rejection::NotSpiffe(why) => Error::BadCertificate(why),
            tls::Rejection::ForeignTrustDomain { peer, trust_domain } => {
                Error::ForeignTrustDomain { peer, trust_domain }
            }
        }
    }
}

/// The rustls error inside an I/O error, if any.
pub(crate) fn tls_error_of(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
}

/// One end of an HBONE connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Client,
    Server,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Client => "HBONE client",
            Role::Server => "HBONE server",
        })
    }
}

/// The reason an alert stands for: what the peer found wrong (rustls sends these alerts
/// for the matching certificate errors), so both ends log the same reason.
fn alert_reason(alert: AlertDescription, peer: Role) -> &'static str {
    match alert {
        AlertDescription::UnknownCA | AlertDescription::DecryptError => "untrusted_ca",
        AlertDescription::CertificateExpired => "expired_certificate",
        AlertDescription::CertificateRequired => "no_peer_certificate",
        AlertDescription::BadCertificate
        | AlertDescription::CertificateUnknown
        | AlertDescription::UnsupportedCertificate => "bad_certificate",
        // A weft client refuses the wrong server identity with access_denied; a rustls
        // server sends it when it has no certificate to present.
        AlertDescription::AccessDenied => match peer {
            Role::Client => "identity_mismatch",
            Role::Server => "no_certificate",
        },
        _ => "tls_handshake",
    }
}

/// Pings the peer every `interval` for as long as the connection is driven beside it;
/// resolves when a PING went unanswered for `timeout` (the peer vanished: its sockets must
/// be freed) or the connection failed.
pub(crate) async fn keepalive(
    mut pings: Option<h2::PingPong>,
    interval: std::time::Duration,
    timeout: std::time::Duration,
) -> Error {
    let Some(pings) = pings.as_mut() else {
        // Taken already: nothing to do but never resolve.
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(timeout, pings.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Error::Http2(e),
            Err(_) => return Error::KeepaliveTimeout,
        }
    }
}

/// HBONE's port on every meshed pod.
pub const PORT: u16 = 15008;
/// The only ALPN protocol offered and accepted.
pub const ALPN: &[u8] = b"h2";
/// W3C baggage (Istio puts workload metadata here).
pub const BAGGAGE: &str = "baggage";
/// RFC 7239 `for=` carrying the original client address.
pub const FORWARDED: &str = "forwarded";
/// W3C trace context.
pub const TRACEPARENT: &str = "traceparent";

/// HTTP/2 limits of HBONE, both sides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Limits {
    /// SETTINGS_MAX_HEADER_LIST_SIZE: a larger CONNECT is answered 431.
    pub max_header_list_size: u32,
    /// SETTINGS_MAX_CONCURRENT_STREAMS of the server (and streams per pooled connection).
    pub max_concurrent_streams: u32,
    /// Streams a client may reset before the server accepted them, before GOAWAY
    /// (rapid reset, CVE-2023-44487).
    pub max_pending_accept_reset_streams: usize,
    /// Streams the server may reset for the client's protocol errors, before GOAWAY.
    pub max_local_error_reset_streams: usize,
    /// TLS handshake and HTTP/2 preface of a new connection.
    #[serde(with = "crate::settings::humantime_ms")]
    pub handshake_timeout: Duration,
    /// An HTTP/2 PING after this much time…
    #[serde(with = "crate::settings::humantime_ms")]
    pub ping_interval: Duration,
    /// …unanswered for this long closes the connection (the peer is gone).
    #[serde(with = "crate::settings::humantime_ms")]
    pub ping_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header_list_size: 16 * 1024,
            max_concurrent_streams: 100,
            max_pending_accept_reset_streams: 20,
            max_local_error_reset_streams: 1_024,
            handshake_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(30),
            ping_timeout: Duration::from_secs(10),
        }
    }
}

#[cfg(test)]
mod tests;
