//! The gateway face: a Gateway's listeners on loopback, plain HTTP and TLS with
//! certificates picked by SNI, its routes' requests sent to the backends over HBONE as the
//! gateway's identity, with the client's address in `X-Forwarded-For`.

use std::sync::Arc;

use rustls::pki_types::{CertificateDer, ServerName};
use sha2::Digest;
use tokio::{io::AsyncWriteExt, net::TcpStream, sync::watch};
use tokio_rustls::TlsConnector;

use super::*;
use crate::state::gateway::{
    AllowedRoutes, Gateway, GatewayParent, KeyKind, Listener, ListenerProtocol, RouteNamespaces,
    TlsCertificate,
};

/// A port free on 127.0.0.1 now (the listeners' ports come from the Gateway).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A self-signed server certificate for `names`, as a Secret's content would be.
fn certificate(secret: &str, names: &[&str]) -> (TlsCertificate, CertificateDer<'static>) {
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let generated = rcgen::generate_simple_self_signed(names).unwrap();
    let der = generated.cert.der().to_vec();
    let certificate = TlsCertificate {
        name: svc(secret),
        fingerprint: hex(&sha2::Sha256::digest(&der)),
        chain: Arc::new(vec![der.clone()]),
        key: Arc::new(generated.signing_key.serialize_der()),
        key_kind: KeyKind::Pkcs8,
    };
    (certificate, CertificateDer::from(der))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn listener(name: &str, port: u16, protocol: ListenerProtocol, certs: &[&str]) -> Listener {
    Listener {
        name: name.to_owned(),
        port,
        protocol,
        hostname: None,
        certificates: certs.iter().map(|c| svc(c)).collect(),
        allowed_routes: AllowedRoutes {
            namespaces: RouteNamespaces::Same,
            kinds: protocol.default_kinds().to_vec(),
        },
    }
}

/// A route of `namespace` attached to the gateway, all requests to `backends`.
fn gateway_route(
    namespace: &str,
    name: &str,
    hostnames: &[&str],
    backends: &[(&str, u32)],
) -> HttpRoute {
    HttpRoute {
        name: WorkloadRef::new(namespace, name),
        kind: RouteKind::Http,
        parents: Vec::new(),
        gateway_parents: vec![GatewayParent {
            gateway: svc("waypoint"),
            section_name: None,
            port: None,
        }],
        hostnames: hostnames.iter().map(|h| (*h).to_owned()).collect(),
        rules: vec![rule(Vec::new(), backends)],
    }
}

/// A harness whose engine also serves the Gateway `default/waypoint`: an HTTP listener
/// and an HTTPS one with the certificates of `a.example.com` and `b.example.com`.
struct Front {
    h: Harness,
    http: SocketAddr,
    https: SocketAddr,
    certs: BTreeMap<&'static str, CertificateDer<'static>>,
    bound: watch::Receiver<Vec<SocketAddr>>,
}

impl Front {
    async fn new() -> Self {
        let h = Harness::new(&["v1", "v2"]).await;
        let (http, https) = (free_port(), free_port());
        let (a, a_der) = certificate("a-cert", &["a.example.com"]);
        let (b, b_der) = certificate("b-cert", &["b.example.com"]);
        h.update(|s| {
            s.tls_certificates.insert(a.name.clone(), a);
            s.tls_certificates.insert(b.name.clone(), b);
            s.gateways.insert(
                svc("waypoint"),
                Gateway {
                    name: svc("waypoint"),
                    listeners: vec![
                        listener("http", http, ListenerProtocol::Http, &[]),
                        listener(
                            "https",
                            https,
                            ListenerProtocol::Https,
                            &["a-cert", "b-cert"],
                        ),
                    ],
                },
            );
            s.routes = vec![
                gateway_route("default", "a", &["a.example.com"], &[("v1", 1)]),
                gateway_route("default", "b", &["b.example.com"], &[("v2", 1)]),
            ];
        });
        let bound = serve_listeners(&h, 2).await;
        Self {
            h,
            http: SocketAddr::from(([127, 0, 0, 1], http)),
            https: SocketAddr::from(([127, 0, 0, 1], https)),
            certs: BTreeMap::from([("a", a_der), ("b", b_der)]),
            bound,
        }
    }

    /// An HTTP/1.1 client on a plain connection to the HTTP listener.
    async fn plain(&self) -> Client {
        let tcp = TcpStream::connect(self.http).await.unwrap();
        h1_over(tcp).await
    }

    /// A TLS connection to the HTTPS listener with `sni`, trusting only `trusted`'s
    /// certificate; the certificate the gateway presented.
    async fn tls(
        &self,
        sni: &str,
        trusted: &str,
    ) -> std::io::Result<(
        tokio_rustls::client::TlsStream<TcpStream>,
        CertificateDer<'static>,
    )> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.certs[trusted].clone()).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(hbone::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tcp = TcpStream::connect(self.https).await?;
        let stream = TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from(sni.to_owned()).unwrap(), tcp)
            .await?;
        let presented = stream.get_ref().1.peer_certificates().unwrap()[0].clone();
        Ok((stream, presented))
    }
}

