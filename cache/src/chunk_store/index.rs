//! The chunk index: every chunk on disk in least-recently-used order with its open
//! file, what is verified and synced, the claims on it; and eviction, which takes
//! chunks out of the index under its lock and unlinks their files after it (a chunk's
//! kept stored form with it).

use std::fs::{self, File};
use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard};

use lru::LruCache;

use super::{ChunkStore, MAX_OPEN_CHUNK_FILES};
use crate::digest::Digest;
use crate::encoding::Encoding;
use crate::pins::Pins;

/// The locked index. Fields drop in order: the lock is released before the thread may
/// become SCHED_IDLE again.
pub(super) struct IndexGuard<'a> {
    pub(super) guard: MutexGuard<'a, Index>,
    pub(super) _foreground: crate::background::Foreground,
}

impl std::ops::Deref for IndexGuard<'_> {
    type Target = Index;
    fn deref(&self) -> &Index {
        &self.guard
    }
}

impl std::ops::DerefMut for IndexGuard<'_> {
    fn deref_mut(&mut self) -> &mut Index {
        &mut self.guard
    }
}

/// What the index knows of one chunk on disk.
pub(super) struct Entry {
    pub(super) len: u64,
    /// The open file, shared with readers; a strong count above one means a read is
    /// under way, which protects the chunk from eviction.
    pub(super) file: Option<Arc<File>>,
    /// Whether this daemon has checked (or written) the file's bytes: a file found on
    /// disk at start is hashed when first opened.
    pub(super) verified: bool,
    /// Whether the file's bytes are known to be on disk (fsynced by this daemon). A file
    /// found at start is not known to be: the daemon may have died before the kernel
    /// wrote it back.
    pub(super) synced: bool,
    /// The chunk's stored form kept beside it, if any (see `stored_form`).
    pub(super) stored: Option<Kept>,
}

impl Entry {
    /// Bytes the chunk takes on disk: its file and its stored form.
    pub(super) fn disk_len(&self) -> u64 {
        self.len + self.stored.as_ref().map_or(0, |k| k.len)
    }
}

/// What the index knows of a chunk's kept stored form (see `stored_form`).
#[derive(Clone, Copy, Debug)]
pub(super) struct Kept {
    pub(super) len: u64,
    pub(super) encoding: Encoding,
    /// Encoded by this node, not fetched: it may differ from the store's object.
    pub(super) made_here: bool,
    /// Written or checked by this daemon (else hashed at its first open).
    pub(super) verified: bool,
}

pub(super) struct Index {
    /// Every chunk on disk, most recently used first. Unbounded: the byte budget, not
    /// the entry count, decides eviction.
    pub(super) lru: LruCache<Digest, Entry>,
    pub(super) used: u64,
    pub(super) open_files: usize,
    /// Who needs which chunks kept (READY replicas, pending uploads). Claims outlive a
    /// chunk dropped as corrupt, so they hold again for the copy fetched next.
    pub(super) pins: Pins,
    /// Bumped at every insert and delete, so that counts of what is local can be kept
    /// until something changes.
    pub(super) generation: u64,
    /// Chunks gone from the index whose files are being unlinked, outside the lock. A
    /// new copy of one waits for that before taking its name.
    pub(super) dying: std::collections::HashSet<Digest>,
}

impl Index {
    /// Takes a chunk's entry out, with the byte, open-file and generation counts.
    pub(super) fn forget(&mut self, digest: &Digest) -> Option<Entry> {
        let gone = self.lru.pop(digest)?;
        self.used -= gone.disk_len();
        self.generation += 1;
        if gone.file.is_some() {
            self.open_files -= 1;
        }
        Some(gone)
    }
}

/// A chunk taken out of the index, whose file is still to be unlinked.
pub(super) type Doomed = (Digest, Entry);

