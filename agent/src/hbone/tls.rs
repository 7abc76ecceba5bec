//! rustls configurations for HBONE: TLS 1.3 only, ALPN `h2`, no SNI, hybrid post-quantum
//! key exchange first, and SPIFFE verification in both directions.
//!
//! Verification is by SPIFFE id, never by DNS name: the chain must verify (webpki) to the
//! roots the `CertSource` holds at handshake time, the leaf must carry exactly one SPIFFE
//! URI SAN in this mesh's trust domain (a peer of another trust domain is refused even
//! when its chain verifies: a root shared with another mesh, or a bundle carrying one,
//! must not let that mesh's identities in), and a client additionally requires the server
//! to be the identity it meant to reach. Certificates are also taken from the `CertSource` at handshake time, so a
//! rotation is picked up by the next handshake.

use std::{
    fmt,
    sync::{Arc, OnceLock},
};

use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore,
    SignatureScheme, SupportedCipherSuite,
    client::{
        ResolvesClientCert,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        verify_server_cert_signed_by_trust_anchor,
    },
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms, aws_lc_rs},
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::{
        ClientHello, ResolvesServerCert, WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
    sign::CertifiedKey,
};

use super::{ALPN, Error};
use crate::{
    identity::{CertSource, SpiffeId, leaf_facts},
    sync::Mutex,
};

/// Why one of our verifiers refused a certificate that webpki accepted.
#[derive(Clone, Debug, thiserror::Error)]
pub(crate) enum Rejection {
    #[error("expected peer identity {expected}, peer presented {actual}")]
    IdentityMismatch { expected: String, actual: String },
    #[error("{0}")]
    NotSpiffe(String),
    #[error("peer {peer} is not in this mesh's trust domain {trust_domain}")]
    ForeignTrustDomain { peer: String, trust_domain: String },
}

/// The server side of HBONE for one pod: presents `identity`'s current certificate and
/// requires a client certificate that chains to the current trust bundle.
///
/// There is no SNI, so the certificate is chosen by where the connection arrived: each pod
/// has its own 15008 listener and its own server configuration.
pub fn server_config(
    certs: Arc<dyn CertSource>,
    identity: SpiffeId,
) -> Result<Arc<rustls::ServerConfig>, Error> {
    let provider = provider();
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(Error::BugTlsConfig)?
        .with_client_cert_verifier(Arc::new(SpiffeClientVerifier {
            certs: Arc::clone(&certs),
            trust_domain: identity.trust_domain().to_owned(),
            provider,
        }))
        .with_cert_resolver(Arc::new(OwnCert { certs, identity }));
    config.alpn_protocols = vec![ALPN.to_vec()];
    // No resumption: every connection proves both certificates, so a rotated or revoked
    // certificate is never carried over by a ticket.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// The client side of HBONE: presents `source`'s current certificate and accepts only a
/// server that proves `expected_server`.
pub fn client_config(
    certs: Arc<dyn CertSource>,
    source: SpiffeId,
    expected_server: SpiffeId,
) -> Result<Arc<ClientConfig>, Error> {
    client_config_with_verifier(certs, source, expected_server).map(|(config, _)| config)
}

/// `client_config`, plus the verifier, which keeps the details of an identity mismatch
/// (rustls only carries an alert-sized error out of the handshake).
pub(crate) fn client_config_with_verifier(
    certs: Arc<dyn CertSource>,
    source: SpiffeId,
    expected_server: SpiffeId,
) -> Result<(Arc<ClientConfig>, Arc<SpiffeServerVerifier>), Error> {
    let provider = provider();
    let verifier = Arc::new(SpiffeServerVerifier {
        certs: Arc::clone(&certs),
        expected: expected_server,
        provider: Arc::clone(&provider),
        rejection: Mutex::new(None),
    });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(Error::BugTlsConfig)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::clone(&verifier) as Arc<dyn ServerCertVerifier>)
        .with_client_cert_resolver(Arc::new(OwnCert {
            certs,
            identity: source,
        }));
    config.alpn_protocols = vec![ALPN.to_vec()];
    // Istio's ztunnel sends no SNI either: the server picks its certificate by address.
    config.enable_sni = false;
    config.resumption = rustls::client::Resumption::disabled();
    Ok((Arc::new(config), verifier))
}

