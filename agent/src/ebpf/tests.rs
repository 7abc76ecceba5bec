//! Privileged tests of the eBPF programs on the real kernel: each loads the embedded object
//! under its own bpffs pin root, attaches to its own cgroup v2 group, builds its own network
//! namespaces, drives real connections from a child process in that cgroup and netns, and
//! reads the maps through `ebpf-common` types. Every guard removes what it created on drop.
//!
//! Not root, or `bpftool` missing for the test that runs it: skipped with the reason, and
//! counted as skipped by `cargo xtask test` (a failure when `CI` is set).

mod registry;

use std::{
    fs::{self, File},
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::{
        fd::{AsFd as _, AsRawFd as _, BorrowedFd},
        unix::process::CommandExt as _,
    },
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use ebpf_common::{
    config::v4_mapped,
    maps::{self, MAX_EXCLUSIONS},
    netns::{NetnsCookie, POD_FLAG_REDIRECT_OUTBOUND, PodRecord},
    orig_dst::OrigDst,
    stats::Stats,
};

use super::{
    Config, Dataplane, Settings, conn_key, links,
    maps::LAYOUTS,
    orig_dst_addr,
    query::{self, QueryScope},
};

#[test]
fn map_layouts_cover_every_map_name() {
    let names: Vec<&str> = LAYOUTS.iter().map(|l| l.name).collect();
    assert_eq!(names, maps::ALL);
}

/// The maps that accepting a connection reads, as this release pins them, for every release
/// after it. During a hand-over the old and the new agent accept on the same listeners
/// while one build's programs write these maps, so each agent must read what the other's
/// programs wrote: changed in place, a map would be set aside (`upgrade.rs`) and the overlap
/// would refuse connects (`ORIG_DST*`, `HOST_CONNS`), drop inbound (`INBOUND_LISTENERS`) or
/// steer the old proxy's own connects back to it (`PROXY_SOCKETS`). A new layout is a map
/// under a new name, which the new build's programs write beside the old one for a release
/// (docs/datapath.md, on upgraded agents).
#[test]
fn the_accept_path_maps_keep_their_layout_across_releases() {
    use aya::maps::MapType::{LruHash, SockHash};
    let frozen = [
        (maps::ORIG_DST_BY_SOCKET, LruHash, 8, 24, 65_536),
        (maps::ORIG_DST, LruHash, 16, 24, 65_536),
        (maps::INBOUND_LISTENERS, SockHash, 16, 4, 8192),
        (maps::PROXY_SOCKETS, LruHash, 8, 1, 16_384),
        (maps::HOST_CONNS, LruHash, 40, 1, 65_536),
    ];
    for (name, map_type, key_size, value_size, max_entries) in frozen {
        let layout = LAYOUTS.iter().find(|l| l.name == name).unwrap();
        assert_eq!(
            (
                layout.map_type,
                layout.key_size,
                layout.value_size,
                layout.max_entries
            ),
            (map_type, key_size, value_size, max_entries),
            "{name} changed in place: an upgrade's overlap would break connections; add a \
             map under a new name instead (see this test's comment)"
        );
    }
}

#[test]
fn v4_mapped_destinations_come_back_as_ipv4() {
    let orig = OrigDst {
        addr: v4_mapped([10, 1, 0, 3]),
        port: 8080,
        family: libc::AF_INET as u16,
        _pad: [0; 4],
    };
    assert_eq!(orig_dst_addr(&orig), "10.1.0.3:8080".parse().unwrap());
}

#[test]
fn ipv6_destinations_stay_ipv6() {
    let ip: std::net::Ipv6Addr = "fd00::3".parse().unwrap();
    let orig = OrigDst {
        addr: ip.octets(),
        port: 80,
        family: libc::AF_INET6 as u16,
        _pad: [0; 4],
    };
    assert_eq!(orig_dst_addr(&orig), SocketAddr::new(ip.into(), 80));
}

#[test]
fn loads_every_map_with_its_layout_and_btf() {
    let Some(env) = TestEnv::new() else { return };
    let dataplane = env.load(&settings());
    for layout in LAYOUTS {
        let path = env.pins.path.join(layout.name);
        let info = aya::maps::MapInfo::from_pin(&path).unwrap_or_else(|e| {
            panic!(
                "map {} is not pinned at {}: {e}",
                layout.name,
                path.display()
            )
        });
        assert_eq!(
            (
                info.map_type().ok(),
                info.key_size(),
                info.value_size(),
                info.max_entries()
            ),
            (
                Some(layout.map_type),
                layout.key_size,
                layout.value_size,
                layout.max_entries
            ),
            "layout of {}",
            layout.name
        );
    }
    dataplane
        .verify_attached()
        .expect("cgroup programs are effective");
    let dump = dataplane.dump().expect("dump");
    assert_eq!(
        dump.config.as_ref().map(|c| c.outbound_port),
        Some(OUTBOUND)
    );
}

#[test]
fn steers_enrolled_tcp_connects_to_the_outbound_listener() {
    let Some(env) = TestEnv::new() else { return };
    let mut dataplane = env.load(&settings());
    let pod = Netns::new("pod");
    let cookie = pod.cookie();
    let listener4 = pod
        .run(|| TcpListener::bind((Ipv4Addr::LOCALHOST, OUTBOUND)))
        .expect("bind 15001");
    let listener6 = pod
        .run(|| TcpListener::bind((Ipv6Addr::LOCALHOST, OUTBOUND)))
        .expect("bind [::1]:15001");
    dataplane
        .enroll(cookie, pod_record(), pod.fd())
        .expect("enroll");
    let table = dataplane.orig_dst_table();

    // IPv4.
    let out = env.connect_from(&pod, "tcp", "10.9.9.9", 80, 0);
    assert!(out.contains("connected"), "child: {out}");
    let (mut stream, peer) = accept(&listener4);
    assert_eq!(read_all(&mut stream), "hello");
    let orig = table
        .take_record(conn_key(cookie, peer))
        .expect("take")
        .expect("ORIG_DST holds the original destination under (netns, client port, family)");
    assert_eq!(
        orig_dst_addr(&orig),
        "10.9.9.9:80".parse::<SocketAddr>().expect("addr")
    );
    assert_eq!(orig.family, libc::AF_INET as u16);
    assert_eq!(
        table.take(conn_key(cookie, peer)).expect("take"),
        None,
        "take deletes"
    );

    // IPv6.
    let out = env.connect_from(&pod, "tcp", "fd00::9", 443, 0);
    assert!(out.contains("connected"), "child: {out}");
    let (_stream, peer) = accept(&listener6);
    let orig = table
        .take_record(conn_key(cookie, peer))
        .expect("take")
        .expect("v6 orig dst");
    assert_eq!(
        orig_dst_addr(&orig),
        "[fd00::9]:443".parse::<SocketAddr>().expect("addr")
    );

    // A dual-stack socket to a v4-mapped address stays IPv4: it reaches the v4 listener and
    // its key's family is AF_INET, while the record keeps the socket's family.
    let out = env.connect_from(&pod, "tcp", "::ffff:10.9.9.8", 8080, 0);
    assert!(out.contains("connected"), "child: {out}");
    let (_stream, peer) = accept(&listener4);
    let orig = table
        .take_record(conn_key(cookie, peer))
        .expect("take")
        .expect("v4-mapped orig dst");
    assert_eq!(
        orig_dst_addr(&orig),
        "10.9.9.8:8080".parse::<SocketAddr>().expect("addr")
    );
    assert_eq!(orig.family, libc::AF_INET6 as u16);

    let stats = dataplane.stats().expect("stats");
    assert_eq!(stats.connect_redirected, 3, "{stats:?}");
    assert_eq!(stats.sockops_handed_over, 3, "{stats:?}");
    assert_eq!(
        stats.connect_error_refused + stats.sockops_error_missing,
        0,
        "{stats:?}"
    );
}

#[test]
fn leaves_udp_unenrolled_and_excluded_sockets_alone_but_steers_marked_ones() {
    let Some(env) = TestEnv::new() else { return };
    let mut settings = settings();
    settings.excluded_ports = vec![8443];
    settings.excluded_cidrs = vec!["10.8.0.0/16".parse().expect("cidr")];
    let mut dataplane = env.load(&settings);
    let pod = Netns::new("pod");
    let other = Netns::new("other");
    let udp = pod
        .run(|| UdpSocket::bind((Ipv4Addr::LOCALHOST, OUTBOUND)))
        .expect("udp bind");
    let listener = pod
        .run(|| TcpListener::bind((Ipv4Addr::LOCALHOST, OUTBOUND)))
        .expect("bind");
    let other_listener = other
        .run(|| TcpListener::bind((Ipv4Addr::LOCALHOST, OUTBOUND)))
        .expect("bind");
    dataplane
        .enroll(pod.cookie(), pod_record(), pod.fd())
        .expect("enroll");

    // Not steered, so these find no route in a netns with only `lo`.
    let before = dataplane.stats().expect("stats");
    env.connect_from(&pod, "udp", "10.9.9.9", 53, 0);
    env.connect_from(&other, "tcp", "10.9.9.9", 80, 0);
    env.connect_from(&pod, "tcp", "10.9.9.9", 8443, 0);
    env.connect_from(&pod, "tcp", "10.8.1.2", 80, 0);
    // The proxy's mark exempts nothing: any pod with CAP_NET_RAW could set it.
    env.connect_from(&pod, "tcp", "10.9.9.9", 80, PROXY_MARK);
    let after = dataplane.stats().expect("stats");

    assert_eq!(
        after.connect_not_tcp - before.connect_not_tcp,
        1,
        "{after:?}"
    );
    assert_eq!(
        after.connect_not_enrolled - before.connect_not_enrolled,
        1,
        "{after:?}"
    );
    assert_eq!(
        after.connect_excluded - before.connect_excluded,
        2,
        "{after:?}"
    );
    assert_eq!(after.connect_redirected, 1, "the marked socket: {after:?}");
    assert_eq!(after.connect_proxy_socket, 0, "{after:?}");
    listener.set_nonblocking(true).expect("nonblocking");
    assert!(
        listener.accept().is_ok(),
        "the marked connect reached the pod's outbound listener"
    );
    assert!(listener.accept().is_err(), "only the marked connect did");
    other_listener.set_nonblocking(true).expect("nonblocking");
    assert!(
        other_listener.accept().is_err(),
        "nothing reaches the other netns's listener"
    );
    udp.set_nonblocking(true).expect("nonblocking");
    assert!(udp.recv(&mut [0; 16]).is_err(), "UDP is not steered");

    // Exclusions are replaced wholesale.
    let mut replaced = settings.clone();
    replaced.excluded_ports = vec![9000];
    replaced.excluded_cidrs = vec!["fd00::/8".parse().expect("cidr")];
    dataplane.apply_settings(&replaced).expect("apply");
    let dump = dataplane.dump().expect("dump");
    assert_eq!(dump.excluded_ports, vec![9000]);
    assert_eq!(dump.excluded_cidrs, replaced.excluded_cidrs);
}

#[test]
fn sk_lookup_steers_inbound_to_the_listener_and_drops_without_it() {
    let Some(env) = TestEnv::new() else { return };
    let mut dataplane = env.load(&settings());
    let pod = Netns::new("pod");
    let client = Netns::new("client");
    let pod_ip = Ipv4Addr::new(10, 77, 0, 1);
    env.veth(&pod, &client, pod_ip, Ipv4Addr::new(10, 77, 0, 2));
    // The application and the proxy's inbound listener, both in the pod.
    let app = pod
        .run(|| TcpListener::bind((Ipv4Addr::UNSPECIFIED, 8080)))
        .expect("bind app");
    let inbound = pod
        .run(|| TcpListener::bind((Ipv4Addr::LOCALHOST, INBOUND)))
        .expect("bind 15006");
    dataplane
        .enroll(pod.cookie(), pod_record(), pod.fd())
        .expect("enroll");
    dataplane
        .set_inbound_listener(IpAddr::V4(pod_ip), inbound.as_fd())
        .expect("register listener");
    assert_eq!(
        dataplane.dump().expect("dump").inbound_listeners,
        vec![IpAddr::V4(pod_ip)]
    );

    let dst = SocketAddr::from((pod_ip, 8080));
    let mut stream = client
        .run(|| TcpStream::connect_timeout(&dst, Duration::from_secs(2)))
        .expect("inbound connect is accepted by the steered listener");
    stream.write_all(b"in").expect("write");
    drop(stream);
    let (mut accepted, _) = accept(&inbound);
    assert_eq!(
        accepted.local_addr().expect("local"),
        dst,
        "the original destination is kept"
    );
    assert_eq!(read_all(&mut accepted), "in");
    app.set_nonblocking(true).expect("nonblocking");
    assert!(
        app.accept().is_err(),
        "the application is not reached around the proxy"
    );

    // The pod's own connection to its own IP is not steered.
    let local = pod
        .run(|| TcpStream::connect_timeout(&dst, Duration::from_secs(2)))
        .expect("local connect");
    drop(local);
    app.set_nonblocking(false).expect("blocking");
    let (_app_conn, _) = accept(&app);

    // The proxy's socket is gone: the kernel removes it from the sockhash, and sk_lookup
    // drops (fail closed) instead of passing to the application. (Once the socket is
    // closed: a child another test thread forks holds a copy of the descriptor until it
    // execs.)
    drop(inbound);
    let deadline = std::time::Instant::now() + weft_test_env::scaled(Duration::from_secs(10));
    while !dataplane.dump().expect("dump").inbound_listeners.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the closed listener stays in the sockhash"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let before = dataplane.stats().expect("stats");
    let result = client.run(|| TcpStream::connect_timeout(&dst, Duration::from_millis(700)));
    assert!(result.is_err(), "connection must not succeed: {result:?}");
    app.set_nonblocking(true).expect("nonblocking");
    assert!(
        app.accept().is_err(),
        "the application is not reached around the proxy"
    );
    let after = dataplane.stats().expect("stats");
    assert!(
        after.sklookup_error_dropped > before.sklookup_error_dropped,
        "{after:?}"
    );
    assert!(after.sklookup_steered >= 1, "{after:?}");
}

#[test]
fn restart_leaves_exactly_one_attachment_of_each_program() {
    let Some(env) = TestEnv::new() else { return };
    let pod = Netns::new("pod");
    let mut first = env.load(&settings());
    first
        .enroll(pod.cookie(), pod_record(), pod.fd())
        .expect("enroll");
    drop(first);
    // A leftover staging pin from an agent that died mid-replacement.
    let staging = env.pins.path.join("links/connect4-staging");
    let leftover: aya::programs::links::FdLink =
        aya::programs::links::PinnedLink::from_pin(env.pins.path.join("links/connect4"))
            .expect("open pinned link")
            .into();
    drop(leftover.pin(&staging).expect("pin leftover"));

    let mut second = env.load(&settings());
    second
        .enroll(pod.cookie(), pod_record(), pod.fd())
        .expect("re-enroll");
    let ids = second.program_ids;
    for (name, id, attach_type) in ids.cgroup() {
        let attached = query::prog_ids(env.cgroup.fd(), attach_type, QueryScope::Attached)
            .expect("query cgroup");
        assert_eq!(attached, vec![id], "{name} attached once, by the new agent");
    }
    let attached = query::prog_ids(
        env.host.fd(),
        query::BPF_CGROUP_SOCK_OPS,
        QueryScope::Attached,
    )
    .expect("query host cgroup");
    assert_eq!(
        attached,
        vec![ids.host_sock_ops],
        "host_sock_ops attached once, by the new agent"
    );
    let attached =
        query::prog_ids(pod.fd(), query::BPF_SK_LOOKUP, QueryScope::Attached).expect("query netns");
    assert_eq!(attached, vec![ids.sk_lookup], "sk_lookup attached once");
    assert!(!staging.exists());
    second.verify_attached().expect("verify");
    assert_eq!(
        second.enrolled().expect("enrolled"),
        vec![(pod.cookie(), pod_record())]
    );

    // A third agent finds the pod by its pinned link alone and removes it.
    drop(second);
    let mut third = env.load(&settings());
    assert_eq!(third.pinned_netns().expect("pinned"), vec![pod.cookie()]);
    third.unenroll(pod.cookie()).expect("unenroll");
    third
        .unenroll(pod.cookie())
        .expect("unenroll is idempotent");
    assert!(third.pinned_netns().expect("pinned").is_empty());
    assert!(third.enrolled().expect("enrolled").is_empty());
    let attached =
        query::prog_ids(pod.fd(), query::BPF_SK_LOOKUP, QueryScope::Attached).expect("query netns");
    assert!(attached.is_empty(), "sk_lookup detached: {attached:?}");
    third.uninstall().expect("uninstall");
    for (_, _, attach_type) in ids.cgroup() {
        let attached = query::prog_ids(env.cgroup.fd(), attach_type, QueryScope::Attached)
            .expect("query cgroup");
        assert!(attached.is_empty(), "uninstall detaches: {attached:?}");
    }
}

#[test]
fn exclusion_updates_apply_at_full_capacity_and_refuse_beyond_it() {
    let Some(env) = TestEnv::new() else { return };
    let mut dataplane = env.load(&settings());
    let full = |set: u8| Settings {
        excluded_ports: (0..MAX_EXCLUSIONS as u16)
            .map(|i| u16::from(set) * 1000 + i)
            .collect(),
        excluded_cidrs: (0..MAX_EXCLUSIONS)
            .map(|i| format!("10.{set}.{i}.0/24").parse().expect("cidr"))
            .collect(),
        ..settings()
    };
    let excluded = |dataplane: &Dataplane| {
        let dump = dataplane.dump().expect("dump");
        let mut ports = dump.excluded_ports;
        ports.sort_unstable();
        let mut cidrs = dump.excluded_cidrs;
        cidrs.sort_unstable();
        (ports, cidrs)
    };
    let sorted = |settings: &Settings| {
        let mut ports = settings.excluded_ports.clone();
        ports.sort_unstable();
        let mut cidrs = settings.excluded_cidrs.clone();
        cidrs.sort_unstable();
        (ports, cidrs)
    };

    dataplane
        .apply_settings(&full(1))
        .expect("256 exclusions fit");
    // Every entry replaced by another while the maps are full.
    dataplane
        .apply_settings(&full(2))
        .unwrap_or_else(|e| panic!("replacing 256 exclusions with 256 others: {e}"));
    assert_eq!(excluded(&dataplane), sorted(&full(2)));
    dataplane.apply_settings(&full(1)).expect("and back");
    assert_eq!(excluded(&dataplane), sorted(&full(1)));

    let mut over = full(3);
    over.excluded_ports.push(9999);
    let error = dataplane
        .apply_settings(&over)
        .expect_err("257 excluded ports are refused");
    assert!(
        error.to_string().contains("mesh.excludedPorts"),
        "the error names the setting: {error}"
    );
    let mut over = full(3);
    over.excluded_cidrs
        .push("192.168.0.0/16".parse().expect("cidr"));
    let error = dataplane
        .apply_settings(&over)
        .expect_err("257 excluded CIDRs are refused");
    assert!(
        error.to_string().contains("mesh.excludedCidrs"),
        "the error names the setting: {error}"
    );
    assert_eq!(
        excluded(&dataplane),
        sorted(&full(1)),
        "a refused update keeps the last good exclusions"
    );
}

#[test]
fn an_upgrade_migrates_a_pod_map_of_another_layout_and_its_pods_stay_steered() {
    let Some(env) = TestEnv::new() else { return };
    let pod = Netns::new("pod");
    let cookie = pod.cookie();
    let listener = pod
        .run(|| TcpListener::bind((Ipv4Addr::LOCALHOST, OUTBOUND)))
        .expect("bind 15001");
    let mut old = env.load(&settings());
    old.enroll(cookie, pod_record(), pod.fd()).expect("enroll");
    drop(old);
    // The previous agent's pod record was 12 bytes (a field this agent does not know).
    let mut record = [0_u8; 12];
    record[..4].copy_from_slice(&7_u32.to_ne_bytes());
    record[4..8].copy_from_slice(&POD_FLAG_REDIRECT_OUTBOUND.to_ne_bytes());
    env.pin_raw_hash(maps::PODS, 8, 12, &[(&cookie.0.to_ne_bytes(), &record)]);

    // The new agent starts; no source has spoken yet (the API server may be down), so
    // nothing re-enrolls the pod: the migrated map alone must keep it steered.
    let new = env.load(&settings());
    let out = env.connect_from(&pod, "tcp", "10.9.9.9", 80, 0);
    assert!(
        out.contains("connected"),
        "an enrolled pod's connect went around the proxy after the upgrade: {out}"
    );
    let _accepted = accept(&listener);
    assert_eq!(
        new.enrolled().expect("enrolled"),
        vec![(
            cookie,
            PodRecord {
                pod_id: 7,
                flags: POD_FLAG_REDIRECT_OUTBOUND
            }
        )]
    );
    assert!(
        !env.pins
            .path
            .join(format!("{}-previous", maps::PODS))
            .exists(),
        "the old map's pin goes once the new programs run"
    );
}

#[test]
fn an_unreadable_pinned_map_is_never_deleted_and_the_old_attachments_stay() {
    let Some(env) = TestEnv::new() else { return };
    let pod = Netns::new("pod");
    let cookie = pod.cookie();
    let listener = pod
        .run(|| TcpListener::bind((Ipv4Addr::LOCALHOST, OUTBOUND)))
        .expect("bind 15001");
    let mut old = env.load(&settings());
    old.enroll(cookie, pod_record(), pod.fd()).expect("enroll");
    drop(old);
    // Something that is not a map where the pod map is pinned: its map info cannot be read.
    let path = env.pins.path.join(maps::PODS);
    fs::remove_file(&path).expect("unpin PODS");
    let link: aya::programs::links::FdLink =
        aya::programs::links::PinnedLink::from_pin(env.pins.path.join("links/connect4"))
            .expect("open pinned link")
            .into();
    drop(link.pin(&path).expect("pin a link at the pod map's path"));

    let error = match Dataplane::load(&env.config(), &settings()) {
        Ok(_) => panic!("an agent that cannot read a pinned map must not start"),
        Err(error) => error,
    };
    assert_eq!(error.reason(), "inspect_pin", "{error}");
    assert!(path.exists(), "the unreadable pin is left in place");
    // The previous agent's programs still steer the pod (fail closed).
    let out = env.connect_from(&pod, "tcp", "10.9.9.9", 80, 0);
    assert!(out.contains("connected"), "child: {out}");
    let _accepted = accept(&listener);
}

#[test]
fn bpftool_dumps_pinned_maps_with_named_fields() {
    let Some(env) = TestEnv::new() else { return };
    if Command::new("bpftool").arg("version").output().is_err() {
        weft_test_env::skip(
            "bpftool_dumps_pinned_maps_with_named_fields",
            "`bpftool` is not installed; run `cargo xtask setup`",
        );
        return;
    }
    let mut dataplane = env.load(&settings());
    let pod = Netns::new("pod");
    dataplane
        .enroll(pod.cookie(), pod_record(), pod.fd())
        .expect("enroll");
    let dump = |map: &str| {
        let path = env.pins.path.join(map);
        let output = Command::new("bpftool")
            .args(["map", "dump", "pinned"])
            .arg(&path)
            .output()
            .expect("run bpftool");
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        eprintln!("bpftool map dump pinned {}:\n{text}", path.display());
        text
    };
    let pods = dump(maps::PODS);
    for field in ["pod_id", "flags"] {
        assert!(pods.contains(field), "PODS dump names {field}: {pods}");
    }
    let config = dump(maps::PROXY_CONFIG);
    assert!(config.contains("outbound_port"), "{config}");
    let stats = dump(maps::STATS);
    assert!(stats.contains("connect_redirected"), "{stats}");
    dataplane
        .apply_registry(true, [(IpAddr::V4(Ipv4Addr::new(10, 9, 9, 9)), Some(80))])
        .expect("registry");
    let registry = dump(maps::REGISTRY);
    for field in ["addr", "port"] {
        assert!(
            registry.contains(field),
            "REGISTRY dump names {field}: {registry}"
        );
    }
    let mode = dump(maps::REGISTRY_MODE);
    assert!(mode.contains("\"mode\": 1"), "{mode}");
}

#[test]
fn stats_fields_sum_like_the_struct() {
    let stats = Stats {
        connect_redirected: 1,
        sklookup_error_dropped: 2,
        ..Stats::default()
    };
    let fields = super::stat_fields(&stats);
    assert_eq!(fields.iter().map(|(_, v)| v).sum::<u64>(), 3);
    assert!(fields.contains(&("sklookup_error_dropped", 2)));
}

#[test]
fn conn_key_counts_v4_mapped_peers_as_ipv4() {
    let peer: SocketAddr = "[::ffff:127.0.0.1]:4000".parse().expect("addr");
    let key = conn_key(NetnsCookie(7), peer);
    assert_eq!(
        (key.netns_cookie, key.client_port, key.family),
        (7, 4000, libc::AF_INET as u16)
    );
    let orig = OrigDst {
        addr: v4_mapped([10, 0, 0, 1]),
        port: 80,
        family: libc::AF_INET6 as u16,
        _pad: [0; 4],
    };
    assert_eq!(
        orig_dst_addr(&orig),
        "10.0.0.1:80".parse::<SocketAddr>().expect("addr")
    );
}

const OUTBOUND: u16 = 15_001;
const INBOUND: u16 = 15_006;
const PROXY_MARK: u32 = 0x5eed;

fn settings() -> Settings {
    Settings {
        proxy_mark: PROXY_MARK,
        outbound_port: OUTBOUND,
        inbound_port: INBOUND,
        hbone_port: 15_008,
        excluded_ports: Vec::new(),
        excluded_cidrs: Vec::new(),
    }
}

fn pod_record() -> PodRecord {
    PodRecord {
        pod_id: 1,
        flags: POD_FLAG_REDIRECT_OUTBOUND,
    }
}

/// Accepts one connection within a few seconds.
fn accept(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    listener.set_nonblocking(true).expect("nonblocking");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                stream.set_nonblocking(false).expect("blocking");
                stream
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .expect("timeout");
                return (stream, peer);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("no connection on {:?}: {e}", listener.local_addr()),
        }
    }
}

