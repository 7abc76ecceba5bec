//! The CA's HTTPS API (HTTP/1.1 over TLS 1.3; the serving certificate is issued from the
//! root itself and renewed at half life):
//!
//! - `POST /v1/certificates`, `Authorization: Bearer <node token>` (static mode) or
//!   `<the agent's projected service account token>` (Kubernetes mode), body
//!   `{"identity", "csr", "lifetimeSeconds"}` → 200 `{"certChain", "trustBundle"}`.
//! - Errors: `{"error": "<reason>", "message"}` with 400 (bad JSON, identity or CSR),
//!   401 (`unknown_credential`, `unauthenticated`, `wrong_audience`), 403
//!   (`identity_not_allowed`, `identity_not_on_node`, …), 404, 405, 500, 503
//!   (`api_unavailable`).
//!
//! Every decision is logged with the node, identity and serial or reason, and every refusal
//! is counted by reason (`metrics`). In Kubernetes mode the server also runs the trust
//! bundle publisher; with `metricsListen`, the metrics server.

use std::{
    convert::Infallible,
    fmt,
    future::Future,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header, service::service_fn};
use hyper_util::rt::TokioIo;
use rustls::{
    ServerConfig,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use super::{
    Authorization, Authorizer, Config, Error, KubernetesAuthorizer, metrics, metrics::Metrics,
    trust_bundle::Publisher,
};
use crate::{
    http,
    identity::{
        SpiffeId,
        ca_api::{CERTIFICATES_PATH, CertificateRequest, CertificateResponse, ErrorResponse},
        signer::Signer,
    },
    sync::Mutex,
};

/// A bound CA server, ready to run.
pub struct Server {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
    metrics_listener: Option<TcpListener>,
    publishers: Vec<Publisher>,
}

struct Shared {
    signer: Arc<Signer>,
    authorizer: Authorizer,
    metrics: Arc<Metrics>,
}

impl Server {
    /// Loads the root, issues the serving certificate and binds `config.listen` (and
    /// `metricsListen`). Kubernetes mode connects to the API as the environment says (the
    /// pod's service account in a cluster, else KUBECONFIG).
    pub async fn bind(config: Config) -> Result<Self, Error> {
        let client = match config.authorization {
            Authorization::Static(_) => None,
            Authorization::Kubernetes(_) => Some(
                kube::Client::try_default()
                    .await
                    .map_err(|e| Error::KubeClient(Box::new(e)))?,
            ),
        };
        Self::bind_with_client(config, client).await
    }

    /// Like [`Server::bind`], with this Kubernetes API client (used in Kubernetes mode only;
    /// tests hand in a fake API).
    pub async fn bind_with_client(
        config: Config,
        client: Option<kube::Client>,
    ) -> Result<Self, Error> {
        let signer = Arc::new(
            Signer::load(
                &config.ca_cert,
                &config.ca_key,
                &config.trust_domain,
                config.max_cert_lifetime,
            )?
            .with_trusted_roots(&config.trusted_roots)?,
        );
        let resolver = ServingCertResolver::new(Arc::clone(&signer), config.server_names)?;
        let mut tls = ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(Error::Tls)?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| Error::Bind {
                addr: config.listen,
                source,
            })?;
        let metrics_listener = match config.metrics_listen {
            Some(addr) => Some(metrics::bind(addr).await?),
            None => None,
        };
        let metrics = Arc::new(Metrics::new());
        let (authorizer, publishers) = match (config.authorization, client) {
            (Authorization::Static(nodes), _) => (Authorizer::Static(nodes), Vec::new()),
            (Authorization::Kubernetes(kubernetes), Some(client)) => {
                let roots = signer.trust_bundle_pem();
                let name = &kubernetes.trust_bundle_config_map;
                let mut publishers = vec![Publisher::new(
                    client.clone(),
                    name,
                    &roots,
                    Arc::clone(&metrics),
                )];
                for namespace in &kubernetes.trust_bundle_namespaces {
                    if namespace != client.default_namespace() {
                        publishers.push(Publisher::in_namespace(
                            client.clone(),
                            namespace,
                            name,
                            &roots,
                            Arc::clone(&metrics),
                        ));
                    }
                }
                let authorizer = KubernetesAuthorizer::new(client, &kubernetes);
                (Authorizer::Kubernetes(Box::new(authorizer)), publishers)
            }
            (Authorization::Kubernetes(_), None) => {
                return Err(Error::Bug(
                    "Kubernetes mode without a Kubernetes client".into(),
                ));
            }
        };
        Ok(Self {
            listener,
            acceptor: TlsAcceptor::from(Arc::new(tls)),
            shared: Arc::new(Shared {
                signer,
                authorizer,
                metrics,
            }),
            metrics_listener,
            publishers,
        })
    }

    /// The bound metrics address, when `metricsListen` is set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// The bound address (the real port when `listen` said port 0).
    pub fn local_addr(&self) -> Result<SocketAddr, Error> {
        self.listener.local_addr().map_err(|source| Error::Bind {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            source,
        })
    }

    /// Serves until `shutdown` completes. Connections in progress finish on their own.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        // Both helpers end with the server: aborted when these guards drop.
        let _publishers: Vec<_> = self
            .publishers
            .into_iter()
            .map(|p| AbortOnDrop(tokio::spawn(p.run())))
            .collect();
        let _metrics = self.metrics_listener.map(|l| {
            AbortOnDrop(tokio::spawn(metrics::serve(
                l,
                Arc::clone(&self.shared.metrics),
            )))
        });
        let gate = http::Gate::new(
            "ca",
            http::Limits::default(),
            self.shared.metrics.http.clone(),
        );
        tokio::pin!(shutdown);
        loop {
            let (tcp, peer) = tokio::select! {
                () = &mut shutdown => return,
                accepted = self.listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        warn!(component = "ca", error = %e, "cannot accept a connection");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                },
            };
            // Over a cap: closed before the handshake costs anything.
            let Some(admitted) = gate.admit(peer.ip()) else {
                continue;
            };
            let acceptor = self.acceptor.clone();
            let shared = Arc::clone(&self.shared);
            let gate = Arc::clone(&gate);
            tokio::spawn(async move {
                let _admitted = admitted;
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
                {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        debug!(component = "ca", peer = %peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        gate.refused("handshake_timeout");
                        debug!(component = "ca", peer = %peer, "TLS handshake timed out");
                        return;
                    }
                };
                let limits = *gate.limits();
                let service_gate = Arc::clone(&gate);
                let service = service_fn(move |req| {
                    let shared = Arc::clone(&shared);
                    let gate = Arc::clone(&service_gate);
                    async move { Ok::<_, Infallible>(handle(&shared, &gate, peer, req).await) }
                });
                // The header timeout keeps idle or slow clients from holding connections.
                if let Err(e) = http::builder(&limits)
                    .serve_connection(TokioIo::new(tls), service)
                    .await
                {
                    if e.is_timeout() {
                        gate.refused("header_timeout");
                    }
                    debug!(component = "ca", peer = %peer, error = %e, "connection ended with an error");
                }
            });
        }
    }
}

