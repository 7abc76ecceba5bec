//! Client of the CA's HTTPS API (`POST /v1/certificates`, see `crate::ca::server`). Verifies the
//! CA against a configured root and server name, and reads the node's bearer token from
//! its file on every request, so a rotated token is picked up without a restart.

use std::{
    fmt, fs,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{Method, Request, StatusCode, header};
use hyper_util::rt::TokioIo;
use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, ServerName},
};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::identity::{
    SpiffeId,
    ca_api::{CERTIFICATES_PATH, CertificateRequest, CertificateResponse, ErrorResponse},
};

/// A CA client error. `reason()` is a stable label; `Rejected` also carries the CA's own.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the CA root certificate {path}: {source}")]
    ReadRoot {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the CA root certificate {path} is not usable: {reason}")]
    InvalidRoot { path: PathBuf, reason: String },
    #[error("invalid CA server name {0:?}")]
    InvalidServerName(String),
    #[error("cannot read the node token {path}: {source}")]
    ReadToken {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot connect to the CA at {addr}: {source} (is `weft ca` running and reachable?)")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "TLS with the CA at {addr} failed: {source} (does caRootCert/serverName match the CA?)"
    )]
    Tls {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP exchange with the CA failed: {0}")]
    Http(#[source] hyper::Error),
    #[error("the CA did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the CA refused ({status} {reason}): {message}")]
    Rejected {
        status: u16,
        /// The CA's `error` field (`identity_not_allowed`, …).
        reason: String,
        message: String,
    },
    #[error("the CA's answer is not valid: {0}")]
    InvalidResponse(String),
}

/// Where the CA is and how to reach it.
#[derive(Clone, Debug)]
pub struct Config {
    /// `host:port`.
    pub addr: String,
    /// The name the CA's serving certificate must carry (DNS name or IP).
    pub server_name: String,
    /// The CA root, PEM.
    pub root_cert: PathBuf,
    /// File holding this node's bearer token.
    pub token_file: PathBuf,
}

/// What the CA returned: the chain (leaf first) and the roots, PEM.
#[derive(Clone, Debug)]
pub struct Signed {
    pub cert_chain: Vec<String>,
    pub trust_bundle: Vec<String>,
}

/// HTTPS client of `weft ca`. Cheap to clone.
#[derive(Clone)]
pub struct CaClient {
    addr: String,
    server_name: ServerName<'static>,
    tls: TlsConnector,
    token_file: PathBuf,
    roots: Arc<Vec<CertificateDer<'static>>>,
}

impl CaClient {
    pub fn new(config: &Config) -> Result<Self, Error> {
        let pem = fs::read_to_string(&config.root_cert).map_err(|source| Error::ReadRoot {
            path: config.root_cert.clone(),
            source,
        })?;
        let invalid = |reason: String| Error::InvalidRoot {
            path: config.root_cert.clone(),
            reason,
        };
        let roots: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| invalid(e.to_string()))?;
        if roots.is_empty() {
            return Err(invalid("no certificate in PEM".into()));
        }
        let mut store = RootCertStore::empty();
        for root in &roots {
            store
                .add(root.clone())
                .map_err(|e| invalid(e.to_string()))?;
        }
        let server_name = ServerName::try_from(config.server_name.clone())
            .map_err(|_| Error::InvalidServerName(config.server_name.clone()))?;
        let mut tls = ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| invalid(e.to_string()))?
        .with_root_certificates(store)
        .with_no_client_auth();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            addr: config.addr.clone(),
            server_name,
            tls: TlsConnector::from(Arc::new(tls)),
            token_file: config.token_file.clone(),
            roots: Arc::new(roots),
        })
    }

    /// The configured CA root(s): the trust bundle until the CA sends one.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// Asks the CA to sign `csr_pem` for `identity`.
    pub async fn sign(
        &self,
        identity: &SpiffeId,
        csr_pem: &str,
        lifetime: Duration,
    ) -> Result<Signed, Error> {
        tokio::time::timeout(REQUEST_TIMEOUT, self.exchange(identity, csr_pem, lifetime))
            .await
            .map_err(|_| Error::Timeout(REQUEST_TIMEOUT))?
    }

    async fn exchange(
        &self,
        identity: &SpiffeId,
        csr_pem: &str,
        lifetime: Duration,
    ) -> Result<Signed, Error> {
        let token = read_token(&self.token_file)?;
        let body = serde_json::to_vec(&CertificateRequest {
            identity: identity.to_string(),
            csr: csr_pem.to_owned(),
            lifetime_seconds: Some(lifetime.as_secs().max(1)),
        })
        .map_err(|e| Error::InvalidResponse(format!("BUG: cannot encode the request: {e}")))?;

        let tcp = TcpStream::connect(&self.addr)
            .await
            .map_err(|source| Error::Connect {
                addr: self.addr.clone(),
                source,
            })?;
        let tls = self
            .tls
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|source| Error::Tls {
                addr: self.addr.clone(),
                source,
            })?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(tls))
                .await
                .map_err(Error::Http)?;
        // One request per connection: certificates are asked for once per half life.
        let connection = tokio::spawn(connection);
        let request = Request::builder()
            .method(Method::POST)
            .uri(CERTIFICATES_PATH)
            .header(header::HOST, self.server_name.to_str().as_ref())
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| Error::InvalidResponse(format!("BUG: cannot build the request: {e}")))?;
        let response = sender.send_request(request).await.map_err(Error::Http)?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| Error::InvalidResponse(format!("cannot read the body: {e}")))?
            .to_bytes();
        connection.abort();
        if status != StatusCode::OK {
            let (reason, message) = match serde_json::from_slice::<ErrorResponse>(&body) {
                Ok(e) => (e.error, e.message),
                Err(_) => (
                    "unknown".to_owned(),
                    String::from_utf8_lossy(&body[..body.len().min(256)]).into_owned(),
                ),
            };
            return Err(Error::Rejected {
                status: status.as_u16(),
                reason,
                message,
            });
        }
        let signed: CertificateResponse = serde_json::from_slice(&body)
            .map_err(|e| Error::InvalidResponse(format!("invalid JSON: {e}")))?;
        if signed.cert_chain.is_empty() {
            return Err(Error::InvalidResponse("empty certChain".into()));
        }
        Ok(Signed {
            cert_chain: signed.cert_chain,
            trust_bundle: signed.trust_bundle,
        })
    }
}

