//! The stage against a real dnsmasq (`test_util::dnsmasq`): answers reach the snapshot,
//! change with the server, outlive its failures; and the limits hold.

use std::{
    collections::BTreeSet,
    net::{SocketAddr, UdpSocket},
    path::PathBuf,
};

use super::*;
use crate::{
    dns::{self, Metrics},
    state::{ExternalPort, ExternalService, WorkloadRef, external::Protocol},
    test_util::dnsmasq::Dnsmasq,
};

#[tokio::test]
async fn publishes_the_addresses_of_dns_hosts_and_nothing_for_static_ones() {
    let dns = Dnsmasq::start(
        &[
            ("a.example.test", ip("192.0.2.1")),
            ("a.example.test", ip("2001:db8::1")),
            ("b.example.test", ip("192.0.2.2")),
        ],
        60,
    );
    let mut raw = Snapshot::default();
    add(
        &mut raw,
        dns_service("api", &["a.example.test", "b.example.test"]),
    );
    let mut fixed = dns_service("fixed", &["static.example.test"]);
    fixed.resolution = Resolution::Static;
    fixed.addresses = vec![ip("198.51.100.7")];
    add(&mut raw, fixed);
    let mut run = Run::start(raw, dns.addr(), fast());
    let published = run
        .until(|s| s.resolved_hosts.len() == 2, "both hosts resolved")
        .await;
    assert_eq!(
        published.resolved_hosts["a.example.test"],
        [ip("192.0.2.1"), ip("2001:db8::1")]
    );
    assert_eq!(
        published.resolved_hosts["b.example.test"],
        [ip("192.0.2.2")]
    );
    assert_eq!(
        published
            .external_service("192.0.2.2:443".parse().unwrap())
            .map(|e| e.name.name.as_str()),
        Some("api"),
        "the address index sees the resolved addresses"
    );
    assert_eq!(run.resolver.metrics().hosts(), (2, 0));
}

#[tokio::test]
async fn a_snapshot_without_dns_hosts_passes_through_as_it_is() {
    let mut raw = Snapshot::default();
    raw.mesh.default_deny = true;
    let raw = Arc::new(raw);
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let (raw_tx, raw_rx) = watch::channel(Arc::clone(&raw));
    let (tx, mut rx) = watch::channel(Arc::new(Snapshot::default()));
    let resolver = resolver(silent.local_addr().unwrap());
    tokio::spawn(follow(raw_rx, tx, resolver.clone(), fast()));
    rx.changed().await.unwrap();
    assert!(Arc::ptr_eq(&rx.borrow_and_update(), &raw));
    let mut next = (*raw).clone();
    next.mesh.default_deny = false;
    let next = Arc::new(next);
    raw_tx.send(Arc::clone(&next)).unwrap();
    rx.changed().await.unwrap();
    assert!(Arc::ptr_eq(&rx.borrow_and_update(), &next));
    assert_eq!(resolver.metrics().lookups("timeout"), 0);
    assert_eq!(resolver.metrics().lookups("error"), 0);
}

#[tokio::test]
async fn a_changed_answer_is_published_when_the_ttl_ends() {
    let dns = Dnsmasq::start(&[("a.example.test", ip("192.0.2.1"))], 1);
    let mut raw = Snapshot::default();
    add(&mut raw, dns_service("api", &["a.example.test"]));
    let mut run = Run::start(raw, dns.addr(), fast());
    run.until(
        |s| resolved(s, "a.example.test") == [ip("192.0.2.1")],
        "first answer",
    )
    .await;
    dns.set(&[("a.example.test", ip("192.0.2.9"))]);
    run.until(
        |s| resolved(s, "a.example.test") == [ip("192.0.2.9")],
        "new answer",
    )
    .await;
}

#[tokio::test]
async fn the_same_answer_again_publishes_nothing() {
    let dns = Dnsmasq::start(&[("a.example.test", ip("192.0.2.1"))], 1);
    let mut raw = Snapshot::default();
    add(&mut raw, dns_service("api", &["a.example.test"]));
    let mut run = Run::start(raw, dns.addr(), fast());
    run.until(
        |s| !resolved(s, "a.example.test").is_empty(),
        "first answer",
    )
    .await;
    let metrics = run.resolver.metrics().clone();
    let asked = metrics.lookups("ok");
    eventually("two more lookups", || metrics.lookups("ok") >= asked + 2).await;
    assert!(
        !run.rx.has_changed().unwrap(),
        "republished the same answer"
    );
}

