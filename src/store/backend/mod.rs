//! The store's storage engines and what they share: errors, put outcomes, durability
//! and the manifest and trace rules.
//!
//! # Layout
//! - `dir`: [`DirBackend`], a local directory with crash-safe writes (the default).
//! - `object`: [`ObjectBackend`], a bucket of S3-compatible object storage (the
//!   distributed engine for fleets).
//! - `gc` and `object_gc`: each engine's sweep of unreferenced chunks.
//! - `bucket_url`: the `--backend s3://...` URL and the credentials from the environment.
//! - This file: [`Backend`], the enum the API calls, which hands every operation to
//!   the engine it holds.
//!
//! Both engines keep the same keys (`manifests/<id>.json`, its signature
//! `manifests/<id>.sig` when it is signed ([`crate::trust`]), `chunks/<2 hex>/<64 hex>`,
//! `traces/<id>.json`) and the same rules: a chunk is stored only after its body
//! hashes to its digest; a manifest is immutable once stored.

use std::collections::{HashMap, HashSet};
use std::io;
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use lazyblk_cache::encoding::StoredVerifier;
use lazyblk_cache::{Digest, Manifest, ManifestError};

use super::{Durability, GcReport, TemplateSummary, TraceDoc};
use crate::trust::{ManifestSignature, TrustError};

mod bucket_url;
pub mod clouds;
mod confirm;
mod dir;
mod dir_files;
mod docs;
pub use docs::{random_u64, DocChange, DocVersion};
mod gc;
mod object;
mod object_gc;
mod scrub;

pub use dir::DirBackend;
pub use object::ObjectBackend;

/// Templates summarized at once for a listing.
const LISTING_CONCURRENCY: usize = 16;

/// The largest chunk body accepted: the largest chunk size a manifest may have.
pub const MAX_CHUNK_BODY: u64 = lazyblk_cache::manifest::MAX_CHUNK_SIZE as u64;

/// Whether stored bytes are chunk `digest` (raw, or a zstd frame of it; see
/// [`lazyblk_cache::encoding`]).
/// `range` of a chunk of `len` bytes, clipped to its end (the whole chunk without one);
/// a range that starts at or past the end is refused.
pub(super) fn clip_range(
    range: Option<Range<u64>>,
    len: u64,
    digest: &Digest,
) -> Result<Range<u64>, BackendError> {
    match range {
        None => Ok(0..len),
        Some(r) if r.start < len && r.start < r.end => Ok(r.start..r.end.min(len)),
        Some(r) => Err(BackendError::Unsatisfiable {
            digest: *digest,
            len,
            start: r.start,
        }),
    }
}

/// A stored chunk opened for reading: its bytes (of the range asked for), its whole
/// length, and the range of it the stream holds.
pub struct OpenChunk {
    pub stream: ChunkStream,
    pub len: u64,
    pub range: Range<u64>,
}

pub fn is_chunk(stored: &[u8], digest: &Digest) -> bool {
    let mut verifier = StoredVerifier::new(MAX_CHUNK_BODY);
    verifier.update(stored);
    verifier.finish(digest).is_ok()
}

/// The error for an upload that is not the chunk it names (or could not be decoded to
/// tell, which is not the client's fault).
pub(super) fn not_the_chunk(
    digest: &Digest,
    e: lazyblk_cache::encoding::DecodeError,
) -> BackendError {
    match e {
        lazyblk_cache::encoding::DecodeError::Unavailable(detail) => BackendError::Task(detail),
        e => BackendError::DigestMismatch {
            expected: *digest,
            detail: e.to_string(),
        },
    }
}

/// A stored chunk's bytes as they are read.
pub type ChunkStream = BoxStream<'static, io::Result<Bytes>>;

