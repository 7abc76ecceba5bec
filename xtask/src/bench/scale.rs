//! The scale node (node 3): the time to enrol many pods at once, the agent's memory with
//! them and with many connections open, and the control plane: the time, CPU and memory to
//! apply a big state (workloads, services, policies).

use std::{
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use serde_json::Value;
use weft_tests::{TestAgent, TestNode, bench as harness};

use super::{
    HOLD_TIMEOUT, PORT,
    agent::{apply, generation, log_span, plain_if_no_ca, wait_enrolled, wait_for},
    plan::Plan,
    probe::{mb, ms, smaps},
    report::Report,
    state::{add_big_state, background_policies, policy_list},
};

/// Enrolment time, agent memory with many pods and connections, and the control plane.
pub fn run(plan: &Plan, report: &mut Report) -> Result<()> {
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
        // Listed is not yet served: the pods' HBONE needs their new certificates, which
        // readiness waits for. Connecting before that is reset (fail closed).
        agent.wait_ready()?;
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
        // Where it goes: the binary's (and libraries') mapped pages, which no per-connection
        // saving touches, and the anonymous rest (heap, tasks, buffers).
        let anonymous = harness::smaps_bytes(pid, "Anonymous")?;
        let mapped = harness::smaps_bytes(pid, "Rss")?.saturating_sub(anonymous);
        report.add(
            key,
            &format!("agent RSS with {n} pods + {conns} connections open: anonymous (heap)"),
            "MB",
            mb(anonymous),
        );
        report.add(
            key,
            &format!(
                "agent RSS with {n} pods + {conns} connections open: file pages (binary, libraries)"
            ),
            "MB",
            mb(mapped),
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

/// How long after applying a state the agent's CPU time and memory are read.
const SETTLE: Duration = Duration::from_secs(1);
