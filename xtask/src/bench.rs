//! `cargo xtask bench [--quick] [--profile] [--only paths|policies|scale]`: weft against direct traffic and against a
//! plain mTLS tunnel (stunnel), measured in one run, side by side.
//!
//! Builds the agent and the load tool (`weft-bench`, tests/src/bin) in release, then runs
//! itself again with `WEFT_BIN`/`WEFT_BENCH` pointing at them (the harness finds its
//! binaries through those variables) to build simulated nodes with the end-to-end harness:
//!
//! - node 1: `direct-c`/`direct-s` (not enrolled), `weft-c`/`weft-s` (enrolled); after the
//!   data path, the policy rows on `weft-c` → `weft-s` (new connections with no policy and
//!   with many, the time for a DENY to reach the data path);
//!   A waypoint pod (`weft waypoint`) on node 1 carries the L7 scenario: `weft-c` calls a
//!   service bound to it, routed by an HTTPRoute to `weft-s` (HTTP only);
//! - node 2, joined to node 1: `xdirect-s` (not enrolled), `xweft-s` (enrolled);
//! - node 3: the scale node, `scale_pods` enrolled pods (enrolment time, memory under
//!   load, the control plane).
//!
//! Scenarios are interleaved within each repetition, so slow drift of the machine (other
//! builds) spreads over all of them instead of biasing one. Every figure is a
//! [`report::Series`] of samples, one per repetition; `target/bench/` gets `results.json`,
//! `results.md` and PNG charts. A timing never fails the run; a path that does not carry
//! traffic does (that is a broken harness or agent, not a slow one).

mod chart;
mod report;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use weft_tests::{
    Service, TestAgent, TestNode, TestPod, TestWaypoint,
    bench::{self as harness, BenchServer, Stunnel},
    waypoint,
};

use crate::{cargo, setup};
use report::Report;

#[derive(clap::Args)]
pub struct Options {
    /// A short run (fewer round trips, shorter durations, fewer pods) that CI uses to keep
    /// the harness working; its figures are rough.
    #[arg(long)]
    quick: bool,
    /// Also record a CPU profile of the agent (`perf record -g`) during single-stream
    /// throughput through weft, into target/bench/profile.txt.
    #[arg(long)]
    profile: bool,
    /// Only render results.md and the charts again from target/bench/results.json.
    #[arg(long)]
    render: bool,
    /// Measure one part only: `paths` (the data path, then policies on it), `policies`
    /// (the policy rows alone), `scale` (enrolment, memory, the control plane) or `hostile`
    /// (a pod hoarding idle connections beside a neighbour).
    #[arg(long, value_enum)]
    only: Option<Part>,
    /// Internal: measure with the binaries the outer run built (set by `cargo xtask bench`).
    #[arg(long, hide = true)]
    measure: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Part {
    Paths,
    Policies,
    Scale,
    Hostile,
}

pub fn run(options: &Options) -> Result<()> {
    if options.measure {
        return measure(options);
    }
    if options.render {
        let out = cargo::target_dir()?.join("bench");
        let report = Report::read(&out)?;
        report.write(&out)?;
        chart::draw_all(&report, &out)?;
        println!("{}", report.markdown());
        return Ok(());
    }
    setup::ensure()?;
    println!("== building the agent and the load tool (release) ==");
    let release = cargo::target_dir()?.join("release");
    // `WEFT_BIN` measures a given agent binary instead (another build, another commit).
    let agent = match std::env::var_os("WEFT_BIN") {
        Some(bin) => {
            println!(
                "bench: agent {} (from WEFT_BIN)",
                PathBuf::from(&bin).display()
            );
            PathBuf::from(bin)
        }
        None => {
            cargo::run(cargo::cargo().args(["build", "--release", "-p", "weft"]))?;
            release.join("weft")
        }
    };
    cargo::run(cargo::cargo().args(["build", "--release", "-p", "weft-tests", "--bins"]))?;
    if let Some(missing) = weft_tests::missing_requirement() {
        bail!("the benchmarks cannot run here: {missing}");
    }
    let out = cargo::target_dir()?.join("bench");
    let exe = std::env::current_exe().context("find the xtask executable")?;
    let mut cmd = Command::new(exe);
    cmd.arg("bench").arg("--measure");
    if options.quick {
        cmd.arg("--quick");
    }
    if options.profile {
        cmd.arg("--profile");
    }
    if let Some(part) = options.only {
        cmd.arg("--only").arg(match part {
            Part::Paths => "paths",
            Part::Policies => "policies",
            Part::Scale => "scale",
            Part::Hostile => "hostile",
        });
    }
    cmd.env("WEFT_BIN", &agent)
        .env("WEFT_TESTAPP", release.join("weft-testapp"))
        .env("WEFT_BENCH", release.join("weft-bench"))
        .env("WEFT_BENCH_OUT", &out)
        .current_dir(cargo::root());
    cargo::run(&mut cmd)
}

/// How much of everything: the full run, or `--quick`.
struct Plan {
    reps: usize,
    tput_secs: f64,
    streams: &'static [usize],
    rr_count: usize,
    rr_warmup: usize,
    rr_sizes: &'static [usize],
    crr_secs: f64,
    scale_pods: usize,
    hold_conns: usize,
    hostile_conns: usize,
    cp_workloads: usize,
    cp_services: usize,
    cp_policies: usize,
    http_rate: f64,
    http_secs: f64,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Plan {
                reps: 3,
                tput_secs: 1.0,
                streams: &[1, 8, 64],
                rr_count: 3_000,
                rr_warmup: 300,
                rr_sizes: &[1, 1024],
                crr_secs: 1.0,
                scale_pods: 10,
                hold_conns: 100,
                hostile_conns: 1_000,
                cp_workloads: 1_000,
                cp_services: 200,
                cp_policies: 100,
                http_rate: 500.0,
                http_secs: 1.0,
            }
        } else {
            Plan {
                reps: 3,
                tput_secs: 10.0,
                streams: &[1, 8, 64],
                rr_count: 50_000,
                rr_warmup: 2_000,
                rr_sizes: &[1, 1024],
                crr_secs: 5.0,
                scale_pods: 100,
                hold_conns: 1_000,
                hostile_conns: 10_000,
                cp_workloads: 10_000,
                cp_services: 2_000,
                cp_policies: 1_000,
                http_rate: 2_000.0,
                http_secs: 5.0,
            }
        }
    }
}

