//! Gateway API routes → `state::HttpRoute`: the one conversion of `HTTPRoute` and
//! `GRPCRoute` objects (`gateway.networking.k8s.io/v1`, the `gateway-api` crate's
//! experimental types, which have `retry`), shared by the local file (`routes:` items, the
//! objects as their manifests say) and the Kubernetes source (watched objects).
//!
//! Everything is validated; an error names the field path below the caller's prefix
//! (`routes[2].spec.rules[0].matches[1].path.value`, `spec.rules[0].backendRefs[0].port`).
//! What weft does not implement (ExtensionRef, CORS and ExternalAuth filters, session
//! persistence, Service `sectionName`s, cross-namespace backends, which need ReferenceGrants
//! weft does not read) is an error naming the field, never silently ignored; so is a field
//! the types do not know (a typo in a hand-written file).
//!
//! Semantics, where the Gateway API leaves them to the implementation (docs/config.md):
//! - parentRefs: kind `Service` (group `""` or `core`) attach a route to a waypoint
//!   (GAMMA); kind `Gateway` (group `gateway.networking.k8s.io`, the spec's default for
//!   both) to a Gateway's listeners (`gateway_parents`, namespace defaulting to the
//!   route's; a Gateway weft does not know is kept, it may appear later); other parents
//!   are not errors, they are someone else's.
//! - gRPC method matches are path matches on `/<service>/<method>`: service and method
//!   exact → `Exact /svc/method`; only one of them → the regex `/svc/[^/]+` or
//!   `/[^/]+/method` (a path prefix would be segment-based and also match `/svc/a/b`);
//!   `RegularExpression` → the regex `/(?:svc)/(?:method)`, each part defaulting to `[^/]+`.
//! - Timeouts of `0s` disable the timeout (as the spec says); `backendRequest` must not
//!   exceed `request`.
//! - `retry`: `attempts` default 1 (one retry, so two tries at most: a retry storm is worse
//!   than a failed request), `codes` default `[503]` (the only code that says "try again
//!   elsewhere" for any method), `backoff` default 25ms (Envoy's base interval);
//!   `attempts: 0` is no retry.
//! - Mirror share: `percent` or `fraction` → parts per million; neither: every request.
//!
//! The ingress side of the Gateway API has its own modules: `listeners` (Gateway objects
//! of class `weft`) and `certificate` (the Secrets their HTTPS listeners name).

pub mod certificate;
pub mod listeners;
pub mod passthrough;

use std::{str::FromStr, time::Duration};

use gateway_api::experimental::{grpcroutes as grpc, httproutes as http};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

use crate::{
    source::syntax::{self, Invalid},
    state::{
        GatewayParent, HttpRoute, RouteKind, WorkloadRef,
        route::{
            Backend, Filter, HeaderMatch, HeaderModifier, Mirror, ParentRef, PathMatch,
            PathRewrite, Pattern, QueryParamMatch, Redirect, RequestMatch, Retry, RouteRule,
            ServiceRef, Timeouts, UrlRewrite, ValueMatch,
        },
    },
};

/// The `apiVersion` of the routes weft reads.
pub const API_VERSION: &str = "gateway.networking.k8s.io/v1";
/// The Gateway API's group.
pub const GROUP: &str = "gateway.networking.k8s.io";

/// Default retries after the first try, when `retry` leaves `attempts` out.
pub const DEFAULT_RETRY_ATTEMPTS: u32 = 1;
/// Default retried response codes, when `retry` leaves `codes` out.
pub const DEFAULT_RETRY_CODES: [u16; 1] = [503];
/// Default base of the backoff between tries, when `retry` leaves `backoff` out.
pub const DEFAULT_RETRY_BACKOFF: Duration = Duration::from_millis(25);

/// Validates a route object (`apiVersion`, `kind`, `metadata`, `spec`) found at `field`
/// (`routes[2]`, or `""` for an API object); a route without a namespace is in
/// `default_namespace`.
pub fn route(field: &str, object: &Value, default_namespace: &str) -> Result<HttpRoute, Invalid> {
    let text = |key: &str| object.get(key).and_then(Value::as_str);
    let kind = text("kind");
    let versions: &[&str] = match kind {
        Some("HTTPRoute" | "GRPCRoute") => &[API_VERSION],
        Some("TLSRoute") => &passthrough::TLS_ROUTE_VERSIONS,
        Some("TCPRoute") => &[passthrough::TCP_ROUTE_VERSION],
        other => {
            return Err(invalid(
                at(field, "kind"),
                format!(
                    "{other:?}: expected \"HTTPRoute\", \"GRPCRoute\", \"TLSRoute\" or \"TCPRoute\""
                ),
            ));
        }
    };
    let version = text("apiVersion");
    if !version.is_some_and(|v| versions.contains(&v)) {
        return Err(invalid(
            at(field, "apiVersion"),
            format!("{version:?}: expected {}", versions.join(" or ")),
        ));
    }
    match kind {
        Some("HTTPRoute") => http_route(field, object, default_namespace),
        Some("GRPCRoute") => grpc_route(field, object, default_namespace),
        Some("TLSRoute") => passthrough::tls_route(field, object, default_namespace),
        _ => passthrough::tcp_route(field, object, default_namespace),
    }
}

