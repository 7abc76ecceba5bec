//! The agent's side of the CNI plugin: a unix socket served on the agent's runtime.
//!
//! ADD records the pod's netns in `NodePods` (`LearnedFrom::Cni`), which makes a pod known
//! by UID local; the enroller then enrolls it, and the reply waits (bounded by
//! `enrollTimeout`) until the enroller reports the pod enrolled *at that netns* and, with
//! mutual TLS on, the pod's certificate is there (else its first connections would fail
//! closed), or until the state says the pod is not in the mesh. DEL forgets the netns. CHECK answers from what is
//! enrolled now. Until the first enrollment pass has run, every ADD and CHECK is refused as
//! not ready: a restarted agent must re-adopt the pods it had before it vouches for new ones.
//!
//! The server also keeps the mesh-namespaces file next to its socket (see `cni`'s docs).
//!
//! The socket is root's only (0600), but its input is still checked as a peer's: a request
//! is one JSON line of at most `MAX_MESSAGE` bytes that must arrive within
//! `agent.cni.requestTimeout`; anything else (too long, cut off, not JSON, too slow) is
//! answered `Failed` with what was wrong, counted in `cni_requests_refused_total{reason}`,
//! and the connection closed. At most `agent.cni.maxConnections` requests are served at
//! once; one more is answered `NotReady` (the runtime retries the sandbox) without a task.

use std::{
    collections::BTreeSet,
    io,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
};
use serde::Serialize;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{Semaphore, watch},
};
use tracing::{info, warn};

use super::{LearnedFrom, NodePod, NodePods};
use crate::{
    cni::{Command, MAX_MESSAGE, Reply, Request, write_mesh_namespaces},
    identity::CertManager,
    report::EnrollStatus,
    state::{Snapshot, Workload},
};

/// `agent.cni`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Config {
    /// The unix socket the plugin connects to.
    pub socket: PathBuf,
    /// The mesh-namespaces file the plugin reads when the agent is unreachable.
    pub mesh_namespaces_file: PathBuf,
    /// How long an ADD waits for the pod to be enrolled before the sandbox fails.
    #[serde(with = "crate::settings::humantime_ms")]
    pub enroll_timeout: Duration,
    /// How long a connection may take to send its request line.
    #[serde(with = "crate::settings::humantime_ms")]
    pub request_timeout: Duration,
    /// Requests served at once.
    pub max_connections: usize,
}

/// Refusals of the CNI socket, by reason.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    refused: Family<ReasonLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

impl Metrics {
    pub fn new(registry: &mut prometheus_client::registry::Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "cni_requests_refused",
            "CNI socket requests refused before they were understood, by reason",
            metrics.refused.clone(),
        );
        metrics
    }

    fn refused(&self, reason: &'static str) {
        self.refused.get_or_create(&ReasonLabels { reason }).inc();
    }
}

/// Why a request line was not read.
#[derive(Debug, thiserror::Error)]
enum BadRequest {
    #[error("the request is larger than {MAX_MESSAGE} bytes")]
    TooLarge,
    #[error("no complete request within {0:?}")]
    Timeout(Duration),
    #[error("the request was cut off: the connection closed before its end ({0})")]
    Truncated(serde_json::Error),
    #[error("bad request from the CNI plugin: {0} (plugin and agent versions differ?)")]
    Invalid(serde_json::Error),
    #[error("cannot read the request: {0}")]
    Io(io::Error),
}

impl BadRequest {
    fn reason(&self) -> &'static str {
        match self {
            BadRequest::TooLarge => "too_large",
            BadRequest::Timeout(_) => "timeout",
            BadRequest::Truncated(_) => "truncated",
            BadRequest::Invalid(_) => "invalid_json",
            BadRequest::Io(_) => "io",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "cannot listen on the CNI socket {path}: {source} (is agent.cni.socket on a writable host mount?)"
    )]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What the server reads: the node's pods, the state and the enroller's reports.
#[derive(Clone)]
pub struct Inputs {
    pub pods: Arc<NodePods>,
    pub state: watch::Receiver<Arc<Snapshot>>,
    /// `None` until the first enrollment pass, then the enroller's report after each pass.
    pub enrolled: watch::Receiver<Option<Arc<EnrollStatus>>>,
    /// With mutual TLS on: a pod is ready only with its certificate.
    pub identity: Option<Identity>,
}

