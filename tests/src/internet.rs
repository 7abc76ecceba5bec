//! `Internet`: hosts outside the cluster, for the egress tests (external services,
//! `REGISTRY_ONLY`, TLS origination): a network namespace `weft-<test>-<pid>~internet` that
//! is neither a node nor enrolled (an [`Outside`]), reached from a node the way a real node
//! reaches the internet: through its default route.
//!
//! ```text
//!  pod 10.1.0.2 ──br0── node netns ──inet0 198.51.100.1 ─── eth0 198.51.100.254── internet netns
//!                       default via 198.51.100.254              10.0.0.0/8 via 198.51.100.1
//!                                                               lo: 192.0.2.53 (dnsmasq)
//!                                                                   192.0.2.10 api.example.test:443
//!                                                                   192.0.2.20 other.example.test:443 …
//! ```
//!
//! Nothing is translated on the way: a host sees the pod's (or the proxy's) own address.
//! In the internet netns run:
//! - a real `dnsmasq` on [`DNS_IP`]:53 answering from a hosts file ([`Internet::set_record`]
//!   rewrites it and sends SIGHUP), with a TTL of the test's choice; the agent is pointed at
//!   it with [`Internet::serve_dns_to`] (`WEFT_RESOLV_CONF`, a resolv.conf naming it);
//! - HTTPS hosts ([`Internet::https_host`]: `weft-testapp https-serve` bound to one address,
//!   with a certificate for its DNS name signed by the internet's CA, [`Internet::ca_pem`]),
//!   each recording every TCP connection, the SNI of every ClientHello and every failed
//!   handshake ([`HttpsHost`]);
//! - plain TCP echo hosts ([`Internet::echo_host`]: `weft-testapp serve`).
//!
//! [`ExternalService`] renders the `externalServices:` items of the agent config (see
//! `TestNode::set_external_services`; the mesh's mode is `TestNode::set_outbound_mode`).
//!
//! `Drop` kills every process in the namespace and deletes it (the link to the node goes
//! with it); it never panics. Output files live in the node's directory (kept when a test
//! fails).

use std::{
    cell::RefCell,
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};

use crate::{
    app::{self, testapp_bin},
    eventually::{eventually, scaled},
    jwt::ServedFile,
    l7::parse_events,
    node::TestNode,
    outside::{Link, Outside},
    pod::TestPod,
    process::{Spawn, TestProcess},
    sys,
    tls::{self, San, TestCa},
    wire::Capture,
};

/// The internet of one test, attached to one node. See the module docs.
pub struct Internet {
    outside: Outside,
    /// The node's netns (where lookups run) and directory (where files go).
    node_netns: PathBuf,
    dir: PathBuf,
    ca: TestCa,
    ca_file: PathBuf,
    ttl: Duration,
    hosts_file: PathBuf,
    records: RefCell<BTreeMap<String, Vec<Ipv4Addr>>>,
    addresses: RefCell<Vec<Ipv4Addr>>,
    dnsmasq: RefCell<Option<TestProcess>>,
}

/// An HTTPS host of the internet (`weft-testapp https-serve`), answering every request with
/// `{"host": "<its name>"}` and recording what it saw.
pub struct HttpsHost {
    pub process: TestProcess,
    pub host: String,
    pub addr: SocketAddr,
}

/// One item of the agent config's `externalServices:` (docs/egress.md).
#[derive(Clone, Debug)]
pub struct ExternalService {
    pub name: String,
    pub namespace: String,
    pub hosts: Vec<String>,
    /// `DNS` or `STATIC`.
    pub resolution: String,
    /// `STATIC` only.
    pub addresses: Vec<IpAddr>,
    pub ports: Vec<ExternalPort>,
}

/// One port of an [`ExternalService`].
#[derive(Clone, Debug)]
pub struct ExternalPort {
    pub number: u16,
    pub name: String,
    /// `TCP`, `TLS`, `HTTP` or `HTTPS`.
    pub protocol: String,
    pub target_port: Option<u16>,
    pub tls: Option<TlsOrigination>,
}

/// A port's `tls:` (the proxy originates TLS to the host).
#[derive(Clone, Debug, Default)]
pub struct TlsOrigination {
    pub sni: Option<String>,
    /// PEM.
    pub ca_certificates: Option<String>,
}

