//! Retries: which outcomes are retried (the rule's `retry`, refined by the `TrafficPolicy`
//! `retry` of its route or rule), the backoff between tries (exponential from
//! the rule's base, full jitter, capped by the policy's maximum), and request bodies that
//! can be sent more than once.
//!
//! A body of known small length is read whole first (a mirror needs a copy of it too).
//! Any other body of a rule with retries streams to the first try while a copy is kept
//! (`Tape`) up to the replay limit: a retry replays the copy and continues from the
//! client, so nothing waits for the whole body (gRPC streams stay streams). A body that
//! outgrew the limit is never retried.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::{BodyExt, Empty};
use hyper::body::{Body, Frame, SizeHint};

use super::{
    Error,
    upstream::{BoxBody, BoxError},
};
use crate::{
    state::{
        route::Retry,
        traffic::{DEFAULT_MAX_BACKOFF, DEFAULT_RETRY_ON, RetryOn, RetryPolicy},
    },
    sync::Mutex,
};

/// How a try ended without a response, as the retry conditions tell endings apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// No connection to the endpoint.
    Connect,
    /// A connection, and no (whole) response on it: reset, closed, or the per-try timeout.
    Reset,
}

/// How a try ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    Response(u16),
    Failed(Failure),
}

/// A request body as the tries see it.
pub enum RequestBody {
    /// Read whole: every try (and a mirror) gets a copy.
    Buffered(Replay),
    /// Streamed to the tries, with a copy kept for the next one while it fits.
    Recorded(Arc<Mutex<Tape>>),
    /// Streamed through once (taken by the first try).
    Streaming(Option<BoxBody>),
}

/// A buffered body with its trailers, cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Replay {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

/// The client's body and what of it has been read so far.
pub struct Tape {
    source: BoxBody,
    frames: Vec<Frame<Bytes>>,
    bytes: usize,
    limit: usize,
    overflowed: bool,
    ended: bool,
    /// Bumped by every new reader; older readers (of abandoned tries) stop.
    generation: u64,
}

/// One try's view of a `Tape`.
struct TapeReader {
    tape: Arc<Mutex<Tape>>,
    generation: u64,
    position: usize,
}

impl RequestBody {
    /// Buffers `body` when it is known to end within `limit` bytes; streams it otherwise.
    pub async fn read(body: BoxBody, limit: usize) -> Result<Self, Error> {
        let hint = body.size_hint();
        let small = body.is_end_stream()
            || hint
                .exact()
                .is_some_and(|n| usize::try_from(n).is_ok_and(|n| n <= limit));
        if !small {
            return Ok(Self::Streaming(Some(body)));
        }
        let collected = body
            .collect()
            .await
            .map_err(|e| Error::Downstream(e.to_string()))?;
        let trailers = collected.trailers().cloned();
        let data = collected.to_bytes();
        Ok(Self::Buffered(Replay {
            data: (!data.is_empty()).then_some(data),
            trailers,
        }))
    }

    /// A streamed body becomes one that keeps a copy of up to `limit` bytes for retries.
    pub fn recorded(self, limit: usize) -> Self {
        match self {
            Self::Streaming(Some(source)) => Self::Recorded(Arc::new(Mutex::new(Tape {
                source,
                frames: Vec::new(),
                bytes: 0,
                limit,
                overflowed: false,
                ended: false,
                generation: 0,
            }))),
            other => other,
        }
    }

    /// The body of the next try.
    pub fn take(&mut self) -> BoxBody {
        match self {
            Self::Buffered(replay) => replay.clone().boxed_unsync(),
            Self::Recorded(tape) => {
                let generation = {
                    let mut tape = tape.lock();
                    tape.generation += 1;
                    tape.generation
                };
                TapeReader {
                    tape: Arc::clone(tape),
                    generation,
                    position: 0,
                }
                .boxed_unsync()
            }
            // Only ever taken once: `replayable` is false after that.
            Self::Streaming(body) => body
                .take()
                .unwrap_or_else(|| Empty::new().map_err(|never| match never {}).boxed_unsync()),
        }
    }