/// One way for the client's bytes to reach the server.
struct Scenario<'a> {
    /// Stable key in results.json.
    key: &'static str,
    /// Shown in tables and charts.
    label: String,
    client: &'a TestPod,
    to: SocketAddr,
    /// Where the HTTP server listens, for the open-loop workload.
    http_to: SocketAddr,
    /// The scenario this one is compared with (`direct` for the same topology).
    baseline: Option<&'static str>,
    /// Processes whose CPU time is the cost of this path (agents, stunnels).
    cost_pids: Vec<u32>,
    /// Through a waypoint: HTTP only (it parses requests), so the raw TCP workloads of
    /// `to` do not apply.
    http_only: bool,
}

fn measure(options: &Options) -> Result<()> {
    let plan = Plan::new(options.quick);
    let out = std::env::var_os("WEFT_BENCH_OUT")
        .map(PathBuf::from)
        .context("WEFT_BENCH_OUT is not set (run `cargo xtask bench`)")?;
    std::fs::create_dir_all(&out).with_context(|| format!("mkdir {}", out.display()))?;
    let started = Instant::now();
    let mut report = Report::new(options.quick, conditions());

    // Nodes are dropped (and everything in them killed and removed) when this scope ends,
    // whatever happens inside it.
    let part = |p: Part| options.only.is_none_or(|only| only == p);
    let result = (|| -> Result<()> {
        if part(Part::Paths) || part(Part::Policies) {
            paths(&plan, options, &out, &mut report)?;
        }
        if part(Part::Scale) {
            scale(&plan, &mut report)?;
        }
        if part(Part::Hostile) {
            hostile(&plan, &mut report)?;
        }
        Ok(())
    })()
    .context("benchmark harness failed");
    report.not_available();
    report.elapsed = started.elapsed();
    report.write(&out)?;
    if let Err(e) = chart::draw_all(&report, &out) {
        println!("bench: charts not drawn: {e:#}");
    }
    result?;
    println!("{}", report.markdown());
    println!(
        "bench: results in {} ({:.0} s)",
        out.display(),
        report.elapsed.as_secs_f64()
    );
    if !report.failures.is_empty() {
        for f in &report.failures {
            println!("bench: FAILED: {f}");
        }
        bail!(
            "{} measurement(s) failed: a path did not carry traffic",
            report.failures.len()
        );
    }
    Ok(())
}

