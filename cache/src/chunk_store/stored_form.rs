//! A chunk's stored form kept beside its decoded file: the encoded bytes it came as from
//! the store (zstd blocks or one zstd frame, DESIGN section 4), so that this node can
//! serve peers those bytes, streamed from a file, instead of the decoded chunk. Peer
//! links then carry what the store link carries.
//!
//! Why kept rather than made again when a peer asks: the bytes are in hand when the
//! chunk arrives (keeping them costs one write and, for a root file system, about 0.38x
//! the chunk's disk), while encoding again costs about 5 ms of a core per MiB at zstd's
//! level 3 on every chunk served, and yields bytes that may differ from the store's
//! object (another zstd version), whose block tables readers share between sources.
//! Only a fleet member keeps them, and only for chunks from the store or an origin
//! (about the chunks it owns, 1/N of a template): see `ChunkCache::with_stored_forms`.
//!
//! Layout: `stored/<2 hex>/<64 hex>.<encoding>` for the bytes as fetched (the store's
//! object byte for byte, so a peer may serve ranges of it that match the store's block
//! table), `<64 hex>.made.<encoding>` for a form this node encoded itself (served
//! whole only). A stored form counts in the cache's
//! budget with its chunk, goes when its chunk goes, and is never kept without it. One
//! this daemon did not write (found at start) is decoded and hashed the first time it
//! is opened, like a chunk file; a bad one is deleted (its chunk stays) and counted.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use lru::LruCache;

use super::index::{Entry, Kept};
use super::verify::VERIFY_BUFFER;
use super::write::{start_write_back, WRITE_PIECE};
use super::{ChunkFile, ChunkStore, ChunkStoreError};
use crate::digest::Digest;
use crate::encoding::{Encoding, StoredVerifier};

/// Where the stored forms live under the cache directory.
const STORED_DIR: &str = "stored";
/// The name part of a form encoded here (between the digest and the encoding).
const MADE_HERE: &str = "made.";

/// A chunk's stored form, open for streaming to a peer. The chunk's own file rides
/// along: while this lives, neither is evicted.
#[derive(Debug)]
pub struct StoredForm {
    pub chunk: ChunkFile,
    pub file: File,
    /// Bytes of the stored form (smaller than the chunk).
    pub len: u64,
    pub encoding: Encoding,
    /// The bytes as fetched from the store or an origin (its object, byte for byte),
    /// not encoded here: ranges of it match the store's block table.
    pub as_fetched: bool,
}

impl StoredForm {
    /// Reads `buf.len()` bytes at `offset` of the stored form.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), ChunkStoreError> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|source| ChunkStoreError::Read {
                digest: self.chunk.digest,
                source,
            })
    }
}

/// Indexes the stored forms found at start beside the chunks found (`lru`), deleting
/// those without their chunk or with a name that is not one. Returns their bytes.
pub(super) fn index_found(root: &Path, lru: &mut LruCache<Digest, Entry>) -> u64 {
    let dir = root.join(STORED_DIR);
    let mut used = 0;
    let Ok(shards) = fs::read_dir(&dir) else {
        return 0;
    };
    for shard in shards.flatten() {
        let Ok(files) = fs::read_dir(shard.path()) else {
            continue;
        };
        for file in files.flatten() {
            let path = file.path();
            let parsed = path.file_name().and_then(|n| n.to_str()).and_then(|name| {
                let (hex, rest) = name.split_once('.')?;
                let (made_here, encoding) = match rest.strip_prefix(MADE_HERE) {
                    Some(encoding) => (true, encoding),
                    None => (false, rest),
                };
                Some((
                    hex.parse::<Digest>().ok()?,
                    Encoding::parse(encoding)?,
                    made_here,
                ))
            });
            let len = file.metadata().map(|m| m.len()).unwrap_or(0);
            let entry = parsed.and_then(|(digest, encoding, made_here)| {
                let entry = lru.peek_mut(&digest)?;
                (entry.stored.is_none() && encoding != Encoding::Raw && len < entry.len)
                    .then_some((entry, encoding, made_here))
            });
            match entry {
                Some((entry, encoding, made_here)) => {
                    entry.stored = Some(Kept {
                        len,
                        encoding,
                        made_here,
                        verified: false,
                    });
                    used += len;
                }
                None => {
                    let _ = fs::remove_file(&path);
                }
            }
        }
    }
    used
}

