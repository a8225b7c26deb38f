//! Region locks: what keeps a reader from seeing half of a block being written, and two
//! read-modify-writes of one block from losing each other's bytes.
//!
//! Blocks are grouped in regions of [`LOCK_SPAN_BLOCKS`]; region `r` is guarded by
//! stripe `r % LOCK_STRIPES`, a `std` `RwLock` held only around blocking file calls
//! (never across an `await`). A request locks at most one window of
//! [`MAX_WINDOW_REGIONS`] regions at a time, so its guards fit in a fixed array (no
//! allocation per request), and takes the stripes in ascending order, so two requests
//! never wait on each other in a cycle.

use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Blocks per lock region (64 KiB): a 1 MiB request takes 16 locks, and writers to
/// different 64 KiB ranges never wait on each other.
pub(super) const LOCK_SPAN_BLOCKS: u64 = 16;
/// Stripes per overlay: a fixed ~16 KiB whatever the template's size; regions 64 MiB
/// apart share a stripe, which only matters if both are written at the same instant.
const LOCK_STRIPES: usize = 1024;
/// Regions one request locks at once (4 MiB): the bytes one `pread` or `pwrite` moves
/// under one set of locks. Larger requests go window by window.
pub(super) const MAX_WINDOW_REGIONS: u64 = 64;

/// The striped region locks of one overlay.
pub(super) struct RegionLocks {
    stripes: Box<[RwLock<()>]>,
}

/// Guards over one window of regions; dropping it unlocks them.
pub(super) struct WindowGuard<G> {
    _guards: [Option<G>; MAX_WINDOW_REGIONS as usize],
}

impl RegionLocks {
    pub(super) fn new() -> RegionLocks {
        RegionLocks {
            stripes: (0..LOCK_STRIPES).map(|_| RwLock::new(())).collect(),
        }
    }

    /// The end (exclusive, in blocks) of the window that starts at `block`.
    pub(super) fn window_end(block: u64) -> u64 {
        (block / LOCK_SPAN_BLOCKS + MAX_WINDOW_REGIONS) * LOCK_SPAN_BLOCKS
    }

    /// Locks blocks `[start, end)` for reading; `end <= window_end(start)`.
    pub(super) fn read(&self, start: u64, end: u64) -> WindowGuard<RwLockReadGuard<'_, ()>> {
        // A panic while a lock was held leaves no state behind it (the lock guards `()`).
        self.lock(start, end, |s| s.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Locks blocks `[start, end)` for writing; `end <= window_end(start)`.
    pub(super) fn write(&self, start: u64, end: u64) -> WindowGuard<RwLockWriteGuard<'_, ()>> {
        self.lock(start, end, |s| s.write().unwrap_or_else(|e| e.into_inner()))
    }

    fn lock<'a, G>(
        &'a self,
        start: u64,
        end: u64,
        take: impl Fn(&'a RwLock<()>) -> G,
    ) -> WindowGuard<G> {
        let mut guards: [Option<G>; MAX_WINDOW_REGIONS as usize] = std::array::from_fn(|_| None);
        let first = start / LOCK_SPAN_BLOCKS;
        let last = (end.max(start + 1) - 1) / LOCK_SPAN_BLOCKS;
        let count = ((last - first + 1) as usize).min(guards.len());
        for (slot, stripe) in guards.iter_mut().zip(ascending_stripes(first, count)) {
            *slot = Some(take(&self.stripes[stripe]));
        }
        WindowGuard { _guards: guards }
    }
}

/// The stripes of `count` consecutive regions from `first`, in ascending order (the
/// regions wrap around the stripe table at most once, since `count < LOCK_STRIPES`).
fn ascending_stripes(first: u64, count: usize) -> impl Iterator<Item = usize> {
    let start = (first % LOCK_STRIPES as u64) as usize;
    let wrapped = (start + count).saturating_sub(LOCK_STRIPES);
    (0..wrapped).chain(start..(start + count).min(LOCK_STRIPES))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stripes_are_ascending_and_distinct() {
        let s: Vec<_> = ascending_stripes(3, 4).collect();
        assert_eq!(s, vec![3, 4, 5, 6]);
        let s: Vec<_> = ascending_stripes(LOCK_STRIPES as u64 - 2, 5).collect();
        assert_eq!(s, vec![0, 1, 2, LOCK_STRIPES - 2, LOCK_STRIPES - 1]);
        let s: Vec<_> = ascending_stripes(5 * LOCK_STRIPES as u64 + 1, 1).collect();
        assert_eq!(s, vec![1]);
    }

    #[test]
    fn windows_lock_their_regions() {
        let locks = RegionLocks::new();
        assert_eq!(
            RegionLocks::window_end(0),
            MAX_WINDOW_REGIONS * LOCK_SPAN_BLOCKS
        );
        assert_eq!(
            RegionLocks::window_end(17),
            (MAX_WINDOW_REGIONS + 1) * LOCK_SPAN_BLOCKS
        );
        let end = RegionLocks::window_end(5);
        let read = locks.read(5, end);
        // Readers share; a writer of a region inside the window must wait.
        let again = locks.read(5, 6);
        assert!(locks.stripes[0].try_write().is_err());
        drop((read, again));
        let write = locks.write(20, 21);
        assert!(locks.stripes[1].try_read().is_err());
        assert!(locks.stripes[0].try_read().is_ok());
        drop(write);
        assert!(locks.stripes[1].try_write().is_ok());
    }
}
