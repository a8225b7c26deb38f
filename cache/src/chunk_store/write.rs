//! Writing chunk files: to `tmp/`, then renamed into `chunks/`; a commit's chunk is
//! durable when its insert returns, a fetched one when a fill's `make_durable` names it.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::index::Entry;
use super::{sync_dir, ChunkFile, ChunkStore, ChunkStoreError};
use crate::digest::Digest;

/// Whether a chunk's name must be durable when its insert returns.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Durable {
    /// The node's only copy (a commit's chunk): its bytes and its directory are fsynced
    /// at once.
    Now,
    /// A fetched chunk: a lost one costs a fetch; see [`ChunkStore::make_durable`].
    Later,
}

/// A chunk file is written in pieces of this size: each write(2) returns to user space,
/// where the kernel may preempt a background writer for a reader that woke up.
pub(super) const WRITE_PIECE: usize = 32 << 10;

impl ChunkStore {
    /// Writes a fetched, verified chunk and indexes it. Its write-back is started, not
    /// waited for: it is durable after the next [`ChunkStore::make_durable`] that names
    /// it. The caller has checked that `bytes` hash to `digest`.
    pub fn insert(&self, digest: &Digest, bytes: &[u8]) -> Result<ChunkFile, ChunkStoreError> {
        self.insert_with(digest, bytes, Durable::Later)
    }

    /// Like [`ChunkStore::insert`], with `owner`'s claim on the chunk taken before the
    /// write, so that no eviction can come between the write and the pin (a commit's
    /// new chunks, whose only copy is this one).
    pub fn insert_pinned(
        &self,
        owner: &str,
        digest: &Digest,
        bytes: &[u8],
    ) -> Result<ChunkFile, ChunkStoreError> {
        let claimed = self.index().pins.pin(owner, *digest);
        let written = self.insert_with(digest, bytes, Durable::Now);
        if written.is_err() && claimed {
            self.unpin(owner, digest);
        }
        written
    }

