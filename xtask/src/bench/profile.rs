//! `--profile`: CPU profiles of the agent (`perf record -g`) through the node-local path,
//! one during single-stream throughput (`profile*.txt`) and one during the new-connection
//! loop (`profile-connect*.txt`), into target/bench/.

use std::{path::Path, process::Command, time::Duration};

use anyhow::{Context, Result, bail};
use weft_tests::bench as harness;

use super::{CLIENT_SLACK, plan::Plan, probe::args, workloads::Scenario};

/// What the client does while the agent is profiled.
struct Load {
    /// The file names' part: `profile{name}.txt`, `profile{name}-flat.txt`.
    name: &'static str,
    what: &'static str,
    command: &'static str,
}

const LOADS: [Load; 2] = [
    Load {
        name: "",
        what: "single-stream throughput",
        command: "tput",
    },
    Load {
        name: "-connect",
        what: "new connections",
        command: "crr",
    },
];

/// `perf record -g` on the agent during each load through the scenario's path.
pub fn profile(plan: &Plan, s: &Scenario<'_>, pid: u32, out: &Path) -> Result<()> {
    let secs = plan.tput_secs.max(5.0);
    for load in &LOADS {
        println!(
            "== profile: perf record -g on the agent (pid {pid}), {} ==",
            load.what
        );
        let data = out.join(format!("perf{}.data", load.name));
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
                load.command,
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
        for (suffix, graph) in [("", None), ("-flat", Some(["-g", "none"]))] {
            let report = Command::new("perf")
                .args(["report", "--stdio", "--no-children", "--percent-limit"])
                .arg(if graph.is_some() { "0.3" } else { "0.5" })
                .args(graph.iter().flatten())
                .arg("-i")
                .arg(&data)
                .output()
                .context("perf report")?;
            let file = out.join(format!("profile{}{suffix}.txt", load.name));
            std::fs::write(&file, &report.stdout)?;
            println!("profile: {}", file.display());
        }
    }
    Ok(())
}
