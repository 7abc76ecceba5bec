//! `cargo xtask release`: the release artifacts in `dist/` (or `--out`), each named after the
//! release version (the `weft` package's version unless `--version` says otherwise):
//!
//! - `weft-<version>-<arch>-linux`: the release binary (`cargo build --release --locked`);
//!   the glibc it needs (its highest `GLIBC_x.y` symbol version) goes into the notes;
//! - `weft-<version>.tgz`: the Helm chart (`helm package`), chart version and appVersion set
//!   to the release version, so its default image tag is the release version;
//! - `weft-<version>-image.oci.tar`: the image as an OCI archive (`cargo xtask image`);
//! - `weft-<version>.cdx.json`: the binary's crates as a CycloneDX 1.5 SBOM ([`sbom`]);
//! - `release.json` (the manifest: what each file is) and `RELEASE.md` (the same for humans);
//! - `SHA256SUMS` over every other file, in `sha256sum -c` format.
//!
//! `--chart-only` packages just the chart (and the manifest and sums): the chart's test
//! (tests/tests/release.rs) uses it to check a release version apart from the crate's.

mod sbom;

use std::{
    fmt::Write as _,
    fs,
    io::Read as _,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use crate::cargo::{self, output};

#[derive(clap::Args)]
pub struct Options {
    /// Release version (SemVer); default: the version of the `weft` package (agent/Cargo.toml).
    #[arg(long)]
    version: Option<String>,
    /// Directory to write; default: `dist/` at the workspace root. Emptied first when it holds
    /// a previous release (a `release.json`); any other non-empty directory is refused.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Package only the Helm chart (no binary, image or SBOM).
    #[arg(long)]
    chart_only: bool,
}

/// `cargo xtask release`.
pub fn run(options: &Options) -> Result<()> {
    let started = Instant::now();
    let version = options
        .version
        .clone()
        .unwrap_or_else(crate::image::crate_version);
    check_version(&version)?;
    let out = options
        .out
        .clone()
        .unwrap_or_else(|| cargo::root().join("dist"));
    prepare_out(&out)?;
    println!("release {version} into {}", out.display());

    let mut manifest = json!({ "version": version, "revision": crate::image::revision()? });
    // Written first and again at the end: a release that fails halfway still marks `out` as
    // ours, so the next run may empty it.
    write_manifest(&out, &manifest)?;
    manifest["chart"] = json!(package_chart(&out, &version)?);
    if !options.chart_only {
        let (binary, glibc) = copy_binary(&out, &version)?;
        manifest["binary"] = json!({ "file": binary, "glibc": glibc });
        manifest["sbom"] = json!(write_sbom(&out, &version)?);
        let image_file = format!("weft-{version}-image.oci.tar");
        let image = crate::image::build(&crate::image::Options {
            out: out.join(&image_file),
            version: version.clone(),
        })?;
        manifest["image"] = json!({
            "file": file_name(&image.path)?,
            "digest": image.digest,
            "size": image.size,
            "build_seconds": image.seconds,
        });
    }
    write_manifest(&out, &manifest)?;
    write(&out.join("RELEASE.md"), &notes(&manifest))?;

    let files = listing(&out)?;
    let sums: Vec<(String, String)> = files
        .iter()
        .map(|name| Ok((name.clone(), sha256_file(&out.join(name))?)))
        .collect::<Result<_>>()?;
    write(&out.join(SUMS), &sha256sums(&sums))?;

    println!("\nrelease {version}: {}", out.display());
    for (name, sha256) in &sums {
        let size = fs::metadata(out.join(name))?.len();
        println!("  {name:<40} {size:>12}  {sha256}");
    }
    println!("  {SUMS:<40} {:>12}", fs::metadata(out.join(SUMS))?.len());
    if let Some(glibc) = manifest["binary"]["glibc"].as_str() {
        println!("  the binary needs glibc >= {glibc}");
    }
    println!("release: ok in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// The highest `GLIBC_x.y[.z]` symbol version in `objdump -T` (or `readelf --dyn-syms`)
/// output: the oldest glibc the binary runs on. None for a binary that needs no glibc.
pub fn highest_glibc(dynamic_symbols: &str) -> Option<String> {
    dynamic_symbols
        .split(|c: char| c.is_whitespace() || "()@".contains(c))
        .filter_map(|word| word.strip_prefix("GLIBC_"))
        // GLIBC_PRIVATE and the like are not versions.
        .filter_map(|v| {
            let parts: Option<Vec<u32>> = v.split('.').map(|n| n.parse().ok()).collect();
            parts.map(|p| (p, v))
        })
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, v)| v.to_string())
}

/// `sha256sum` output for `(file name, hex digest)` pairs: `<digest>  <name>` per line.
pub fn sha256sums(sums: &[(String, String)]) -> String {
    sums.iter()
        .map(|(name, sha256)| format!("{sha256}  {name}\n"))
        .collect()
}

/// The version names files and is Helm's chart version: SemVer, no path characters.
fn check_version(version: &str) -> Result<()> {
    let core = version.split(['-', '+']).next().unwrap_or_default();
    ensure!(
        core.split('.').count() == 3
            && core.split('.').all(|n| n.parse::<u64>().is_ok())
            && version
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || ".-+".contains(c)),
        "release version {version:?} is not SemVer (MAJOR.MINOR.PATCH[-pre][+build])"
    );
    Ok(())
}