fn read_all(stream: &mut TcpStream) -> String {
    let mut buf = String::new();
    stream.read_to_string(&mut buf).expect("read");
    buf
}

/// One test's pin root, cgroup and helpers.
struct TestEnv {
    // Field order is drop order: pins (links detached) before the cgroup goes.
    pins: PinRoot,
    cgroup: Cgroup,
    /// `host_cgroup`: host_sock_ops attaches here (a sibling of the pods' cgroup).
    host: Cgroup,
}

impl TestEnv {
    /// `None` (after saying why) when the test cannot run here.
    fn new() -> Option<Self> {
        if !nix::unistd::geteuid().is_root() {
            // libtest names the thread after the test, which names the skip.
            weft_test_env::skip("ebpf test", "eBPF tests need root");
            return None;
        }
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        Some(Self {
            pins: PinRoot::new(n),
            cgroup: Cgroup::new(n, ""),
            host: Cgroup::new(n, "-host"),
        })
    }

    fn config(&self) -> Config {
        Config {
            pin_root: self.pins.path.clone(),
            cgroup_root: self.cgroup.path.clone(),
            host_cgroup: self.host.path.clone(),
        }
    }

    fn load(&self, settings: &Settings) -> Dataplane {
        Dataplane::load(&self.config(), settings).unwrap_or_else(|e| panic!("load: {e}"))
    }

