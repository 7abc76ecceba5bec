//! Small system helpers shared by the harness: commands, mounts, namespaces, plain HTTP.
//!
//! All namespace switching happens on a dedicated thread (or in a child between fork and
//! exec), never on a test's own thread, so a test thread always stays in the host netns.

use std::{
    fs::File,
    io::{self, Read, Write},
    net::{SocketAddr, TcpStream},
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
    thread,
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};

/// Runs a command to completion; fails with its stderr if it exits non-zero.
pub fn run(cmd: &mut Command) -> Result<String> {
    let shown = show(cmd);
    let out = cmd
        .output()
        .with_context(|| format!("failed to start `{shown}`"))?;
    if !out.status.success() {
        bail!(
            "`{shown}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip <args>`: iproute2, for netns and links (simple and readable in a failure message).
pub fn ip(args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(args))
}

/// The command line, for messages.
pub fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// Where cgroup v2 is mounted: found in /proc/self/mountinfo, else mounted at
/// `/run/weft-tests/cgroup2` (a hybrid host usually has it at `/sys/fs/cgroup/unified`,
/// a unified one at `/sys/fs/cgroup`).
pub fn cgroup2_root() -> Result<PathBuf> {
    static ROOT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    ROOT.get_or_init(|| {
        if let Some(found) = mount_point_of_type("cgroup2") {
            return Ok(found);
        }
        let dir = PathBuf::from("/run/weft-tests/cgroup2");
        std::fs::create_dir_all(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
        run(Command::new("mount")
            .args(["-t", "cgroup2", "none"])
            .arg(&dir))
        .map_err(|e| format!("no cgroup2 mount, and mounting one failed: {e:#}"))?;
        Ok(dir)
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

/// The bpffs under which per-test pin roots are created: `/sys/fs/bpf`, mounted if needed.
pub fn bpffs_root() -> Result<PathBuf> {
    static ROOT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    ROOT.get_or_init(|| {
        let dir = PathBuf::from(BPFFS);
        if mount_points()
            .iter()
            .any(|(point, fstype)| point == &dir && fstype == "bpf")
        {
            return Ok(dir);
        }
        run(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS])).map_err(|e| {
            format!("bpffs is not mounted at {BPFFS} and mounting it failed: {e:#}")
        })?;
        Ok(dir)
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

/// First mount point of the given filesystem type.
pub fn mount_point_of_type(fstype: &str) -> Option<PathBuf> {
    mount_points()
        .into_iter()
        .find(|(_, t)| t == fstype)
        .map(|(p, _)| p)
}

/// (mount point, filesystem type) of every mount visible to this process.
fn mount_points() -> Vec<(PathBuf, String)> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    info.lines()
        .filter_map(|line| {
            // `id parent maj:min root mountpoint options [optional...] - fstype source super`
            let (left, right) = line.split_once(" - ")?;
            let point = left.split(' ').nth(4)?;
            let fstype = right.split(' ').next()?;
            Some((PathBuf::from(unescape_mountinfo(point)), fstype.to_string()))
        })
        .collect()
}

fn unescape_mountinfo(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\134", "\\")
}

/// Path of a named network namespace (`ip netns add <name>`).
pub fn netns_path(name: &str) -> PathBuf {
    Path::new("/run/netns").join(name)
}

/// Inode of a network namespace, as `bpftool link list` shows it (`netns_ino`).
pub fn netns_inode(path: &Path) -> Result<u64> {
    Ok(std::fs::metadata(path)
        .with_context(|| format!("stat {}", path.display()))?
        .ino())
}

/// Moves the calling thread into the network namespace at `path`.
pub fn enter_netns(path: &Path) -> io::Result<()> {
    let file = File::open(path)?;
    // SAFETY: setns on a valid, open namespace fd; it only changes this thread's netns.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `f` on a fresh thread inside the network namespace at `netns`. The thread ends
/// with `f`, so no thread is ever left in (or returned from) a foreign namespace.
pub fn in_netns<T, F>(netns: &Path, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    let netns = netns.to_path_buf();
    thread::Builder::new()
        .name("weft-test-netns".to_string())
        .spawn(move || {
            enter_netns(&netns).with_context(|| format!("setns into {}", netns.display()))?;
            f()
        })
        .context("spawn netns thread")?
        .join()
        .map_err(|_| anyhow!("BUG: netns thread panicked"))?
}

/// A response of [`http_get`].
#[derive(Clone, Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub body: String,
}

/// A plain HTTP/1.1 GET to `addr` from inside `netns` (the admin API listens on the node
/// netns' loopback). Handles `Content-Length`, chunked and close-delimited bodies.
pub fn http_get(netns: &Path, addr: SocketAddr, path: &str) -> Result<HttpResponse> {
    http_request(netns, addr, "GET", path)
}

/// Like [`http_get`] with another method (`POST /quitquitquit`).
pub fn http_request(
    netns: &Path,
    addr: SocketAddr,
    method: &str,
    path: &str,
) -> Result<HttpResponse> {
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    );
    let raw = in_netns(netns, move || {
        let mut stream = TcpStream::connect_timeout(&addr, crate::scaled(Duration::from_secs(2)))
            .with_context(|| format!("connect to {addr}"))?;
        stream.set_read_timeout(Some(crate::scaled(Duration::from_secs(10))))?;
        stream.write_all(request.as_bytes())?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).context("read response")?;
        Ok(raw)
    })?;
    parse_response(&raw).with_context(|| format!("{method} http://{addr}{path}"))
}

fn parse_response(raw: &[u8]) -> Result<HttpResponse> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow!("no end of headers in {} bytes", raw.len()))?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let mut body = raw[split + 4..].to_vec();
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad status line {status_line:?}"))?;
    let chunked = lines.any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if chunked {
        body = dechunk(&body)?;
    }
    Ok(HttpResponse {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| anyhow!("truncated chunk size"))?;
        let size_text = String::from_utf8_lossy(&data[..eol]);
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .with_context(|| format!("bad chunk size {size_text:?}"))?;
        data = &data[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size {
            bail!("truncated chunk");
        }
        out.extend_from_slice(&data[..size]);
        data = data.get(size + 2..).unwrap_or_default();
    }
}

/// Sends `signal` to `pid`; a process that is already gone is not an error.
pub fn kill(pid: u32, signal: i32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, signal);
    }
}

/// True when running as root (the end-to-end tests need it).
pub fn is_root() -> bool {
    // SAFETY: geteuid(2) cannot fail and has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Whether a program is on PATH.
pub fn on_path(program: &str) -> bool {
    find_on_path(program).is_some()
}

/// The full path of a program on PATH.
pub fn find_on_path(program: &str) -> Option<std::path::PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|dir| dir.join(program))
        .find(|path| path.is_file())
}

const BPFFS: &str = "/sys/fs/bpf";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_content_length_and_chunked_responses() {
        let plain = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nready";
        let r = parse_response(plain).unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "ready"));

        let chunked =
            b"HTTP/1.1 503 Service Unavailable\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        let r = parse_response(chunked).unwrap();
        assert_eq!((r.status, r.body.as_str()), (503, "abcde"));
    }

    #[test]
    fn reads_mount_points() {
        assert!(mount_points().iter().any(|(p, _)| p == Path::new("/")));
    }
}
