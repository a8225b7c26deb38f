//! A request body with a deadline and a minimum rate: a client that sends headers and
//! then a byte now and then (a slowloris) is cut off instead of holding a connection,
//! a descriptor and a handler for as long as it likes.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::{Instant, Sleep};

use super::HttpLimits;

/// Time a body gets before the minimum rate counts: a client's first bytes may wait
/// for TCP's slow start or for a busy client to read its file.
pub const BODY_RATE_GRACE: Duration = Duration::from_secs(5);

/// Why a request body was cut off.
#[derive(Debug, thiserror::Error)]
pub enum BodyTooSlow {
    /// the request body did not arrive within {0:?}
    #[error("the request body did not arrive within {0:?} (--http-body-timeout)")]
    Deadline(Duration),
    /// the request body arrived slower than the minimum rate
    #[error(
        "the request body arrived slower than {rate} bytes/s ({received} bytes in {elapsed:?}; --http-min-body-rate)"
    )]
    Rate {
        rate: u64,
        received: u64,
        elapsed: Duration,
    },
}

/// hyper's request body, failed once it is late: past `body_timeout` from the
/// request's start, or behind `min_body_rate` after [`BODY_RATE_GRACE`].
pub struct BodyDeadline {
    inner: Incoming,
    limits: HttpLimits,
    started: Instant,
    received: u64,
    /// Fires when the body is late at the bytes received so far.
    timer: Pin<Box<Sleep>>,
    /// Set once the body was cut off: it then ends.
    expired: bool,
}

impl BodyDeadline {
    pub fn new(inner: Incoming, limits: HttpLimits) -> BodyDeadline {
        let started = Instant::now();
        let mut body = BodyDeadline {
            inner,
            limits,
            started,
            received: 0,
            timer: Box::pin(tokio::time::sleep_until(started)),
            expired: false,
        };
        let due = body.due();
        body.timer.as_mut().reset(due);
        body
    }

    /// When the body is late, given the bytes received so far.
    fn due(&self) -> Instant {
        let whole = self.started + self.limits.body_timeout;
        let rate = self.limits.min_body_rate.max(1);
        let earned = Duration::from_secs_f64(self.received as f64 / rate as f64);
        whole.min(self.started + BODY_RATE_GRACE + earned)
    }

    fn why(&self) -> BodyTooSlow {
        let elapsed = self.started.elapsed();
        if elapsed >= self.limits.body_timeout {
            BodyTooSlow::Deadline(self.limits.body_timeout)
        } else {
            BodyTooSlow::Rate {
                rate: self.limits.min_body_rate,
                received: self.received,
                elapsed,
            }
        }
    }
}

impl Body for BodyDeadline {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.expired {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.received += data.len() as u64;
                    let due = self.due();
                    self.timer.as_mut().reset(due);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                if self.timer.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                self.expired = true;
                let why = self.why();
                tracing::debug!(error = %why, "cutting off a slow request body");
                Poll::Ready(Some(Err(why.into())))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.expired || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
