//! Secrets of type `kubernetes.io/tls` → `state::TlsCertificate`: the certificates of HTTPS
//! listeners, shared by the local file (`secrets:` items, with `data` in base64 or
//! `stringData` as text) and the Kubernetes source (the Secrets a gateway is told to read).
//!
//! `tls.crt` is a PEM chain, leaf first, of 1 to `MAX_CHAIN` certificates and nothing else,
//! at most `MAX_PEM_BYTES`; `tls.key` is one PEM private key (PKCS#8 `PRIVATE KEY`, PKCS#1
//! `RSA PRIVATE KEY` or SEC1 `EC PRIVATE KEY`). The key is loaded here with the crypto
//! provider the handshakes use and checked against the leaf, so a bad key is refused with
//! the field that holds it, not at the first handshake. Errors never quote the key.

use std::{collections::BTreeMap, sync::Arc};

use base64::Engine as _;
use rustls::{
    pki_types::{CertificateDer, PrivateKeyDer},
    sign::CertifiedKey,
};
use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest as _, Sha256};

use super::{at, invalid, object_name, object_type};
use crate::{
    source::syntax::{self, Invalid},
    state::{TlsCertificate, gateway::KeyKind},
};

/// The `type` of the Secrets that hold certificates.
pub const TLS_SECRET_TYPE: &str = "kubernetes.io/tls";
/// The most certificates `tls.crt` may hold (leaf and intermediates).
pub const MAX_CHAIN: usize = 10;
/// The largest `tls.crt` (and `tls.key`), decoded.
pub const MAX_PEM_BYTES: usize = 64 * 1024;

/// Validates a Secret object found at `field` (`secrets[0]`, or `""` for an API object);
/// one without a namespace is in `default_namespace`.
pub fn certificate(
    field: &str,
    object: &Value,
    default_namespace: &str,
) -> Result<TlsCertificate, Invalid> {
    object_type(field, object, "v1", "Secret")?;
    let raw: RawSecret = syntax::decode(field, object)?;
    let name = object_name(field, &raw.metadata, default_namespace)?;
    if raw.r#type.as_deref() != Some(TLS_SECRET_TYPE) {
        return Err(invalid(
            at(field, "type"),
            format!(
                "{:?}: only Secrets of type {TLS_SECRET_TYPE} hold certificates",
                raw.r#type.as_deref().unwrap_or("Opaque")
            ),
        ));
    }
    let (crt_field, crt) = entry(field, &raw, CERT_KEY)?;
    let (key_field, key) = entry(field, &raw, KEY_KEY)?;
    let chain = chain(&crt_field, &crt)?;
    let (key, key_kind) = private_key(&key_field, &key)?;
    // As the handshakes will load it: a key rustls cannot use, or not the leaf's, is
    // refused here.
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider).map_err(|e| {
        let reason = match e {
            rustls::Error::InconsistentKeys(_) => {
                "the key is not the key of the leaf certificate (the first of tls.crt)".into()
            }
            e => format!("the key cannot be used for TLS: {e}"),
        };
        invalid(key_field, reason)
    })?;
    let leaf = chain.first().map(|c| c.as_ref()).unwrap_or_default();
    let fingerprint = Sha256::digest(leaf)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(TlsCertificate {
        name,
        chain: Arc::new(chain.into_iter().map(|c| c.to_vec()).collect()),
        key: Arc::new(key.secret_der().to_vec()),
        key_kind,
        fingerprint,
    })
}

/// A Secret as its manifest (or the API) writes it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawSecret {
    // Checked by `object_type`.
    #[serde(rename = "apiVersion")]
    _api_version: String,
    #[serde(rename = "kind")]
    _kind: String,
    #[serde(default)]
    metadata: kube::api::ObjectMeta,
    r#type: Option<String>,
    /// Base64, as the API keeps it.
    #[serde(default)]
    data: BTreeMap<String, String>,
    /// Text, written into `data` by the API server (so only a file has it).
    #[serde(default)]
    string_data: BTreeMap<String, String>,
    #[serde(default, rename = "immutable")]
    _immutable: Option<bool>,
}

