use std::{
    convert::Infallible,
    net::SocketAddr,
    time::{Duration, UNIX_EPOCH},
};

use http::{HeaderValue, Response, StatusCode};
use hyper::service::service_fn;
use serde_json::Value;
use tokio::{io::AsyncReadExt as _, net::TcpListener};

use super::*;
use crate::telemetry::{
    Prefix,
    trace::{SpanId, TraceContext, TraceId},
};

/// What the fake collector saw of one POST.
#[derive(Debug)]
struct Received {
    /// 0 for the collector's first TCP connection, 1 for the next, …
    connection: usize,
    path: String,
    content_type: Option<String>,
    body: Value,
}

/// A real HTTP/1.1 collector on 127.0.0.1:0 answering `status` to every POST.
async fn collector(status: StatusCode) -> (SocketAddr, mpsc::UnboundedReceiver<Received>) {
    collector_answering(status, "{}").await
}

async fn collector_answering(
    status: StatusCode,
    answer: &'static str,
) -> (SocketAddr, mpsc::UnboundedReceiver<Received>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        for connection in 0.. {
            let (stream, _) = listener.accept().await.unwrap();
            let tx = tx.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let tx = tx.clone();
                    async move {
                        let path = req.uri().path().to_owned();
                        let content_type = req
                            .headers()
                            .get(header::CONTENT_TYPE)
                            .map(|v| v.to_str().unwrap().to_owned());
                        let bytes = req.into_body().collect().await.unwrap().to_bytes();
                        let body = serde_json::from_slice(&bytes).unwrap();
                        let _ = tx.send(Received {
                            connection,
                            path,
                            content_type,
                            body,
                        });
                        let mut answer =
                            Response::new(Full::new(Bytes::from_static(answer.as_bytes())));
                        *answer.status_mut() = status;
                        Ok::<_, Infallible>(answer)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, rx)
}

/// An address nothing listens on.
async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

fn config(addr: SocketAddr) -> Config {
    let mut config = Config::new(format!("http://{addr}"), "wp");
    config.namespace = Some("shop".to_owned());
    config
}

fn span(n: u8, parent: Option<SpanId>, error: bool) -> Span {
    let start = UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789);
    Span {
        context: TraceContext {
            trace_id: TraceId([
                0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0, 0, 0, 0, 0, 0, 0, n,
            ]),
            span_id: SpanId([0, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, n]),
            parent,
            sampled: true,
            tracestate: None,
            b3: None,
        },
        name: format!("GET /item/{n}"),
        start,
        end: start + Duration::from_millis(7),
        attributes: vec![
            ("http.request.method", "GET".to_owned()),
            (
                "http.response.status_code",
                if error { "503" } else { "200" }.to_owned(),
            ),
        ],
        error,
    }
}

fn spans_of(received: &Received) -> &Vec<Value> {
    received.body["resourceSpans"][0]["scopeSpans"][0]["spans"]
        .as_array()
        .expect("spans array")
}

async fn next(rx: &mut mpsc::UnboundedReceiver<Received>) -> Received {
    tokio::time::timeout(weft_test_env::scaled(Duration::from_secs(5)), rx.recv())
        .await
        .expect("collector received nothing in time")
        .expect("collector alive")
}

