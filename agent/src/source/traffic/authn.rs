//! `requestAuthentication` → `state::authn::RequestAuthentication`: issuers, where their
//! keys are, where tokens are read from and which claims become headers. Errors name the
//! field; an inline key set that has no key weft can verify with is an error here, not a
//! 401 for every request later.

use std::time::Duration;

use http::{HeaderName, Uri};

use super::invalid;
use crate::{
    jwt::Jwks,
    source::{
        gateway::{at, duration},
        kube::crd::{JwtRuleSpec, RequestAuthenticationSpec},
        syntax::Invalid,
    },
    state::authn::{
        ClaimHeader, DEFAULT_JWKS_REFRESH, DEFAULT_JWKS_TIMEOUT, DEFAULT_TOKEN_PARAM, JwksSource,
        JwtRule, RequestAuthentication, TokenHeader,
    },
};

/// Most issuers one policy names; a token's `iss` picks its rule.
const MAX_RULES: usize = 8;

/// Shortest time a fetched key set is kept: refreshing faster hammers the issuer.
const MIN_REFRESH: Duration = Duration::from_secs(1);

/// Longest a key set fetch may take: a request waiting for the first fetch waits this.
const MAX_TIMEOUT: Duration = Duration::from_secs(60);

/// Headers a claim may not be copied into: the request's framing and routing, which the
/// waypoint owns.
const RESERVED_HEADERS: &[&str] = &[
    "host",
    "connection",
    "content-length",
    "content-type",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "keep-alive",
    "proxy-connection",
];

pub(super) fn request_authentication(
    field: &str,
    raw: RequestAuthenticationSpec,
) -> Result<RequestAuthentication, Invalid> {
    let rules_field = at(field, "jwtRules");
    if raw.jwt_rules.is_empty() || raw.jwt_rules.len() > MAX_RULES {
        return Err(invalid(
            rules_field,
            format!("{} rules: expected 1 to {MAX_RULES}", raw.jwt_rules.len()),
        ));
    }
    let mut jwt_rules: Vec<JwtRule> = Vec::with_capacity(raw.jwt_rules.len());
    for (i, raw) in raw.jwt_rules.into_iter().enumerate() {
        let field = format!("{rules_field}[{i}]");
        let rule = jwt_rule(&field, raw)?;
        if jwt_rules.iter().any(|r| r.issuer == rule.issuer) {
            return Err(invalid(
                at(&field, "issuer"),
                format!("{:?} has a rule already", rule.issuer),
            ));
        }
        jwt_rules.push(rule);
    }
    Ok(RequestAuthentication { jwt_rules })
}

fn jwt_rule(field: &str, raw: JwtRuleSpec) -> Result<JwtRule, Invalid> {
    if raw.issuer.is_empty() {
        return Err(invalid(at(field, "issuer"), "must not be empty".into()));
    }
    if let Some(i) = raw.audiences.iter().position(String::is_empty) {
        return Err(invalid(
            format!("{}[{i}]", at(field, "audiences")),
            "must not be empty".into(),
        ));
    }
    let jwks = jwks_source(field, &raw)?;
    // Istio's default places: the bearer header and `access_token`, unless the rule says.
    let (from_headers, from_params) = match (raw.from_headers, raw.from_params) {
        (None, None) => (
            vec![TokenHeader::bearer()],
            vec![DEFAULT_TOKEN_PARAM.into()],
        ),
        (headers, params) => (
            token_headers(&at(field, "fromHeaders"), headers.unwrap_or_default())?,
            params.unwrap_or_default(),
        ),
    };
    if from_headers.is_empty() && from_params.is_empty() {
        return Err(invalid(
            at(field, "fromHeaders"),
            "no header and no parameter: no token could ever be found".into(),
        ));
    }
    if let Some(i) = from_params.iter().position(String::is_empty) {
        return Err(invalid(
            format!("{}[{i}]", at(field, "fromParams")),
            "must not be empty".into(),
        ));
    }
    let claims_field = at(field, "outputClaimToHeaders");
    let output_claim_to_headers = raw
        .output_claim_to_headers
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let field = format!("{claims_field}[{i}]");
            let header = header_name(&at(&field, "header"), &c.header)?;
            if RESERVED_HEADERS.contains(&header.as_str()) {
                return Err(invalid(
                    at(&field, "header"),
                    format!("{header:?} is the waypoint's own"),
                ));
            }
            if c.claim.is_empty() {
                return Err(invalid(at(&field, "claim"), "must not be empty".into()));
            }
            Ok(ClaimHeader {
                header: header.as_str().to_owned(),
                claim: c.claim,
            })
        })
        .collect::<Result<_, _>>()?;
    Ok(JwtRule {
        issuer: raw.issuer,
        audiences: raw.audiences,
        jwks,
        from_headers,
        from_params,
        forward_original_token: raw.forward_original_token,
        output_claim_to_headers,
    })
}

