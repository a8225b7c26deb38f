//! Merged reads: every run of blocks is read from where its bytes are.
//!
//! A run of template blocks is one [`crate::TemplateImage::read_at`], taken without a
//! lock: the template never changes, and a block that the sandbox writes meanwhile
//! reads as it was before (a read racing a write sees old or new). A run of the
//! overlay's own blocks (data or zero) is read under the region locks, so a block being
//! rewritten is seen whole, old or new; a data run is one `pread` per lock window.

use super::disk::blocking;
use super::error::OverlayError;
use super::locks::RegionLocks;
use super::map::BlockState;
use super::Overlay;
use crate::manifest::BLOCK_SIZE;

impl Overlay {
    /// Fills `buf` with the overlay's bytes at `offset`. Out-of-range reads are refused.
    pub async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), OverlayError> {
        let end = self.check_range("read", offset, buf.len() as u64)?;
        let mut pos = offset;
        while pos < end {
            let dst = &mut buf[(pos - offset) as usize..];
            let next = match self.map.get(pos / BLOCK_SIZE) {
                BlockState::Base => pos,
                BlockState::Data | BlockState::Zero => blocking(|| self.read_own(pos, end, dst))?,
            };
            pos = if next > pos {
                next
            } else {
                self.read_base_run(pos, end, dst).await?
            };
        }
        Ok(())
    }

    /// Reads the run of template blocks at `pos` (at least one block, clipped to `end`)
    /// into the front of `dst`; returns where it ended.
    async fn read_base_run(&self, pos: u64, end: u64, dst: &mut [u8]) -> Result<u64, OverlayError> {
        let block = pos / BLOCK_SIZE;
        let run_blocks = self
            .map
            .run_end(block, BlockState::Base, end.div_ceil(BLOCK_SIZE))
            .max(block + 1);
        let run_end = (run_blocks * BLOCK_SIZE).min(end);
        let len = (run_end - pos) as usize;
        self.base
            .read_at(pos, &mut dst[..len])
            .await
            .map_err(|source| OverlayError::Base {
                sandbox: self.sandbox.clone(),
                template: self.base.id().clone(),
                offset: pos,
                source,
            })?;
        Ok(run_end)
    }

    /// Reads the overlay's own blocks from `pos` into the front of `dst`, under the read
    /// locks of one window, until a template block, `end` or the window's end. Returns
    /// where it stopped (`pos` itself only if the block at `pos` is the template's).
    /// Blocking.
    fn read_own(&self, pos: u64, end: u64, dst: &mut [u8]) -> Result<u64, OverlayError> {
        let first = pos / BLOCK_SIZE;
        let window = RegionLocks::window_end(first).min(end.div_ceil(BLOCK_SIZE));
        let _held = self.locks.read(first, window);
        let limit = (window * BLOCK_SIZE).min(end);
        let mut at = pos;
        while at < limit {
            let block = at / BLOCK_SIZE;
            let state = self.map.get(block);
            if state == BlockState::Base {
                break;
            }
            let run_end = (self.map.run_end(block, state, window) * BLOCK_SIZE).min(limit);
            let out = &mut dst[(at - pos) as usize..(run_end - pos) as usize];
            match state {
                BlockState::Data => self.disk.read_data(at, out)?,
                BlockState::Zero | BlockState::Base => out.fill(0),
            }
            at = run_end;
        }
        Ok(at)
    }
}
