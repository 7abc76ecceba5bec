//! `cargo xtask image`: weft's runtime image, built here without Docker Hub. The root is a
//! Debian 12 minbase made by mmdebstrap from the Debian archive with the runtime packages
//! (the Dockerfile's runtime stage installs the same ones); buildah adds the release binary,
//! sets the user, entrypoint and labels, and writes an OCI archive that `docker load`,
//! `podman load` and `skopeo copy` accept.
//!
//! Reproducible: every timestamp is the commit's time (`SOURCE_DATE_EPOCH`), so one commit
//! gives one digest for as long as the Debian archive serves the same package versions
//! (point `--debian-mirror` at snapshot.debian.org to pin those too).

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail};

use crate::{
    cargo::{self, cargo},
    setup,
};

#[derive(clap::Args)]
pub struct Args {
    /// Where to write the OCI archive (default: target/image/weft-<version>.oci.tar).
    #[arg(long)]
    out: Option<PathBuf>,
    /// The image's version label (default: the agent crate's version).
    #[arg(long)]
    version: Option<String>,
    /// The Debian archive to build the root from.
    #[arg(long, default_value = DEBIAN_MIRROR)]
    debian_mirror: String,
}

/// What to build.
pub struct Options {
    pub out: PathBuf,
    pub version: String,
}

/// A built image.
pub struct Image {
    pub path: PathBuf,
    /// The manifest digest (`sha256:…`), as registries will know it.
    pub digest: String,
    pub size: u64,
    pub seconds: f64,
}

pub fn run(args: &Args) -> Result<()> {
    let version = args.version.clone().unwrap_or_else(crate_version);
    let out = match &args.out {
        Some(out) => out.clone(),
        None => cargo::target_dir()?
            .join("image")
            .join(format!("weft-{version}.oci.tar")),
    };
    let image = build_from(&Options { out, version }, &args.debian_mirror)?;
    println!(
        "image: {} ({:.1} MB, {}) in {:.0} s",
        image.path.display(),
        image.size as f64 / 1e6,
        image.digest,
        image.seconds
    );
    Ok(())
}

/// Builds the release image from the default Debian archive.
pub fn build(options: &Options) -> Result<Image> {
    build_from(options, DEBIAN_MIRROR)
}

/// The image the end-to-end smoke tests run: the same recipe around the debug agent that
/// the other tests run (no release build in `cargo xtask test`), on a root reused while its
/// recipe is unchanged.
pub fn build_for_tests(agent: &Path) -> Result<Image> {
    let work = cargo::target_dir()?.join("image");
    let epoch = commit_time()?;
    let root = cached_root(&work, DEBIAN_MIRROR, &epoch)?;
    assemble(
        &Options {
            out: work.join("weft-test.oci.tar"),
            version: crate_version(),
        },
        agent,
        &root,
        &epoch,
        Instant::now(),
    )
}

fn build_from(options: &Options, mirror: &str) -> Result<Image> {
    setup::ensure()?;
    let started = Instant::now();
    cargo::run(cargo().args(["build", "--release", "--locked", "-p", "weft"]))?;
    let target = cargo::target_dir()?;
    let binary = target.join("release/weft");
    let epoch = commit_time()?;
    let work = target.join("image");
    fs::create_dir_all(&work).with_context(|| format!("create {}", work.display()))?;
    let rootfs = work.join("rootfs.tar");
    debian_root(&rootfs, mirror, &epoch)?;
    assemble(options, &binary, &rootfs, &epoch, started)
}

/// A Debian root with the runtime packages, as a tar whose timestamps are `epoch`.
fn debian_root(rootfs: &Path, mirror: &str, epoch: &str) -> Result<()> {
    cargo::run(
        // A mirror that stalls must not hang `cargo xtask test` until CI's limit: the
        // download takes about 20 s here; after ROOT_TIMEOUT, TERM, then KILL.
        Command::new("timeout")
            .args(["--kill-after=10s", ROOT_TIMEOUT, "mmdebstrap"])
            .args(["--quiet", "--variant=minbase", "--format=tar"])
            .arg(format!("--include={}", PACKAGES.join(",")))
            // What debian:bookworm-slim leaves out, and what an image never needs.
            .args(
                DPKG_EXCLUDES
                    .iter()
                    .map(|p| format!("--dpkgopt=path-exclude={p}")),
            )
            .arg(r#"--customize-hook=rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*"#)
            .arg(SUITE)
            .arg(rootfs)
            .args(sources(mirror))
            .env("SOURCE_DATE_EPOCH", epoch),
    )
}

/// The test image's root: built once, then reused while the recipe (packages, excludes,
/// sources) is the same; a day old, it is built again to pick up security fixes.
fn cached_root(work: &Path, mirror: &str, epoch: &str) -> Result<PathBuf> {
    fs::create_dir_all(work).with_context(|| format!("create {}", work.display()))?;
    let rootfs = work.join("rootfs-test.tar");
    let stamp = work.join("rootfs-test.recipe");
    let recipe = format!("{PACKAGES:?} {DPKG_EXCLUDES:?} {:?}", sources(mirror));
    let fresh = fs::read_to_string(&stamp).is_ok_and(|s| s == recipe)
        && fs::metadata(&rootfs)
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().is_ok_and(|age| age < ROOT_MAX_AGE));
    if !fresh {
        debian_root(&rootfs, mirror, epoch)?;
        fs::write(&stamp, recipe).with_context(|| format!("write {}", stamp.display()))?;
    }
    Ok(rootfs)
}

