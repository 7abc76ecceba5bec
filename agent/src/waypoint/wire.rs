//! HTTP details the waypoint gets right in one place: hop-by-hop headers, the request's
//! authority, gRPC detection, and the local answer (HTTP or gRPC status) to a failure.

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;

use super::{Error, upstream::BoxBody};

/// The local answer for a failed request. gRPC clients get a gRPC status instead of an
/// HTTP error where gRPC defines one (denials as PERMISSION_DENIED, trailers-only).
pub(super) fn error_response(e: &Error, grpc: bool) -> Response<BoxBody> {
    let status = match e {
        Error::NoRoute => StatusCode::NOT_FOUND,
        Error::NoBackend | Error::UnknownService(_) | Error::UnknownPort { .. } => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
        Error::PolicyDenied { .. } => StatusCode::FORBIDDEN,
        Error::RequestTimeout | Error::TryTimeout => StatusCode::GATEWAY_TIMEOUT,
        Error::NoEndpoints(_)
        | Error::UnknownEndpoint(_)
        | Error::Hbone(_)
        | Error::Handshake(_)
        | Error::Upstream(_)
        | Error::Overflow(_) => StatusCode::SERVICE_UNAVAILABLE,
        Error::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
        Error::Unauthenticated { .. } => StatusCode::UNAUTHORIZED,
        Error::FaultAbort { status, .. } => {
            StatusCode::from_u16(*status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE)
        }
        Error::BadRequest(_) | Error::Downstream(_) | Error::Path(_) => StatusCode::BAD_REQUEST,
    };
    let mut response = if grpc {
        let code = match e {
            Error::PolicyDenied { .. } => "7",
            Error::RequestTimeout | Error::TryTimeout => "4",
            Error::NoRoute => "12",
            Error::Path(_) => "3",
            Error::RateLimited { .. } => "8",
            Error::Unauthenticated { .. } => "16",
            Error::FaultAbort { status, .. } => grpc_code_of(*status),
            _ => "14",
        };
        let mut response = Response::new(empty());
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert("grpc-status", HeaderValue::from_static(code));
        if let Ok(message) = HeaderValue::from_str(&e.to_string()) {
            headers.insert("grpc-message", message);
        }
        response
    } else {
        let mut response = Response::new(
            Full::new(Bytes::from(format!("{}\n", e.reason())))
                .map_err(|never| match never {})
                .boxed_unsync(),
        );
        *response.status_mut() = status;
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        response
    };
    if let Error::Unauthenticated { .. } = e {
        // RFC 6750: the client learns that its bearer token, not its request, is at fault.
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer error=\"invalid_token\""),
        );
    }
    if let Error::RateLimited { retry_after, .. } = e {
        // Whole seconds (RFC 9110), rounded up: never "come back now".
        let seconds = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
    }
    response
}

/// The gRPC status a client gets for an HTTP status (gRPC's HTTP-to-gRPC mapping).
fn grpc_code_of(status: u16) -> &'static str {
    match status {
        400 => "13",
        401 => "16",
        403 => "7",
        404 => "12",
        429 | 502..=504 => "14",
        _ => "2",
    }
}

pub(super) fn empty() -> BoxBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

pub(super) fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

pub(super) fn authority(request: &Request<Incoming>) -> Option<String> {
    authority_of(request.uri(), request.headers())
}

/// `:authority` (HTTP/2) or `Host` (HTTP/1.1).
pub(super) fn authority_of(uri: &Uri, headers: &HeaderMap) -> Option<String> {
    uri.authority().map(|a| a.as_str().to_owned()).or_else(|| {
        headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    })
}

#[doc(hidden)] // pub for the fuzz target `hbone_headers`.
pub fn host_without_port(authority: &str) -> String {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or_default().to_owned();
    }
    authority
        .rsplit_once(':')
        .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
        .map_or(authority, |(host, _)| host)
        .to_owned()
}

/// Connection-specific headers (RFC 9110 §7.6.1) never cross the proxy; `te: trailers`
/// does (gRPC needs it).
pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|name| name.trim().to_ascii_lowercase())
        .collect();
    for name in named {
        headers.remove(name.as_str());
    }
    for name in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
    ] {
        headers.remove(name);
    }
    if headers
        .get(header::TE)
        .is_some_and(|v| v.as_bytes() != b"trailers")
    {
        headers.remove(header::TE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_lose_their_port() {
        assert_eq!(host_without_port("shop:8080"), "shop");
        assert_eq!(host_without_port("shop"), "shop");
        assert_eq!(host_without_port("[::1]:80"), "::1");
    }

    #[test]
    fn hop_by_hop_headers_are_dropped_but_te_trailers_stays() {
        let mut headers = HeaderMap::new();
        headers.insert("connection", HeaderValue::from_static("x-private, close"));
        headers.insert("x-private", HeaderValue::from_static("1"));
        headers.insert("te", HeaderValue::from_static("trailers"));
        headers.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut headers);
        assert!(!headers.contains_key("x-private"));
        assert!(!headers.contains_key("connection"));
        assert_eq!(headers["te"], "trailers");
        assert_eq!(headers["x-keep"], "1");
    }
}
