//! The Helm chart as `cargo xtask release` packages it (issue 19): `helm template` of the
//! `.tgz` names the image `<repository>:<release version>` in every container of the agent's
//! DaemonSet when `image.tag` is left empty, with the default repository and with the
//! `--set image.repository=<registry>/weft` of docs/kubernetes.md ("Installing from a
//! release").
//!
//! The first test packages the chart itself (`cargo xtask release --chart-only`) with a
//! version that is not the crate's, so the tag can only have come from the release. The
//! second checks the release in `dist/`: the chart there against the release's version, and
//! the image archive: the manifest `release.json` names, labelled with that version. Without a `dist/` it is skipped, except in CI (`CI` set),
//! where that is a failure: CI runs `cargo xtask release` before the tests.
//!
//! `helm` comes from `cargo xtask setup`; without it these tests fail in CI and are skipped
//! elsewhere, with a message.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use weft_tests::{
    helm::{DEFAULT_NS, agent_pod, containers, helm_chart, render_chart},
    helm_or_skip, test_name,
};

#[test]
fn packaged_chart_defaults_the_image_tag_to_the_release_version() -> Result<()> {
    helm_or_skip!();
    let out = tempfile::tempdir()?;
    let version = "7.8.9-rc.1";
    let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args(["run", "--quiet", "--package", "xtask", "--", "release"])
        .args(["--chart-only", "--version", version, "--out"])
        .arg(out.path())
        .current_dir(workspace_root())
        .status()
        .context("run cargo xtask release")?;
    ensure!(
        status.success(),
        "cargo xtask release --chart-only failed ({status})"
    );
    check_chart(&out.path().join(format!("weft-{version}.tgz")), version)
}

#[test]
fn chart_in_dist_names_the_image_the_release_wrote() -> Result<()> {
    helm_or_skip!();
    let dist = workspace_root().join("dist");
    let manifest = dist.join("release.json");
    if !manifest.is_file() {
        weft_tests::skip(
            test_name!(),
            &format!(
                "no release in {}; run `cargo xtask release` first",
                dist.display()
            ),
        );
        return Ok(());
    }
    let manifest: Value = serde_json::from_str(&std::fs::read_to_string(&manifest)?)?;
    let version = manifest["version"]
        .as_str()
        .context("release.json: no version")?;
    let chart = manifest["chart"]
        .as_str()
        .context("release.json: no chart")?;
    check_chart(&dist.join(chart), version)?;
    // The image in the archive the release wrote is the one release.json names, and it is
    // that version's image.
    let image = manifest["image"]["file"]
        .as_str()
        .context("release.json: no image (was it a --chart-only release?)")?;
    let digest = manifest["image"]["digest"]
        .as_str()
        .context("release.json: no image digest")?;
    let (labels, name) = oci_image_labels(&dist.join(image), digest)?;
    // `docker load` and `podman load` name the image after the index's ref.name.
    ensure!(
        name.as_deref() == Some(format!("weft:{version}").as_str()),
        "{image}: the archive names the image {name:?}, want weft:{version}"
    );
    ensure!(
        labels["org.opencontainers.image.version"].as_str() == Some(version),
        "{image}: image version label {:?}, want {version}",
        labels["org.opencontainers.image.version"]
    );
    Ok(())
}

/// The chart's own version and appVersion are the release version, and its agent DaemonSet
/// names `<repository>:<version>` with the default repository and with another one.
fn check_chart(chart: &Path, version: &str) -> Result<()> {
    let shown = helm_chart(chart, &["show", "chart"], &[])?;
    let meta: serde_yaml::Value = serde_yaml::from_str(&shown)?;
    ensure!(
        meta["version"].as_str() == Some(version) && meta["appVersion"].as_str() == Some(version),
        "{}: Chart.yaml has version {:?}, appVersion {:?}, want {version}",
        chart.display(),
        meta["version"],
        meta["appVersion"]
    );
    for (repository, values) in [
        ("weft", &[][..]),
        (
            "registry.example:5000/mesh/weft",
            &["image.repository=registry.example:5000/mesh/weft"][..],
        ),
    ] {
        let objects = render_chart(chart, DEFAULT_NS, None, values)?;
        let pod = agent_pod(&objects)?;
        let want = format!("{repository}:{version}");
        let mut seen = 0;
        for c in containers(pod) {
            ensure!(
                c.image.as_deref() == Some(want.as_str()),
                "{}: container {} has image {:?}, want {want}",
                chart.display(),
                c.name,
                c.image
            );
            seen += 1;
        }
        ensure!(
            seen >= 2,
            "the agent pod has {seen} containers, want the agent and the CNI installer"
        );
    }
    Ok(())
}

/// The labels of the image config of manifest `digest` in an OCI archive, and the name the
/// index gives that manifest; fails when the archive's index does not list it.
fn oci_image_labels(archive: &Path, digest: &str) -> Result<(Value, Option<String>)> {
    let index = oci_blob(archive, "index.json")?;
    let entry = index["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["digest"] == digest)
        .with_context(|| {
            format!(
                "{}: index.json names no manifest {digest}: {index}",
                archive.display()
            )
        })?;
    let name = entry["annotations"]["org.opencontainers.image.ref.name"]
        .as_str()
        .map(str::to_owned);
    let manifest = oci_blob(archive, &blob_path(digest)?)?;
    let config = manifest["config"]["digest"]
        .as_str()
        .context("image manifest without config")?;
    let config = oci_blob(archive, &blob_path(config)?)?;
    Ok((config["config"]["Labels"].clone(), name))
}

/// A JSON file of an OCI archive (a tar of an image layout), read with tar.
fn oci_blob(archive: &Path, member: &str) -> Result<Value> {
    let out = Command::new("tar")
        .arg("-xOf")
        .arg(archive)
        .arg(member)
        .output()
        .context("run tar")?;
    ensure!(
        out.status.success(),
        "{} has no {member}: {}",
        archive.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).with_context(|| format!("{member} is not JSON"))
}

/// `sha256:<hex>` → `blobs/sha256/<hex>`.
fn blob_path(digest: &str) -> Result<String> {
    let (algorithm, hex) = digest
        .split_once(':')
        .with_context(|| format!("{digest:?} is not a digest"))?;
    Ok(format!("blobs/{algorithm}/{hex}"))
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}
