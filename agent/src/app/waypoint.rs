//! Wiring of `weft waypoint`: the waypoint's certificate (the agent's certificate manager,
//! with the in-process or remote CA), the state file and its reloads, the HBONE listener,
//! and the admin (15000: `/config_dump`, `/healthz/ready`, `POST /quitquitquit`),
//! metrics (15020: `/metrics`, `/healthz/ready`) and readiness (15021: `/healthz/ready`)
//! servers on `http::serve`.
//!
//! Ready when the waypoint has its certificate, its first snapshot and its listener; not
//! ready again once a signal or `/quitquitquit` starts its drain (`Waypoint::shut_down`).

use std::{collections::BTreeSet, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;
use serde_json::json;
use tokio::sync::{Notify, watch};
use tracing::info;

use super::{terminate, track_certificate_readiness};
use crate::{
    admin,
    drain::Drain,
    hbone, http,
    identity::{self, CertManager, CertSource},
    readiness::Ready,
    source::{self, SourceStatus, file::FileDoc},
    state::StateHandle,
    state::{MeshSettings, Snapshot},
    telemetry::{self, AccessLog, Registry, otlp, trace::SpanExporter},
    waypoint::{self, Waypoint},
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error(
        "a waypoint needs a CA: --ca-cert and --ca-key (in-process), or --ca-addr, --ca-token-file and --ca-root-cert"
    )]
    NoCa,
    #[error(transparent)]
    Kubernetes(#[from] source::kube::Error),
    #[error("invalid --otlp-endpoint: {0}")]
    Otlp(#[from] telemetry::otlp::Error),
    #[error("--config <state file> is required with the file source")]
    NoConfig,
    #[error(transparent)]
    Identity(#[from] identity::Error),
    #[error(transparent)]
    Hbone(#[from] hbone::Error),
    #[error(transparent)]
    Bind(#[from] admin::Error),
    #[error("invalid --jwks-ca-file: {0}")]
    JwksRoots(#[from] crate::jwt::FetchError),
}

/// Everything `weft waypoint` or `weft gateway` runs with, from its flags.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Settings {
    pub waypoint: waypoint::Config,
    /// What the L7 engine faces: the mesh (HBONE) or the outside (a Gateway's listeners).
    pub face: Face,
    pub identity: identity::Config,
    pub admin: admin::Config,
    pub telemetry: telemetry::Config,
    /// Where the snapshot comes from: the state file, or the Kubernetes API.
    pub source: source::Kind,
    /// The state file (file source).
    pub config_path: Option<PathBuf>,
    /// This pod's node (the Kubernetes source's "local pods"; a waypoint enrolls none).
    pub node_name: String,
    #[serde(skip)]
    pub reload_interval: Duration,
    /// The OTLP collector; the caller builds the exporter from it.
    pub otlp_endpoint: Option<String>,
}

/// Who the L7 engine serves.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Face {
    /// A waypoint: HBONE from the mesh, for the services bound to it.
    Waypoint,
    /// An ingress gateway: the listeners of the Gateway of its name, bound at `listen_ip`.
    #[serde(rename_all = "camelCase")]
    Gateway {
        listen_ip: std::net::IpAddr,
        /// The Secrets the Kubernetes source may read (the listeners' certificates).
        tls_secrets: Vec<String>,
    },
}

impl Face {
    /// `waypoint` or `gateway`: the log's component.
    pub fn component(&self) -> &'static str {
        match self {
            Face::Waypoint => "waypoint",
            Face::Gateway { .. } => "gateway",
        }
    }
}

/// Addresses actually bound (port 0 resolved).
#[derive(Clone, Copy, Debug)]
pub struct Bound {
    pub hbone: SocketAddr,
    pub admin: SocketAddr,
    pub metrics: SocketAddr,
    pub readiness: SocketAddr,
}

/// Everything the admin endpoints read.
struct Context {
    config: serde_json::Value,
    ready: Ready,
    waypoint: Waypoint,
    source: Arc<SourceStatus>,
    certs: CertManager,
    pool: hbone::Pool,
    registry: Registry,
    shutdown: Arc<Notify>,
}

/// Runs the waypoint on the state file (reloaded on change) until a signal or
/// `/quitquitquit`. `bound` learns the addresses once everything listens.
pub async fn run(
    settings: Settings,
    doc: FileDoc,
    exporter: Option<Arc<dyn SpanExporter>>,
    bound: Option<tokio::sync::oneshot::Sender<Bound>>,
) -> Result<(), Error> {
    // The first snapshot is the file read at start-up.
    let source_status = Arc::new(SourceStatus::new(source::Kind::File));
    source_status.accepted();
    let (state_tx, state_rx) = watch::channel(Arc::new(doc.snapshot.clone()));
    let path = settings.config_path.clone().ok_or(Error::NoConfig)?;
    tokio::spawn(source::file::watch(
        path,
        settings.reload_interval,
        doc,
        state_tx,
        Arc::clone(&source_status),
    ));
    serve(
        settings,
        state_rx,
        (source_status, None),
        Ready::default(),
        exporter,
        bound,
    )
    .await
}

/// Runs the waypoint on the Kubernetes API (in-cluster credentials): the cluster's
/// workloads, services, policies and waypoints, and the routes of the services bound to
/// this waypoint, whose status it writes.
pub async fn run_kubernetes(settings: Settings, mesh: MeshSettings) -> Result<(), Error> {
    let client = source::kube::client().await?;
    run_on_cluster(settings, client, mesh, None).await
}

/// `run_kubernetes` with a given API client (tests: a fake API server).
pub async fn run_on_cluster(
    settings: Settings,
    client: kube::Client,
    mesh: MeshSettings,
    bound: Option<tokio::sync::oneshot::Sender<Bound>>,
) -> Result<(), Error> {
    let source_status = Arc::new(SourceStatus::new(source::Kind::Kubernetes));
    let (state_tx, state_rx) = watch::channel(Arc::new(Snapshot::default()));
    let ready = Ready::default();
    let health = Arc::new(source::kube::Health::default());
    let config = source::kube::Config {
        routes_for: matches!(settings.face, Face::Waypoint).then(|| settings.waypoint.name.clone()),
        gateway_for: match &settings.face {
            Face::Waypoint => None,
            Face::Gateway { tls_secrets, .. } => Some(Box::new(source::kube::GatewayFor {
                gateway: settings.waypoint.name.clone(),
                tls_secrets: tls_secrets.clone(),
            })),
        },
        ..source::kube::Config::new(settings.node_name.clone())
    };
    info!(component = "kubernetes", waypoint = %settings.waypoint.name, "watching the Kubernetes API");
    tokio::spawn(source::kube::run(
        client,
        config,
        mesh,
        state_tx,
        source::kube::Report {
            status: Arc::clone(&source_status),
            health: Arc::clone(&health),
            ready: ready.clone(),
        },
    ));
    // The watches' health on /metrics, as the agent has it.
    let metrics = source::kube::Metrics::new(health);
    serve(
        settings,
        state_rx,
        (source_status, Some(metrics)),
        ready,
        None,
        bound,
    )
    .await
}

/// Runs the waypoint on snapshots from any source (`state` holds the first one; the
/// source keeps `source_status`, may export its own metrics and may hold conditions of
/// `ready`), until a signal or `/quitquitquit`. Spans go to `exporter` if given, else to the OTLP collector of the
/// settings, if any.
pub async fn serve(
    settings: Settings,
    state_rx: StateHandle,
    (source_status, source_metrics): (Arc<SourceStatus>, Option<source::kube::Metrics>),
    ready: Ready,
    exporter: Option<Arc<dyn SpanExporter>>,
    bound: Option<tokio::sync::oneshot::Sender<Bound>>,
) -> Result<(), Error> {
    ready.block("listening", "listener not bound yet");
    let certs = identity::start(&settings.identity)?.ok_or(Error::NoCa)?;
    let own = settings.waypoint.identity.clone();
    certs.set_wanted(BTreeSet::from([own.clone()]));
    track_certificate_readiness(certs.clone(), ready.clone());
    if source_status.view().generation == 0 {
        // A source that has not delivered yet (Kubernetes before its caches synced).
        ready.block("snapshot", "waiting for the first snapshot from the source");
        let (mut first, ready) = (state_rx.clone(), ready.clone());
        tokio::spawn(async move {
            if first.changed().await.is_ok() {
                ready.unblock("snapshot");
            }
        });
    }

    let cert_source: Arc<dyn CertSource> = Arc::new(certs.clone());
    let pool = hbone::Pool::new(Arc::clone(&cert_source), hbone::PoolConfig::default());
    let mut registry = Registry::new(&settings.telemetry.metrics_prefix);
    if let Some(source_metrics) = source_metrics {
        registry.register_collector(source_metrics);
    }
    let metrics = waypoint::Metrics::new(&mut registry);
    let http_metrics = http::Metrics::new(registry.prometheus_mut());
    let exporter = match (exporter, &settings.otlp_endpoint) {
        (Some(exporter), _) => Some(exporter),
        (None, Some(endpoint)) => {
            let mut config =
                otlp::Config::new(endpoint.clone(), settings.waypoint.name.name.clone());
            config.namespace = Some(settings.waypoint.name.namespace.clone());
            let exporter = otlp::OtlpExporter::new(config, otlp::Metrics::new(&mut registry))?;
            info!(component = "waypoint", endpoint = %endpoint, "exporting spans to the OTLP collector");
            Some(Arc::new(exporter) as Arc<dyn SpanExporter>)
        }
        (None, None) => None,
    };
    let drain = Drain::default();
    registry.register_collector(drain.metrics_named(&waypoint::DRAIN_METRICS));
    telemetry::register_output_metrics(&mut registry);
    let waypoint = Waypoint::new(
        settings.waypoint.clone(),
        state_rx,
        pool.clone(),
        metrics,
        AccessLog::stdout(),
        exporter,
        drain,
    )?;
    let hbone_addr = match &settings.face {
        Face::Waypoint => {
            let tls = hbone::server_config(cert_source, own.clone())?;
            let listener = admin::bind(settings.waypoint.listen_addr)?;
            let hbone_addr = listener
                .local_addr()
                .unwrap_or(settings.waypoint.listen_addr);
            // Ends by itself when the drain starts, closing the listener.
            tokio::spawn(waypoint.clone().serve(listener, tls));
            ready.unblock("listening");
            hbone_addr
        }
        Face::Gateway { listen_ip, .. } => {
            let (bound_tx, bound_rx) = watch::channel(Vec::new());
            tokio::spawn(waypoint.clone().serve_gateway(*listen_ip, bound_tx));
            track_listeners(bound_rx, ready.clone());
            SocketAddr::new(*listen_ip, 0)
        }
    };

    let admin = admin::bind(settings.admin.admin_addr)?;
    let metrics_listener = admin::bind(settings.admin.metrics_addr)?;
    let readiness = admin::bind(settings.admin.readiness_addr)?;
    let addresses = Bound {
        hbone: hbone_addr,
        admin: admin.local_addr().unwrap_or(settings.admin.admin_addr),
        metrics: metrics_listener
            .local_addr()
            .unwrap_or(settings.admin.metrics_addr),
        readiness: readiness
            .local_addr()
            .unwrap_or(settings.admin.readiness_addr),
    };
    let shutdown = Arc::new(Notify::new());
    let context = Arc::new(Context {
        config: serde_json::to_value(&settings).unwrap_or_default(),
        ready,
        waypoint,
        source: source_status,
        certs,
        pool,
        registry,
        shutdown: Arc::clone(&shutdown),
    });
    for (listener, endpoints, server) in [
        (admin, Endpoints::Admin, "admin"),
        (metrics_listener, Endpoints::Metrics, "metrics"),
        (readiness, Endpoints::Readiness, "readiness"),
    ] {
        let context = Arc::clone(&context);
        let gate = http::Gate::new(server, settings.admin.http, http_metrics.clone());
        tokio::spawn(http::serve(listener, gate, move |req| {
            route(&context, endpoints, req)
        }));
    }
    info!(component = "waypoint", identity = %own, hbone = %addresses.hbone, admin = %addresses.admin,
        metrics = %addresses.metrics, readiness = %addresses.readiness, "waypoint listening");
    if let Some(bound) = bound {
        let _ = bound.send(addresses);
    }
    tokio::select! {
        () = shutdown.notified() => {}
        () = terminate() => {}
    }
    // Listened for before the drain starts: a second signal cuts it short.
    let second_signal = terminate();
    tokio::pin!(second_signal);
    context.ready.block(
        "draining",
        "the waypoint is stopping: it serves the open connections until they end",
    );
    let grace = settings.waypoint.listen_grace;
    let mut interrupted = false;
    if !grace.is_zero() {
        info!(component = "waypoint", grace = %humantime::format_duration(grace),
            "stopping: not ready, still accepting while every node sees the endpoint go (--listen-grace)");
        interrupted = tokio::select! {
            () = tokio::time::sleep(grace) => false,
            () = &mut second_signal => true,
        };
    }
    let shutdown = if interrupted {
        context.waypoint.shut_down(std::future::ready(())).await
    } else {
        context.waypoint.shut_down(second_signal).await
    };
    info!(
        component = "waypoint",
        cut = shutdown.cut(),
        "shutting down"
    );
    Ok(())
}

/// Ready while the gateway listens on some port: a gateway without listeners (its
/// Gateway not there yet, or not valid) takes no traffic.
fn track_listeners(mut bound: watch::Receiver<Vec<SocketAddr>>, ready: Ready) {
    tokio::spawn(async move {
        loop {
            if bound.borrow_and_update().is_empty() {
                ready.block("listening", "no listener of the Gateway is bound");
            } else {
                ready.unblock("listening");
            }
            if bound.changed().await.is_err() {
                return;
            }
        }
    });
}

#[derive(Clone, Copy)]
enum Endpoints {
    Admin,
    Metrics,
    Readiness,
}

fn route(context: &Context, endpoints: Endpoints, req: &Request<Bytes>) -> Response<Full<Bytes>> {
    match (endpoints, req.method(), req.uri().path()) {
        (_, &Method::GET, "/healthz/ready") => admin::ready(&context.ready),
        (Endpoints::Metrics, &Method::GET, "/metrics") => {
            admin::metrics_response(&context.registry)
        }
        (Endpoints::Admin, &Method::GET, "/config_dump") => http::json(&json!({
            "config": context.config,
            "source": context.source.view(),
            "snapshot": &*context.waypoint.snapshot(),
            "certificates": context.certs.status(),
            "hbonePool": context.pool.stats(),
        })),
        (Endpoints::Admin, &Method::POST, "/quitquitquit") => admin::quit(req, &context.shutdown),
        _ => http::text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

/// How often the waypoint's state file is checked for changes.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests;
