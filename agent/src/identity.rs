//! Workload identity: SPIFFE ids, the certificates that prove them, and the trust bundle
//! that verifies them. `manager` keeps a current certificate per identity the node runs
//! (renewed at half life) from `ca_client` (the `weft ca` application's API, `ca_api`) or
//! from an in-process `signer`.
//!
//! The types here are the shared vocabulary of identity: the proxy's HBONE TLS uses
//! `WorkloadCert` and `TrustBundle`, policy and telemetry use `SpiffeId`.

pub mod ca_api;
pub mod ca_client;
pub mod csr;
pub mod manager;
pub mod signer;

use std::{fmt, str::FromStr, sync::Arc, time::SystemTime};

use rustls::{
    pki_types::{CertificateDer, PrivateKeyDer},
    sign::CertifiedKey,
};
use serde::Serialize;

pub use manager::{CertManager, CertState, CertStatus, Issuer};

/// An identity error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    InvalidSpiffeId(#[from] InvalidSpiffeId),
    #[error("invalid certificate or key: {0}")]
    InvalidCertificate(String),
    #[error("in-process CA: {0}")]
    Signer(#[from] signer::Error),
    #[error("CA client: {0}")]
    CaClient(#[from] ca_client::Error),
}

/// A string that is not a SPIFFE id of the mesh's shape, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid SPIFFE id {id:?}: {reason}")]
pub struct InvalidSpiffeId {
    pub id: String,
    pub reason: &'static str,
}

/// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`, parsed.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

/// A workload's certificate chain and private key, ready for rustls.
#[derive(Debug)]
pub struct WorkloadCert {
    /// The identity the leaf certificate carries (its URI SAN).
    pub identity: SpiffeId,
    /// Leaf first, then intermediates; with the key, for rustls resolvers.
    pub certified_key: Arc<CertifiedKey>,
    /// Validity of the leaf.
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// Leaf serial number (hex), for status and logs.
    pub serial: String,
}

/// The roots that mesh certificates must chain to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrustBundle {
    pub roots: Vec<CertificateDer<'static>>,
}

/// Where the proxy's TLS gets certificates and roots from, at handshake time: the
/// certificate manager in the agent, a fixed set in tests. Asked on every handshake, so a
/// rotated certificate or bundle is used by the next connection and established
/// connections are untouched.
pub trait CertSource: Send + Sync + 'static {
    /// The current certificate for `id`, if one has been issued.
    fn certificate(&self, id: &SpiffeId) -> Option<Arc<WorkloadCert>>;
    /// The roots peers must chain to.
    fn trust_bundle(&self) -> Arc<TrustBundle>;
}

impl SpiffeId {
    /// Builds and checks an id from its parts.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, InvalidSpiffeId> {
        format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}").parse()
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

impl FromStr for SpiffeId {
    type Err = InvalidSpiffeId;

    fn from_str(id: &str) -> Result<Self, InvalidSpiffeId> {
        let invalid = |reason| InvalidSpiffeId {
            id: id.to_owned(),
            reason,
        };
        let rest = id
            .strip_prefix("spiffe://")
            .ok_or_else(|| invalid("must start with spiffe://"))?;
        let mut parts = rest.split('/');
        let trust_domain = parts.next().unwrap_or_default();
        let (Some("ns"), Some(namespace), Some("sa"), Some(service_account), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(invalid("path must be /ns/<namespace>/sa/<service-account>"));
        };
        let segment_ok = |s: &str| {
            !s.is_empty()
                && s.chars().all(|c| {
                    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.' | '_')
                })
        };
        if !segment_ok(trust_domain) {
            return Err(invalid(
                "trust domain must be lowercase letters, digits, '-', '.', '_'",
            ));
        }
        if !segment_ok(namespace) || !segment_ok(service_account) {
            return Err(invalid(
                "namespace and service account must be lowercase letters, digits, '-', '.', '_'",
            ));
        }
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        })
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl WorkloadCert {
    /// Builds a certificate from a PEM chain (leaf first) and a PEM PKCS#8 private key,
    /// reading the identity and validity from the leaf.
    pub fn from_pem(chain_pem: &str, key_pem: &str) -> Result<Self, Error> {
        let invalid = |e: &dyn fmt::Display| Error::InvalidCertificate(e.to_string());
        let chain: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut chain_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| invalid(&e))?;
        let leaf = chain
            .first()
            .ok_or_else(|| invalid(&"empty certificate chain"))?;
        let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut key_pem.as_bytes())
            .map_err(|e| invalid(&e))?
            .ok_or_else(|| invalid(&"no private key in PEM"))?;
        let signing_key =
            rustls::crypto::aws_lc_rs::sign::any_supported_type(&key).map_err(|e| invalid(&e))?;
        let facts = leaf_facts(leaf)?;
        Ok(Self {
            identity: facts.identity,
            certified_key: Arc::new(CertifiedKey::new(chain, signing_key)),
            not_before: facts.not_before,
            not_after: facts.not_after,
            serial: facts.serial,
        })
    }

    /// Whether a peer would accept the leaf at `now`: within both bounds of its validity,
    /// as certificate verification checks them.
    pub fn valid_at(&self, now: SystemTime) -> bool {
        self.not_before <= now && now < self.not_after
    }

    /// Half of the lifetime has passed at this instant: time to renew.
    pub fn renew_at(&self) -> SystemTime {
        let lifetime = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + lifetime / 2
    }
}

