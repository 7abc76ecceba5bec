//! JWT end-user authentication (`weft::jwt`): what a client writes as a bearer token and
//! what an issuer's JWKS endpoint serves, as the waypoint reads them.
//!
//! Input: the token's text, a NUL byte, then the key set's JSON (inputs without a NUL are a
//! token alone, checked against an empty-handed key set). The committed seeds are real
//! tokens with the key sets that verify them at `NOW`, so mutations start from the paths
//! past the signature.
//!
//! Invariants besides "no panic": an accepted token is at most 8 KiB; an accepted key set
//! is not empty and holds at most 100 keys; verified claims carry exactly the expected
//! issuer, and their principal starts with it.

#![no_main]

use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use weft::jwt::{self, Expect, Jwks};

const ISSUER: &str = "https://issuer.example";
const NOW: u64 = 1_700_000_000;

fuzz_target!(|data: &[u8]| {
    let (token, set) = match data.iter().position(|b| *b == 0) {
        Some(nul) => (&data[..nul], Some(&data[nul + 1..])),
        None => (data, None),
    };
    let keys = set.and_then(|set| Jwks::parse(set).ok());
    if let Some(keys) = &keys {
        assert!(!keys.is_empty() && keys.len() <= 100, "{} keys", keys.len());
    }
    let Ok(token) = std::str::from_utf8(token) else {
        return;
    };
    let Ok(unverified) = jwt::decode(token) else {
        return;
    };
    assert!(token.len() <= 8 * 1024);
    let _ = unverified.issuer();
    let Some(keys) = keys else {
        return;
    };
    if let Some(kid) = unverified.kid() {
        let _ = keys.has_kid(kid);
    }
    for audiences in [&[][..], &["api".to_owned()][..]] {
        let expect = Expect {
            issuer: ISSUER,
            audiences,
            now: SystemTime::UNIX_EPOCH + Duration::from_secs(NOW),
        };
        if let Ok(claims) = jwt::verify(&unverified, &keys, &expect) {
            assert_eq!(claims.issuer(), ISSUER);
            if let Some(principal) = claims.principal() {
                assert!(principal.starts_with(ISSUER));
            }
            for name in ["sub", "aud", "groups", "exp"] {
                let _ = claims.values(name);
                let _ = claims.header_value(name);
            }
        }
    }
});
