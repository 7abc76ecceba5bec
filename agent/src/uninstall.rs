//! `weft uninstall`: takes this node out of the mesh for good. Pinned eBPF state survives an
//! agent restart on purpose (enrolled pods fail closed while the agent is away), so removing
//! weft needs this explicit step: it detaches and unpins every link (the cgroup programs and
//! each pod's sk_lookup program) and unpins every map under the pin root, then removes the
//! pin root. The Helm chart runs it on every node from a pre-delete hook
//! (docs/kubernetes.md, Uninstall); the CNI plugin is removed by `weft cni uninstall`.
//!
//! Input: the pin root and, optionally, the agent's readiness address: it first waits until
//! no agent answers there, so that a running agent cannot pin again behind it. Output: a
//! [`Removed`] report; an error names what is left and why.

use std::{
    io,
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use nix::sys::statfs::{BPF_FS_MAGIC, statfs};

use crate::ebpf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "an agent still answers on {addr} after {waited:?}: uninstalling under a running agent \
         would race its pins; stop it first (delete the weft-agent DaemonSet) or raise --timeout"
    )]
    AgentRunning { addr: SocketAddr, waited: Duration },
    #[error("cannot inspect {path}: {source}")]
    Statfs {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error(
        "{path} is not on a bpffs mount: refusing to remove anything there (is --pin-root right, \
         and is the host's /sys/fs/bpf mounted into this container?)"
    )]
    NotBpffs { path: PathBuf },
    #[error("cannot remove weft's pins under {path}: {source}")]
    Unpin {
        path: PathBuf,
        #[source]
        source: ebpf::Error,
    },
    #[error("cannot list {path}: {source}")]
    List {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path} still holds {left:?} after weft's pins were removed: not weft's names, so they \
         are left in place; remove them by hand if they are weft's"
    )]
    Leftovers { path: PathBuf, left: Vec<String> },
    #[error("cannot remove the pin root {path}: {source}")]
    RemoveRoot {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What [`remove_pins`] found and did.
#[derive(Debug, PartialEq, Eq)]
pub enum Removed {
    /// Every pin and the pin root are gone.
    PinRoot(PathBuf),
    /// There was no pin root: nothing of weft's is pinned on this node.
    Nothing(PathBuf),
}

/// Waits until nothing accepts TCP connections on `addr` (the agent's readiness port) for
/// [`SETTLE`] consecutive polls, `poll` apart; fails once `timeout` has passed.
pub fn wait_for_agent_gone(
    addr: SocketAddr,
    timeout: Duration,
    poll: Duration,
) -> Result<(), Error> {
    let start = Instant::now();
    let mut refused = 0;
    loop {
        match TcpStream::connect_timeout(&addr, poll) {
            Ok(_) => refused = 0,
            // Refused or unreachable: nothing listens. A kubelet restarting a crashed agent
            // could bind again, hence several polls in a row.
            Err(_) => refused += 1,
        }
        if refused >= SETTLE {
            return Ok(());
        }
        if start.elapsed() >= timeout {
            return Err(Error::AgentRunning {
                addr,
                waited: start.elapsed(),
            });
        }
        thread::sleep(poll);
    }
}

/// Detaches and unpins everything weft pinned under `pin_root`, then removes it. Idempotent.
/// Refuses a directory that is not on bpffs (it would otherwise delete files of whatever
/// filesystem a wrong `--pin-root` names) and leaves names that are not weft's in place.
pub fn remove_pins(pin_root: &Path) -> Result<Removed, Error> {
    if !pin_root.exists() {
        return Ok(Removed::Nothing(pin_root.to_path_buf()));
    }
    let fs = statfs(pin_root).map_err(|source| Error::Statfs {
        path: pin_root.to_path_buf(),
        source,
    })?;
    if fs.filesystem_type() != BPF_FS_MAGIC {
        return Err(Error::NotBpffs {
            path: pin_root.to_path_buf(),
        });
    }
    ebpf::remove_pinned(pin_root).map_err(|source| Error::Unpin {
        path: pin_root.to_path_buf(),
        source,
    })?;
    let mut left: Vec<String> = std::fs::read_dir(pin_root)
        .and_then(|entries| {
            entries
                .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect()
        })
        .map_err(|source| Error::List {
            path: pin_root.to_path_buf(),
            source,
        })?;
    if !left.is_empty() {
        left.sort();
        return Err(Error::Leftovers {
            path: pin_root.to_path_buf(),
            left,
        });
    }
    std::fs::remove_dir(pin_root).map_err(|source| Error::RemoveRoot {
        path: pin_root.to_path_buf(),
        source,
    })?;
    Ok(Removed::PinRoot(pin_root.to_path_buf()))
}

/// Refused polls in a row that count as "the agent is gone".
const SETTLE: u32 = 3;

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    #[test]
    fn waits_until_the_agent_stops_listening() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stopper = thread::spawn(move || {
            thread::sleep(Duration::from_millis(300));
            drop(listener);
        });
        let start = Instant::now();
        wait_for_agent_gone(addr, Duration::from_secs(10), Duration::from_millis(50))
            .expect("the listener went away");
        assert!(
            start.elapsed() >= Duration::from_millis(300),
            "returned while the agent still listened"
        );
        stopper.join().expect("stopper");
    }

    #[test]
    fn gives_up_while_an_agent_still_answers() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let err = wait_for_agent_gone(addr, Duration::from_millis(200), Duration::from_millis(20))
            .expect_err("an agent answers");
        assert!(
            matches!(err, Error::AgentRunning { addr: a, .. } if a == addr),
            "{err}"
        );
        drop(listener);
    }

    #[test]
    fn a_missing_pin_root_is_nothing_to_do() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("weft");
        assert_eq!(remove_pins(&root).expect("no pins"), Removed::Nothing(root));
    }

    #[test]
    fn refuses_a_pin_root_outside_bpffs_and_deletes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("links");
        std::fs::write(&file, b"not a pin").expect("write");
        let err = remove_pins(dir.path()).expect_err("not bpffs");
        assert!(matches!(err, Error::NotBpffs { .. }), "{err}");
        assert!(file.exists(), "nothing removed");
    }
}
