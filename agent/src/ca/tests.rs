use std::{os::unix::fs::PermissionsExt as _, sync::Arc, time::Duration};

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls::{
    RootCertStore,
    pki_types::{CertificateDer, UnixTime},
    server::WebPkiClientVerifier,
};
use tempfile::TempDir;
use tokio::sync::oneshot;

use super::*;
use crate::identity::{
    WorkloadCert,
    ca_api::{CERTIFICATES_PATH, ErrorResponse},
    ca_client::{self, CaClient},
    csr,
    signer::{self, Signer},
};

/// A root made by `weft ca init` in a temp dir.
pub(crate) struct TestRoot {
    pub dir: TempDir,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestRoot {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let paths = init(dir.path(), "cluster.local").unwrap();
        Self {
            cert: paths.cert,
            key: paths.key,
            dir,
        }
    }

    pub fn signer(&self, max_lifetime: Duration) -> Signer {
        Signer::load(&self.cert, &self.key, "cluster.local", max_lifetime).unwrap()
    }
}

/// A running `weft ca` on 127.0.0.1: node-a (token in `token_a`) may have
/// default/client, node-b may have anything in namespace shop.
pub(crate) struct TestCa {
    pub root: TestRoot,
    pub addr: SocketAddr,
    pub token_a: String,
    stop: Option<oneshot::Sender<()>>,
}

impl TestCa {
    pub async fn start() -> Self {
        let root = TestRoot::new();
        let token_a = "node-a-token-0123456789".to_owned();
        let token_b_file = root.dir.path().join("node-b.token");
        fs::write(&token_b_file, "node-b-token-0123456789\n").unwrap();
        let yaml = format!(
            "listen: 127.0.0.1:0\ncaCert: {}\ncaKey: {}\nmaxCertLifetime: 1h\n\
             serverNames: [localhost, 127.0.0.1]\nnodes:\n\
             - name: node-a\n  token: {token_a}\n  allow: [{{namespace: default, serviceAccount: client}}]\n\
             - name: node-b\n  tokenFile: {}\n  allow: [{{namespace: shop, serviceAccount: '*'}}]\n",
            root.cert.display(),
            root.key.display(),
            token_b_file.display(),
        );
        let config = Config::from_yaml(Path::new("ca.yaml"), &yaml).unwrap();
        let server = Server::bind(config).await.unwrap();
        let addr = server.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel();
        tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        Self {
            root,
            addr,
            token_a,
            stop: Some(stop),
        }
    }

