//! Discovery on fake trees laid out as the kubelet lays them out. The privileged test with
//! real processes in real network namespaces is `tests/tests/cni.rs`.

use std::os::unix::fs::symlink;

use super::*;

/// A fake host: `cgroup/` and `proc/` in a temp dir. `ns/net` entries are plain files (a
/// namespace is identified by device and inode, which files have too); pid 1's is the
/// host's.
struct FakeHost {
    dir: tempfile::TempDir,
}

impl FakeHost {
    fn new() -> Self {
        let host = Self {
            dir: tempfile::tempdir().unwrap(),
        };
        host.process(1, 1, None);
        host
    }

    fn config(&self) -> Config {
        Config {
            cgroup_root: self.dir.path().join("cgroup"),
            proc_root: self.dir.path().join("proc"),
            interval: Duration::from_secs(10),
        }
    }

    /// A process started at `start` ticks; its netns is its own, or that of `shares`.
    fn process(&self, pid: u32, start: u64, shares: Option<u32>) {
        let dir = self.dir.path().join(format!("proc/{pid}"));
        fs::create_dir_all(dir.join("ns")).unwrap();
        let mut fields = vec!["S".to_string()];
        fields.extend((0..18).map(|_| "0".to_string()));
        fields.push(start.to_string());
        fields.extend(["0".to_string(), "0".to_string()]);
        // A command name with a space and a parenthesis, as `(sd-pam)` or `my app)` can be.
        fs::write(
            dir.join("stat"),
            format!("{pid} (my app) x) {}", fields.join(" ")),
        )
        .unwrap();
        match shares {
            Some(other) => symlink(
                self.dir.path().join(format!("proc/{other}/ns/net")),
                dir.join("ns/net"),
            )
            .unwrap(),
            None => fs::write(dir.join("ns/net"), pid.to_string()).unwrap(),
        }
    }

    /// A container cgroup at `path` (relative to the cgroup root) holding `pids`.
    fn container(&self, path: &str, pids: &[u32]) {
        let dir = self.dir.path().join("cgroup").join(path);
        fs::create_dir_all(&dir).unwrap();
        let procs: String = pids.iter().map(|p| format!("{p}\n")).collect();
        fs::write(dir.join("cgroup.procs"), procs).unwrap();
    }

    /// The (device, inode) of `pid`'s netns.
    fn id(&self, pid: u32) -> (u64, u64) {
        netns_id(&self.netns(pid)).unwrap()
    }

    fn netns(&self, pid: u32) -> PathBuf {
        self.dir.path().join(format!("proc/{pid}/ns/net"))
    }
}

const UID_A: &str = "0d5cb5a1-8f2e-4c55-9a43-3b4f3e0e2a11";
const UID_B: &str = "6f0e5b2c-1a2b-4c3d-8e9f-0a1b2c3d4e5f";
const UID_C: &str = "9a8b7c6d-5e4f-4a3b-2c1d-0e9f8a7b6c5d";
const SANDBOX: &str = "4b825dc642cb6eb9a060e54bf8d69288fbee4904a1b2c3d4e5f60718293a4b5c";
const APP: &str = "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391a1b2c3d4e5f60718293a4b5c";

fn underscored(uid: &str) -> String {
    uid.replace('-', "_")
}

