//! What crosses the wire: a tcpdump capture inside a node's or pod's netns, and plain
//! assertions on the pcap it writes ("this payload never appears in plaintext").
//!
//! The pcap is read here without a dissector (24-byte file header, 16-byte record headers):
//! small, and enough to count packets and search payload bytes. Questions about protocols
//! (which TLS version was negotiated, how many connections were opened) go to tshark
//! (`Pcap::tshark`), installed by `cargo xtask setup`.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};

use crate::{eventually::eventually, node::TestNode, pod::TestPod, process::TestProcess};

/// A running `tcpdump -w`.
pub struct Capture {
    process: TestProcess,
    file: PathBuf,
}

/// A finished capture.
pub struct Pcap {
    pub file: PathBuf,
    /// The pcap link type (1: Ethernet).
    link_type: u32,
    packets: Vec<Vec<u8>>,
}

impl Capture {
    /// Captures on `iface` of the node's netns (`br0` sees every pod's traffic).
    pub fn on_node(node: &TestNode, iface: &str, filter: &str) -> Result<Self> {
        let file = node.dir().join(format!("capture-{iface}.pcap"));
        let process = node.spawn(tcpdump(iface, filter, &file), &format!("tcpdump-{iface}"))?;
        Self::started(process, file)
    }

    /// Captures on `iface` of a pod's netns (`eth0`), from outside the pod's cgroup.
    pub fn on_pod(node: &TestNode, pod: &TestPod, iface: &str, filter: &str) -> Result<Self> {
        Self::in_netns(node, &pod.netns_path(), &pod.name(), iface, filter)
    }

    /// Captures on `iface` of the network namespace at `netns` (e.g. the internet's of
    /// `crate::internet`), named `name` in the node's directory, run as a process of `node`.
    pub fn in_netns(
        node: &TestNode,
        netns: &Path,
        name: &str,
        iface: &str,
        filter: &str,
    ) -> Result<Self> {
        let file =
            crate::process::unique_path(node.dir(), &format!("capture-{name}-{iface}"), "pcap");
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", netns.display()));
        cmd.arg("--").args(tcpdump_args(iface, filter, &file));
        let process = node.spawn(cmd, &format!("tcpdump-{name}-{iface}"))?;
        Self::started(process, file)
    }

    fn started(mut process: TestProcess, file: PathBuf) -> Result<Self> {
        // tcpdump says "listening on <iface>" once the socket is bound: from then on
        // nothing is missed.
        eventually(Duration::from_secs(10), || {
            if let Some(status) = process.try_status() {
                bail!("tcpdump exited ({status}): {}", process.output());
            }
            if process.output().contains("listening on") {
                Ok(())
            } else {
                bail!("tcpdump not listening yet: {}", process.output())
            }
        })?;
        Ok(Capture { process, file })
    }

    /// Stops tcpdump once the capture holds at least `bytes` of TCP payload, and reads it.
    /// What did *not* cross the wire ("no plaintext") is only proven by a capture of all
    /// that did: give the bytes the test sent (both ways), and a capture that never holds
    /// them is an error, not a pass.
    pub fn stop_after(self, bytes: u64) -> Result<Pcap> {
        let seen = eventually(Duration::from_secs(10), || {
            let got = Pcap::read(&self.file)?.tcp_payload_bytes();
            ensure!(
                got >= bytes,
                "the capture holds {got} bytes of TCP payload, the test sent at least {bytes}"
            );
            Ok(())
        });
        let pcap = self.stop()?;
        seen.with_context(|| format!("short capture {}", pcap.file.display()))?;
        Ok(pcap)
    }

    /// Stops tcpdump (SIGINT flushes the file) and reads the capture. Fails when tcpdump
    /// did not write every packet its filter took (its exit statistics say so).
    pub fn stop(mut self) -> Result<Pcap> {
        // Lets tcpdump write what is already in its ring: the file stops growing.
        let mut last = None;
        let _ = eventually(Duration::from_secs(2), || {
            let size = std::fs::metadata(&self.file).map(|m| m.len()).ok();
            let settled = size.is_some() && size == last;
            last = size;
            ensure!(settled, "tcpdump still writing");
            Ok(())
        });
        self.process.signal_and_reap(libc::SIGINT);
        let output = self.process.output();
        let stats = TcpdumpStats::parse(&output)
            .with_context(|| format!("tcpdump printed no statistics: {output}"))?;
        ensure!(
            stats.captured == stats.received && stats.dropped == 0,
            "tcpdump wrote {} of the {} packets its filter took ({} dropped by the kernel): \
             {} is short",
            stats.captured,
            stats.received,
            stats.dropped,
            self.file.display()
        );
        Pcap::read(&self.file)
    }
}

