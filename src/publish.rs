//! `lazyblk publish`: chunk an image, hash each chunk, upload only the chunks the store
//! lacks, then publish the manifest.
//!
//! # Data flow
//! A blocking reader sends chunks in order into a bounded channel; a hashing stage
//! (blocking threads, `--concurrency` at once) turns them into digests (all-zero chunks
//! become `null`); the uploader gathers hashed chunks into batches, asks the store which
//! it lacks (`POST /v1/chunks/missing`), and uploads those with `--concurrency` PUTs.
//! Every stage holds a bounded number of chunks (two channels of 16 MiB, one chunk per
//! hashing core, a 32 MiB batch), so memory does not grow with the image.

use std::collections::{BTreeMap, HashSet};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::{stream, StreamExt, TryStreamExt};
use indicatif::HumanBytes;
use lazyblk_cache::manifest::{validate_chunk_size, BLOCK_SIZE};
use lazyblk_cache::{validate_id, Digest, Manifest, ManifestError};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::cli::PublishArgs;
use crate::progress::Progress;
use crate::store::client::{PutOutcome, StoreClient, StoreError};

/// Offset of the ext4 superblock.
const EXT4_SUPERBLOCK: u64 = 1024;
/// `s_log_block_size` (block size = 1024 << value), relative to the superblock.
const EXT4_LOG_BLOCK_SIZE: usize = 24;
/// `s_magic`, relative to the superblock.
const EXT4_MAGIC_OFFSET: usize = 56;
const EXT4_MAGIC: u16 = 0xEF53;
/// The only ext4 block size the kernel mounts from a device with 4096-byte blocks.
const REQUIRED_BLOCK_SIZE: u64 = 4096;
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

/// Why a publish failed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    InvalidId(#[from] ManifestError),
    #[error("{0}")]
    InvalidChunkSize(String),
    #[error("cannot open image {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("image {path} is {size} bytes; it must be a non-zero multiple of 4096 (e.g. `truncate -s {suggested} {path}`)")]
    Size {
        path: PathBuf,
        size: u64,
        suggested: u64,
    },
    #[error("ext4 image {path} has {block_size}-byte blocks; the kernel cannot mount it from a 4096-byte-block device: rebuild with mkfs.ext4 -b 4096")]
    BlockSize { path: PathBuf, block_size: u64 },
    #[error("reading image {path} at offset {offset}: {source}")]
    Read {
        path: PathBuf,
        offset: u64,
        source: std::io::Error,
    },
    #[error("template {template} already exists in the store with other content ({detail}); publish under a new id")]
    Exists { template: String, detail: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("publish task failed: {0}")]
    Task(String),
}

/// What a publish did (`--json` prints it).
#[derive(Debug, Default, Serialize)]
pub struct PublishReport {
    pub template: String,
    pub size: u64,
    pub chunk_size: u32,
    /// Chunks in the manifest.
    pub chunks: usize,
    /// Of those, all-zero (`null`, never stored).
    pub zero_chunks: usize,
    /// Distinct chunks uploaded.
    pub uploaded_chunks: usize,
    pub uploaded_bytes: u64,
    /// Non-zero chunks that needed no upload (already in the store, or repeated).
    pub present_chunks: usize,
    /// `created`, or `unchanged` when the same manifest was already published.
    pub status: &'static str,
}

/// `lazyblk publish`.
pub async fn run(args: PublishArgs) -> anyhow::Result<()> {
    let report = publish(&args).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else if report.status == "unchanged" && report.uploaded_chunks == 0 {
        println!("template {} already published (no change)", report.template);
    } else if report.status == "unchanged" {
        println!(
            "template {} already published; uploaded {} chunks ({} bytes) the store lacked",
            report.template, report.uploaded_chunks, report.uploaded_bytes
        );
    } else {
        println!(
            "published {}: {} chunks ({} zero), uploaded {} chunks ({} bytes), {} already in store",
            report.template,
            report.chunks,
            report.zero_chunks,
            report.uploaded_chunks,
            report.uploaded_bytes,
            report.present_chunks
        );
    }
    Ok(())
}

