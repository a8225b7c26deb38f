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
//!
//! # Layout
//! - this module: the command, the manifest's publish and a repair of a partial one.
//! - [`args`]: its flags ([`PublishArgs`]; `build` fills them to publish its image).
//! - [`image`]: checking the image (size, ext4 block size).
//! - [`pipeline`]: reading, hashing and uploading chunks.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use bytes::Bytes;
use futures::{stream, StreamExt, TryStreamExt};
use indicatif::HumanBytes;
use lazyblk_cache::manifest::validate_chunk_size;
use lazyblk_cache::{validate_id, Digest, Manifest, ManifestError};
use serde::Serialize;

mod args;
mod image;
mod pipeline;

pub use args::PublishArgs;
use image::inspect_image;
use pipeline::{hash_and_upload, put_with_retry, Uploader};

use crate::progress::Progress;
use crate::store::client::{PutOutcome, StoreError};

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
    /// `--token-file` gave no token.
    #[error(transparent)]
    Token(#[from] crate::flags::TokenFileError),
    /// The `--signing-key` file could not be read as a key.
    #[error(transparent)]
    SigningKey(#[from] crate::identity::IdentityError),
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
    /// Their bytes, uncompressed.
    pub uploaded_bytes: u64,
    /// Their bytes as sent and stored (zstd frames where they shrink).
    pub stored_bytes: u64,
    /// Of the uploaded chunks, those stored compressed.
    pub compressed_chunks: usize,
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
            "template {} already published; uploaded {} chunks ({} bytes, {} stored) the store lacked",
            report.template, report.uploaded_chunks, report.uploaded_bytes, report.stored_bytes
        );
    } else {
        println!(
            "published {}: {} chunks ({} zero), uploaded {} chunks ({} bytes, {} stored; {} compressed), {} already in store",
            report.template,
            report.chunks,
            report.zero_chunks,
            report.uploaded_chunks,
            report.uploaded_bytes,
            report.stored_bytes,
            report.compressed_chunks,
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
    if args.no_compress {
        wanted.format = lazyblk_cache::manifest::MANIFEST_FORMAT_RAW;
    }
    wanted.parent = args.parent.clone();
    wanted.labels = args.labels.iter().cloned().collect::<BTreeMap<_, _>>();

    let mut client = crate::store::client::connect(&args.store, args.token.resolve()?, None)?;
    if let Some(path) = &args.signing_key {
        client = client.with_signer(std::sync::Arc::new(crate::identity::NodeKey::load(path)?));
    }
    let existing = client.manifest(&args.template).await?;
    if let Some(existing) = &existing {
        if let Some(detail) = header_difference(existing, &wanted) {
            return Err(exists(&args.template, detail));
        }
    }

    let concurrency = args.concurrency.max(1);
    let progress = Progress::new(&format!("publish {}", args.template), size);
    let uploader = Uploader::new(&client, concurrency, !args.no_compress, &progress);
    let outcome = match &existing {
        None => hash_and_upload(args, size, None, uploader).await,
        Some(stored) => verify_and_repair(args, size, stored, uploader).await,
    };
    let (chunks, blocks, mut report) = match outcome {
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
    wanted.blocks = blocks;
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
) -> Result<pipeline::Hashing, PublishError> {
    // A format-1 template's repairs stay raw, whatever this publish was asked.
    let raw_format = lazyblk_cache::manifest::MANIFEST_FORMAT_RAW;
    let compress = uploader.compress && stored.format > raw_format;
    if args.no_compress && stored.format > raw_format {
        tracing::warn!(template = %args.template, format = stored.format, "--no-compress: the published template's chunks may be compressed; repairs stay as it is");
    }
    let (client, concurrency) = (uploader.client, uploader.concurrency);
    let format = stored.format;
    let (chunks, _, mut report) = hash_and_upload(args, size, Some(stored), uploader).await?;
    let digests: Vec<Digest> = stored.stored_chunks().map(|(_, d)| d).collect();
    let missing: HashSet<Digest> = client.missing(&digests).await?.into_iter().collect();
    let mut first = HashSet::new();
    let todo: Vec<(usize, Digest)> = stored
        .stored_chunks()
        .filter(|(_, d)| missing.contains(d) && first.insert(*d))
        .collect();
    let sent: Vec<Sent> = stream::iter(todo)
        .map(|(index, digest)| {
            let path = args.image.clone();
            let (offset, len) = (index as u64 * args.chunk_size, stored.chunk_len(index));
            async move {
                let bytes = blocking(move || {
                    read_verified(&path, offset, len, digest)
                        .map(|b| encode_chunk(b, compress, format))
                })
                .await?;
                let sent = bytes.bytes.len() as u64;
                put_with_retry(client, &digest, bytes.bytes).await?;
                Ok::<Sent, PublishError>(Sent {
                    raw: len,
                    stored: sent,
                    compressed: bytes.compressed,
                })
            }
        })
        .buffer_unordered(concurrency)
        .try_collect()
        .await?;
    report.uploaded_chunks = sent.len();
    report.count_sent(&sent);
    report.present_chunks -= report.present_chunks.min(sent.len());
    Ok((chunks, stored.blocks.clone(), report))
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

/// A chunk as it is uploaded.
pub(super) struct Encoded {
    pub(super) bytes: Bytes,
    pub(super) compressed: bool,
}

/// The stored form of a chunk (see [`lazyblk_cache::encoding`]) for a template of
/// manifest format `format`: in blocks (3), one zstd frame (2: a repair of a format-2
/// template stays readable by the builds that wrote it), raw (1, or `compress` off).
/// Blocking: compressing 1 MiB takes milliseconds.
pub(super) fn encode_chunk(raw: Bytes, compress: bool, format: u32) -> Encoded {
    use lazyblk_cache::encoding::{encode, encode_frame, Encoding};
    if compress && format > lazyblk_cache::manifest::MANIFEST_FORMAT_RAW {
        let (encoding, stored) = if format == 2 {
            encode_frame(&raw)
        } else {
            encode(&raw)
        };
        if encoding != Encoding::Raw {
            return Encoded {
                bytes: Bytes::from(stored.into_owned()),
                compressed: true,
            };
        }
    }
    Encoded {
        bytes: raw,
        compressed: false,
    }
}

/// One chunk uploaded: its raw and stored bytes.
pub(super) struct Sent {
    pub(super) raw: u64,
    pub(super) stored: u64,
    pub(super) compressed: bool,
}

impl PublishReport {
    pub(super) fn count_sent(&mut self, sent: &[Sent]) {
        self.uploaded_bytes += sent.iter().map(|s| s.raw).sum::<u64>();
        self.stored_bytes += sent.iter().map(|s| s.stored).sum::<u64>();
        self.compressed_chunks += sent.iter().filter(|s| s.compressed).count();
    }
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

async fn blocking<T, F>(f: F) -> Result<T, PublishError>
where
    F: FnOnce() -> Result<T, PublishError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| PublishError::Task(e.to_string()))?
}
