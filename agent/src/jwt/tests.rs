use std::{
    sync::OnceLock,
    time::{Duration, SystemTime},
};

use aws_lc_rs::{
    rand::SystemRandom,
    rsa::KeySize,
    signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair as _, RsaKeyPair},
};
use base64::Engine as _;
use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;

const ISSUER: &str = "https://issuer.example";
const NOW: u64 = 1_700_000_000;

#[test]
fn every_algorithm_verifies() {
    for (alg, key) in [
        ("RS256", rsa()),
        ("RS384", rsa()),
        ("RS512", rsa()),
        ("PS256", rsa()),
        ("PS384", rsa()),
        ("PS512", rsa()),
        ("ES256", p256()),
        ("ES384", p384()),
        ("EdDSA", ed25519()),
    ] {
        let keys = jwks(&[key.jwk("k1", None)]);
        let token = sign(key, alg, Some("k1"), &claims());
        let claims = check(&token, &keys, &[]).unwrap_or_else(|e| panic!("{alg}: {e}"));
        assert_eq!(claims.issuer(), ISSUER);
        assert_eq!(claims.subject(), Some("alice"));
        assert_eq!(claims.principal(), Some("https://issuer.example/alice"));
    }
}

#[test]
fn a_token_without_kid_is_tried_with_every_fitting_key() {
    let keys = jwks(&[
        p256().jwk("ec", None),
        rsa_other().jwk("other", None),
        rsa().jwk("rsa", None),
    ]);
    let token = sign(rsa(), "RS256", None, &claims());
    assert!(check(&token, &keys, &[]).is_ok());
}

#[test]
fn expiry_and_not_before_allow_sixty_seconds_of_skew() {
    let keys = jwks(&[ed25519().jwk("k", None)]);
    let at = |exp: Option<i64>, nbf: Option<i64>| {
        let mut claims = claims();
        if let Some(exp) = exp {
            claims["exp"] = json!(NOW as i64 + exp);
        }
        if let Some(nbf) = nbf {
            claims["nbf"] = json!(NOW as i64 + nbf);
        }
        check(&sign(ed25519(), "EdDSA", None, &claims), &keys, &[]).map(|_| ())
    };
    assert_eq!(at(Some(-61), None), Err(TokenError::Expired));
    assert_eq!(at(Some(-59), None), Ok(()));
    assert_eq!(at(None, Some(61)), Err(TokenError::NotYetValid));
    assert_eq!(at(None, Some(59)), Ok(()));
    assert_eq!(at(None, None), Ok(()));
    assert_eq!(TokenError::Expired.reason(), "expired");
    assert_eq!(TokenError::NotYetValid.reason(), "not_yet_valid");
}

#[test]
fn a_time_claim_that_is_not_a_number_is_malformed() {
    let keys = jwks(&[ed25519().jwk("k", None)]);
    let mut claims = claims();
    claims["exp"] = json!("tomorrow");
    let err = check(&sign(ed25519(), "EdDSA", None, &claims), &keys, &[]).unwrap_err();
    assert_eq!(err.reason(), "malformed");
}

#[test]
fn the_issuer_must_match() {
    let keys = jwks(&[p256().jwk("k", None)]);
    let mut claims = claims();
    claims["iss"] = json!("https://evil.example");
    let token = sign(p256(), "ES256", None, &claims);
    assert_eq!(
        decode(&token).unwrap().issuer(),
        Some("https://evil.example")
    );
    assert_eq!(
        check(&token, &keys, &[]).unwrap_err(),
        TokenError::WrongIssuer
    );
    claims.as_object_mut().unwrap().remove("iss");
    let token = sign(p256(), "ES256", None, &claims);
    assert_eq!(
        check(&token, &keys, &[]).unwrap_err(),
        TokenError::WrongIssuer
    );
}

