//! The HTTP server loop of the store and the daemon: axum routers over hyper's HTTP/1
//! connections, with the bounds `axum::serve` lacks. A new connection whose client sends
//! no request within [`HEADER_TIMEOUT`] is closed, a request whose headers began but did
//! not finish within [`HEADER_TIMEOUT`] is answered 408, and a keep-alive connection
//! that stays idle for [`IDLE_TIMEOUT`] between requests is closed; a connection whose
//! client has sent bytes the server has not read yet is never closed by these
//! deadlines (the server, not the client, was late: a stopped or starved process). A
//! request body has a deadline and a minimum rate ([`body`]); connections served at
//! once are bounded below the descriptor limit (more wait in the listen backlog), so
//! slow clients cannot take the descriptors that `/healthz` and the chunk files need.
//! Every connection ends by lingering briefly, reading what its client still sends, so
//! the client reads the answer (a 401, a 408) or an orderly close, never a reset. A
//! handler that works long (a commit, a gc) is not cut off.
//!
//! # Layout
//! - this file: the accept loop, one connection and how it ends.
//! - [`activity`]: a connection's activity and its deadlines.
//! - [`body`]: the request body's deadline and minimum rate.
//! - [`answer`]: the error answer (`{"error"}`) both servers send and both clients read.
//! - [`args`]: the flags that set these bounds (`--http-max-connections`, ...), shared by
//!   the store's and the daemon's arguments.

mod activity;
mod answer;
mod args;
mod body;

pub use answer::ErrorAnswer;
pub use args::HttpArgs;

use std::future::Future;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use activity::{has_unread, Activity, InFlight, Overdue, Watched};
use body::BodyDeadline;

/// Time a client has to send a request's headers: from connecting for the first
/// request, from the request's first byte for a later one.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a keep-alive connection may sit between requests with no bytes moving. Clients
/// of lazyblk's own keep their idle connections for less ([`crate::http_client`]), so
/// they never send a request on a connection the server is closing.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a connection's deadlines are looked at.
const DEADLINE_CHECK: Duration = Duration::from_millis(500);
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
    // The socket's descriptor, to look for unread bytes; open as long as `conn` is.
    let fd = stream.as_raw_fd();
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Watched {
        inner: stream,
        activity: activity.clone(),
    });
    let service = tower::ServiceBuilder::new()
        .map_request(move |req: hyper::Request<hyper::body::Incoming>| {
            req.map(|body| axum::body::Body::new(BodyDeadline::new(body, limits)))
        })
        .service(router);
    let service = InFlight {
        inner: service,
        activity: activity.clone(),
    };
    // No hyper header_read_timeout: the deadlines are [`Activity::overdue`]'s.
    let mut conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .serve_connection(io, TowerToHyperService::new(service));
    let mut ticker = tokio::time::interval(DEADLINE_CHECK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let overdue = loop {
        tokio::select! {
            result = std::future::poll_fn(|cx| conn.poll_without_shutdown(cx)) => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "HTTP connection ended");
                }
                break None;
            }
            _ = stop.changed() => Pin::new(&mut conn).graceful_shutdown(),
            _ = ticker.tick() => {
                if let Some(why) = activity.overdue(has_unread(fd)) {
                    tracing::debug!(?why, "closing an HTTP connection past its deadline");
                    break Some(why);
                }
            }
        }
    };
    let mut stream = conn.into_parts().io.into_inner().inner;
    if overdue == Some(Overdue::Head) {
        // No request is being answered: the connection is free for an answer.
        let _ = stream.write_all(head_timeout_answer().as_bytes()).await;
    }
    // Every way out lingers: what the client sent is read, never left to reset.
    linger(stream).await;
}

/// The answer to a request whose head did not arrive within [`HEADER_TIMEOUT`].
fn head_timeout_answer() -> String {
    let body = format!(
        "{{\"error\":\"the request's headers did not arrive within {} seconds\"}}",
        HEADER_TIMEOUT.as_secs()
    );
    format!(
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
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
