//! The directory engine of the store: `manifests/<id>.json`, `chunks/<2 hex>/<64 hex>`,
//! `traces/<id>.json` and `tmp/` under one root.
//!
//! Every write goes to a file in `tmp/`, is fsynced, renamed into place, and the
//! directory is fsynced, so a crash never leaves a torn manifest or chunk. Disk work
//! runs on the blocking pool; the async side only streams bodies.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use lazyblk_cache::encoding::StoredVerifier;
use lazyblk_cache::{Digest, Manifest};
use tokio::io::AsyncWriteExt;
use tokio_util::io::ReaderStream;

use super::accept::{check_trace, difference, manifest_to_store};
use super::chunk::{clip_range, drain, not_the_chunk, OpenChunk, MAX_CHUNK_BODY};
use super::dir_files::{
    blocking, chunks_lock, clear_dir, file_is_chunk, io_err, read_optional, remove_if_there,
    sync_dir, sync_parent, template_ids, touch, write_atomic,
};
use super::error::{BackendError, ChunkPut, ManifestPut};
use super::summary::{summarize, DurableSummaries};
use crate::store::TemplateSummary;
use crate::trust::ManifestSignature;

/// Read size when streaming a chunk file to a client: a quarter of the default chunk,
/// few system calls per chunk without holding much memory per connection.
const STREAM_BUFFER: usize = 256 << 10;

/// The store's directory.
pub struct DirBackend {
    pub(super) root: PathBuf,
    /// Serializes manifest writes, deletes and gc, so "compare, then write" of a
    /// manifest is atomic and gc sees a stable set of manifests.
    pub(super) manifests_lock: tokio::sync::Mutex<()>,
    /// Summaries of DURABLE templates: nothing but a delete or gc of referenced chunks
    /// (which gc never does) can change them, so they are not recomputed.
    pub(super) durable: DurableSummaries,
}

impl DirBackend {
    /// Opens (creating when missing) the store at `root` and clears leftovers in `tmp/`.
    pub async fn open(root: &Path) -> Result<DirBackend, BackendError> {
        let root = root.to_path_buf();
        let backend = DirBackend {
            root: root.clone(),
            manifests_lock: tokio::sync::Mutex::new(()),
            durable: DurableSummaries::default(),
        };
        blocking(move || {
            for dir in ["manifests", "chunks", "traces", "tmp"] {
                let path = root.join(dir);
                fs::create_dir_all(&path).map_err(io_err("creating", &path))?;
            }
            clear_dir(&root.join("tmp"))
        })
        .await?;
        Ok(backend)
    }

    fn manifest_path(&self, id: &str) -> PathBuf {
        self.root.join("manifests").join(format!("{id}.json"))
    }

    fn trace_path(&self, id: &str) -> PathBuf {
        self.root.join("traces").join(format!("{id}.json"))
    }