fn prepare_out(out: &Path) -> Result<()> {
    if out.exists() {
        let empty = fs::read_dir(out)
            .with_context(|| format!("read {}", out.display()))?
            .next()
            .is_none();
        if !empty {
            // Only ever delete what a previous release wrote.
            ensure!(
                out.join(MANIFEST).is_file(),
                "{} is not empty and holds no previous release ({MANIFEST}): choose another \
                 --out",
                out.display()
            );
            fs::remove_dir_all(out).with_context(|| format!("remove {}", out.display()))?;
        }
    }
    fs::create_dir_all(out).with_context(|| format!("mkdir {}", out.display()))
}

fn package_chart(out: &Path, version: &str) -> Result<String> {
    let chart = cargo::root().join("deploy/helm/weft");
    cargo::run(
        Command::new("helm")
            .arg("package")
            .arg(&chart)
            .args(["--version", version, "--app-version", version])
            .arg("--destination")
            .arg(out),
    )?;
    let file = format!("weft-{version}.tgz");
    ensure!(
        out.join(&file).is_file(),
        "helm package did not write {file} into {}",
        out.display()
    );
    Ok(file)
}

/// Copies the release binary into `out`; returns its file name and the glibc it needs.
fn copy_binary(out: &Path, version: &str) -> Result<(String, Option<String>)> {
    cargo::run(cargo::cargo().args(["build", "--release", "--locked", "-p", PACKAGE]))?;
    let built = cargo::target_dir()?.join("release").join(PACKAGE);
    let file = format!("weft-{version}-{}-linux", std::env::consts::ARCH);
    fs::copy(&built, out.join(&file))
        .with_context(|| format!("copy {} into {}", built.display(), out.display()))?;
    let symbols = output(Command::new("objdump").arg("-T").arg(&built)).with_context(|| {
        format!(
            "`objdump -T {}` failed: is binutils installed (`cargo xtask setup`)?",
            built.display()
        )
    })?;
    let glibc = highest_glibc(&symbols);
    match &glibc {
        Some(v) => println!("release: {file} needs glibc >= {v}"),
        None => println!("release: {file} references no glibc symbol version"),
    }
    Ok((file, glibc))
}

fn write_sbom(out: &Path, version: &str) -> Result<String> {
    let target = host_target()?;
    let metadata = cargo::metadata(&["--locked", "--filter-platform", &target])?;
    let lock = fs::read_to_string(cargo::root().join("Cargo.lock")).context("read Cargo.lock")?;
    let sbom = sbom::cyclonedx(&metadata, &lock, PACKAGE, version, &target)?;
    let file = format!("weft-{version}.cdx.json");
    write(
        &out.join(&file),
        &format!("{}\n", serde_json::to_string_pretty(&sbom)?),
    )?;
    let count = sbom["components"].as_array().map_or(0, Vec::len);
    println!("release: {file}: {count} crates besides weft");
    Ok(file)
}

fn host_target() -> Result<String> {
    let verbose = output(Command::new("rustc").arg("-vV")).context("run rustc -vV")?;
    verbose
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_string)
        .context("rustc -vV printed no host line")
}

