use std::{
    io::Write as _,
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use rcgen::SanType;
use rustls::pki_types::CertificateDer;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
};
use tokio_rustls::TlsAcceptor;

use super::*;
use crate::{
    identity::SpiffeId,
    jwt::{
        Expect, TokenError, decode,
        tests::{jwks_json, p256, rsa, sign},
        verify,
    },
    test_util::ca::TestCa,
};

const LONG: Duration = Duration::from_secs(60);
const TIMEOUT: Duration = Duration::from_secs(5);

#[tokio::test]
async fn fetches_once_then_serves_from_cache() {
    let server = TestServer::start(Reply::Ok(key_set("k1"))).await;
    let cache = server.cache();
    let first = cache.get(&server.uri(), LONG, TIMEOUT).await.unwrap();
    assert!(first.has_kid("k1"));
    let second = cache.get(&server.uri(), LONG, TIMEOUT).await.unwrap();
    assert!(Arc::ptr_eq(&first, &second));
    assert_eq!(server.requests(), 1);
    let head = server.last_request();
    assert!(
        head.starts_with("GET /.well-known/jwks.json?v=1 HTTP/1.1\r\n"),
        "{head}"
    );
    assert!(
        head.to_ascii_lowercase()
            .contains(&format!("host: 127.0.0.1:{}\r\n", server.addr.port())),
        "{head}"
    );
}

#[tokio::test]
async fn a_stale_set_serves_at_once_while_its_successor_is_fetched() {
    let server = TestServer::start(Reply::Ok(key_set("k1"))).await;
    let cache = server.cache();
    let refresh = Duration::from_millis(100);
    cache.get(&server.uri(), refresh, TIMEOUT).await.unwrap();
    server.set(Reply::Slow(Duration::from_millis(300), key_set("k2")));
    tokio::time::sleep(Duration::from_millis(150)).await;
    // Stale: answered with the old set at once, not after the slow fetch.
    let asked = Instant::now();
    let keys = cache.get(&server.uri(), refresh, TIMEOUT).await.unwrap();
    assert!(keys.has_kid("k1"));
    assert!(
        asked.elapsed() < Duration::from_millis(200),
        "{:?}",
        asked.elapsed()
    );
    // Callers during the refresh start no fetch of their own.
    for _ in 0..5 {
        cache.get(&server.uri(), refresh, TIMEOUT).await.unwrap();
    }
    let keys = until_fetched(&cache, &server, "k2", refresh).await;
    assert!(keys.has_kid("k2"));
    assert_eq!(server.requests(), 2);
}

