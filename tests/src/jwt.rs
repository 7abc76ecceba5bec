//! A test issuer of JSON Web Tokens for the waypoint's end-user authentication tests:
//! signing keys of its own (RS256 with RSA 2048, ES256 with P-256), the JWKS that publishes
//! them, tokens minted with them (and broken on purpose: `alg: none`, a flipped signature
//! byte, a `kid` nobody published), and the HTTPS server that serves the JWKS to the
//! waypoint from a pod (`weft-testapp https-serve`, TLS 1.3, a certificate for the pod's
//! IP address signed by a CA of the test's own).
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! # let (jwks_pod, waypoint_pod): (weft_tests::TestPod, weft_tests::TestPod) = todo!();
//! use weft_tests::jwt::{self, Issuer, JwksServer, SigningKey};
//! let issuer = Issuer::new("https://issuer.weft.test");
//! let key = SigningKey::rsa("k1")?;
//! let server = JwksServer::start(&jwks_pod, 8443, &jwt::jwks(&[&key]))?;
//! assert!(server.fetch_from(&waypoint_pod)?.contains("\"k1\""));
//! let token = issuer.mint(&key, issuer.claims("alice", &["reviews"]))?;
//! // --jwks-ca-file server.ca_file(), jwksUri: server.url()
//! # Ok(()) }
//! ```
//!
//! The server prints `fetch {..}` (a [`ServedFile`]) per request it answered, so a test
//! counts the waypoint's JWKS fetches.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, anyhow};
use aws_lc_rs::{
    rand::SystemRandom,
    rsa::{self, KeySize},
    signature::{self, EcdsaKeyPair, KeyPair as _},
};
use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::{
    app::testapp_bin,
    eventually::assert_eventually,
    l7::parse_events,
    pod::TestPod,
    process::TestProcess,
    sys,
    tls::{self, San, TestCa},
};

/// Who mints the tokens: its `iss`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Issuer {
    pub iss: String,
}

/// A signing key with its `kid`.
pub struct SigningKey {
    kid: String,
    key: Key,
}

/// A CA of the test's own and a server certificate for one IP address that it signed:
/// PEM files in a temporary directory, removed on drop.
pub struct TlsFiles {
    /// The CA's certificate: what the waypoint trusts (`--jwks-ca-file`).
    pub ca: PathBuf,
    /// The server's certificate (its SAN is the IP address) and key.
    pub cert: PathBuf,
    pub key: PathBuf,
    dir: tempfile::TempDir,
}

/// A `weft-testapp https-serve` in a pod, serving a JWKS file over TLS 1.3.
pub struct JwksServer {
    pub process: TestProcess,
    addr: SocketAddr,
    file: PathBuf,
    tls: TlsFiles,
}

/// One request an `https-serve` answered (its `fetch {..}` line).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServedFile {
    /// 1 for the server's first request.
    pub seq: u64,
    pub peer: String,
    pub method: String,
    /// Path and query as requested.
    pub path: String,
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub version: String,
    /// The TLS version negotiated (`TLSv1_3`).
    pub tls: String,
    /// The server name the client asked for (SNI), if it sent one.
    #[serde(default)]
    pub sni: Option<String>,
    /// 200, or 500 when the file could not be read.
    pub status: u16,
    /// The body served (the file's content at that moment), its length and SHA-256.
    pub bytes: u64,
    pub sha256: String,
}

enum Key {
    Rsa(rsa::KeyPair),
    Ec(EcdsaKeyPair),
}

impl Issuer {
    pub fn new(iss: &str) -> Self {
        Self {
            iss: iss.to_owned(),
        }
    }

    /// The claims of a good token for `sub`: this issuer, the audiences (none: no `aud`),
    /// issued now, valid for an hour.
    pub fn claims(&self, sub: &str, audiences: &[&str]) -> Value {
        let now = unix_now();
        let mut claims = json!({
            "iss": self.iss, "sub": sub, "iat": now, "nbf": now, "exp": now + 3600,
        });
        match audiences {
            [] => {}
            [one] => claims["aud"] = json!(one),
            many => claims["aud"] = json!(many),
        }
        claims
    }

