//! Trust anchors for TLS to servers outside the mesh (JWT issuers' key sets, external
//! services the proxy originates TLS to): the system's roots, or PEM certificates an
//! operator gives. Mesh peers are verified against the mesh's own trust bundle instead
//! (`identity`), never against these.

use std::sync::OnceLock;

use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;

/// Why PEM text gave no usable trust anchor.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid PEM: {0}")]
    Pem(std::io::Error),
    #[error("no certificate in PEM")]
    Empty,
    #[error("not a usable CA certificate: {0}")]
    Certificate(rustls::Error),
}

/// The system's root certificates (the OS bundle), loaded once per process: unreadable
/// entries are logged and skipped.
pub fn system() -> &'static RootCertStore {
    static SYSTEM: OnceLock<RootCertStore> = OnceLock::new();
    SYSTEM.get_or_init(|| {
        let mut roots = RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for error in &native.errors {
            tracing::warn!(%error, "cannot load a system root certificate");
        }
        roots.add_parsable_certificates(native.certs);
        roots
    })
}

/// The certificates of a PEM text, each added as a trust anchor into `roots`.
pub fn add_pem(roots: &mut RootCertStore, pem: &[u8]) -> Result<(), Error> {
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut &*pem)
        .collect::<Result<_, _>>()
        .map_err(Error::Pem)?;
    if certs.is_empty() {
        return Err(Error::Empty);
    }
    for cert in certs {
        roots.add(cert).map_err(Error::Certificate)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_without_a_certificate_is_refused() {
        let mut roots = RootCertStore::empty();
        assert!(matches!(add_pem(&mut roots, b""), Err(Error::Empty)));
        let key_only = b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        assert!(matches!(add_pem(&mut roots, key_only), Err(Error::Empty)));
        let garbage = b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n";
        assert!(add_pem(&mut roots, garbage).is_err());
        assert!(roots.is_empty());
    }

    #[test]
    fn a_generated_ca_is_a_trust_anchor() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = params.self_signed(&key).unwrap();
        let mut roots = RootCertStore::empty();
        add_pem(&mut roots, ca.pem().as_bytes()).unwrap();
        assert_eq!(roots.len(), 1);
    }
}
