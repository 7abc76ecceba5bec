//! `cargo xtask demo`: a guided tour for a newcomer. Builds two simulated nodes joined by a
//! link with the end-to-end harness (`weft-tests`), runs the real agent on each, sends
//! traffic between pods and explains, from the applications', the proxies' and the wire's
//! points of view, which connections went through the mesh, which crossed the nodes as
//! mutual TLS (HBONE) and with which identities. Cleans up and ends with `demo: ok` (or
//! fails, saying what did not behave as described).

use std::{
    collections::HashSet,
    net::{Ipv4Addr, SocketAddr},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use weft_tests::{
    ConnRecord, Service, TestAgent, TestNode, TestPod, TestWaypoint,
    app::{self, Mode, SendReport, Server},
    bpf,
    l7::{self, HttpLoad, HttpServe},
    metrics::Scrape,
    waypoint,
    wire::{Capture, TLS13, X25519MLKEM768},
};

use crate::{cargo, setup};

mod ca;
mod edge;

pub fn run() -> Result<()> {
    setup::ensure()?;
    println!("== building the agent and the demo's test application ==");
    let agent_bin = cargo::build_agent()?;
    cargo::run(cargo::cargo().args(["build", "-p", "weft-tests", "--bins"]))?;
    if let Some(missing) = weft_tests::missing_requirement() {
        bail!("the demo cannot run here: {missing}");
    }
    let problems = tour(&agent_bin.display().to_string())?;
    // The nodes (and everything they created) are gone by now.
    println!("\n== cleaned up: namespaces, cgroups and pins of the demo nodes are removed ==");
    if !problems.is_empty() {
        for p in &problems {
            println!("PROBLEM: {p}");
        }
        bail!(
            "{} thing(s) did not behave as described above",
            problems.len()
        );
    }
    println!("demo: ok");
    Ok(())
}

/// The tour proper; returns what did not behave as expected.
fn tour(agent_bin: &str) -> Result<Vec<String>> {
    let mut problems = Vec::new();
    println!("\n== 1. two nodes, four pods ==");
    let node1 = TestNode::new("demo", 1)?;
    let node2 = TestNode::new("demo", 2)?;
    node1.connect(&node2)?;
    let client = node1.pod("client").service_account("client").create()?;
    let batch = node1
        .pod("batch")
        .service_account("batch")
        .enrolled(false)
        .create()?;
    let server = node2
        .pod("server")
        .service_account("server")
        .label("app", "echo")
        .create()?;
    let legacy = node2
        .pod("legacy")
        .service_account("legacy")
        .enrolled(false)
        .create()?;
    for node in [&node1, &node2] {
        node.add_service(Service {
            name: "echo".into(),
            namespace: "default".into(),
            vips: vec![VIP],
            ports: vec![(VIP_PORT, APP_PORT)],
            endpoints: vec![server.ip()],
            waypoint: None,
        });
    }
    for node in [&node1, &node2] {
        println!(
            "{} is network namespace {} with a bridge at {}.",
            node.node_name(),
            node.netns_name(),
            node.bridge_ip()
        );
    }
    println!(
        "The nodes are joined by a veth link ({} on node 1), as two machines of a cluster.",
        node1.link_to(&node2)
    );
    println!("Each pod is its own network namespace and cgroup, like a Kubernetes pod:");
    for (node, pod) in [
        (&node1, &client),
        (&node1, &batch),
        (&node2, &server),
        (&node2, &legacy),
    ] {
        println!(
            "  {:<7} on {:<12} {:<10} {}",
            pod.name(),
            node.node_name(),
            pod.ip(),
            if pod.enrolled() {
                "in the mesh (enrolled)"
            } else {
                "NOT in the mesh"
            }
        );
    }
    println!(
        "  service default/echo: VIP {VIP}:{VIP_PORT} → server:{APP_PORT} (no kube-proxy here: \
         only the mesh can resolve it)"
    );

    println!("\n== 2. the agents ==");
    let mut agent1 = node1.start_agent()?;
    let mut agent2 = node2.start_agent()?;
    for agent in [&mut agent1, &mut agent2] {
        agent.show_log_on_drop(false);
        println!(
            "`{agent_bin} agent --config {}` is ready.",
            agent.config_path().display()
        );
    }
    println!(
        "Each attached connect4/connect6/sock_ops to its pods' cgroup root and an sk_lookup \
         program to\nthe network namespace of each enrolled pod, and opened the listeners \
         (15001 outbound, 15006\ninbound plaintext, 15008 HBONE) inside those pods."
    );
    let attached = bpf::cgroup_attachments(&node1.cgroup_root())?;
    let kinds: Vec<String> = attached
        .iter()
        .map(|a| format!("{} ({})", a.attach_type, a.name))
        .collect();
    println!("bpftool cgroup show (node 1): {}", kinds.join(", "));
    println!(
        "Both agents sign with one cluster CA (in-process here; `weft ca` in a cluster). The \
         certificates\nthey hold, one per identity of an enrolled pod:"
    );
    for (node, agent) in [(&node1, &agent1), (&node2, &agent2)] {
        for cert in certificates(agent)? {
            println!(
                "  {:<12} {}  serial {}  expires {}",
                node.node_name(),
                cert["identity"].as_str().unwrap_or("?"),
                short(cert["serial"].as_str().unwrap_or("?")),
                cert["notAfter"].as_str().unwrap_or("?"),
            );
        }
    }

    println!("\n== 3. traffic ==");
    let server_app = app::serve(&server, APP_PORT, Mode::Echo)?;
    let legacy_app = app::serve(&legacy, APP_PORT, Mode::Echo)?;
    println!("An echo application listens on port {APP_PORT} in `server` and in `legacy`.");
    let agents = Agents {
        source: &agent1,
        destination: &agent2,
    };
    let cases = [
        Case::new(
            "enrolled → enrolled",
            &client,
            server.ip(),
            APP_PORT,
            &server,
            &server_app,
            Expect::MTLS,
        ),
        Case::new(
            "enrolled → service VIP",
            &client,
            VIP,
            VIP_PORT,
            &server,
            &server_app,
            Expect::MTLS,
        ),
        Case::new(
            "enrolled → not enrolled",
            &client,
            legacy.ip(),
            APP_PORT,
            &legacy,
            &legacy_app,
            Expect::OUT,
        ),
        Case::new(
            "not enrolled → enrolled",
            &batch,
            server.ip(),
            APP_PORT,
            &server,
            &server_app,
            Expect::IN,
        ),
        Case::new(
            "not enrolled → not enrolled",
            &batch,
            legacy.ip(),
            APP_PORT,
            &legacy,
            &legacy_app,
            Expect::NONE,
        ),
    ];
    let mut table = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let seen = agents.ids()?;
        let capture = Capture::on_node(&node1, &node1.link_to(&node2), "tcp")?;
        let sent = app::send(case.from, case.to, 64 * 1024, i as u64 + 1)?;
        let records = agents.new_records(&seen, case.expect.count())?;
        let wire = capture.stop()?;
        let verdict = explain(i + 1, case, &sent, &records, &mut problems);
        describe_wire(&wire, case, &mut problems)?;
        table.push((case, verdict));
    }
    println!("\nIn short:");
    println!(
        "  {:<30} {:<25} {:<13} {:<13} identities",
        "", "connection", "source node", "dest. node"
    );
    for (case, verdict) in table {
        println!(
            "  {:<30} {:<25} {:<13} {:<13} {}",
            case.what,
            format!("{} → {}", case.from.name(), case.to),
            verdict.source,
            verdict.destination,
            verdict.identities
        );
    }

    println!("\n== 4. the eBPF maps, as the kernel holds them ==");
    let pods_pin = node1.pin_root().join("PODS");
    println!("$ bpftool map dump pinned {}", pods_pin.display());
    match bpf::map_dump_text(&pods_pin) {
        Ok(text) => print!("{text}"),
        Err(e) => problems.push(format!("bpftool map dump: {e:#}")),
    }
    println!(
        "One entry per enrolled pod of node 1 (client): the key is the pod's network namespace \
         cookie,\nthe value its record. batch is absent."
    );

    println!("\n== 5. weft status (each agent's own account) ==");
    for node in [&node1, &node2] {
        println!("--- {} ---", node.node_name());
        let mut status = node.spawn(
            {
                let mut cmd = Command::new(agent_bin);
                cmd.arg("status");
                cmd
            },
            "weft-status",
        )?;
        let done = status.wait(Duration::from_secs(20))?;
        print!("{}", done.output);
        if !done.status.success() {
            problems.push(format!(
                "`weft status` failed on {} ({})",
                node.node_name(),
                done.status
            ));
        }
    }
    println!("\n== 6. a 90/10 canary through a waypoint ==");
    canary(&node1, &node2, &client, [&agent1, &agent2], &mut problems)?;

    println!("\n== 7. an access policy: one client in, another refused ==");
    access_policy(
        [&node1, &node2],
        &client,
        &server,
        [&agent1, &agent2],
        &mut problems,
    )?;

    edge::run([&node1, &node2], &client, [&agent1, &agent2], &mut problems)?;

    // The agents' own logs help only when something went wrong.
    let failed = !problems.is_empty();
    agent1.show_log_on_drop(failed);
    agent2.show_log_on_drop(failed);
    drop((agent1, agent2));
    Ok(problems)
}

