//! TLS origination to external services: the application speaks plaintext to a port whose
//! ExternalService has `tls`, and the proxy opens TLS to the host in its place. The
//! server's certificate must chain to the port's `caCertificates` (the system's roots when
//! unset) and name the port's `sni`; anything else fails the connection, which the
//! application sees reset. TLS 1.2 and 1.3: external hosts are web servers, not mesh peers.

use std::{collections::HashMap, sync::Arc, time::Duration};

use rustls::{ClientConfig, RootCertStore, pki_types::ServerName};
use tokio::net::TcpStream;
use tokio_rustls::{TlsConnector, client::TlsStream};

use super::Error;
use crate::{hbone::copy, state::TlsOrigination, sync::Mutex, web_roots};

/// Client configurations by trust anchors and ALPN, built once each.
#[derive(Debug, Default)]
pub struct Originator {
    configs: Mutex<HashMap<ConfigKey, Arc<ClientConfig>>>,
}

/// The port's CA PEM (None: the system's roots) and whether it carries HTTP.
type ConfigKey = (Option<String>, bool);

/// At most this many configurations are kept: more than the registry can name (256
/// services of 16 ports), so the cache only ever clears itself after churn.
const MAX_CONFIGS: usize = 4096;

impl Originator {
    /// Opens TLS over `tcp` as `tls` says, within `timeout`.
    pub async fn connect(
        &self,
        tcp: TcpStream,
        tls: &TlsOrigination,
        http: bool,
        timeout: Duration,
    ) -> Result<TlsStream<TcpStream>, Error> {
        let fail = |reason: String| Error::Originate {
            sni: tls.sni.clone(),
            reason,
        };
        let name = ServerName::try_from(tls.sni.clone())
            .map_err(|e| fail(format!("invalid server name: {e}")))?;
        let config = self.config(tls, http).map_err(fail)?;
        let handshake = TlsConnector::from(config).connect(name, tcp);
        tokio::time::timeout(timeout, handshake)
            .await
            .map_err(|_| fail(format!("no handshake within {timeout:?}")))?
            .map_err(|e| fail(e.to_string()))
    }

    fn config(&self, tls: &TlsOrigination, http: bool) -> Result<Arc<ClientConfig>, String> {
        let key = (tls.ca_certificates.clone(), http);
        if let Some(config) = self.configs.lock().get(&key) {
            return Ok(Arc::clone(config));
        }
        let roots = match &tls.ca_certificates {
            None => web_roots::system().clone(),
            Some(pem) => {
                let mut roots = RootCertStore::empty();
                web_roots::add_pem(&mut roots, pem.as_bytes())
                    .map_err(|e| format!("caCertificates: {e}"))?;
                roots
            }
        };
        let mut config = ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS configuration refused: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        if http {
            // The application speaks HTTP/1.1 in plaintext; the session must carry the same.
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
        }
        let config = Arc::new(config);
        let mut configs = self.configs.lock();
        if configs.len() >= MAX_CONFIGS {
            configs.clear();
        }
        configs.insert(key, Arc::clone(&config));
        Ok(config)
    }
}

impl copy::Stream for TlsStream<TcpStream> {
    fn abort(&mut self) {
        self.get_mut().0.abort();
    }

    fn finished(&mut self) {
        self.get_mut().0.finished();
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// A CA and a server certificate for `name` it signed, as PEM and rustls types.
    struct Pki {
        ca_pem: String,
        server: Arc<rustls::ServerConfig>,
    }

    fn make_pki(name: &str) -> Pki {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(params, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_owned()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
        Pki {
            ca_pem: ca.pem(),
            server: Arc::new(server),
        }
    }

    /// A TLS server on loopback that answers one line with `hello <sni>`, then closes.
    async fn server(pki: &Pki) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&pki.server));
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let sni = tls.get_ref().1.server_name().unwrap_or("-").to_owned();
                    let mut buf = [0; 5];
                    if tls.read_exact(&mut buf).await.is_ok() {
                        let _ = tls.write_all(format!("hello {sni}").as_bytes()).await;
                        let _ = tls.shutdown().await;
                    }
                });
            }
        });
        addr
    }

    fn origination(sni: &str, ca: Option<&str>) -> TlsOrigination {
        TlsOrigination {
            sni: sni.into(),
            ca_certificates: ca.map(str::to_owned),
        }
    }

    const TIMEOUT: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn opens_tls_to_a_server_its_ca_vouches_for_with_the_sni() {
        let pki = make_pki("api.example.test");
        let addr = server(&pki).await;
        let originator = Originator::default();
        let tcp = TcpStream::connect(addr).await.unwrap();
        let tls = origination("api.example.test", Some(&pki.ca_pem));
        let mut stream = originator.connect(tcp, &tls, true, TIMEOUT).await.unwrap();
        stream.write_all(b"ping\n").await.unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        assert_eq!(answer, "hello api.example.test");
    }

    #[tokio::test]
    async fn refuses_another_ca_another_name_and_the_system_roots() {
        let pki = make_pki("api.example.test");
        let other = make_pki("api.example.test");
        let addr = server(&pki).await;
        let originator = Originator::default();
        for tls in [
            origination("api.example.test", Some(&other.ca_pem)),
            origination("other.example.test", Some(&pki.ca_pem)),
            // A private CA is no public root.
            origination("api.example.test", None),
        ] {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let e = originator
                .connect(tcp, &tls, false, TIMEOUT)
                .await
                .expect_err("must not trust the server");
            assert_eq!(e.reason(), "tls_origination_failed", "{e}");
        }
    }

    #[tokio::test]
    async fn a_server_that_never_answers_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _held = tokio::spawn(async move {
            let held = listener.accept().await;
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(held);
        });
        let pki = make_pki("api.example.test");
        let tcp = TcpStream::connect(addr).await.unwrap();
        let tls = origination("api.example.test", Some(&pki.ca_pem));
        let started = std::time::Instant::now();
        let e = Originator::default()
            .connect(tcp, &tls, false, Duration::from_millis(300))
            .await
            .expect_err("no handshake");
        assert!(e.to_string().contains("no handshake"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
