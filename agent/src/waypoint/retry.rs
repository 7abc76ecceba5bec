//! Retries: which outcomes are retried, the backoff between tries (exponential from the
//! rule's base, full jitter), and request bodies that can be sent more than once (small
//! ones with a known length, buffered; anything else is streamed once, never retried).

use std::{
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};

use super::{Error, upstream::BoxBody};
use crate::state::route::Retry;

/// A request body as the tries see it.
pub enum RequestBody {
    /// Read whole: every try (and a mirror) gets a copy.
    Replayable(Replay),
    /// Streamed through once.
    Streaming(BoxBody),
}

/// A buffered body with its trailers, cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Replay {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
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
            return Ok(Self::Streaming(body));
        }
        let collected = body
            .collect()
            .await
            .map_err(|e| Error::Downstream(e.to_string()))?;
        let trailers = collected.trailers().cloned();
        let data = collected.to_bytes();
        Ok(Self::Replayable(Replay {
            data: (!data.is_empty()).then_some(data),
            trailers,
        }))
    }

    /// The body of the next try, and whether a try after it could resend it.
    pub fn take(&mut self) -> (BoxBody, bool) {
        match self {
            Self::Replayable(replay) => (replay.clone().boxed_unsync(), true),
            Self::Streaming(_) => {
                let Self::Streaming(body) =
                    std::mem::replace(self, Self::Replayable(Replay::default()))
                else {
                    unreachable!("matched Streaming above")
                };
                (body, false)
            }
        }
    }

    /// A copy for a mirror, if the body can be copied.
    pub fn copy(&self) -> Option<BoxBody> {
        match self {
            Self::Replayable(replay) => Some(replay.clone().boxed_unsync()),
            Self::Streaming(_) => None,
        }
    }
}

impl Body for Replay {
    type Data = Bytes;
    type Error = super::upstream::BoxError;

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

/// Whether a response status is one the rule retries.
pub fn retries_status(retry: &Retry, status: u16) -> bool {
    retry.codes.contains(&status)
}

/// The pause before try `attempt + 1` (`attempt` counts from 0): uniformly random in
/// `[0, base * 2^attempt]` (full jitter), capped at `MAX_BACKOFF`.
pub fn backoff(base: Duration, attempt: u32) -> Duration {
    let ceiling = base
        .saturating_mul(1u32.checked_shl(attempt.min(16)).unwrap_or(u32::MAX))
        .min(MAX_BACKOFF);
    let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(fastrand::u64(0..=nanos))
}

/// No pause between tries is longer than this.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_jittered_under_an_exponential_ceiling() {
        let base = Duration::from_millis(10);
        for attempt in 0..5 {
            for _ in 0..100 {
                assert!(backoff(base, attempt) <= base * 2u32.pow(attempt));
            }
        }
        assert!(backoff(Duration::from_secs(5), 30) <= MAX_BACKOFF);
    }
}