#[test]
fn the_audience_must_be_one_expected_when_any_is() {
    let keys = jwks(&[p256().jwk("k", None)]);
    let with_aud = |aud: Value| {
        let mut claims = claims();
        claims["aud"] = aud;
        sign(p256(), "ES256", None, &claims)
    };
    let expected = ["api".to_owned(), "web".to_owned()];
    assert!(check(&with_aud(json!("web")), &keys, &expected).is_ok());
    assert!(check(&with_aud(json!(["x", "api"])), &keys, &expected).is_ok());
    for wrong in [
        json!("other"),
        json!(["x", 7]),
        json!(null),
        json!({"api": 1}),
    ] {
        assert_eq!(
            check(&with_aud(wrong), &keys, &expected).unwrap_err(),
            TokenError::WrongAudience
        );
    }
    let token = sign(p256(), "ES256", None, &claims());
    assert_eq!(
        check(&token, &keys, &expected).unwrap_err(),
        TokenError::WrongAudience
    );
    assert!(check(&token, &keys, &[]).is_ok(), "no audiences: any");
}

#[test]
fn a_changed_signature_or_payload_does_not_verify() {
    let keys = jwks(&[rsa().jwk("k", None), p256().jwk("e", None)]);
    for (key, alg) in [(rsa(), "RS256"), (rsa(), "PS256"), (p256(), "ES256")] {
        let token = sign(key, alg, None, &claims());
        let (input, sig) = token.rsplit_once('.').unwrap();
        let mut sig = b64d(sig);
        sig[3] ^= 0x01;
        let flipped = format!("{input}.{}", b64e(&sig));
        assert_eq!(
            check(&flipped, &keys, &[]).unwrap_err(),
            TokenError::BadSignature,
            "{alg}"
        );
    }
    let token = sign(rsa(), "RS256", None, &claims());
    let parts: Vec<&str> = token.split('.').collect();
    let mut other = claims();
    other["sub"] = json!("mallory");
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        b64e(other.to_string().as_bytes()),
        parts[2]
    );
    assert_eq!(
        check(&forged, &keys, &[]).unwrap_err(),
        TokenError::BadSignature
    );
}

#[test]
fn alg_none_and_hmac_are_refused() {
    let oct = json!({"kty": "oct", "kid": "h", "k": b64e(b"secret")});
    // A set with only an HMAC key has nothing weft can verify with.
    assert!(matches!(
        Jwks::parse(json!({ "keys": [oct] }).to_string().as_bytes()),
        Err(JwksError::NoUsableKey { skipped: 1 })
    ));
    let payload = b64e(claims().to_string().as_bytes());
    for (alg, sig) in [
        ("none", ""),
        ("HS256", "c2ln"),
        ("RS1", "c2ln"),
        ("", "c2ln"),
    ] {
        let header = b64e(json!({ "alg": alg }).to_string().as_bytes());
        let token = format!("{header}.{payload}.{sig}");
        let err = decode(&token).unwrap_err();
        assert_eq!(err, TokenError::UnsupportedAlgorithm(alg.to_owned()));
        assert_eq!(err.reason(), "unsupported_algorithm");
    }
}

#[test]
fn a_kid_the_set_lacks_is_an_unknown_key() {
    let keys = jwks(&[rsa().jwk("old", None)]);
    let token = sign(rsa(), "RS256", Some("new"), &claims());
    assert_eq!(decode(&token).unwrap().kid(), Some("new"));
    assert!(!keys.has_kid("new"));
    assert!(keys.has_kid("old"));
    assert_eq!(
        check(&token, &keys, &[]).unwrap_err(),
        TokenError::UnknownKey
    );
    assert_eq!(TokenError::UnknownKey.reason(), "unknown_key");
}

#[test]
fn a_key_is_used_only_for_its_declared_algorithm_and_type() {
    let keys = jwks(&[rsa().jwk("k", Some("RS384")), p256().jwk("e", None)]);
    // Same kid, same key, another RSA algorithm than the key declares.
    let token = sign(rsa(), "RS256", Some("k"), &claims());
    assert_eq!(
        check(&token, &keys, &[]).unwrap_err(),
        TokenError::KeyMismatch
    );
    let token = sign(rsa(), "RS384", Some("k"), &claims());
    assert!(check(&token, &keys, &[]).is_ok());
    // An EC P-256 key is never tried for ES384, nor an RSA key for EdDSA.
    let token = sign(p384(), "ES384", Some("e"), &claims());
    assert_eq!(
        check(&token, &keys, &[]).unwrap_err(),
        TokenError::KeyMismatch
    );
    let token = sign(ed25519(), "EdDSA", None, &claims());
    assert_eq!(
        check(&token, &keys, &[]).unwrap_err(),
        TokenError::KeyMismatch
    );
}

