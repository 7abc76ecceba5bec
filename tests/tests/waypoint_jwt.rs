//! End-user authentication at the waypoint (issue "Resilience and end-user auth at the
//! waypoint", items 7 and 8): a `TrafficPolicy` with `requestAuthentication` on the Service
//! `reviews` makes the waypoint verify the JWT a request carries against its issuer's JWKS,
//! and access policies match the request's principal (`<iss>/<sub>`) and claims.
//!
//! Node 1: the client, the waypoint, and the issuer's JWKS endpoint (`weft-testapp
//! https-serve`, TLS 1.3, in a pod outside the mesh as an identity provider would be: the
//! waypoint fetches from it directly, trusting the test's CA through `--jwks-ca-file`).
//! Node 2: the backend `reviews`. Tokens are minted by the test with keys of its own
//! (`weft_tests::jwt`). What the client received, what the backend saw (and did not), what
//! the JWKS server served and what the waypoint counted are asserted.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, ensure};
use serde_json::{Value, json};
use weft_tests::{
    Service, TestAgent, TestNode, TestPod, TestWaypoint, eventually,
    jwt::{self, Issuer, JwksServer, SigningKey},
    l7::{self, HttpLoad, HttpLoadReport, HttpServe, HttpServer, SampleResponse},
    privileged, test_name, waypoint,
};

/// Node 1: the client, the waypoint and the JWKS server. Node 2: the backend `reviews`.
/// Fields drop in order: processes first, then agents, then the nodes.
struct Mesh {
    waypoint: TestWaypoint,
    backend: HttpServer,
    jwks: JwksServer,
    _agents: [TestAgent; 2],
    client: TestPod,
    _pods: Vec<TestPod>,
    node1: TestNode,
    _node2: TestNode,
    issuer: Issuer,
    /// Published in the JWKS the server starts with.
    rsa: SigningKey,
    ec: SigningKey,
}

impl Mesh {
    fn new(test: &str) -> Result<Self> {
        let issuer = Issuer::new(ISSUER);
        let (rsa, ec) = (SigningKey::rsa("rsa-1")?, SigningKey::ec("ec-1")?);
        let node1 = TestNode::new(test, 1)?;
        let node2 = TestNode::new(test, 2)?;
        node1.connect(&node2)?;
        let client = node1.pod("client").service_account("client").create()?;
        let wp_pod = TestWaypoint::pod(&node1, WAYPOINT)?;
        // Outside the mesh, like the collector of tests/waypoint.rs: the waypoint (not
        // enrolled either) reaches it directly, as it would an identity provider.
        let idp = node1.pod("idp").enrolled(false).create()?;
        let reviews = node2
            .pod("reviews")
            .service_account("reviews")
            .label("app", "reviews")
            .create()?;
        for node in [&node1, &node2] {
            node.add_service(Service {
                name: "reviews".into(),
                namespace: "default".into(),
                vips: vec![VIP],
                ports: vec![(PORT, APP_PORT)],
                endpoints: vec![reviews.ip()],
                waypoint: Some(WAYPOINT.into()),
            });
            node.set_waypoints(json!([{
                "name": WAYPOINT, "serviceAccount": WAYPOINT, "ips": [wp_pod.ip().to_string()],
            }]));
        }
        let agents = [node1.start_agent()?, node2.start_agent()?];
        let backend = l7::http_serve(&reviews, &HttpServe::new(APP_PORT, "reviews"))?;
        let jwks = JwksServer::start(&idp, JWKS_PORT, &jwt::jwks(&[&rsa, &ec]))?;
        // The harness's own check, before the waypoint is involved: the waypoint's pod
        // reaches the JWKS over TLS 1.3 with the test's CA and the certificate's IP SAN.
        let fetched = jwks
            .fetch_from(&wp_pod)
            .context("the JWKS server answers the waypoint's pod")?;
        ensure!(fetched.contains("\"rsa-1\""), "the JWKS: {fetched}");
        let ca = jwks.ca_file().display().to_string();
        let waypoint = TestWaypoint::start_with_args(
            &node1,
            &wp_pod,
            WAYPOINT,
            routes(),
            &["--jwks-ca-file", &ca],
        )
        .context("start the waypoint with --jwks-ca-file (JWT authentication, issue 18 item 7)")?;
        Ok(Mesh {
            waypoint,
            backend,
            jwks,
            _agents: agents,
            client,
            _pods: vec![wp_pod, idp, reviews],
            node1,
            _node2: node2,
            issuer,
            rsa,
            ec,
        })
    }

