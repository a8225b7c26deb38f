//! Reads of part of a chunk (format 3): a small read of a missing chunk stored in
//! blocks fetches the byte range of the stored object that holds only the blocks it
//! reads, decodes each, and checks it against its sha256 in the manifest's block index
//! ([`crate::manifest::BlockIndex`]) before a byte is served. A lazy boot's scattered
//! 4 KiB reads then fetch about what they read instead of a 1 MiB chunk around each.
//!
//! What is kept ([`crate::block_memory`]): the verified blocks, in memory, in a
//! least-recently-used set of [`BLOCK_CACHE_BYTES`] keyed by each block's sha256 (so a hit is the block a reader's
//! index names, whichever template or chunk brought it; the kernel's page cache above
//! the FUSE file or NBD device keeps what it read, this keeps the rest of each fetched
//! block for the neighbouring reads), and each chunk's table (where its blocks lie in
//! the stored object) or that it has none, within [`TABLE_OFFSETS_KEPT`] offsets.
//! Nothing is written to the chunk cache: the chunk becomes local, whole and verified
//! against its digest, when a fill, a prefetch or a larger read fetches it.
//!
//! When a read takes the whole chunk instead ([`ChunkCache::read_blocks`] says no): the
//! chunk is local or being fetched whole already, it is not stored in blocks (format 1
//! and 2 stores, incompressible chunks stored raw), no source serves ranges (origins
//! serve whole chunks; an owner among the peers serves ranges only of a chunk it holds,
//! see [`crate::peers::PeerSet::fetch_range`]), a block failed its check (then the whole
//! chunk's own fetch tries every source and verifies), the chunk is being read in sequence
//! ([`SEQUENTIAL_READS`] reads in a row, each where the last ended), or reads of it
//! already fetched half of its blocks in pieces.

use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;

#[cfg(doc)]
use crate::block_memory::{BLOCK_CACHE_BYTES, SEQUENTIAL_READS, TABLE_OFFSETS_KEPT};
use crate::blocks::{block_count, table_len, BlockTable};
use crate::digest::Digest;
use crate::fetch::{ChunkCache, ChunkRef};
use crate::planner::{Priority, Promotion};
use crate::source::Source;

/// Reads of a chunk fetch at most half of its blocks in pieces; past that, the next read
/// fetches the chunk whole and keeps it (whole, it costs at most twice what it took in
/// pieces). On B4's root file system a quarter fetched 1.98x the bytes read, half 1.54x.
const PIECEMEAL_SHARE: usize = 2;

/// What a source's first bytes of a chunk said of its layout.
enum TableFetch {
    Table(BlockTable),
    /// The chunk is not stored in blocks (a raw chunk or one frame, shorter than a table
    /// or not one), or the source does not serve ranges of it.
    NotInBlocks,
    /// No source answered.
    Unavailable,
}

/// The bytes `offset..offset + buf.len()` of a chunk of `len` bytes, from its verified
/// blocks `first..`; `false` (nothing copied that counts) if a block is not its length.
fn copy_blocks(
    blocks: &[Bytes],
    first: usize,
    block_size: u64,
    len: u64,
    offset: u64,
    buf: &mut [u8],
) -> bool {
    let expected = |i: usize| ((len - i as u64 * block_size).min(block_size)) as usize;
    if blocks
        .iter()
        .enumerate()
        .any(|(k, b)| b.len() != expected(first + k))
    {
        return false;
    }
    let mut at = offset;
    let mut out = 0;
    while out < buf.len() {
        let index = (at / block_size) as usize - first;
        let within = (at % block_size) as usize;
        let block = &blocks[index];
        let take = (block.len() - within).min(buf.len() - out);
        buf[out..out + take].copy_from_slice(&block[within..within + take]);
        out += take;
        at += take as u64;
    }
    true
}

