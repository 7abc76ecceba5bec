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

mod cgroups;
mod listeners;

pub use listeners::Inherited;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    io,
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::Arc,
};

use ebpf_common::netns::{NetnsCookie, POD_FLAG_REDIRECT_OUTBOUND, PodRecord};
use nix::sys::socket::{setsockopt, sockopt};
use socket2::{Domain, Protocol, Socket, Type};
use std::os::fd::{AsFd, AsRawFd as _};
use tracing::{error, info, warn};

use crate::{
    ebpf::{self, Dataplane, ProxySocketTable},
    handover,
    netns::{PodNetns, reply_route},
    proxy::{self, PodContext, PodHandle, PodListeners, Proxy, SocketFactory},
    report::{EnrollStatus, ListenerStatus, PodStatus},
    state::{Snapshot, Workload, WorkloadRef},
    sync::{Mutex, MutexGuard},
};

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
    /// A predecessor's listeners, until the pods they belong to are enrolled.
    inherited: listeners::Inherited,
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
    /// The pod's reply routing is installed: its application sees mesh clients' addresses.
    client_address: bool,
    /// Kept to serve again on an in-place re-enrollment.
    listeners: PodListeners,
}

impl Enroller {
    pub fn new(dataplane: Arc<Mutex<Dataplane>>, proxy: Proxy, config: proxy::Config) -> Self {
        let proxy_sockets = dataplane.lock().proxy_socket_table();
        Self {
            dataplane,
            proxy_sockets,
            proxy,
            config,
            pods: BTreeMap::new(),
            failed: BTreeMap::new(),
            next_pod_id: 1,
            adopted: false,
            inherited: listeners::Inherited::default(),
        }
    }

