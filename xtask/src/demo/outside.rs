//! The world outside the demo's cluster, for sections 8 and 9: one network namespace
//! `<node 1's prefix>~outside`, neither a node nor a pod, linked to node 1 by a veth pair.
//! It is the internet behind node 1's default route (its hosts answer on addresses of
//! `192.0.2.0/24` on its loopback) and the client that calls the ingress gateway (from its
//! link address, which the cluster sees untranslated). Certificates come from a CA of the
//! demo's own, made with the `openssl` command (xtask builds the harness without its `jwt`
//! feature, which brings rcgen and aws-lc-sys).
//!
//! ```text
//!  pod 10.1.0.x ──br0── node 1 ──out0 203.0.113.1/24 ──── eth0 203.0.113.2/24── outside
//!                       default via 203.0.113.2             10.0.0.0/8 via 203.0.113.1
//!                                                           lo: 192.0.2.10, 192.0.2.20
//! ```
//!
//! The egress tests' `weft_tests::internet` and the gateway tests' outside client (branch
//! gwe2e) build the same, behind the harness's `jwt` feature; this is the smallest of it
//! the demo needs. `Drop` kills what runs there and deletes the namespace (the link goes
//! with it); it never panics.

use std::{
    fs::File,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use anyhow::{Context, Result, bail};
use weft_tests::{TestNode, sys};

/// The namespace outside the cluster, linked to one node. See the module docs.
pub struct Outside {
    netns: String,
    dir: PathBuf,
    servers: Vec<Child>,
}

impl Outside {
    /// Creates the namespace and its link to `node`, whose default route goes over it.
    pub fn new(node: &TestNode) -> Result<Self> {
        let prefix = node
            .netns_name()
            .rsplit_once('~')
            .map_or(node.netns_name(), |(prefix, _)| prefix);
        let outside = Outside {
            netns: format!("{prefix}~outside"),
            dir: node.dir().to_path_buf(),
            servers: Vec::new(),
        };
        let (ns, node_ns) = (outside.netns.as_str(), node.netns_name());
        sys::ip(&["netns", "add", ns])?;
        // From here on, an error drops `outside`, which deletes what was made.
        let node_addr = format!("{NODE_SIDE}/24");
        let far_addr = format!("{FAR_SIDE}/24");
        let (node_side, far_side) = (NODE_SIDE.to_string(), FAR_SIDE.to_string());
        for args in [
            vec!["-n", ns, "link", "set", "lo", "up"],
            vec![
                "-n", node_ns, "link", "add", NODE_LINK, "type", "veth", "peer", "name", FAR_LINK,
                "netns", ns,
            ],
            vec!["-n", node_ns, "addr", "add", &node_addr, "dev", NODE_LINK],
            vec!["-n", node_ns, "link", "set", NODE_LINK, "up"],
            vec!["-n", ns, "addr", "add", &far_addr, "dev", FAR_LINK],
            vec!["-n", ns, "link", "set", FAR_LINK, "up"],
            vec!["-n", node_ns, "route", "add", "default", "via", &far_side],
            vec!["-n", ns, "route", "add", "10.0.0.0/8", "via", &node_side],
        ] {
            sys::ip(&args)?;
        }
        sys::in_netns(&node.netns_path(), || {
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").context("enable ip_forward")
        })?;
        Ok(outside)
    }

    /// The address clients out here call from.
    pub fn client_ip(&self) -> Ipv4Addr {
        FAR_SIDE
    }

    /// Adds `ip/32` to the loopback: a host of the internet.
    pub fn add_host_address(&self, ip: Ipv4Addr) -> Result<()> {
        let addr = format!("{ip}/32");
        sys::ip(&["-n", &self.netns, "addr", "add", &addr, "dev", "lo"]).map(drop)
    }

    /// Starts `program args` out here in the background, its output to `<dir>/<name>.out`
    /// (returned); it runs until the namespace is dropped.
    pub fn serve(&mut self, name: &str, program: &Path, args: &[&str]) -> Result<PathBuf> {
        let out = self.dir.join(format!("outside-{name}.out"));
        let file = File::create(&out).with_context(|| format!("create {}", out.display()))?;
        let child = self
            .exec(program.as_os_str(), args)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("start {} out of the cluster", program.display()))?;
        self.servers.push(child);
        Ok(out)
    }

    /// Runs `program args` out here to completion with `stdin`: its stdout and stderr.
    pub fn run(&self, program: &str, args: &[&str], stdin: &str) -> Result<String> {
        let mut cmd = self.exec(program.as_ref(), args);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().with_context(|| format!("start {program}"))?;
        if let Some(mut input) = child.stdin.take() {
            use std::io::Write;
            input.write_all(stdin.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        Ok(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }

    fn exec(&self, program: &std::ffi::OsStr, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns])
            .arg(program)
            .args(args);
        cmd
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        for child in &mut self.servers {
            let _ = child.kill();
            let _ = child.wait();
        }
        if !sys::netns_path(&self.netns).exists() {
            return;
        }
        if let Ok(pids) = sys::ip(&["netns", "pids", &self.netns]) {
            for pid in pids.split_whitespace().filter_map(|p| p.parse().ok()) {
                sys::kill(pid, SIGKILL);
            }
        }
        if let Err(e) = sys::ip(&["netns", "delete", &self.netns]) {
            eprintln!("demo: cleanup: {e:#}");
        }
    }
}

/// A CA of the demo's own (ECDSA P-256, a day), made with `openssl`, and the server
/// certificates it signs.
pub struct DemoCa {
    cert: PathBuf,
    key: PathBuf,
    dir: PathBuf,
}

/// A server certificate and its key, PEM.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl DemoCa {
    /// A CA named `name`, its files in `dir`.
    pub fn new(dir: &Path, name: &str) -> Result<Self> {
        let ca = DemoCa {
            cert: dir.join("demo-ca.pem"),
            key: dir.join("demo-ca-key.pem"),
            dir: dir.to_path_buf(),
        };
        let subject = format!("/CN={name}");
        openssl(
            Command::new("openssl")
                .args(["req", "-x509", "-nodes", "-days", "1", "-subj", &subject])
                .args(EC_KEY)
                .args(["-addext", "basicConstraints=critical,CA:TRUE"])
                .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"])
                .arg("-keyout")
                .arg(&ca.key)
                .arg("-out")
                .arg(&ca.cert),
        )?;
        Ok(ca)
    }

    /// The CA's certificate (what clients trust).
    pub fn cert_path(&self) -> &Path {
        &self.cert
    }

    pub fn cert_pem(&self) -> Result<String> {
        read(&self.cert)
    }

    /// A server certificate for the DNS name `host` (subject CN and SAN).
    pub fn issue(&self, host: &str) -> Result<Issued> {
        let (key, csr, cert, ext) = (
            self.dir.join(format!("{host}-key.pem")),
            self.dir.join(format!("{host}.csr")),
            self.dir.join(format!("{host}.pem")),
            self.dir.join(format!("{host}.ext")),
        );
        std::fs::write(
            &ext,
            format!(
                "subjectAltName=DNS:{host}\nextendedKeyUsage=serverAuth\n\
                 basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
            ),
        )?;
        openssl(
            Command::new("openssl")
                .args(["req", "-new", "-nodes", "-subj", &format!("/CN={host}")])
                .args(EC_KEY)
                .arg("-keyout")
                .arg(&key)
                .arg("-out")
                .arg(&csr),
        )?;
        openssl(
            Command::new("openssl")
                .args(["x509", "-req", "-days", "1", "-set_serial", "2", "-in"])
                .arg(&csr)
                .arg("-CA")
                .arg(&self.cert)
                .arg("-CAkey")
                .arg(&self.key)
                .arg("-extfile")
                .arg(&ext)
                .arg("-out")
                .arg(&cert),
        )?;
        Ok(Issued {
            cert_pem: read(&cert)?,
            key_pem: read(&key)?,
            cert,
            key,
        })
    }
}

