//! The ingress gateway end to end (issue 17 part 1, docs/gateway.md): a client outside the
//! cluster (a namespace linked to node 1, not a node: `weft_tests::gateway::outside_client`)
//! calls `weft gateway` (a pod of node 1, namespace `edge`, outside the mesh) over HTTPS on
//! one listener serving two hostnames, each with its own certificate from its own Secret
//! and CA; the gateway routes by the Gateway API routes of its state file into STRICT
//! services of namespace `shop` on both nodes, over HBONE, as its own identity (the only
//! one an AccessPolicy of `shop` admits). What the
//! client got (status, backend, the certificate of every handshake), what the apps
//! received (headers, `X-Forwarded-For`), what the backends' node proxies recorded (the
//! gateway's SPIFFE id), what crossed the wire (TLS from outside, HBONE inside) and what
//! the gateway counted are asserted. A TLS passthrough and a TCP listener carry the
//! client's own bytes to a STRICT backend (`tls_passthrough_and_tcp_reach_the_backend_untouched`).
//!
//! ```text
//!  outside 203.0.113.2 ──out0── node 1 ──br0── gateway edge/public :8443 (HTTPS) :8080 (HTTP)
//!                                 │              └─HBONE─> v1 (shop, STRICT)  node 1
//!                                 └──nd2── node 2 ──br0──> v2, api (shop, STRICT)
//! ```

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use weft_tests::{
    Service, TestAgent, TestNode, TestPod, app, eventually,
    gateway::{self, OUTSIDE_IP, TestGateway},
    jwt,
    l7::{self, GrpcCall, GrpcMode, HttpLoad, HttpServe, HttpServer},
    outside::Outside,
    privileged, test_name,
    tls::{self, San, TestCa},
    wire::{Capture, TLS13},
};

/// Node 1: the gateway and backend v1; node 2: backend v2 and the gRPC backend `api`;
/// the outside client linked to node 1. Fields drop in order: processes first, then the
/// agents, the outside and the nodes.
struct Ingress {
    gateway: TestGateway,
    v1_app: HttpServer,
    v2_app: HttpServer,
    grpc_app: l7::GrpcServer,
    agent1: TestAgent,
    agent2: TestAgent,
    gw_pod: TestPod,
    /// An enrolled pod of namespace `default`: not the gateway.
    stranger: TestPod,
    v1: TestPod,
    _v2: TestPod,
    _api: TestPod,
    outside: Outside,
    shop: Site,
    api: Site,
    node1: TestNode,
    node2: TestNode,
}

/// One hostname of the listener: its CA (what its clients trust), its certificate (in
/// the Secret `<host>-cert`) and the CA's file.
struct Site {
    host: &'static str,
    ca: TestCa,
    ca_file: PathBuf,
    cert: String,
    key: String,
}

impl Ingress {
    fn new(test: &str) -> Result<Self> {
        let node1 = TestNode::new(test, 1)?;
        let node2 = TestNode::new(test, 2)?;
        node1.connect(&node2)?;
        let gw_pod = TestGateway::pod(&node1, GW_NS, GW_NAME)?;
        let stranger = node1.pod("stranger").service_account("stranger").create()?;
        let backend = |node: &TestNode, name: &str| {
            node.pod(name)
                .namespace(SHOP_NS)
                .service_account(name)
                .mtls_mode("STRICT")
                .create()
        };
        let (v1, v2, api) = (
            backend(&node1, "v1")?,
            backend(&node2, "v2")?,
            backend(&node2, "api")?,
        );
        // Namespace shop admits the gateway's identity only: an AccessPolicy names it.
        let from_gateway = json!([{
            "name": "from-gateway", "namespace": SHOP_NS, "action": "ALLOW",
            "rules": [{ "from": [{ "principals": [gw_pod.spiffe_id()] }] }],
        }]);
        for node in [&node1, &node2] {
            node.add_service(service("shop-v1", 21, HTTP_PORT, APP_PORT, &v1));
            node.add_service(service("shop-v2", 22, HTTP_PORT, APP_PORT, &v2));
            node.add_service(service("api", 23, GRPC_PORT, GRPC_PORT, &api));
            node.set_policies(from_gateway.clone());
        }
        let agent1 = node1.start_agent()?;
        let agent2 = node2.start_agent()?;
        let v1_app = l7::http_serve(&v1, &HttpServe::new(APP_PORT, "v1"))?;
        let v2_app = l7::http_serve(&v2, &HttpServe::new(APP_PORT, "v2"))?;
        let grpc_app = l7::grpc_serve(&api, GRPC_PORT, "api")?;
        let shop = Site::new(&node1, SHOP_HOST)?;
        let api_site = Site::new(&node1, API_HOST)?;
        let outside = gateway::outside_client(&node1)?;
        let gateway = TestGateway::start(&node1, &gw_pod, sections(&shop, &api_site, None))?;
        Ok(Ingress {
            gateway,
            v1_app,
            v2_app,
            grpc_app,
            agent1,
            agent2,
            gw_pod,
            stranger,
            v1,
            _v2: v2,
            _api: api,
            outside,
            shop,
            api: api_site,
            node1,
            node2,
        })
    }