/// The server name handed to rustls: only a placeholder (no SNI is sent and names are not
/// verified), so the destination IP.
pub(crate) fn server_name(addr: std::net::SocketAddr) -> ServerName<'static> {
    ServerName::IpAddress(addr.ip().into())
}

/// The crypto provider: aws-lc-rs, key exchange X25519MLKEM768 > X25519 > secp256r1, and
/// the TLS 1.3 record ciphers of whichever library seals faster on this CPU
/// (`record_ciphers`). The client sends key shares for the hybrid and for X25519; a server
/// that does not know the hybrid picks X25519 without a retry.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    Arc::clone(PROVIDER.get_or_init(|| {
        let mut provider = aws_lc_rs::default_provider();
        provider.kx_groups = vec![
            aws_lc_rs::kx_group::X25519MLKEM768,
            aws_lc_rs::kx_group::X25519,
            aws_lc_rs::kx_group::SECP256R1,
        ];
        // TLS 1.2's stay aws-lc's: HBONE never negotiates them (its configs are TLS 1.3
        // only), and tests build the TLS 1.2 peers they refuse from this provider.
        let tls12 = provider
            .cipher_suites
            .iter()
            .filter(|s| s.version() != &rustls::version::TLS13);
        let aws_lc_fast = aws_lc_has_fast_gcm();
        provider.cipher_suites = record_ciphers(aws_lc_fast)
            .iter()
            .chain(tls12)
            .copied()
            .collect();
        tracing::info!(
            component = "hbone",
            record_ciphers = if aws_lc_fast { "aws-lc" } else { "ring" },
            "TLS 1.3 record ciphers: the library with the faster AES-GCM on this CPU"
        );
        Arc::new(provider)
    }))
}

/// TLS 1.3's cipher suites, in the same order from either library: every HBONE byte is
/// sealed and opened by one of them. aws-lc's AES-GCM is fast only on its AVX-512 path;
/// without AVX-512 (AMD Zen 3, Intel client CPUs), ring's VAES/AVX2 code seals 16 KiB
/// records about twice as fast (AMD EPYC, AES-128-GCM: 4.5-5.4 against 2.3-2.6 GB/s;
/// AES-256-GCM: 3.4-4.5 against 2.2-2.8). The handshake (key exchange, signatures) stays
/// aws-lc's either way.
pub(crate) fn record_ciphers(aws_lc_fast: bool) -> &'static [SupportedCipherSuite] {
    use rustls::crypto::ring::cipher_suite as ring;
    static AWS_LC: [SupportedCipherSuite; 3] = [
        aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384,
        aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256,
        aws_lc_rs::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    static RING: [SupportedCipherSuite; 3] = [
        ring::TLS13_AES_256_GCM_SHA384,
        ring::TLS13_AES_128_GCM_SHA256,
        ring::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    if aws_lc_fast { &AWS_LC } else { &RING }
}

/// Whether aws-lc takes its AVX-512 AES-GCM path here: the CPU features it checks
/// (`crypto_gcm_avx512_enabled` in aws-lc's gcm.c).
fn aws_lc_has_fast_gcm() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("vaes")
            && std::arch::is_x86_feature_detected!("vpclmulqdq")
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx512ifma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        // arm64: both libraries use the same ARMv8 crypto extensions; keep one library.
        true
    }
}

/// The SPIFFE id of a peer's leaf certificate (already verified by webpki).
pub(crate) fn peer_identity(leaf: &CertificateDer<'_>) -> Result<SpiffeId, Rejection> {
    leaf_facts(leaf)
        .map(|facts| facts.identity)
        .map_err(|e| Rejection::NotSpiffe(e.to_string()))
}

/// The peer's SPIFFE id, if it is in `trust_domain`.
fn peer_in_domain(leaf: &CertificateDer<'_>, trust_domain: &str) -> Result<SpiffeId, Rejection> {
    let peer = peer_identity(leaf)?;
    if peer.trust_domain() != trust_domain {
        return Err(Rejection::ForeignTrustDomain {
            peer: peer.to_string(),
            trust_domain: trust_domain.to_owned(),
        });
    }
    Ok(peer)
}

