//! Policy routing inside a pod, so that the proxy can connect to the application *as the
//! client* (a socket with `IP_TRANSPARENT`, bound to the client's address) and still get
//! the application's replies:
//!
//! - `net.ipv4.tcp_fwmark_accept = 1`: a socket the application accepts takes the mark of
//!   the SYN that opened it, so every packet it sends back carries [`REPLY_MARK`];
//! - the rule `fwmark REPLY_MARK lookup REPLY_TABLE`, and in that table the one route
//!   `local default dev lo`: those packets are delivered inside the pod, to the proxy's
//!   socket, instead of leaving through eth0 towards the real client.
//!
//! Nothing else in the pod carries the mark: the kernel clears marks when a packet changes
//! namespace, so no packet from outside brings it in. No iptables. IPv4 only for now: an
//! IPv6 client is not impersonated, and the application sees the pod's own address.
//!
//! The routing stays for the pod's life, also after un-enrollment: connections opened as the
//! client may still be draining then, and without the rule their replies would leave the
//! pod. It is inert once no proxy socket carries the mark.

use std::{io, net::IpAddr, os::fd::AsRawFd};

use ebpf_common::netns::LOOPBACK_IFINDEX;
use nix::sys::socket::{
    AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, recv, send, socket,
};
use socket2::Domain;

use super::PodNetns;

/// The mark of the proxy's client-addressed sockets and, through `tcp_fwmark_accept`, of
/// the application's side of those connections. "wf" in ASCII.
pub const REPLY_MARK: u32 = 0x7766;
/// The routing table holding the route that delivers marked packets locally.
const REPLY_TABLE: u32 = REPLY_MARK;
/// Before the main table's rule (32766), after the local table's (0).
const RULE_PRIORITY: u32 = 32_700;

const FWMARK_ACCEPT: &str = "/proc/sys/net/ipv4/tcp_fwmark_accept";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot enter the pod's network namespace: {0}")]
    Enter(#[source] io::Error),
    #[error("cannot set {FWMARK_ACCEPT} to 1: {0}")]
    FwmarkAccept(#[source] io::Error),
    #[error("cannot open a netlink socket: {0}")]
    Netlink(#[source] io::Error),
    #[error("cannot add the {what} for marked replies: {source}")]
    Add {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Installs the reply routing in the pod, again at every enrollment (a restarted or
/// upgraded agent too): an identical rule stays, the table's default route is replaced.
pub fn install(netns: &PodNetns) -> Result<(), Error> {
    netns.run(install_here).map_err(Error::Enter)?
}

fn install_here() -> Result<(), Error> {
    accept_marks().map_err(Error::FwmarkAccept)?;
    let netlink = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )
    .map_err(|e| Error::Netlink(e.into()))?;
    let add = |what, message: Vec<u8>| {
        request(netlink.as_raw_fd(), &message).map_err(|source| Error::Add { what, source })
    };
    add("routing rule", rule_message())?;
    add("route", route_message())
}

/// Sets `tcp_fwmark_accept` in the calling thread's network namespace, unless it is set.
/// Read first: where `/proc/sys` is read-only (the agent's container when it is not
/// privileged), the CNI plugin, root on the host, may have set it at ADD.
pub fn accept_marks() -> io::Result<()> {
    let set = std::fs::read_to_string(FWMARK_ACCEPT).is_ok_and(|value| value.trim() == "1");
    if set {
        return Ok(());
    }
    std::fs::write(FWMARK_ACCEPT, "1")
}

/// Whether this routing brings back the replies to a proxy socket of `domain` bound to the
/// client address `ip`: a routable IPv4 unicast address. Not loopback (the kernel drops it
/// arriving from elsewhere), and not IPv6 (the routing is IPv4 only).
pub fn can_carry(domain: Domain, ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            domain == Domain::IPV4
                && !v4.is_loopback()
                && !v4.is_unspecified()
                && !v4.is_multicast()
                && !v4.is_broadcast()
        }
        IpAddr::V6(_) => false,
    }
}

const RTM_NEWROUTE: u16 = 24;
const RTM_NEWRULE: u16 = 32;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const AF_INET: u8 = libc::AF_INET as u8;

/// `fwmark REPLY_MARK/0xffffffff lookup REPLY_TABLE pref RULE_PRIORITY`.
fn rule_message() -> Vec<u8> {
    const FR_ACT_TO_TBL: u8 = 1;
    const FRA_PRIORITY: u16 = 6;
    const FRA_FWMARK: u16 = 10;
    const FRA_TABLE: u16 = 15;
    const FRA_FWMASK: u16 = 16;
    // struct fib_rule_hdr: family, dst_len, src_len, tos, table, res1, res2, action; flags.
    let header = [AF_INET, 0, 0, 0, 0, 0, 0, FR_ACT_TO_TBL, 0, 0, 0, 0];
    // Rules may repeat, so an identical one must be refused (EXCL) for a second install
    // to add none.
    message(
        RTM_NEWRULE,
        NLM_F_EXCL,
        header,
        &[
            (FRA_PRIORITY, RULE_PRIORITY),
            (FRA_FWMARK, REPLY_MARK),
            (FRA_FWMASK, u32::MAX),
            (FRA_TABLE, REPLY_TABLE),
        ],
    )
}

/// `local 0.0.0.0/0 dev lo table REPLY_TABLE`.
fn route_message() -> Vec<u8> {
    const RTPROT_STATIC: u8 = 4;
    const RT_SCOPE_HOST: u8 = 254;
    const RTN_LOCAL: u8 = 2;
    const RTA_OIF: u16 = 4;
    const RTA_TABLE: u16 = 15;
    // struct rtmsg: family, dst_len, src_len, tos, table (RTA_TABLE says), protocol, scope,
    // type; flags.
    let header = [
        AF_INET,
        0,
        0,
        0,
        0,
        RTPROT_STATIC,
        RT_SCOPE_HOST,
        RTN_LOCAL,
        0,
        0,
        0,
        0,
    ];
    // Whatever route the table held for the default prefix, ours replaces it.
    message(
        RTM_NEWROUTE,
        NLM_F_REPLACE,
        header,
        &[(RTA_TABLE, REPLY_TABLE), (RTA_OIF, LOOPBACK_IFINDEX)],
    )
}

/// One netlink request to create an entry (`how`: `NLM_F_EXCL` or `NLM_F_REPLACE` for one
/// that exists): header, the 12-byte family header, then `u32` attributes. It asks for an
/// acknowledgement.
fn message(kind: u16, how: u16, family_header: [u8; 12], attributes: &[(u16, u32)]) -> Vec<u8> {
    const NLMSG_HEADER: usize = 16;
    const ATTRIBUTE: usize = 8;
    let len = NLMSG_HEADER + family_header.len() + attributes.len() * ATTRIBUTE;
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | how;
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&1u32.to_ne_bytes()); // sequence number: one request at a time
    out.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
    out.extend_from_slice(&family_header);
    for (kind, value) in attributes {
        out.extend_from_slice(&(ATTRIBUTE as u16).to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(&value.to_ne_bytes());
    }
    out
}

/// Sends `message` to the kernel and reads its acknowledgement; the identical rule existing
/// already (`EEXIST`) is success.
fn request(netlink: i32, message: &[u8]) -> io::Result<()> {
    send(netlink, message, MsgFlags::empty())?;
    let mut reply = [0u8; 1024];
    let n = recv(netlink, &mut reply, MsgFlags::empty())?;
    match acknowledgement(&reply[..n]) {
        Some(0) => Ok(()),
        Some(errno) if -errno == libc::EEXIST => Ok(()),
        Some(errno) => Err(io::Error::from_raw_os_error(-errno)),
        None => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the kernel's netlink reply is not an acknowledgement",
        )),
    }
}

