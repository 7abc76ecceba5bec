//! The gateway's front door: the ports of its Gateway's listeners, bound and unbound as the
//! snapshot changes, plain HTTP or TLS terminated with the certificate the client's SNI
//! picks; every connection's requests then go through the same engine as a waypoint's
//! (`Tunnel::serve_http`, routed by the listener's routes). TLS passthrough and TCP
//! listeners pass the connection's bytes to one backend endpoint (`passthrough`), picked by
//! the listener's TLSRoute (by SNI) or TCPRoute.
//!
//! Certificates are looked up at each handshake in the snapshot in force, so a Secret
//! that changes serves its new certificate to the next handshake while open connections
//! keep theirs. Each connection holds a drain guard; the listeners close when the drain
//! starts.
//!
//! Limits against a client that wants to hold the gateway: at most `MAX_CONNECTIONS` open
//! connections (more are closed at once and counted), a TLS handshake within
//! `HANDSHAKE_TIMEOUT`, a request head within the HTTP server's header timeout.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Weak},
    time::Duration,
};

use rustls::{
    pki_types::{
        CertificateDer, PrivateKeyDer, PrivatePkcs1KeyDer, PrivatePkcs8KeyDer, PrivateSec1KeyDer,
    },
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tokio::{net::TcpListener, sync::Semaphore, task::JoinHandle};
use tracing::{debug, info};

mod passthrough;

use super::{Inner, Target, Tunnel, Waypoint, server::ACCEPT_RETRY};
use crate::{
    hbone,
    state::{
        Snapshot, WorkloadRef,
        gateway::{Gateway, KeyKind, ListenerProtocol, TlsCertificate, hostname_matches},
    },
    sync::Mutex,
};

/// Open connections across all listeners, beyond which new ones are closed at once.
pub const MAX_CONNECTIONS: usize = 16_384;
/// How long a client has to complete its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A listening port and the protocol it serves.
struct Bound {
    protocol: ListenerProtocol,
    task: JoinHandle<()>,
}

impl Waypoint {
    /// Serves the listeners of the Gateway named like this waypoint (its `Config::name`),
    /// each port bound at `ip`, until the drain starts: ports follow the snapshot. `bound`
    /// learns the ports listening after each change (tests, readiness).
    pub async fn serve_gateway(
        self,
        ip: IpAddr,
        bound: tokio::sync::watch::Sender<Vec<SocketAddr>>,
    ) {
        let inner = Arc::clone(&self.inner);
        let mut state = inner.state.clone();
        let draining = inner.drain.draining();
        tokio::pin!(draining);
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let certificates = Arc::new(Certificates::new(Arc::downgrade(&inner)));
        let mut ports: BTreeMap<u16, Bound> = BTreeMap::new();
        loop {
            let wanted = wanted_ports(&state.borrow_and_update(), &inner.config.name);
            ports.retain(|port, open| {
                let keep = wanted.get(port) == Some(&open.protocol);
                if !keep {
                    open.task.abort();
                    info!(component = "gateway", port, "listener closed");
                }
                keep
            });
            for (&port, &protocol) in &wanted {
                if ports.contains_key(&port) {
                    continue;
                }
                let addr = SocketAddr::new(ip, port);
                let listener = match bind(addr) {
                    Ok(listener) => listener,
                    Err(e) => {
                        crate::warn_limited!(component = "gateway", port, error = %e,
                            "cannot bind the listener's port; retrying on the next change");
                        continue;
                    }
                };
                info!(component = "gateway", addr = %addr, ?protocol, "listening");
                let tls = (protocol == ListenerProtocol::Https)
                    .then(|| server_config(Arc::clone(&certificates), port));
                let task = tokio::spawn(accept(
                    Arc::clone(&inner),
                    listener,
                    port,
                    protocol,
                    tls,
                    Arc::clone(&slots),
                ));
                ports.insert(port, Bound { protocol, task });
            }
            certificates.forget_unused(&state.borrow());
            bound.send_replace(ports.keys().map(|&p| SocketAddr::new(ip, p)).collect());
            tokio::select! {
                changed = state.changed() => if changed.is_err() { break },
                // A port that failed to bind is tried again.
                () = tokio::time::sleep(REBIND_INTERVAL), if ports.len() < wanted.len() => {}
                () = &mut draining => break,
            }
        }
        for open in ports.into_values() {
            open.task.abort();
        }
    }
}

/// The ports of `gateway`'s listeners and their protocol; where listeners of one port
/// disagree, the first one's protocol (the others cannot be served on it).
fn wanted_ports(snapshot: &Snapshot, gateway: &WorkloadRef) -> BTreeMap<u16, ListenerProtocol> {
    let mut ports = BTreeMap::new();
    for listener in snapshot
        .gateways
        .get(gateway)
        .map_or(&[][..], |g| &g.listeners)
    {
        ports.entry(listener.port).or_insert(listener.protocol);
    }
    ports
}

/// Accepts on one port until aborted: each connection on its own task, holding a slot and
/// a drain guard.
async fn accept(
    inner: Arc<Inner>,
    listener: TcpListener,
    port: u16,
    protocol: ListenerProtocol,
    tls: Option<Arc<rustls::ServerConfig>>,
    slots: Arc<Semaphore>,
) {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    loop {
        let (tcp, client) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                crate::warn_limited!(component = "gateway", port, error = %e, "accept failed");
                tokio::time::sleep(ACCEPT_RETRY).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            inner.metrics.connection_error("connection_limit");
            crate::warn_limited!(component = "gateway", src = %client, limit = MAX_CONNECTIONS,
                "connection refused: the gateway holds its most open connections");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let tunnel = Tunnel {
            inner: Arc::clone(&inner),
            target: Target::Listener {
                gateway: inner.config.name.clone(),
                port,
                protocol,
            },
            // What carries the request into the mesh, and what the backends' policy sees.
            peer_identity: inner.config.identity.clone(),
            source: client,
        };
        let (guard, cut) = (inner.drain.guard(), inner.drain.cut_off());
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let served = async {
                match acceptor {
                    None if !protocol.is_http() => passthrough::serve(tunnel, tcp).await,
                    None => tunnel.serve_http(tcp).await,
                    Some(acceptor) => {
                        let metrics = &tunnel.inner.metrics;
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                            Ok(Ok(stream)) => {
                                metrics.tls_handshake("ok");
                                tunnel.serve_http(stream).await;
                            }
                            Ok(Err(e)) => {
                                let result = if e.to_string().contains(NO_CERTIFICATE) {
                                    "no_certificate"
                                } else {
                                    "failed"
                                };
                                metrics.tls_handshake(result);
                                debug!(component = "gateway", src = %client, port, result, error = %e,
                                    "TLS handshake failed");
                            }
                            Err(_) => metrics.tls_handshake("timeout"),
                        }
                    }
                }
            };
            tokio::select! {
                () = served => {}
                () = cut => {}
            }
            drop((guard, slot));
        });
    }
}

