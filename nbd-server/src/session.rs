//! What the handshake settles and how it fails: the [`Session`] handed to the
//! transmission phase, how the handshake ended ([`Outcome`]), where TLS stands, the
//! client's flags, and [`HandshakeError`].

use std::io;
use std::sync::Arc;

use crate::proto;
use crate::reply::Framing;

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
    /// stream and then [`negotiate_options`](crate::handshake::negotiate_options)
    /// again over TLS (no option state is kept).
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

/// A socket failure at `stage` of the handshake.
pub(crate) fn io_error(stage: &'static str, source: io::Error) -> HandshakeError {
    HandshakeError::Io { stage, source }
}