    /// Replaces the pin of map `name` with a hash map of raw sizes holding `entries`: what
    /// an agent with another layout would have left.
    fn pin_raw_hash(&self, name: &str, key_size: u32, value_size: u32, entries: &[(&[u8], &[u8])]) {
        let path = self.pins.path.join(name);
        fs::remove_file(&path).unwrap_or_else(|e| panic!("unpin {}: {e}", path.display()));
        let map =
            query::map_create(BPF_MAP_TYPE_HASH, key_size, value_size, 1024).expect("create map");
        for (key, value) in entries {
            query::map_update_raw(map.as_fd(), key, value).expect("write entry");
        }
        query::obj_pin(map.as_fd(), &path).expect("pin map");
    }

    /// Runs a connect (and a write) in a child process inside the test cgroup and `netns`;
    /// returns what it printed (`connected` or `error …`).
    fn connect_from(&self, netns: &Netns, proto: &str, host: &str, port: u16, mark: u32) -> String {
        let procs = fs::OpenOptions::new()
            .write(true)
            .open(self.cgroup.path.join("cgroup.procs"))
            .expect("open cgroup.procs");
        let procs_fd = procs.as_raw_fd();
        let netns_fd = netns.file.as_raw_fd();
        let mut command = Command::new("python3");
        command
            .args([
                "-c",
                CONNECT_PY,
                proto,
                host,
                &port.to_string(),
                &mark.to_string(),
            ])
            .stdin(Stdio::null())
            .stderr(Stdio::inherit());
        // SAFETY: the closure runs between fork and exec and only makes async-signal-safe
        // system calls on fds the parent keeps open until the child is reaped.
        unsafe {
            command.pre_exec(move || {
                // "0" moves the writing process: the child's sockets belong to the test cgroup.
                if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1
                    || libc::setns(netns_fd, libc::CLONE_NEWNET) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let output = command.output().expect("run python3");
        drop(procs);
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// A veth pair between two namespaces, addressed /24.
    fn veth(&self, a: &Netns, b: &Netns, ip_a: Ipv4Addr, ip_b: Ipv4Addr) {
        ip(&[
            "-n", &a.name, "link", "add", "va", "type", "veth", "peer", "name", "vb", "netns",
            &b.name,
        ]);
        ip(&[
            "-n",
            &a.name,
            "addr",
            "add",
            &format!("{ip_a}/24"),
            "dev",
            "va",
        ]);
        ip(&[
            "-n",
            &b.name,
            "addr",
            "add",
            &format!("{ip_b}/24"),
            "dev",
            "vb",
        ]);
        ip(&["-n", &a.name, "link", "set", "va", "up"]);
        ip(&["-n", &b.name, "link", "set", "vb", "up"]);
    }
}

/// A pin root under /sys/fs/bpf, mounting bpffs there if needed. Drop detaches every link
/// and removes every pin.
struct PinRoot {
    path: PathBuf,
}

impl PinRoot {
    fn new(n: u32) -> Self {
        let bpffs = Path::new("/sys/fs/bpf");
        let is_bpffs = nix::sys::statfs::statfs(bpffs)
            .is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC);
        if !is_bpffs {
            nix::mount::mount(
                Some("bpf"),
                bpffs,
                Some("bpf"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            )
            .expect("mount bpffs at /sys/fs/bpf");
        }
        let path = bpffs.join(format!("weft-ebpftest-{}-{n}", std::process::id()));
        Self { path }
    }
}

impl Drop for PinRoot {
    fn drop(&mut self) {
        if let Err(e) = links::remove_all(&self.path) {
            eprintln!("cleanup: {e}");
        }
        if let Err(e) = fs::remove_dir_all(&self.path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("cleanup: cannot remove {}: {e}", self.path.display());
        }
    }
}

/// A fresh cgroup v2 group. Drop moves any process left in it to the cgroup2 root and
/// removes it.
struct Cgroup {
    path: PathBuf,
    root: PathBuf,
    dir: File,
}

impl Cgroup {
    fn new(n: u32, suffix: &str) -> Self {
        let root = cgroup2_mount().expect("a cgroup2 mount in /proc/self/mountinfo");
        let path = root.join(format!("weft-ebpftest-{}-{n}{suffix}", std::process::id()));
        fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        let dir = File::open(&path).expect("open cgroup");
        Self { path, root, dir }
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.dir.as_fd()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            if let Ok(procs) = fs::read_to_string(self.path.join("cgroup.procs")) {
                for pid in procs.lines() {
                    let _moved = fs::write(self.root.join("cgroup.procs"), pid);
                }
            }
            match fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
                Err(_) => thread::sleep(Duration::from_millis(20)),
            }
        }
        eprintln!("cleanup: cannot remove cgroup {}", self.path.display());
    }
}

fn cgroup2_mount() -> Option<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        left.split_whitespace().nth(4).map(PathBuf::from)
    })
}

