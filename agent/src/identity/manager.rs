//! The certificate manager: keeps a current certificate for every identity the node runs.
//! Input: the set of wanted identities (`set_wanted`, from the state snapshot). Output:
//! certificates and the trust bundle for the proxy's TLS (`CertSource`), per-identity status
//! for `weft status`, and readiness.
//!
//! Each wanted identity has a task: generate a key and CSR, have the issuer sign it, keep
//! the result, sleep until half life, repeat. Failures retry with exponential backoff
//! (1 s doubling to 30 s, up to 10 % earlier for jitter). A renewed certificate replaces the
//! old one in one step; TLS reads certificates only at handshake, so established
//! connections are untouched. Timers are tokio's (durations computed from the wall clock),
//! so tests run on a paused clock.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Weak},
    time::{Duration, SystemTime},
};

use rustls::pki_types::CertificateDer;
use serde::{Serialize, Serializer};
use tokio::{sync::watch, task::AbortHandle};
use tracing::{info, warn};

use crate::{
    identity::{
        self, CertSource, SpiffeId, TrustBundle, WorkloadCert,
        ca_client::{self, CaClient},
        csr,
        signer::{self, Signer},
    },
    sync::{Mutex, MutexGuard},
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{identity} is not an identity this node wants a certificate for")]
    NotWanted { identity: SpiffeId },
    #[error("no certificate for {identity} after {waited:?} (last error: {last_error})")]
    Timeout {
        identity: SpiffeId,
        waited: Duration,
        last_error: String,
    },
}

