//! Chunk files on the node's disk: content-addressed, crash-safe, budgeted.
//!
//! Layout under the cache directory: `chunks/<2 hex>/<64 hex>` holds verified chunks;
//! `tmp/` holds chunks being written, and is emptied at open. A chunk is written to
//! `tmp/` and renamed into `chunks/`. A chunk only this node has (a commit's) is made
//! durable before its insert returns: its bytes are fsynced before the rename and its
//! directory after it. A fetched chunk is not waited for one at a time: its write-back
//! is started, and [`ChunkStore::make_durable`] waits for its bytes and names once for a
//! whole replica (a fill, before READY). A crash before that may leave a fetched chunk's
//! name on a file short of its bytes; such a file is hashed when it is first opened
//! after the restart (see below), found wrong and fetched again, which is all a lost
//! fetched chunk costs.
//!
//! The store keeps an index of every chunk in least-recently-used order. When the bytes
//! held pass the budget, the least recently used chunks that are neither pinned (by a
//! READY replica or an unfinished upload) nor being read are deleted: taken out of the
//! index under its lock, their files unlinked after it is released (every cached read
//! takes that lock), and a new copy of one waits for its old file's unlink before it
//! takes the name.
//!
//! Bytes on the node's own disk are not trusted blindly: a chunk file this daemon did
//! not write is hashed the first time it is opened (after a restart, say), and a file
//! whose bytes do not match its name is deleted, counted and reported as absent, so the
//! caller fetches it again. [`ChunkStore::scrub`] checks every file on demand.
//!
//! A chunk may also keep its stored form (the encoded bytes it came as from the store,
//! for serving peers): `stored/<2 hex>/<64 hex>.<encoding>`, counted in the budget with
//! its chunk and deleted with it (`stored_form`).
//!
//! Layout: this file opens the store and answers what it holds; `index` is the
//! least-recently-used index and eviction; `write` writes chunk files and makes them
//! durable; `verify` opens them for reading, hashing on first open, and scrubs;
//! `claims` pins chunks for their owners; `stored_form` keeps, serves and checks the
//! stored forms beside their chunks; `file` is [`ChunkFile`], one open chunk.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use lru::LruCache;

use crate::digest::Digest;
use crate::pins::Pins;

mod claims;
mod file;
mod index;
mod stored_form;
mod verify;
mod write;
pub use file::{file_resident, ChunkFile};
use index::{Entry, Index, IndexGuard};
pub use stored_form::StoredForm;
pub use verify::ScrubReport;

/// How many chunk files stay open for reading at once. An open file saves an `open`
/// per read on the hot path; the bound keeps the daemon under its file limit (the daemon
/// raises RLIMIT_NOFILE well above this at start).
pub const MAX_OPEN_CHUNK_FILES: usize = 4096;

/// A failure of the chunk files on local disk.
#[derive(Debug, thiserror::Error)]
pub enum ChunkStoreError {
    /// The cache directory cannot be used.
    #[error("cache directory {path}: {source}")]
    Dir { path: PathBuf, source: io::Error },
    /// Writing chunk {digest} failed (disk full, I/O error).
    #[error("writing chunk {digest} to {path}: {source}")]
    Write {
        digest: Digest,
        path: PathBuf,
        source: io::Error,
    },
    /// Reading chunk {digest} failed.
    #[error("reading chunk {digest}: {source}")]
    Read { digest: Digest, source: io::Error },
}

/// The node's content-addressed chunk files.
pub struct ChunkStore {
    root: PathBuf,
    /// Bytes the chunks may take; 0 means no limit.
    budget: u64,
    index: Mutex<Index>,
    /// Chunks deleted to stay within the budget, for metrics.
    evictions: AtomicU64,
    /// Chunk files found corrupt on disk and dropped, for metrics.
    corrupt: AtomicU64,
    /// Names temporary files uniquely among concurrent writers.
    tmp_seq: AtomicU64,
}

impl ChunkStore {
    /// Opens (creating if needed) the cache at `root`, indexes the chunks already there
    /// and removes unfinished temporary files.
    pub fn open(root: &Path, budget: u64) -> Result<ChunkStore, ChunkStoreError> {
        let dir_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ChunkStoreError::Dir { path, source }
        };
        let chunks = root.join("chunks");
        let tmp = root.join("tmp");
        fs::create_dir_all(&chunks).map_err(dir_err(&chunks))?;
        fs::create_dir_all(&tmp).map_err(dir_err(&tmp))?;
        for entry in fs::read_dir(&tmp).map_err(dir_err(&tmp))?.flatten() {
            let _ = fs::remove_file(entry.path());
        }
        let mut found = Vec::new();
        for shard in fs::read_dir(&chunks).map_err(dir_err(&chunks))?.flatten() {
            let Ok(files) = fs::read_dir(shard.path()) else {
                continue;
            };
            for file in files.flatten() {
                let name = file.file_name();
                let Some(digest) = name.to_str().and_then(|n| n.parse::<Digest>().ok()) else {
                    continue;
                };
                if let Ok(meta) = file.metadata() {
                    let used = meta.accessed().or_else(|_| meta.modified()).ok();
                    found.push((used, digest, meta.len()));
                }
            }
        }
        // Oldest first, so that the most recently used ends at the front of the LRU.
        found.sort();
        let mut lru = LruCache::unbounded();
        let mut used = 0;
        for (_, digest, len) in found {
            used += len;
            lru.put(
                digest,
                Entry {
                    len,
                    file: None,
                    verified: false,
                    synced: false,
                    stored: None,
                },
            );
        }
        used += stored_form::index_found(root, &mut lru);
        Ok(ChunkStore {
            root: root.to_path_buf(),
            budget,
            index: Mutex::new(Index {
                lru,
                used,
                open_files: 0,
                pins: Pins::default(),
                generation: 0,
                dying: Default::default(),
            }),
            evictions: AtomicU64::new(0),
            corrupt: AtomicU64::new(0),
            tmp_seq: AtomicU64::new(0),
        })
    }

    fn index(&self) -> IndexGuard<'_> {
        // Not SCHED_IDLE while waiting for or holding the lock (see `Foreground`).
        let foreground = crate::background::foreground();
        // A panic while holding the lock leaves a consistent index (every update is a
        // single statement), so a poisoned lock is still usable.
        IndexGuard {
            guard: self.index.lock().unwrap_or_else(|e| e.into_inner()),
            _foreground: foreground,
        }
    }

    fn chunk_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("chunks").join(digest.shard_path())
    }

    /// Whether the chunk is on disk (does not count as a use).
    pub fn contains(&self, digest: &Digest) -> bool {
        self.index().lru.contains(digest)
    }

    /// Bytes of chunks on disk.
    pub fn used_bytes(&self) -> u64 {
        self.index().used
    }

    /// Number of chunks on disk.
    pub fn chunk_count(&self) -> usize {
        self.index().lru.len()
    }

    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Chunks deleted to stay within the budget or by request, since start.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    /// Chunk files found corrupt on disk (and dropped) since start.
    pub fn corrupt_files(&self) -> u64 {
        self.corrupt.load(Ordering::Relaxed)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
}

use crate::durable::sync_dir;

#[cfg(test)]
mod tests;