    /// The gateway's HTTPS (or HTTP) listener at the gateway pod's address.
    fn addr(&self, port: u16) -> SocketAddr {
        self.gw_pod.addr(port).into()
    }

    /// `count` requests to `shop.example.com` over HTTPS from outside, verified against
    /// the shop CA.
    fn shop_load(&self, count: u64) -> HttpLoad {
        HttpLoad::new(self.addr(HTTPS_PORT), count).tls(&self.shop.ca_file, Some(self.shop.host))
    }

    /// A unary call to `api.example.com` over HTTPS (h2) from outside, verified against
    /// the api CA.
    fn api_call(&self) -> GrpcCall {
        GrpcCall::new(self.addr(HTTPS_PORT), GrpcMode::Unary)
            .tls(&self.api.ca_file, Some(self.api.host))
    }

    /// Requests the two HTTP backends answered so far.
    fn served(&self) -> usize {
        self.v1_app.requests().len() + self.v2_app.requests().len()
    }
}

impl Site {
    fn new(node: &TestNode, host: &'static str) -> Result<Self> {
        let ca = TestCa::new(&format!("{host} CA"))?;
        let ca_file = node.dir().join(format!("{host}-ca.pem"));
        ca.write_pem(&ca_file)?;
        let (cert, key) = ca.issue(&San::Dns(host.to_owned()))?;
        Ok(Site {
            host,
            ca,
            ca_file,
            cert,
            key,
        })
    }

    fn secret_name(&self) -> String {
        format!("{}-cert", self.host.split('.').next().unwrap_or(self.host))
    }

    fn fingerprint(&self) -> Result<String> {
        tls::fingerprint_pem(&self.cert)
    }
}