/// Publishes `args.image` as `args.template`.
pub async fn publish(args: &PublishArgs) -> Result<PublishReport, PublishError> {
    validate_id(&args.template)?;
    if let Some(parent) = &args.parent {
        validate_id(parent)?;
    }
    validate_chunk_size(args.chunk_size).map_err(PublishError::InvalidChunkSize)?;
    let chunk_size = args.chunk_size as u32;
    let image = args.image.clone();
    let size = blocking(move || inspect_image(&image)).await?;

    let mut wanted = Manifest::new(&args.template, size, chunk_size);
    wanted.parent = args.parent.clone();
    wanted.labels = args.labels.iter().cloned().collect::<BTreeMap<_, _>>();

    let client = crate::store::client::connect(&args.store, args.write_token.clone(), None)?;
    let existing = client.manifest(&args.template).await?;
    if let Some(existing) = &existing {
        if let Some(detail) = header_difference(existing, &wanted) {
            return Err(exists(&args.template, detail));
        }
    }

    let concurrency = args.concurrency.max(1);
    let progress = Progress::new(&format!("publish {}", args.template), size);
    let uploader = Uploader::new(&client, concurrency, &progress);
    let outcome = match &existing {
        None => hash_and_upload(args, size, None, uploader).await,
        Some(stored) => verify_and_repair(args, size, stored, uploader).await,
    };
    let (chunks, mut report) = match outcome {
        Ok(done) => done,
        Err(e) => {
            progress.finish("failed");
            return Err(e);
        }
    };
    progress.finish(&format!(
        "{} hashed, {} uploaded",
        HumanBytes(size),
        HumanBytes(report.uploaded_bytes)
    ));

    report.template = args.template.clone();
    report.size = size;
    report.chunk_size = chunk_size;
    report.chunks = chunks.len();
    wanted.chunks = chunks;
    report.status = if existing.is_some() {
        "unchanged"
    } else {
        wanted.created_at = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
        match client.put_manifest(&wanted).await? {
            // Someone published the same content meanwhile; the result is the same.
            PutOutcome::Unchanged => "unchanged",
            PutOutcome::Created => "created",
        }
    };
    Ok(report)
}

/// Publishing an id the store already has: the image must match the stored manifest
/// chunk for chunk (nothing is uploaded before that is known). Then the chunks the
/// store lacks (a commit whose origin never finished uploading) are read again and
/// uploaded, so republishing the same image makes a template durable.
async fn verify_and_repair(
    args: &PublishArgs,
    size: u64,
    stored: &Manifest,
    uploader: Uploader<'_>,
) -> Result<(Vec<Option<Digest>>, PublishReport), PublishError> {
    let (client, concurrency) = (uploader.client, uploader.concurrency);
    let (chunks, mut report) = hash_and_upload(args, size, Some(stored), uploader).await?;
    let digests: Vec<Digest> = stored.stored_chunks().map(|(_, d)| d).collect();
    let missing: HashSet<Digest> = client.missing(&digests).await?.into_iter().collect();
    let mut first = HashSet::new();
    let todo: Vec<(usize, Digest)> = stored
        .stored_chunks()
        .filter(|(_, d)| missing.contains(d) && first.insert(*d))
        .collect();
    let sent: Vec<u64> = stream::iter(todo)
        .map(|(index, digest)| {
            let path = args.image.clone();
            let (offset, len) = (index as u64 * args.chunk_size, stored.chunk_len(index));
            async move {
                let bytes = blocking(move || read_verified(&path, offset, len, digest)).await?;
                put_with_retry(client, &digest, bytes).await?;
                Ok::<u64, PublishError>(len)
            }
        })
        .buffer_unordered(concurrency)
        .try_collect()
        .await?;
    report.uploaded_chunks = sent.len();
    report.uploaded_bytes = sent.iter().sum();
    report.present_chunks -= report.present_chunks.min(sent.len());
    Ok((chunks, report))
}

/// Reads one chunk again and checks it still has the digest it had when hashed.
fn read_verified(
    path: &Path,
    offset: u64,
    len: u64,
    digest: Digest,
) -> Result<Bytes, PublishError> {
    let read_error = |source| PublishError::Read {
        path: path.to_path_buf(),
        offset,
        source,
    };
    let mut buf = vec![0u8; len as usize];
    std::fs::File::open(path)
        .and_then(|f| std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, offset))
        .map_err(read_error)?;
    if Digest::of(&buf) != digest {
        return Err(read_error(std::io::Error::other(
            "the image changed while it was being published",
        )));
    }
    Ok(Bytes::from(buf))
}