/// Serves `h`'s Gateway on 127.0.0.1 until `ports` of its listeners are bound.
async fn serve_listeners(h: &Harness, ports: usize) -> watch::Receiver<Vec<SocketAddr>> {
    let (bound_tx, mut bound) = watch::channel(Vec::new());
    tokio::spawn(
        h.waypoint
            .clone()
            .serve_gateway(IpAddr::V4(Ipv4Addr::LOCALHOST), bound_tx),
    );
    timeout(patience(), bound.wait_for(|bound| bound.len() == ports))
        .await
        .expect("the listeners bound in time")
        .unwrap();
    bound
}

/// An HTTP/1.1 client over `io`.
async fn h1_over<S>(io: S) -> Client
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = http1::handshake(TokioIo::new(io)).await.unwrap();
    tokio::spawn(connection);
    Client::H1(Arc::new(tokio::sync::Mutex::new(sender)))
}

/// A GET of `/` for `host` on `client`.
async fn get_host(client: &Client, host: &str, headers: &[(&str, &str)]) -> Reply {
    let mut builder = Request::builder().uri("/").header("host", host);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let response = client.send(builder.body(empty()).unwrap()).await;
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
        elapsed: Duration::ZERO,
    }
}

#[tokio::test]
async fn http_routes_by_host_into_the_mesh_as_the_gateway_with_the_client_address() {
    let f = Front::new().await;
    let client = f.plain().await;
    let reply = get_host(
        &client,
        "a.example.com",
        &[("x-forwarded-for", "192.0.2.9")],
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.backend(), "v1");
    let reply = get_host(&client, "b.example.com:8080", &[]).await;
    assert_eq!(reply.backend(), "v2");

    // The backend saw the client's claim kept, the real client appended, and the scheme.
    let seen = f.h.backend("v1").seen.lock().clone();
    let headers = &seen.last().unwrap().headers;
    assert_eq!(headers["x-forwarded-for"], "192.0.2.9, 127.0.0.1");
    assert_eq!(headers["x-forwarded-proto"], "http");
    let seen = f.h.backend("v2").seen.lock().clone();
    assert_eq!(seen.last().unwrap().headers["x-forwarded-for"], "127.0.0.1");
    // Its node proxy saw the gateway's identity.
    assert_eq!(
        f.h.backend("v1").peers.lock().last(),
        Some(&f.h.waypoint_id)
    );

    // No route for the host: 404, and the access log names the client, not an identity.
    let reply = get_host(&client, "c.example.com", &[]).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    let log = f.h.access_log();
    let line = log.last().unwrap();
    assert_eq!(line["src.identity"], "-");
    assert_eq!(line["reporter"], "gateway");
    assert!(
        line["src.addr"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{line}"
    );
    let first = &log[0];
    assert_eq!(first["dst.service"], "default/v1", "{first}");
    assert_eq!(first["route"], "default/a", "{first}");
}

#[tokio::test]
async fn sni_picks_the_certificate_and_an_unserved_name_is_refused() {
    let f = Front::new().await;
    for (sni, trusted, backend) in [("a.example.com", "a", "v1"), ("b.example.com", "b", "v2")] {
        let (stream, presented) = f.tls(sni, trusted).await.unwrap();
        assert_eq!(presented, f.certs[trusted], "{sni}");
        let reply = get_host(&h1_over(stream).await, sni, &[]).await;
        assert_eq!(reply.backend(), backend, "{sni}");
        let seen = f.h.backend(backend).seen.lock().clone();
        assert_eq!(seen.last().unwrap().headers["x-forwarded-proto"], "https");
    }
    // A name no certificate has: the listener has no hostname, so its first certificate is
    // presented, and a client verifying the name refuses it.
    assert!(f.tls("c.example.com", "a").await.is_err());

    // Plain HTTP to the TLS port: a failed handshake, and the gateway serves on.
    let mut tcp = TcpStream::connect(f.https).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nhost: a.example.com\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = timeout(
        patience(),
        tokio::io::AsyncReadExt::read_to_end(&mut tcp, &mut answer),
    )
    .await;
    assert!(!String::from_utf8_lossy(&answer).contains("HTTP/1.1 200"));
    until("the failed handshake is counted", || {
        label_value(&f.h, "weft_gateway_tls_handshakes_total", "failed") >= 1.0
    })
    .await;
    assert!(f.tls("a.example.com", "a").await.is_ok());
    until("the handshakes are counted", || {
        label_value(&f.h, "weft_gateway_tls_handshakes_total", "ok") >= 3.0
    })
    .await;
}

#[tokio::test]
async fn a_rotated_certificate_serves_new_handshakes_and_open_connections_keep_going() {
    let f = Front::new().await;
    let (stream, before) = f.tls("a.example.com", "a").await.unwrap();
    let open = h1_over(stream).await;
    assert_eq!(get_host(&open, "a.example.com", &[]).await.backend(), "v1");

    let (renewed, renewed_der) = certificate("a-cert", &["a.example.com"]);
    f.h.update(|s| {
        s.tls_certificates.insert(renewed.name.clone(), renewed);
    });
    let mut f = f;
    f.certs.insert("a", renewed_der.clone());
    let (_, after) = f.tls("a.example.com", "a").await.unwrap();
    assert_eq!(after, renewed_der);
    assert_ne!(after, before);
    // The connection opened before the rotation still serves.
    assert_eq!(get_host(&open, "a.example.com", &[]).await.backend(), "v1");
}

#[tokio::test]
async fn listeners_admit_routes_of_their_namespace_and_follow_the_gateway() {
    let f = Front::new().await;
    // A route from another namespace does not attach to a `Same` listener.
    f.h.update(|s| {
        s.routes = vec![gateway_route(
            "other",
            "a",
            &["a.example.com"],
            &[("v1", 1)],
        )];
    });
    let client = f.plain().await;
    assert_eq!(
        get_host(&client, "a.example.com", &[]).await.status,
        StatusCode::NOT_FOUND
    );
    f.h.update(|s| {
        let gateway = s.gateways.get_mut(&svc("waypoint")).unwrap();
        gateway.listeners[0].allowed_routes.namespaces = RouteNamespaces::All;
    });
    assert_eq!(
        get_host(&client, "a.example.com", &[]).await.backend(),
        "v1"
    );

    // A listener removed from the Gateway closes its port.
    let https = f.https;
    f.h.update(|s| {
        let gateway = s.gateways.get_mut(&svc("waypoint")).unwrap();
        gateway.listeners.truncate(1);
    });
    let mut bound = f.bound.clone();
    timeout(patience(), bound.wait_for(|ports| !ports.contains(&https)))
        .await
        .expect("the HTTPS port closed in time")
        .unwrap();
    assert!(TcpStream::connect(https).await.is_err());
}

/// The value of `metric` with the label `result="<result>"`.
fn label_value(h: &Harness, metric: &str, result: &str) -> f64 {
    let text = h.registry.encode().unwrap_or_default();
    text.lines()
        .find(|line| line.starts_with(metric) && line.contains(&format!("result=\"{result}\"")))
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// A TLS passthrough listener with TLSRoutes by SNI, and a TCP listener with a TCPRoute.
async fn passthrough_front() -> (Harness, SocketAddr, SocketAddr) {
    let h = Harness::new(&["v1", "v2"]).await;
    let (tls, tcp) = (free_port(), free_port());
    let l4_route = |name: &str, kind: RouteKind, hostnames: &[&str], backend: &str| HttpRoute {
        kind,
        ..gateway_route("default", name, hostnames, &[(backend, 1)])
    };
    h.update(|s| {
        s.gateways.insert(
            svc("waypoint"),
            Gateway {
                name: svc("waypoint"),
                listeners: vec![
                    listener("tls", tls, ListenerProtocol::Tls, &[]),
                    listener("tcp", tcp, ListenerProtocol::Tcp, &[]),
                ],
            },
        );
        s.routes = vec![
            l4_route("a", RouteKind::Tls, &["a.example.com"], "v1"),
            l4_route("b", RouteKind::Tls, &["b.example.com"], "v2"),
            l4_route("raw", RouteKind::Tcp, &[], "v2"),
        ];
    });
    serve_listeners(&h, 2).await;
    (
        h,
        SocketAddr::from(([127, 0, 0, 1], tls)),
        SocketAddr::from(([127, 0, 0, 1], tcp)),
    )
}

#[tokio::test]
async fn tcp_passes_bytes_through_to_the_routes_backend() {
    let (h, _, tcp) = passthrough_front().await;
    let stream = TcpStream::connect(tcp).await.unwrap();
    // The gateway does not speak HTTP here: the backend's own server answers.
    let reply = get_host(&h1_over(stream).await, "anything", &[]).await;
    assert_eq!(reply.backend(), "v2");
    let seen = h.backend("v2").seen.lock().clone();
    assert!(
        seen.last()
            .unwrap()
            .headers
            .get("x-forwarded-for")
            .is_none()
    );
    assert_eq!(h.backend("v2").peers.lock().last(), Some(&h.waypoint_id));
    until("the connection is counted", || {
        label_value(&h, "weft_gateway_passthrough_connections_total", "ok") >= 1.0
    })
    .await;
    let log = h.access_log();
    let line = log.iter().find(|l| l["kind"] == "connection").unwrap();
    assert_eq!(line["protocol"], "TCP", "{line}");
    assert_eq!(line["route"], "default/raw", "{line}");
    assert_eq!(line["dst.service"], "default/v2", "{line}");
    assert!(line["bytes_received"].as_u64().unwrap() > 0, "{line}");
    assert!(line["bytes_sent"].as_u64().unwrap() > 0, "{line}");
    assert!(line["error"].is_null(), "{line}");
}

#[tokio::test]
async fn tls_passthrough_routes_by_sni_and_refuses_garbage() {
    let (h, tls, _) = passthrough_front().await;
    // A real ClientHello for b.example.com: it reaches v2 untouched (whose HTTP server
    // then refuses it: the gateway neither answered nor changed it).
    let config = rustls::ClientConfig::builder_with_provider(hbone::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let tcp = TcpStream::connect(tls).await.unwrap();
    let handshake = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("b.example.com").unwrap(), tcp)
        .await;
    assert!(handshake.is_err(), "the backend speaks no TLS");
    until("v2's node proxy got the connection", || {
        h.backend("v2").peers.lock().last() == Some(&h.waypoint_id)
    })
    .await;
    assert!(h.backend("v1").peers.lock().is_empty());

    // Not TLS at all: refused before any backend is asked.
    let mut garbage = TcpStream::connect(tls).await.unwrap();
    garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    let _ = timeout(
        patience(),
        tokio::io::AsyncReadExt::read_to_end(&mut garbage, &mut answer),
    )
    .await;
    assert!(answer.is_empty());
    until("the bad hello is counted", || {
        label_value(
            &h,
            "weft_gateway_passthrough_connections_total",
            "bad_client_hello",
        ) >= 1.0
    })
    .await;
    assert_eq!(h.backend("v1").connects.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn the_backends_end_user_authentication_applies_at_the_gateway() {
    use crate::state::{
        TrafficPolicy,
        authn::{DEFAULT_TOKEN_PARAM, JwksSource, JwtRule, RequestAuthentication, TokenHeader},
        traffic::Target as PolicyTarget,
    };
    let f = Front::new().await;
    f.h.update(|s| {
        s.traffic_policies = vec![TrafficPolicy {
            request_authentication: Some(RequestAuthentication {
                jwt_rules: vec![JwtRule {
                    issuer: "https://issuer.test".into(),
                    audiences: vec![],
                    jwks: JwksSource::Inline(r#"{"keys":[]}"#.into()),
                    from_headers: vec![TokenHeader::bearer()],
                    from_params: vec![DEFAULT_TOKEN_PARAM.into()],
                    forward_original_token: false,
                    output_claim_to_headers: vec![],
                }],
            }),
            ..TrafficPolicy::new(svc("v1-users"), vec![PolicyTarget::Service(svc("v1"))])
        }];
    });
    let client = f.plain().await;
    // A token the backend's issuer did not sign: refused by the gateway, which is the only
    // L7 proxy on the way.
    let forged = [("authorization", "Bearer a.b.c")];
    let reply = get_host(&client, "a.example.com", &forged).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{reply:?}");
    assert!(f.h.backend("v1").seen.lock().is_empty());
    // No token: the policy authenticates only what is presented.
    assert_eq!(
        get_host(&client, "a.example.com", &[]).await.backend(),
        "v1"
    );
}