/// A named network namespace (`ip netns`), with `lo` up. Drop deletes it.
struct Netns {
    name: String,
    file: File,
}

impl Netns {
    fn new(role: &str) -> Self {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("weft-ebpftest-{}-{n}-{role}", std::process::id());
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        let file = File::open(Path::new("/run/netns").join(&name)).expect("open netns");
        Self { name, file }
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Runs `f` on a thread inside this netns (sockets it creates stay in it).
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        thread::scope(|scope| {
            scope
                .spawn(|| {
                    nix::sched::setns(&self.file, nix::sched::CloneFlags::CLONE_NEWNET)
                        .expect("setns");
                    f()
                })
                .join()
                .expect("netns thread")
        })
    }

    fn cookie(&self) -> NetnsCookie {
        self.run(|| {
            let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("socket");
            let mut cookie = 0_u64;
            let mut len = size_of::<u64>() as libc::socklen_t;
            // SAFETY: getsockopt writes at most `len` bytes into `cookie`, a live u64.
            let ret = unsafe {
                libc::getsockopt(
                    socket.as_raw_fd(),
                    libc::SOL_SOCKET,
                    SO_NETNS_COOKIE,
                    std::ptr::from_mut(&mut cookie).cast(),
                    &mut len,
                )
            };
            assert_eq!(
                ret,
                0,
                "SO_NETNS_COOKIE: {}",
                std::io::Error::last_os_error()
            );
            NetnsCookie(cookie)
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _status = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("run ip");
    assert!(status.success(), "ip {}: {status}", args.join(" "));
}

static COUNTER: AtomicU32 = AtomicU32::new(0);
const BPF_MAP_TYPE_HASH: u32 = 1;
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The child's connect: `python3 -c CONNECT_PY <tcp|udp> <host> <port> <mark>`.
const CONNECT_PY: &str = r#"
import socket, sys
proto, host, port, mark = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(family, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
if mark:
    s.setsockopt(socket.SOL_SOCKET, 36, mark)  # SO_MARK
s.settimeout(2)
try:
    s.connect((host, port))
    s.send(b"hello")
    print("connected")
except OSError as e:
    print("error", e)
"#;