impl Internet {
    /// Creates the internet netns, links it to `node` as the node's default route, and
    /// starts dnsmasq answering with `ttl` (whole seconds) for [`API_HOST`] ([`API_IP`]) and
    /// [`OTHER_HOST`] ([`OTHER_IP`]). Waits until dnsmasq answers from the node.
    pub fn new(node: &TestNode, ttl: Duration) -> Result<Self> {
        let dir = node.dir().to_path_buf();
        let ca = TestCa::new("weft test internet CA")?;
        let ca_file = dir.join("internet-ca.pem");
        ca.write_pem(&ca_file)?;
        // On error what was created is dropped, which removes it.
        let outside = Outside::new(node, "internet", LINK)?;
        let internet = Internet {
            outside,
            node_netns: node.netns_path(),
            hosts_file: dir.join("internet-hosts"),
            dir,
            ca,
            ca_file,
            ttl,
            records: RefCell::new(BTreeMap::from([
                (API_HOST.to_owned(), vec![API_IP]),
                (OTHER_HOST.to_owned(), vec![OTHER_IP]),
            ])),
            addresses: RefCell::default(),
            dnsmasq: RefCell::default(),
        };
        internet.add_address(DNS_IP)?;
        internet.start_dns()?;
        Ok(internet)
    }

    fn start_dns(&self) -> Result<()> {
        self.write_hosts()?;
        let ttl = self.ttl.as_secs().max(1).to_string();
        let mut cmd = Command::new(DNSMASQ);
        cmd.args([
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--no-negcache",
            "--bind-interfaces",
            "--user=root",
            "--pid-file=",
            "--log-queries",
            "--log-facility=-",
            // The test's zone is answered here only: an unknown name in it is NXDOMAIN
            // (not REFUSED, as a name dnsmasq has no upstream for).
            "--local=/example.test/",
        ]);
        cmd.arg(format!("--listen-address={DNS_IP}"));
        cmd.arg(format!("--addn-hosts={}", self.hosts_file.display()));
        cmd.arg(format!("--local-ttl={ttl}"));
        let process = self.spawn(cmd, "dnsmasq")?;
        *self.dnsmasq.borrow_mut() = Some(process);
        let first = eventually(Duration::from_secs(10), || self.lookup(API_HOST));
        let answers = first.with_context(|| {
            format!(
                "dnsmasq does not answer on {DNS_IP}:53; its output:\n{}",
                self.dns_log()
            )
        })?;
        ensure!(
            answers.iter().map(|(ip, _)| *ip).eq([API_IP]),
            "dnsmasq answered {answers:?} for {API_HOST}"
        );
        Ok(())
    }

    /// The CA that signed every HTTPS host's certificate (PEM).
    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    /// The same, as a file (`weft-testapp https-get --ca`).
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    pub fn netns_name(&self) -> &str {
        self.outside.netns_name()
    }

    pub fn netns_path(&self) -> PathBuf {
        self.outside.netns_path()
    }

    /// Writes a resolv.conf naming the internet's DNS server into the node's directory and
    /// points the node's agent at it (`WEFT_RESOLV_CONF`, from its next start). Returns
    /// the file.
    pub fn serve_dns_to(&self, node: &TestNode) -> Result<PathBuf> {
        let path = node.dir().join("resolv.conf");
        std::fs::write(&path, self.resolv_conf())
            .with_context(|| format!("write {}", path.display()))?;
        node.set_agent_env(RESOLV_CONF_ENV, path.as_os_str());
        Ok(path)
    }

    /// resolv.conf text naming the internet's DNS server.
    pub fn resolv_conf(&self) -> String {
        format!("nameserver {DNS_IP}\noptions timeout:1 attempts:2\n")
    }