    fn insert_with(
        &self,
        digest: &Digest,
        bytes: &[u8],
        durable: Durable,
    ) -> Result<ChunkFile, ChunkStoreError> {
        let final_path = self.chunk_path(digest);
        let write_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ChunkStoreError::Write {
                digest: *digest,
                path,
                source,
            }
        };
        if let Some(existing) = self.get(digest)? {
            if durable == Durable::Now {
                // Fetched earlier, it may not be durable yet; this copy must be.
                self.sync_by_name(digest).map_err(write_err(&final_path))?;
                self.mark_synced(digest);
                let shard = final_path.parent().unwrap_or(&self.root);
                sync_dir(shard).map_err(write_err(shard))?;
            }
            return Ok(existing);
        }
        // A chunk someone claims (a READY replica's, refetched after it was found
        // corrupt) is not waited for by any later fill: it is made durable now.
        let durable = if durable == Durable::Later && self.index().pins.is_pinned(digest) {
            Durable::Now
        } else {
            durable
        };
        let seq = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let tmp_path =
            self.root
                .join("tmp")
                .join(format!("{}.{}.{seq}", digest.to_hex(), std::process::id()));
        let written = (|| -> io::Result<()> {
            let mut f = File::create(&tmp_path)?;
            for piece in bytes.chunks(WRITE_PIECE) {
                f.write_all(piece)?;
            }
            match durable {
                Durable::Now => f.sync_data()?,
                // The disk starts on it now, so that the wait at READY is short; a fill
                // does not hold a fetch slot while the disk catches up.
                Durable::Later => start_write_back(&f),
            }
            Ok(())
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp_path);
            return Err(write_err(&tmp_path)(e));
        }
        let shard = final_path.parent().unwrap_or(&self.root).to_path_buf();
        fs::create_dir_all(&shard).map_err(write_err(&shard))?;
        self.wait_unlinked(digest);
        if let Err(e) = fs::rename(&tmp_path, &final_path) {
            let _ = fs::remove_file(&tmp_path);
            return Err(write_err(&final_path)(e));
        }
        // A commit's chunk: its bytes are on disk before the rename, and the rename is
        // durable once the directory is, at once. A fetched one: both at the next
        // `make_durable` (a fill's end) or the kernel's own write-back; a crash before
        // that loses the chunk or leaves its name on a file short of it, which the
        // hash at its first open after the restart finds (see the module header).
        if durable == Durable::Now {
            sync_dir(&shard).map_err(write_err(&shard))?;
        }
        let file = Arc::new(File::open(&final_path).map_err(write_err(&final_path))?);
        let len = bytes.len() as u64;
        let mut index = self.index();
        index.generation += 1;
        if let Some(prev) = index.lru.put(
            *digest,
            Entry {
                len,
                file: Some(file.clone()),
                verified: true,
                synced: durable == Durable::Now,
                stored: None,
            },
        ) {
            // Lost a race with another writer of the same digest: same bytes. Its
            // stored form, if any, is counted no more; the next keep writes it again.
            index.used -= prev.disk_len();
            if prev.file.is_some() {
                index.open_files -= 1;
            }
        }
        index.used += len;
        index.open_files += 1;
        let doomed = self.evict_over_budget(&mut index);
        drop(index);
        self.unlink(doomed);
        Ok(ChunkFile {
            digest: *digest,
            file,
            len,
        })
    }

    /// Makes `digests` durable under their names (a replica before READY, its chunks
    /// claimed so none is evicted meanwhile). Each one not known to be on disk is
    /// fsynced by its name (most were written back while the fill ran); one this daemon
    /// did not write or check is hashed first, as its first read would: after a crash
    /// its name may stand on a file short of its bytes, which is dropped here, not
    /// promised as local. Then each shard directory (256 at most) and the chunk
    /// directory are fsynced, once for the whole set instead of once per chunk. Returns
    /// how many were dropped (to be fetched again); digests not local are passed over.
    /// Blocking.
    pub fn make_durable(
        &self,
        digests: impl IntoIterator<Item = Digest>,
    ) -> Result<usize, ChunkStoreError> {
        let unsynced: Vec<(Digest, bool)> = {
            let index = self.index();
            digests
                .into_iter()
                .filter_map(|d| {
                    let entry = index.lru.peek(&d).filter(|e| !e.synced)?;
                    Some((d, entry.verified))
                })
                .collect()
        };
        let mut dropped = 0;
        for (digest, verified) in unsynced {
            if !verified && self.get(&digest)?.is_none() {
                dropped += 1;
                continue;
            }
            match self.sync_by_name(&digest) {
                Ok(()) => self.mark_synced(&digest),
                // Evicted meanwhile (not claimed): nothing to keep.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(ChunkStoreError::Write {
                        digest,
                        path: self.chunk_path(&digest),
                        source,
                    })
                }
            }
        }
        self.sync_dirs()?;
        Ok(dropped)
    }

    /// fsyncs the bytes of the file under a chunk's name: the one that must be on disk,
    /// whichever file the index holds open.
    fn sync_by_name(&self, digest: &Digest) -> io::Result<()> {
        File::open(self.chunk_path(digest)).and_then(|f| f.sync_data())
    }

    /// Records that the file under a chunk's name has its bytes on disk.
    fn mark_synced(&self, digest: &Digest) {
        if let Some(entry) = self.index().lru.peek_mut(digest) {
            entry.synced = true;
        }
    }

    /// Whether the chunk's bytes are known to be on disk.
    #[cfg(test)]
    pub(crate) fn is_synced(&self, digest: &Digest) -> bool {
        self.index().lru.peek(digest).is_some_and(|e| e.synced)
    }

    /// fsyncs each shard directory and the chunk directory.
    fn sync_dirs(&self) -> Result<(), ChunkStoreError> {
        let chunks = self.root.join("chunks");
        let dir_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ChunkStoreError::Dir { path, source }
        };
        for shard in fs::read_dir(&chunks).map_err(dir_err(&chunks))?.flatten() {
            let path = shard.path();
            sync_dir(&path).map_err(dir_err(&path))?;
        }
        sync_dir(&chunks).map_err(dir_err(&chunks))
    }
}

/// Starts writing a file's dirty pages to disk without waiting for them
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`), so that a later fsync finds little left
/// to do. Only a hint: where it is refused, the kernel's own write-back does the same.
/// It may still wait while the device's queue is full (it runs off the runtime).
pub(super) fn start_write_back(file: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid open descriptor; the call touches no memory of ours.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}
