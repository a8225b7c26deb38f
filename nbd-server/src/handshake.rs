//! The fixed newstyle handshake: greet, read the client's flags, answer options until
//! the client picks an export (`NBD_OPT_GO` or `NBD_OPT_EXPORT_NAME`) or leaves.
//!
//! The outcome is a [`Session`]: the opened export and everything negotiated that the
//! transmission phase needs (framing, the block status context, the advertised size).

use std::io;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::{debug, warn};

use crate::options::{InfoRequest, MetaContextRequest};
use crate::proto::{self, OptionHeader};
use crate::read::{read_message, skip};
use crate::reply::Framing;
use lazyblk_image::{Image, Images, Listing, OpenError, ReadImage, WriteImage};

/// The largest option payload read into memory. The longest legitimate one is an
/// `NBD_OPT_SET_META_CONTEXT` with a 4 KiB name and a few queries; anything larger is
/// skipped unread and refused with NBD_REP_ERR_TOO_BIG, so no client can make the
/// server allocate more than this per option.
pub const MAX_OPTION_LEN: u32 = 64 << 10;

/// The context id given to `base:allocation` in NBD_OPT_SET_META_CONTEXT; ids are
/// opaque to clients, there is one context, so any fixed value does.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// The preferred block size advertised in NBD_INFO_BLOCK_SIZE when the image's own
/// ([`ReadImage::block_size`]) cannot be: the page size, and the block size of the ext4
/// templates this server exists for.
pub const PREFERRED_BLOCK: u32 = 4096;

/// The smallest preferred block size the protocol allows.
const SMALLEST_PREFERRED: u32 = 512;

/// The preferred block size to advertise for an image that tracks `image` bytes at a
/// time: its own when the protocol allows it (a power of two from 512 up to the largest
/// request), [`PREFERRED_BLOCK`] otherwise.
fn preferred_block(image: u32, max_request: u32) -> u32 {
    if image.is_power_of_two() && (SMALLEST_PREFERRED..=max_request).contains(&image) {
        image
    } else {
        PREFERRED_BLOCK
    }
}

/// The minimum block size advertised: any byte is addressable (exports do
/// read-modify-write where they need to).
pub const MINIMUM_BLOCK: u32 = 1;

/// A failed handshake; the connection is closed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// Sending or receiving failed (or the client left in the middle of a message).
    #[error("{stage}: {source}")]
    Io {
        stage: &'static str,
        source: io::Error,
    },
    /// The client set flags this server does not know.
    #[error("client flags {flags:#010x} include bits this server does not know")]
    UnknownClientFlags { flags: u32 },
    /// An option did not start with `IHAVEOPT`.
    #[error("option header starts with {magic:#018x}, not IHAVEOPT")]
    BadOptionMagic { magic: u64 },
    /// NBD_OPT_EXPORT_NAME cannot be answered with an error, so a bad name ends the session.
    #[error("NBD_OPT_EXPORT_NAME with a {length}-byte name (the limit is {max})", max = proto::MAX_STRING)]
    ExportNameTooLong { length: u32 },
    /// NBD_OPT_EXPORT_NAME named no valid UTF-8 export.
    #[error("NBD_OPT_EXPORT_NAME with a name that is not UTF-8")]
    ExportNameNotUtf8,
    /// NBD_OPT_EXPORT_NAME named an export that could not be opened.
    #[error("NBD_OPT_EXPORT_NAME {name:?} refused: {reason}")]
    ExportRefused { name: String, reason: String },
    /// A plain client sent NBD_OPT_EXPORT_NAME to a server that requires TLS.
    #[error("NBD_OPT_EXPORT_NAME without TLS on a server that requires it; connection closed")]
    TlsRequired,
    /// The TLS handshake after NBD_OPT_STARTTLS failed (no or a bad client certificate).
    #[error("TLS handshake: {0}")]
    Tls(String),
    /// The client sent bytes after NBD_OPT_STARTTLS before the TLS handshake.
    #[error("data after NBD_OPT_STARTTLS before the TLS handshake")]
    DataBeforeTls,
    /// The client did not finish the handshake in time (an idle or stuck socket).
    #[error("handshake not finished within {0:?}; connection dropped")]
    Timeout(std::time::Duration),
}

