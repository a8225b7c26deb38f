//! A template as bytes: offsets map to chunks, zero chunks read as zeros, missing
//! chunks are fetched through the [`ChunkCache`].

use std::sync::Arc;

use futures::future::try_join_all;

use crate::chunk_store::{ChunkFile, ChunkStoreError};
use crate::fetch::{Chunk, ChunkCache, ChunkRef, FetchError, Priority, ReadBudget};
use crate::manifest::{BlockIndex, Manifest};
use crate::readahead::Readahead;
use crate::source::Source;

/// Why a read of a template failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("template {template}: read of {len} bytes at {offset} is past the end ({size})")]
    OutOfRange {
        template: Arc<str>,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error(transparent)]
    Fetch(#[from] Arc<FetchError>),
    #[error("template {template}: {source}")]
    Local {
        template: Arc<str>,
        source: ChunkStoreError,
    },
}

/// Reads of less than a quarter of a missing chunk fetch only the blocks that hold them,
/// when the template has a block index (the kernel's reads of a lazily booting file
/// system are mostly 4 to 32 KiB); a larger read (a file or an image read in sequence,
/// nbdcopy's 256 KiB requests) fetches the chunk whole and keeps it.
fn piecemeal(len: u64, chunk_size: u64) -> bool {
    len < chunk_size / 4
}

/// One template's bytes over the node's cache.
pub struct TemplateImage {
    manifest: Arc<Manifest>,
    id: Arc<str>,
    cache: Arc<ChunkCache>,
    /// Origins first, then the store.
    sources: Arc<[Source]>,
    /// Sequential readers, to fetch ahead of them.
    readahead: Readahead,
}

/// A maximal run of chunks that are all zero or all data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageExtent {
    pub length: u64,
    pub zero: bool,
}

impl ImageExtent {
    /// Adds `length` bytes of the given kind to `runs`, merging with the last run when
    /// it is of the same kind.
    pub fn append(runs: &mut Vec<ImageExtent>, length: u64, zero: bool) {
        match runs.last_mut() {
            Some(last) if last.zero == zero => last.length += length,
            _ => runs.push(ImageExtent { length, zero }),
        }
    }
}

impl TemplateImage {
    pub fn new(manifest: Arc<Manifest>, cache: Arc<ChunkCache>, sources: Vec<Source>) -> Self {
        let chunk_size = manifest.chunk_size as u64;
        TemplateImage {
            id: manifest.template.as_str().into(),
            manifest,
            cache,
            sources: sources.into(),
            readahead: Readahead::new(chunk_size),
        }
    }

    pub fn manifest(&self) -> &Arc<Manifest> {
        &self.manifest
    }

    pub fn id(&self) -> &Arc<str> {
        &self.id
    }

    pub fn size(&self) -> u64 {
        self.manifest.size
    }

    pub fn sources(&self) -> &Arc<[Source]> {
        &self.sources
    }

    pub fn cache(&self) -> &Arc<ChunkCache> {
        &self.cache
    }

    /// The reference of chunk `index`, `None` for an all-zero chunk.
    pub fn chunk_ref(&self, index: usize) -> Option<ChunkRef> {
        let digest = (*self.manifest.chunks.get(index)?)?;
        Some(ChunkRef {
            template: self.id.clone(),
            index,
            digest,
            len: self.manifest.chunk_len(index),
        })
    }

    /// Whether chunk `index` needs no fetch (local, or all zero).
    pub fn is_local(&self, index: usize) -> bool {
        match self.chunk_ref(index) {
            Some(c) => self.cache.store().contains(&c.digest),
            None => true,
        }
    }

    /// Chunk `index`, fetched if needed (a demand read: counted as hit or miss).
    pub async fn chunk(&self, index: usize) -> Result<Option<Chunk>, ReadError> {
        match self.chunk_ref(index) {
            Some(c) => Ok(Some(self.cache.get(&c, &self.sources).await?)),
            None => Ok(None),
        }
    }

    /// Makes chunk `index` local without counting a read, at `priority` (a fill runs
    /// in the background, a commit's or a reader's prefetch on demand).
    pub async fn fetch_chunk(
        &self,
        index: usize,
        priority: Priority,
    ) -> Result<Option<ChunkFile>, ReadError> {
        match self.chunk_ref(index) {
            Some(c) => Ok(Some(self.cache.fetch(&c, &self.sources, priority).await?)),
            None => Ok(None),
        }
    }

