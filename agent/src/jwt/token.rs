//! Tokens (RFC 7519, JWS compact serialisation of RFC 7515): split and decode, then verify
//! the signature and the registered claims.

use std::{
    borrow::Cow,
    time::{SystemTime, UNIX_EPOCH},
};

use serde_json::{Map, Value};

use super::{
    CLOCK_SKEW_SECS, MAX_TOKEN, TokenError,
    jwks::{Alg, Jwks, b64},
};

/// A token split and decoded, signature not yet checked.
#[derive(Clone)]
pub struct Unverified {
    alg: Alg,
    kid: Option<String>,
    /// `base64url(header) "." base64url(payload)`: what the signature covers.
    signing_input: String,
    signature: Vec<u8>,
    payload: Map<String, Value>,
}

/// Splits and decodes `token` (the bearer credential, without `Bearer `).
pub fn decode(token: &str) -> Result<Unverified, TokenError> {
    if token.len() > MAX_TOKEN {
        return Err(TokenError::TooLarge);
    }
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed("not three dot-separated segments"));
    };
    let header = json_object(
        header,
        "header is not base64url",
        "header is not a JSON object",
    )?;
    // An extension the issuer marked critical changes what the token means; weft knows none.
    if header
        .get("crit")
        .is_some_and(|c| c.as_array().is_none_or(|c| !c.is_empty()))
    {
        return Err(TokenError::UnsupportedCritical);
    }
    let alg = match header.get("alg") {
        Some(Value::String(name)) => {
            Alg::parse(name).ok_or_else(|| TokenError::UnsupportedAlgorithm(shorten(name)))?
        }
        Some(_) => return Err(TokenError::Malformed("alg is not a string")),
        None => return Err(TokenError::Malformed("header has no alg")),
    };
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(kid)) => Some(kid.clone()),
        Some(_) => return Err(TokenError::Malformed("kid is not a string")),
    };
    let body = json_object(
        payload,
        "payload is not base64url",
        "payload is not a JSON object",
    )?;
    let signature =
        b64(signature).map_err(|_| TokenError::Malformed("signature is not base64url"))?;
    if signature.is_empty() {
        return Err(TokenError::Malformed("empty signature"));
    }
    let signing_input = token
        .rsplit_once('.')
        .map_or("", |(input, _)| input)
        .to_owned();
    Ok(Unverified {
        alg,
        kid,
        signing_input,
        signature,
        payload: body,
    })
}

impl Unverified {
    /// The `iss` claim, to pick the rule (and key set) the token is checked against.
    pub fn issuer(&self) -> Option<&str> {
        self.payload.get("iss").and_then(Value::as_str)
    }

    /// The header's `kid`.
    pub fn kid(&self) -> Option<&str> {
        self.kid.as_deref()
    }
}

// Not derived: the signing input and signature together are the bearer credential, which
// must not reach a log through `?token`.
impl std::fmt::Debug for Unverified {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unverified")
            .field("alg", &self.alg)
            .field("kid", &self.kid)
            .field("iss", &self.issuer())
            .finish_non_exhaustive()
    }
}

/// What a token must say.
#[derive(Clone, Copy, Debug)]
pub struct Expect<'a> {
    /// `iss` must be exactly this.
    pub issuer: &'a str,
    /// `aud` must name one of these; empty accepts any audience (and none).
    pub audiences: &'a [String],
    /// The time `exp` and `nbf` are checked against.
    pub now: SystemTime,
}

/// Checks the token's signature with `keys`, then its claims against `expect`.
pub fn verify(token: &Unverified, keys: &Jwks, expect: &Expect<'_>) -> Result<Claims, TokenError> {
    let mut candidates = keys
        .candidates(token.alg, token.kid.as_deref())
        .ok_or(TokenError::UnknownKey)?
        .peekable();
    if candidates.peek().is_none() {
        return Err(TokenError::KeyMismatch);
    }
    let message = token.signing_input.as_bytes();
    if !candidates.any(|key| key.verifies(token.alg, message, &token.signature)) {
        return Err(TokenError::BadSignature);
    }
    // Claims only once the signature holds: nothing unauthenticated decides the outcome.
    let payload = &token.payload;
    if token.issuer() != Some(expect.issuer) {
        return Err(TokenError::WrongIssuer);
    }
    let now = expect
        .now
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let skew = CLOCK_SKEW_SECS as f64;
    if let Some(exp) = time_claim(payload, "exp")?
        && now > exp + skew
    {
        return Err(TokenError::Expired);
    }
    if let Some(nbf) = time_claim(payload, "nbf")?
        && nbf > now + skew
    {
        return Err(TokenError::NotYetValid);
    }
    if !expect.audiences.is_empty() {
        let named = |aud: &str| expect.audiences.iter().any(|a| a == aud);
        let ok = match payload.get("aud") {
            Some(Value::String(aud)) => named(aud),
            Some(Value::Array(auds)) => auds.iter().filter_map(Value::as_str).any(named),
            _ => false,
        };
        if !ok {
            return Err(TokenError::WrongAudience);
        }
    }
    let subject = match payload.get("sub") {
        None => None,
        Some(Value::String(sub)) => Some(sub.as_str()),
        Some(_) => return Err(TokenError::Malformed("sub is not a string")),
    };
    Ok(Claims::new(expect.issuer, subject, payload.clone()))
}