/// Why a store operation failed; the API maps each variant to an HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// No manifest is stored under this id.
    #[error("unknown template {0}")]
    UnknownTemplate(String),
    /// No trace is stored for this template.
    #[error("no trace recorded for template {0}")]
    NoTrace(String),
    /// A manifest (or id) that breaks the format's rules.
    #[error(transparent)]
    InvalidManifest(#[from] ManifestError),
    /// A different manifest already has this id; manifests are immutable.
    #[error(
        "template {template} already exists with other content ({detail}); publish under a new id"
    )]
    Conflict { template: String, detail: String },
    /// A trace document that does not parse or names chunks the template lacks.
    #[error("invalid trace for template {template}: {reason}")]
    InvalidTrace { template: String, reason: String },
    /// The uploaded bytes (decoded, when they are a zstd frame) do not hash to the
    /// digest they were sent under.
    #[error("the body is not chunk {expected}: {detail}")]
    DigestMismatch { expected: Digest, detail: String },
    /// A manifest's signature that is malformed or not of the manifest's bytes.
    #[error(transparent)]
    Signature(#[from] TrustError),
    /// A body larger than its limit.
    #[error("{what} exceeds {limit} bytes")]
    TooLarge { what: String, limit: u64 },
    /// The client's body could not be read to its end.
    #[error("reading the body of {what}: {detail}")]
    Body { what: String, detail: String },
    /// A stored manifest that no longer parses (disk corruption or a hand edit).
    #[error("stored manifest {path} is unreadable: {source}")]
    Corrupt {
        path: PathBuf,
        source: ManifestError,
    },
    /// A file operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// An object storage request failed (after the client's own retries).
    #[error("{op} {key} in object storage: {source}")]
    Object {
        op: &'static str,
        key: String,
        source: object_store::Error,
    },
    /// A byte range that starts at or past the end of the chunk.
    #[error("chunk {digest} is {len} bytes; range {start}.. is past its end")]
    Unsatisfiable {
        digest: Digest,
        len: u64,
        start: u64,
    },
    /// A `--backend` URL that cannot be used.
    #[error("backend {url}: {reason}")]
    Config { url: String, reason: String },
    /// A control-plane document kept changing under this server's updates.
    #[error("{doc} changed under {attempts} tries to update it (other store servers writing it); try again")]
    Contended { doc: String, attempts: u32 },
    /// A gc could not run (another runs through another store process) or stopped
    /// (it lost its marker to another).
    #[error("{0}")]
    GcRunning(String),
    /// A blocking task died (a panic in disk code).
    #[error("store task failed: {0}")]
    Task(String),
}

/// What `put_manifest` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ManifestPut {
    Created,
    /// A manifest with the same content was already stored.
    Unchanged,
}

/// What `put_chunk` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkPut {
    /// Verified and stored; the chunk's length.
    Stored(u64),
    /// The store already had it; nothing was written.
    Present,
}

/// The store's engine, chosen at start-up by `--root` or `--backend`.
pub enum Backend {
    Dir(DirBackend),
    Object(ObjectBackend),
}

/// Hands one call to whichever engine the [`Backend`] holds.
macro_rules! dispatch {
    ($self:ident, $engine:ident => $call:expr) => {
        match $self {
            Backend::Dir($engine) => $call,
            Backend::Object($engine) => $call,
        }
    };
}

/// The object engine over `url` (`s3://BUCKET/PREFIX?endpoint=URL`).
pub fn object_backend(url: &str) -> Result<Backend, BackendError> {
    ObjectBackend::open(url).map(Backend::Object)
}

impl Backend {
    /// The ids of every stored manifest (no summaries: one listing request).
    pub async fn ids(&self) -> Result<Vec<String>, BackendError> {
        dispatch!(self, b => b.ids().await)
    }

    /// A chunk source that reads this engine's chunks directly (object storage only).
    pub fn object_source(&self, name: &str) -> Option<lazyblk_cache::ObjectSource> {
        match self {
            Backend::Object(o) => Some(lazyblk_cache::ObjectSource::new(
                o.store.clone(),
                o.prefix.as_ref(),
                name,
            )),
            Backend::Dir(_) => None,
        }
    }

    /// The stored manifest bytes of `id`, if any.
    pub async fn manifest_bytes(&self, id: &str) -> Result<Option<Vec<u8>>, BackendError> {
        dispatch!(self, b => b.manifest_bytes(id).await)
    }

