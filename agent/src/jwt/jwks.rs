//! JSON Web Key Sets (RFC 7517) reduced to the keys weft can verify with, and the signature
//! algorithms (RFC 7518) it accepts.

use std::fmt;

use aws_lc_rs::signature::{self, ParsedPublicKey, RsaPublicKeyComponents, VerificationAlgorithm};
use base64::Engine as _;
use serde_json::{Map, Value};

use super::{JwksError, MAX_JWKS_BYTES, MAX_KEYS};

/// A parsed JSON Web Key Set: only the keys weft can verify with.
#[derive(Clone, Debug)]
pub struct Jwks {
    keys: Vec<Key>,
}

impl Jwks {
    /// Parses a key set, skipping keys weft cannot use (unknown types or curves, RSA under
    /// 2048 bits, encryption keys, malformed members); an error when none is left.
    pub fn parse(json: &[u8]) -> Result<Jwks, JwksError> {
        if json.len() > MAX_JWKS_BYTES {
            return Err(JwksError::TooLarge);
        }
        let value: Value =
            serde_json::from_slice(json).map_err(|e| JwksError::NotJson(e.to_string()))?;
        let Some(raw) = value.get("keys").and_then(Value::as_array) else {
            return Err(JwksError::NotJson("no \"keys\" array".into()));
        };
        if raw.len() > MAX_KEYS {
            return Err(JwksError::TooManyKeys(raw.len()));
        }
        let keys: Vec<Key> = raw
            .iter()
            .filter_map(Value::as_object)
            .filter_map(Key::parse)
            .collect();
        if keys.is_empty() {
            return Err(JwksError::NoUsableKey { skipped: raw.len() });
        }
        Ok(Jwks { keys })
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Whether a usable key of this kid is in the set (a token naming another kid asks for
    /// a refetch: the issuer may have rotated its keys).
    pub fn has_kid(&self, kid: &str) -> bool {
        self.keys.iter().any(|k| k.kid.as_deref() == Some(kid))
    }

    /// The keys a token of `alg` (and `kid`, when it names one) may be checked with; `None`
    /// when it names a kid no key has.
    pub(super) fn candidates<'a>(
        &'a self,
        alg: Alg,
        kid: Option<&'a str>,
    ) -> Option<impl Iterator<Item = &'a Key> + 'a> {
        if let Some(kid) = kid
            && !self.has_kid(kid)
        {
            return None;
        }
        Some(
            self.keys
                .iter()
                .filter(move |k| kid.is_none_or(|kid| k.kid.as_deref() == Some(kid)))
                .filter(move |k| k.fits(alg)),
        )
    }
}

/// A signature algorithm weft accepts in a token's `alg`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Alg {
    Rs256,
    Rs384,
    Rs512,
    Ps256,
    Ps384,
    Ps512,
    Es256,
    Es384,
    EdDsa,
}

impl Alg {
    pub(super) fn parse(name: &str) -> Option<Alg> {
        Some(match name {
            "RS256" => Alg::Rs256,
            "RS384" => Alg::Rs384,
            "RS512" => Alg::Rs512,
            "PS256" => Alg::Ps256,
            "PS384" => Alg::Ps384,
            "PS512" => Alg::Ps512,
            "ES256" => Alg::Es256,
            "ES384" => Alg::Es384,
            "EdDSA" => Alg::EdDsa,
            _ => return None,
        })
    }

    fn rsa(self) -> Option<&'static signature::RsaParameters> {
        Some(match self {
            Alg::Rs256 => &signature::RSA_PKCS1_2048_8192_SHA256,
            Alg::Rs384 => &signature::RSA_PKCS1_2048_8192_SHA384,
            Alg::Rs512 => &signature::RSA_PKCS1_2048_8192_SHA512,
            Alg::Ps256 => &signature::RSA_PSS_2048_8192_SHA256,
            Alg::Ps384 => &signature::RSA_PSS_2048_8192_SHA384,
            Alg::Ps512 => &signature::RSA_PSS_2048_8192_SHA512,
            Alg::Es256 | Alg::Es384 | Alg::EdDsa => return None,
        })
    }
}

/// One usable key of a set.
#[derive(Clone)]
pub(super) struct Key {
    kid: Option<String>,
    /// The one algorithm the key declared (`alg`), if it did.
    alg: Option<Alg>,
    material: Material,
}