/// An outside client calls two hostnames on one HTTPS listener: SNI picks each one's
/// certificate (verified by the client against that hostname's own CA); `shop` is split
/// 90/10 between STRICT backends on both nodes, `api` is a GRPCRoute matching one method.
/// The apps see the outside client's address in `X-Forwarded-For`; the backends' node
/// proxies admit the gateway's SPIFFE id over HBONE; the wire shows TLS with both SNIs on
/// the outside link, HBONE (TLS to 15008) inside, and the request path nowhere in
/// plaintext.
#[test]
fn https_from_outside_reaches_strict_services_on_two_nodes_as_the_gateway() -> Result<()> {
    privileged!();
    let ingress = Ingress::new(test_name!())?;
    let outside_capture = ingress.outside.capture(&ingress.node1, "tcp")?;
    let bridge_capture = Capture::on_node(&ingress.node1, "br0", "tcp")?;
    let link_capture = Capture::on_node(
        &ingress.node1,
        &ingress.node1.link_to(&ingress.node2),
        "tcp",
    )?;

    // shop.example.com: 200 requests, 90/10, every handshake shows the shop certificate.
    let report = ingress
        .shop_load(REQUESTS)
        .concurrency(4)
        .path(MARKER_PATH)
        .header("x-forwarded-for", CLAIMED_CLIENT)
        .run(&ingress.outside)?;
    ensure!(
        report.status(200) == REQUESTS && report.failed() == 0,
        "every request through the gateway answered 200: {report:?}"
    );
    let (v1, v2) = (report.backend("v1"), report.backend("v2"));
    println!("90/10 split over {REQUESTS} requests through the gateway: v1 {v1}, v2 {v2}");
    // Measured, not asserted (performance lives in the benchmarks).
    println!(
        "through the gateway over HTTPS: p50 {:.1} ms, p99 {:.1} ms; gateway RSS {:.1} MB",
        report.latency_ms.p50,
        report.latency_ms.p99,
        ingress
            .gateway
            .pid()
            .and_then(|pid| weft_tests::bench::status_bytes(pid, "VmRSS").ok())
            .map_or(0.0, |b| b as f64 / 1e6)
    );
    ensure!(
        v1 + v2 == REQUESTS && (150..=195).contains(&v1),
        "a 90/10 split sends 150..=195 of {REQUESTS} to v1: v1 {v1}, v2 {v2}"
    );
    let shop_cert = ingress.shop.fingerprint()?;
    ensure!(
        !report.certificates.is_empty() && report.certificates.iter().all(|c| *c == shop_cert),
        "SNI {SHOP_HOST} gets the shop certificate {shop_cert} on every handshake: {:?}",
        report.certificates
    );

    // api.example.com: the GRPCRoute's method, over h2, with the api certificate (verified
    // against the api CA: the shop certificate would not pass); another method of the same
    // service matches no route and never reaches the backend.
    let call = ingress.api_call().run(&ingress.outside)?;
    ensure!(
        call.grpc_status.as_deref() == Some("0") && call.error.is_none(),
        "the gRPC call through the gateway succeeds: {call:?}"
    );
    ensure!(
        call.messages_received == 1,
        "the unary call's message echoed: {call:?}"
    );
    let unrouted = ingress
        .api_call()
        .method("ServerStream")
        .run(&ingress.outside)?;
    ensure!(
        unrouted.grpc_status.as_deref() != Some("0"),
        "a method the GRPCRoute does not match is not served: {unrouted:?}"
    );
    let calls = ingress.grpc_app.calls();
    ensure!(
        calls.len() == 1 && calls[0].path == format!("/{}/Unary", l7::GRPC_SERVICE),
        "the gRPC backend got exactly the routed call: {calls:?}"
    );

    // What the apps received: the path, and the outside client's address.
    let served = ingress.v1_app.requests();
    let first = served.first().context("v1 served requests")?;
    ensure!(
        first.path == MARKER_PATH,
        "v1 got the path the client sent: {first:?}"
    );
    // The address the client claimed is kept, the one the gateway saw is appended.
    let claimed_then_seen = format!("{CLAIMED_CLIENT}, {OUTSIDE_IP}");
    let v2_first = ingress.v2_app.requests();
    let v2_first = v2_first.first().context("v2 served requests")?;
    for (what, xff, want) in [
        (
            "v1",
            first.header("x-forwarded-for"),
            claimed_then_seen.as_str(),
        ),
        ("v2", v2_first.header("x-forwarded-for"), &claimed_then_seen),
        (
            "the gRPC backend",
            calls[0]
                .headers
                .get("x-forwarded-for")
                .and_then(|v| v.first())
                .map(String::as_str),
            &OUTSIDE_IP.to_string(),
        ),
    ] {
        ensure!(
            xff == Some(want),
            "{what} sees X-Forwarded-For {want:?}, not {xff:?}"
        );
    }
    ensure!(
        first.header("x-forwarded-proto") == Some("https"),
        "v1 sees X-Forwarded-Proto https: {first:?}"
    );

    // The backends' node proxies admitted the gateway's identity, over mutual TLS.
    let gw_id = ingress.gw_pod.spiffe_id();
    for (agent, pod) in [
        (&ingress.agent1, "shop/v1"),
        (&ingress.agent2, "shop/v2"),
        (&ingress.agent2, "shop/api"),
    ] {
        let record = agent.expect_record(&format!("HBONE from the gateway into {pod}"), |r| {
            r.direction == "hbone" && r.pod == pod
        });
        ensure!(
            record.src_identity.as_deref() == Some(gw_id.as_str())
                && record.security.as_deref() == Some("mutual_tls"),
            "{pod}'s node proxy names the gateway {gw_id} as the source, proven by mutual \
             TLS: {record:?}"
        );
    }

    // The gateway's access log names the outside client; its TLS handshakes are counted.
    eventually(Duration::from_secs(10), || {
        let log = ingress.gateway.access_log();
        let from_outside = log
            .iter()
            .filter(|l| {
                l["src.addr"]
                    .as_str()
                    .is_some_and(|a| a.starts_with(&format!("{OUTSIDE_IP}:")))
            })
            .count();
        ensure!(
            from_outside as u64 >= REQUESTS,
            "{from_outside} access-log lines name {OUTSIDE_IP} for {REQUESTS} requests; a line: {:?}",
            log.first()
        );
        Ok(())
    })?;
    let handshakes = ingress
        .gateway
        .metric(gateway::TLS_HANDSHAKES, &[("result", "ok")])?;
    ensure!(
        handshakes >= 6.0,
        "{} counts the 4 + 2 handshakes of the HTTPS listener as ok: {handshakes}",
        gateway::TLS_HANDSHAKES
    );

    // The wire. Outside: TLS on the listener port with both names in ClientHellos, no
    // plaintext. Inside: the path never in plaintext on node 1's bridge (client to gateway,
    // gateway to v1) nor on the link to node 2 (HBONE only, TLS 1.3 on 15008).
    let least = REQUESTS * MARKER_PATH.len() as u64;
    let outside_pcap = outside_capture.stop_after(least)?;
    let bridge_pcap = bridge_capture.stop_after(least)?;
    let link_pcap = link_capture.stop_after(least / 20)?;
    for (name, pcap) in [
        ("the outside link", &outside_pcap),
        ("node 1's bridge", &bridge_pcap),
        ("the link to node 2", &link_pcap),
    ] {
        ensure!(
            !pcap.contains(MARKER_PATH.as_bytes()),
            "the request path crossed {name} in plaintext: {}",
            pcap.file.display()
        );
    }
    ensure!(
        !outside_pcap.contains(b"HTTP/1.1"),
        "no plaintext HTTP on the outside link: {}",
        outside_pcap.file.display()
    );
    let hellos = outside_pcap.tshark(
        HTTPS_PORT,
        &format!("tls.handshake.type == 1 && tcp.dstport == {HTTPS_PORT}"),
        &["tls.handshake.extensions_server_name"],
    )?;
    for host in [SHOP_HOST, API_HOST] {
        ensure!(
            hellos
                .iter()
                .any(|h| h.first().map(String::as_str) == Some(host)),
            "a ClientHello for {host} on the outside link: {hellos:?}"
        );
    }
    let outside_tls = outside_pcap.tls_summary(HTTPS_PORT)?;
    ensure!(
        outside_tls.segments_off_port == 0,
        "only the HTTPS listener's port carried data from outside: {outside_tls:?}"
    );
    let hbone = link_pcap.tls_summary(HBONE_PORT)?;
    ensure!(
        hbone.segments > 0
            && hbone.segments_off_port == 0
            && hbone
                .server_hello_versions
                .iter()
                .all(|v| *v == Some(TLS13)),
        "between the nodes only HBONE (TLS 1.3 to {HBONE_PORT}): {hbone:?}"
    );
    let bridge_ports =
        bridge_pcap.tshark(HBONE_PORT, "tcp.len > 0", &["tcp.srcport", "tcp.dstport"])?;
    let on = |row: &Vec<String>, port: u16| row.iter().any(|p| *p == port.to_string());
    ensure!(
        bridge_ports.iter().any(|r| on(r, HBONE_PORT))
            && bridge_ports
                .iter()
                .all(|r| on(r, HBONE_PORT) || on(r, HTTPS_PORT)),
        "node 1's bridge carried the listener's TLS and HBONE only: {} data segments",
        bridge_ports.len()
    );
    Ok(())
}

