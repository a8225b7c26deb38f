//! Reads of part of a chunk (format 3): a small read of a missing chunk stored in
//! blocks fetches the byte range of the stored object that holds only the blocks it
//! reads, decodes each, and checks it against its sha256 in the manifest's block index
//! ([`crate::manifest::BlockIndex`]) before a byte is served. A lazy boot's scattered
//! 4 KiB reads then fetch about what they read instead of a 1 MiB chunk around each.
//!
//! What is kept: the verified blocks, in memory, in a least-recently-used set of
//! [`BLOCK_CACHE_BYTES`] (the kernel's page cache above the FUSE file or NBD device keeps
//! what it read; this keeps the rest of each fetched block for the neighbouring reads),
//! and each chunk's table (where its blocks lie in the stored object), for
//! [`TABLES_KEPT`] chunks. Nothing is written to the chunk cache: the chunk becomes
//! local, whole and verified against its digest, when a fill, a prefetch or a larger
//! read fetches it.
//!
//! When a read takes the whole chunk instead ([`ChunkCache::read_blocks`] says no): the
//! chunk is local or being fetched whole already, it is not stored in blocks (format 1
//! and 2 stores, incompressible chunks stored raw), no source serves ranges (origins and
//! peers serve whole chunks), a block failed its check (then the whole chunk's own
//! fetch tries every source and verifies), or reads of the chunk already fetched a
//! as many blocks as it has (blocks dropped from memory and read again).

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use lru::LruCache;

use crate::blocks::{block_count, table_len, BlockTable};
use crate::digest::Digest;
use crate::fetch::{ChunkCache, ChunkRef};
use crate::planner::{Priority, Promotion};
use crate::source::Source;

/// Memory for verified blocks of partly read chunks: 16 MiB (1,024 blocks of 16 KiB).
pub const BLOCK_CACHE_BYTES: usize = 16 << 20;
/// Tables of chunks stored in blocks kept in memory (a few hundred bytes each).
pub const TABLES_KEPT: usize = 4096;
/// Reads of a chunk fetch at most as many blocks in pieces as it has (more happens when
/// blocks were dropped from memory and read again); past that, the next read fetches
/// the chunk whole and keeps it.
const PIECEMEAL_LIMIT: usize = 1;

/// What the cache knows of one chunk's stored layout.
struct Layout {
    /// `None`: the chunk is not stored in blocks (read it whole).
    table: Option<BlockTable>,
    /// Blocks of it fetched in pieces so far.
    fetched: AtomicUsize,
}

/// Verified blocks and stored layouts of chunks read in part.
pub(crate) struct Partial {
    blocks: Mutex<LruCache<(Digest, u32), Bytes>>,
    layouts: Mutex<LruCache<Digest, Arc<Layout>>>,
}

impl Default for Partial {
    fn default() -> Partial {
        let blocks = BLOCK_CACHE_BYTES / crate::blocks::STORED_BLOCK as usize;
        Partial {
            blocks: Mutex::new(LruCache::new(
                NonZeroUsize::new(blocks.max(1)).unwrap_or(NonZeroUsize::MIN),
            )),
            layouts: Mutex::new(LruCache::new(
                NonZeroUsize::new(TABLES_KEPT).unwrap_or(NonZeroUsize::MIN),
            )),
        }
    }
}

impl Partial {
    fn block(&self, digest: &Digest, block: u32) -> Option<Bytes> {
        self.blocks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(*digest, block))
            .cloned()
    }

    fn keep(&self, digest: &Digest, block: u32, bytes: Bytes) {
        self.blocks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .put((*digest, block), bytes);
    }

    fn layout(&self, digest: &Digest) -> Option<Arc<Layout>> {
        self.layouts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(digest)
            .cloned()
    }

    fn keep_layout(&self, digest: &Digest, table: Option<BlockTable>) -> Arc<Layout> {
        let layout = Arc::new(Layout {
            table,
            fetched: AtomicUsize::new(0),
        });
        self.layouts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .put(*digest, layout.clone());
        layout
    }

    /// Blocks held now, for tests and metrics.
    pub(crate) fn blocks_held(&self) -> usize {
        self.blocks.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// The bytes `offset..offset + buf.len()` of a chunk, from its verified blocks.
fn copy_blocks(blocks: &[Bytes], first: usize, block_size: u64, offset: u64, buf: &mut [u8]) {
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
        let bs = block_size as u64;
        let (first, last) = ((offset / bs) as usize, ((offset + len - 1) / bs) as usize);
        let mut blocks: Vec<Option<Bytes>> = (first..=last)
            .map(|i| self.partial.block(&chunk.digest, i as u32))
            .collect();
        let Some(missing_first) = blocks.iter().position(Option::is_none) else {
            let blocks: Vec<Bytes> = blocks.into_iter().flatten().collect();
            copy_blocks(&blocks, first, bs, offset, buf);
            self.note_demand();
            self.observer.hit(&chunk.template);
            return true;
        };
        let missing_last = blocks
            .iter()
            .rposition(Option::is_none)
            .unwrap_or(missing_first);
        let (from, to) = (first + missing_first, first + missing_last);
        self.note_demand();
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
        let layout = match self.partial.layout(&chunk.digest) {
            Some(layout) => layout,
            None => match self.fetch_table(chunk, count, &ranged).await {
                Some(table) => {
                    let table = (table.block_size == block_size).then_some(table);
                    self.partial.keep_layout(&chunk.digest, table)
                }
                None => return false,
            },
        };
        let Some(table) = &layout.table else {
            return false;
        };
        let wanted = to - from + 1;
        if layout.fetched.fetch_add(wanted, Ordering::Relaxed) + wanted > count * PIECEMEAL_LIMIT {
            tracing::debug!(template = %chunk.template, index = chunk.index, "as many blocks as the chunk has were read in pieces; reading it whole");
            return false;
        }
        let range = table.offsets[from]..table.offsets[to + 1];
        tracing::trace!(template = %chunk.template, index = chunk.index, from, to, "fetching blocks");
        for source in ranged {
            let started = Instant::now();
            let stored = match source
                .fetch_range(&chunk.digest, range.clone(), self.source_deadline())
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
                self.partial.keep(&chunk.digest, i as u32, block);
            }
            let blocks: Vec<Bytes> = blocks.into_iter().flatten().collect();
            copy_blocks(&blocks, first, bs, offset, buf);
            return true;
        }
        false
    }

    /// The chunk's table, from the first source that gives one; a table that does not
    /// parse means the chunk is not stored in blocks.
    async fn fetch_table(
        &self,
        chunk: &ChunkRef,
        count: usize,
        sources: &[&Source],
    ) -> Option<BlockTable> {
        let head = 0..table_len(count) as u64;
        for source in sources {
            match source
                .fetch_range(&chunk.digest, head.clone(), self.source_deadline())
                .await
            {
                Ok(bytes) => {
                    return BlockTable::parse(&bytes, Some(chunk.len), chunk.len).ok();
                }
                // A stored object shorter than a table (a small raw chunk): not in blocks.
                Err(crate::SourceError::Status { status: 416, .. }) => return None,
                Err(e) => {
                    if !e.is_skip() {
                        self.sources_health().failed(source.name());
                        self.observer.source_failed(chunk, source.name(), &e);
                    }
                }
            }
        }
        None
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