    /// A client presenting whatever `token_file` holds at request time.
    pub fn client(&self, token_file: &Path, server_name: &str) -> CaClient {
        CaClient::new(&ca_client::Config {
            addr: self.addr.to_string(),
            server_name: server_name.into(),
            root_cert: self.root.cert.clone(),
            token_file: token_file.to_owned(),
        })
        .unwrap()
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", ns, sa).unwrap()
}

/// Checks `chain` (leaf first) against `roots` the way a TLS peer would (client auth).
fn verify_chain(chain: &[CertificateDer<'static>], roots: &[CertificateDer<'static>]) {
    let mut store = RootCertStore::empty();
    for root in roots {
        store.add(root.clone()).unwrap();
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(
        Arc::new(store),
        Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
    )
    .build()
    .unwrap();
    verifier
        .verify_client_cert(&chain[0], &chain[1..], UnixTime::now())
        .unwrap();
}

fn ders(pems: &[String]) -> Vec<CertificateDer<'static>> {
    rustls_pemfile::certs(&mut pems.join("\n").as_bytes())
        .collect::<Result<_, _>>()
        .unwrap()
}

fn csr_with(key: &KeyPair, sans: &[&str]) -> String {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = sans
        .iter()
        .map(|s| match s.strip_prefix("dns:") {
            Some(dns) => SanType::DnsName((*dns).try_into().unwrap()),
            None => SanType::URI((*s).try_into().unwrap()),
        })
        .collect();
    params.serialize_request(key).unwrap().pem().unwrap()
}

#[test]
fn issued_leaf_verifies_against_the_bundle_and_carries_the_identity() {
    let root = TestRoot::new();
    let signer = root.signer(Duration::from_secs(3600));
    let client = id("default", "client");
    let request = csr::generate(&client).unwrap();
    let issued = signer
        .sign(&client, &request.csr_pem, Duration::from_secs(600))
        .unwrap();
    assert_eq!(issued.chain_pem.len(), 2);
    verify_chain(&ders(&issued.chain_pem), &ders(&issued.trust_bundle_pem));
    let cert = WorkloadCert::from_pem(&issued.chain_pem.join("\n"), &request.key_pem).unwrap();
    assert_eq!(cert.identity, client);
    assert_eq!(cert.serial, issued.serial);
    let lifetime = cert.not_after.duration_since(cert.not_before).unwrap();
    assert!(lifetime >= Duration::from_secs(600) && lifetime <= Duration::from_secs(661));

    use x509_parser::prelude::*;
    let der = ders(&issued.chain_pem).remove(0);
    let (_, x509) = X509Certificate::from_der(der.as_ref()).unwrap();
    assert!(!x509.is_ca());
    let eku = x509.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    assert!(x509.key_usage().unwrap().unwrap().value.digital_signature());
}

#[test]
fn during_a_rotation_the_bundle_carries_both_roots_and_the_new_one_signs() {
    let old = TestRoot::new();
    let new = TestRoot::new();
    // The new root signs; the old one is still trusted (and listed once, however given).
    let signer = new
        .signer(Duration::from_secs(3600))
        .with_trusted_roots(&[old.cert.clone(), old.cert.clone(), new.cert.clone()])
        .unwrap();
    let bundle = signer.trust_bundle_pem();
    assert_eq!(bundle.len(), 2);
    assert_eq!(
        ders(&bundle),
        [
            ders(&[fs::read_to_string(&new.cert).unwrap()]),
            ders(&[fs::read_to_string(&old.cert).unwrap()])
        ]
        .concat()
    );
    let client = id("default", "client");
    let request = csr::generate(&client).unwrap();
    let issued = signer
        .sign(&client, &request.csr_pem, Duration::from_secs(600))
        .unwrap();
    assert_eq!(issued.trust_bundle_pem, bundle);
    verify_chain(
        &ders(&issued.chain_pem),
        &ders(&[fs::read_to_string(&new.cert).unwrap()]),
    );
    // A leaf is not a root.
    let leaf = old.dir.path().join("leaf.pem");
    fs::write(&leaf, &issued.chain_pem[0]).unwrap();
    let err = new
        .signer(Duration::from_secs(3600))
        .with_trusted_roots(&[leaf])
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("leaf.pem") && err.contains("CA certificate"),
        "{err}"
    );
}

#[test]
fn lifetime_is_capped_and_backdate_stays_under_a_tenth() {
    let root = TestRoot::new();
    let signer = root.signer(Duration::from_secs(10));
    let client = id("default", "client");
    let request = csr::generate(&client).unwrap();
    let issued = signer
        .sign(&client, &request.csr_pem, Duration::from_secs(3600))
        .unwrap();
    let lifetime = issued.not_after.duration_since(issued.not_before).unwrap();
    // 10 s asked-for cap + ≤ 1 s backdate + second rounding.
    assert!(lifetime <= Duration::from_secs(12), "{lifetime:?}");
    let cert = WorkloadCert::from_pem(&issued.chain_pem.join("\n"), &request.key_pem).unwrap();
    let renew_in = cert
        .renew_at()
        .duration_since(std::time::SystemTime::now())
        .unwrap();
    assert!(renew_in >= Duration::from_secs(3), "{renew_in:?}");
}

#[test]
fn csr_for_another_identity_is_rejected() {
    let signer = TestRoot::new().signer(Duration::from_secs(3600));
    let request = csr::generate(&id("default", "server")).unwrap();
    let err = signer
        .sign(
            &id("default", "client"),
            &request.csr_pem,
            Duration::from_secs(60),
        )
        .unwrap_err();
    assert_eq!(err.reason(), "san_mismatch");
}

#[test]
fn csr_with_extra_sans_is_rejected() {
    let signer = TestRoot::new().signer(Duration::from_secs(3600));
    let key = KeyPair::generate().unwrap();
    let client = "spiffe://cluster.local/ns/default/sa/client";
    for sans in [
        vec![client, "dns:evil.example"],
        vec![client, "spiffe://cluster.local/ns/default/sa/server"],
        vec![],
    ] {
        let err = signer
            .sign(
                &id("default", "client"),
                &csr_with(&key, &sans),
                Duration::from_secs(60),
            )
            .unwrap_err();
        assert_eq!(err.reason(), "san_mismatch", "{sans:?}");
    }
}

