//! The proxy's listening sockets inside a pod: outbound (loopback, where connect4/6 send
//! the pod's connections), inbound plaintext (loopback, reached only through sk_lookup) and
//! HBONE (all addresses). All carry the proxy mark.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

use ebpf_common::netns::NetnsCookie;

use socket2::{Domain, Protocol, Socket, Type};
use tracing::debug;

use crate::netns::PodNetns;
use crate::proxy::{self, PodListeners};

/// Creates the pod's listeners inside its namespace. IPv6 listeners are created only when
/// the pod has an IPv6 address (inbound, HBONE) or the namespace has `::1` (outbound).
pub fn create(
    netns: &PodNetns,
    pod_ips: &[IpAddr],
    config: &proxy::Config,
    inherited: &mut Inherited,
    cookie: NetnsCookie,
) -> io::Result<PodListeners> {
    let has_v6 = pod_ips.iter().any(IpAddr::is_ipv6);
    let ports = config.ports;
    let mut open = |addr, mark| match inherited.0.remove(&(cookie, addr)) {
        // The predecessor's socket, checked by `handover::validate`: its queue of
        // connects is served on, nothing is bound in its place.
        Some(socket) => socket.set_nonblocking(true).map(|()| socket),
        None => bind(addr, mark),
    };
    let sockets = netns.run(|| -> io::Result<_> {
        let mut outbound = vec![open(loopback_v4(ports.outbound), config.mark)?];
        match open(loopback_v6(ports.outbound), config.mark) {
            Ok(s) => outbound.push(s),
            // No IPv6 in this pod: connect6 then has nowhere to go and fails closed.
            Err(e) => debug!(component = "enroll", error = %e, "no IPv6 outbound listener"),
        }
        let mut inbound = vec![open(loopback_v4(ports.inbound), config.mark)?];
        let mut hbone = vec![open(
            SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), ports.hbone),
            config.mark,
        )?];
        if has_v6 {
            inbound.push(open(loopback_v6(ports.inbound), config.mark)?);
            hbone.push(open(
                SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), ports.hbone),
                config.mark,
            )?);
        }
        Ok((outbound, inbound, hbone))
    })??;
    let (outbound, inbound, hbone) = sockets;
    Ok(PodListeners {
        outbound: into_tokio(outbound)?,
        inbound: into_tokio(inbound)?,
        hbone: into_tokio(hbone)?,
    })
}

/// Listeners a predecessor agent handed over, by pod netns and address; each is taken once,
/// by the enrollment of its pod.
#[derive(Debug, Default)]
pub struct Inherited(HashMap<(NetnsCookie, SocketAddr), Socket>);

impl Inherited {
    pub fn insert(&mut self, cookie: NetnsCookie, listener: std::net::TcpListener) {
        if let Ok(addr) = listener.local_addr() {
            self.0.insert((cookie, addr), listener.into());
        }
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn bind(addr: SocketAddr, mark: u32) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        // One family per socket: sk_lookup assigns by family, and the v4 listener owns v4.
        socket.set_only_v6(true)?;
    }
    // A restarted agent must be able to bind while the old connections sit in TIME_WAIT.
    socket.set_reuse_address(true)?;
    socket.set_mark(mark)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket)
}

fn into_tokio(sockets: Vec<Socket>) -> io::Result<Vec<Arc<tokio::net::TcpListener>>> {
    sockets
        .into_iter()
        .map(|s| tokio::net::TcpListener::from_std(s.into()).map(Arc::new))
        .collect()
}

fn loopback_v4(port: u16) -> SocketAddr {
    SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port)
}

fn loopback_v6(port: u16) -> SocketAddr {
    SocketAddr::new(Ipv6Addr::LOCALHOST.into(), port)
}

const BACKLOG: i32 = 1024;