/// Why one attempt to get a certificate failed.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error(transparent)]
    Csr(#[from] csr::Error),
    #[error("the in-process CA refused: {0}")]
    Sign(#[from] signer::SignError),
    #[error(transparent)]
    Ca(#[from] ca_client::Error),
    #[error("the CA's certificate is not usable: {0}")]
    Certificate(#[from] identity::Error),
    #[error("the CA issued a certificate for {got}, not {wanted}")]
    WrongIdentity { wanted: SpiffeId, got: SpiffeId },
}

/// Who signs the node's CSRs.
#[derive(Debug)]
pub enum Issuer {
    /// The agent is the CA (standalone, demo): it signs whatever identity it needs.
    InProcess(Arc<Signer>),
    /// `weft ca`, over HTTPS.
    Remote(CaClient),
}

/// Current certificates of the node's identities. Cheap to clone.
#[derive(Clone, Debug)]
pub struct CertManager {
    inner: Arc<Inner>,
}

/// One identity's certificate state, for `weft status` and `/config_dump`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CertStatus {
    pub identity: SpiffeId,
    #[serde(flatten)]
    pub state: CertState,
    pub serial: Option<String>,
    #[serde(serialize_with = "rfc3339")]
    pub not_before: Option<SystemTime>,
    #[serde(serialize_with = "rfc3339")]
    pub not_after: Option<SystemTime>,
    #[serde(serialize_with = "rfc3339")]
    pub renew_at: Option<SystemTime>,
    pub last_error: Option<String>,
    /// Failed attempts since the last success.
    pub failures: u32,
}

/// `state` (and `reason`) of a [`CertStatus`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "camelCase")]
pub enum CertState {
    /// Asked for, nothing yet.
    Pending,
    /// A certificate that has not expired.
    Valid,
    /// No usable certificate and the last attempt failed, for `reason`.
    Failed { reason: String },
}

#[derive(Debug)]
struct Inner {
    issuer: Issuer,
    config: identity::Config,
    state: Mutex<State>,
    /// Bumped on every change (issued, failed, wanted set): readiness and `wait_for` watch it.
    changed: watch::Sender<u64>,
}

#[derive(Debug)]
struct State {
    entries: BTreeMap<SpiffeId, Entry>,
    bundle: Arc<TrustBundle>,
}

#[derive(Debug)]
struct Entry {
    cert: Option<Arc<WorkloadCert>>,
    failures: u32,
    /// (reason, message) of the last failure; cleared on success.
    last_error: Option<(String, String)>,
    task: AbortHandle,
}

impl CertManager {
    /// A manager that wants nothing yet; `set_wanted` starts work (inside a tokio runtime).
    pub fn new(issuer: Issuer, config: identity::Config) -> Self {
        let roots = match &issuer {
            Issuer::InProcess(signer) => signer.trust_bundle().roots,
            Issuer::Remote(client) => client.roots().to_vec(),
        };
        Self {
            inner: Arc::new(Inner {
                issuer,
                config,
                state: Mutex::new(State {
                    entries: BTreeMap::new(),
                    bundle: Arc::new(TrustBundle { roots }),
                }),
                changed: watch::Sender::new(0),
            }),
        }
    }

    /// Makes `wanted` the node's identities: starts getting certificates for new ones and
    /// forgets the ones no longer wanted.
    pub fn set_wanted(&self, wanted: BTreeSet<SpiffeId>) {
        let mut state = self.inner.lock();
        let before = state.entries.len();
        state.entries.retain(|id, entry| {
            let keep = wanted.contains(id);
            if !keep {
                entry.task.abort();
                info!(component = "identity", identity = %id, "certificate no longer wanted");
            }
            keep
        });
        let mut changed = before != state.entries.len();
        for id in wanted {
            if state.entries.contains_key(&id) {
                continue;
            }
            let task = tokio::spawn(maintain(Arc::downgrade(&self.inner), id.clone()));
            state.entries.insert(
                id,
                Entry {
                    cert: None,
                    failures: 0,
                    last_error: None,
                    task: task.abort_handle(),
                },
            );
            changed = true;
        }
        drop(state);
        if changed {
            self.inner.notify();
        }
    }

    /// The current certificate for `id`; never an expired one.
    pub fn certificate(&self, id: &SpiffeId) -> Option<Arc<WorkloadCert>> {
        let now = SystemTime::now();
        self.inner
            .lock()
            .entries
            .get(id)
            .and_then(|e| e.cert.clone())
            .filter(|c| usable(c, now))
    }

    /// Waits up to `timeout` for a certificate for `id` (which must be wanted).
    pub async fn wait_for(
        &self,
        id: &SpiffeId,
        timeout: Duration,
    ) -> Result<Arc<WorkloadCert>, Error> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut changes = self.subscribe();
        loop {
            let last_error = {
                let state = self.inner.lock();
                let entry = state.entries.get(id).ok_or_else(|| Error::NotWanted {
                    identity: id.clone(),
                })?;
                if let Some(cert) = entry.cert.as_ref().filter(|c| usable(c, SystemTime::now())) {
                    return Ok(Arc::clone(cert));
                }
                entry.last_error.as_ref().map(|(_, m)| m.clone())
            };
            // The sender lives in `inner`, which `self` holds: `changed` cannot fail.
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                return Err(Error::Timeout {
                    identity: id.clone(),
                    waited: timeout,
                    last_error: last_error.unwrap_or_else(|| "none yet".into()),
                });
            }
        }
    }

    /// The roots peers must chain to.
    pub fn trust_bundle(&self) -> Arc<TrustBundle> {
        Arc::clone(&self.inner.lock().bundle)
    }

    /// Per-identity state, in identity order.
    pub fn status(&self) -> Vec<CertStatus> {
        let now = SystemTime::now();
        self.inner
            .lock()
            .entries
            .iter()
            .map(|(id, entry)| {
                let cert = entry.cert.as_ref();
                let state = match (cert.filter(|c| usable(c, now)), &entry.last_error) {
                    (Some(_), _) => CertState::Valid,
                    (None, Some((reason, _))) => CertState::Failed {
                        reason: reason.clone(),
                    },
                    (None, None) if cert.is_some() => CertState::Failed {
                        reason: "expired".into(),
                    },
                    (None, None) => CertState::Pending,
                };
                CertStatus {
                    identity: id.clone(),
                    state,
                    serial: cert.map(|c| c.serial.clone()),
                    not_before: cert.map(|c| c.not_before),
                    not_after: cert.map(|c| c.not_after),
                    renew_at: cert.map(|c| c.renew_at()),
                    last_error: entry.last_error.as_ref().map(|(_, m)| m.clone()),
                    failures: entry.failures,
                }
            })
            .collect()
    }

    /// Every wanted identity has an unexpired certificate.
    pub fn ready(&self) -> bool {
        let now = SystemTime::now();
        self.inner
            .lock()
            .entries
            .values()
            .all(|e| e.cert.as_ref().is_some_and(|c| usable(c, now)))
    }

    /// Changes on every issuance, failure or change of the wanted set.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.changed.subscribe()
    }

    /// Returns once [`CertManager::ready`] is true.
    pub async fn wait_ready(&self) {
        let mut changes = self.subscribe();
        while !self.ready() {
            if changes.changed().await.is_err() {
                return;
            }
        }
    }

    /// The identity settings this manager runs with.
    pub fn config(&self) -> &identity::Config {
        &self.inner.config
    }
}

impl CertSource for CertManager {
    fn certificate(&self, id: &SpiffeId) -> Option<Arc<WorkloadCert>> {
        CertManager::certificate(self, id)
    }

    fn trust_bundle(&self) -> Arc<TrustBundle> {
        CertManager::trust_bundle(self)
    }
}

