//! `https-serve`: a file over HTTPS (TLS 1.3, HTTP/1.1 or h2 by ALPN), as a JWKS endpoint
//! serves its key set, or an external host answers. The file is read again for every
//! request, so a test rotates keys by rewriting it. Besides `fetch {..}` per request, the
//! server prints what an external host sees of each connection: `accepted {..}` for every
//! TCP connection (before any TLS), `hello {..}` with the ClientHello's server name, and
//! `tls_error {..}` for a handshake that failed (`weft_tests::tls::{Accepted, Hello, TlsError}`).
//!
//! `https-get`: one GET over TLS 1.3 from inside a pod, trusting only the test's CA.
//!
//! [`ClientTls`]: the TLS the L7 clients (`http-load`, `grpc-call`) open with `--tls-ca PEM
//! [--sni NAME]`, recording the certificate the server presented on every handshake.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use rustls::{
    DigitallySignedStruct, SignatureScheme,
    client::{
        WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject},
};
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{LazyConfigAcceptor, TlsConnector, client::TlsStream};
use weft_tests::{
    jwt::ServedFile,
    tls::{Accepted, Hello, TlsError},
};

use crate::Flags;

pub fn serve(flags: &Flags) -> Result<ExitCode, String> {
    let cert: PathBuf = flags.required("cert")?;
    let key: PathBuf = flags.required("key")?;
    let file: PathBuf = flags.required("file")?;
    let config = server_config(&cert, &key)?;
    crate::run_server(flags, "https", "file", |listener| {
        serve_listener(listener, config, file, |served| {
            println!("fetch {}", crate::json_line(served));
        })
    })
}

/// A TLS 1.3 server config (aws-lc-rs) for this certificate chain and key, offering h2 and
/// HTTP/1.1.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, String> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|e| format!("read certificates from {}: {e}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("read a private key from {}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| format!("TLS 1.3: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("certificate and key: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Answers every request on `listener` with `file`'s content; `log` sees each answer.
pub async fn serve_listener(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    file: PathBuf,
    log: impl Fn(&ServedFile) + Send + Sync + 'static,
) {
    let server = Arc::new(FileServer {
        file,
        seq: AtomicU64::new(0),
        log: Box::new(log),
    });
    crate::accept_loop(listener, move |stream, peer| {
        let (server, config) = (Arc::clone(&server), Arc::clone(&config));
        async move {
            let local = crate::addr_or_unknown(stream.local_addr());
            event(
                "accepted",
                &Accepted {
                    peer: peer.to_string(),
                    local,
                },
            );
            // The ClientHello first, so the server name is known even when the handshake
            // fails (a client that does not trust this server's CA).
            let start = match LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream)
                .await
            {
                Ok(start) => start,
                Err(e) => {
                    event(
                        "tls_error",
                        &TlsError {
                            peer: peer.to_string(),
                            sni: None,
                            error: e.to_string(),
                        },
                    );
                    return;
                }
            };
            let sni = start.client_hello().server_name().map(str::to_owned);
            event(
                "hello",
                &Hello {
                    peer: peer.to_string(),
                    sni: sni.clone(),
                },
            );
            let tls = match start.into_stream(config).await {
                Ok(tls) => tls,
                Err(e) => {
                    event(
                        "tls_error",
                        &TlsError {
                            peer: peer.to_string(),
                            sni,
                            error: e.to_string(),
                        },
                    );
                    return;
                }
            };
            let version = tls
                .get_ref()
                .1
                .protocol_version()
                .map_or_else(|| "unknown".to_owned(), |v| format!("{v:?}"));
            let service = service_fn(move |req| {
                let (server, version, sni) = (Arc::clone(&server), version.clone(), sni.clone());
                async move {
                    Ok::<_, std::convert::Infallible>(server.answer(&req, peer, version, sni))
                }
            });
            if let Err(e) = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), service)
                .await
            {
                println!("connection_error peer={peer} error={e}");
            }
        }
    })
    .await;
}

