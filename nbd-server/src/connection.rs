//! One NBD connection on any byte stream: the handshake (within its deadline, with
//! STARTTLS when offered), then the transmission phase of the session it negotiated;
//! and how a connection failed.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use crate::config::ServerConfig;
use crate::handshake;
use crate::session::{HandshakeError, Outcome, Session, TlsState};
use crate::shutdown::Shutdown;
use crate::splice::SpliceSink;
use crate::transmission::{self, TransmissionError};
use lazyblk_image::Images;

/// Bytes read from the socket at once: a few dozen request headers, or the start of a
/// large write, per system call.
const READ_BUFFER: usize = 64 << 10;

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

/// Serves one connection and logs how it ended.
#[allow(
    clippy::too_many_arguments,
    reason = "the parts of one connection, handed on whole"
)]
pub(crate) async fn run_logged<E, S>(
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
    session: Session<E::Image>,
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
