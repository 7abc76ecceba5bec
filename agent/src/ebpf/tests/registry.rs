//! `REGISTRY_ONLY` at connect time: connect4/6 refuse (EPERM) what the registry does not
//! list, steer what it does, leave UDP and loopback alone, and refuse nothing when told to
//! allow or when the registry could not be written whole; and an upgrade from a release
//! without the registry maps keeps every pod steered.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, TcpListener},
    os::fd::AsFd as _,
};

use ebpf_common::maps::{self, MAX_REGISTRY};

use super::{Netns, OUTBOUND, TestEnv, accept, pod_record, query, settings};

#[test]
fn registry_only_refuses_unregistered_tcp_connects_and_nothing_else() {
    let Some(env) = TestEnv::new() else { return };
    let mut dataplane = env.load(&settings());
    let pod = Netns::new("pod");
    let (listener4, listener6) = listeners(&pod);
    dataplane
        .enroll(pod.cookie(), pod_record(), pod.fd())
        .expect("enroll");
    dataplane
        .apply_registry(true, registry())
        .expect("write the registry");
    let dump = dataplane.dump().expect("dump");
    assert!(dump.registry_only);
    assert_eq!(dump.registry_entries, 2);

    // Unregistered: another port of the address:port entry, other addresses (a dual-stack
    // socket's v4-mapped one among them). One count per attempt.
    for (host, port) in [
        ("10.9.9.9", 81),
        ("10.9.9.8", 80),
        ("fd00::8", 443),
        ("::ffff:10.9.9.8", 80),
    ] {
        let before = dataplane.stats().expect("stats");
        let out = env.connect_from(&pod, "tcp", host, port, 0);
        let after = dataplane.stats().expect("stats");
        assert!(refused(&out), "{host}:{port}: {out}");
        assert_eq!(
            after.connect_unregistered_refused - before.connect_unregistered_refused,
            1,
            "{host}:{port}: {after:?}"
        );
        assert_eq!(after.connect_redirected, before.connect_redirected);
    }

    // Registered: steered as before (the address:port entry, and the any-port address at
    // any port).
    for (host, port, listener) in [
        ("10.9.9.9", 80, &listener4),
        ("::ffff:10.9.9.9", 80, &listener4),
        ("fd00::9", 443, &listener6),
        ("fd00::9", 1, &listener6),
    ] {
        let out = env.connect_from(&pod, "tcp", host, port, 0);
        assert!(out.contains("connected"), "{host}:{port}: {out}");
        let _accepted = accept(listener);
    }

    // Never steered, so never refused: UDP (DNS) and loopback.
    let before = dataplane.stats().expect("stats");
    let udp = env.connect_from(&pod, "udp", "10.9.9.8", 53, 0);
    let local = env.connect_from(&pod, "tcp", "127.0.0.1", 9, 0);
    let after = dataplane.stats().expect("stats");
    assert!(!refused(&udp), "UDP: {udp}");
    assert!(!refused(&local), "loopback: {local}");
    assert_eq!(
        after.connect_unregistered_refused,
        before.connect_unregistered_refused
    );
    assert_eq!(after.connect_not_tcp - before.connect_not_tcp, 1);

    // ALLOW_ANY refuses nothing, and empties the registry.
    dataplane
        .apply_registry(false, std::iter::empty())
        .expect("allow any");
    let dump = dataplane.dump().expect("dump");
    assert!(!dump.registry_only);
    assert_eq!(dump.registry_entries, 0);
    let out = env.connect_from(&pod, "tcp", "10.9.9.8", 80, 0);
    assert!(out.contains("connected"), "{out}");
    let _accepted = accept(&listener4);
    let stats = dataplane.stats().expect("stats");
    assert_eq!(stats.connect_unregistered_refused, 4, "{stats:?}");
}

