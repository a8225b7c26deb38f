//! What a request task does: runs one checked request against the export (a read
//! answered with file pieces to splice where it can) and owes its reply, which is an
//! NBD_EIO if the task dies before answering.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;
use tracing::debug;

use crate::errno::nbd_error;
use crate::export::Command;
use crate::proto::{self, RequestHeader};
use crate::reply::{Framing, Permits, Reply};
use crate::request::Op;
use crate::splice::SPLICE_MIN_READ;
use lazyblk_image::{
    BufferPool, Door, FileSlices, Images, PooledBuffer, PrefetchImage, ReadImage, SparseImage,
    WriteImage,
};

/// What request tasks share: the export, and how to answer.
pub(crate) struct Shared<E: Images> {
    /// The export this connection opened; every clone is gone when `transmit` returns.
    pub(crate) export: Arc<E::Image>,
    /// For [`Images::observe`] after each request.
    pub(crate) exports: Arc<E>,
    /// Simple or structured replies, as negotiated.
    pub(crate) framing: Framing,
    /// Data buffers for reads and write payloads.
    pub(crate) pool: Arc<BufferPool>,
    /// The client, for logs.
    pub(crate) peer: String,
    /// Set while large reads may be answered with file pieces the writer splices.
    pub(crate) splice: Option<Arc<AtomicBool>>,
}

impl<E: Images> Shared<E> {
    /// Reports a finished request to [`Images::observe`].
    pub(crate) fn observe(&self, header: &RequestHeader, started: Instant, ok: bool) {
        if let Some(command) = Command::from_wire(header.kind) {
            let bytes = u64::from(header.length);
            self.exports
                .observe(Door::Nbd, command.op(), bytes, started.elapsed(), ok);
        }
    }

    /// The file pieces holding a large read, when this connection splices and the export
    /// has them all in the page cache now.
    fn files(&self, offset: u64, len: u32) -> Option<FileSlices> {
        let enabled = self.splice.as_ref()?;
        if len < SPLICE_MIN_READ || !enabled.load(Ordering::Relaxed) {
            return None;
        }
        let mut files = FileSlices::default();
        let whole =
            self.export.resident_pieces(offset, len, &mut files) && files.len() == u64::from(len);
        whole.then_some(files)
    }

    /// Runs one checked request against the export; the reply and whether it succeeded.
    pub(crate) async fn run(
        &self,
        cookie: u64,
        op: Op,
        payload: Option<PooledBuffer>,
    ) -> (Reply, bool) {
        let export = &*self.export;
        let result = match op {
            Op::Read { offset, len, df } => {
                if let Some(files) = self.files(offset, len) {
                    return (
                        Reply::file_data(self.framing, cookie, offset, files, df),
                        true,
                    );
                }
                let mut data = self.pool.take(len as usize);
                match export.read_at(offset, &mut data).await {
                    Ok(()) => return (Reply::data(self.framing, cookie, offset, data), true),
                    Err(error) => Err(error),
                }
            }
            Op::Write { offset, fua, .. } => match payload {
                Some(data) => export.write_at(offset, &data, fua).await,
                None => Err(io::Error::other("write without its payload")),
            },
            Op::Flush => export.flush().await,
            Op::Trim { offset, len, fua } => export.trim(offset, u64::from(len), fua).await,
            Op::WriteZeroes {
                offset,
                len,
                fua,
                no_hole: false,
            } => export.write_zeroes(offset, u64::from(len), fua).await,
            Op::WriteZeroes {
                offset,
                len,
                fua,
                no_hole: true,
            } => {
                export
                    .write_zeroes_allocated(offset, u64::from(len), fua)
                    .await
            }
            Op::Cache { offset, len } => {
                export.prefetch(offset, u64::from(len));
                Ok(())
            }
            Op::BlockStatus {
                offset,
                len,
                req_one,
                context,
            } => match export.extents(offset, u64::from(len)).await {
                Ok(extents) => match Reply::block_status(cookie, context, len, &extents, req_one) {
                    Some(reply) => return (reply, true),
                    None => Err(io::Error::other("the export reported no extents")),
                },
                Err(error) => Err(error),
            },
            // The reader ends the connection on DISC; it never reaches a task.
            Op::Disc => Ok(()),
        };
        match result {
            Ok(()) => (Reply::done(cookie), true),
            Err(error) => {
                debug!(peer = self.peer, ?op, %error, "export failed a request");
                let value = nbd_error(&error);
                (
                    Reply::error(self.framing, cookie, value, &error.to_string()),
                    false,
                )
            }
        }
    }
}

/// Whether a request only reads (and may finish inline) or changes the export.
#[derive(Clone, Copy)]
pub(crate) enum OpKind {
    Query,
    Change,
}

impl OpKind {
    pub(crate) fn of(op: &Op) -> OpKind {
        match op {
            Op::Read { .. } | Op::BlockStatus { .. } | Op::Cache { .. } => OpKind::Query,
            _ => OpKind::Change,
        }
    }
}

/// A request whose reply is owed. Dropping it unanswered (its task panicked) answers
/// with NBD_EIO, so the client is never left waiting.
pub(crate) struct Pending {
    pub(crate) cookie: u64,
    pub(crate) framing: Framing,
    pub(crate) replies: mpsc::Sender<Reply>,
    /// `Some` until the reply is queued.
    pub(crate) permits: Option<Permits>,
}

impl Pending {
    /// Queues the reply without waiting: there is always room (see `Drop`).
    pub(crate) fn finish_now(mut self, reply: Reply) {
        if let Some(permits) = self.permits.take() {
            let _ = self.replies.try_send(reply.holding(permits));
        }
    }

    pub(crate) async fn finish(mut self, reply: Reply) {
        if let Some(permits) = self.permits.take() {
            // A closed channel means the writer is gone; the reply is dropped with it.
            let _ = self.replies.send(reply.holding(permits)).await;
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(permits) = self.permits.take() {
            let reply = Reply::error(self.framing, self.cookie, proto::EIO, "request failed");
            // The channel holds max_in_flight replies and each holds a request permit,
            // so there is always room.
            let _ = self.replies.try_send(reply.holding(permits));
        }
    }
}