impl ChunkCache {
    /// Fills `buf` with bytes `offset..` of `chunk` (not local) from its blocks of
    /// `block_size`, verified against `hashes` (the chunk's entry in the block index:
    /// the 32-byte sha256 of each block). `false` when the read should take the whole
    /// chunk instead (see the module header); nothing was served then.
    pub async fn read_blocks(
        &self,
        chunk: &ChunkRef,
        block_size: u32,
        hashes: &[u8],
        offset: u64,
        buf: &mut [u8],
        sources: &[Source],
    ) -> bool {
        let len = buf.len() as u64;
        let count = block_count(chunk.len, block_size);
        if len == 0 || offset + len > chunk.len || hashes.len() < count * 32 {
            return false;
        }
        let hash = |i: usize| &hashes[i * 32..i * 32 + 32];
        let bs = block_size as u64;
        let (first, last) = ((offset / bs) as usize, ((offset + len - 1) / bs) as usize);
        let known = self.partial.layout(&chunk.digest);
        if known
            .as_ref()
            .is_some_and(|l| l.sequential(offset, offset + len))
        {
            tracing::debug!(template = %chunk.template, index = chunk.index, "a chunk read in sequence; reading it whole");
            return false;
        }
        let mut blocks: Vec<Option<Bytes>> = (first..=last)
            .map(|i| self.partial.block(hash(i)))
            .collect();
        self.note_demand();
        let Some(missing_first) = blocks.iter().position(Option::is_none) else {
            let blocks: Vec<Bytes> = blocks.into_iter().flatten().collect();
            if !copy_blocks(&blocks, first, bs, chunk.len, offset, buf) {
                return false;
            }
            self.observer.hit(&chunk.template);
            return true;
        };
        let missing_last = blocks
            .iter()
            .rposition(Option::is_none)
            .unwrap_or(missing_first);
        let (from, to) = (first + missing_first, first + missing_last);
        let ranged: Vec<&Source> = self
            .sources_health()
            .plan(sources)
            .into_iter()
            .filter(|s| s.serves_ranges())
            .collect();
        if ranged.is_empty() {
            return false;
        }
        // One demand slot, like a whole chunk's fetch: blocks in flight are bounded too.
        let promotion = Promotion::default();
        let _slot = self.slots().acquire(Priority::Demand, &promotion).await;
        let layout = match known {
            Some(layout) => layout,
            None => match self.fetch_table(chunk, count, &ranged).await {
                TableFetch::Table(table) => {
                    let table = (table.block_size == block_size).then_some(table);
                    let layout = self.partial.keep_layout(&chunk.digest, table);
                    layout.sequential(offset, offset + len);
                    layout
                }
                TableFetch::NotInBlocks => {
                    self.partial.keep_layout(&chunk.digest, None);
                    return false;
                }
                TableFetch::Unavailable => return false,
            },
        };
        let Some(table) = &layout.table else {
            return false;
        };
        let wanted = to - from + 1;
        if layout.fetched.fetch_add(wanted, Ordering::Relaxed) + wanted > count / PIECEMEAL_SHARE {
            tracing::debug!(template = %chunk.template, index = chunk.index, "half of the chunk's blocks were read in pieces; reading it whole");
            return false;
        }
        let range = table.offsets[from]..table.offsets[to + 1];
        tracing::trace!(template = %chunk.template, index = chunk.index, from, to, "fetching blocks");
        for source in ranged {
            let started = Instant::now();
            let stored = match source
                .fetch_range(chunk, range.clone(), self.source_deadline())
                .await
            {
                Ok(stored) => stored,
                Err(e) => {
                    if !e.is_skip() {
                        self.sources_health().failed(source.name());
                        self.observer.source_failed(chunk, source.name(), &e);
                    }
                    continue;
                }
            };
            let Some(verified) =
                verify_blocks(chunk, table, hashes, from..=to, &stored, range.start)
            else {
                tracing::warn!(
                    template = %chunk.template,
                    index = chunk.index,
                    digest = %chunk.digest,
                    source = source.name(),
                    blocks = ?(from..=to),
                    "blocks of a chunk did not match the block index; reading the chunk whole"
                );
                self.sources_health().failed(source.name());
                self.observer.corrupt(chunk, source.name());
                return false;
            };
            self.sources_health().succeeded(source.name());
            let raw: u64 = verified.iter().map(|b| b.len() as u64).sum();
            self.observer.fetched_blocks(
                chunk,
                source.name(),
                raw,
                stored.len() as u64,
                started.elapsed(),
            );
            self.observer.miss(&chunk.template);
            for (i, block) in (from..=to).zip(verified) {
                if blocks[i - first].is_none() {
                    blocks[i - first] = Some(block.clone());
                }
                self.partial.keep(hash(i), block);
            }
            let blocks: Vec<Bytes> = blocks.into_iter().flatten().collect();
            return copy_blocks(&blocks, first, bs, chunk.len, offset, buf);
        }
        false
    }

