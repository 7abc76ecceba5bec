//! Smoke tests of the runtime image (issue "Release artifacts"): the OCI archive
//! `cargo xtask image` wrote, named by `WEFT_IMAGE`, is what a user's first `helm install`
//! runs, so it runs here first. Its config (user, entrypoint, labels); `weft --version`,
//! the entrypoint's help and `weft ca init` inside it; its bpftool reading a map the test
//! pinned; and its `weft` as a simulated node's agent, enrolling pods and carrying their
//! traffic.
//!
//! Containers run with buildah's chroot isolation (`podman run` fails on this machine's
//! hybrid cgroup layout). Needs root, buildah and skopeo; without `WEFT_IMAGE` the tests
//! skip, or fail in CI (`cargo xtask test` builds the image and sets it).

use std::{
    net::SocketAddr,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::Path,
    process::Output,
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use weft_tests::{
    TestAgent, TestNode,
    app::{self, Mode},
    bpf::{self, TestMap},
    image::{self, Container},
    privileged, test_name,
};

#[test]
fn the_image_config_runs_weft_as_a_non_root_user_with_its_labels() -> Result<()> {
    privileged!();
    let archive = weft_tests::image!();
    let config = image::config(&archive)?;
    assert_eq!(config["User"], "65532:65532", "{config:#}");
    assert_eq!(
        config["Entrypoint"],
        serde_json::json!([WEFT]),
        "{config:#}"
    );
    assert_eq!(config["Cmd"], serde_json::json!(["--help"]), "{config:#}");

    let labels = &config["Labels"];
    let label = |key: &str| {
        labels[format!("org.opencontainers.image.{key}")]
            .as_str()
            .with_context(|| format!("no label org.opencontainers.image.{key}: {labels:#}"))
    };
    assert_eq!(label("version")?, manifest_value(AGENT_MANIFEST, "version"));
    let revision = label("revision")?;
    ensure!(
        {
            // A build from a tree with uncommitted changes says so.
            let commit = revision.strip_suffix("-dirty").unwrap_or(revision);
            commit.len() == 40 && commit.bytes().all(|b| b.is_ascii_hexdigit())
        },
        "revision is not a git commit: {revision:?}"
    );
    assert_eq!(
        label("source")?,
        manifest_value(WORKSPACE_MANIFEST, "repository")
    );
    let licenses = label("licenses")?;
    let license = manifest_value(WORKSPACE_MANIFEST, "license");
    ensure!(
        licenses.contains(license),
        "licenses {licenses:?} do not name the workspace's {license}"
    );
    Ok(())
}

#[test]
fn the_entrypoint_prints_help_and_the_version_of_the_label() -> Result<()> {
    privileged!();
    let archive = weft_tests::image!();
    let config = image::config(&archive)?;
    let container = Container::from_archive(&archive, test_name!())?;

    let version = stdout(container.run(&[], &[WEFT, "--version"])?)?;
    let label = &config["Labels"]["org.opencontainers.image.version"];
    assert_eq!(
        version.trim(),
        format!("weft {}", label.as_str().unwrap_or("(no version label)")),
    );

    // What `docker run <image>` runs: the entrypoint followed by the default command.
    let default: Vec<&str> = ["Entrypoint", "Cmd"]
        .iter()
        .flat_map(|k| config[k].as_array().into_iter().flatten())
        .filter_map(Value::as_str)
        .collect();
    let help = stdout(container.run(&[], &default)?)?;
    for needle in ["Usage: weft", "agent", "ca"] {
        ensure!(
            help.contains(needle),
            "`{}` did not print help (no {needle:?}):\n{help}",
            default.join(" ")
        );
    }
    Ok(())
}

#[test]
fn ca_init_in_the_image_writes_a_root_owned_by_the_image_user() -> Result<()> {
    privileged!();
    let archive = weft_tests::image!();
    let container = Container::from_archive(&archive, test_name!())?;
    // A volume the image's user may write to, as a pod's fsGroup would make it.
    let dir = tempfile::Builder::new()
        .prefix("weft-image-ca-")
        .tempdir()?;
    std::os::unix::fs::chown(dir.path(), Some(IMAGE_UID), Some(IMAGE_UID))?;
    let mount = format!("type=bind,src={},dst=/ca,rw=true", dir.path().display());

    stdout(container.run(
        &["--mount", &mount],
        &[
            WEFT,
            "ca",
            "init",
            "--out",
            "/ca/root",
            "--trust-domain",
            "smoke.test",
        ],
    )?)?;

    let key = dir.path().join("root/ca.key");
    let meta = std::fs::metadata(&key).with_context(|| format!("stat {}", key.display()))?;
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "ca.key mode");
    assert_eq!(
        (meta.uid(), meta.gid()),
        (IMAGE_UID, IMAGE_UID),
        "ca.key was written by the image's default user"
    );
    let pem = std::fs::read(dir.path().join("root/ca.crt"))?;
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).context("ca.crt is not PEM")?;
    let cert = pem.parse_x509().context("ca.crt is not a certificate")?;
    ensure!(cert.is_ca(), "ca.crt is not a CA: {:?}", cert.subject());
    let subject = cert.subject().to_string();
    ensure!(
        subject.contains("smoke.test"),
        "ca.crt does not name the trust domain smoke.test: {subject}"
    );
    Ok(())
}