/// Verifies servers for one client connection.
pub(crate) struct SpiffeServerVerifier {
    certs: Arc<dyn CertSource>,
    expected: SpiffeId,
    provider: Arc<CryptoProvider>,
    rejection: Mutex<Option<Rejection>>,
}

impl SpiffeServerVerifier {
    /// The identity mismatch behind an `ApplicationVerificationFailure`, if that was it.
    pub(crate) fn take_rejection(&self) -> Option<Rejection> {
        self.rejection.lock().take()
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let roots = root_store(self.certs.as_ref());
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        // Chain, validity and EKU; deliberately not the name check (identities are URIs).
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let actual = peer_in_domain(end_entity, self.expected.trust_domain()).map_err(other)?;
        if actual != self.expected {
            *self.rejection.lock() = Some(Rejection::IdentityMismatch {
                expected: self.expected.to_string(),
                actual: actual.to_string(),
            });
            // ApplicationVerificationFailure sends `access_denied`, which the server logs as
            // identity_mismatch; the details stay in `rejection`.
            return Err(CertificateError::ApplicationVerificationFailure.into());
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        handshake_signatures(&self.provider).verify12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        handshake_signatures(&self.provider).verify13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        handshake_signatures(&self.provider).schemes()
    }
}

/// Verifies clients of a pod's HBONE listener.
struct SpiffeClientVerifier {
    certs: Arc<dyn CertSource>,
    /// The mesh's: that of the pod this listener serves.
    trust_domain: String,
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: clients have one certificate per identity and present it regardless.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // Built from the bundle of this moment, so a rotated bundle applies to the next
        // handshake. Cheap next to the handshake itself.
        let verifier = WebPkiClientVerifier::builder_with_provider(
            Arc::new(root_store(self.certs.as_ref())),
            Arc::clone(&self.provider),
        )
        .build()
        // The only build error is an empty bundle: nothing can be trusted.
        .map_err(|_| rustls::Error::from(CertificateError::UnknownIssuer))?;
        verifier.verify_client_cert(end_entity, intermediates, now)?;
        peer_in_domain(end_entity, &self.trust_domain).map_err(other)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        handshake_signatures(&self.provider).verify12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        handshake_signatures(&self.provider).verify13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        handshake_signatures(&self.provider).schemes()
    }
}

/// The handshake-signature checks both verifiers share: the provider's algorithms, as
/// rustls's own verifiers do (the SPIFFE part is in the certificate checks above).
struct HandshakeSignatures<'a>(&'a WebPkiSupportedAlgorithms);

fn handshake_signatures(provider: &CryptoProvider) -> HandshakeSignatures<'_> {
    HandshakeSignatures(&provider.signature_verification_algorithms)
}

impl HandshakeSignatures<'_> {
    fn verify12(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, self.0)
    }

    fn verify13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, self.0)
    }

    fn schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// Presents the current certificate of one identity, as client or as server.
struct OwnCert {
    certs: Arc<dyn CertSource>,
    identity: SpiffeId,
}

impl OwnCert {
    fn current(&self) -> Option<Arc<CertifiedKey>> {
        // None fails the handshake: never fall back to another identity's certificate.
        self.certs
            .certificate(&self.identity)
            .map(|cert| Arc::clone(&cert.certified_key))
    }
}

impl ResolvesServerCert for OwnCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

impl ResolvesClientCert for OwnCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.current()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl fmt::Debug for OwnCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OwnCert")
            .field("identity", &self.identity)
            .finish()
    }
}

impl fmt::Debug for SpiffeServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeServerVerifier")
            .field("expected", &self.expected)
            .finish()
    }
}

impl fmt::Debug for SpiffeClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeClientVerifier")
            .field("trust_domain", &self.trust_domain)
            .finish()
    }
}

/// The current trust bundle as a root store; roots that do not parse are skipped (they
/// could not anchor anything).
fn root_store(certs: &dyn CertSource) -> RootCertStore {
    let bundle = certs.trust_bundle();
    let mut roots = RootCertStore::empty();
    let (_added, _skipped) = roots.add_parsable_certificates(bundle.roots.iter().cloned());
    roots
}

fn other(rejection: Rejection) -> rustls::Error {
    CertificateError::Other(rustls::OtherError(Arc::new(rejection))).into()
}
