//! What the node keeps in memory of chunks read in part ([`crate::partial`]): verified
//! blocks by their sha256, and each chunk's stored layout (its table, or that it has
//! none) with how it has been read, both in least-recently-used sets bounded by weight.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use lru::LruCache;

use crate::blocks::BlockTable;
use crate::digest::Digest;

/// Memory for verified blocks of partly read chunks: 16 MiB (2,048 blocks of 8 KiB),
/// counted in bytes.
pub const BLOCK_CACHE_BYTES: usize = 16 << 20;
/// Offsets of chunk tables kept in memory: 512 Ki (4 MiB; about 4,000 tables of 1 MiB
/// chunks in 8 KiB blocks).
pub const TABLE_OFFSETS_KEPT: usize = 512 << 10;
/// Reads of a chunk in a row, each starting where the last ended, after which the next
/// read fetches it whole: a reader going through it in small steps.
pub const SEQUENTIAL_READS: usize = 4;

/// What the cache knows of one chunk's stored layout, and how it has been read.
pub(crate) struct Layout {
    /// `None`: the chunk is not stored in blocks (read it whole).
    pub(crate) table: Option<BlockTable>,
    /// Blocks of it fetched in pieces so far.
    pub(crate) fetched: AtomicUsize,
    /// Where the last read of it ended, and how many reads in a row began there.
    last_end: AtomicU64,
    run: AtomicUsize,
}

impl Layout {
    /// Records a read of `offset..end`; whether the chunk is being read in sequence.
    pub(crate) fn sequential(&self, offset: u64, end: u64) -> bool {
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
    pub(crate) fn block(&self, hash: &[u8]) -> Option<Bytes> {
        let key: [u8; 32] = hash.try_into().ok()?;
        self.blocks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
    }

    pub(crate) fn keep(&self, hash: &[u8], bytes: Bytes) {
        let Ok(key) = <[u8; 32]>::try_from(hash) else {
            return;
        };
        let len = bytes.len();
        self.blocks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .put(key, bytes, len);
    }

    pub(crate) fn layout(&self, digest: &Digest) -> Option<Arc<Layout>> {
        self.layouts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(digest)
    }

    pub(crate) fn keep_layout(&self, digest: &Digest, table: Option<BlockTable>) -> Arc<Layout> {
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
}
