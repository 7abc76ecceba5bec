//! External services and egress control (issue 17, docs/egress.md): enrolled pods reaching
//! hosts outside the cluster. One node; its pods reach "the internet"
//! (`weft_tests::internet`: a namespace behind the node's default route, with a real
//! dnsmasq, HTTPS hosts with certificates of the test's own CA, and an echo host) in
//! plaintext passthrough or, once a host is registered in `externalServices:`, as that
//! external service: named in telemetry, with TLS originated by the proxy when a port asks
//! for it, refused when not registered under `REGISTRY_ONLY`, refused by an AccessPolicy
//! naming it, and followed when its DNS answer changes. What the pod's app got, what the
//! external host saw (its TCP peers, the SNI it was asked for, failed handshakes), what
//! crossed the wire to the internet and what the agent counted are asserted.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde_json::{Value, json};
use weft_tests::{
    TestAgent, TestNode, TestPod, app, eventually,
    internet::{
        self, API_HOST, API_IP, API_IP2, BARE_IP, ExternalService, HttpsHost, Internet, OTHER_HOST,
        OTHER_IP, TlsOrigination,
    },
    l7::HttpLoad,
    metrics::Scrape,
    privileged, scaled, test_name,
    tls::TestCa,
    wire::TLS13,
};

/// One node with a client pod (namespace `apps`) and, for the policy test, a pod of
/// namespace `batch`; the internet with the HTTPS hosts `api` and `other` and the echo host.
/// Fields drop in order: processes first, then the agent, the internet and the node.
struct Egress {
    api: HttpsHost,
    other: HttpsHost,
    echo: app::Server,
    agent: TestAgent,
    client: TestPod,
    batch: TestPod,
    internet: Internet,
    node: TestNode,
}

impl Egress {
    /// `configure` sets the node's config (external services, mode, policies) before the
    /// agent starts.
    fn new(
        test: &str,
        ttl: Duration,
        configure: impl FnOnce(&TestNode, &Internet),
    ) -> Result<Self> {
        let node = TestNode::new(test, 1)?;
        let client = node
            .pod("client")
            .namespace(CLIENT_NS)
            .service_account("client")
            .create()?;
        let batch = node
            .pod("batch")
            .namespace(BATCH_NS)
            .service_account("batch")
            .create()?;
        let internet = Internet::new(&node, ttl)?;
        internet.serve_dns_to(&node)?;
        configure(&node, &internet);
        let agent = node.start_agent()?;
        let api = internet.https_host(API_HOST, API_IP, 443)?;
        let other = internet.https_host(OTHER_HOST, OTHER_IP, 443)?;
        let echo = internet.echo_host(BARE_IP, ECHO_PORT)?;
        Ok(Egress {
            api,
            other,
            echo,
            agent,
            client,
            batch,
            internet,
            node,
        })
    }

    /// `https-get` from `pod` to `addr`, trusting the internet's CA and checking the
    /// certificate against `sni`: the body of a 200, else the app's error line.
    fn https_get(&self, pod: &TestPod, addr: SocketAddr, sni: &str, path: &str) -> Result<String> {
        self.internet.https_get(pod, addr, sni, path)
    }

    /// The agent's `/metrics`, parsed.
    fn scrape(&self) -> Result<Scrape> {
        Ok(Scrape::parse(&self.agent.metrics()?))
    }

    /// Connections opened by the client-side proxy to the external service `api`, as
    /// telemetry names it.
    fn opened_to_api(&self) -> Result<f64> {
        Ok(self.scrape()?.sum(OPENED, &api_labels()))
    }

