//! Processes the harness starts inside a node or a pod: their output goes to files in the
//! node's directory (kept when a test fails), and dropping the handle kills them.

use std::{
    fs::{File, OpenOptions},
    io,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::sys;

/// Where a process is placed before it execs.
pub(crate) struct Placement<'a> {
    /// Network namespace to enter.
    pub netns: &'a Path,
    /// cgroup v2 directory to join (a pod's leaf), or none (the agent, tcpdump).
    pub cgroup: Option<&'a Path>,
}

/// A running process with its output (stdout and stderr) captured to a file.
pub struct TestProcess {
    name: String,
    child: Option<Child>,
    output: PathBuf,
    status: Option<ExitStatus>,
}

/// Something processes run in: a pod (its netns and cgroup) or a namespace outside the
/// cluster ([`crate::outside::Outside`]). The L7 clients of [`crate::l7`] run in either.
pub trait Spawn {
    /// Starts `cmd` there; its output goes to a file named after `name`.
    fn spawn(&self, cmd: Command, name: &str) -> Result<TestProcess>;

    /// Runs `cmd` there to completion (killed after `timeout`).
    fn run(&self, cmd: Command, name: &str, timeout: Duration) -> Result<Finished> {
        self.spawn(cmd, name)?.wait(timeout)
    }
}

/// What a finished process left behind.
#[derive(Clone, Debug)]
pub struct Finished {
    pub status: ExitStatus,
    /// stdout and stderr, interleaved as written.
    pub output: String,
}

impl TestProcess {
    /// Starts `cmd` placed as told, appending its stdout and stderr to `output`.
    pub(crate) fn spawn(
        mut cmd: Command,
        name: &str,
        output: PathBuf,
        place: &Placement<'_>,
    ) -> Result<Self> {
        let shown = sys::show(&cmd);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&output)
            .with_context(|| format!("create {}", output.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);

        // Opened here, before fork: between fork and exec only async-signal-safe calls.
        // Both are O_CLOEXEC (std's default), so the program never inherits them.
        let netns = File::open(place.netns)
            .with_context(|| format!("open netns {}", place.netns.display()))?;
        let cgroup_procs = match place.cgroup {
            Some(dir) => Some(
                OpenOptions::new()
                    .write(true)
                    .open(dir.join("cgroup.procs"))
                    .with_context(|| format!("open {}/cgroup.procs", dir.display()))?,
            ),
            None => None,
        };
        let netns_fd = netns.as_raw_fd();
        let cgroup_fd = cgroup_procs.as_ref().map(AsRawFd::as_raw_fd);
        // SAFETY: the closure runs in the child between fork and exec and only makes raw
        // syscalls (write, setns) on fds opened above; it allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                // Join the pod's cgroup first: the cgroup socket hooks (connect4/6, sock_ops)
                // fire for sockets created by processes in the pods' cgroup subtree.
                // Writing "0" to cgroup.procs moves the writer itself.
                if let Some(fd) = cgroup_fd
                    && libc::write(fd, b"0".as_ptr().cast(), 1) != 1
                {
                    return Err(io::Error::last_os_error());
                }
                if libc::setns(netns_fd, libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = spawn_retrying_busy(&mut cmd).with_context(|| format!("spawn `{shown}`"))?;
        drop((netns, cgroup_procs));
        Ok(TestProcess {
            name: name.to_string(),
            child: Some(child),
            output,
            status: None,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Everything the process wrote so far (stdout and stderr).
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.output).unwrap_or_default()
    }

    pub fn output_path(&self) -> &Path {
        &self.output
    }

    /// Lines of the output that start with `word ` (the test app's event lines).
    pub fn lines_starting(&self, word: &str) -> Vec<String> {
        let prefix = format!("{word} ");
        self.output()
            .lines()
            .filter(|l| l.starts_with(&prefix))
            .map(str::to_string)
            .collect()
    }

    /// The exit status, if the process has exited (reaps it).
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none()
            && let Some(child) = self.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            self.status = Some(status);
        }
        self.status
    }

    /// Waits for the process to exit; kills it and fails after `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> Result<Finished> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status() {
                return Ok(Finished {
                    status,
                    output: self.output(),
                });
            }
            if Instant::now() > deadline {
                self.kill();
                bail!(
                    "{} did not exit within {timeout:?}; output so far:\n{}",
                    self.name,
                    self.output()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL and reap. Idempotent.
    pub fn kill(&mut self) {
        self.signal_and_reap(libc::SIGKILL);
    }

    /// Sends `signal`, then waits up to 5 s for the exit (SIGKILL after that).
    pub fn signal_and_reap(&mut self, signal: i32) {
        if self.try_status().is_some() {
            return;
        }
        let Some(child) = self.child.as_mut() else {
            return;
        };
        sys::kill(child.id(), signal);
        let deadline = Instant::now() + crate::scaled(Duration::from_secs(5));
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    self.status = Some(status);
                    return;
                }
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
                Ok(None) => {
                    let _ = child.kill();
                    self.status = child.wait().ok();
                    return;
                }
                Err(_) => return,
            }
        }
    }
}

impl Drop for TestProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `<dir>/<name>.<ext>`, or `<name>-2.<ext>`… when taken (a pod may run `send` many times).
pub(crate) fn unique_path(dir: &Path, name: &str, ext: &str) -> PathBuf {
    let mut path = dir.join(format!("{name}.{ext}"));
    let mut n = 2;
    while path.exists() {
        path = dir.join(format!("{name}-{n}.{ext}"));
        n += 1;
    }
    path
}

/// Spawns `cmd`, again for a while if the kernel says its program is busy (ETXTBSY): a
/// binary the test has just written (an upgrade's new agent) stays open for writing in any
/// child another test thread forked while the file was open, until that child execs.
fn spawn_retrying_busy(cmd: &mut Command) -> io::Result<Child> {
    let mut tries = 0;
    loop {
        match cmd.spawn() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 50 => {
                tries += 1;
                thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}
