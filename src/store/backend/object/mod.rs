//! The object storage engine of the store: manifests, chunks and traces as objects
//! under one prefix of an S3-compatible bucket (`--backend s3://BUCKET/PREFIX?endpoint=URL`).
//!
//! Object storage has no rename and no cheap "touch", so the rules the directory keeps
//! with temporary files and mtimes are kept here differently: a chunk body is received
//! into memory and hashed before a single PUT stores it (a refused body never reaches
//! the bucket), and a manifest is created with a conditional PUT (`If-None-Match: *`)
//! after a read under a lock. Servers that ignore that header (Garage 2.x does) leave
//! one race open: two store processes putting *different* manifests under one new id
//! at the same instant; the last one wins. One store process per bucket prefix closes
//! it, as its lock serializes manifest writes. Chunks confirmed to uploaders are
//! recorded in the bucket (`confirm`), so a gc through any process keeps them.
//!
//! This file holds the engine and its documents (manifests, signatures, traces);
//! `chunks` holds its chunks.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use lazyblk_cache::{Digest, Manifest};
use object_store::aws::{AmazonS3Builder, S3ConditionalPut};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig};

use super::accept::{check_trace, difference, manifest_to_store};
use super::bucket_url::{credentials, parse_url};
use super::error::{BackendError, ManifestPut};
use super::summary::{summarize, DurableSummaries};
use crate::store::TemplateSummary;
use crate::trust::ManifestSignature;

mod chunks;

/// HEAD requests in flight at once when checking which chunks the bucket holds
/// (durability, the missing list): enough to hide a round trip per chunk, few enough
/// not to look like a flood to a small self-hosted server.
pub(super) const HEAD_CONCURRENCY: usize = 32;
/// Retries of one request by the object storage client. Its default (10 retries over
/// up to 3 minutes) outlasts every caller's deadline: a daemon fetching a chunk gives
/// up and tries its next source long before.
const MAX_RETRIES: usize = 3;
/// The longest one request is retried for.
const RETRY_TIMEOUT: Duration = Duration::from_secs(30);

/// The store's bucket prefix.
pub struct ObjectBackend {
    pub(super) store: Arc<dyn ObjectStore>,
    /// Every key is under it (`PREFIX/manifests/...`); empty for the bucket's root.
    pub(super) prefix: ObjectPath,
    /// Serializes manifest writes and deletes, so "read, compare, then write" of a
    /// manifest is atomic within this process.
    pub(super) manifests_lock: tokio::sync::Mutex<()>,
    /// Summaries of DURABLE templates, as in the directory engine: only a delete changes
    /// them, so they are not recomputed with a HEAD per chunk on every listing.
    pub(super) durable: DurableSummaries,
    /// Serializes "compare, then write" of the control plane's documents when the
    /// bucket's conditional writes are not used (one store server per bucket).
    pub(super) docs_lock: tokio::sync::Mutex<()>,
    /// Whether documents are written with the bucket's conditional PUTs (shared mode,
    /// after the start-up probe said the bucket honours them).
    pub(super) conditional: std::sync::atomic::AtomicBool,
}

pub(super) fn object_err(
    op: &'static str,
    key: &ObjectPath,
) -> impl FnOnce(object_store::Error) -> BackendError {
    let key = key.to_string();
    move |source| BackendError::Object { op, key, source }
}

impl ObjectBackend {
    /// Connects to the bucket named by `url` (`s3://BUCKET/PREFIX?endpoint=URL`), with
    /// path-style requests (what self-hosted servers expect) and plain HTTP allowed
    /// when the endpoint says `http://`. Nothing is requested until the first call.
    pub fn open(url: &str) -> Result<ObjectBackend, BackendError> {
        if super::clouds::is_cloud_url(url) {
            let (store, prefix) = super::clouds::open(url)?;
            return Ok(ObjectBackend::new(store, &prefix));
        }
        let target = parse_url(url)?;
        let (key_id, secret) = credentials(url)?;
        let retry = RetryConfig {
            max_retries: MAX_RETRIES,
            retry_timeout: RETRY_TIMEOUT,
            ..RetryConfig::default()
        };
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(&target.bucket)
            .with_region(&target.region)
            .with_access_key_id(key_id)
            .with_secret_access_key(secret)
            .with_virtual_hosted_style_request(false)
            .with_conditional_put(S3ConditionalPut::ETagMatch)
            .with_retry(retry);
        if let Some(endpoint) = &target.endpoint {
            builder = builder
                .with_endpoint(endpoint)
                .with_allow_http(endpoint.starts_with("http://"));
        }
        let store = builder.build().map_err(|e| BackendError::Config {
            url: url.to_string(),
            reason: e.to_string(),
        })?;
        Ok(ObjectBackend::new(Arc::new(store), &target.prefix))
    }