/// Aborts a helper task when the server stops.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn handle(
    shared: &Shared,
    gate: &http::Gate,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    if req.uri().path() != CERTIFICATES_PATH {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            "the only endpoint is POST /v1/certificates",
        );
    }
    if req.method() != Method::POST {
        let mut response = error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "use POST",
        );
        response
            .headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("POST"));
        return response;
    }
    let credential = bearer_token(req.headers()).unwrap_or_default();
    let body = match http::read_body(req, gate.limits()).await {
        Ok(req) => req.into_body(),
        Err(e) => {
            gate.refused(e.reason());
            shared.metrics.refused(e.reason());
            warn!(component = "ca", peer = %peer, reason = e.reason(), error = %e, "certificate request rejected");
            return error(e.status(), e.reason(), &e.to_string());
        }
    };
    let request: CertificateRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return deny_bad_request(shared, peer, "bad_request", &format!("invalid JSON: {e}"));
        }
    };
    let identity: SpiffeId = match request.identity.parse() {
        Ok(id) => id,
        Err(e) => return deny_bad_request(shared, peer, "invalid_identity", &e.to_string()),
    };
    let node = match shared.authorizer.authorize(&credential, &identity).await {
        Ok(node) => node,
        Err(denied) => {
            shared.metrics.refused(denied.reason());
            warn!(component = "ca", peer = %peer, node = denied.node().unwrap_or("unknown"),
                identity = %identity, reason = denied.reason(), error = %denied,
                "certificate request denied");
            return error(
                status(denied.http_status()),
                denied.reason(),
                &denied.to_string(),
            );
        }
    };
    let lifetime = request
        .lifetime_seconds
        .map_or(shared.signer.max_lifetime(), Duration::from_secs);
    match shared.signer.sign(&identity, &request.csr, lifetime) {
        Ok(issued) => {
            shared.metrics.issued();
            info!(component = "ca", peer = %peer, node = %node, identity = %identity,
                serial = %issued.serial,
                not_after = %humantime::format_rfc3339_seconds(issued.not_after),
                "certificate issued");
            json(
                StatusCode::OK,
                &CertificateResponse {
                    cert_chain: issued.chain_pem,
                    trust_bundle: issued.trust_bundle_pem,
                },
            )
        }
        Err(e) => {
            shared.metrics.refused(e.reason());
            warn!(component = "ca", peer = %peer, node = %node, identity = %identity,
                reason = e.reason(), error = %e, "certificate request rejected");
            error(status(e.http_status()), e.reason(), &e.to_string())
        }
    }
}

