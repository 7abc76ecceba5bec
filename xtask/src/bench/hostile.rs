//! The hostile part (node 4): a pod hoarding idle connections beside a neighbour that
//! measures its round trips, and what the agent holds while and after.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, Result};
use weft_tests::{TestNode, bench as harness};

use super::{
    HOLD_TIMEOUT, PORT, RR_TIMEOUT,
    agent::{plain_if_no_ca, wait_within},
    plan::Plan,
    probe::{args, f, mb},
    report::Report,
};

/// A hostile pod hoards idle connections through its node's proxy (to a victim pod) while
/// a neighbour pod of the same node measures round trips to another pod: the agent's file
/// descriptors and RSS, how many of the hoarder's connections the proxy let it keep, and
/// the neighbour's latency before and during. (The victim's own inbound budget is the
/// hoarder's to exhaust, as any client can flood a server: docs/security.md.)
pub fn run(plan: &Plan, report: &mut Report) -> Result<()> {
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

/// File descriptors an agent may hold beyond its baseline once the hoarder is gone (pooled
/// connections still closing, certificates, logs): far below the thousands a leak would
/// leave (a full run came back to 14 above its baseline).
const FD_SLACK: usize = 64;
/// The HBONE pool's idle timeout (`hbone::pool`).
const POOL_IDLE: Duration = Duration::from_secs(60);