#[test]
fn systemd_driver_pods_of_every_qos_class_are_found_at_their_sandbox_netns() {
    let host = FakeHost::new();
    // Burstable, containerd: the sandbox (pid 100) started before the app (pid 101).
    host.process(100, 500, None);
    host.process(101, 900, Some(100));
    let pod_a = format!(
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
        underscored(UID_A)
    );
    host.container(&format!("{pod_a}/cri-containerd-{APP}.scope"), &[101]);
    host.container(&format!("{pod_a}/cri-containerd-{SANDBOX}.scope"), &[100]);
    // Best effort, CRI-O: conmon (pid 200, oldest, host netns) sits in its own scope.
    host.process(200, 100, Some(1));
    host.process(201, 600, None);
    let pod_b = format!(
        "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice",
        underscored(UID_B)
    );
    host.container(&format!("{pod_b}/crio-conmon-{SANDBOX}.scope"), &[200]);
    host.container(&format!("{pod_b}/crio-{SANDBOX}.scope"), &[201]);
    // Guaranteed: directly under kubepods.slice.
    host.process(300, 700, None);
    host.container(
        &format!(
            "kubepods.slice/kubepods-pod{}.slice/cri-containerd-{SANDBOX}.scope",
            underscored(UID_C)
        ),
        &[300],
    );
    // Not pods: a system slice, a QoS slice without pods.
    host.container("system.slice/containerd.service", &[1]);
    fs::create_dir_all(
        host.config()
            .cgroup_root
            .join("kubepods.slice/kubepods-besteffort.slice/other.slice"),
    )
    .unwrap();

    let scan = scan_against(&host.config(), host.id(1)).unwrap();
    assert!(scan.unreachable.is_empty(), "{:?}", scan.unreachable);
    let found: Vec<(&str, PathBuf)> = scan
        .pods
        .iter()
        .map(|(uid, pod)| (uid.as_str(), pod.netns.clone()))
        .collect();
    assert_eq!(
        found,
        vec![
            (UID_A, host.netns(100)),
            (UID_B, host.netns(201)),
            (UID_C, host.netns(300)),
        ]
    );
    assert!(scan.pods[UID_A].cgroup.ends_with(format!(
        "kubepods-burstable-pod{}.slice",
        underscored(UID_A)
    )));
}

#[test]
fn cgroupfs_driver_pods_are_found_for_containerd_and_cri_o() {
    let host = FakeHost::new();
    host.process(100, 500, None);
    host.process(101, 400, None);
    host.container(&format!("kubepods/burstable/pod{UID_A}/{SANDBOX}"), &[101]);
    host.container(&format!("kubepods/burstable/pod{UID_A}/{APP}"), &[100]);
    host.process(200, 50, Some(1));
    host.process(201, 600, None);
    host.container(
        &format!("kubepods/besteffort/pod{UID_B}/crio-conmon-{SANDBOX}"),
        &[200],
    );
    host.container(
        &format!("kubepods/besteffort/pod{UID_B}/crio-{SANDBOX}"),
        &[201],
    );
    host.process(300, 700, None);
    host.container(&format!("kubepods/pod{UID_C}/{SANDBOX}"), &[300]);

    let scan = scan_against(&host.config(), host.id(1)).unwrap();
    assert!(scan.unreachable.is_empty(), "{:?}", scan.unreachable);
    assert_eq!(scan.pods[UID_A].netns, host.netns(101));
    assert_eq!(scan.pods[UID_B].netns, host.netns(201));
    assert_eq!(scan.pods[UID_C].netns, host.netns(300));
}

#[test]
fn pods_without_a_usable_netns_are_reported_with_the_reason() {
    let host = FakeHost::new();
    // hostNetwork: the pod's process shares pid 1's netns.
    host.process(100, 500, Some(1));
    host.container(&format!("kubepods/pod{UID_A}/{SANDBOX}"), &[100]);
    // A sandbox not started yet: an empty cgroup.
    host.container(&format!("kubepods/besteffort/pod{UID_B}/{SANDBOX}"), &[]);
    // The agent outside the host PID namespace sees pids as 0.
    host.container(&format!("kubepods/burstable/pod{UID_C}/{SANDBOX}"), &[0]);

    let scan = scan_against(&host.config(), host.id(1)).unwrap();
    assert!(scan.pods.is_empty(), "{:?}", scan.pods);
    assert_eq!(scan.host_network, [UID_A.to_string()].into());
    assert!(!scan.unreachable.contains_key(UID_A));
    assert!(
        scan.unreachable[UID_B].contains("no process"),
        "{:?}",
        scan.unreachable
    );
    assert!(
        scan.unreachable[UID_C].contains("hostPID"),
        "{:?}",
        scan.unreachable
    );
}