    /// Waits until the agent recognises `api` at `addr`: an `https-get` from `pod`
    /// succeeds and raises the opened-connections counter named after `api`. (The agent
    /// resolves the host after it starts: the first connections may be passthrough.)
    fn wait_recognised(&self, pod: &TestPod, addr: SocketAddr) -> Result<()> {
        eventually(Duration::from_secs(15), || {
            let before = self.opened_to_api()?;
            let body = self.https_get(pod, addr, API_HOST, "/recognised")?;
            ensure!(body.contains(API_HOST), "api answered {body}");
            let after = self.opened_to_api()?;
            ensure!(
                after > before,
                "the connection to {addr} was not counted as {API_HOST} ({OPENED} {before} → \
                 {after}); the agent's {OPENED} series:\n{}",
                self.series(OPENED)
            );
            Ok(())
        })
        .map_err(|e| {
            anyhow!(
                "{addr} never became the external service {API_HOST} (external services, \
                 issue 17): {e:#}"
            )
        })
    }

    /// The `name` series of the agent, one per line (for failure messages).
    fn series(&self, name: &str) -> String {
        self.scrape()
            .map(|s| {
                s.matching(name, &[])
                    .map(|m| format!("{:?} {}", m.labels, m.value))
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .unwrap_or_else(|e| format!("(no metrics: {e:#})"))
    }

    /// What the proxy and the eBPF programs counted as refused for not being registered.
    fn refused_unregistered(&self) -> Result<f64> {
        let scrape = self.scrape()?;
        Ok(scrape.sum(EBPF_EVENTS, &[("event", EBPF_REFUSED_EVENT)])
            + scrape.sum(PROXY_REFUSED, &[("reason", PROXY_REFUSED_REASON)]))
    }
}

/// Phase 1 of the harness, on today's agent: with no external service registered and the
/// mesh in `ALLOW_ANY`, an enrolled pod reaches an internet host by its address
/// (passthrough), over TLS the app does itself, and a plain echo host; the hosts see the
/// pod's own address; dnsmasq answers the node; the agent records the connections.
#[test]
fn an_enrolled_pod_reaches_internet_hosts_by_address_in_allow_any() -> Result<()> {
    privileged!();
    let e = Egress::new(test_name!(), Duration::from_secs(5), |node, _| {
        node.set_outbound_mode("ALLOW_ANY");
    })?;
    // dnsmasq answers the node (where the agent resolves), with the configured TTL.
    let answers = e.internet.lookup(API_HOST)?;
    ensure!(
        answers == [(API_IP, 5)],
        "dnsmasq answers {API_HOST}: {answers:?}"
    );
    ensure!(
        e.internet.lookup("nowhere.example.test")?.is_empty(),
        "no answer for an unknown name"
    );

    let capture = e.internet.capture(&e.node, "tcp port 443")?;
    let body = e.https_get(&e.client, e.api.addr, API_HOST, "/passthrough")?;
    ensure!(body.contains(API_HOST), "api answered {body}");
    // The wire to the internet: the app's TLS, and the request inside it only.
    let pcap = capture.stop_after(500)?;
    let tls = pcap.tls_summary(443)?;
    ensure!(
        tls.server_hello_versions == [Some(TLS13)] && tls.connections == 1,
        "one TLS 1.3 connection to api on the wire: {tls:?}"
    );
    ensure!(
        !pcap.contains(b"/passthrough"),
        "the request crossed in plaintext: {}",
        pcap.file.display()
    );
    // The host saw the pod itself: no translation on the way, the proxy dials as the pod.
    let accepted = e.api.accepted();
    ensure!(
        e.api.accepted_from(e.client.ip()) == 1 && accepted.len() == 1,
        "api saw one connection, from the pod {}: {accepted:?}",
        e.client.ip()
    );
    let hellos = e.api.hellos();
    ensure!(
        hellos.len() == 1 && hellos[0].sni.as_deref() == Some(API_HOST),
        "the app's own TLS asked api for {API_HOST}: {hellos:?}"
    );
    let served = e.api.served();
    ensure!(
        served.len() == 1 && served[0].path == "/passthrough" && served[0].tls == "TLSv1_3",
        "api served the request over TLS 1.3: {served:?}"
    );

    let echo_to = SocketAddr::new(IpAddr::V4(BARE_IP), ECHO_PORT);
    let report = app::send_text(&e.client, echo_to, "hello internet")?;
    ensure!(
        report.reply.as_deref() == Some("hello internet"),
        "the echo host echoed: {report:?}"
    );
    let echoed = e.echo.wait_accepted(1);
    ensure!(
        echoed.len() == 1 && echoed[0].peer.ip() == IpAddr::V4(e.client.ip()),
        "the echo host saw the pod: {echoed:?}"
    );

    // The agent's view: both were proxied outbound connections of the client pod.
    let client = e.client.pod_ref();
    for (what, dst) in [("api", e.api.addr), ("echo", echo_to)] {
        let record = e.agent.expect_record(what, |r| {
            r.direction == "outbound" && r.pod == client && r.dst == dst.to_string()
        });
        ensure!(
            record.error.is_none() && record.bytes_sent > 0 && record.bytes_received > 0,
            "the {what} connection was copied both ways: {record:?}"
        );
        let line = eventually(Duration::from_secs(10), || {
            e.agent
                .access_log()
                .into_iter()
                .find(|l| l["dst.addr"] == dst.to_string().as_str())
                .ok_or_else(|| anyhow!("no access-log line for {dst} yet"))
        })?;
        ensure!(
            line["reporter"] == "source" && line["pod"] == client.as_str(),
            "the {what} access-log line: {line}"
        );
    }
    let opened = e.scrape()?.sum(
        OPENED,
        &[
            ("reporter", "source"),
            ("source_workload", "client"),
            ("source_workload_namespace", CLIENT_NS),
        ],
    );
    ensure!(
        opened >= 2.0,
        "{OPENED} counts the client's two connections, got {opened}:\n{}",
        e.series(OPENED)
    );

    // The harness moves a name (what the re-resolution test does): dnsmasq answers the
    // new address from then on.
    e.internet.set_record(API_HOST, &[API_IP2])?;
    ensure!(
        e.internet.lookup(API_HOST)? == [(API_IP2, 5)],
        "dnsmasq answers the moved name"
    );
    Ok(())
}

/// A registered external service (resolution `DNS`, through dnsmasq): an enrolled pod
/// connecting to the address its host resolves to, at 443, with TLS of its own, gets the
/// host's answer, and the client's proxy names the service in telemetry.
#[test]
fn a_registered_external_service_is_reached_and_named_in_telemetry() -> Result<()> {
    privileged!();
    let e = Egress::new(test_name!(), Duration::from_secs(5), |node, _| {
        node.set_external_services(internet::external_services(&[&api_service(None)]));
    })?;
    e.wait_recognised(&e.client, e.api.addr)?;
    let before = e.opened_to_api()?;
    let body = e.https_get(&e.client, e.api.addr, API_HOST, "/registered")?;
    ensure!(body.contains(API_HOST), "api answered {body}");
    let after = e.opened_to_api()?;
    ensure!(
        after == before + 1.0,
        "one more connection to {API_HOST}: {before} → {after}"
    );
    // The app's own TLS went through untouched: the host saw the pod and the app's SNI.
    let served = e.api.served();
    let last = served.last().context("api served nothing")?;
    ensure!(
        last.path == "/registered"
            && last.sni.as_deref() == Some(API_HOST)
            && last.peer.starts_with(&format!("{}:", e.client.ip())),
        "api served the pod's request: {last:?}"
    );
    let scrape = e.scrape()?;
    let labels = api_labels();
    let named: Vec<_> = scrape.matching(OPENED, &labels).collect();
    ensure!(
        named
            .iter()
            .all(|s| s.labels.get("source_workload").map(String::as_str) == Some("client")),
        "the series name the client pod: {named:?}"
    );
    Ok(())
}

/// TLS origination: the external service's port 80 has `targetPort: 443` and `tls:` with
/// the test's CA. The app sends plain HTTP to the host's address at 80 and gets the host's
/// answer; the host saw TLS with SNI `api.example.test` (the service's first host, the
/// default); the wire to the internet carries TLS records and never the request. With a
/// CA that did not sign the host's certificate, the app gets no answer and the host saw
/// the handshake fail.
#[test]
fn the_proxy_originates_tls_to_an_external_port_and_checks_the_host() -> Result<()> {
    privileged!();
    let e = Egress::new(test_name!(), Duration::from_secs(5), |node, internet| {
        let api = api_service(Some(internet.ca_pem()));
        node.set_external_services(internet::external_services(&[&api]));
    })?;
    let plain = SocketAddr::new(IpAddr::V4(API_IP), 80);
    let capture = e.internet.capture(&e.node, "tcp")?;
    let load = HttpLoad::new(plain, 1)
        .header("host", API_HOST)
        .path(SECRET_PATH)
        .timeout(scaled(Duration::from_secs(5)));
    // Until the agent has resolved the host, port 80 is passthrough to a port where
    // nothing listens.
    let report = eventually(Duration::from_secs(15), || {
        let report = load.run(&e.client)?;
        ensure!(report.completed == 1, "no answer at {plain}: {report:?}");
        Ok(report)
    })
    .map_err(|err| anyhow!("plain HTTP to {plain} never got the TLS host's answer: {err:#}"))?;
    let response = report.first.context("a response")?;
    ensure!(
        response.status == 200 && response.body.contains(API_HOST),
        "the app got the host's answer over plain HTTP: {response:?}"
    );
    let served = e.api.served();
    let request = served
        .iter()
        .find(|s| s.path == SECRET_PATH)
        .with_context(|| format!("api never served {SECRET_PATH}: {served:?}"))?;
    ensure!(
        request.sni.as_deref() == Some(API_HOST)
            && request.tls == "TLSv1_3"
            && request.peer.starts_with(&format!("{}:", e.client.ip())),
        "the host got the request inside TLS with SNI {API_HOST}, from the pod: {request:?}"
    );
    ensure!(
        e.api
            .hellos()
            .iter()
            .all(|h| h.sni.as_deref() == Some(API_HOST)),
        "every ClientHello named {API_HOST}: {:?}",
        e.api.hellos()
    );
    let pcap = capture.stop_after(500)?;
    ensure!(
        !pcap.contains(SECRET_PATH.as_bytes()) && !pcap.contains(b"GET /"),
        "the request crossed to the internet in plaintext: {}",
        pcap.file.display()
    );
    let tls = pcap.tls_summary(443)?;
    ensure!(
        !tls.server_hello_versions.is_empty() && tls.segments_off_port == 0,
        "TLS records on 443 and nothing on any other port: {tls:?} ({})",
        pcap.file.display()
    );

    // A CA that did not sign the host's certificate: the proxy refuses the host.
    let wrong = TestCa::new("weft test wrong CA")?;
    e.node
        .set_external_services(internet::external_services(&[&api_service(Some(
            wrong.pem(),
        ))]));
    e.agent.reload_and_wait(&e.node)?;
    let (served_before, errors_before) = (e.api.served().len(), e.api.tls_errors().len());
    // The reload is in force (its generation grew): no attempt may be answered. An early
    // one may still be passthrough to port 80 (refused) if the reload re-resolves the
    // host, so attempts go on until the host has seen a handshake fail.
    let errors = eventually(Duration::from_secs(15), || {
        let report = load.run(&e.client)?;
        if report.completed != 0 {
            return Ok(Err(anyhow!(
                "an answer through a host the proxy cannot verify: {report:?}"
            )));
        }
        let errors = e.api.tls_errors();
        ensure!(
            errors.len() > errors_before,
            "the host saw no failed handshake: {errors:?}"
        );
        Ok(Ok(errors))
    })??;
    ensure!(
        errors[errors_before..]
            .iter()
            .all(|t| t.sni.as_deref() == Some(API_HOST)),
        "the failed handshakes asked for {API_HOST}: {errors:?}"
    );
    ensure!(
        e.api.served().len() == served_before,
        "the host served nothing more: {:?}",
        e.api.served()
    );
    Ok(())
}

/// `REGISTRY_ONLY`: a host that resolves but is not registered (`other.example.test`) and
/// a bare address are refused before they reach anything (the hosts record no connection
/// from the pod), each refusal counted; the registered host still works.
#[test]
fn registry_only_refuses_unregistered_destinations_and_counts_them() -> Result<()> {
    privileged!();
    let e = Egress::new(test_name!(), Duration::from_secs(5), |node, _| {
        node.set_outbound_mode("REGISTRY_ONLY");
        node.set_external_services(internet::external_services(&[&api_service(None)]));
    })?;
    e.wait_recognised(&e.client, e.api.addr)?;
    let before = e.refused_unregistered()?;

    let other = e.https_get(&e.client, e.other.addr, OTHER_HOST, "/unregistered");
    expect_refused(other, "an unregistered host (other.example.test)")?;
    let bare = SocketAddr::new(IpAddr::V4(BARE_IP), ECHO_PORT);
    expect_refused(
        app::send_text(&e.client, bare, "hello bare address"),
        "an unregistered bare address",
    )?;
    let attempts = 2.0;
    // Counted at connect time (eBPF) or by the proxy at once; a moment for the scrape.
    let counted = eventually(Duration::from_secs(5), || {
        let now = e.refused_unregistered()?;
        ensure!(
            now - before == attempts,
            "{EBPF_EVENTS}{{event={EBPF_REFUSED_EVENT}}} + {PROXY_REFUSED} rose by {} for \
             {attempts} refused connections",
            now - before
        );
        Ok(now)
    });
    counted.map_err(|err| {
        anyhow!(
            "{err:#}; the agent's counters:\n{}\n{}",
            e.series(EBPF_EVENTS),
            e.series(PROXY_REFUSED)
        )
    })?;
    ensure!(
        e.other.accepted_from(e.client.ip()) == 0 && e.other.accepted().is_empty(),
        "other.example.test never saw a connection: {:?}",
        e.other.accepted()
    );
    ensure!(
        e.echo.accepted().is_empty(),
        "the bare address never saw a connection: {:?}",
        e.echo.accepted()
    );

    // The registered host still works.
    let body = e.https_get(&e.client, e.api.addr, API_HOST, "/still-registered")?;
    ensure!(body.contains(API_HOST), "api answered {body}");
    Ok(())
}

/// An AccessPolicy naming the external service (`targetRefs`, kind `ExternalService`)
/// with a DENY for the namespace `batch`: the `batch` pod's connections to it are refused
/// by its own node's proxy and never reach the host; a pod of another namespace still
/// reaches it.
#[test]
fn a_deny_policy_naming_an_external_service_refuses_that_namespace_only() -> Result<()> {
    privileged!();
    let e = Egress::new(test_name!(), Duration::from_secs(5), |node, _| {
        node.set_external_services(internet::external_services(&[&api_service(None)]));
        node.set_policies(json!([deny_api_from(BATCH_NS)]));
    })?;
    // The other namespace's pod gets through (and the host is recognised by now).
    e.wait_recognised(&e.client, e.api.addr)?;
    let denied = e.https_get(&e.batch, e.api.addr, API_HOST, "/denied");
    expect_refused(denied, "the batch pod's connection to api")?;
    ensure!(
        e.api.accepted_from(e.batch.ip()) == 0,
        "api never saw the batch pod: {:?}",
        e.api.accepted()
    );
    let body = e.https_get(&e.client, e.api.addr, API_HOST, "/allowed")?;
    ensure!(
        body.contains(API_HOST),
        "api answered the client pod: {body}"
    );
    ensure!(
        e.api.accepted_from(e.client.ip()) >= 2,
        "api saw the client pod: {:?}",
        e.api.accepted()
    );
    Ok(())
}

/// Re-resolution: with a TTL of 1 s, moving `api.example.test` to another address in
/// dnsmasq makes that address the one the proxy recognises as the service within seconds,
/// and the old one no longer.
#[test]
fn a_changed_dns_answer_becomes_the_recognised_address() -> Result<()> {
    privileged!();
    let e = Egress::new(test_name!(), Duration::from_secs(1), |node, _| {
        node.set_external_services(internet::external_services(&[&api_service(None)]));
    })?;
    // The same host behind its second address, with its own certificate for the name.
    let moved = e.internet.https_host(API_HOST, API_IP2, 443)?;
    e.wait_recognised(&e.client, e.api.addr)?;

    e.internet.set_record(API_HOST, &[API_IP2])?;
    e.wait_recognised(&e.client, moved.addr)
        .context("after the DNS answer moved")?;
    ensure!(
        moved.accepted_from(e.client.ip()) >= 1,
        "the new address saw the pod: {:?}",
        moved.accepted()
    );
    // The old address is no longer the service (ALLOW_ANY: still reachable, unnamed).
    eventually(Duration::from_secs(10), || {
        let before = e.opened_to_api()?;
        e.https_get(&e.client, e.api.addr, API_HOST, "/old-address")?;
        let after = e.opened_to_api()?;
        ensure!(
            after == before,
            "a connection to the old address {API_IP} still counts as {API_HOST}"
        );
        Ok(())
    })?;
    Ok(())
}

/// `api` in namespace `egress`: port 443 (`HTTPS`, the app's own TLS) and, with `ca`,
/// port 80 (`HTTP`, `targetPort: 443`, TLS originated by the proxy trusting `ca`).
fn api_service(ca: Option<String>) -> ExternalService {
    let api = ExternalService::dns(EGRESS_NS, "api", &[API_HOST]).port(443, "https", "HTTPS");
    match ca {
        None => api,
        Some(ca) => api.port_with_tls(
            80,
            "http",
            443,
            TlsOrigination {
                sni: None,
                ca_certificates: Some(ca),
            },
        ),
    }
}

/// A DENY AccessPolicy for the external service `api`, for pods of `namespace`.
fn deny_api_from(namespace: &str) -> Value {
    json!({
        "name": "no-api-for-batch",
        "namespace": EGRESS_NS,
        "targetRefs": [{ "group": "weft.dev", "kind": "ExternalService", "name": "api" }],
        "action": "DENY",
        "rules": [{ "from": [{ "namespaces": [namespace] }] }],
    })
}

/// The labels that name the external service `api` on the source reporter.
fn api_labels() -> [(&'static str, &'static str); 3] {
    [
        ("reporter", "source"),
        ("destination_service_name", API_HOST),
        ("destination_service_namespace", EGRESS_NS),
    ]
}

/// The app's connection was refused (EPERM at connect, refused, or reset by the proxy),
/// not answered, not hung.
fn expect_refused<T: std::fmt::Debug>(result: Result<T>, what: &str) -> Result<()> {
    match result {
        Ok(answer) => bail!("{what} must be refused, but was answered: {answer:?}"),
        Err(e) => {
            let text = format!("{e:#}");
            ensure!(
                REFUSED_KINDS
                    .iter()
                    .any(|kind| text.contains(&format!("kind={kind}"))),
                "{what} must be refused (EPERM, refused or reset), not this: {text}"
            );
            Ok(())
        }
    }
}

const CLIENT_NS: &str = "apps";
const BATCH_NS: &str = "batch";
/// The namespace of the ExternalService resources.
const EGRESS_NS: &str = "egress";
const ECHO_PORT: u16 = 7;
/// A request path to look for on the wire.
const SECRET_PATH: &str = "/egress-secret-marker";
const OPENED: &str = "weft_tcp_connections_opened_total";
/// The eBPF programs' counters, and the event counting connects refused as unregistered
/// (`REGISTRY_ONLY`, refused in `cgroup/connect4` with EPERM).
const EBPF_EVENTS: &str = "weft_agent_ebpf_events_total";
const EBPF_REFUSED_EVENT: &str = "connect_unregistered_refused";
/// The proxy's count of connections it refused (here: as unregistered, flag `NR`).
const PROXY_REFUSED: &str = "weft_agent_denied_connections_total";
const PROXY_REFUSED_REASON: &str = "unregistered_destination";
/// How the app sees a refusal: EPERM at connect, a RST answering the SYN, or a reset (on
/// a read, a write, the shutdown after it) once the proxy accepted and refused.
const REFUSED_KINDS: [&str; 5] = [
    "PermissionDenied",
    "ConnectionRefused",
    "ConnectionReset",
    "BrokenPipe",
    "NotConnected",
];
