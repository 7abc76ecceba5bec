//! The agent under measurement, through the harness: which proxy hop it runs (mutual TLS or
//! plaintext), config writes waited on until its config generation moves, its enrolled
//! pods, and the timestamps of its log lines.

use std::{
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;
use weft_tests::{TestAgent, TestNode};

/// The harness turns mutual TLS on by default, with a CA made by `weft ca init`; an agent
/// built before HBONE has no `ca` command, and is measured with its plaintext hop.
pub fn plain_if_no_ca(nodes: &[&TestNode]) -> bool {
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
pub fn transport(agent: &TestAgent, mtls_configured: bool) -> String {
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

/// Writes `config` and waits until the agent's config generation moved (unless it holds
/// that state already).
pub fn apply(agent: &TestAgent, config: &Value) -> Result<()> {
    let yaml = weft_tests::agent::config_yaml(config)?;
    if std::fs::read_to_string(agent.config_path()).is_ok_and(|text| text == yaml) {
        return Ok(());
    }
    let before = generation(agent)?;
    agent.write_config_text(&yaml)?;
    wait_for(|| Ok(generation(agent)? > before), "the new config")
}

pub fn generation(agent: &TestAgent) -> Result<u64> {
    let status = agent.status()?;
    if let Some(rejection) = status["config"]["last_rejection"].as_str() {
        bail!("the agent rejected the benchmark's config: {rejection}");
    }
    status["config"]["generation"]
        .as_u64()
        .context("no config.generation in /status")
}

pub fn wait_enrolled(agent: &TestAgent, n: usize) -> Result<()> {
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
pub fn wait_for(done: impl FnMut() -> Result<bool>, what: &str) -> Result<()> {
    wait_within(Duration::from_secs(60), done, what)
}

pub fn wait_within(
    limit: Duration,
    mut done: impl FnMut() -> Result<bool>,
    what: &str,
) -> Result<()> {
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

pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The Unix time of a log line's RFC 3339 UTC timestamp (`2026-11-22T01:20:06.401511Z …`).
pub fn log_unix(line: &str) -> Option<f64> {
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

/// Seconds between the first log line containing `first` and the last containing `last`
/// (tracing's RFC 3339 timestamps, UTC, at the start of each line).
pub fn log_span(log: &str, first: &str, last: &str) -> Option<f64> {
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
}