#[test]
fn a_token_over_eight_kib_is_refused() {
    let mut claims = claims();
    claims["pad"] = json!("x".repeat(MAX_TOKEN));
    let token = sign(ed25519(), "EdDSA", None, &claims);
    assert_eq!(decode(&token).unwrap_err(), TokenError::TooLarge);
    assert_eq!(TokenError::TooLarge.reason(), "too_large");
}

#[test]
fn malformed_tokens_are_refused() {
    let good = sign(ed25519(), "EdDSA", None, &claims());
    let parts: Vec<&str> = good.split('.').collect();
    let (h, p, s) = (parts[0], parts[1], parts[2]);
    let array = b64e(b"[1,2]");
    let not_json = b64e(b"{alg");
    let int_kid = b64e(br#"{"alg":"EdDSA","kid":7}"#);
    for bad in [
        String::new(),
        "..".to_owned(),
        format!("{h}.{p}"),
        format!("{h}.{p}.{s}.{s}"),
        format!("{h}=.{p}.{s}"),
        format!("{h}.{p}.{s}=="),
        format!("{h}.{p}+.{s}"),
        format!("{h}.{p}."),
        format!("{array}.{p}.{s}"),
        format!("{not_json}.{p}.{s}"),
        format!("{h}.{array}.{s}"),
        format!("{int_kid}.{p}.{s}"),
        format!("Bearer {good}"),
    ] {
        let err = decode(&bad).unwrap_err();
        assert_eq!(err.reason(), "malformed", "{bad}: {err}");
    }
}

#[test]
fn critical_header_extensions_are_refused() {
    let header = b64e(br#"{"alg":"EdDSA","crit":["exp"]}"#);
    let token = format!("{header}.{}.c2ln", b64e(b"{}"));
    assert_eq!(decode(&token).unwrap_err(), TokenError::UnsupportedCritical);
}

#[test]
fn small_rsa_keys_and_unknown_types_are_skipped() {
    let mut small = rsa().jwk("small", None);
    let mut n = vec![0xc3; 128];
    n[127] |= 1;
    small["n"] = json!(b64e(&n));
    let oct = json!({"kty": "oct", "k": "c2VjcmV0"});
    let ed448 = json!({"kty": "OKP", "crv": "Ed448", "x": b64e(&[1; 57])});
    let secp256k1 =
        json!({"kty": "EC", "crv": "secp256k1", "x": b64e(&[1; 32]), "y": b64e(&[1; 32])});
    let mut off_curve = p256().jwk("off", None);
    off_curve["y"] = json!(b64e(&[7; 32]));
    let mut empty = rsa().jwk("empty", None);
    empty["n"] = json!("");
    let mut zero = rsa().jwk("zero", None);
    zero["n"] = json!(b64e(&[0; 256]));
    zero["e"] = json!("");
    let mut encryption = rsa().jwk("enc", None);
    encryption["use"] = json!("enc");
    let mut mismatched = p256().jwk("mismatch", Some("RS256"));
    mismatched["kty"] = json!("EC");
    let keys = [
        small, empty, zero, oct, ed448, secp256k1, off_curve, encryption, mismatched,
    ];
    let mut keys = keys.to_vec();
    keys.push(json!(3));
    let set = json!({ "keys": keys });
    assert!(matches!(
        Jwks::parse(set.to_string().as_bytes()),
        Err(JwksError::NoUsableKey { skipped: 10 })
    ));

    let mut with_good = set;
    with_good["keys"]
        .as_array_mut()
        .unwrap()
        .push(rsa().jwk("good", None));
    let keys = Jwks::parse(with_good.to_string().as_bytes()).unwrap();
    assert_eq!(keys.len(), 1);
    assert!(!keys.is_empty());
    assert!(keys.has_kid("good"));
    assert!(!keys.has_kid("small"));
}

#[test]
fn garbage_and_oversized_key_sets_are_refused() {
    for garbage in [
        &b"not json"[..],
        b"",
        b"{}",
        b"[]",
        b"{\"keys\": {}}",
        b"\xff\xfe",
    ] {
        let err = Jwks::parse(garbage).unwrap_err();
        assert_eq!(err.reason(), "jwks_not_json", "{garbage:?}");
    }
    let many = json!({ "keys": vec![p256().jwk("k", None); MAX_KEYS + 1] });
    assert_eq!(
        Jwks::parse(many.to_string().as_bytes()).unwrap_err(),
        JwksError::TooManyKeys(MAX_KEYS + 1)
    );
    let hundred = json!({ "keys": vec![p256().jwk("k", None); MAX_KEYS] });
    assert_eq!(
        Jwks::parse(hundred.to_string().as_bytes()).unwrap().len(),
        MAX_KEYS
    );
    let mut big = jwks_json(&[p256().jwk("k", None)]);
    big.resize(MAX_JWKS_BYTES + 1, b' ');
    assert_eq!(Jwks::parse(&big).unwrap_err(), JwksError::TooLarge);
}

#[test]
fn claim_values_and_header_values() {
    let keys = jwks(&[ed25519().jwk("k", None)]);
    let mut claims = claims();
    claims["groups"] = json!(["dev", "ops", 3]);
    claims["level"] = json!(7);
    claims["admin"] = json!(true);
    claims["nested"] = json!({"a": "b"});
    claims["nothing"] = json!(null);
    claims["evil"] = json!("a\r\nx-injected: 1");
    let claims = check(&sign(ed25519(), "EdDSA", None, &claims), &keys, &[]).unwrap();

    assert_eq!(claims.values("sub"), ["alice"]);
    assert_eq!(claims.values("groups"), ["dev", "ops", "3"]);
    assert_eq!(claims.values("level"), ["7"]);
    assert_eq!(claims.values("admin"), ["true"]);
    assert!(claims.values("nested").is_empty());
    assert!(claims.values("nothing").is_empty());
    assert!(claims.values("absent").is_empty());

    assert_eq!(claims.header_value("sub").as_deref(), Some("alice"));
    assert_eq!(claims.header_value("groups").as_deref(), Some("dev,ops,3"));
    assert_eq!(claims.header_value("level").as_deref(), Some("7"));
    assert_eq!(claims.header_value("admin").as_deref(), Some("true"));
    assert_eq!(claims.header_value("nested"), None);
    assert_eq!(claims.header_value("nothing"), None);
    assert_eq!(claims.header_value("absent"), None);
    assert_eq!(claims.header_value("evil"), None, "no header injection");
}

#[test]
fn debug_output_does_not_carry_the_credential() {
    let token = sign(ed25519(), "EdDSA", Some("k"), &claims());
    let printed = format!("{:?}", decode(&token).unwrap());
    let (_, signature) = token.rsplit_once('.').unwrap();
    assert!(!printed.contains(signature), "{printed}");
    assert!(
        printed.contains("EdDsa") && printed.contains(ISSUER),
        "{printed}"
    );
}

#[test]
fn a_token_without_sub_has_no_principal() {
    let keys = jwks(&[ed25519().jwk("k", None)]);
    let mut claims = claims();
    claims.as_object_mut().unwrap().remove("sub");
    let claims = check(&sign(ed25519(), "EdDSA", None, &claims), &keys, &[]).unwrap();
    assert_eq!(claims.subject(), None);
    assert_eq!(claims.principal(), None);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_input_never_panics(token in ".{0,300}", set in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = Jwks::parse(&set);
        if let Ok(token) = decode(&token) {
            let keys = jwks(&[ed25519().jwk("k", None)]);
            let _ = verify(&token, &keys, &expect(&[]));
        }
    }

    #[test]
    fn signed_tokens_with_arbitrary_claims_never_panic(
        claims in prop::collection::btree_map(claim_name(), json_value(), 0..6),
        issued_by_us in any::<bool>(),
        audiences in prop::collection::vec("[a-c]", 0..3),
    ) {
        let keys = jwks(&[ed25519().jwk("k", None)]);
        let mut claims: serde_json::Map<String, Value> = claims.into_iter().collect();
        if issued_by_us {
            claims.insert("iss".to_owned(), json!(ISSUER));
        }
        let token = sign(ed25519(), "EdDSA", Some("k"), &Value::Object(claims));
        if let Ok(verified) = check(&token, &keys, &audiences) {
            prop_assert_eq!(verified.issuer(), ISSUER);
            for name in ["iss", "sub", "aud", "exp", "nbf", "groups", "absent"] {
                let _ = verified.values(name);
                if let Some(value) = verified.header_value(name) {
                    prop_assert!(http::HeaderValue::from_str(&value).is_ok());
                }
            }
        }
    }

    #[test]
    fn arbitrary_keys_never_panic(keys in prop::collection::vec(jwk(), 0..6)) {
        let set = json!({ "keys": keys.clone() }).to_string();
        if let Ok(parsed) = Jwks::parse(set.as_bytes()) {
            prop_assert!(!parsed.is_empty() && parsed.len() <= keys.len());
            let token = sign(p256(), "ES256", None, &claims());
            let _ = check(&token, &parsed, &[]);
        }
    }

    #[test]
    fn a_token_changed_in_one_character_never_verifies(at in any::<prop::sample::Index>(), with in "[A-Za-z0-9_.=-]") {
        let keys = jwks(&[ed25519().jwk("k", None)]);
        let token = sign(ed25519(), "EdDSA", Some("k"), &claims());
        let at = at.index(token.len());
        let mut changed = token.clone();
        changed.replace_range(at..=at, &with);
        prop_assume!(changed != token);
        prop_assert!(check(&changed, &keys, &[]).is_err());
    }
}

fn claim_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("iss".to_owned()),
        Just("sub".to_owned()),
        Just("aud".to_owned()),
        Just("exp".to_owned()),
        Just("nbf".to_owned()),
        Just("groups".to_owned()),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("JSON numbers are finite", |f| f.is_finite())
            .prop_map(Value::from),
        Just(Value::from(ISSUER)),
        Just(Value::from(NOW)),
        "[a-c]".prop_map(Value::from),
        "\\PC{0,8}|[\\x00-\\x1f]{1,3}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z]{1,3}", inner, 0..3)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A JWK-shaped object: the members weft reads, with plausible and implausible values.
fn jwk() -> impl Strategy<Value = Value> {
    let text = |choices: &'static [&'static str]| {
        prop_oneof![
            prop::sample::select(choices).prop_map(Value::from),
            json_value(),
        ]
    };
    // Short, all-zero and key-sized values as well as random ones: the edges of the
    // size checks (an empty or zero RSA modulus once underflowed the bit count).
    let binary = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..600).prop_map(|b| Value::from(b64e(&b))),
        prop::collection::vec(any::<u8>(), 0..4).prop_map(|b| Value::from(b64e(&b))),
        (0..300usize).prop_map(|n| Value::from(b64e(&vec![0; n]))),
        prop::sample::select(&[32usize, 48, 256, 257][..])
            .prop_map(|n| Value::from(b64e(&vec![0xa5; n]))),
        json_value(),
    ];
    (
        text(&["RSA", "EC", "OKP", "oct"]),
        text(&["P-256", "P-384", "Ed25519", "Ed448"]),
        text(&["RS256", "PS512", "ES256", "ES384", "EdDSA", "HS256"]),
        text(&["sig", "enc"]),
        text(&["k1", "k2"]),
        (binary.clone(), binary.clone(), binary.clone(), binary),
    )
        .prop_map(|(kty, crv, alg, use_, kid, (n, e, x, y))| {
            json!({"kty": kty, "crv": crv, "alg": alg, "use": use_, "kid": kid,
                   "n": n, "e": e, "x": x, "y": y})
        })
}

