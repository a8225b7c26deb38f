//! One run of a boot trace's replay: bytes of one chunk that the template's earlier
//! boots read, fetched before this node's boot reads them. The run goes through the one
//! fetch pipeline (the in-flight table, the planner's sources and health, the runner's
//! verification), at prefetch priority: a demand read of bytes being replayed joins the
//! replay's fetch instead of fetching them twice, and a demand read of anything else
//! takes a demand slot, which a replay never holds ([`crate::planner`]).
//!
//! A small run of a chunk stored in blocks fetches only its blocks (kept in memory like
//! a small read's, [`crate::partial`]); a larger run, or a chunk without blocks, fetches
//! the chunk whole into the cache, as a read of that size would.

use crate::fetch::{Chunk, Priority};
use crate::image::{ReadError, TemplateImage};

/// What one replayed run fetched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunFetched {
    /// Nothing: the bytes are local, held in memory, or an all-zero chunk.
    Nothing,
    /// Blocks of the chunk, this many bytes.
    Blocks(u64),
    /// The whole chunk, this many bytes.
    Whole(u64),
}

impl RunFetched {
    /// Bytes fetched.
    pub fn bytes(&self) -> u64 {
        match self {
            RunFetched::Nothing => 0,
            RunFetched::Blocks(n) | RunFetched::Whole(n) => *n,
        }
    }
}

/// Runs shorter than this share of a chunk (a quarter) fetch their blocks only, as a
/// demand read of that size does (`piecemeal` in [`crate::image`]): a boot's scattered
/// reads cost about what they read; longer runs fetch the chunk whole.
const BLOCKS_SHARE: u64 = 4;

impl TemplateImage {
    /// Fetches the `len` bytes at `offset` (within one chunk) ahead of the reads that
    /// will want them (see the module header).
    pub async fn replay_run(&self, offset: u64, len: u64) -> Result<RunFetched, ReadError> {
        let manifest = self.manifest();
        let chunk_size = manifest.chunk_size as u64;
        if len == 0 || offset.checked_add(len).is_none_or(|end| end > self.size()) {
            return Err(ReadError::OutOfRange {
                template: self.id().clone(),
                offset,
                len,
                size: self.size(),
            });
        }
        let index = (offset / chunk_size) as usize;
        let Some(chunk) = self.chunk_ref(index) else {
            return Ok(RunFetched::Nothing);
        };
        let cache = self.cache();
        if cache.is_local(&chunk.digest) {
            return Ok(RunFetched::Nothing);
        }
        let within = offset - index as u64 * chunk_size;
        if let (Some(blocks), true) = (&manifest.blocks, len < chunk_size / BLOCKS_SHARE) {
            if !cache.is_fetching(&chunk.digest) {
                if let Some(hashes) = self.replay_block_hashes(index).await {
                    let bs = blocks.block_size as u64;
                    let (from, to) = ((within / bs) as usize, ((within + len - 1) / bs) as usize);
                    let sources = self.sources().clone();
                    if let Some(n) = cache
                        .prefetch_blocks(&chunk, blocks.block_size, &hashes, from, to, &sources)
                        .await
                    {
                        return Ok(if n == 0 {
                            RunFetched::Nothing
                        } else {
                            RunFetched::Blocks(n)
                        });
                    }
                }
            }
        }
        cache
            .fetch(&chunk, self.sources(), Priority::Prefetch)
            .await?;
        Ok(RunFetched::Whole(chunk.len))
    }

    /// The sha256 of each block of chunk `index`, from its page of the block index,
    /// fetched at prefetch priority (a demand read that wants the page joins it).
    async fn replay_block_hashes(&self, index: usize) -> Option<Vec<u8>> {
        let manifest = self.manifest();
        let blocks = manifest.blocks.as_ref()?;
        let chunk_size = manifest.chunk_size;
        let (page, at) = blocks.locate(index, chunk_size);
        let page_ref = crate::fetch::ChunkRef {
            template: self.id().clone(),
            index,
            digest: (*blocks.pages.get(page)?)?,
            len: blocks.page_len(page, manifest.chunk_count(), chunk_size),
        };
        let file = self
            .cache()
            .fetch(&page_ref, self.sources(), Priority::Prefetch)
            .await
            .ok()?;
        let mut entry = vec![0u8; blocks.entry_len(chunk_size) as usize];
        Chunk::File(file).read_at(at, &mut entry).ok()?;
        Some(entry)
    }
}