    /// Makes dnsmasq answer `ips` for `host` (none: the name is removed) from now on:
    /// rewrites its hosts file and sends SIGHUP, then waits until a lookup from the node
    /// sees the change.
    pub fn set_record(&self, host: &str, ips: &[Ipv4Addr]) -> Result<()> {
        {
            let mut records = self.records.borrow_mut();
            if ips.is_empty() {
                records.remove(host);
            } else {
                records.insert(host.to_owned(), ips.to_vec());
            }
        }
        self.write_hosts()?;
        let pid = self
            .dnsmasq
            .borrow()
            .as_ref()
            .and_then(TestProcess::pid)
            .context("dnsmasq is not running")?;
        sys::kill(pid, libc::SIGHUP);
        let mut want = ips.to_vec();
        want.sort();
        eventually(Duration::from_secs(10), || {
            let mut got: Vec<Ipv4Addr> = self.lookup(host)?.into_iter().map(|(ip, _)| ip).collect();
            got.sort();
            ensure!(
                got == want,
                "dnsmasq answers {got:?} for {host}, not yet {want:?}"
            );
            Ok(())
        })
    }

    /// Asks the internet's DNS server for `host`'s A records from the node's netns (where
    /// the agent resolves): (address, TTL in seconds) each; empty when the name is unknown.
    pub fn lookup(&self, host: &str) -> Result<Vec<(Ipv4Addr, u32)>> {
        let query = dns_query(host, QUERY_ID)?;
        let host = host.to_owned();
        sys::in_netns(&self.node_netns, move || {
            let socket = UdpSocket::bind("0.0.0.0:0").context("bind a UDP socket")?;
            socket.set_read_timeout(Some(scaled(Duration::from_secs(2))))?;
            socket
                .send_to(&query, (DNS_IP, 53))
                .with_context(|| format!("send a query for {host} to {DNS_IP}"))?;
            let mut buf = [0u8; 1500];
            let n = socket
                .recv(&mut buf)
                .with_context(|| format!("no answer for {host} from {DNS_IP}"))?;
            parse_answers(&buf[..n], QUERY_ID)
        })
    }

    /// dnsmasq's output (its query log).
    pub fn dns_log(&self) -> String {
        self.dnsmasq
            .borrow()
            .as_ref()
            .map(TestProcess::output)
            .unwrap_or_default()
    }

    /// Starts an HTTPS host for `host` on `ip:port` (the address is added to the internet),
    /// with a certificate for the name `host` signed by the internet's CA, and waits until
    /// it listens.
    pub fn https_host(&self, host: &str, ip: Ipv4Addr, port: u16) -> Result<HttpsHost> {
        self.add_address(ip)?;
        let stem = format!("https-{host}-{ip}");
        let files = self
            .ca
            .write_server(&self.dir, &stem, &San::Dns(host.to_owned()))?;
        let body = self.dir.join(format!("{stem}.json"));
        std::fs::write(&body, json!({ "host": host }).to_string())
            .with_context(|| format!("write {}", body.display()))?;
        let mut cmd = Command::new(testapp_bin());
        cmd.args(["https-serve", "--port", &port.to_string()])
            .args(["--bind", &ip.to_string()])
            .arg("--cert")
            .arg(&files.cert)
            .arg("--key")
            .arg(&files.key)
            .arg("--file")
            .arg(&body);
        let process = self.spawn(cmd, &stem)?;
        wait_listening(&process)?;
        Ok(HttpsHost {
            process,
            host: host.to_owned(),
            addr: SocketAddr::new(IpAddr::V4(ip), port),
        })
    }

    /// Starts a plain TCP echo host (`weft-testapp serve --mode echo`) on `ip:port` (the
    /// address is added to the internet) and waits until it listens.
    pub fn echo_host(&self, ip: Ipv4Addr, port: u16) -> Result<app::Server> {
        self.add_address(ip)?;
        let mut cmd = Command::new(testapp_bin());
        cmd.args(["serve", "--port", &port.to_string()]).args([
            "--bind",
            &ip.to_string(),
            "--mode",
            "echo",
        ]);
        let process = self.spawn(cmd, &format!("echo-{ip}-{port}"))?;
        wait_listening(&process)?;
        Ok(app::Server { process, port })
    }