#[tokio::test]
async fn failures_keep_the_last_answer_and_are_counted_until_the_host_resolves_again() {
    let mut dns = Dnsmasq::start(&[("a.example.test", ip("192.0.2.1"))], 1);
    let mut raw = Snapshot::default();
    add(&mut raw, dns_service("api", &["a.example.test"]));
    let mut run = Run::start(raw, dns.addr(), fast());
    run.until(
        |s| !resolved(s, "a.example.test").is_empty(),
        "first answer",
    )
    .await;
    let metrics = run.resolver.metrics().clone();

    // NXDOMAIN: the name is gone from the server.
    dns.set(&[("other.example.test", ip("192.0.2.5"))]);
    eventually("NXDOMAIN counted", || metrics.lookups("error") >= 2).await;
    // The server is gone.
    dns.stop();
    let failed = metrics.lookups("error") + metrics.lookups("timeout");
    eventually("failures counted", || {
        metrics.lookups("error") + metrics.lookups("timeout") >= failed + 2
    })
    .await;
    assert_eq!(
        resolved(&run.rx.borrow_and_update(), "a.example.test"),
        [ip("192.0.2.1")],
        "the last good answer stays"
    );

    dns.set(&[("a.example.test", ip("192.0.2.3"))]);
    dns.restart();
    run.until(
        |s| resolved(s, "a.example.test") == [ip("192.0.2.3")],
        "recovered",
    )
    .await;
}

#[tokio::test]
async fn a_host_no_longer_named_is_forgotten() {
    let dns = Dnsmasq::start(
        &[
            ("a.example.test", ip("192.0.2.1")),
            ("b.example.test", ip("192.0.2.2")),
        ],
        60,
    );
    let mut raw = Snapshot::default();
    add(&mut raw, dns_service("api", &["a.example.test"]));
    add(&mut raw, dns_service("other", &["b.example.test"]));
    let mut run = Run::start(raw.clone(), dns.addr(), fast());
    run.until(|s| s.resolved_hosts.len() == 2, "both resolved")
        .await;

    raw.external_services
        .remove(&WorkloadRef::new("egress", "other"));
    run.raw_tx.send(Arc::new(raw)).unwrap();
    let published = run
        .until(|s| s.resolved_hosts.len() == 1, "b forgotten")
        .await;
    assert!(published.resolved_hosts.contains_key("a.example.test"));

    // No DNS host left: the raw snapshot itself is published.
    let empty = Arc::new(Snapshot::default());
    run.raw_tx.send(Arc::clone(&empty)).unwrap();
    let published = run
        .until(|s| s.resolved_hosts.is_empty(), "all forgotten")
        .await;
    assert!(Arc::ptr_eq(&published, &empty));
    assert_eq!(run.resolver.metrics().hosts(), (0, 0));
}

#[tokio::test]
async fn hosts_past_the_limit_are_not_resolved_and_are_counted() {
    let dns = Dnsmasq::start(
        &[
            ("a.example.test", ip("192.0.2.1")),
            ("b.example.test", ip("192.0.2.2")),
            ("c.example.test", ip("192.0.2.3")),
        ],
        60,
    );
    let mut raw = Snapshot::default();
    add(
        &mut raw,
        dns_service("one", &["c.example.test", "a.example.test"]),
    );
    add(
        &mut raw,
        dns_service("two", &["b.example.test", "a.example.test"]),
    );
    let settings = Settings {
        max_hosts: 2,
        ..fast()
    };
    let mut run = Run::start(raw, dns.addr(), settings);
    let published = run
        .until(|s| s.resolved_hosts.len() == 2, "two resolved")
        .await;
    let hosts: Vec<&str> = published
        .resolved_hosts
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(hosts, ["a.example.test", "b.example.test"]);
    assert_eq!(run.resolver.metrics().hosts(), (2, 1));
}

#[tokio::test]
async fn no_more_lookups_run_at_once_than_the_limit() {
    // A server that reads every query and answers none: each lookup runs to its timeout.
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    silent
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let names: Vec<String> = (0..20).map(|n| format!("h{n}.example.test")).collect();
    let mut raw = Snapshot::default();
    let hosts: Vec<&str> = names.iter().map(String::as_str).collect();
    add(&mut raw, dns_service("many", &hosts));
    let settings = Settings {
        max_in_flight: 3,
        ..fast()
    };
    let (_raw_tx, raw_rx) = watch::channel(Arc::new(raw));
    let (tx, _rx) = watch::channel(Arc::new(Snapshot::default()));
    let addr = silent.local_addr().unwrap();
    let task = tokio::spawn(follow(
        raw_rx,
        tx,
        dns::Resolver::new(
            dns::Config {
                resolv_conf: PathBuf::from("/nonexistent"),
                nameservers: vec![addr],
                timeout: Duration::from_secs(2),
            },
            Metrics::default(),
        ),
        settings,
    ));
    // Well within the first lookups' timeout: only they can have asked.
    let asked = tokio::task::spawn_blocking(move || {
        let mut names = BTreeSet::new();
        let until = std::time::Instant::now() + Duration::from_millis(1200);
        let mut buf = [0u8; 512];
        while std::time::Instant::now() < until {
            if let Ok(n) = silent.recv(&mut buf) {
                names.insert(qname(&buf[..n]));
            }
        }
        names
    })
    .await
    .unwrap();
    task.abort();
    assert!(
        (1..=3).contains(&asked.len()),
        "{} hosts asked at once: {asked:?}",
        asked.len()
    );
}

