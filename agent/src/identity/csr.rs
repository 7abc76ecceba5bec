//! Key pairs and certificate signing requests for workload identities: an ECDSA P-256 key
//! that never leaves this process, and a PKCS#10 CSR whose only subject alternative name is
//! the SPIFFE id's URI (SPIFFE X.509-SVID).

use std::fmt;

use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};

use crate::identity::SpiffeId;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot generate a key pair or CSR for {identity}: {source}")]
    Generate {
        identity: SpiffeId,
        #[source]
        source: rcgen::Error,
    },
}

/// A fresh private key and the CSR that asks for `identity` with it.
pub struct KeyAndCsr {
    pub identity: SpiffeId,
    /// PKCS#8 PEM of the private key. Secret: never logged (see the `Debug` impl).
    pub key_pem: String,
    /// PKCS#10 PEM (`-----BEGIN CERTIFICATE REQUEST-----`).
    pub csr_pem: String,
}

/// Generates an ECDSA P-256 key pair and a CSR for `identity` signed with it.
pub fn generate(identity: &SpiffeId) -> Result<KeyAndCsr, Error> {
    let fail = |source| Error::Generate {
        identity: identity.clone(),
        source,
    };
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(fail)?;
    let uri = identity.to_string().try_into().map_err(fail)?;
    let mut params = CertificateParams::default();
    // An SVID's subject is empty: the identity is the URI SAN (rcgen then marks the SAN
    // extension critical, as RFC 5280 asks when the subject is empty).
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(uri)];
    let csr = params.serialize_request(&key).map_err(fail)?;
    Ok(KeyAndCsr {
        identity: identity.clone(),
        key_pem: key.serialize_pem(),
        csr_pem: csr.pem().map_err(fail)?,
    })
}

impl fmt::Debug for KeyAndCsr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyAndCsr")
            .field("identity", &self.identity)
            .field("key_pem", &"<secret>")
            .field("csr_pem", &self.csr_pem)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use x509_parser::{certification_request::X509CertificationRequest, prelude::*};

    use super::*;

    #[test]
    fn csr_carries_only_the_spiffe_uri_and_a_p256_key() {
        let id = SpiffeId::new("cluster.local", "default", "client").unwrap();
        let generated = generate(&id).unwrap();
        let der = ::pem::parse(&generated.csr_pem).unwrap();
        assert_eq!(der.tag(), "CERTIFICATE REQUEST");
        let (_, csr) = X509CertificationRequest::from_der(der.contents()).unwrap();
        csr.verify_signature().unwrap();
        let sans: Vec<String> = csr
            .requested_extensions()
            .into_iter()
            .flatten()
            .filter_map(|e| match e {
                ParsedExtension::SubjectAlternativeName(san) => Some(san),
                _ => None,
            })
            .flat_map(|san| san.general_names.iter().map(|n| n.to_string()))
            .collect();
        assert_eq!(sans, ["URI(spiffe://cluster.local/ns/default/sa/client)"]);
        let key = KeyPair::from_pem(&generated.key_pem).unwrap();
        assert_eq!(key.algorithm(), &PKCS_ECDSA_P256_SHA256);
        assert!(!format!("{generated:?}").contains("PRIVATE KEY"));
    }
}