    /// A token with exactly these claims, signed by `key` (header `alg`, `typ`, `kid`).
    pub fn mint(&self, key: &SigningKey, claims: Value) -> Result<String> {
        self.mint_as(key, &key.kid, claims)
    }

    /// A token signed by `key` whose header names `kid` instead of the key's own: a key
    /// the JWKS does not have (`unknown_key`), or another key of it (`bad_signature`).
    pub fn mint_as(&self, key: &SigningKey, kid: &str, claims: Value) -> Result<String> {
        let header = json!({ "alg": key.alg(), "typ": "JWT", "kid": kid });
        let input = signing_input(&header, &claims);
        let signature = key.sign(input.as_bytes())?;
        Ok(format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature)))
    }

    /// An unsecured token (`alg: none`, empty signature, RFC 7519 section 6) naming `kid`.
    pub fn mint_unsigned(&self, kid: &str, claims: Value) -> String {
        let header = json!({ "alg": "none", "typ": "JWT", "kid": kid });
        format!("{}.", signing_input(&header, &claims))
    }
}

impl SigningKey {
    /// An RSA 2048 key for RS256.
    pub fn rsa(kid: &str) -> Result<Self> {
        let key = rsa::KeyPair::generate(KeySize::Rsa2048)
            .map_err(|_| anyhow!("generate an RSA 2048 key"))?;
        Ok(Self {
            kid: kid.to_owned(),
            key: Key::Rsa(key),
        })
    }

    /// A P-256 key for ES256.
    pub fn ec(kid: &str) -> Result<Self> {
        let key = EcdsaKeyPair::generate(&signature::ECDSA_P256_SHA256_FIXED_SIGNING)
            .map_err(|_| anyhow!("generate a P-256 key"))?;
        Ok(Self {
            kid: kid.to_owned(),
            key: Key::Ec(key),
        })
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// `RS256` or `ES256`.
    pub fn alg(&self) -> &'static str {
        match self.key {
            Key::Rsa(_) => "RS256",
            Key::Ec(_) => "ES256",
        }
    }

    /// The public key as a JWK (RFC 7517, 7518 section 6): `kid`, `kty`, `alg`, `use`, and
    /// `n`/`e` or `crv`/`x`/`y`, base64url without padding.
    pub fn jwk(&self) -> Value {
        match &self.key {
            Key::Rsa(key) => {
                let public = key.public_key();
                json!({
                    "kid": self.kid, "kty": "RSA", "alg": "RS256", "use": "sig",
                    "n": b64(public.modulus().big_endian_without_leading_zero()),
                    "e": b64(public.exponent().big_endian_without_leading_zero()),
                })
            }
            Key::Ec(key) => {
                // The uncompressed point: 0x04 || x || y, 32 bytes each for P-256.
                let point = key.public_key().as_ref();
                let (x, y) = point.get(1..).unwrap_or_default().split_at(point.len() / 2);
                json!({
                    "kid": self.kid, "kty": "EC", "alg": "ES256", "use": "sig",
                    "crv": "P-256", "x": b64(x), "y": b64(y),
                })
            }
        }
    }

    fn sign(&self, message: &[u8]) -> Result<Vec<u8>> {
        let rng = SystemRandom::new();
        match &self.key {
            Key::Rsa(key) => {
                let mut signature = vec![0; key.public_modulus_len()];
                key.sign(&signature::RSA_PKCS1_SHA256, &rng, message, &mut signature)
                    .map_err(|_| anyhow!("RS256 signing failed"))?;
                Ok(signature)
            }
            // FIXED: r || s, 32 bytes each, as JWS wants (RFC 7518 section 3.4), not DER.
            Key::Ec(key) => Ok(key
                .sign(&rng, message)
                .map_err(|_| anyhow!("ES256 signing failed"))?
                .as_ref()
                .to_vec()),
        }
    }
}

