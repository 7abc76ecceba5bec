//! The one small HTTP/1.1 server the agent's admin, readiness and metrics ports, the
//! waypoint's and the CA's metrics port share: accept on a bound listener, answer each
//! request with a synchronous handler, log what goes wrong under the caller's component
//! name; and the responses those handlers build.

use std::{convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Request, Response, StatusCode,
    body::Incoming,
    header::{CONTENT_TYPE, HeaderValue},
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpListener;
use tracing::debug;

/// Serves `listener` with `handler` until the task is dropped. An accept error (out of file
/// descriptors, say) is logged and retried after a pause, never the end of the server.
pub async fn serve<H>(listener: TcpListener, component: &'static str, handler: H)
where
    H: Fn(&Request<Incoming>) -> Response<Full<Bytes>> + Send + Sync + 'static,
{
    let handler = Arc::new(handler);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                crate::warn_limited!(component, error = %e, "accept failed");
                tokio::time::sleep(ACCEPT_RETRY).await;
                continue;
            }
        };
        let handler = Arc::clone(&handler);
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let handler = Arc::clone(&handler);
                async move { Ok::<_, Infallible>(handler(&req)) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(component, peer = %peer, error = %e, "HTTP connection ended with an error");
            }
        });
    }
}

/// A response of `status` with `body` as `content_type`.
pub fn response(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// A plain-text response.
pub fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    response(status, TEXT, body)
}

/// `value` as pretty JSON, or a 500 saying why it could not be encoded.
pub fn json(value: &impl Serialize) -> Response<Full<Bytes>> {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => response(StatusCode::OK, "application/json", body),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode: {e}\n"),
        ),
    }
}

/// `text/plain` in UTF-8.
pub const TEXT: &str = "text/plain; charset=utf-8";
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
