//! The store read and written directly in object storage (`s3://BUCKET/PREFIX?...`),
//! without a store server: the operations of [`StoreClient`] over the same engine
//! `lazyblk store --backend` runs, in this process, with the same keys. A daemon on
//! an object store needs no store process; publish can write straight to the bucket
//! (the manifest created only if absent, as far as the object store honours that: see
//! docs/fleet.md, "The object store, read directly").

use bytes::Bytes;
use lazyblk_cache::{Digest, Manifest, ObjectSource};

use super::backend::{Backend, BackendError, ManifestPut};
use super::error::{parse_manifest, PutOutcome, SignedManifest, StoreError};
use super::TraceDoc;
use crate::trust::ManifestSignature;

/// Whether `url` names an object store rather than a store server.
pub fn is_object_url(url: &str) -> bool {
    url.starts_with("s3://") || super::backend::clouds::is_cloud_url(url)
}

/// A bucket prefix, opened once.
pub struct Direct {
    backend: Backend,
    url: String,
}

impl Direct {
    pub fn open(url: &str) -> Result<Direct, StoreError> {
        let backend = super::backend::object_backend(url).map_err(|e| StoreError::Object {
            url: url.to_string(),
            detail: e.to_string(),
        })?;
        Ok(Direct {
            backend,
            url: url.to_string(),
        })
    }

    fn err(&self, e: BackendError) -> StoreError {
        match e {
            BackendError::Conflict { template, detail } => {
                StoreError::Conflict { template, detail }
            }
            other => StoreError::Object {
                url: self.url.clone(),
                detail: other.to_string(),
            },
        }
    }

    /// The chunk source over the bucket.
    pub fn chunk_source(&self) -> Option<ObjectSource> {
        self.backend.object_source(&self.url)
    }

    pub async fn manifest(&self, id: &str) -> Result<Option<Manifest>, StoreError> {
        let Some(bytes) = self
            .backend
            .manifest_bytes(id)
            .await
            .map_err(|e| self.err(e))?
        else {
            return Ok(None);
        };
        parse_manifest(&bytes, id, &self.url).map(Some)
    }

    pub async fn template_ids(&self) -> Result<Vec<String>, StoreError> {
        self.backend.ids().await.map_err(|e| self.err(e))
    }

    pub async fn templates(&self) -> Result<Vec<super::TemplateSummary>, StoreError> {
        self.backend.list().await.map_err(|e| self.err(e))
    }

    /// The manifest of `id` as stored, with its signature (see
    /// [`StoreClient::signed_manifest`](super::client::StoreClient::signed_manifest)).
    pub async fn signed_manifest(&self, id: &str) -> Result<Option<SignedManifest>, StoreError> {
        // The signature first, as the store server reads them (see its GET).
        let signature = match self.backend.manifest_signature(id).await {
            Ok(sig) => Ok(sig),
            Err(BackendError::Signature(e)) => Err(e),
            Err(e) => return Err(self.err(e)),
        };
        let Some(bytes) = self
            .backend
            .manifest_bytes(id)
            .await
            .map_err(|e| self.err(e))?
        else {
            return Ok(None);
        };
        Ok(Some(SignedManifest {
            manifest: parse_manifest(&bytes, id, &self.url)?,
            bytes,
            signature,
        }))
    }

    pub async fn put_manifest(
        &self,
        id: &str,
        bytes: &[u8],
        signature: Option<&ManifestSignature>,
    ) -> Result<PutOutcome, StoreError> {
        match self.backend.put_manifest(id, bytes, signature).await {
            Ok(ManifestPut::Created) => Ok(PutOutcome::Created),
            Ok(ManifestPut::Unchanged) => Ok(PutOutcome::Unchanged),
            Err(e) => Err(self.err(e)),
        }
    }

    pub async fn missing(&self, digests: &[Digest]) -> Result<Vec<Digest>, StoreError> {
        self.backend
            .missing(digests.to_vec())
            .await
            .map_err(|e| self.err(e))
    }

    pub async fn put_chunk(&self, digest: &Digest, bytes: Bytes) -> Result<(), StoreError> {
        let body = futures::stream::iter([Ok::<Bytes, std::io::Error>(bytes)]);
        self.backend
            .put_chunk(*digest, body)
            .await
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    pub async fn trace(&self, id: &str) -> Result<Option<TraceDoc>, StoreError> {
        match self.backend.trace_bytes(id).await {
            Ok(bytes) => serde_json::from_slice::<TraceDoc>(&bytes)
                .map(Some)
                .map_err(|e| StoreError::Object {
                    url: self.url.clone(),
                    detail: format!("the trace of {id}: {e}"),
                }),
            Err(BackendError::NoTrace(_)) | Err(BackendError::UnknownTemplate(_)) => Ok(None),
            Err(e) => Err(self.err(e)),
        }
    }

    pub async fn put_trace(&self, id: &str, doc: &TraceDoc) -> Result<(), StoreError> {
        let body = serde_json::to_vec(doc).map_err(|e| StoreError::Object {
            url: self.url.clone(),
            detail: e.to_string(),
        })?;
        self.backend
            .put_trace(id, &body)
            .await
            .map_err(|e| self.err(e))
    }

    pub async fn delete(&self, id: &str) -> Result<(), StoreError> {
        self.backend.delete(id).await.map_err(|e| self.err(e))
    }
}
