//! A pod's network namespace: entering it for a moment to create sockets there, and its
//! cookie. Sockets keep the namespace they were created in, so the agent creates a socket
//! inside the pod and then uses it from its own namespace. `reply_route` sets up the
//! namespace so that the proxy can connect to the application as the client. Shared by
//! enrollment and the CNI plugin.

use std::{
    fs::File,
    io,
    os::fd::{AsFd, BorrowedFd},
    path::{Path, PathBuf},
    sync::OnceLock,
};

pub mod reply_route;

use ebpf_common::netns::NetnsCookie;
use nix::sched::{CloneFlags, setns};

/// An open handle on a pod's network namespace.
#[derive(Debug)]
pub struct PodNetns {
    path: PathBuf,
    file: File,
}

impl PodNetns {
    pub fn open(path: &Path) -> io::Result<Self> {
        Ok(Self {
            path: path.to_owned(),
            file: File::open(path)?,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Runs `f` with the current thread inside the pod's network namespace, then moves the
    /// thread back. Keep `f` short and synchronous: the thread may be a runtime worker.
    pub fn run<R>(&self, f: impl FnOnce() -> R) -> io::Result<R> {
        let home = home_netns()?;
        setns(&self.file, CloneFlags::CLONE_NEWNET)?;
        let result = f();
        // If the thread cannot go home, every later socket it creates would land in the
        // pod: that is a broken invariant, not an error to handle.
        setns(home, CloneFlags::CLONE_NEWNET).expect("restore the agent's network namespace");
        Ok(result)
    }

    /// The namespace's cookie, as `bpf_get_netns_cookie` reports it to the programs.
    pub fn cookie(&self) -> io::Result<NetnsCookie> {
        let socket =
            self.run(|| socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None))??;
        crate::ebpf::netns_cookie_of(&socket)
    }
}

/// The agent's own network namespace, opened once.
fn home_netns() -> io::Result<&'static File> {
    static HOME: OnceLock<File> = OnceLock::new();
    if let Some(file) = HOME.get() {
        return Ok(file);
    }
    // Opened from the main thread's view of the process, before any thread wanders off.
    let file = File::open("/proc/self/ns/net")?;
    Ok(HOME.get_or_init(|| file))
}

/// Opens the agent's own namespace handle early, while every thread is still at home.
pub fn remember_home() -> io::Result<()> {
    home_netns().map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_namespace_has_a_stable_nonzero_cookie() {
        let ns = PodNetns::open(Path::new("/proc/self/ns/net")).unwrap();
        let a = ns.cookie().unwrap();
        let b = ns.cookie().unwrap();
        assert_ne!(a.0, 0);
        assert_eq!(a, b);
    }
}