/// A Secret rewritten with a new certificate under load: one client keeps two keep-alive
/// connections busy, another opens a new connection for every request. Not one request
/// fails; the kept connections keep their first handshake (the old certificate) to the
/// end, and the new connections switch from the old certificate to the new one once, for
/// good.
#[test]
fn a_rotated_certificate_serves_new_handshakes_and_keeps_open_connections() -> Result<()> {
    privileged!();
    let ingress = Ingress::new(test_name!())?;
    let old = ingress.shop.fingerprint()?;
    let pace = Duration::from_millis(40);
    let mut kept = ingress
        .shop_load(ROTATION_REQUESTS)
        .concurrency(2)
        .pace(pace)
        .start(&ingress.outside)?;
    let mut fresh = ingress
        .shop_load(ROTATION_REQUESTS)
        .new_connections()
        .pace(pace)
        .start(&ingress.outside)?;
    eventually(Duration::from_secs(10), || {
        let served = ingress.served();
        ensure!(served >= 40, "the backends answered {served} requests yet");
        Ok(())
    })?;

    let (cert, key) = ingress.shop.ca.issue(&San::Dns(SHOP_HOST.to_owned()))?;
    let new = tls::fingerprint_pem(&cert)?;
    ingress.gateway.apply_sections(
        &ingress.node1,
        sections(&ingress.shop, &ingress.api, Some((&cert, &key))),
        &new,
    )?;
    let served_at_rotation = ingress.served();
    ensure!(
        kept.running() && fresh.running(),
        "both loads still run when the new certificate is in force (make them longer)"
    );
    let (kept, fresh) = (kept.finish()?, fresh.finish()?);
    let total = ingress.served();
    println!(
        "rotation under load: {served_at_rotation} requests before, {} after; new handshakes \
         saw {} old and {} new certificates",
        total - served_at_rotation,
        fresh.certificates.iter().filter(|c| **c == old).count(),
        fresh.certificates.iter().filter(|c| **c == new).count(),
    );
    for (what, report) in [("keep-alive", &kept), ("new-connection", &fresh)] {
        ensure!(
            report.status(200) == ROTATION_REQUESTS && report.failed() == 0,
            "every {what} request answered 200 across the rotation: {report:?}"
        );
    }
    ensure!(
        kept.certificates == [old.clone(), old.clone()],
        "the two kept connections were never re-established: handshakes {:?}",
        kept.certificates
    );
    let switch = fresh.certificates.iter().position(|c| *c == new);
    ensure!(
        fresh.certificates.len() as u64 == ROTATION_REQUESTS
            && switch.is_some_and(|at| {
                at > 0
                    && fresh.certificates[..at].iter().all(|c| *c == old)
                    && fresh.certificates[at..].iter().all(|c| *c == new)
            }),
        "new connections show the old certificate, then the new one for good: {:?}",
        fresh.certificates
    );
    // After it all, a new client trusts the new certificate with the same CA.
    let after = ingress.shop_load(5).run(&ingress.outside)?;
    ensure!(
        after.status(200) == 5 && after.certificates.iter().all(|c| *c == new),
        "after the rotation new clients get the new certificate: {after:?}"
    );
    Ok(())
}