#[test]
fn csr_with_a_key_other_than_p256_is_rejected() {
    let signer = TestRoot::new().signer(Duration::from_secs(3600));
    let client = "spiffe://cluster.local/ns/default/sa/client";
    for alg in [&rcgen::PKCS_ECDSA_P384_SHA384, &rcgen::PKCS_ED25519] {
        let key = KeyPair::generate_for(alg).unwrap();
        let err = signer
            .sign(
                &id("default", "client"),
                &csr_with(&key, &[client]),
                Duration::from_secs(60),
            )
            .unwrap_err();
        assert_eq!(err.reason(), "unsupported_key", "{alg:?}");
    }
}

#[test]
fn identity_of_another_trust_domain_is_rejected() {
    let signer = TestRoot::new().signer(Duration::from_secs(3600));
    let other = SpiffeId::new("example.org", "default", "client").unwrap();
    let request = csr::generate(&other).unwrap();
    let err = signer
        .sign(&other, &request.csr_pem, Duration::from_secs(60))
        .unwrap_err();
    assert_eq!(err.reason(), "wrong_trust_domain");
}

#[test]
fn garbage_and_tampered_csrs_are_rejected() {
    let signer = TestRoot::new().signer(Duration::from_secs(3600));
    let client = id("default", "client");
    let err = signer
        .sign(&client, "not a csr", Duration::from_secs(60))
        .unwrap_err();
    assert_eq!(err.reason(), "invalid_csr");

    let request = csr::generate(&client).unwrap();
    let mut der = ::pem::parse(&request.csr_pem).unwrap().into_contents();
    let last = der.len() - 1;
    der[last] ^= 0x01; // inside the signature
    let tampered = ::pem::encode(&::pem::Pem::new("CERTIFICATE REQUEST", der));
    let err = signer
        .sign(&client, &tampered, Duration::from_secs(60))
        .unwrap_err();
    assert!(
        matches!(err.reason(), "invalid_csr_signature" | "invalid_csr"),
        "{err}"
    );
}

