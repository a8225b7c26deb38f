//! The server: a [`Listener`] on TCP or a unix socket, [`serve`] to accept connections
//! until shutdown, and [`serve_connection`] to run one connection on any stream
//! (handshake, then transmission).

use std::fmt;
use std::future::Future;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn};

pub use crate::config::{
    ServerConfig, DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_MAX_BYTES_IN_FLIGHT, DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_IN_FLIGHT, DEFAULT_MAX_REQUEST, MAX_REQUEST_CEILING,
};
use crate::handshake::{self, HandshakeError, Outcome, TlsState};
use crate::shutdown::Shutdown;
use crate::splice::SpliceSink;
use crate::transmission::{self, TransmissionError};
use lazyblk_image::Images;

/// The prefix that makes a listen address a unix socket path.
const UNIX_PREFIX: &str = "unix:";

/// Bytes read from the socket at once: a few dozen request headers, or the start of a
/// large write, per system call.
const READ_BUFFER: usize = 64 << 10;

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

/// A failure of the server as a whole.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Binding the listen address failed.
    #[error("binding NBD listener on {addr}: {source}")]
    Bind { addr: String, source: io::Error },
    /// A path exists where the unix socket should go and it is not a socket.
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    /// Another server answers on the unix socket.
    #[error("another server is listening on {path}")]
    SocketInUse { path: PathBuf },
    /// Removing a stale unix socket failed.
    #[error("removing stale socket {path}: {source}")]
    RemoveStale { path: PathBuf, source: io::Error },
}

/// A failed connection; only that connection is closed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    /// The handshake failed.
    #[error("NBD handshake with {peer}: {source}")]
    Handshake {
        peer: String,
        #[source]
        source: HandshakeError,
    },
    /// The transmission phase failed.
    #[error("NBD transmission with {peer} (export {export:?}): {source}")]
    Transmission {
        peer: String,
        export: String,
        #[source]
        source: TransmissionError,
    },
}

impl ConnectionError {
    /// Whether the client broke the protocol (as opposed to the socket failing).
    pub fn is_protocol_violation(&self) -> bool {
        match self {
            ConnectionError::Handshake { source, .. } => source.is_protocol_violation(),
            ConnectionError::Transmission { source, .. } => source.is_protocol_violation(),
        }
    }
}

/// NBD over TLS (STARTTLS in the handshake, as the protocol specifies): the server's
/// certificate and key (and client-certificate checks) in `acceptor`; with `required`,
/// a plain client gets NBD_REP_ERR_TLS_REQD for every option but STARTTLS.
pub struct Tls {
    pub acceptor: tokio_rustls::TlsAcceptor,
    pub required: bool,
}

/// Where the server listens.
#[derive(Debug)]
pub enum Listener {
    /// A TCP socket; accepted connections get TCP_NODELAY.
    Tcp(TcpListener),
    /// A unix socket; its file is removed when [`serve`] returns.
    Unix(UnixListener),
}

impl Listener {
    /// Binds `addr`: `host:port` for TCP, `unix:/path/sock` for a unix socket. A socket
    /// file left behind by a server that is gone is replaced; a live one is not.
    pub async fn bind(addr: &str) -> Result<Listener, ServerError> {
        let bind_error = |source| ServerError::Bind {
            addr: addr.to_owned(),
            source,
        };
        match addr.strip_prefix(UNIX_PREFIX) {
            Some(path) => {
                let path = Path::new(path);
                remove_stale_socket(path).await?;
                UnixListener::bind(path)
                    .map(Listener::Unix)
                    .map_err(bind_error)
            }
            None => TcpListener::bind(addr)
                .await
                .map(Listener::Tcp)
                .map_err(bind_error),
        }
    }

    async fn accept(&self) -> io::Result<Accepted> {
        match self {
            Listener::Tcp(listener) => {
                let (stream, addr) = listener.accept().await?;
                Ok(Accepted::Tcp(stream, addr.to_string()))
            }
            Listener::Unix(listener) => {
                let (stream, _) = listener.accept().await?;
                let peer = match stream.peer_cred().ok().and_then(|cred| cred.pid()) {
                    Some(pid) => format!("unix:pid={pid}"),
                    None => "unix".to_owned(),
                };
                Ok(Accepted::Unix(stream, peer))
            }
        }
    }

    fn socket_path(&self) -> Option<PathBuf> {
        match self {
            Listener::Tcp(_) => None,
            Listener::Unix(listener) => listener
                .local_addr()
                .ok()
                .and_then(|addr| addr.as_pathname().map(Path::to_path_buf)),
        }
    }
}

impl fmt::Display for Listener {
    /// The bound address, in the form [`Listener::bind`] takes (with the real port when
    /// bound to port 0).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listener::Tcp(listener) => match listener.local_addr() {
                Ok(addr) => write!(f, "{addr}"),
                Err(_) => f.write_str("tcp:?"),
            },
            Listener::Unix(_) => match self.socket_path() {
                Some(path) => write!(f, "{UNIX_PREFIX}{}", path.display()),
                None => f.write_str("unix:?"),
            },
        }
    }
}

