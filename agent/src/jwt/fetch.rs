//! Issuers' key sets fetched over HTTPS (`jwksUri`), cached per URI.
//!
//! A URI's first fetch is waited for, one in flight at a time: callers that arrive during
//! it take its result instead of fetching again. A set older than the caller's `refresh`
//! keeps serving while one background task fetches its successor, so requests never wait
//! on a refresh (nor on a slow issuer); when that fails, the last good set serves on, and a
//! failed fetch is not retried for `min_refetch`. A token naming a kid the set lacks asks for [`JwksCache::refetch`], which the
//! same `min_refetch` bounds, so a flood of made-up kids cannot hammer the issuer.
//!
//! Limits: https only, status 200 only (no redirect is followed), a body of at most
//! [`MAX_JWKS_BYTES`], one `timeout` over connect, TLS and the whole response, at most
//! [`MAX_URIS`] URIs cached (the least recently used one is dropped).

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::{Request, StatusCode, header};
use hyper_util::rt::TokioIo;
use rustls::{ClientConfig, pki_types::ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::{Jwks, JwksError, MAX_JWKS_BYTES};
use crate::sync::Mutex;

/// Fetches and caches key sets; clones share the cache.
#[derive(Clone)]
pub struct JwksCache {
    tls: TlsConnector,
    entries: Arc<Mutex<Lru>>,
    /// The least time between two fetches of one URI caused by a failure or by `refetch`.
    pub min_refetch: Duration,
}

/// Why a key set could not be fetched.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    #[error("cannot read the JWKS CA file {path}: {reason}")]
    Roots { path: String, reason: String },
    #[error("JWKS URI {0} is not https:// (key sets are only fetched over TLS)")]
    NotHttps(String),
    #[error("JWKS URI {uri} is not usable: {reason}")]
    InvalidUri { uri: String, reason: String },
    #[error("cannot resolve JWKS host {host}: {reason} (check DNS from the waypoint)")]
    Resolve { host: String, reason: String },
    #[error("cannot connect to the JWKS server at {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    #[error("TLS with the JWKS server {host} failed: {reason} (is its CA in --jwks-ca-file?)")]
    Tls { host: String, reason: String },
    #[error("HTTP exchange with the JWKS server failed: {0}")]
    Http(String),
    #[error("JWKS server answered {0}, not 200 (redirects are not followed)")]
    Status(u16),
    #[error("JWKS response larger than {MAX_JWKS_BYTES} bytes")]
    TooLarge,
    #[error("JWKS fetch took longer than {0:?}")]
    Timeout(Duration),
    #[error("JWKS server sent an unusable key set: {0}")]
    Invalid(JwksError),
    #[error("BUG: {0}")]
    Bug(String),
}

impl FetchError {
    /// Stable snake_case label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Roots { .. } => "jwks_roots_unreadable",
            Self::NotHttps(_) => "jwks_not_https",
            Self::InvalidUri { .. } => "jwks_invalid_uri",
            Self::Resolve { .. } => "jwks_resolve_failed",
            Self::Connect { .. } => "jwks_connect_failed",
            Self::Tls { .. } => "jwks_tls_failed",
            Self::Http(_) => "jwks_http_failed",
            Self::Status(_) => "jwks_bad_status",
            Self::TooLarge => "jwks_too_large",
            Self::Timeout(_) => "jwks_timeout",
            Self::Invalid(e) => e.reason(),
            Self::Bug(_) => "bug",
        }
    }
}

