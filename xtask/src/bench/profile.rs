//! `--profile`: a CPU profile of the agent (`perf record -g`) during single-stream
//! throughput through weft, into target/bench/profile.txt and profile-flat.txt.

use std::{path::Path, process::Command, time::Duration};

use anyhow::{Context, Result, bail};
use weft_tests::bench as harness;

use super::{CLIENT_SLACK, plan::Plan, probe::args, workloads::Scenario};

/// `perf record -g` on the agent during single-stream throughput through it.
pub fn profile(plan: &Plan, s: &Scenario<'_>, pid: u32, out: &Path) -> Result<()> {
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
