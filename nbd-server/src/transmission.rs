//! The transmission phase of one connection: read requests continuously, run up to
//! `max_in_flight` of them at once (each in its own task), and let the writer send each
//! reply as soon as its request finishes, in whatever order that is.
//!
//! A request holds a permit of the connection's request limit and, for reads and
//! writes, permits for its payload bytes, of the connection's budget and of the
//! server's (shared by every connection); they travel with its reply and are released
//! only once the reply is written, so queued replies count too. When a limit is reached
//! the reader stops reading, and the socket pushes back on the client: memory is bounded
//! by not reading, never by allocating. What each request task runs is in
//! [`crate::execute`].

use std::future::Future;
use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, error, warn};

use crate::config::ServerConfig;
use crate::execute::{OpKind, Pending, Shared};
use crate::export::Command;
use crate::proto::{self, RequestHeader};
use crate::read::{read_message, skip};
use crate::reply::{Permits, Reply};
use crate::request::{Limits, Op, Rejection};
use crate::session::Session;
use crate::shutdown::Shutdown;
use crate::splice::SpliceSink;
use crate::writer::write_replies;
use lazyblk_image::{BufferPool, Door, Images, PooledBuffer};

/// Payload bytes (read data and write data) one connection may hold in flight, queued
/// replies included: room for 64 requests of 1 MiB, which keeps a kernel client or
/// nbdcopy busy, while bounding what a client can make the server hold (the limit is
/// raised to `max_request` when that is larger, so every valid request fits).
pub const IN_FLIGHT_BYTES: u32 = 64 << 20;

/// A failed transmission phase; the connection is closed.
#[derive(Debug, thiserror::Error)]
pub enum TransmissionError {
    /// Sending or receiving failed (or the client left in the middle of a request).
    #[error("{stage}: {source}")]
    Io {
        stage: &'static str,
        source: io::Error,
    },
    /// A request did not start with the request magic.
    #[error("request starts with {magic:#010x}, not the request magic")]
    BadRequestMagic { magic: u32 },
    /// A refused write's payload was too large to read and throw away.
    #[error("refused write of {length} bytes is over the {limit}-byte limit for skipping it")]
    OversizedWrite { length: u32, limit: u32 },
}

impl TransmissionError {
    /// Whether the client broke the protocol (as opposed to the socket failing).
    pub fn is_protocol_violation(&self) -> bool {
        !matches!(self, TransmissionError::Io { .. })
    }
}

/// How the request loop ended, when it ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The client sent NBD_CMD_DISC.
    Disc,
    /// The client closed its side between requests.
    Closed,
    /// The server is shutting down.
    Shutdown,
    /// The reply writer stopped (its error is reported instead).
    WriterGone,
}

/// Serves requests until the client disconnects, breaks the protocol, or `shutdown`
/// fires; in-flight requests are always run to completion before this returns.
#[allow(
    clippy::too_many_arguments,
    reason = "each is one part of the connection the loop owns; a struct would only rename them"
)]
pub async fn transmit<E, R, W>(
    session: Session<E::Image>,
    reader: R,
    writer: W,
    exports: Arc<E>,
    config: ServerConfig,
    server_bytes: Arc<Semaphore>,
    peer: &str,
    shutdown: Shutdown,
    splice: Option<SpliceSink>,
) -> Result<(), TransmissionError>
where
    E: Images,
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let ServerConfig {
        max_request,
        max_in_flight,
        ..
    } = config;
    let limits = Limits {
        size: session.size,
        read_only: session.read_only,
        framing: session.framing,
        block_status_context: session.block_status_context,
        max_request,
    };
    let (replies, queued) = mpsc::channel(max_in_flight);
    let splice_enabled = splice.as_ref().map(SpliceSink::enabled);
    let writer = tokio::spawn(write_replies(writer, queued, splice));
    let mut requests = RequestReader {
        reader,
        limits,
        shared: Arc::new(Shared {
            export: session.export,
            exports,
            framing: session.framing,
            pool: BufferPool::new(),
            peer: peer.to_owned(),
            splice: splice_enabled,
        }),
        requests: Arc::new(Semaphore::new(max_in_flight)),
        bytes: Arc::new(Semaphore::new(IN_FLIGHT_BYTES.max(max_request) as usize)),
        server_bytes,
        replies,
        tasks: JoinSet::new(),
        peer,
        shutdown,
    };
    let ended = requests.run().await;
    debug!(peer, ?ended, "request loop ended");
    let RequestReader {
        replies, mut tasks, ..
    } = requests;
    drop(replies);
    if ended.is_err() {
        // A client that broke the protocol gets no more replies; its requests still
        // run to the end, so the export never sees an operation cut short.
        writer.abort();
    }
    while let Some(joined) = tasks.join_next().await {
        report_panic(joined, peer);
    }
    let written = writer.await;
    ended?;
    match written {
        Ok(Ok(())) => Ok(()),
        Ok(Err(source)) => Err(TransmissionError::Io {
            stage: "writing replies",
            source,
        }),
        Err(joined) => Err(TransmissionError::Io {
            stage: "writing replies",
            source: io::Error::other(joined.to_string()),
        }),
    }
}