    /// The signature kept beside the manifest of `id`, if it is signed. A `.sig` that
    /// does not parse is returned as an error, not as "unsigned".
    pub async fn manifest_signature(
        &self,
        id: &str,
    ) -> Result<Option<ManifestSignature>, BackendError> {
        let doc = dispatch!(self, b => b.signature_bytes(id).await)?;
        match doc {
            None => Ok(None),
            Some(doc) => Ok(Some(ManifestSignature::parse(id, &doc)?)),
        }
    }

    /// Stores a manifest (and its signature, checked against the body) unless one with
    /// other content has this id. Its labels must
    /// follow `lazyblk_cache::labels` (checked here, on the way in, and not when a
    /// manifest is read, so a store's older manifests stay readable).
    pub async fn put_manifest(
        &self,
        id: &str,
        body: &[u8],
        signature: Option<&ManifestSignature>,
    ) -> Result<ManifestPut, BackendError> {
        /// The labels alone; the rest of the manifest is checked by the backend.
        #[derive(serde::Deserialize)]
        struct Labels {
            #[serde(default)]
            labels: std::collections::BTreeMap<String, String>,
        }
        if let Ok(Labels { labels }) = serde_json::from_slice::<Labels>(body) {
            lazyblk_cache::labels::validate_labels(labels.iter()).map_err(|reason| {
                ManifestError::Invalid {
                    template: id.to_string(),
                    reason,
                }
            })?;
        }
        dispatch!(self, b => b.put_manifest(id, body, signature).await)
    }

    /// Removes a template's manifest and trace; its chunks stay until gc.
    pub async fn delete(&self, id: &str) -> Result<(), BackendError> {
        dispatch!(self, b => b.delete(id).await)
    }

    /// The stored trace of `id`.
    pub async fn trace_bytes(&self, id: &str) -> Result<Vec<u8>, BackendError> {
        dispatch!(self, b => b.trace_bytes(id).await)
    }

    /// Stores (or replaces) the trace of `id` after checking it against the manifest.
    pub async fn put_trace(&self, id: &str, body: &[u8]) -> Result<(), BackendError> {
        dispatch!(self, b => b.put_trace(id, body).await)
    }

    /// Every template's summary, sorted by id. Unreadable manifests are skipped with a
    /// warning so one bad manifest does not hide the rest.
    pub async fn list(&self) -> Result<Vec<TemplateSummary>, BackendError> {
        let ids = dispatch!(self, b => b.ids().await)?;
        // Summaries not kept yet (after a restart) read manifests and look for chunks:
        // several at once, in the listing's order.
        let summaries: Vec<(String, Result<TemplateSummary, BackendError>)> =
            futures::stream::iter(ids)
                .map(|id| async move {
                    let summary = self.summary(&id).await;
                    (id, summary)
                })
                .buffered(LISTING_CONCURRENCY)
                .collect()
                .await;
        let mut out = Vec::with_capacity(summaries.len());
        for (id, summary) in summaries {
            match summary {
                Ok(summary) => out.push(summary),
                // Deleted between the listing and the read.
                Err(BackendError::UnknownTemplate(_)) => {}
                Err(e) => tracing::warn!("skipping template {id} in the listing: {e}"),
            }
        }
        Ok(out)
    }

    /// The summary of one template, with its durability.
    pub async fn summary(&self, id: &str) -> Result<TemplateSummary, BackendError> {
        dispatch!(self, b => b.summary(id).await)
    }

    /// Whether the chunk is stored, and its length.
    pub async fn chunk_len(&self, digest: &Digest) -> Result<Option<u64>, BackendError> {
        dispatch!(self, b => b.chunk_len(digest).await)
    }

    /// A stored chunk as a stream of its bytes (of `range` of them, clipped to its end),
    /// with its whole length and the range served.
    pub async fn open_chunk(
        &self,
        digest: &Digest,
        range: Option<Range<u64>>,
    ) -> Result<Option<OpenChunk>, BackendError> {
        dispatch!(self, b => b.open_chunk(digest, range).await)
    }

    /// The digests the store lacks, in the order given, without repeats.
    pub async fn missing(&self, digests: Vec<Digest>) -> Result<Vec<Digest>, BackendError> {
        dispatch!(self, b => b.missing(digests).await)
    }

