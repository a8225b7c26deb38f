//! The store's storage engines and what they share: errors, put outcomes, durability
//! and the manifest and trace rules.
//!
//! # Layout
//! - `dir`: [`DirBackend`], a local directory with crash-safe writes (the default).
//! - `object`: [`ObjectBackend`], a bucket of S3-compatible object storage (the
//!   distributed engine for fleets).
//! - `gc` and `object_gc`: each engine's sweep of unreferenced chunks.
//! - `bucket_url`: the `--backend s3://...` URL and the credentials from the environment.
//! - `error`: [`BackendError`] and what a put did ([`ManifestPut`], [`ChunkPut`]).
//! - `chunk`: the chunk rules both engines keep (verify, ranges, the read stream).
//! - `accept`: the checks a manifest or a trace passes before either engine stores it.
//! - `summary`: a template's summary and durability, and the DURABLE ones kept.
//! - This file: [`Backend`], the enum the API calls, which hands every operation to
//!   the engine it holds.
//!
//! Both engines keep the same keys (`manifests/<id>.json`, its signature
//! `manifests/<id>.sig` when it is signed ([`crate::trust`]), `chunks/<2 hex>/<64 hex>`,
//! `traces/<id>.json`) and the same rules: a chunk is stored only after its body
//! hashes to its digest; a manifest is immutable once stored.

use std::collections::HashSet;
use std::ops::Range;
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use lazyblk_cache::{Digest, ManifestError};

use super::{GcReport, TemplateSummary};
use crate::trust::ManifestSignature;

mod accept;
mod bucket_url;
mod chunk;
pub mod clouds;
mod confirm;
mod dir;
mod dir_files;
mod docs;
pub use docs::{random_u64, DocChange, DocVersion};
mod error;
mod gc;
mod object;
mod object_gc;
mod scrub;
mod summary;

pub use chunk::{drain, OpenChunk, MAX_CHUNK_BODY};
pub use dir::DirBackend;
pub use error::{BackendError, ChunkPut, ManifestPut};
pub use object::ObjectBackend;

/// Templates summarized at once for a listing.
const LISTING_CONCURRENCY: usize = 16;

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