    /// Brings enrollment in line with `snapshot`. Returns whether every pod that should be
    /// enrolled is.
    pub fn reconcile(&mut self, snapshot: &Snapshot) -> bool {
        let desired: BTreeMap<&WorkloadRef, &Workload> =
            snapshot.local_enrolled().map(|w| (&w.name, w)).collect();

        // Pods gone or un-enrolled: out. Pods changed in what their enrollment is made of
        // (netns, IPs, identity): re-enrolled in place, never taken out first, which would
        // leave them out of the steering maps for a moment (their new connections would
        // bypass the proxy). Anything else (labels, mTLS mode, probe ports) the proxy reads
        // from the snapshot on each connection.
        let mut gone = Vec::new();
        let mut changed = Vec::new();
        for (name, pod) in &mut self.pods {
            match desired.get(name) {
                None => gone.push(name.clone()),
                Some(w) if enrollment_changed(&pod.workload, w) => changed.push(name.clone()),
                Some(w) => pod.workload = (*w).clone(),
            }
        }
        for name in gone {
            if let Some(pod) = self.pods.remove(&name) {
                // Deleted (a force delete, too): its processes may live on, but nothing
                // vouches for them any more, so its open connections go with it. A pod that
                // merely left the mesh keeps what it has open.
                let deleted = !snapshot.workloads.contains_key(&name);
                self.unenroll(pod, deleted);
            }
        }
        for name in changed {
            let (Some(pod), Some(workload)) = (self.pods.remove(&name), desired.get(&name)) else {
                continue;
            };
            match self.re_enroll(pod, workload) {
                Ok(pod) => {
                    self.pods.insert(name, pod);
                }
                Err((cookie, e)) => {
                    error!(component = "enroll", pod = %name, reason = "enroll_failed", error = %e,
                        "pod re-enrollment failed; its traffic stays blocked until it succeeds");
                    self.failed.insert(
                        name,
                        FailedPod {
                            cookie,
                            error: e.to_string(),
                        },
                    );
                }
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

        // What the previous agent enrolled and nobody wants any more. Not while a wanted
        // pod's namespace could not be opened: its entry is among these but cannot be told
        // apart, and removing it would leave the pod's connects unsteered (fail open). The
        // entries of namespaces that are gone cost nothing meanwhile: a netns cookie is
        // never reused.
        let unrecognised = self.failed.values().any(|pod| pod.cookie.is_none());
        if !self.adopted && !unrecognised {
            let ours: HashSet<NetnsCookie> = (self.pods.values().map(|pod| pod.cookie))
                .chain(self.failed.values().filter_map(|pod| pod.cookie))
                .collect();
            for (cookie, _) in previous {
                if ours.contains(&cookie) {
                    continue;
                }
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
        if !self.inherited.is_empty() {
            // Left over: pods no longer here, or that failed (a retry binds afresh).
            info!(
                component = "enroll",
                listeners = self.inherited.len(),
                "closing handed-over listeners that no enrolled pod took"
            );
            self.inherited = listeners::Inherited::default();
        }
        self.failed.is_empty()
    }

    /// Readiness of steering: an error naming the pods whose processes all run outside
    /// `cgroup_root`, where connect4/6 never see their sockets (a wrong `agent.cgroupRoot`).
    pub fn check_cgroup_root(&self, cgroup_root: &Path, proc_root: &Path) -> Result<(), String> {
        let pods: BTreeMap<cgroups::NetnsId, &WorkloadRef> = self
            .pods
            .iter()
            .filter_map(|(name, pod)| {
                let meta = nix::sys::stat::fstat(pod.netns.fd().as_raw_fd()).ok()?;
                Some(((meta.st_dev, meta.st_ino), name))
            })
            .collect();
        let outside = cgroups::outside_root(cgroup_root, proc_root, &pods).map_err(|e| {
            format!(
                "cannot check that the pods run under agent.cgroupRoot ({}): {e}",
                cgroup_root.display()
            )
        })?;
        if outside.is_empty() {
            return Ok(());
        }
        let names: Vec<String> = outside.iter().map(ToString::to_string).collect();
        Err(format!(
            "enrolled pods {} run outside agent.cgroupRoot ({}), so their outbound \
             connections are not steered: set agent.cgroupRoot to the cgroup v2 directory \
             that holds the pods",
            names.join(", "),
            cgroup_root.display()
        ))
    }

    /// Serves these listeners of a predecessor agent instead of binding new ones, for the
    /// pods enrolled by the next `reconcile`; it closes those no pod took.
    pub fn inherit(&mut self, inherited: listeners::Inherited) {
        self.inherited = inherited;
    }

    /// Every pod listener, for a successor agent to take over (`handover`).
    pub fn handover_listeners(&self) -> Vec<(handover::Declared, Arc<tokio::net::TcpListener>)> {
        let mut all = Vec::new();
        for pod in self.pods.values() {
            let groups = [
                &pod.listeners.outbound,
                &pod.listeners.inbound,
                &pod.listeners.hbone,
            ];
            for listener in groups.into_iter().flatten() {
                if let Ok(addr) = listener.local_addr() {
                    let declared = handover::Declared {
                        netns_cookie: pod.cookie.0,
                        addr,
                    };
                    all.push((declared, Arc::clone(listener)));
                }
            }
        }
        all
    }

    /// Stops serving every pod and closes its listeners, with no map write: the pinned
    /// steering stays, so the pods fail closed (a new connect is refused, inbound is
    /// dropped) as after the agent exits. Open connections run on. Returns the pods.
    pub fn close_listeners(self) -> usize {
        let pods = self.pods.len();
        for pod in self.pods.into_values() {
            // Dropping the pod's `listeners` with it closes the sockets; no accept loop
            // holds them after `stop`.
            pod.handle.stop();
        }
        pods
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
                    client_address: pod.client_address,
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
        let (netns, cookie) = open_netns(workload)?;
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
        let listeners = self.create_listeners(&netns, workload, cookie)?;
        self.register_inbound(&workload.ips, &[], &listeners)
            .map_err(dataplane_err)?;
        let netns = Arc::new(netns);
        let (handle, client_address) = self.serve(workload, pod_id, cookie, &netns, &listeners);
        info!(component = "enroll", pod = %pod, pod_id, netns = %netns.path().display(),
            cookie = cookie.0, ips = ?workload.ips, "pod enrolled");
        Ok(EnrolledPod {
            workload: workload.clone(),
            cookie,
            pod_id,
            netns,
            handle,
            client_address,
            listeners,
        })
    }

    /// Re-enrolls a pod whose netns, IPs or identity changed, without a moment out of the
    /// pod map. In another netns (its sandbox was recreated), the new one is enrolled before
    /// the old one is let go. In the same netns, the pod map entry and sk_lookup stay, the
    /// same listeners are served with the new context before the old accept loops stop,
    /// and only the inbound-listener entries of its addresses change.
    fn re_enroll(
        &mut self,
        old: EnrolledPod,
        workload: &Workload,
    ) -> Result<EnrolledPod, (Option<NetnsCookie>, Error)> {
        let (netns, cookie) = open_netns(workload)?;
        if cookie != old.cookie {
            let result = self.start_serving(workload, netns, cookie, &mut HashMap::new());
            self.unenroll(old, false);
            return result.map_err(|e| (Some(cookie), e));
        }
        let EnrolledPod {
            workload: old_workload,
            pod_id,
            handle,
            listeners,
            ..
        } = old;
        let listeners = if serves_families(&listeners, &workload.ips) {
            listeners
        } else {
            // A new address family needs new sockets, on ports the old ones hold: those
            // close first. Meanwhile the pod's connects are steered and refused (fail
            // closed), never let through.
            handle.stop();
            drop(listeners);
            let listeners = self
                .create_listeners(&netns, workload, cookie)
                .map_err(|e| (Some(cookie), e))?;
            return self.serve_again(
                workload,
                pod_id,
                cookie,
                netns,
                listeners,
                &old_workload.ips,
                None,
            );
        };
        self.serve_again(
            workload,
            pod_id,
            cookie,
            netns,
            listeners,
            &old_workload.ips,
            Some(handle),
        )
    }

    /// The tail of an in-place re-enrollment: inbound-listener entries, then the new accept
    /// loops, then the old ones stop.
    #[expect(clippy::too_many_arguments, reason = "one private step of re_enroll")]
    fn serve_again(
        &mut self,
        workload: &Workload,
        pod_id: u32,
        cookie: NetnsCookie,
        netns: PodNetns,
        listeners: PodListeners,
        old_ips: &[std::net::IpAddr],
        old_handle: Option<PodHandle>,
    ) -> Result<EnrolledPod, (Option<NetnsCookie>, Error)> {
        let pod = &workload.name;
        self.register_inbound(&workload.ips, old_ips, &listeners)
            .map_err(|source| {
                (
                    Some(cookie),
                    Error::Dataplane {
                        pod: pod.clone(),
                        source,
                    },
                )
            })?;
        let netns = Arc::new(netns);
        let (handle, client_address) = self.serve(workload, pod_id, cookie, &netns, &listeners);
        if let Some(old) = old_handle {
            old.stop();
        }
        info!(component = "enroll", pod = %pod, pod_id, cookie = cookie.0, ips = ?workload.ips,
            service_account = %workload.service_account, "pod re-enrolled in place");
        Ok(EnrolledPod {
            workload: workload.clone(),
            cookie,
            pod_id,
            netns,
            handle,
            client_address,
            listeners,
        })
    }

    /// Points each of `ips` at the pod's inbound listener of its family, and takes the
    /// entries of `old_ips` that are not among them out.
    fn register_inbound(
        &self,
        ips: &[std::net::IpAddr],
        old_ips: &[std::net::IpAddr],
        listeners: &PodListeners,
    ) -> Result<(), ebpf::Error> {
        let mut dataplane = self.lock_dataplane();
        for ip in ips {
            let listener = listeners
                .inbound
                .iter()
                .find(|l| l.local_addr().is_ok_and(|a| a.is_ipv4() == ip.is_ipv4()));
            // Every family the pod has got an inbound listener in `listeners::create`.
            let Some(listener) = listener else { continue };
            dataplane.set_inbound_listener(*ip, listener.as_fd())?;
        }
        for ip in old_ips.iter().filter(|ip| !ips.contains(ip)) {
            dataplane.remove_inbound_listener(*ip)?;
        }
        Ok(())
    }

    /// Starts the pod's accept loops; says whether its application will see mesh clients'
    /// addresses (the reply routing could be installed).
    fn serve(
        &self,
        workload: &Workload,
        pod_id: u32,
        cookie: NetnsCookie,
        netns: &Arc<PodNetns>,
        listeners: &PodListeners,
    ) -> (PodHandle, bool) {
        // Without the reply routing, connections into the pod still work: the application
        // sees the pod's own address instead of the client's.
        let routes_replies = match reply_route::install(netns) {
            Ok(()) => true,
            Err(e) => {
                warn!(component = "enroll", pod = %workload.name, error = %e,
                    "cannot route replies inside the pod: its applications will see the pod's \
                     own address instead of their clients'");
                false
            }
        };
        let sockets: Arc<dyn SocketFactory> = Arc::new(InPodSockets {
            netns: Arc::clone(netns),
            mark: self.config.mark,
            routes_replies,
            registry: self.proxy_sockets.clone(),
            keepalive: self.config.limits.keepalive(),
        });
        let handle = self.proxy.serve(
            PodContext {
                workload: workload.name.clone(),
                pod_id,
                netns_cookie: cookie,
                sockets,
            },
            listeners.clone(),
        );
        (handle, routes_replies)
    }

    /// Takes a pod out; with `close_connections` (the pod was deleted), its open
    /// connections are closed too.
    fn unenroll(&mut self, pod: EnrolledPod, close_connections: bool) {
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
        if close_connections {
            let closed = self.proxy.connections().close_pod(&name.to_string());
            if closed > 0 {
                info!(component = "enroll", pod = %name, connections = closed, reason = "pod_removed",
                    "closed the open connections of a deleted pod");
            }
        }
    }

    /// The pod's listeners: handed over by a predecessor, or bound now.
    fn create_listeners(
        &mut self,
        netns: &PodNetns,
        workload: &Workload,
        cookie: NetnsCookie,
    ) -> Result<PodListeners, Error> {
        let config = &self.config;
        listeners::create(netns, &workload.ips, config, &mut self.inherited, cookie).map_err(
            |source| Error::Listeners {
                pod: workload.name.clone(),
                source,
            },
        )
    }

    fn lock_dataplane(&self) -> MutexGuard<'_, Dataplane> {
        self.dataplane.lock()
    }
}

/// Creates the proxy's upstream sockets inside a pod, registered (by socket cookie) so
/// connect4/6 never steers them back to the proxy, and marked for operators' rules (or, as
/// a client, for the pod's reply routing).
struct InPodSockets {
    netns: Arc<PodNetns>,
    mark: u32,
    /// `reply_route` is installed in the pod: a socket may take a client's address.
    routes_replies: bool,
    registry: ProxySocketTable,
    /// Every upstream socket (plaintext and HBONE) notices a vanished peer.
    keepalive: socket2::TcpKeepalive,
}

impl SocketFactory for InPodSockets {
    fn tcp(&self, domain: Domain, as_client: Option<IpAddr>) -> io::Result<Socket> {
        let socket = self
            .netns
            .run(|| Socket::new(domain, Type::STREAM, Some(Protocol::TCP)))??;
        let client =
            as_client.filter(|ip| self.routes_replies && reply_route::can_carry(domain, *ip));
        match client {
            Some(ip) => {
                // The replies come back by this mark; the port is the kernel's pick at
                // connect, so many connections of one client share the address.
                socket.set_mark(reply_route::REPLY_MARK)?;
                // Bound to lo, the route to the pod's address is the reply table's, whose
                // device (lo) is what sk_lookup sees and lets pass. Else it would be the
                // local table's (eth0) and a client address would be steered to the
                // inbound listener again.
                socket.bind_device(Some(b"lo"))?;
                socket.set_ip_transparent(true)?;
                setsockopt(&socket, sockopt::IpBindAddressNoPort, &true)?;
                socket.bind(&SocketAddr::new(ip, 0).into())?;
            }
            None => socket.set_mark(self.mark)?,
        }
        // Before any connect: an unregistered proxy socket would be steered to the proxy.
        self.registry.register(socket.as_fd())?;
        socket.set_tcp_keepalive(&self.keepalive)?;
        socket.set_nonblocking(true)?;
        Ok(socket)
    }
}

/// Opens a pod's netns and reads its cookie.
fn open_netns(
    workload: &Workload,
) -> Result<(PodNetns, NetnsCookie), (Option<NetnsCookie>, Error)> {
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
    Ok((netns, cookie))
}

/// Whether the listeners have an inbound and an HBONE socket for each family of `ips`.
fn serves_families(listeners: &PodListeners, ips: &[std::net::IpAddr]) -> bool {
    let has = |group: &[Arc<tokio::net::TcpListener>], v4: bool| {
        group
            .iter()
            .any(|l| l.local_addr().is_ok_and(|a| a.is_ipv4() == v4))
    };
    ips.iter()
        .all(|ip| has(&listeners.inbound, ip.is_ipv4()) && has(&listeners.hbone, ip.is_ipv4()))
}

/// Whether `new` differs from the enrolled `old` in what enrollment built from it: the
/// netns entered, the IPs the listeners and SOCKMAP slots are for, the identity the pod's
/// HBONE server presents.
fn enrollment_changed(old: &Workload, new: &Workload) -> bool {
    old.netns() != new.netns() || old.ips != new.ips || old.service_account != new.service_account
}