/// The verified claims.
#[derive(Clone, Debug)]
pub struct Claims {
    issuer: String,
    /// `<iss>/<sub>`, formatted once: access policy matches it for every rule that names
    /// request principals.
    principal: Option<String>,
    claims: Map<String, Value>,
}

impl Claims {
    fn new(issuer: &str, subject: Option<&str>, claims: Map<String, Value>) -> Self {
        Self {
            issuer: issuer.to_owned(),
            principal: subject.map(|sub| format!("{issuer}/{sub}")),
            claims,
        }
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    pub fn subject(&self) -> Option<&str> {
        // The principal is the issuer, a slash, then the subject.
        self.principal
            .as_deref()
            .and_then(|p| p.get(self.issuer.len() + 1..))
    }

    /// `<iss>/<sub>`, Istio's request principal; None without `sub`.
    pub fn principal(&self) -> Option<&str> {
        self.principal.as_deref()
    }

    /// Claims as if verified, for the tests of what consumes them (policy, the waypoint).
    #[cfg(test)]
    pub(crate) fn for_tests(payload: Value) -> Self {
        let claims = match payload {
            Value::Object(map) => map,
            _ => Map::new(),
        };
        let text = |key: &str| claims.get(key).and_then(Value::as_str).map(str::to_owned);
        let (issuer, subject) = (text("iss").unwrap_or_default(), text("sub"));
        Self::new(&issuer, subject.as_deref(), claims)
    }

    /// A top-level claim's values as text: a string is one value, an array of strings each
    /// element, a number or bool its JSON text; objects/null give none.
    pub fn values(&self, name: &str) -> Vec<Cow<'_, str>> {
        match self.claims.get(name) {
            Some(Value::Array(items)) => items.iter().filter_map(scalar).collect(),
            Some(value) => scalar(value).into_iter().collect(),
            None => Vec::new(),
        }
    }

    /// A claim as a header value (strings as is, arrays joined with ",", numbers/bools as
    /// text); None if absent or not representable (an object, null, or text a header cannot
    /// carry).
    pub fn header_value(&self, name: &str) -> Option<String> {
        let text = match self.claims.get(name)? {
            Value::Array(items) => items
                .iter()
                .map(scalar)
                .collect::<Option<Vec<_>>>()?
                .join(","),
            value => scalar(value)?.into_owned(),
        };
        http::HeaderValue::from_str(&text).is_ok().then_some(text)
    }
}

/// A string as is, a number or bool as its JSON text.
fn scalar(value: &Value) -> Option<Cow<'_, str>> {
    match value {
        Value::String(s) => Some(Cow::Borrowed(s)),
        Value::Number(n) => Some(Cow::Owned(n.to_string())),
        Value::Bool(b) => Some(Cow::Borrowed(if *b { "true" } else { "false" })),
        Value::Null | Value::Array(_) | Value::Object(_) => None,
    }
}

/// A NumericDate claim (seconds since the epoch, RFC 7519 §2), when present.
fn time_claim(payload: &Map<String, Value>, name: &str) -> Result<Option<f64>, TokenError> {
    match payload.get(name) {
        None => Ok(None),
        Some(value) => value
            .as_f64()
            .map(Some)
            .ok_or(TokenError::Malformed("exp or nbf is not a number")),
    }
}

fn json_object(
    segment: &str,
    not_base64: &'static str,
    not_object: &'static str,
) -> Result<Map<String, Value>, TokenError> {
    let bytes = b64(segment).map_err(|_| TokenError::Malformed(not_base64))?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(object)) => Ok(object),
        _ => Err(TokenError::Malformed(not_object)),
    }
}

/// An attacker's algorithm name, cut short enough to log.
fn shorten(name: &str) -> String {
    name.chars().take(32).collect()
}
