//! TLS passthrough and TCP listeners: the connection's bytes go, untouched, to one
//! endpoint of the backend the listener's route picks, over HBONE as the gateway's
//! identity. A TLS listener reads the client's ClientHello first (rustls parses it; the
//! gateway never answers it) for its SNI, which picks the listener and the TLSRoute, and
//! replays it to the backend; a TCP listener's TCPRoute needs nothing from the client.
//!
//! Limits: the ClientHello within `listener::HANDSHAKE_TIMEOUT` and `MAX_CLIENT_HELLO`
//! bytes. Each connection ends counted in `gateway_passthrough_connections{result}`.

use http::HeaderMap;
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

/// Passes `client`'s connection through to the backend its listener's route picks.
pub async fn serve(tunnel: Tunnel, mut client: TcpStream) {
    let metrics = &tunnel.inner.metrics;
    let result = match pass(&tunnel, &mut client).await {
        Ok(()) => "ok",
        Err(reason) => {
            debug!(component = "gateway", src = %tunnel.source, reason, "passthrough connection refused or failed");
            reason
        }
    };
    metrics.passthrough(result);
}

async fn pass(tunnel: &Tunnel, client: &mut TcpStream) -> Result<(), &'static str> {
    let Target::Listener {
        gateway,
        port,
        protocol,
    } = &tunnel.target
    else {
        return Err("not_a_listener");
    };
    let (sni, hello) = match protocol {
        ListenerProtocol::Tls => tokio::time::timeout(HANDSHAKE_TIMEOUT, client_hello(client))
            .await
            .map_err(|_| "client_hello_timeout")??,
        _ => (None, Vec::new()),
    };
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
    let backend = backend::pick_weighted(&selected.rule.backends).ok_or("no_backend")?;
    let endpoint = Destination::Service(backend.service.clone())
        .endpoint(snapshot, &tunnel.inner.trust_domain, backend::any)
        .map_err(|e| e.reason())?;
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
    tokio::io::copy_bidirectional(client, &mut upstream)
        .await
        .map(|_| ())
        .map_err(|_| "reset")
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
