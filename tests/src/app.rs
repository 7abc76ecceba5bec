//! Typed wrappers around `weft-testapp` (src/bin/weft-testapp.rs), the application the tests
//! run inside pods, and the locations of the binaries the harness runs.

use std::{net::SocketAddr, path::PathBuf, process::Command, time::Duration};

use anyhow::{Context, Result, bail};

use crate::{
    eventually::{assert_eventually, eventually, scaled},
    node::TestNode,
    pod::TestPod,
    process::{Finished, Spawn, TestProcess},
};

/// How a `serve` answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Echo every byte; close after the client's FIN.
    Echo,
    /// Read until the client's FIN, then answer `bytes=N sha256=H peer=IP:PORT` and close.
    Hash,
}

/// A `weft-testapp serve` running in a pod.
pub struct Server {
    pub process: TestProcess,
    pub port: u16,
}

/// One `accepted` line of a server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accepted {
    pub peer: SocketAddr,
    pub local: SocketAddr,
}

/// One `closed` line of a server: what it received on that connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Closed {
    pub peer: SocketAddr,
    pub received_bytes: u64,
    pub received_sha256: String,
    pub sent_bytes: u64,
    pub status: String,
}

/// What `weft-testapp send` saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SendReport {
    /// The app socket's local address (`getsockname`).
    pub local: SocketAddr,
    /// The app socket's peer address (`getpeername`): what the app believes it talks to.
    pub peer: SocketAddr,
    pub sent_bytes: u64,
    pub sent_sha256: String,
    pub received_bytes: u64,
    pub received_sha256: String,
    /// The reply, when it was short text (hash mode's line).
    pub reply: Option<String>,
}

/// Outcome of `weft-testapp connect`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Connect {
    Connected,
    /// `std::io::ErrorKind` name: `ConnectionRefused`, `TimedOut`, …
    Failed(String),
}

/// Starts `serve --port P --mode M` in the pod and waits until it listens.
pub fn serve(pod: &TestPod, port: u16, mode: Mode) -> Result<Server> {
    let mut cmd = Command::new(testapp_bin());
    cmd.args(["serve", "--port", &port.to_string(), "--mode"]);
    cmd.arg(match mode {
        Mode::Echo => "echo",
        Mode::Hash => "hash",
    });
    let process = pod.spawn(cmd, &format!("serve-{port}"))?;
    assert_eventually(Duration::from_secs(10), || {
        if process.output().contains("listening ") {
            Ok(())
        } else {
            Err(format!("server not listening yet: {:?}", process.output()))
        }
    });
    Ok(Server { process, port })
}

impl Server {
    pub fn accepted(&self) -> Vec<Accepted> {
        self.process
            .lines_starting("accepted")
            .iter()
            .filter_map(|l| {
                let kv = KeyValues::parse(l);
                Some(Accepted {
                    peer: kv.get("peer")?.parse().ok()?,
                    local: kv.get("local")?.parse().ok()?,
                })
            })
            .collect()
    }

    pub fn closed(&self) -> Vec<Closed> {
        self.process
            .lines_starting("closed")
            .iter()
            .filter_map(|l| {
                let kv = KeyValues::parse(l);
                Some(Closed {
                    peer: kv.get("peer")?.parse().ok()?,
                    received_bytes: kv.get("received_bytes")?.parse().ok()?,
                    received_sha256: kv.get("received_sha256")?.to_string(),
                    sent_bytes: kv.get("sent_bytes")?.parse().ok()?,
                    status: kv.get("status")?.to_string(),
                })
            })
            .collect()
    }

    /// Waits until the server has accepted at least `n` connections and returns every one
    /// it accepted. Tests compare the number with `==`: a connection that must never have
    /// reached the application shows as one too many.
    #[track_caller]
    pub fn wait_accepted(&self, n: usize) -> Vec<Accepted> {
        assert_eventually(Duration::from_secs(10), || {
            let accepted = self.accepted();
            if accepted.len() >= n {
                Ok(accepted)
            } else {
                Err(format!(
                    "server on port {} accepted {} connections, expected {n}; its output:\n{}",
                    self.port,
                    accepted.len(),
                    self.process.output()
                ))
            }
        })
    }

    /// Waits for the `closed` line of a connection the predicate accepts (e.g. the one
    /// whose received sha256 is what a client sent).
    #[track_caller]
    pub fn wait_closed_where(&self, pred: impl Fn(&Closed) -> bool) -> Closed {
        assert_eventually(Duration::from_secs(30), || {
            let closed = self.closed();
            closed.iter().find(|c| pred(c)).cloned().ok_or_else(|| {
                format!(
                    "server on port {} saw no such connection; its output:\n{}",
                    self.port,
                    self.process.output()
                )
            })
        })
    }
}