/// Throughput, latency and connection rate over every path.
fn paths(plan: &Plan, options: &Options, out: &Path, report: &mut Report) -> Result<()> {
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
    let xdirect_s = node2.pod("xdirect-s").enrolled(false).create()?;
    let xweft_s = node2.pod("xweft-s").service_account("server").create()?;
    let wp = node1
        .pod("waypoint")
        .service_account(WAYPOINT)
        .enrolled(false)
        .create()?;
    let l7_vip = SocketAddr::from((L7_VIP, HTTP_PORT));
    add_l7_services(&node1, &weft_s, &wp);
    let mtls = plain_if_no_ca(&[&node1, &node2]);
    node1.connect(&node2)?;
    let mut agent1 = node1.start_agent()?;
    let mut agent2 = node2.start_agent()?;
    agent1.show_log_on_drop(false);
    agent2.show_log_on_drop(false);
    let transport = transport(&agent1, mtls);
    report.transport = transport.clone();
    println!("agents ready; the proxy hop is {transport}");

    let mut servers: Vec<BenchServer> = Vec::new();
    for pod in [&direct_s, &weft_s, &xdirect_s, &xweft_s] {
        servers.push(harness::serve(pod, PORT)?);
        servers.push(harness::http_serve(pod, HTTP_PORT)?);
    }
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
    let (pid1, pid2) = (pid(&agent1)?, pid(&agent2)?);
    let stunnel_pids: Vec<u32> = [&tunnel.client, &tunnel.server]
        .iter()
        .filter_map(|p| p.pid())
        .collect();
    let weft = |topology: &str| format!("weft L4 {topology} ({transport})");
    let scenarios = [
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
            label: weft("same node"),
            client: &weft_c,
            to: weft_s.addr(PORT).into(),
            http_to: weft_s.addr(HTTP_PORT).into(),
            baseline: Some("direct"),
            cost_pids: vec![pid1],
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
    policies(plan, &node1, &agent1, &weft_c, &weft_s, report)?;
    agent1.kill();
    agent2.kill();
    drop((waypoint, tunnel, tunnel_http, servers));
    Ok(())
}

/// The service the L7 scenario calls: `bench-l7`, bound to the waypoint, routed by an
/// HTTPRoute to `bench-l7-backend`, whose endpoint is the weft server pod.
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

/// One repetition of every workload over one path (the spinner-less part).
fn one_rep(plan: &Plan, _node: &TestNode, s: &Scenario<'_>, report: &mut Report) {
    if s.http_only {
        http_rep(plan, s, report);
        return;
    }
    for &streams in plan.streams {
        let cpu_before = cpu(&s.cost_pids);
        let result = harness::client(
            s.client,
            &args(&[
                "tput",
                "--to",
                &s.to.to_string(),
                "--streams",
                &streams.to_string(),
                "--secs",
                &plan.tput_secs.to_string(),
            ]),
            Duration::from_secs_f64(plan.tput_secs) + CLIENT_SLACK,
        );
        let cpu_used = cpu(&s.cost_pids) - cpu_before;
        match result {
            Ok(v) => {
                let gbit = v["gbit_per_s"].as_f64().unwrap_or(0.0);
                println!(
                    "  {:<40} tput {streams:>2} streams: {gbit:.2} Gbit/s",
                    s.label
                );
                report.add(
                    s.key,
                    &format!("throughput, {streams} stream{}", plural(streams)),
                    "Gbit/s",
                    gbit,
                );
                let gb = v["bytes"].as_f64().unwrap_or(0.0) / 1e9;
                if !s.cost_pids.is_empty() && streams == 1 && gb > 0.0 {
                    report.add(
                        s.key,
                        "path CPU per GB (1 stream)",
                        "CPU s/GB",
                        cpu_used / gb,
                    );
                }
            }
            Err(e) => report.fail(s.key, &format!("throughput {streams}"), &e),
        }
    }
    for &size in plan.rr_sizes {
        rr(plan, s, size, false, report);
    }
    let cpu_before = cpu(&s.cost_pids);
    let result = harness::client(
        s.client,
        &args(&[
            "crr",
            "--to",
            &s.to.to_string(),
            "--secs",
            &plan.crr_secs.to_string(),
        ]),
        Duration::from_secs_f64(plan.crr_secs) + CLIENT_SLACK,
    );
    let cpu_used = cpu(&s.cost_pids) - cpu_before;
    match result {
        Ok(v) => {
            let rate = v["rate_per_s"].as_f64().unwrap_or(0.0);
            let count = v["count"].as_f64().unwrap_or(0.0);
            println!("  {:<40} new connections: {rate:.0}/s", s.label);
            report.add(s.key, "new connections", "conn/s", rate);
            report.add(s.key, "new connection p50", "µs", f(&v, "p50_us"));
            report.add(s.key, "new connection p99", "µs", f(&v, "p99_us"));
            if !s.cost_pids.is_empty() && count > 0.0 {
                report.add(
                    s.key,
                    "path CPU per 10k connections",
                    "CPU s",
                    cpu_used / count * 10_000.0,
                );
            }
        }
        Err(e) => report.fail(s.key, "new connections", &e),
    }
    http_rep(plan, s, report);
}

/// The open-loop HTTP/1.1 workload: latency at a fixed request rate.
fn http_rep(plan: &Plan, s: &Scenario<'_>, report: &mut Report) {
    let rate = plan.http_rate;
    match http_load(s, rate, plan.http_secs) {
        Ok(v) => {
            report.add(
                s.key,
                &format!("HTTP/1.1 at {rate} req/s: p50"),
                "µs",
                f(&v, "p50_us"),
            );
            report.add(
                s.key,
                &format!("HTTP/1.1 at {rate} req/s: p99"),
                "µs",
                f(&v, "p99_us"),
            );
        }
        Err(e) => report.fail(s.key, "http", &e),
    }
}

/// `rate` HTTP/1.1 requests a second for `secs` to the scenario's HTTP server.
fn http_load(s: &Scenario<'_>, rate: f64, secs: f64) -> Result<Value> {
    harness::client(
        s.client,
        &args(&[
            "http-load",
            "--to",
            &s.http_to.to_string(),
            "--rate",
            &rate.to_string(),
            "--secs",
            &secs.to_string(),
        ]),
        Duration::from_secs_f64(secs) + CLIENT_SLACK,
    )
}

fn rr(plan: &Plan, s: &Scenario<'_>, size: usize, spin: bool, report: &mut Report) {
    let result = harness::client(
        s.client,
        &args(&[
            "rr",
            "--to",
            &s.to.to_string(),
            "--size",
            &size.to_string(),
            "--count",
            &plan.rr_count.to_string(),
            "--warmup",
            &plan.rr_warmup.to_string(),
        ]),
        RR_TIMEOUT,
    );
    let what = format!(
        "{} round trip{}",
        if size == 1 { "1 B" } else { "1 KiB" },
        if spin { ", CPUs kept awake" } else { "" }
    );
    match result {
        Ok(v) => {
            println!(
                "  {:<40} {what}: p50 {:.1} µs, p99 {:.1} µs",
                s.label,
                f(&v, "p50_us"),
                f(&v, "p99_us")
            );
            for (q, key) in [
                ("p50", "p50_us"),
                ("p90", "p90_us"),
                ("p99", "p99_us"),
                ("p99.9", "p999_us"),
            ] {
                report.add(s.key, &format!("{what} {q}"), "µs", f(&v, key));
            }
        }
        Err(e) => report.fail(s.key, &what, &e),
    }
}

/// Enrolment time, agent memory with many pods and connections, and the control plane.
fn scale(plan: &Plan, report: &mut Report) -> Result<()> {
    println!("== scale node: {} pods ==", plan.scale_pods);
    let key = "weft-l4";
    let node = TestNode::new("bench", 3)?;
    plain_if_no_ca(&[&node]);
    let mut pods = Vec::new();
    for i in 0..plan.scale_pods.max(2) {
        pods.push(
            node.pod(&format!("p{i}"))
                .service_account(&format!("sa{}", i % 10))
                .enrolled(false)
                .create()?,
        );
    }
    let mut agent = node.start_agent()?;
    agent.show_log_on_drop(false);
    let server = harness::serve(&pods[1], PORT)?;
    let n = pods.len();
    let conns = plan.hold_conns;
    let mut big = node.config();
    add_big_state(plan, &mut big)?;
    policy_list(&mut big)?.extend(background_policies(plan.cp_policies));
    let state = format!(
        "{} workloads + {} services + {} policies",
        plan.cp_workloads, plan.cp_services, plan.cp_policies
    );
    for rep in 0..plan.reps {
        report.sample_load();
        // Enrol every pod at once: time from the config write to `/status` listing them.
        for p in &pods {
            p.set_enrolled(true);
        }
        let log_offset = agent.log().len();
        let begin = Instant::now();
        agent.reload(&node)?;
        wait_enrolled(&agent, n)?;
        let took = begin.elapsed();
        println!("  enrolled {n} pods in {took:?}");
        report.add(
            key,
            &format!("enroll {n} pods: config write → /status lists them"),
            "ms",
            ms(took),
        );
        // The figure above includes the agent's file poll (every 500 ms); its own log says
        // how long the work took once it saw the change.
        let log = agent.log();
        if let Some(work) = log_span(
            log.get(log_offset..).unwrap_or_default(),
            "config reloaded",
            "pod enrolled",
        ) {
            report.add(
                key,
                &format!("enroll {n} pods: agent log, reload → last pod enrolled"),
                "ms",
                work * 1e3,
            );
        }

        let pid = agent.pid().context("agent is not running")?;
        report.add(
            key,
            &format!("agent RSS (VmRSS) with {n} pods, no connections"),
            "MB",
            mb(harness::status_bytes(pid, "VmRSS")?),
        );
        let hold = harness::hold(&pods[0], pods[1].addr(PORT).into(), conns, HOLD_TIMEOUT)?;
        thread::sleep(Duration::from_secs(1));
        let hwm = harness::status_bytes(pid, "VmHWM")?;
        let rss = harness::status_bytes(pid, "VmRSS")?;
        println!(
            "  agent with {n} pods and {conns} connections: peak RSS {:.1} MB, RSS {:.1} MB ({})",
            mb(hwm),
            mb(rss),
            smaps(pid)
        );
        report.add(
            key,
            &format!("agent peak RSS (VmHWM), {n} pods + {conns} connections"),
            "MB",
            mb(hwm),
        );
        report.add(
            key,
            &format!("agent RSS (VmRSS) with {n} pods + {conns} connections open"),
            "MB",
            mb(rss),
        );
        drop(hold);
        // What the allocator gives back once the connections are gone.
        thread::sleep(Duration::from_secs(1));
        let after = harness::status_bytes(pid, "VmRSS")?;
        println!(
            "  agent after the {conns} connections closed: RSS {:.1} MB ({})",
            mb(after),
            smaps(pid)
        );
        report.add(
            key,
            &format!("agent RSS (VmRSS) after the {conns} connections closed"),
            "MB",
            mb(after),
        );

        // The control plane, on a fresh agent process (unenrolled pods), so that its RSS is
        // the state's and not what the connections above left in the allocator.
        for p in &pods {
            p.set_enrolled(false);
        }
        agent.reload(&node)?;
        wait_enrolled(&agent, 0)?;
        agent.restart()?;
        let pid = agent.pid().context("agent is not running")?;
        let rss_before = harness::status_bytes(pid, "VmRSS")?;
        let (took, cpu_used, rss) = apply_big_state(&big, &agent, pid)?;
        let hwm = harness::status_bytes(pid, "VmHWM")?;
        println!(
            "  applied {state} in {took:?} ({cpu_used:.2} CPU s), RSS {:.1} → {:.1} MB, \
             peak {:.1} MB ({})",
            mb(rss_before),
            mb(rss),
            mb(hwm),
            smaps(pid)
        );
        report.add(key, &format!("apply {state}: time"), "ms", ms(took));
        report.add(key, &format!("apply {state}: agent CPU"), "CPU s", cpu_used);
        report.add(
            key,
            &format!("apply {state}: agent RSS after"),
            "MB",
            mb(rss),
        );
        report.add(
            key,
            &format!("apply {state}: agent RSS growth"),
            "MB",
            mb(rss.saturating_sub(rss_before)),
        );
        report.add(
            key,
            &format!("apply {state}: agent peak RSS (VmHWM)"),
            "MB",
            mb(hwm),
        );

        // Back to small, and a fresh agent process: its peak RSS starts over.
        apply(&agent, &node.config())?;
        if rep + 1 < plan.reps {
            agent.restart()?;
        }
    }
    drop(server);
    agent.kill();
    Ok(())
}

/// A hostile pod hoards idle connections through its node's proxy (to a victim pod) while
/// a neighbour pod of the same node measures round trips to another pod: the agent's file
/// descriptors and RSS, how many of the hoarder's connections the proxy let it keep, and
/// the neighbour's latency before and during. (The victim's own inbound budget is the
/// hoarder's to exhaust, as any client can flood a server: docs/security.md.)
fn hostile(plan: &Plan, report: &mut Report) -> Result<()> {
    let n = plan.hostile_conns;
    println!("== a hostile pod holding {n} idle connections ==");
    let key = "weft-l4";
    let node = TestNode::new("bench", 4)?;
    plain_if_no_ca(&[&node]);
    let hoarder = node.pod("hoarder").service_account("hoarder").create()?;
    let neighbour = node.pod("neighbour").service_account("client").create()?;
    let victim = node.pod("victim").service_account("server").create()?;
    let server = node.pod("server").service_account("server").create()?;
    let mut agent = node.start_agent()?;
    agent.show_log_on_drop(false);
    let _victim = harness::serve(&victim, PORT)?;
    let _server = harness::serve(&server, PORT)?;
    let pid = agent.pid().context("agent is not running")?;
    let to: SocketAddr = server.addr(PORT).into();
    let hoarded: SocketAddr = victim.addr(PORT).into();
    let neighbour_rr = |when: &str, report: &mut Report| {
        let result = harness::client(
            &neighbour,
            &args(&[
                "rr",
                "--to",
                &to.to_string(),
                "--count",
                &plan.rr_count.to_string(),
                "--warmup",
                &plan.rr_warmup.to_string(),
            ]),
            RR_TIMEOUT,
        );
        match result {
            Ok(v) => {
                println!(
                    "  neighbour 1 B round trip {when}: p50 {:.1} µs, p99 {:.1} µs",
                    f(&v, "p50_us"),
                    f(&v, "p99_us")
                );
                for (q, k) in [("p50", "p50_us"), ("p99", "p99_us")] {
                    report.add(
                        key,
                        &format!("neighbour 1 B round trip {q}, {when}"),
                        "µs",
                        f(&v, k),
                    );
                }
            }
            Err(e) => report.fail(key, &format!("neighbour round trip {when}"), &e),
        }
    };
    let during = format!("while a pod holds {n} idle connections");
    // A warm-up, not recorded: the neighbour's pooled HBONE connection then stays open
    // and counts in the baseline.
    harness::client(
        &neighbour,
        &args(&[
            "rr",
            "--to",
            &to.to_string(),
            "--count",
            "100",
            "--warmup",
            "0",
        ]),
        RR_TIMEOUT,
    )?;
    let fds_before = harness::fd_count(pid)?;
    for _ in 0..plan.reps {
        report.sample_load();
        neighbour_rr("alone", report);
        let (hoard, result) = harness::idle(&hoarder, hoarded, n, HOLD_TIMEOUT)?;
        let fds = harness::fd_count(pid)?;
        let rss = harness::status_bytes(pid, "VmRSS")?;
        println!(
            "  hoarder: {} opened, {} refused, {} still open; agent fds {fds_before} → {fds}, \
             RSS {:.1} MB",
            result["opened"],
            result["refused"],
            result["open"],
            mb(rss)
        );
        report.add(key, &format!("agent fds {during}"), "fds", fds as f64);
        report.add(key, &format!("agent RSS (VmRSS) {during}"), "MB", mb(rss));
        report.add(
            key,
            &format!("hoarder's connections still open of {n}"),
            "conns",
            f(&result, "open"),
        );
        neighbour_rr(&during, report);
        drop(hoard);
    }
    // The proxy frees what the hoarder held once it is gone; its pooled HBONE connections
    // close when the pool's idle timeout (60 s) has passed.
    let freed = wait_within(
        POOL_IDLE + Duration::from_secs(30),
        || Ok(harness::fd_count(pid)? <= fds_before + FD_SLACK),
        "as few file descriptors as before the hoard",
    );
    let fds_after = harness::fd_count(pid)?;
    println!("  after the hoarder left: agent fds {fds_after} (before: {fds_before})");
    report.add(
        key,
        "agent fds after the hoarder left",
        "fds",
        fds_after as f64,
    );
    if let Err(e) = freed {
        report.fail(key, "hoarder's sockets freed", &e);
    }
    agent.kill();
    Ok(())
}

/// Writes `config` (the big state) and returns the time until the agent's config generation
/// moved, and its CPU time for it and its RSS [`SETTLE`] later.
fn apply_big_state(config: &Value, agent: &TestAgent, pid: u32) -> Result<(Duration, f64, u64)> {
    let yaml = weft_tests::agent::config_yaml(config)?;
    let generation = generation(agent)?;
    let cpu_before = harness::cpu_seconds(pid)?;
    let begin = Instant::now();
    agent.write_config_text(&yaml)?;
    wait_for(
        || Ok(self::generation(agent)? > generation),
        "the big state",
    )?;
    let took = begin.elapsed();
    // The new generation shows once the snapshot is published; the policy index and the
    // reconcile follow. CPU and memory are read once they are done.
    thread::sleep(SETTLE);
    let cpu_used = harness::cpu_seconds(pid)? - cpu_before;
    let rss = harness::status_bytes(pid, "VmRSS")?;
    Ok((took, cpu_used, rss))
}

/// Adds `cp_workloads` remote workloads (labelled `app`, `tier`; 50 namespaces, 200
/// service accounts) and `cp_services` services of 5 endpoints each to `config`.
fn add_big_state(plan: &Plan, config: &mut Value) -> Result<()> {
    let workloads = config["workloads"]
        .as_array_mut()
        .context("config has workloads")?;
    for i in 0..plan.cp_workloads {
        workloads.push(json!({
            "name": format!("w{i}"),
            "namespace": format!("ns{}", i % 50),
            "serviceAccount": format!("sa{}", i % 200),
            "ips": [big_ip(i)],
            "node": format!("remote-{}", i % 100),
            "enrolled": true,
            "labels": { "app": format!("app{}", (i / 50) % 20), "tier": TIERS[i % 3] },
        }));
    }
    let services = config["services"]
        .as_array_mut()
        .context("config has services")?;
    for i in 0..plan.cp_services {
        let endpoints: Vec<String> = (0..5)
            .map(|k| big_ip((i * 5 + k) % plan.cp_workloads.max(1)))
            .collect();
        services.push(json!({
            "name": format!("svc{i}"),
            "namespace": format!("ns{}", i % 50),
            "vips": [format!("10.96.{}.{}", i / 250, i % 250 + 1)],
            "ports": [{ "port": 80, "targetPort": 8080 }],
            "endpoints": endpoints,
        }));
    }
    Ok(())
}

fn big_ip(i: usize) -> String {
    format!(
        "10.{}.{}.{}",
        100 + i / 65_000,
        (i / 250) % 256,
        i % 250 + 2
    )
}

fn policy_list(config: &mut Value) -> Result<&mut Vec<Value>> {
    if config["policies"].is_null() {
        config["policies"] = json!([]);
    }
    config["policies"]
        .as_array_mut()
        .context("config has a policies list")
}

/// `n` AccessPolicies as a mesh of many teams would have them: in 50 namespaces, each
/// selecting one `app` of its namespace (one in ten the whole namespace); mostly ALLOW
/// (one in ten DENY); sources by principal, service account, namespace and IP block; port
/// lists and ranges. Policy `i` selects `app{(i / 50) % 20}` in `ns{i % 50}`, the workloads
/// of [`add_big_state`], ten of them each.
fn background_policies(n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            let ns = format!("ns{}", i % 50);
            let mut rules = vec![json!({
                "from": [
                    { "principals": [format!(
                        "spiffe://cluster.local/ns/ns{}/sa/sa{}", (i + 1) % 50, i % 200)] },
                    { "namespaces": [format!("ns{}", (i + 7) % 50), "monitoring"] },
                ],
                "toPorts": [8080, "9000-9100"],
            })];
            if i % 4 == 0 {
                rules.push(json!({
                    "from": [{ "ipBlocks": [{
                        "cidr": format!("10.{}.0.0/16", 100 + i % 50),
                        "except": [format!("10.{}.9.0/24", 100 + i % 50)],
                    }] }],
                    "toPorts": [443],
                }));
            }
            if i % 5 == 1 {
                rules.push(json!({
                    "from": [{ "serviceAccounts": [format!("ns{}/sa{}", (i + 3) % 50, i % 200)] }],
                }));
            }
            let mut policy = json!({
                "name": format!("policy-{i}"),
                "namespace": ns,
                "action": if i % 10 == 3 { "DENY" } else { "ALLOW" },
                "rules": rules,
            });
            if i % 10 != 9 {
                policy["selector"] =
                    json!({ "matchLabels": { "app": format!("app{}", (i / 50) % 20) } });
            }
            policy
        })
        .collect()
}

