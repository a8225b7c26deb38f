//! What a connection is doing, for its deadlines: when bytes last moved, whether a
//! request is being answered, and since when the head of the next request has been
//! arriving. The deadlines are kept here rather than by hyper's `header_read_timeout`,
//! which also runs while a keep-alive connection waits between requests (closing it
//! after [`HEADER_TIMEOUT`], not [`IDLE_TIMEOUT`]) and, after the server itself was held
//! up (a stopped or starved process), can fire before the request already waiting in the
//! socket is read: the connection was then dropped with that request unread, which the
//! client sees as "connection reset by peer".

use std::future::Future;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::{HEADER_TIMEOUT, IDLE_TIMEOUT};

/// Why a connection is closed by its deadlines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Overdue {
    /// Nothing came: no first request within [`HEADER_TIMEOUT`] of connecting, or no
    /// next one within [`IDLE_TIMEOUT`] of the last answer.
    Silent,
    /// A request's head began to arrive but was not complete within [`HEADER_TIMEOUT`].
    Head,
}

/// When bytes last moved on a connection, and how many requests are being answered.
pub(super) struct Activity {
    epoch: Instant,
    last_us: AtomicU64,
    /// Requests whose head was read.
    requests: AtomicU64,
    /// Requests whose answer was made.
    answered: AtomicU64,
    /// One more than the time (µs after `epoch`) the first byte of a request not yet
    /// started was read; zero when none is arriving.
    head_since_us: AtomicU64,
}

impl Activity {
    pub(super) fn new() -> Activity {
        Activity {
            epoch: Instant::now(),
            last_us: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            answered: AtomicU64::new(0),
            head_since_us: AtomicU64::new(0),
        }
    }

    fn now_us(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX - 1)
    }

    fn touch(&self) {
        self.last_us.store(self.now_us(), Ordering::Relaxed);
    }

    fn answering(&self) -> bool {
        self.requests.load(Ordering::Relaxed) > self.answered.load(Ordering::Relaxed)
    }

    /// Bytes were read: when no request is being answered they begin the next one.
    fn read_some(&self) {
        self.touch();
        if !self.answering() && self.head_since_us.load(Ordering::Relaxed) == 0 {
            self.head_since_us
                .store(self.now_us() + 1, Ordering::Relaxed);
        }
    }

    /// A request's head was read.
    pub(super) fn request_started(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.head_since_us.store(0, Ordering::Relaxed);
    }

    /// Whether the connection is past a deadline. `unread` says whether the client has
    /// sent bytes the server has not read yet: such a connection is never overdue, as
    /// they are read next (the server, not the client, was late).
    pub(super) fn overdue(&self, unread: bool) -> Option<Overdue> {
        if unread || self.answering() {
            return None;
        }
        let now = Duration::from_micros(self.now_us());
        let head_since = self.head_since_us.load(Ordering::Relaxed);
        if head_since != 0 {
            let since = Duration::from_micros(head_since - 1);
            return (now.saturating_sub(since) > HEADER_TIMEOUT).then_some(Overdue::Head);
        }
        // A new client sends its request at once; between requests a keep-alive
        // connection may wait longer.
        let limit = if self.answered.load(Ordering::Relaxed) == 0 {
            HEADER_TIMEOUT
        } else {
            IDLE_TIMEOUT
        };
        let last = Duration::from_micros(self.last_us.load(Ordering::Relaxed));
        (now.saturating_sub(last) > limit).then_some(Overdue::Silent)
    }
}

/// Whether the socket `fd` holds bytes its reader has not read. `fd` must be open.
pub(super) fn has_unread(fd: RawFd) -> bool {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int; the caller keeps `fd` open.
    let rc = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) };
    rc == 0 && n > 0
}

/// Counts a request as answered when its response future completes.
#[derive(Clone)]
pub(super) struct InFlight<S> {
    pub(super) inner: S,
    pub(super) activity: Arc<Activity>,
}

impl<S, R> tower::Service<R> for InFlight<S>
where
    S: tower::Service<R>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> Self::Future {
        self.activity.request_started();
        let fut = self.inner.call(req);
        let activity = self.activity.clone();
        Box::pin(async move {
            let out = fut.await;
            activity.answered.fetch_add(1, Ordering::Relaxed);
            activity.touch();
            out
        })
    }
}

/// A stream that notes when bytes move.
pub(super) struct Watched {
    pub(super) inner: TcpStream,
    pub(super) activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.read_some();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    // Vectored writes make hyper queue a response's pieces instead of copying them into
    // a buffer of its own: a piece (and its room in a budget, see the daemon's peer
    // responses) is released when it has been written to the socket.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