/// The send buffer asked for on an accepted unix socket connection (the kernel caps it
/// at `net.core.wmem_max`, then doubles it; a stock 208 KiB cap gives 416 KiB). A unix
/// socket's default (about 208 KiB) is less than one large read, so a cached sequential
/// reader's replies stall on it; what is asked for is what TCP's autotuning may grow
/// to by default (`net.ipv4.tcp_wmem`), so a unix connection may pin no more kernel
/// memory than a TCP one. Measured by bench B1 (where `wmem_max` is 4 MiB): 0.16 s of
/// nbdcopy's 1 GiB read at the default, 0.11 s at 2 MiB (4 MiB is no faster).
const UNIX_SEND_BUFFER: libc::c_int = 2 << 20;

/// Asks for [`UNIX_SEND_BUFFER`] on `stream`; a refusal keeps the default (logged).
fn widen_send_buffer(stream: &UnixStream, peer: &str) {
    let size = UNIX_SEND_BUFFER;
    // SAFETY: a valid socket descriptor and a c_int option value of its own size.
    let set = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if set != 0 {
        debug!(peer, error = %io::Error::last_os_error(), "could not widen the send buffer");
    }
}

/// A newly accepted connection and its printable peer.
enum Accepted {
    Tcp(TcpStream, String),
    Unix(UnixStream, String),
}

impl Accepted {
    fn peer(&self) -> &str {
        match self {
            Accepted::Tcp(_, peer) | Accepted::Unix(_, peer) => peer,
        }
    }
}

/// Replaces a socket file that no server answers on; refuses to touch anything else.
async fn remove_stale_socket(path: &Path) -> Result<(), ServerError> {
    let metadata = match tokio::fs::symlink_metadata(path).await {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ServerError::RemoveStale {
                path: path.to_owned(),
                source,
            })
        }
    };
    if !metadata.file_type().is_socket() {
        return Err(ServerError::NotASocket {
            path: path.to_owned(),
        });
    }
    if UnixStream::connect(path).await.is_ok() {
        return Err(ServerError::SocketInUse {
            path: path.to_owned(),
        });
    }
    tokio::fs::remove_file(path)
        .await
        .map_err(|source| ServerError::RemoveStale {
            path: path.to_owned(),
            source,
        })
}

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

/// Serves one connection and logs how it ended.
#[allow(
    clippy::too_many_arguments,
    reason = "the parts of one connection, handed on whole"
)]
async fn run_logged<E, S>(
    stream: S,
    socket: Option<OwnedFd>,
    peer: String,
    exports: Arc<E>,
    config: ServerConfig,
    bytes: Arc<Semaphore>,
    tls: Option<Arc<Tls>>,
    shutdown: Shutdown,
) where
    E: Images,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    match run_connection(
        stream,
        socket,
        peer.clone(),
        exports,
        config,
        bytes,
        tls,
        shutdown,
    )
    .await
    {
        Ok(()) => {}
        Err(error) if error.is_protocol_violation() => warn!(peer, %error, "connection closed"),
        Err(error) => debug!(peer, %error, "connection closed"),
    }
}

/// Serves one connection on `stream` (any byte stream) until the client disconnects.
/// `peer` names the client in logs and in [`Images::open`]. Errors concern only this
/// connection. Every read is copied; on a socket, [`serve_socket`] splices large ones.
pub async fn serve_connection<E: Images, S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    stream: S,
    peer: String,
    exports: Arc<E>,
    config: ServerConfig,
) -> Result<(), ConnectionError> {
    serve_one(stream, None, peer, exports, config).await
}

/// [`serve_connection`] on a plain socket of this runtime (a TCP or unix socket, or a
/// socketpair for the kernel client) that nothing else buffers or transforms: large
/// cached reads may be spliced into it from the export's files.
pub async fn serve_socket<E, S>(
    stream: S,
    peer: String,
    exports: Arc<E>,
    config: ServerConfig,
) -> Result<(), ConnectionError>
where
    E: Images,
    S: AsyncRead + AsyncWrite + AsFd + Unpin + Send + 'static,
{
    let socket = stream.as_fd().try_clone_to_owned().ok();
    serve_one(stream, socket, peer, exports, config).await
}

async fn serve_one<E: Images, S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    stream: S,
    socket: Option<OwnedFd>,
    peer: String,
    exports: Arc<E>,
    config: ServerConfig,
) -> Result<(), ConnectionError> {
    let config = config.effective();
    let bytes = config.bytes_budget();
    run_connection(
        stream,
        socket,
        peer,
        exports,
        config,
        bytes,
        None,
        Shutdown::never(),
    )
    .await
}