/// `SERVER_POLICIES` ALLOW policies selecting the server pod (label `app`), each admitting
/// other sources first and the client last, so every one is evaluated to its end.
fn server_policies(port: u16) -> Vec<Value> {
    (0..SERVER_POLICIES)
        .map(|i| {
            json!({
                "name": format!("server-allow-{i}"),
                "namespace": "default",
                "selector": { "matchLabels": { "app": SERVER_APP } },
                "action": "ALLOW",
                "rules": [
                    { "from": [{ "namespaces": [format!("ns{i}")] }], "toPorts": [9090] },
                    {
                        "from": [
                            { "principals": [format!("spiffe://cluster.local/ns/ns{i}/sa/sa{i}")] },
                            { "serviceAccounts": [format!("ns{}/sa{i}", i + 1)] },
                            { "principals": [CLIENT_ID] },
                        ],
                        "toPorts": [port, "9000-9100"],
                    },
                ],
            })
        })
        .collect()
}

/// Policies on the data path, on node 1: the new-connection rate through weft with no
/// policy and with `cp_policies` of them in the state (a few select the server and allow
/// the client), over the same workloads and services; then the time from a config write
/// that denies the client until its first connection is refused.
fn policies(
    plan: &Plan,
    node: &TestNode,
    agent: &TestAgent,
    client: &TestPod,
    server: &TestPod,
    report: &mut Report,
) -> Result<()> {
    println!("== policies on the data path ==");
    let key = "weft-l4";
    let to: SocketAddr = server.addr(PORT).into();
    let p = plan.cp_policies;
    let mut none = node.config();
    add_big_state(plan, &mut none)?;
    let mut many = none.clone();
    let list = policy_list(&mut many)?;
    list.extend(background_policies(p.saturating_sub(SERVER_POLICIES)));
    list.extend(server_policies(PORT));
    let mut deny = many.clone();
    policy_list(&mut deny)?.push(json!({
        "name": "deny-bench-client",
        "namespace": "default",
        "selector": { "matchLabels": { "app": SERVER_APP } },
        "action": "DENY",
        "rules": [{ "from": [{ "principals": [CLIENT_ID] }] }],
    }));
    let with = format!("{p} policies, {SERVER_POLICIES} select the server");
    for rep in 0..plan.reps {
        println!("== policies: repetition {}/{} ==", rep + 1, plan.reps);
        report.sample_load();
        // Alternate which goes first, so a drift of the machine favours neither.
        let mut order = [(&none, "no policies"), (&many, with.as_str())];
        if rep % 2 == 1 {
            order.reverse();
        }
        let rate = |state: &Value, what: &str, report: &mut Report| -> Result<f64> {
            apply(agent, state)?;
            let v = harness::client(
                client,
                &args(&[
                    "crr",
                    "--to",
                    &to.to_string(),
                    "--secs",
                    &plan.crr_secs.to_string(),
                ]),
                Duration::from_secs_f64(plan.crr_secs) + CLIENT_SLACK,
            )?;
            if f(&v, "errors") > 0.0 {
                bail!("{} connections failed with {what}", v["errors"]);
            }
            let rate = f(&v, "rate_per_s");
            println!("  new connections with {what}: {rate:.0}/s");
            report.add(key, &format!("new connections, {what}"), "conn/s", rate);
            Ok(rate)
        };
        let mut rates = (0.0, 0.0);
        for (state, what) in order {
            match rate(state, what, report) {
                Ok(r) if std::ptr::eq(state, &none) => rates.0 = r,
                Ok(r) => rates.1 = r,
                Err(e) => report.fail(key, &format!("new connections, {what}"), &e),
            }
        }
        if rates.0 > 0.0 && rates.1 > 0.0 {
            report.add(
                key,
                &format!("new connections, {p} policies ÷ no policies"),
                "×",
                rates.1 / rates.0,
            );
        }

        // One policy change: the client connects in a loop (allowed by `many`), a config
        // that also denies it is written, and the loop stops at the first refusal.
        apply(agent, &many)?;
        let log_offset = agent.log().len();
        let looping = harness::until_denied(client, to, 60.0)?;
        let yaml = weft_tests::agent::config_yaml(&deny)?;
        let written = unix_now();
        agent.write_config_text(&yaml)?;
        match harness::result_of(looping, Duration::from_secs(90)) {
            Ok(v) => {
                let denied = f(&v, "denied_unix_s");
                let log = agent.log();
                let reloaded = log
                    .get(log_offset..)
                    .unwrap_or_default()
                    .lines()
                    .find(|l| l.contains("config reloaded"))
                    .and_then(log_unix);
                println!(
                    "  policy change: denied {:.1} ms after the write ({}), agent reload at {}",
                    (denied - written) * 1e3,
                    v["error"],
                    reloaded.map_or("?".into(), |r| format!("+{:.1} ms", (r - written) * 1e3))
                );
                if denied < written {
                    report.fail(
                        key,
                        "one policy change",
                        &anyhow::anyhow!("the client was refused before the policy change: {v}"),
                    );
                } else {
                    let change = "one policy change to the data path";
                    report.add(
                        key,
                        &format!("{change}: config write → first denied connection"),
                        "ms",
                        (denied - written) * 1e3,
                    );
                    if let Some(r) = reloaded.filter(|r| *r >= written - 0.01) {
                        report.add(
                            key,
                            &format!("{change}: config write → agent log \"config reloaded\""),
                            "ms",
                            (r - written) * 1e3,
                        );
                        report.add(
                            key,
                            &format!("{change}: agent log, reload → first denied connection"),
                            "ms",
                            (denied - r) * 1e3,
                        );
                    }
                }
            }
            Err(e) => report.fail(key, "one policy change", &e),
        }
        apply(agent, &deny)?;
    }
    // Back to the node's own state.
    apply(agent, &node.config())
}

