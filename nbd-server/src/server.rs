//! The server: a [`Listener`] on TCP or a unix socket, [`serve`] to accept connections
//! until shutdown, and [`serve_connection`] to run one connection on any stream
//! (handshake, then transmission).

use std::future::Future;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn};

pub use crate::config::{
    ServerConfig, DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_MAX_BYTES_IN_FLIGHT, DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_IN_FLIGHT, DEFAULT_MAX_REQUEST, MAX_REQUEST_CEILING,
};
use crate::connection::run_logged;
pub use crate::connection::{serve_connection, serve_socket, ConnectionError, Tls};
use crate::listener::{widen_send_buffer, Accepted};
pub use crate::listener::{Listener, ServerError};
use crate::shutdown::Shutdown;
use lazyblk_image::Images;

/// How long connections get to answer their in-flight requests once shutdown begins,
/// before they are dropped: longer than a cold chunk fetch, shorter than a service
/// manager's stop timeout.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// The first pause after a failed accept (out of file descriptors, say), doubled per
/// consecutive failure up to [`ACCEPT_BACKOFF_MAX`]; lets connections close instead of
/// spinning.
const ACCEPT_BACKOFF_FIRST: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Consecutive failed accepts after which the log says so once more (then once per
/// this many): the server never stops accepting on its own, since every accept error
/// (out of descriptors, out of memory, a connection aborted in the queue) passes.
const ACCEPT_FAILURES_LOGGED: u32 = 64;

/// Accepts connections on `listener` and serves each in its own task until `shutdown`
/// resolves. Then it stops accepting, lets connections answer what is in flight (for
/// up to [`SHUTDOWN_GRACE`]), closes them, removes a unix socket file (unless
/// [`ServerConfig::keep_socket_file`]), and returns.
pub async fn serve<E: Images>(
    listener: Listener,
    exports: Arc<E>,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    serve_with_tls(listener, exports, config, None, shutdown).await
}

/// [`serve`], offering (or requiring) TLS when `tls` is given.
pub async fn serve_with_tls<E: Images>(
    listener: Listener,
    exports: Arc<E>,
    config: ServerConfig,
    tls: Option<Arc<Tls>>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    let config = config.effective();
    let (stop, stopping) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut failures = 0u32;
    let bytes = config.bytes_budget();
    let mut refused = 0u64;
    info!(listen = %listener, max_connections = config.max_connections, "NBD server listening");
    tokio::pin!(shutdown);
    let result = loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break Ok(()),
            Some(joined) = connections.join_next(), if !connections.is_empty() => {
                if let Err(failure) = joined {
                    error!(%failure, "a connection task failed");
                }
                continue;
            }
            accepted = listener.accept() => accepted,
        };
        let accepted = match accepted {
            Ok(accepted) => accepted,
            Err(source) => {
                failures = failures.saturating_add(1);
                if failures == 1 || failures.is_multiple_of(ACCEPT_FAILURES_LOGGED) {
                    warn!(listen = %listener, failures, error = %source, "accepting a connection failed; backing off and going on");
                }
                let backoff = ACCEPT_BACKOFF_FIRST
                    .saturating_mul(1 << failures.min(16))
                    .min(ACCEPT_BACKOFF_MAX);
                tokio::select! {
                    () = &mut shutdown => break Ok(()),
                    () = tokio::time::sleep(backoff) => continue,
                }
            }
        };
        if failures > 0 {
            info!(listen = %listener, failures, "accepting connections again");
            failures = 0;
        }
        if connections.len() >= config.max_connections {
            // Closing at once tells the client more than a socket that never answers.
            refused += 1;
            if refused == 1 || refused.is_multiple_of(1000) {
                warn!(
                    peer = accepted.peer(),
                    max_connections = config.max_connections,
                    refused,
                    "NBD connection refused: the server is at its connection limit (--nbd-max-connections)"
                );
            }
            drop(accepted);
            continue;
        }
        let exports = Arc::clone(&exports);
        let signal = Shutdown::new(stopping.clone());
        let bytes = Arc::clone(&bytes);
        let tls = tls.clone();
        match accepted {
            Accepted::Tcp(stream, peer) => {
                if let Err(error) = stream.set_nodelay(true) {
                    debug!(peer, %error, "could not set TCP_NODELAY");
                }
                let socket = stream.as_fd().try_clone_to_owned().ok();
                connections.spawn(run_logged(
                    stream, socket, peer, exports, config, bytes, tls, signal,
                ));
            }
            Accepted::Unix(stream, peer) => {
                widen_send_buffer(&stream, &peer);
                let socket = stream.as_fd().try_clone_to_owned().ok();
                connections.spawn(run_logged(
                    stream, socket, peer, exports, config, bytes, tls, signal,
                ));
            }
        }
    };
    // Receivers wait on this value; the sender stays alive until every connection is done.
    let _ = stop.send(true);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!(
            remaining = connections.len(),
            "closing connections still busy after the shutdown grace period"
        );
        connections.shutdown().await;
    }
    if let Some(path) = listener.socket_path().filter(|_| !config.keep_socket_file) {
        drop(listener);
        if let Err(error) = tokio::fs::remove_file(&path).await {
            debug!(path = %path.display(), %error, "could not remove the socket file");
        }
    }
    info!("NBD server stopped");
    result
}