/// The counts tcpdump prints as it exits.
#[derive(Debug, PartialEq, Eq)]
struct TcpdumpStats {
    /// Written to the file.
    captured: u64,
    /// Taken by the filter (written or not).
    received: u64,
    dropped: u64,
}

impl TcpdumpStats {
    /// `N packets captured`, `N packets received by filter`, `N packets dropped by kernel`
    /// (`1 packet …`).
    fn parse(output: &str) -> Option<Self> {
        let count = |what: &str| {
            output.lines().find_map(|line| {
                let (n, rest) = line.trim().split_once(' ')?;
                let rest = rest
                    .strip_prefix("packets ")
                    .or(rest.strip_prefix("packet "))?;
                (rest == what).then(|| n.parse::<u64>().ok()).flatten()
            })
        };
        Some(Self {
            captured: count("captured")?,
            received: count("received by filter")?,
            dropped: count("dropped by kernel")?,
        })
    }
}

impl Pcap {
    pub fn read(file: &Path) -> Result<Self> {
        let bytes = std::fs::read(file).with_context(|| format!("read {}", file.display()))?;
        let (link_type, packets) =
            parse_pcap(&bytes).with_context(|| format!("parse {}", file.display()))?;
        Ok(Pcap {
            file: file.to_path_buf(),
            link_type,
            packets,
        })
    }

    pub fn packet_count(&self) -> usize {
        self.packets.len()
    }

    /// The TCP payload bytes of every captured packet (Ethernet, IPv4 or IPv6), as their IP
    /// headers give them.
    pub fn tcp_payload_bytes(&self) -> u64 {
        if self.link_type != LINKTYPE_ETHERNET {
            return 0;
        }
        self.packets.iter().map(|p| tcp_payload_len(p)).sum()
    }

    /// Whether any single captured packet contains `needle` (e.g. a plaintext marker).
    pub fn contains(&self, needle: &[u8]) -> bool {
        !needle.is_empty()
            && self
                .packets
                .iter()
                .any(|p| p.windows(needle.len()).any(|w| w == needle))
    }
}

impl Pcap {
    /// Runs tshark on the capture with a display filter, decoding `tls_port` as TLS, and
    /// returns the requested fields of each matching packet (tab-separated by tshark).
    pub fn tshark(&self, tls_port: u16, filter: &str, fields: &[&str]) -> Result<Vec<Vec<String>>> {
        let mut cmd = Command::new("tshark");
        cmd.args(["-n", "-r"]).arg(&self.file);
        cmd.args([
            "-d",
            &format!("tcp.port=={tls_port},tls"),
            "-Y",
            filter,
            "-T",
            "fields",
        ]);
        for field in fields {
            cmd.args(["-e", field]);
        }
        let out = cmd
            .output()
            .context("run tshark (cargo xtask setup installs it)")?;
        if !out.status.success() {
            bail!(
                "tshark -Y {filter:?} on {}: {}",
                self.file.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|line| line.split('\t').map(str::to_string).collect())
            .collect())
    }

    /// What TLS did in this capture, decoding `port` as TLS.
    pub fn tls_summary(&self, port: u16) -> Result<TlsSummary> {
        let server_hellos = self.tshark(
            port,
            "tls.handshake.type == 2",
            &[
                "tls.handshake.extensions.supported_version",
                "tls.handshake.extensions_key_share_group",
            ],
        )?;
        let segments = self.tshark(port, "tcp.len > 0", &["tcp.srcport", "tcp.dstport"])?;
        let syns = self.tshark(
            port,
            &format!("tcp.flags.syn == 1 && tcp.flags.ack == 0 && tcp.dstport == {port}"),
            &["tcp.srcport"],
        )?;
        let field = |row: &Vec<String>, i: usize| row.get(i).cloned().unwrap_or_default();
        let code = |row: &Vec<String>, i: usize| code_point(&field(row, i));
        Ok(TlsSummary {
            server_hello_versions: server_hellos.iter().map(|r| code(r, 0)).collect(),
            server_hello_groups: server_hellos.iter().map(|r| code(r, 1)).collect(),
            segments_off_port: segments
                .iter()
                .filter(|r| field(r, 0) != port.to_string() && field(r, 1) != port.to_string())
                .count(),
            segments: segments.len(),
            connections: syns.len(),
        })
    }
}

