//! A throwaway certificate authority for tests: ECDSA P-256 root, SPIFFE leaf certificates
//! with any validity, and `TestCerts`, a `CertSource` whose contents tests change at will
//! (rotation, missing certificates, another CA's bundle).

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::{Duration, OffsetDateTime};

use crate::{
    identity::{CertSource, SpiffeId, TrustBundle, WorkloadCert},
    sync::{Mutex, MutexGuard},
};

pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    root: CertificateDer<'static>,
    next_serial: AtomicU64,
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let key = KeyPair::generate().expect("generate CA key");
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = OffsetDateTime::now_utc() - Duration::days(1);
        params.not_after = OffsetDateTime::now_utc() + Duration::days(365);
        let root = params
            .self_signed(&key)
            .expect("self-sign CA")
            .der()
            .clone();
        Self {
            issuer: Issuer::new(params, key),
            root,
            next_serial: AtomicU64::new(1),
        }
    }

    pub fn bundle(&self) -> TrustBundle {
        TrustBundle {
            roots: vec![self.root.clone()],
        }
    }

    /// A certificate for `id`, valid from an hour ago for a day.
    pub fn issue(&self, id: &SpiffeId) -> Arc<WorkloadCert> {
        let now = OffsetDateTime::now_utc();
        self.issue_valid(id, now - Duration::hours(1), now + Duration::days(1))
    }

    pub fn issue_valid(
        &self,
        id: &SpiffeId,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Arc<WorkloadCert> {
        let (cert, key) = self.sign(leaf_params(id, not_before, not_after));
        Arc::new(
            WorkloadCert::from_pem(&cert.pem(), &key.serialize_pem()).expect("parse test leaf"),
        )
    }

    /// A certificate for `id` as `issue` makes it, after `edit` changed its parameters,
    /// with its key, as a rustls peer presents them. For certificates weft must refuse: a
    /// `WorkloadCert` would not hold them.
    pub fn issue_raw(
        &self,
        id: &SpiffeId,
        edit: impl FnOnce(&mut CertificateParams),
    ) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
        let now = OffsetDateTime::now_utc();
        let mut params = leaf_params(id, now - Duration::hours(1), now + Duration::days(1));
        edit(&mut params);
        let (cert, key) = self.sign(params);
        (
            cert.der().clone(),
            PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
        )
    }

    fn sign(&self, mut params: CertificateParams) -> (rcgen::Certificate, KeyPair) {
        let key = KeyPair::generate().expect("generate leaf key");
        params.serial_number = Some(SerialNumber::from(
            self.next_serial.fetch_add(1, Ordering::Relaxed),
        ));
        let cert = params.signed_by(&key, &self.issuer).expect("sign leaf");
        (cert, key)
    }
}

/// A SPIFFE leaf as weft's CA issues it: one URI SAN, server and client authentication.
fn leaf_params(
    id: &SpiffeId,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(
        id.to_string().try_into().expect("SPIFFE id is IA5"),
    )];
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = not_before;
    params.not_after = not_after;
    params.use_authority_key_identifier_extension = true;
    params
}

/// A `CertSource` over a map, changed by tests.
pub struct TestCerts {
    certs: Mutex<HashMap<SpiffeId, Arc<WorkloadCert>>>,
    bundle: Mutex<Arc<TrustBundle>>,
}

impl TestCerts {
    pub fn new(bundle: TrustBundle) -> Arc<Self> {
        Arc::new(Self {
            certs: Mutex::new(HashMap::new()),
            bundle: Mutex::new(Arc::new(bundle)),
        })
    }

    /// Adds or replaces (rotates) the certificate of its identity.
    pub fn insert(&self, cert: Arc<WorkloadCert>) {
        self.lock().insert(cert.identity.clone(), cert);
    }

    pub fn remove(&self, id: &SpiffeId) {
        self.lock().remove(id);
    }

    pub fn set_bundle(&self, bundle: TrustBundle) {
        *self.bundle.lock() = Arc::new(bundle);
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<SpiffeId, Arc<WorkloadCert>>> {
        self.certs.lock()
    }
}

impl CertSource for TestCerts {
    fn certificate(&self, id: &SpiffeId) -> Option<Arc<WorkloadCert>> {
        self.lock().get(id).cloned()
    }

    fn trust_bundle(&self) -> Arc<TrustBundle> {
        Arc::clone(&self.bundle.lock())
    }
}