#[allow(
    clippy::too_many_arguments,
    reason = "the parts of one connection, handed on whole"
)]
async fn run_connection<E, S>(
    stream: S,
    socket: Option<OwnedFd>,
    peer: String,
    exports: Arc<E>,
    config: ServerConfig,
    bytes: Arc<Semaphore>,
    tls: Option<Arc<Tls>>,
    mut shutdown: Shutdown,
) -> Result<(), ConnectionError>
where
    E: Images,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    debug!(peer, "connection opened");
    let handshake_error = |source| ConnectionError::Handshake {
        peer: peer.clone(),
        source,
    };
    let deadline = tokio::time::Instant::now() + config.handshake_timeout;
    let (reader, mut writer) = tokio::io::split(stream);
    let mut reader = BufReader::with_capacity(READ_BUFFER, reader);
    let state = match &tls {
        None => TlsState::Off,
        Some(t) if t.required => TlsState::Required,
        Some(_) => TlsState::Offered,
    };
    let plain = async {
        let Some(flags) = handshake::greet(&mut reader, &mut writer, &peer).await? else {
            return Ok(None);
        };
        let outcome = handshake::negotiate_options(
            &mut reader,
            &mut writer,
            &*exports,
            &peer,
            config.max_request,
            flags,
            state,
        )
        .await?;
        Ok(Some((flags, outcome)))
    };
    let negotiated = tokio::select! {
        negotiated = tokio::time::timeout_at(deadline, plain) => match negotiated {
            Ok(negotiated) => negotiated,
            Err(_) => Err(HandshakeError::Timeout(config.handshake_timeout)),
        },
        () = shutdown.wait() => {
            debug!(peer, "shutdown during the handshake");
            return Ok(());
        }
    };
    match negotiated.map_err(handshake_error)? {
        None | Some((_, Outcome::Ended)) => Ok(()),
        Some((_, Outcome::Transmit(session))) => {
            // Plain bytes on a socket of our own: large cached reads can be spliced.
            let splice = socket.and_then(|socket| {
                let exports = Arc::clone(&exports);
                SpliceSink::new(socket, Box::new(move |bytes| exports.spliced(bytes)))
            });
            run_session(
                session, reader, writer, exports, config, bytes, &peer, shutdown, splice,
            )
            .await
        }
        Some((flags, Outcome::StartTls)) => {
            // Encrypted bytes cannot be spliced.
            drop(socket);
            let Some(tls) = tls else {
                return Err(handshake_error(HandshakeError::Tls(
                    "not configured".into(),
                )));
            };
            // The client waits for our ACK before its TLS hello: nothing may be buffered.
            if !reader.buffer().is_empty() {
                return Err(handshake_error(HandshakeError::DataBeforeTls));
            }
            let stream = reader.into_inner().unsplit(writer);
            let secured = tokio::time::timeout_at(deadline, async {
                let stream = tls
                    .acceptor
                    .accept(stream)
                    .await
                    .map_err(|e| HandshakeError::Tls(e.to_string()))?;
                let (reader, mut writer) = tokio::io::split(stream);
                let mut reader = BufReader::with_capacity(READ_BUFFER, reader);
                let outcome = handshake::negotiate_options(
                    &mut reader,
                    &mut writer,
                    &*exports,
                    &peer,
                    config.max_request,
                    flags,
                    TlsState::Active,
                )
                .await?;
                Ok((outcome, reader, writer))
            })
            .await
            .unwrap_or(Err(HandshakeError::Timeout(config.handshake_timeout)));
            match secured.map_err(handshake_error)? {
                (Outcome::Transmit(session), reader, writer) => {
                    debug!(peer, "TLS on");
                    run_session(
                        session, reader, writer, exports, config, bytes, &peer, shutdown, None,
                    )
                    .await
                }
                _ => Ok(()),
            }
        }
    }
}

/// The transmission phase of one negotiated session.
#[allow(
    clippy::too_many_arguments,
    reason = "the parts of one connection, handed on whole"
)]
async fn run_session<E, R, W>(
    session: handshake::Session<E::Image>,
    reader: R,
    writer: W,
    exports: Arc<E>,
    config: ServerConfig,
    bytes: Arc<Semaphore>,
    peer: &str,
    shutdown: Shutdown,
    splice: Option<SpliceSink>,
) -> Result<(), ConnectionError>
where
    E: Images,
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let export = session.name.clone();
    debug!(
        peer,
        export,
        size = session.size,
        read_only = session.read_only,
        framing = ?session.framing,
        block_status = session.block_status_context.is_some(),
        "transmission started"
    );
    transmission::transmit(
        session, reader, writer, exports, config, bytes, peer, shutdown, splice,
    )
    .await
    .map_err(|source| ConnectionError::Transmission {
        peer: peer.to_string(),
        export,
        source,
    })?;
    debug!(peer, "connection closed");
    Ok(())
}
