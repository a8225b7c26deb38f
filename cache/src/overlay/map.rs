//! The block map: which of an overlay's 4 KiB blocks are the template's, the
//! overlay's own data, or zero, held in memory and persisted page by page.
//!
//! One byte per block, the same bytes in memory and in the `map` file. Memory cost:
//! `size / 4096` bytes (256 KiB per GiB of template; 12.5 MiB for 50 GiB), plus one
//! dirty bit per [`MAP_PAGE`] (4096 blocks, 16 MiB of device).
//!
//! A block's state changes only while its region lock is held for writing (see
//! `locks`); anyone may load a state without a lock, and sees either the state before
//! or after a change. No block ever goes back to [`BlockState::Base`].

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

/// Bytes of map persisted per write: one page of the map file, the unit a flush
/// rewrites. Matches the page cache's page so a rewrite never reads before writing.
pub(super) const MAP_PAGE: usize = 4096;

/// Where a block's bytes come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum BlockState {
    /// Never written: the template's bytes.
    Base = 0,
    /// Written: the bytes at the block's own offset in the `data` file.
    Data = 1,
    /// Trimmed or zeroed: reads as zeros; its range in `data` is a hole.
    Zero = 2,
}

impl BlockState {
    /// The state stored as `byte`, `None` for a byte no version of the map writes.
    pub(super) fn from_byte(byte: u8) -> Option<BlockState> {
        match byte {
            0 => Some(BlockState::Base),
            1 => Some(BlockState::Data),
            2 => Some(BlockState::Zero),
            _ => None,
        }
    }
}

/// The in-memory block map with its dirty pages and counts.
pub(super) struct BlockMap {
    /// One [`BlockState`] byte per block.
    states: Box<[AtomicU8]>,
    /// One bit per [`MAP_PAGE`] of `states` changed since it was last persisted.
    dirty: Box<[AtomicU64]>,
    /// Blocks in [`BlockState::Data`], for stats without a scan.
    data_blocks: AtomicU64,
    /// Blocks in [`BlockState::Zero`].
    zero_blocks: AtomicU64,
}

impl BlockMap {
    /// A map of `blocks` blocks from their persisted bytes (all zero for a new overlay).
    /// On a byte that is no state, returns the block's index and the byte.
    pub(super) fn from_bytes(bytes: impl IntoIterator<Item = u8>) -> Result<BlockMap, (u64, u8)> {
        let mut data_blocks = 0;
        let mut zero_blocks = 0;
        let bytes = bytes.into_iter();
        let mut states = Vec::with_capacity(bytes.size_hint().0);
        for (block, byte) in bytes.enumerate() {
            match BlockState::from_byte(byte) {
                Some(BlockState::Data) => data_blocks += 1,
                Some(BlockState::Zero) => zero_blocks += 1,
                Some(BlockState::Base) => {}
                None => return Err((block as u64, byte)),
            }
            states.push(AtomicU8::new(byte));
        }
        let pages = states.len().div_ceil(MAP_PAGE);
        Ok(BlockMap {
            states: states.into_boxed_slice(),
            dirty: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            data_blocks: AtomicU64::new(data_blocks),
            zero_blocks: AtomicU64::new(zero_blocks),
        })
    }

    /// Number of blocks.
    pub(super) fn len(&self) -> u64 {
        self.states.len() as u64
    }

    /// The state of `block` (which the caller has checked is in range).
    pub(super) fn get(&self, block: u64) -> BlockState {
        let byte = self.states[block as usize].load(Ordering::Acquire);
        // Only `set` stores, and it stores a `BlockState`.
        BlockState::from_byte(byte).unwrap_or(BlockState::Data)
    }

    /// The first block at or after `block`, below `limit`, whose state is not `state`
    /// (or `limit`): the end of the run `block` starts.
    pub(super) fn run_end(&self, block: u64, state: BlockState, limit: u64) -> u64 {
        (block..limit)
            .find(|&b| self.get(b) != state)
            .unwrap_or(limit)
    }

    /// Whether any block in `[start, end)` is not [`BlockState::Base`].
    pub(super) fn any_written(&self, start: u64, end: u64) -> bool {
        (start..end).any(|b| self.get(b) != BlockState::Base)
    }