    /// `weft-testapp https-get` from `pod` (its cgroup and netns: the mesh sees it) to
    /// `addr`, trusting the internet's CA and checking the certificate against `sni` (sent
    /// as SNI): the body of a 200; else an error carrying the app's `error stage=https
    /// kind=<io::ErrorKind> ...` line.
    pub fn https_get(
        &self,
        pod: &TestPod,
        addr: SocketAddr,
        sni: &str,
        path: &str,
    ) -> Result<String> {
        let mut cmd = Command::new(testapp_bin());
        cmd.args([
            "https-get",
            "--to",
            &addr.to_string(),
            "--sni",
            sni,
            "--path",
            path,
        ])
        .arg("--ca")
        .arg(&self.ca_file);
        let done = pod.run(cmd, "https-get", scaled(Duration::from_secs(30)))?;
        if !done.status.success() {
            bail!(
                "https-get {addr} ({sni}{path}) failed: {}",
                done.output.trim()
            );
        }
        let line = done
            .output
            .lines()
            .find_map(|l| l.strip_prefix("response "))
            .with_context(|| format!("https-get printed no response: {}", done.output))?;
        let response: Value = serde_json::from_str(line).context("https-get's response line")?;
        Ok(response["body"].as_str().unwrap_or_default().to_owned())
    }

    /// Captures on the internet's side of the link to the node (everything the node sends
    /// to, and receives from, the internet). Run as a process of `node`.
    pub fn capture(&self, node: &TestNode, filter: &str) -> Result<Capture> {
        self.outside.capture(node, filter)
    }

    /// Adds `ip/32` to the internet's loopback (a host's address), once.
    pub fn add_address(&self, ip: Ipv4Addr) -> Result<()> {
        if self.addresses.borrow().contains(&ip) {
            return Ok(());
        }
        self.outside.add_loopback_address(ip)?;
        self.addresses.borrow_mut().push(ip);
        Ok(())
    }

    fn write_hosts(&self) -> Result<()> {
        let text: String = self
            .records
            .borrow()
            .iter()
            .flat_map(|(host, ips)| ips.iter().map(move |ip| format!("{ip} {host}\n")))
            .collect();
        // Written whole then renamed: dnsmasq never reads half a file.
        let tmp = self.hosts_file.with_extension("tmp");
        std::fs::write(&tmp, text).with_context(|| format!("write {}", tmp.display()))?;
        std::fs::rename(&tmp, &self.hosts_file)
            .with_context(|| format!("rename to {}", self.hosts_file.display()))
    }

    /// Runs `cmd` in the internet's netns (outside every pod's cgroup).
    fn spawn(&self, cmd: Command, name: &str) -> Result<TestProcess> {
        self.outside.spawn(cmd, name)
    }
}

impl Drop for Internet {
    // Then `outside` deletes the namespace with whatever else runs there.
    fn drop(&mut self) {
        if let Some(mut dnsmasq) = self.dnsmasq.borrow_mut().take() {
            dnsmasq.kill();
        }
    }
}

impl HttpsHost {
    /// Every TCP connection accepted, before any TLS.
    pub fn accepted(&self) -> Vec<tls::Accepted> {
        parse_events(&self.process.output(), "accepted")
    }

    /// The TCP connections accepted from `ip` (a pod's address).
    pub fn accepted_from(&self, ip: Ipv4Addr) -> usize {
        self.accepted()
            .iter()
            .filter(|a| peer_ip(&a.peer) == Some(IpAddr::V4(ip)))
            .count()
    }

    /// Every ClientHello read.
    pub fn hellos(&self) -> Vec<tls::Hello> {
        parse_events(&self.process.output(), "hello")
    }

    /// Every failed handshake.
    pub fn tls_errors(&self) -> Vec<tls::TlsError> {
        parse_events(&self.process.output(), "tls_error")
    }

    /// Every request answered.
    pub fn served(&self) -> Vec<ServedFile> {
        parse_events(&self.process.output(), "fetch")
    }

    /// `host:port` of the name (what a client asks for), not the address.
    pub fn url(&self, path: &str) -> String {
        format!("https://{}:{}{path}", self.host, self.addr.port())
    }
}

impl ExternalService {
    /// A `DNS` external service `namespace/name` for `hosts`, without ports yet.
    pub fn dns(namespace: &str, name: &str, hosts: &[&str]) -> Self {
        ExternalService {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            hosts: hosts.iter().map(|h| (*h).to_owned()).collect(),
            resolution: "DNS".to_owned(),
            addresses: Vec::new(),
            ports: Vec::new(),
        }
    }