/// `send --to --bytes --seed`: sends `bytes` pseudo-random bytes, half-closes, reads the reply.
pub fn send(pod: &TestPod, to: SocketAddr, bytes: u64, seed: u64) -> Result<SendReport> {
    run_send(pod, to, send_command(to, bytes, seed))
}

fn send_command(to: SocketAddr, bytes: u64, seed: u64) -> Command {
    let mut cmd = Command::new(testapp_bin());
    cmd.args(["send", "--to", &to.to_string()]);
    cmd.args(["--bytes", &bytes.to_string(), "--seed", &seed.to_string()]);
    cmd
}

/// A `send` still running (see [`start_send_paced`]).
pub struct RunningSend {
    process: TestProcess,
    to: SocketAddr,
}

/// `send --to --bytes --seed --duration-ms`, in the background: the bytes are spread
/// evenly over `over`, keeping one connection busy that long while the test looks around.
pub fn start_send_paced(
    pod: &TestPod,
    to: SocketAddr,
    bytes: u64,
    seed: u64,
    over: Duration,
) -> Result<RunningSend> {
    let mut cmd = send_command(to, bytes, seed);
    cmd.args(["--duration-ms", &over.as_millis().to_string()]);
    Ok(RunningSend {
        process: pod.spawn(cmd, "send")?,
        to,
    })
}

impl RunningSend {
    /// Waits for the transfer to end and reads its report.
    pub fn finish(mut self) -> Result<SendReport> {
        let done = self.process.wait(scaled(Duration::from_secs(180)))?;
        check_send(self.to, &done)
    }
}

/// `send --to --text`: sends exactly `text` (a marker to look for on the wire).
pub fn send_text(pod: &impl Spawn, to: SocketAddr, text: &str) -> Result<SendReport> {
    let mut cmd = Command::new(testapp_bin());
    cmd.args(["send", "--to", &to.to_string(), "--text", text]);
    run_send(pod, to, cmd)
}

fn run_send(pod: &impl Spawn, to: SocketAddr, cmd: Command) -> Result<SendReport> {
    // 100 MiB through a debug-build proxy on a busy 2-core machine: be generous.
    let done = pod.run(cmd, "send", scaled(Duration::from_secs(180)))?;
    check_send(to, &done)
}

fn check_send(to: SocketAddr, done: &Finished) -> Result<SendReport> {
    if !done.status.success() {
        bail!("send to {to} failed ({}):\n{}", done.status, done.output);
    }
    parse_send(&done.output).with_context(|| format!("parse send output:\n{}", done.output))
}

fn parse_send(output: &str) -> Result<SendReport> {
    let mut local = None;
    let mut peer = None;
    let mut sent = None;
    let mut received = None;
    let mut reply = None;
    for line in output.lines() {
        if let Some(rest) = line.strip_prefix("local ") {
            local = Some(rest.parse()?);
        } else if let Some(rest) = line.strip_prefix("peer ") {
            peer = Some(rest.parse()?);
        } else if let Some(rest) = line.strip_prefix("reply ") {
            reply = Some(rest.to_string());
        } else if line.starts_with("sent ") || line.starts_with("received ") {
            let kv = KeyValues::parse(line);
            let pair = (
                kv.get("bytes").context("bytes=")?.parse::<u64>()?,
                kv.get("sha256").context("sha256=")?.to_string(),
            );
            if line.starts_with("sent ") {
                sent = Some(pair);
            } else {
                received = Some(pair);
            }
        }
    }
    let (sent_bytes, sent_sha256) = sent.context("no `sent` line")?;
    let (received_bytes, received_sha256) = received.context("no `received` line")?;
    Ok(SendReport {
        local: local.context("no `local` line")?,
        peer: peer.context("no `peer` line")?,
        sent_bytes,
        sent_sha256,
        received_bytes,
        received_sha256,
        reply,
    })
}

/// `conns --to --count`: `count` concurrent echo connections, each payload checked.
pub fn conns(pod: &TestPod, to: SocketAddr, count: usize) -> Result<()> {
    run_echo_checks(pod, "conns", "concurrent", to, count)
}

/// `churn --to --count`: `count` short echo connections, one after another.
pub fn churn(pod: &TestPod, to: SocketAddr, count: usize) -> Result<()> {
    run_echo_checks(pod, "churn", "sequential", to, count)
}