/// The certificates of the node's identities, and their trust domain.
#[derive(Clone)]
pub struct Identity {
    pub certs: CertManager,
    pub trust_domain: String,
}

/// A bound CNI server.
pub struct Server {
    listener: UnixListener,
    config: Config,
    metrics: Metrics,
}

/// What the state and the enroller say of a pod right now.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Enrolled,
    NotInMesh,
    /// Not enrolled (yet), with what is missing.
    Pending(String),
}

impl Server {
    /// Binds the socket (replacing a stale one), mode 0600: only root may enroll pods.
    pub fn bind(config: Config, metrics: Metrics) -> Result<Self, Error> {
        let bind_err = |source| Error::Bind {
            path: config.socket.clone(),
            source,
        };
        if let Some(dir) = config.socket.parent() {
            std::fs::create_dir_all(dir).map_err(bind_err)?;
        }
        match std::fs::remove_file(&config.socket) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(bind_err(e)),
        }
        let listener = UnixListener::bind(&config.socket).map_err(bind_err)?;
        std::fs::set_permissions(&config.socket, std::fs::Permissions::from_mode(0o600))
            .map_err(bind_err)?;
        Ok(Self {
            listener,
            config,
            metrics,
        })
    }

    /// Serves until the runtime stops; keeps the mesh-namespaces file up to date.
    pub async fn run(self, inputs: Inputs) {
        tokio::spawn(keep_mesh_namespaces(
            self.config.mesh_namespaces_file.clone(),
            inputs.state.clone(),
        ));
        let slots = Arc::new(Semaphore::new(self.config.max_connections));
        info!(component = "cni", socket = %self.config.socket.display(), "CNI server listening");
        loop {
            match self.listener.accept().await {
                Ok((stream, _)) => {
                    let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                        self.metrics.refused("connection_limit");
                        crate::warn_limited!(
                            component = "cni",
                            limit = self.config.max_connections,
                            "CNI request refused: too many at once"
                        );
                        // A short reply fits the socket's buffer: no task, no wait.
                        let _ = stream.try_write(&reply_line(&Reply::NotReady {
                            reason: format!(
                                "the agent is serving {} CNI requests already (agent.cni.maxConnections)",
                                self.config.max_connections
                            ),
                        }));
                        continue;
                    };
                    let inputs = inputs.clone();
                    let config = self.config.clone();
                    let metrics = self.metrics.clone();
                    tokio::spawn(async move {
                        if let Err(e) = serve(stream, inputs, &config, &metrics).await {
                            warn!(component = "cni", error = %e, "CNI request failed");
                        }
                        drop(slot);
                    });
                }
                Err(e) => {
                    warn!(component = "cni", error = %e, "cannot accept a CNI connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

async fn serve(
    stream: UnixStream,
    inputs: Inputs,
    config: &Config,
    metrics: &Metrics,
) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let reply = match read_request(read, config.request_timeout).await {
        Ok(request) => handle(request, inputs, config.enroll_timeout).await,
        Err(e) => {
            metrics.refused(e.reason());
            crate::warn_limited!(component = "cni", reason = e.reason(), error = %e, "CNI request refused");
            Reply::Failed {
                reason: e.to_string(),
            }
        }
    };
    // The reply is small; a client that never reads still cannot hold the task.
    tokio::time::timeout(config.request_timeout, async {
        write.write_all(&reply_line(&reply)).await?;
        write.shutdown().await
    })
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the plugin did not read the reply"))?
}

/// One request line: at most `MAX_MESSAGE` bytes, within `timeout`.
async fn read_request(
    read: tokio::net::unix::OwnedReadHalf,
    timeout: Duration,
) -> Result<Request, BadRequest> {
    let mut line = Vec::new();
    // One byte over the limit tells a line of exactly the limit from a longer one.
    let mut reader = BufReader::new(read).take(MAX_MESSAGE as u64 + 1);
    tokio::time::timeout(timeout, reader.read_until(b'\n', &mut line))
        .await
        .map_err(|_| BadRequest::Timeout(timeout))?
        .map_err(BadRequest::Io)?;
    let complete = line.last() == Some(&b'\n');
    if line.len() > MAX_MESSAGE || (!complete && line.len() as u64 > MAX_MESSAGE as u64) {
        return Err(BadRequest::TooLarge);
    }
    serde_json::from_slice::<Request>(&line).map_err(|e| {
        if complete || !e.is_eof() {
            BadRequest::Invalid(e)
        } else {
            BadRequest::Truncated(e)
        }
    })
}

/// A reply as the plugin reads it: one JSON line.
fn reply_line(reply: &Reply) -> Vec<u8> {
    // Serialising a reply of strings cannot fail; an empty line would read as a bad reply.
    let mut out = serde_json::to_vec(reply).unwrap_or_default();
    out.push(b'\n');
    out
}

async fn handle(request: Request, mut inputs: Inputs, timeout: Duration) -> Reply {
    let pod = &request.pod;
    if request.command == Command::Del {
        inputs.pods.forget(&pod.uid);
        info!(component = "cni", pod = %pod, container = %request.container_id, "CNI DEL: pod forgotten");
        return Reply::Forgotten;
    }
    if inputs.enrolled.borrow().is_none() {
        return Reply::NotReady {
            reason: "the agent is starting: its first enrollment pass has not run".into(),
        };
    }
    let Some(netns) = request.netns.clone() else {
        return Reply::Failed {
            reason: "CNI_NETNS is required for ADD and CHECK".into(),
        };
    };
    if request.command == Command::Add {
        inputs.pods.record(
            pod.uid.clone(),
            NodePod {
                netns: netns.clone(),
                ips: request.ips.clone(),
                learned_from: LearnedFrom::Cni,
            },
        );
    }
    let deadline = tokio::time::Instant::now()
        + match request.command {
            Command::Add => timeout,
            Command::Check | Command::Del => Duration::ZERO,
        };
    let mut cert_changes = inputs.identity.as_ref().map(|i| i.certs.subscribe());
    let has_cert = |w: &Workload| match &inputs.identity {
        None => true,
        Some(identity) => w
            .identity(&identity.trust_domain)
            .is_ok_and(|id| identity.certs.certificate(&id).is_some()),
    };
    loop {
        let verdict = {
            let state = inputs.state.borrow_and_update();
            let enrolled = inputs.enrolled.borrow_and_update();
            judge(&state, enrolled.as_deref(), &request.pod, &netns, has_cert)
        };
        let reason = match verdict {
            Verdict::Enrolled => {
                info!(component = "cni", pod = %pod, netns = %netns.display(), ips = ?request.ips, command = ?request.command, "CNI: pod enrolled");
                return Reply::Enrolled;
            }
            Verdict::NotInMesh => {
                info!(component = "cni", pod = %pod, command = ?request.command, "CNI: pod not in the mesh");
                return Reply::NotInMesh;
            }
            Verdict::Pending(reason) => reason,
        };
        tokio::select! {
            changed = inputs.state.changed() => if changed.is_err() { return shutting_down() },
            changed = inputs.enrolled.changed() => if changed.is_err() { return shutting_down() },
            changed = async {
                match cert_changes.as_mut() {
                    Some(changes) => changes.changed().await,
                    None => std::future::pending().await,
                }
            } => if changed.is_err() { return shutting_down() },
            () = tokio::time::sleep_until(deadline) => {
                warn!(component = "cni", pod = %pod, reason = %reason, command = ?request.command, "CNI: refusing the pod's sandbox");
                return Reply::Failed { reason };
            }
        }
    }
}

fn shutting_down() -> Reply {
    Reply::NotReady {
        reason: "the agent is shutting down".into(),
    }
}

/// Decides from the state and the enroller's latest report.
fn judge(
    state: &Snapshot,
    enrolled: Option<&EnrollStatus>,
    pod: &crate::cni::PodInfo,
    netns: &Path,
    has_cert: impl Fn(&Workload) -> bool,
) -> Verdict {
    let Some(workload) = workload_by_uid(state, &pod.uid) else {
        return if mesh_namespaces(state).contains(&pod.namespace) {
            Verdict::Pending(format!(
                "pod {pod} is not in the agent's state yet, and namespace {} is in the mesh",
                pod.namespace
            ))
        } else {
            Verdict::NotInMesh
        };
    };
    if !workload.enrolled {
        return Verdict::NotInMesh;
    }
    let name = workload.name.to_string();
    let Some(report) = enrolled else {
        return Verdict::Pending("the first enrollment pass has not run".into());
    };
    let netns = netns.display().to_string();
    if report
        .enrolled
        .iter()
        .any(|p| p.pod == name && p.netns == netns)
    {
        return if has_cert(workload) {
            Verdict::Enrolled
        } else {
            Verdict::Pending(format!(
                "pod {name} is enrolled but its certificate is not issued yet"
            ))
        };
    }
    match report.failed.get(&name) {
        Some(error) => Verdict::Pending(format!("enrolling pod {name} failed: {error}")),
        None => Verdict::Pending(format!("pod {name} is not enrolled yet")),
    }
}

fn workload_by_uid<'a>(state: &'a Snapshot, uid: &str) -> Option<&'a Workload> {
    state.workloads.values().find(|w| w.pod_uid() == Some(uid))
}

/// Namespaces in the mesh: those labelled in, where the source knows namespace labels (the
/// Kubernetes source); else, as far as the local file shows, those with an enrolled
/// workload (on any node).
pub fn mesh_namespaces(state: &Snapshot) -> BTreeSet<String> {
    if let Some(labelled) = &state.mesh_namespaces {
        return labelled.clone();
    }
    state
        .workloads
        .values()
        .filter(|w| w.enrolled)
        .map(|w| w.name.namespace.clone())
        .collect()
}

/// Rewrites `path` (atomically, by rename) whenever the set of mesh namespaces changes.
async fn keep_mesh_namespaces(path: PathBuf, mut state: watch::Receiver<Arc<Snapshot>>) {
    let mut written: Option<BTreeSet<String>> = None;
    loop {
        let namespaces = mesh_namespaces(&state.borrow_and_update());
        if written.as_ref() != Some(&namespaces) {
            match write_mesh_namespaces(&path, &namespaces) {
                Ok(()) => written = Some(namespaces),
                Err(e) => {
                    warn!(component = "cni", path = %path.display(), error = %e,
                        "cannot write the mesh-namespaces file; while the agent is down the plugin refuses every pod")
                }
            }
        }
        if state.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        cni::PodInfo,
        report::PodStatus,
        state::{Location, WorkloadRef},
    };

    const UID: &str = "0d5cb5a1-8f2e-4c55-9a43-3b4f3e0e2a11";

    fn pod(namespace: &str) -> PodInfo {
        PodInfo {
            namespace: namespace.into(),
            name: "web".into(),
            uid: UID.into(),
        }
    }

    fn state(enrolled: bool, uid: Option<&str>) -> Snapshot {
        let mut state = Snapshot::default();
        let w = Workload {
            name: WorkloadRef::new("shop", "web"),
            service_account: "web".into(),
            ips: vec!["10.1.0.2".parse().unwrap()],
            location: match uid {
                Some(uid) => Location::Pod {
                    uid: uid.into(),
                    netns: Some("/run/netns/cni-1".into()),
                    probe_ports: vec![],
                },
                None => Location::Remote { node: "b".into() },
            },
            enrolled,
            mtls_mode: None,
            labels: Default::default(),
        };
        state.workloads.insert(w.name.clone(), w);
        state
    }

    fn report(netns: &str) -> EnrollStatus {
        EnrollStatus {
            enrolled: vec![PodStatus {
                pod: "shop/web".into(),
                service_account: "web".into(),
                ips: vec![],
                netns: netns.into(),
                netns_cookie: 1,
                pod_id: 1,
                client_address: true,
                listeners: vec![],
            }],
            failed: Default::default(),
        }
    }

    #[test]
    fn a_pod_is_enrolled_only_when_the_enroller_reports_it_at_that_netns() {
        let netns = Path::new("/run/netns/cni-1");
        let s = state(true, Some(UID));
        assert_eq!(
            judge(
                &s,
                Some(&report("/run/netns/cni-1")),
                &pod("shop"),
                netns,
                |_| true
            ),
            Verdict::Enrolled
        );
        // The same pod name enrolled at an older sandbox's netns proves nothing.
        assert!(matches!(
            judge(&s, Some(&report("/run/netns/cni-0")), &pod("shop"), netns, |_| true),
            Verdict::Pending(r) if r.contains("not enrolled yet")
        ));
        let mut failed = report("/run/netns/cni-0");
        failed
            .failed
            .insert("shop/web".into(), "listeners: port taken".into());
        assert!(matches!(
            judge(&s, Some(&failed), &pod("shop"), netns, |_| true),
            Verdict::Pending(r) if r.contains("port taken")
        ));
        // Enrolled, but its first connections would fail closed without a certificate.
        assert!(matches!(
            judge(&s, Some(&report("/run/netns/cni-1")), &pod("shop"), netns, |_| false),
            Verdict::Pending(r) if r.contains("certificate")
        ));
    }

    #[test]
    fn pods_out_of_the_mesh_pass_and_unknown_pods_of_mesh_namespaces_wait() {
        let netns = Path::new("/run/netns/cni-1");
        let none = EnrollStatus {
            enrolled: vec![],
            failed: Default::default(),
        };
        assert_eq!(
            judge(
                &state(false, Some(UID)),
                Some(&none),
                &pod("shop"),
                netns,
                |_| true
            ),
            Verdict::NotInMesh
        );
        // Unknown UID: the namespace decides. `shop` has an enrolled workload (elsewhere).
        let other_uid = state(true, None);
        assert!(matches!(
            judge(&other_uid, Some(&none), &pod("shop"), netns, |_| true),
            Verdict::Pending(r) if r.contains("namespace shop is in the mesh")
        ));
        assert_eq!(
            judge(&other_uid, Some(&none), &pod("kube-system"), netns, |_| {
                true
            }),
            Verdict::NotInMesh
        );
    }

    fn add(netns: &str) -> Request {
        Request {
            command: Command::Add,
            pod: pod("shop"),
            container_id: "c1".into(),
            netns: Some(netns.into()),
            ips: vec![],
        }
    }

    /// Inputs over `state` and `enrolled`, with the senders that keep them open.
    struct Fixture {
        inputs: Inputs,
        _state: watch::Sender<Arc<Snapshot>>,
        enrolled: watch::Sender<Option<Arc<EnrollStatus>>>,
    }

    fn fixture(pods: &Arc<NodePods>, state: Snapshot, enrolled: Option<EnrollStatus>) -> Fixture {
        let (state_tx, state_rx) = watch::channel(Arc::new(state));
        let (enrolled_tx, enrolled_rx) = watch::channel(enrolled.map(Arc::new));
        Fixture {
            inputs: Inputs {
                pods: Arc::clone(pods),
                state: state_rx,
                enrolled: enrolled_rx,
                identity: None,
            },
            _state: state_tx,
            enrolled: enrolled_tx,
        }
    }

    #[tokio::test]
    async fn add_waits_for_enrollment_and_del_forgets() {
        let pods = Arc::new(NodePods::new());
        let Fixture {
            inputs,
            _state,
            enrolled: enrolled_tx,
        } = fixture(&pods, state(true, Some(UID)), None);
        let request = add("/run/netns/cni-1");
        // Before the first enrollment pass: not ready, and nothing recorded.
        assert!(matches!(
            handle(request.clone(), inputs.clone(), Duration::from_secs(5)).await,
            Reply::NotReady { .. }
        ));
        assert_eq!(pods.netns(UID), None);
        enrolled_tx.send_replace(Some(Arc::new(EnrollStatus {
            enrolled: vec![],
            failed: Default::default(),
        })));
        let add = tokio::spawn(handle(
            request.clone(),
            inputs.clone(),
            Duration::from_secs(5),
        ));
        // The enroller reports the pod after the ADD recorded it.
        let mut changes = pods.changes();
        changes.wait_for(|n| *n > 0).await.unwrap();
        assert_eq!(pods.netns(UID), Some("/run/netns/cni-1".into()));
        enrolled_tx.send_replace(Some(Arc::new(report("/run/netns/cni-1"))));
        assert_eq!(add.await.unwrap(), Reply::Enrolled);

        let del = Request {
            command: Command::Del,
            netns: None,
            ..request
        };
        assert_eq!(
            handle(del, inputs, Duration::from_secs(5)).await,
            Reply::Forgotten
        );
        assert_eq!(pods.netns(UID), None);
    }

    #[tokio::test(start_paused = true)]
    async fn add_fails_when_enrollment_does_not_finish_in_time() {
        let none = EnrollStatus {
            enrolled: vec![],
            failed: Default::default(),
        };
        let pods = Arc::new(NodePods::new());
        let f = fixture(&pods, state(true, Some(UID)), Some(none));
        let reply = handle(
            add("/run/netns/cni-1"),
            f.inputs.clone(),
            Duration::from_secs(3),
        )
        .await;
        assert!(
            matches!(&reply, Reply::Failed { reason } if reason.contains("not enrolled yet")),
            "{reply:?}"
        );
    }

    /// Sends `bytes` (then half-closes if `close`) and reads the reply line.
    async fn exchange(socket: &Path, bytes: Vec<u8>, close: bool) -> Reply {
        let stream = UnixStream::connect(socket).await.unwrap();
        let (mut read, mut write) = stream.into_split();
        // The server may stop reading (too large) and close: the rest fails, as it should.
        let writer = tokio::spawn(async move {
            let _ = write.write_all(&bytes).await;
            if close {
                let _ = write.shutdown().await;
            }
            write
        });
        let mut line = String::new();
        BufReader::new(&mut read)
            .read_line(&mut line)
            .await
            .unwrap();
        drop(writer);
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("reply {line:?}: {e}"))
    }

    #[tokio::test]
    async fn garbage_on_the_socket_is_refused_with_a_reason_and_a_good_add_still_works() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("cni.sock");
        let config = Config {
            socket: socket.clone(),
            mesh_namespaces_file: dir.path().join("mesh-namespaces.json"),
            enroll_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_millis(500),
            max_connections: 4,
        };
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = Metrics::new(&mut registry);
        let pods = Arc::new(NodePods::new());
        let f = fixture(
            &pods,
            state(true, Some(UID)),
            Some(report("/run/netns/cni-1")),
        );
        let server = Server::bind(config, metrics.clone()).unwrap();
        let serving = tokio::spawn(server.run(f.inputs.clone()));
        let good = || {
            let mut line = serde_json::to_vec(&add("/run/netns/cni-1")).unwrap();
            line.push(b'\n');
            line
        };
        let failed = |reply: Reply, words: &str| match reply {
            Reply::Failed { reason } => assert!(reason.contains(words), "{reason}"),
            other => panic!("expected a refusal saying {words:?}, got {other:?}"),
        };

        failed(
            exchange(&socket, vec![b'{'; MAX_MESSAGE * 4], false).await,
            "larger than",
        );
        let mut cut = good();
        cut.truncate(cut.len() / 2);
        failed(exchange(&socket, cut, true).await, "cut off");
        failed(
            exchange(&socket, b"{\"command\": 7}\n".to_vec(), true).await,
            "bad request",
        );
        // Never finished: answered once the request timeout has passed.
        failed(
            exchange(&socket, br#"{"command":"#.to_vec(), false).await,
            "no complete request within",
        );
        assert_eq!(exchange(&socket, good(), false).await, Reply::Enrolled);

        // Many at once: the cap's worth are held, the next is told to retry, at once.
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(UnixStream::connect(&socket).await.unwrap());
        }
        let over =
            tokio::time::timeout(Duration::from_millis(400), exchange(&socket, good(), false))
                .await
                .expect("a request over the cap is answered at once");
        assert!(
            matches!(&over, Reply::NotReady { reason } if reason.contains("maxConnections")),
            "{over:?}"
        );
        // The held ones time out and free their places: a good ADD works again.
        drop(held);
        let reply = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match exchange(&socket, good(), false).await {
                    Reply::Enrolled => return Reply::Enrolled,
                    _ => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(reply, Reply::Enrolled);
        assert!(!serving.is_finished(), "the CNI server stopped");

        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for reason in [
            "too_large",
            "truncated",
            "invalid_json",
            "timeout",
            "connection_limit",
        ] {
            assert!(
                text.contains(&format!(
                    "cni_requests_refused_total{{reason=\"{reason}\"}}"
                )),
                "{reason}: {text}"
            );
        }
        serving.abort();
    }
}
