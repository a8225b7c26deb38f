//! The fixed newstyle handshake: greet, read the client's flags, answer options until
//! the client picks an export (`NBD_OPT_GO` or `NBD_OPT_EXPORT_NAME`) or leaves.
//!
//! The outcome is a [`Session`](crate::session::Session): the opened export and
//! everything negotiated that the transmission phase needs (framing, the block status
//! context, the advertised size). The types it settles are in [`crate::session`]; the
//! answer to each option in [`crate::negotiation`].

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tracing::debug;

use crate::negotiation::{Negotiation, Step};
use crate::proto::{self, OptionHeader};
use crate::read::read_message;
use crate::session::{io_error, ClientFlags, HandshakeError, Outcome, TlsState};
use lazyblk_image::Images;

/// Sends the greeting and reads the client's flags; `None` when it closed.
pub async fn greet<R, W>(
    reader: &mut R,
    writer: &mut W,
    peer: &str,
) -> Result<Option<ClientFlags>, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let greeting = proto::greeting(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES);
    send(writer, &greeting, "sending the greeting").await?;
    let mut flags = [0u8; 4];
    if !receive(reader, &mut flags, "reading client flags").await? {
        debug!(peer, "client closed before sending its flags");
        return Ok(None);
    }
    let flags = u32::from_be_bytes(flags);
    if flags & !proto::CLIENT_FLAGS_KNOWN != 0 {
        return Err(HandshakeError::UnknownClientFlags { flags });
    }
    Ok(Some(ClientFlags {
        no_zeroes: flags & proto::CLIENT_FLAG_NO_ZEROES != 0,
    }))
}

/// The option haggling, after the greeting (or again after STARTTLS).
pub async fn negotiate_options<E, R, W>(
    reader: &mut R,
    writer: &mut W,
    exports: &E,
    peer: &str,
    max_request: u32,
    flags: ClientFlags,
    tls: TlsState,
) -> Result<Outcome<E::Image>, HandshakeError>
where
    E: Images,
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut negotiation = Negotiation::new(exports, peer, max_request, flags, tls);
    loop {
        let mut header = [0u8; proto::OPTION_HEADER_LEN];
        if !receive(reader, &mut header, "reading an option header").await? {
            debug!(peer, "client closed during the handshake");
            return Ok(Outcome::Ended);
        }
        let header = OptionHeader::decode(&header)
            .map_err(|magic| HandshakeError::BadOptionMagic { magic })?;
        let step = negotiation.option(reader, header).await?;
        let sent = send(writer, &negotiation.out, "sending an option reply").await;
        negotiation.out.clear();
        match step {
            // The client may close right after NBD_OPT_ABORT, without reading the ACK.
            Step::Abort => {
                debug!(peer, "client aborted the handshake");
                return Ok(Outcome::Ended);
            }
            Step::Continue => sent?,
            Step::StartTls => {
                sent?;
                return Ok(Outcome::StartTls);
            }
            Step::Transmit(session) => {
                sent?;
                return Ok(Outcome::Transmit(session));
            }
        }
    }
}

async fn send<W: AsyncWrite + Unpin>(
    writer: &mut W,
    bytes: &[u8],
    stage: &'static str,
) -> Result<(), HandshakeError> {
    writer
        .write_all(bytes)
        .await
        .map_err(|source| io_error(stage, source))?;
    writer
        .flush()
        .await
        .map_err(|source| io_error(stage, source))
}

async fn receive<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut [u8],
    stage: &'static str,
) -> Result<bool, HandshakeError> {
    read_message(reader, buf)
        .await
        .map_err(|source| io_error(stage, source))
}