#[test]
fn init_writes_a_private_key_and_refuses_to_overwrite() {
    let root = TestRoot::new();
    let mode = fs::metadata(&root.key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let err = init(root.dir.path(), "cluster.local").unwrap_err();
    assert!(
        matches!(err, Error::Root(signer::Error::Exists { .. })),
        "{err}"
    );
}

#[test]
fn root_of_another_trust_domain_or_foreign_key_is_refused() {
    let root = TestRoot::new();
    let err = Signer::load(
        &root.cert,
        &root.key,
        "example.org",
        Duration::from_secs(60),
    )
    .unwrap_err();
    assert!(
        matches!(err, signer::Error::TrustDomainMismatch { .. }),
        "{err}"
    );
    let other = TestRoot::new();
    let err = Signer::load(
        &root.cert,
        &other.key,
        "cluster.local",
        Duration::from_secs(60),
    )
    .unwrap_err();
    assert!(matches!(err, signer::Error::KeyMismatch), "{err}");
}

#[test]
fn ca_key_is_not_in_debug_output() {
    let root = TestRoot::new();
    let key_pem = fs::read_to_string(&root.key).unwrap();
    let key_body = key_pem.lines().nth(1).unwrap();
    let signer = root.signer(Duration::from_secs(60));
    let debug = format!("{signer:?}");
    assert!(
        !debug.contains(key_body) && !debug.contains("PRIVATE"),
        "{debug}"
    );
}

fn config_error(yaml: &str) -> String {
    Config::from_yaml(Path::new("ca.yaml"), yaml)
        .unwrap_err()
        .to_string()
}

const BASE: &str = "caCert: /x/ca.crt\ncaKey: /x/ca.key\nserverNames: [ca.weft]\n";

#[test]
fn ca_config_is_parsed_with_defaults() {
    let config = Config::from_yaml(
        Path::new("ca.yaml"),
        &format!(
            "{BASE}nodes:\n- name: n1\n  token: abcdefghijklmnop\n  allow:\n  - {{namespace: default, serviceAccount: '*'}}\n"
        ),
    )
    .unwrap();
    assert_eq!(config.listen, "0.0.0.0:15012".parse().unwrap());
    assert_eq!(config.trust_domain, "cluster.local");
    assert_eq!(config.max_cert_lifetime, Duration::from_secs(24 * 3600));
    assert!(!format!("{config:?}").contains("abcdefghijklmnop"));
}

#[test]
fn ca_config_errors_name_the_field() {
    let node = |extra: &str| {
        format!("{BASE}nodes:\n- name: n1\n  token: abcdefghijklmnop\n  allow: []\n{extra}")
    };
    for (yaml, field) in [
        ("caKey: k\nserverNames: [a]".to_owned(), "caCert"),
        ("caCert: c\nserverNames: [a]".to_owned(), "caKey"),
        ("caCert: c\ncaKey: k".to_owned(), "serverNames"),
        (format!("{BASE}listen: nowhere"), "listen"),
        (format!("{BASE}maxCertLifetime: 1s"), "maxCertLifetime"),
        (format!("{BASE}maxCertLifetime: forever"), "maxCertLifetime"),
        (format!("{BASE}trustDomain: Not/Valid"), "trustDomain"),
        (
            "caCert: c\ncaKey: k\nserverNames: ['bad name!']".to_owned(),
            "serverNames[0]",
        ),
        (
            format!("{BASE}nodes: [{{name: n1, allow: []}}]"),
            "nodes[0]",
        ),
        (
            format!("{BASE}nodes: [{{name: n1, token: abcdefghijklmnop, tokenFile: /t}}]"),
            "nodes[0]",
        ),
        (
            format!("{BASE}nodes: [{{name: n1, token: short}}]"),
            "nodes[0].token",
        ),
        (
            node("- name: n1\n  token: qrstuvwxyzabcdef\n"),
            "nodes[1].name",
        ),
        (
            node("- name: n2\n  token: abcdefghijklmnop\n"),
            "nodes[1].token",
        ),
        (
            format!("{BASE}nodes: [{{name: n1, tokenFile: /does/not/exist}}]"),
            "nodes[0].tokenFile",
        ),
        (
            format!(
                "{BASE}nodes: [{{name: n1, token: abcdefghijklmnop, allow: [{{namespace: Bad, serviceAccount: a}}]}}]"
            ),
            "nodes[0].allow[0].namespace",
        ),
        (
            format!(
                "{BASE}nodes: [{{name: n1, token: abcdefghijklmnop, allow: [{{namespace: a, serviceAccount: 'x/y'}}]}}]"
            ),
            "nodes[0].allow[0].serviceAccount",
        ),
    ] {
        let err = config_error(&yaml);
        assert!(err.contains(field), "{yaml}\n=> {err}");
    }
    // Unknown keys are refused, by serde, with the key's name.
    let err = config_error(&format!("{BASE}nodez: []"));
    assert!(err.contains("nodez"), "{err}");
}

const KUBE: &str = "kubernetes:\n  agentServiceAccount: weft/weft-agent\n";

#[test]
fn kubernetes_section_selects_the_kubernetes_authorizer_with_defaults() {
    let config = Config::from_yaml(
        Path::new("ca.yaml"),
        &format!("{BASE}metricsListen: 127.0.0.1:15014\n{KUBE}"),
    )
    .unwrap();
    assert_eq!(
        config.metrics_listen,
        Some("127.0.0.1:15014".parse().unwrap())
    );
    let Authorization::Kubernetes(kubernetes) = &config.authorization else {
        panic!(
            "expected the Kubernetes authorizer: {:?}",
            config.authorization
        );
    };
    assert_eq!(kubernetes.audience, "weft-ca");
    assert_eq!(
        kubernetes.agent_service_account.username(),
        "system:serviceaccount:weft:weft-agent"
    );
    assert_eq!(kubernetes.trust_bundle_config_map, "weft-trust-bundle");
    assert!(kubernetes.trust_bundle_namespaces.is_empty());

    // Without the section: static mode, as before, and no metrics listener.
    let config = Config::from_yaml(Path::new("ca.yaml"), BASE).unwrap();
    assert!(matches!(config.authorization, Authorization::Static(_)));
    assert_eq!(config.metrics_listen, None);
}

#[test]
fn kubernetes_section_errors_name_the_field() {
    for (yaml, field) in [
        (
            format!("{BASE}{KUBE}nodes: [{{name: n1, token: abcdefghijklmnop}}]"),
            "kubernetes",
        ),
        (
            format!("{BASE}kubernetes: {{}}"),
            "kubernetes.agentServiceAccount",
        ),
        (
            format!("{BASE}kubernetes: {{agentServiceAccount: weft-agent}}"),
            "kubernetes.agentServiceAccount",
        ),
        (
            format!("{BASE}kubernetes: {{agentServiceAccount: Weft/agent}}"),
            "kubernetes.agentServiceAccount",
        ),
        (format!("{BASE}{KUBE}  audience: ''"), "kubernetes.audience"),
        (
            format!("{BASE}{KUBE}  trustBundleConfigMap: Not_A_Name"),
            "kubernetes.trustBundleConfigMap",
        ),
        (
            format!("{BASE}{KUBE}  trustBundleNamespaces: [shop, Not_A_Namespace]"),
            "kubernetes.trustBundleNamespaces[1]",
        ),
        (format!("{BASE}{KUBE}  audiences: [x]"), "audiences"),
        (format!("{BASE}metricsListen: nowhere"), "metricsListen"),
    ] {
        let err = config_error(&yaml);
        assert!(err.contains(field), "{yaml}\n=> {err}");
    }
}

#[tokio::test]
async fn server_issues_to_allowed_nodes_and_refuses_the_rest() {
    let ca = TestCa::start().await;
    let token_file = ca.root.dir.path().join("token");
    fs::write(&token_file, format!("{}\n", ca.token_a)).unwrap();
    let client = ca.client(&token_file, "localhost");
    let wanted = id("default", "client");

    // The right token, an identity the node runs: 200 and a chain that verifies.
    let request = csr::generate(&wanted).unwrap();
    let signed = client
        .sign(&wanted, &request.csr_pem, Duration::from_secs(600))
        .await
        .unwrap();
    verify_chain(&ders(&signed.cert_chain), &ders(&signed.trust_bundle));
    let cert = WorkloadCert::from_pem(&signed.cert_chain.join("\n"), &request.key_pem).unwrap();
    assert_eq!(cert.identity, wanted);

    // An identity the node does not run: 403 identity_not_allowed.
    let server_id = id("default", "server");
    let request = csr::generate(&server_id).unwrap();
    let err = client
        .sign(&server_id, &request.csr_pem, Duration::from_secs(600))
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(403), "{err}");
    assert_eq!(err.ca_reason(), "identity_not_allowed");
    assert!(err.to_string().contains("node-a"), "{err}");

    // A CSR for something else than the identity asked for: 400.
    let request = csr::generate(&id("default", "other")).unwrap();
    let err = client
        .sign(&wanted, &request.csr_pem, Duration::from_secs(600))
        .await
        .unwrap_err();
    assert_eq!((err.status(), err.ca_reason()), (Some(400), "san_mismatch"));

    // The token is read per request: a rotated (here: wrong) token is used at once. 401.
    fs::write(&token_file, "not-a-known-token").unwrap();
    let request = csr::generate(&wanted).unwrap();
    let err = client
        .sign(&wanted, &request.csr_pem, Duration::from_secs(600))
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(401), "{err}");
    assert_eq!(err.ca_reason(), "unknown_credential");

    // Tokens from tokenFile work too (node-b, any service account in shop).
    fs::write(&token_file, "node-b-token-0123456789").unwrap();
    let shop = id("shop", "cart");
    let request = csr::generate(&shop).unwrap();
    client
        .sign(&shop, &request.csr_pem, Duration::from_secs(600))
        .await
        .unwrap();
}

