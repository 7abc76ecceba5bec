//! Certificates for the world outside the demo's cluster (sections 8 and 9): a CA of the
//! demo's own and the server certificates it signs, made with the `openssl` command. xtask
//! builds the harness without its `jwt` feature (rcgen, aws-lc-sys), which is where
//! `weft_tests::tls::TestCa` lives.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};
use weft_tests::sys;

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

const EC_KEY: [&str; 4] = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"];
