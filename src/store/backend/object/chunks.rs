//! The object engine's chunks: the length and bytes of a stored one, which the bucket
//! lacks, and an upload received into memory and verified before its single PUT.

use std::collections::HashSet;

use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use lazyblk_cache::encoding::StoredVerifier;
use lazyblk_cache::Digest;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use super::{object_err, ObjectBackend, HEAD_CONCURRENCY};
use crate::store::backend::chunk::{
    clip_range, drain, is_chunk, not_the_chunk, OpenChunk, MAX_CHUNK_BODY,
};
use crate::store::backend::error::{BackendError, ChunkPut};

impl ObjectBackend {
    /// Whether the chunk is stored, and its length.
    pub async fn chunk_len(&self, digest: &Digest) -> Result<Option<u64>, BackendError> {
        let key = self.chunk_key(digest);
        match self.store.head(&key).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(object_err("checking", &key)(e)),
        }
    }

    /// A stored chunk as a stream of its bytes, with its length.
    pub async fn open_chunk(
        &self,
        digest: &Digest,
        range: Option<std::ops::Range<u64>>,
    ) -> Result<Option<OpenChunk>, BackendError> {
        let key = self.chunk_key(digest);
        let options = object_store::GetOptions {
            range: range
                .clone()
                .map(|r| object_store::GetRange::Bounded(r.start..r.end.max(r.start + 1))),
            ..Default::default()
        };
        let result = match self.store.get_opts(&key, options).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) if range.is_some() => {
                // A range past the end: the same refusal as the directory backend's.
                if let Ok(meta) = self.store.head(&key).await {
                    clip_range(range, meta.size, digest)?;
                }
                return Err(object_err("reading", &key)(e));
            }
            Err(e) => return Err(object_err("reading", &key)(e)),
        };
        let len = result.meta.size;
        let range = result.range.clone();
        let stream = result.into_stream().map_err(std::io::Error::other).boxed();
        Ok(Some(OpenChunk { stream, len, range }))
    }

    /// The digests the bucket lacks, in the order given, without repeats. Present ones
    /// are recorded as confirmed in the bucket, so a gc through any process keeps them
    /// for the publish that asked.
    pub async fn missing(&self, digests: Vec<Digest>) -> Result<Vec<Digest>, BackendError> {
        let found = self.find_confirmed(digests).await?;
        Ok(found
            .into_iter()
            .filter(|(_, here)| !here)
            .map(|(d, _)| d)
            .collect())
    }

    /// Whether the bucket holds each of `digests` (repeats dropped), in order.
    pub(in crate::store::backend) async fn find(
        &self,
        digests: Vec<Digest>,
    ) -> Result<Vec<(Digest, bool)>, BackendError> {
        let mut seen = HashSet::with_capacity(digests.len());
        let unique: Vec<Digest> = digests.into_iter().filter(|d| seen.insert(*d)).collect();
        futures::stream::iter(unique)
            .map(|digest| async move {
                let here = self.chunk_len(&digest).await?.is_some();
                Ok::<_, BackendError>((digest, here))
            })
            .buffered(HEAD_CONCURRENCY)
            .try_collect()
            .await
    }

    /// Receives a chunk body into memory, hashing it, and stores it with one PUT only
    /// when it hashes to `digest`.
    pub async fn put_chunk<S, E>(&self, digest: Digest, body: S) -> Result<ChunkPut, BackendError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let replacing = self.chunk_len(&digest).await?.is_some();
        if replacing {
            // A stored copy that fails verification is replaced by this (verified)
            // upload: a PUT is how a damaged bucket is repaired. Publishers ask for
            // missing chunks first, so a PUT of a present chunk is rare.
            let key = self.chunk_key(&digest);
            let stored = self.get_optional(&key).await?;
            if stored.is_some_and(|b| is_chunk(&b, &digest)) {
                // "Present" is a confirmation like the missing list's; a chunk a gc
                // deleted meanwhile is stored again from this upload.
                if self
                    .find_confirmed(vec![digest])
                    .await?
                    .iter()
                    .all(|(_, h)| *h)
                {
                    // Read the body anyway so the client sees the answer, not a broken
                    // pipe.
                    drain(body, MAX_CHUNK_BODY).await;
                    return Ok(ChunkPut::Present);
                }
            } else {
                tracing::warn!(chunk = %digest, "stored chunk does not match its digest; replacing it with the verified upload");
            }
        }
        let bytes = receive(&digest, body).await?;
        let len = bytes.len() as u64;
        let key = self.chunk_key(&digest);
        self.store
            .put(&key, PutPayload::from(bytes.clone()))
            .await
            .map_err(object_err("writing", &key))?;
        // A copy that replaced another may be in a gc's batch (chosen from the bucket's
        // listing when the old copy was there): confirmed like a present chunk, and
        // written again if that batch deleted it.
        if replacing
            && !self
                .find_confirmed(vec![digest])
                .await?
                .iter()
                .all(|(_, h)| *h)
        {
            self.store
                .put(&key, PutPayload::from(bytes))
                .await
                .map_err(object_err("writing", &key))?;
        }
        Ok(ChunkPut::Stored(len))
    }
}

/// Reads one chunk body into memory as it is stored (raw or a zstd frame), enforcing
/// the size limit and checking that it is the chunk.
async fn receive<S, E>(digest: &Digest, mut body: S) -> Result<Bytes, BackendError>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let mut verifier = StoredVerifier::new(MAX_CHUNK_BODY);
    let mut out = Vec::new();
    while let Some(piece) = body.next().await {
        let piece = piece.map_err(|e| BackendError::Body {
            what: format!("chunk {digest}"),
            detail: e.to_string(),
        })?;
        if (out.len() + piece.len()) as u64 > MAX_CHUNK_BODY {
            return Err(BackendError::TooLarge {
                what: format!("chunk {digest}"),
                limit: MAX_CHUNK_BODY,
            });
        }
        verifier.update(&piece);
        out.extend_from_slice(&piece);
    }
    verifier
        .finish(digest)
        .map_err(|e| not_the_chunk(digest, e))?;
    Ok(Bytes::from(out))
}
