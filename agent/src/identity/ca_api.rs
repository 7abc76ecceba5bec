//! The CA's HTTPS API as both ends speak it: `POST /v1/certificates` with a CSR, answered
//! with a chain and the trust bundle (`docs/ca.md`). The client is `ca_client`; the server
//! is the `weft ca` application (`crate::ca::server`).

use serde::{Deserialize, Serialize};

/// The API path, in one place for the server and the client.
pub const CERTIFICATES_PATH: &str = "/v1/certificates";

/// `POST /v1/certificates` request body.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CertificateRequest {
    /// The SPIFFE id asked for.
    pub identity: String,
    /// PEM PKCS#10 CSR whose only SAN is `identity`'s URI.
    pub csr: String,
    /// Wanted lifetime; capped by the CA's `maxCertLifetime`, which is also the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifetime_seconds: Option<u64>,
}

/// `POST /v1/certificates` 200 response body.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateResponse {
    /// Leaf first, then the CA, PEM.
    pub cert_chain: Vec<String>,
    /// Roots, PEM.
    pub trust_bundle: Vec<String>,
}

/// Body of every error response.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct ErrorResponse {
    /// Stable snake_case reason (`unknown_credential`, `identity_not_allowed`, …).
    pub error: String,
    pub message: String,
}
