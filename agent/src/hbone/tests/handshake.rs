//! The TLS handshake against peers weft must refuse, and against peers it must get along
//! with (docs/hbone.md, "Verification" and "Transport"): a rustls peer, configured by hand,
//! presents what weft's own certificate source never would (zero or two SPIFFE URI SANs,
//! the wrong key usage or extended key usage, no certificate, TLS 1.2 only, X25519 only),
//! and each test checks both the reason weft gives and the alert the peer received.

use rustls::{
    AlertDescription, ClientConfig, ServerConfig, SupportedProtocolVersion,
    client::danger::ServerCertVerifier,
    crypto::{CryptoProvider, aws_lc_rs},
    pki_types::{CertificateDer, PrivateKeyDer},
};
use tokio::task::JoinHandle;

use super::*;

type RawCert = (CertificateDer<'static>, PrivateKeyDer<'static>);

#[tokio::test]
async fn server_cert_without_a_uri_san_is_refused() {
    let h = Harness::new().await;
    let cert = h.ca.issue_raw(&h.server_id, |params| {
        params.subject_alt_names = vec![rcgen::SanType::DnsName(
            "server.default.svc".try_into().unwrap(),
        )];
    });
    let (client, server) = weft_client_against(&h, server_offering(cert, TLS13)).await;
    assert_eq!(client.unwrap_err().reason(), "bad_certificate");
    assert_eq!(server, Err(alert(AlertDescription::CertificateUnknown)));
}

#[tokio::test]
async fn server_cert_with_two_spiffe_uri_sans_is_refused() {
    let h = Harness::new().await;
    // The identity the client expects, and a second one it must not let ride along.
    let cert = h.ca.issue_raw(&h.server_id, |params| {
        params.subject_alt_names.push(second_spiffe_san());
    });
    let (client, server) = weft_client_against(&h, server_offering(cert, TLS13)).await;
    let err = client.unwrap_err();
    assert_eq!(err.reason(), "bad_certificate", "{err}");
    assert!(
        err.to_string().contains("exactly one URI SAN, found 2"),
        "{err}"
    );
    assert_eq!(server, Err(alert(AlertDescription::CertificateUnknown)));
}

#[tokio::test]
async fn server_cert_for_client_authentication_only_is_refused() {
    let h = Harness::new().await;
    let cert = h.ca.issue_raw(&h.server_id, |params| {
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    });
    let (client, server) = weft_client_against(&h, server_offering(cert, TLS13)).await;
    assert_eq!(client.unwrap_err().reason(), "bad_certificate");
    assert_eq!(server, Err(alert(AlertDescription::UnsupportedCertificate)));
}

#[tokio::test]
async fn server_cert_without_digital_signature_usage_is_refused() {
    let h = Harness::new().await;
    let cert = h.ca.issue_raw(&h.server_id, |params| {
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyEncipherment];
    });
    let (client, server) = weft_client_against(&h, server_offering(cert, TLS13)).await;
    let err = client.unwrap_err();
    assert_eq!(err.reason(), "bad_certificate", "{err}");
    assert!(err.to_string().contains("is not a workload's"), "{err}");
    assert_eq!(server, Err(alert(AlertDescription::CertificateUnknown)));
}

#[tokio::test]
async fn client_cert_without_a_uri_san_is_refused() {
    assert_client_cert_refused(
        |params| {
            params.subject_alt_names = vec![rcgen::SanType::DnsName(
                "client.default.svc".try_into().unwrap(),
            )];
        },
        AlertDescription::CertificateUnknown,
    )
    .await;
}

#[tokio::test]
async fn client_cert_with_two_spiffe_uri_sans_is_refused() {
    assert_client_cert_refused(
        |params| {
            params.subject_alt_names.push(second_spiffe_san());
        },
        AlertDescription::CertificateUnknown,
    )
    .await;
}

