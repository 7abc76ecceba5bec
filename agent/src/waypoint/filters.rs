//! Route filters on the request and the response: header modifiers (set, add, remove),
//! redirects (the `Location` a 3xx answers with) and URL rewrites (host, full path or the
//! matched prefix).

use http::{HeaderMap, HeaderName, HeaderValue, uri::PathAndQuery};

use super::route::prefix_matches;
use crate::state::route::{
    Filter, HeaderModifier, Mirror, PathMatch, PathRewrite, Redirect, RequestMatch, UrlRewrite,
};

/// What the filters of a rule (and then of its backend) ask for.
#[derive(Debug, Default)]
pub struct Effects<'s> {
    pub request_headers: Vec<&'s HeaderModifier>,
    pub response_headers: Vec<&'s HeaderModifier>,
    pub mirrors: Vec<&'s Mirror>,
    pub redirect: Option<&'s Redirect>,
    pub rewrite: Option<&'s UrlRewrite>,
}

impl<'s> Effects<'s> {
    /// Adds `filters` in order (a later redirect or rewrite replaces an earlier one).
    pub fn extend(&mut self, filters: &'s [Filter]) {
        for filter in filters {
            match filter {
                Filter::RequestHeaders(m) => self.request_headers.push(m),
                Filter::ResponseHeaders(m) => self.response_headers.push(m),
                Filter::Mirror(m) => self.mirrors.push(m),
                Filter::Redirect(r) => self.redirect = Some(r),
                Filter::UrlRewrite(r) => self.rewrite = Some(r),
            }
        }
    }
}

/// Applies one modifier: set, then add, then remove. Invalid names or values (config
/// validated them; a peer cannot reach here) are skipped.
pub fn modify_headers(headers: &mut HeaderMap, modifier: &HeaderModifier) {
    for (name, value) in &modifier.set {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.insert(name, value);
        }
    }
    for (name, value) in &modifier.add {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.append(name, value);
        }
    }
    for name in &modifier.remove {
        headers.remove(name.as_str());
    }
}

/// The path after a path rewrite; `matched` is the rule match that held.
pub fn rewrite_path(rewrite: &PathRewrite, path: &str, matched: Option<&RequestMatch>) -> String {
    match rewrite {
        PathRewrite::ReplaceFullPath(full) => full.clone(),
        PathRewrite::ReplacePrefixMatch(replacement) => {
            let prefix = match matched.and_then(|m| m.path.as_ref()) {
                Some(PathMatch::Prefix(prefix)) if prefix_matches(prefix, path) => {
                    prefix.trim_end_matches('/')
                }
                // Only meaningful with a prefix match; the config rejects other uses.
                _ => "",
            };
            let rest = &path[prefix.len()..];
            let replacement = replacement.trim_end_matches('/');
            match (replacement.is_empty(), rest.is_empty()) {
                (true, true) => "/".to_owned(),
                (true, false) => rest.to_owned(),
                (false, _) => format!("{replacement}{rest}"),
            }
        }
    }
}

/// The new path-and-query after a rewrite (the query is kept).
pub fn rewrite_path_and_query(
    path_and_query: &PathAndQuery,
    rewrite: &PathRewrite,
    matched: Option<&RequestMatch>,
) -> String {
    let path = rewrite_path(rewrite, path_and_query.path(), matched);
    match path_and_query.query() {
        Some(query) => format!("{path}?{query}"),
        None => path,
    }
}

/// The `Location` of a redirect: fields the redirect leaves unset keep the request's.
pub fn location(
    redirect: &Redirect,
    scheme: &str,
    host: &str,
    port: Option<u16>,
    path_and_query: &PathAndQuery,
    matched: Option<&RequestMatch>,
) -> String {
    let scheme = redirect.scheme.as_deref().unwrap_or(scheme);
    let host = redirect.hostname.as_deref().unwrap_or(host);
    // A scheme change without a port drops the old port (the new scheme's default).
    let port = match (redirect.port, redirect.scheme.is_some()) {
        (Some(port), _) => Some(port),
        (None, true) => None,
        (None, false) => port,
    };
    let default_port = match scheme {
        "https" => 443,
        _ => 80,
    };
    let path = match &redirect.path {
        Some(rewrite) => rewrite_path_and_query(path_and_query, rewrite, matched),
        None => path_and_query.as_str().to_owned(),
    };
    match port.filter(|p| *p != default_port) {
        Some(port) => format!("{scheme}://{host}:{port}{path}"),
        None => format!("{scheme}://{host}{path}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefix_match(prefix: &str) -> RequestMatch {
        RequestMatch {
            path: Some(PathMatch::Prefix(prefix.to_owned())),
            ..RequestMatch::default()
        }
    }

    #[test]
    fn prefix_rewrites_replace_only_the_matched_segments() {
        let m = prefix_match("/v1");
        let rewrite = PathRewrite::ReplacePrefixMatch("/api/v2".into());
        assert_eq!(
            rewrite_path(&rewrite, "/v1/users", Some(&m)),
            "/api/v2/users"
        );
        assert_eq!(rewrite_path(&rewrite, "/v1", Some(&m)), "/api/v2");
        let to_root = PathRewrite::ReplacePrefixMatch("/".into());
        assert_eq!(rewrite_path(&to_root, "/v1/users", Some(&m)), "/users");
        assert_eq!(rewrite_path(&to_root, "/v1", Some(&m)), "/");
    }

    #[test]
    fn redirects_keep_what_they_do_not_change() {
        let redirect = Redirect {
            scheme: Some("https".into()),
            hostname: None,
            path: None,
            port: None,
            status: 301,
        };
        let pq: PathAndQuery = "/a?b=c".parse().unwrap();
        assert_eq!(
            location(&redirect, "http", "shop", Some(8080), &pq, None),
            "https://shop/a?b=c"
        );
    }

    #[test]
    fn header_modifiers_set_add_then_remove() {
        let mut headers = HeaderMap::new();
        headers.insert("x-old", HeaderValue::from_static("1"));
        headers.insert("x-set", HeaderValue::from_static("before"));
        modify_headers(
            &mut headers,
            &HeaderModifier {
                set: vec![("x-set".into(), "after".into())],
                add: vec![("x-add".into(), "a".into())],
                remove: vec!["x-old".into()],
            },
        );
        assert_eq!(headers["x-set"], "after");
        assert_eq!(headers["x-add"], "a");
        assert!(!headers.contains_key("x-old"));
    }
}