#[tokio::test]
async fn a_batch_reaches_the_collector_as_otlp_json() {
    let (addr, mut rx) = collector(StatusCode::OK).await;
    let metrics = Metrics::default();
    let exporter = OtlpExporter::new(config(addr), metrics.clone()).unwrap();
    let mut child = span(1, Some(SpanId([0x11; 8])), true);
    child.context.tracestate = Some(HeaderValue::from_static("k=v"));
    exporter.export(child);
    exporter.export(span(2, None, false));
    exporter.flush().await;

    let got = next(&mut rx).await;
    assert_eq!(got.path, "/v1/traces");
    assert_eq!(got.content_type.as_deref(), Some("application/json"));
    let resource = &got.body["resourceSpans"][0]["resource"]["attributes"];
    assert_eq!(resource[0]["key"], "service.name");
    assert_eq!(resource[0]["value"]["stringValue"], "wp");
    assert_eq!(resource[1]["key"], "k8s.namespace.name");
    assert_eq!(resource[1]["value"]["stringValue"], "shop");

    let spans = spans_of(&got);
    assert_eq!(spans.len(), 2);
    let first = &spans[0];
    assert_eq!(first["traceId"], "4bf92f3577b34da60000000000000001");
    assert_eq!(first["spanId"], "00f067aa0ba90201");
    assert_eq!(first["parentSpanId"], "1111111111111111");
    assert_eq!(first["traceState"], "k=v");
    assert_eq!(first["name"], "GET /item/1");
    assert_eq!(first["kind"], 2);
    assert_eq!(first["startTimeUnixNano"], "1700000000123456789");
    assert_eq!(first["endTimeUnixNano"], "1700000000130456789");
    assert_eq!(first["status"]["code"], 2);
    assert_eq!(first["attributes"][0]["key"], "http.request.method");
    assert_eq!(first["attributes"][0]["value"]["stringValue"], "GET");
    assert_eq!(first["attributes"][1]["value"]["stringValue"], "503");
    let second = &spans[1];
    assert!(
        second.get("parentSpanId").is_none(),
        "a root span has no parent"
    );
    assert_eq!(second["status"]["code"], 0);
    assert_eq!(metrics.exported(), 2);
}

#[tokio::test]
async fn full_batches_go_out_at_the_batch_size_and_the_rest_on_the_timer() {
    let (addr, mut rx) = collector(StatusCode::OK).await;
    let mut config = config(addr);
    config.batch_size = 2;
    config.batch_interval = Duration::from_millis(200);
    let exporter = OtlpExporter::new(config, Metrics::default()).unwrap();
    for n in 0..5 {
        exporter.export(span(n, None, false));
    }
    let sizes = [
        spans_of(&next(&mut rx).await).len(),
        spans_of(&next(&mut rx).await).len(),
        // No flush: the last, partial batch leaves when the interval elapses.
        spans_of(&next(&mut rx).await).len(),
    ];
    assert_eq!(sizes, [2, 2, 1]);
    // The collector saw the last batch before the exporter read its answer.
    exporter.flush().await;
    assert_eq!(exporter.metrics().exported(), 5);
}

#[tokio::test]
async fn a_collector_that_is_down_costs_errors_not_latency() {
    let addr = closed_port().await;
    let metrics = Metrics::default();
    let exporter = OtlpExporter::new(config(addr), metrics.clone()).unwrap();
    for n in 0..100 {
        exporter.export(span(n, None, false));
    }
    exporter.flush().await;
    assert_eq!(
        metrics.errors_for("connect"),
        1,
        "one batch, one failed POST"
    );
    assert_eq!(metrics.dropped_for("export_failed"), 100);
    assert_eq!(metrics.exported(), 0);
    // The next batch tries again.
    exporter.export(span(1, None, false));
    exporter.flush().await;
    assert_eq!(metrics.errors_for("connect"), 2);
}

/// Latency without a clock: the collector holds the worker's POST unanswered for the whole
/// test, so an export that waited for the collector (or for room in the queue) would never
/// return. The exports run on a thread of their own and must all return, each span either
/// queued or dropped and counted.
#[tokio::test]
async fn exports_never_wait_for_a_collector_that_does_not_answer() {
    let collector = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut config = config(collector.local_addr().unwrap());
    config.queue_capacity = 8;
    // Longer than the test: the POST stays pending, it does not fail.
    config.timeout = Duration::from_secs(3600);
    let metrics = Metrics::default();
    let exporter = std::sync::Arc::new(OtlpExporter::new(config, metrics.clone()).unwrap());
    exporter.export(span(0, None, false));
    let flushing = tokio::spawn({
        let exporter = std::sync::Arc::clone(&exporter);
        async move { exporter.flush().await }
    });
    // The worker's POST reached the collector, which never answers it.
    let (mut held, _) = collector.accept().await.unwrap();
    let mut first = [0; 4];
    held.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"POST");

    let exporting = tokio::task::spawn_blocking({
        let exporter = std::sync::Arc::clone(&exporter);
        move || {
            for n in 1..=100 {
                exporter.export(span(n, None, false));
            }
        }
    });
    // Returning at all is the property; the bound only turns a hang into a failure.
    tokio::time::timeout(weft_test_env::scaled(Duration::from_secs(60)), exporting)
        .await
        .expect("export waited for the collector, which holds the POST unanswered")
        .unwrap();
    assert_eq!(
        metrics.dropped_for("queue_full"),
        100 - 8,
        "the queue holds 8, the rest is dropped and counted"
    );
    assert_eq!(metrics.exported(), 0, "the collector answered nothing");
    assert!(!flushing.is_finished(), "the first POST is still pending");
    flushing.abort();
}