/// Validates an `HTTPRoute` object.
pub fn http_route(
    field: &str,
    object: &Value,
    default_namespace: &str,
) -> Result<HttpRoute, Invalid> {
    let route: http::HttpRoute = decode(field, object)?;
    let name = object_name(field, &route.metadata, default_namespace)?;
    let spec_field = at(field, "spec");
    let spec = route.spec;
    let mut rules = Vec::new();
    for (i, raw) in spec.rules.unwrap_or_default().into_iter().enumerate() {
        let field = format!("{spec_field}.rules[{i}]");
        if raw.session_persistence.is_some() {
            return Err(unsupported(&field, "sessionPersistence"));
        }
        let matches = match raw.matches {
            // No matches: every request (the spec's default `PathPrefix /`).
            None => vec![RequestMatch {
                path: Some(PathMatch::Prefix("/".into())),
                ..RequestMatch::default()
            }],
            Some(matches) => matches
                .into_iter()
                .enumerate()
                .map(|(j, m)| http_match(&format!("{field}.matches[{j}]"), m))
                .collect::<Result<_, _>>()?,
        };
        let parts = RuleParts {
            name: raw.name,
            matches,
            filters: raw.filters.unwrap_or_default(),
            backend_refs: raw.backend_refs.unwrap_or_default(),
        };
        let mut rule = rule(&field, &name.namespace, parts)?;
        rule.timeouts = timeouts(&format!("{field}.timeouts"), raw.timeouts)?;
        rule.retry = raw
            .retry
            .map(|r| retry(&format!("{field}.retry"), r))
            .transpose()?
            .flatten();
        rules.push(rule);
    }
    let (parents, gateway_parents) = parents(&spec_field, &name.namespace, spec.parent_refs)?;
    Ok(HttpRoute {
        kind: RouteKind::Http,
        gateway_parents,
        parents,
        hostnames: hostnames(&spec_field, spec.hostnames)?,
        name,
        rules,
    })
}

/// Validates a `GRPCRoute` object.
pub fn grpc_route(
    field: &str,
    object: &Value,
    default_namespace: &str,
) -> Result<HttpRoute, Invalid> {
    let route: grpc::GrpcRoute = decode(field, object)?;
    let name = object_name(field, &route.metadata, default_namespace)?;
    let spec_field = at(field, "spec");
    let spec = route.spec;
    let mut rules = Vec::new();
    for (i, raw) in spec.rules.unwrap_or_default().into_iter().enumerate() {
        let field = format!("{spec_field}.rules[{i}]");
        if raw.session_persistence.is_some() {
            return Err(unsupported(&field, "sessionPersistence"));
        }
        let matches = raw
            .matches
            .unwrap_or_default()
            .into_iter()
            .enumerate()
            .map(|(j, m)| grpc_match(&format!("{field}.matches[{j}]"), m))
            .collect::<Result<_, _>>()?;
        // The gRPC filters and backendRefs are the HTTP ones minus some options: read
        // through the HTTP types, so one validation serves both.
        let parts = RuleParts {
            name: raw.name,
            matches,
            filters: reshape(&format!("{field}.filters"), raw.filters.unwrap_or_default())?,
            backend_refs: reshape(
                &format!("{field}.backendRefs"),
                raw.backend_refs.unwrap_or_default(),
            )?,
        };
        rules.push(rule(&field, &name.namespace, parts)?);
    }
    let parent_refs: Option<Vec<http::HttpRouteParentRefs>> =
        reshape(&format!("{spec_field}.parentRefs"), spec.parent_refs)?;
    let (parents, gateway_parents) = parents(&spec_field, &name.namespace, parent_refs)?;
    Ok(HttpRoute {
        kind: RouteKind::Grpc,
        gateway_parents,
        parents,
        hostnames: hostnames(&spec_field, spec.hostnames)?,
        name,
        rules,
    })
}

/// Parses a Gateway API duration (GEP-2257: `10s`, `500ms`, `1h30m`).
pub fn duration(field: &str, text: &str) -> Result<Duration, Invalid> {
    gateway_api::Duration::from_str(text)
        .map(|d| Duration::new(d.as_secs(), d.subsec_nanos()))
        .map_err(|e| {
            invalid(
                field.into(),
                format!("{text:?} is not a Gateway API duration (e.g. 10s, 500ms, 1h30m): {e}"),
            )
        })
}

