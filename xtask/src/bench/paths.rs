//! The data path: nodes 1 and 2, direct pods, enrolled pods, stunnel and a waypoint, the
//! seven paths between them ([`Scenario`]s: direct, weft L4 (node-local) and stunnel on one
//! node, direct and weft L4 across nodes, weft L7 through the waypoint; and weft L4 between
//! two pods of node 3, which sends same-node traffic over HBONE), each checked to carry
//! traffic,
//! then measured repetition by repetition; the policy rows follow on the same node.

use std::{net::SocketAddr, path::Path, time::Duration};

use anyhow::{Context, Result};
use serde_json::{Value, json};
use weft_tests::{
    Service, TestAgent, TestNode, TestPod, TestWaypoint,
    bench::{self as harness, BenchServer, Stunnel},
    waypoint,
    ztunnel::Ztunnel,
};

use super::{
    Options, PORT, Part, SAME_NODE_HBONE, SERVER_APP,
    agent::{plain_if_no_ca, transport},
    plan::Plan,
    policies,
    probe::args,
    profile::profile,
    report::Report,
    traffic_policies,
    workloads::{Scenario, http_load, one_rep, rr},
};

/// Throughput, latency and connection rate over every path.
pub fn run(plan: &Plan, options: &Options, out: &Path, report: &mut Report) -> Result<()> {
    println!("== nodes ==");
    let node1 = TestNode::new("bench", 1)?;
    let node2 = TestNode::new("bench", 2)?;
    let direct_c = node1.pod("direct-c").enrolled(false).create()?;
    let direct_s = node1.pod("direct-s").enrolled(false).create()?;
    let weft_c = node1.pod("weft-c").service_account("client").create()?;
    let weft_s = node1
        .pod("weft-s")
        .service_account("server")
        .label("app", SERVER_APP)
        .create()?;
    // Node 3 sends its same-node traffic over HBONE (`mesh.sameNode: HBONE`), beside node
    // 1's default, which joins the pods inside the proxy.
    let node3 = TestNode::new("bench", 3)?;
    node3.set_mesh(json!({ "excludedPorts": [22], "sameNode": "HBONE" }));
    let hbone_c = node3.pod("hbone-c").service_account("client").create()?;
    let hbone_s = node3.pod("hbone-s").service_account("server").create()?;
    // The waypoint's backend has a pod of its own: a port that a waypoint-bound service
    // targets is reached only through the waypoint, and weft-s's must stay plain L4.
    let l7_s = node1.pod("l7-s").service_account("server").create()?;
    let xdirect_s = node2.pod("xdirect-s").enrolled(false).create()?;
    let xweft_s = node2.pod("xweft-s").service_account("server").create()?;
    let wp = TestWaypoint::pod(&node1, WAYPOINT)?;
    // ztunnel's pods: outside weft's mesh, each served by a ztunnel of its own (dedicated
    // mode, as the baseline ran it: one proxy per pod).
    let zt_c = node1
        .pod("zt-c")
        .service_account("client")
        .enrolled(false)
        .create()?;
    let zt_s = node1
        .pod("zt-s")
        .service_account("server")
        .enrolled(false)
        .create()?;
    if let Some(threads) = options.agent_worker_threads {
        for node in [&node1, &node2, &node3] {
            node.set_agent_setting("workerThreads", threads.into());
        }
    }
    let xzt_s = node2
        .pod("xzt-s")
        .service_account("server")
        .enrolled(false)
        .create()?;
    let l7_vip = SocketAddr::from((L7_VIP, HTTP_PORT));
    add_l7_services(&node1, &l7_s, &wp);
    let mtls = plain_if_no_ca(&[&node1, &node2]);
    node1.connect(&node2)?;
    let mut agent1 = node1.start_agent()?;
    let mut agent2 = node2.start_agent()?;
    let mut agent3 = node3.start_agent()?;
    agent1.show_log_on_drop(false);
    agent2.show_log_on_drop(false);
    agent3.show_log_on_drop(false);
    let transport = transport(&agent1, mtls);
    report.transport = transport.clone();
    println!("agents ready; the proxy hop is {transport}");

    let mut servers: Vec<BenchServer> = Vec::new();
    let ztunnels = match &options.ztunnel {
        Some(binary) => {
            let zt = |pod: &TestPod, peers: &[&TestPod]| Ztunnel::start(binary, pod, peers);
            let proxies = vec![
                zt(&zt_c, &[&zt_s, &xzt_s])?,
                zt(&zt_s, &[&zt_c])?,
                zt(&xzt_s, &[&zt_c])?,
            ];
            println!("ztunnel ready: {}", binary.display());
            report.ztunnel = Some(binary.display().to_string());
            proxies
        }
        None => Vec::new(),
    };
    let zt_pids = ztunnels
        .iter()
        .map(|z| z.pid().context("ztunnel is not running"))
        .collect::<Result<Vec<u32>>>()?;
    for pod in [
        &direct_s, &weft_s, &hbone_s, &xdirect_s, &xweft_s, &zt_s, &xzt_s,
    ] {
        servers.push(harness::serve(pod, PORT)?);
        servers.push(harness::http_serve(pod, HTTP_PORT)?);
    }
    servers.push(harness::http_serve(&l7_s, HTTP_PORT)?);
    let tunnel = Stunnel::start(node1.dir(), &direct_c, &direct_s, STUNNEL_PORT, PORT)?;
    let tunnel_http = Stunnel::start(
        node1.dir(),
        &direct_c,
        &direct_s,
        STUNNEL_HTTP_PORT,
        HTTP_PORT,
    )?;
    let mut waypoint = TestWaypoint::start(&node1, &wp, WAYPOINT, json!([l7_route()]))?;
    waypoint.show_log_on_drop(false);
    let pid = |a: &TestAgent| a.pid().context("agent is not running");
    let (pid1, pid2, pid3) = (pid(&agent1)?, pid(&agent2)?, pid(&agent3)?);
    let stunnel_pids: Vec<u32> = [&tunnel.client, &tunnel.server]
        .iter()
        .filter_map(|p| p.pid())
        .collect();
    let weft = |topology: &str| format!("weft L4 {topology} ({transport})");
    let mut scenarios = vec![
        Scenario {
            key: "direct",
            label: "direct, same node".into(),
            client: &direct_c,
            to: direct_s.addr(PORT).into(),
            http_to: direct_s.addr(HTTP_PORT).into(),
            baseline: None,
            cost_pids: vec![],
            http_only: false,
        },
        Scenario {
            key: "weft-l4",
            label: "weft L4 same node (node-local)".into(),
            client: &weft_c,
            to: weft_s.addr(PORT).into(),
            http_to: weft_s.addr(HTTP_PORT).into(),
            baseline: Some("direct"),
            cost_pids: vec![pid1],
            http_only: false,
        },
        Scenario {
            key: SAME_NODE_HBONE,
            label: weft("same node, sameNode: HBONE"),
            client: &hbone_c,
            to: hbone_s.addr(PORT).into(),
            http_to: hbone_s.addr(HTTP_PORT).into(),
            baseline: Some("direct"),
            cost_pids: vec![pid3],
            http_only: false,
        },
        Scenario {
            key: "stunnel",
            label: "stunnel mTLS, same node".into(),
            client: &direct_c,
            to: tunnel.entry(),
            http_to: tunnel_http.entry(),
            baseline: Some("direct"),
            cost_pids: stunnel_pids,
            http_only: false,
        },
        Scenario {
            key: "direct-x",
            label: "direct, cross node".into(),
            client: &direct_c,
            to: xdirect_s.addr(PORT).into(),
            http_to: xdirect_s.addr(HTTP_PORT).into(),
            baseline: None,
            cost_pids: vec![],
            http_only: false,
        },
        Scenario {
            key: "weft-l4-x",
            label: weft("cross node"),
            client: &weft_c,
            to: xweft_s.addr(PORT).into(),
            http_to: xweft_s.addr(HTTP_PORT).into(),
            baseline: Some("direct-x"),
            cost_pids: vec![pid1, pid2],
            http_only: false,
        },
        Scenario {
            key: "weft-l7",
            label: format!("weft L7 via a waypoint, same node ({transport})"),
            client: &weft_c,
            to: l7_vip,
            http_to: l7_vip,
            baseline: Some("weft-l4"),
            cost_pids: vec![pid1, waypoint.pid().context("waypoint is not running")?],
            http_only: true,
        },
    ];
    if !ztunnels.is_empty() {
        // The cost of a path is the client's and the server's ztunnel, as it is both
        // agents for weft across nodes.
        let zt_same = vec![zt_pids[0], zt_pids[1]];
        let zt_cross = vec![zt_pids[0], zt_pids[2]];
        scenarios.extend([
            Scenario {
                key: "ztunnel",
                label: "ztunnel, same node".into(),
                client: &zt_c,
                to: zt_s.addr(PORT).into(),
                http_to: zt_s.addr(HTTP_PORT).into(),
                baseline: Some("direct"),
                cost_pids: zt_same,
                http_only: false,
            },
            Scenario {
                key: "ztunnel-x",
                label: "ztunnel, cross node".into(),
                client: &zt_c,
                to: xzt_s.addr(PORT).into(),
                http_to: xzt_s.addr(HTTP_PORT).into(),
                baseline: Some("direct-x"),
                cost_pids: zt_cross,
                http_only: false,
            },
        ]);
    }
    for s in &scenarios {
        report.scenario(s.key, &s.label, s.baseline);
    }

    // Each path carries traffic before anything is timed: a broken path fails here, fast.
    for s in &scenarios {
        if s.http_only {
            // Not recorded: a warm-up figure is not a sample.
            http_load(s, 100.0, 0.5)
                .with_context(|| format!("{}: no traffic through this path", s.label))?;
            continue;
        }
        harness::client(
            s.client,
            &args(&[
                "rr",
                "--to",
                &s.to.to_string(),
                "--count",
                "10",
                "--warmup",
                "0",
            ]),
            Duration::from_secs(30),
        )
        .with_context(|| format!("{}: no traffic through this path", s.label))?;
    }

    let data_path = options.only != Some(Part::Policies);
    for rep in (0..plan.reps).filter(|_| data_path) {
        println!("== repetition {}/{} ==", rep + 1, plan.reps);
        report.sample_load();
        for s in &scenarios {
            one_rep(plan, &node1, s, report);
        }
        for s in scenarios.iter().filter(|s| !s.http_only) {
            let spin = harness::spinner(&node1)?;
            for &size in plan.rr_sizes {
                rr(plan, s, size, true, report);
            }
            drop(spin);
        }
    }

    if options.profile && data_path {
        profile(plan, &scenarios[1], pid1, out)?;
    }
    if data_path {
        let l7 = scenarios
            .iter()
            .find(|s| s.key == "weft-l7")
            .context("the L7 scenario")?;
        let names = ("bench-l7", "bench-l7-backend");
        traffic_policies::run(
            plan,
            &node1,
            &waypoint,
            &json!([l7_route()]),
            names,
            l7,
            report,
        )?;
    }
    policies::run(plan, &node1, &agent1, &weft_c, &weft_s, report)?;
    agent1.kill();
    agent2.kill();
    agent3.kill();
    drop((waypoint, tunnel, tunnel_http, servers, ztunnels));
    Ok(())
}

