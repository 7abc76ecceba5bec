//! Trace context of L7 requests: W3C `traceparent` (and `tracestate`) and Zipkin B3 (the
//! single `b3` header or the `x-b3-*` set) are read from a request, the waypoint's own span
//! becomes the parent of what it sends on, and the same formats the client used are written
//! to the request to the backend. A request without any trace context starts a new trace.
//!
//! Finished spans go to a `SpanExporter` when a collector is configured (OTLP), and
//! nowhere otherwise.

use std::time::SystemTime;

use http::{HeaderMap, HeaderValue};

/// A 16-byte trace id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TraceId(pub [u8; 16]);

/// An 8-byte span id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SpanId(pub [u8; 8]);

/// The trace context of one request as the waypoint forwards it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: TraceId,
    /// The waypoint's span for this request: the parent of the backend's.
    pub span_id: SpanId,
    /// The client's span, if the request carried one.
    pub parent: Option<SpanId>,
    pub sampled: bool,
    /// W3C `tracestate`, passed on untouched.
    pub tracestate: Option<HeaderValue>,
    /// Which formats the request came with (W3C is always written).
    pub b3: Option<B3Format>,
}

/// How the client sent B3.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum B3Format {
    /// `b3: {trace}-{span}-{sampled}-{parent}`.
    Single,
    /// `x-b3-traceid`, `x-b3-spanid`, `x-b3-parentspanid`, `x-b3-sampled`.
    Multi,
}

/// A finished span of the waypoint.
#[derive(Clone, Debug)]
pub struct Span {
    pub context: TraceContext,
    /// `GET /path`-style name.
    pub name: String,
    pub start: SystemTime,
    pub end: SystemTime,
    /// `http.request.method`, `http.response.status_code`, `url.path`, … as strings.
    pub attributes: Vec<(&'static str, String)>,
    /// Whether the request failed (5xx or no response).
    pub error: bool,
}

/// Where finished spans go. `export` must not block: a slow collector costs spans, never
/// request latency.
pub trait SpanExporter: Send + Sync + 'static {
    fn export(&self, span: Span);
}

impl TraceContext {
    /// The context for a request with these headers: a child of the client's span when it
    /// sent a valid one (W3C first, then B3), else a new sampled trace.
    pub fn from_request(headers: &HeaderMap) -> Self {
        let tracestate = headers.get(TRACESTATE).cloned();
        if let Some((trace_id, parent, sampled)) = headers
            .get(TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_traceparent)
        {
            return Self::child(trace_id, parent, sampled, tracestate, b3_format(headers));
        }
        if let Some((trace_id, parent, sampled)) = parse_b3(headers) {
            return Self::child(trace_id, parent, sampled, tracestate, b3_format(headers));
        }
        Self {
            trace_id: TraceId(random_nonzero()),
            span_id: SpanId(random_nonzero()),
            parent: None,
            // `b3: 0` is B3's "do not sample", carried without ids.
            sampled: headers.get(B3).is_none_or(|v| v != "0"),
            tracestate,
            b3: None,
        }
    }

    /// Writes this context onto the request to the backend: `traceparent` always (with
    /// `tracestate` if there was one), B3 in the format the client used.
    pub fn inject(&self, headers: &mut HeaderMap) {
        let flags = if self.sampled { "01" } else { "00" };
        let traceparent = format!("00-{}-{}-{flags}", self.trace_id, self.span_id);
        headers.insert(TRACEPARENT, header_value(traceparent));
        if let Some(state) = &self.tracestate {
            headers.insert(TRACESTATE, state.clone());
        }
        let sampled = if self.sampled { "1" } else { "0" };
        match self.b3 {
            None => {}
            Some(B3Format::Single) => {
                let value = format!("{}-{}-{sampled}", self.trace_id, self.span_id);
                headers.insert(B3, header_value(value));
            }
            Some(B3Format::Multi) => {
                headers.insert(B3_TRACE_ID, header_value(self.trace_id.to_string()));
                headers.insert(B3_SPAN_ID, header_value(self.span_id.to_string()));
                headers.insert(
                    B3_SAMPLED,
                    HeaderValue::from_static(if self.sampled { "1" } else { "0" }),
                );
                match self.parent {
                    Some(parent) => {
                        headers.insert(B3_PARENT_SPAN_ID, header_value(parent.to_string()));
                    }
                    None => {
                        headers.remove(B3_PARENT_SPAN_ID);
                    }
                }
            }
        }
    }

    fn child(
        trace_id: TraceId,
        parent: SpanId,
        sampled: bool,
        tracestate: Option<HeaderValue>,
        b3: Option<B3Format>,
    ) -> Self {
        Self {
            trace_id,
            span_id: SpanId(random_nonzero()),
            parent: Some(parent),
            sampled,
            tracestate,
            b3,
        }
    }
}

impl std::fmt::Display for TraceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl std::fmt::Display for SpanId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// `00-<32 hex>-<16 hex>-<2 hex>`; ids of all zeros are invalid (W3C trace-context §3.2).
fn parse_traceparent(text: &str) -> Option<(TraceId, SpanId, bool)> {
    let mut parts = text.trim().split('-');
    let version = parts.next()?;
    if version.len() != 2 || version == "ff" {
        return None;
    }
    let trace_id = TraceId(hex_nonzero(parts.next()?)?);
    let span_id = SpanId(hex_nonzero(parts.next()?)?);
    let flags = u8::from_str_radix(parts.next().filter(|f| f.len() == 2)?, 16).ok()?;
    // Version 00 has exactly four fields; later versions may append more.
    if version == "00" && parts.next().is_some() {
        return None;
    }
    Some((trace_id, span_id, flags & 1 == 1))
}

