//! TLS passthrough and TCP listeners: the connection's bytes go, untouched, to one
//! endpoint of the backend the listener's route picks, over HBONE as the gateway's
//! identity. A TLS listener reads the client's ClientHello first (rustls parses it; the
//! gateway never answers it) for its SNI, which picks the listener and the TLSRoute, and
//! replays it to the backend; a TCP listener's TCPRoute needs nothing from the client.
//!
//! Limits: the ClientHello within `listener::HANDSHAKE_TIMEOUT` and `MAX_CLIENT_HELLO`
//! bytes. Each connection ends counted in `gateway_passthrough_connections{result}` and
//! with one access-log line (`kind: "connection"`).

use std::time::{Instant, SystemTime};

use http::HeaderMap;
use serde::Serialize;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tracing::debug;

use super::HANDSHAKE_TIMEOUT;
use crate::{
    state::gateway::ListenerProtocol,
    waypoint::{
        Target, Tunnel, backend,
        plan::Destination,
        route::{self, RequestView, Routing},
    },
};

/// The most a ClientHello may take (TLS allows 16 KiB records; post-quantum key shares
/// make hellos of a few KiB).
pub const MAX_CLIENT_HELLO: usize = 16 * 1024;

/// One passthrough connection's access-log line.
#[derive(Debug, Default, Serialize)]
struct ConnectionRecord {
    kind: &'static str,
    reporter: &'static str,
    start_time: String,
    duration_ms: u64,
    #[serde(rename = "src.addr")]
    src_addr: String,
    /// The listener's port and protocol (`TLS`, `TCP`).
    port: u16,
    protocol: &'static str,
    /// The ClientHello's server name (TLS listeners).
    sni: Option<String>,
    route: Option<String>,
    #[serde(rename = "dst.service")]
    dst_service: Option<String>,
    upstream_host: Option<String>,
    /// Client → backend, and back.
    bytes_received: u64,
    bytes_sent: u64,
    /// `null`, or why the connection was refused or broke off (the metric's `result`).
    error: Option<&'static str>,
}

/// Passes `client`'s connection through to the backend its listener's route picks.
pub async fn serve(tunnel: Tunnel, mut client: TcpStream) {
    let started = Instant::now();
    let mut record = ConnectionRecord {
        kind: "connection",
        reporter: "gateway",
        start_time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        src_addr: tunnel.source.to_string(),
        ..ConnectionRecord::default()
    };
    let result = pass(&tunnel, &mut client, &mut record).await;
    record.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    if let Err(reason) = result {
        debug!(component = "gateway", src = %tunnel.source, reason, "passthrough connection refused or failed");
        record.error = Some(reason);
    }
    tunnel
        .inner
        .metrics
        .passthrough(record.error.unwrap_or("ok"));
    tunnel.inner.access_log.write_json(&record);
}

async fn pass(
    tunnel: &Tunnel,
    client: &mut TcpStream,
    record: &mut ConnectionRecord,
) -> Result<(), &'static str> {
    let Target::Listener {
        gateway,
        port,
        protocol,
    } = &tunnel.target
    else {
        return Err("not_a_listener");
    };
    record.port = *port;
    record.protocol = protocol.name();
    let (sni, hello) = match protocol {
        ListenerProtocol::Tls => tokio::time::timeout(HANDSHAKE_TIMEOUT, client_hello(client))
            .await
            .map_err(|_| "client_hello_timeout")??,
        _ => (None, Vec::new()),
    };
    record.sni.clone_from(&sni);
    let view = tunnel.inner.view();
    let snapshot = &view.snapshot;
    let gateway = snapshot.gateways.get(gateway).ok_or("no_route")?;
    let listener =
        route::listener_for(gateway, *port, *protocol, sni.as_deref()).ok_or("no_route")?;
    let headers = HeaderMap::new();
    let request = RequestView {
        method: "",
        path: "/",
        query: None,
        headers: &headers,
        host: sni.as_deref(),
    };
    let Routing::Rule(selected) = view
        .routes
        .select_for_listener(snapshot, gateway, listener, &request)
    else {
        return Err("no_route");
    };
    record.route = Some(selected.route.name.to_string());
    let backend = backend::pick_weighted(&selected.rule.backends).ok_or("no_backend")?;
    record.dst_service = Some(backend.service.name.to_string());
    let endpoint = Destination::Service(backend.service.clone())
        .endpoint(snapshot, &tunnel.inner.trust_domain, backend::any)
        .map_err(|e| e.reason())?;
    record.upstream_host = Some(endpoint.addr.to_string());
    let mut upstream = tunnel
        .inner
        .upstreams
        .tunnel(&endpoint, tunnel.source)
        .await
        .map_err(|e| e.reason())?;
    drop(view);
    upstream
        .write_all(&hello)
        .await
        .map_err(|_| "upstream_failed")?;
    record.bytes_received = hello.len() as u64;
    let (received, sent) = tokio::io::copy_bidirectional(client, &mut upstream)
        .await
        .map_err(|_| "reset")?;
    record.bytes_received += received;
    record.bytes_sent = sent;
    Ok(())
}

/// The ClientHello's SNI (lowercase) and every byte read to get it.
async fn client_hello(client: &mut TcpStream) -> Result<(Option<String>, Vec<u8>), &'static str> {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut read = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = client.read(&mut chunk).await.map_err(|_| "reset")?;
        if n == 0 {
            return Err("client_closed");
        }
        read.extend_from_slice(&chunk[..n]);
        if read.len() > MAX_CLIENT_HELLO {
            return Err("client_hello_too_large");
        }
        let mut fed = &chunk[..n];
        while !fed.is_empty() {
            match acceptor.read_tls(&mut fed) {
                Ok(0) | Err(_) => return Err("bad_client_hello"),
                Ok(_) => {}
            }
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                let sni = accepted
                    .client_hello()
                    .server_name()
                    .map(str::to_ascii_lowercase);
                return Ok((sni, read));
            }
            Ok(None) => {}
            Err(_) => return Err("bad_client_hello"),
        }
    }
}