/// Checks the `apiVersion` and `kind` of an object found at `field`.
pub fn object_type(
    field: &str,
    object: &Value,
    api_version: &str,
    kind: &str,
) -> Result<(), Invalid> {
    let text = |key: &str| object.get(key).and_then(Value::as_str);
    if text("apiVersion") != Some(api_version) {
        return Err(invalid(
            at(field, "apiVersion"),
            format!("{:?}: expected {api_version:?}", text("apiVersion")),
        ));
    }
    if text("kind") != Some(kind) {
        return Err(invalid(
            at(field, "kind"),
            format!("{:?}: expected {kind:?}", text("kind")),
        ));
    }
    Ok(())
}

/// The path of `sub` below `field` (`field` may be empty: an API object's root).
pub fn at(field: &str, sub: &str) -> String {
    if field.is_empty() {
        sub.to_owned()
    } else {
        format!("{field}.{sub}")
    }
}

/// A rule's parts common to both kinds, read through the HTTP types.
struct RuleParts {
    name: Option<String>,
    matches: Vec<RequestMatch>,
    filters: Vec<http::HttpRouteRulesFilters>,
    backend_refs: Vec<http::HttpRouteRulesBackendRefs>,
}

fn decode<T: DeserializeOwned + Serialize>(field: &str, object: &Value) -> Result<T, Invalid> {
    let decoded: T = syntax::decode(field, object)?;
    // The generated types accept unknown fields: find them by what does not come back.
    let again = serde_json::to_value(&decoded).map_err(|e| bug(field, &e))?;
    if let Some(path) = unknown_field(object, &again, field, true) {
        return Err(invalid(
            path,
            "unknown field (check its spelling and the Gateway API version)".into(),
        ));
    }
    Ok(decoded)
}

/// The first field of `input` that `output` (the decoded input, re-encoded) lacks; `root`:
/// `input` is the whole object.
fn unknown_field(input: &Value, output: &Value, field: &str, root: bool) -> Option<String> {
    match (input, output) {
        (Value::Object(input), Value::Object(output)) => {
            input.iter().find_map(|(key, value)| {
                // Kubernetes' own metadata and status are not the route's to validate.
                if root && matches!(key.as_str(), "metadata" | "status") {
                    return None;
                }
                let path = at(field, key);
                match output.get(key) {
                    None if value.is_null() => None,
                    None => Some(path),
                    Some(out) => unknown_field(value, out, &path, false),
                }
            })
        }
        (Value::Array(input), Value::Array(output)) => input
            .iter()
            .zip(output)
            .enumerate()
            .find_map(|(i, (a, b))| unknown_field(a, b, &format!("{field}[{i}]"), false)),
        _ => None,
    }
}

/// `value` as `T`, a type of the same shape (the gRPC types as the HTTP ones).
fn reshape<S: Serialize, T: DeserializeOwned>(field: &str, value: S) -> Result<T, Invalid> {
    let json = serde_json::to_value(value).map_err(|e| bug(field, &e))?;
    serde_json::from_value(json).map_err(|e| bug(field, &e))
}

fn object_name(
    field: &str,
    metadata: &kube::api::ObjectMeta,
    default_namespace: &str,
) -> Result<WorkloadRef, Invalid> {
    let name = syntax::name(
        &at(field, "metadata.name"),
        metadata.name.clone().unwrap_or_default(),
    )?;
    let namespace = syntax::name(
        &at(field, "metadata.namespace"),
        metadata
            .namespace
            .clone()
            .unwrap_or_else(|| default_namespace.into()),
    )?;
    Ok(WorkloadRef::new(namespace, name))
}

/// The Service parents and the Gateway parents of a route.
fn parents(
    spec: &str,
    namespace: &str,
    refs: Option<Vec<http::HttpRouteParentRefs>>,
) -> Result<(Vec<ParentRef>, Vec<GatewayParent>), Invalid> {
    let mut parents = Vec::new();
    let mut gateways = Vec::new();
    for (i, raw) in refs.unwrap_or_default().into_iter().enumerate() {
        let field = format!("{spec}.parentRefs[{i}]");
        let parent_port =
            |raw: Option<i32>| raw.map(|p| port(&format!("{field}.port"), p)).transpose();
        // The spec's defaults: group gateway.networking.k8s.io, kind Gateway.
        let gateway_group = matches!(raw.group.as_deref(), None | Some(GROUP));
        match raw.kind.as_deref() {
            Some("Service") if is_core(raw.group.as_deref()) => {
                if raw.section_name.is_some() {
                    return Err(invalid(
                        format!("{field}.sectionName"),
                        "not supported on a Service parent (use port)".into(),
                    ));
                }
                let service = named_ref(&field, namespace, raw.namespace, raw.name)?;
                let port = parent_port(raw.port)?;
                parents.push(ParentRef { service, port });
            }
            None | Some("Gateway") if gateway_group => {
                let gateway = named_ref(&field, namespace, raw.namespace, raw.name)?;
                let section_name = raw
                    .section_name
                    .map(|s| syntax::name(&format!("{field}.sectionName"), s))
                    .transpose()?;
                gateways.push(GatewayParent {
                    gateway,
                    section_name,
                    port: parent_port(raw.port)?,
                });
            }
            // Someone else's parent (a ListenerSet, another project's kind).
            _ => {}
        }
    }
    Ok((parents, gateways))
}