/// A test key of each kind weft verifies with.
pub(super) enum TestKey {
    Rsa(RsaKeyPair),
    Ec(EcdsaKeyPair, &'static str),
    Ed(Ed25519KeyPair),
}

impl TestKey {
    pub(super) fn jwk(&self, kid: &str, alg: Option<&str>) -> Value {
        let mut jwk = match self {
            TestKey::Rsa(key) => {
                let public = key.public_key();
                json!({
                    "kty": "RSA",
                    "n": b64e(public.modulus().big_endian_without_leading_zero()),
                    "e": b64e(public.exponent().big_endian_without_leading_zero()),
                })
            }
            TestKey::Ec(key, crv) => {
                let point = key.public_key().as_ref();
                let (x, y) = point[1..].split_at((point.len() - 1) / 2);
                json!({"kty": "EC", "crv": crv, "x": b64e(x), "y": b64e(y)})
            }
            TestKey::Ed(key) => {
                json!({"kty": "OKP", "crv": "Ed25519", "x": b64e(key.public_key().as_ref())})
            }
        };
        jwk["kid"] = json!(kid);
        jwk["use"] = json!("sig");
        if let Some(alg) = alg {
            jwk["alg"] = json!(alg);
        }
        jwk
    }

    fn sign(&self, alg: &str, message: &[u8]) -> Vec<u8> {
        match self {
            TestKey::Rsa(key) => {
                let padding: &'static dyn signature::RsaEncoding = match alg {
                    "RS256" => &signature::RSA_PKCS1_SHA256,
                    "RS384" => &signature::RSA_PKCS1_SHA384,
                    "RS512" => &signature::RSA_PKCS1_SHA512,
                    "PS256" => &signature::RSA_PSS_SHA256,
                    "PS384" => &signature::RSA_PSS_SHA384,
                    "PS512" => &signature::RSA_PSS_SHA512,
                    _ => panic!("not an RSA alg: {alg}"),
                };
                let mut sig = vec![0; key.public_modulus_len()];
                key.sign(padding, &SystemRandom::new(), message, &mut sig)
                    .unwrap();
                sig
            }
            TestKey::Ec(key, _) => key
                .sign(&SystemRandom::new(), message)
                .unwrap()
                .as_ref()
                .to_vec(),
            TestKey::Ed(key) => key.sign(message).as_ref().to_vec(),
        }
    }
}

