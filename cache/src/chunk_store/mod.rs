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
//! takes the name. `file` holds [`ChunkFile`], one open chunk.
//!
//! Bytes on the node's own disk are not trusted blindly: a chunk file this daemon did
//! not write is hashed the first time it is opened (after a restart, say), and a file
//! whose bytes do not match its name is deleted, counted and reported as absent, so the
//! caller fetches it again. [`ChunkStore::scrub`] checks every file on demand.
//!
//! A chunk may also keep its stored form (the encoded bytes it came as from the store,
//! for serving peers): `stored/<2 hex>/<64 hex>.<encoding>`, counted in the budget with
//! its chunk and deleted with it (`stored_form`).

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use lru::LruCache;

use crate::digest::Digest;
use crate::pins::Pins;

mod file;
mod stored_form;
pub use file::{file_resident, ChunkFile};
use stored_form::Kept;
pub use stored_form::StoredForm;

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

/// What [`ChunkStore::scrub`] found.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct ScrubReport {
    /// Chunk files hashed.
    pub checked: usize,
    /// Bytes hashed.
    pub bytes: u64,
    /// Chunks whose bytes did not match their name; deleted (fetched again on demand).
    pub dropped: Vec<String>,
    /// Chunks that could not be read (an I/O error); left in place.
    pub unreadable: Vec<String>,
}

/// The locked index. Fields drop in order: the lock is released before the thread may
/// become SCHED_IDLE again.
struct IndexGuard<'a> {
    guard: MutexGuard<'a, Index>,
    _foreground: crate::background::Foreground,
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
struct Entry {
    len: u64,
    /// The open file, shared with readers; a strong count above one means a read is
    /// under way, which protects the chunk from eviction.
    file: Option<Arc<File>>,
    /// Whether this daemon has checked (or written) the file's bytes: a file found on
    /// disk at start is hashed when first opened.
    verified: bool,
    /// Whether the file's bytes are known to be on disk (fsynced by this daemon). A file
    /// found at start is not known to be: the daemon may have died before the kernel
    /// wrote it back.
    synced: bool,
    /// The chunk's stored form kept beside it, if any (see `stored_form`).
    stored: Option<Kept>,
}

impl Entry {
    /// Bytes the chunk takes on disk: its file and its stored form.
    fn disk_len(&self) -> u64 {
        self.len + self.stored.as_ref().map_or(0, |k| k.len)
    }
}

struct Index {
    /// Every chunk on disk, most recently used first. Unbounded: the byte budget, not
    /// the entry count, decides eviction.
    lru: LruCache<Digest, Entry>,
    used: u64,
    open_files: usize,
    /// Who needs which chunks kept (READY replicas, pending uploads). Claims outlive a
    /// chunk dropped as corrupt, so they hold again for the copy fetched next.
    pins: Pins,
    /// Bumped at every insert and delete, so that counts of what is local can be kept
    /// until something changes.
    generation: u64,
    /// Chunks gone from the index whose files are being unlinked, outside the lock. A
    /// new copy of one waits for that before taking its name.
    dying: std::collections::HashSet<Digest>,
}

impl Index {
    /// Takes a chunk's entry out, with the byte, open-file and generation counts.
    fn forget(&mut self, digest: &Digest) -> Option<Entry> {
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
type Doomed = (Digest, Entry);

/// Whether a chunk's name must be durable when its insert returns.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Durable {
    /// The node's only copy (a commit's chunk): its bytes and its directory are fsynced
    /// at once.
    Now,
    /// A fetched chunk: a lost one costs a fetch; see [`ChunkStore::make_durable`].
    Later,
}

/// A chunk file is written in pieces of this size: each write(2) returns to user space,
/// where the kernel may preempt a background writer for a reader that woke up.
const WRITE_PIECE: usize = 32 << 10;

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

    /// Opens a local chunk for reading and marks it recently used; `None` if absent (or
    /// found corrupt on its first open, and dropped). The first open of a file this
    /// daemon did not write hashes it, outside the index lock.
    /// The local chunk when its file is open already (and so verified), marked recently
    /// used; `None` otherwise, without touching the disk: for callers that must not
    /// wait, which then go through [`ChunkStore::get`].
    pub fn get_open(&self, digest: &Digest) -> Option<ChunkFile> {
        let mut index = self.index();
        let entry = index.lru.get_mut(digest).filter(|e| e.verified)?;
        let file = entry.file.clone()?;
        Some(ChunkFile {
            digest: *digest,
            file,
            len: entry.len,
        })
    }

