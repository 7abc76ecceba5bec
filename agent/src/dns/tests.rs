//! The resolver against a real dnsmasq (`test_util::dnsmasq`), and against servers that
//! misbehave: one that never answers, one that is gone.

use std::{
    io::ErrorKind,
    net::UdpSocket,
    time::{Duration, Instant},
};

use super::*;
use crate::test_util::dnsmasq::Dnsmasq;

fn resolver(nameserver: SocketAddr, timeout: Duration) -> Resolver {
    Resolver::new(
        Config {
            resolv_conf: PathBuf::from("/nonexistent/resolv.conf"),
            nameservers: vec![nameserver],
            timeout,
        },
        Metrics::default(),
    )
}

fn ip(text: &str) -> IpAddr {
    text.parse().expect("test address")
}

#[tokio::test]
async fn a_host_resolves_to_its_a_and_aaaa_records_with_their_ttl() {
    let dns = Dnsmasq::start(
        &[
            ("a.example.test", ip("2001:db8::1")),
            ("a.example.test", ip("192.0.2.1")),
            ("v4.example.test", ip("192.0.2.4")),
        ],
        7,
    );
    let resolver = resolver(dns.addr(), DEFAULT_TIMEOUT);
    let answer = resolver.lookup("a.example.test").await.unwrap();
    assert_eq!(answer.addresses, [ip("192.0.2.1"), ip("2001:db8::1")]);
    assert_eq!(answer.ttl, Duration::from_secs(7));
    // No AAAA is no failure; a trailing dot is the same name.
    let answer = resolver.lookup("v4.example.test.").await.unwrap();
    assert_eq!(answer.addresses, [ip("192.0.2.4")]);
    assert_eq!(resolver.metrics().lookups("ok"), 2);
}

#[tokio::test]
async fn a_changed_answer_is_seen_by_the_next_lookup() {
    let dns = Dnsmasq::start(&[("a.example.test", ip("192.0.2.1"))], 1);
    let resolver = resolver(dns.addr(), DEFAULT_TIMEOUT);
    let first = resolver.lookup("a.example.test").await.unwrap();
    assert_eq!(first.addresses, [ip("192.0.2.1")]);
    dns.set(&[("a.example.test", ip("192.0.2.2"))]);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let answer = resolver.lookup("a.example.test").await.unwrap();
        if answer.addresses == [ip("192.0.2.2")] {
            break;
        }
        assert!(Instant::now() < deadline, "still {answer:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn an_unknown_host_is_no_such_host() {
    let dns = Dnsmasq::start(&[("a.example.test", ip("192.0.2.1"))], 5);
    let resolver = resolver(dns.addr(), DEFAULT_TIMEOUT);
    let err = resolver.lookup("missing.example.test").await.unwrap_err();
    assert!(matches!(err, Error::NoSuchHost { .. }), "{err:?}");
    assert_eq!(err.reason(), "no_such_host");
    assert_eq!(resolver.metrics().lookups("error"), 1);
}

#[tokio::test]
async fn a_server_that_is_gone_fails_the_lookup_within_the_timeout() {
    let mut dns = Dnsmasq::start(&[("a.example.test", ip("192.0.2.1"))], 5);
    let resolver = resolver(dns.addr(), Duration::from_secs(2));
    resolver.lookup("a.example.test").await.unwrap();
    dns.stop();
    let started = Instant::now();
    let err = resolver.lookup("a.example.test").await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(3), "{err:?}");
    assert_eq!(resolver.metrics().lookups("ok"), 1);
    assert_eq!(
        resolver.metrics().lookups("error") + resolver.metrics().lookups("timeout"),
        1
    );
}

#[tokio::test]
async fn a_server_that_never_answers_times_out_within_the_timeout() {
    // Bound and never read: queries vanish as into a black hole.
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let timeout = Duration::from_millis(500);
    let resolver = resolver(silent.local_addr().unwrap(), timeout);
    let started = Instant::now();
    let err = resolver.lookup("a.example.test").await.unwrap_err();
    let took = started.elapsed();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    assert!(took >= timeout && took < timeout * 3, "took {took:?}");
    assert_eq!(resolver.metrics().lookups("timeout"), 1);
}

#[tokio::test]
async fn a_host_with_a_hundred_addresses_keeps_the_lowest_32() {
    let names: Vec<(&str, IpAddr)> = (1..=100u8)
        .rev()
        .map(|n| ("many.example.test", IpAddr::from([198, 51, 100, n])))
        .collect();
    // 100 A records do not fit a plain UDP answer: hickory asks again over TCP.
    let dns = Dnsmasq::start(&names, 5);
    let answer = resolver(dns.addr(), DEFAULT_TIMEOUT)
        .lookup("many.example.test")
        .await
        .unwrap();
    let lowest: Vec<IpAddr> = (1..=32u8)
        .map(|n| IpAddr::from([198, 51, 100, n]))
        .collect();
    assert_eq!(answer.addresses, lowest);
}

#[tokio::test]
async fn an_invalid_name_is_refused_without_a_query() {
    let server = UdpSocket::bind("127.0.0.1:0").unwrap();
    server.set_nonblocking(true).unwrap();
    let resolver = resolver(server.local_addr().unwrap(), Duration::from_millis(300));
    for bad in [
        "bad_name.test",
        "",
        "10.0.0.1",
        "-a.test",
        &"a.".repeat(130),
    ] {
        let err = resolver.lookup(bad).await.unwrap_err();
        assert!(matches!(err, Error::InvalidName { .. }), "{bad:?}: {err:?}");
    }
    let mut buf = [0u8; 512];
    assert_eq!(
        server.recv(&mut buf).unwrap_err().kind(),
        ErrorKind::WouldBlock,
        "a query was sent"
    );
    assert_eq!(resolver.metrics().lookups("error"), 5);
    // The server does see a valid name's query: the silence above meant something.
    resolver.lookup("a.example.test").await.unwrap_err();
    assert!(server.recv(&mut buf).is_ok());
}

#[tokio::test]
async fn a_missing_resolv_conf_fails_the_lookup_not_the_resolver() {
    let resolver = Resolver::new(
        Config {
            resolv_conf: PathBuf::from("/nonexistent/resolv.conf"),
            ..Config::default()
        },
        Metrics::default(),
    );
    let err = resolver.lookup("a.example.test").await.unwrap_err();
    assert!(err.is_config(), "{err:?}");
    assert!(
        err.to_string().contains("/nonexistent/resolv.conf"),
        "{err}"
    );
}

#[tokio::test]
async fn a_resolv_conf_gives_the_nameservers_and_their_options() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("resolv.conf");
    std::fs::write(
        &path,
        "search example.test\nnameserver 192.0.2.53\nnameserver 2001:db8::53\n\
         options timeout:2 attempts:4 ndots:5\n",
    )
    .unwrap();
    let config = Config {
        resolv_conf: path.clone(),
        ..Config::default()
    };
    let (servers, options) = from_resolv_conf(&config).await.unwrap();
    let ips: Vec<IpAddr> = servers.iter().map(|s| s.ip).collect();
    assert_eq!(ips, [ip("192.0.2.53"), ip("2001:db8::53")]);
    assert_eq!(options.timeout, Duration::from_secs(2));
    assert_eq!(options.attempts, 4);

    std::fs::write(&path, "search example.test\n").unwrap();
    let err = from_resolv_conf(&config).await.unwrap_err();
    assert!(err.is_config(), "{err:?}");
}
