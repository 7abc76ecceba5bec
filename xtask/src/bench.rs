//! `cargo xtask bench [--quick] [--profile] [--only paths|policies|scale|hostile|upgrade]`: weft
//! against direct traffic and against a plain mTLS tunnel (stunnel), measured in one run,
//! side by side.
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
//!   load, the control plane);
//! - node 4: the hostile part, a pod hoarding idle connections beside a neighbour;
//! - nodes 5 and 6, joined: the upgrade part, agents replaced and killed under traffic.
//!
//! Scenarios are interleaved within each repetition, so slow drift of the machine (other
//! builds) spreads over all of them instead of biasing one. Every figure is a
//! [`report::Series`] of samples, one per repetition; `target/bench/` gets `results.json`,
//! `results.md` and PNG charts. A timing never fails the run; a path that does not carry
//! traffic does (that is a broken harness or agent, not a slow one).
//!
//! This file holds the options, the outer run and the dispatch to the parts, one module
//! each: [`paths`] (with [`workloads`], what is measured over one path, and [`profile`]),
//! [`policies`], [`scale`], [`hostile`] and [`upgrade`]. They share [`plan`] (how much of everything),
//! [`agent`] (driving the agent under measurement), [`state`] (the big state), [`probe`]
//! (readings of `/proc`, weft-bench's figures, units), and [`report`] and [`chart`] (the
//! results).

mod agent;
mod chart;
mod hostile;
mod paths;
mod plan;
mod policies;
mod probe;
mod profile;
mod report;
mod scale;
mod state;
mod traffic_policies;
mod upgrade;
mod workloads;

use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{cargo, setup};
use plan::Plan;
use probe::conditions;
use report::Report;

#[derive(clap::Args)]
pub struct Options {
    /// A short run (fewer round trips, shorter durations, fewer pods) that CI uses to keep
    /// the harness working; its figures are rough.
    #[arg(long)]
    quick: bool,
    /// Also record CPU profiles of the agent (`perf record -g`) during single-stream
    /// throughput and during new connections through weft, into target/bench/profile*.txt.
    #[arg(long)]
    profile: bool,
    /// Only render results.md and the charts again from target/bench/results.json.
    #[arg(long)]
    render: bool,
    /// Measure one part only: `paths` (the data path, then policies on it), `policies`
    /// (the policy rows alone), `scale` (enrolment, memory, the control plane), `hostile`
    /// (a pod hoarding idle connections beside a neighbour) or `upgrade` (agents replaced
    /// and killed under traffic).
    #[arg(long, value_enum)]
    only: Option<Part>,
    /// A ztunnel binary (Istio's node proxy, built with its `testing` feature) for the
    /// ztunnel paths, which every ratio against ztunnel comes from. Default: `WEFT_ZTUNNEL`,
    /// else `shared/tools/ztunnel/ztunnel` above this checkout; without one those paths
    /// are left out, and the report says so.
    #[arg(long, env = "WEFT_ZTUNNEL")]
    ztunnel: Option<PathBuf>,
    /// The agents' `agent.workerThreads` on the data paths (default: theirs, the CPUs).
    #[arg(long)]
    agent_worker_threads: Option<usize>,
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
    Upgrade,
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
    if let Some(threads) = options.agent_worker_threads {
        cmd.arg("--agent-worker-threads").arg(threads.to_string());
    }
    if let Some(part) = options.only {
        cmd.arg("--only").arg(match part {
            Part::Paths => "paths",
            Part::Policies => "policies",
            Part::Scale => "scale",
            Part::Hostile => "hostile",
            Part::Upgrade => "upgrade",
        });
    }
    match options.ztunnel.clone().or_else(weft_tests::ztunnel::binary) {
        Some(ztunnel) => {
            println!("bench: ztunnel {}", ztunnel.display());
            cmd.env("WEFT_ZTUNNEL", ztunnel);
        }
        None => println!("bench: no ztunnel binary (--ztunnel PATH): its paths are left out"),
    }
    cmd.env("WEFT_BIN", &agent)
        .env("WEFT_TESTAPP", release.join("weft-testapp"))
        .env("WEFT_BENCH", release.join("weft-bench"))
        .env("WEFT_BENCH_OUT", &out)
        .current_dir(cargo::root());
    cargo::run(&mut cmd)
}

fn measure(options: &Options) -> Result<()> {
    let plan = Plan::new(options.quick);
    let out = std::env::var_os("WEFT_BENCH_OUT")
        .map(PathBuf::from)
        .context("WEFT_BENCH_OUT is not set (run `cargo xtask bench`)")?;
    std::fs::create_dir_all(&out).with_context(|| format!("mkdir {}", out.display()))?;
    let started = Instant::now();
    let mut conditions = conditions();
    if let Some(threads) = options.agent_worker_threads {
        conditions["agentWorkerThreads"] = threads.into();
    }
    let mut report = Report::new(options.quick, conditions);

    // Nodes are dropped (and everything in them killed and removed) when this scope ends,
    // whatever happens inside it.
    let part = |p: Part| options.only.is_none_or(|only| only == p);
    let result = (|| -> Result<()> {
        if part(Part::Paths) || part(Part::Policies) {
            paths::run(&plan, options, &out, &mut report)?;
        }
        if part(Part::Scale) {
            scale::run(&plan, &mut report)?;
        }
        if part(Part::Hostile) {
            hostile::run(&plan, &mut report)?;
        }
        if part(Part::Upgrade) {
            upgrade::run(&plan, &mut report)?;
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

const PORT: u16 = 7000;
/// The key of the same-node path over HBONE (`mesh.sameNode: HBONE`; node-local is the
/// default, `weft-l4`).
const SAME_NODE_HBONE: &str = "weft-l4-hbone";
/// The `app` label of the weft server pod, which the policies of the policy rows select.
const SERVER_APP: &str = "bench-server";
/// A client gets its run time plus this much before the harness kills it.
const CLIENT_SLACK: Duration = Duration::from_secs(60);
const RR_TIMEOUT: Duration = Duration::from_secs(600);
const HOLD_TIMEOUT: Duration = Duration::from_secs(120);
