//! Typed wrappers around `weft-bench` (src/bin/weft-bench.rs), the load tool `cargo xtask
//! bench` runs inside pods, plus what a benchmark needs around it: a stunnel mTLS tunnel
//! between two pods (the reference point), a CPU spinner, and the agent's CPU time and
//! memory from `/proc`.
//!
//! Every process started here is a [`TestProcess`] placed in a pod or node namespace:
//! dropping the handle kills it, and the node's `Drop` kills whatever is left in its
//! namespaces and cgroups.

use std::{
    net::{SocketAddr, SocketAddrV4, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{eventually::eventually, node::TestNode, pod::TestPod, process::TestProcess};

/// A `weft-bench serve` (or `http-serve`) running in a pod.
pub struct BenchServer {
    pub process: TestProcess,
    pub port: u16,
}

/// Starts `weft-bench serve --port P` in `pod` and waits until it listens.
pub fn serve(pod: &TestPod, port: u16) -> Result<BenchServer> {
    start_server(pod, port, "serve")
}

/// Starts `weft-bench http-serve --port P` in `pod` and waits until it listens.
pub fn http_serve(pod: &TestPod, port: u16) -> Result<BenchServer> {
    start_server(pod, port, "http-serve")
}

fn start_server(pod: &TestPod, port: u16, command: &str) -> Result<BenchServer> {
    let mut cmd = Command::new(bench_bin());
    cmd.args([command, "--port", &port.to_string()]);
    let process = pod.spawn(cmd, &format!("bench-{command}-{port}"))?;
    wait_for_output(&process, "listening ", Duration::from_secs(10))?;
    Ok(BenchServer { process, port })
}

/// Runs one `weft-bench` client command in `pod` to completion and returns its `result`.
pub fn client(pod: &TestPod, args: &[String], timeout: Duration) -> Result<Value> {
    let mut cmd = Command::new(bench_bin());
    cmd.args(args);
    let name = format!("bench-{}", args.first().map_or("client", String::as_str));
    let done = pod.run(cmd, &name, timeout)?;
    let what = format!("`weft-bench {}` in {}", args.join(" "), pod.name());
    parse_result(&what, &done.status, &done.output)
}

/// `weft-bench hold --to A --count N` in `pod`: returns once all `count` connections are up
/// (each proven by a round trip); they stay open until the handle is dropped.
pub fn hold(pod: &TestPod, to: SocketAddr, count: usize, timeout: Duration) -> Result<TestProcess> {
    let mut cmd = Command::new(bench_bin());
    cmd.args([
        "hold",
        "--to",
        &to.to_string(),
        "--count",
        &count.to_string(),
    ]);
    let process = pod.spawn(cmd, "bench-hold")?;
    wait_for_output(&process, &format!("held {count}"), timeout)?;
    Ok(process)
}

/// `weft-bench idle --to A --count N` in `pod`: returns, with its `result` (`opened`,
/// `refused`, `open`), once it has tried every connection; they stay open until the handle
/// is dropped.
pub fn idle(
    pod: &TestPod,
    to: SocketAddr,
    count: usize,
    timeout: Duration,
) -> Result<(TestProcess, Value)> {
    let mut cmd = Command::new(bench_bin());
    cmd.args([
        "idle",
        "--to",
        &to.to_string(),
        "--count",
        &count.to_string(),
    ]);
    let process = pod.spawn(cmd, "bench-idle")?;
    wait_for_output(&process, "result ", timeout)?;
    let output = process.output();
    let line = output
        .lines()
        .find_map(|l| l.strip_prefix("result "))
        .context("no result line")?;
    let result = serde_json::from_str(line).with_context(|| format!("bad result line {line:?}"))?;
    Ok((process, result))
}

/// `weft-bench until-denied --to A` in `pod`: returns once its connection loop runs (the
/// first connection went through); [`result_of`] then waits for the first failure.
pub fn until_denied(pod: &TestPod, to: SocketAddr, secs: f64) -> Result<TestProcess> {
    let mut cmd = Command::new(bench_bin());
    cmd.args([
        "until-denied",
        "--to",
        &to.to_string(),
        "--secs",
        &secs.to_string(),
    ]);
    let process = pod.spawn(cmd, "bench-until-denied")?;
    wait_for_output(&process, "connecting ", Duration::from_secs(10))?;
    Ok(process)
}

/// Waits for a `weft-bench` client started with `spawn` to finish and returns its `result`.
pub fn result_of(mut process: TestProcess, timeout: Duration) -> Result<Value> {
    let done = process.wait(timeout)?;
    parse_result(process.name(), &done.status, &done.output)
}

/// The JSON of a finished client's `result ` line; its output when it failed.
fn parse_result(what: &str, status: &std::process::ExitStatus, output: &str) -> Result<Value> {
    if !status.success() {
        bail!("{what} failed ({status}):\n{output}");
    }
    let line = output
        .lines()
        .find_map(|l| l.strip_prefix("result "))
        .with_context(|| format!("no result line in:\n{output}"))?;
    serde_json::from_str(line).with_context(|| format!("bad result line {line:?}"))
}

/// Busy threads, one per CPU, at nice 19, for as long as the handle lives.
pub fn spinner(node: &TestNode) -> Result<TestProcess> {
    let mut cmd = Command::new(bench_bin());
    cmd.arg("spin");
    let process = node.spawn(cmd, "bench-spin")?;
    wait_for_output(&process, "spinning ", Duration::from_secs(10))?;
    Ok(process)
}

/// A mutual-TLS tunnel made of two stunnel processes (TLS 1.3 only, both sides present and
/// verify a throwaway certificate): the client side listens on `127.0.0.1:<port>` in the
/// client pod, the server side on `<server ip>:<port>` in the server pod and forwards to
/// `127.0.0.1:<target>` there. Connect to [`Stunnel::entry`] from the client pod.
pub struct Stunnel {
    pub client: TestProcess,
    pub server: TestProcess,
    entry: SocketAddr,
}

impl Stunnel {
    /// Generates the certificate into `dir` (openssl), writes both configs and starts both
    /// ends; returns when both accept connections.
    pub fn start(
        dir: &Path,
        client_pod: &TestPod,
        server_pod: &TestPod,
        port: u16,
        target: u16,
    ) -> Result<Self> {
        let (cert, key) = throwaway_cert(dir)?;
        let common = format!(
            "foreground = yes\npid =\ndebug = 4\nsocket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n\
             [bench]\ncert = {cert}\nkey = {key}\nCAfile = {cert}\nverifyPeer = yes\n\
             sslVersionMin = TLSv1.3\n",
            cert = cert.display(),
            key = key.display()
        );
        let server_conf = dir.join("stunnel-server.conf");
        std::fs::write(
            &server_conf,
            format!("{common}accept = 0.0.0.0:{port}\nconnect = 127.0.0.1:{target}\n"),
        )?;
        let client_conf = dir.join("stunnel-client.conf");
        let server_addr = server_pod.addr(port);
        std::fs::write(
            &client_conf,
            format!("{common}client = yes\naccept = 127.0.0.1:{port}\nconnect = {server_addr}\n"),
        )?;
        let server = server_pod.spawn(stunnel_cmd(&server_conf), "stunnel-server")?;
        let client = client_pod.spawn(stunnel_cmd(&client_conf), "stunnel-client")?;
        let tunnel = Stunnel {
            client,
            server,
            entry: SocketAddrV4::new([127, 0, 0, 1].into(), port).into(),
        };
        // Quiet logs (a line per connection would cost stunnel time): wait until both ends
        // accept a TCP connection instead.
        for (pod, addr) in [
            (server_pod, SocketAddr::from(server_addr)),
            (client_pod, tunnel.entry),
        ] {
            eventually(Duration::from_secs(10), || {
                crate::sys::in_netns(&pod.netns_path(), move || {
                    TcpStream::connect_timeout(&addr, Duration::from_millis(200))
                        .with_context(|| format!("stunnel at {addr} does not accept yet"))
                })
            })
            .with_context(|| {
                format!(
                    "stunnel: server output:\n{}\nclient output:\n{}",
                    tunnel.server.output(),
                    tunnel.client.output()
                )
            })?;
        }
        Ok(tunnel)
    }

    /// Where the client connects (inside the client pod).
    pub fn entry(&self) -> SocketAddr {
        self.entry
    }
}

fn stunnel_cmd(conf: &Path) -> Command {
    let program = if crate::sys::on_path("stunnel4") {
        "stunnel4"
    } else {
        "stunnel"
    };
    let mut cmd = Command::new(program);
    cmd.arg(conf);
    cmd
}

/// A self-signed ECDSA P-256 certificate, valid one day: `(cert.pem, key.pem)` in `dir`.
fn throwaway_cert(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let cert = dir.join("bench-cert.pem");
    let key = dir.join("bench-key.pem");
    crate::sys::run(
        Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=weft-bench",
                "-keyout",
            ])
            .arg(&key)
            .arg("-out")
            .arg(&cert),
    )
    .context("generate the stunnel certificate (is openssl installed?)")?;
    Ok((cert, key))
}