impl HandshakeError {
    /// Whether the client broke the protocol (as opposed to the socket failing).
    pub fn is_protocol_violation(&self) -> bool {
        !matches!(self, HandshakeError::Io { .. })
    }
}

/// What the handshake settled for one connection.
#[derive(Debug)]
pub struct Session<X> {
    /// The export, held for the connection's lifetime.
    pub export: Arc<X>,
    /// The name the client chose it by.
    pub name: String,
    /// The size advertised to the client; every request is checked against it.
    pub size: u64,
    /// Whether the export was advertised read-only.
    pub read_only: bool,
    /// Simple or structured replies.
    pub framing: Framing,
    /// The id of `base:allocation` when the client selected it for this export.
    pub block_status_context: Option<u32>,
}

/// How the handshake ended.
#[derive(Debug)]
pub enum Outcome<X> {
    /// Go on to transmission.
    Transmit(Session<X>),
    /// The client aborted or closed the connection.
    Ended,
    /// NBD_OPT_STARTTLS was acknowledged: the caller runs the TLS handshake on the
    /// stream and then [`negotiate_options`] again over TLS (no option state is kept).
    StartTls,
}

/// Where TLS stands on a connection, for the option haggling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsState {
    /// The server has no certificate: NBD_OPT_STARTTLS is refused.
    Off,
    /// TLS is offered; plain clients are served too.
    Offered,
    /// TLS is required: every option but STARTTLS and ABORT is refused until it is on.
    Required,
    /// The connection is already TLS.
    Active,
}

/// What the client's greeting said.
#[derive(Clone, Copy, Debug)]
pub struct ClientFlags {
    pub no_zeroes: bool,
}

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
    let mut negotiation = Negotiation {
        exports,
        peer,
        max_request,
        no_zeroes: flags.no_zeroes,
        structured: false,
        meta_context_export: None,
        out: Vec::new(),
        tls,
    };
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

/// What to do after answering one option.
enum Step<X> {
    Continue,
    Transmit(Session<X>),
    Abort,
    StartTls,
}

/// The handshake's state between options.
struct Negotiation<'a, E> {
    /// Where names are opened and listed.
    exports: &'a E,
    /// The client, for logs and [`Images::open`].
    peer: &'a str,
    /// Advertised as the maximum payload in NBD_INFO_BLOCK_SIZE.
    max_request: u32,
    /// The client asked to skip the zero padding after NBD_OPT_EXPORT_NAME.
    no_zeroes: bool,
    /// NBD_OPT_STRUCTURED_REPLY was acknowledged.
    structured: bool,
    /// The export named by the last successful NBD_OPT_SET_META_CONTEXT that selected
    /// `base:allocation`.
    meta_context_export: Option<String>,
    /// Replies to the current option, sent in one write.
    out: Vec<u8>,
    /// Whether TLS is off, offered, required or already on.
    tls: TlsState,
}