/// The bytes of `key` and the field they came from: `stringData` wins over `data`, as
/// the API server merges them.
fn entry(field: &str, raw: &RawSecret, key: &str) -> Result<(String, Vec<u8>), Invalid> {
    if let Some(text) = raw.string_data.get(key) {
        let field = at(field, &format!("stringData.{key}"));
        return bounded(field, text.as_bytes().to_vec());
    }
    let field = at(field, &format!("data.{key}"));
    let Some(encoded) = raw.data.get(key) else {
        return Err(invalid(
            field,
            "required in a Secret of type kubernetes.io/tls".into(),
        ));
    };
    // Bounded before decoding (base64 is 4/3 of the bytes). Line breaks, as the `base64`
    // tool writes them into a hand-made file, are not part of the value.
    if encoded.len() > 2 * MAX_BASE64 {
        return Err(too_large(field, encoded.len() / 4 * 3));
    }
    let compact: String = encoded
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    if compact.len() > MAX_BASE64 {
        return Err(too_large(field, compact.len() / 4 * 3));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(compact)
        .map_err(|e| invalid(field.clone(), format!("not base64: {e}")))?;
    bounded(field, bytes)
}

fn bounded(field: String, bytes: Vec<u8>) -> Result<(String, Vec<u8>), Invalid> {
    if bytes.len() > MAX_PEM_BYTES {
        return Err(too_large(field, bytes.len()));
    }
    Ok((field, bytes))
}

/// The certificates of `tls.crt`, leaf first.
fn chain(field: &str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, Invalid> {
    // A key pasted into tls.crt would be served to every client.
    let chain = pem_certificates(field, pem, "the key belongs in tls.key")?;
    if chain.is_empty() || chain.len() > MAX_CHAIN {
        return Err(invalid(
            field.into(),
            format!(
                "{} PEM certificates (-----BEGIN CERTIFICATE-----): expected 1 to {MAX_CHAIN}, \
                 leaf first",
                chain.len()
            ),
        ));
    }
    Ok(chain)
}

/// The X.509 certificates of PEM text (at `field`) that holds nothing else: another block
/// is an error saying `misplaced` (where it belongs).
pub fn pem_certificates(
    field: &str,
    pem: &[u8],
    misplaced: &str,
) -> Result<Vec<CertificateDer<'static>>, Invalid> {
    let mut certificates = Vec::new();
    for (i, item) in rustls_pemfile::read_all(&mut &*pem).enumerate() {
        let item = item.map_err(|e| invalid(field.into(), format!("PEM block {i}: {e}")))?;
        let rustls_pemfile::Item::X509Certificate(der) = item else {
            return Err(invalid(
                field.into(),
                format!("PEM block {i} is not a CERTIFICATE ({misplaced})"),
            ));
        };
        x509_parser::parse_x509_certificate(&der).map_err(|e| {
            invalid(
                field.into(),
                format!("PEM block {i} is not an X.509 certificate: {e}"),
            )
        })?;
        certificates.push(der);
    }
    Ok(certificates)
}

/// The one private key of `tls.key`.
fn private_key(field: &str, pem: &[u8]) -> Result<(PrivateKeyDer<'static>, KeyKind), Invalid> {
    let mut keys = Vec::new();
    for (i, item) in rustls_pemfile::read_all(&mut &*pem).enumerate() {
        // The PEM parser's errors do not quote the input, so none of the key is logged.
        let item = item.map_err(|e| invalid(field.into(), format!("PEM block {i}: {e}")))?;
        let key = match item {
            rustls_pemfile::Item::Pkcs8Key(k) => (PrivateKeyDer::Pkcs8(k), KeyKind::Pkcs8),
            rustls_pemfile::Item::Pkcs1Key(k) => (PrivateKeyDer::Pkcs1(k), KeyKind::Pkcs1),
            rustls_pemfile::Item::Sec1Key(k) => (PrivateKeyDer::Sec1(k), KeyKind::Sec1),
            _ => {
                return Err(invalid(
                    field.into(),
                    format!(
                        "PEM block {i} is not a private key (PRIVATE KEY, RSA PRIVATE KEY or \
                         EC PRIVATE KEY)"
                    ),
                ));
            }
        };
        keys.push(key);
    }
    match keys.len() {
        1 => Ok(keys.remove(0)),
        n => Err(invalid(
            field.into(),
            format!("{n} PEM private keys: expected exactly one"),
        )),
    }
}

fn too_large(field: String, bytes: usize) -> Invalid {
    invalid(field, format!("{bytes} bytes: at most {MAX_PEM_BYTES}"))
}

/// The longest base64 of `MAX_PEM_BYTES`.
const MAX_BASE64: usize = MAX_PEM_BYTES.div_ceil(3) * 4;
const CERT_KEY: &str = "tls.crt";
const KEY_KEY: &str = "tls.key";

#[cfg(test)]
mod tests {
    use super::*;

    /// A Secret of a fresh self-signed certificate for `host` (its key PKCS#8), and the
    /// certificate's and the key's PEM.
    fn secret(host: &str) -> (Value, String, String) {
        let cert = rcgen::generate_simple_self_signed(vec![host.to_owned()]).unwrap();
        let crt = cert.cert.pem();
        let key = cert.signing_key.serialize_pem();
        let object = serde_json::json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "shop-cert", "namespace": "edge"},
            "type": "kubernetes.io/tls",
            "stringData": {"tls.crt": crt, "tls.key": key},
        });
        (object, crt, key)
    }

    fn encode(text: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(text)
    }

    #[test]
    fn a_tls_secret_becomes_a_certificate_with_its_fingerprint() {
        let (object, crt, _) = secret("shop.example.com");
        let c = certificate("secrets[0]", &object, "default").unwrap();
        assert_eq!(c.name.to_string(), "edge/shop-cert");
        assert_eq!(c.key_kind, KeyKind::Pkcs8);
        assert_eq!(c.chain.len(), 1);
        let der = rustls_pemfile::certs(&mut crt.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        assert_eq!(c.chain[0], der.to_vec());
        let expected: String = Sha256::digest(&der)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(c.fingerprint, expected);
        assert_eq!(c.fingerprint.len(), 64);
        // The config dump shows the fingerprint, never the key.
        let dumped = serde_json::to_string(&c).unwrap();
        assert!(
            dumped.contains(&expected) && !dumped.contains("key"),
            "{dumped}"
        );
    }

    #[test]
    fn data_is_base64_as_the_api_keeps_it() {
        let (mut object, crt, key) = secret("shop.example.com");
        object.as_object_mut().unwrap().remove("stringData");
        // Wrapped at 76 columns, as the base64 tool writes it.
        let wrapped: String = encode(&key)
            .as_bytes()
            .chunks(76)
            .map(|line| format!("{}\n", std::str::from_utf8(line).unwrap()))
            .collect();
        object["data"] = serde_json::json!({"tls.crt": encode(&crt), "tls.key": wrapped});
        // What the API adds to every object is not the Secret's to validate.
        object["metadata"]["resourceVersion"] = "7".into();
        object["metadata"]["managedFields"] = serde_json::json!([{"manager": "kubectl"}]);
        certificate("", &object, "default").unwrap();
    }

    #[test]
    fn base64_is_bounded_before_it_is_decoded() {
        let (mut object, _, key) = secret("shop.example.com");
        object["stringData"] = serde_json::json!({"tls.key": key});
        object["data"] = serde_json::json!({"tls.crt": "A".repeat(MAX_BASE64 + 4)});
        let err = certificate("s", &object, "default").unwrap_err();
        assert_eq!(err.field, "s.data.tls.crt");
        assert!(err.reason.contains("at most 65536"), "{err}");
        object["data"]["tls.crt"] = "A".repeat(3 * MAX_BASE64).into();
        let err = certificate("s", &object, "default").unwrap_err();
        assert!(err.reason.contains("at most 65536"), "{err}");
    }

    #[test]
    fn a_sec1_key_loads() {
        use aws_lc_rs::encoding::AsDer as _;
        // rcgen writes PKCS#8; the same key written as SEC1 (`EC PRIVATE KEY`).
        let cert = rcgen::generate_simple_self_signed(vec!["a.example".into()]).unwrap();
        let pair = aws_lc_rs::signature::EcdsaKeyPair::from_pkcs8(
            &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            &cert.signing_key.serialize_der(),
        )
        .unwrap();
        let sec1 = pair.private_key().as_der().unwrap();
        let pem = pem::encode(&pem::Pem::new("EC PRIVATE KEY", sec1.as_ref().to_vec()));
        let (mut object, _, _) = secret("a.example");
        object["stringData"]["tls.crt"] = cert.cert.pem().into();
        object["stringData"]["tls.key"] = pem.into();
        let c = certificate("secrets[0]", &object, "default").unwrap();
        assert_eq!(c.key_kind, KeyKind::Sec1);
    }

    #[test]
    fn errors_name_the_field() {
        let (base, crt, key) = secret("shop.example.com");
        let (_, other_crt, _) = secret("other.example.com");
        let cases: Vec<(Value, &str, &str)> = vec![
            (
                json_set(&base, "/type", "Opaque".into()),
                "secrets[0].type",
                "kubernetes.io/tls",
            ),
            (
                json_set(&base, "/kind", "ConfigMap".into()),
                "secrets[0].kind",
                "Secret",
            ),
            (
                json_set(&base, "/stringdata", serde_json::json!({})),
                "secrets[0]",
                "unknown field `stringdata`",
            ),
            (
                json_set(&base, "/stringData/tls.key", crt.clone().into()),
                "secrets[0].stringData.tls.key",
                "not a private key",
            ),
            (
                json_set(&base, "/stringData/tls.crt", key.clone().into()),
                "secrets[0].stringData.tls.crt",
                "not a CERTIFICATE",
            ),
            (
                json_set(&base, "/stringData/tls.crt", other_crt.clone().into()),
                "secrets[0].stringData.tls.key",
                "not the key of the leaf",
            ),
            (
                json_set(
                    &base,
                    "/stringData/tls.crt",
                    crt.repeat(MAX_CHAIN + 1).into(),
                ),
                "secrets[0].stringData.tls.crt",
                "expected 1 to 10",
            ),
            (
                json_set(
                    &base,
                    "/stringData/tls.crt",
                    "x".repeat(MAX_PEM_BYTES + 1).into(),
                ),
                "secrets[0].stringData.tls.crt",
                "at most",
            ),
            (
                json_set(&base, "/stringData/tls.key", format!("{key}{key}").into()),
                "secrets[0].stringData.tls.key",
                "exactly one",
            ),
            (
                json_set(&base, "/stringData/tls.crt", "no pem here".into()),
                "secrets[0].stringData.tls.crt",
                "expected 1 to 10",
            ),
            (
                json_set(
                    &json_set(&base, "/stringData", serde_json::json!({"tls.key": key})),
                    "/data",
                    serde_json::json!({"tls.crt": "!!!"}),
                ),
                "secrets[0].data.tls.crt",
                "not base64",
            ),
            (
                json_set(&base, "/stringData", serde_json::json!({"tls.crt": crt})),
                "secrets[0].data.tls.key",
                "required",
            ),
            (
                json_set(&base, "/metadata/name", "Shop".into()),
                "secrets[0].metadata.name",
                "not a valid name",
            ),
        ];
        for (object, field, reason) in cases {
            let err = certificate("secrets[0]", &object, "default").unwrap_err();
            assert_eq!(err.field, field, "{err}");
            assert!(err.reason.contains(reason), "{err}");
            assert!(!err.to_string().contains("BEGIN PRIVATE"), "{err}");
        }
    }

    /// `value` with the member at `pointer` set.
    fn json_set(value: &Value, pointer: &str, to: Value) -> Value {
        let mut out = value.clone();
        let (parent, key) = pointer.rsplit_once('/').unwrap();
        let target = if parent.is_empty() {
            &mut out
        } else {
            out.pointer_mut(parent).unwrap()
        };
        target.as_object_mut().unwrap().insert(key.to_owned(), to);
        out
    }
}