    /// The engine over any object store (tests use an in-memory one).
    pub fn new(store: Arc<dyn ObjectStore>, prefix: &str) -> ObjectBackend {
        ObjectBackend {
            store,
            prefix: ObjectPath::from(prefix),
            manifests_lock: tokio::sync::Mutex::new(()),
            durable: DurableSummaries::default(),
            docs_lock: tokio::sync::Mutex::new(()),
            conditional: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Writes documents with the bucket's conditional PUTs from now on (shared mode).
    pub fn use_conditional_writes(&self) {
        self.conditional
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub(super) fn conditional(&self) -> bool {
        self.conditional.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(super) fn manifests_dir(&self) -> ObjectPath {
        self.prefix.clone().join("manifests")
    }

    fn manifest_key(&self, id: &str) -> ObjectPath {
        self.manifests_dir().join(format!("{id}.json"))
    }

    fn trace_key(&self, id: &str) -> ObjectPath {
        self.prefix
            .clone()
            .join("traces")
            .join(format!("{id}.json"))
    }

    pub(super) fn chunk_key(&self, digest: &Digest) -> ObjectPath {
        let hex = digest.to_string();
        self.prefix.clone().join("chunks").join(&hex[..2]).join(hex)
    }

    /// The whole object at `key`; `None` when it does not exist.
    pub(super) async fn get_optional(
        &self,
        key: &ObjectPath,
    ) -> Result<Option<Bytes>, BackendError> {
        let result = match self.store.get(key).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(object_err("reading", key)(e)),
        };
        result
            .bytes()
            .await
            .map(Some)
            .map_err(object_err("reading", key))
    }

    /// The stored manifest bytes of `id`, if any.
    pub async fn manifest_bytes(&self, id: &str) -> Result<Option<Vec<u8>>, BackendError> {
        let bytes = self.get_optional(&self.manifest_key(id)).await?;
        Ok(bytes.map(|b| b.to_vec()))
    }

    /// The parsed manifest of `id`, if any.
    pub async fn manifest(&self, id: &str) -> Result<Option<Manifest>, BackendError> {
        let key = self.manifest_key(id);
        match self.get_optional(&key).await? {
            None => Ok(None),
            Some(bytes) => Manifest::parse(&bytes, Some(id))
                .map(Some)
                .map_err(|source| BackendError::Corrupt {
                    path: PathBuf::from(key.to_string()),
                    source,
                }),
        }
    }

    /// The signature document kept beside the manifest of `id`, if any.
    pub async fn signature_bytes(&self, id: &str) -> Result<Option<Vec<u8>>, BackendError> {
        let bytes = self.get_optional(&self.signature_key(id)).await?;
        Ok(bytes.map(|b| b.to_vec()))
    }

    fn signature_key(&self, id: &str) -> ObjectPath {
        self.manifests_dir().join(format!("{id}.sig"))
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
            let outcome = compare(id, &existing, &manifest)?;
            // The same content signed now: the signature is kept if it is of the very
            // bytes stored (otherwise the stored manifest stays as it was).
            let stored = self.manifest_bytes(id).await?;
            if let (Some(sig), Some(true)) = (signature, stored.map(|b| b == bytes)) {
                self.put_signature(id, Some(sig)).await?;
            }
            return Ok(outcome);
        }
        // A signature left by a failure between its write and its manifest's goes too.
        self.put_signature(id, signature).await?;
        let key = self.manifest_key(id);
        let create = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        let payload = PutPayload::from(bytes);
        match self.store.put_opts(&key, payload, create).await {
            Ok(_) => {}
            // Another store process created it between the read and the write.
            Err(object_store::Error::AlreadyExists { .. }) => {
                let existing = self
                    .manifest(id)
                    .await?
                    .ok_or_else(|| BackendError::UnknownTemplate(id.to_string()))?;
                return compare(id, &existing, &manifest);
            }
            Err(e) => return Err(object_err("writing", &key)(e)),
        }
        self.durable.forget(id);
        Ok(ManifestPut::Created)
    }

    /// Writes (or, for `None`, removes) the signature of `id`.
    async fn put_signature(
        &self,
        id: &str,
        signature: Option<&ManifestSignature>,
    ) -> Result<(), BackendError> {
        let key = self.signature_key(id);
        match signature {
            Some(sig) => self
                .store
                .put(&key, PutPayload::from(sig.to_json()))
                .await
                .map(|_| ())
                .map_err(object_err("writing", &key)),
            None => match self.store.delete(&key).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(object_err("deleting", &key)(e)),
            },
        }
    }

    /// Removes a template's manifest and trace; its chunks stay.
    pub async fn delete(&self, id: &str) -> Result<(), BackendError> {
        let _guard = self.manifests_lock.lock().await;
        let key = self.manifest_key(id);
        match self.store.head(&key).await {
            Ok(_) => {}
            Err(object_store::Error::NotFound { .. }) => {
                return Err(BackendError::UnknownTemplate(id.to_string()))
            }
            Err(e) => return Err(object_err("checking", &key)(e)),
        }
        // The trace first: a trace without a manifest would be an orphan nothing lists.
        let trace = self.trace_key(id);
        match self.store.delete(&trace).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(object_err("deleting", &trace)(e)),
        }
        self.store
            .delete(&key)
            .await
            .map_err(object_err("deleting", &key))?;
        // After the manifest: a signature without its manifest is never read.
        self.put_signature(id, None).await?;
        self.durable.forget(id);
        Ok(())
    }