/// Section 6: `reviews` is bound to a waypoint (`weft waypoint`, in a pod of node 1 outside
/// the mesh) whose HTTPRoute sends 90 % of requests to `reviews-v1` and 10 % to
/// `reviews-v2`, both on node 2.
fn canary(
    node1: &TestNode,
    node2: &TestNode,
    client: &TestPod,
    agents: [&TestAgent; 2],
    problems: &mut Vec<String>,
) -> Result<()> {
    let wp = node1
        .pod("waypoint")
        .service_account("waypoint")
        .enrolled(false)
        .create()?;
    let backend = |version: &str| {
        node2
            .pod(&format!("reviews-{version}"))
            .service_account("reviews")
            .label("app", "reviews")
            .label("version", version)
            .create()
    };
    let (v1, v2) = (backend("v1")?, backend("v2")?);
    for node in [node1, node2] {
        for (name, vip, endpoints, waypoint) in [
            (
                "reviews",
                REVIEWS_VIP,
                vec![v1.ip(), v2.ip()],
                Some("waypoint"),
            ),
            (
                "reviews-v1",
                Ipv4Addr::new(10, 96, 0, 21),
                vec![v1.ip()],
                None,
            ),
            (
                "reviews-v2",
                Ipv4Addr::new(10, 96, 0, 22),
                vec![v2.ip()],
                None,
            ),
        ] {
            node.add_service(Service {
                name: name.into(),
                namespace: "default".into(),
                vips: vec![vip],
                ports: vec![(VIP_PORT, APP_PORT)],
                endpoints,
                waypoint: waypoint.map(str::to_owned),
            });
        }
        node.set_waypoints(json!([{
            "name": "waypoint", "serviceAccount": "waypoint", "ips": [wp.ip().to_string()],
        }]));
    }
    for (node, agent) in [node1, node2].into_iter().zip(agents) {
        agent.reload_and_wait(node)?;
    }
    let _servers = [
        l7::http_serve(&v1, &HttpServe::new(APP_PORT, "reviews-v1"))?,
        l7::http_serve(&v2, &HttpServe::new(APP_PORT, "reviews-v2"))?,
    ];
    let rules = json!([{ "backendRefs": [
        { "name": "reviews-v1", "port": VIP_PORT, "weight": 90 },
        { "name": "reviews-v2", "port": VIP_PORT, "weight": 10 },
    ] }]);
    let route = waypoint::route("HTTPRoute", "reviews-canary", "reviews", VIP_PORT, rules);
    println!(
        "Service default/reviews ({REVIEWS_VIP}:{VIP_PORT}) carries the label \
         weft.dev/use-waypoint=waypoint.\nThe waypoint runs in pod `waypoint` ({}) on {}, \
         outside the mesh, as spiffe://cluster.local/ns/default/sa/waypoint,\nwith this \
         HTTPRoute (GAMMA: its parent is the Service):\n{}",
        wp.ip(),
        node1.node_name(),
        serde_json::to_string_pretty(&route).unwrap_or_default()
    );
    let mut waypoint = TestWaypoint::start(node1, &wp, "waypoint", json!([route]))?;
    let problems_before = problems.len();
    let to = SocketAddr::from((REVIEWS_VIP, VIP_PORT));
    let report = HttpLoad::new(to, CANARY_REQUESTS)
        .concurrency(4)
        .run(client)?;
    let share = |name: &str| report.backend(name) as f64 * 100.0 / CANARY_REQUESTS as f64;
    println!(
        "`client` sent {CANARY_REQUESTS} HTTP requests to {to}: node 1's agent sent each \
         connection over HBONE to the\nwaypoint, which split the requests: reviews-v1 {:.1} %, \
         reviews-v2 {:.1} % ({} answered 200).",
        share("reviews-v1"),
        share("reviews-v2"),
        report.status(200)
    );
    if report.status(200) != CANARY_REQUESTS || !(85.0..=95.0).contains(&share("reviews-v1")) {
        problems.push(format!("the canary split is off: {report:?}"));
    }
    let counted = weft_tests::metrics::Scrape::parse(&waypoint.metrics()?).sum(
        "weft_requests_total",
        &[("destination_service_name", "reviews")],
    );
    println!(
        "The waypoint counted {counted} requests in weft_requests_total (Istio's labels: \
         source_principal, destination_workload, response_code, …),\nand wrote one JSON \
         access-log line per request; the first:\n  {}",
        waypoint
            .access_log()
            .first()
            .map(ToString::to_string)
            .unwrap_or_default()
    );
    if counted != CANARY_REQUESTS as f64 {
        problems.push(format!(
            "the waypoint counted {counted} of {CANARY_REQUESTS} requests"
        ));
    }
    // Its log (one line per request) helps only when something went wrong.
    waypoint.show_log_on_drop(problems.len() > problems_before);
    Ok(())
}

