//! The option haggling's answers: each option the client sends (up to the export it
//! picks) answered into one reply buffer, and what is advertised of an export (its
//! transmission flags, block sizes, block status context).

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt};
use tracing::{debug, warn};

use crate::options::{InfoRequest, MetaContextRequest};
use crate::proto::{self, OptionHeader};
use crate::read::skip;
use crate::reply::Framing;
use crate::session::{io_error, ClientFlags, HandshakeError, Session, TlsState};
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

/// What to do after answering one option.
pub(crate) enum Step<X> {
    Continue,
    Transmit(Session<X>),
    Abort,
    StartTls,
}

/// The handshake's state between options.
pub(crate) struct Negotiation<'a, E> {
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
    pub(crate) out: Vec<u8>,
    /// Whether TLS is off, offered, required or already on.
    tls: TlsState,
}

impl<'a, E: Images> Negotiation<'a, E> {
    /// The state before the first option: no structured replies, no context chosen.
    pub(crate) fn new(
        exports: &'a E,
        peer: &'a str,
        max_request: u32,
        flags: ClientFlags,
        tls: TlsState,
    ) -> Negotiation<'a, E> {
        Negotiation {
            exports,
            peer,
            max_request,
            no_zeroes: flags.no_zeroes,
            structured: false,
            meta_context_export: None,
            out: Vec::new(),
            tls,
        }
    }

    /// Answers one option (its payload read from `reader`) into [`Negotiation::out`].
    pub(crate) async fn option<R: AsyncRead + Unpin>(
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