#[derive(Clone)]
enum Material {
    /// Modulus and exponent, big-endian without leading zeros.
    Rsa { n: Vec<u8>, e: Vec<u8> },
    /// An EC P-256, P-384 or Ed25519 public key, checked when the set was parsed.
    Curve { curve: Curve, key: ParsedPublicKey },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Curve {
    P256,
    P384,
    Ed25519,
}

impl Key {
    /// The key, or `None` when weft cannot use it (which skips it, as Envoy does).
    fn parse(jwk: &Map<String, Value>) -> Option<Key> {
        let text = |name: &str| jwk.get(name).and_then(Value::as_str);
        let bytes = |name: &str| text(name).and_then(|v| b64(v).ok());
        // Absent `use` means any use; an encryption key is never a signing key.
        if jwk.get("use").is_some_and(|u| u.as_str() != Some("sig")) {
            return None;
        }
        let alg = match jwk.get("alg") {
            None => None,
            // A key bound to an algorithm weft does not accept (RSA-OAEP, HS256) is unusable.
            Some(alg) => Some(Alg::parse(alg.as_str()?)?),
        };
        let kid = match jwk.get("kid") {
            None => None,
            Some(kid) => Some(kid.as_str()?.to_owned()),
        };
        let material = match text("kty")? {
            "RSA" => {
                let n = strip_zeros(bytes("n")?);
                let e = strip_zeros(bytes("e")?);
                // `strip_zeros` leaves a non-zero first byte, or nothing (a zero modulus).
                let bits = n.len() * 8 - n.first().map_or(0, |b| b.leading_zeros() as usize);
                if !(MIN_RSA_BITS..=MAX_RSA_BITS).contains(&bits) || e.is_empty() || e.len() > 8 {
                    return None;
                }
                Material::Rsa { n, e }
            }
            "EC" => {
                let (curve, len, verifier): (_, _, &'static dyn VerificationAlgorithm) =
                    match text("crv")? {
                        "P-256" => (Curve::P256, 32, &signature::ECDSA_P256_SHA256_FIXED),
                        "P-384" => (Curve::P384, 48, &signature::ECDSA_P384_SHA384_FIXED),
                        _ => return None,
                    };
                let (x, y) = (bytes("x")?, bytes("y")?);
                if x.len() != len || y.len() != len {
                    return None;
                }
                // SEC 1 uncompressed point: 0x04 || x || y; ParsedPublicKey checks it is on
                // the curve.
                let point = [&[0x04][..], &x, &y].concat();
                let key = ParsedPublicKey::new(verifier, point).ok()?;
                Material::Curve { curve, key }
            }
            "OKP" if text("crv")? == "Ed25519" => {
                let x = bytes("x")?;
                let key = ParsedPublicKey::new(&signature::ED25519, x).ok()?;
                Material::Curve {
                    curve: Curve::Ed25519,
                    key,
                }
            }
            _ => return None,
        };
        let key = Key { kid, alg, material };
        // A declared alg must fit the key type, or the key can never be used.
        if let Some(alg) = alg
            && !key.fits(alg)
        {
            return None;
        }
        Some(key)
    }

    /// Whether a token of `alg` may be checked with this key.
    fn fits(&self, alg: Alg) -> bool {
        if self.alg.is_some_and(|own| own != alg) {
            return false;
        }
        match &self.material {
            Material::Rsa { .. } => alg.rsa().is_some(),
            Material::Curve { curve, .. } => {
                matches!(
                    (curve, alg),
                    (Curve::P256, Alg::Es256)
                        | (Curve::P384, Alg::Es384)
                        | (Curve::Ed25519, Alg::EdDsa)
                )
            }
        }
    }

    /// Checks `signature` over `message`; the caller has checked `fits(alg)`.
    pub(super) fn verifies(&self, alg: Alg, message: &[u8], signature: &[u8]) -> bool {
        match (&self.material, alg.rsa()) {
            (Material::Rsa { n, e }, Some(params)) => RsaPublicKeyComponents { n, e }
                .verify(params, message, signature)
                .is_ok(),
            (Material::Curve { key, .. }, None) => key.verify_sig(message, signature).is_ok(),
            _ => false,
        }
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.material {
            Material::Rsa { n, .. } => format!("RSA-{}", n.len() * 8),
            Material::Curve { curve, .. } => format!("{curve:?}"),
        };
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("kind", &kind)
            .finish()
    }
}

/// Unpadded base64url, as JOSE writes every binary member (RFC 7515 §2); canonical only
/// (no padding, no stray trailing bits).
pub(super) fn b64(text: &str) -> Result<Vec<u8>, base64::DecodeError> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(text)
}

fn strip_zeros(mut bytes: Vec<u8>) -> Vec<u8> {
    let zeros = bytes.iter().take_while(|b| **b == 0).count();
    bytes.drain(..zeros);
    bytes
}

/// RSA keys under 2048 bits are skipped (NIST SP 800-131A; aws-lc refuses them anyway).
const MIN_RSA_BITS: usize = 2048;
/// aws-lc-rs verifies RSA up to 8192 bits.
const MAX_RSA_BITS: usize = 8192;
