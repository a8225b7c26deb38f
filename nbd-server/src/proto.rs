//! The NBD wire format: magic numbers, flags, option, command and reply codes, and the
//! fixed-size headers of both phases, as laid down in the protocol's `doc/proto.md`.
//!
//! Everything here is plain data and pure functions; the I/O lives in `handshake` and
//! `transmission`. All integers on the wire are big-endian.

// ---- Magic numbers ----------------------------------------------------------------

/// `NBDMAGIC`: the first eight bytes a server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: follows `NBDMAGIC` in newstyle negotiation and starts every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Starts every server reply to an option (fixed newstyle).
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Starts every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Starts every simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Starts every structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// ---- Handshake flags --------------------------------------------------------------

/// Server handshake flag: fixed newstyle negotiation is supported.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Server handshake flag: the 124 zero bytes after `NBD_OPT_EXPORT_NAME` may be left out.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const CLIENT_FLAG_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: the client does not want the 124 zero bytes.
pub const CLIENT_FLAG_NO_ZEROES: u32 = 1 << 1;
/// Every client flag this server understands; any other bit ends the connection.
pub const CLIENT_FLAGS_KNOWN: u32 = CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES;

// ---- Transmission flags -----------------------------------------------------------

/// Transmission flag: always set; the flags field is meaningful.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export refuses writes.
pub const FLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: `NBD_CMD_FLUSH` is understood.
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: `NBD_CMD_FLAG_FUA` is understood.
pub const FLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: `NBD_CMD_TRIM` is understood.
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: `NBD_CMD_WRITE_ZEROES` (and `NBD_CMD_FLAG_NO_HOLE`) is understood.
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: reads honour `NBD_CMD_FLAG_DF` (only with structured replies).
pub const FLAG_SEND_DF: u16 = 1 << 7;
/// Transmission flag: several connections to the export see one consistent view.
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// Transmission flag: `NBD_CMD_CACHE` is understood.
pub const FLAG_SEND_CACHE: u16 = 1 << 10;

// ---- Options ----------------------------------------------------------------------

/// Option: choose an export and enter transmission (no error reply possible).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: the client ends the session.
pub const OPT_ABORT: u32 = 2;
/// Option: list the exports.
pub const OPT_LIST: u32 = 3;
/// Option: upgrade to TLS (not offered by this server).
pub const OPT_STARTTLS: u32 = 5;
/// Option: describe an export without entering transmission.
pub const OPT_INFO: u32 = 6;
/// Option: describe an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Option: use structured replies in transmission.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Option: list metadata contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Option: select metadata contexts for `NBD_CMD_BLOCK_STATUS`.
pub const OPT_SET_META_CONTEXT: u32 = 10;

// ---- Option replies ---------------------------------------------------------------

/// Option reply: done, success.
pub const REP_ACK: u32 = 1;
/// Option reply: one export of `NBD_OPT_LIST`.
pub const REP_SERVER: u32 = 2;
/// Option reply: one piece of information about an export.
pub const REP_INFO: u32 = 3;
/// Option reply: one metadata context.
pub const REP_META_CONTEXT: u32 = 4;
/// Error replies have bit 31 set.
const REP_ERROR: u32 = 1 << 31;
/// Option error: the option is unknown to this server.
pub const REP_ERR_UNSUP: u32 = REP_ERROR | 1;
/// Option error: known, but refused by policy.
pub const REP_ERR_POLICY: u32 = REP_ERROR | 2;
/// Option error: known, but malformed.
pub const REP_ERR_INVALID: u32 = REP_ERROR | 3;
/// The option needs TLS first (NBD_REP_ERR_TLS_REQD).
pub const REP_ERR_TLS_REQD: u32 = REP_ERROR | 5;
/// Option error: the export is not available.
pub const REP_ERR_UNKNOWN: u32 = REP_ERROR | 6;
/// Option error: the request or its reply is too large.
pub const REP_ERR_TOO_BIG: u32 = REP_ERROR | 9;

// ---- Information types (NBD_OPT_INFO / NBD_OPT_GO) --------------------------------

/// Information: size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Information: the export's canonical name.
pub const INFO_NAME: u16 = 1;
/// Information: the export's description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Information: minimum, preferred and maximum block sizes.
pub const INFO_BLOCK_SIZE: u16 = 3;

// ---- Commands ---------------------------------------------------------------------

/// Command: read.
pub const CMD_READ: u16 = 0;
/// Command: write (a payload follows the header).
pub const CMD_WRITE: u16 = 1;
/// Command: disconnect once in-flight requests are answered.
pub const CMD_DISC: u16 = 2;
/// Command: make acknowledged writes durable.
pub const CMD_FLUSH: u16 = 3;
/// Command: the range is no longer needed.
pub const CMD_TRIM: u16 = 4;
/// Command: the client will read the range soon.
pub const CMD_CACHE: u16 = 5;
/// Command: the range should read as zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Command: report the allocation of a range.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flag: reply only once the effect is durable.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag (write zeroes): keep the range allocated.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag (read): send at most one content chunk.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag (block status): report exactly one extent.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

