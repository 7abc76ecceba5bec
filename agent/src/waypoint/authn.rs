//! End-user authentication (a TrafficPolicy's `requestAuthentication` on the Service a
//! request is addressed to): find the token, check it against its issuer's keys, and hand
//! its claims to access policy. A request without a token passes unauthenticated; one with
//! a token that is not valid is answered 401 and goes nowhere. What the client sent in a
//! claim header never reaches the backend: those headers are cleared first, token or not.

use std::{collections::HashMap, sync::Arc, time::SystemTime};

use http::{HeaderMap, HeaderName, HeaderValue, Uri, request::Parts};
use tracing::debug;

use super::{Error, plan::Template};
use crate::{
    jwt::{self, Claims, Expect, Jwks, JwksCache, TokenError},
    state::{
        Snapshot, Target, WorkloadRef,
        authn::{JwksSource, JwtRule},
        traffic,
    },
};

/// The authenticator of each Service a TrafficPolicy gives one.
pub type Authenticators = HashMap<WorkloadRef, Arc<Authenticator>>;

/// One Service's `requestAuthentication`, with inline key sets parsed once.
#[derive(Debug)]
pub struct Authenticator {
    /// The TrafficPolicy it comes from.
    pub policy: WorkloadRef,
    rules: Vec<Rule>,
}

#[derive(Debug)]
struct Rule {
    spec: JwtRule,
    keys: Keys,
}

#[derive(Debug)]
enum Keys {
    Inline(Arc<Jwks>),
    Fetched {
        uri: Uri,
        refresh: std::time::Duration,
        timeout: std::time::Duration,
    },
    /// Valid when the policy was read, not now (cannot happen; fails closed if it does).
    Broken,
}

/// Where a token was found, so it can be removed before the request is sent on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Place<'a> {
    Header(&'a str),
    Param(&'a str),
}

/// Why a request's token was refused: its stable reason, for the metric and the log.
#[derive(Debug)]
pub struct Refused {
    pub policy: WorkloadRef,
    pub reason: &'static str,
}

impl From<Refused> for Error {
    fn from(r: Refused) -> Self {
        Error::Unauthenticated {
            policy: r.policy,
            reason: r.reason,
        }
    }
}

/// The authenticators of `snapshot`'s Services (the oldest policy's, where two set one).
pub fn authenticators(snapshot: &Snapshot) -> Authenticators {
    traffic::by_target(&snapshot.traffic_policies, |p| {
        p.request_authentication.as_ref()
    })
    .into_iter()
    .filter_map(|(target, (policy, authn))| match target {
        Target::Service(service) => {
            let rules = authn.jwt_rules.into_iter().map(Rule::new).collect();
            Some((service, Arc::new(Authenticator { policy, rules })))
        }
        Target::Route { .. } => None,
    })
    .collect()
}

impl Rule {
    fn new(spec: JwtRule) -> Self {
        let keys = match &spec.jwks {
            JwksSource::Inline(text) => match Jwks::parse(text.as_bytes()) {
                Ok(keys) => Keys::Inline(Arc::new(keys)),
                Err(_) => Keys::Broken,
            },
            JwksSource::Uri {
                uri,
                refresh_interval,
                timeout,
            } => match uri.parse() {
                Ok(uri) => Keys::Fetched {
                    uri,
                    refresh: *refresh_interval,
                    timeout: *timeout,
                },
                Err(_) => Keys::Broken,
            },
        };
        Self { spec, keys }
    }

    fn places(&self) -> impl Iterator<Item = Place<'_>> {
        let headers = self
            .spec
            .from_headers
            .iter()
            .map(|h| Place::Header(&h.name));
        let params = self.spec.from_params.iter().map(|p| Place::Param(p));
        headers.chain(params)
    }
}