/// Writes `config` and waits until the agent's config generation moved (unless it holds
/// that state already).
fn apply(agent: &TestAgent, config: &Value) -> Result<()> {
    let yaml = weft_tests::agent::config_yaml(config)?;
    if std::fs::read_to_string(agent.config_path()).is_ok_and(|text| text == yaml) {
        return Ok(());
    }
    let before = generation(agent)?;
    agent.write_config_text(&yaml)?;
    wait_for(|| Ok(generation(agent)? > before), "the new config")
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The Unix time of a log line's RFC 3339 UTC timestamp (`2026-11-22T01:20:06.401511Z …`).
fn log_unix(line: &str) -> Option<f64> {
    let stamp = line.split_whitespace().next()?.trim_end_matches('Z');
    let (date, time) = stamp.split_once('T')?;
    let mut d = date.split('-').map(str::parse::<i64>);
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let h: f64 = t.next()?.parse().ok()?;
    let min: f64 = t.next()?.parse().ok()?;
    let s: f64 = t.next()?.parse().ok()?;
    // Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days as f64 * 86_400.0 + h * 3600.0 + min * 60.0 + s)
}

/// `Rss` and `Anonymous` of smaps_rollup, for the console.
fn smaps(pid: u32) -> String {
    let get = |field| harness::smaps_bytes(pid, field).map_or(0.0, mb);
    format!(
        "smaps Rss {:.1} MB, Anonymous {:.1} MB",
        get("Rss"),
        get("Anonymous")
    )
}

/// Seconds between the first log line containing `first` and the last containing `last`
/// (tracing's RFC 3339 timestamps, UTC, at the start of each line).
fn log_span(log: &str, first: &str, last: &str) -> Option<f64> {
    let stamp = |line: &str| -> Option<f64> {
        // `2026-11-22T01:20:06.401511Z …`: seconds of the day are enough for a short span.
        let time = line.split_whitespace().next()?.split_once('T')?.1;
        let time = time.trim_end_matches('Z');
        let mut parts = time.split(':');
        let h: f64 = parts.next()?.parse().ok()?;
        let m: f64 = parts.next()?.parse().ok()?;
        let s: f64 = parts.next()?.parse().ok()?;
        Some(h * 3600.0 + m * 60.0 + s)
    };
    let start = log.lines().find(|l| l.contains(first)).and_then(stamp)?;
    let end = log
        .lines()
        .rev()
        .find(|l| l.contains(last))
        .and_then(stamp)?;
    (end >= start).then_some(end - start)
}

fn generation(agent: &TestAgent) -> Result<u64> {
    let status = agent.status()?;
    if let Some(rejection) = status["config"]["last_rejection"].as_str() {
        bail!("the agent rejected the benchmark's config: {rejection}");
    }
    status["config"]["generation"]
        .as_u64()
        .context("no config.generation in /status")
}

fn wait_enrolled(agent: &TestAgent, n: usize) -> Result<()> {
    wait_for(
        || {
            let status = agent.status()?;
            let enrolled = status["pods"]["enrolled"].as_array().map_or(0, Vec::len);
            Ok(enrolled == n)
        },
        &format!("{n} enrolled pods"),
    )
}

/// Polls `done` every few milliseconds for up to a minute.
fn wait_for(done: impl FnMut() -> Result<bool>, what: &str) -> Result<()> {
    wait_within(Duration::from_secs(60), done, what)
}

fn wait_within(limit: Duration, mut done: impl FnMut() -> Result<bool>, what: &str) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        if done()? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the agent did not reach {what} within {limit:?}");
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// `perf record -g` on the agent during single-stream throughput through it.
fn profile(plan: &Plan, s: &Scenario<'_>, pid: u32, out: &Path) -> Result<()> {
    println!("== profile: perf record -g on the agent (pid {pid}) ==");
    let data = out.join("perf.data");
    let secs = plan.tput_secs.max(5.0);
    let mut perf = Command::new("perf")
        .args(["record", "-g", "-F", "999", "-o"])
        .arg(&data)
        .args(["-p", &pid.to_string(), "--", "sleep"])
        .arg((secs + 1.0).to_string())
        .spawn()
        .context("start perf (apt-get install linux-perf)")?;
    let result = harness::client(
        s.client,
        &args(&[
            "tput",
            "--to",
            &s.to.to_string(),
            "--secs",
            &secs.to_string(),
        ]),
        Duration::from_secs_f64(secs) + CLIENT_SLACK,
    );
    let status = perf.wait()?;
    result?;
    if !status.success() {
        bail!("perf record failed ({status})");
    }
    let report = Command::new("perf")
        .args([
            "report",
            "--stdio",
            "--no-children",
            "--percent-limit",
            "0.5",
            "-i",
        ])
        .arg(&data)
        .output()
        .context("perf report")?;
    let flat = Command::new("perf")
        .args([
            "report",
            "--stdio",
            "--no-children",
            "-g",
            "none",
            "--percent-limit",
            "0.3",
            "-i",
        ])
        .arg(&data)
        .output()
        .context("perf report")?;
    std::fs::write(out.join("profile.txt"), &report.stdout)?;
    std::fs::write(out.join("profile-flat.txt"), &flat.stdout)?;
    println!("profile: {}", out.join("profile-flat.txt").display());
    Ok(())
}

/// The harness turns mutual TLS on by default, with a CA made by `weft ca init`; an agent
/// built before HBONE has no `ca` command, and is measured with its plaintext hop.
fn plain_if_no_ca(nodes: &[&TestNode]) -> bool {
    let has_ca = Command::new(weft_tests::app::weft_bin())
        .args(["ca", "--help"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_ca {
        println!("bench: this agent has no `weft ca`: measuring its plaintext proxy hop");
        for node in nodes {
            node.without_mtls();
        }
    }
    has_ca
}

/// What the agent says its proxy hop is: mutual TLS once HBONE is on (its effective config
/// names a CA and it reports certificates), plaintext before.
fn transport(agent: &TestAgent, mtls_configured: bool) -> String {
    let dump = agent.get_json("/config_dump").unwrap_or_default();
    let status = agent.status().unwrap_or_default();
    let text = format!("{dump}{status}").to_ascii_lowercase();
    let reported = text.contains("\"ca\"") || text.contains("certificate");
    match (mtls_configured, reported) {
        (true, true) => "HBONE/mTLS".into(),
        (true, false) => "mTLS configured, not reported by the agent".into(),
        (false, _) => "plaintext".into(),
    }
}

/// Load and CPU of the machine, for the report.
fn conditions() -> Value {
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let cpus = thread::available_parallelism().map_or(0, usize::from);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")?
                .split_once(':')
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_default();
    // Other compilers at work make every figure noisier: say so.
    let busy = Command::new("pgrep")
        .args(["-c", "-x", "rustc|cc1|cc1plus|ld|clang"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .parse::<u32>()
                .unwrap_or(0)
        })
        .unwrap_or(0);
    json!({
        "cpus": cpus,
        "cpu_model": model,
        "kernel": kernel.trim(),
        "loadavg_at_start": loadavg.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
        "compilers_running_at_start": busy,
    })
}

fn cpu(pids: &[u32]) -> f64 {
    pids.iter()
        .filter_map(|p| harness::cpu_seconds(*p).ok())
        .sum()
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(ToString::to_string).collect()
}

fn f(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or(0.0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

const PORT: u16 = 7000;
/// The `app` label of the weft server pod, which the policies of the policy rows select.
const SERVER_APP: &str = "bench-server";
const SERVER_POLICIES: usize = 10;
const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
const TIERS: [&str; 3] = ["web", "api", "db"];
const HTTP_PORT: u16 = 7080;
const WAYPOINT: &str = "waypoint";
const L7_VIP: [u8; 4] = [10, 96, 0, 80];
const L7_BACKEND_VIP: [u8; 4] = [10, 96, 0, 81];
const STUNNEL_PORT: u16 = 7443;
const STUNNEL_HTTP_PORT: u16 = 7444;
/// A client gets its run time plus this much before the harness kills it.
const CLIENT_SLACK: Duration = Duration::from_secs(60);
const RR_TIMEOUT: Duration = Duration::from_secs(600);
const HOLD_TIMEOUT: Duration = Duration::from_secs(120);
/// File descriptors an agent may hold beyond its baseline once the hoarder is gone (pooled
/// connections still closing, certificates, logs): far below the thousands a leak would
/// leave (a full run came back to 14 above its baseline).
const FD_SLACK: usize = 64;
/// The HBONE pool's idle timeout (`hbone::pool`).
const POOL_IDLE: Duration = Duration::from_secs(60);
/// How long after applying a state the agent's CPU time and memory are read.
const SETTLE: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_timestamps_are_unix_seconds() {
        let line = "2026-11-22T01:20:06.500000Z  INFO weft::source::file: config reloaded";
        assert_eq!(log_unix(line), Some(1_795_310_406.5));
        assert_eq!(log_unix("2024-02-29T23:59:59Z x"), Some(1_709_251_199.0));
        assert_eq!(log_unix("=== weft-tests: config rewritten"), None);
    }

    #[test]
    fn the_background_policies_select_the_big_state() {
        let policies = background_policies(1_000);
        assert_eq!(policies.len(), 1_000);
        let deny = policies.iter().filter(|p| p["action"] == "DENY").count();
        assert_eq!(deny, 100);
        // Policy i selects app{(i / 50) % 20} of ns{i % 50}: every pair once.
        let mut pairs: Vec<(String, String)> = policies
            .iter()
            .filter_map(|p| {
                let app = p["selector"]["matchLabels"]["app"].as_str()?;
                Some((p["namespace"].as_str()?.to_string(), app.to_string()))
            })
            .collect();
        let selecting = pairs.len();
        pairs.sort();
        pairs.dedup();
        assert_eq!((selecting, pairs.len()), (900, 900));
    }
}