/// The token of `Authorization: Bearer <token>` (the scheme is case-insensitive, RFC 7235).
fn bearer_token(headers: &header::HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_owned())
}

/// A request rejected before it named a valid identity: bad JSON or SPIFFE id.
fn deny_bad_request(
    shared: &Shared,
    peer: SocketAddr,
    reason: &'static str,
    message: &str,
) -> Response<Full<Bytes>> {
    shared.metrics.refused(reason);
    warn!(component = "ca", peer = %peer, reason, error = message, "certificate request rejected");
    error(StatusCode::BAD_REQUEST, reason, message)
}

fn error(status: StatusCode, reason: &str, message: &str) -> Response<Full<Bytes>> {
    json(
        status,
        &ErrorResponse {
            error: reason.to_owned(),
            message: message.to_owned(),
        },
    )
}

fn json(status: StatusCode, body: &impl Serialize) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(body).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

fn status(code: u16) -> StatusCode {
    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// Hands rustls the CA's serving certificate, reissuing it from the root once half of
/// its lifetime has passed (checked at each handshake: signing takes microseconds).
struct ServingCertResolver {
    signer: Arc<Signer>,
    names: Vec<String>,
    current: Mutex<(Arc<CertifiedKey>, SystemTime)>,
}

impl ServingCertResolver {
    fn new(signer: Arc<Signer>, names: Vec<String>) -> Result<Self, Error> {
        let current = issue_serving(&signer, &names)?;
        Ok(Self {
            signer,
            names,
            current: Mutex::new(current),
        })
    }
}

impl ResolvesServerCert for ServingCertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let (key, renew_at) = self.current.lock().clone();
        if SystemTime::now() < renew_at {
            return Some(key);
        }
        match issue_serving(&self.signer, &self.names) {
            Ok(fresh) => {
                let key = Arc::clone(&fresh.0);
                *self.current.lock() = fresh;
                info!(component = "ca", "serving certificate renewed");
                Some(key)
            }
            Err(e) => {
                // Keep serving the old one: it is still valid for the other half.
                warn!(component = "ca", error = %e, "cannot renew the serving certificate");
                Some(key)
            }
        }
    }
}

impl fmt::Debug for ServingCertResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServingCertResolver")
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

fn issue_serving(
    signer: &Signer,
    names: &[String],
) -> Result<(Arc<CertifiedKey>, SystemTime), Error> {
    let cert = signer.issue_serving(names, SERVING_CERT_LIFETIME)?;
    let key = rustls::crypto::aws_lc_rs::sign::any_supported_type(&cert.key).map_err(Error::Tls)?;
    let lifetime = cert
        .not_after
        .duration_since(cert.not_before)
        .unwrap_or_default();
    Ok((
        Arc::new(CertifiedKey::new(cert.chain, key)),
        cert.not_before + lifetime / 2,
    ))
}

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
const SERVING_CERT_LIFETIME: Duration = Duration::from_secs(24 * 3600);
