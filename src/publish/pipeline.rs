//! The publish pipeline: a blocking reader sends chunks in order into a bounded
//! channel, hashing tasks turn them into digests, and the [`Uploader`] gathers them into
//! batches, asks the store which it lacks and uploads those (see the parent module).

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use futures::{stream, StreamExt, TryStreamExt};
use lazyblk_cache::blocks::STORED_BLOCK;
use lazyblk_cache::manifest::{BlockIndex, MANIFEST_FORMAT};
use lazyblk_cache::{Digest, Manifest};
use tokio::sync::mpsc;

use super::{blocking, encode_chunk, exists, PublishError, PublishReport, Sent};
use crate::progress::Progress;
use crate::publish::PublishArgs;
use crate::store::client::{StoreClient, StoreError};

/// Bytes of hashed chunks gathered before one `missing` query: ~1,600 queries for a
/// 50 GiB image, and bounded memory whatever the chunk size.
const BATCH_BYTES: u64 = 32 << 20;
/// Bytes of chunks queued in each of the two channels (reader to hashers, hashers to
/// uploader); at least one chunk.
const PIPELINE_BYTES: u64 = 16 << 20;
/// Attempts per chunk upload: a transient network error should not fail a long
/// publish, and the PUT is idempotent.
const UPLOAD_ATTEMPTS: u32 = 3;
/// Pause before the second attempt; doubled for each later one.
const UPLOAD_BACKOFF: Duration = Duration::from_millis(500);

/// One chunk after hashing.
struct Hashed {
    index: usize,
    /// `None` for an all-zero chunk.
    digest: Option<Digest>,
    /// The chunk's bytes; empty for a hole of a sparse image.
    bytes: Bytes,
    /// The chunk's length in the image (holes included), for progress.
    len: u64,
    /// Its entry in the block index: the sha256 of each block (empty for a zero chunk,
    /// or without an index).
    blocks: Vec<u8>,
}

/// The block index being built as chunks arrive in order: a page is uploaded (like a
/// chunk) as soon as its chunks are hashed, so memory holds one page.
struct IndexBuilder {
    index: BlockIndex,
    chunk_size: u32,
    chunk_count: usize,
    page: Vec<u8>,
    /// Whether the page has a non-zero chunk.
    used: bool,
    done: usize,
}

impl IndexBuilder {
    fn new(chunk_size: u32, chunk_count: usize) -> IndexBuilder {
        IndexBuilder {
            index: BlockIndex::layout(chunk_size, STORED_BLOCK, chunk_count),
            chunk_size,
            chunk_count,
            page: Vec::new(),
            used: false,
            done: 0,
        }
    }

    /// Adds the next chunk's entry; returns a finished page to upload.
    fn add(&mut self, entry: &[u8]) -> Option<(usize, Digest, Bytes)> {
        let len = self.index.entry_len(self.chunk_size) as usize;
        self.used |= !entry.is_empty();
        self.page.extend_from_slice(entry);
        self.page
            .resize(self.page.len() + len - entry.len().min(len), 0);
        self.done += 1;
        let page = (self.done - 1) / self.index.chunks_per_page as usize;
        let full =
            self.page.len() as u64 == self.index.page_len(page, self.chunk_count, self.chunk_size);
        if !full {
            return None;
        }
        let bytes = Bytes::from(std::mem::take(&mut self.page));
        if !std::mem::take(&mut self.used) {
            return None;
        }
        let digest = Digest::of(&bytes);
        self.index.pages[page] = Some(digest);
        Some((page, digest, bytes))
    }
}

/// What the pipeline made: every chunk's digest in order, the block index it built and
/// uploaded (`None` without compression; for a republish it only restores the pages the
/// store lost, and the stored manifest's index stays), the report.
pub(super) type Hashing = (Vec<Option<Digest>>, Option<BlockIndex>, PublishReport);