#[tokio::test]
async fn client_cert_for_server_authentication_only_is_refused() {
    assert_client_cert_refused(
        |params| {
            params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        },
        AlertDescription::UnsupportedCertificate,
    )
    .await;
}

#[tokio::test]
async fn client_cert_with_a_ca_key_usage_is_refused() {
    assert_client_cert_refused(
        |params| {
            params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        },
        AlertDescription::CertificateUnknown,
    )
    .await;
}

#[tokio::test]
async fn client_without_a_certificate_is_refused() {
    let mut h = Harness::new().await;
    let client = client_presenting(&h, None, TLS13);
    assert_weft_server_refuses(
        &mut h,
        client,
        AlertDescription::CertificateRequired,
        "no_peer_certificate",
    )
    .await;
}

#[tokio::test]
async fn the_server_refuses_a_tls12_only_client() {
    let mut h = Harness::new().await;
    let cert = h.ca.issue_raw(&h.client_id, |_| {});
    let client = client_presenting(&h, Some(cert), TLS12);
    assert_weft_server_refuses(
        &mut h,
        client,
        AlertDescription::ProtocolVersion,
        "tls_handshake",
    )
    .await;
}

#[tokio::test]
async fn the_client_offers_a_tls12_only_server_nothing_it_can_take() {
    let h = Harness::new().await;
    let cert = h.ca.issue_raw(&h.server_id, |_| {});
    let (client, server) = weft_client_against(&h, server_offering(cert, TLS12)).await;
    // The server's own words: the client hello offered no TLS 1.2.
    assert_eq!(
        server,
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOfferedOrEnabled
        ))
    );
    let err = client.unwrap_err();
    assert!(
        matches!(
            err,
            Error::PeerAlert {
                alert: AlertDescription::ProtocolVersion,
                peer: Role::Server
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn a_server_without_the_hybrid_group_gets_x25519_without_a_retry() {
    let h = Harness::new().await;
    let cert = h.ca.issue_raw(&h.server_id, |_| {});
    let mut server = server_offering(cert, TLS13);
    server.provider = x25519_only();
    let addr = serve_once(server.build()).await;
    let (config, _verifier) = tls::client_config_with_verifier(
        Arc::<TestCerts>::clone(&h.client_certs),
        h.client_id.clone(),
        h.server_id.clone(),
    )
    .unwrap();
    let tcp = TcpStream::connect(addr.0).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(tls::server_name(addr.0), tcp)
        .await
        .expect("handshake with an X25519-only server");
    let client = tls.get_ref().1;
    assert_eq!(
        client.negotiated_key_exchange_group().map(|g| g.name()),
        Some(NamedGroup::X25519)
    );
    // The client's X25519 key share was used as sent: no HelloRetryRequest round trip.
    assert_eq!(client.handshake_kind(), Some(rustls::HandshakeKind::Full));
    drop(tls);
    assert_eq!(
        addr.1.await.unwrap(),
        Ok((
            Some(NamedGroup::X25519),
            Some(rustls::ProtocolVersion::TLSv1_3)
        ))
    );
}

#[tokio::test]
async fn a_client_without_the_hybrid_group_gets_x25519() {
    let h = Harness::new().await;
    let (echo, _task) = echo_server().await;
    h.serve_target(echo);
    let (weft, verifier) = tls::client_config_with_verifier(
        Arc::<TestCerts>::clone(&h.client_certs),
        h.client_id.clone(),
        h.server_id.clone(),
    )
    .unwrap();
    // A peer as weft's client is, but without the hybrid group (ztunnel built without it).
    let mut config = ClientConfig::builder_with_provider(x25519_only())
        .with_protocol_versions(TLS13)
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier as Arc<dyn ServerCertVerifier>)
        .with_client_cert_resolver(Arc::clone(&weft.client_auth_cert_resolver));
    config.alpn_protocols = vec![ALPN.to_vec()];
    let tls = tls_to_server(&h, Arc::new(config)).await;
    let client = tls.get_ref().1;
    assert_eq!(
        client.negotiated_key_exchange_group().map(|g| g.name()),
        Some(NamedGroup::X25519)
    );
    assert_eq!(client.handshake_kind(), Some(rustls::HandshakeKind::Full));
    // And the connection is HBONE that works: a CONNECT through it is echoed.
    let (_send, response, mut body_out) = open_connect(tls, echo).await;
    body_out
        .send_data(bytes::Bytes::from_static(b"x25519"), true)
        .unwrap();
    let mut body_in = response.into_body();
    let mut echoed = Vec::new();
    while let Some(chunk) = timeout(patience(), body_in.data()).await.unwrap() {
        echoed.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(echoed, b"x25519");
    assert_eq!(h.handler.seen.lock()[0].peer_identity, h.client_id);
}

/// A rustls server's configuration before it is built, so a test can swap its provider.
struct RawServer {
    cert: RawCert,
    versions: &'static [&'static SupportedProtocolVersion],
    provider: Arc<CryptoProvider>,
}

impl RawServer {
    fn build(self) -> Arc<ServerConfig> {
        let mut config = ServerConfig::builder_with_provider(self.provider)
            .with_protocol_versions(self.versions)
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![self.cert.0], self.cert.1)
            .unwrap();
        config.alpn_protocols = vec![ALPN.to_vec()];
        Arc::new(config)
    }
}

/// A server presenting `cert` with weft's own provider, speaking only `versions`.
fn server_offering(
    cert: RawCert,
    versions: &'static [&'static SupportedProtocolVersion],
) -> RawServer {
    RawServer {
        cert,
        versions,
        provider: tls::provider(),
    }
}

