//! Wiring: builds every subsystem of the agent from its config, runs the reconcile loop
//! (snapshot → eBPF settings → enrollment → readiness) and shuts down on a signal or
//! `/quitquitquit`. The only module that knows all the others.
//!
//! Shutting down detaches nothing: pinned maps and links keep enrolled pods steered to
//! listeners that are gone, so they fail closed until the next agent re-adopts them.
//! Before it exits the agent drains: it closes every pod listener at once, then serves the
//! connections still open until they end or the drain limit passes (a second signal cuts it
//! short), with readiness and metrics saying so. The limit is long after a hand-over (a
//! successor serves the pods: `agent.drain.limit`) and short without one (the pods fail
//! closed meanwhile: `agent.drain.limitWithoutSuccessor`).

mod handover;
pub mod waypoint;

use std::{sync::Arc, time::Duration};

use tokio::sync::{Notify, watch};
use tracing::{error, info, warn};

use crate::{
    admin,
    config::Config,
    dns,
    drain::{self, Drain},
    ebpf::{self, Dataplane},
    enroll::Enroller,
    hbone,
    identity::{self, CertManager, CertSource},
    netns,
    proxy::{self, Connections, Proxy},
    readiness::Ready,
    source::{
        self, SourceStatus,
        file::FileDoc,
        node::{self, NodePods, discover},
    },
    state::{MeshSettings, OutboundMode, Snapshot},
    sync::Mutex,
    telemetry,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Ebpf(#[from] ebpf::Error),
    #[error(transparent)]
    Admin(#[from] admin::Error),
    #[error("cannot open the agent's own network namespace: {0}")]
    HomeNetns(#[source] std::io::Error),
    #[error(transparent)]
    Identity(#[from] identity::Error),
    #[error(transparent)]
    Kube(#[from] source::kube::Error),
    #[error(transparent)]
    Cni(#[from] node::cni::Error),
    // Fatal at start-up: the first enrollment pass would otherwise drop pods a previous
    // agent enrolled (they look gone), and they would run unmeshed.
    #[error(transparent)]
    Discovery(#[from] discover::Error),
    #[error(
        "the previous agent closed the hand-over before this one was ready (it waited too long) \
         and serves its pods again; stopping, so that only one agent owns them"
    )]
    HandoverAbandoned,
}

/// Where the agent's state comes from after start-up.
#[derive(Clone, Debug)]
pub enum Source {
    /// The config file, polled for changes (`FileDoc` is its first reading).
    File,
    /// The Kubernetes API; the config file gave the agent and mesh settings only.
    Kubernetes(source::kube::Config),
}

/// Runs the agent until it is told to stop.
pub async fn run(config: Config, doc: FileDoc, source: Source) -> Result<(), Error> {
    // Before any thread enters a pod: remember where home is.
    netns::remember_home().map_err(Error::HomeNetns)?;
    // Counted from here on: a signal that comes while the loop below waits on a hand-over
    // (or between the loop and the drain) is acted on, never lost.
    let mut signals = count_signals();
    let ready = Ready::default();
    ready.block("ebpf", "loading programs");
    ready.block("enroll", "first reconcile pending");

    let settings = dataplane_settings(&config, &doc.snapshot.mesh);
    let dataplane = Dataplane::load(&config.ebpf, &settings)?;
    info!(component = "ebpf", pin_root = %config.ebpf.pin_root.display(),
        cgroup_root = %config.ebpf.cgroup_root.display(), "eBPF programs loaded and attached");
    let orig_dst = dataplane.orig_dst_table();
    let host_conns = dataplane.host_conn_table();
    let dataplane_view = dataplane.view();
    let dataplane = Arc::new(Mutex::new(dataplane));

    let certs = identity::start(&config.identity)?;
    let mtls = match &certs {
        None => {
            warn!(
                component = "identity",
                "no CA configured (agent.ca): pod-to-pod traffic is NOT encrypted or authenticated"
            );
            None
        }
        Some(certs) => {
            track_certificate_readiness(certs.clone(), ready.clone());
            let certs: Arc<dyn CertSource> = Arc::new(certs.clone());
            Some(proxy::Mtls {
                trust_domain: config.identity.trust_domain.clone(),
                pool: hbone::Pool::new(Arc::clone(&certs), pool_config(&config.proxy.limits)),
                certs,
            })
        }
    };

    let source_status = Arc::new(SourceStatus::new(match source {
        Source::File => source::Kind::File,
        Source::Kubernetes(_) => source::Kind::Kubernetes,
    }));
    if matches!(source, Source::File) {
        // The file read at start-up is the first accepted snapshot.
        source_status.accepted();
    }
    // The node's own view of its pods, complete before the first enrollment pass: pods
    // enrolled by a previous agent must be found again, not dropped as gone.
    let node_pods = Arc::new(NodePods::new());
    if let Some(discovery) = &config.discovery {
        let applied = discover::reconcile(discovery, &node_pods)?;
        info!(
            component = "discovery",
            pods = applied.recorded.len(),
            "pods discovered at start-up"
        );
        tokio::spawn(discover::watch(discovery.clone(), Arc::clone(&node_pods)));
    }
    let kube_health = Arc::new(source::kube::Health::default());
    // The source's snapshot, then the hosts of its external services resolved, then joined
    // with the node's pods (workloads known by pod UID): one pipeline for both sources. The
    // first snapshot goes through at once; DNS answers are published as they come.
    let first = Arc::new(doc.snapshot.clone());
    let (state_tx, mut state_rx) = watch::channel(node::join_shared(&first, &node_pods));
    let (resolved_tx, resolved_rx) = watch::channel(Arc::clone(&first));
    let (raw_tx, raw_rx) = watch::channel(first);
    let (enrolled_tx, enrolled_rx) = watch::channel(None);
    let mut metrics = telemetry::Registry::new(&config.telemetry.metrics_prefix);
    if matches!(source, Source::Kubernetes(_)) {
        metrics.register_collector(source::kube::Metrics::new(Arc::clone(&kube_health)));
    }
    let drain = Drain::default();
    metrics.register_collector(drain.metrics());
    telemetry::register_output_metrics(&mut metrics);
    let resolver = dns::Resolver::new(
        config.dns.clone(),
        dns::Metrics::new(metrics.prometheus_mut()),
    );
    let connections = Arc::new(Connections::new(
        state_rx.clone(),
        telemetry::TcpMetrics::new(&mut metrics),
    ));
    let proxy = Proxy::new(
        &config.proxy,
        state_rx.clone(),
        orig_dst,
        host_conns,
        Arc::clone(&connections),
        mtls,
        drain.clone(),
    );
    let proxy_handle = proxy.clone();
    let hbone_pool = proxy.hbone_pool();
    let mut enroller = Enroller::new(Arc::clone(&dataplane), proxy, config.proxy);
    let shutdown = Arc::new(Notify::new());

    // Before anything is bound or enrolled: a running agent's pod listeners are served on,
    // not bound anew, and from here it answers readiness "not ready" (handing over), so
    // that a probe reaching it on the shared admin ports never vouches for this agent.
    let mut predecessor = None;
    if let Some(config) = &config.handover
        && let Some((stream, inherited)) = handover::take_over(config).await
    {
        enroller.inherit(inherited);
        predecessor = Some(stream);
    }

    let cni_metrics = node::cni::Metrics::new(metrics.prometheus_mut());
    let share = match config.handover {
        Some(_) => admin::Share::WithSuccessor,
        None => admin::Share::Alone,
    };
    let servers = admin::Servers::bind(&config.admin, share)?;
    let (admin_addr, readiness_addr) = servers.addresses();
    let metrics_addr = servers.metrics_address();
    let admin_serving = servers.spawn(admin::Context {
        node: config.node.clone(),
        config: serde_json::to_value(&config).unwrap_or_default(),
        ready: ready.clone(),
        state: state_rx.clone(),
        source: Arc::clone(&source_status),
        enroll: enrolled_rx.clone(),
        dataplane: dataplane_view,
        connections,
        certs: certs.clone(),
        hbone_pool,
        shutdown: Arc::clone(&shutdown),
        metrics,
    });
    info!(component = "admin", admin = ?admin_addr, readiness = ?readiness_addr, metrics = ?metrics_addr, "admin servers listening");

    let from_cluster = matches!(source, Source::Kubernetes(_));
    match source {
        Source::File => {
            tokio::spawn(source::file::watch(
                config.config_path.clone(),
                config.reload_interval,
                doc,
                raw_tx,
                source_status,
            ));
        }
        Source::Kubernetes(kube_config) => {
            let client = source::kube::client().await?;
            info!(component = "kubernetes", node = %kube_config.node, "watching the Kubernetes API");
            tokio::spawn(source::kube::run(
                client,
                kube_config,
                doc.snapshot.mesh.clone(),
                raw_tx,
                source::kube::Report {
                    status: source_status,
                    health: kube_health,
                    ready: ready.clone(),
                },
            ));
        }
    }
    tokio::spawn(source::resolve::follow(
        raw_rx,
        resolved_tx,
        resolver,
        source::resolve::Settings::default(),
    ));
    tokio::spawn(node::follow(resolved_rx, Arc::clone(&node_pods), state_tx));
    if let Some(cni) = &config.cni {
        let server = node::cni::Server::bind(cni.clone(), cni_metrics)?;
        tokio::spawn(server.run(node::cni::Inputs {
            pods: Arc::clone(&node_pods),
            state: state_rx.clone(),
            enrolled: enrolled_rx,
            identity: certs.clone().map(|certs| node::cni::Identity {
                certs,
                trust_domain: config.identity.trust_domain.clone(),
            }),
        }));
    }
    if from_cluster {
        // Reconciling the empty start-up snapshot would un-enroll the pods a previous agent
        // left enrolled (pinned): wait for the first snapshot of the fully synced caches.
        tokio::select! {
            changed = state_rx.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
            }
            () = shutdown.notified() => return Ok(()),
            () = signals_reach(signals.clone(), 1) => return Ok(()),
        }
    }

    let mut offer = config.handover.clone();
    let mut awaited_certificates = false;
    let mut successors = None;
    let mut applied: Option<ebpf::Settings> = Some(settings);
    let mut rejected: Option<ebpf::Settings> = None;
    let mut registry_failure: Option<String> = None;
    let proc_root = config
        .discovery
        .as_ref()
        .map_or(std::path::Path::new("/proc"), |d| d.proc_root.as_path());
    let mut ticker = tokio::time::interval(RECHECK_INTERVAL);
    let mut snapshot: Arc<Snapshot> = Arc::clone(&state_rx.borrow_and_update());
    let stopping = loop {
        // Certificates for every identity enrolled here (and only those: the CA would refuse
        // others), asked for before the pods' listeners open.
        if let Some(certs) = &certs {
            certs.set_wanted(
                snapshot
                    .local_enrolled()
                    .filter_map(|w| w.identity(&config.identity.trust_domain).ok())
                    .collect(),
            );
            // Now, not when the tracker task next runs: the enroll condition below may
            // clear first, and readiness must not flash on before the new pods' certificates.
            certificate_readiness(certs, &ready);
            // A successor serves its inherited listeners from the reconcile on: without the
            // pods' certificates it would reset their HBONE connects, which the predecessor
            // serves meanwhile (bounded: a CA that does not answer leaves this agent not
            // ready, and the predecessor abandons the hand-over).
            if predecessor.is_some()
                && !std::mem::replace(&mut awaited_certificates, true)
                && tokio::time::timeout(HANDOVER_CERT_WAIT, certs.wait_ready())
                    .await
                    .is_err()
            {
                warn!(component = "handover", wait = %humantime::format_duration(HANDOVER_CERT_WAIT),
                    "no certificates for the pods yet: serving the handed-over listeners without them");
            }
        }
        // Settings first: exclusions must be right before new pods get steered.
        let settings = dataplane_settings(&config, &snapshot.mesh);
        if applied.as_ref() != Some(&settings) && rejected.as_ref() != Some(&settings) {
            match dataplane.lock().apply_settings(&settings) {
                Ok(()) => applied = Some(settings),
                // Refused whole (too many exclusions): the maps keep the last good set, and
                // the same settings are not retried (nor logged) until they change.
                Err(e @ ebpf::Error::TooManyExclusions { .. }) => {
                    error!(component = "ebpf", reason = e.reason(), error = %e, "data-path settings refused");
                    rejected = Some(settings);
                }
                Err(e) => {
                    applied = None;
                    error!(component = "ebpf", error = %e, "cannot apply data-path settings; will retry");
                }
            }
        }
        // With the settings, before enrollment: a pod steered from here on is refused in
        // eBPF only what this snapshot does not know.
        registry_failure = apply_registry(&mut dataplane.lock(), &snapshot, registry_failure);
        // Policy before enrollment: a pod that starts serving must already be guarded.
        proxy_handle.apply_policies(&snapshot);
        let all_enrolled = enroller.reconcile(&snapshot);
        // After the pass: the CNI server vouches for a pod only once it sees it here, and
        // admin shows what it sees.
        enrolled_tx.send_replace(Some(Arc::new(enroller.status())));
        ready.set(
            "enroll",
            if all_enrolled {
                Ok(())
            } else {
                Err("some pods failed to enroll (see /status)")
            },
        );
        ready.set("ebpf", dataplane.lock().verify_attached());
        ready.set(
            "cgroup",
            enroller.check_cgroup_root(&config.ebpf.cgroup_root, proc_root),
        );

        // A predecessor that gave up waiting for this agent serves its pods again: two
        // agents must never both own them, so this one stops (before it says it is ready).
        if predecessor.as_ref().is_some_and(handover::predecessor_gone) {
            return Err(Error::HandoverAbandoned);
        }
        // Serving every pod: the predecessor may stop accepting, and a successor may come.
        if ready.is_ready() {
            if let Some(stream) = predecessor.take()
                && !handover::tell_ready(stream).await
            {
                return Err(Error::HandoverAbandoned);
            }
            if let Some(config) = offer.take() {
                match handover::offer(&config) {
                    Ok(rx) => {
                        info!(component = "handover", socket = %config.socket.display(),
                            "offering the pod listeners to a successor agent");
                        successors = Some(rx);
                    }
                    Err(e) => {
                        warn!(component = "handover", socket = %config.socket.display(), error = %e,
                            "cannot offer the listeners to a successor agent (it will bind its own)");
                    }
                }
            }
        }

        tokio::select! {
            changed = state_rx.changed() => {
                if changed.is_err() {
                    break Stopping::Told;
                }
                snapshot = Arc::clone(&state_rx.borrow_and_update());
            }
            _ = ticker.tick() => {}
            // Readiness clears outside this loop (certificates): look again soon while a
            // hand-over waits for it.
            () = tokio::time::sleep(HANDOVER_RECHECK), if predecessor.is_some() || offer.is_some() => {}
            stream = handover::next_successor(&mut successors) => {
                // Until the successor is ready or gone: it may bind the admin ports beside
                // this agent, and a probe that reaches this one must not call it ready.
                ready.block("handover", "handing the pods over to a successor agent");
                if handover::hand_over(&enroller, stream).await {
                    break Stopping::HandedOver;
                }
                ready.unblock("handover");
            }
            () = shutdown.notified() => break Stopping::Told,
            () = signals_reach(signals.clone(), 1) => break Stopping::Told,
        }
    };
    // Nothing below writes a map: the pinned state is the next agent's to take over.
    let pods = enroller.close_listeners();
    let open = drain.start();
    let limit = match stopping {
        Stopping::Told => Limit {
            after: config.drain.limit_without_successor,
            field: "agent.drain.limitWithoutSuccessor",
        },
        Stopping::HandedOver => Limit {
            after: config.drain.limit,
            field: "agent.drain.limit",
        },
    };
    info!(component = "app", connections = open, pods, limit = %humantime::format_duration(limit.after),
        "shutting down: this agent accepts on no pod listener any more (a successor that took \
         them over serves them; else the pods fail closed until the next agent); draining the \
         open connections until they end or the limit passes");
    ready.block(
        "draining",
        "the agent is stopping: it accepts no connection, and serves the open ones until they end",
    );
    match stopping {
        Stopping::Told => {
            // The next signal cuts: SIGTERM, and then SIGTERM (or SIGINT) again.
            let cut = signals_reach(signals.clone(), *signals.borrow() + 1);
            serve_draining(&drain, limit, &proxy_handle, state_rx, cut).await;
            info!(
                component = "app",
                "shutting down; eBPF state stays pinned (pods fail closed until the next agent)"
            );
        }
        Stopping::HandedOver => {
            // The successor answers on the admin ports alone from now on.
            admin_serving.stop();
            // The kubelet's SIGTERM (it deletes this pod once the successor is ready) does
            // not cut the drain: only a second signal does. Drained before any signal, the
            // agent waits for one: exiting would restart its container, and the old build
            // would take the pods back from its successor.
            let cut = {
                let signals = signals.clone();
                let drain = drain.clone();
                async move {
                    signals_reach(signals.clone(), 1).await;
                    info!(
                        component = "app",
                        connections = drain.open(),
                        "signal while draining after a hand-over: draining on until the \
                         connections end or the limit passes (a second signal cuts them)"
                    );
                    signals_reach(signals, 2).await;
                }
            };
            serve_draining(&drain, limit, &proxy_handle, state_rx, cut).await;
            // However the drain ended (drained, or cut at the limit).
            if *signals.borrow() == 0 {
                info!(
                    component = "app",
                    "handed over and done draining: waiting for a signal to exit (SIGTERM)"
                );
                let _ = signals.wait_for(|n| *n > 0).await;
            }
            info!(
                component = "app",
                "shutting down; the successor agent serves every pod"
            );
        }
    }
    Ok(())
}

/// How long the drain may last, and the setting that says so.
#[derive(Clone, Copy)]
struct Limit {
    after: Duration,
    field: &'static str,
}

/// Why the reconcile loop ended.
enum Stopping {
    /// A signal, `/quitquitquit`, or the state source ended.
    Told,
    /// A successor agent serves every pod now.
    HandedOver,
}

/// Serves the open connections (applying policy changes to them) until they end, `limit`
/// passes or `cut_now` completes (a second signal); then cuts what is left.
async fn serve_draining(
    drain: &Drain,
    limit: Limit,
    proxy: &Proxy,
    mut state_rx: watch::Receiver<Arc<Snapshot>>,
    cut_now: impl Future<Output = ()>,
) {
    let waited = drain.wait(limit.after);
    tokio::pin!(waited, cut_now);
    let mut state_open = true;
    let cut = loop {
        tokio::select! {
            outcome = &mut waited => match outcome {
                drain::Outcome::Drained => {
                    info!(component = "app", "drained: every open connection ended");
                    return;
                }
                drain::Outcome::LimitPassed { open } => {
                    warn!(component = "app", connections = open, limit = %humantime::format_duration(limit.after),
                        "drain limit ({}) passed: cutting the connections still open", limit.field);
                    break open;
                }
            },
            // A revocation still closes what it denies.
            changed = state_rx.changed(), if state_open => match changed {
                Ok(()) => proxy.apply_policies(&state_rx.borrow_and_update()),
                Err(_) => state_open = false,
            },
            () = &mut cut_now => {
                warn!(component = "app", connections = drain.open(),
                    "second signal while draining: exiting now, cutting the open connections");
                break drain.open();
            }
        }
    };
    proxy.connections().close_all(proxy::Stop::DrainCut);
    drain.cut_and_settle(cut).await;
}

/// Keeps the `certificates` readiness condition in step with the certificate manager:
/// not ready while any enrolled identity lacks a valid certificate.
fn track_certificate_readiness(certs: CertManager, ready: Ready) {
    ready.block("certificates", "no certificates yet");
    tokio::spawn(async move {
        let mut changes = certs.subscribe();
        loop {
            certificate_readiness(&certs, &ready);
            if changes.changed().await.is_err() {
                break;
            }
        }
    });
}

/// Sets the `certificates` condition from the manager as it is now.
fn certificate_readiness(certs: &CertManager, ready: &Ready) {
    if certs.ready() {
        ready.unblock("certificates");
    } else {
        ready.block(
            "certificates",
            "waiting for workload certificates (see /status)",
        );
    }
}

fn dataplane_settings(config: &Config, mesh: &MeshSettings) -> ebpf::Settings {
    ebpf::Settings {
        proxy_mark: config.proxy.mark,
        outbound_port: config.proxy.ports.outbound,
        inbound_port: config.proxy.ports.inbound,
        hbone_port: config.proxy.ports.hbone,
        excluded_ports: mesh.excluded_ports.clone(),
        excluded_cidrs: mesh.excluded_cidrs.clone(),
    }
}

/// Writes the snapshot's registry into the eBPF maps, for the refusal at connect time under
/// `REGISTRY_ONLY` (the proxy refuses too, whatever happens here). Logs a failure once per
/// distinct error, and the recovery; returns the failure still in force.
fn apply_registry(
    dataplane: &mut Dataplane,
    snapshot: &Snapshot,
    failure: Option<String>,
) -> Option<String> {
    // Nothing to list unless eBPF refuses: ALLOW_ANY, the default, costs no registry.
    let result = match snapshot.mesh.outbound {
        OutboundMode::RegistryOnly => dataplane.apply_registry(true, snapshot.registry()),
        OutboundMode::AllowAny => dataplane.apply_registry(false, std::iter::empty()),
    };
    match result {
        Ok(()) => {
            if failure.is_some() {
                info!(component = "ebpf", "eBPF registry written whole again");
            }
            None
        }
        Err(e) => {
            let text = e.to_string();
            if failure.as_ref() != Some(&text) {
                error!(component = "ebpf", reason = e.reason(), error = %e, "eBPF registry not written");
            }
            Some(text)
        }
    }
}

/// The node's HBONE pool within `agent.limits`: as many streams per connection as a peer
/// proxy accepts, its handshake timeout, and the HTTP/2 limits and PINGs.
fn pool_config(limits: &proxy::limits::Config) -> hbone::PoolConfig {
    hbone::PoolConfig {
        max_streams_per_connection: limits.hbone.max_concurrent_streams as usize,
        handshake_timeout: limits.hbone.handshake_timeout,
        http2: limits.hbone,
        ..hbone::PoolConfig::default()
    }
}

/// The first SIGTERM or SIGINT from the call on.
fn terminate() -> impl Future<Output = ()> {
    signals_reach(count_signals(), 1)
}

/// The number of SIGTERMs and SIGINTs since the call (the handlers are installed by it,
/// not by a first poll).
fn count_signals() -> watch::Receiver<u32> {
    let (tx, rx) = watch::channel(0);
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
    tokio::spawn(async move {
        let Ok(mut term) = term else {
            // Keeps the sender: no signal is ever counted.
            return std::future::pending::<()>().await;
        };
        loop {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
                // Nobody counts any more.
                () = tx.closed() => return,
            }
            tx.send_modify(|n| *n += 1);
        }
    });
    rx
}

/// Completes once `n` signals were counted.
async fn signals_reach(mut signals: watch::Receiver<u32>, n: u32) {
    if signals.wait_for(|count| *count >= n).await.is_err() {
        std::future::pending().await
    }
}

/// How long a successor waits for its pods' certificates before it serves the handed-over
/// listeners (the predecessor serves them meanwhile).
const HANDOVER_CERT_WAIT: Duration = Duration::from_secs(30);

/// How often readiness is looked at while a hand-over waits for it.
const HANDOVER_RECHECK: Duration = Duration::from_millis(100);

/// How often attachment is re-verified and failed enrollments retried.
const RECHECK_INTERVAL: Duration = Duration::from_secs(5);