#[test]
fn a_host_without_kubepods_has_no_pods_but_a_wrong_proc_root_is_an_error() {
    let host = FakeHost::new();
    assert_eq!(
        scan_against(&host.config(), host.id(1)).unwrap(),
        Scan::default()
    );
    let mut config = host.config();
    config.proc_root = "/proc".into();
    assert_eq!(scan(&config).unwrap(), Scan::default());
    config.proc_root = host.dir.path().join("nope");
    let err = scan(&config).unwrap_err().to_string();
    assert!(err.contains("agent.discovery.procRoot"), "{err}");
}

#[test]
fn apply_records_new_pods_keeps_valid_ones_and_forgets_the_gone() {
    let host = FakeHost::new();
    host.process(100, 500, None);
    host.process(101, 600, Some(100));
    host.process(200, 500, None);
    host.container(&format!("kubepods/pod{UID_A}/{SANDBOX}"), &[100, 101]);
    host.container(&format!("kubepods/pod{UID_B}/{SANDBOX}"), &[200]);
    let pods = NodePods::new();
    // Known from CNI at another path to the same netns: kept as is.
    pods.record(
        UID_A,
        NodePod {
            netns: host.netns(101),
            ips: Vec::new(),
            learned_from: LearnedFrom::Cni,
        },
    );
    // Learned by discovery earlier, cgroup gone since.
    pods.record(
        UID_C,
        NodePod {
            netns: host.netns(200),
            ips: Vec::new(),
            learned_from: LearnedFrom::Discovery,
        },
    );
    // From CNI, netns path still there, no cgroup yet (ADD before the cgroup shows).
    let early = "7e57ab1e-0000-4000-8000-000000000001";
    pods.record(
        early,
        NodePod {
            netns: host.netns(1),
            ips: Vec::new(),
            learned_from: LearnedFrom::Cni,
        },
    );
    // From CNI, netns gone: a DEL missed while the agent was down.
    let missed = "7e57ab1e-0000-4000-8000-000000000002";
    pods.record(
        missed,
        NodePod {
            netns: host.dir.path().join("gone"),
            ips: Vec::new(),
            learned_from: LearnedFrom::Cni,
        },
    );

    let applied = apply(&scan_against(&host.config(), host.id(1)).unwrap(), &pods);
    assert_eq!(applied.recorded, vec![UID_B.to_string()]);
    let mut forgotten = applied.forgotten.clone();
    forgotten.sort();
    assert_eq!(forgotten, vec![missed.to_string(), UID_C.to_string()]);
    assert_eq!(pods.netns(UID_A), Some(host.netns(101)));
    assert_eq!(pods.netns(UID_B), Some(host.netns(200)));
    assert_eq!(pods.netns(early), Some(host.netns(1)));
    // Nothing changed: nothing to do.
    assert_eq!(
        apply(&scan_against(&host.config(), host.id(1)).unwrap(), &pods),
        Applied::default()
    );
}

#[test]
fn container_and_pod_names_are_recognised_strictly() {
    assert!(is_container_dir(&format!("cri-containerd-{SANDBOX}.scope")));
    assert!(is_container_dir(&format!("crio-{SANDBOX}.scope")));
    assert!(is_container_dir(&format!("crio-{SANDBOX}")));
    assert!(is_container_dir(SANDBOX));
    assert!(!is_container_dir(&format!("crio-conmon-{SANDBOX}.scope")));
    assert!(!is_container_dir("init.scope"));
    assert_eq!(
        Driver::Systemd.pod_uid(&format!(
            "kubepods-burstable-pod{}.slice",
            underscored(UID_A)
        )),
        Some(UID_A.to_string())
    );
    assert_eq!(Driver::Systemd.pod_uid("kubepods-burstable.slice"), None);
    assert_eq!(Driver::Cgroupfs.pod_uid("podNOT-A-UID"), None);
}
