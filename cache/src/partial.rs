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
//! chunk's own fetch tries every source and verifies; blocks from a peer that fail are
//! held against that one node), the chunk is being read in sequence
//! ([`SEQUENTIAL_READS`] reads in a row, each where the last ended), reads of it
//! already fetched half of its blocks in pieces, or the store's link takes no longer for
//! the whole chunk than for a table and then the blocks, one request after the other (a
//! store tens of milliseconds away: [`crate::link`]).
//!
//! The table and the blocks are fetched by the one runner of every attempt
//! ([`crate::fetch::runner`]): in the planner's order, each attempt within the source
//! deadline and all of them, with the whole chunk's fetch that may follow, within the
//! read's budget ([`ReadBudget`], `--read-deadline`), and under the one in-flight
//! table: concurrent reads of the same chunk's table, or of the same blocks, share one
//! fetch ([`crate::fetch::ranges`]). The blocks are decoded and verified on the
//! blocking pool ([`crate::block_fetch`]: the table's and the blocks' fetches).
//!
//! A small read that takes the whole chunk (any of the cases above) does not wait for
//! the whole chunk to be decoded and hashed: the whole fetch shows its readers the
//! stored form as soon as it came, and the read decodes only its own blocks from it and
//! checks each against the block index (whose page it fetches beside the chunk when the
//! page is not local), as a read of blocks does ([`ChunkCache::read_arrived_blocks`],
//! counted in `lazyblk_reads_served_before_verified_total`). The chunk is still
//! verified whole before it is kept; a block that does not match leaves the read
//! waiting for that verification, which tells the source's fault. Under B12's emulated
//! guest a 1 MiB chunk's decoding and sha256 took about as long as its request
//! (`BOOT_PROFILE=1 scripts/bench/boot.sh`), and a first boot waits on about a hundred.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;

use crate::block_fetch::{Blocks, Table};
#[cfg(doc)]
use crate::block_memory::{BLOCK_CACHE_BYTES, SEQUENTIAL_READS, TABLE_OFFSETS_KEPT};
use crate::blocks::block_count;
use crate::fetch::flight::RangeValue;
use crate::fetch::runner::Run;
use crate::fetch::FetchKey;
use crate::fetch::{ChunkCache, ChunkRef, ReadBudget};
use crate::planner::{Priority, Promotion};
use crate::source::Source;

/// Reads of a chunk fetch at most half of its blocks in pieces; past that, the next read
/// fetches the chunk whole and keeps it (whole, it costs at most twice what it took in
/// pieces). On B4's root file system a quarter fetched 1.98x the bytes read, half 1.54x.
const PIECEMEAL_SHARE: usize = 2;

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

/// The first and last block of blocks of `block_size` that hold a read of `len` bytes
/// at `offset` in a chunk of `chunk_len` bytes; `None` when the read is empty, past the
/// chunk, or `hashes` (the chunk's block index entry) is short.
fn block_span(
    chunk_len: u64,
    block_size: u32,
    hashes: &[u8],
    offset: u64,
    len: usize,
) -> Option<(usize, usize)> {
    let (len, bs) = (len as u64, block_size as u64);
    let count = block_count(chunk_len, block_size);
    if len == 0 || offset + len > chunk_len || hashes.len() < count * 32 {
        return None;
    }
    Some(((offset / bs) as usize, ((offset + len - 1) / bs) as usize))
}

/// Whether a read of a chunk (whose table is known or not) should fetch it whole from
/// the first of `sources` that serves ranges, as that source's measured link says
/// ([`crate::link::LinkTimes::whole_is_cheaper`]).
pub fn whole_is_cheaper(sources: &[Source], table_known: bool) -> bool {
    sources
        .iter()
        .find(|s| s.serves_ranges())
        .and_then(Source::link)
        .is_some_and(|link| link.whole_is_cheaper(table_known))
}

