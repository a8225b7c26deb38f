//! lazyblk-nbd: an async NBD server (fixed newstyle handshake, structured replies,
//! `base:allocation` block status, pipelined requests) for any image set of
//! `lazyblk-image` ([`Images`](lazyblk_image::Images)). It knows nothing else of
//! lazyblk: the image side (the traits, the zero-copy pieces, the buffer pool) is that
//! crate's, and this one keeps only the wire mapping.
//!
//! # Layout
//! - [`export`]: [`Command`], the wire's commands and the image operation each stands
//!   for.
//! - [`config`]: [`ServerConfig`], the limits of one server.
//! - [`server`]: [`Listener`] (TCP or unix socket), [`serve`] (accept until shutdown),
//!   [`serve_connection`] (one connection on any stream), [`serve_socket`] (one on a
//!   socket, splicing large cached reads), [`ServerConfig`]; `listener` binds and
//!   accepts, `connection` runs one connection (handshake, TLS, transmission).
//! - [`proto`]: the wire format: constants and fixed headers.
//! - [`kernel`]: the kernel's NBD client: connects `/dev/nbdN` to a server over a
//!   socket (the client handshake, the driver's ioctls, the `NBD_DO_IT` thread).
//! - `handshake`: the greeting and option haggling up to the chosen export;
//!   `negotiation` answers each option, `session` holds what it settles, `options`
//!   parses option payloads.
//! - `transmission`: the request loop; `request` checks each request, `execute` runs
//!   it against the export and owes its reply, `reply` frames
//!   answers, `writer` sends them, `splice` sends reads that lie in files without
//!   copying them, `read` reads whole
//!   messages, `errno` maps export errors to NBD error values, `shutdown` carries the
//!   server's stop signal.
//!
//! # Data flow
//! [`serve`] accepts a connection and spawns its task. The handshake reads options and
//! opens the chosen image through `Images::open` (an NBD export is an image). In transmission a reader takes
//! requests off the socket one after another, checks each against the advertised size
//! and flags, and starts a task per request (up to `max_in_flight`) that calls the
//! image with a buffer from `lazyblk-image`'s pool; finished replies go to one writer task that sends each
//! header and its data in one vectored write, in completion order. On a plain socket a
//! read of 64 KiB or more whose bytes the export has in page-cached files or runs of
//! zeroes (`ReadImage::resident_pieces`) is not copied: the writer splices the header and the
//! file pieces through a pipe, and sends runs of zeroes as hole chunks or zero pages
//! ([`crate::splice`]). NBD_CMD_DISC, the
//! client closing, or shutdown stops the reader; the connection closes once every
//! in-flight request is answered, and the export is dropped.
//!
//! # Protocol choices
//! - No TLS: NBD_OPT_STARTTLS gets NBD_REP_ERR_POLICY. Unknown options get
//!   NBD_REP_ERR_UNSUP and negotiation goes on. Option payloads over 64 KiB are
//!   skipped unread and refused with NBD_REP_ERR_TOO_BIG (an oversized
//!   NBD_OPT_EXPORT_NAME, which cannot be refused, closes the connection).
//! - NBD_INFO_EXPORT and NBD_INFO_BLOCK_SIZE (1, 4096, `max_request`) answer every
//!   NBD_OPT_INFO/NBD_OPT_GO; the name and description when asked for. Metadata
//!   contexts are checked without opening the export.
//! - A read is answered whole or not at all: with structured replies, one final
//!   OFFSET_DATA chunk or one ERROR chunk carrying the export's error text; other
//!   successes use a simple reply, which the protocol allows. A read answered from
//!   files that holds runs of zeroes is the one exception: an OFFSET_DATA chunk per run
//!   of data and an OFFSET_HOLE chunk per run of zeroes, unless the client set
//!   NBD_CMD_FLAG_DF (then one OFFSET_DATA chunk with the zeroes in it, or one
//!   OFFSET_HOLE chunk for a read that is all one hole).
//! - NBD_CMD_FLAG_NO_HOLE calls `SparseImage::write_zeroes_allocated` (by default,
//!   real zeroes through `WriteImage::write_at`); NBD_CMD_CACHE is a prefetch hint
//!   (`PrefetchImage::prefetch`), answered at once.
//! - A write the server refuses still has its payload read and dropped, up to
//!   max(`max_request`, 32 MiB); a larger one closes the connection, as the protocol
//!   permits. Each connection holds at most `max_in_flight` requests and 64 MiB of
//!   payload at once (queued replies included).

pub mod export;
pub mod kernel;
pub mod proto;
pub mod server;

mod config;
mod connection;
mod errno;
mod execute;
mod handshake;
mod listener;
mod negotiation;
mod options;
mod read;
mod reply;
mod request;
mod session;
mod shutdown;
mod splice;
mod transmission;
mod writer;

pub use export::Command;
pub use server::{
    serve, serve_connection, serve_socket, serve_with_tls, ConnectionError, Listener, ServerConfig,
    ServerError, Tls, DEFAULT_MAX_IN_FLIGHT, DEFAULT_MAX_REQUEST, MAX_REQUEST_CEILING,
    SHUTDOWN_GRACE,
};
pub use session::HandshakeError;
pub use splice::SPLICE_MIN_READ;
pub use transmission::TransmissionError;