impl ChunkStore {
    fn stored_path(&self, digest: &Digest, kept: (Encoding, bool)) -> PathBuf {
        let hex = digest.to_hex();
        let made = if kept.1 { MADE_HERE } else { "" };
        self.root
            .join(STORED_DIR)
            .join(&hex[..2])
            .join(format!("{hex}.{made}{}", kept.0.as_str()))
    }

    /// Deletes a stored form's file (its entry is already gone or changed).
    pub(super) fn remove_stored_file(&self, digest: &Digest, kept: Kept) {
        let _ = fs::remove_file(self.stored_path(digest, (kept.encoding, kept.made_here)));
    }

    /// Keeps `bytes`, the stored form of the local chunk `digest` (verified by the
    /// caller: they decode to the chunk), beside it: as fetched, or `made_here` (encoded
    /// by this node). Passed over (`Ok(false)`) when the chunk is not local, keeps a form
    /// already, or `bytes` are raw or not smaller. Blocking.
    pub fn keep_stored_form(
        &self,
        digest: &Digest,
        encoding: Encoding,
        bytes: &[u8],
        made_here: bool,
    ) -> Result<bool, ChunkStoreError> {
        let wanted = encoding != Encoding::Raw
            && self
                .index()
                .lru
                .peek(digest)
                .is_some_and(|e| e.stored.is_none() && (bytes.len() as u64) < e.len);
        if !wanted {
            return Ok(false);
        }
        let path = self.stored_path(digest, (encoding, made_here));
        let write_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ChunkStoreError::Write {
                digest: *digest,
                path,
                source,
            }
        };
        let seq = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let tmp = self.root.join("tmp").join(format!(
            "{}.{}.{seq}.stored",
            digest.to_hex(),
            std::process::id()
        ));
        let written = (|| -> io::Result<()> {
            let mut f = File::create(&tmp)?;
            for piece in bytes.chunks(WRITE_PIECE) {
                f.write_all(piece)?;
            }
            // Not made durable: one lost in a crash is checked at its first open.
            start_write_back(&f);
            if let Some(shard) = path.parent() {
                fs::create_dir_all(shard)?;
            }
            fs::rename(&tmp, &path)
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(write_err(&path)(e));
        }
        let mut index = self.index();
        // Whether this form is now the chunk's, and whether the chunk keeps one at all
        // (another writer's, of the same name, may have been first).
        let (kept, has_form) = match index.lru.peek_mut(digest) {
            Some(entry) if entry.stored.is_none() => {
                entry.stored = Some(Kept {
                    len: bytes.len() as u64,
                    encoding,
                    made_here,
                    verified: true,
                });
                (true, true)
            }
            Some(_) => (false, true),
            None => (false, false),
        };
        if !kept {
            drop(index);
            if !has_form {
                // Evicted meanwhile: the form goes with it.
                let _ = fs::remove_file(&path);
            }
            return Ok(false);
        }
        index.used += bytes.len() as u64;
        let doomed = self.evict_over_budget(&mut index);
        drop(index);
        self.unlink(doomed);
        Ok(true)
    }

