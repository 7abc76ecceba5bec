//! The CA's signing key and what it signs: workload certificates from CSRs, and the CA
//! server's own serving certificate. The key is loaded once and never leaves this type: no
//! accessor returns it, `Debug` leaves it out, and nothing here is `Serialize`.

use std::{
    fmt,
    fs::{self, OpenOptions},
    io::Write as _,
    net::IpAddr,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use ::time::OffsetDateTime;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData as _, SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use x509_parser::{certification_request::X509CertificationRequest, prelude::*};

use crate::identity::{self, SpiffeId, TrustBundle};

/// Why the CA root could not be loaded, created or used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} already exists; refusing to overwrite a CA root (move it away first)")]
    Exists { path: PathBuf },
    #[error("invalid trust domain {0:?}: lowercase letters, digits, '-', '.', '_'")]
    InvalidTrustDomain(String),
    #[error("{path} is not a usable CA certificate: {reason}")]
    InvalidRoot { path: PathBuf, reason: String },
    #[error("{path} is not a usable CA key: {reason}")]
    InvalidKey { path: PathBuf, reason: String },
    #[error("the CA key does not belong to the CA certificate (check caCert/caKey)")]
    KeyMismatch,
    #[error(
        "the CA certificate is for trust domain {root}, but the configured trust domain is {configured}"
    )]
    TrustDomainMismatch { root: String, configured: String },
    #[error("BUG: {0}")]
    Bug(String),
}

/// Loaded CA root: certificate and signing key.
pub struct Signer {
    trust_domain: String,
    issuer: rcgen::Issuer<'static, KeyPair>,
    root: CertificateDer<'static>,
    root_pem: String,
    root_subject: String,
    root_not_after: SystemTime,
    max_lifetime: Duration,
    /// Further roots the bundle carries during a root rotation (the one being retired, or
    /// the one coming next); this CA signs with `root` only.
    trusted: Vec<(CertificateDer<'static>, String)>,
}

/// A signed workload certificate.
#[derive(Clone, Debug)]
pub struct Issued {
    /// Leaf, then the CA certificate, PEM.
    pub chain_pem: Vec<String>,
    /// The roots peers verify against, PEM.
    pub trust_bundle_pem: Vec<String>,
    /// Leaf serial (hex, as `identity::leaf_facts` prints it).
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// A certificate and key for a TLS server (the CA server's own).
pub struct ServingCert {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// Why a CSR was not signed. `reason()` is the API's `error` field.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("the CSR is not a PEM PKCS#10 certificate request: {0}")]
    InvalidCsr(String),
    #[error("the CSR's signature does not verify with its own public key")]
    InvalidCsrSignature,
    #[error("the CSR's key must be ECDSA P-256 ({0})")]
    UnsupportedKey(String),
    #[error("the CSR must carry exactly one SAN, the URI {identity}; it carries {found:?}")]
    SanMismatch {
        identity: SpiffeId,
        found: Vec<String>,
    },
    #[error("{identity} is not in this CA's trust domain {trust_domain}")]
    WrongTrustDomain {
        identity: SpiffeId,
        trust_domain: String,
    },
    #[error("the requested lifetime must be at least one second")]
    InvalidLifetime,
    #[error("BUG: cannot build the certificate: {0}")]
    Bug(String),
}

impl Signer {
    /// Loads the root certificate and its PKCS#8 key. `trust_domain` is the one this CA
    /// issues for; a root that names another trust domain (URI SAN `spiffe://<td>`) is refused.
    pub fn load(
        cert: &Path,
        key: &Path,
        trust_domain: &str,
        max_lifetime: Duration,
    ) -> Result<Self, Error> {
        let read = |path: &Path| {
            fs::read_to_string(path).map_err(|source| Error::Read {
                path: path.to_owned(),
                source,
            })
        };
        let (cert_pem, key_pem) = (read(cert)?, read(key)?);
        Self::from_pem(&cert_pem, &key_pem, trust_domain, max_lifetime).map_err(|e| match e {
            Error::InvalidRoot { path: _, reason } => Error::InvalidRoot {
                path: cert.to_owned(),
                reason,
            },
            Error::InvalidKey { path: _, reason } => Error::InvalidKey {
                path: key.to_owned(),
                reason,
            },
            e => e,
        })
    }