    /// A `STATIC` external service with these addresses, without ports yet.
    pub fn fixed(namespace: &str, name: &str, hosts: &[&str], addresses: &[IpAddr]) -> Self {
        ExternalService {
            resolution: "STATIC".to_owned(),
            addresses: addresses.to_vec(),
            ..Self::dns(namespace, name, hosts)
        }
    }

    /// Adds a port (`protocol`: `TCP`, `TLS`, `HTTP` or `HTTPS`) connected to as it is.
    pub fn port(mut self, number: u16, name: &str, protocol: &str) -> Self {
        self.ports.push(ExternalPort {
            number,
            name: name.to_owned(),
            protocol: protocol.to_owned(),
            target_port: None,
            tls: None,
        });
        self
    }

    /// Adds an `HTTP` port whose connections the proxy sends to `target_port` inside TLS
    /// it originates (`tls:`).
    pub fn port_with_tls(
        mut self,
        number: u16,
        name: &str,
        target_port: u16,
        tls: TlsOrigination,
    ) -> Self {
        self.ports.push(ExternalPort {
            number,
            name: name.to_owned(),
            protocol: "HTTP".to_owned(),
            target_port: Some(target_port),
            tls: Some(tls),
        });
        self
    }

    /// The config item (camelCase, as docs/egress.md writes it).
    pub fn to_config(&self) -> Value {
        let ports: Vec<Value> = self
            .ports
            .iter()
            .map(|p| {
                let mut port = json!({
                    "number": p.number, "name": p.name, "protocol": p.protocol,
                });
                if let Some(target) = p.target_port {
                    port["targetPort"] = json!(target);
                }
                if let Some(tls) = &p.tls {
                    let mut t = json!({});
                    if let Some(sni) = &tls.sni {
                        t["sni"] = json!(sni);
                    }
                    if let Some(ca) = &tls.ca_certificates {
                        t["caCertificates"] = json!(ca);
                    }
                    port["tls"] = t;
                }
                port
            })
            .collect();
        let mut item = json!({
            "name": self.name,
            "namespace": self.namespace,
            "hosts": self.hosts,
            "resolution": self.resolution,
            "ports": ports,
        });
        if !self.addresses.is_empty() {
            item["addresses"] = json!(
                self.addresses
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
            );
        }
        item
    }
}

/// The `externalServices:` list of these items.
pub fn external_services(items: &[&ExternalService]) -> Value {
    Value::Array(items.iter().map(|e| e.to_config()).collect())
}

fn wait_listening(process: &TestProcess) -> Result<()> {
    eventually(Duration::from_secs(10), || {
        ensure!(
            process.output().contains("listening "),
            "{} not listening yet: {}",
            process.name(),
            process.output()
        );
        Ok(())
    })
}

fn peer_ip(peer: &str) -> Option<IpAddr> {
    peer.parse::<SocketAddr>().ok().map(|a| a.ip())
}