/// How many file descriptors `pid` holds (`/proc/<pid>/fd`).
pub fn fd_count(pid: u32) -> Result<usize> {
    let dir = format!("/proc/{pid}/fd");
    Ok(std::fs::read_dir(&dir)
        .with_context(|| format!("read {dir}"))?
        .count())
}

/// CPU time (user + system) a process has used so far, in seconds.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("read /proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces: count fields after its closing paren.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed /proc/<pid>/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat(5); `rest` starts at field 3.
    let ticks = |i: usize| -> Result<f64> {
        Ok(fields
            .get(i - 3)
            .context("short /proc/<pid>/stat")?
            .parse::<f64>()?)
    };
    Ok((ticks(14)? + ticks(15)?) / clock_ticks_per_second())
}

/// A `Vm*` line of `/proc/<pid>/status` (`VmHWM`, `VmRSS`), in bytes.
pub fn status_bytes(pid: u32, field: &str) -> Result<u64> {
    proc_kib_field(pid, "status", field)
}

/// A line of `/proc/<pid>/smaps_rollup` (`Rss`, `Anonymous`, `Private_Dirty`…), in bytes.
pub fn smaps_bytes(pid: u32, field: &str) -> Result<u64> {
    proc_kib_field(pid, "smaps_rollup", field)
}

/// `field:   N kB` of `/proc/<pid>/<file>`, in bytes.
fn proc_kib_field(pid: u32, file: &str, field: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/{file}");
    let text = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .with_context(|| format!("no {field} in {path}"))?;
    let kib: u64 = line
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .with_context(|| format!("bad {field} line {line:?}"))?;
    Ok(kib * 1024)
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf(3) has no memory-safety preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

fn wait_for_output(process: &TestProcess, needle: &str, timeout: Duration) -> Result<()> {
    eventually(timeout, || {
        let out = process.output();
        if out.contains(needle) {
            Ok(())
        } else {
            bail!(
                "{} has not printed {needle:?} yet; output:\n{out}",
                process.name()
            )
        }
    })
}

/// The `weft-bench` binary: `$WEFT_BENCH`, else next to the running executable.
pub fn bench_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("WEFT_BENCH") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join("weft-bench"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("weft-bench"))
}