    /// Puts `rule` (one JWT rule) on `reviews` and `access` as the access policies, and
    /// waits until the waypoint's config dump shows every string of `shows`.
    fn apply(&self, rule: Value, access: Value, shows: &[&str]) -> Result<()> {
        let authn = json!({
            "apiVersion": "weft.dev/v1alpha1", "kind": "TrafficPolicy",
            "metadata": { "name": "reviews-jwt", "namespace": "default" },
            "spec": {
                "targetRefs": [{ "group": "", "kind": "Service", "name": "reviews" }],
                "requestAuthentication": { "jwtRules": [rule] },
            },
        });
        let sections = json!({
            "routes": routes(), "trafficPolicies": [authn], "policies": access,
        });
        self.waypoint.write_sections(&self.node1, sections)?;
        let applied = eventually(Duration::from_secs(10), || {
            let dump = self.waypoint.config_dump()?.to_string();
            match shows.iter().find(|s| !dump.contains(**s)) {
                None => Ok(()),
                Some(missing) => Err(anyhow!("no {missing:?} in the config dump")),
            }
        });
        applied.map_err(|e| {
            let log = self.waypoint.log();
            let rejections: Vec<_> = log.lines().filter(|l| l.contains("rejected")).collect();
            anyhow!(
                "the waypoint did not take requestAuthentication / requestPrincipals (JWT \
                 authentication, issue 18 items 7 and 8): {e:#}; its rejections: {:?}",
                rejections.last()
            )
        })
    }

    /// One GET of `path` with these headers; the response.
    fn get(&self, path: &str, headers: &[(&str, &str)]) -> Result<SampleResponse> {
        let report = self.load(path, headers, 1)?;
        report.first.context("a response")
    }

    /// One GET of `path` with `authorization: <bearer>`, which must get `want`.
    fn expect(&self, path: &str, bearer: &str, want: u16) -> Result<SampleResponse> {
        let r = self.get(path, &[("authorization", bearer)])?;
        ensure!(
            r.status == want,
            "{path}: {want} expected, not {}: {r:?}",
            r.status
        );
        Ok(r)
    }

    /// `count` GETs of `path` with these headers, one after another.
    fn load(&self, path: &str, headers: &[(&str, &str)], count: u64) -> Result<HttpLoadReport> {
        let mut load = HttpLoad::new(vip(), count).path(path);
        for (name, value) in headers {
            load = load.header(name, value);
        }
        let report = load.run(&self.client)?;
        ensure!(
            report.failed() == 0,
            "every request got a response: {report:?}"
        );
        Ok(report)
    }

    /// A good token of the issuer for `sub` in group `group`, signed by `key`.
    fn token(&self, key: &SigningKey, sub: &str, group: &str) -> Result<String> {
        let mut claims = self.issuer.claims(sub, &["reviews"]);
        claims["group"] = json!(group);
        self.issuer.mint(key, claims)
    }

    /// The requests the backend answered whose path starts with `prefix`.
    fn reached(&self, prefix: &str) -> Vec<l7::ServedRequest> {
        let mut all = self.backend.requests();
        all.retain(|r| r.path.starts_with(prefix));
        all
    }

    fn failures(&self, reason: &str) -> Result<f64> {
        self.waypoint.metric(
            "weft_waypoint_authn_failures_total",
            &[
                ("destination_service_name", "reviews"),
                ("destination_service_namespace", "default"),
                ("reason", reason),
            ],
        )
    }
}