/// Section 7: an AccessPolicy on node 2 lets `client` reach `server` and refuses a second
/// enrolled pod of node 1 with another identity. The refusal is a reset, judged by node 2's
/// proxy on the client's proven SPIFFE id; its record names the reason, and both
/// connections show in node 2's Istio-style TCP metrics.
fn access_policy(
    nodes: [&TestNode; 2],
    client: &TestPod,
    server: &TestPod,
    agents: [&TestAgent; 2],
    problems: &mut Vec<String>,
) -> Result<()> {
    let intruder = nodes[0]
        .pod("intruder")
        .service_account("intruder")
        .create()?;
    let client_id = "spiffe://cluster.local/ns/default/sa/client";
    let intruder_id = "spiffe://cluster.local/ns/default/sa/intruder";
    nodes[1].set_policies(json!([{
        "name": "echo-clients",
        "selector": { "matchLabels": { "app": "echo" } },
        "action": "ALLOW",
        "rules": [{ "from": [{ "principals": [client_id] }] }],
    }]));
    for (node, agent) in nodes.iter().zip(agents) {
        agent.reload_and_wait(node)?;
    }
    println!(
        "A new pod `intruder` (service account intruder) joins node 1, in the mesh. Node 2 gets \
         one\nAccessPolicy, default/echo-clients: ALLOW to pods labelled app=echo (server) only \
         from\n{client_id}. Once a policy allows anything, everything else is denied."
    );
    let to = SocketAddr::from((server.ip(), APP_PORT));
    let seen = agents[1].connections()?.all().map(|r| r.id).max();
    for (pod, allowed) in [(client, true), (&intruder, false)] {
        let text = format!("hello from {}", pod.name());
        match (app::send_text(pod, to, &text), allowed) {
            (Ok(report), true) if report.reply.as_deref() == Some(text.as_str()) => {
                println!("  {} → {to}: echoed: allowed", pod.name())
            }
            (Err(e), false) if app::is_reset(&e) => {
                println!("  {} → {to}: connection reset: refused", pod.name())
            }
            (outcome, _) => problems.push(format!(
                "{} → {to} should have been {}: {outcome:?}",
                pod.name(),
                if allowed { "allowed" } else { "refused" }
            )),
        }
    }
    let denial = agents[1]
        .connections()?
        .recent
        .into_iter()
        .find(|r| Some(r.id) > seen && r.src_identity.as_deref() == Some(intruder_id));
    match denial {
        Some(r) if r.error.as_deref() == Some("not_allowed") => println!(
            "Node 2's record of the refusal: {} from {} ({}), error {}.",
            r.direction,
            r.src,
            intruder_id,
            r.error.as_deref().unwrap_or("-")
        ),
        other => problems.push(format!(
            "node 2 should have recorded the intruder's refusal as not_allowed: {other:?}"
        )),
    }
    let scrape = Scrape::parse(&agents[1].metrics()?);
    println!("Node 2's metrics (reporter=destination), per source principal:");
    for (principal, flags) in [(client_id, "-"), (intruder_id, "RBAC")] {
        let labels = [
            ("reporter", "destination"),
            ("source_principal", principal),
            ("response_flags", flags),
        ];
        let opened = scrape.sum("weft_tcp_connections_opened_total", &labels[..2]);
        let sent = scrape.sum("weft_tcp_sent_bytes_total", &labels);
        let received = scrape.sum("weft_tcp_received_bytes_total", &labels);
        let closed = scrape.sum("weft_tcp_connections_closed_total", &labels);
        println!(
            "  {principal:<46} opened {opened}  closed {closed} (response_flags {flags})  \
             received {received} B  sent {sent} B"
        );
        if opened < 1.0 || closed < 1.0 {
            problems.push(format!(
                "node 2's metrics should count {principal}'s connection (flags {flags})"
            ));
        }
    }
    let refused = scrape.sum(
        "weft_agent_denied_connections_total",
        &[("reason", "not_allowed")],
    );
    println!("  weft_agent_denied_connections_total{{reason=\"not_allowed\"}} {refused}");
    if refused < 1.0 {
        problems.push("node 2 should count the refusal as not_allowed".into());
    }
    Ok(())
}