#[tokio::test]
async fn client_refuses_a_server_name_the_ca_certificate_does_not_carry() {
    let ca = TestCa::start().await;
    let token_file = ca.root.dir.path().join("token");
    fs::write(&token_file, &ca.token_a).unwrap();
    let client = ca.client(&token_file, "impostor.example");
    let wanted = id("default", "client");
    let request = csr::generate(&wanted).unwrap();
    let err = client
        .sign(&wanted, &request.csr_pem, Duration::from_secs(600))
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "ca_tls_failed", "{err}");
}

#[tokio::test]
async fn server_answers_unknown_paths_and_methods_with_json_errors() {
    use bytes::Bytes;
    use http_body_util::{BodyExt as _, Empty};
    use hyper_util::rt::TokioIo;

    let ca = TestCa::start().await;
    let mut roots = RootCertStore::empty();
    let root = ders(&[fs::read_to_string(&ca.root.cert).unwrap()]).remove(0);
    roots.add(root).unwrap();
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    for (method, path, status, reason) in [
        ("GET", CERTIFICATES_PATH, 405, "method_not_allowed"),
        ("POST", "/v2/nothing", 404, "not_found"),
    ] {
        let tcp = tokio::net::TcpStream::connect(ca.addr).await.unwrap();
        let stream = tokio_rustls::TlsConnector::from(Arc::new(tls.clone()))
            .connect("localhost".try_into().unwrap(), tcp)
            .await
            .unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let response = sender
            .send_request(
                hyper::Request::builder()
                    .method(method)
                    .uri(path)
                    .header("host", "localhost")
                    .body(Empty::<Bytes>::new())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), status);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let error: ErrorResponse = serde_json::from_slice(&body).unwrap();
        assert_eq!(error.error, reason);
    }
}