fn exists(template: &str, detail: String) -> PublishError {
    PublishError::Exists {
        template: template.to_string(),
        detail,
    }
}

/// How a stored manifest differs from the one about to be built, in what is known
/// before hashing (size, chunk size, parent, labels).
fn header_difference(stored: &Manifest, wanted: &Manifest) -> Option<String> {
    if stored.size != wanted.size {
        Some(format!(
            "stored size {}, image size {}",
            stored.size, wanted.size
        ))
    } else if stored.chunk_size != wanted.chunk_size {
        Some(format!(
            "stored chunk size {}, requested {}",
            stored.chunk_size, wanted.chunk_size
        ))
    } else if stored.parent != wanted.parent {
        Some(format!(
            "stored parent {:?}, requested {:?}",
            stored.parent, wanted.parent
        ))
    } else if stored.labels != wanted.labels {
        Some("labels differ".to_string())
    } else {
        None
    }
}

/// Checks the image and returns its size: a non-zero multiple of 4096, and, when it
/// is ext4, 4096-byte blocks. Other content is published with a warning.
fn inspect_image(path: &Path) -> Result<u64, PublishError> {
    let open = |source| PublishError::Open {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(open)?;
    let size = file.metadata().map_err(open)?.len();
    if size == 0 || size % BLOCK_SIZE != 0 {
        return Err(PublishError::Size {
            path: path.to_path_buf(),
            size,
            suggested: size.div_ceil(BLOCK_SIZE).max(1) * BLOCK_SIZE,
        });
    }
    let mut superblock = [0u8; 64];
    let read = file
        .seek(SeekFrom::Start(EXT4_SUPERBLOCK))
        .and_then(|_| file.read_exact(&mut superblock));
    let magic = read.ok().map(|()| {
        u16::from_le_bytes([
            superblock[EXT4_MAGIC_OFFSET],
            superblock[EXT4_MAGIC_OFFSET + 1],
        ])
    });
    if magic != Some(EXT4_MAGIC) {
        eprintln!(
            "warning: {} is not an ext4 image (no ext4 superblock); publishing its bytes as they are",
            path.display()
        );
        return Ok(size);
    }
    let log = u32::from_le_bytes([
        superblock[EXT4_LOG_BLOCK_SIZE],
        superblock[EXT4_LOG_BLOCK_SIZE + 1],
        superblock[EXT4_LOG_BLOCK_SIZE + 2],
        superblock[EXT4_LOG_BLOCK_SIZE + 3],
    ]);
    let block_size = 1024u64.checked_shl(log).unwrap_or(0);
    if block_size != REQUIRED_BLOCK_SIZE {
        return Err(PublishError::BlockSize {
            path: path.to_path_buf(),
            block_size,
        });
    }
    Ok(size)
}

/// One chunk after hashing.
struct Hashed {
    index: usize,
    /// `None` for an all-zero chunk.
    digest: Option<Digest>,
    /// The chunk's bytes; empty for a hole of a sparse image.
    bytes: Bytes,
    /// The chunk's length in the image (holes included), for progress.
    len: u64,
}

/// Runs the pipeline and returns every chunk's digest in order.
async fn hash_and_upload(
    args: &PublishArgs,
    size: u64,
    existing: Option<&Manifest>,
    mut uploader: Uploader<'_>,
) -> Result<(Vec<Option<Digest>>, PublishReport), PublishError> {
    let chunk_size = args.chunk_size;
    let depth = (PIPELINE_BYTES / chunk_size).clamp(1, 64) as usize;
    let (read_tx, read_rx) = mpsc::channel(depth);
    let (hashed_tx, mut hashed_rx) = mpsc::channel(depth);
    let path = args.image.clone();
    let reader = tokio::task::spawn_blocking(move || read_chunks(&path, size, chunk_size, read_tx));
    // Hashing more chunks at once than there are cores only holds more memory.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let hasher = tokio::spawn(hash_chunks(
        read_rx,
        hashed_tx,
        uploader.concurrency.min(cores),
        (size, chunk_size),
    ));

    let mut chunks = Vec::with_capacity(size.div_ceil(chunk_size) as usize);
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
    Ok((chunks, uploader.report))
}

