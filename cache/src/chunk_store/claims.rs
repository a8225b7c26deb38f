//! Claims on chunks (see [`crate::pins`]): what READY replicas and unfinished uploads
//! keep from eviction, and what of a set of chunks is local.

use super::ChunkStore;
use crate::digest::Digest;

impl ChunkStore {
    /// Claims each of `digests` for `owner` (see [`crate::pins`]): kept from eviction
    /// until the owner lets go. Returns how many of them are not local (claimed all
    /// the same: the claim holds when they arrive). Claims are taken before presence
    /// is looked at, so no eviction comes between the two.
    pub fn pin(&self, owner: &str, digests: impl IntoIterator<Item = Digest>) -> usize {
        let mut index = self.index();
        let mut absent = 0;
        for digest in digests {
            index.pins.pin(owner, digest);
            if !index.lru.contains(&digest) {
                absent += 1;
            }
        }
        absent
    }

    /// Drops `owner`'s claim on one chunk (it stays cached, evictable).
    pub fn unpin(&self, owner: &str, digest: &Digest) {
        let mut index = self.index();
        if index.pins.unpin(owner, digest) {
            let doomed = self.evict_over_budget(&mut index);
            drop(index);
            self.unlink(doomed);
        }
    }

    /// Drops every claim of `owner`; returns how many there were.
    pub fn release(&self, owner: &str) -> usize {
        let mut index = self.index();
        let released = index.pins.release(owner);
        if released > 0 {
            let doomed = self.evict_over_budget(&mut index);
            drop(index);
            self.unlink(doomed);
        }
        released
    }

    /// Chunks `owner` holds claims on.
    pub fn held_by(&self, owner: &str) -> usize {
        self.index().pins.held_by(owner)
    }

    /// How many of `digests` are local, with their bytes (a digest repeated counts at
    /// each place). Counted under one lock.
    pub fn count_local(&self, digests: impl IntoIterator<Item = Digest>) -> (usize, u64) {
        let index = self.index();
        digests
            .into_iter()
            .filter_map(|d| index.lru.peek(&d).map(|e| e.len))
            .fold((0, 0), |(n, bytes), len| (n + 1, bytes + len))
    }

    /// The distinct digests of `digests` that are local, sorted, under one look at the
    /// index.
    pub fn local_of(&self, digests: impl IntoIterator<Item = Digest>) -> Vec<Digest> {
        let index = self.index();
        let mut local: Vec<Digest> = digests
            .into_iter()
            .filter(|d| index.lru.peek(d).is_some())
            .collect();
        drop(index);
        local.sort();
        local.dedup();
        local
    }

    /// Bytes of pinned chunks.
    pub fn pinned_bytes(&self) -> u64 {
        let index = self.index();
        index
            .lru
            .iter()
            .filter(|(d, _)| index.pins.is_pinned(d))
            .map(|(_, e)| e.len)
            .sum()
    }
}