fn hostnames(spec: &str, hostnames: Option<Vec<String>>) -> Result<Vec<String>, Invalid> {
    hostnames
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, host)| hostname(&format!("{spec}.hostnames[{i}]"), host))
        .collect()
}

/// A host name, or `*.` and one (lowercased).
fn hostname(field: &str, host: String) -> Result<String, Invalid> {
    let rest = host.strip_prefix("*.").unwrap_or(&host);
    let valid = !rest.is_empty()
        && rest.len() <= 253
        && rest.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if valid {
        Ok(host.to_ascii_lowercase())
    } else {
        Err(invalid(
            field.into(),
            format!("{host:?} is not a host name (or *.domain)"),
        ))
    }
}

fn rule(field: &str, namespace: &str, parts: RuleParts) -> Result<RouteRule, Invalid> {
    let all_prefix = parts
        .matches
        .iter()
        .all(|m| matches!(m.path, Some(PathMatch::Prefix(_))));
    let filters = filters(
        &format!("{field}.filters"),
        namespace,
        parts.filters,
        all_prefix,
    )?;
    let redirects = filters.iter().any(|f| matches!(f, Filter::Redirect(_)));
    let mut backends = Vec::new();
    for (i, raw) in parts.backend_refs.into_iter().enumerate() {
        let field = format!("{field}.backendRefs[{i}]");
        let service = backend_ref(
            &field,
            namespace,
            (raw.group, raw.kind, raw.namespace, raw.name, raw.port),
        )?;
        let weight = match raw.weight {
            None => 1,
            Some(w @ 0..=1_000_000) => w.unsigned_abs(),
            Some(w) => {
                return Err(invalid(
                    format!("{field}.weight"),
                    format!("{w} is not a weight (0-1000000)"),
                ));
            }
        };
        let filters: Vec<http::HttpRouteRulesFilters> =
            reshape(&format!("{field}.filters"), raw.filters.unwrap_or_default())?;
        let filters = self::filters(&format!("{field}.filters"), namespace, filters, all_prefix)?;
        if let Some(j) = filters
            .iter()
            .position(|f| matches!(f, Filter::Redirect(_)))
        {
            return Err(invalid(
                format!("{field}.filters[{j}]"),
                "a redirect answers instead of forwarding: put it on the rule".into(),
            ));
        }
        backends.push(Backend {
            service,
            weight,
            filters,
        });
    }
    if redirects && !backends.is_empty() {
        return Err(invalid(
            format!("{field}.backendRefs"),
            "a rule with a RequestRedirect filter answers itself: it takes no backendRefs".into(),
        ));
    }
    Ok(RouteRule {
        name: parts.name,
        matches: parts.matches,
        filters,
        backends,
        timeouts: Timeouts::default(),
        retry: None,
    })
}

fn http_match(field: &str, raw: http::HttpRouteRulesMatches) -> Result<RequestMatch, Invalid> {
    use http::HttpRouteRulesMatchesPathType as PathType;
    let path = raw.path.unwrap_or_default();
    let value = path.value.unwrap_or_else(|| "/".into());
    let value_field = format!("{field}.path.value");
    let path = match path.r#type.unwrap_or(PathType::PathPrefix) {
        PathType::Exact => PathMatch::Exact(absolute_path(&value_field, value)?),
        PathType::PathPrefix => {
            let value = absolute_path(&value_field, value)?;
            // The spec ignores a trailing slash of a prefix (`/api/` is `/api`).
            let trimmed = value.trim_end_matches('/');
            PathMatch::Prefix(if trimmed.is_empty() { "/" } else { trimmed }.into())
        }
        PathType::RegularExpression => PathMatch::Regex(pattern(&value_field, &value)?),
    };
    let headers = raw
        .headers
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, h)| {
            let field = format!("{field}.headers[{i}]");
            let regex = matches!(
                h.r#type,
                Some(http::HttpRouteRulesMatchesHeadersType::RegularExpression)
            );
            header_match(&field, h.name, h.value, regex)
        })
        .collect::<Result<_, _>>()?;
    let query_params = raw
        .query_params
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, q)| {
            let field = format!("{field}.queryParams[{i}]");
            if q.name.is_empty() {
                return Err(invalid(format!("{field}.name"), "must not be empty".into()));
            }
            let regex = matches!(
                q.r#type,
                Some(http::HttpRouteRulesMatchesQueryParamsType::RegularExpression)
            );
            Ok(QueryParamMatch {
                name: q.name,
                value: value_match(&format!("{field}.value"), q.value, regex)?,
            })
        })
        .collect::<Result<_, _>>()?;
    let method = raw.method.map(|m| {
        // The enum's serde names are the methods, uppercase.
        serde_json::to_value(m)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    });
    if method.as_deref() == Some("") {
        return Err(bug(&format!("{field}.method"), &"method without a name"));
    }
    Ok(RequestMatch {
        path: Some(path),
        method,
        headers,
        query_params,
    })
}

