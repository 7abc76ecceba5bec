//! Sections 8 and 9 of the tour, the mesh's edges: a request from outside the cluster
//! through the ingress gateway (`weft gateway`) into a STRICT service, and, with the mesh in
//! `REGISTRY_ONLY`, an enrolled pod reaching a registered external service (TLS originated
//! by its node's proxy) and refused at connect for a host nobody registered.

use std::{
    net::{Ipv4Addr, SocketAddr},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use serde_json::{Value, json};
use weft_tests::{
    Spawn, TestAgent, TestNode, TestPod, app,
    gateway::{self, TestGateway},
    l7::{self, HttpLoad, HttpServe},
    metrics::Scrape,
    outside::{Link, Outside},
};

use super::ca::{DemoCa, describe_certificate};

/// Sections 8 and 9, with the world outside the cluster (linked to node 1) between them.
pub fn run(
    nodes: [&TestNode; 2],
    client: &TestPod,
    agents: [&TestAgent; 2],
    problems: &mut Vec<String>,
) -> Result<()> {
    let outside = Outside::new(nodes[0], "outside", OUTSIDE_LINK)?;
    let ca = DemoCa::new(nodes[0].dir(), "weft demo public CA")?;
    println!("\n== 8. from outside, through the ingress gateway ==");
    gateway(nodes, agents, &outside, &ca, problems)?;
    println!("\n== 9. leaving the mesh: a registered external service, an unregistered host ==");
    egress(nodes[0], client, agents[0], &outside, &ca, problems)
}

/// Section 8: `weft gateway` for the Gateway edge/public runs in a pod of node 1 outside
/// the mesh; a client outside the cluster calls its HTTPS listener with SNI; its HTTPRoute
/// sends the request over HBONE to shop/shop, a STRICT pod of node 2.
fn gateway(
    nodes: [&TestNode; 2],
    agents: [&TestAgent; 2],
    outside: &Outside,
    ca: &DemoCa,
    problems: &mut Vec<String>,
) -> Result<()> {
    let shop = nodes[1]
        .pod("shop")
        .namespace(SHOP_NS)
        .service_account("shop")
        .label("app", "shop")
        .mtls_mode("STRICT")
        .create()?;
    let gw_pod = TestGateway::pod(nodes[0], GATEWAY_NS, GATEWAY)?;
    for node in nodes {
        node.add_service(weft_tests::Service {
            name: "shop".into(),
            namespace: SHOP_NS.into(),
            vips: vec![SHOP_VIP],
            ports: vec![(80, APP_PORT)],
            endpoints: vec![shop.ip()],
            waypoint: None,
        });
    }
    for (node, agent) in nodes.into_iter().zip(agents) {
        agent.reload_and_wait(node)?;
    }
    let shop_app = l7::http_serve(&shop, &HttpServe::new(APP_PORT, "shop"))?;
    let cert = ca.issue(SHOP_HOST)?;
    let mut listener = gateway::https_listener("https", GATEWAY_PORT, &["shop-cert"]);
    listener["hostname"] = json!("*.example.test");
    let rules = json!([{ "backendRefs": [{ "name": "shop", "port": 80 }] }]);
    let sections = json!({
        "gateways": [gateway::gateway(GATEWAY_NS, GATEWAY, json!([listener]))],
        "secrets": [gateway::tls_secret(GATEWAY_NS, "shop-cert", &cert.cert_pem, &cert.key_pem)],
        "routes": [gateway::route(
            "HTTPRoute", (SHOP_NS, "shop"), (GATEWAY_NS, GATEWAY), "https", &[SHOP_HOST], rules,
        )],
    });
    let gateway_id = format!("spiffe://cluster.local/ns/{GATEWAY_NS}/sa/{GATEWAY}");
    println!(
        "A Gateway {GATEWAY_NS}/{GATEWAY} (class weft) has one HTTPS listener on port \
         {GATEWAY_PORT} for *.example.test, its certificate\nfrom the Secret \
         {GATEWAY_NS}/shop-cert (kubernetes.io/tls, signed by a CA of the demo's own); the \
         HTTPRoute shop/shop\nattaches to it (parentRef kind Gateway) for {SHOP_HOST} and \
         sends to the Service shop/shop, whose pod\n`shop` on {} is STRICT: it takes mutual \
         TLS only. `weft gateway` runs in pod `{GATEWAY}` ({}) on {},\noutside the mesh, as \
         {gateway_id}.",
        nodes[1].node_name(),
        gw_pod.ip(),
        nodes[0].node_name(),
    );
    let mut gw = TestGateway::start(nodes[0], &gw_pod, sections)?;
    gw.show_log_on_drop(false);
    let seen = agents[1].newest_record_id()?;
    let to = SocketAddr::from((gw_pod.ip(), GATEWAY_PORT));
    let request = format!("GET /cart HTTP/1.1\r\nHost: {SHOP_HOST}\r\nConnection: close\r\n\r\n");
    let ca_file = ca.cert_path().display().to_string();
    let script = format!(
        "printf '{}' | timeout 20 openssl s_client -connect {to} -servername {SHOP_HOST} \
         -CAfile {ca_file} -verify_hostname {SHOP_HOST} -verify_return_error -ign_eof",
        request.replace("\r\n", "\\r\\n")
    );
    let mut cmd = Command::new("sh");
    cmd.args(["-c", &script]);
    let session = outside
        .run(cmd, "s_client", weft_tests::scaled(Duration::from_secs(30)))?
        .output;
    println!(
        "A client outside the cluster ({}, routed to the cluster through {}) opens TLS to \
         {to} with SNI {SHOP_HOST}\n(`openssl s_client`) and sends GET /cart:",
        outside.ip(),
        nodes[0].node_name()
    );
    let leaf = session
        .split_once("-----BEGIN CERTIFICATE-----")
        .and_then(|(_, rest)| rest.split_once("-----END CERTIFICATE-----"))
        .map(|(body, _)| format!("-----BEGIN CERTIFICATE-----{body}-----END CERTIFICATE-----\n"));
    match leaf.as_deref().map(describe_certificate) {
        Some(Ok(text)) => println!("  certificate the client got: {text}"),
        Some(Err(e)) => problems.push(format!("the gateway's certificate: {e:#}")),
        None => problems.push(format!("the client got no certificate:\n{session}")),
    }
    let tls = session
        .lines()
        .find(|l| l.starts_with("New, "))
        .unwrap_or("?");
    let verified = session.contains("Verify return code: 0 (ok)");
    println!(
        "  handshake: {}; the client verified it for {SHOP_HOST}: {}",
        tls.trim_start_matches("New, "),
        if verified { "yes" } else { "NO" }
    );
    let response = session
        .find("HTTP/1.1 ")
        .map(|at| &session[at..])
        .unwrap_or_default();
    let status = response.lines().next().unwrap_or("(no response)");
    let backend = response
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("x-backend:"))
        .unwrap_or("");
    println!("  response: {status} ({})", backend.trim());
    if !verified || !status.contains(" 200") {
        problems.push(format!(
            "the outside client should get 200 over verified TLS:\n{session}"
        ));
    }
    match shop_app.requests().last() {
        Some(r) => println!(
            "The app in `shop` got GET {} from {} (the gateway's address: node 2's proxy ends \
             the HBONE stream and\nconnects to the app keeping it) with X-Forwarded-For: {} \
             and X-Forwarded-Proto: {}.",
            r.path,
            r.peer,
            r.header("x-forwarded-for").unwrap_or("(none)"),
            r.header("x-forwarded-proto").unwrap_or("(none)"),
        ),
        None => problems.push("the shop app got no request".into()),
    }
    let xff = shop_app
        .requests()
        .last()
        .and_then(|r| r.header("x-forwarded-for").map(str::to_owned));
    if xff.as_deref() != Some(&outside.ip().to_string()) {
        problems.push(format!(
            "the app should see X-Forwarded-For {}, it saw {xff:?}",
            outside.ip()
        ));
    }
    match gw.access_log().first() {
        Some(line) => println!("The gateway's access-log line:\n  {line}"),
        None => problems.push(format!("the gateway wrote no access log:\n{}", gw.log())),
    }
    let record = agents[1]
        .connections()?
        .all()
        .find(|r| Some(r.id) > seen && r.pod == format!("{SHOP_NS}/shop"))
        .cloned();
    match record {
        Some(r) if r.src_identity.as_deref() == Some(gateway_id.as_str()) => println!(
            "Node 2's record of the connection: {} into {} from {}, proven as {} ({}).",
            r.direction,
            r.pod,
            r.src,
            gateway_id,
            r.security.as_deref().unwrap_or("?"),
        ),
        other => problems.push(format!(
            "node 2 should record an HBONE connection to shop from {gateway_id}: {other:?}"
        )),
    }
    Ok(())
}