/// The service the L7 scenario calls: `bench-l7`, bound to the waypoint, routed by an
/// HTTPRoute to `bench-l7-backend`, whose endpoint is `server` (a pod of its own).
fn add_l7_services(node: &TestNode, server: &TestPod, waypoint: &TestPod) {
    for (name, vip, bound) in [
        ("bench-l7", L7_VIP, Some(WAYPOINT.to_string())),
        ("bench-l7-backend", L7_BACKEND_VIP, None),
    ] {
        node.add_service(Service {
            name: name.into(),
            namespace: "default".into(),
            vips: vec![vip.into()],
            ports: vec![(HTTP_PORT, HTTP_PORT)],
            endpoints: vec![server.ip()],
            waypoint: bound,
        });
    }
    node.set_waypoints(json!([{
        "name": WAYPOINT, "serviceAccount": WAYPOINT, "ips": [waypoint.ip().to_string()],
    }]));
}

fn l7_route() -> Value {
    let rules = json!([{ "backendRefs": [{ "name": "bench-l7-backend", "port": HTTP_PORT }] }]);
    waypoint::route("HTTPRoute", "bench-l7", "bench-l7", HTTP_PORT, rules)
}

const HTTP_PORT: u16 = 7080;
const WAYPOINT: &str = "waypoint";
const L7_VIP: [u8; 4] = [10, 96, 0, 80];
const L7_BACKEND_VIP: [u8; 4] = [10, 96, 0, 81];
const STUNNEL_PORT: u16 = 7443;
const STUNNEL_HTTP_PORT: u16 = 7444;
