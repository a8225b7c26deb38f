//! The two range fetches of a partial read ([`crate::partial`]), as wants of the fetch
//! runner ([`crate::fetch::runner`]): a chunk's table (the head of its stored object),
//! and a run of its blocks, each decoded and checked against its sha256 in the block
//! index on the blocking pool.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::blocks::{table_len, BlockTable};
use crate::digest::Digest;
use crate::fetch::runner::{Answer, Want};
use crate::fetch::{ChunkCache, ChunkRef};
use crate::source::{Source, SourceError};

/// A chunk's table, the head of its stored object: `None` when the chunk is not
/// stored in blocks. A body that is not a table (a raw chunk, one frame, an object
/// shorter than a table) or a source that ignores the range means the chunk is read
/// whole, and is not held against the source.
pub(crate) struct Table {
    pub(crate) count: usize,
}

impl Want for Table {
    type Output = Option<BlockTable>;
    const PASSES: usize = 1;
    const STOP_ON_CORRUPT: bool = true;

    fn asks(&self, source: &Source) -> bool {
        source.serves_ranges()
    }

    async fn attempt(
        &self,
        _cache: &ChunkCache,
        chunk: &ChunkRef,
        source: &Source,
        deadline: Duration,
    ) -> Result<Answer<Option<BlockTable>>, SourceError> {
        let head = 0..table_len(self.count) as u64;
        let table = match source.fetch_range(chunk, head, deadline).await {
            // A table's offsets are checked by the blocks' sha256 that follow (so no
            // node is vouched for here).
            Ok(fetched) => BlockTable::parse(&fetched.bytes, Some(chunk.len), chunk.len).ok(),
            // A stored object shorter than a table (clipped to its end, or refused as
            // past it), or a whole body where a range was asked for.
            Err(
                SourceError::Length { .. }
                | SourceError::Status {
                    status: 200 | 416, ..
                },
            ) => None,
            Err(e) => return Err(e),
        };
        Ok(Answer::Verified {
            value: table,
            node: None,
        })
    }
}

/// Blocks `from..=to` of a chunk, each verified against its sha256 in the block index.
pub(crate) struct Blocks {
    pub(crate) table: Arc<BlockTable>,
    /// The sha256 of blocks `from..=to`.
    pub(crate) hashes: Arc<[u8]>,
    pub(crate) from: usize,
    pub(crate) to: usize,
}

impl Want for Blocks {
    type Output = Vec<Bytes>;
    const PASSES: usize = 1;
    /// A block that is not its index entry: the whole chunk's fetch tries every source
    /// and verifies against the chunk's digest.
    const STOP_ON_CORRUPT: bool = true;

    fn asks(&self, source: &Source) -> bool {
        source.serves_ranges()
    }

    async fn attempt(
        &self,
        cache: &ChunkCache,
        chunk: &ChunkRef,
        source: &Source,
        deadline: Duration,
    ) -> Result<Answer<Vec<Bytes>>, SourceError> {
        let started = Instant::now();
        let range = self.table.offsets[self.from]..self.table.offsets[self.to + 1];
        let fetched = source.fetch_range(chunk, range.clone(), deadline).await?;
        let (stored, node) = (fetched.bytes, fetched.node);
        let stored_len = stored.len() as u64;
        let (table, hashes, blocks, len) = (
            self.table.clone(),
            self.hashes.clone(),
            self.from..=self.to,
            chunk.len,
        );
        // Decoding and hashing off the runtime's threads.
        let verified = tokio::task::spawn_blocking(move || {
            verify_blocks(len, &table, &hashes, blocks, &stored, range.start)
        })
        .await
        .map_err(|e| SourceError::Unreachable {
            source_name: source.name().to_string(),
            detail: format!("verifying task failed: {e}"),
        })?;
        let Some(verified) = verified else {
            tracing::warn!(
                template = %chunk.template,
                index = chunk.index,
                digest = %chunk.digest,
                source = source.name(),
                node = node.as_deref().unwrap_or("-"),
                blocks = ?(self.from..=self.to),
                "blocks of a chunk did not match the block index; reading the chunk whole"
            );
            cache.observer.corrupt(chunk, source.name());
            return Ok(Answer::Corrupt { node });
        };
        let raw: u64 = verified.iter().map(|b| b.len() as u64).sum();
        cache
            .observer
            .fetched_blocks(chunk, source.name(), raw, stored_len, started.elapsed());
        Ok(Answer::Verified {
            value: verified,
            node,
        })
    }
}

/// Decodes blocks `blocks` from `stored` (the stored object's bytes from `at`) and checks
/// each against its sha256 in `hashes` (those of `blocks`, in order); `None` if any is
/// not its block. `len` is the chunk's length.
pub(crate) fn verify_blocks(
    len: u64,
    table: &BlockTable,
    hashes: &[u8],
    blocks: std::ops::RangeInclusive<usize>,
    stored: &[u8],
    at: u64,
) -> Option<Vec<Bytes>> {
    let first = *blocks.start();
    crate::encoding::with_decompressor(|d| {
        let mut out = Vec::with_capacity(blocks.clone().count());
        for i in blocks {
            let frame = stored
                .get((table.offsets[i] - at) as usize..(table.offsets[i + 1] - at) as usize)
                .ok_or_else(|| format!("block {i} lies outside the range fetched"))?;
            let mut raw = vec![0u8; table.block_len(i, len)];
            crate::blocks::decode_block(frame, &mut raw, d)?;
            let k = i - first;
            if Digest::of(&raw).as_bytes()[..] != hashes[k * 32..k * 32 + 32] {
                return Err(format!("block {i} does not match its sha256"));
            }
            out.push(Bytes::from(raw));
        }
        Ok(out)
    })
    .ok()
}