fn run_echo_checks(
    pod: &TestPod,
    command: &str,
    how: &str,
    to: SocketAddr,
    count: usize,
) -> Result<()> {
    let mut cmd = Command::new(testapp_bin());
    cmd.args([
        command,
        "--to",
        &to.to_string(),
        "--count",
        &count.to_string(),
    ]);
    let done = pod.run(cmd, command, scaled(Duration::from_secs(120)))?;
    if !done.status.success() || !done.output.contains(&format!("ok count={count}")) {
        bail!(
            "{count} {how} connections to {to} failed ({}):\n{}",
            done.status,
            done.output
        );
    }
    Ok(())
}

/// `weft-testapp send` of 100 bytes from the node's netns, as the kubelet (a process of
/// the node, in its host cgroup): `Ok` with the output when the echo came back whole,
/// `Err` with it otherwise.
pub fn send_from_node(node: &TestNode, to: SocketAddr) -> Result<Result<String, String>> {
    let mut cmd = Command::new(testapp_bin());
    cmd.args([
        "send",
        "--to",
        &to.to_string(),
        "--bytes",
        "100",
        "--seed",
        "9",
    ]);
    let done = node
        .spawn(cmd, "send")?
        .wait(scaled(Duration::from_secs(20)))?;
    Ok(
        if done.status.success() && done.output.contains("received bytes=100 ") {
            Ok(done.output)
        } else {
            Err(done.output)
        },
    )
}

/// `connect --to --timeout-ms`: does a TCP handshake complete?
pub fn connect(pod: &TestPod, to: SocketAddr, timeout: Duration) -> Result<Connect> {
    let mut cmd = Command::new(testapp_bin());
    cmd.args(["connect", "--to", &to.to_string(), "--timeout-ms"]);
    cmd.arg(timeout.as_millis().to_string());
    let done = pod.run(cmd, "connect", timeout + scaled(Duration::from_secs(10)))?;
    if done.status.success() {
        return Ok(Connect::Connected);
    }
    let line = done
        .output
        .lines()
        .find(|l| l.starts_with("error "))
        .with_context(|| format!("connect failed without an error line:\n{}", done.output))?;
    let kind = KeyValues::parse(line)
        .get("kind")
        .unwrap_or("unknown")
        .to_string();
    Ok(Connect::Failed(kind))
}

/// What `weft-testapp hammer` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hammered {
    pub attempts: u64,
    pub connected: u64,
    pub failed: u64,
}

/// `hammer --to --count --duration-ms [--payload-hex]`: a hostile pod's tight loop of
/// connect, write `payload`, close, for `count` attempts or `duration`, whichever ends first.
pub fn hammer(
    pod: &TestPod,
    to: SocketAddr,
    count: u64,
    duration: Duration,
    payload: &[u8],
) -> Result<Hammered> {
    start_hammer(pod, to, count, duration, payload)?.finish()
}

/// A `hammer` still running (see [`start_hammer`]).
pub struct RunningHammer {
    process: TestProcess,
    duration: Duration,
}

/// [`hammer`], in the background, while the test looks at the neighbours.
pub fn start_hammer(
    pod: &TestPod,
    to: SocketAddr,
    count: u64,
    duration: Duration,
    payload: &[u8],
) -> Result<RunningHammer> {
    let mut cmd = Command::new(testapp_bin());
    cmd.args([
        "hammer",
        "--to",
        &to.to_string(),
        "--count",
        &count.to_string(),
    ]);
    cmd.args(["--duration-ms", &duration.as_millis().to_string()]);
    payload_arg(&mut cmd, payload);
    Ok(RunningHammer {
        process: pod.spawn(cmd, "hammer")?,
        duration,
    })
}

impl RunningHammer {
    /// Waits for the loop to end and reads its counts.
    pub fn finish(mut self) -> Result<Hammered> {
        let done = self
            .process
            .wait(self.duration + scaled(Duration::from_secs(60)))?;
        let line = done
            .output
            .lines()
            .find(|l| l.starts_with("hammered "))
            .with_context(|| {
                format!(
                    "hammer printed no result ({}):\n{}",
                    done.status, done.output
                )
            })?;
        let kv = KeyValues::parse(line);
        let field = |name: &str| -> Result<u64> {
            kv.get(name)
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("hammer result without {name}: {line:?}"))
        };
        Ok(Hammered {
            attempts: field("attempts")?,
            connected: field("connected")?,
            failed: field("failed")?,
        })
    }
}