fn jwks_source(field: &str, raw: &JwtRuleSpec) -> Result<JwksSource, Invalid> {
    match (&raw.jwks_uri, &raw.jwks) {
        (Some(_), Some(_)) | (None, None) => Err(invalid(
            at(field, "jwksUri"),
            "set exactly one of jwksUri and jwks".into(),
        )),
        (None, Some(inline)) => match Jwks::parse(inline.as_bytes()) {
            Ok(_) => Ok(JwksSource::Inline(inline.clone())),
            Err(e) => Err(invalid(at(field, "jwks"), e.to_string())),
        },
        (Some(uri), None) => {
            let uri_field = at(field, "jwksUri");
            let parsed: Uri = uri
                .parse()
                .map_err(|e| invalid(uri_field.clone(), format!("{uri:?}: {e}")))?;
            if parsed.scheme_str() != Some("https") || parsed.host().is_none() {
                return Err(invalid(
                    uri_field,
                    format!(
                        "{uri:?}: expected an https:// URL (keys over plaintext can be forged)"
                    ),
                ));
            }
            let refresh_interval = bounded(
                &at(field, "jwksRefreshInterval"),
                raw.jwks_refresh_interval.as_deref(),
                DEFAULT_JWKS_REFRESH,
            )?;
            if refresh_interval < MIN_REFRESH {
                return Err(invalid(
                    at(field, "jwksRefreshInterval"),
                    "must be at least 1s".into(),
                ));
            }
            let timeout = bounded(
                &at(field, "jwksTimeout"),
                raw.jwks_timeout.as_deref(),
                DEFAULT_JWKS_TIMEOUT,
            )?;
            if timeout.is_zero() || timeout > MAX_TIMEOUT {
                return Err(invalid(
                    at(field, "jwksTimeout"),
                    "expected above 0 and at most 60s".into(),
                ));
            }
            Ok(JwksSource::Uri {
                uri: uri.clone(),
                refresh_interval,
                timeout,
            })
        }
    }
}

/// A duration at `field`, or `default` when absent.
fn bounded(field: &str, text: Option<&str>, default: Duration) -> Result<Duration, Invalid> {
    text.map_or(Ok(default), |text| duration(field, text))
}

fn token_headers(
    field: &str,
    raw: Vec<crate::source::kube::crd::JwtHeaderSpec>,
) -> Result<Vec<TokenHeader>, Invalid> {
    raw.into_iter()
        .enumerate()
        .map(|(i, h)| {
            let field = format!("{field}[{i}]");
            Ok(TokenHeader {
                name: header_name(&at(&field, "name"), &h.name)?
                    .as_str()
                    .to_owned(),
                prefix: h.prefix.unwrap_or_default(),
            })
        })
        .collect()
}