/// The TLS settings of an HTTPS port: TLS 1.2 and 1.3, HTTP/2 or HTTP/1.1 by ALPN, the
/// certificate by SNI.
fn server_config(certificates: Arc<Certificates>, port: u16) -> Arc<rustls::ServerConfig> {
    let provider = hbone::tls::provider();
    let builder = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("the provider supports the default protocol versions");
    let mut config = builder
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(PortCertificates { certificates, port }));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(config)
}

/// What a failed resolution makes rustls say: how the handshake's failure is told apart.
const NO_CERTIFICATE: &str = "no server certificate chain resolved";

/// The certificates of one HTTPS port.
#[derive(Debug)]
struct PortCertificates {
    certificates: Arc<Certificates>,
    port: u16,
}

impl ResolvesServerCert for PortCertificates {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let sni = hello.server_name().map(str::to_ascii_lowercase);
        self.certificates.pick(self.port, sni.as_deref())
    }
}

/// Certificates loaded for TLS, by the fingerprint of their leaf: loading parses the key,
/// which is not done per handshake.
#[derive(Debug)]
struct Certificates {
    inner: Weak<Inner>,
    loaded: Mutex<HashMap<String, Arc<Loaded>>>,
}

/// A certificate ready for rustls, with the DNS names it is valid for.
#[derive(Debug)]
struct Loaded {
    key: Arc<CertifiedKey>,
    /// Its subject alternative names, lowercase (`*.` wildcards kept).
    names: Vec<String>,
}

impl Certificates {
    fn new(inner: Weak<Inner>) -> Self {
        Self {
            inner,
            loaded: Mutex::new(HashMap::new()),
        }
    }