    /// Like [`Signer::load`], from PEM text.
    pub fn from_pem(
        cert_pem: &str,
        key_pem: &str,
        trust_domain: &str,
        max_lifetime: Duration,
    ) -> Result<Self, Error> {
        let bad_root = |reason: String| Error::InvalidRoot {
            path: PathBuf::new(),
            reason,
        };
        check_trust_domain(trust_domain)?;
        // Never put the key's parse error text in a message: some parsers echo input.
        let key = KeyPair::from_pem(key_pem).map_err(|_| Error::InvalidKey {
            path: PathBuf::new(),
            reason: "not a PEM PKCS#8 private key of a supported type".into(),
        })?;
        let root: CertificateDer<'static> = rustls_pemfile::certs(&mut cert_pem.as_bytes())
            .next()
            .ok_or_else(|| bad_root("no certificate in PEM".into()))?
            .map_err(|e| bad_root(e.to_string()))?;
        let (_, x509) =
            X509Certificate::from_der(root.as_ref()).map_err(|e| bad_root(e.to_string()))?;
        if !x509.is_ca() {
            return Err(bad_root(
                "not a CA certificate (basicConstraints cA is not set)".into(),
            ));
        }
        if x509.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(Error::KeyMismatch);
        }
        if let Ok(Some(san)) = x509.subject_alternative_name() {
            for name in &san.value.general_names {
                if let GeneralName::URI(uri) = name {
                    let named = uri.strip_prefix("spiffe://").unwrap_or(uri);
                    if named.trim_end_matches('/') != trust_domain {
                        return Err(Error::TrustDomainMismatch {
                            root: (*uri).to_owned(),
                            configured: trust_domain.to_owned(),
                        });
                    }
                }
            }
        }
        let root_not_after = to_system_time(x509.validity().not_after);
        let root_subject = x509.subject().to_string();
        let issuer = rcgen::Issuer::from_ca_cert_der(&root, key)
            .map_err(|e| bad_root(format!("cannot use as issuer: {e}")))?;
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            issuer,
            root_pem: pem_of(&root),
            root,
            root_subject,
            root_not_after,
            max_lifetime,
            trusted: Vec::new(),
        })
    }

    /// Adds the CA certificates of each PEM file in `paths` to the trust bundle (a root
    /// rotation: `docs/ca.md`). Each must be a CA certificate; this CA's own root is not
    /// repeated.
    pub fn with_trusted_roots(mut self, paths: &[PathBuf]) -> Result<Self, Error> {
        for path in paths {
            let bad = |reason: String| Error::InvalidRoot {
                path: path.clone(),
                reason,
            };
            let pem = fs::read_to_string(path).map_err(|source| Error::Read {
                path: path.clone(),
                source,
            })?;
            let mut found = 0;
            for cert in rustls_pemfile::certs(&mut pem.as_bytes()) {
                let cert = cert.map_err(|e| bad(e.to_string()))?;
                let (_, x509) =
                    X509Certificate::from_der(cert.as_ref()).map_err(|e| bad(e.to_string()))?;
                if !x509.is_ca() {
                    return Err(bad(
                        "a trusted root must be a CA certificate (basicConstraints cA)".into(),
                    ));
                }
                found += 1;
                if cert != self.root && !self.trusted.iter().any(|(c, _)| *c == cert) {
                    let pem = pem_of(&cert);
                    self.trusted.push((cert, pem));
                }
            }
            if found == 0 {
                return Err(bad("no certificate in PEM".into()));
            }
        }
        Ok(self)
    }

    /// Creates a self-signed ECDSA P-256 root for `trust_domain` and writes `ca.crt` and
    /// `ca.key` (mode 0600) into `dir`. Refuses to overwrite either file.
    pub fn init(dir: &Path, trust_domain: &str) -> Result<InitPaths, Error> {
        check_trust_domain(trust_domain)?;
        let paths = InitPaths {
            cert: dir.join(CERT_FILE),
            key: dir.join(KEY_FILE),
        };
        for path in [&paths.cert, &paths.key] {
            if path.exists() {
                return Err(Error::Exists { path: path.clone() });
            }
        }
        fs::create_dir_all(dir).map_err(|source| Error::Write {
            path: dir.to_owned(),
            source,
        })?;
        let bug = |e: rcgen::Error| Error::Bug(format!("cannot create the root: {e}"));
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(bug)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "weft");
        params
            .distinguished_name
            .push(DnType::CommonName, format!("weft root CA {trust_domain}"));
        // SPIFFE: a trust domain's CA carries the trust domain's URI.
        params.subject_alt_names = vec![SanType::URI(
            format!("spiffe://{trust_domain}").try_into().map_err(bug)?,
        )];
        // Path length 0: this root signs workload (and CA server) leaves directly.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        params.not_before = OffsetDateTime::from(now - ROOT_BACKDATE);
        params.not_after = OffsetDateTime::from(now + ROOT_LIFETIME);
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key).map_err(bug)?;
        write_new(&paths.key, key.serialize_pem().as_bytes(), 0o600)?;
        write_new(&paths.cert, cert.pem().as_bytes(), 0o644)?;
        Ok(paths)
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn max_lifetime(&self) -> Duration {
        self.max_lifetime
    }

    /// The roots peers verify against: this CA's, then the trusted ones of a rotation.
    pub fn trust_bundle(&self) -> TrustBundle {
        TrustBundle {
            roots: std::iter::once(self.root.clone())
                .chain(self.trusted.iter().map(|(cert, _)| cert.clone()))
                .collect(),
        }
    }

    /// The roots, PEM.
    pub fn trust_bundle_pem(&self) -> Vec<String> {
        std::iter::once(self.root_pem.clone())
            .chain(self.trusted.iter().map(|(_, pem)| pem.clone()))
            .collect()
    }

    /// Signs `csr_pem` for `identity` after checking that the CSR asks for exactly that
    /// identity with an ECDSA P-256 key it proves to hold. Authorization (may the caller
    /// have `identity`?) is the caller's job.
    pub fn sign(
        &self,
        identity: &SpiffeId,
        csr_pem: &str,
        lifetime: Duration,
    ) -> Result<Issued, SignError> {
        if identity.trust_domain() != self.trust_domain {
            return Err(SignError::WrongTrustDomain {
                identity: identity.clone(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        if lifetime < Duration::from_secs(1) {
            return Err(SignError::InvalidLifetime);
        }
        let block = ::pem::parse(csr_pem).map_err(|e| SignError::InvalidCsr(e.to_string()))?;
        if block.tag() != "CERTIFICATE REQUEST" {
            return Err(SignError::InvalidCsr(format!(
                "PEM block is {:?}, expected \"CERTIFICATE REQUEST\"",
                block.tag()
            )));
        }
        let (_, csr) = X509CertificationRequest::from_der(block.contents())
            .map_err(|e| SignError::InvalidCsr(e.to_string()))?;
        csr.verify_signature()
            .map_err(|_| SignError::InvalidCsrSignature)?;
        let spki = &csr.certification_request_info.subject_pki;
        let public_key = rcgen::SubjectPublicKeyInfo::from_der(spki.raw)
            .map_err(|e| SignError::UnsupportedKey(e.to_string()))?;
        if public_key.algorithm() != &PKCS_ECDSA_P256_SHA256 {
            return Err(SignError::UnsupportedKey(format!(
                "key algorithm {:?}",
                public_key.algorithm()
            )));
        }
        let found = requested_sans(&csr);
        if found != [format!("URI({identity})")] {
            return Err(SignError::SanMismatch {
                identity: identity.clone(),
                found,
            });
        }
        let uri = identity
            .to_string()
            .try_into()
            .map_err(|e: rcgen::Error| SignError::Bug(e.to_string()))?;
        let params = self.leaf_params(
            vec![SanType::URI(uri)],
            lifetime,
            DistinguishedName::new(),
            &[
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        );
        let leaf = params
            .signed_by(&public_key, &self.issuer)
            .map_err(|e| SignError::Bug(e.to_string()))?;
        let facts = identity::leaf_facts(leaf.der()).map_err(|e| SignError::Bug(e.to_string()))?;
        Ok(Issued {
            chain_pem: vec![leaf.pem(), self.root_pem.clone()],
            trust_bundle_pem: self.trust_bundle_pem(),
            serial: facts.serial,
            not_before: facts.not_before,
            not_after: facts.not_after,
        })
    }

    /// A serving certificate (fresh key) for `names`: DNS names, or IP addresses.
    pub fn issue_serving(
        &self,
        names: &[String],
        lifetime: Duration,
    ) -> Result<ServingCert, Error> {
        let bug =
            |e: rcgen::Error| Error::Bug(format!("cannot issue the serving certificate: {e}"));
        let sans = names
            .iter()
            .map(|n| match n.parse::<IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => n.clone().try_into().map(SanType::DnsName),
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(bug)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "weft");
        dn.push(DnType::CommonName, "weft CA server");
        let params = self.leaf_params(sans, lifetime, dn, &[ExtendedKeyUsagePurpose::ServerAuth]);
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(bug)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(bug)?;
        let to_time = |t: OffsetDateTime| SystemTime::from(t);
        Ok(ServingCert {
            chain: vec![cert.der().clone(), self.root.clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            not_before: to_time(params.not_before),
            not_after: to_time(params.not_after),
        })
    }

    fn leaf_params(
        &self,
        sans: Vec<SanType>,
        lifetime: Duration,
        subject: DistinguishedName,
        usages: &[ExtendedKeyUsagePurpose],
    ) -> CertificateParams {
        let now = SystemTime::now();
        let lifetime = lifetime.min(self.max_lifetime);
        // Clock skew allowance, small enough (≤ a tenth of the lifetime) that renewing at
        // half life still happens near the middle of what the holder asked for.
        let backdate = (lifetime / 10).min(MAX_BACKDATE);
        // A leaf must not outlive the root it chains to.
        let not_after = (now + lifetime).min(self.root_not_after);
        let mut params = CertificateParams::default();
        params.distinguished_name = subject;
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = usages.to_vec();
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        params.not_before = OffsetDateTime::from(now - backdate);
        params.not_after = OffsetDateTime::from(not_after);
        params
    }
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signer")
            .field("trust_domain", &self.trust_domain)
            .field("root", &self.root_subject)
            .field("max_lifetime", &self.max_lifetime)
            .finish_non_exhaustive()
    }
}

impl SignError {
    /// Stable snake_case reason: the API's `error` field and the log's `reason`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::InvalidCsr(_) => "invalid_csr",
            Self::InvalidCsrSignature => "invalid_csr_signature",
            Self::UnsupportedKey(_) => "unsupported_key",
            Self::SanMismatch { .. } => "san_mismatch",
            Self::WrongTrustDomain { .. } => "wrong_trust_domain",
            Self::InvalidLifetime => "invalid_lifetime",
            Self::Bug(_) => "internal",
        }
    }

    /// The HTTP status the CA server answers with.
    pub fn http_status(&self) -> u16 {
        match self {
            Self::Bug(_) => 500,
            _ => 400,
        }
    }
}

/// Where `weft ca init` wrote the root.
#[derive(Clone, Debug)]
pub struct InitPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn check_trust_domain(trust_domain: &str) -> Result<(), Error> {
    SpiffeId::new(trust_domain, "ns", "sa")
        .map(drop)
        .map_err(|_| Error::InvalidTrustDomain(trust_domain.to_owned()))
}

/// The SANs a CSR asks for, as `URI(…)`, `DNSName(…)`, … strings.
fn requested_sans(csr: &X509CertificationRequest<'_>) -> Vec<String> {
    csr.requested_extensions()
        .into_iter()
        .flatten()
        .filter_map(|e| match e {
            ParsedExtension::SubjectAlternativeName(san) => Some(san),
            _ => None,
        })
        .flat_map(|san| san.general_names.iter().map(ToString::to_string))
        .collect()
}

/// 16 random bytes, positive and minimally encoded (RFC 5280 §4.1.2.2: ≤ 20 octets).
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    identity::random_bytes(&mut bytes);
    bytes[0] = (bytes[0] & 0x7f).max(1);
    SerialNumber::from_slice(&bytes)
}

fn to_system_time(t: ASN1Time) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0).unsigned_abs())
}

fn pem_of(der: &CertificateDer<'_>) -> String {
    ::pem::encode(&::pem::Pem::new("CERTIFICATE", der.as_ref().to_vec()))
}

fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), Error> {
    let write_err = |source| Error::Write {
        path: path.to_owned(),
        source,
    };
    // create_new: never replace an existing root or key, even in a race with another init.
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(write_err)?;
    file.write_all(contents).map_err(write_err)?;
    file.sync_all().map_err(write_err)
}

pub const CERT_FILE: &str = "ca.crt";
pub const KEY_FILE: &str = "ca.key";
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const ROOT_BACKDATE: Duration = Duration::from_secs(3600);
const MAX_BACKDATE: Duration = Duration::from_secs(60);