fn grpc_match(field: &str, raw: grpc::GrpcRouteRulesMatches) -> Result<RequestMatch, Invalid> {
    let path = raw
        .method
        .map(|m| grpc_method(&format!("{field}.method"), m))
        .transpose()?;
    let headers = raw
        .headers
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, h)| {
            let regex = matches!(
                h.r#type,
                Some(grpc::GrpcRouteRulesMatchesHeadersType::RegularExpression)
            );
            header_match(&format!("{field}.headers[{i}]"), h.name, h.value, regex)
        })
        .collect::<Result<_, _>>()?;
    Ok(RequestMatch {
        path,
        method: None,
        headers,
        query_params: Vec::new(),
    })
}

fn grpc_method(field: &str, raw: grpc::GrpcRouteRulesMatchesMethod) -> Result<PathMatch, Invalid> {
    let service = raw.service.filter(|s| !s.is_empty());
    let method = raw.method.filter(|m| !m.is_empty());
    if service.is_none() && method.is_none() {
        return Err(invalid(
            field.into(),
            "set service, method or both (leave method out to match every call)".into(),
        ));
    }
    let regex = matches!(
        raw.r#type,
        Some(grpc::GrpcRouteRulesMatchesMethodType::RegularExpression)
    );
    if regex {
        let part = |sub: &str, text: Option<String>| -> Result<String, Invalid> {
            let Some(text) = text else {
                return Ok(SEGMENT.into());
            };
            pattern(&format!("{field}.{sub}"), &text)?;
            Ok(format!("(?:{text})"))
        };
        let service = part("service", service)?;
        let method = part("method", method)?;
        return Ok(PathMatch::Regex(pattern(
            field,
            &format!("/{service}/{method}"),
        )?));
    }
    let service = service
        .map(|s| grpc_name(&format!("{field}.service"), s, true))
        .transpose()?;
    let method = method
        .map(|m| grpc_name(&format!("{field}.method"), m, false))
        .transpose()?;
    Ok(match (service, method) {
        (Some(s), Some(m)) => PathMatch::Exact(format!("/{s}/{m}")),
        (Some(s), None) => PathMatch::Regex(pattern(
            field,
            &format!("/{}/{SEGMENT}", regex::escape(&s)),
        )?),
        (None, Some(m)) => PathMatch::Regex(pattern(
            field,
            &format!("/{SEGMENT}/{}", regex::escape(&m)),
        )?),
        (None, None) => return Err(bug(field, &"neither service nor method")),
    })
}

