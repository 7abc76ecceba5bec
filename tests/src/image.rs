//! The runtime image (`cargo xtask image`: an OCI archive, named by `$WEFT_IMAGE`) as the
//! smoke tests use it: its config as `skopeo` reads it from the archive, containers made
//! from it with buildah and run with chroot isolation (`podman run` does not work on this
//! machine's hybrid cgroup layout), and its root filesystem as the root a simulated node's
//! agent runs in ([`Container::agent_command`]).
//!
//! Containers are named `weft-<test>-<pid>` and removed (`buildah rm`, which unmounts them)
//! when dropped.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::Once,
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{agent::AgentCommand, sys};

/// Returns the image archive (`$WEFT_IMAGE`), or returns `Ok(())` early (skipping) when no
/// image was named; panics instead in CI (see [`archive`]).
#[macro_export]
macro_rules! image {
    () => {
        match $crate::image::archive($crate::test_name!()) {
            Some(archive) => archive,
            None => return Ok(()),
        }
    };
}

/// The image archive `$WEFT_IMAGE` names. Unset, or a tool missing: in CI (`CI` set) a
/// failure (panic: the image's smoke tests never pass by skipping there, and
/// `cargo xtask test` builds the image and sets the variable); elsewhere the test is
/// skipped with a message (see [`crate::skip`]).
pub fn archive(test: &str) -> Option<PathBuf> {
    let found = match std::env::var_os(IMAGE_ENV) {
        None => Err(format!(
            "{IMAGE_ENV} is not set; build the image with `cargo xtask image` and set \
             {IMAGE_ENV} to its .oci.tar (`cargo xtask test` does both)"
        )),
        Some(path) => match ["buildah", "skopeo", "unshare"]
            .into_iter()
            .find(|tool| !sys::on_path(tool))
        {
            Some(tool) => Err(format!(
                "`{tool}` is not installed; run `cargo xtask setup`"
            )),
            None => Ok(PathBuf::from(path)),
        },
    };
    let path = match found {
        Ok(path) => path,
        Err(missing) => {
            crate::skip(test, &missing);
            return None;
        }
    };
    // Named but absent is a mistake, not a reason to skip.
    assert!(
        path.is_file(),
        "{test}: {IMAGE_ENV}={} is not a file",
        path.display()
    );
    Some(path)
}

/// The image's config (`User`, `Entrypoint`, `Cmd`, `Labels`, …), read from the archive by
/// `skopeo inspect --config`.
pub fn config(archive: &Path) -> Result<Value> {
    let out = sys::run(
        Command::new("skopeo")
            .args(["inspect", "--config"])
            .arg(transport(archive)),
    )?;
    let v: Value =
        serde_json::from_str(&out).with_context(|| format!("skopeo output not JSON: {out}"))?;
    Ok(v["config"].clone())
}

/// A buildah working container made from the image.
pub struct Container {
    name: String,
}

impl Container {
    /// `buildah from oci-archive:<archive>`, named after the test.
    pub fn from_archive(archive: &Path, test: &str) -> Result<Self> {
        static SWEEP: Once = Once::new();
        SWEEP.call_once(sweep_stale);
        let name = format!("weft-{test}-{}", std::process::id());
        let out = sys::run(
            Command::new("buildah")
                .args(["from", "--quiet", "--name", &name])
                .arg(transport(archive)),
        )?;
        if out.trim().is_empty() {
            bail!("buildah from printed no container id");
        }
        Ok(Container { name })
    }

    /// `buildah run --isolation chroot <options> <container> --`, to which the caller adds
    /// the command to run in the container (as the image's user unless `options` says
    /// `--user`).
    pub fn run_command(&self, options: &[&str]) -> Command {
        let mut cmd = Command::new("buildah");
        cmd.args(["run", "--isolation", "chroot"]);
        cmd.args(options).arg(&self.name).arg("--");
        cmd
    }

    /// Runs `command` in the container (see [`Container::run_command`]) to completion.
    pub fn run(&self, options: &[&str], command: &[&str]) -> Result<Output> {
        let mut cmd = self.run_command(options);
        cmd.args(command);
        let shown = sys::show(&cmd);
        cmd.output().with_context(|| format!("run `{shown}`"))
    }

    /// `buildah mount`: the container's root filesystem on the host.
    pub fn mount(&self) -> Result<PathBuf> {
        let out = sys::run(Command::new("buildah").args(["mount", &self.name]))?;
        Ok(PathBuf::from(out.trim()))
    }

    /// Runs the image's `weft` as a node's agent, as the DaemonSet's container does:
    /// a mount namespace of its own in which the host's /proc, /sys (with bpffs and the
    /// cgroup mounts under it), /dev, /run (the pods' netns files; the image's /var/run
    /// links to it) and the temp directory (the node's config, CA and sockets) are
    /// bind-mounted into the container's root, then `chroot` into it. Its mounts are
    /// slaves of the host's (the chart's `mountPropagation: HostToContainer`): a pod's
    /// netns mounted after the agent started is seen, and nothing leaks back to the host. Root, like the chart's agent; the image's default user is for the
    /// CA. The wrapper `exec`s all the way down, so the harness's pid is the agent's.
    pub fn agent_command(&self) -> Result<AgentCommand> {
        let root = self.mount()?;
        let mut args: Vec<OsString> = ["--mount", "--propagation", "slave", "--"]
            .into_iter()
            .map(OsString::from)
            .collect();
        args.extend(["sh", "-c", CHROOT_SCRIPT, "weft-in-image"].map(OsString::from));
        args.push(root.into_os_string());
        args.extend(["/proc", "/sys", "/dev", "/run"].map(OsString::from));
        args.push(std::env::temp_dir().into_os_string());
        args.push("--".into());
        Ok(AgentCommand {
            // The agent's program must be a file, not a name to look up.
            program: sys::find_on_path("unshare")
                .context("`unshare` is not on PATH (util-linux)")?,
            args,
        })
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if let Err(e) = sys::run(Command::new("buildah").args(["rm", &self.name])) {
            eprintln!("weft-tests: cleanup: buildah rm {}: {e:#}", self.name);
        }
    }
}

/// Removes the containers of test processes that are gone (killed before their `Drop`
/// ran): `weft-<test>-<pid>` with no process `<pid>`.
fn sweep_stale() {
    let Ok(names) =
        sys::run(Command::new("buildah").args(["containers", "--format", "{{.ContainerName}}"]))
    else {
        return;
    };
    for name in names.lines().filter(|n| n.starts_with("weft-")) {
        let pid = name.rsplit('-').next().unwrap_or_default();
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            eprintln!("weft-tests: removing stale container {name}");
            let _ = sys::run(Command::new("buildah").args(["rm", name]));
        }
    }
}

/// `oci-archive:<path>`, the transport skopeo and buildah read an OCI archive with.
fn transport(archive: &Path) -> OsString {
    let mut s = OsString::from("oci-archive:");
    s.push(archive);
    s
}

/// `sh -c` script: `$1` the root, then the host directories to bind into it, `--`, then the
/// agent's arguments. Runs in the new mount namespace, as root.
const CHROOT_SCRIPT: &str = r#"set -e
root=$1; shift
while [ "$1" != -- ]; do
    mkdir -p "$root$1"
    mount --rbind "$1" "$root$1"
    shift
done
shift
exec chroot "$root" /usr/local/bin/weft "$@"
"#;

/// Names the image archive the smoke tests run.
pub const IMAGE_ENV: &str = "WEFT_IMAGE";
