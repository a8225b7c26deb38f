//! Writes, TRIM / WRITE_ZEROES and FLUSH.
//!
//! Whole blocks are written directly: one `pwrite` per lock window, then their map
//! bytes say "data". A partial block at either edge is read merged, patched and written
//! whole under its region's write lock, so two partial writes to one block never lose
//! each other's bytes. Zeroing marks whole blocks zero and punches their data out;
//! partial edges are patched with zeros. Every change holds the freeze lock shared.

use std::sync::atomic::Ordering;

use super::disk::blocking;
use super::error::OverlayError;
use super::locks::RegionLocks;
use super::map::{BlockState, MAP_PAGE};
use super::Overlay;
use crate::manifest::BLOCK_SIZE;

/// One block's bytes, the unit of a read-modify-write.
const BLOCK: usize = BLOCK_SIZE as usize;

/// What a read-modify-write puts into part of a block.
#[derive(Clone, Copy)]
enum Patch<'a> {
    Bytes(&'a [u8]),
    Zeros(usize),
}

impl Patch<'_> {
    fn apply(self, block: &mut [u8], at: usize) {
        match self {
            Patch::Bytes(bytes) => block[at..at + bytes.len()].copy_from_slice(bytes),
            Patch::Zeros(len) => block[at..at + len].fill(0),
        }
    }
}

/// The end of the whole blocks starting at `pos` within `[pos, end)`, if there is one.
fn whole_blocks_end(pos: u64, end: u64) -> Option<u64> {
    let whole = (end - pos) / BLOCK_SIZE * BLOCK_SIZE;
    (pos.is_multiple_of(BLOCK_SIZE) && whole > 0).then_some(pos + whole)
}

/// Bytes from `pos` to the end of its block or to `end`, whichever comes first.
fn partial_len(pos: u64, end: u64) -> u64 {
    ((pos / BLOCK_SIZE + 1) * BLOCK_SIZE).min(end) - pos
}

