//! JWT end-user authentication, the library half (Istio's RequestAuthentication as Envoy's
//! `jwt_authn` filter applies it): parse a JSON Web Key Set ([`Jwks::parse`]), split and
//! decode a bearer token ([`decode`]), check its signature and claims against what the
//! issuer's rule expects ([`verify`] → [`Claims`]), and fetch issuers' key sets over HTTPS
//! with a cache ([`JwksCache`]).
//!
//! Inputs: token text from a request, JWKS JSON (inline or fetched), the issuer and
//! audiences a rule names, the time. Outputs: verified claims (the request principal
//! `<iss>/<sub>`, claim values for policy and for headers) or an error whose `reason()` is a
//! stable metric label. It reads no state: the waypoint decides which rule applies.
//!
//! Everything here fails closed and never panics on what a client or a JWKS server sends:
//! - a token is at most 8 KiB, exactly three unpadded base64url segments, JSON objects in
//!   its header and payload; `alg` is one of RS256/384/512, PS256/384/512, ES256, ES384 and
//!   EdDSA (Ed25519) — `none`, the HMAC algorithms and anything else are refused, as is a
//!   header with a non-empty `crit`;
//! - a token with a `kid` is checked only with the keys of that kid; without one, with
//!   every key whose type (and declared `alg`, and `use`) fits its algorithm;
//! - `iss` must be the rule's issuer, `aud` must name one of its audiences when it lists
//!   any, and `exp`/`nbf` hold with Envoy's 60 s of clock skew;
//! - a key set is at most 256 KiB and 100 keys; RSA keys under 2048 bits and keys of
//!   unknown types or curves are skipped, and a set with no usable key is an error.
//!
//! Signatures are checked with aws-lc-rs, the library rustls already uses here.

mod fetch;
mod jwks;
mod token;

pub use fetch::{FetchError, JwksCache};
pub use jwks::Jwks;
pub use token::{Claims, Expect, Unverified, decode, verify};

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    #[error("token longer than {MAX_TOKEN} bytes")]
    TooLarge,
    #[error("token algorithm {0:?} is not accepted (RS*, PS*, ES256, ES384, EdDSA are)")]
    UnsupportedAlgorithm(String),
    #[error("token header has critical extensions weft does not understand")]
    UnsupportedCritical,
    #[error("no key in the issuer's key set has the token's kid (was the key rotated?)")]
    UnknownKey,
    #[error("no key in the issuer's key set fits the token's algorithm")]
    KeyMismatch,
    #[error("token signature does not verify with the issuer's keys")]
    BadSignature,
    #[error("token has expired (exp)")]
    Expired,
    #[error("token is not valid yet (nbf)")]
    NotYetValid,
    #[error("token issuer (iss) is not the expected issuer")]
    WrongIssuer,
    #[error("token audience (aud) names none of the expected audiences")]
    WrongAudience,
}

impl TokenError {
    /// Stable snake_case label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed",
            Self::TooLarge => "too_large",
            Self::UnsupportedAlgorithm(_) => "unsupported_algorithm",
            Self::UnsupportedCritical => "unsupported_critical",
            Self::UnknownKey => "unknown_key",
            Self::KeyMismatch => "key_mismatch",
            Self::BadSignature => "bad_signature",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::WrongIssuer => "wrong_issuer",
            Self::WrongAudience => "wrong_audience",
        }
    }
}

/// Why a JSON Web Key Set was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwksError {
    #[error("key set larger than {MAX_JWKS_BYTES} bytes")]
    TooLarge,
    #[error("key set is not JSON with a \"keys\" array: {0}")]
    NotJson(String),
    #[error("key set has {0} keys, more than {MAX_KEYS}")]
    TooManyKeys(usize),
    #[error(
        "key set has no key weft can verify with ({skipped} skipped: RSA of 2048 bits or more, \
         EC P-256/P-384 or Ed25519 signing keys are)"
    )]
    NoUsableKey { skipped: usize },
}

impl JwksError {
    /// Stable snake_case label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::TooLarge => "jwks_too_large",
            Self::NotJson(_) => "jwks_not_json",
            Self::TooManyKeys(_) => "jwks_too_many_keys",
            Self::NoUsableKey { .. } => "jwks_no_usable_key",
        }
    }
}

/// The longest token accepted (Envoy's and Istio's practical header limits are of this
/// order; a longer bearer token is an attack or a mistake).
pub const MAX_TOKEN: usize = 8 * 1024;
/// The largest key set accepted, inline or fetched.
pub const MAX_JWKS_BYTES: usize = 256 * 1024;
/// The most keys one set may hold.
pub const MAX_KEYS: usize = 100;
/// Clock skew allowed on `exp` and `nbf`: Envoy's default `clock_skew_seconds`.
pub const CLOCK_SKEW_SECS: u64 = 60;

#[cfg(test)]
mod tests;
