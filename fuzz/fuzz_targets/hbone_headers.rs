//! What an HBONE peer or an HTTP client writes in headers, as weft parses it:
//! - the CONNECT target (`:authority`, `hbone::connect_target`);
//! - `forwarded: for=` (`waypoint::forwarded_for`, the waypoint's source address);
//! - `:authority`/`Host` without its port (`waypoint::host_without_port`, route matching);
//! - trace context (`traceparent`/`tracestate`, `b3`, `x-b3-*`:
//!   `telemetry::trace::TraceContext`), which the waypoint reads from every request.
//!
//! `baggage` is not parsed anywhere: the node proxy only passes it on (and sends none of
//! its own), so it has no target.
//!
//! Invariants besides "no panic": an accepted CONNECT target prints as an authority that
//! parses back to it; a trace context the waypoint writes reads back as itself.

#![no_main]

use arbitrary::Arbitrary;
use http::{HeaderMap, HeaderName, HeaderValue, Uri};
use libfuzzer_sys::fuzz_target;
use weft::{hbone, telemetry::trace::TraceContext, waypoint};

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    connect: &'a [u8],
    authority: &'a str,
    headers: Vec<(Header, &'a [u8])>,
}

#[derive(Arbitrary, Clone, Copy, Debug)]
enum Header {
    Forwarded,
    Host,
    Traceparent,
    Tracestate,
    B3,
    B3TraceId,
    B3SpanId,
    B3Sampled,
    B3Flags,
}

impl Header {
    fn name(self) -> HeaderName {
        HeaderName::from_static(match self {
            Header::Forwarded => "forwarded",
            Header::Host => "host",
            Header::Traceparent => "traceparent",
            Header::Tracestate => "tracestate",
            Header::B3 => "b3",
            Header::B3TraceId => "x-b3-traceid",
            Header::B3SpanId => "x-b3-spanid",
            Header::B3Sampled => "x-b3-sampled",
            Header::B3Flags => "x-b3-flags",
        })
    }
}

fuzz_target!(|input: Input<'_>| {
    if let Ok(uri) = Uri::try_from(input.connect)
        && let Some(target) = hbone::connect_target(&uri)
    {
        let printed = Uri::try_from(target.to_string()).expect("a socket address is a URI");
        assert_eq!(hbone::connect_target(&printed), Some(target));
    }

    let _ = waypoint::host_without_port(input.authority);

    let mut headers = HeaderMap::new();
    for (header, value) in input.headers {
        if let Ok(value) = HeaderValue::from_bytes(value) {
            headers.append(header.name(), value);
        }
    }
    let _ = waypoint::forwarded_for(&headers);

    let context = TraceContext::from_request(&headers);
    let mut sent = HeaderMap::new();
    context.inject(&mut sent);
    let read = TraceContext::from_request(&sent);
    assert_eq!(
        read.trace_id, context.trace_id,
        "the trace id survives a hop"
    );
    assert_eq!(
        read.parent,
        Some(context.span_id),
        "our span is the next hop's parent"
    );
    assert_eq!(
        read.sampled, context.sampled,
        "the sampling decision survives a hop"
    );
});