    /// The stored trace of `id`.
    pub async fn trace_bytes(&self, id: &str) -> Result<Vec<u8>, BackendError> {
        if self.manifest_bytes(id).await?.is_none() {
            return Err(BackendError::UnknownTemplate(id.to_string()));
        }
        self.get_optional(&self.trace_key(id))
            .await?
            .map(|b| b.to_vec())
            .ok_or_else(|| BackendError::NoTrace(id.to_string()))
    }

    /// Stores (or replaces) the trace of `id` after checking it against the manifest.
    pub async fn put_trace(&self, id: &str, body: &[u8]) -> Result<(), BackendError> {
        let manifest = self
            .manifest(id)
            .await?
            .ok_or_else(|| BackendError::UnknownTemplate(id.to_string()))?;
        let bytes = check_trace(id, &manifest, body)?;
        let key = self.trace_key(id);
        self.store
            .put(&key, PutPayload::from(bytes))
            .await
            .map_err(object_err("writing", &key))?;
        Ok(())
    }

    /// The ids of the stored manifests, sorted.
    pub async fn ids(&self) -> Result<Vec<String>, BackendError> {
        let dir = self.manifests_dir();
        let objects: Vec<_> = self
            .store
            .list(Some(&dir))
            .try_collect()
            .await
            .map_err(object_err("listing", &dir))?;
        let mut ids: Vec<String> = objects
            .iter()
            .filter_map(|o| {
                o.location
                    .filename()?
                    .strip_suffix(".json")
                    .map(String::from)
            })
            .filter(|id| lazyblk_cache::validate_id(id).is_ok())
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// The summary of one template, with its durability from HEADs of its chunks.
    pub async fn summary(&self, id: &str) -> Result<TemplateSummary, BackendError> {
        let cached = self.durable.get(id);
        if let Some(cached) = cached {
            // The cache may outlive a delete (by another store process, too).
            if self.store.head(&self.manifest_key(id)).await.is_ok() {
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
        let digests: Vec<Digest> = manifest.stored_chunks().map(|(_, d)| d).collect();
        let found = self.find(digests).await?;
        let missing: HashSet<Digest> = found
            .into_iter()
            .filter_map(|(d, here)| (!here).then_some(d))
            .collect();
        let summary = summarize(&manifest, parent.as_ref(), |d: &Digest| {
            !missing.contains(d)
        });
        self.durable.keep(id, &summary);
        Ok(summary)
    }
}

/// The outcome of putting `offered` where `stored` already is.
fn compare(id: &str, stored: &Manifest, offered: &Manifest) -> Result<ManifestPut, BackendError> {
    if stored.same_content(offered) {
        Ok(ManifestPut::Unchanged)
    } else {
        Err(BackendError::Conflict {
            template: id.to_string(),
            detail: difference(stored, offered),
        })
    }
}

#[cfg(test)]
mod tests;