// ---- Structured replies -----------------------------------------------------------

/// Structured reply flag: the last chunk of a reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Structured chunk: nothing (a final, successful chunk).
pub const REPLY_TYPE_NONE: u16 = 0;
/// Structured chunk: data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Structured chunk: a run of zeroes at an offset (payload: offset, then length).
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Structured chunk: extents of one metadata context.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Structured chunk: an error with an optional message.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;

/// `base:allocation` extent flag: the range is not allocated.
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` extent flag: the range reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;
/// The one metadata context this server knows.
pub const BASE_ALLOCATION: &str = "base:allocation";

// ---- Error values -----------------------------------------------------------------

/// Error: operation not permitted.
pub const EPERM: u32 = 1;
/// Error: input/output error.
pub const EIO: u32 = 5;
/// Error: out of memory.
pub const ENOMEM: u32 = 12;
/// Error: invalid argument.
pub const EINVAL: u32 = 22;
/// Error: no space left (writes past the end).
pub const ENOSPC: u32 = 28;
/// Error: value too large.
pub const EOVERFLOW: u32 = 75;
/// Error: operation not supported.
pub const ENOTSUP: u32 = 95;
/// Error: the server is shutting down.
pub const ESHUTDOWN: u32 = 108;

// ---- Sizes ------------------------------------------------------------------------

/// The protocol's limit for any string (export names, descriptions, messages).
pub const MAX_STRING: usize = 4096;
/// Zero bytes after the `NBD_OPT_EXPORT_NAME` reply unless the client opted out.
pub const EXPORT_NAME_PADDING: usize = 124;
/// The largest payload the protocol asks servers to accept before crying denial of
/// service (2^25); clients are told to stay at or under it.
pub const PORTABLE_PAYLOAD: u32 = 1 << 25;
/// Servers should not put more extents than this in one block status chunk.
pub const MAX_EXTENTS: usize = 1 << 20;

/// Bytes in the greeting.
pub const HANDSHAKE_LEN: usize = 18;
/// Bytes in an option header.
pub const OPTION_HEADER_LEN: usize = 16;
/// Bytes in an option reply header.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Bytes in a request header.
pub const REQUEST_LEN: usize = 28;
/// Bytes in a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Bytes in a structured reply chunk header.
pub const STRUCTURED_HEADER_LEN: usize = 20;

// ---- Handshake --------------------------------------------------------------------

/// The server's greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub fn greeting(flags: u16) -> [u8; HANDSHAKE_LEN] {
    let mut out = [0; HANDSHAKE_LEN];
    out[0..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..18].copy_from_slice(&flags.to_be_bytes());
    out
}

/// The header of one client option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub length: u32,
}

impl OptionHeader {
    /// Parses an option header; `Err` carries the magic when it is not `IHAVEOPT`.
    pub fn decode(bytes: &[u8; OPTION_HEADER_LEN]) -> Result<Self, u64> {
        let magic = u64::from_be_bytes(take(bytes, 0));
        if magic != IHAVEOPT {
            return Err(magic);
        }
        Ok(Self {
            option: u32::from_be_bytes(take(bytes, 8)),
            length: u32::from_be_bytes(take(bytes, 12)),
        })
    }
}

/// The header of one server reply to an option; `length` bytes of payload follow.
pub fn option_reply_header(option: u32, reply: u32, length: u32) -> [u8; OPTION_REPLY_HEADER_LEN] {
    let mut out = [0; OPTION_REPLY_HEADER_LEN];
    out[0..8].copy_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out[8..12].copy_from_slice(&option.to_be_bytes());
    out[12..16].copy_from_slice(&reply.to_be_bytes());
    out[16..20].copy_from_slice(&length.to_be_bytes());
    out
}

// ---- Transmission -----------------------------------------------------------------

/// One transmission request header (the payload of a write follows it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl RequestHeader {
    /// Parses a request header; `Err` carries the magic when it is not `REQUEST_MAGIC`.
    pub fn decode(bytes: &[u8; REQUEST_LEN]) -> Result<Self, u32> {
        let magic = u32::from_be_bytes(take(bytes, 0));
        if magic != REQUEST_MAGIC {
            return Err(magic);
        }
        Ok(Self {
            flags: u16::from_be_bytes(take(bytes, 4)),
            kind: u16::from_be_bytes(take(bytes, 6)),
            cookie: u64::from_be_bytes(take(bytes, 8)),
            offset: u64::from_be_bytes(take(bytes, 16)),
            length: u32::from_be_bytes(take(bytes, 24)),
        })
    }

    /// Encodes the header (clients and tests use it).
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut out = [0; REQUEST_LEN];
        out[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.kind.to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..28].copy_from_slice(&self.length.to_be_bytes());
        out
    }
}

/// A simple reply header; for a successful read, the data follows.
pub fn simple_reply(error: u32, cookie: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut out = [0; SIMPLE_REPLY_LEN];
    out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out
}

/// A structured reply chunk header; `length` bytes of payload follow.
pub fn structured_header(
    flags: u16,
    kind: u16,
    cookie: u64,
    length: u32,
) -> [u8; STRUCTURED_HEADER_LEN] {
    let mut out = [0; STRUCTURED_HEADER_LEN];
    out[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&kind.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out[16..20].copy_from_slice(&length.to_be_bytes());
    out
}

/// The longest prefix of `text` that fits the protocol's string limit, cut on a
/// character boundary (for messages that quote export names or export errors).
pub fn clip_string(text: &str) -> &str {
    let mut end = text.len().min(MAX_STRING);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The `N` bytes of `bytes` at `at`; callers index fixed-size headers with constant
/// offsets, so the range is always in bounds.
fn take<const N: usize>(bytes: &[u8], at: usize) -> [u8; N] {
    let mut out = [0; N];
    out.copy_from_slice(&bytes[at..at + N]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_is_magic_then_flags() {
        let bytes = greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        assert_eq!(&bytes[0..8], b"NBDMAGIC");
        assert_eq!(&bytes[8..16], b"IHAVEOPT");
        assert_eq!(&bytes[16..18], &[0, 3]);
    }

    #[test]
    fn option_header_round_trip() {
        let mut bytes = [0u8; OPTION_HEADER_LEN];
        bytes[0..8].copy_from_slice(b"IHAVEOPT");
        bytes[8..12].copy_from_slice(&OPT_GO.to_be_bytes());
        bytes[12..16].copy_from_slice(&42u32.to_be_bytes());
        assert_eq!(
            OptionHeader::decode(&bytes),
            Ok(OptionHeader {
                option: OPT_GO,
                length: 42
            })
        );
        bytes[0] = b'X';
        assert!(OptionHeader::decode(&bytes).is_err());
    }

    #[test]
    fn option_reply_layout() {
        let bytes = option_reply_header(OPT_LIST, REP_ERR_UNSUP, 7);
        assert_eq!(&bytes[0..8], &[0, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9]);
        assert_eq!(&bytes[8..12], &[0, 0, 0, 3]);
        assert_eq!(&bytes[12..16], &[0x80, 0, 0, 1]);
        assert_eq!(&bytes[16..20], &[0, 0, 0, 7]);
    }

    #[test]
    fn request_round_trip() {
        let request = RequestHeader {
            flags: CMD_FLAG_FUA,
            kind: CMD_WRITE,
            cookie: 0x0102_0304_0506_0708,
            offset: 1 << 40,
            length: 4096,
        };
        let bytes = request.encode();
        assert_eq!(&bytes[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(RequestHeader::decode(&bytes), Ok(request));
    }

    #[test]
    fn request_with_wrong_magic_is_refused() {
        let mut bytes = [0u8; REQUEST_LEN];
        bytes[0..4].copy_from_slice(&0x1256_0953u32.to_be_bytes());
        assert_eq!(RequestHeader::decode(&bytes), Err(0x1256_0953));
    }

    #[test]
    fn clipped_strings_stay_valid_and_bounded() {
        assert_eq!(clip_string("short"), "short");
        let long = "é".repeat(MAX_STRING);
        let clipped = clip_string(&long);
        assert!(clipped.len() <= MAX_STRING && clipped.len() >= MAX_STRING - 1);
        assert!(clipped.chars().all(|c| c == 'é'));
    }

    #[test]
    fn simple_reply_layout() {
        let bytes = simple_reply(EINVAL, 9);
        assert_eq!(&bytes[0..4], &[0x67, 0x44, 0x66, 0x98]);
        assert_eq!(&bytes[4..8], &[0, 0, 0, 22]);
        assert_eq!(&bytes[8..16], &9u64.to_be_bytes());
    }

    #[test]
    fn structured_header_layout() {
        let bytes = structured_header(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 5, 6);
        assert_eq!(&bytes[0..4], &[0x66, 0x8e, 0x33, 0xef]);
        assert_eq!(&bytes[4..6], &[0, 1]);
        assert_eq!(&bytes[6..8], &[0x80, 0x01]);
        assert_eq!(&bytes[8..16], &5u64.to_be_bytes());
        assert_eq!(&bytes[16..20], &6u32.to_be_bytes());
    }
}