impl<E: Images> Negotiation<'_, E> {
    async fn option<R: AsyncRead + Unpin>(
        &mut self,
        reader: &mut R,
        header: OptionHeader,
    ) -> Result<Step<E::Image>, HandshakeError> {
        let OptionHeader { option, length } = header;
        if option == proto::OPT_EXPORT_NAME && length > proto::MAX_STRING as u32 {
            return Err(HandshakeError::ExportNameTooLong { length });
        }
        if length > MAX_OPTION_LEN {
            warn!(
                peer = self.peer,
                option, length, "option payload too large; skipped"
            );
            skip(reader, u64::from(length))
                .await
                .map_err(|source| io_error("skipping an oversized option", source))?;
            self.reply_error(option, proto::REP_ERR_TOO_BIG, "option data too large");
            return Ok(Step::Continue);
        }
        let mut payload = vec![0u8; length as usize];
        reader
            .read_exact(&mut payload)
            .await
            .map_err(|source| io_error("reading option data", source))?;
        let plain_but_required = self.tls == TlsState::Required;
        match option {
            proto::OPT_STARTTLS => return Ok(self.start_tls(&payload)),
            proto::OPT_ABORT => {
                self.reply(option, proto::REP_ACK, &[]);
                return Ok(Step::Abort);
            }
            // No reply can carry an error to NBD_OPT_EXPORT_NAME: the connection closes.
            proto::OPT_EXPORT_NAME if plain_but_required => {
                return Err(HandshakeError::TlsRequired)
            }
            _ if plain_but_required => {
                let message = "this server requires TLS: send NBD_OPT_STARTTLS first";
                self.reply_error(option, proto::REP_ERR_TLS_REQD, message);
                return Ok(Step::Continue);
            }
            _ => {}
        }
        match option {
            proto::OPT_EXPORT_NAME => self.export_name(payload).await,
            proto::OPT_LIST => self.list(&payload).await,
            proto::OPT_INFO | proto::OPT_GO => self.info(option, &payload).await,
            proto::OPT_STRUCTURED_REPLY => Ok(self.structured_reply(&payload)),
            proto::OPT_LIST_META_CONTEXT | proto::OPT_SET_META_CONTEXT => {
                Ok(self.meta_context(option, &payload))
            }
            _ => {
                debug!(peer = self.peer, option, "unsupported option");
                self.reply_error(option, proto::REP_ERR_UNSUP, "option not supported");
                Ok(Step::Continue)
            }
        }
    }

    /// NBD_OPT_STARTTLS: acknowledged when TLS is offered and not on yet.
    fn start_tls(&mut self, payload: &[u8]) -> Step<E::Image> {
        let option = proto::OPT_STARTTLS;
        if !payload.is_empty() {
            self.reply_error(
                option,
                proto::REP_ERR_INVALID,
                "NBD_OPT_STARTTLS takes no data",
            );
            return Step::Continue;
        }
        match self.tls {
            TlsState::Off => {
                let message = "TLS is not configured on this server";
                self.reply_error(option, proto::REP_ERR_POLICY, message);
                Step::Continue
            }
            TlsState::Active => {
                self.reply_error(option, proto::REP_ERR_INVALID, "TLS is already on");
                Step::Continue
            }
            TlsState::Offered | TlsState::Required => {
                self.reply(option, proto::REP_ACK, &[]);
                Step::StartTls
            }
        }
    }

    async fn export_name(&mut self, payload: Vec<u8>) -> Result<Step<E::Image>, HandshakeError> {
        let name = String::from_utf8(payload).map_err(|_| HandshakeError::ExportNameNotUtf8)?;
        let export = self.exports.open(&name, self.peer).await.map_err(|error| {
            HandshakeError::ExportRefused {
                name: name.clone(),
                reason: refusal(&name, error),
            }
        })?;
        let session = self.session(name, export);
        let flags = transmission_flags(&*session.export, session.framing);
        self.out.extend_from_slice(&session.size.to_be_bytes());
        self.out.extend_from_slice(&flags.to_be_bytes());
        if !self.no_zeroes {
            self.out.extend_from_slice(&[0; proto::EXPORT_NAME_PADDING]);
        }
        Ok(Step::Transmit(session))
    }

    async fn list(&mut self, payload: &[u8]) -> Result<Step<E::Image>, HandshakeError> {
        if !payload.is_empty() {
            self.invalid(proto::OPT_LIST, "NBD_OPT_LIST takes no data");
            return Ok(Step::Continue);
        }
        for Listing {
            name, description, ..
        } in self.exports.list().await
        {
            let mut entry = Vec::with_capacity(4 + name.len() + description.len());
            entry.extend_from_slice(&(name.len() as u32).to_be_bytes());
            entry.extend_from_slice(name.as_bytes());
            entry.extend_from_slice(description.as_bytes());
            self.reply(proto::OPT_LIST, proto::REP_SERVER, &entry);
        }
        self.reply(proto::OPT_LIST, proto::REP_ACK, &[]);
        Ok(Step::Continue)
    }

    async fn info(
        &mut self,
        option: u32,
        payload: &[u8],
    ) -> Result<Step<E::Image>, HandshakeError> {
        let request = match InfoRequest::parse(payload) {
            Ok(request) => request,
            Err(error) => {
                self.invalid(option, &error.to_string());
                return Ok(Step::Continue);
            }
        };
        let export = match self.exports.open(&request.name, self.peer).await {
            Ok(export) => export,
            Err(error) => {
                debug!(
                    peer = self.peer,
                    name = request.name,
                    ?error,
                    "export refused"
                );
                let message = refusal(&request.name, error);
                self.reply_error(option, proto::REP_ERR_UNKNOWN, &message);
                return Ok(Step::Continue);
            }
        };
        let session = self.session(request.name, export);
        self.send_infos(option, &session, &request.requests).await;
        self.reply(option, proto::REP_ACK, &[]);
        if option == proto::OPT_GO {
            Ok(Step::Transmit(session))
        } else {
            Ok(Step::Continue)
        }
    }

    /// NBD_INFO_EXPORT and NBD_INFO_BLOCK_SIZE always; the name and description when asked.
    async fn send_infos(&mut self, option: u32, session: &Session<E::Image>, requested: &[u16]) {
        let flags = transmission_flags(&*session.export, session.framing);
        let mut info = proto::INFO_EXPORT.to_be_bytes().to_vec();
        info.extend_from_slice(&session.size.to_be_bytes());
        info.extend_from_slice(&flags.to_be_bytes());
        self.reply(option, proto::REP_INFO, &info);

        let mut info = proto::INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        let preferred = preferred_block(session.export.block_size(), self.max_request);
        for size in [MINIMUM_BLOCK, preferred, self.max_request] {
            info.extend_from_slice(&size.to_be_bytes());
        }
        self.reply(option, proto::REP_INFO, &info);

        if requested.contains(&proto::INFO_NAME) {
            let mut info = proto::INFO_NAME.to_be_bytes().to_vec();
            info.extend_from_slice(session.name.as_bytes());
            self.reply(option, proto::REP_INFO, &info);
        }
        if requested.contains(&proto::INFO_DESCRIPTION) {
            let listed = self.exports.list().await;
            if let Some(Listing { description, .. }) =
                listed.iter().find(|l| l.name == session.name)
            {
                let mut info = proto::INFO_DESCRIPTION.to_be_bytes().to_vec();
                info.extend_from_slice(description.as_bytes());
                self.reply(option, proto::REP_INFO, &info);
            }
        }
    }

    fn structured_reply(&mut self, payload: &[u8]) -> Step<E::Image> {
        if payload.is_empty() {
            self.structured = true;
            self.reply(proto::OPT_STRUCTURED_REPLY, proto::REP_ACK, &[]);
        } else {
            self.invalid(
                proto::OPT_STRUCTURED_REPLY,
                "NBD_OPT_STRUCTURED_REPLY takes no data",
            );
        }
        Step::Continue
    }

    fn meta_context(&mut self, option: u32, payload: &[u8]) -> Step<E::Image> {
        let set = option == proto::OPT_SET_META_CONTEXT;
        if set {
            // A SET replaces the previous selection, even when it fails.
            self.meta_context_export = None;
        }
        if !self.structured {
            self.invalid(option, "structured replies must be negotiated first");
            return Step::Continue;
        }
        let request = match MetaContextRequest::parse(payload) {
            Ok(request) => request,
            Err(error) => {
                self.invalid(option, &error.to_string());
                return Step::Continue;
            }
        };
        let (matched, id) = if set {
            (request.selects_base_allocation(), BASE_ALLOCATION_ID)
        } else {
            // Ids in a LIST reply are reserved and sent as zero.
            (request.lists_base_allocation(), 0)
        };
        if matched {
            let mut context = id.to_be_bytes().to_vec();
            context.extend_from_slice(proto::BASE_ALLOCATION.as_bytes());
            self.reply(option, proto::REP_META_CONTEXT, &context);
            if set {
                self.meta_context_export = Some(request.export);
            }
        }
        self.reply(option, proto::REP_ACK, &[]);
        Step::Continue
    }

    fn session(&self, name: String, export: Arc<E::Image>) -> Session<E::Image> {
        let block_status_context =
            (self.meta_context_export.as_deref() == Some(&name)).then_some(BASE_ALLOCATION_ID);
        Session {
            size: export.size(),
            read_only: !export.writable(),
            framing: if self.structured {
                Framing::Structured
            } else {
                Framing::Simple
            },
            block_status_context,
            name,
            export,
        }
    }

    /// Refuses a malformed option; the client broke the protocol but may go on.
    fn invalid(&mut self, option: u32, message: &str) {
        warn!(peer = self.peer, option, message, "invalid option");
        self.reply_error(option, proto::REP_ERR_INVALID, message);
    }

    fn reply_error(&mut self, option: u32, reply: u32, message: &str) {
        self.reply(option, reply, proto::clip_string(message).as_bytes());
    }

    fn reply(&mut self, option: u32, reply: u32, payload: &[u8]) {
        // Payloads are built here from bounded strings and a few fixed fields.
        let length = u32::try_from(payload.len()).unwrap_or(u32::MAX);
        self.out
            .extend_from_slice(&proto::option_reply_header(option, reply, length));
        self.out.extend_from_slice(payload);
    }
}