/// The single `b3` header, else the `x-b3-*` set. B3 trace ids may be 64-bit: those are
/// left-padded to 128 bits, as the W3C header needs.
fn parse_b3(headers: &HeaderMap) -> Option<(TraceId, SpanId, bool)> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(single) = text(B3) {
        let mut parts = single.trim().split('-');
        let trace_id = b3_trace_id(parts.next()?)?;
        let span_id = SpanId(hex_nonzero(parts.next()?)?);
        let sampled = parts.next().is_none_or(|s| s == "1" || s == "d");
        return Some((trace_id, span_id, sampled));
    }
    let trace_id = b3_trace_id(text(B3_TRACE_ID)?)?;
    let span_id = SpanId(hex_nonzero(text(B3_SPAN_ID)?)?);
    let sampled =
        text(B3_SAMPLED).is_none_or(|s| s == "1" || s == "true") || text(B3_FLAGS) == Some("1");
    Some((trace_id, span_id, sampled))
}

fn b3_format(headers: &HeaderMap) -> Option<B3Format> {
    if headers.contains_key(B3) {
        Some(B3Format::Single)
    } else if headers.contains_key(B3_TRACE_ID) {
        Some(B3Format::Multi)
    } else {
        None
    }
}

fn b3_trace_id(text: &str) -> Option<TraceId> {
    match text.len() {
        32 => hex_nonzero(text).map(TraceId),
        16 => {
            let low: [u8; 8] = hex_nonzero(text)?;
            let mut id = [0; 16];
            id[8..].copy_from_slice(&low);
            Some(TraceId(id))
        }
        _ => None,
    }
}

fn hex_nonzero<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != 2 * N || !text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut out = [0; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    out.iter().any(|b| *b != 0).then_some(out)
}

fn random_nonzero<const N: usize>() -> [u8; N] {
    loop {
        let mut out = [0; N];
        out.iter_mut().for_each(|b| *b = fastrand::u8(..));
        if out.iter().any(|b| *b != 0) {
            return out;
        }
    }
}

fn header_value(text: String) -> HeaderValue {
    HeaderValue::try_from(text).expect("hex and dashes are a valid header value")
}

pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";
pub const B3: &str = "b3";
pub const B3_TRACE_ID: &str = "x-b3-traceid";
pub const B3_SPAN_ID: &str = "x-b3-spanid";
pub const B3_PARENT_SPAN_ID: &str = "x-b3-parentspanid";
pub const B3_SAMPLED: &str = "x-b3-sampled";
pub const B3_FLAGS: &str = "x-b3-flags";

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_w3c_parent_becomes_the_parent_of_a_new_span_in_the_same_trace() {
        let ctx = TraceContext::from_request(&headers(&[(TRACEPARENT, TP), (TRACESTATE, "k=v")]));
        assert_eq!(ctx.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(ctx.parent.unwrap().to_string(), "00f067aa0ba902b7");
        assert_ne!(ctx.span_id, ctx.parent.unwrap());
        assert!(ctx.sampled);
        let mut out = HeaderMap::new();
        ctx.inject(&mut out);
        let written = out[TRACEPARENT].to_str().unwrap();
        assert_eq!(
            written,
            format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{}-01", ctx.span_id)
        );
        assert_eq!(out[TRACESTATE], "k=v");
        assert!(!out.contains_key(B3), "B3 only when the client used it");
    }

    #[test]
    fn b3_is_read_in_both_forms_and_written_back_in_the_same_one() {
        let single = TraceContext::from_request(&headers(&[(
            B3,
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1",
        )]));
        assert_eq!(
            single.trace_id.to_string(),
            "80f198ee56343ba864fe8b2a57d3eff7"
        );
        let mut out = HeaderMap::new();
        single.inject(&mut out);
        assert!(
            out[B3]
                .to_str()
                .unwrap()
                .starts_with("80f198ee56343ba864fe8b2a57d3eff7-")
        );
        assert!(out.contains_key(TRACEPARENT));

        let multi = TraceContext::from_request(&headers(&[
            (B3_TRACE_ID, "a3ce929d0e0e4736"),
            (B3_SPAN_ID, "00f067aa0ba902b7"),
            (B3_SAMPLED, "0"),
        ]));
        assert_eq!(
            multi.trace_id.to_string(),
            "0000000000000000a3ce929d0e0e4736"
        );
        assert!(!multi.sampled);
        let mut out = HeaderMap::new();
        multi.inject(&mut out);
        assert_eq!(out[B3_PARENT_SPAN_ID], "00f067aa0ba902b7");
        assert_eq!(out[B3_SAMPLED], "0");
        assert!(out[TRACEPARENT].to_str().unwrap().ends_with("-00"));
    }

    #[test]
    fn invalid_or_missing_context_starts_a_new_trace() {
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "garbage",
        ] {
            let mut h = HeaderMap::new();
            h.insert(TRACEPARENT, HeaderValue::from_static(bad));
            let ctx = TraceContext::from_request(&h);
            assert_eq!(ctx.parent, None, "{bad}");
            assert!(ctx.sampled);
        }
        let fresh = TraceContext::from_request(&HeaderMap::new());
        assert_ne!(fresh.trace_id, TraceId([0; 16]));
        let unsampled = TraceContext::from_request(&headers(&[(B3, "0")]));
        assert!(!unsampled.sampled, "b3: 0 asks for no sampling");
    }
}