    /// The certificate for a handshake on `port` with `sni`: the listener the SNI picks
    /// (the most specific hostname match), then the first of its certificates valid for
    /// the name, else its first. `None` (the handshake fails) when no HTTPS listener of
    /// the port serves the name.
    fn pick(&self, port: u16, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let inner = self.inner.upgrade()?;
        let snapshot = Arc::clone(&inner.state.borrow());
        let gateway = snapshot.gateways.get(&inner.config.name)?;
        let listener = super::route::listener_for(gateway, port, ListenerProtocol::Https, sni)?;
        let mut first = None;
        for name in &listener.certificates {
            let Some(loaded) = self.load(&snapshot, gateway, name) else {
                continue;
            };
            if sni.is_some_and(|sni| loaded.names.iter().any(|n| hostname_matches(n, sni))) {
                return Some(Arc::clone(&loaded.key));
            }
            first.get_or_insert(loaded);
        }
        first.map(|loaded| Arc::clone(&loaded.key))
    }

    /// The Secret `name`'s certificate, loaded once per fingerprint; `None` when the
    /// snapshot lacks it or it cannot be loaded (logged).
    fn load(
        &self,
        snapshot: &Snapshot,
        gateway: &Gateway,
        name: &WorkloadRef,
    ) -> Option<Arc<Loaded>> {
        let Some(certificate) = snapshot.tls_certificates.get(name) else {
            crate::warn_limited!(component = "gateway", gateway = %gateway.name, secret = %name,
                "a listener names a certificate Secret that is not there (or not valid)");
            return None;
        };
        if let Some(loaded) = self.loaded.lock().get(&certificate.fingerprint) {
            return Some(Arc::clone(loaded));
        }
        match loaded(certificate) {
            Ok(loaded) => {
                let loaded = Arc::new(loaded);
                self.loaded
                    .lock()
                    .insert(certificate.fingerprint.clone(), Arc::clone(&loaded));
                Some(loaded)
            }
            Err(reason) => {
                crate::warn_limited!(component = "gateway", secret = %name, reason,
                    "cannot load the certificate Secret for TLS");
                None
            }
        }
    }

    /// Drops the certificates `snapshot` no longer has.
    fn forget_unused(&self, snapshot: &Snapshot) {
        self.loaded.lock().retain(|fingerprint, _| {
            snapshot
                .tls_certificates
                .values()
                .any(|c| &c.fingerprint == fingerprint)
        });
    }
}

/// `certificate` ready for rustls.
fn loaded(certificate: &TlsCertificate) -> Result<Loaded, String> {
    let key = certificate.key.as_ref().clone();
    let key: PrivateKeyDer<'static> = match certificate.key_kind {
        KeyKind::Pkcs8 => PrivatePkcs8KeyDer::from(key).into(),
        KeyKind::Pkcs1 => PrivatePkcs1KeyDer::from(key).into(),
        KeyKind::Sec1 => PrivateSec1KeyDer::from(key).into(),
    };
    let signing = hbone::tls::provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| e.to_string())?;
    let chain: Vec<CertificateDer<'static>> = certificate
        .chain
        .iter()
        .map(|der| CertificateDer::from(der.clone()))
        .collect();
    let leaf = chain.first().ok_or("the chain is empty")?;
    let names = dns_names(leaf)?;
    Ok(Loaded {
        key: Arc::new(CertifiedKey::new(chain, signing)),
        names,
    })
}

/// The DNS subject alternative names of `leaf`, lowercase.
fn dns_names(leaf: &CertificateDer<'_>) -> Result<Vec<String>, String> {
    use x509_parser::{extensions::GeneralName, prelude::*};
    let (_, cert) = X509Certificate::from_der(leaf).map_err(|e| e.to_string())?;
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Ok(Vec::new());
    };
    Ok(san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(dns) => Some(dns.to_ascii_lowercase()),
            _ => None,
        })
        .collect())
}

/// A listening socket at `addr`, reusing a port a previous gateway process left in
/// TIME_WAIT.
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Connections waiting to be accepted, per port.
const BACKLOG: u32 = 1024;

/// How often a port that could not be bound is tried again.
const REBIND_INTERVAL: Duration = Duration::from_secs(1);