/// The root, the binary and the config: one OCI archive.
fn assemble(
    options: &Options,
    binary: &Path,
    rootfs: &Path,
    epoch: &str,
    started: Instant,
) -> Result<Image> {
    if let Some(parent) = options.out.parent() {
        fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
    }
    let container = Container::new()?;
    buildah(&["add", "--quiet", &container.0, path_str(rootfs)?, "/"])?;
    buildah(&[
        "copy",
        "--quiet",
        "--chmod",
        "0755",
        &container.0,
        path_str(binary)?,
        BINARY,
    ])?;
    let mut config = vec![
        "config".to_owned(),
        format!("--user={USER}"),
        format!("--entrypoint=[\"{BINARY}\"]"),
        "--cmd=--help".to_owned(),
        "--workingdir=/".to_owned(),
    ];
    for (key, value) in labels(&options.version, &revision()?, epoch) {
        config.push(format!("--label={key}={value}"));
    }
    config.push(container.0.clone());
    buildah(&config.iter().map(String::as_str).collect::<Vec<_>>())?;
    // Compressed layer, and every timestamp (created, history, files) the commit's.
    let _ = fs::remove_file(&options.out);
    buildah(&[
        "commit",
        "--quiet",
        "--format=oci",
        "--disable-compression=false",
        "--timestamp",
        epoch,
        &container.0,
        // Named in the archive's index (`org.opencontainers.image.ref.name`), so that
        // `docker load` and `podman load` give `weft:<version>`; the digest is unchanged.
        &format!(
            "oci-archive:{}:weft:{}",
            path_str(&options.out)?,
            options.version
        ),
    ])?;
    drop(container);

    let digest = manifest_digest(&options.out)?;
    let size = fs::metadata(&options.out)
        .with_context(|| format!("stat {}", options.out.display()))?
        .len();
    Ok(Image {
        path: options.out.clone(),
        digest,
        size,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The version of the `weft` crate (agent/Cargo.toml): what `weft --version` prints.
pub fn crate_version() -> String {
    AGENT_MANIFEST
        .lines()
        .find_map(|line| line.strip_prefix("version = \""))
        .and_then(|rest| rest.strip_suffix('"'))
        .expect("agent/Cargo.toml has a version line")
        .to_owned()
}

/// The `org.opencontainers.image.*` labels.
fn labels(version: &str, revision: &str, epoch: &str) -> Vec<(&'static str, String)> {
    vec![
        ("org.opencontainers.image.title", "weft".to_owned()),
        (
            "org.opencontainers.image.description",
            "weft: a sidecarless service mesh (agent, waypoint, CA, CNI plugin)".to_owned(),
        ),
        ("org.opencontainers.image.version", version.to_owned()),
        ("org.opencontainers.image.revision", revision.to_owned()),
        ("org.opencontainers.image.source", SOURCE.to_owned()),
        ("org.opencontainers.image.licenses", LICENSES.to_owned()),
        ("org.opencontainers.image.created", rfc3339(epoch)),
    ]
}

/// The apt sources of the root: the release, its updates and its security fixes.
fn sources(mirror: &str) -> Vec<String> {
    let security = mirror.replace("/debian", "/debian-security");
    vec![
        format!("deb {mirror} {SUITE} main"),
        format!("deb {mirror} {SUITE}-updates main"),
        format!("deb {security} {SUITE}-security main"),
    ]
}

/// A buildah working container, removed on drop (also when the build fails).
struct Container(String);

impl Container {
    fn new() -> Result<Self> {
        let output = Command::new("buildah")
            // Named per process: two builds at once never share a working container.
            .args(["from", "--quiet", "--name"])
            .arg(format!("weft-image-{}", std::process::id()))
            .arg("scratch")
            .output()
            .context("run buildah (cargo xtask setup installs it)")?;
        if !output.status.success() {
            bail!(
                "buildah from scratch failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(Self(
            String::from_utf8_lossy(&output.stdout).trim().to_owned(),
        ))
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("buildah")
            .args(["rm", &self.0])
            .stdout(std::process::Stdio::null())
            .status();
    }
}

fn buildah(args: &[&str]) -> Result<()> {
    cargo::run(Command::new("buildah").args(args))
}

/// The manifest digest of an OCI archive, read with skopeo.
fn manifest_digest(archive: &Path) -> Result<String> {
    let output = cargo::output(Command::new("skopeo").args([
        "inspect",
        "--format",
        "{{.Digest}}",
        &format!("oci-archive:{}", path_str(archive)?),
    ]))
    .context("skopeo inspect of the image archive failed")?;
    Ok(output.trim().to_owned())
}

/// The commit's time, seconds since the epoch: the image's every timestamp.
fn commit_time() -> Result<String> {
    git(&["log", "-1", "--format=%ct"])
}

/// The commit, with `-dirty` when tracked files differ from it: such an image is not the
/// commit's, and its label must not say it is.
pub fn revision() -> Result<String> {
    let commit = git(&["rev-parse", "HEAD"])?;
    let changed = git(&["status", "--porcelain", "--untracked-files=no"])?;
    Ok(if changed.is_empty() {
        commit
    } else {
        format!("{commit}-dirty")
    })
}

fn git(args: &[&str]) -> Result<String> {
    let output = cargo::output(Command::new("git").args(args).current_dir(cargo::root()))
        .with_context(|| format!("git {} failed (is this a git checkout?)", args.join(" ")))?;
    Ok(output.trim().to_owned())
}

/// `1700000000` → `2023-11-14T22:13:20Z`.
fn rfc3339(epoch: &str) -> String {
    let secs: i64 = epoch.parse().unwrap_or(0);
    let (days, rest) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3_600,
        rest % 3_600 / 60,
        rest % 60
    )
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))
}

