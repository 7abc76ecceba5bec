//! End-user authentication of a Service's requests by JSON Web Token (Istio's
//! `RequestAuthentication`), a `TrafficPolicy` feature on Service targets. Validated by
//! `source::traffic`; enforced by the waypoint, whose access policy then matches the
//! token's principal and claims (`L7Match::request_principals`, `L7Match::claims`).

use std::time::Duration;

use serde::Serialize;

/// The issuers whose tokens a Service's waypoint accepts. A request without a token passes
/// unauthenticated; one whose token is not valid for the rule of its issuer is answered 401.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestAuthentication {
    /// One per issuer (no two name the same issuer).
    pub jwt_rules: Vec<JwtRule>,
}

/// How the tokens of one issuer are found and checked (Istio's `JWTRule`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct JwtRule {
    /// The token's `iss`, exactly.
    pub issuer: String,
    /// The token's `aud` must name one of these; empty: any audience.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub audiences: Vec<String>,
    /// Where the issuer's public keys are.
    pub jwks: JwksSource,
    /// Request headers the token may be in, with the text before it.
    pub from_headers: Vec<TokenHeader>,
    /// Query parameters the token may be in.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub from_params: Vec<String>,
    /// Whether the token is left in the request sent on (otherwise it is removed: a
    /// backend that does not need a user's credential should not hold it).
    pub forward_original_token: bool,
    /// Claims copied into request headers (any such header the client sent is removed
    /// first, token or not).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub output_claim_to_headers: Vec<ClaimHeader>,
}

/// An issuer's JSON Web Key Set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum JwksSource {
    /// Fetched over HTTPS, kept for `refresh_interval`, each fetch bounded by `timeout`.
    Uri {
        uri: String,
        #[serde(serialize_with = "super::route::humantime")]
        refresh_interval: Duration,
        #[serde(serialize_with = "super::route::humantime")]
        timeout: Duration,
    },
    /// Written in the policy (the JSON text, valid when the policy was read).
    Inline(String),
}

/// A header a token is read from: `authorization` with prefix `Bearer `.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenHeader {
    /// Lowercase.
    pub name: String,
    /// Text before the token (compared case-insensitively); may be empty.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub prefix: String,
}

/// A claim copied into a request header.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClaimHeader {
    /// Lowercase.
    pub header: String,
    /// A top-level claim's name.
    pub claim: String,
}

impl TokenHeader {
    /// Istio's default: `Authorization: Bearer <token>`.
    pub fn bearer() -> Self {
        Self {
            name: "authorization".into(),
            prefix: "Bearer ".into(),
        }
    }
}

/// The query parameter Istio reads a token from by default.
pub const DEFAULT_TOKEN_PARAM: &str = "access_token";

/// How long a fetched key set is kept by default (Istio's `PILOT_JWT_PUB_KEY_REFRESH_INTERVAL`).
pub const DEFAULT_JWKS_REFRESH: Duration = Duration::from_secs(20 * 60);

/// How long a key set fetch may take by default (Istio's `JWTRule.timeout`).
pub const DEFAULT_JWKS_TIMEOUT: Duration = Duration::from_secs(5);