impl IssueError {
    /// Stable snake_case label (for metrics); [`IssueError::detail`] has the CA's own reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Csr(_) => "csr_generation_failed",
            Self::Sign(e) => e.reason(),
            Self::Ca(e) => e.reason(),
            Self::Certificate(_) => "invalid_certificate",
            Self::WrongIdentity { .. } => "wrong_identity",
        }
    }

    /// The most specific reason: the CA's `error` field when it refused.
    pub fn detail(&self) -> String {
        match self {
            Self::Ca(e) => e.ca_reason().to_owned(),
            other => other.reason().to_owned(),
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock()
    }

    fn notify(&self) {
        self.changed.send_modify(|g| *g = g.wrapping_add(1));
    }

    async fn issue(
        &self,
        id: &SpiffeId,
    ) -> Result<(WorkloadCert, Vec<CertificateDer<'static>>), IssueError> {
        let request = csr::generate(id)?;
        let lifetime = self.config.cert_lifetime;
        let (chain, bundle) = match &self.issuer {
            Issuer::InProcess(signer) => {
                let issued = signer.sign(id, &request.csr_pem, lifetime)?;
                (issued.chain_pem, issued.trust_bundle_pem)
            }
            Issuer::Remote(client) => {
                let signed = client.sign(id, &request.csr_pem, lifetime).await?;
                (signed.cert_chain, signed.trust_bundle)
            }
        };
        let cert = WorkloadCert::from_pem(&chain.join("\n"), &request.key_pem)?;
        if cert.identity != *id {
            return Err(IssueError::WrongIdentity {
                wanted: id.clone(),
                got: cert.identity,
            });
        }
        let roots = rustls_pemfile::certs(&mut bundle.join("\n").as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| identity::Error::InvalidCertificate(format!("trust bundle: {e}")))?;
        Ok((cert, roots))
    }

    /// Keeps `cert` if `id` is still wanted; returns whether it was a renewal.
    fn install(
        &self,
        id: &SpiffeId,
        cert: Arc<WorkloadCert>,
        roots: Vec<CertificateDer<'static>>,
    ) -> Option<bool> {
        let mut state = self.lock();
        let entry = state.entries.get_mut(id)?;
        let renewal = entry.cert.replace(cert).is_some();
        entry.failures = 0;
        entry.last_error = None;
        if !roots.is_empty() && roots != state.bundle.roots {
            state.bundle = Arc::new(TrustBundle { roots });
        }
        drop(state);
        self.notify();
        Some(renewal)
    }

    fn record_failure(&self, id: &SpiffeId, error: &IssueError) -> u32 {
        let mut state = self.lock();
        let Some(entry) = state.entries.get_mut(id) else {
            return 0;
        };
        entry.failures = entry.failures.saturating_add(1);
        entry.last_error = Some((error.detail(), error.to_string()));
        let failures = entry.failures;
        drop(state);
        self.notify();
        failures
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let state = self.state.get_mut();
        for entry in state.entries.values() {
            entry.task.abort();
        }
    }
}

/// The life of one identity: issue, sleep to half life, renew; back off on failure.
/// Holds the manager weakly, so dropping the last `CertManager` ends it.
async fn maintain(manager: Weak<Inner>, id: SpiffeId) {
    let mut backoff = INITIAL_BACKOFF;
    loop {
        let Some(inner) = manager.upgrade() else {
            return;
        };
        let delay = match inner.issue(&id).await {
            Ok((cert, roots)) => {
                backoff = INITIAL_BACKOFF;
                let cert = Arc::new(cert);
                let delay = until(cert.renew_at()).max(MIN_RENEW_DELAY);
                let (serial, not_after) = (cert.serial.clone(), cert.not_after);
                let Some(renewal) = inner.install(&id, cert, roots) else {
                    return;
                };
                info!(component = "identity", identity = %id, serial = %serial,
                    not_after = %humantime::format_rfc3339_seconds(not_after),
                    renew_in = ?delay,
                    "{}", if renewal { "certificate renewed" } else { "certificate issued" });
                delay
            }
            Err(e) => {
                let delay = jittered(backoff);
                backoff = (backoff * 2).min(MAX_BACKOFF);
                let failures = inner.record_failure(&id, &e);
                warn!(component = "identity", identity = %id, reason = %e.detail(),
                    failures, retry_in = ?delay, error = %e, "cannot get a certificate");
                delay
            }
        };
        drop(inner);
        tokio::time::sleep(delay).await;
    }
}

fn usable(cert: &WorkloadCert, now: SystemTime) -> bool {
    now < cert.not_after
}

/// Time from now until `at` (zero if past), measured on the wall clock certificates use.
fn until(at: SystemTime) -> Duration {
    at.duration_since(SystemTime::now()).unwrap_or_default()
}

/// `backoff`, up to 10 % earlier, so nodes that failed together do not retry together.
fn jittered(backoff: Duration) -> Duration {
    let mut bytes = [0u8; 4];
    identity::random_bytes(&mut bytes);
    let fraction = f64::from(u32::from_le_bytes(bytes)) / f64::from(u32::MAX);
    backoff.mul_f64(1.0 - JITTER * fraction)
}

fn rfc3339<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.collect_str(&humantime::format_rfc3339_seconds(*t)),
        None => s.serialize_none(),
    }
}

const INITIAL_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
const JITTER: f64 = 0.1;
/// Floor of the renewal sleep: a clock that runs ahead of the CA's must not spin the loop.
const MIN_RENEW_DELAY: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests;
