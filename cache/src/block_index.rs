//! A manifest's block index (format 3): the sha256 of every block of every chunk, in
//! pages stored like chunks, and where a chunk's entry lies in them.

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

/// The manifest's block index (format 3): the sha256 of every `block_size` bytes of
/// every chunk, in pages stored in the store like chunks (named by their own sha256, so
/// a page is verified like one) and listed here, so the manifest grows by one digest
/// per page, not by the index.
///
/// A `null` page is one whose chunks are read whole: all zero, or changed by a commit
/// (whose new chunks have no entry yet).
///
/// A page holds `chunks_per_page` consecutive chunks' entries; an entry is the 32-byte
/// sha256 of each of the chunk's blocks in order (a chunk's last block may be short; an
/// all-zero chunk's entry is zeros and never read). A page whose chunks are all zero is
/// `null`. Pages are about [`PAGE_BYTES`], so the first read of a chunk fetches one
/// small page, whatever the template's size.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockIndex {
    pub block_size: u32,
    pub chunks_per_page: u32,
    pub pages: Vec<Option<Digest>>,
}

/// The size a page of the block index aims at: 32 KiB (16 chunks of 1 MiB).
pub const PAGE_BYTES: u64 = 32 << 10;

impl BlockIndex {
    /// The layout of an index of `chunk_count` chunks of `chunk_size` in blocks of
    /// `block_size` (pages not yet known).
    pub fn layout(chunk_size: u32, block_size: u32, chunk_count: usize) -> BlockIndex {
        let entry = (chunk_size / block_size) as u64 * 32;
        let chunks_per_page = (PAGE_BYTES / entry).max(1) as u32;
        BlockIndex {
            block_size,
            chunks_per_page,
            pages: vec![None; chunk_count.div_ceil(chunks_per_page as usize)],
        }
    }

    /// Bytes of one chunk's entry in a page.
    pub fn entry_len(&self, chunk_size: u32) -> u64 {
        (chunk_size / self.block_size) as u64 * 32
    }

    /// The page holding chunk `index`'s entry, and the entry's offset in it.
    pub fn locate(&self, index: usize, chunk_size: u32) -> (usize, u64) {
        let per = self.chunks_per_page as usize;
        (
            index / per,
            (index % per) as u64 * self.entry_len(chunk_size),
        )
    }

    /// Bytes of page `page` of an index of `chunk_count` chunks.
    pub fn page_len(&self, page: usize, chunk_count: usize, chunk_size: u32) -> u64 {
        let per = self.chunks_per_page as usize;
        let chunks = chunk_count.saturating_sub(page * per).min(per);
        chunks as u64 * self.entry_len(chunk_size)
    }

    /// Chunk `index` changed (a commit): its page is dropped, so its chunks are read whole.
    pub fn forget(&mut self, index: usize) {
        let page = index / self.chunks_per_page as usize;
        if let Some(p) = self.pages.get_mut(page) {
            *p = None;
        }
    }

    /// The index of the template grown from `old_count` to `new_count` chunks (zero
    /// chunks appended): full pages are kept, a last page that gains chunks is dropped.
    pub fn grown(&self, old_count: usize, new_count: usize) -> BlockIndex {
        let per = self.chunks_per_page as usize;
        let mut pages: Vec<Option<Digest>> =
            self.pages.iter().take(old_count / per).copied().collect();
        pages.resize(new_count.div_ceil(per), None);
        BlockIndex {
            block_size: self.block_size,
            chunks_per_page: self.chunks_per_page,
            pages,
        }
    }

    /// Checks the index against its manifest's chunks; `min_block` is the smallest
    /// block size it may use (the template's block size).
    pub(crate) fn check(
        &self,
        chunk_size: u32,
        chunk_count: usize,
        min_block: u32,
    ) -> Result<(), String> {
        if !self.block_size.is_power_of_two()
            || self.block_size < min_block
            || self.block_size > chunk_size.min(crate::blocks::MAX_BLOCK)
        {
            return Err(format!(
                "block index: block size {} must be a power of two from 4 KiB to 64 KiB and the chunk size",
                self.block_size
            ));
        }
        let per = self.chunks_per_page as u64;
        if per == 0 || per * self.entry_len(chunk_size) > 1 << 20 {
            return Err(format!(
                "block index: {} chunks per page is not 1 to a page of 1 MiB",
                self.chunks_per_page
            ));
        }
        let expected = chunk_count.div_ceil(per as usize);
        if self.pages.len() != expected {
            return Err(format!(
                "block index: {} pages listed, {chunk_count} chunks need {expected}",
                self.pages.len()
            ));
        }
        Ok(())
    }
}