/// A gRPC service (`pkg.Service`, dots allowed) or method name.
fn grpc_name(field: &str, name: String, dotted: bool) -> Result<String, Invalid> {
    let ident = |part: &str| {
        part.chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    let valid = if dotted {
        name.split('.').all(ident)
    } else {
        ident(&name)
    };
    if valid {
        Ok(name)
    } else {
        let what = if dotted { "service" } else { "method" };
        Err(invalid(
            field.into(),
            format!("{name:?} is not a gRPC {what} name"),
        ))
    }
}

fn header_match(
    field: &str,
    name: String,
    value: String,
    regex: bool,
) -> Result<HeaderMatch, Invalid> {
    Ok(HeaderMatch {
        name: header_name(&format!("{field}.name"), &name)?,
        value: value_match(&format!("{field}.value"), value, regex)?,
    })
}

fn value_match(field: &str, value: String, regex: bool) -> Result<ValueMatch, Invalid> {
    if regex {
        Ok(ValueMatch::Regex(pattern(field, &value)?))
    } else {
        Ok(ValueMatch::Exact(value))
    }
}

fn filters(
    field: &str,
    namespace: &str,
    raws: Vec<http::HttpRouteRulesFilters>,
    all_prefix: bool,
) -> Result<Vec<Filter>, Invalid> {
    let mut out = Vec::new();
    for (i, raw) in raws.into_iter().enumerate() {
        let field = format!("{field}[{i}]");
        out.push(filter(&field, namespace, raw, all_prefix)?);
    }
    let rewrites = out.iter().any(|f| matches!(f, Filter::UrlRewrite(_)));
    if let Some(i) = out.iter().position(|f| matches!(f, Filter::Redirect(_)))
        && rewrites
    {
        return Err(invalid(
            format!("{field}[{i}]"),
            "RequestRedirect and URLRewrite cannot be used together".into(),
        ));
    }
    Ok(out)
}

fn filter(
    field: &str,
    namespace: &str,
    raw: http::HttpRouteRulesFilters,
    all_prefix: bool,
) -> Result<Filter, Invalid> {
    use http::HttpRouteRulesFiltersType as Type;
    // The field the type names must be set (the API server checks this too, the file not).
    let missing = |name: &str| invalid(format!("{field}.{name}"), "required by `type`".into());
    match raw.r#type {
        Type::RequestHeaderModifier => {
            let m = raw
                .request_header_modifier
                .ok_or_else(|| missing("requestHeaderModifier"))?;
            header_modifier(&format!("{field}.requestHeaderModifier"), m)
                .map(Filter::RequestHeaders)
        }
        Type::ResponseHeaderModifier => {
            let field = format!("{field}.responseHeaderModifier");
            let m = raw
                .response_header_modifier
                .ok_or_else(|| missing("responseHeaderModifier"))?;
            // The same shape as the request's: one validation.
            header_modifier(&field, reshape(&field, m)?).map(Filter::ResponseHeaders)
        }
        Type::RequestMirror => {
            let m = raw.request_mirror.ok_or_else(|| missing("requestMirror"))?;
            mirror(&format!("{field}.requestMirror"), namespace, m).map(Filter::Mirror)
        }
        Type::RequestRedirect => {
            let r = raw
                .request_redirect
                .ok_or_else(|| missing("requestRedirect"))?;
            redirect(&format!("{field}.requestRedirect"), r, all_prefix).map(Filter::Redirect)
        }
        Type::UrlRewrite => {
            let r = raw.url_rewrite.ok_or_else(|| missing("urlRewrite"))?;
            let field = format!("{field}.urlRewrite");
            // The path has the redirect's shape: one validation.
            let path = reshape(&field, r.path)?;
            let (hostname, path) = host_and_path(&field, r.hostname, path, all_prefix)?;
            Ok(Filter::UrlRewrite(UrlRewrite { hostname, path }))
        }
        Type::ExtensionRef => Err(unsupported_filter(field, "ExtensionRef")),
        Type::Cors => Err(unsupported_filter(field, "CORS")),
        Type::ExternalAuth => Err(unsupported_filter(field, "ExternalAuth")),
    }
}

fn header_modifier(
    field: &str,
    raw: http::HttpRouteRulesFiltersRequestHeaderModifier,
) -> Result<HeaderModifier, Invalid> {
    let set = raw
        .set
        .unwrap_or_default()
        .into_iter()
        .map(|h| (h.name, h.value));
    let add = raw
        .add
        .unwrap_or_default()
        .into_iter()
        .map(|h| (h.name, h.value));
    let remove = raw.remove.unwrap_or_default();
    let pairs = |key: &str, pairs: &mut dyn Iterator<Item = (String, String)>| {
        pairs
            .enumerate()
            .map(|(i, (name, value))| {
                let field = format!("{field}.{key}[{i}]");
                let name = header_name(&format!("{field}.name"), &name)?;
                if ::http::HeaderValue::from_str(&value).is_err() {
                    return Err(invalid(
                        format!("{field}.value"),
                        format!("{value:?} is not a valid header value"),
                    ));
                }
                Ok((name, value))
            })
            .collect::<Result<Vec<_>, _>>()
    };
    let remove = remove
        .iter()
        .enumerate()
        .map(|(i, name)| header_name(&format!("{field}.remove[{i}]"), name))
        .collect::<Result<_, _>>()?;
    Ok(HeaderModifier {
        set: pairs("set", &mut { set })?,
        add: pairs("add", &mut { add })?,
        remove,
    })
}

fn mirror(
    field: &str,
    namespace: &str,
    raw: http::HttpRouteRulesFiltersRequestMirror,
) -> Result<Mirror, Invalid> {
    let b = raw.backend_ref;
    let backend = backend_ref(
        &format!("{field}.backendRef"),
        namespace,
        (b.group, b.kind, b.namespace, b.name, b.port),
    )?;
    let parts_per_million = match (raw.percent, raw.fraction) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                field.into(),
                "set percent or fraction, not both".into(),
            ));
        }
        (None, None) => MILLION,
        (Some(p @ 0..=100), None) => p.unsigned_abs() * 10_000,
        (Some(p), None) => {
            return Err(invalid(
                format!("{field}.percent"),
                format!("{p} is not a percentage (0-100)"),
            ));
        }
        (None, Some(f)) => {
            let denominator = f.denominator.unwrap_or(100);
            if denominator < 1 {
                return Err(invalid(
                    format!("{field}.fraction.denominator"),
                    format!("{denominator} must be at least 1"),
                ));
            }
            if !(0..=denominator).contains(&f.numerator) {
                return Err(invalid(
                    format!("{field}.fraction.numerator"),
                    format!("{} must be between 0 and the denominator", f.numerator),
                ));
            }
            let ppm = u64::from(f.numerator.unsigned_abs()) * u64::from(MILLION)
                / u64::from(denominator.unsigned_abs());
            u32::try_from(ppm).unwrap_or(MILLION)
        }
    };
    Ok(Mirror {
        backend,
        parts_per_million,
    })
}

