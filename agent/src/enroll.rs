//! Pod enrollment: makes the kernel and the proxy agree with the snapshot's list of
//! enrolled pods. For each pod: record it in the pod map (outbound steering starts and,
//! until the proxy listens, fails closed), attach sk_lookup to its netns (inbound steering;
//! fails closed until the inbound listener is registered), create the proxy's listeners
//! inside its netns, register the inbound listener, start serving. Un-enrollment reverses
//! it. After an agent restart, pinned pod-map entries and links of pods no longer enrolled
//! are removed, and those of pods still enrolled are re-adopted.
//!
//! A pod whose enrollment fails half-way is left steered-but-unserved (fail closed, never
//! open) and retried at the next reconcile.

pub mod discover;
mod listeners;
pub mod netns;

use std::{
    collections::{BTreeMap, HashMap},
    io,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use ebpf_common::netns::{NetnsCookie, POD_FLAG_REDIRECT_OUTBOUND, PodRecord};
use serde::Serialize;
use socket2::{Domain, Protocol, Socket, Type};
use std::os::fd::AsFd;
use tracing::{error, info, warn};

use crate::{
    ebpf::{self, Dataplane, ProxySocketTable},
    proxy::{self, Direction, PodContext, PodHandle, Proxy, SocketFactory},
    state::{Snapshot, Workload, WorkloadRef},
};
use netns::PodNetns;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open network namespace {path} of pod {pod}: {source} (is the pod running?)")]
    OpenNetns {
        pod: WorkloadRef,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the netns cookie of pod {pod}: {source}")]
    Cookie {
        pod: WorkloadRef,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot create the proxy listeners inside pod {pod}: {source} (is a port of 15001/15006/15008 taken in the pod?)"
    )]
    Listeners {
        pod: WorkloadRef,
        #[source]
        source: io::Error,
    },
    #[error("eBPF update for pod {pod} failed: {source}")]
    Dataplane {
        pod: WorkloadRef,
        #[source]
        source: ebpf::Error,
    },
    #[error("BUG: pod {0} is not on this node but was asked to be enrolled here")]
    BugNotLocal(WorkloadRef),
    #[error("cannot list the pods enrolled before this agent started: {0}")]
    ListEnrolled(#[source] ebpf::Error),
}

/// Keeps enrolled pods in line with the snapshot.
pub struct Enroller {
    dataplane: Arc<Mutex<Dataplane>>,
    /// Where the proxy's upstream sockets are registered as its own (never steered).
    proxy_sockets: ProxySocketTable,
    proxy: Proxy,
    config: proxy::Config,
    pods: BTreeMap<WorkloadRef, EnrolledPod>,
    /// Pods whose last enrollment attempt failed, for status and clean-up.
    failed: BTreeMap<WorkloadRef, FailedPod>,
    next_pod_id: u32,
    adopted: bool,
}

/// An enrolled pod as `weft status` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct PodStatus {
    pub pod: String,
    pub service_account: String,
    pub ips: Vec<std::net::IpAddr>,
    pub netns: String,
    pub netns_cookie: u64,
    pub pod_id: u32,
    pub listeners: Vec<ListenerStatus>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ListenerStatus {
    pub direction: Direction,
    pub addr: SocketAddr,
}

/// What enrollment reports.
#[derive(Clone, Debug, Serialize)]
pub struct EnrollStatus {
    pub enrolled: Vec<PodStatus>,
    /// Pods that should be enrolled but are not, with the reason.
    pub failed: BTreeMap<String, String>,
}

struct FailedPod {
    /// Known once the netns was opened: the pod may sit in the pod map, steered but
    /// unserved (fail closed), and must be taken out if it stops being wanted.
    cookie: Option<NetnsCookie>,
    error: String,
}

struct EnrolledPod {
    workload: Workload,
    cookie: NetnsCookie,
    pod_id: u32,
    netns: Arc<PodNetns>,
    handle: PodHandle,
}

impl Enroller {
    pub fn new(dataplane: Arc<Mutex<Dataplane>>, proxy: Proxy, config: proxy::Config) -> Self {
        let proxy_sockets = dataplane
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .proxy_socket_table();
        Self {
            dataplane,
            proxy_sockets,
            proxy,
            config,
            pods: BTreeMap::new(),
            failed: BTreeMap::new(),
            next_pod_id: 1,
            adopted: false,
        }
    }

    /// Brings enrollment in line with `snapshot`. Returns whether every pod that should be
    /// enrolled is.
    pub fn reconcile(&mut self, snapshot: &Snapshot) -> bool {
        let desired: BTreeMap<&WorkloadRef, &Workload> =
            snapshot.local_enrolled().map(|w| (&w.name, w)).collect();

        // Pods gone, un-enrolled, or changed in what their enrollment is made of (netns,
        // IPs, identity): take them out first. Anything else (labels, mTLS mode, probe
        // ports) the proxy reads from the snapshot on each connection. Taking a pod out and
        // back in for a `kubectl label` would leave it out of the steering maps for a moment,
        // when its new connections would bypass the proxy.
        let stale: Vec<WorkloadRef> = self
            .pods
            .iter()
            .filter(|(name, pod)| {
                desired
                    .get(name)
                    .is_none_or(|w| enrollment_changed(&pod.workload, w))
            })
            .map(|(name, _)| name.clone())
            .collect();
        for (name, pod) in &mut self.pods {
            if let Some(workload) = desired.get(name) {
                pod.workload = (*workload).clone();
            }
        }
        for name in stale {
            if let Some(pod) = self.pods.remove(&name) {
                self.unenroll(pod);
            }
        }
        let abandoned: Vec<WorkloadRef> = self
            .failed
            .keys()
            .filter(|name| !desired.contains_key(name))
            .cloned()
            .collect();
        for name in abandoned {
            if let Some(FailedPod {
                cookie: Some(cookie),
                ..
            }) = self.failed.remove(&name)
                && let Err(e) = self.lock_dataplane().unenroll(cookie)
            {
                warn!(component = "enroll", pod = %name, error = %e, "cannot clear a pod whose enrollment had failed");
            }
        }

        let mut previous = if self.adopted {
            HashMap::new()
        } else {
            match self.previous_agent_pods() {
                Ok(previous) => previous,
                Err(e) => {
                    error!(component = "enroll", error = %e, "cannot adopt pinned state; will retry");
                    return false;
                }
            }
        };

        for (name, workload) in desired {
            if self.pods.contains_key(name) {
                continue;
            }
            match self.enroll(workload, &mut previous) {
                Ok(pod) => {
                    self.failed.remove(name);
                    self.pods.insert(name.clone(), pod);
                }
                Err((cookie, e)) => {
                    error!(component = "enroll", pod = %name, reason = "enroll_failed", error = %e,
                        "pod enrollment failed; its traffic stays blocked until it succeeds");
                    self.failed.insert(
                        name.clone(),
                        FailedPod {
                            cookie,
                            error: e.to_string(),
                        },
                    );
                }
            }
        }

        // What the previous agent enrolled and nobody wants any more.
        if !self.adopted {
            for (cookie, _) in previous {
                if let Err(e) = self.lock_dataplane().unenroll(cookie) {
                    warn!(component = "enroll", cookie = cookie.0, error = %e, "cannot remove a stale pod left by a previous agent");
                } else {
                    info!(
                        component = "enroll",
                        cookie = cookie.0,
                        "removed a pod left enrolled by a previous agent"
                    );
                }
            }
            self.adopted = true;
        }
        self.failed.is_empty()
    }

    pub fn status(&self) -> EnrollStatus {
        EnrollStatus {
            enrolled: self
                .pods
                .values()
                .map(|pod| PodStatus {
                    pod: pod.workload.name.to_string(),
                    service_account: pod.workload.service_account.clone(),
                    ips: pod.workload.ips.clone(),
                    netns: pod.netns.path().display().to_string(),
                    netns_cookie: pod.cookie.0,
                    pod_id: pod.pod_id,
                    listeners: pod
                        .handle
                        .addresses()
                        .iter()
                        .map(|(direction, addr)| ListenerStatus {
                            direction: *direction,
                            addr: *addr,
                        })
                        .collect(),
                })
                .collect(),
            failed: self
                .failed
                .iter()
                .map(|(k, v)| (k.to_string(), v.error.clone()))
                .collect(),
        }
    }

    /// Pods in the pinned pod map: enrolled by a previous agent (or by us, on retry).
    fn previous_agent_pods(&self) -> Result<HashMap<NetnsCookie, PodRecord>, Error> {
        let pods = self
            .lock_dataplane()
            .enrolled()
            .map_err(Error::ListEnrolled)?;
        Ok(pods.into_iter().collect())
    }

    fn enroll(
        &mut self,
        workload: &Workload,
        previous: &mut HashMap<NetnsCookie, PodRecord>,
    ) -> Result<EnrolledPod, (Option<NetnsCookie>, Error)> {
        let pod = &workload.name;
        let path = workload
            .netns()
            .ok_or_else(|| (None, Error::BugNotLocal(pod.clone())))?;
        let netns = PodNetns::open(path).map_err(|source| {
            let path = path.display().to_string();
            (
                None,
                Error::OpenNetns {
                    pod: pod.clone(),
                    path,
                    source,
                },
            )
        })?;
        let cookie = netns.cookie().map_err(|source| {
            (
                None,
                Error::Cookie {
                    pod: pod.clone(),
                    source,
                },
            )
        })?;
        self.start_serving(workload, netns, cookie, previous)
            .map_err(|e| (Some(cookie), e))
    }

    fn start_serving(
        &mut self,
        workload: &Workload,
        netns: PodNetns,
        cookie: NetnsCookie,
        previous: &mut HashMap<NetnsCookie, PodRecord>,
    ) -> Result<EnrolledPod, Error> {
        let pod = &workload.name;
        let pod_id = match previous.remove(&cookie) {
            Some(record) => record.pod_id,
            None => {
                self.next_pod_id += 1;
                self.next_pod_id - 1
            }
        };
        self.next_pod_id = self.next_pod_id.max(pod_id + 1);
        let record = PodRecord {
            pod_id,
            flags: POD_FLAG_REDIRECT_OUTBOUND,
        };
        let dataplane_err = |source| Error::Dataplane {
            pod: pod.clone(),
            source,
        };

        // Steering first: until the listeners below exist, the pod's connections fail
        // (refused outbound, dropped inbound) rather than flow around the proxy.
        self.lock_dataplane()
            .enroll(cookie, record, netns.fd())
            .map_err(dataplane_err)?;
        let listeners =
            listeners::create(&netns, &workload.ips, &self.config).map_err(|source| {
                Error::Listeners {
                    pod: pod.clone(),
                    source,
                }
            })?;
        {
            let mut dataplane = self.lock_dataplane();
            for ip in &workload.ips {
                let listener = listeners
                    .inbound
                    .iter()
                    .find(|l| l.local_addr().is_ok_and(|a| a.is_ipv4() == ip.is_ipv4()));
                // Every family the pod has got an inbound listener in `listeners::create`.
                let Some(listener) = listener else { continue };
                dataplane
                    .set_inbound_listener(*ip, listener.as_fd())
                    .map_err(dataplane_err)?;
            }
        }
        let netns = Arc::new(netns);
        let sockets: Arc<dyn SocketFactory> = Arc::new(InPodSockets {
            netns: Arc::clone(&netns),
            mark: self.config.mark,
            registry: self.proxy_sockets.clone(),
            keepalive: self.config.limits.keepalive(),
        });
        let handle = self.proxy.serve(
            PodContext {
                workload: pod.clone(),
                pod_id,
                netns_cookie: cookie,
                sockets,
            },
            listeners,
        );
        info!(component = "enroll", pod = %pod, pod_id, netns = %netns.path().display(),
            cookie = cookie.0, ips = ?workload.ips, "pod enrolled");
        Ok(EnrolledPod {
            workload: workload.clone(),
            cookie,
            pod_id,
            netns,
            handle,
        })
    }

    fn unenroll(&mut self, pod: EnrolledPod) {
        let name = &pod.workload.name;
        {
            let mut dataplane = self.lock_dataplane();
            // Steering off first, so no new connection lands on a listener about to close.
            if let Err(e) = dataplane.unenroll(pod.cookie) {
                error!(component = "enroll", pod = %name, error = %e, "un-enrollment failed in the eBPF maps");
            }
            for ip in &pod.workload.ips {
                if let Err(e) = dataplane.remove_inbound_listener(*ip) {
                    warn!(component = "enroll", pod = %name, ip = %ip, error = %e, "cannot remove inbound listener entry");
                }
            }
        }
        pod.handle.stop();
        info!(component = "enroll", pod = %name, pod_id = pod.pod_id, "pod un-enrolled");
    }

    fn lock_dataplane(&self) -> MutexGuard<'_, Dataplane> {
        self.dataplane
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// Creates the proxy's upstream sockets inside a pod, registered (by socket cookie) so
/// connect4/6 never steers them back to the proxy, and marked for operators' rules.
struct InPodSockets {
    netns: Arc<PodNetns>,
    mark: u32,
    registry: ProxySocketTable,
    /// Every upstream socket (plaintext and HBONE) notices a vanished peer.
    keepalive: socket2::TcpKeepalive,
}

impl SocketFactory for InPodSockets {
    fn tcp(&self, domain: Domain) -> io::Result<Socket> {
        let socket = self
            .netns
            .run(|| Socket::new(domain, Type::STREAM, Some(Protocol::TCP)))??;
        socket.set_mark(self.mark)?;
        // Before any connect: an unregistered proxy socket would be steered to the proxy.
        self.registry.register(socket.as_fd())?;
        socket.set_tcp_keepalive(&self.keepalive)?;
        socket.set_nonblocking(true)?;
        Ok(socket)
    }
}

/// Whether `new` differs from the enrolled `old` in what enrollment built from it: the
/// netns entered, the IPs the listeners and SOCKMAP slots are for, the identity the pod's
/// HBONE server presents.
fn enrollment_changed(old: &Workload, new: &Workload) -> bool {
    old.netns() != new.netns() || old.ips != new.ips || old.service_account != new.service_account
}