/// `get` until the set holds `kid` (a background refresh landed), within a few seconds.
async fn until_fetched(
    cache: &JwksCache,
    server: &TestServer,
    kid: &str,
    refresh: Duration,
) -> Arc<Jwks> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let keys = cache.get(&server.uri(), refresh, TIMEOUT).await.unwrap();
        if keys.has_kid(kid) || Instant::now() > deadline {
            return keys;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn concurrent_callers_share_one_fetch() {
    let server = TestServer::start(Reply::Slow(Duration::from_millis(200), key_set("k1"))).await;
    let cache = server.cache();
    let uri = server.uri();
    let calls = (0..8).map(|_| {
        let (cache, uri) = (cache.clone(), uri.clone());
        tokio::spawn(async move { cache.get(&uri, LONG, TIMEOUT).await })
    });
    for call in calls.collect::<Vec<_>>() {
        assert!(call.await.unwrap().unwrap().has_kid("k1"));
    }
    assert_eq!(server.requests(), 1);
}

#[tokio::test]
async fn a_server_that_never_answers_times_out() {
    let server = TestServer::start(Reply::Hang).await;
    let cache = server.cache();
    let started = Instant::now();
    let err = cache
        .get(&server.uri(), LONG, Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(matches!(err, FetchError::Timeout(_)), "{err}");
    assert_eq!(err.reason(), "jwks_timeout");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(server.requests(), 1);
}

#[tokio::test]
async fn callers_waiting_on_a_failed_fetch_take_its_error() {
    let server = TestServer::start(Reply::Hang).await;
    let cache = server.cache();
    let uri = server.uri();
    let started = Instant::now();
    let calls: Vec<_> = (0..4)
        .map(|_| {
            let (cache, uri) = (cache.clone(), uri.clone());
            tokio::spawn(async move { cache.get(&uri, LONG, Duration::from_millis(300)).await })
        })
        .collect();
    for call in calls {
        let err = call.await.unwrap().unwrap_err();
        assert!(matches!(err, FetchError::Timeout(_)), "{err}");
    }
    // One timeout, not four in a row.
    assert!(started.elapsed() < Duration::from_millis(1000));
    assert_eq!(server.requests(), 1);
}

#[tokio::test]
async fn a_body_over_256_kib_is_refused() {
    let big = vec![b' '; MAX_JWKS_BYTES + 1];
    for reply in [Reply::Ok(big.clone()), Reply::Undeclared(big)] {
        let server = TestServer::start(reply).await;
        let err = server
            .cache()
            .get(&server.uri(), LONG, TIMEOUT)
            .await
            .unwrap_err();
        assert!(matches!(err, FetchError::TooLarge), "{err}");
    }
    // Exactly the limit is read whole (and then refused as a key set, not for its size).
    let mut exact = key_set("k1");
    exact.resize(MAX_JWKS_BYTES, b' ');
    let server = TestServer::start(Reply::Undeclared(exact)).await;
    assert!(
        server
            .cache()
            .get(&server.uri(), LONG, TIMEOUT)
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn a_failed_refresh_keeps_the_last_good_set() {
    let server = TestServer::start(Reply::Ok(key_set("k1"))).await;
    let mut cache = server.cache();
    cache.min_refetch = Duration::from_millis(300);
    let good = cache.get(&server.uri(), LONG, TIMEOUT).await.unwrap();
    server.set(Reply::Status(500));
    let again = cache
        .get(&server.uri(), Duration::ZERO, TIMEOUT)
        .await
        .unwrap();
    assert!(Arc::ptr_eq(&good, &again));
    server.until_requests(2).await;
    // The failure is not retried before min_refetch, however stale the set is.
    let again = cache
        .get(&server.uri(), Duration::ZERO, TIMEOUT)
        .await
        .unwrap();
    assert!(Arc::ptr_eq(&good, &again));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(server.requests(), 2);
    tokio::time::sleep(Duration::from_millis(250)).await;
    server.set(Reply::Ok(key_set("k2")));
    let recovered = until_fetched(&cache, &server, "k2", Duration::ZERO).await;
    assert!(recovered.has_kid("k2"));
    assert_eq!(server.requests(), 3);
}

#[tokio::test]
async fn refetch_picks_up_rotated_keys_at_most_once_per_min_refetch() {
    let server = TestServer::start(Reply::Ok(key_set("old"))).await;
    let mut cache = server.cache();
    cache.min_refetch = Duration::from_millis(300);
    cache.get(&server.uri(), LONG, TIMEOUT).await.unwrap();
    server.set(Reply::Ok(key_set("new")));
    // Too soon after the first fetch: the cached set, no request.
    let keys = cache.refetch(&server.uri(), TIMEOUT).await.unwrap();
    assert!(keys.has_kid("old"));
    assert_eq!(server.requests(), 1);
    tokio::time::sleep(Duration::from_millis(350)).await;
    let keys = cache.refetch(&server.uri(), TIMEOUT).await.unwrap();
    assert!(keys.has_kid("new"));
    assert_eq!(server.requests(), 2);
    // A flood of unknown kids right after: still one request.
    for _ in 0..10 {
        cache.refetch(&server.uri(), TIMEOUT).await.unwrap();
    }
    assert_eq!(server.requests(), 2);
    // get serves what refetch brought.
    let keys = cache.get(&server.uri(), LONG, TIMEOUT).await.unwrap();
    assert!(keys.has_kid("new"));
}

#[tokio::test]
async fn a_token_signed_with_a_rotated_key_verifies_after_refetch() {
    let server = TestServer::start(Reply::Ok(key_set("old"))).await;
    let mut cache = server.cache();
    cache.min_refetch = Duration::ZERO;
    let claims = serde_json::json!({"iss": "https://issuer.example", "sub": "alice"});
    let token = decode(&sign(rsa(), "RS256", Some("new"), &claims)).unwrap();
    let expect = Expect {
        issuer: "https://issuer.example",
        audiences: &[],
        now: std::time::SystemTime::now(),
    };
    let keys = cache.get(&server.uri(), LONG, TIMEOUT).await.unwrap();
    let err = verify(&token, &keys, &expect).unwrap_err();
    assert_eq!(err, TokenError::UnknownKey);
    server.set(Reply::Ok(key_set("new")));
    let keys = cache.refetch(&server.uri(), TIMEOUT).await.unwrap();
    let claims = verify(&token, &keys, &expect).unwrap();
    assert_eq!(claims.principal(), Some("https://issuer.example/alice"));
}

#[tokio::test]
async fn http_and_other_schemes_are_refused() {
    let cache = JwksCache::new(None).unwrap();
    for uri in ["http://127.0.0.1:1/jwks", "ftp://example.com/jwks", "/jwks"] {
        let err = cache
            .get(&uri.parse().unwrap(), LONG, TIMEOUT)
            .await
            .unwrap_err();
        assert!(matches!(err, FetchError::NotHttps(_)), "{uri}: {err}");
        assert_eq!(err.reason(), "jwks_not_https");
    }
}

#[tokio::test]
async fn statuses_other_than_200_are_errors_and_redirects_are_not_followed() {
    let server = TestServer::start(Reply::Status(404)).await;
    let err = server
        .cache()
        .get(&server.uri(), LONG, TIMEOUT)
        .await
        .unwrap_err();
    assert!(matches!(err, FetchError::Status(404)), "{err}");
    server.set(Reply::Status(302));
    let err = server
        .cache()
        .get(&server.uri(), LONG, TIMEOUT)
        .await
        .unwrap_err();
    assert!(matches!(err, FetchError::Status(302)), "{err}");
    assert_eq!(server.requests(), 2);
}

#[tokio::test]
async fn a_server_outside_the_trusted_roots_is_refused() {
    let server = TestServer::start(Reply::Ok(key_set("k1"))).await;
    let err = JwksCache::new(None)
        .unwrap()
        .get(&server.uri(), LONG, TIMEOUT)
        .await
        .unwrap_err();
    assert!(matches!(err, FetchError::Tls { .. }), "{err}");
    assert_eq!(server.requests(), 0);
}

#[tokio::test]
async fn a_host_name_is_resolved_and_used_as_the_server_name() {
    let server = TestServer::start(Reply::Ok(key_set("k1"))).await;
    let uri = format!("https://localhost:{}/jwks", server.addr.port());
    let keys = server
        .cache()
        .get(&uri.parse().unwrap(), LONG, TIMEOUT)
        .await
        .unwrap();
    assert!(keys.has_kid("k1"));
}

#[tokio::test]
async fn an_unusable_key_set_is_an_error() {
    let server = TestServer::start(Reply::Ok(b"{\"keys\": []}".to_vec())).await;
    let err = server
        .cache()
        .get(&server.uri(), LONG, TIMEOUT)
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "jwks_no_usable_key", "{err}");
}

#[test]
fn the_cache_and_its_sets_can_be_shared_across_tasks() {
    fn shared<T: Send + Sync + 'static>() {}
    shared::<JwksCache>();
    shared::<Arc<Jwks>>();
    shared::<FetchError>();
}

#[test]
fn uris_are_taken_apart_for_connect_tls_and_the_request() {
    let target = Target::parse(&"https://[::1]:8443/keys?a=b".parse().unwrap()).unwrap();
    assert_eq!(target.host, "::1");
    assert_eq!(target.port, 8443);
    assert_eq!(target.authority, "[::1]:8443");
    assert_eq!(target.path, "/keys?a=b");
    assert!(matches!(target.server_name, ServerName::IpAddress(_)));
    let target = Target::parse(&"https://issuer.example".parse().unwrap()).unwrap();
    assert_eq!((target.port, target.path.as_str()), (443, "/"));
    assert!(matches!(target.server_name, ServerName::DnsName(_)));
    let err = Target::parse(&"https://user@issuer.example/".parse().unwrap())
        .err()
        .unwrap();
    assert_eq!(err.reason(), "jwks_invalid_uri");
}

#[test]
fn unreadable_or_empty_ca_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.pem");
    assert!(matches!(
        JwksCache::new(Some(&missing)),
        Err(FetchError::Roots { .. })
    ));
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "no PEM here").unwrap();
    assert!(matches!(
        JwksCache::new(Some(&empty)),
        Err(FetchError::Roots { .. })
    ));
}

#[test]
fn the_least_recently_used_uri_is_dropped_beyond_the_limit() {
    let mut lru = Lru::default();
    for i in 0..MAX_URIS {
        lru.entry(format!("https://issuer/{i}"));
    }
    lru.entry("https://issuer/0".to_owned());
    lru.entry("https://issuer/new".to_owned());
    assert_eq!(lru.map.len(), MAX_URIS);
    assert!(lru.map.contains_key("https://issuer/0"));
    assert!(lru.map.contains_key("https://issuer/new"));
    assert!(!lru.map.contains_key("https://issuer/1"));
}

fn key_set(kid: &str) -> Vec<u8> {
    jwks_json(&[rsa().jwk(kid, None), p256().jwk(&format!("{kid}-ec"), None)])
}

#[derive(Clone)]
enum Reply {
    /// 200 with this body and its content-length.
    Ok(Vec<u8>),
    /// 200 with this body after a delay.
    Slow(Duration, Vec<u8>),
    /// 200 with this body and no length: read until the connection closes.
    Undeclared(Vec<u8>),
    /// This status, no body.
    Status(u16),
    /// Reads the request and never answers.
    Hang,
}

/// An HTTPS server on 127.0.0.1 with a certificate of its own test CA, which writes its
/// answers by hand (so it can misbehave) and counts requests.
struct TestServer {
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    last_request: Arc<Mutex<String>>,
    reply: Arc<Mutex<Reply>>,
    ca_file: tempfile::NamedTempFile,
    _task: AbortOnDrop<()>,
}

impl TestServer {
    async fn start(reply: Reply) -> TestServer {
        let ca = TestCa::new("jwks test CA");
        let id = SpiffeId::new("test", "jwt", "jwks").unwrap();
        let (cert, key) = ca.issue_raw(&id, |params| {
            params.subject_alt_names = vec![
                SanType::IpAddress(Ipv4Addr::LOCALHOST.into()),
                SanType::IpAddress(std::net::Ipv6Addr::LOCALHOST.into()),
                SanType::DnsName("localhost".try_into().unwrap()),
            ];
        });
        let mut ca_file = tempfile::NamedTempFile::new().unwrap();
        let root: &CertificateDer<'_> = &ca.bundle().roots[0];
        let pem = pem::encode(&pem::Pem::new("CERTIFICATE", root.to_vec()));
        ca_file.write_all(pem.as_bytes()).unwrap();

        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let last_request = Arc::new(Mutex::new(String::new()));
        let reply = Arc::new(Mutex::new(reply));
        let (counted, last, replies) = (
            Arc::clone(&requests),
            Arc::clone(&last_request),
            Arc::clone(&reply),
        );
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, counted, last, replies) = (
                    acceptor.clone(),
                    Arc::clone(&counted),
                    Arc::clone(&last),
                    Arc::clone(&replies),
                );
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut head = Vec::new();
                    let mut buf = [0; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    counted.fetch_add(1, Ordering::SeqCst);
                    *last.lock() = String::from_utf8_lossy(&head).into_owned();
                    let reply = replies.lock().clone();
                    let response = match reply {
                        Reply::Ok(body) => ok(&body, true),
                        Reply::Slow(delay, body) => {
                            tokio::time::sleep(delay).await;
                            ok(&body, true)
                        }
                        Reply::Undeclared(body) => ok(&body, false),
                        Reply::Status(code) => format!(
                            "HTTP/1.1 {code} Nope\r\nlocation: https://127.0.0.1:1/\r\n\
                             content-length: 0\r\nconnection: close\r\n\r\n"
                        )
                        .into_bytes(),
                        Reply::Hang => std::future::pending().await,
                    };
                    let _ = tls.write_all(&response).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        TestServer {
            addr,
            requests,
            last_request,
            reply,
            ca_file,
            _task: AbortOnDrop(task),
        }
    }

    /// A cache trusting this server's CA.
    fn cache(&self) -> JwksCache {
        JwksCache::new(Some(self.ca_file.path())).unwrap()
    }

    fn uri(&self) -> http::Uri {
        format!(
            "https://127.0.0.1:{}/.well-known/jwks.json?v=1",
            self.addr.port()
        )
        .parse()
        .unwrap()
    }

    fn set(&self, reply: Reply) {
        *self.reply.lock() = reply;
    }

    /// Waits (a few seconds at most) until the server has answered `n` requests.
    async fn until_requests(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.requests() < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(self.requests(), n);
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    fn last_request(&self) -> String {
        self.last_request.lock().clone()
    }
}

fn ok(body: &[u8], declared: bool) -> Vec<u8> {
    let length = if declared {
        format!("content-length: {}\r\n", body.len())
    } else {
        String::new()
    };
    let mut response = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n{length}connection: close\r\n\r\n"
    )
    .into_bytes();
    response.extend_from_slice(body);
    response
}