/// Section 9: node 1's mesh turns `REGISTRY_ONLY` with one ExternalService, egress/api
/// (api.example.test at 192.0.2.10; port 80 plain HTTP for the app, TLS to 443 originated
/// by the proxy). `client` reaches it; a connection to other.example.test (192.0.2.20, not
/// registered) is refused by connect4 before a packet leaves.
fn egress(
    node: &TestNode,
    client: &TestPod,
    agent: &TestAgent,
    outside: &Outside,
    ca: &DemoCa,
    problems: &mut Vec<String>,
) -> Result<()> {
    let testapp = app::testapp_bin();
    let mut hosts = Vec::new();
    for (host, ip) in [(API_HOST, API_IP), (OTHER_HOST, OTHER_IP)] {
        outside.add_loopback_address(ip)?;
        let cert = ca.issue(host)?;
        let body = node.dir().join(format!("{host}.json"));
        std::fs::write(&body, json!({ "host": host }).to_string())?;
        let (ip, cert, key, body) = (
            ip.to_string(),
            cert.cert.display().to_string(),
            cert.key.display().to_string(),
            body.display().to_string(),
        );
        let args = [
            "https-serve",
            "--port",
            "443",
            "--bind",
            &ip,
            "--cert",
            &cert,
            "--key",
            &key,
            "--file",
            &body,
        ];
        let mut cmd = Command::new(&testapp);
        cmd.args(args);
        hosts.push(outside.spawn(cmd, host)?);
    }
    for host in &hosts {
        wait_for(
            || host.output().contains("listening "),
            "an HTTPS host to listen",
        )?;
    }
    node.set_external_services(json!([{
        "name": "api",
        "namespace": "egress",
        "hosts": [API_HOST],
        "resolution": "STATIC",
        "addresses": [API_IP.to_string()],
        "ports": [{
            "number": 80, "name": "http", "protocol": "HTTP", "targetPort": 443,
            "tls": { "caCertificates": ca.cert_pem()? },
        }],
    }]));
    node.set_outbound_mode("REGISTRY_ONLY");
    agent.reload_and_wait(node)?;
    println!(
        "Node 1's mesh now has outboundTrafficPolicy REGISTRY_ONLY and one ExternalService, \
         egress/api:\n{API_HOST} at {API_IP} (STATIC), port 80 protocol HTTP, whose \
         connections the proxy sends to 443 inside\nTLS it originates, checking the host's \
         certificate against the demo's CA. Outside the cluster, HTTPS hosts\nanswer as \
         {API_HOST} ({API_IP}) and {OTHER_HOST} ({OTHER_IP}), which nobody registered."
    );
    let plain = SocketAddr::from((API_IP, 80));
    let report = HttpLoad::new(plain, 1)
        .header("host", API_HOST)
        .path("/orders")
        .run(client)?;
    match &report.first {
        Some(r) if r.status == 200 => println!(
            "  client → http://{API_HOST}/orders ({plain}, plain HTTP): {} {}",
            r.status,
            r.body.trim()
        ),
        _ => problems.push(format!("client should reach {API_HOST}: {report:?}")),
    }
    match hosts[0]
        .output()
        .lines()
        .find_map(|l| l.strip_prefix("fetch "))
    {
        Some(line) => {
            let fetch: Value = serde_json::from_str(line).unwrap_or_default();
            println!(
                "    {API_HOST} served {} {} over {} with SNI {} to {} (the pod's own \
                 address: the proxy originated the TLS)",
                fetch["method"].as_str().unwrap_or("?"),
                fetch["path"].as_str().unwrap_or("?"),
                fetch["tls"].as_str().unwrap_or("?"),
                fetch["sni"].as_str().unwrap_or("none"),
                fetch["peer"].as_str().unwrap_or("?"),
            );
        }
        None => problems.push(format!("{API_HOST} served nothing")),
    }
    let other = SocketAddr::from((OTHER_IP, 443));
    match app::send_text(client, other, "hello") {
        Ok(report) => problems.push(format!(
            "{OTHER_HOST} should be refused, it answered: {report:?}"
        )),
        Err(e) => {
            let text = format!("{e:#}");
            let line = text
                .lines()
                .find(|l| l.contains("kind="))
                .unwrap_or(text.as_str());
            println!(
                "  client → {other} ({OTHER_HOST}): the app got: {}",
                line.trim()
            );
            if !text.contains("kind=PermissionDenied") {
                problems.push(format!("{OTHER_HOST} should be refused with EPERM: {text}"));
            }
        }
    }
    if hosts[1].output().contains("accepted ") {
        problems.push(format!("{OTHER_HOST} should never see a connection"));
    } else {
        println!(
            "    refused by connect4 in the kernel (EPERM) before a packet left: \
             {OTHER_HOST} saw no connection."
        );
    }
    let refused = Scrape::parse(&agent.metrics()?).sum(
        "weft_agent_ebpf_events_total",
        &[("event", "connect_unregistered_refused")],
    );
    println!(
        "  node 1's weft_agent_ebpf_events_total{{event=\"connect_unregistered_refused\"}} \
         {refused}"
    );
    if refused < 1.0 {
        problems.push("node 1 should count the refused connect".into());
    }
    Ok(())
}

fn wait_for(mut ok: impl FnMut() -> bool, what: &str) -> Result<()> {
    let deadline = Instant::now() + weft_tests::scaled(Duration::from_secs(10));
    while !ok() {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Node 1's link to the world outside: its default route (the internet) and the way the
/// outside client reaches the cluster.
const OUTSIDE_LINK: Link = Link {
    node_end: "out0",
    far_end: "eth0",
    node_ip: Ipv4Addr::new(203, 0, 113, 1),
    far_ip: gateway::OUTSIDE_IP,
    default_route: true,
};
const APP_PORT: u16 = 8080;
const GATEWAY: &str = "public";
const GATEWAY_NS: &str = "edge";
const GATEWAY_PORT: u16 = 8443;
const SHOP_NS: &str = "shop";
const SHOP_HOST: &str = "shop.example.test";
const SHOP_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
const API_HOST: &str = "api.example.test";
const API_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const OTHER_HOST: &str = "other.example.test";
const OTHER_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 20);