/// What the raw server's side of a handshake ended with: the group and version, or the
/// rustls error (the alert the weft client sent, when it refused).
type ServerSide = Result<(Option<NamedGroup>, Option<rustls::ProtocolVersion>), rustls::Error>;

/// Accepts one TLS connection with `config`; the task ends with what the server saw.
async fn serve_once(config: Arc<ServerConfig>) -> (SocketAddr, JoinHandle<ServerSide>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = tokio_rustls::TlsAcceptor::from(config)
            .accept(tcp)
            .await
            .map_err(rustls_error)?;
        let server = tls.get_ref().1;
        let facts = (
            server.negotiated_key_exchange_group().map(|g| g.name()),
            server.protocol_version(),
        );
        // TLS 1.3: the client's verdict on our certificate may still be on its way.
        let mut buf = [0u8; 1];
        match tls.read(&mut buf).await {
            Err(e) => match tls_error_of(&e) {
                Some(refused) => Err(refused.clone()),
                // The client went away without close_notify: it had what it wanted.
                None => Ok(facts),
            },
            Ok(_) => Ok(facts),
        }
    });
    (addr, task)
}

/// Weft's pool connects to `server`: the client's error, and what the server saw.
async fn weft_client_against(
    h: &Harness,
    server: RawServer,
) -> (Result<HboneStream, Error>, ServerSide) {
    let (addr, server) = serve_once(server.build()).await;
    let key = Key {
        address: addr,
        ..h.key()
    };
    let client = h.connect_with(key, closed_port().await).await;
    let server = timeout(patience(), server)
        .await
        .expect("server finishes in time")
        .unwrap();
    (client, server)
}

/// A client that verifies the server as weft does and presents `cert` (or none).
fn client_presenting(
    h: &Harness,
    cert: Option<RawCert>,
    versions: &'static [&'static SupportedProtocolVersion],
) -> Arc<ClientConfig> {
    let (_, verifier) = tls::client_config_with_verifier(
        Arc::<TestCerts>::clone(&h.client_certs),
        h.client_id.clone(),
        h.server_id.clone(),
    )
    .unwrap();
    let builder = ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(versions)
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier as Arc<dyn ServerCertVerifier>);
    let mut config = match cert {
        Some((cert, key)) => builder.with_client_auth_cert(vec![cert], key).unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN.to_vec()];
    Arc::new(config)
}

