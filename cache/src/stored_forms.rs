//! Serving peers the stored form: which chunks keep the encoded bytes they came as
//! (see [`crate::chunk_store::StoredForm`] for why kept, not made again), and the form
//! a node hands a peer that asks for a chunk.
//!
//! A fleet member ([`ChunkCache::with_stored_forms`]) keeps the stored form of the
//! chunks it fetched from the store, an object store or an origin: in a fleet a node
//! fetches those itself only when it owns them (or its peers failed), so it keeps about
//! 1/N of a template's stored bytes beside its chunks, the share peers ask it for.
//! Chunks that came from a peer keep none (their owner serves them). A chunk asked for
//! that has no kept form (a commit's chunk at its origin, one that came from a peer
//! before the membership changed) is encoded once when first asked for
//! ([`ChunkCache::encode_stored_form`]) and kept from then on.

use crate::chunk_store::{ChunkFile, ChunkStoreError, StoredForm};
use crate::digest::Digest;
use crate::encoding::Encoding;
use crate::fetch::ChunkCache;
use crate::source::Source;

impl ChunkCache {
    /// Whether chunks fetched from the store or an origin keep their stored form (a
    /// fleet member, which serves peers).
    pub fn with_stored_forms(mut self, keep: bool) -> Self {
        self.keep_stored_forms = keep;
        self
    }

    /// Whether a chunk from `source` keeps the stored form it came as.
    pub(crate) fn keeps_stored_form_from(&self, source: &Source) -> bool {
        self.keep_stored_forms && !matches!(source, Source::Peers(_) | Source::PeerCaches(_))
    }

    /// Writes a fetched, verified chunk (see [`crate::ChunkStore::insert`]) and keeps
    /// `stored`, the form it came as, beside it. Blocking.
    pub(crate) fn insert_keeping(
        &self,
        digest: &Digest,
        bytes: &[u8],
        stored: Option<(Encoding, bytes::Bytes)>,
    ) -> Result<ChunkFile, ChunkStoreError> {
        let file = self.store().insert(digest, bytes)?;
        if let Some((encoding, stored)) = stored {
            self.keep_stored_form(digest, encoding, &stored, false);
        }
        Ok(file)
    }

    /// Keeps `stored` (verified: it decoded to the chunk) beside the local chunk. A
    /// failure costs only the form (peers get the decoded chunk): logged, not returned.
    /// Blocking.
    fn keep_stored_form(
        &self,
        digest: &Digest,
        encoding: Encoding,
        stored: &[u8],
        made_here: bool,
    ) {
        if let Err(e) = self
            .store()
            .keep_stored_form(digest, encoding, stored, made_here)
        {
            tracing::warn!(chunk = %digest, error = %e, "could not keep a chunk's stored form; peers get it decoded");
        }
    }

    /// The local chunk's kept stored form, open for streaming; `None` when none is kept.
    /// Blocking (a form this daemon did not write is checked at its first open).
    pub fn open_stored_form(&self, digest: &Digest) -> Result<Option<StoredForm>, ChunkStoreError> {
        self.store().stored_form(digest)
    }

    /// Encodes the local chunk `file` (as a publish would: zstd blocks when that is
    /// smaller), keeps the result as its stored form and opens it; `None` when the chunk
    /// does not shrink (it is served raw) or the form could not be kept. Blocking: reads
    /// the chunk whole and compresses it (about 5 ms per MiB of a core).
    pub fn encode_stored_form(
        &self,
        file: &ChunkFile,
    ) -> Result<Option<StoredForm>, ChunkStoreError> {
        let raw = file.read_all()?;
        let (encoding, stored) = crate::encoding::encode(&raw);
        if encoding == Encoding::Raw {
            return Ok(None);
        }
        self.keep_stored_form(&file.digest, encoding, &stored, true);
        self.store().stored_form(&file.digest)
    }

    /// Bytes of the stored forms kept beside their chunks.
    pub fn stored_form_bytes(&self) -> u64 {
        self.store().stored_form_bytes()
    }
}