impl ChunkStore {
    /// Bumped at every insert and delete: a count of what is local stays right while
    /// this does not move.
    pub fn generation(&self) -> u64 {
        self.index().generation
    }

    /// Deletes a chunk now unless it is pinned or being read. Returns whether it went.
    pub fn remove(&self, digest: &Digest) -> bool {
        let mut index = self.index();
        let removable =
            index.lru.peek(digest).is_some_and(|e| !in_use(e)) && !index.pins.is_pinned(digest);
        if removable {
            let doomed: Vec<_> = self.delete(&mut index, digest).into_iter().collect();
            drop(index);
            self.unlink(doomed);
        }
        removable
    }

    /// Takes a chunk out of the index; its file is to be unlinked by [`Self::unlink`]
    /// once the lock is released (an unlink can take a while: the last link of a
    /// 1 MiB file frees its blocks, and every cached read waits for this lock).
    pub(super) fn delete(&self, index: &mut Index, digest: &Digest) -> Option<Doomed> {
        let gone = index.forget(digest)?;
        index.dying.insert(*digest);
        Some((*digest, gone))
    }

    /// Unlinks the files of chunks taken out of the index, outside its lock.
    pub(super) fn unlink(&self, doomed: Vec<Doomed>) {
        if doomed.is_empty() {
            return;
        }
        let mut digests = Vec::with_capacity(doomed.len());
        for (digest, entry) in doomed {
            // The entry's open file (if any) closes first, while the name still holds
            // the inode: the close is cheap, and the unlink frees it.
            let kept = entry.stored;
            drop(entry.file);
            let _ = fs::remove_file(self.chunk_path(&digest));
            if let Some(kept) = kept {
                self.remove_stored_file(&digest, kept);
            }
            self.evictions.fetch_add(1, Ordering::Relaxed);
            digests.push(digest);
        }
        let mut index = self.index();
        for digest in &digests {
            index.dying.remove(digest);
        }
    }

    /// Waits until no unlink of `digest`'s old file is under way, so that a new copy's
    /// name is not unlinked behind it. Runs on a blocking thread (an insert); the wait
    /// is one unlink.
    pub(super) fn wait_unlinked(&self, digest: &Digest) {
        while self.index().dying.contains(digest) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// Chooses chunks to evict until the cache is within budget and takes them out of
    /// the index; the caller unlinks them with [`Self::unlink`] after releasing it.
    #[must_use]
    pub(super) fn evict_over_budget(&self, index: &mut Index) -> Vec<Doomed> {
        if self.budget == 0 || index.used <= self.budget {
            return Vec::new();
        }
        let mut victims = Vec::new();
        let mut excess = index.used - self.budget;
        for (digest, entry) in index.lru.iter().rev() {
            if excess == 0 {
                break;
            }
            if !in_use(entry) && !index.pins.is_pinned(digest) {
                victims.push(*digest);
                excess = excess.saturating_sub(entry.disk_len());
            }
        }
        let doomed = victims
            .iter()
            .filter_map(|digest| self.delete(index, digest))
            .collect();
        if index.used > self.budget {
            tracing::debug!(
                used = index.used,
                budget = self.budget,
                "cache over budget: the rest is pinned or being read"
            );
        }
        doomed
    }
}

pub(super) fn in_use(entry: &Entry) -> bool {
    entry
        .file
        .as_ref()
        .is_some_and(|f| Arc::strong_count(f) > 1)
}

/// Closes the open files of the least recently used chunks that nobody reads.
pub(super) fn close_idle_files(index: &mut Index) {
    let target = MAX_OPEN_CHUNK_FILES * 3 / 4;
    let mut closed = 0;
    let excess = index.open_files.saturating_sub(target);
    for (_, entry) in index.lru.iter_mut().rev() {
        if closed >= excess {
            break;
        }
        if entry.file.is_some() && !in_use(entry) {
            entry.file = None;
            closed += 1;
        }
    }
    index.open_files -= closed;
}
