//! Typed wrappers of `weft-testapp streams` and `connect-loop` (its `steady` module):
//! traffic that runs across a restart or an upgrade of the mesh, and the exact count of
//! what it cost.

use std::{net::SocketAddr, process::Command, time::Duration};

use anyhow::{Context, Result};

use crate::{
    app::{KeyValues, testapp_bin},
    eventually::scaled,
    pod::TestPod,
    process::{Finished, TestProcess},
};

/// What `streams` saw: `count` echo connections, each exact or failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Streamed {
    pub count: u64,
    pub ok: u64,
    pub failed: u64,
    pub sent_bytes: u64,
    pub echoed_bytes: u64,
    /// `failed conn=.. stage=.. ...` lines (the first 20).
    pub failures: Vec<String>,
    /// Every failure, by `stage/kind` (e.g. `read/ConnectionReset`).
    pub failed_kinds: Vec<(String, u64)>,
}

/// What `connect-loop` saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Looped {
    pub attempts: u64,
    pub ok: u64,
    pub failed: u64,
    /// The longest time without a successful round.
    pub longest_gap: Duration,
    /// `failure at_ms=.. stage=.. kind=..` lines (the first 20).
    pub failures: Vec<String>,
    /// Every failure, by `stage/kind`.
    pub failed_kinds: Vec<(String, u64)>,
}

/// A `streams` or `connect-loop` still running; `finish` reads its report.
pub struct Running<T> {
    process: TestProcess,
    wait: Duration,
    parse: fn(&Finished) -> Result<T>,
}

pub type RunningStreams = Running<Streamed>;
pub type RunningLoop = Running<Looped>;

impl<T> Running<T> {
    /// Whether it still runs (a test checks the traffic outlived what it did).
    pub fn running(&mut self) -> bool {
        self.process.try_status().is_none()
    }

    pub fn finish(mut self) -> Result<T> {
        let done = self.process.wait(self.wait)?;
        (self.parse)(&done)
    }
}

/// `count` echo connections from `pod` to `to`, each writing a 1 KiB chunk every 100 ms and
/// checking its echo for `over`; returns once every connection has had its first echo
/// (traffic flows both ways on all of them).
pub fn start_streams(
    pod: &TestPod,
    to: SocketAddr,
    count: usize,
    over: Duration,
) -> Result<RunningStreams> {
    let mut cmd = Command::new(testapp_bin());
    cmd.args([
        "streams",
        "--to",
        &to.to_string(),
        "--count",
        &count.to_string(),
    ]);
    cmd.args(["--duration-ms", &over.as_millis().to_string()]);
    let process = pod.spawn(cmd, "streams")?;
    crate::eventually::eventually(Duration::from_secs(30), || {
        let output = process.output();
        anyhow::ensure!(
            output.contains("flowing count=") || output.contains("streamed count="),
            "streams to {to} not flowing yet"
        );
        Ok(())
    })?;
    Ok(Running {
        process,
        wait: over + scaled(Duration::from_secs(60)),
        parse: parse_streamed,
    })
}

/// Connect, echo 64 bytes, close, again, from `pod` to `to` for `over`.
pub fn start_connect_loop(pod: &TestPod, to: SocketAddr, over: Duration) -> Result<RunningLoop> {
    let mut cmd = Command::new(testapp_bin());
    cmd.args(["connect-loop", "--to", &to.to_string()]);
    cmd.args(["--duration-ms", &over.as_millis().to_string()]);
    Ok(Running {
        process: pod.spawn(cmd, "connect-loop")?,
        wait: over + scaled(Duration::from_secs(30)),
        parse: parse_looped,
    })
}

fn parse_streamed(done: &Finished) -> Result<Streamed> {
    let (kv, failures) = result_line(done, "streamed ", "failed conn=")?;
    let field = |name| number(&kv, name);
    Ok(Streamed {
        count: field("count")?,
        ok: field("ok")?,
        failed: field("failed")?,
        sent_bytes: field("sent_bytes")?,
        echoed_bytes: field("echoed_bytes")?,
        failed_kinds: kinds(&kv)?,
        failures,
    })
}

fn parse_looped(done: &Finished) -> Result<Looped> {
    let (kv, failures) = result_line(done, "looped ", "failure ")?;
    let field = |name| number(&kv, name);
    Ok(Looped {
        attempts: field("attempts")?,
        ok: field("ok")?,
        failed: field("failed")?,
        longest_gap: Duration::from_millis(field("longest_gap_ms")?),
        failed_kinds: kinds(&kv)?,
        failures,
    })
}

/// The result line starting with `result` and the lines starting with `failure`.
fn result_line<'a>(
    done: &'a Finished,
    result: &str,
    failure: &str,
) -> Result<(KeyValues<'a>, Vec<String>)> {
    let line = done
        .output
        .lines()
        .find(|l| l.starts_with(result))
        .with_context(|| format!("no {result:?} line ({}):\n{}", done.status, done.output))?;
    let failures = done
        .output
        .lines()
        .filter(|l| l.starts_with(failure))
        .map(str::to_string)
        .collect();
    Ok((KeyValues::parse(line), failures))
}

/// `failed_kinds=read/ConnectionReset:3,connect/ConnectionRefused:1` (or `-`).
fn kinds(kv: &KeyValues<'_>) -> Result<Vec<(String, u64)>> {
    let text = kv.get("failed_kinds").context("no failed_kinds=")?;
    if text == "-" {
        return Ok(Vec::new());
    }
    text.split(',')
        .map(|part| {
            let (kind, n) = part.rsplit_once(':').context("kind:n")?;
            Ok((kind.to_string(), n.parse()?))
        })
        .collect()
}

fn number(kv: &KeyValues<'_>, name: &str) -> Result<u64> {
    kv.get(name)
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no number {name}="))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finished(output: &str) -> Finished {
        use std::os::unix::process::ExitStatusExt;
        Finished {
            status: std::process::ExitStatus::from_raw(0),
            output: output.to_string(),
        }
    }

    #[test]
    fn parses_both_reports() {
        let streamed = parse_streamed(&finished(
            "connected count=3\nfailed conn=2 stage=read kind=ConnectionReset error=x\n\
             streamed count=3 ok=2 failed=1 sent_bytes=10 echoed_bytes=9 \
             failed_kinds=read/ConnectionReset:1\n",
        ))
        .unwrap();
        assert_eq!(
            (streamed.ok, streamed.failed, streamed.echoed_bytes),
            (2, 1, 9)
        );
        assert_eq!(streamed.failures.len(), 1);
        assert_eq!(
            streamed.failed_kinds,
            [("read/ConnectionReset".to_string(), 1)]
        );
        let looped = parse_looped(&finished(
            "failure at_ms=5 stage=connect kind=ConnectionRefused\n\
             looped attempts=4 ok=3 failed=1 longest_gap_ms=250 \
             failed_kinds=connect/ConnectionRefused:1\n",
        ))
        .unwrap();
        assert_eq!(looped.longest_gap, Duration::from_millis(250));
        assert_eq!(looped.failures.len(), 1);
        assert!(parse_looped(&finished("nothing\n")).is_err());
    }
}
