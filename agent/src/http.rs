//! The one small HTTP/1.1 server the agent's admin, readiness and metrics ports and the CA's
//! metrics port share: accept on a bound listener, answer each request with a synchronous
//! handler, log what goes wrong under the caller's component name.

use std::{convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::{debug, warn};

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
                warn!(component, error = %e, "accept failed");
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

const ACCEPT_RETRY: Duration = Duration::from_millis(100);