/// Hostile and mistaken clients get clear refusals, reach no backend, and the gateway
/// serves on: a name the listener has no certificate for (a handshake alert, or a
/// certificate that is not for that name), a host no route serves on the HTTP listener
/// (404), and plaintext HTTP to the HTTPS port (the connection ends, no HTTP answer).
/// Inside, a mesh pod that is not the gateway is refused by the policy that admits it.
#[test]
fn unknown_names_and_plaintext_are_refused_and_the_gateway_keeps_serving() -> Result<()> {
    privileged!();
    let ingress = Ingress::new(test_name!())?;
    let configured = [ingress.shop.fingerprint()?, ingress.api.fingerprint()?];

    let unknown = HttpLoad::new(ingress.addr(HTTPS_PORT), 1)
        .tls(&ingress.shop.ca_file, Some(UNKNOWN_HOST))
        .run(&ingress.outside)?;
    ensure!(
        unknown.failed() == 1 && unknown.errors.contains_key("tls"),
        "SNI {UNKNOWN_HOST} fails the TLS handshake: {unknown:?}"
    );
    ensure!(
        unknown.certificates.iter().all(|c| configured.contains(c)),
        "the gateway showed {UNKNOWN_HOST} no certificate but its own: {:?}",
        unknown.certificates
    );
    println!(
        "SNI {UNKNOWN_HOST}: {} ({} certificate shown)",
        unknown.error_messages.join("; "),
        unknown.certificates.len()
    );

    let unrouted = HttpLoad::new(ingress.addr(PLAIN_PORT), 1)
        .header("host", UNKNOWN_HOST)
        .path(MARKER_PATH)
        .run(&ingress.outside)?;
    ensure!(
        unrouted.status(404) == 1,
        "a host no route serves gets 404: {unrouted:?}"
    );

    let plaintext = format!("GET {MARKER_PATH} HTTP/1.1\r\nHost: {SHOP_HOST}\r\n\r\n");
    match app::send_text(&ingress.outside, ingress.addr(HTTPS_PORT), &plaintext) {
        Ok(reply) => {
            let text = reply.reply.unwrap_or_default();
            ensure!(
                !text.contains(" 200 ") && !text.contains(MARKER_PATH),
                "plaintext HTTP to the HTTPS port is not answered as HTTP: {text:?}"
            );
            println!(
                "plaintext to the HTTPS port: {} bytes back ({:?})",
                reply.received_bytes,
                text.get(..text.len().min(40))
            );
        }
        Err(e) if app::is_reset(&e) => println!("plaintext to the HTTPS port: reset"),
        Err(e) => bail!("plaintext HTTP to the HTTPS port did not end cleanly: {e:#}"),
    }
    // Inside the mesh, shop's AccessPolicy admits the gateway alone: another identity is
    // refused by v1's node proxy.
    let seen = ingress.agent1.newest_record_id()?;
    let direct = ingress.v1.addr(APP_PORT).into();
    match app::send_text(&ingress.stranger, direct, &plaintext) {
        Ok(report) => bail!("a pod that is not the gateway reached v1: {report:?}"),
        Err(e) => ensure!(app::is_reset(&e), "the refusal resets: {e:#}"),
    }
    let record = ingress.agent1.expect_new_record(seen, "the refusal", |r| {
        r.dst == direct.to_string() && r.error.is_some()
    });
    ensure!(
        record.error.as_deref() == Some("not_allowed"),
        "v1's node proxy refuses the stranger by policy: {record:?}"
    );
    ensure!(
        ingress.served() == 0 && ingress.grpc_app.calls().is_empty(),
        "no refused request reached a backend: v1 {:?} v2 {:?}",
        ingress.v1_app.requests(),
        ingress.v2_app.requests()
    );
    // Both refused handshakes counted: the client's refusal of the certificate, and the
    // plaintext that was no ClientHello.
    eventually(Duration::from_secs(10), || {
        let count = |result| {
            ingress
                .gateway
                .metric(gateway::TLS_HANDSHAKES, &[("result", result)])
        };
        let refused = count("failed")? + count("no_certificate")?;
        ensure!(
            refused >= 2.0,
            "{} counts {refused} refused handshakes, not the two",
            gateway::TLS_HANDSHAKES
        );
        Ok(())
    })?;

    let after = ingress.shop_load(20).concurrency(2).run(&ingress.outside)?;
    ensure!(
        after.status(200) == 20 && after.failed() == 0,
        "the gateway serves on after the refusals: {after:?}"
    );
    let call = ingress.api_call().run(&ingress.outside)?;
    ensure!(
        call.grpc_status.as_deref() == Some("0"),
        "and its gRPC route too: {call:?}"
    );
    Ok(())
}