#[test]
fn bpftool_in_the_image_reads_a_map_the_test_pinned() -> Result<()> {
    privileged!();
    let archive = weft_tests::image!();
    let map = TestMap::create(
        &format!("weft-test-{}-{}", test_name!(), std::process::id()),
        "weft_smoke",
    )?;
    map.update(7, 0x2a)?;
    let container = Container::from_archive(&archive, test_name!())?;

    // Root with the two capabilities the chart gives the agent for bpf(2) (BPF, and
    // SYS_ADMIN for opening pinned objects), on top of buildah's default set; the host's
    // bpffs bind-mounted.
    let mut bpftool = container.run_command(&[
        "--user",
        "0:0",
        "--cap-add",
        "CAP_BPF",
        "--cap-add",
        "CAP_SYS_ADMIN",
        "--mount",
        "type=bind,src=/sys/fs/bpf,dst=/sys/fs/bpf",
    ]);
    bpftool.arg("bpftool");
    let entries = bpf::map_dump_with(bpftool, map.pin())?;
    let pairs: Vec<(Option<u32>, Option<u32>)> = entries
        .iter()
        .map(|e| (bpf::le_u32(&e["key"]), bpf::le_u32(&e["value"])))
        .collect();
    assert_eq!(
        pairs,
        [(Some(7), Some(0x2a))],
        "the image's bpftool saw {entries:?}"
    );
    Ok(())
}

#[test]
fn the_image_agent_enrolls_pods_and_carries_their_traffic() -> Result<()> {
    privileged!();
    let archive = weft_tests::image!();
    // Dropped last: the agent (in its own mount namespace) and the node go first.
    let container = Container::from_archive(&archive, test_name!())?;
    let root = container.mount()?;
    let node = TestNode::new(test_name!(), 1)?;
    node.set_agent_command(container.agent_command()?);
    // Same-node pods over HBONE: the image's binary must do the mutual TLS too.
    node.set_mesh(serde_json::json!({ "excludedPorts": [22], "sameNode": "HBONE" }));
    let client = node.pod("client").service_account("client").create()?;
    let agent = TestAgent::start(&node)?;
    // A pod whose netns is mounted after the agent started: seen through the agent's
    // mount namespace, as the DaemonSet's HostToContainer propagation sees it.
    let server = node.pod("server").service_account("server").create()?;
    agent.reload_and_wait(&node)?;
    let hash = app::serve(&server, HASH_PORT, Mode::Hash)?;

    // It is the image's binary: the agent process's root is the container's, its
    // executable the image's weft.
    let pid = agent.pid().context("agent pid")?;
    let proc = Path::new("/proc").join(pid.to_string());
    assert_eq!(std::fs::read_link(proc.join("root"))?, root);
    assert_eq!(
        std::fs::read_link(proc.join("exe"))?,
        root.join(WEFT.trim_start_matches('/')),
        "the agent runs the image's weft"
    );

    let to = SocketAddr::from(server.addr(HASH_PORT));
    let sent = app::send(&client, to, PAYLOAD, 5)?;
    let expected = format!("bytes={PAYLOAD} sha256={} ", sent.sent_sha256);
    let reply = sent.reply.clone().unwrap_or_default();
    ensure!(
        reply.starts_with(&expected),
        "the server saw something else than the client sent: {reply:?}, expected {expected:?}"
    );
    hash.wait_closed_where(|c| c.received_sha256 == sent.sent_sha256);
    // Both pods are in the mesh: out of the client's proxy, into the server's as HBONE.
    agent.expect_record("outbound", |r| {
        r.direction == "outbound" && r.pod == client.pod_ref() && r.bytes_sent == PAYLOAD
    });
    let hop = agent.expect_record("HBONE inbound", |r| {
        r.direction == "hbone" && r.dst == to.to_string() && r.bytes_sent == PAYLOAD
    });
    assert_eq!(
        hop.src_identity.as_deref(),
        Some("spiffe://cluster.local/ns/default/sa/client")
    );

    let status = agent.status()?;
    let mut enrolled: Vec<&str> = status["pods"]["enrolled"]
        .as_array()
        .with_context(|| format!("no pods.enrolled in /status: {status}"))?
        .iter()
        .filter_map(|p| p["pod"].as_str())
        .collect();
    enrolled.sort_unstable();
    assert_eq!(enrolled, [client.pod_ref(), server.pod_ref()]);
    Ok(())
}

/// The stdout of a command that must have succeeded.
fn stdout(out: Output) -> Result<String> {
    if !out.status.success() {
        bail!(
            "exit {}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `key = "value"`'s value in a Cargo manifest (the first such line).
fn manifest_value(manifest: &'static str, key: &str) -> &'static str {
    let prefix = format!("{key} = \"");
    manifest
        .lines()
        .find_map(|l| l.strip_prefix(&prefix)?.strip_suffix('"'))
        .unwrap_or_else(|| panic!("no {key} in the manifest"))
}

const WEFT: &str = "/usr/local/bin/weft";
/// The image's default user and group (`65532:65532`, distroless's nonroot).
const IMAGE_UID: u32 = 65532;
const HASH_PORT: u16 = 8080;
const PAYLOAD: u64 = 256 * 1024;
const AGENT_MANIFEST: &str = include_str!("../../agent/Cargo.toml");
const WORKSPACE_MANIFEST: &str = include_str!("../../Cargo.toml");
