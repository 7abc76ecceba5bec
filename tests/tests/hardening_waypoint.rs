//! The waypoint under hostile input (issue "Hardening", findings 4, 5 and 6): a request its
//! L7 policy denies never reaches a mirror; a `forwarded: for=` that names someone else's
//! address is not believed; and a path is judged, routed and forwarded in its normal form,
//! so that `/%61dmin`, `//admin` or `/./admin` meet the DENY written for `/admin`.
//!
//! Node 1 runs the client (enrolled), an intruder pod (not enrolled: it speaks HBONE to the
//! waypoint itself, with a valid certificate of its own identity) and the waypoint; node 2
//! runs the backends v1 and v2 and a shadow (the mirror target).

#[path = "support/hbone_peer.rs"]
mod hbone_peer;

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use serde_json::{Value, json};
use weft_tests::{
    Service, TestAgent, TestNode, TestPod, TestWaypoint,
    l7::{self, HttpLoad, HttpServe, HttpServer},
    metrics::Scrape,
    privileged, sys, test_name, waypoint,
};

/// Fields drop in order: processes first, then agents, then the nodes.
struct Mesh {
    waypoint: TestWaypoint,
    servers: Vec<HttpServer>,
    _agent1: TestAgent,
    _agent2: TestAgent,
    client: TestPod,
    intruder: TestPod,
    wp_pod: TestPod,
    _v1: TestPod,
    _v2: TestPod,
    _shadow: TestPod,
    node1: TestNode,
    _node2: TestNode,
}

impl Mesh {
    fn new(test: &str, policies: Value) -> Result<Self> {
        let node1 = TestNode::new(test, 1)?;
        let node2 = TestNode::new(test, 2)?;
        node1.connect(&node2)?;
        let client = node1.pod("client").service_account("client").create()?;
        let intruder = node1
            .pod("intruder")
            .service_account("intruder")
            .enrolled(false)
            .create()?;
        let wp_pod = TestWaypoint::pod(&node1, WAYPOINT)?;
        let backend = |name: &str, app: &str| {
            node2
                .pod(name)
                .service_account(app)
                .label("app", app)
                .create()
        };
        let v1 = backend("v1", "reviews")?;
        let v2 = backend("v2", "reviews")?;
        // Not selected by the reviews policies: its own node proxy lets the waypoint in.
        let shadow = backend("shadow", "shadow")?;
        for node in [&node1, &node2] {
            // Both versions are its endpoints: their node proxies admit only the waypoint
            // (and leave L7 policy to it).
            node.add_service(service("reviews", 20, &[&v1, &v2], Some(WAYPOINT)));
            node.add_service(service("reviews-v1", 21, &[&v1], None));
            node.add_service(service("reviews-v2", 22, &[&v2], None));
            node.add_service(service("shadow", 24, &[&shadow], None));
            node.set_waypoints(json!([{
                "name": WAYPOINT, "serviceAccount": WAYPOINT, "ips": [wp_pod.ip().to_string()],
            }]));
            node.set_policies(policies.clone());
        }
        let agent1 = node1.start_agent()?;
        let agent2 = node2.start_agent()?;
        let servers = vec![
            l7::http_serve(&v1, &HttpServe::new(APP_PORT, "v1"))?,
            l7::http_serve(&v2, &HttpServe::new(APP_PORT, "v2"))?,
            l7::http_serve(&shadow, &HttpServe::new(APP_PORT, "shadow"))?,
        ];
        let waypoint = TestWaypoint::start(&node1, &wp_pod, WAYPOINT, json!([route()]))?;
        Ok(Mesh {
            waypoint,
            servers,
            _agent1: agent1,
            _agent2: agent2,
            client,
            intruder,
            wp_pod,
            _v1: v1,
            _v2: v2,
            _shadow: shadow,
            node1,
            _node2: node2,
        })
    }

    fn server(&self, name: &str) -> &HttpServer {
        self.servers
            .iter()
            .find(|s| s.name == name)
            .expect("a backend of this name")
    }

    fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        Ok(Scrape::parse(&self.waypoint.metrics()?).sum(name, labels))
    }
}

#[test]
fn a_request_denied_by_l7_policy_is_never_mirrored() -> Result<()> {
    privileged!();
    let mesh = Mesh::new(test_name!(), deny_admin())?;
    let denied = HttpLoad::new(vip(20), 5)
        .path("/admin/secret")
        .run(&mesh.client)?;
    ensure!(
        denied.status(403) == 5,
        "/admin/secret is denied: {denied:?}"
    );
    let allowed = HttpLoad::new(vip(20), 5)
        .path("/public")
        .run(&mesh.client)?;
    ensure!(
        allowed.backend("v1") == 5 && allowed.status(200) == 5,
        "/public reaches v1: {allowed:?}"
    );
    // The allowed requests' copies are sent after the denied ones': once they are all
    // there, a denied copy would be too.
    let copies = mesh.server("shadow").wait_requests(5);
    let leaked = copies.iter().filter(|c| c.path.contains("admin")).count();
    println!(
        "shadow received {} copies, {leaked} of denied requests",
        copies.len()
    );
    ensure!(
        leaked == 0,
        "the shadow received {leaked} copies of requests the primary's policy denied: {copies:?}"
    );
    ensure!(
        copies.iter().filter(|c| c.path == "/public").count() == 5,
        "each allowed request is mirrored once: {copies:?}"
    );
    ensure!(
        mesh.server("v1")
            .requests()
            .iter()
            .all(|r| !r.path.contains("admin")),
        "no denied request reached the primary"
    );
    Ok(())
}