/// The JWK Set publishing these keys' public halves.
pub fn jwks(keys: &[&SigningKey]) -> Value {
    json!({ "keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>() })
}

/// `token` with one byte of its signature changed: well-formed, but it does not verify.
pub fn flip_signature_byte(token: &str) -> Result<String> {
    let (input, signature) = token.rsplit_once('.').context("a token has three parts")?;
    let mut signature = URL_SAFE_NO_PAD
        .decode(signature)
        .context("the signature is base64url")?;
    let middle = signature.len() / 2;
    let byte = signature.get_mut(middle).context("an empty signature")?;
    *byte ^= 0x01;
    Ok(format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature)))
}

/// Seconds since the Unix epoch (for `iat`, `nbf`, `exp`).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl TlsFiles {
    /// A fresh CA and a certificate for `ip` signed by it (ECDSA P-256, valid a day around
    /// now, server auth).
    pub fn for_ip(ip: IpAddr) -> Result<Self> {
        Self::for_san(&San::Ip(ip))
    }

    /// A CA and a server certificate for `san` (an IP address or a DNS name).
    pub fn for_san(san: &San) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("weft-jwks-tls-")
            .tempdir()
            .context("create a temp dir for the JWKS server's certificates")?;
        let ca = TestCa::new("weft test JWKS CA")?;
        let server = ca.write_server(dir.path(), "server", san)?;
        let files = TlsFiles {
            ca: dir.path().join("ca.pem"),
            cert: server.cert,
            key: server.key,
            dir,
        };
        ca.write_pem(&files.ca)?;
        Ok(files)
    }

    /// The directory holding the PEM files (removed on drop).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl JwksServer {
    /// Serves `jwks` at `https://<pod ip>:<port>/jwks.json` (any path, really) from `pod`,
    /// with a fresh CA and certificate, and waits until it listens.
    pub fn start(pod: &TestPod, port: u16, jwks: &Value) -> Result<Self> {
        Self::start_as(pod, port, jwks, &San::Ip(IpAddr::V4(pod.ip())))
    }

    /// `start`, with a certificate for `san` (a host name its clients ask for by SNI).
    pub fn start_as(pod: &TestPod, port: u16, jwks: &Value, san: &San) -> Result<Self> {
        let tls = TlsFiles::for_san(san)?;
        let file = tls.dir().join("jwks.json");
        write_json(&file, jwks)?;
        let mut cmd = Command::new(testapp_bin());
        cmd.args(["https-serve", "--port", &port.to_string()])
            .arg("--cert")
            .arg(&tls.cert)
            .arg("--key")
            .arg(&tls.key)
            .arg("--file")
            .arg(&file);
        let process = pod.spawn(cmd, &format!("https-serve-{port}"))?;
        assert_eventually(Duration::from_secs(10), || {
            if process.lines_starting("listening").is_empty() {
                Err(format!("not listening yet: {:?}", process.output()))
            } else {
                Ok(())
            }
        });
        Ok(JwksServer {
            process,
            addr: SocketAddr::new(IpAddr::V4(pod.ip()), port),
            file,
            tls,
        })
    }

    /// `https://<ip>:<port>/jwks.json`: the policy's `jwksUri`.
    pub fn url(&self) -> String {
        format!("https://{}{JWKS_PATH}", self.addr)
    }

    /// The server's certificate, PEM.
    pub fn certificate_pem(&self) -> Result<String> {
        std::fs::read_to_string(&self.tls.cert).context("read the server's certificate")
    }

    /// The CA that signed the server's certificate: the waypoint's `--jwks-ca-file`.
    pub fn ca_file(&self) -> &Path {
        &self.tls.ca
    }

    /// Serves `jwks` from the next request on (a key rotation).
    pub fn set(&self, jwks: &Value) -> Result<()> {
        write_json(&self.file, jwks)
    }

    /// Every request answered so far, in order.
    pub fn served(&self) -> Vec<ServedFile> {
        parse_events(&self.process.output(), "fetch")
    }

    /// Requests for the JWKS path (the waypoint's fetches; [`JwksServer::fetch_from`] asks
    /// for another path, so it is not counted here).
    pub fn fetches(&self) -> usize {
        self.served().iter().filter(|f| f.path == JWKS_PATH).count()
    }

    /// GETs the file over TLS 1.3 from inside `pod`'s network namespace, trusting only the
    /// test's CA and checking the certificate against the IP address: what the waypoint
    /// will do, minus the waypoint. Returns the body.
    pub fn fetch_from(&self, pod: &TestPod) -> Result<String> {
        let ca = std::fs::read(&self.tls.ca)?;
        let addr = self.addr;
        let body = sys::in_netns(&pod.netns_path(), move || https_get(&ca, addr, PROBE_PATH))?;
        Ok(body)
    }
}