impl fmt::Debug for CaClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaClient")
            .field("addr", &self.addr)
            .field("server_name", &self.server_name)
            .field("token_file", &self.token_file)
            .finish_non_exhaustive()
    }
}

impl Error {
    /// Stable snake_case label for status and metrics. For `Rejected`, see also
    /// [`Error::ca_reason`].
    pub fn reason(&self) -> &'static str {
        match self {
            Self::ReadRoot { .. } | Self::InvalidRoot { .. } => "invalid_ca_root",
            Self::InvalidServerName(_) => "invalid_server_name",
            Self::ReadToken { .. } => "token_unreadable",
            Self::Connect { .. } => "ca_unreachable",
            Self::Tls { .. } => "ca_tls_failed",
            Self::Http(_) => "ca_http_failed",
            Self::Timeout(_) => "ca_timeout",
            Self::Rejected { .. } => "ca_rejected",
            Self::InvalidResponse(_) => "ca_invalid_response",
        }
    }

    /// The HTTP status of a CA refusal.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Rejected { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The CA's own reason for a refusal (`identity_not_allowed`, …), else `reason()`.
    pub fn ca_reason(&self) -> &str {
        match self {
            Self::Rejected { reason, .. } => reason,
            other => other.reason(),
        }
    }
}

fn read_token(path: &Path) -> Result<String, Error> {
    let read_err = |source| Error::ReadToken {
        path: path.to_owned(),
        source,
    };
    let token = fs::read_to_string(path).map_err(read_err)?;
    let token = token.trim();
    if token.is_empty() {
        return Err(read_err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the file is empty",
        )));
    }
    Ok(token.to_owned())
}

const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_RESPONSE: usize = 256 * 1024;