    /// Whether another try can send the whole body again.
    pub fn replayable(&self) -> bool {
        match self {
            Self::Buffered(_) => true,
            Self::Recorded(tape) => !tape.lock().overflowed,
            Self::Streaming(body) => body.is_some(),
        }
    }

    /// A copy for a mirror, if the body was read whole.
    pub fn copy(&self) -> Option<BoxBody> {
        match self {
            Self::Buffered(replay) => Some(replay.clone().boxed_unsync()),
            Self::Recorded(_) | Self::Streaming(_) => None,
        }
    }
}

impl Body for TapeReader {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let mut tape = this.tape.lock();
        if tape.generation != this.generation {
            return Poll::Ready(Some(Err("request body taken by a later try".into())));
        }
        if let Some(frame) = tape.frames.get(this.position) {
            let copy = copy_frame(frame);
            this.position += 1;
            return Poll::Ready(Some(Ok(copy)));
        }
        if tape.ended {
            return Poll::Ready(None);
        }
        let polled = Pin::new(&mut tape.source).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                let size = frame.data_ref().map_or(0, Bytes::len);
                if !tape.overflowed && tape.bytes + size <= tape.limit {
                    tape.bytes += size;
                    tape.frames.push(copy_frame(frame));
                    this.position = tape.frames.len();
                } else if !tape.overflowed {
                    // Too big to keep: this try is the last one.
                    tape.overflowed = true;
                    tape.frames = Vec::new();
                }
            }
            Poll::Ready(None) => tape.ended = true,
            Poll::Ready(Some(Err(_))) | Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        let tape = self.tape.lock();
        tape.ended && self.position >= tape.frames.len()
    }
}

fn copy_frame(frame: &Frame<Bytes>) -> Frame<Bytes> {
    match (frame.data_ref(), frame.trailers_ref()) {
        (Some(data), _) => Frame::data(data.clone()),
        (None, Some(trailers)) => Frame::trailers(trailers.clone()),
        (None, None) => Frame::data(Bytes::new()),
    }
}

impl Body for Replay {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Some(data) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}

/// Whether a try that ended so is retried, under the rule's `retry` and the conditions of
/// its `TrafficPolicy` (any of them; no policy: `DEFAULT_RETRY_ON`).
pub fn retries(retry: &Retry, policy: Option<&RetryPolicy>, ending: Ending) -> bool {
    let on = policy.map_or(&DEFAULT_RETRY_ON[..], |p| &p.on);
    on.iter().any(|on| match (on, ending) {
        (RetryOn::ConnectFailure, Ending::Failed(failure)) => failure == Failure::Connect,
        // As Envoy's: no response at all is a 5xx and a gateway error (the waypoint's own
        // answer would be one).
        (RetryOn::Reset | RetryOn::ServerError | RetryOn::GatewayError, Ending::Failed(_)) => true,
        (RetryOn::ServerError, Ending::Response(status)) => (500..=599).contains(&status),
        (RetryOn::GatewayError, Ending::Response(status)) => (502..=504).contains(&status),
        (RetryOn::RetriableStatusCodes, Ending::Response(status)) => retry.codes.contains(&status),
        (RetryOn::ConnectFailure | RetryOn::Reset, Ending::Response(_))
        | (RetryOn::RetriableStatusCodes, Ending::Failed(_)) => false,
    })
}

/// The longest pause between tries under `policy` (no policy: `DEFAULT_MAX_BACKOFF`).
pub fn max_backoff(policy: Option<&RetryPolicy>) -> Duration {
    policy.map_or(DEFAULT_MAX_BACKOFF, |p| p.max_backoff)
}

/// The pause before try `attempt + 1` (`attempt` counts from 0): uniformly random in
/// `[0, envelope(base, attempt, max)]` (full jitter).
pub fn backoff(base: Duration, attempt: u32, max: Duration) -> Duration {
    let ceiling = envelope(base, attempt, max);
    let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(fastrand::u64(0..=nanos))
}