/// A blocking HTTPS/1.1 GET trusting only `ca_pem`, checking the certificate against
/// `addr`'s IP address (see [`crate::tls::https_get`]).
pub fn https_get(ca_pem: &[u8], addr: SocketAddr, path: &str) -> Result<String> {
    tls::https_get(ca_pem, addr, None, path)
}

fn signing_input(header: &Value, claims: &Value) -> String {
    format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    )
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Written whole then renamed, so the server never serves half a file.
fn write_json(path: &Path, value: &Value) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    write(&tmp, &value.to_string())?;
    std::fs::rename(&tmp, path).with_context(|| format!("rename to {}", path.display()))
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("write {}", path.display()))
}

/// Where the waypoint is told the JWKS is.
pub const JWKS_PATH: &str = "/jwks.json";
/// What [`JwksServer::fetch_from`] asks for (not counted as a fetch of the waypoint's).
const PROBE_PATH: &str = "/probe";

#[cfg(test)]
mod tests {
    use aws_lc_rs::signature::{RsaPublicKeyComponents, UnparsedPublicKey};

    use super::*;

    fn decode(part: &str) -> Vec<u8> {
        URL_SAFE_NO_PAD.decode(part).expect("base64url")
    }

    fn parts(token: &str) -> (Value, Value, String, Vec<u8>) {
        let mut it = token.split('.');
        let (h, c, s) = (it.next().unwrap(), it.next().unwrap(), it.next().unwrap());
        assert!(it.next().is_none(), "three parts: {token}");
        (
            serde_json::from_slice(&decode(h)).unwrap(),
            serde_json::from_slice(&decode(c)).unwrap(),
            format!("{h}.{c}"),
            decode(s),
        )
    }

    #[test]
    fn the_jwks_publishes_each_key_with_its_fields() {
        let (rsa, ec) = (
            SigningKey::rsa("r1").unwrap(),
            SigningKey::ec("e1").unwrap(),
        );
        let text = jwks(&[&rsa, &ec]).to_string();
        let set: Value = serde_json::from_str(&text).unwrap();
        let keys = set["keys"].as_array().unwrap();
        assert_eq!(keys.len(), 2);
        let (r, e) = (&keys[0], &keys[1]);
        let fields = |key: &Value, names: &[&str]| -> Vec<String> {
            names
                .iter()
                .map(|n| key[*n].as_str().unwrap_or_default().to_owned())
                .collect()
        };
        let common = ["kid", "kty", "alg", "use"];
        assert_eq!(fields(r, &common), ["r1", "RSA", "RS256", "sig"]);
        assert_eq!(fields(e, &common), ["e1", "EC", "ES256", "sig"]);
        assert_eq!(e["crv"], "P-256");
        let n = decode(r["n"].as_str().unwrap());
        assert_eq!(n.len(), 256, "a 2048-bit modulus");
        assert_eq!(decode(r["e"].as_str().unwrap()), [0x01, 0x00, 0x01]);
        assert_eq!(decode(e["x"].as_str().unwrap()).len(), 32);
        assert_eq!(decode(e["y"].as_str().unwrap()).len(), 32);
        assert!(!text.contains('='), "no padding: {text}");
    }

