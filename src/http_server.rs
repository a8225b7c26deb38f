//! The HTTP server loop of the store and the daemon: axum routers over hyper's HTTP/1
//! connections, with the timeouts `axum::serve` lacks. A client that does not finish a
//! request's headers within [`HEADER_TIMEOUT`] is dropped, and so is a keep-alive
//! connection that stays idle for [`IDLE_TIMEOUT`] between requests; a handler that
//! works long (a commit, a gc) is not cut off.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Time a client has to send a request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a connection may sit with no bytes moving and no request being answered.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause after a failed accept (out of descriptors): lets connections close.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// How long connections get to finish at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Serves `router` on `listener` until `shutdown` resolves, then lets connections
/// finish their requests (for up to [`SHUTDOWN_GRACE`]).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                connections.spawn(serve_one(stream, router.clone(), stop_rx.clone()));
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

async fn serve_one(stream: TcpStream, router: Router, mut stop: watch::Receiver<bool>) {
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Watched {
        inner: stream,
        activity: activity.clone(),
    });
    let busy = activity.clone();
    let service = tower::ServiceBuilder::new()
        .map_request(move |req| {
            busy.requests.fetch_add(1, Ordering::Relaxed);
            req
        })
        .service(router);
    let service = InFlight {
        inner: service,
        activity: activity.clone(),
    };
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(io, TowerToHyperService::new(service));
    tokio::pin!(conn);
    let mut ticker = tokio::time::interval(IDLE_TIMEOUT / 4);
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "HTTP connection ended");
                }
                return;
            }
            _ = stop.changed() => conn.as_mut().graceful_shutdown(),
            _ = ticker.tick() => {
                if activity.idle_for() > IDLE_TIMEOUT {
                    tracing::debug!("closing an idle HTTP connection");
                    return;
                }
            }
        }
    }
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

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