#[test]
fn valid_rs256_and_es256_tokens_pass_without_the_token_and_with_the_claim_header() -> Result<()> {
    privileged!();
    let mesh = Mesh::new(test_name!())?;
    mesh.apply(rule(&mesh.jwks), json!([]), &["reviews-jwt", ISSUER])?;

    for key in [&mesh.rsa, &mesh.ec] {
        let token = mesh.token(key, "alice", "admins")?;
        let path = format!("/valid/{}", key.alg());
        let r = mesh.get(&path, &[("authorization", &bearer(&token))])?;
        ensure!(r.status == 200, "a valid {} token passes: {r:?}", key.alg());
        let seen = r.echo().context("the backend's echo")?;
        ensure!(
            seen.header("authorization").is_none(),
            "forwardOriginalToken false: the token is not forwarded: {seen:?}"
        );
        ensure!(
            seen.header("x-jwt-group") == Some("admins"),
            "claim `group` copied to x-jwt-group: {seen:?}"
        );
    }
    // The JWKS came from the server, over TLS 1.3.
    let fetched = mesh.jwks.served();
    ensure!(
        mesh.jwks.fetches() >= 1
            && fetched
                .iter()
                .filter(|f| f.path == jwt::JWKS_PATH)
                .all(|f| f.tls == "TLSv1_3" && f.status == 200),
        "the waypoint fetched the JWKS: {fetched:?}"
    );

    // From the query parameter too.
    let token = mesh.token(&mesh.rsa, "alice", "admins")?;
    let r = mesh.get(&format!("/query?access_token={token}"), &[])?;
    ensure!(
        r.status == 200,
        "a valid token in access_token passes: {r:?}"
    );
    let seen = r.echo().context("the backend's echo")?;
    ensure!(seen.header("x-jwt-group") == Some("admins"), "{seen:?}");

    // No token: passes unauthenticated (no policy asks for a principal) ...
    let r = mesh.get("/anonymous", &[])?;
    ensure!(r.status == 200, "no token passes: {r:?}");
    // ... and a claim header the client wrote itself does not reach the backend as if
    // the waypoint had vouched for it, with a token or without.
    let r = mesh.get("/spoofed", &[("x-jwt-group", "admins")])?;
    ensure!(r.status == 200, "{r:?}");
    let seen = r.echo().context("the backend's echo")?;
    ensure!(
        seen.headers
            .get("x-jwt-group")
            .is_none_or(|v| !v.iter().any(|v| v == "admins")),
        "the spoofed x-jwt-group is not forwarded: {seen:?}"
    );
    let token = mesh.token(&mesh.ec, "bob", "users")?;
    let r = mesh.get(
        "/spoofed",
        &[
            ("authorization", &bearer(&token)),
            ("x-jwt-group", "admins"),
        ],
    )?;
    let seen = r.echo().context("the backend's echo")?;
    ensure!(
        r.status == 200 && seen.headers.get("x-jwt-group") == Some(&vec!["users".to_owned()]),
        "only the token's claim reaches the backend: {seen:?}"
    );
    Ok(())
}

#[test]
fn invalid_tokens_get_401_with_www_authenticate_never_reach_the_backend_and_are_counted()
-> Result<()> {
    privileged!();
    let mesh = Mesh::new(test_name!())?;
    mesh.apply(rule(&mesh.jwks), json!([]), &["reviews-jwt", ISSUER])?;
    let issuer = &mesh.issuer;
    let now = jwt::unix_now();
    let with = |changes: Value| {
        let mut claims = issuer.claims("mallory", &["reviews"]);
        if let (Some(claims), Some(changes)) = (claims.as_object_mut(), changes.as_object()) {
            claims.extend(changes.clone());
        }
        claims
    };
    let expired = json!({ "iat": now - 3600, "nbf": now - 3600, "exp": now - 120 });
    let good = mesh.issuer.mint(&mesh.rsa, with(json!({})))?;
    let cases = [
        ("expired", issuer.mint(&mesh.rsa, with(expired))?),
        (
            "wrong_issuer",
            issuer.mint(&mesh.rsa, with(json!({ "iss": "https://evil.weft.test" })))?,
        ),
        (
            "wrong_audience",
            issuer.mint(&mesh.ec, with(json!({ "aud": "ratings" })))?,
        ),
        ("bad_signature", jwt::flip_signature_byte(&good)?),
        (
            "unsupported_algorithm",
            issuer.mint_unsigned(mesh.rsa.kid(), with(json!({}))),
        ),
        (
            "unknown_key",
            issuer.mint_as(&mesh.rsa, "rsa-unpublished", with(json!({})))?,
        ),
        ("malformed", "not.a-jwt".to_owned()),
    ];
    for (reason, token) in &cases {
        let r = mesh.load(
            &format!("/bad/{reason}"),
            &[("authorization", &bearer(token))],
            3,
        )?;
        ensure!(r.status(401) == 3, "{reason}: 401: {r:?}");
        let answer = r.first.as_ref().context("a response")?;
        let challenge = answer.header("www-authenticate").unwrap_or_default();
        ensure!(
            challenge.starts_with("Bearer"),
            "{reason}: a Bearer challenge: {answer:?}"
        );
    }
    // In the query parameter, too.
    let (_, expired_token) = &cases[0];
    let r = mesh.get(&format!("/bad/query?access_token={expired_token}"), &[])?;
    ensure!(r.status == 401, "an expired token in access_token: {r:?}");

    let reached = mesh.reached("/bad/");
    ensure!(
        reached.is_empty(),
        "no refused request reached the backend: {reached:?}"
    );
    for (reason, _) in &cases {
        let want = if *reason == "expired" { 4.0 } else { 3.0 };
        let counted = eventually(Duration::from_secs(5), || {
            let n = mesh.failures(reason)?;
            if n == want {
                Ok(n)
            } else {
                Err(anyhow!("{reason}: {n} counted, not {want}"))
            }
        });
        counted
            .with_context(|| format!("weft_waypoint_authn_failures_total{{reason={reason}}}"))?;
    }

    // The skew: expired 20 s ago is within the waypoint's 60 s.
    let lately = json!({ "iat": now - 3600, "nbf": now - 3600, "exp": now - 20 });
    let r = mesh.get(
        "/skew",
        &[(
            "authorization",
            &bearer(&issuer.mint(&mesh.rsa, with(lately))?),
        )],
    )?;
    ensure!(r.status == 200, "within the 60 s skew: {r:?}");
    Ok(())
}