impl JwksCache {
    /// Trusts the system roots plus the PEM certificates in `extra_roots` (the agent setting
    /// `--jwks-ca-file`), if given.
    pub fn new(extra_roots: Option<&Path>) -> Result<JwksCache, FetchError> {
        let mut roots = crate::web_roots::system().clone();
        if let Some(path) = extra_roots {
            let fail = |reason: String| FetchError::Roots {
                path: path.display().to_string(),
                reason,
            };
            let pem = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
            crate::web_roots::add_pem(&mut roots, &pem).map_err(|e| fail(e.to_string()))?;
        }
        if roots.is_empty() {
            tracing::warn!(
                component = "jwt",
                "no trusted roots for JWKS fetches: no system roots and no --jwks-ca-file"
            );
        }
        // TLS 1.2 too: issuers' JWKS endpoints are public web servers, not mesh peers.
        let mut tls = ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| FetchError::Bug(format!("TLS configuration refused: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(JwksCache {
            tls: TlsConnector::from(Arc::new(tls)),
            entries: Arc::new(Mutex::new(Lru::default())),
            min_refetch: DEFAULT_MIN_REFETCH,
        })
    }

    /// The key set at `uri` (https only): cached, fetched again after `refresh`. A URI's
    /// first fetch is waited for (one in flight; concurrent callers take its result); after
    /// that a stale set keeps serving while one background task fetches its successor, so
    /// no request waits on a refresh. Each fetch is bounded by `timeout`; on a failed
    /// refresh the last good set keeps serving, and the next try waits `min_refetch`.
    pub async fn get(
        &self,
        uri: &http::Uri,
        refresh: Duration,
        timeout: Duration,
    ) -> Result<Arc<Jwks>, FetchError> {
        let arrived = Instant::now();
        let entry = self.entry(uri);
        let mut slot = entry.lock().await;
        // The URI is taken apart only when a fetch is due: a cached set is every request's
        // path, and a set is only ever cached for a URI that parsed.
        if let Some(keys) = slot.keys.clone() {
            let stale = slot.fetched.is_none_or(|at| at.elapsed() >= refresh);
            if stale
                && !slot.refreshing
                && !self.quiet(&slot)
                && let Ok(target) = Target::parse(uri)
            {
                slot.refreshing = true;
                self.refresh_in_background(Arc::clone(&entry), target, timeout);
            }
            return Ok(keys);
        }
        // Someone fetched while we waited, or a failure is too recent to try again.
        if slot
            .attempted
            .is_some_and(|at| at >= arrived || self.quiet(&slot))
        {
            return slot.current();
        }
        let target = Target::parse(uri)?;
        self.fetch_into(&mut slot, &target, timeout).await
    }

    /// A token named a kid the cached set lacks: fetch again now (key rotation), at most once
    /// per `min_refetch` per URI; returns the (possibly new) set.
    pub async fn refetch(
        &self,
        uri: &http::Uri,
        timeout: Duration,
    ) -> Result<Arc<Jwks>, FetchError> {
        let target = Target::parse(uri)?;
        let entry = self.entry(uri);
        let mut slot = entry.lock().await;
        if slot
            .attempted
            .is_some_and(|at| at.elapsed() < self.min_refetch)
        {
            return slot.current();
        }
        self.fetch_into(&mut slot, &target, timeout).await
    }

    fn entry(&self, uri: &http::Uri) -> Arc<tokio::sync::Mutex<Slot>> {
        self.entries.lock().entry(uri.to_string())
    }

    /// Whether the last fetch failed too recently to try again.
    fn quiet(&self, slot: &Slot) -> bool {
        slot.failing
            && slot
                .attempted
                .is_some_and(|at| at.elapsed() < self.min_refetch)
    }

