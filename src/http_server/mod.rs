//! The HTTP server loop of the store and the daemon: axum routers over hyper's HTTP/1
//! connections, with the bounds `axum::serve` lacks. A client that does not finish a
//! request's headers within [`HEADER_TIMEOUT`] is dropped, and so is a keep-alive
//! connection that stays idle for [`IDLE_TIMEOUT`] between requests; a request body
//! has a deadline and a minimum rate ([`body`]); connections served at once are
//! bounded below the descriptor limit (more wait in the listen backlog), so slow
//! clients cannot take the descriptors that `/healthz` and the chunk files need; a
//! connection closed before its request body was read lingers briefly, so the client
//! reads the answer (a 401) instead of a reset. A handler that works long (a commit, a
//! gc) is not cut off.
//!
//! # Layout
//! - this file: the accept loop, one connection, its idle watch.
//! - [`body`]: the request body's deadline and minimum rate.
//! - [`answer`]: the error answer (`{"error"}`) both servers send and both clients read.
//! - [`args`]: the flags that set these bounds (`--http-max-connections`, ...), shared by
//!   the store's and the daemon's arguments.

mod answer;
mod args;
mod body;

pub use answer::ErrorAnswer;
pub use args::HttpArgs;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use body::BodyDeadline;

/// Time a client has to send a request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a connection may sit with no bytes moving and no request being answered.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause after a failed accept (out of descriptors): lets connections close.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// How long connections get to finish at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How long a closing connection keeps reading (and dropping) what its client still
/// sends: closing a socket with unread bytes sends a reset, which can make the client
/// lose the answer it was sent (a 401 to an upload that is still sending).
const LINGER: Duration = Duration::from_secs(1);
/// The most a lingering connection reads before it closes anyway.
const LINGER_BYTES: usize = 1 << 20;
/// The part of the process's descriptor limit that HTTP connections may take (a
/// quarter): a connection may hold a file besides its socket (an upload's temporary
/// file, a chunk being served), and the rest is for the store's backend, the NBD
/// server, the cache's files and the logs.
const CONNECTION_SHARE_OF_NOFILE: u64 = 4;

/// Raises the soft descriptor limit toward `wanted` (at most the hard limit): HTTP
/// connections are bounded by a quarter of it, and a store's default soft limit (1024
/// under systemd) would otherwise leave a fleet's keep-alive connections 256 slots.
pub fn raise_descriptor_limit(wanted: u64) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let wanted = wanted.min(hard);
        if soft < wanted {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, wanted, hard);
        }
    }
}

/// The bounds of one server's clients (the store's or the daemon's `--http-*` flags).
#[derive(Clone, Copy, Debug)]
pub struct HttpLimits {
    /// Connections served at once (lowered to a quarter of the descriptor limit); more
    /// wait in the listen backlog until one ends.
    pub max_connections: usize,
    /// Time a whole request body may take to arrive.
    pub body_timeout: Duration,
    /// Bytes per second a request body must average once [`body::BODY_RATE_GRACE`] has
    /// passed.
    pub min_body_rate: u64,
}

impl HttpLimits {
    /// The connections this process can serve at once: `max_connections`, at most the
    /// share of the descriptor limit.
    fn connections(&self) -> usize {
        use nix::sys::resource::{getrlimit, Resource};
        let nofile = getrlimit(Resource::RLIMIT_NOFILE)
            .map(|(soft, _)| soft)
            .unwrap_or(u64::MAX);
        let share = usize::try_from(nofile / CONNECTION_SHARE_OF_NOFILE).unwrap_or(usize::MAX);
        let n = self.max_connections.min(share).max(1);
        if n < self.max_connections {
            tracing::info!(
                connections = n,
                nofile,
                "HTTP connections bounded by the descriptor limit"
            );
        }
        n
    }
}

/// Serves `router` on `listener` until `shutdown` resolves, then lets connections
/// finish their requests (for up to [`SHUTDOWN_GRACE`]).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: HttpLimits,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    let slots = Arc::new(Semaphore::new(limits.connections()));
    tokio::pin!(shutdown);
    loop {
        // A slot first: at the bound, new clients wait in the listen backlog, holding
        // no descriptor of ours.
        let slot = tokio::select! {
            () = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            slot = slots.clone().acquire_owned() => slot,
        };
        let Ok(slot) = slot else { break };
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                let (router, stop) = (router.clone(), stop_rx.clone());
                connections.spawn(async move {
                    serve_one(stream, router, limits, stop).await;
                    drop(slot);
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "accepting an HTTP connection failed; backing off");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        connections.shutdown().await;
    }
    Ok(())
}

async fn serve_one(
    stream: TcpStream,
    router: Router,
    limits: HttpLimits,
    mut stop: watch::Receiver<bool>,
) {
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Watched {
        inner: stream,
        activity: activity.clone(),
    });
    let busy = activity.clone();
    let service = tower::ServiceBuilder::new()
        .map_request(move |req: hyper::Request<hyper::body::Incoming>| {
            busy.requests.fetch_add(1, Ordering::Relaxed);
            req.map(|body| axum::body::Body::new(BodyDeadline::new(body, limits)))
        })
        .service(router);
    let service = InFlight {
        inner: service,
        activity: activity.clone(),
    };
    let mut conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(io, TowerToHyperService::new(service));
    let mut ticker = tokio::time::interval(IDLE_TIMEOUT / 4);
    loop {
        tokio::select! {
            result = std::future::poll_fn(|cx| conn.poll_without_shutdown(cx)) => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "HTTP connection ended");
                    return;
                }
                break;
            }
            _ = stop.changed() => Pin::new(&mut conn).graceful_shutdown(),
            _ = ticker.tick() => {
                if activity.idle_for() > IDLE_TIMEOUT {
                    tracing::debug!("closing an idle HTTP connection");
                    return;
                }
            }
        }
    }
    linger(conn.into_parts().io.into_inner().inner).await;
}

/// Closes a finished connection: sends what is written, then reads and drops what the
/// client still sends (up to [`LINGER`] and [`LINGER_BYTES`]) before closing.
async fn linger(mut stream: TcpStream) {
    if stream.shutdown().await.is_err() {
        return;
    }
    let mut scratch = [0u8; 16 << 10];
    let mut dropped = 0;
    let _ = tokio::time::timeout(LINGER, async {
        while dropped < LINGER_BYTES {
            match stream.read(&mut scratch).await {
                Ok(0) | Err(_) => return,
                Ok(n) => dropped += n,
            }
        }
    })
    .await;
}

/// When bytes last moved on a connection, and how many requests are being answered.
struct Activity {
    epoch: Instant,
    last_us: AtomicU64,
    /// Requests started minus requests answered.
    requests: AtomicU64,
    answered: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            epoch: Instant::now(),
            last_us: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            answered: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        self.last_us
            .store(self.epoch.elapsed().as_micros() as u64, Ordering::Relaxed);
    }

    /// How long the connection has been idle; zero while a request is being answered.
    fn idle_for(&self) -> Duration {
        if self.requests.load(Ordering::Relaxed) > self.answered.load(Ordering::Relaxed) {
            return Duration::ZERO;
        }
        let last = Duration::from_micros(self.last_us.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(last)
    }
}

/// Counts a request as answered when its response future completes.
#[derive(Clone)]
struct InFlight<S> {
    inner: S,
    activity: Arc<Activity>,
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
struct Watched {
    inner: TcpStream,
    activity: Arc<Activity>,
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
            self.activity.touch();
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