/// The hashing stage: its own task, so hashing goes on while the uploader waits on
/// the network. Stops at the first error or when the uploader is gone.
async fn hash_chunks(
    mut read_rx: mpsc::Receiver<Result<(usize, Bytes), PublishError>>,
    hashed_tx: mpsc::Sender<Result<Hashed, PublishError>>,
    concurrency: usize,
    (size, chunk_size): (u64, u64),
) {
    let hashed = stream::poll_fn(move |cx| read_rx.poll_recv(cx))
        .map(|read| async move {
            let (index, bytes) = read?;
            let mut hashed = blocking(move || Ok(hash_chunk(index, bytes))).await?;
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

fn hash_chunk(index: usize, bytes: Bytes) -> Hashed {
    let digest = if bytes.iter().all(|b| *b == 0) {
        None
    } else {
        Some(Digest::of(&bytes))
    };
    let len = bytes.len() as u64;
    Hashed {
        index,
        digest,
        bytes,
        len,
    }
}

/// Gathers hashed chunks into batches, asks the store which it lacks, uploads those.
struct Uploader<'a> {
    client: &'a StoreClient,
    concurrency: usize,
    progress: &'a Progress,
    /// Chunks waiting for the next `missing` query.
    batch: Vec<(Digest, Bytes)>,
    batch_bytes: u64,
    /// Digests already queued, uploaded or found present: a repeated chunk is sent once.
    seen: HashSet<Digest>,
    report: PublishReport,
}

impl<'a> Uploader<'a> {
    fn new(client: &'a StoreClient, concurrency: usize, progress: &'a Progress) -> Uploader<'a> {
        Uploader {
            client,
            concurrency,
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
        let (client, progress) = (self.client, self.progress);
        let sent: Vec<u64> = stream::iter(upload)
            .map(|(digest, bytes)| async move {
                let len = bytes.len() as u64;
                put_with_retry(client, &digest, bytes).await?;
                progress.inc(len);
                Ok::<u64, PublishError>(len)
            })
            .buffer_unordered(self.concurrency)
            .try_collect()
            .await?;
        self.report.uploaded_chunks += sent.len();
        self.report.uploaded_bytes += sent.iter().sum::<u64>();
        Ok(())
    }
}

/// Uploads one chunk, retrying when the store was unreachable for a moment.
async fn put_with_retry(
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

async fn blocking<T, F>(f: F) -> Result<T, PublishError>
where
    F: FnOnce() -> Result<T, PublishError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| PublishError::Task(e.to_string()))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn image_with_superblock(log_block_size: u32, magic: u16) -> tempfile::NamedTempFile {
        let mut data = vec![0u8; 8192];
        let sb = EXT4_SUPERBLOCK as usize;
        data[sb + EXT4_LOG_BLOCK_SIZE..sb + EXT4_LOG_BLOCK_SIZE + 4]
            .copy_from_slice(&log_block_size.to_le_bytes());
        data[sb + EXT4_MAGIC_OFFSET..sb + EXT4_MAGIC_OFFSET + 2]
            .copy_from_slice(&magic.to_le_bytes());
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&data).unwrap();
        f
    }

    #[test]
    fn block_size_is_checked() {
        let ok = image_with_superblock(2, EXT4_MAGIC);
        assert_eq!(inspect_image(ok.path()).unwrap(), 8192);
        let small = image_with_superblock(0, EXT4_MAGIC);
        let err = inspect_image(small.path()).unwrap_err().to_string();
        assert!(
            err.contains("1024-byte blocks") && err.contains("mkfs.ext4 -b 4096"),
            "{err}"
        );
        let raw = image_with_superblock(0, 0);
        assert_eq!(inspect_image(raw.path()).unwrap(), 8192);
    }

    #[test]
    fn zero_chunks_have_no_digest() {
        assert!(hash_chunk(0, Bytes::from(vec![0u8; 4096])).digest.is_none());
        let h = hash_chunk(1, Bytes::from_static(b"abc"));
        assert_eq!(h.digest, Some(Digest::of(b"abc")));
    }
}
