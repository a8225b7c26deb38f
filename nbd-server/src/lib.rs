//! lazyblk-nbd: an async NBD server (fixed newstyle handshake, structured replies,
//! `base:allocation` block status, pipelined requests) for any type that implements
//! its small [`Export`] trait. It knows nothing of the rest of lazyblk.
//!
//! # Layout
//! - [`export`]: the traits the server serves: [`Export`] (one device's bytes) and
//!   [`Exports`] (the exports by name), with [`Extent`], [`Command`], [`OpenError`].
//! - [`server`]: [`Listener`] (TCP or unix socket), [`serve`] (accept until shutdown),
//!   [`serve_connection`] (one connection on any stream), [`ServerConfig`].
//! - [`proto`]: the wire format: constants and fixed headers.
//! - `handshake`: option haggling up to the chosen export; `options` parses option
//!   payloads.
//! - `transmission`: the request loop; `request` checks each request, `reply` frames
//!   answers, `writer` sends them, `buffer_pool` lends data buffers, `read` reads whole
//!   messages, `errno` maps export errors to NBD error values, `shutdown` carries the
//!   server's stop signal.
//!
//! # Data flow
//! [`serve`] accepts a connection and spawns its task. The handshake reads options and
//! opens the chosen export through [`Exports::open`]. In transmission a reader takes
//! requests off the socket one after another, checks each against the advertised size
//! and flags, and starts a task per request (up to `max_in_flight`) that calls the
//! export with a pooled buffer; finished replies go to one writer task that sends each
//! header and its data in one vectored write, in completion order. NBD_CMD_DISC, the
//! client closing, or shutdown stops the reader; the connection closes once every
//! in-flight request is answered, and the export is dropped.

pub mod export;
pub mod proto;
pub mod server;

mod buffer_pool;
mod errno;
mod handshake;
mod options;
mod read;
mod reply;
mod request;
mod shutdown;
mod transmission;
mod writer;

pub use export::{Command, Export, Exports, Extent, OpenError, NO_HOLE_WRITE_SIZE};
pub use handshake::HandshakeError;
pub use server::{
    serve, serve_connection, ConnectionError, Listener, ServerConfig, ServerError,
    DEFAULT_MAX_IN_FLIGHT, DEFAULT_MAX_REQUEST,
};
pub use transmission::TransmissionError;