fn notes(manifest: &Value) -> String {
    let text = |v: &Value| v.as_str().unwrap_or("-").to_string();
    let mut notes = format!(
        "# weft {}\n\nBuilt by `cargo xtask release` from commit {}.\n\n",
        text(&manifest["version"]),
        text(&manifest["revision"])
    );
    let mut line = |what: &str, v: &Value, extra: String| {
        if !v.is_null() {
            let _ = writeln!(notes, "- {what}: `{}`{extra}", text(v));
        }
    };
    line(
        "binary",
        &manifest["binary"]["file"],
        match manifest["binary"]["glibc"].as_str() {
            Some(v) => format!(", needs glibc >= {v}"),
            None => String::new(),
        },
    );
    line(
        "Helm chart",
        &manifest["chart"],
        ", default image tag = the release version".to_string(),
    );
    line(
        "image (OCI archive)",
        &manifest["image"]["file"],
        format!(", digest `{}`", text(&manifest["image"]["digest"])),
    );
    line("SBOM (CycloneDX 1.5)", &manifest["sbom"], String::new());
    notes.push_str(
        "\nCheck the files with `sha256sum -c SHA256SUMS`; install as docs/kubernetes.md, \
         \"Installing from a release\", says.\n",
    );
    notes
}

/// Every regular file in `dir` but SHA256SUMS, by name.
fn listing(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.file_type()?.is_file() && name != SUMS {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut file = fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("read {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().iter().fold(String::new(), |mut hex, b| {
        let _ = write!(hex, "{b:02x}");
        hex
    }))
}

fn file_name(path: &Path) -> Result<String> {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .with_context(|| format!("{} has no file name", path.display()))
}

fn write_manifest(out: &Path, manifest: &Value) -> Result<()> {
    write(
        &out.join(MANIFEST),
        &format!("{}\n", serde_json::to_string_pretty(manifest)?),
    )
}

fn write(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text).with_context(|| format!("write {}", path.display()))
}

const PACKAGE: &str = "weft";
const MANIFEST: &str = "release.json";
const SUMS: &str = "SHA256SUMS";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn highest_glibc_compares_versions_numerically() {
        let objdump = "\
target/release/weft:     file format elf64-x86-64

DYNAMIC SYMBOL TABLE:
0000000000000000      DF *UND*\t0000000000000000 (GLIBC_2.9)  pipe2
0000000000000000      DF *UND*\t0000000000000000 (GLIBC_2.34) __libc_start_main
0000000000000000      DF *UND*\t0000000000000000 (GLIBC_2.3.4) __memcpy_chk
0000000000000000      DF *UND*\t0000000000000000  GLIBC_PRIVATE _dl_find_object
0000000000000000  w   D  *UND*\t0000000000000000  Base        __gmon_start__
";
        assert_eq!(highest_glibc(objdump).as_deref(), Some("2.34"));
        // readelf --dyn-syms writes `name@GLIBC_x.y (n)`.
        let readelf = "    12: 0000000000000000     0 FUNC    GLOBAL DEFAULT  UND \
                       getrandom@GLIBC_2.25 (9)\n";
        assert_eq!(highest_glibc(readelf).as_deref(), Some("2.25"));
        assert_eq!(highest_glibc("DYNAMIC SYMBOL TABLE:\n"), None);
    }

    #[test]
    fn sha256sums_pass_sha256sum_check() {
        let dir = tempfile::tempdir().unwrap();
        let files = [("weft-1.0.0.tgz", b"chart".as_slice()), ("a b.json", b"{}")];
        let mut sums = Vec::new();
        for (name, content) in files {
            fs::write(dir.path().join(name), content).unwrap();
            sums.push((
                name.to_string(),
                sha256_file(&dir.path().join(name)).unwrap(),
            ));
        }
        let text = sha256sums(&sums);
        assert!(text.starts_with(
            // sha256("chart")
            &format!("{}  weft-1.0.0.tgz\n", sums[0].1)
        ));
        assert_eq!(text.lines().count(), 2);
        fs::write(dir.path().join(SUMS), &text).unwrap();
        let check = Command::new("sha256sum")
            .args(["-c", SUMS])
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(check.status.success(), "{check:?}");
        // And it fails when a file changes: the test can fail.
        fs::write(dir.path().join("a b.json"), b"[]").unwrap();
        let check = Command::new("sha256sum")
            .args(["-c", SUMS])
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(!check.status.success());
    }

    #[test]
    fn sha256_of_a_file_is_the_known_digest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("abc");
        fs::write(&path, b"abc").unwrap();
        assert_eq!(
            sha256_file(&path).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn release_versions_must_be_semver() {
        for good in ["0.1.0", "1.2.3-rc.1", "1.2.3+build.5"] {
            assert!(check_version(good).is_ok(), "{good}");
        }
        for bad in ["1.2", "v1.2.3", "1.2.3/../x", "", "1.2.x"] {
            assert!(check_version(bad).is_err(), "{bad}");
        }
    }
}