#[tokio::test]
async fn a_collector_refusing_the_batch_counts_an_error() {
    let (addr, mut rx) = collector(StatusCode::INTERNAL_SERVER_ERROR).await;
    let metrics = Metrics::default();
    let exporter = OtlpExporter::new(config(addr), metrics.clone()).unwrap();
    exporter.export(span(1, None, false));
    exporter.flush().await;
    next(&mut rx).await;
    assert_eq!(metrics.errors_for("status"), 1);
    assert_eq!(metrics.exported(), 0);
}

#[tokio::test]
async fn spans_the_collector_rejects_are_dropped_not_exported() {
    let (addr, mut rx) = collector_answering(
        StatusCode::OK,
        r#"{"partialSuccess":{"rejectedSpans":"2","errorMessage":"too old"}}"#,
    )
    .await;
    let metrics = Metrics::default();
    let exporter = OtlpExporter::new(config(addr), metrics.clone()).unwrap();
    for n in 0..3 {
        exporter.export(span(n, None, false));
    }
    exporter.flush().await;
    next(&mut rx).await;
    assert_eq!(metrics.exported(), 1);
    assert_eq!(metrics.dropped_for("rejected"), 2);
    assert_eq!(metrics.errors_for("status"), 0);
}

#[test]
fn an_answer_without_partial_success_accepts_everything() {
    assert_eq!(Rejected::of(b""), Rejected::default());
    assert_eq!(Rejected::of(b"{}"), Rejected::default());
    assert_eq!(Rejected::of(br#"{"partialSuccess":{}}"#).spans, 0);
    assert_eq!(
        Rejected::of(br#"{"partialSuccess":{"rejectedSpans":5}}"#).spans,
        5
    );
}

#[tokio::test]
async fn a_silent_collector_times_out() {
    // Accepts connections, never answers.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut config = config(addr);
    config.timeout = Duration::from_millis(200);
    let metrics = Metrics::default();
    let exporter = OtlpExporter::new(config, metrics.clone()).unwrap();
    exporter.export(span(1, None, false));
    exporter.flush().await;
    assert_eq!(metrics.errors_for("timeout"), 1);
    drop(listener);
}

#[tokio::test]
async fn a_full_queue_drops_and_counts() {
    let (addr, mut rx) = collector(StatusCode::OK).await;
    let mut config = config(addr);
    config.queue_capacity = 4;
    let metrics = Metrics::default();
    let exporter = OtlpExporter::new(config, metrics.clone()).unwrap();
    // A current-thread runtime: the worker cannot run until this test yields, so the
    // queue holds exactly its capacity.
    for n in 0..10 {
        exporter.export(span(n, None, false));
    }
    assert_eq!(metrics.dropped_for("queue_full"), 6);
    exporter.flush().await;
    assert_eq!(spans_of(&next(&mut rx).await).len(), 4);
    assert_eq!(metrics.exported(), 4);
}

#[tokio::test]
async fn unsampled_spans_are_not_exported() {
    let (addr, mut rx) = collector(StatusCode::OK).await;
    let metrics = Metrics::default();
    let exporter = OtlpExporter::new(config(addr), metrics.clone()).unwrap();
    let mut unsampled = span(1, None, false);
    unsampled.context.sampled = false;
    exporter.export(unsampled);
    exporter.export(span(2, None, false));
    exporter.flush().await;
    let got = next(&mut rx).await;
    assert_eq!(spans_of(&got).len(), 1);
    assert_eq!(spans_of(&got)[0]["name"], "GET /item/2");
    assert_eq!(metrics.dropped_for("not_sampled"), 1);
}

#[tokio::test]
async fn shutdown_sends_the_last_batch() {
    let (addr, mut rx) = collector(StatusCode::OK).await;
    let exporter = OtlpExporter::new(config(addr), Metrics::default()).unwrap();
    exporter.export(span(1, None, false));
    exporter.shutdown(Duration::from_secs(5)).await;
    assert_eq!(spans_of(&next(&mut rx).await).len(), 1);
}

#[tokio::test]
async fn one_connection_carries_every_batch() {
    let (addr, mut rx) = collector(StatusCode::OK).await;
    let metrics = Metrics::default();
    let exporter = OtlpExporter::new(config(addr), metrics.clone()).unwrap();
    for n in 0..3 {
        exporter.export(span(n, None, false));
        exporter.flush().await;
    }
    assert_eq!(metrics.exported(), 3);
    for _ in 0..3 {
        assert_eq!(
            next(&mut rx).await.connection,
            0,
            "kept alive: one connection"
        );
    }
}

#[tokio::test]
async fn a_collector_that_closes_each_connection_costs_no_spans() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Answers one request per connection, then closes it without saying so (as an idle
    // timeout does): the exporter must notice and reconnect, not lose the next batch.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                let n = stream.read(&mut buf).await.unwrap();
                seen.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&seen);
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let length: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length: "))
                        .unwrap()
                        .parse()
                        .unwrap();
                    if body.len() >= length {
                        break;
                    }
                }
            }
            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
            stream.write_all(answer).await.unwrap();
        }
    });
    let metrics = Metrics::default();
    let exporter = OtlpExporter::new(config(addr), metrics.clone()).unwrap();
    for n in 0..3 {
        exporter.export(span(n, None, false));
        exporter.flush().await;
    }
    assert_eq!(metrics.exported(), 3);
    assert_eq!(metrics.dropped_for("export_failed"), 0);
}