/// The reading side of the request loop.
struct RequestReader<'a, E: Images, R> {
    /// The socket's read half (buffered).
    reader: R,
    /// What every request is checked against.
    limits: Limits,
    /// Cloned into each request task.
    shared: Arc<Shared<E>>,
    /// One permit per request in flight (`max_in_flight`).
    requests: Arc<Semaphore>,
    /// One permit per payload byte in flight ([`IN_FLIGHT_BYTES`]).
    bytes: Arc<Semaphore>,
    /// One permit per payload byte in flight on the whole server
    /// ([`ServerConfig::max_bytes_in_flight`]).
    server_bytes: Arc<Semaphore>,
    /// To the writer; a clone goes to each request task.
    replies: mpsc::Sender<Reply>,
    /// The request tasks, joined before `transmit` returns.
    tasks: JoinSet<()>,
    /// The client, for logs.
    peer: &'a str,
    /// Stops reading new requests when the server shuts down.
    shutdown: Shutdown,
}

impl<E: Images, R: AsyncRead + Unpin + Send> RequestReader<'_, E, R> {
    async fn run(&mut self) -> Result<End, TransmissionError> {
        loop {
            if let Some(end) = self.next().await? {
                return Ok(end);
            }
        }
    }

    /// Reads and starts one request; `Some` when the loop should end.
    async fn next(&mut self) -> Result<Option<End>, TransmissionError> {
        while let Some(joined) = self.tasks.try_join_next() {
            report_panic(joined, self.peer);
        }
        // The semaphore is never closed; `Err` cannot happen.
        let Ok(slot) = Arc::clone(&self.requests).acquire_owned().await else {
            return Ok(Some(End::WriterGone));
        };
        let mut raw = [0u8; proto::REQUEST_LEN];
        let read = tokio::select! {
            read = read_message(&mut self.reader, &mut raw) => read,
            () = self.shutdown.wait() => return Ok(Some(End::Shutdown)),
        };
        if !read.map_err(|source| io_error("reading a request", source))? {
            return Ok(Some(End::Closed));
        }
        let header = RequestHeader::decode(&raw)
            .map_err(|magic| TransmissionError::BadRequestMagic { magic })?;
        let started = Instant::now();
        let checked = self.limits.check(&header);
        let (payload, bytes) = match checked {
            Ok(Op::Write { len, .. }) => {
                let bytes = self.reserve(len).await;
                (Some(self.read_payload(len).await?), bytes)
            }
            Ok(Op::Read { len, .. }) => (None, self.reserve(len).await),
            Err(_) if header.kind == proto::CMD_WRITE => {
                self.skip_payload(header.length).await?;
                (None, None)
            }
            _ => (None, None),
        };
        let permits = Permits::new(slot, bytes);
        match checked {
            Ok(Op::Disc) => {
                self.shared.exports.observe(
                    Door::Nbd,
                    Command::Disc.op(),
                    0,
                    started.elapsed(),
                    true,
                );
                Ok(Some(End::Disc))
            }
            Ok(op) => {
                self.start(header, op, payload, permits, started);
                Ok(None)
            }
            Err(rejection) => Ok(self.reject(&header, rejection, permits, started).await),
        }
    }

    /// Permits for `len` payload bytes of the connection's and the server's budgets;
    /// waits while other requests hold too many. The connection's first, so that one
    /// greedy connection waits on itself before it takes from the others.
    async fn reserve(&self, len: u32) -> Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)> {
        let own = Arc::clone(&self.bytes).acquire_many_owned(len).await.ok()?;
        let server = Arc::clone(&self.server_bytes)
            .acquire_many_owned(len)
            .await
            .ok()?;
        Some((own, server))
    }

    async fn read_payload(&mut self, len: u32) -> Result<PooledBuffer, TransmissionError> {
        let mut payload = self.shared.pool.take(len as usize);
        self.reader
            .read_exact(&mut payload)
            .await
            .map_err(|source| io_error("reading a write payload", source))?;
        Ok(payload)
    }

    /// Throws away the payload of a refused write so the next request can be read;
    /// the protocol lets a server hang up instead only past 2^25 bytes (or its own
    /// advertised maximum, when larger).
    async fn skip_payload(&mut self, length: u32) -> Result<(), TransmissionError> {
        let limit = self.limits.max_request.max(proto::PORTABLE_PAYLOAD);
        if length > limit {
            return Err(TransmissionError::OversizedWrite { length, limit });
        }
        skip(&mut self.reader, u64::from(length))
            .await
            .map_err(|source| io_error("skipping a refused write payload", source))
    }

    /// Runs `op`, inline when it is a read the export answers at once, else in its own
    /// task, which queues the reply when done.
    fn start(
        &mut self,
        header: RequestHeader,
        op: Op,
        payload: Option<PooledBuffer>,
        permits: Permits,
        started: Instant,
    ) {
        let pending = Pending {
            cookie: header.cookie,
            framing: self.limits.framing,
            replies: self.replies.clone(),
            permits: Some(permits),
        };
        // A query the export answers at once (a cached read) is finished here: no task,
        // no box, no wake-up on another thread. A query changes nothing, so one that
        // would wait (a fetch) is dropped half-way and run again in its own task (a
        // fetch it started goes on by itself). Writes, flushes and the other changes
        // always get their own task: they may block on disk (an fdatasync), and the
        // socket must go on being read meanwhile.
        if matches!(OpKind::of(&op), OpKind::Query) {
            let attempt = std::pin::pin!(self.shared.run(header.cookie, op, None));
            let mut cx = Context::from_waker(Waker::noop());
            match panic::catch_unwind(AssertUnwindSafe(|| attempt.poll(&mut cx))) {
                Ok(Poll::Ready((reply, ok))) => {
                    self.shared.observe(&header, started, ok);
                    pending.finish_now(reply);
                    return;
                }
                Ok(Poll::Pending) => {}
                Err(_) => {
                    // Dropping the request answers the client with EIO (see `Pending`).
                    error!(
                        peer = self.peer,
                        "a request panicked; the client got NBD_EIO"
                    );
                    return;
                }
            }
        }
        let shared = Arc::clone(&self.shared);
        self.tasks.spawn(async move {
            let (reply, ok) = shared.run(header.cookie, op, payload).await;
            shared.observe(&header, started, ok);
            pending.finish(reply).await;
        });
    }

    /// Answers a request that failed its checks with an error; `Some` if the writer is gone.
    async fn reject(
        &mut self,
        header: &RequestHeader,
        rejection: Rejection,
        permits: Permits,
        started: Instant,
    ) -> Option<End> {
        let command = Command::from_wire(header.kind);
        warn!(
            peer = self.peer,
            command = command.map_or("unknown", |c| c.name()),
            kind = header.kind,
            flags = header.flags,
            offset = header.offset,
            length = header.length,
            error = rejection.error,
            reason = rejection.reason,
            "request refused"
        );
        if let Some(command) = command {
            let bytes = u64::from(header.length);
            self.shared
                .exports
                .observe(Door::Nbd, command.op(), bytes, started.elapsed(), false);
        }
        let reply = Reply::error(
            self.limits.framing,
            header.cookie,
            rejection.error,
            rejection.reason,
        );
        match self.replies.send(reply.holding(permits)).await {
            Ok(()) => None,
            Err(_) => Some(End::WriterGone),
        }
    }
}

fn report_panic(joined: Result<(), tokio::task::JoinError>, peer: &str) {
    if let Err(failure) = joined {
        if failure.is_panic() {
            error!(peer, "a request task panicked; the client got NBD_EIO");
        }
    }
}

fn io_error(stage: &'static str, source: io::Error) -> TransmissionError {
    TransmissionError::Io { stage, source }
}