    #[test]
    fn an_rs256_token_verifies_against_its_jwk() {
        let issuer = Issuer::new("https://issuer.weft.test");
        let key = SigningKey::rsa("r1").unwrap();
        let token = issuer
            .mint(&key, issuer.claims("alice", &["reviews"]))
            .unwrap();
        let (header, claims, input, signature) = parts(&token);
        assert_eq!(header, json!({ "alg": "RS256", "typ": "JWT", "kid": "r1" }));
        assert_eq!(claims["iss"], "https://issuer.weft.test");
        assert_eq!(
            (claims["sub"].as_str(), claims["aud"].as_str()),
            (Some("alice"), Some("reviews"))
        );
        assert!(claims["exp"].as_u64().unwrap() > unix_now());
        let jwk = key.jwk();
        let public = RsaPublicKeyComponents {
            n: decode(jwk["n"].as_str().unwrap()),
            e: decode(jwk["e"].as_str().unwrap()),
        };
        public
            .verify(
                &signature::RSA_PKCS1_2048_8192_SHA256,
                input.as_bytes(),
                &signature,
            )
            .expect("the signature verifies with the published key");
        let flipped = parts(&flip_signature_byte(&token).unwrap()).3;
        assert_ne!(flipped, signature);
        assert!(
            public
                .verify(
                    &signature::RSA_PKCS1_2048_8192_SHA256,
                    input.as_bytes(),
                    &flipped
                )
                .is_err(),
            "a flipped byte does not verify"
        );
    }

    #[test]
    fn an_es256_token_verifies_against_its_jwk() {
        let issuer = Issuer::new("https://issuer.weft.test");
        let key = SigningKey::ec("e1").unwrap();
        let token = issuer.mint(&key, issuer.claims("bob", &[])).unwrap();
        let (header, claims, input, signature) = parts(&token);
        assert_eq!(header["alg"], "ES256");
        assert!(claims.get("aud").is_none(), "no audiences, no aud");
        assert_eq!(signature.len(), 64, "r || s");
        let jwk = key.jwk();
        let point = [
            vec![0x04],
            decode(jwk["x"].as_str().unwrap()),
            decode(jwk["y"].as_str().unwrap()),
        ]
        .concat();
        UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
            .verify(input.as_bytes(), &signature)
            .expect("the signature verifies with the published key");
    }

    #[test]
    fn broken_tokens_are_broken_as_named() {
        let issuer = Issuer::new("https://issuer.weft.test");
        let key = SigningKey::ec("e1").unwrap();
        let claims = issuer.claims("mallory", &["reviews"]);
        let unsigned = issuer.mint_unsigned("e1", claims.clone());
        assert!(unsigned.ends_with('.'), "an empty signature: {unsigned}");
        let (header, _, _, signature) = parts(&unsigned);
        assert_eq!(header["alg"], "none");
        assert!(signature.is_empty());
        let other = issuer.mint_as(&key, "nobody", claims).unwrap();
        assert_eq!(parts(&other).0["kid"], "nobody");
        assert_eq!(
            issuer.claims("a", &["x", "y"])["aud"],
            json!(["x", "y"]),
            "several audiences are an array"
        );
    }

    #[test]
    fn the_tls_files_are_a_ca_and_a_certificate_for_the_ip() {
        let tls = TlsFiles::for_ip("10.1.2.3".parse().unwrap()).unwrap();
        let ca = std::fs::read_to_string(&tls.ca).unwrap();
        let cert = std::fs::read_to_string(&tls.cert).unwrap();
        let key = std::fs::read_to_string(&tls.key).unwrap();
        assert!(ca.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(key.contains("PRIVATE KEY-----"));
        assert_ne!(ca, cert);
    }
}