    /// Fetches `target` into `entry` on a task of its own (the caller serves the stale set).
    fn refresh_in_background(
        &self,
        entry: Arc<tokio::sync::Mutex<Slot>>,
        target: Target,
        timeout: Duration,
    ) {
        let cache = self.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let fetched = cache.attempt(&target, timeout).await;
            let mut slot = entry.lock().await;
            slot.refreshing = false;
            // A failure is logged and kept; the last good set serves on.
            let _ = record(&mut slot, &target, started, fetched);
        });
    }

    /// Fetches `target` while holding its slot: the caller, and whoever waits on the slot,
    /// get the result.
    async fn fetch_into(
        &self,
        slot: &mut Slot,
        target: &Target,
        timeout: Duration,
    ) -> Result<Arc<Jwks>, FetchError> {
        let started = Instant::now();
        let fetched = self.attempt(target, timeout).await;
        record(slot, target, started, fetched)
    }

    /// One fetch within `timeout`.
    async fn attempt(&self, target: &Target, timeout: Duration) -> Result<Jwks, FetchError> {
        tokio::time::timeout(timeout, self.fetch(target))
            .await
            .unwrap_or(Err(FetchError::Timeout(timeout)))
    }

    async fn fetch(&self, target: &Target) -> Result<Jwks, FetchError> {
        let tcp = target.connect().await?;
        let tls = self
            .tls
            .connect(target.server_name.clone(), tcp)
            .await
            .map_err(|e| FetchError::Tls {
                host: target.host.clone(),
                reason: e.to_string(),
            })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| FetchError::Http(e.to_string()))?;
        // One request per connection: a set is fetched once per refresh interval.
        let connection = AbortOnDrop(tokio::spawn(connection));
        let request = Request::get(target.path.as_str())
            .header(header::HOST, target.authority.as_str())
            .header(header::ACCEPT, "application/json")
            .header(header::USER_AGENT, "weft")
            .body(Empty::<Bytes>::new())
            .map_err(|e| FetchError::Bug(format!("cannot build the request: {e}")))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| FetchError::Http(e.to_string()))?;
        if response.status() != StatusCode::OK {
            return Err(FetchError::Status(response.status().as_u16()));
        }
        let declared = response
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > MAX_JWKS_BYTES as u64) {
            return Err(FetchError::TooLarge);
        }
        let body = Limited::new(response.into_body(), MAX_JWKS_BYTES)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    FetchError::TooLarge
                } else {
                    FetchError::Http(format!("cannot read the body: {e}"))
                }
            })?
            .to_bytes();
        drop(connection);
        Jwks::parse(&body).map_err(FetchError::Invalid)
    }
}

/// Stores the outcome of a fetch that started at `started` in `slot`: a new set, or the
/// error (logged once per failure streak), the last good set serving on.
fn record(
    slot: &mut Slot,
    target: &Target,
    started: Instant,
    fetched: Result<Jwks, FetchError>,
) -> Result<Arc<Jwks>, FetchError> {
    // The end of the attempt: `min_refetch` is a quiet time after it, however long the
    // fetch took, and every caller that arrived during it takes its result.
    slot.attempted = Some(Instant::now());
    match fetched {
        Ok(keys) => {
            tracing::debug!(component = "jwt", uri = %target.uri, keys = keys.len(), "JWKS fetched");
            if slot.failing {
                tracing::info!(component = "jwt", uri = %target.uri, "JWKS fetch works again");
            }
            let keys = Arc::new(keys);
            slot.keys = Some(Arc::clone(&keys));
            slot.fetched = Some(started);
            slot.failing = false;
            slot.error = None;
            Ok(keys)
        }
        Err(error) => {
            // Once per failure streak: a down issuer must not flood the log.
            if !slot.failing {
                tracing::warn!(
                    component = "jwt",
                    uri = %target.uri,
                    reason = error.reason(),
                    serving_cached = slot.keys.is_some(),
                    "cannot fetch JWKS: {error}"
                );
            }
            slot.failing = true;
            slot.error = Some(error);
            slot.current()
        }
    }
}

impl std::fmt::Debug for JwksCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksCache")
            .field("uris", &self.entries.lock().map.len())
            .field("min_refetch", &self.min_refetch)
            .finish_non_exhaustive()
    }
}