impl Authenticator {
    /// The end user of `request`: `None` without a token. The request sent on (`template`)
    /// loses every claim header the client sent, and, once the token is verified, the
    /// token itself (unless its rule forwards it) and gains the claim headers.
    pub async fn authenticate(
        &self,
        cache: &JwksCache,
        request: &Parts,
        template: &mut Template,
    ) -> Result<Option<Claims>, Refused> {
        for rule in &self.rules {
            for out in &rule.spec.output_claim_to_headers {
                template.headers.remove(out.header.as_str());
            }
        }
        let refused = |reason| Refused {
            policy: self.policy.clone(),
            reason,
        };
        let Some((place, token)) = self.find(request).map_err(refused)? else {
            return Ok(None);
        };
        let token = jwt::decode(token).map_err(|e| refused(e.reason()))?;
        // The token's issuer picks the rule; the token must be where that rule reads it.
        let rule = self
            .rules
            .iter()
            .find(|r| Some(r.spec.issuer.as_str()) == token.issuer())
            .filter(|r| r.places().any(|p| p == place))
            .ok_or_else(|| refused(TokenError::WrongIssuer.reason()))?;
        let claims = rule.verify(cache, &token).await.map_err(refused)?;
        if !rule.spec.forward_original_token {
            match place {
                Place::Header(name) => {
                    template.headers.remove(name);
                }
                Place::Param(name) => {
                    template.path_and_query = without_param(&template.path_and_query, name);
                }
            }
        }
        for out in &rule.spec.output_claim_to_headers {
            let value = claims
                .header_value(&out.claim)
                .and_then(|v| HeaderValue::from_str(&v).ok());
            if let (Some(value), Ok(name)) = (value, HeaderName::from_bytes(out.header.as_bytes()))
            {
                template.headers.insert(name, value);
            }
        }
        Ok(Some(claims))
    }

    /// The first place of any rule that holds a token, and the token. A place given twice
    /// (two `authorization` headers) is refused: which one counts would be a guess.
    fn find<'r, 'q>(
        &'r self,
        request: &'q Parts,
    ) -> Result<Option<(Place<'r>, &'q str)>, &'static str> {
        for rule in &self.rules {
            for place in rule.places() {
                if let Some(token) = token_at(place, rule, &request.headers, &request.uri)? {
                    return Ok(Some((place, token)));
                }
            }
        }
        Ok(None)
    }
}

impl Rule {
    /// Checks `token` against this rule's keys, fetching them (or fetching again, when the
    /// token names a key the set lacks: the issuer may have rotated its keys).
    async fn verify(
        &self,
        cache: &JwksCache,
        token: &jwt::Unverified,
    ) -> Result<Claims, &'static str> {
        let expect = Expect {
            issuer: &self.spec.issuer,
            audiences: &self.spec.audiences,
            now: SystemTime::now(),
        };
        match &self.keys {
            Keys::Inline(keys) => jwt::verify(token, keys, &expect).map_err(|e| e.reason()),
            Keys::Broken => Err("jwks_unavailable"),
            Keys::Fetched {
                uri,
                refresh,
                timeout,
            } => {
                let keys = cache
                    .get(uri, *refresh, *timeout)
                    .await
                    .map_err(|e| unavailable(uri, &e))?;
                match jwt::verify(token, &keys, &expect) {
                    Err(TokenError::UnknownKey) => {
                        let keys = cache
                            .refetch(uri, *timeout)
                            .await
                            .map_err(|e| unavailable(uri, &e))?;
                        jwt::verify(token, &keys, &expect).map_err(|e| e.reason())
                    }
                    verified => verified.map_err(|e| e.reason()),
                }
            }
        }
    }
}

/// A key set that cannot be had: no token of its issuer can be checked, so none passes.
fn unavailable(uri: &Uri, e: &jwt::FetchError) -> &'static str {
    debug!(component = "waypoint", jwks = %uri, error = %e, "key set unavailable");
    "jwks_unavailable"
}