    /// Stores a chunk body only when it hashes to `digest`.
    pub async fn put_chunk<S, E>(&self, digest: Digest, body: S) -> Result<ChunkPut, BackendError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        dispatch!(self, b => b.put_chunk(digest, body).await)
    }

    /// Hashes every stored chunk and deletes those whose bytes do not match their names.
    pub async fn scrub(&self) -> Result<lazyblk_cache::ScrubReport, BackendError> {
        dispatch!(self, b => b.scrub().await)
    }

    /// Deletes chunks no manifest references (nor `keep` names) and that are older than
    /// `grace`.
    pub async fn gc(
        &self,
        grace: Duration,
        keep: HashSet<Digest>,
    ) -> Result<GcReport, BackendError> {
        dispatch!(self, b => b.gc(grace, keep.clone()).await)
    }
}

/// Checks a trace document against its template's manifest; the bytes to store.
/// A manifest to store: parsed, and the bytes to keep. A signed manifest is kept
/// exactly as it was signed (its signature checked first); an unsigned one is written
/// in the canonical form, with the time of publication if it has none.
pub(super) fn manifest_to_store(
    id: &str,
    body: &[u8],
    signature: Option<&ManifestSignature>,
) -> Result<(Manifest, Vec<u8>), BackendError> {
    let mut manifest = Manifest::parse(body, Some(id))?;
    if let Some(sig) = signature {
        sig.verify(id, body)?;
        return Ok((manifest, body.to_vec()));
    }
    if manifest.created_at.is_empty() {
        manifest.created_at =
            humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    }
    let bytes = manifest.to_json();
    Ok((manifest, bytes))
}

fn check_trace(id: &str, manifest: &Manifest, body: &[u8]) -> Result<Vec<u8>, BackendError> {
    let invalid = |reason: String| BackendError::InvalidTrace {
        template: id.to_string(),
        reason,
    };
    let doc: TraceDoc = serde_json::from_slice(body).map_err(|e| invalid(e.to_string()))?;
    doc.check(id, manifest)
        .map_err(|e| invalid(e.to_string()))?;
    serde_json::to_vec(&doc).map_err(|e| invalid(e.to_string()))
}

/// Reads and discards a body of up to `limit` bytes (more is left for the connection
/// to drop).
pub async fn drain<S, E>(mut body: S, limit: u64)
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
{
    let mut len = 0u64;
    while let Some(Ok(piece)) = body.next().await {
        len += piece.len() as u64;
        if len > limit {
            return;
        }
    }
}

/// Summaries of templates found DURABLE, shared by both engines: a durable template
/// stays durable while it exists (gc keeps what a manifest references), so its summary
/// is not computed again until it is deleted.
#[derive(Default)]
pub(crate) struct DurableSummaries(std::sync::Mutex<HashMap<String, TemplateSummary>>);

impl DurableSummaries {
    /// The kept summary of `id`; the caller checks that the template still exists.
    pub(crate) fn get(&self, id: &str) -> Option<TemplateSummary> {
        self.0.lock().ok().and_then(|d| d.get(id).cloned())
    }

    /// Keeps `summary` if it is DURABLE.
    pub(crate) fn keep(&self, id: &str, summary: &TemplateSummary) {
        if summary.durability == Durability::Durable {
            if let Ok(mut durable) = self.0.lock() {
                durable.insert(id.to_string(), summary.clone());
            }
        }
    }

    /// Drops every kept summary (a scrub deleted chunks: a template may no longer be
    /// DURABLE).
    pub(crate) fn clear(&self) {
        if let Ok(mut durable) = self.0.lock() {
            durable.clear();
        }
    }

    /// Drops what was kept of `id` (it was deleted).
    pub(crate) fn forget(&self, id: &str) {
        if let Ok(mut durable) = self.0.lock() {
            durable.remove(id);
        }
    }
}