fn header_name(field: &str, name: &str) -> Result<HeaderName, Invalid> {
    HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| invalid(field.into(), format!("{name:?} is not an HTTP header name")))
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::super::{API_VERSION, object};
    use crate::state::{TrafficPolicy, authn::*};

    /// A real P-256 public key (its private half was thrown away).
    const JWKS: &str = r#"{"keys":[{"kty":"EC","crv":"P-256","kid":"k1","alg":"ES256","use":"sig","x":"cii8BrdAG-E_JwUvuiFENvYyk0YZCHsMjC78Nwh2lro","y":"dZ_ug5VeIOPH6YTb1LJK3DVakcPSdJmXCX3gxW8eunM"}]}"#;

    fn manifest(authn: Value) -> Value {
        json!({
            "apiVersion": API_VERSION, "kind": "TrafficPolicy",
            "metadata": {"name": "jwt", "namespace": "shop"},
            "spec": {
                "targetRefs": [{"group": "", "kind": "Service", "name": "reviews"}],
                "requestAuthentication": authn,
            },
        })
    }

    fn read(authn: Value) -> Result<TrafficPolicy, crate::source::syntax::Invalid> {
        object("trafficPolicies[0]", &manifest(authn), "default")
    }

    #[test]
    fn a_rule_gets_istios_defaults_and_its_fields() {
        let policy = read(json!({"jwtRules": [
            {"issuer": "https://a", "jwksUri": "https://a/keys"},
            {"issuer": "https://b", "jwks": JWKS, "audiences": ["reviews"],
             "fromHeaders": [{"name": "X-Token"}], "forwardOriginalToken": true,
             "outputClaimToHeaders": [{"header": "X-Group", "claim": "group"}]},
        ]}))
        .unwrap();
        let rules = policy.request_authentication.unwrap().jwt_rules;
        assert_eq!(
            rules[0],
            JwtRule {
                issuer: "https://a".into(),
                audiences: vec![],
                jwks: JwksSource::Uri {
                    uri: "https://a/keys".into(),
                    refresh_interval: DEFAULT_JWKS_REFRESH,
                    timeout: DEFAULT_JWKS_TIMEOUT,
                },
                from_headers: vec![TokenHeader::bearer()],
                from_params: vec![DEFAULT_TOKEN_PARAM.into()],
                forward_original_token: false,
                output_claim_to_headers: vec![],
            }
        );
        assert_eq!(rules[1].jwks, JwksSource::Inline(JWKS.into()));
        assert_eq!(
            rules[1].from_headers,
            vec![TokenHeader {
                name: "x-token".into(),
                prefix: String::new()
            }],
            "header names lowercase"
        );
        assert!(
            rules[1].from_params.is_empty(),
            "fromHeaders alone: no parameter"
        );
        assert!(rules[1].forward_original_token);
        assert_eq!(
            rules[1].output_claim_to_headers,
            vec![ClaimHeader {
                header: "x-group".into(),
                claim: "group".into()
            }]
        );
    }

    #[test]
    fn errors_name_the_field() {
        let field = "trafficPolicies[0].spec.requestAuthentication";
        let cases = [
            (json!({"jwtRules": []}), format!("{field}.jwtRules")),
            (
                json!({"jwtRules": [{"issuer": "", "jwksUri": "https://a"}]}),
                format!("{field}.jwtRules[0].issuer"),
            ),
            (
                json!({"jwtRules": [{"issuer": "a"}]}),
                format!("{field}.jwtRules[0].jwksUri"),
            ),
            (
                json!({"jwtRules": [{"issuer": "a", "jwksUri": "https://a", "jwks": JWKS}]}),
                format!("{field}.jwtRules[0].jwksUri"),
            ),
            (
                json!({"jwtRules": [{"issuer": "a", "jwksUri": "http://a/keys"}]}),
                format!("{field}.jwtRules[0].jwksUri"),
            ),
            (
                json!({"jwtRules": [{"issuer": "a", "jwks": "{\"keys\":[]}"}]}),
                format!("{field}.jwtRules[0].jwks"),
            ),
            (
                json!({"jwtRules": [{"issuer": "a", "jwks": "not json"}]}),
                format!("{field}.jwtRules[0].jwks"),
            ),
            (
                json!({"jwtRules": [{"issuer": "a", "jwksUri": "https://a", "jwksRefreshInterval": "100ms"}]}),
                format!("{field}.jwtRules[0].jwksRefreshInterval"),
            ),
            (
                json!({"jwtRules": [{"issuer": "a", "jwksUri": "https://a", "jwksTimeout": "2m"}]}),
                format!("{field}.jwtRules[0].jwksTimeout"),
            ),
            (
                json!({"jwtRules": [{"issuer": "a", "jwks": JWKS, "fromHeaders": [], "fromParams": []}]}),
                format!("{field}.jwtRules[0].fromHeaders"),
            ),
            (
                json!({"jwtRules": [{"issuer": "a", "jwks": JWKS, "fromHeaders": [{"name": "bad header"}]}]}),
                format!("{field}.jwtRules[0].fromHeaders[0].name"),
            ),
            (
                json!({"jwtRules": [{"issuer": "a", "jwks": JWKS,
                       "outputClaimToHeaders": [{"header": "Host", "claim": "sub"}]}]}),
                format!("{field}.jwtRules[0].outputClaimToHeaders[0].header"),
            ),
            (
                json!({"jwtRules": [
                    {"issuer": "a", "jwks": JWKS},
                    {"issuer": "a", "jwksUri": "https://a"},
                ]}),
                format!("{field}.jwtRules[1].issuer"),
            ),
            (
                json!({"jwtRules": [{"issuer": "a", "jwks": JWKS, "fromCookies": ["c"]}]}),
                field.to_string(),
            ),
        ];
        for (authn, want) in cases {
            let e = read(authn.clone()).unwrap_err();
            assert!(e.field.starts_with(&want), "{authn}: {e} (want {want})");
        }
        // A route target: the feature names itself.
        let mut on_route = manifest(json!({"jwtRules": [{"issuer": "a", "jwks": JWKS}]}));
        on_route["spec"]["targetRefs"] =
            json!([{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": "r"}]);
        let e = object("trafficPolicies[0]", &on_route, "default").unwrap_err();
        assert_eq!(e.field, field);
    }
}
