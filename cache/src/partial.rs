//! Reads of part of a chunk (format 3): a small read of a missing chunk stored in
//! blocks fetches the byte range of the stored object that holds only the blocks it
//! reads, decodes each, and checks it against its sha256 in the manifest's block index
//! ([`crate::manifest::BlockIndex`]) before a byte is served. A lazy boot's scattered
//! 4 KiB reads then fetch about what they read instead of a 1 MiB chunk around each.
//!
//! What is kept: the verified blocks, in memory, in a least-recently-used set of
//! [`BLOCK_CACHE_BYTES`] keyed by each block's sha256 (so a hit is the block a reader's
//! index names, whichever template or chunk brought it; the kernel's page cache above
//! the FUSE file or NBD device keeps what it read, this keeps the rest of each fetched
//! block for the neighbouring reads), and each chunk's table (where its blocks lie in
//! the stored object) or that it has none, within [`TABLE_OFFSETS_KEPT`] offsets.
//! Nothing is written to the chunk cache: the chunk becomes local, whole and verified
//! against its digest, when a fill, a prefetch or a larger read fetches it.
//!
//! When a read takes the whole chunk instead ([`ChunkCache::read_blocks`] says no): the
//! chunk is local or being fetched whole already, it is not stored in blocks (format 1
//! and 2 stores, incompressible chunks stored raw), no source serves ranges (origins and
//! peers serve whole chunks), a block failed its check (then the whole chunk's own
//! fetch tries every source and verifies), or reads of the chunk already fetched a
//! as many blocks as it has (blocks dropped from memory and read again).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use lru::LruCache;

use crate::blocks::{block_count, table_len, BlockTable};
use crate::digest::Digest;
use crate::fetch::{ChunkCache, ChunkRef};
use crate::planner::{Priority, Promotion};
use crate::source::Source;

/// Memory for verified blocks of partly read chunks: 16 MiB (2,048 blocks of 8 KiB),
/// counted in bytes.
pub const BLOCK_CACHE_BYTES: usize = 16 << 20;
/// Offsets of chunk tables kept in memory: 512 Ki (4 MiB; about 4,000 tables of 1 MiB
/// chunks in 8 KiB blocks).
pub const TABLE_OFFSETS_KEPT: usize = 512 << 10;
/// Reads of a chunk fetch at most half of its blocks in pieces; past that, the next read
/// fetches the chunk whole and keeps it (whole, it costs at most twice what it took in
/// pieces). On B4's root file system a quarter fetched 1.98x the bytes read, half 1.54x.
const PIECEMEAL_SHARE: usize = 2;
/// Reads of a chunk in a row, each starting where the last ended, after which the next
/// read fetches it whole: a reader going through it in small steps.
const SEQUENTIAL_READS: usize = 4;

/// What the cache knows of one chunk's stored layout, and how it has been read.
struct Layout {
    /// `None`: the chunk is not stored in blocks (read it whole).
    table: Option<BlockTable>,
    /// Blocks of it fetched in pieces so far.
    fetched: AtomicUsize,
    /// Where the last read of it ended, and how many reads in a row began there.
    last_end: AtomicU64,
    run: AtomicUsize,
}

impl Layout {
    /// Records a read of `offset..end`; whether the chunk is being read in sequence.
    fn sequential(&self, offset: u64, end: u64) -> bool {
        let run = if self.last_end.swap(end, Ordering::Relaxed) == offset {
            self.run.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            self.run.store(0, Ordering::Relaxed);
            0
        };
        run >= SEQUENTIAL_READS
    }
}

/// A least-recently-used map bounded by the sum of its entries' weights.
struct Weighed<K: std::hash::Hash + Eq, V> {
    map: LruCache<K, (V, usize)>,
    weight: usize,
    limit: usize,
}

impl<K: std::hash::Hash + Eq, V: Clone> Weighed<K, V> {
    fn new(limit: usize) -> Self {
        Weighed {
            map: LruCache::unbounded(),
            weight: 0,
            limit,
        }
    }

    fn get(&mut self, key: &K) -> Option<V> {
        self.map.get(key).map(|(v, _)| v.clone())
    }

    fn put(&mut self, key: K, value: V, weight: usize) {
        if let Some((_, old)) = self.map.put(key, (value, weight)) {
            self.weight -= old;
        }
        self.weight += weight;
        while self.weight > self.limit {
            match self.map.pop_lru() {
                Some((_, (_, w))) => self.weight -= w,
                None => break,
            }
        }
    }
}

/// Verified blocks and stored layouts of chunks read in part.
pub(crate) struct Partial {
    /// Verified blocks by their sha256.
    blocks: Mutex<Weighed<[u8; 32], Bytes>>,
    layouts: Mutex<Weighed<Digest, Arc<Layout>>>,
}

impl Default for Partial {
    fn default() -> Partial {
        Partial {
            blocks: Mutex::new(Weighed::new(BLOCK_CACHE_BYTES)),
            layouts: Mutex::new(Weighed::new(TABLE_OFFSETS_KEPT)),
        }
    }
}

impl Partial {
    fn block(&self, hash: &[u8]) -> Option<Bytes> {
        let key: [u8; 32] = hash.try_into().ok()?;
        self.blocks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
    }

    fn keep(&self, hash: &[u8], bytes: Bytes) {
        let Ok(key) = <[u8; 32]>::try_from(hash) else {
            return;
        };
        let len = bytes.len();
        self.blocks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .put(key, bytes, len);
    }

    fn layout(&self, digest: &Digest) -> Option<Arc<Layout>> {
        self.layouts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(digest)
    }

    fn keep_layout(&self, digest: &Digest, table: Option<BlockTable>) -> Arc<Layout> {
        let weight = table.as_ref().map_or(1, |t| t.offsets.len());
        let layout = Arc::new(Layout {
            table,
            fetched: AtomicUsize::new(0),
            last_end: AtomicU64::new(u64::MAX),
            run: AtomicUsize::new(0),
        });
        self.layouts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .put(*digest, layout.clone(), weight);
        layout
    }

    /// Blocks held now, for tests and metrics.
    pub(crate) fn blocks_held(&self) -> usize {
        self.blocks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map
            .len()
    }
}

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
                .fetch_range(&chunk.digest, head.clone(), self.source_deadline())
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
    fn the_block_set_is_bounded_by_bytes() {
        let mut set: Weighed<u32, Bytes> = Weighed::new(10_000);
        for i in 0..10 {
            set.put(i, Bytes::from(vec![0u8; 4000]), 4000);
        }
        assert!(set.weight <= 10_000);
        assert_eq!(set.map.len(), 2);
        assert!(set.get(&9).is_some() && set.get(&0).is_none());
        // Replacing an entry does not count it twice.
        set.put(9, Bytes::from(vec![0u8; 100]), 100);
        assert_eq!(set.weight, 4100);
    }

    #[test]
    fn reads_in_sequence_are_told_from_scattered_ones() {
        let layout = Layout {
            table: None,
            fetched: AtomicUsize::new(0),
            last_end: AtomicU64::new(u64::MAX),
            run: AtomicUsize::new(0),
        };
        for (offset, len) in [(0, 4096), (40960, 4096), (8192, 4096), (90000, 4096)] {
            assert!(!layout.sequential(offset, offset + len));
        }
        let mut sequential = false;
        for step in 0..6u64 {
            sequential = layout.sequential(step * 4096, (step + 1) * 4096);
        }
        assert!(sequential);
    }

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