/// `https-get --to IP:PORT --ca PEM [--sni NAME] [--path P]`: one GET over TLS 1.3,
/// trusting only the CA in `--ca` and checking the certificate against `--sni` (else the
/// IP address). Prints `response {"body": ..}` and exits 0 on a 200; else `error
/// stage=https kind=<io::ErrorKind or Other> error=..` and exits 1.
pub fn get(flags: &Flags) -> Result<ExitCode, String> {
    let to: SocketAddr = flags.required("to")?;
    let ca: PathBuf = flags.required("ca")?;
    let sni: Option<String> = flags.optional("sni")?;
    let path: String = flags.optional("path")?.unwrap_or_else(|| "/".to_owned());
    let ca = std::fs::read(&ca).map_err(|e| format!("read {}: {e}", ca.display()))?;
    match weft_tests::tls::https_get(&ca, to, sni.as_deref(), &path) {
        Ok(body) => {
            println!(
                "response {}",
                crate::json_line(&serde_json::json!({ "body": body }))
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            let kind = e
                .chain()
                .find_map(|c| c.downcast_ref::<std::io::Error>())
                .map_or_else(|| "Other".to_owned(), |io| format!("{:?}", io.kind()));
            println!("error stage=https kind={kind} error={e:#}");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// The TLS a client opens (`--tls-ca PEM [--sni NAME]`): trusting only that CA, checking
/// the certificate against the name (else the address dialled), offering one ALPN
/// protocol, and recording the leaf certificate of every handshake, whether it verifies or
/// not (what a refused name was shown).
pub struct ClientTls {
    connector: TlsConnector,
    name: ServerName<'static>,
    seen: Arc<Mutex<Vec<String>>>,
}

impl ClientTls {
    /// None without `--tls-ca`.
    pub fn from_flags(flags: &Flags, to: SocketAddr, alpn: &[u8]) -> Result<Option<Self>, String> {
        let Some(ca) = flags.optional::<PathBuf>("tls-ca")? else {
            return Ok(None);
        };
        let pem = std::fs::read(&ca).map_err(|e| format!("read {}: {e}", ca.display()))?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| format!("{}: {e}", ca.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("{}: {e}", ca.display()))?;
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let inner =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
                .build()
                .map_err(|e| format!("verifier: {e}"))?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let verifier = Arc::new(Recording {
            inner,
            seen: Arc::clone(&seen),
        });
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS versions: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        config.alpn_protocols = vec![alpn.to_vec()];
        // Every handshake a full one: a resumed session shows no certificate.
        config.resumption = rustls::client::Resumption::disabled();
        let name = match flags.optional::<String>("sni")? {
            Some(sni) => {
                ServerName::try_from(sni.clone()).map_err(|e| format!("--sni {sni}: {e}"))?
            }
            None => ServerName::IpAddress(to.ip().into()),
        };
        Ok(Some(ClientTls {
            connector: TlsConnector::from(Arc::new(config)),
            name,
            seen,
        }))
    }

    /// The name asked for, as a `Host` or `:authority` (None: an address).
    pub fn host(&self) -> Option<String> {
        match &self.name {
            ServerName::DnsName(name) => Some(name.as_ref().to_owned()),
            _ => None,
        }
    }

    /// The TLS handshake on `tcp`.
    pub async fn connect(&self, tcp: TcpStream) -> Result<TlsStream<TcpStream>, String> {
        self.connector
            .connect(self.name.clone(), tcp)
            .await
            .map_err(|e| format!("TLS handshake: {e}"))
    }

    /// The SHA-256 fingerprint of the leaf certificate of every handshake so far, in order.
    pub fn seen(&self) -> Vec<String> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// The web PKI verifier, recording each leaf certificate first.
#[derive(Debug)]
struct Recording {
    inner: Arc<WebPkiServerVerifier>,
    seen: Arc<Mutex<Vec<String>>>,
}

impl ServerCertVerifier for Recording {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Ok(mut seen) = self.seen.lock() {
            seen.push(weft_tests::tls::fingerprint(end_entity));
        }
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// One `<word> {json}` line (`weft_tests::tls`'s event types).
fn event(word: &str, e: &impl serde::Serialize) {
    println!("{word} {}", crate::json_line(e));
}

struct FileServer {
    file: PathBuf,
    seq: AtomicU64,
    log: Box<dyn Fn(&ServedFile) + Send + Sync>,
}

impl FileServer {
    fn answer(
        &self,
        req: &Request<Incoming>,
        peer: SocketAddr,
        tls: String,
        sni: Option<String>,
    ) -> Response<Full<Bytes>> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        let (status, body) = match std::fs::read(&self.file) {
            Ok(body) => (StatusCode::OK, body),
            Err(e) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("read {}: {e}", self.file.display()).into_bytes(),
            ),
        };
        let served = ServedFile {
            seq,
            peer: peer.to_string(),
            method: req.method().to_string(),
            path: req
                .uri()
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_owned(),
            version: format!("{:?}", req.version()),
            tls,
            sni,
            status: status.as_u16(),
            bytes: body.len() as u64,
            sha256: crate::hex(&Sha256::digest(&body)),
        };
        // Logged before answering: once a client has its response, the line is there.
        (self.log)(&served);
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(if status.is_success() {
                "application/json"
            } else {
                "text/plain"
            }),
        );
        response
    }
}