/// A TLS passthrough listener and a TCP listener: the outside client's TLS reaches the
/// STRICT backend's own HTTPS server untouched (the client verifies the backend's
/// certificate for the SNI the TLSRoute matched; the server saw that SNI), and the TCP
/// listener's bytes reach a plain HTTP app with nothing added (no `X-Forwarded-For`); both
/// over HBONE as the gateway, the only identity the backend's policy admits.
#[test]
fn tls_passthrough_and_tcp_reach_the_backend_untouched() -> Result<()> {
    privileged!();
    let node = TestNode::new(test_name!(), 1)?;
    let gw_pod = TestGateway::pod(&node, GW_NS, GW_NAME)?;
    let db = node
        .pod("db")
        .namespace(SHOP_NS)
        .service_account("db")
        .mtls_mode("STRICT")
        .create()?;
    node.add_service(service("db-tls", 31, DB_TLS_PORT, DB_TLS_PORT, &db));
    node.add_service(service("db-raw", 32, HTTP_PORT, APP_PORT, &db));
    node.set_policies(json!([{
        "name": "from-gateway", "namespace": SHOP_NS, "action": "ALLOW",
        "rules": [{ "from": [{ "principals": [gw_pod.spiffe_id()] }] }],
    }]));
    let _agent = node.start_agent()?;
    let db_tls = jwt::JwksServer::start_as(
        &db,
        DB_TLS_PORT,
        &json!({ "keys": [] }),
        &San::Dns(DB_HOST.to_owned()),
    )?;
    let db_raw = l7::http_serve(&db, &HttpServe::new(APP_PORT, "db"))?;
    let outside = gateway::outside_client(&node)?;
    let gw = (GW_NS, GW_NAME);
    let backend =
        |name: &str, port: u16| json!([{ "backendRefs": [{ "name": name, "port": port }] }]);
    let gateway = TestGateway::start(
        &node,
        &gw_pod,
        json!({
            "gateways": [gateway::gateway(GW_NS, GW_NAME, json!([
                gateway::passthrough_listener("db", PASSTHROUGH_PORT),
                gateway::tcp_listener("raw", TCP_PORT),
            ]))],
            "routes": [
                gateway::route("TLSRoute", (SHOP_NS, "db"), gw, "db", &[DB_HOST], backend("db-tls", DB_TLS_PORT)),
                gateway::route("TCPRoute", (SHOP_NS, "raw"), gw, "raw", &[], backend("db-raw", HTTP_PORT)),
            ],
        }),
    )?;

    let addr = |port| -> SocketAddr { gw_pod.addr(port).into() };
    let tls_load = HttpLoad::new(addr(PASSTHROUGH_PORT), 3)
        .tls(db_tls.ca_file(), Some(DB_HOST))
        .path(MARKER_PATH)
        .run(&outside)?;
    ensure!(
        tls_load.status(200) == 3 && tls_load.failed() == 0,
        "TLS through the passthrough listener: {tls_load:?}"
    );
    let backend_cert = tls::fingerprint_pem(&db_tls.certificate_pem()?)?;
    ensure!(
        !tls_load.certificates.is_empty()
            && tls_load.certificates.iter().all(|c| *c == backend_cert),
        "the client saw the backend's own certificate, never one of the gateway's: {:?}",
        tls_load.certificates
    );
    let served = db_tls.served();
    ensure!(
        served.len() == 3
            && served
                .iter()
                .all(|s| s.sni.as_deref() == Some(DB_HOST) && s.path == MARKER_PATH),
        "the backend's server terminated the client's TLS, SNI {DB_HOST}: {served:?}"
    );

    let tcp_load = HttpLoad::new(addr(TCP_PORT), 3)
        .header("host", DB_HOST)
        .path(MARKER_PATH)
        .run(&outside)?;
    ensure!(
        tcp_load.status(200) == 3,
        "plain bytes through the TCP listener: {tcp_load:?}"
    );
    let requests = db_raw.requests();
    ensure!(
        requests.len() == 3
            && requests
                .iter()
                .all(|r| r.path == MARKER_PATH && !r.headers.contains_key("x-forwarded-for")),
        "the app got the client's request as sent, nothing added: {requests:?}"
    );
    eventually(Duration::from_secs(10), || {
        let ok = gateway.metric(gateway::PASSTHROUGH, &[("result", "ok")])?;
        // One kept-alive connection per listener at least.
        ensure!(
            ok >= 2.0,
            "{} counts {ok} passed connections, not 2",
            gateway::PASSTHROUGH
        );
        Ok(())
    })?;
    Ok(())
}