    /// Sets the state of `block`; the caller holds its region lock for writing.
    pub(super) fn set(&self, block: u64, state: BlockState) {
        let old = self.states[block as usize].swap(state as u8, Ordering::AcqRel);
        if old == state as u8 {
            return;
        }
        self.count(old, -1);
        self.count(state as u8, 1);
        let page = block as usize / MAP_PAGE;
        self.dirty[page / 64].fetch_or(1 << (page % 64), Ordering::AcqRel);
    }

    fn count(&self, byte: u8, delta: i64) {
        let counter = match BlockState::from_byte(byte) {
            Some(BlockState::Data) => &self.data_blocks,
            Some(BlockState::Zero) => &self.zero_blocks,
            _ => return,
        };
        if delta > 0 {
            counter.fetch_add(1, Ordering::Relaxed);
        } else {
            counter.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Blocks holding overlay data.
    pub(super) fn data_blocks(&self) -> u64 {
        self.data_blocks.load(Ordering::Relaxed)
    }

    /// Blocks marked zero.
    pub(super) fn zero_blocks(&self) -> u64 {
        self.zero_blocks.load(Ordering::Relaxed)
    }

    /// Takes the set of dirty pages (ascending) and clears it: a state set after this
    /// marks its page dirty again for the next flush.
    pub(super) fn take_dirty(&self) -> Vec<usize> {
        let mut pages = Vec::new();
        for (word_index, word) in self.dirty.iter().enumerate() {
            let mut bits = word.swap(0, Ordering::AcqRel);
            while bits != 0 {
                pages.push(word_index * 64 + bits.trailing_zeros() as usize);
                bits &= bits - 1;
            }
        }
        pages
    }

    /// Marks `pages` dirty again (their write failed).
    pub(super) fn mark_dirty(&self, pages: &[usize]) {
        for &page in pages {
            self.dirty[page / 64].fetch_or(1 << (page % 64), Ordering::AcqRel);
        }
    }

    /// Byte range of the map file that page `page` covers (the last page may be short).
    pub(super) fn page_range(&self, page: usize) -> std::ops::Range<usize> {
        let start = page * MAP_PAGE;
        start..(start + MAP_PAGE).min(self.states.len())
    }

    /// Appends the current bytes of `page` to `out`.
    pub(super) fn snapshot_page(&self, page: usize, out: &mut Vec<u8>) {
        let range = self.page_range(page);
        out.extend(self.states[range].iter().map(|s| s.load(Ordering::Acquire)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_states_and_tracks_dirty_pages() {
        let map = BlockMap::from_bytes(vec![0u8; 3 * MAP_PAGE + 10]).unwrap();
        assert_eq!(map.len(), 3 * MAP_PAGE as u64 + 10);
        assert!(map.take_dirty().is_empty());
        map.set(5, BlockState::Data);
        map.set(6, BlockState::Data);
        map.set(3 * MAP_PAGE as u64 + 9, BlockState::Zero);
        assert_eq!((map.data_blocks(), map.zero_blocks()), (2, 1));
        assert_eq!(map.take_dirty(), vec![0, 3]);
        assert!(map.take_dirty().is_empty(), "taking clears");
        // Re-setting the same state changes nothing on disk.
        map.set(5, BlockState::Data);
        assert!(map.take_dirty().is_empty());
        map.set(5, BlockState::Zero);
        assert_eq!((map.data_blocks(), map.zero_blocks()), (1, 2));
        map.mark_dirty(&[2]);
        assert_eq!(map.take_dirty(), vec![0, 2]);
        let mut page = Vec::new();
        map.snapshot_page(3, &mut page);
        assert_eq!(page.len(), 10);
        assert_eq!(page[9], BlockState::Zero as u8);
    }

    #[test]
    fn runs_and_loading() {
        let map = BlockMap::from_bytes([0, 0, 1, 1, 1, 2, 0]).unwrap();
        assert_eq!((map.data_blocks(), map.zero_blocks()), (3, 1));
        assert_eq!(map.run_end(0, BlockState::Base, 7), 2);
        assert_eq!(map.run_end(2, BlockState::Data, 7), 5);
        assert_eq!(map.run_end(2, BlockState::Data, 4), 4);
        assert!(map.any_written(0, 3) && !map.any_written(0, 2));
        assert_eq!(BlockMap::from_bytes([0, 1, 7]).err(), Some((2, 7)));
    }
}
