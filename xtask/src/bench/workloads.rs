//! What is measured over one path (a [`Scenario`]): throughput with 1 to 64 streams,
//! round trips of 1 B and 1 KiB, the new-connection rate, and HTTP/1.1 latency at a fixed
//! request rate (open loop), each a sample of the [`Report`] per repetition.

use std::{net::SocketAddr, time::Duration};

use anyhow::Result;
use serde_json::Value;
use weft_tests::{TestNode, TestPod, bench as harness};

use super::{
    CLIENT_SLACK, RR_TIMEOUT,
    plan::Plan,
    probe::{args, cpu, f, plural},
    report::Report,
};

/// One way for the client's bytes to reach the server.
pub struct Scenario<'a> {
    /// Stable key in results.json.
    pub key: &'static str,
    /// Shown in tables and charts.
    pub label: String,
    pub client: &'a TestPod,
    pub to: SocketAddr,
    /// Where the HTTP server listens, for the open-loop workload.
    pub http_to: SocketAddr,
    /// The scenario this one is compared with (`direct` for the same topology).
    pub baseline: Option<&'static str>,
    /// Processes whose CPU time is the cost of this path (agents, stunnels).
    pub cost_pids: Vec<u32>,
    /// Through a waypoint: HTTP only (it parses requests), so the raw TCP workloads of
    /// `to` do not apply.
    pub http_only: bool,
}

/// One repetition of every workload over one path (the spinner-less part).
pub fn one_rep(plan: &Plan, _node: &TestNode, s: &Scenario<'_>, report: &mut Report) {
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
pub fn http_load(s: &Scenario<'_>, rate: f64, secs: f64) -> Result<Value> {
    http_load_with(s, rate, secs, &[])
}

/// `http_load` with request headers (`name:value`) on every request.
pub fn http_load_with(s: &Scenario<'_>, rate: f64, secs: f64, headers: &[String]) -> Result<Value> {
    let (to, rate, secs_text) = (s.http_to.to_string(), rate.to_string(), secs.to_string());
    let mut argv = args(&[
        "http-load",
        "--to",
        &to,
        "--rate",
        &rate,
        "--secs",
        &secs_text,
    ]);
    for header in headers {
        argv.extend(args(&["--header", header]));
    }
    harness::client(
        s.client,
        &argv,
        Duration::from_secs_f64(secs) + CLIENT_SLACK,
    )
}

pub fn rr(plan: &Plan, s: &Scenario<'_>, size: usize, spin: bool, report: &mut Report) {
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