/// TLS as tshark saw it in a capture.
#[derive(Debug)]
pub struct TlsSummary {
    /// The `supported_versions` value each ServerHello chose ([`TLS13`]); None when
    /// tshark showed none.
    pub server_hello_versions: Vec<Option<u16>>,
    /// The key-exchange group each ServerHello chose ([`X25519MLKEM768`]).
    pub server_hello_groups: Vec<Option<u16>>,
    /// TCP segments carrying data.
    pub segments: usize,
    /// Data segments on any other port than the TLS one.
    pub segments_off_port: usize,
    /// TCP connections opened toward the TLS port (SYNs).
    pub connections: usize,
}

/// `supported_versions` of a TLS 1.3 ServerHello.
pub const TLS13: u16 = 0x0304;
/// IANA code point of the X25519MLKEM768 hybrid key-exchange group.
pub const X25519MLKEM768: u16 = 0x11ec;

/// A TLS code point as tshark prints it: hex (`0x0304`) for some fields, decimal for others.
fn code_point(text: &str) -> Option<u16> {
    match text.strip_prefix("0x") {
        Some(hex) => u16::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

fn tcpdump(iface: &str, filter: &str, file: &Path) -> Command {
    let args = tcpdump_args(iface, filter, file);
    let mut cmd = Command::new(&args[0]);
    cmd.args(&args[1..]);
    cmd
}

fn tcpdump_args(iface: &str, filter: &str, file: &Path) -> Vec<String> {
    // --immediate-mode: hand each packet over at once (the default buffers packets in the
    // kernel ring and a stop can lose them); -U: write each packet at once; -Z root: keep
    // writing to a root-owned directory; -s 0: whole packets, for payload searches.
    let mut args: Vec<String> = [
        "tcpdump",
        "--immediate-mode",
        "-i",
        iface,
        "-U",
        "-n",
        "-s",
        "0",
        "-Z",
        "root",
        "-w",
    ]
    .iter()
    .map(ToString::to_string)
    .collect();
    args.push(file.display().to_string());
    args.extend(filter.split_whitespace().map(str::to_string));
    args
}

/// The TCP payload bytes an Ethernet frame holds, 0 for anything else: what its IP header
/// declares, but no more than was captured (a frame cut by the snap length holds less, and
/// a payload search over it would see nothing).
fn tcp_payload_len(frame: &[u8]) -> u64 {
    let be16 = |at: usize| -> Option<u64> {
        Some(u64::from(u16::from_be_bytes([
            *frame.get(at)?,
            *frame.get(at + 1)?,
        ])))
    };
    let tcp_header = |at: usize| -> Option<u64> { Some(u64::from(frame.get(at + 12)? >> 4) * 4) };
    // (declared payload length, offset of the payload in the frame)
    let declared = match be16(12) {
        // IPv4: total length less its header and the TCP header.
        Some(0x0800) if frame.get(23) == Some(&IPPROTO_TCP) => (|| {
            let ip_header = u64::from(frame.get(14)? & 0x0f) * 4;
            let tcp = tcp_header(14 + ip_header as usize)?;
            let len = be16(16)?.checked_sub(ip_header)?.checked_sub(tcp)?;
            Some((len, 14 + ip_header + tcp))
        })(),
        // IPv6 (no extension headers): payload length less the TCP header.
        Some(0x86dd) if frame.get(20) == Some(&IPPROTO_TCP) => (|| {
            let tcp = tcp_header(54)?;
            Some((be16(18)?.checked_sub(tcp)?, 54 + tcp))
        })(),
        _ => None,
    };
    declared.map_or(0, |(len, offset)| {
        len.min((frame.len() as u64).saturating_sub(offset))
    })
}

/// Link type and packet data of a classic pcap file (either byte order, µs or ns
/// timestamps).
fn parse_pcap(bytes: &[u8]) -> Result<(u32, Vec<Vec<u8>>)> {
    if bytes.len() < 24 {
        bail!("{} bytes: too short for a pcap header", bytes.len());
    }
    let magic = [bytes[0], bytes[1], bytes[2], bytes[3]];
    let little = match magic {
        [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1] => true,
        [0xa1, 0xb2, 0xc3, 0xd4] | [0xa1, 0xb2, 0x3c, 0x4d] => false,
        other => bail!("not a pcap file (magic {other:02x?})"),
    };
    let u32_at = |at: usize| -> u32 {
        let b = [bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]];
        if little {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        }
    };
    let mut packets = Vec::new();
    let mut at = 24;
    // A record cut short (tcpdump killed mid-write) ends the capture.
    while at + 16 <= bytes.len() {
        let len = u32_at(at + 8) as usize;
        let start = at + 16;
        let Some(data) = bytes.get(start..start + len) else {
            break;
        };
        packets.push(data.to_vec());
        at = start + len;
    }
    Ok((u32_at(20), packets))
}

const LINKTYPE_ETHERNET: u32 = 1;
const IPPROTO_TCP: u8 = 6;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_packets_of_a_little_endian_pcap() {
        let mut file = vec![0xd4, 0xc3, 0xb2, 0xa1];
        file.extend_from_slice(&[0; 20]);
        for payload in [&b"hello"[..], &b"secret-marker"[..]] {
            file.extend_from_slice(&[0; 8]);
            file.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            file.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            file.extend_from_slice(payload);
        }
        let (link_type, packets) = parse_pcap(&file).unwrap();
        let pcap = Pcap {
            file: PathBuf::new(),
            link_type,
            packets,
        };
        assert_eq!(pcap.packet_count(), 2);
        assert!(pcap.contains(b"marker"));
        assert!(!pcap.contains(b"absent"));
    }

    /// An Ethernet frame carrying TCP over IPv4 (`v6`: IPv6) with `payload`.
    fn tcp_frame(v6: bool, payload: &[u8]) -> Vec<u8> {
        let mut frame = vec![0; 12];
        let tcp_header_len = 32u16; // with options (data offset 8)
        if v6 {
            frame.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
            frame.extend_from_slice(&(tcp_header_len + payload.len() as u16).to_be_bytes());
            frame.extend_from_slice(&[IPPROTO_TCP, 64]);
            frame.extend_from_slice(&[0; 32]);
        } else {
            frame.extend_from_slice(&[0x08, 0x00, 0x45, 0]);
            frame.extend_from_slice(&(20 + tcp_header_len + payload.len() as u16).to_be_bytes());
            frame.extend_from_slice(&[0, 0, 0, 0, 64, IPPROTO_TCP, 0, 0]);
            frame.extend_from_slice(&[0; 8]);
        }
        let mut tcp = vec![0; usize::from(tcp_header_len)];
        tcp[12] = 8 << 4;
        frame.extend_from_slice(&tcp);
        frame.extend_from_slice(payload);
        frame
    }

    #[test]
    fn counts_the_tcp_payload_of_ipv4_and_ipv6_frames() {
        assert_eq!(tcp_payload_len(&tcp_frame(false, b"hello")), 5);
        assert_eq!(tcp_payload_len(&tcp_frame(true, b"secret-marker")), 13);
        assert_eq!(tcp_payload_len(&tcp_frame(false, b"")), 0);
        let mut udp = tcp_frame(false, b"hello");
        udp[23] = 17;
        assert_eq!(tcp_payload_len(&udp), 0);
        assert_eq!(tcp_payload_len(&[0; 10]), 0, "a cut frame counts nothing");
        // Cut by the snap length: only the payload bytes captured count.
        let frame = tcp_frame(false, b"secret-marker");
        assert_eq!(tcp_payload_len(&frame[..frame.len() - 7]), 6);
        let frame = tcp_frame(true, b"secret-marker");
        assert_eq!(tcp_payload_len(&frame[..frame.len() - 13]), 0);
    }

    #[test]
    fn reads_tcpdumps_exit_statistics() {
        let output = "listening on br0, link-type EN10MB (Ethernet)\n\
                      12 packets captured\n14 packets received by filter\n\
                      1 packet dropped by kernel\n";
        assert_eq!(
            TcpdumpStats::parse(output),
            Some(TcpdumpStats {
                captured: 12,
                received: 14,
                dropped: 1
            })
        );
        assert_eq!(TcpdumpStats::parse("listening on br0"), None);
    }
}
