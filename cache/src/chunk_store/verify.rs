//! Reading chunk files back: a file this daemon did not write is hashed at its first
//! open and dropped when its bytes do not match its name; a scrub hashes them all (and
//! checks the kept stored forms, `stored_form`).

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::index::close_idle_files;
use super::{ChunkFile, ChunkStore, ChunkStoreError, MAX_OPEN_CHUNK_FILES};
use crate::digest::Digest;

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

/// Buffer for hashing a chunk file: large enough for few system calls, small enough
/// that a scrub holds little memory.
pub(super) const VERIFY_BUFFER: usize = 256 << 10;

impl ChunkStore {
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

    /// Opens a local chunk for reading and marks it recently used; `None` if absent (or
    /// found corrupt on its first open, and dropped). The first open of a file this
    /// daemon did not write hashes it, outside the index lock.
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
    pub(super) fn drop_corrupt(&self, digest: &Digest) {
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
    /// their names, then checks the kept stored forms likewise. `progress` is called after each chunk with (bytes done, bytes in all).
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
}

/// Whether `file` holds exactly `len` bytes that hash to `digest`.
pub(super) fn file_matches(file: &File, digest: &Digest, len: u64) -> io::Result<bool> {
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