    pub fn get(&self, digest: &Digest) -> Result<Option<ChunkFile>, ChunkStoreError> {
        let (len, verified) = {
            let mut index = self.index();
            let Some(entry) = index.lru.get_mut(digest) else {
                return Ok(None);
            };
            if let Some(file) = &entry.file {
                return Ok(Some(ChunkFile {
                    digest: *digest,
                    file: file.clone(),
                    len: entry.len,
                }));
            }
            (entry.len, entry.verified)
        };
        let read_err = |source| ChunkStoreError::Read {
            digest: *digest,
            source,
        };
        let file = match File::open(self.chunk_path(digest)) {
            Ok(f) => Arc::new(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // Removed behind our back (an operator cleaning up): forget it.
                self.index().forget(digest);
                return Ok(None);
            }
            Err(source) => return Err(read_err(source)),
        };
        if !verified && !file_matches(&file, digest, len).map_err(read_err)? {
            self.drop_corrupt(digest);
            return Ok(None);
        }
        let mut index = self.index();
        let Some(entry) = index.lru.peek_mut(digest) else {
            // Evicted or dropped while we hashed it.
            return Ok(None);
        };
        entry.verified = true;
        if let Some(existing) = &entry.file {
            // Another reader opened it meanwhile; share that one.
            return Ok(Some(ChunkFile {
                digest: *digest,
                file: existing.clone(),
                len,
            }));
        }
        entry.file = Some(file.clone());
        index.open_files += 1;
        if index.open_files > MAX_OPEN_CHUNK_FILES {
            close_idle_files(&mut index);
        }
        Ok(Some(ChunkFile {
            digest: *digest,
            file,
            len,
        }))
    }

    /// Deletes a chunk file whose bytes do not match its name; its claims stay for the
    /// copy that will replace it.
    fn drop_corrupt(&self, digest: &Digest) {
        let mut index = self.index();
        let gone = index.forget(digest);
        let _ = fs::remove_file(self.chunk_path(digest));
        drop(index);
        if let Some(kept) = gone.and_then(|e| e.stored) {
            self.remove_stored_file(digest, kept);
        }
        self.corrupt.fetch_add(1, Ordering::Relaxed);
        tracing::error!(chunk = %digest, "cached chunk file does not match its digest; dropped, it will be fetched again");
    }

    /// Hashes every chunk file on disk and drops the ones whose bytes do not match
    /// their names, then checks the kept stored forms likewise. `progress` is called
    /// after each chunk with (bytes done, bytes in all).
    pub fn scrub(&self, mut progress: impl FnMut(u64, u64)) -> ScrubReport {
        let all: Vec<(Digest, u64)> = self.index().lru.iter().map(|(d, e)| (*d, e.len)).collect();
        let mut report = ScrubReport::default();
        let total: u64 = all.iter().map(|(_, len)| len).sum();
        for (digest, len) in &all {
            let checked =
                File::open(self.chunk_path(digest)).and_then(|f| file_matches(&f, digest, *len));
            match checked {
                Ok(true) => {
                    if let Some(e) = self.index().lru.peek_mut(digest) {
                        e.verified = true;
                    }
                }
                Ok(false) => {
                    self.drop_corrupt(digest);
                    report.dropped.push(digest.to_hex());
                }
                // Evicted between the listing and the check: nothing to verify.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(_) => report.unreadable.push(digest.to_hex()),
            }
            report.checked += 1;
            report.bytes += len;
            progress(report.bytes, total);
        }
        self.scrub_stored_forms();
        report
    }

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
    fn delete(&self, index: &mut Index, digest: &Digest) -> Option<Doomed> {
        let gone = index.forget(digest)?;
        index.dying.insert(*digest);
        Some((*digest, gone))
    }

    /// Unlinks the files of chunks taken out of the index, outside its lock.
    fn unlink(&self, doomed: Vec<Doomed>) {
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
    fn wait_unlinked(&self, digest: &Digest) {
        while self.index().dying.contains(digest) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// Chooses chunks to evict until the cache is within budget and takes them out of
    /// the index; the caller unlinks them with [`Self::unlink`] after releasing it.
    #[must_use]
    fn evict_over_budget(&self, index: &mut Index) -> Vec<Doomed> {
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

/// Buffer for hashing a chunk file: large enough for few system calls, small enough
/// that a scrub holds little memory.
const VERIFY_BUFFER: usize = 256 << 10;

/// Starts writing a file's dirty pages to disk without waiting for them
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`), so that a later fsync finds little left
/// to do. Only a hint: where it is refused, the kernel's own write-back does the same.
/// It may still wait while the device's queue is full (it runs off the runtime).
fn start_write_back(file: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid open descriptor; the call touches no memory of ours.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// fsyncs a directory (the names in it).
fn sync_dir(path: &Path) -> io::Result<()> {
    File::open(path).and_then(|d| d.sync_all())
}

/// Whether `file` holds exactly `len` bytes that hash to `digest`.
fn file_matches(file: &File, digest: &Digest, len: u64) -> io::Result<bool> {
    let mut hasher = crate::digest::DigestWriter::default();
    let mut buf = vec![0u8; VERIFY_BUFFER];
    let mut offset = 0u64;
    loop {
        let n = file.read_at(&mut buf, offset)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        offset += n as u64;
        if offset > len {
            return Ok(false);
        }
    }
    Ok(offset == len && hasher.finish() == *digest)
}

fn in_use(entry: &Entry) -> bool {
    entry
        .file
        .as_ref()
        .is_some_and(|f| Arc::strong_count(f) > 1)
}

/// Closes the open files of the least recently used chunks that nobody reads.
fn close_idle_files(index: &mut Index) {
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

#[cfg(test)]
mod tests;