#[test]
fn an_incomplete_registry_refuses_nothing_and_a_restart_writes_only_the_difference() {
    let Some(env) = TestEnv::new() else { return };
    let pod = Netns::new("pod");
    let (listener4, _listener6) = listeners(&pod);
    let mut first = env.load(&settings());
    first
        .enroll(pod.cookie(), pod_record(), pod.fd())
        .expect("enroll");
    first.apply_registry(true, registry()).expect("registry");
    assert!(refused(&env.connect_from(&pod, "tcp", "10.9.9.8", 80, 0)));

    // More than the map holds: nothing is written, and eBPF stops refusing (the proxy
    // still does) rather than refuse a registered destination it could not list.
    let too_many =
        (0..=MAX_REGISTRY).map(|i| (IpAddr::from(Ipv4Addr::from(0x0a00_0000 + i)), None));
    let error = first
        .apply_registry(true, too_many)
        .expect_err("a registry larger than the map is refused");
    assert_eq!(error.reason(), "registry_incomplete", "{error}");
    assert!(error.to_string().contains("65536"), "{error}");
    let dump = first.dump().expect("dump");
    assert!(!dump.registry_only, "the fallback turned refusal off");
    let out = env.connect_from(&pod, "tcp", "10.9.9.8", 80, 0);
    assert!(out.contains("connected"), "steered, not refused: {out}");
    let _accepted = accept(&listener4);

    // Whole again: refusing again.
    first.apply_registry(true, registry()).expect("registry");
    assert!(refused(&env.connect_from(&pod, "tcp", "10.9.9.8", 80, 0)));

    // A restarted agent finds the pinned registry and changes only what differs: the
    // entry it drops is refused, the one it adds is steered.
    drop(first);
    let mut second = env.load(&settings());
    let changed = [
        (
            IpAddr::from(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 9)),
            None,
        ),
        (IpAddr::from(Ipv4Addr::new(10, 9, 9, 8)), Some(80)),
    ];
    second.apply_registry(true, changed).expect("registry");
    assert_eq!(second.dump().expect("dump").registry_entries, 2);
    assert!(refused(&env.connect_from(&pod, "tcp", "10.9.9.9", 80, 0)));
    let out = env.connect_from(&pod, "tcp", "10.9.9.8", 80, 0);
    assert!(out.contains("connected"), "{out}");
    let _accepted = accept(&listener4);
}

#[test]
fn an_upgrade_from_a_release_without_the_registry_keeps_pods_steered_and_refuses_nothing() {
    let Some(env) = TestEnv::new() else { return };
    let pod = Netns::new("pod");
    let (listener4, _listener6) = listeners(&pod);
    let mut old = env.load(&settings());
    old.enroll(pod.cookie(), pod_record(), pod.fd())
        .expect("enroll");
    drop(old);
    // What the previous release pinned: no registry maps, and a STATS one counter shorter.
    for name in [maps::REGISTRY, maps::REGISTRY_MODE, maps::STATS] {
        fs::remove_file(env.pins.path.join(name)).expect("unpin");
    }
    let stats = query::map_create(BPF_MAP_TYPE_PERCPU_ARRAY, 4, 104, 1).expect("create map");
    query::obj_pin(stats.as_fd(), &env.pins.path.join(maps::STATS)).expect("pin map");

    let new = env.load(&settings());
    let dump = new.dump().expect("dump");
    assert!(!dump.registry_only, "new registry maps refuse nothing");
    assert_eq!(dump.registry_entries, 0);
    let out = env.connect_from(&pod, "tcp", "10.9.9.8", 80, 0);
    assert!(
        out.contains("connected"),
        "steered across the upgrade: {out}"
    );
    let _accepted = accept(&listener4);
    let stats = new.stats().expect("stats of the recreated map");
    assert_eq!(stats.connect_redirected, 1, "{stats:?}");
    assert!(
        !env.pins
            .path
            .join(format!("{}-previous", maps::STATS))
            .exists(),
        "the old STATS pin goes once the new programs run"
    );
}

/// One address at one port, one address at every port.
fn registry() -> [(IpAddr, Option<u16>); 2] {
    [
        (IpAddr::from(Ipv4Addr::new(10, 9, 9, 9)), Some(80)),
        (
            IpAddr::from(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 9)),
            None,
        ),
    ]
}

/// The pod's outbound listeners (IPv4, IPv6), which steered connects reach.
fn listeners(pod: &Netns) -> (TcpListener, TcpListener) {
    let v4 = pod
        .run(|| TcpListener::bind((Ipv4Addr::LOCALHOST, OUTBOUND)))
        .expect("bind 127.0.0.1:15001");
    let v6 = pod
        .run(|| TcpListener::bind((Ipv6Addr::LOCALHOST, OUTBOUND)))
        .expect("bind [::1]:15001");
    (v4, v6)
}

/// Whether the child's connect failed with EPERM (what a refusing connect4/6 returns).
fn refused(out: &str) -> bool {
    out.contains("[Errno 1]")
}

const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
