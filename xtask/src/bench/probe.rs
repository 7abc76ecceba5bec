//! Readings of the machine and of the processes a path costs (`/proc`), and the small
//! conversions every part shares: weft-bench's arguments and JSON figures, units.

use std::{process::Command, thread, time::Duration};

use serde_json::{Value, json};
use weft_tests::bench as harness;

/// Load and CPU of the machine, for the report.
pub fn conditions() -> Value {
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

pub fn cpu(pids: &[u32]) -> f64 {
    pids.iter()
        .filter_map(|p| harness::cpu_seconds(*p).ok())
        .sum()
}

/// `Rss` and `Anonymous` of smaps_rollup, for the console.
pub fn smaps(pid: u32) -> String {
    let get = |field| harness::smaps_bytes(pid, field).map_or(0.0, mb);
    format!(
        "smaps Rss {:.1} MB, Anonymous {:.1} MB",
        get("Rss"),
        get("Anonymous")
    )
}

pub fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(ToString::to_string).collect()
}

pub fn f(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or(0.0)
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

pub fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}