    /// Fills `buf` with the template's bytes at `offset`.
    pub async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), ReadError> {
        let len = buf.len() as u64;
        if offset.checked_add(len).is_none_or(|end| end > self.size()) {
            return Err(ReadError::OutOfRange {
                template: self.id.clone(),
                offset,
                len,
                size: self.size(),
            });
        }
        if len == 0 {
            return Ok(());
        }
        let (first, last) = self.span(offset, len);
        self.read_ahead(first, last, len);
        // One budget for every attempt of the read, whatever its pieces fetch.
        let budget = self.cache.read_budget();
        if first == last {
            // The common case: one chunk, no allocation.
            let within = offset - first as u64 * self.manifest.chunk_size as u64;
            return self.read_piece(first, within, buf, &budget).await;
        }
        let mut pieces = Vec::with_capacity(last - first + 1);
        let mut rest = buf;
        for (index, within, take) in self.pieces(offset, len) {
            let (head, tail) = rest.split_at_mut(take as usize);
            pieces.push(self.read_piece(index, within, head, &budget));
            rest = tail;
        }
        try_join_all(pieces).await?;
        Ok(())
    }

    /// Fills `buf` with bytes `within..` of chunk `index`: from its blocks for a small
    /// piece of a missing chunk stored in blocks (the few KiB a large read takes of the
    /// next chunk too: the reader's next read fetches that chunk whole), else from the
    /// chunk (fetched whole if missing); every attempt within the read's `budget`.
    async fn read_piece(
        &self,
        index: usize,
        within: u64,
        buf: &mut [u8],
        budget: &ReadBudget,
    ) -> Result<(), ReadError> {
        let small = piecemeal(buf.len() as u64, self.manifest.chunk_size as u64);
        if let (Some(blocks), true, Some(chunk)) =
            (&self.manifest.blocks, small, self.chunk_ref(index))
        {
            // A cached read looks the chunk up once, as without an index.
            if let Some(file) = self.cache.local_read(&chunk)? {
                return self.copy_out(Some(&Chunk::File(file)), within, buf);
            }
            if self
                .read_in_blocks(blocks, &chunk, within, buf, budget)
                .await
            {
                return Ok(());
            }
            // The chunk is read whole: this read's blocks are served from its stored
            // form as soon as it comes, before it is verified whole.
            let hashes = self.block_hashes(blocks, &chunk, budget);
            let whole = self
                .cache
                .get_or_read_arrived(
                    &chunk,
                    &self.sources,
                    budget,
                    blocks.block_size,
                    hashes,
                    within,
                    buf,
                )
                .await?;
            return match whole {
                Some(file) => self.copy_out(Some(&file), within, buf),
                None => Ok(()),
            };
        }
        let file = match self.chunk_ref(index) {
            Some(c) => Some(self.cache.get_within(&c, &self.sources, budget).await?),
            None => None,
        };
        self.copy_out(file.as_ref(), within, buf)
    }

    /// Answers a small read of missing `chunk` from the blocks that hold it, as the
    /// template's block index `blocks` names them ([`crate::partial`]); `false` to read
    /// the chunk whole. Where the store's link takes a whole chunk about as fast as a
    /// small range ([`crate::link`]) and the index page is not local, the chunk is read
    /// whole at once: fetching the page first would be a request more (and no block of
    /// the chunk can be in memory without its page).
    async fn read_in_blocks(
        &self,
        blocks: &BlockIndex,
        chunk: &ChunkRef,
        within: u64,
        buf: &mut [u8],
        budget: &ReadBudget,
    ) -> bool {
        if self.cache.is_fetching(&chunk.digest) {
            return false;
        }
        let (page, _) = blocks.locate(chunk.index, self.manifest.chunk_size);
        let page_local = blocks
            .pages
            .get(page)
            .copied()
            .flatten()
            .is_some_and(|digest| self.cache.store().contains(&digest));
        if !page_local && crate::partial::whole_is_cheaper(&self.sources, false) {
            return false;
        }
        tracing::trace!(template = %self.id, index = chunk.index, within, len = buf.len(), "reading blocks");
        let Some(hashes) = self.block_hashes(blocks, chunk, budget).await else {
            return false;
        };
        let sources = self.sources.clone();
        self.cache
            .read_blocks(
                chunk,
                blocks.block_size,
                &hashes,
                within,
                buf,
                &sources,
                budget,
            )
            .await
    }

    /// The sha256 of each block of `chunk`, from its page of the block index (fetched
    /// and verified like a chunk, and kept in the cache like one), within the read's
    /// `budget`.
    async fn block_hashes(
        &self,
        blocks: &BlockIndex,
        chunk: &ChunkRef,
        budget: &ReadBudget,
    ) -> Option<Vec<u8>> {
        let chunk_size = self.manifest.chunk_size;
        let (page, at) = blocks.locate(chunk.index, chunk_size);
        let page_ref = ChunkRef {
            template: self.id.clone(),
            index: chunk.index,
            digest: (*blocks.pages.get(page)?)?,
            len: blocks.page_len(page, self.manifest.chunk_count(), chunk_size),
        };
        let file = match self
            .cache
            .fetch_within(&page_ref, &self.sources, budget)
            .await
        {
            Ok(file) => file,
            Err(e) => {
                tracing::debug!(template = %self.id, page, %e, "block index page unavailable; reading whole chunks");
                return None;
            }
        };
        let mut entry = vec![0u8; blocks.entry_len(chunk_size) as usize];
        Chunk::File(file).read_at(at, &mut entry).ok()?;
        Some(entry)
    }

    /// The chunks holding the `len` (> 0) bytes at `offset`, in order: (chunk index,
    /// offset within the chunk, bytes in it).
    fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = (usize, u64, u64)> {
        let chunk_size = self.manifest.chunk_size as u64;
        let end = offset + len;
        let (first, last) = self.span(offset, len);
        (first..=last).map(move |index| {
            let chunk_start = index as u64 * chunk_size;
            let from = offset.max(chunk_start);
            let to = end.min(chunk_start + chunk_size);
            (index, from - chunk_start, to - from)
        })
    }

    /// The first and last chunk of the `len` (> 0) bytes at `offset`.
    fn span(&self, offset: u64, len: u64) -> (usize, usize) {
        let chunk_size = self.manifest.chunk_size as u64;
        (
            (offset / chunk_size) as usize,
            ((offset + len - 1) / chunk_size) as usize,
        )
    }

    /// Hands `push` the pieces that hold the `len` bytes at `offset`, in order: a chunk
    /// file and the offset in it, or `None` for a piece of an all-zero chunk (nothing
    /// stored). Only when every stored piece is local and in the page cache now, so a
    /// frontend can splice them (and send zeroes as holes) instead of reading them
    /// through a buffer. `false` (nothing counted) when a piece is not local or not
    /// resident, or `push` has no room; the caller then uses
    /// [`TemplateImage::read_at`]. Never waits (the check is
    /// `cachestat(2)`, see [`crate::ChunkFile::resident`]). On success it counts
    /// like a read: hits, readahead, and the demand the fill yields to.
    pub fn resident_pieces(
        &self,
        offset: u64,
        len: u64,
        mut push: impl FnMut(Option<(&Arc<std::fs::File>, u64)>, u32) -> bool,
    ) -> bool {
        if len == 0 || offset.checked_add(len).is_none_or(|end| end > self.size()) {
            return false;
        }
        let mut stored = 0;
        for (index, within, take) in self.pieces(offset, len) {
            // `take` is at most one chunk (16 MiB), so it fits u32.
            let pushed = match self.chunk_ref(index) {
                // An all-zero chunk: nothing stored, a run of zeroes.
                None => push(None, take as u32),
                Some(chunk) => match self.cache.resident(&chunk, within, take) {
                    Some(file) => {
                        stored += 1;
                        push(Some((file.file(), within)), take as u32)
                    }
                    None => return false,
                },
            };
            if !pushed {
                return false;
            }
        }
        let (first, last) = self.span(offset, len);
        self.read_ahead(first, last, len);
        // Zero chunks are neither hits nor demand, as in `read_at`.
        if stored > 0 {
            self.cache.resident_read(&self.id, stored);
        }
        true
    }

    fn copy_out(&self, file: Option<&Chunk>, offset: u64, buf: &mut [u8]) -> Result<(), ReadError> {
        match file {
            Some(f) => f.read_at(offset, buf).map_err(|source| ReadError::Local {
                template: self.id.clone(),
                source,
            }),
            None => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    /// Starts fetches of the chunks after a sequential reader's position.
    fn read_ahead(&self, first: usize, last: usize, len: u64) {
        let Some(ahead) = self.readahead.on_read(first, last, len) else {
            return;
        };
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        tracing::trace!(template = %self.id, ?ahead, "readahead");
        for index in ahead.start..ahead.end.min(self.manifest.chunk_count()) {
            self.prefetch(index);
        }
    }

    /// Starts a background fetch of chunk `index` if it is missing and not under way.
    pub fn prefetch(&self, index: usize) {
        let Some(c) = self.chunk_ref(index) else {
            return;
        };
        if self.cache.store().contains(&c.digest) || self.cache.is_fetching(&c.digest) {
            return;
        }
        let cache = self.cache.clone();
        let sources = self.sources.clone();
        tokio::spawn(async move {
            // Failures are logged by the cache; a later demand read retries.
            let _ = cache.fetch(&c, &sources, Priority::Prefetch).await;
        });
    }

    /// Starts background fetches of every chunk overlapping `[offset, offset+len)`.
    pub fn prefetch_range(&self, offset: u64, len: u64) {
        if len == 0 || offset >= self.size() {
            return;
        }
        let chunk_size = self.manifest.chunk_size as u64;
        let end = (offset.saturating_add(len)).min(self.size());
        for index in (offset / chunk_size) as usize..=((end - 1) / chunk_size) as usize {
            self.prefetch(index);
        }
    }

    /// Zero and data runs covering `[offset, offset+len)`, clipped to it.
    pub fn extents(&self, offset: u64, len: u64) -> Vec<ImageExtent> {
        let mut out: Vec<ImageExtent> = Vec::new();
        let end = offset.saturating_add(len).min(self.size());
        let chunk_size = self.manifest.chunk_size as u64;
        let mut pos = offset;
        while pos < end {
            let index = (pos / chunk_size) as usize;
            let next = ((index as u64 + 1) * chunk_size).min(end);
            let zero = self.manifest.chunks[index].is_none();
            ImageExtent::append(&mut out, next - pos, zero);
            pos = next;
        }
        out
    }
}