/// What one URI's cache entry holds; its async lock is held during a fetch (single flight).
#[derive(Default)]
struct Slot {
    keys: Option<Arc<Jwks>>,
    /// When `keys` was fetched (the start of that attempt, so a set is never older than
    /// `refresh` counts).
    fetched: Option<Instant>,
    /// When the last fetch, good or bad, ended.
    attempted: Option<Instant>,
    /// The last fetch failed (a warning was logged for this streak).
    failing: bool,
    /// A background task is fetching the successor of a stale set.
    refreshing: bool,
    error: Option<FetchError>,
}

impl Slot {
    /// The last good set, else the last error.
    fn current(&self) -> Result<Arc<Jwks>, FetchError> {
        match (&self.keys, &self.error) {
            (Some(keys), _) => Ok(Arc::clone(keys)),
            (None, Some(error)) => Err(error.clone()),
            (None, None) => Err(FetchError::Bug(
                "JWKS cache entry without keys or error".into(),
            )),
        }
    }
}

/// The cache entries by URI, dropping the least recently used beyond `MAX_URIS`.
#[derive(Default)]
struct Lru {
    map: HashMap<String, (Arc<tokio::sync::Mutex<Slot>>, u64)>,
    clock: u64,
}

impl Lru {
    fn entry(&mut self, uri: String) -> Arc<tokio::sync::Mutex<Slot>> {
        self.clock += 1;
        let clock = self.clock;
        if !self.map.contains_key(&uri) && self.map.len() >= MAX_URIS {
            let oldest = self
                .map
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(uri, _)| uri.clone());
            if let Some(oldest) = oldest {
                self.map.remove(&oldest);
            }
        }
        let (slot, used) = self.map.entry(uri).or_default();
        *used = clock;
        Arc::clone(slot)
    }
}

/// A JWKS URI taken apart for one fetch.
struct Target {
    uri: String,
    host: String,
    port: u16,
    authority: String,
    path: String,
    server_name: ServerName<'static>,
}

impl Target {
    fn parse(uri: &http::Uri) -> Result<Target, FetchError> {
        let invalid = |reason: &str| FetchError::InvalidUri {
            uri: uri.to_string(),
            reason: reason.to_owned(),
        };
        if uri.scheme() != Some(&http::uri::Scheme::HTTPS) {
            return Err(FetchError::NotHttps(uri.to_string()));
        }
        let authority = uri.authority().ok_or_else(|| invalid("no host"))?;
        if authority.as_str().contains('@') {
            return Err(invalid("credentials in the URI"));
        }
        // `[::1]` in a URI, `::1` as an address and a server name.
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let server_name =
            ServerName::try_from(host.clone()).map_err(|_| invalid("host is not a DNS name"))?;
        Ok(Target {
            uri: uri.to_string(),
            port: authority.port_u16().unwrap_or(443),
            authority: authority.as_str().to_owned(),
            path: uri.path_and_query().map_or("/", |p| p.as_str()).to_owned(),
            host,
            server_name,
        })
    }

    /// A TCP connection to the host: an IP literal, or the resolved addresses in order.
    async fn connect(&self) -> Result<TcpStream, FetchError> {
        let addrs: Vec<SocketAddr> = match self.host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, self.port)],
            Err(_) => tokio::net::lookup_host((self.host.as_str(), self.port))
                .await
                .map_err(|e| FetchError::Resolve {
                    host: self.host.clone(),
                    reason: e.to_string(),
                })?
                .collect(),
        };
        let mut last = FetchError::Resolve {
            host: self.host.clone(),
            reason: "no address".into(),
        };
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(tcp) => return Ok(tcp),
                Err(e) => {
                    last = FetchError::Connect {
                        addr,
                        reason: e.to_string(),
                    }
                }
            }
        }
        Err(last)
    }
}

/// Ends the connection task when the fetch ends, however it ends (a timeout drops it).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Most URIs cached at once.
pub const MAX_URIS: usize = 64;
/// `JwksCache::min_refetch` unless set otherwise.
pub const DEFAULT_MIN_REFETCH: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests;