/// The error code of an `NLMSG_ERROR` reply (0 for an acknowledgement).
fn acknowledgement(reply: &[u8]) -> Option<i32> {
    let kind = u16::from_ne_bytes(reply.get(4..6)?.try_into().ok()?);
    if kind != NLMSG_ERROR {
        return None;
    }
    Some(i32::from_ne_bytes(reply.get(16..20)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_what_iproute2_would_send() {
        let rule = rule_message();
        assert_eq!(rule.len(), 16 + 12 + 4 * 8);
        assert_eq!(u32::from_ne_bytes(rule[0..4].try_into().unwrap()), 60);
        assert_eq!(u16::from_ne_bytes(rule[4..6].try_into().unwrap()), 32);
        assert_eq!(rule[16], AF_INET);
        assert_eq!(rule[23], 1, "action: to table");
        let flags = |m: &[u8]| u16::from_ne_bytes(m[6..8].try_into().unwrap());
        assert_eq!(flags(&rule) & (NLM_F_EXCL | NLM_F_REPLACE), NLM_F_EXCL);
        let route = route_message();
        assert_eq!(flags(&route) & (NLM_F_EXCL | NLM_F_REPLACE), NLM_F_REPLACE);
        assert_eq!(route.len(), 16 + 12 + 2 * 8);
        assert_eq!(&route[16..24], &[AF_INET, 0, 0, 0, 0, 4, 254, 2]);
    }

    #[test]
    fn only_routable_ipv4_clients_are_carried() {
        let v4 = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(can_carry(Domain::IPV4, v4("10.4.0.7")));
        for ip in [
            "127.0.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "fd00::7",
        ] {
            assert!(!can_carry(Domain::IPV4, v4(ip)), "{ip}");
        }
        assert!(!can_carry(Domain::IPV6, v4("10.4.0.7")), "an IPv6 socket");
        assert!(!can_carry(Domain::IPV6, v4("fd00::7")), "no IPv6 routing");
    }

    #[test]
    fn only_an_error_message_is_an_acknowledgement() {
        let mut reply = vec![0u8; 36];
        reply[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        reply[16..20].copy_from_slice(&(-libc::EEXIST).to_ne_bytes());
        assert_eq!(acknowledgement(&reply), Some(-libc::EEXIST));
        reply[4..6].copy_from_slice(&RTM_NEWROUTE.to_ne_bytes());
        assert_eq!(acknowledgement(&reply), None);
        assert_eq!(acknowledgement(&reply[..10]), None);
    }
}