#[test]
fn a_principal_or_claim_allow_lets_its_subject_through_and_refuses_others_with_403() -> Result<()> {
    privileged!();
    let mesh = Mesh::new(test_name!())?;
    // The JWKS inline this time: the waypoint has nothing to fetch.
    let inline = json!({
        "issuer": ISSUER,
        "audiences": ["reviews"],
        "jwks": jwt::jwks(&[&mesh.rsa, &mesh.ec]).to_string(),
    });
    let allow = |name: &str, rule: Value| {
        json!([{
            "name": name,
            "selector": { "matchLabels": { "app": "reviews" } },
            "action": "ALLOW",
            "rules": [rule],
        }])
    };
    let alice = bearer(&mesh.token(&mesh.rsa, "alice", "users")?);
    let bob = bearer(&mesh.token(&mesh.ec, "bob", "admins")?);

    // Each ALLOW in turn, and what alice (group users), bob (group admins) and a request
    // without a token get.
    let cases = [
        (
            "only-alice",
            json!({ "requestPrincipals": [format!("{ISSUER}/alice")] }),
            [200, 403, 403],
        ),
        (
            "only-admins",
            json!({ "claims": { "group": ["admins", "operators"] } }),
            [403, 200, 403],
        ),
        (
            "any-subject",
            json!({ "requestPrincipals": [format!("{ISSUER}/*")] }),
            [200, 200, 403],
        ),
    ];
    for (name, rule, want) in cases {
        mesh.apply(inline.clone(), allow(name, rule), &["reviews-jwt", name])?;
        let callers = [("alice", Some(&alice)), ("bob", Some(&bob)), ("none", None)];
        let mut got = [0; 3];
        for (i, (who, token)) in callers.iter().enumerate() {
            let headers = token.map(|t| ("authorization", t.as_str()));
            got[i] = mesh
                .get(&format!("/{name}/{who}"), headers.as_slice())?
                .status;
            let reached = mesh.reached(&format!("/{name}/{who}"));
            ensure!(
                reached.len() == usize::from(got[i] == 200),
                "{name}: only what passed reached the backend: {reached:?}"
            );
        }
        ensure!(
            got == want,
            "{name}: alice, bob, no token: {got:?}, not {want:?}"
        );
    }
    ensure!(
        mesh.jwks.fetches() == 0,
        "an inline JWKS is not fetched: {:?}",
        mesh.jwks.served()
    );
    Ok(())
}