/// Runs the pipeline.
pub(super) async fn hash_and_upload(
    args: &PublishArgs,
    size: u64,
    existing: Option<&Manifest>,
    mut uploader: Uploader<'_>,
) -> Result<Hashing, PublishError> {
    let chunk_size = args.chunk_size;
    let depth = (PIPELINE_BYTES / chunk_size).clamp(1, 64) as usize;
    let (read_tx, read_rx) = mpsc::channel(depth);
    let (hashed_tx, mut hashed_rx) = mpsc::channel(depth);
    let path = args.image.clone();
    let reader = tokio::task::spawn_blocking(move || read_chunks(&path, size, chunk_size, read_tx));
    // Hashing more chunks at once than there are cores only holds more memory.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let count = size.div_ceil(chunk_size) as usize;
    // A republish of a template with an index builds it again, so that pages the store
    // lost are uploaded again (only pages the stored manifest names).
    let repairs = existing.and_then(|m| m.blocks.as_ref());
    let mut index = (uploader.compress
        && (existing.is_none() || repairs.is_some_and(|b| b.block_size == STORED_BLOCK)))
    .then(|| IndexBuilder::new(chunk_size as u32, count));
    let hasher = tokio::spawn(hash_chunks(
        read_rx,
        hashed_tx,
        uploader.concurrency.min(cores),
        (size, chunk_size, index.is_some()),
    ));

    let mut chunks = Vec::with_capacity(count);
    while let Some(chunk) = hashed_rx.recv().await {
        let chunk = chunk?;
        if let Some(stored) = existing {
            let expected = stored.chunks.get(chunk.index).copied().flatten();
            if expected != chunk.digest {
                return Err(exists(
                    &args.template,
                    format!("chunk {} differs", chunk.index),
                ));
            }
        }
        chunks.push(chunk.digest);
        if let Some((page, digest, bytes)) = index.as_mut().and_then(|i| i.add(&chunk.blocks)) {
            let upload = match repairs {
                None => true,
                Some(stored) => {
                    stored.pages.get(page) == Some(&Some(digest))
                        && uploader.client.missing(&[digest]).await?.contains(&digest)
                }
            };
            if upload {
                // Before the manifest that names it, like every chunk.
                put_with_retry(uploader.client, &digest, bytes)
                    .await
                    .inspect_err(|_| tracing::warn!("upload of block index page {page} failed"))?;
            }
        }
        if existing.is_some() {
            uploader.count_only(&chunk);
        } else {
            uploader.add(chunk).await?;
        }
    }
    uploader.flush().await?;
    let task = |e: tokio::task::JoinError| PublishError::Task(e.to_string());
    hasher.await.map_err(task)?;
    reader.await.map_err(task)??;
    Ok((chunks, index.map(|i| i.index), uploader.report))
}

/// The hashing stage: its own task, so hashing goes on while the uploader waits on
/// the network. Stops at the first error or when the uploader is gone.
async fn hash_chunks(
    mut read_rx: mpsc::Receiver<Result<(usize, Bytes), PublishError>>,
    hashed_tx: mpsc::Sender<Result<Hashed, PublishError>>,
    concurrency: usize,
    (size, chunk_size, with_blocks): (u64, u64, bool),
) {
    let hashed = stream::poll_fn(move |cx| read_rx.poll_recv(cx))
        .map(|read| async move {
            let (index, bytes) = read?;
            let mut hashed = blocking(move || Ok(hash_chunk(index, bytes, with_blocks))).await?;
            hashed.len = chunk_size.min(size - index as u64 * chunk_size);
            Ok(hashed)
        })
        .buffered(concurrency.max(1));
    futures::pin_mut!(hashed);
    while let Some(item) = hashed.next().await {
        let failed = item.is_err();
        if hashed_tx.send(item).await.is_err() || failed {
            return;
        }
    }
}

/// Reads the image chunk by chunk into `tx`, stopping early when the receiver is gone.
fn read_chunks(
    path: &Path,
    size: u64,
    chunk_size: u64,
    tx: mpsc::Sender<Result<(usize, Bytes), PublishError>>,
) -> Result<(), PublishError> {
    let read_error = |offset, source| PublishError::Read {
        path: path.to_path_buf(),
        offset,
        source,
    };
    let file = std::fs::File::open(path).map_err(|e| read_error(0, e))?;
    let mut offset = 0u64;
    let mut index = 0usize;
    while offset < size {
        let len = chunk_size.min(size - offset) as usize;
        let item = if is_hole(&file, offset, len as u64) {
            // A hole of a sparse image: a zero chunk, known without reading it.
            Ok((index, Bytes::new()))
        } else {
            let mut buf = vec![0u8; len];
            std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf, offset)
                .map(|()| (index, Bytes::from(buf)))
                .map_err(|e| read_error(offset, e))
        };
        let failed = item.is_err();
        if tx.blocking_send(item).is_err() || failed {
            return Ok(());
        }
        offset += len as u64;
        index += 1;
    }
    Ok(())
}

/// Whether `[offset, offset + len)` of `file` is a hole (no data: reads as zeros), by
/// `SEEK_DATA`. Any doubt (a file system without it) answers no, and the range is read.
fn is_hole(file: &std::fs::File, offset: u64, len: u64) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: lseek on a valid descriptor; it moves the file position, which this
    // reader does not use (it reads with pread).
    let next = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, libc::SEEK_DATA) };
    if next < 0 {
        // ENXIO: no data at or after `offset`.
        return std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
    }
    next as u64 >= offset + len
}