pub(super) fn rsa() -> &'static TestKey {
    static KEY: OnceLock<TestKey> = OnceLock::new();
    KEY.get_or_init(|| TestKey::Rsa(RsaKeyPair::generate(KeySize::Rsa2048).unwrap()))
}

fn rsa_other() -> &'static TestKey {
    static KEY: OnceLock<TestKey> = OnceLock::new();
    KEY.get_or_init(|| TestKey::Rsa(RsaKeyPair::generate(KeySize::Rsa2048).unwrap()))
}

pub(super) fn p256() -> &'static TestKey {
    static KEY: OnceLock<TestKey> = OnceLock::new();
    KEY.get_or_init(|| {
        let key = EcdsaKeyPair::generate(&signature::ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
        TestKey::Ec(key, "P-256")
    })
}

fn p384() -> &'static TestKey {
    static KEY: OnceLock<TestKey> = OnceLock::new();
    KEY.get_or_init(|| {
        let key = EcdsaKeyPair::generate(&signature::ECDSA_P384_SHA384_FIXED_SIGNING).unwrap();
        TestKey::Ec(key, "P-384")
    })
}

fn ed25519() -> &'static TestKey {
    static KEY: OnceLock<TestKey> = OnceLock::new();
    KEY.get_or_init(|| TestKey::Ed(Ed25519KeyPair::generate().unwrap()))
}