#[test]
fn a_rotated_jwks_is_picked_up_and_the_retired_key_is_refused_after_the_refresh() -> Result<()> {
    privileged!();
    let mesh = Mesh::new(test_name!())?;
    let mut fast = rule(&mesh.jwks);
    fast["jwksRefreshInterval"] = json!("1s");
    mesh.apply(fast, json!([]), &["reviews-jwt", ISSUER])?;
    let old = bearer(&mesh.token(&mesh.rsa, "alice", "users")?);
    mesh.expect("/before", &old, 200)?;

    // Rotation: the set now has a new key under a new kid, and the old one is gone.
    let new_key = SigningKey::ec("ec-2")?;
    mesh.jwks.set(&jwt::jwks(&[&new_key]))?;
    let new = bearer(&mesh.token(&new_key, "alice", "users")?);
    let started = Instant::now();
    eventually(Duration::from_secs(15), || {
        mesh.expect("/rotated/new", &new, 200)
    })
    .context("the new key is picked up")?;
    println!(
        "the new key's token passed {:?} after the rotation",
        started.elapsed()
    );
    eventually(Duration::from_secs(15), || {
        mesh.expect("/rotated/old", &old, 401)
    })
    .context("the retired key is refused once the set is refreshed")?;
    ensure!(
        mesh.jwks.fetches() >= 2,
        "fetched before and after the rotation: {:?}",
        mesh.jwks.served()
    );
    Ok(())
}

#[test]
fn a_burst_of_unknown_kids_does_not_hammer_the_jwks_server() -> Result<()> {
    privileged!();
    let mesh = Mesh::new(test_name!())?;
    mesh.apply(rule(&mesh.jwks), json!([]), &["reviews-jwt", ISSUER])?;
    mesh.expect(
        "/warm",
        &bearer(&mesh.token(&mesh.rsa, "alice", "users")?),
        200,
    )?;
    let before = mesh.jwks.fetches();
    ensure!(
        before >= 1,
        "the JWKS was fetched: {:?}",
        mesh.jwks.served()
    );

    // 50 tokens, each naming a kid nobody published: each may ask for a refetch, the
    // waypoint refetches at most every 5 s.
    let pid = std::process::id();
    let started = Instant::now();
    let loads = (0..BURST)
        .map(|i| {
            let kid = format!("unknown-{pid}-{i}");
            let claims = mesh.issuer.claims("mallory", &["reviews"]);
            let token = mesh.issuer.mint_as(&mesh.rsa, &kid, claims)?;
            HttpLoad::new(vip(), 1)
                .path("/burst")
                .header("authorization", &bearer(&token))
                .start(&mesh.client)
        })
        .collect::<Result<Vec<_>>>()?;
    let mut refused = 0;
    for load in loads {
        refused += load.finish()?.status(401);
    }
    let took = started.elapsed();
    ensure!(
        refused == BURST,
        "every unknown kid got 401: {refused} of {BURST}"
    );
    ensure!(
        mesh.reached("/burst").is_empty(),
        "none reached the backend"
    );
    // One refetch per started 5 s of the burst, plus one for a window already open.
    let extra = mesh.jwks.fetches() - before;
    let allowed = 1 + took.as_secs().div_ceil(5) as usize;
    println!("{BURST} unknown kids in {took:?}: {extra} extra JWKS fetches (allowed {allowed})");
    ensure!(
        extra <= allowed,
        "{extra} refetches for {BURST} unknown kids in {took:?}: {:?}",
        mesh.jwks.served()
    );
    let counted = mesh.failures("unknown_key")?;
    ensure!(
        counted == BURST as f64,
        "{counted} unknown_key failures counted"
    );
    Ok(())
}

/// The JWT rule the tests start from: the issuer's JWKS over HTTPS, audience `reviews`,
/// the token from `authorization: Bearer` or `?access_token=`, not forwarded, and claim
/// `group` copied to `x-jwt-group`.
fn rule(jwks: &JwksServer) -> Value {
    json!({
        "issuer": ISSUER,
        "audiences": ["reviews"],
        "jwksUri": jwks.url(),
        "jwksTimeout": "5s",
        "fromHeaders": [{ "name": "authorization", "prefix": "Bearer " }],
        "fromParams": ["access_token"],
        "forwardOriginalToken": false,
        "outputClaimToHeaders": [{ "header": "x-jwt-group", "claim": "group" }],
    })
}

fn routes() -> Value {
    let to_reviews = json!([{ "backendRefs": [{ "name": "reviews", "port": PORT }] }]);
    json!([waypoint::route(
        "HTTPRoute",
        "reviews",
        "reviews",
        PORT,
        to_reviews
    )])
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

fn vip() -> SocketAddr {
    SocketAddr::from((VIP, PORT))
}

const ISSUER: &str = "https://issuer.weft.test";
const WAYPOINT: &str = "waypoint";
const VIP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 96, 0, 40);
const PORT: u16 = 80;
const APP_PORT: u16 = 8080;
const JWKS_PORT: u16 = 8443;
const BURST: u64 = 50;