    /// The local chunk's stored form, open, if one is kept; `None` if not (or if it was
    /// found bad at its first open, and deleted). Blocking: a first open hashes it.
    pub fn stored_form(&self, digest: &Digest) -> Result<Option<StoredForm>, ChunkStoreError> {
        let Some(chunk) = self.get(digest)? else {
            return Ok(None);
        };
        let Some(kept) = self.index().lru.peek(digest).and_then(|e| e.stored) else {
            return Ok(None);
        };
        let path = self.stored_path(digest, (kept.encoding, kept.made_here));
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.forget_stored(digest);
                return Ok(None);
            }
            Err(source) => {
                return Err(ChunkStoreError::Read {
                    digest: *digest,
                    source,
                })
            }
        };
        if !kept.verified {
            if !stored_matches(&file, digest, chunk.len) {
                self.forget_stored(digest);
                let _ = fs::remove_file(&path);
                self.corrupt.fetch_add(1, Ordering::Relaxed);
                tracing::error!(chunk = %digest, "a kept stored form does not decode to its chunk; dropped");
                return Ok(None);
            }
            if let Some(Some(k)) = self.index().lru.peek_mut(digest).map(|e| e.stored.as_mut()) {
                k.verified = true;
            }
        }
        // The file's own length: what a body streamed from it holds.
        let len = file
            .metadata()
            .map_err(|source| ChunkStoreError::Read {
                digest: *digest,
                source,
            })?
            .len();
        Ok(Some(StoredForm {
            chunk,
            file,
            len,
            encoding: kept.encoding,
            as_fetched: !kept.made_here,
        }))
    }

    /// Takes a chunk's stored form out of the index (its file is handled by the caller).
    fn forget_stored(&self, digest: &Digest) {
        let mut index = self.index();
        let gone = index.lru.peek_mut(digest).and_then(|e| e.stored.take());
        if let Some(kept) = gone {
            index.used -= kept.len;
            index.generation += 1;
        }
    }

    /// Decodes and hashes every kept stored form (part of a scrub): a bad one is
    /// deleted and counted, its chunk kept. Returns how many were dropped. Blocking.
    pub(super) fn scrub_stored_forms(&self) -> usize {
        let kept: Vec<(Digest, u64, Kept)> = self
            .index()
            .lru
            .iter()
            .filter_map(|(d, e)| Some((*d, e.len, e.stored?)))
            .collect();
        let mut dropped = 0;
        for (digest, len, form) in kept {
            let path = self.stored_path(&digest, (form.encoding, form.made_here));
            let Ok(file) = File::open(&path) else {
                continue;
            };
            if stored_matches(&file, &digest, len) {
                if let Some(Some(k)) = self
                    .index()
                    .lru
                    .peek_mut(&digest)
                    .map(|e| e.stored.as_mut())
                {
                    k.verified = true;
                }
                continue;
            }
            self.forget_stored(&digest);
            let _ = fs::remove_file(&path);
            self.corrupt.fetch_add(1, Ordering::Relaxed);
            tracing::error!(chunk = %digest, "a kept stored form does not decode to its chunk; dropped");
            dropped += 1;
        }
        dropped
    }

    /// Bytes of the kept stored forms (for status and tests).
    pub fn stored_form_bytes(&self) -> u64 {
        self.index()
            .lru
            .iter()
            .filter_map(|(_, e)| e.stored.map(|k| k.len))
            .sum()
    }
}