impl ChunkCache {
    /// Fills `buf` with bytes `offset..` of `chunk` from `stored`, the chunk's stored
    /// form as a whole fetch brought it and before it is verified whole: only the
    /// blocks of the read are decoded, each checked against its sha256 in `hashes` (the
    /// chunk's entry in the block index). `false` (nothing served) when `stored` is not
    /// a chunk in blocks of `block_size` of the chunk's length, or a block is not its
    /// index entry: the reader then waits for the whole chunk's verification, which
    /// tells the source's fault.
    pub(crate) async fn read_arrived_blocks(
        &self,
        chunk: &ChunkRef,
        block_size: u32,
        hashes: &[u8],
        stored: Bytes,
        offset: u64,
        buf: &mut [u8],
    ) -> bool {
        let Some((first, last)) = block_span(chunk.len, block_size, hashes, offset, buf.len())
        else {
            return false;
        };
        let count = block_count(chunk.len, block_size);
        let hash = |i: usize| &hashes[i * 32..i * 32 + 32];
        let bs = block_size as u64;
        // Blocks another reader of the chunk verified already are not decoded again.
        let kept: Vec<Option<Bytes>> = (first..=last)
            .map(|i| self.partial.block(hash(i)))
            .collect();
        if kept.iter().all(Option::is_some) {
            let kept: Vec<Bytes> = kept.into_iter().flatten().collect();
            return copy_blocks(&kept, first, bs, chunk.len, offset, buf);
        }
        let Ok(table) = crate::blocks::BlockTable::parse(&stored, Some(chunk.len), chunk.len)
        else {
            return false;
        };
        if table.block_size != block_size
            || table.count() != count
            || table.stored_len() != stored.len() as u64
        {
            return false;
        }
        let want: Arc<[u8]> = Arc::from(&hashes[first * 32..(last + 1) * 32]);
        let chunk_len = chunk.len;
        // Decoding and hashing off the runtime's threads, as a block fetch's.
        let verified = tokio::task::spawn_blocking(move || {
            crate::block_fetch::verify_blocks(chunk_len, &table, &want, first..=last, &stored, 0)
        })
        .await
        .ok()
        .flatten();
        let Some(blocks) = verified else {
            tracing::debug!(template = %chunk.template, index = chunk.index,
                "blocks of a chunk's arrived stored form did not match the block index; waiting for the whole chunk");
            return false;
        };
        for (k, block) in blocks.iter().enumerate() {
            self.partial.keep(hash(first + k), block.clone());
        }
        copy_blocks(&blocks, first, bs, chunk.len, offset, buf)
    }

    /// Fills `buf` with bytes `offset..` of `chunk` (not local) from its blocks of
    /// `block_size`, verified against `hashes` (the chunk's entry in the block index:
    /// the 32-byte sha256 of each block), within the read's `budget`. `false` when the
    /// read should take the whole chunk instead (see the module header; with what is
    /// left of the budget, none once it is spent); nothing was served then.
    #[allow(clippy::too_many_arguments)]
    pub async fn read_blocks(
        &self,
        chunk: &ChunkRef,
        block_size: u32,
        hashes: &[u8],
        offset: u64,
        buf: &mut [u8],
        sources: &[Source],
        budget: &ReadBudget,
    ) -> bool {
        let read = self.read_blocks_within(chunk, block_size, hashes, offset, buf, sources, budget);
        budget.bound(read).await.unwrap_or(false)
    }

    #[allow(clippy::too_many_arguments)]
    async fn read_blocks_within(
        &self,
        chunk: &ChunkRef,
        block_size: u32,
        hashes: &[u8],
        offset: u64,
        buf: &mut [u8],
        sources: &[Source],
        budget: &ReadBudget,
    ) -> bool {
        let Some((first, last)) = block_span(chunk.len, block_size, hashes, offset, buf.len())
        else {
            return false;
        };
        let (len, count) = (buf.len() as u64, block_count(chunk.len, block_size));
        let hash = |i: usize| &hashes[i * 32..i * 32 + 32];
        let bs = block_size as u64;
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
        if !sources.iter().any(Source::serves_ranges) {
            return false;
        }
        // Each range fetch takes one demand slot, like a whole chunk's fetch: blocks in
        // flight are bounded too. Readers that join one take none.
        let slot = || async {
            self.slots()
                .acquire(Priority::Demand, &Promotion::default())
                .await
        };
        // Where a whole chunk costs the first source that serves ranges about what its
        // table and blocks (or, the table known, its blocks) do, the read takes the
        // whole chunk, and every later read of it is local (`crate::link`); unless the
        // blocks it wants (or the chunk's table) are on their way already (a replay's
        // run): joining that costs less than any new request.
        let joinable = self.range_in_flight(FetchKey::Blocks(chunk.digest, from, to))
            || (known.is_none() && self.range_in_flight(FetchKey::Table(chunk.digest)));
        if !joinable && whole_is_cheaper(sources, known.is_some()) {
            tracing::debug!(template = %chunk.template, index = chunk.index, "a whole chunk costs this link about what its blocks do; reading it whole");
            return false;
        }
        let layout = match known {
            Some(layout) => layout,
            None => {
                let table = self.range_flight(FetchKey::Table(chunk.digest), async {
                    let _slot = slot().await;
                    let run = Run {
                        want: &Table { count },
                        chunk,
                        sources,
                        budget_ends: Some(budget.ends()),
                        hedge_after: None,
                    };
                    match self.run(&run).await {
                        Ok(table) => {
                            let table = table.filter(|t| t.block_size == block_size);
                            self.partial.keep_layout(&chunk.digest, table);
                            Some(RangeValue::Table)
                        }
                        Err(e) => {
                            tracing::debug!(template = %chunk.template, index = chunk.index, error = %e, "no table of the chunk; reading it whole");
                            None
                        }
                    }
                });
                match (table.await, self.partial.layout(&chunk.digest)) {
                    (Some(RangeValue::Table), Some(layout)) => {
                        layout.sequential(offset, offset + len);
                        layout
                    }
                    _ => return false,
                }
            }
        };
        let Some(table) = &layout.table else {
            return false;
        };
        let wanted = to - from + 1;
        if layout.fetched.fetch_add(wanted, Ordering::Relaxed) + wanted > count / PIECEMEAL_SHARE {
            tracing::debug!(template = %chunk.template, index = chunk.index, "half of the chunk's blocks were read in pieces; reading it whole");
            return false;
        }
        tracing::trace!(template = %chunk.template, index = chunk.index, from, to, "fetching blocks");
        let want = Blocks {
            table: Arc::new(table.clone()),
            hashes: Arc::from(&hashes[from * 32..(to + 1) * 32]),
            from,
            to,
        };
        let fetched = self.range_flight(FetchKey::Blocks(chunk.digest, from, to), async {
            let _slot = slot().await;
            let run = Run {
                want: &want,
                chunk,
                sources,
                budget_ends: Some(budget.ends()),
                hedge_after: None,
            };
            match self.run(&run).await {
                Ok(verified) => Some(RangeValue::Blocks(from, Arc::new(verified))),
                Err(e) => {
                    tracing::debug!(template = %chunk.template, index = chunk.index, error = %e, "no blocks of the chunk; reading it whole");
                    None
                }
            }
        });
        let Some(RangeValue::Blocks(start, verified)) = fetched.await else {
            return false;
        };
        self.observer.miss(&chunk.template);
        // A joined fetch (a replay's run) may have started before `from`.
        let Some(verified) = from
            .checked_sub(start)
            .and_then(|at| verified.get(at..=at + (to - from)))
        else {
            return false;
        };
        for (i, block) in (from..=to).zip(verified.iter()) {
            if blocks[i - first].is_none() {
                blocks[i - first] = Some(block.clone());
            }
            self.partial.keep(hash(i), block.clone());
        }
        let blocks: Vec<Bytes> = blocks.into_iter().flatten().collect();
        copy_blocks(&blocks, first, bs, chunk.len, offset, buf)
    }