fn redirect(
    field: &str,
    raw: http::HttpRouteRulesFiltersRequestRedirect,
    all_prefix: bool,
) -> Result<Redirect, Invalid> {
    use http::HttpRouteRulesFiltersRequestRedirectScheme as Scheme;
    let status = match raw.status_code {
        None => 301,
        Some(code @ (301 | 302 | 303 | 307 | 308)) => {
            u16::try_from(code).map_err(|e| bug(field, &e))?
        }
        Some(code) => {
            return Err(invalid(
                format!("{field}.statusCode"),
                format!("{code} is not a redirect code (301, 302, 303, 307 or 308)"),
            ));
        }
    };
    let (hostname, path) = host_and_path(field, raw.hostname, raw.path, all_prefix)?;
    Ok(Redirect {
        scheme: raw.scheme.map(|s| {
            match s {
                Scheme::Http => "http",
                Scheme::Https => "https",
            }
            .to_owned()
        }),
        hostname,
        path,
        port: raw
            .port
            .map(|p| port(&format!("{field}.port"), p))
            .transpose()?,
        status,
    })
}

/// The `hostname` and `path` of a redirect or a URL rewrite.
fn host_and_path(
    field: &str,
    hostname: Option<String>,
    path: Option<http::HttpRouteRulesFiltersRequestRedirectPath>,
    all_prefix: bool,
) -> Result<(Option<String>, Option<PathRewrite>), Invalid> {
    use http::HttpRouteRulesFiltersRequestRedirectPathType as PathType;
    let hostname = hostname
        .map(|h| self::hostname(&format!("{field}.hostname"), h))
        .transpose()?;
    let path = path
        .map(|p| {
            let prefix = matches!(p.r#type, PathType::ReplacePrefixMatch);
            path_rewrite(
                &format!("{field}.path"),
                (prefix, p.replace_full_path, p.replace_prefix_match),
                all_prefix,
            )
        })
        .transpose()?;
    Ok((hostname, path))
}

fn path_rewrite(
    field: &str,
    (prefix, full, prefix_match): (bool, Option<String>, Option<String>),
    all_prefix: bool,
) -> Result<PathRewrite, Invalid> {
    if prefix {
        let value = prefix_match.ok_or_else(|| {
            invalid(
                format!("{field}.replacePrefixMatch"),
                "required by type ReplacePrefixMatch".into(),
            )
        })?;
        if !all_prefix {
            return Err(invalid(
                format!("{field}.type"),
                "ReplacePrefixMatch needs every match of the rule to be a PathPrefix match".into(),
            ));
        }
        Ok(PathRewrite::ReplacePrefixMatch(absolute_path(
            &format!("{field}.replacePrefixMatch"),
            value,
        )?))
    } else {
        let value = full.ok_or_else(|| {
            invalid(
                format!("{field}.replaceFullPath"),
                "required by type ReplaceFullPath".into(),
            )
        })?;
        Ok(PathRewrite::ReplaceFullPath(absolute_path(
            &format!("{field}.replaceFullPath"),
            value,
        )?))
    }
}

/// A Service reference with a port: (group, kind, namespace, name, port).
type RawRef = (
    Option<String>,
    Option<String>,
    Option<String>,
    String,
    Option<i32>,
);

fn backend_ref(
    field: &str,
    namespace: &str,
    (group, kind, ref_namespace, name, raw_port): RawRef,
) -> Result<ServiceRef, Invalid> {
    if !is_core(group.as_deref()) {
        return Err(invalid(
            format!("{field}.group"),
            format!("{group:?}: only core Services are backends (group \"\")"),
        ));
    }
    if let Some(kind) = kind.filter(|k| k != "Service") {
        return Err(invalid(
            format!("{field}.kind"),
            format!("{kind:?}: only Services are backends"),
        ));
    }
    let service = named_ref(field, namespace, ref_namespace, name)?;
    if service.namespace != namespace {
        return Err(invalid(
            format!("{field}.namespace"),
            format!(
                "{:?}: backends in another namespace need a ReferenceGrant, which weft does \
                 not read yet",
                service.namespace
            ),
        ));
    }
    let Some(raw_port) = raw_port else {
        return Err(invalid(
            format!("{field}.port"),
            "required for a Service backend".into(),
        ));
    };
    Ok(ServiceRef {
        name: service,
        port: port(&format!("{field}.port"), raw_port)?,
    })
}

fn named_ref(
    field: &str,
    namespace: &str,
    ref_namespace: Option<String>,
    name: String,
) -> Result<WorkloadRef, Invalid> {
    let name = syntax::name(&format!("{field}.name"), name)?;
    let namespace = syntax::name(
        &format!("{field}.namespace"),
        ref_namespace.unwrap_or_else(|| namespace.into()),
    )?;
    Ok(WorkloadRef::new(namespace, name))
}

fn timeouts(field: &str, raw: Option<http::HttpRouteRulesTimeouts>) -> Result<Timeouts, Invalid> {
    let Some(raw) = raw else {
        return Ok(Timeouts::default());
    };
    // Zero disables a timeout (the spec's rule).
    let parse = |sub: &str, text: Option<String>| {
        text.map(|t| duration(&format!("{field}.{sub}"), &t))
            .transpose()
            .map(|d| d.filter(|d| !d.is_zero()))
    };
    let request = parse("request", raw.request)?;
    let backend_request = parse("backendRequest", raw.backend_request)?;
    if let (Some(request), Some(backend)) = (request, backend_request)
        && backend > request
    {
        return Err(invalid(
            format!("{field}.backendRequest"),
            format!(
                "{} exceeds the request timeout {}",
                humantime::format_duration(backend),
                humantime::format_duration(request)
            ),
        ));
    }
    Ok(Timeouts {
        request,
        backend_request,
    })
}

fn retry(field: &str, raw: http::HttpRouteRulesRetry) -> Result<Option<Retry>, Invalid> {
    let attempts = match raw.attempts {
        None => DEFAULT_RETRY_ATTEMPTS,
        Some(n) => u32::try_from(n)
            .ok()
            .filter(|n| *n <= MAX_ATTEMPTS)
            .ok_or_else(|| {
                invalid(
                    format!("{field}.attempts"),
                    format!("{n} is not a number of retries (0-{MAX_ATTEMPTS})"),
                )
            })?,
    };
    let codes = match raw.codes {
        None => DEFAULT_RETRY_CODES.to_vec(),
        Some(codes) => codes
            .iter()
            .enumerate()
            .map(|(i, code)| {
                u16::try_from(*code)
                    .ok()
                    .filter(|c| (400..=599).contains(c))
                    .ok_or_else(|| {
                        invalid(
                            format!("{field}.codes[{i}]"),
                            format!("{code} is not a retriable status code (400-599)"),
                        )
                    })
            })
            .collect::<Result<_, _>>()?,
    };
    let backoff = raw
        .backoff
        .map(|b| duration(&format!("{field}.backoff"), &b))
        .transpose()?
        .unwrap_or(DEFAULT_RETRY_BACKOFF);
    Ok((attempts > 0).then_some(Retry {
        attempts,
        codes,
        backoff,
    }))
}

fn pattern(field: &str, text: &str) -> Result<Pattern, Invalid> {
    Pattern::new(text).map_err(|e| {
        // regex's message is multi-line (it draws a caret under the fault).
        let message = e.to_string().replace('\n', " ");
        invalid(
            field.into(),
            format!("invalid regular expression {text:?}: {message}"),
        )
    })
}

fn absolute_path(field: &str, path: String) -> Result<String, Invalid> {
    if !path.starts_with('/') || path.chars().any(|c| c.is_ascii_control() || c == ' ') {
        return Err(invalid(
            field.into(),
            format!("{path:?} is not an absolute path (starts with '/', no spaces)"),
        ));
    }
    Ok(path)
}

fn header_name(field: &str, name: &str) -> Result<String, Invalid> {
    ::http::HeaderName::from_bytes(name.as_bytes())
        .map(|n| n.as_str().to_owned())
        .map_err(|_| invalid(field.into(), format!("{name:?} is not a header name")))
}

fn port(field: &str, port: i32) -> Result<u16, Invalid> {
    u16::try_from(port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| invalid(field.into(), format!("{port} is not a port (1-65535)")))
}

fn is_core(group: Option<&str>) -> bool {
    matches!(group, None | Some("" | "core"))
}

fn unsupported(field: &str, name: &str) -> Invalid {
    invalid(
        format!("{field}.{name}"),
        "not supported by weft's waypoint (remove it)".into(),
    )
}

fn unsupported_filter(field: &str, kind: &str) -> Invalid {
    invalid(
        format!("{field}.type"),
        format!("{kind} filters are not supported by weft's waypoint (remove the filter)"),
    )
}

fn bug(field: &str, e: &dyn std::fmt::Display) -> Invalid {
    invalid(field.into(), format!("BUG: cannot re-read the object: {e}"))
}

fn invalid(field: String, reason: String) -> Invalid {
    Invalid { field, reason }
}

/// The most retries a rule may ask for: more is a retry storm, not resilience.
const MAX_ATTEMPTS: u32 = 10;
const MILLION: u32 = 1_000_000;
/// One path segment, as a gRPC service or method regex default.
const SEGMENT: &str = "[^/]+";

#[cfg(test)]
mod tests;