/// The gateway's state: Gateway `edge/public` (HTTPS 8443 with both Secrets, HTTP 8080
/// with no routes), the two Secrets (the shop one with `rotated` instead when given), an
/// HTTPRoute for shop (90/10) and a GRPCRoute for api (one method).
fn sections(shop: &Site, api: &Site, rotated: Option<(&str, &str)>) -> Value {
    let (shop_cert, shop_key) = rotated.unwrap_or((&shop.cert, &shop.key));
    let listeners = json!([
        gateway::https_listener(
            "https",
            HTTPS_PORT,
            &[&shop.secret_name(), &api.secret_name()]
        ),
        gateway::http_listener("http", PLAIN_PORT),
    ]);
    let backend = |name: &str, port: u16, weight: u32| json!({ "name": name, "port": port, "weight": weight });
    let gw = (GW_NS, GW_NAME);
    json!({
        "gateways": [gateway::gateway(GW_NS, GW_NAME, listeners)],
        "secrets": [
            gateway::tls_secret(GW_NS, &shop.secret_name(), shop_cert, shop_key),
            gateway::tls_secret(GW_NS, &api.secret_name(), &api.cert, &api.key),
        ],
        "routes": [
            gateway::route("HTTPRoute", (SHOP_NS, "shop"), gw, "https", &[SHOP_HOST], json!([{
                "backendRefs": [backend("shop-v1", HTTP_PORT, 90), backend("shop-v2", HTTP_PORT, 10)],
            }])),
            gateway::route("GRPCRoute", (SHOP_NS, "api"), gw, "https", &[API_HOST], json!([{
                "matches": [{ "method": { "service": l7::GRPC_SERVICE, "method": "Unary" } }],
                "backendRefs": [backend("api", GRPC_PORT, 1)],
            }])),
        ],
    })
}