#[test]
fn ttls_are_clamped_and_retries_back_off() {
    let settings = Settings::default();
    let mut table = Table::new(settings.clone());
    let mut raw = Snapshot::default();
    add(&mut raw, dns_service("api", &["a.example.test"]));
    let now = Instant::now();
    table.want(&raw, now);
    for (ttl, wait) in [(0, 5), (1, 5), (60, 60), (86_400, 300)] {
        assert_eq!(table.start_due(now).as_deref(), Some("a.example.test"));
        let answer = Answer {
            addresses: vec![ip("192.0.2.1")],
            ttl: Duration::from_secs(ttl),
        };
        table.record("a.example.test", Ok(answer), now);
        assert_eq!(table.next_due(), Some(now + Duration::from_secs(wait)));
        table.hosts.get_mut("a.example.test").unwrap().due = now;
    }
    let waits: Vec<u64> = (1..=8).map(|n| backoff(&settings, n).as_secs()).collect();
    assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30, 30]);
    assert_eq!(backoff(&settings, u32::MAX), settings.retry_max);
}

/// A stage running on `raw` against the nameserver at `addr`.
struct Run {
    raw_tx: watch::Sender<Arc<Snapshot>>,
    rx: watch::Receiver<Arc<Snapshot>>,
    resolver: Resolver,
    task: tokio::task::JoinHandle<()>,
}

impl Run {
    fn start(raw: Snapshot, addr: SocketAddr, settings: Settings) -> Self {
        let (raw_tx, raw_rx) = watch::channel(Arc::new(raw));
        let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
        let resolver = resolver(addr);
        let task = tokio::spawn(follow(raw_rx, tx, resolver.clone(), settings));
        Self {
            raw_tx,
            rx,
            resolver,
            task,
        }
    }

    /// The first published snapshot for which `done` holds, within a few seconds.
    async fn until(&mut self, done: impl Fn(&Snapshot) -> bool, what: &str) -> Arc<Snapshot> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let current = Arc::clone(&self.rx.borrow_and_update());
            if done(&current) {
                return current;
            }
            let changed = tokio::time::timeout_at(deadline, self.rx.changed()).await;
            assert!(
                matches!(changed, Ok(Ok(()))),
                "{what}: not within {PATIENCE:?}; last published {:?}",
                current.resolved_hosts
            );
        }
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn eventually(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {PATIENCE:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Fast enough for tests: answers of 1 s are kept 1 s, retries start at 100 ms.
fn fast() -> Settings {
    Settings {
        min_ttl: Duration::from_secs(1),
        retry_first: Duration::from_millis(100),
        retry_max: Duration::from_millis(400),
        ..Settings::default()
    }
}

fn resolver(addr: SocketAddr) -> Resolver {
    dns::Resolver::new(
        dns::Config {
            resolv_conf: PathBuf::from("/nonexistent/resolv.conf"),
            nameservers: vec![addr],
            timeout: Duration::from_secs(1),
        },
        Metrics::default(),
    )
}

fn dns_service(name: &str, hosts: &[&str]) -> ExternalService {
    ExternalService {
        name: WorkloadRef::new("egress", name),
        hosts: hosts.iter().map(|h| (*h).to_owned()).collect(),
        ports: vec![ExternalPort {
            number: 443,
            name: String::new(),
            protocol: Protocol::Tcp,
            target_port: 443,
            tls: None,
        }],
        resolution: Resolution::Dns,
        addresses: Vec::new(),
    }
}

fn add(snapshot: &mut Snapshot, service: ExternalService) {
    snapshot
        .external_services
        .insert(service.name.clone(), service);
}

fn resolved(snapshot: &Snapshot, host: &str) -> Vec<IpAddr> {
    snapshot
        .resolved_hosts
        .get(host)
        .cloned()
        .unwrap_or_default()
}

fn ip(text: &str) -> IpAddr {
    text.parse().expect("test address")
}

/// The question name of a DNS query (labels from byte 12), lower-cased: hickory may
/// randomise its case.
fn qname(packet: &[u8]) -> String {
    let mut labels = Vec::new();
    let mut at = 12;
    while let Some(&len) = packet.get(at) {
        if len == 0 {
            break;
        }
        let label = packet
            .get(at + 1..at + 1 + usize::from(len))
            .unwrap_or_default();
        labels.push(String::from_utf8_lossy(label).to_lowercase());
        at += 1 + usize::from(len);
    }
    labels.join(".")
}

const PATIENCE: Duration = Duration::from_secs(8);