#[test]
fn a_forwarded_for_naming_another_identitys_workload_is_ignored() -> Result<()> {
    privileged!();
    let mesh = Mesh::new(test_name!(), json!([]))?;
    // Only the client's address may call reviews.
    let only_client = json!([{
        "name": "only-from-client-ip",
        "selector": { "matchLabels": { "app": "reviews" } },
        "action": "ALLOW",
        "rules": [{ "from": [{ "ipBlocks": [{ "cidr": format!("{}/32", mesh.client.ip()) }] }] }],
    }]);
    mesh.node1.set_policies(only_client);
    mesh.waypoint.write_config(&mesh.node1, json!([route()]))?;
    weft_tests::eventually(Duration::from_secs(10), || {
        let dump = mesh.waypoint.config_dump()?.to_string();
        ensure!(
            dump.contains("only-from-client-ip"),
            "policy not applied yet"
        );
        Ok(())
    })?;
    let client = HttpLoad::new(vip(20), 3).run(&mesh.client)?;
    ensure!(
        client.status(200) == 3,
        "the client, from its own address, is allowed: {client:?}"
    );

    // The intruder holds a valid certificate, of its own identity, and claims to forward
    // for the client's address.
    let peer = Peer::issue(&mesh.node1, &spiffe("intruder"))?;
    let forged = format!("for={}", mesh.client.ip());
    let status = peer.get(
        &mesh.intruder,
        SocketAddr::new(mesh.wp_pod.ip().into(), 15008),
        vip(20),
        Some(&forged),
        "/",
    )?;
    println!("intruder with `forwarded: {forged}`: {status}");
    ensure!(
        status == 403,
        "an intruder forwarding for the client's address must be judged on its own: got {status}"
    );
    let ignored = mesh.metric(
        "weft_waypoint_forwarded_for_ignored_total",
        &[("reason", "identity_mismatch")],
    )?;
    ensure!(ignored >= 1.0, "the forged header was counted: {ignored}");
    ensure!(
        mesh.waypoint
            .log()
            .contains("forwarded: for= names no workload of the peer's identity"),
        "the forged header was logged"
    );
    Ok(())
}

#[test]
fn paths_are_normalised_before_policy_and_routing_and_ambiguous_ones_refused() -> Result<()> {
    privileged!();
    let mesh = Mesh::new(test_name!(), deny_admin())?;
    let get = |path: &str| HttpLoad::new(vip(20), 1).path(path).run(&mesh.client);
    let mut passed = Vec::new();
    for path in [
        "/admin",
        "/%61dmin",
        "//admin",
        "/./admin",
        "/foo/../admin",
        "/%2e/admin",
        "/x/%2E%2E/admin/",
        "/admin/./secret",
    ] {
        let r = get(path)?;
        if r.status(403) != 1 {
            passed.push(format!("{path} → {:?}", r.by_status));
        }
    }
    ensure!(
        passed.is_empty(),
        "every spelling of /admin is denied; these were not: {passed:?}"
    );
    for path in ["/a%2Fb", "/a%2fb", "/a%5Cb"] {
        let r = get(path)?;
        ensure!(
            r.status(400) == 1,
            "{path}: an encoded slash is refused: {r:?}"
        );
    }
    // Paths are case-sensitive: /ADMIN is another path.
    let r = get("/ADMIN")?;
    ensure!(r.status(200) == 1, "/ADMIN is not /admin: {r:?}");
    // Routing sees the normal form too, and the backend receives it; the query is intact.
    let r = get("//exact")?;
    ensure!(r.backend("v2") == 1, "//exact is routed as /exact: {r:?}");
    let r = get("/%7Euser/./x//y/../z?q=%2F&next=..//b")?;
    let echo = r
        .first
        .as_ref()
        .and_then(|f| f.echo())
        .context("an echoed request")?;
    ensure!(
        echo.path == "/~user/x/z?q=%2F&next=..//b",
        "the backend sees the normalised path and the query as sent: {echo:?}"
    );
    let served: Vec<String> = mesh
        .server("v1")
        .requests()
        .into_iter()
        .chain(mesh.server("v2").requests())
        .map(|r| r.path)
        .collect();
    ensure!(
        served.iter().all(|p| !p.contains("admin")),
        "no spelling of /admin reached a backend: {served:?}"
    );
    ensure!(
        served.contains(&"/exact".to_owned()) && served.contains(&"/ADMIN".to_owned()),
        "backends saw the normal forms: {served:?}"
    );
    let refused = mesh.metric(
        "weft_waypoint_rejected_requests_total",
        &[("reason", "path_escaped_slash")],
    )?;
    ensure!(refused == 3.0, "the 3 refusals were counted: {refused}");
    Ok(())
}