/// The token at `place`, if the request has one there.
fn token_at<'q>(
    place: Place<'_>,
    rule: &Rule,
    headers: &'q HeaderMap,
    uri: &'q Uri,
) -> Result<Option<&'q str>, &'static str> {
    match place {
        Place::Header(name) => {
            let mut values = headers.get_all(name).iter();
            let Some(value) = values.next() else {
                return Ok(None);
            };
            if values.next().is_some() {
                return Err("duplicate_token");
            }
            let value = value.to_str().map_err(|_| "malformed")?;
            let prefix = rule
                .spec
                .from_headers
                .iter()
                .find(|h| h.name == name)
                .map_or("", |h| h.prefix.as_str());
            // A header without the prefix holds no token of this rule (another scheme).
            match value.get(..prefix.len()) {
                Some(head) if head.eq_ignore_ascii_case(prefix) => {
                    Ok(Some(value[prefix.len()..].trim()))
                }
                _ => Ok(None),
            }
        }
        Place::Param(name) => {
            let mut found = uri
                .query()
                .unwrap_or("")
                .split('&')
                .filter_map(|pair| pair.split_once('=').filter(|(k, _)| *k == name))
                .map(|(_, v)| v);
            match (found.next(), found.next()) {
                (Some(_), Some(_)) => Err("duplicate_token"),
                (token, _) => Ok(token),
            }
        }
    }
}

/// `path_and_query` without the query parameter `name`.
fn without_param(path_and_query: &str, name: &str) -> String {
    let Some((path, query)) = path_and_query.split_once('?') else {
        return path_and_query.to_owned();
    };
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| pair.split_once('=').map_or(*pair, |(k, _)| k) != name)
        .collect();
    if kept.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{}", kept.join("&"))
    }
}

#[cfg(test)]
mod tests {
    use http::{HeaderMap, HeaderValue, Uri};

    use super::{Place, Rule, token_at, without_param};
    use crate::state::authn::{DEFAULT_TOKEN_PARAM, JwksSource, JwtRule, TokenHeader};

    fn rule() -> Rule {
        Rule::new(JwtRule {
            issuer: "https://issuer.test".into(),
            audiences: vec![],
            jwks: JwksSource::Inline("{}".into()),
            from_headers: vec![TokenHeader::bearer()],
            from_params: vec![DEFAULT_TOKEN_PARAM.into()],
            forward_original_token: false,
            output_claim_to_headers: vec![],
        })
    }

    #[test]
    fn a_token_is_read_after_its_prefix_and_a_place_given_twice_is_refused() {
        let rule = rule();
        let header = Place::Header("authorization");
        let param = Place::Param("access_token");
        let uri: Uri = "/a?access_token=t.q.s&b=1".parse().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("authorization", HeaderValue::from_static("bearer a.b.c"));
        assert_eq!(
            token_at(header, &rule, &headers, &uri),
            Ok(Some("a.b.c")),
            "the prefix compares case-insensitively"
        );
        assert_eq!(token_at(param, &rule, &headers, &uri), Ok(Some("t.q.s")));
        headers.insert("authorization", HeaderValue::from_static("Basic dXNlcg=="));
        assert_eq!(
            token_at(header, &rule, &headers, &uri),
            Ok(None),
            "another scheme holds no token"
        );
        headers.append("authorization", HeaderValue::from_static("Bearer x.y.z"));
        assert_eq!(
            token_at(header, &rule, &headers, &uri),
            Err("duplicate_token")
        );
        let twice: Uri = "/a?access_token=1.2.3&access_token=4.5.6".parse().unwrap();
        assert_eq!(
            token_at(param, &rule, &HeaderMap::new(), &twice),
            Err("duplicate_token")
        );
    }

    #[test]
    fn a_token_parameter_is_removed_and_the_others_kept() {
        assert_eq!(
            without_param("/a?access_token=x&b=1", "access_token"),
            "/a?b=1"
        );
        assert_eq!(without_param("/a?access_token=x", "access_token"), "/a");
        assert_eq!(without_param("/a?b=1&c", "access_token"), "/a?b=1&c");
        assert_eq!(without_param("/a", "access_token"), "/a");
    }
}
