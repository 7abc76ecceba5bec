//! `https-serve`: a file over HTTPS (TLS 1.3, HTTP/1.1 or h2 by ALPN), as a JWKS endpoint
//! serves its key set. The file is read again for every request, so a test rotates keys by
//! rewriting it.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{
        Arc,
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
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use weft_tests::jwt::ServedFile;

use crate::Flags;

pub fn serve(flags: &Flags) -> Result<ExitCode, String> {
    let cert: PathBuf = flags.required("cert")?;
    let key: PathBuf = flags.required("key")?;
    let file: PathBuf = flags.required("file")?;
    let acceptor = acceptor(&cert, &key)?;
    crate::run_server(flags, "https", "file", |listener| {
        serve_listener(listener, acceptor, file, |served| {
            println!("fetch {}", crate::json_line(served));
        })
    })
}

/// A TLS 1.3 acceptor (aws-lc-rs) for this certificate chain and key, offering h2 and
/// HTTP/1.1.
pub fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, String> {
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
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Answers every request on `listener` with `file`'s content; `log` sees each answer.
pub async fn serve_listener(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    file: PathBuf,
    log: impl Fn(&ServedFile) + Send + Sync + 'static,
) {
    let server = Arc::new(FileServer {
        file,
        seq: AtomicU64::new(0),
        log: Box::new(log),
    });
    crate::accept_loop(listener, move |stream, peer| {
        let (server, acceptor) = (Arc::clone(&server), acceptor.clone());
        async move {
            let tls = match acceptor.accept(stream).await {
                Ok(tls) => tls,
                Err(e) => {
                    println!("tls_error peer={peer} error={e}");
                    return;
                }
            };
            let version = tls
                .get_ref()
                .1
                .protocol_version()
                .map_or_else(|| "unknown".to_owned(), |v| format!("{v:?}"));
            let service = service_fn(move |req| {
                let (server, version) = (Arc::clone(&server), version.clone());
                async move { Ok::<_, std::convert::Infallible>(server.answer(&req, peer, version)) }
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
