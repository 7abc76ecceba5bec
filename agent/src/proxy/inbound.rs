//! Inbound: sk_lookup steered a connection addressed to the pod onto the proxy's inbound
//! listener. The accepted socket's local address is the original destination (sk_lookup
//! keeps it), so the proxy connects to it from inside the pod over loopback — where
//! sk_lookup does not steer again — and copies.
//!
//! The application sees the proxy's loopback connection; the real client address is in
//! the proxy's record and access log. (Spoofing it with IP_TRANSPARENT would need policy
//! routing inside the pod for the replies, which weft does not install.)

use std::{net::SocketAddr, sync::Arc};

use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::{CONNECT_TIMEOUT, Direction, Error, PodContext, Proxy, copy, socket};

pub async fn handle(proxy: &Proxy, pod: &Arc<PodContext>, mut client: TcpStream, peer: SocketAddr) {
    let dst = match client.local_addr() {
        Ok(dst) => dst,
        Err(e) => {
            debug!(component = "proxy", error = %e, "inbound connection gone before handling");
            return;
        }
    };
    let tracked = proxy
        .connections()
        .open(Direction::Inbound, pod.workload.to_string(), peer, dst);
    tracked.set_upstream(dst, None);
    let result = async {
        let mut upstream = socket::connect(pod.sockets.as_ref(), dst, CONNECT_TIMEOUT).await?;
        copy::bidirectional(&mut client, &mut upstream, &tracked.sent, &tracked.received).await
    }
    .await;
    if result.is_err() {
        copy::reset(&client);
    }
    proxy.connections().close(&tracked, result.err().as_ref());
}

/// The HBONE listener exists (so the port is owned and steering is exact) but mutual TLS
/// arrives with the next version: refuse loudly instead of accepting and hanging.
pub fn refuse_hbone(proxy: &Proxy, pod: &Arc<PodContext>, client: TcpStream, peer: SocketAddr) {
    let dst = client.local_addr().unwrap_or(peer);
    let tracked = proxy
        .connections()
        .open(Direction::Hbone, pod.workload.to_string(), peer, dst);
    warn!(component = "proxy", pod = %pod.workload, src = %peer, "HBONE connection refused: not supported by this agent");
    copy::reset(&client);
    proxy
        .connections()
        .close(&tracked, Some(&Error::HboneUnsupported));
}
