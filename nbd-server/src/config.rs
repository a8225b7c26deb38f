//! The limits of one server: payload size, requests and bytes in flight, connections,
//! the handshake's deadline.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::negotiation;

/// Limits of one server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerConfig {
    /// The largest read or write payload, advertised in NBD_INFO_BLOCK_SIZE; from 4096
    /// to [`MAX_REQUEST_CEILING`] (values outside are moved to the nearest bound).
    pub max_request: u32,
    /// Requests one connection may have in flight; at least 1.
    pub max_in_flight: usize,
    /// Connections served at once; a connection past it is closed as soon as it is
    /// accepted (and the refusal logged). At least 1.
    pub max_connections: usize,
    /// How long a client has to finish the handshake (from accept to its choice of an
    /// export) before it is dropped.
    pub handshake_timeout: Duration,
    /// Payload bytes in flight over all connections of the server (raised to
    /// `max_request` when smaller, so every valid request fits).
    pub max_bytes_in_flight: u64,
    /// Leave a unix socket's file in place when the server stops: the listening
    /// socket is kept (systemd's file descriptor store) for the next server, which
    /// accepts on it at the same path; clients that connect meanwhile wait in its
    /// backlog instead of being refused.
    pub keep_socket_file: bool,
}

/// The protocol's portable maximum payload (2^25): every client stays within it.
pub const DEFAULT_MAX_REQUEST: u32 = 32 << 20;

/// The largest `max_request` honoured: one request's buffer is allocated whole, so
/// beyond 1 GiB a single request could exhaust a node's memory.
pub const MAX_REQUEST_CEILING: u32 = 1 << 30;

/// Requests in flight per connection by default: deeper than the kernel client's and
/// nbdcopy's queues, so they never wait on the server's limit.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 64;

/// Connections by default: a node runs tens to hundreds of sandboxes, each with a few
/// connections; an idle connection costs a task and a 64 KiB read buffer.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

/// The handshake deadline by default: a real client finishes in milliseconds.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Payload bytes in flight over all connections by default: two connections' worth of
/// [`crate::transmission::IN_FLIGHT_BYTES`], which keeps a node's memory bounded whatever
/// many clients that never read their replies do.
pub const DEFAULT_MAX_BYTES_IN_FLIGHT: u64 = 128 << 20;

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_request: DEFAULT_MAX_REQUEST,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_bytes_in_flight: DEFAULT_MAX_BYTES_IN_FLIGHT,
            keep_socket_file: false,
        }
    }
}

impl ServerConfig {
    /// The configuration with its documented lower bounds applied.
    pub(crate) fn effective(self) -> Self {
        let max_request = self
            .max_request
            .clamp(negotiation::PREFERRED_BLOCK, MAX_REQUEST_CEILING);
        Self {
            max_request,
            max_in_flight: self.max_in_flight.max(1),
            max_connections: self.max_connections.max(1),
            handshake_timeout: self.handshake_timeout.max(Duration::from_millis(100)),
            max_bytes_in_flight: self
                .max_bytes_in_flight
                .clamp(u64::from(max_request), u64::from(u32::MAX)),
            keep_socket_file: self.keep_socket_file,
        }
    }

    /// The server-wide payload budget this configuration asks for.
    pub(crate) fn bytes_budget(&self) -> Arc<Semaphore> {
        Arc::new(Semaphore::new(self.max_bytes_in_flight as usize))
    }
}
