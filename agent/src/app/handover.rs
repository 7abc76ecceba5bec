//! The hand-over between two agents of a node, both sides (issue 16): a starting agent
//! takes the running one's pod listeners before it enrolls (`take_over`), says when it
//! serves them (`tell_ready`), and then offers its own to the next one (`offer`,
//! `hand_over`). Sockets move, so no queued connect is lost and sk_lookup's SOCKMAP entry
//! never goes empty. The blocking socket work runs off the runtime, bounded by timeouts.

use std::{
    io,
    os::{fd::AsFd, unix::fs::PermissionsExt, unix::net::UnixStream},
    time::Duration,
};

use ebpf_common::netns::NetnsCookie;
use tokio::{net::UnixListener, sync::mpsc};
use tracing::{debug, info, warn};

use crate::{
    enroll::{Enroller, Inherited},
    handover::{self, Config},
};

/// Takes the listeners of the agent running at `config.socket`, if one is: the stream to
/// `tell_ready` on, and the valid listeners. None when no agent answers or it failed.
pub async fn take_over(config: &Config) -> Option<(UnixStream, Inherited)> {
    let socket = config.socket.clone();
    let taken = tokio::task::spawn_blocking(move || {
        let stream = match UnixStream::connect(&socket) {
            Ok(stream) => stream,
            Err(e) => {
                debug!(component = "handover", socket = %socket.display(), error = %e, "no running agent to take listeners from");
                return Ok(None);
            }
        };
        handover::prepare(&stream, IO_TIMEOUT)?;
        let received = handover::receive(&stream)?;
        Ok::<_, handover::Error>(Some((stream, received)))
    })
    .await;
    let (stream, received) = match taken {
        Ok(Ok(Some(taken))) => taken,
        Ok(Ok(None)) => return None,
        Ok(Err(e)) => {
            warn!(component = "handover", error = %e, "taking over the running agent's listeners failed; binding them afresh");
            return None;
        }
        Err(e) => {
            warn!(component = "handover", error = %e, "BUG: the hand-over task failed");
            return None;
        }
    };
    let offered = received.len();
    let mut inherited = Inherited::default();
    let mut refused = Vec::new();
    for (declared, fd) in received {
        match handover::validate(&declared, fd) {
            Ok(listener) => inherited.insert(NetnsCookie(declared.netns_cookie), listener),
            Err(e) => refused.push(format!("{}: {e}", declared.addr)),
        }
    }
    if !refused.is_empty() {
        // Once, with their number: each is closed and its listener bound afresh.
        warn!(component = "handover", refused = refused.len(), first = %refused[0],
            "handed-over listeners that are not what was declared were closed");
    }
    info!(
        component = "handover",
        offered,
        taken = inherited.len(),
        "took over the running agent's pod listeners"
    );
    Some((stream, inherited))
}

pub use crate::handover::predecessor_gone;

/// Tells the predecessor that every pod is served here: it stops accepting and drains.
/// False when it did not confirm: it gave up waiting and serves its pods again.
pub async fn tell_ready(stream: UnixStream) -> bool {
    let said = tokio::task::spawn_blocking(move || handover::say_ready(&stream)).await;
    match said {
        Ok(Ok(true)) => {
            info!(
                component = "handover",
                "the previous agent stops accepting: this one serves every pod"
            );
            true
        }
        Ok(Ok(false)) => false,
        Ok(Err(e)) => {
            warn!(component = "handover", error = %e, "the previous agent did not confirm the hand-over");
            false
        }
        Err(e) => {
            warn!(component = "handover", error = %e, "BUG: the hand-over task failed");
            false
        }
    }
}

/// Listens at `config.socket` (mode 0600) for a successor; each connection comes out of the
/// receiver, for the reconcile loop to answer with `hand_over`.
pub fn offer(config: &Config) -> io::Result<mpsc::Receiver<UnixStream>> {
    // A previous agent's path (it keeps its bound socket, unreachable by name).
    match std::fs::remove_file(&config.socket) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(&config.socket)?;
    std::fs::set_permissions(&config.socket, std::fs::Permissions::from_mode(0o600))?;
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    warn!(component = "handover", error = %e, "hand-over accept failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let stream = match stream.into_std() {
                Ok(stream) => stream,
                Err(e) => {
                    warn!(component = "handover", error = %e, "hand-over socket unusable");
                    continue;
                }
            };
            if tx.send(stream).await.is_err() {
                break;
            }
        }
    });
    Ok(rx)
}

/// The next successor asking for the listeners; never, when none are offered.
pub async fn next_successor(offered: &mut Option<mpsc::Receiver<UnixStream>>) -> UnixStream {
    match offered {
        Some(rx) => match rx.recv().await {
            Some(stream) => stream,
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// Sends every pod listener to the successor on `stream` and waits for it to say it is
/// ready. True: it is, stop accepting. False: it failed or went away; go on as before (a
/// successor still running sees the stream close and stops: `predecessor_gone`).
/// The caller's reconcile loop does not run meanwhile: no map write while two agents hold
/// the listeners.
pub async fn hand_over(enroller: &Enroller, stream: UnixStream) -> bool {
    let listeners = enroller.handover_listeners();
    let count = listeners.len();
    info!(
        component = "handover",
        listeners = count,
        "a new agent asks for the pod listeners; enrollment paused"
    );
    let done = tokio::task::spawn_blocking(move || {
        stream.set_nonblocking(false).map_err(handover::Error::Io)?;
        handover::prepare(&stream, IO_TIMEOUT)?;
        let fds: Vec<_> = listeners
            .iter()
            .map(|(declared, listener)| (*declared, listener.as_fd()))
            .collect();
        handover::send(&stream, &fds)?;
        handover::prepare(&stream, READY_TIMEOUT)?;
        handover::wait_ready(&stream)
    })
    .await;
    match done {
        Ok(Ok(true)) => {
            info!(
                component = "handover",
                listeners = count,
                "the new agent serves every pod; this one stops accepting"
            );
            true
        }
        Ok(Ok(false)) | Ok(Err(_)) | Err(_) => {
            warn!(
                component = "handover",
                "the new agent did not become ready; this one goes on serving"
            );
            false
        }
    }
}

/// Every read and write of the hand-over itself.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a successor may take from the listeners to ready (certificates included).
const READY_TIMEOUT: Duration = Duration::from_secs(120);