fn claims() -> Value {
    json!({"iss": ISSUER, "sub": "alice", "exp": NOW + 3600, "iat": NOW})
}

pub(super) fn sign(key: &TestKey, alg: &str, kid: Option<&str>, claims: &Value) -> String {
    let mut header = json!({"alg": alg, "typ": "JWT"});
    if let Some(kid) = kid {
        header["kid"] = json!(kid);
    }
    let input = format!(
        "{}.{}",
        b64e(header.to_string().as_bytes()),
        b64e(claims.to_string().as_bytes())
    );
    let sig = key.sign(alg, input.as_bytes());
    format!("{input}.{}", b64e(&sig))
}

pub(super) fn jwks_json(keys: &[Value]) -> Vec<u8> {
    json!({ "keys": keys }).to_string().into_bytes()
}

fn jwks(keys: &[Value]) -> Jwks {
    Jwks::parse(&jwks_json(keys)).unwrap()
}

fn expect(audiences: &[String]) -> Expect<'_> {
    Expect {
        issuer: ISSUER,
        audiences,
        now: SystemTime::UNIX_EPOCH + Duration::from_secs(NOW),
    }
}

fn check(token: &str, keys: &Jwks, audiences: &[String]) -> Result<Claims, TokenError> {
    verify(&decode(token)?, keys, &expect(audiences))
}

fn b64e(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn b64d(text: &str) -> Vec<u8> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text)
        .unwrap()
}