/// An HBONE client that is not a node proxy: a pod holding a certificate of its own.
struct Peer(hbone_peer::Identity);

impl Peer {
    /// A certificate for `identity`, signed by the node's CA.
    fn issue(node: &TestNode, identity: &str) -> Result<Self> {
        let ca = node.ensure_ca()?;
        Ok(Self(hbone_peer::Identity::issue(
            &ca.cert, &ca.key, identity,
        )?))
    }

    /// From inside `pod`: CONNECT to `target` through the HBONE server at `hbone` (with
    /// `forwarded` if given), then `GET path` over HTTP/1.1 in the tunnel; the status.
    fn get(
        &self,
        pod: &TestPod,
        hbone: SocketAddr,
        target: SocketAddr,
        forwarded: Option<&str>,
        path: &str,
    ) -> Result<u16> {
        let tls = self.tls()?;
        let forwarded = forwarded.map(str::to_owned);
        let request = format!("GET {path} HTTP/1.1\r\nHost: reviews\r\nConnection: close\r\n\r\n");
        let netns: PathBuf = pod.netns_path();
        sys::in_netns(&netns, move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                tokio::time::timeout(
                    weft_tests::scaled(Duration::from_secs(20)),
                    hbone_get(tls, hbone, target, forwarded, request),
                )
                .await
                .context("HBONE request in time")?
            })
        })
    }

    fn tls(&self) -> Result<Arc<rustls::ClientConfig>> {
        Ok(Arc::new(self.0.client_config()?))
    }
}

async fn hbone_get(
    tls: Arc<rustls::ClientConfig>,
    hbone: SocketAddr,
    target: SocketAddr,
    forwarded: Option<String>,
    request: String,
) -> Result<u16> {
    let tcp = tokio::net::TcpStream::connect(hbone).await?;
    let name = rustls::pki_types::ServerName::IpAddress(hbone.ip().into());
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .context("TLS handshake with the waypoint")?;
    let (client, connection) = h2::client::handshake(stream).await?;
    tokio::spawn(connection);
    let mut client = client.ready().await?;
    let mut connect = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(target.to_string());
    if let Some(forwarded) = forwarded {
        connect = connect.header("forwarded", forwarded);
    }
    let (response, mut send) = client.send_request(connect.body(())?, false)?;
    let response = response.await?;
    ensure!(
        response.status() == 200,
        "CONNECT answered {}",
        response.status()
    );
    send.send_data(Bytes::from(request), false)?;
    let mut body = response.into_body();
    let mut received = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        received.extend_from_slice(&chunk);
        if received.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let text = String::from_utf8_lossy(&received);
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok());
    match status {
        Some(status) => Ok(status),
        None => bail!("no HTTP response in the tunnel: {text:?}"),
    }
}

/// DENY every request to `/admin` and below, for the reviews pods.
fn deny_admin() -> Value {
    json!([{
        "name": "no-admin",
        "selector": { "matchLabels": { "app": "reviews" } },
        "action": "DENY",
        "rules": [{ "paths": ["/admin", "/admin/*"] }],
    }])
}

/// `/exact` to v2; everything else to v1, with a copy to the shadow.
fn route() -> Value {
    let to = |name: &str| json!([{ "name": name, "port": PORT, "weight": 1 }]);
    let rules = json!([
        { "matches": [{ "path": { "type": "Exact", "value": "/exact" } }], "backendRefs": to("reviews-v2") },
        { "matches": [{ "path": { "type": "PathPrefix", "value": "/" } }],
          "filters": [{ "type": "RequestMirror", "requestMirror": { "backendRef": { "name": "shadow", "port": PORT } } }],
          "backendRefs": to("reviews-v1") },
    ]);
    waypoint::route("HTTPRoute", "reviews", "reviews", PORT, rules)
}

fn service(name: &str, vip_host: u8, endpoints: &[&TestPod], waypoint: Option<&str>) -> Service {
    Service {
        name: name.into(),
        namespace: "default".into(),
        vips: vec![std::net::Ipv4Addr::new(10, 96, 0, vip_host)],
        ports: vec![(PORT, APP_PORT)],
        endpoints: endpoints.iter().map(|p| p.ip()).collect(),
        waypoint: waypoint.map(str::to_owned),
    }
}

fn vip(host: u8) -> SocketAddr {
    SocketAddr::new(IpAddr::from([10, 96, 0, host]), PORT)
}

fn spiffe(service_account: &str) -> String {
    format!("spiffe://cluster.local/ns/default/sa/{service_account}")
}

const WAYPOINT: &str = "waypoint";
const PORT: u16 = 80;
const APP_PORT: u16 = 8080;