fn hash_chunk(index: usize, bytes: Bytes, with_blocks: bool) -> Hashed {
    let digest = if bytes.iter().all(|b| *b == 0) {
        None
    } else {
        Some(Digest::of(&bytes))
    };
    let blocks = if with_blocks && digest.is_some() {
        bytes
            .chunks(STORED_BLOCK as usize)
            .flat_map(|block| *Digest::of(block).as_bytes())
            .collect()
    } else {
        Vec::new()
    };
    let len = bytes.len() as u64;
    Hashed {
        index,
        digest,
        bytes,
        len,
        blocks,
    }
}

/// Gathers hashed chunks into batches, asks the store which it lacks, uploads those.
pub(super) struct Uploader<'a> {
    pub(super) client: &'a StoreClient,
    pub(super) concurrency: usize,
    /// Whether chunks are stored zstd-compressed where that makes them smaller.
    pub(super) compress: bool,
    progress: &'a Progress,
    /// Chunks waiting for the next `missing` query.
    batch: Vec<(Digest, Bytes)>,
    batch_bytes: u64,
    /// Digests already queued, uploaded or found present: a repeated chunk is sent once.
    seen: HashSet<Digest>,
    report: PublishReport,
}

impl<'a> Uploader<'a> {
    pub(super) fn new(
        client: &'a StoreClient,
        concurrency: usize,
        compress: bool,
        progress: &'a Progress,
    ) -> Uploader<'a> {
        Uploader {
            client,
            concurrency,
            compress,
            progress,
            batch: Vec::new(),
            batch_bytes: 0,
            seen: HashSet::new(),
            report: PublishReport::default(),
        }
    }

    /// Counts a chunk without uploading it (verification of an existing template).
    fn count_only(&mut self, chunk: &Hashed) {
        match chunk.digest {
            None => self.report.zero_chunks += 1,
            Some(_) => self.report.present_chunks += 1,
        }
        self.progress.inc(chunk.len);
    }

    async fn add(&mut self, chunk: Hashed) -> Result<(), PublishError> {
        let len = chunk.len;
        let Some(digest) = chunk.digest else {
            self.report.zero_chunks += 1;
            self.progress.inc(len);
            return Ok(());
        };
        if !self.seen.insert(digest) {
            self.report.present_chunks += 1;
            self.progress.inc(len);
            return Ok(());
        }
        self.batch.push((digest, chunk.bytes));
        self.batch_bytes += len;
        if self.batch_bytes >= BATCH_BYTES {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), PublishError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.batch);
        self.batch_bytes = 0;
        let digests: Vec<Digest> = batch.iter().map(|(d, _)| *d).collect();
        let missing: HashSet<Digest> = self.client.missing(&digests).await?.into_iter().collect();
        let (upload, present): (Vec<_>, Vec<_>) =
            batch.into_iter().partition(|(d, _)| missing.contains(d));
        self.report.present_chunks += present.len();
        self.progress
            .inc(present.iter().map(|(_, b)| b.len() as u64).sum());
        let (client, progress, compress) = (self.client, self.progress, self.compress);
        let sent: Vec<Sent> = stream::iter(upload)
            .map(|(digest, bytes)| async move {
                let raw = bytes.len() as u64;
                // Only chunks the store lacks are compressed, off the runtime.
                let encoded =
                    blocking(move || Ok(encode_chunk(bytes, compress, MANIFEST_FORMAT))).await?;
                let stored = encoded.bytes.len() as u64;
                put_with_retry(client, &digest, encoded.bytes).await?;
                progress.inc(raw);
                Ok::<Sent, PublishError>(Sent {
                    raw,
                    stored,
                    compressed: encoded.compressed,
                })
            })
            .buffer_unordered(self.concurrency)
            .try_collect()
            .await?;
        self.report.uploaded_chunks += sent.len();
        self.report.count_sent(&sent);
        Ok(())
    }
}

/// Uploads one chunk as stored (raw or a zstd frame), retrying when the store was
/// unreachable for a moment.
pub(super) async fn put_with_retry(
    client: &StoreClient,
    digest: &Digest,
    bytes: Bytes,
) -> Result<(), PublishError> {
    let mut pause = UPLOAD_BACKOFF;
    for attempt in 1..=UPLOAD_ATTEMPTS {
        match client.put_chunk(digest, bytes.clone()).await {
            Ok(()) => return Ok(()),
            Err(e @ StoreError::Unreachable { .. }) if attempt < UPLOAD_ATTEMPTS => {
                tracing::warn!("upload of chunk {digest} failed (attempt {attempt}): {e}");
                tokio::time::sleep(pause).await;
                pause *= 2;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_chunks_have_no_digest() {
        assert!(hash_chunk(0, Bytes::from(vec![0u8; 4096]), true)
            .digest
            .is_none());
        let h = hash_chunk(1, Bytes::from_static(b"abc"), true);
        assert_eq!(h.digest, Some(Digest::of(b"abc")));
    }
}