fn service(name: &str, vip_host: u8, port: u16, target: u16, endpoint: &TestPod) -> Service {
    Service {
        name: name.into(),
        namespace: SHOP_NS.into(),
        vips: vec![std::net::Ipv4Addr::new(10, 96, 0, vip_host)],
        ports: vec![(port, target)],
        endpoints: vec![endpoint.ip()],
        waypoint: None,
    }
}

const GW_NS: &str = "edge";
const GW_NAME: &str = "public";
const SHOP_NS: &str = "shop";
const SHOP_HOST: &str = "shop.example.com";
const API_HOST: &str = "api.example.com";
/// A name the listener has no certificate (and no route) for.
const UNKNOWN_HOST: &str = "nope.example.org";
/// The listeners' ports.
const HTTPS_PORT: u16 = 8443;
const PLAIN_PORT: u16 = 8080;
/// The services' port, the HTTP apps' port, the gRPC service's and app's port.
const HTTP_PORT: u16 = 80;
const APP_PORT: u16 = 8080;
const GRPC_PORT: u16 = 9090;
const HBONE_PORT: u16 = 15008;
/// The passthrough and TCP listeners' ports, the backend's HTTPS port and its host name.
const PASSTHROUGH_PORT: u16 = 9443;
const TCP_PORT: u16 = 9000;
const DB_TLS_PORT: u16 = 8443;
const DB_HOST: &str = "db.example.com";
/// What the outside client asks for: searched for in every capture.
const MARKER_PATH: &str = "/gateway-e2e-marker-5f0c7a";
const REQUESTS: u64 = 200;
/// The `X-Forwarded-For` the outside client sends itself (kept, never believed).
const CLAIMED_CLIENT: &str = "192.0.2.99";
/// Each rotation load: 5 s or more of paced requests, to span the rotation (checked).
const ROTATION_REQUESTS: u64 = 200;