/// A client presenting its certificate as `edit` changed it is refused by weft's server
/// as `bad_certificate`; the client receives `alert`.
async fn assert_client_cert_refused(
    edit: impl FnOnce(&mut rcgen::CertificateParams),
    alert: AlertDescription,
) {
    let mut h = Harness::new().await;
    let cert = h.ca.issue_raw(&h.client_id, edit);
    let client = client_presenting(&h, Some(cert), TLS13);
    assert_weft_server_refuses(&mut h, client, alert, "bad_certificate").await;
}

/// `client` handshakes with the harness's weft server: the client receives `alert`, the
/// server gives `reason`, and no CONNECT reached the handler.
async fn assert_weft_server_refuses(
    h: &mut Harness,
    client: Arc<ClientConfig>,
    alert: AlertDescription,
    reason: &str,
) {
    let seen = handshake_with_weft_server(h, client).await;
    assert_eq!(seen, Err(self::alert(alert)));
    assert_eq!(h.server_result().await, Err(reason));
    assert!(h.handler.seen.lock().is_empty());
}

/// Handshakes with the harness's weft server and reads: `Ok` if the connection carried on,
/// else the rustls error the client saw (in TLS 1.3 a refused client certificate arrives
/// as the server's alert after the client's side of the handshake finished).
async fn handshake_with_weft_server(
    h: &Harness,
    config: Arc<ClientConfig>,
) -> Result<(), rustls::Error> {
    let tcp = TcpStream::connect(h.server_addr).await.unwrap();
    let attempt = async {
        let mut tls = tokio_rustls::TlsConnector::from(config)
            .connect(tls::server_name(h.server_addr), tcp)
            .await
            .map_err(rustls_error)?;
        let mut buf = [0u8; 1];
        tls.read(&mut buf).await.map_err(rustls_error)?;
        Ok(())
    };
    timeout(patience(), attempt).await.expect("no hang")
}

/// The rustls error inside a TLS stream's I/O error.
fn rustls_error(e: std::io::Error) -> rustls::Error {
    tls_error_of(&e)
        .cloned()
        .unwrap_or_else(|| panic!("not a TLS error: {e}"))
}

fn alert(description: AlertDescription) -> rustls::Error {
    rustls::Error::AlertReceived(description)
}

fn second_spiffe_san() -> rcgen::SanType {
    rcgen::SanType::URI(
        "spiffe://cluster.local/ns/default/sa/admin"
            .try_into()
            .unwrap(),
    )
}

/// aws-lc-rs with X25519 as the only key exchange group.
fn x25519_only() -> Arc<CryptoProvider> {
    Arc::new(CryptoProvider {
        kx_groups: vec![aws_lc_rs::kx_group::X25519],
        ..aws_lc_rs::default_provider()
    })
}

const TLS12: &[&SupportedProtocolVersion] = &[&rustls::version::TLS12];
const TLS13: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13];

/// Either library's record ciphers are TLS 1.3's three suites in one order, so which one
/// this CPU gets changes the speed, never what is negotiated; the provider uses the pick.
#[test]
fn the_record_ciphers_are_the_same_suites_from_either_library() {
    let names = |suites: &[rustls::SupportedCipherSuite]| -> Vec<_> {
        suites.iter().map(|s| s.suite()).collect()
    };
    let (aws_lc, ring) = (tls::record_ciphers(true), tls::record_ciphers(false));
    assert_eq!(
        names(aws_lc),
        [
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384,
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256,
            rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
        ]
    );
    assert_eq!(names(aws_lc), names(ring));
    let tls13: Vec<_> = tls::provider()
        .cipher_suites
        .iter()
        .filter(|s| s.version() == &rustls::version::TLS13)
        .copied()
        .collect();
    assert_eq!(names(&tls13), names(aws_lc));
}