    /// Fetches blocks `from..=to` of `chunk` (not local; stored in blocks of
    /// `block_size`, whose sha256 are `hashes`) into the verified blocks kept in memory,
    /// for a boot trace's replay ([`crate::replay`]). At prefetch priority, its slot taken
    /// before the fetch enters the in-flight table, so a demand read that joins it waits
    /// only for bytes already on their way, and nothing is counted as a read. Returns the
    /// bytes of the blocks fetched (0 when every one was held already), or `None` when
    /// the run cannot be fetched in blocks (the caller fetches the chunk whole).
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn prefetch_blocks(
        &self,
        chunk: &ChunkRef,
        block_size: u32,
        hashes: &[u8],
        from: usize,
        to: usize,
        sources: &[Source],
    ) -> Option<u64> {
        let count = block_count(chunk.len, block_size);
        if from > to || to >= count || hashes.len() < count * 32 {
            return None;
        }
        let hash = |i: usize| &hashes[i * 32..i * 32 + 32];
        let missing: Vec<usize> = (from..=to)
            .filter(|&i| self.partial.block(hash(i)).is_none())
            .collect();
        let (Some(&first), Some(&last)) = (missing.first(), missing.last()) else {
            return Some(0);
        };
        if !sources.iter().any(Source::serves_ranges) {
            return None;
        }
        let _slot = self
            .slots()
            .acquire(Priority::Prefetch, &Promotion::default())
            .await;
        let layout = match self.partial.layout(&chunk.digest) {
            Some(layout) => layout,
            None => {
                self.range_flight(FetchKey::Table(chunk.digest), async {
                    let run = Run {
                        want: &Table { count },
                        chunk,
                        sources,
                        budget_ends: None,
                        hedge_after: None,
                    };
                    let table = self.run(&run).await.ok()?;
                    let table = table.filter(|t| t.block_size == block_size);
                    self.partial.keep_layout(&chunk.digest, table);
                    Some(RangeValue::Table)
                })
                .await?;
                self.partial.layout(&chunk.digest)?
            }
        };
        let table = layout.table.as_ref()?;
        let want = Blocks {
            table: Arc::new(table.clone()),
            hashes: Arc::from(&hashes[first * 32..(last + 1) * 32]),
            from: first,
            to: last,
        };
        let fetched = self.range_flight(FetchKey::Blocks(chunk.digest, first, last), async {
            let run = Run {
                want: &want,
                chunk,
                sources,
                budget_ends: None,
                hedge_after: None,
            };
            match self.run(&run).await {
                Ok(verified) => Some(RangeValue::Blocks(first, Arc::new(verified))),
                Err(e) => {
                    tracing::debug!(template = %chunk.template, index = chunk.index, error = %e, "replay: no blocks of the chunk");
                    None
                }
            }
        });
        let Some(RangeValue::Blocks(start, verified)) = fetched.await else {
            return None;
        };
        let verified = first
            .checked_sub(start)
            .and_then(|at| verified.get(at..=at + (last - first)))?;
        let mut bytes = 0;
        for (i, block) in (first..=last).zip(verified.iter()) {
            bytes += block.len() as u64;
            self.partial.keep(hash(i), block.clone());
        }
        Some(bytes)
    }

    /// Verified blocks held for partly read chunks.
    pub fn partial_blocks(&self) -> usize {
        self.partial.blocks_held()
    }
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