    fn chunk_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("chunks").join(digest.shard_path())
    }

    fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// The stored manifest bytes of `id`, if any.
    pub async fn manifest_bytes(&self, id: &str) -> Result<Option<Vec<u8>>, BackendError> {
        read_optional(self.manifest_path(id)).await
    }

    /// The parsed manifest of `id`, if any.
    pub async fn manifest(&self, id: &str) -> Result<Option<Manifest>, BackendError> {
        let path = self.manifest_path(id);
        match read_optional(path.clone()).await? {
            None => Ok(None),
            Some(bytes) => Manifest::parse(&bytes, Some(id))
                .map(Some)
                .map_err(|source| BackendError::Corrupt { path, source }),
        }
    }

    /// The signature document kept beside the manifest of `id`, if any.
    pub async fn signature_bytes(&self, id: &str) -> Result<Option<Vec<u8>>, BackendError> {
        read_optional(self.signature_path(id)).await
    }

    fn signature_path(&self, id: &str) -> PathBuf {
        self.root.join("manifests").join(format!("{id}.sig"))
    }

    /// Stores a manifest unless one with other content has this id. The signature is
    /// written first, so no reader sees a signed manifest without it.
    pub async fn put_manifest(
        &self,
        id: &str,
        body: &[u8],
        signature: Option<&ManifestSignature>,
    ) -> Result<ManifestPut, BackendError> {
        let (manifest, bytes) = manifest_to_store(id, body, signature)?;
        let _guard = self.manifests_lock.lock().await;
        if let Some(existing) = self.manifest(id).await? {
            if !existing.same_content(&manifest) {
                return Err(BackendError::Conflict {
                    template: id.to_string(),
                    detail: difference(&existing, &manifest),
                });
            }
            // The same content signed now: the signature is kept if it is of the very
            // bytes stored (otherwise the stored manifest stays as it was).
            let stored = self.manifest_bytes(id).await?;
            if let (Some(sig), Some(true)) = (signature, stored.map(|b| b == bytes)) {
                let (tmp, path, doc) = (self.tmp_dir(), self.signature_path(id), sig.to_json());
                blocking(move || write_atomic(&tmp, &path, &doc)).await?;
            }
            return Ok(ManifestPut::Unchanged);
        }
        let (tmp, path) = (self.tmp_dir(), self.manifest_path(id));
        let sig_path = self.signature_path(id);
        let doc = signature.map(ManifestSignature::to_json);
        blocking(move || {
            match doc {
                Some(doc) => write_atomic(&tmp, &sig_path, &doc)?,
                // A signature left by a crash between its write and its manifest's.
                None => remove_if_there(&sig_path)?,
            }
            write_atomic(&tmp, &path, &bytes)
        })
        .await?;
        self.durable.forget(id);
        Ok(ManifestPut::Created)
    }

    /// Removes a template's manifest and trace; its chunks stay until gc.
    pub async fn delete(&self, id: &str) -> Result<(), BackendError> {
        let _guard = self.manifests_lock.lock().await;
        let (manifest, trace) = (self.manifest_path(id), self.trace_path(id));
        let signature = self.signature_path(id);
        let id_owned = id.to_string();
        blocking(move || {
            match fs::remove_file(&manifest) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(BackendError::UnknownTemplate(id_owned))
                }
                Err(e) => return Err(io_err("removing", &manifest)(e)),
            }
            match fs::remove_file(&trace) {
                Ok(()) => sync_parent(&trace)?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("removing", &trace)(e)),
            }
            remove_if_there(&signature)?;
            sync_parent(&manifest)
        })
        .await?;
        self.durable.forget(id);
        Ok(())
    }

    /// The stored trace of `id`.
    pub async fn trace_bytes(&self, id: &str) -> Result<Vec<u8>, BackendError> {
        if self.manifest(id).await?.is_none() {
            return Err(BackendError::UnknownTemplate(id.to_string()));
        }
        read_optional(self.trace_path(id))
            .await?
            .ok_or_else(|| BackendError::NoTrace(id.to_string()))
    }

    /// Stores (or replaces) the trace of `id` after checking it against the manifest.
    pub async fn put_trace(&self, id: &str, body: &[u8]) -> Result<(), BackendError> {
        let manifest = self
            .manifest(id)
            .await?
            .ok_or_else(|| BackendError::UnknownTemplate(id.to_string()))?;
        let bytes = check_trace(id, &manifest, body)?;
        let (tmp, path) = (self.tmp_dir(), self.trace_path(id));
        blocking(move || write_atomic(&tmp, &path, &bytes)).await
    }

    /// The ids of the stored manifests, sorted.
    pub async fn ids(&self) -> Result<Vec<String>, BackendError> {
        let dir = self.root.join("manifests");
        blocking(move || template_ids(&dir)).await
    }

    /// The summary of one template, with its durability derived from the disk.
    pub async fn summary(&self, id: &str) -> Result<TemplateSummary, BackendError> {
        let cached = self.durable.get(id);
        if let Some(cached) = cached {
            // The cache may outlive a delete that raced with the summary that filled it.
            if tokio::fs::try_exists(self.manifest_path(id))
                .await
                .unwrap_or(false)
            {
                return Ok(cached);
            }
        }
        let manifest = self
            .manifest(id)
            .await?
            .ok_or_else(|| BackendError::UnknownTemplate(id.to_string()))?;
        let parent = match &manifest.parent {
            // A parent that is gone or unreadable only means every chunk counts as own.
            Some(parent) => self.manifest(parent).await.ok().flatten(),
            None => None,
        };
        let chunks_dir = self.root.join("chunks");
        let summary = blocking(move || {
            let on_disk = |d: &Digest| chunks_dir.join(d.shard_path()).exists();
            Ok(summarize(&manifest, parent.as_ref(), on_disk))
        })
        .await?;
        self.durable.keep(id, &summary);
        Ok(summary)
    }

    /// Whether the chunk is stored, and its length.
    pub async fn chunk_len(&self, digest: &Digest) -> Result<Option<u64>, BackendError> {
        let path = self.chunk_path(digest);
        match tokio::fs::metadata(&path).await {
            Ok(meta) => Ok(Some(meta.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("reading metadata of", &path)(e)),
        }
    }

    /// A stored chunk as a stream of its bytes, with its length.
    pub async fn open_chunk(
        &self,
        digest: &Digest,
        range: Option<std::ops::Range<u64>>,
    ) -> Result<Option<OpenChunk>, BackendError> {
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        let path = self.chunk_path(digest);
        let mut file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("opening", &path)(e)),
        };
        let len = file
            .metadata()
            .await
            .map_err(io_err("reading metadata of", &path))?
            .len();
        let range = clip_range(range, len, digest)?;
        if range.start > 0 {
            file.seek(io::SeekFrom::Start(range.start))
                .await
                .map_err(io_err("seeking in", &path))?;
        }
        let reader = file.take(range.end - range.start);
        let stream = ReaderStream::with_capacity(reader, STREAM_BUFFER).boxed();
        Ok(Some(OpenChunk { stream, len, range }))
    }

    /// The digests the store lacks, in the order given, without repeats. Present ones
    /// get a fresh mtime so a concurrent gc keeps them for the publish that asked.
    pub async fn missing(&self, digests: Vec<Digest>) -> Result<Vec<Digest>, BackendError> {
        let chunks_dir = self.root.join("chunks");
        let root = self.root.clone();
        // gc holds this lock while it sweeps: a chunk reported present here cannot be
        // swept between its check and its touch (by this process; `chunks_lock` keeps
        // other processes' gc out).
        let _no_gc = self.manifests_lock.lock().await;
        blocking(move || {
            let _shared = chunks_lock(&root, false)?;
            let mut seen = HashSet::with_capacity(digests.len());
            let mut missing = Vec::new();
            for digest in digests {
                if !seen.insert(digest) {
                    continue;
                }
                let path = chunks_dir.join(digest.shard_path());
                if path.exists() {
                    touch(&path);
                } else {
                    missing.push(digest);
                }
            }
            Ok(missing)
        })
        .await
    }

    /// Receives a chunk body, hashing it on the way to a temporary file, and stores it
    /// only when it hashes to `digest`.
    pub async fn put_chunk<S, E>(&self, digest: Digest, body: S) -> Result<ChunkPut, BackendError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let dest = self.chunk_path(&digest);
        let no_gc = self.manifests_lock.lock().await;
        if tokio::fs::try_exists(&dest).await.unwrap_or(false) {
            let (path, root) = (dest.clone(), self.root.clone());
            // A stored copy that fails verification is replaced by this (verified)
            // upload: a PUT is how a damaged store is repaired.
            let intact = blocking(move || {
                let _shared = chunks_lock(&root, false)?;
                let intact = file_is_chunk(&path, &digest).unwrap_or(false);
                if intact {
                    touch(&path);
                }
                Ok(intact)
            })
            .await?;
            if intact {
                drop(no_gc);
                // Read the body anyway: answering before it is read makes the client's
                // write fail (a broken pipe) instead of letting it see the answer.
                drain(body, MAX_CHUNK_BODY).await;
                return Ok(ChunkPut::Present);
            }
            tracing::warn!(chunk = %digest, path = %dest.display(), "stored chunk does not match its digest; replacing it with the verified upload");
        }
        drop(no_gc);
        let tmp = self.tmp_dir();
        let (file, temp_path) = blocking(move || {
            tempfile::NamedTempFile::new_in(&tmp)
                .map(|f| f.into_parts())
                .map_err(io_err("creating a temporary file in", &tmp))
        })
        .await?;
        let temp_name = temp_path.to_path_buf();
        let mut file = tokio::fs::File::from_std(file);
        let len = receive(&digest, body, &mut file, &temp_name).await?;
        file.sync_all()
            .await
            .map_err(io_err("syncing", &temp_name))?;
        drop(file);
        blocking(move || {
            let shard = dest.parent().unwrap_or(&dest).to_path_buf();
            let new_shard = !shard.exists();
            fs::create_dir_all(&shard).map_err(io_err("creating", &shard))?;
            temp_path
                .persist(&dest)
                .map_err(|e| io_err("renaming into", &dest)(e.error))?;
            sync_dir(&shard)?;
            if new_shard {
                sync_parent(&shard)?;
            }
            Ok(())
        })
        .await?;
        Ok(ChunkPut::Stored(len))
    }
}

/// Writes one chunk body to `file` as it is stored (raw or a zstd frame), enforcing
/// the size limit and checking that it is the chunk.
async fn receive<S, E>(
    digest: &Digest,
    mut body: S,
    file: &mut tokio::fs::File,
    temp_name: &Path,
) -> Result<u64, BackendError>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let mut verifier = StoredVerifier::new(MAX_CHUNK_BODY);
    while let Some(piece) = body.next().await {
        let piece = piece.map_err(|e| BackendError::Body {
            what: format!("chunk {digest}"),
            detail: e.to_string(),
        })?;
        if verifier.stored_len() + piece.len() as u64 > MAX_CHUNK_BODY {
            return Err(BackendError::TooLarge {
                what: format!("chunk {digest}"),
                limit: MAX_CHUNK_BODY,
            });
        }
        verifier.update(&piece);
        file.write_all(&piece)
            .await
            .map_err(io_err("writing", temp_name))?;
    }
    let len = verifier.stored_len();
    verifier
        .finish(digest)
        .map_err(|e| not_the_chunk(digest, e))?;
    file.flush().await.map_err(io_err("writing", temp_name))?;
    Ok(len)
}
