//! Chunks as both engines keep them: the largest body, the check that stored bytes are
//! the chunk they name, byte ranges, and the stream a chunk is read as.

use std::io;
use std::ops::Range;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use lazyblk_cache::encoding::StoredVerifier;
use lazyblk_cache::Digest;

use super::error::BackendError;

/// The largest chunk body accepted: the largest chunk size a manifest may have.
pub const MAX_CHUNK_BODY: u64 = lazyblk_cache::manifest::MAX_CHUNK_SIZE as u64;

/// `range` of a chunk of `len` bytes, clipped to its end (the whole chunk without one);
/// a range that starts at or past the end is refused.
pub(super) fn clip_range(
    range: Option<Range<u64>>,
    len: u64,
    digest: &Digest,
) -> Result<Range<u64>, BackendError> {
    match range {
        None => Ok(0..len),
        Some(r) if r.start < len && r.start < r.end => Ok(r.start..r.end.min(len)),
        Some(r) => Err(BackendError::Unsatisfiable {
            digest: *digest,
            len,
            start: r.start,
        }),
    }
}

/// A stored chunk opened for reading: its bytes (of the range asked for), its whole
/// length, and the range of it the stream holds.
pub struct OpenChunk {
    pub stream: ChunkStream,
    pub len: u64,
    pub range: Range<u64>,
}

/// Whether stored bytes are chunk `digest` (raw, or a zstd frame of it; see
/// [`lazyblk_cache::encoding`]).
pub fn is_chunk(stored: &[u8], digest: &Digest) -> bool {
    let mut verifier = StoredVerifier::new(MAX_CHUNK_BODY);
    verifier.update(stored);
    verifier.finish(digest).is_ok()
}

/// The error for an upload that is not the chunk it names (or could not be decoded to
/// tell, which is not the client's fault).
pub(super) fn not_the_chunk(
    digest: &Digest,
    e: lazyblk_cache::encoding::DecodeError,
) -> BackendError {
    match e {
        lazyblk_cache::encoding::DecodeError::Unavailable(detail) => BackendError::Task(detail),
        e => BackendError::DigestMismatch {
            expected: *digest,
            detail: e.to_string(),
        },
    }
}

/// A stored chunk's bytes as they are read.
pub type ChunkStream = BoxStream<'static, io::Result<Bytes>>;

/// Reads and discards a body of up to `limit` bytes (more is left for the connection
/// to drop).
pub async fn drain<S, E>(mut body: S, limit: u64)
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
{
    let mut len = 0u64;
    while let Some(Ok(piece)) = body.next().await {
        len += piece.len() as u64;
        if len > limit {
            return;
        }
    }
}