/// The runtime packages: glibc comes with minbase; CA certificates for the API server's
/// chain; bpftool for `kubectl exec … -- bpftool map dump pinned …` (docs/kubernetes.md).
/// The Dockerfile's runtime stage installs the same (a test compares the two).
pub const PACKAGES: &[&str] = &["ca-certificates", "bpftool"];
/// Non-root by default; the chart runs the agent and the CNI installer as root and the CA
/// as this user.
pub const USER: &str = "65532:65532";
pub const BINARY: &str = "/usr/local/bin/weft";
const SUITE: &str = "bookworm";
/// For `timeout(1)`: how long building the Debian root may take.
const ROOT_TIMEOUT: &str = "10m";
const ROOT_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
const AGENT_MANIFEST: &str = include_str!("../../agent/Cargo.toml");
const DEBIAN_MIRROR: &str = "http://deb.debian.org/debian";
const SOURCE: &str = "https://weft.dev/weft";
/// User space Apache-2.0; the eBPF programs GPL-2.0 or MIT (LICENSE-*).
const LICENSES: &str = "Apache-2.0 AND (GPL-2.0-only OR MIT)";
const DPKG_EXCLUDES: &[&str] = &[
    "/usr/share/doc/*",
    "/usr/share/man/*",
    "/usr/share/info/*",
    "/usr/share/locale/*",
    "/usr/share/lintian/*",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dockerfile_builds_the_same_image() {
        let dockerfile = include_str!("../../Dockerfile");
        let runtime = dockerfile
            .rsplit_once("FROM debian:bookworm-slim")
            .expect("the Dockerfile's runtime stage is FROM debian:bookworm-slim")
            .1;
        let install = runtime
            .split("--no-install-recommends")
            .nth(1)
            .and_then(|rest| rest.split("&&").next())
            .expect("the runtime stage installs packages with apt-get");
        let mut packages: Vec<&str> = install
            .split_whitespace()
            .filter(|word| *word != "\\")
            .collect();
        packages.sort_unstable();
        let mut ours = PACKAGES.to_vec();
        ours.sort_unstable();
        assert_eq!(packages, ours, "same runtime packages");
        assert!(
            runtime.contains(&format!("\nUSER {USER}\n")),
            "same user: {USER}"
        );
        assert!(
            runtime.contains(&format!("COPY --from=build /out/weft {BINARY}")),
            "same binary path"
        );
        assert!(
            runtime.contains(&format!("ENTRYPOINT [\"{BINARY}\"]")),
            "same entrypoint"
        );
        assert!(runtime.contains("CMD [\"--help\"]"), "same default command");
    }

    #[test]
    fn the_version_is_the_agents() {
        assert!(AGENT_MANIFEST.contains(&format!("\nversion = \"{}\"\n", crate_version())));
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339("0"), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339("1700000000"), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339("951782400"), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn the_root_gets_security_fixes() {
        assert_eq!(
            sources("http://deb.debian.org/debian"),
            [
                "deb http://deb.debian.org/debian bookworm main",
                "deb http://deb.debian.org/debian bookworm-updates main",
                "deb http://deb.debian.org/debian-security bookworm-security main",
            ]
        );
    }
}
