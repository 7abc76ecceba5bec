//! A real DNS server for tests: dnsmasq on 127.0.0.1 at a free port, answering the names
//! of a hosts file the test writes (and rewrites: `set` re-reads it, as SIGHUP makes
//! dnsmasq do) with a fixed TTL. Any other name under `.test` is NXDOMAIN. The process is
//! killed when the fixture is dropped, also when a test panics.

use std::{
    fs,
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use nix::{sys::signal, unistd::Pid};
use tempfile::TempDir;

/// A running dnsmasq (or a stopped one: `stop`, `restart`).
pub struct Dnsmasq {
    child: Option<Child>,
    addr: SocketAddr,
    ttl: u32,
    dir: TempDir,
}

impl Dnsmasq {
    /// Starts dnsmasq answering `records` (name, address; a name may repeat) with `ttl`
    /// seconds. Panics (it is a test fixture) with dnsmasq's own log if it cannot start.
    pub fn start(records: &[(&str, IpAddr)], ttl: u32) -> Self {
        let mut last_log = String::new();
        // A free port may be taken between our probe and dnsmasq's bind: try a few.
        for _ in 0..5 {
            let mut dnsmasq = Self {
                child: None,
                addr: SocketAddr::from(([127, 0, 0, 1], free_port())),
                ttl,
                dir: tempfile::tempdir().expect("temp dir for dnsmasq"),
            };
            dnsmasq.write_hosts(records);
            match dnsmasq.spawn() {
                Ok(()) => return dnsmasq,
                Err(log) => last_log = log,
            }
        }
        panic!("dnsmasq did not start: {last_log}");
    }

    /// Where it listens (UDP and TCP).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Replaces the records and tells dnsmasq to re-read them (SIGHUP, which also clears its
    /// cache). It does so soon after, not before this returns: callers poll for the change.
    pub fn set(&self, records: &[(&str, IpAddr)]) {
        self.write_hosts(records);
        if let Some(child) = &self.child {
            let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid fits i32"));
            signal::kill(pid, signal::Signal::SIGHUP).expect("SIGHUP dnsmasq");
        }
    }

    /// Stops the server: queries then go unanswered (the port is closed).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port with the current records.
    pub fn restart(&mut self) {
        self.stop();
        if let Err(log) = self.spawn() {
            panic!("dnsmasq did not restart: {log}");
        }
    }

    fn hosts_file(&self) -> PathBuf {
        self.dir.path().join("hosts")
    }

    fn log_file(&self) -> PathBuf {
        self.dir.path().join("log")
    }

    fn write_hosts(&self, records: &[(&str, IpAddr)]) {
        let text: String = records
            .iter()
            .map(|(name, ip)| format!("{ip} {name}\n"))
            .collect();
        // Whole or not at all: dnsmasq may read it at any time.
        let next = self.dir.path().join("hosts.next");
        fs::write(&next, text).expect("write dnsmasq hosts");
        fs::rename(&next, self.hosts_file()).expect("replace dnsmasq hosts");
    }

    /// Runs dnsmasq and waits until it accepts connections; on failure, its log.
    fn spawn(&mut self) -> Result<(), String> {
        let log = fs::File::create(self.log_file()).expect("dnsmasq log file");
        let mut command = Command::new(DNSMASQ);
        command
            .arg("--no-daemon")
            .arg("--keep-in-foreground")
            .arg("--conf-file=/dev/null")
            .arg("--no-resolv")
            .arg("--no-hosts")
            .arg("--listen-address=127.0.0.1")
            .arg("--bind-interfaces")
            .arg(format!("--port={}", self.addr.port()))
            .arg(format!("--addn-hosts={}", self.hosts_file().display()))
            .arg(format!("--local-ttl={}", self.ttl))
            // Unknown names under .test are NXDOMAIN, not REFUSED (there is no upstream).
            .arg("--local=/test/")
            .arg(format!(
                "--pid-file={}",
                self.dir.path().join("pid").display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // As root dnsmasq drops to `nobody`, who cannot read the temp dir.
        if nix::unistd::geteuid().is_root() {
            command.arg("--user=root");
        }
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot run {DNSMASQ}: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("exited with {status}: {}", self.log()));
            }
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(100)).is_ok() {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("not listening after 5s: {}", self.log()));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(self.log_file()).unwrap_or_default()
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A port free for both UDP and TCP on 127.0.0.1 right now.
fn free_port() -> u16 {
    loop {
        let udp = UdpSocket::bind("127.0.0.1:0").expect("bind a UDP port");
        let port = udp.local_addr().expect("UDP port").port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

const DNSMASQ: &str = "/usr/sbin/dnsmasq";