/// The summary of `manifest`; `is_stored` says whether the store holds a chunk.
fn summarize(
    manifest: &Manifest,
    parent: Option<&Manifest>,
    mut is_stored: impl FnMut(&Digest) -> bool,
) -> TemplateSummary {
    let mut present: HashMap<Digest, bool> = HashMap::new();
    let mut present_chunks = 0;
    for (_, digest) in manifest.stored_chunks() {
        let here = *present.entry(digest).or_insert_with(|| is_stored(&digest));
        present_chunks += usize::from(here);
    }
    let stored_chunks = manifest.stored_chunks().count();
    let inherited: HashSet<Digest> = parent
        .map(|p| p.stored_chunks().map(|(_, d)| d).collect())
        .unwrap_or_default();
    let own: Vec<bool> = present
        .iter()
        .filter(|(d, _)| !inherited.contains(d))
        .map(|(_, here)| *here)
        .collect();
    // A template that adds no chunks of its own is as durable as the ones it reuses.
    let judged: Vec<bool> = if own.is_empty() {
        present.values().copied().collect()
    } else {
        own
    };
    let durability = if present_chunks == stored_chunks {
        Durability::Durable
    } else if judged.iter().any(|here| *here) {
        Durability::Uploading
    } else {
        Durability::OriginOnly
    };
    TemplateSummary {
        template: manifest.template.clone(),
        size: manifest.size,
        chunk_size: manifest.chunk_size,
        chunks: manifest.chunk_count(),
        stored_chunks,
        stored_bytes: manifest.stored_bytes(),
        present_chunks,
        parent: manifest.parent.clone(),
        replicas: None,
        stale: false,
        stale_because: None,
        labels: manifest.labels.clone(),
        origins: manifest.origins.clone(),
        created_at: manifest.created_at.clone(),
        durability,
    }
}

/// Says how two manifests with one id differ, for the 409 message.
fn difference(stored: &Manifest, offered: &Manifest) -> String {
    if stored.size != offered.size {
        return format!("stored size {}, offered {}", stored.size, offered.size);
    }
    if stored.chunk_size != offered.chunk_size {
        return format!(
            "stored chunk size {}, offered {}",
            stored.chunk_size, offered.chunk_size
        );
    }
    if let Some(i) = (0..stored.chunks.len()).find(|&i| stored.chunks[i] != offered.chunks[i]) {
        return format!("chunk {i} differs");
    }
    if stored.parent != offered.parent {
        return format!(
            "stored parent {:?}, offered {:?}",
            stored.parent, offered.parent
        );
    }
    "labels differ".to_string()
}

#[cfg(test)]
#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(id: &str, chunks: &[Option<&[u8]>], parent: Option<&str>) -> Manifest {
        let mut m = Manifest::new(id, chunks.len() as u64 * 65536, 65536);
        for (i, c) in chunks.iter().enumerate() {
            m.chunks[i] = c.map(Digest::of);
        }
        m.parent = parent.map(str::to_string);
        m
    }

    #[test]
    fn durability_follows_the_stored_chunks() {
        let mut stored = HashSet::new();
        let parent = manifest("base", &[Some(b"a"), Some(b"b")], None);
        let child = manifest("child", &[Some(b"a"), Some(b"c"), None], Some("base"));
        let sum = |s: &HashSet<Digest>, m: &Manifest, p: Option<&Manifest>| {
            summarize(m, p, |d: &Digest| s.contains(d))
        };
        let d = |s: &HashSet<Digest>, m: &Manifest, p| sum(s, m, p).durability;
        assert_eq!(d(&stored, &child, Some(&parent)), Durability::OriginOnly);
        stored.insert(Digest::of(b"a"));
        // The parent's chunk is there, the child's own one is not.
        assert_eq!(d(&stored, &child, Some(&parent)), Durability::OriginOnly);
        assert_eq!(d(&stored, &parent, None), Durability::Uploading);
        stored.insert(Digest::of(b"c"));
        let s = sum(&stored, &child, Some(&parent));
        assert_eq!(
            (s.durability, s.present_chunks, s.stored_chunks),
            (Durability::Durable, 2, 2)
        );
    }

    #[test]
    fn differences_are_named() {
        let a = manifest("t", &[Some(b"a"), Some(b"b")], None);
        let b = manifest("t", &[Some(b"a"), Some(b"x")], None);
        assert_eq!(difference(&a, &b), "chunk 1 differs");
    }
}