    /// The chunk's table, from the first source that answers. A body that is not a
    /// table (a raw chunk, one frame, an object shorter than a table) or a source that
    /// ignores the range means the chunk is read whole, and is not held against the
    /// source.
    async fn fetch_table(&self, chunk: &ChunkRef, count: usize, sources: &[&Source]) -> TableFetch {
        let head = 0..table_len(count) as u64;
        for source in sources {
            match source
                .fetch_range(chunk, head.clone(), self.source_deadline())
                .await
            {
                Ok(bytes) => {
                    return match BlockTable::parse(&bytes, Some(chunk.len), chunk.len) {
                        Ok(table) => TableFetch::Table(table),
                        Err(_) => TableFetch::NotInBlocks,
                    };
                }
                // A stored object shorter than a table (clipped to its end, or refused
                // as past it), or a whole body where a range was asked for.
                Err(
                    crate::SourceError::Length { .. }
                    | crate::SourceError::Status {
                        status: 200 | 416, ..
                    },
                ) => return TableFetch::NotInBlocks,
                Err(e) => {
                    if !e.is_skip() {
                        self.sources_health().failed(source.name());
                        self.observer.source_failed(chunk, source.name(), &e);
                    }
                }
            }
        }
        TableFetch::Unavailable
    }

    /// Verified blocks held for partly read chunks.
    pub fn partial_blocks(&self) -> usize {
        self.partial.blocks_held()
    }
}

/// Decodes blocks `blocks` from `stored` (the stored object's bytes from `at`) and checks
/// each against its sha256 in `hashes`; `None` if any is not its block.
fn verify_blocks(
    chunk: &ChunkRef,
    table: &BlockTable,
    hashes: &[u8],
    blocks: std::ops::RangeInclusive<usize>,
    stored: &[u8],
    at: u64,
) -> Option<Vec<Bytes>> {
    crate::encoding::with_decompressor(|d| {
        let mut out = Vec::with_capacity(blocks.clone().count());
        for i in blocks {
            let frame =
                &stored[(table.offsets[i] - at) as usize..(table.offsets[i + 1] - at) as usize];
            let mut raw = vec![0u8; table.block_len(i, chunk.len)];
            crate::blocks::decode_block(frame, &mut raw, d)?;
            if Digest::of(&raw).as_bytes()[..] != hashes[i * 32..i * 32 + 32] {
                return Err(format!("block {i} does not match its sha256"));
            }
            out.push(Bytes::from(raw));
        }
        Ok(out)
    })
    .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_of_the_wrong_length_are_not_copied() {
        let blocks = vec![Bytes::from(vec![7u8; 8192]), Bytes::from(vec![8u8; 100])];
        let mut buf = vec![0u8; 8192];
        // The chunk's second block is a whole 8 KiB, not 100 bytes.
        assert!(!copy_blocks(&blocks, 0, 8192, 16384, 4096, &mut buf));
        assert!(copy_blocks(&blocks[..1], 0, 8192, 16384, 0, &mut buf));
        assert!(buf.iter().all(|&b| b == 7));
    }
}