/// The agents of the source node (client, batch) and the destination node (server, legacy).
struct Agents<'a> {
    source: &'a TestAgent,
    destination: &'a TestAgent,
}

impl Agents<'_> {
    fn ids(&self) -> Result<HashSet<(bool, u64)>> {
        let mut ids = HashSet::new();
        for (is_source, agent) in [(true, self.source), (false, self.destination)] {
            ids.extend(agent.connections()?.all().map(|r| (is_source, r.id)));
        }
        Ok(ids)
    }

    /// Records that appeared since `seen` on either agent; waits (briefly) until `expected`
    /// of them are there.
    fn new_records(&self, seen: &HashSet<(bool, u64)>, expected: usize) -> Result<Vec<ConnRecord>> {
        let deadline = Instant::now() + Duration::from_secs(if expected == 0 { 1 } else { 5 });
        loop {
            let mut new = Vec::new();
            for (is_source, agent) in [(true, self.source), (false, self.destination)] {
                let all = agent.connections().context("GET /debug/connections")?;
                new.extend(
                    all.recent
                        .into_iter()
                        .filter(|r| !seen.contains(&(is_source, r.id))),
                );
            }
            if new.len() >= expected.max(1) || Instant::now() > deadline {
                return Ok(new);
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The certificates an agent holds (`/status`).
fn certificates(agent: &TestAgent) -> Result<Vec<Value>> {
    Ok(agent.status()?["certificates"]
        .as_array()
        .cloned()
        .unwrap_or_default())
}

/// What the capture on the node link shows for one case.
fn describe_wire(
    wire: &weft_tests::wire::Pcap,
    case: &Case<'_>,
    problems: &mut Vec<String>,
) -> Result<()> {
    let tls = wire.tls_summary(HBONE_PORT)?;
    if case.expect.hbone {
        let handshakes = if tls.server_hello_versions.is_empty() {
            "no new handshake: the stream rode the pooled HBONE connection".to_string()
        } else {
            let tls13 = tls.server_hello_versions.iter().all(|v| *v == Some(TLS13));
            let pq = tls
                .server_hello_groups
                .iter()
                .all(|g| *g == Some(X25519MLKEM768));
            format!(
                "{} handshake(s), {}, key exchange {}",
                tls.server_hello_versions.len(),
                if tls13 { "TLS 1.3" } else { "NOT TLS 1.3" },
                if pq {
                    "X25519MLKEM768 (post-quantum hybrid)"
                } else {
                    "classical"
                }
            )
        };
        println!(
            "   on the node link: {} data segments, all TLS to port {HBONE_PORT}; {handshakes}",
            tls.segments
        );
        let all_tls13 = tls.server_hello_versions.iter().all(|v| *v == Some(TLS13));
        if tls.segments_off_port > 0 || !all_tls13 {
            problems.push(format!(
                "{}: something other than TLS 1.3 crossed the link: {tls:?}",
                case.what
            ));
        }
    } else if case.to.ip() != VIP {
        println!(
            "   on the node link: {} data segments of plaintext TCP (the destination is outside \
             the mesh or the source is)",
            tls.segments
        );
    }
    Ok(())
}

fn short(serial: &str) -> &str {
    serial.get(..16).unwrap_or(serial)
}

/// One connection of the tour.
struct Case<'a> {
    what: &'static str,
    from: &'a TestPod,
    to: SocketAddr,
    dest: &'a TestPod,
    dest_app: &'a Server,
    expect: Expect,
}

impl<'a> Case<'a> {
    fn new(
        what: &'static str,
        from: &'a TestPod,
        ip: Ipv4Addr,
        port: u16,
        dest: &'a TestPod,
        dest_app: &'a Server,
        expect: Expect,
    ) -> Self {
        Case {
            what,
            from,
            to: SocketAddr::from((ip, port)),
            dest,
            dest_app,
            expect,
        }
    }
}

/// Which proxy records a connection should produce.
#[derive(Clone, Copy)]
struct Expect {
    /// The source node's proxy took it (outbound).
    outbound: bool,
    /// The destination node's proxy took it in plaintext (15006).
    inbound: bool,
    /// It crossed as HBONE (mutual TLS) into the destination's 15008.
    hbone: bool,
}

impl Expect {
    const MTLS: Expect = Expect {
        outbound: true,
        inbound: false,
        hbone: true,
    };
    const OUT: Expect = Expect {
        outbound: true,
        inbound: false,
        hbone: false,
    };
    const IN: Expect = Expect {
        outbound: false,
        inbound: true,
        hbone: false,
    };
    const NONE: Expect = Expect {
        outbound: false,
        inbound: false,
        hbone: false,
    };

    fn count(self) -> usize {
        usize::from(self.outbound) + usize::from(self.inbound) + usize::from(self.hbone)
    }
}

/// One line of the summary table.
struct Verdict {
    source: &'static str,
    destination: &'static str,
    identities: String,
}

/// Says what happened to one connection; returns (outbound proxied, inbound proxied).
fn explain(
    n: usize,
    case: &Case<'_>,
    sent: &SendReport,
    records: &[ConnRecord],
    problems: &mut Vec<String>,
) -> Verdict {
    let (what, to) = (case.what, case.to);
    println!(
        "\n{n}. {what}: `{}` connects to {to} and sends 64 KiB",
        case.from.name()
    );
    let intact = sent.received_sha256 == sent.sent_sha256 && sent.received_bytes == sent.sent_bytes;
    println!(
        "   client app: {} bytes echoed back {} (sha256 {}…)",
        sent.received_bytes,
        if intact { "intact" } else { "CORRUPTED" },
        &sent.sent_sha256[..12]
    );
    if !intact {
        problems.push(format!("{what}: payload not intact"));
    }
    if sent.peer == to {
        println!("   its socket is connected straight to {to}");
    } else {
        println!(
            "   its socket is connected to {} (connect4 rewrote {to} to the proxy's outbound \
             listener inside the pod; the app did not notice)",
            sent.peer
        );
    }
    match case
        .dest_app
        .closed()
        .into_iter()
        .find(|c| c.received_sha256 == sent.sent_sha256)
    {
        Some(c) => {
            let how = if c.peer.ip() == case.dest.ip() {
                " (that is the proxy, connecting from inside the pod)"
            } else {
                ""
            };
            println!(
                "   server app in `{}`: received the same {} bytes (same sha256), from {}{how}",
                case.dest.name(),
                c.received_bytes,
                c.peer
            );
        }
        None => {
            println!(
                "   server app in `{}`: has no record of these bytes",
                case.dest.name()
            );
            problems.push(format!("{what}: the server app did not record the payload"));
        }
    }
    let outbound = records.iter().find(|r| r.direction == "outbound");
    let inbound = records.iter().find(|r| r.direction == "inbound");
    let hbone = records.iter().find(|r| r.direction == "hbone");
    match outbound {
        Some(r) => println!(
            "   source proxy, outbound for {}: original destination {}, connected to {}{}, {} \
             bytes sent / {} received",
            r.pod,
            r.dst,
            r.upstream.as_deref().unwrap_or("?"),
            match &r.dst_identity {
                Some(id) => format!(" over mutual TLS, the peer proved {id}"),
                None => " in plaintext".to_string(),
            },
            r.bytes_sent,
            r.bytes_received
        ),
        None => println!(
            "   no outbound proxy: `{}` is not in the mesh",
            case.from.name()
        ),
    }
    match (inbound, hbone) {
        (_, Some(r)) => println!(
            "   destination proxy, HBONE for {}: a CONNECT stream from {} proven as {}, delivered \
             to the app over the pod's loopback, {} bytes each way",
            r.pod,
            r.src,
            r.src_identity.as_deref().unwrap_or("?"),
            r.bytes_sent
        ),
        (Some(r), None) => println!(
            "   destination proxy, inbound for {}: sk_lookup steered the plaintext connection \
             from {} to 15006 (the pod is PERMISSIVE); delivered over the pod's loopback, {} \
             bytes each way",
            r.pod, r.src, r.bytes_sent
        ),
        (None, None) => println!(
            "   no inbound proxy: `{}` is not in the mesh, its app got the connection directly",
            case.dest.name()
        ),
    }
    let (out, inb, mtls) = (outbound.is_some(), inbound.is_some(), hbone.is_some());
    if out != case.expect.outbound || inb != case.expect.inbound || mtls != case.expect.hbone {
        problems.push(format!(
            "{what}: expected outbound={} inbound={} hbone={}, the proxies recorded {records:?}",
            case.expect.outbound, case.expect.inbound, case.expect.hbone
        ));
    }
    let identities = match hbone.or(outbound) {
        Some(r) if r.src_identity.is_some() || r.dst_identity.is_some() => format!(
            "{} → {}",
            r.src_identity.as_deref().unwrap_or("?"),
            r.dst_identity.as_deref().unwrap_or("?")
        ),
        _ => "- (plaintext)".to_string(),
    };
    Verdict {
        source: if out { "proxied" } else { "direct" },
        destination: match (inb, mtls) {
            (_, true) => "HBONE (mTLS)",
            (true, false) => "plaintext in",
            (false, false) => "direct",
        },
        identities,
    }
}

const APP_PORT: u16 = 8080;
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const VIP_PORT: u16 = 80;
const REVIEWS_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const CANARY_REQUESTS: u64 = 1_000;
const HBONE_PORT: u16 = 15008;