/// The subject, DNS SANs and issuer of the first certificate in `pem` (`openssl x509`).
pub fn describe_certificate(pem: &str) -> Result<String> {
    let mut child = Command::new("openssl")
        .args([
            "x509",
            "-noout",
            "-subject",
            "-issuer",
            "-ext",
            "subjectAltName",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("start openssl x509")?;
    if let Some(mut input) = child.stdin.take() {
        use std::io::Write;
        input.write_all(pem.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("openssl x509: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // `subject=CN = …`, `issuer=CN = …` and the SAN line `DNS:a, DNS:b`.
    let find = |prefix: &str| {
        text.lines()
            .map(str::trim)
            .find(|l| l.starts_with(prefix))
            .unwrap_or("?")
            .to_owned()
    };
    let (subject, issuer) = (find("subject="), find("issuer="));
    Ok(format!(
        "subject {}, SAN {}, issuer {}",
        subject.trim_start_matches("subject="),
        find("DNS:"),
        issuer.trim_start_matches("issuer=")
    ))
}

fn openssl(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .output()
        .context("run openssl (is it installed? `cargo xtask setup`)")?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            sys::show(cmd),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))
}

const SIGKILL: i32 = 9;
const EC_KEY: [&str; 4] = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"];
const NODE_LINK: &str = "out0";
const FAR_LINK: &str = "eth0";
/// Node 1's end of the link (TEST-NET-3).
const NODE_SIDE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// The outside's end: the node's default gateway, and the outside client's address.
const FAR_SIDE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