/// The transmission flags advertised for `export`.
pub fn transmission_flags<X: Image>(export: &X, framing: Framing) -> u16 {
    let mut flags = proto::FLAG_HAS_FLAGS
        | proto::FLAG_SEND_FLUSH
        | proto::FLAG_SEND_FUA
        | proto::FLAG_SEND_CACHE;
    if !export.writable() {
        flags |= proto::FLAG_READ_ONLY;
    } else {
        flags |= proto::FLAG_SEND_TRIM | proto::FLAG_SEND_WRITE_ZEROES;
    }
    if export.shared() {
        flags |= proto::FLAG_CAN_MULTI_CONN;
    }
    if framing == Framing::Structured {
        // Reads are always answered with a single content chunk.
        flags |= proto::FLAG_SEND_DF;
    }
    flags
}

/// The text shown to a client whose export could not be opened.
fn refusal(name: &str, error: OpenError) -> String {
    match error {
        OpenError::Unknown => format!("no export named {name:?}"),
        OpenError::Unavailable(reason) => reason,
    }
}

fn io_error(stage: &'static str, source: io::Error) -> HandshakeError {
    HandshakeError::Io { stage, source }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_images_block_size_is_preferred_when_the_protocol_allows_it() {
        assert_eq!(preferred_block(4096, 1 << 20), 4096);
        assert_eq!(preferred_block(65536, 1 << 20), 65536);
        assert_eq!(
            preferred_block(3000, 1 << 20),
            PREFERRED_BLOCK,
            "not a power of two"
        );
        assert_eq!(preferred_block(256, 1 << 20), PREFERRED_BLOCK, "below 512");
        assert_eq!(
            preferred_block(2 << 20, 1 << 20),
            PREFERRED_BLOCK,
            "past max_request"
        );
    }
}