#[test]
fn outside_a_runtime_the_exporter_is_refused_not_a_panic() {
    let err = OtlpExporter::new(
        Config::new("http://127.0.0.1:4318", "wp"),
        Metrics::default(),
    )
    .unwrap_err();
    assert!(err.to_string().starts_with("BUG:"), "{err}");
}

#[test]
fn endpoints_must_be_plain_http_with_a_host() {
    for bad in [
        "https://collector:4318",
        "collector:4318",
        "http://",
        "not a uri",
        "http://c:1/?q=1",
    ] {
        let err = Target::parse(bad).unwrap_err();
        assert_eq!(err.reason(), "invalid_endpoint", "{bad}");
    }
    let target = Target::parse("http://otel-collector.observability:4318").unwrap();
    assert_eq!(target.authority, "otel-collector.observability:4318");
    assert_eq!(target.uri.path(), "/v1/traces");
    let target = Target::parse("http://10.0.0.1/otlp/").unwrap();
    assert_eq!(target.authority, "10.0.0.1:4318");
    assert_eq!(target.uri.path(), "/otlp/v1/traces");
}

#[test]
fn counters_carry_the_registry_prefix() {
    let mut registry = Registry::new(&Prefix::new("istio").unwrap());
    let metrics = Metrics::new(&mut registry);
    metrics.exported.inc_by(3);
    metrics.dropped("queue_full");
    metrics.error("connect");
    let text = registry.encode().unwrap();
    assert!(text.contains("istio_otlp_spans_exported_total 3"), "{text}");
    assert!(
        text.contains("istio_otlp_spans_dropped_total{reason=\"queue_full\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("istio_otlp_export_errors_total{reason=\"connect\"} 1"),
        "{text}"
    );
}