/// The longest pause before try `attempt + 1`: `base * 2^attempt`, at most `max`.
pub fn envelope(base: Duration, attempt: u32, max: Duration) -> Duration {
    base.saturating_mul(1u32.checked_shl(attempt.min(16)).unwrap_or(u32::MAX))
        .min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retry(codes: &[u16]) -> Retry {
        Retry {
            attempts: 1,
            codes: codes.to_vec(),
            backoff: Duration::from_millis(25),
        }
    }

    fn on(conditions: &[RetryOn]) -> RetryPolicy {
        RetryPolicy {
            on: conditions.to_vec(),
            ..RetryPolicy::default()
        }
    }

    #[test]
    fn the_envelope_doubles_from_the_base_up_to_the_maximum() {
        let ms = Duration::from_millis;
        let envelopes: Vec<_> = (0..6)
            .map(|attempt| envelope(ms(100), attempt, ms(1000)))
            .collect();
        assert_eq!(
            envelopes,
            [ms(100), ms(200), ms(400), ms(800), ms(1000), ms(1000)]
        );
        // Far attempts and huge bases saturate at the maximum instead of overflowing.
        assert_eq!(envelope(ms(100), u32::MAX, ms(1000)), ms(1000));
        assert_eq!(
            envelope(Duration::MAX, 3, Duration::from_secs(10)),
            Duration::from_secs(10)
        );
    }

    #[test]
    fn backoff_is_uniform_under_the_envelope() {
        let base = Duration::from_millis(10);
        let max = Duration::from_millis(50);
        for attempt in 0..5 {
            let ceiling = envelope(base, attempt, max);
            let pauses: Vec<_> = (0..2000).map(|_| backoff(base, attempt, max)).collect();
            assert!(pauses.iter().all(|p| *p <= ceiling));
            // Full jitter: the mean is half the envelope (σ of the mean ≈ 0.65 % of it,
            // so 5 % is over 7σ), and the pauses spread over it.
            let mean = pauses.iter().sum::<Duration>() / 2000;
            let half = ceiling / 2;
            assert!(mean.abs_diff(half) < ceiling / 20, "{mean:?} vs {half:?}");
            assert!(pauses.iter().any(|p| *p < ceiling / 10));
            assert!(pauses.iter().any(|p| *p > ceiling * 9 / 10));
        }
    }

    #[test]
    fn the_conditions_select_what_is_retried() {
        use Ending::{Failed, Response};
        let rule = retry(&[503, 409]);
        let endings = [
            Response(409),
            Response(500),
            Response(502),
            Response(503),
            Response(200),
            Failed(Failure::Connect),
            Failed(Failure::Reset),
        ];
        let retried = |policy: Option<&RetryPolicy>| -> Vec<Ending> {
            endings
                .into_iter()
                .filter(|e| retries(&rule, policy, *e))
                .collect()
        };
        let failed = [Failed(Failure::Connect), Failed(Failure::Reset)];
        // Without a policy: the codes, and every failure without a response.
        assert_eq!(
            retried(None),
            [Response(409), Response(503), failed[0], failed[1]]
        );
        assert_eq!(retried(Some(&on(&[RetryOn::ConnectFailure]))), [failed[0]]);
        assert_eq!(retried(Some(&on(&[RetryOn::Reset]))), failed);
        assert_eq!(
            retried(Some(&on(&[RetryOn::ServerError]))),
            [
                Response(500),
                Response(502),
                Response(503),
                failed[0],
                failed[1]
            ]
        );
        assert_eq!(
            retried(Some(&on(&[RetryOn::GatewayError]))),
            [Response(502), Response(503), failed[0], failed[1]]
        );
        assert_eq!(
            retried(Some(&on(&[RetryOn::RetriableStatusCodes]))),
            [Response(409), Response(503)]
        );
    }
}