impl Overlay {
    /// Writes `data` at `offset`; with `fua`, durably (a flush) before returning.
    pub async fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), OverlayError> {
        let end = self.check_range("write", offset, data.len() as u64)?;
        self.fetch_edges(offset, end).await;
        {
            let _writing = self.freeze.read().await;
            let mut pos = offset;
            while pos < end {
                let src = &data[(pos - offset) as usize..];
                pos = match whole_blocks_end(pos, end) {
                    Some(whole_end) => {
                        let src = &src[..(whole_end - pos) as usize];
                        blocking(|| self.write_blocks(pos, src))?;
                        whole_end
                    }
                    None => {
                        let len = partial_len(pos, end);
                        self.patch_block(pos, Patch::Bytes(&src[..len as usize]))
                            .await?;
                        pos + len
                    }
                };
            }
        }
        if fua {
            self.flush().await?;
        }
        Ok(())
    }

    /// NBD TRIM: the range reads as zeros afterwards and its space is freed.
    pub async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), OverlayError> {
        self.zero_range("trim", offset, len, fua).await
    }

    /// NBD WRITE_ZEROES: the range reads as zeros afterwards (whole blocks become holes).
    pub async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), OverlayError> {
        self.zero_range("write zeroes", offset, len, fua).await
    }

    async fn zero_range(
        &self,
        op: &'static str,
        offset: u64,
        len: u64,
        fua: bool,
    ) -> Result<(), OverlayError> {
        let end = self.check_range(op, offset, len)?;
        self.fetch_edges(offset, end).await;
        {
            let _writing = self.freeze.read().await;
            let mut pos = offset;
            while pos < end {
                pos = match whole_blocks_end(pos, end) {
                    Some(whole_end) => {
                        blocking(|| self.zero_blocks(pos / BLOCK_SIZE, whole_end / BLOCK_SIZE))?;
                        whole_end
                    }
                    None => {
                        let len = partial_len(pos, end);
                        self.patch_block(pos, Patch::Zeros(len as usize)).await?;
                        pos + len
                    }
                };
            }
        }
        if fua {
            self.flush().await?;
        }
        Ok(())
    }

    /// Brings the template's bytes of the partial blocks at the edges of `[offset, end)`
    /// into the chunk cache before the freeze lock is taken, so that the lock (which a
    /// commit waits for) is never held across a network fetch. Errors are left to the
    /// locked read-modify-write, which reports them.
    async fn fetch_edges(&self, offset: u64, end: u64) {
        if offset >= end {
            return;
        }
        let mut scratch = [0u8; BLOCK];
        for pos in [offset, end.saturating_sub(1)] {
            let block = pos / BLOCK_SIZE;
            let partial = offset > block * BLOCK_SIZE || end < (block + 1) * BLOCK_SIZE;
            if partial && self.map.get(block) == BlockState::Base {
                let _ = self.base.read_at(block * BLOCK_SIZE, &mut scratch).await;
            }
        }
    }

    /// Writes whole blocks `src` at block-aligned `offset`, one window at a time.
    /// Blocking.
    fn write_blocks(&self, offset: u64, src: &[u8]) -> Result<(), OverlayError> {
        let end_block = (offset + src.len() as u64) / BLOCK_SIZE;
        let mut block = offset / BLOCK_SIZE;
        while block < end_block {
            let window = RegionLocks::window_end(block).min(end_block);
            let _held = self.locks.write(block, window);
            let from = (block * BLOCK_SIZE - offset) as usize;
            let to = (window * BLOCK_SIZE - offset) as usize;
            self.disk.write_data(block * BLOCK_SIZE, &src[from..to])?;
            self.unsynced.store(true, Ordering::SeqCst);
            for b in block..window {
                self.map.set(b, BlockState::Data);
            }
            block = window;
        }
        Ok(())
    }

    /// Marks blocks `[start, end)` zero and punches out the data they held, one window
    /// at a time. Blocking.
    fn zero_blocks(&self, start: u64, end: u64) -> Result<(), OverlayError> {
        let mut block = start;
        while block < end {
            let window = RegionLocks::window_end(block).min(end);
            let _held = self.locks.write(block, window);
            let is_data = |b: &u64| self.map.get(*b) == BlockState::Data;
            if let Some(first) = (block..window).find(is_data) {
                let last = (block..window).rev().find(is_data).unwrap_or(first);
                // Under the write locks: a write to these blocks cannot land between
                // the punch and the map update and be punched out.
                self.disk
                    .punch_data(first * BLOCK_SIZE, (last + 1 - first) * BLOCK_SIZE)?;
            }
            for b in block..window {
                self.map.set(b, BlockState::Zero);
            }
            block = window;
        }
        Ok(())
    }

    /// Read-modify-write of the block holding `pos`: the patch goes at `pos`, the rest
    /// of the block keeps its current (merged) bytes.
    async fn patch_block(&self, pos: u64, patch: Patch<'_>) -> Result<(), OverlayError> {
        let block = pos / BLOCK_SIZE;
        let at = (pos % BLOCK_SIZE) as usize;
        let mut buf = [0u8; BLOCK];
        loop {
            // The template's bytes are fetched before locking (never across a lock);
            // a block that is the template's now may be written by the time the lock
            // is held, never the reverse, so the retry below is for completeness.
            let have_base = self.map.get(block) == BlockState::Base;
            if have_base {
                self.base
                    .read_at(block * BLOCK_SIZE, &mut buf)
                    .await
                    .map_err(|source| OverlayError::Base {
                        sandbox: self.sandbox.clone(),
                        template: self.base.id().clone(),
                        offset: block * BLOCK_SIZE,
                        source,
                    })?;
            }
            if blocking(|| self.patch_locked(block, have_base, &mut buf, patch, at))? {
                return Ok(());
            }
        }
    }

    /// The locked half of [`Overlay::patch_block`]; `buf` holds the template's bytes of
    /// the block if `have_base`. Returns false (nothing done) if the block turned out
    /// to be the template's without them. Blocking.
    fn patch_locked(
        &self,
        block: u64,
        have_base: bool,
        buf: &mut [u8; BLOCK],
        patch: Patch<'_>,
        at: usize,
    ) -> Result<bool, OverlayError> {
        let _held = self.locks.write(block, block + 1);
        match self.map.get(block) {
            BlockState::Base if !have_base => return Ok(false),
            BlockState::Base => {}
            BlockState::Data => self.disk.read_data(block * BLOCK_SIZE, buf)?,
            // Zeros over zeros: nothing changes.
            BlockState::Zero if matches!(patch, Patch::Zeros(_)) => return Ok(true),
            BlockState::Zero => buf.fill(0),
        }
        patch.apply(buf, at);
        self.disk.write_data(block * BLOCK_SIZE, buf)?;
        self.unsynced.store(true, Ordering::SeqCst);
        self.map.set(block, BlockState::Data);
        Ok(true)
    }

    /// Makes every write that has returned durable: `fdatasync` of `data`, then the
    /// changed pages of the map written and `fdatasync`ed (see the module header for why
    /// in this order).
    pub async fn flush(&self) -> Result<(), OverlayError> {
        blocking(|| self.flush_blocking())
    }

    /// [`Overlay::flush`] on tokio's blocking pool: the calling task (and the thread it
    /// runs on) goes on with other work while the data and the map are synced.
    pub async fn flush_shared(self: &std::sync::Arc<Self>) -> Result<(), OverlayError> {
        let this = self.clone();
        match tokio::task::spawn_blocking(move || this.flush_blocking()).await {
            Ok(result) => result,
            Err(e) => Err(OverlayError::SyncFailed {
                sandbox: self.sandbox.clone(),
                path: self.dir.join(format!("(flush task: {e})")),
            }),
        }
    }

    fn flush_blocking(&self) -> Result<(), OverlayError> {
        // One flush at a time: a second one must not return while the first still
        // holds pages it took.
        let mut state = self.flush.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(path) = &state.failed {
            return Err(OverlayError::SyncFailed {
                sandbox: self.sandbox.clone(),
                path: path.clone(),
            });
        }
        // Snapshot before syncing data: every "data" byte in it was set after its
        // block's pwrite returned, so the sync below covers it.
        let pages = self.map.take_dirty();
        let mut snapshot = Vec::with_capacity(pages.len() * MAP_PAGE);
        for &page in &pages {
            self.map.snapshot_page(page, &mut snapshot);
        }
        if self.unsynced.swap(false, Ordering::SeqCst) {
            if let Err(e) = self.disk.sync_data() {
                state.failed = Some(self.dir.join(super::disk::DATA_FILE));
                return Err(e);
            }
        }
        if pages.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.write_map_pages(&pages, &snapshot) {
            // Nothing was lost yet: the pages are written again by the next flush.
            self.map.mark_dirty(&pages);
            return Err(e);
        }
        if let Err(e) = self.disk.sync_map() {
            state.failed = Some(self.dir.join(super::disk::MAP_FILE));
            return Err(e);
        }
        Ok(())
    }

    /// Writes the snapshot of `pages` (ascending), one `pwrite` per run of consecutive
    /// pages.
    fn write_map_pages(&self, pages: &[usize], snapshot: &[u8]) -> Result<(), OverlayError> {
        let mut used = 0;
        let mut i = 0;
        while i < pages.len() {
            let mut j = i + 1;
            while j < pages.len() && pages[j] == pages[j - 1] + 1 {
                j += 1;
            }
            let start = self.map.page_range(pages[i]).start;
            let len = self.map.page_range(pages[j - 1]).end - start;
            self.disk
                .write_map(start as u64, &snapshot[used..used + len])?;
            used += len;
            i = j;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_requests_into_whole_and_partial_blocks() {
        assert_eq!(whole_blocks_end(0, 4096), Some(4096));
        assert_eq!(whole_blocks_end(0, 4095), None);
        assert_eq!(whole_blocks_end(4096, 3 * 4096 + 10), Some(3 * 4096));
        assert_eq!(whole_blocks_end(1, 10 * 4096), None);
        assert_eq!(partial_len(1, 10 * 4096), 4095);
        assert_eq!(partial_len(4096 + 5, 4096 + 9), 4);
    }
}