/// What a leaf certificate says about itself.
pub struct LeafFacts {
    pub identity: SpiffeId,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub serial: String,
}

/// Reads the SPIFFE id (the one URI SAN), validity and serial of a leaf certificate, and
/// checks that its key is a signing key (SPIFFE X.509-SVID: a key usage, when present,
/// includes digitalSignature and neither keyCertSign nor cRLSign).
pub fn leaf_facts(der: &CertificateDer<'_>) -> Result<LeafFacts, Error> {
    use x509_parser::prelude::*;
    let invalid = |e: &dyn fmt::Display| Error::InvalidCertificate(e.to_string());
    let (_, cert) = X509Certificate::from_der(der.as_ref()).map_err(|e| invalid(&e))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| invalid(&e))?
        .ok_or_else(|| invalid(&"certificate has no subject alternative name"))?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect();
    // SPIFFE X.509-SVID: exactly one URI SAN, and it is the identity.
    let [uri] = uris.as_slice() else {
        return Err(invalid(&format!(
            "expected exactly one URI SAN, found {}",
            uris.len()
        )));
    };
    // webpki checks the extended key usage, not the key usage of an end-entity certificate.
    if let Some(usage) = cert.key_usage().map_err(|e| invalid(&e))? {
        let usage = usage.value;
        if !usage.digital_signature() || usage.key_cert_sign() || usage.crl_sign() {
            return Err(invalid(&format!(
                "key usage {usage} is not a workload's: it must include digitalSignature and \
                 neither keyCertSign nor cRLSign"
            )));
        }
    }
    let to_time = |t: ASN1Time| {
        SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(t.timestamp().max(0) as u64)
    };
    Ok(LeafFacts {
        identity: uri.parse()?,
        not_before: to_time(cert.validity().not_before),
        not_after: to_time(cert.validity().not_after),
        serial: cert.raw_serial_as_string(),
    })
}

/// Identity settings of the agent (`agent.trustDomain`, `agent.certLifetime`, `agent.ca`).
/// Holds paths only, never key material, so it is safe to dump.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Config {
    /// The trust domain of every identity this node asks for.
    pub trust_domain: String,
    /// Lifetime asked for each workload certificate (renewed at half of it).
    #[serde(serialize_with = "humantime_str")]
    pub cert_lifetime: std::time::Duration,
    pub ca: CaSource,
}

/// Where certificates come from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase", rename_all_fields = "camelCase")]
pub enum CaSource {
    /// The agent signs with a local CA key (standalone, demo, tests).
    InProcess {
        cert: std::path::PathBuf,
        key: std::path::PathBuf,
        /// Further roots to trust during a root rotation (`docs/ca.md`).
        trusted_roots: Vec<std::path::PathBuf>,
    },
    /// `weft ca` over HTTPS.
    Remote {
        /// `host:port`.
        addr: String,
        /// Name in the CA's serving certificate.
        server_name: String,
        /// The CA root (PEM) that the CA server's certificate chains to.
        root_cert: std::path::PathBuf,
        /// This node's bearer token, re-read on every request.
        token_file: std::path::PathBuf,
    },
    /// No CA: the proxy runs without mTLS.
    None,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            trust_domain: DEFAULT_TRUST_DOMAIN.to_owned(),
            cert_lifetime: DEFAULT_CERT_LIFETIME,
            ca: CaSource::None,
        }
    }
}

/// Builds the certificate manager `config` asks for: loads the in-process CA or sets up
/// the CA client. `None` when no CA is configured (the proxy then runs without mTLS).
pub fn start(config: &Config) -> Result<Option<CertManager>, Error> {
    let issuer = match &config.ca {
        CaSource::None => return Ok(None),
        CaSource::InProcess {
            cert,
            key,
            trusted_roots,
        } => Issuer::InProcess(Arc::new(
            signer::Signer::load(cert, key, &config.trust_domain, config.cert_lifetime)?
                .with_trusted_roots(trusted_roots)?,
        )),
        CaSource::Remote {
            addr,
            server_name,
            root_cert,
            token_file,
        } => Issuer::Remote(ca_client::CaClient::new(&ca_client::Config {
            addr: addr.clone(),
            server_name: server_name.clone(),
            root_cert: root_cert.clone(),
            token_file: token_file.clone(),
        })?),
    };
    Ok(Some(CertManager::new(issuer, config.clone())))
}

fn humantime_str<S: serde::Serializer>(d: &std::time::Duration, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_duration(*d))
}

/// The trust domain when none is configured.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// Workload certificate lifetime when none is configured.
pub const DEFAULT_CERT_LIFETIME: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
/// Shortest lifetime accepted: renewal at half life needs a few seconds of room.
pub const MIN_CERT_LIFETIME: std::time::Duration = std::time::Duration::from_secs(5);

/// Fills `buf` from the system's secure random generator (serials, backoff jitter).
pub fn random_bytes(buf: &mut [u8]) {
    rustls::crypto::aws_lc_rs::default_provider()
        .secure_random
        .fill(buf)
        .expect("the system random number generator works");
}

#[cfg(test)]
mod tests;