/// `weft-testapp hold`: `count` connections from `pod` to `to` (`threads` at a time,
/// default 16), each writing `payload` (when not empty); after `settle` it says which are
/// still open ([`held`]) and keeps those until killed.
pub fn hold(
    pod: &TestPod,
    to: SocketAddr,
    count: u64,
    settle: Duration,
    threads: Option<usize>,
    payload: &[u8],
) -> Result<TestProcess> {
    let mut cmd = Command::new(testapp_bin());
    cmd.args([
        "hold",
        "--to",
        &to.to_string(),
        "--count",
        &count.to_string(),
    ]);
    cmd.args(["--settle-ms", &settle.as_millis().to_string()]);
    if let Some(threads) = threads {
        cmd.args(["--threads", &threads.to_string()]);
    }
    payload_arg(&mut cmd, payload);
    pod.spawn(cmd, "hold")
}

/// Waits for `hold`'s `held open=X closed=Y` line: (open, closed).
pub fn held(process: &TestProcess) -> Result<(u64, u64)> {
    eventually(Duration::from_secs(240), || {
        let line = process
            .lines_starting("held")
            .pop()
            .ok_or_else(|| anyhow::anyhow!("no `held` line yet: {}", process.output()))?;
        let value = |key: &str| -> Result<u64> {
            line.split(' ')
                .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
                .context("field")?
                .parse()
                .context("number")
        };
        Ok((value("open")?, value("closed")?))
    })
}

/// `--payload-hex H` of `hammer` and `hold`, unless `payload` is empty.
fn payload_arg(cmd: &mut Command, payload: &[u8]) {
    if !payload.is_empty() {
        let hex: String = payload.iter().map(|b| format!("{b:02x}")).collect();
        cmd.args(["--payload-hex", &hex]);
    }
}

/// The client app saw its connection reset: ECONNRESET on a read, EPIPE on a write after
/// the RST arrived, ENOTCONN on the shutdown(SHUT_WR) after it, or ECONNREFUSED when the
/// RST answered the SYN. (A clean close or a hang would be none of these.) `e` is the
/// error of [`send`], [`send_text`] or [`RunningSend::finish`].
pub fn is_reset(e: &anyhow::Error) -> bool {
    let text = format!("{e:#}");
    [
        "ConnectionReset",
        "BrokenPipe",
        "NotConnected",
        "ConnectionRefused",
    ]
    .iter()
    .any(|kind| text.contains(&format!("kind={kind}")))
}

/// Ok when the send `what` describes was reset; an error naming what came instead (a
/// reply, a clean close, a timeout).
pub fn expect_reset(result: Result<SendReport>, what: &str) -> Result<()> {
    match result {
        Ok(report) => bail!("{what} should have been reset, but got {report:?}"),
        Err(e) if is_reset(&e) => Ok(()),
        Err(e) => bail!("{what} must be reset (not a hang, not a clean close): {e:#}"),
    }
}

/// The `weft-testapp` binary: `$WEFT_TESTAPP`, else next to the running executable (cargo
/// puts it in `target/<profile>/`, integration tests run from `target/<profile>/deps/`).
pub fn testapp_bin() -> PathBuf {
    locate("weft-testapp", "WEFT_TESTAPP")
}

/// The agent binary: `$WEFT_BIN`, else `target/<profile>/weft` next to the running executable.
pub fn weft_bin() -> PathBuf {
    locate("weft", "WEFT_BIN")
}

fn locate(name: &str, env: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env) {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let candidates: Vec<PathBuf> = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join(name))
        .collect();
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "{name} not found (looked at {candidates:?}); build it (`cargo xtask build`) \
                 or set {env}"
            )
        })
}

/// `word k=v k=v …` (values have no spaces, except a trailing `error=`).
pub(crate) struct KeyValues<'a>(Vec<(&'a str, &'a str)>);

impl<'a> KeyValues<'a> {
    pub(crate) fn parse(line: &'a str) -> Self {
        KeyValues(
            line.split(' ')
                .filter_map(|field| field.split_once('='))
                .collect(),
        )
    }

    pub(crate) fn get(&self, key: &str) -> Option<&'a str> {
        self.0.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_send_output() {
        let out = "local 10.1.0.2:40000\npeer 10.1.0.3:8080\nsent bytes=3 sha256=abc\nreceived bytes=40 sha256=def\n\
                   reply bytes=3 sha256=abc peer=10.1.0.2:40000\n";
        let r = parse_send(out).unwrap();
        assert_eq!(r.sent_bytes, 3);
        assert_eq!(r.received_sha256, "def");
        assert_eq!(
            r.reply.as_deref(),
            Some("bytes=3 sha256=abc peer=10.1.0.2:40000")
        );
    }
}