/// Whether the stored form in `file` decodes to the chunk `digest` of `len` bytes.
fn stored_matches(file: &File, digest: &Digest, len: u64) -> bool {
    let mut verifier = StoredVerifier::new(len);
    let mut buf = vec![0u8; VERIFY_BUFFER];
    let mut offset = 0u64;
    loop {
        match file.read_at(&mut buf, offset) {
            Ok(0) => break,
            Ok(n) => {
                verifier.update(&buf[..n]);
                offset += n as u64;
                if offset >= len {
                    return false;
                }
            }
            Err(_) => return false,
        }
    }
    matches!(verifier.finish(digest), Ok((e, l)) if e != Encoding::Raw && l == len)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A compressible chunk, its digest and its stored form (zstd blocks).
    fn chunk() -> (Digest, Vec<u8>, Vec<u8>) {
        let raw: Vec<u8> = (0..256 << 10).map(|i| b"stored form "[i % 12]).collect();
        let (encoding, stored) = crate::encoding::encode(&raw);
        assert_eq!(encoding, Encoding::Blocks);
        let stored = stored.into_owned();
        (Digest::of(&raw), raw, stored)
    }

    fn read_form(form: &StoredForm) -> Vec<u8> {
        let mut buf = vec![0u8; form.len as usize];
        form.read_at(0, &mut buf).unwrap();
        buf
    }

    #[test]
    fn a_kept_form_is_counted_served_and_goes_with_its_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path(), 0).unwrap();
        let (d, raw, stored) = chunk();
        // Not without its chunk.
        assert!(!store
            .keep_stored_form(&d, Encoding::Blocks, &stored, false)
            .unwrap());
        store.insert(&d, &raw).unwrap();
        assert!(!store
            .keep_stored_form(&d, Encoding::Raw, &raw, false)
            .unwrap());
        assert!(store
            .keep_stored_form(&d, Encoding::Blocks, &stored, false)
            .unwrap());
        assert!(
            !store
                .keep_stored_form(&d, Encoding::Blocks, &stored, false)
                .unwrap(),
            "once"
        );
        assert_eq!(store.used_bytes(), (raw.len() + stored.len()) as u64);
        let form = store.stored_form(&d).unwrap().unwrap();
        assert_eq!(form.encoding, Encoding::Blocks);
        assert_eq!(read_form(&form), stored);
        drop(form);
        assert!(store.remove(&d));
        assert_eq!(store.used_bytes(), 0);
        assert!(store.stored_form(&d).unwrap().is_none());
        assert!(fs::read_dir(dir.path().join(STORED_DIR))
            .unwrap()
            .flat_map(|s| fs::read_dir(s.unwrap().path()).unwrap())
            .next()
            .is_none());
    }

    #[test]
    fn a_form_found_at_start_is_checked_at_its_first_open() {
        let dir = tempfile::tempdir().unwrap();
        let (d, raw, stored) = chunk();
        {
            let store = ChunkStore::open(dir.path(), 0).unwrap();
            store.insert(&d, &raw).unwrap();
            store
                .keep_stored_form(&d, Encoding::Blocks, &stored, false)
                .unwrap();
        }
        // Found again, and right.
        let store = ChunkStore::open(dir.path(), 0).unwrap();
        assert_eq!(store.used_bytes(), (raw.len() + stored.len()) as u64);
        assert_eq!(read_form(&store.stored_form(&d).unwrap().unwrap()), stored);
        drop(store);
        // Flipped on disk while the daemon was down: dropped, its chunk kept.
        let path = dir
            .path()
            .join(STORED_DIR)
            .join(&d.to_hex()[..2])
            .join(format!("{}.zstd-blocks", d.to_hex()));
        let mut bad = fs::read(&path).unwrap();
        let middle = bad.len() / 2;
        bad[middle] ^= 0x40;
        fs::write(&path, &bad).unwrap();
        // And an orphan (no chunk) is deleted at open.
        let orphan = Digest::of(b"no such chunk");
        let orphan_path = dir
            .path()
            .join(STORED_DIR)
            .join(&orphan.to_hex()[..2])
            .join(format!("{}.zstd-blocks", orphan.to_hex()));
        fs::create_dir_all(orphan_path.parent().unwrap()).unwrap();
        fs::write(&orphan_path, &stored).unwrap();
        let store = ChunkStore::open(dir.path(), 0).unwrap();
        assert!(!orphan_path.exists());
        assert!(store.stored_form(&d).unwrap().is_none());
        assert!(!path.exists());
        assert_eq!(store.used_bytes(), raw.len() as u64);
        assert_eq!(store.get(&d).unwrap().unwrap().read_all().unwrap(), raw);
        assert_eq!(store.corrupt_files(), 1);
    }

    #[test]
    fn a_scrub_drops_a_bad_form_and_keeps_its_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path(), 0).unwrap();
        let (d, raw, mut stored) = chunk();
        store.insert(&d, &raw).unwrap();
        let middle = stored.len() / 2;
        stored[middle] ^= 0x40;
        // Kept as if verified (bytes that went bad on disk since).
        store
            .keep_stored_form(&d, Encoding::Blocks, &stored, false)
            .unwrap();
        let report = store.scrub(|_, _| {});
        assert!(report.dropped.is_empty(), "the chunk itself is right");
        assert!(store.stored_form(&d).unwrap().is_none());
        assert_eq!(store.used_bytes(), raw.len() as u64);
        assert_eq!(store.corrupt_files(), 1);
    }

    #[test]
    fn eviction_counts_a_chunk_with_its_form() {
        let dir = tempfile::tempdir().unwrap();
        let (d, raw, stored) = chunk();
        let budget = (raw.len() + stored.len()) as u64;
        let store = ChunkStore::open(dir.path(), budget).unwrap();
        store.insert(&d, &raw).unwrap();
        store
            .keep_stored_form(&d, Encoding::Blocks, &stored, false)
            .unwrap();
        assert!(store.contains(&d));
        // Another chunk pushes the cache over its budget: the first goes, form and all.
        let other = vec![7u8; 4096];
        store.insert(&Digest::of(&other), &other).unwrap();
        assert!(!store.contains(&d));
        assert_eq!(store.used_bytes(), 4096);
    }
}