/// A DNS query (RFC 1035 section 4) for `host`'s A records, recursion desired.
fn dns_query(host: &str, id: u16) -> Result<Vec<u8>> {
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    // Flags: RD. One question, no other records.
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in host.trim_end_matches('.').split('.') {
        let len = u8::try_from(label.len())
            .ok()
            .filter(|l| (1..64).contains(l))
            .with_context(|| format!("bad DNS label {label:?} in {host}"))?;
        q.push(len);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    // QTYPE A, QCLASS IN.
    q.extend_from_slice(&[0, 1, 0, 1]);
    Ok(q)
}

/// The A records of a DNS answer to query `id`: (address, TTL).
fn parse_answers(msg: &[u8], id: u16) -> Result<Vec<(Ipv4Addr, u32)>> {
    let be16 = |at: usize| -> Result<u16> {
        Ok(u16::from_be_bytes([
            *msg.get(at).context("short DNS message")?,
            *msg.get(at + 1).context("short DNS message")?,
        ]))
    };
    ensure!(be16(0)? == id, "an answer to another query");
    let flags = be16(2)?;
    ensure!(flags & 0x8000 != 0, "not a response");
    let rcode = flags & 0x000f;
    // NXDOMAIN: no such name, no records.
    if rcode == 3 {
        return Ok(Vec::new());
    }
    ensure!(rcode == 0, "DNS error rcode {rcode}");
    let (questions, answers) = (be16(4)?, be16(6)?);
    let mut at = 12;
    for _ in 0..questions {
        at = skip_name(msg, at)? + 4;
    }
    let mut out = Vec::new();
    for _ in 0..answers {
        at = skip_name(msg, at)?;
        let (rtype, rdlen) = (be16(at)?, usize::from(be16(at + 8)?));
        let ttl = (u32::from(be16(at + 4)?) << 16) | u32::from(be16(at + 6)?);
        let data = msg
            .get(at + 10..at + 10 + rdlen)
            .context("short DNS record")?;
        if rtype == 1
            && let [a, b, c, d] = *data
        {
            out.push((Ipv4Addr::new(a, b, c, d), ttl));
        }
        at += 10 + rdlen;
    }
    Ok(out)
}

/// The offset after the (possibly compressed) name at `at`.
fn skip_name(msg: &[u8], mut at: usize) -> Result<usize> {
    loop {
        let len = *msg.get(at).context("short DNS name")?;
        match len {
            0 => return Ok(at + 1),
            // A pointer ends the name.
            l if l & 0xc0 == 0xc0 => return Ok(at + 2),
            l => at += 1 + usize::from(l),
        }
    }
}

/// An external host with its own name and certificate.
pub const API_HOST: &str = "api.example.test";
pub const API_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
/// A second address for [`API_HOST`] (a re-resolution moves it there).
pub const API_IP2: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 11);
/// Another host, resolvable but (in the tests) never registered.
pub const OTHER_HOST: &str = "other.example.test";
pub const OTHER_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 20);
/// An address without a name (a bare-IP destination).
pub const BARE_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 30);
/// The internet's DNS server (dnsmasq, port 53).
pub const DNS_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 53);
/// The variable naming the agent's resolv.conf (`--resolv-conf`).
pub const RESOLV_CONF_ENV: &str = "WEFT_RESOLV_CONF";

const DNSMASQ: &str = "/usr/sbin/dnsmasq";
/// The link: `inet0` in the node, `eth0` in the internet, whose end is the node's default
/// gateway.
const LINK: Link = Link {
    node_end: "inet0",
    far_end: "eth0",
    node_ip: Ipv4Addr::new(198, 51, 100, 1),
    far_ip: Ipv4Addr::new(198, 51, 100, 254),
    default_route: true,
};
const QUERY_ID: u16 = 0x7e57;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_a_records_of_an_answer() {
        let mut msg = dns_query("api.example.test", 7).unwrap();
        // Response, RD+RA, one answer.
        msg[2] = 0x81;
        msg[3] = 0x80;
        msg[7] = 1;
        // Name: a pointer to the question's name at 12; A IN, TTL 2, 4 bytes.
        msg.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 2, 0, 4, 192, 0, 2, 10]);
        assert_eq!(
            parse_answers(&msg, 7).unwrap(),
            vec![(Ipv4Addr::new(192, 0, 2, 10), 2)]
        );
        assert!(parse_answers(&msg, 8).is_err(), "another query's answer");
        msg[3] = 0x83;
        assert_eq!(parse_answers(&msg, 7).unwrap(), vec![], "NXDOMAIN");
    }

    #[test]
    fn renders_external_services_as_the_config_writes_them() {
        let api = ExternalService::dns("egress", "api", &[API_HOST])
            .port(443, "https", "HTTPS")
            .port_with_tls(
                80,
                "http",
                443,
                TlsOrigination {
                    sni: None,
                    ca_certificates: Some("PEM".into()),
                },
            );
        assert_eq!(
            external_services(&[&api]),
            json!([{
                "name": "api", "namespace": "egress", "hosts": [API_HOST], "resolution": "DNS",
                "ports": [
                    { "number": 443, "name": "https", "protocol": "HTTPS" },
                    { "number": 80, "name": "http", "protocol": "HTTP", "targetPort": 443,
                      "tls": { "caCertificates": "PEM" } },
                ],
            }])
        );
        let db =
            ExternalService::fixed("egress", "db", &["db.example.test"], &[IpAddr::V4(API_IP)])
                .port(5432, "pg", "TCP");
        assert_eq!(db.to_config()["addresses"], json!(["192.0.2.10"]));
        assert_eq!(db.to_config()["resolution"], "STATIC");
    }
}
