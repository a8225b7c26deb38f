//! Whole chunks: what a miss, a prefetch, a fill and a block index page fetch. An
//! attempt takes the chunk's stored form from one source, decodes and verifies it
//! against the chunk's digest off the runtime's threads (the blocking pool; a fill's
//! on the low-priority threads), and reports bytes that are not the chunk with the
//! node that sent them. A verified chunk comes with the stored form it came as when
//! that is to be kept beside it ([`crate::stored_forms`]). The stored form of a chunk
//! stored in blocks is shown to the fetch's readers as soon as it came, before it is
//! decoded and hashed whole: a small read verifies and serves its own blocks from it
//! ([`crate::partial`]).

use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::watch;

use super::flight::Progress;
use super::runner::{Answer, Run, Want};
use super::work::{run_at, READERS_ACTIVE};
use super::{ChunkCache, ChunkRef, FetchError, FETCH_PASSES};
use crate::encoding::Encoding;
use crate::planner::Priority;
use crate::source::{Source, SourceError};

/// A chunk's verified bytes, with the stored form they came as when it is to be kept
/// ([`crate::stored_forms`]: a fleet member's chunk from the store or an origin).
pub(crate) struct Verified {
    pub(crate) raw: Bytes,
    pub(crate) stored: Option<(Encoding, Bytes)>,
}

/// A whole chunk, verified against its digest.
pub(crate) struct WholeChunk<'a> {
    /// Whose work the decoding and hashing is (a fill's yields to readers).
    pub priority: Priority,
    /// Where the stored form of a chunk stored in blocks is shown to readers while it is
    /// decoded and verified ([`Progress::Arrived`]).
    pub arrived: Option<&'a watch::Sender<Progress>>,
}

impl Want for WholeChunk<'_> {
    type Output = Verified;
    const PASSES: usize = FETCH_PASSES;
    const STOP_ON_CORRUPT: bool = false;

    fn asks(&self, _source: &Source) -> bool {
        true
    }

    async fn attempt(
        &self,
        cache: &ChunkCache,
        chunk: &ChunkRef,
        source: &Source,
        deadline: Duration,
    ) -> Result<Answer<Verified>, SourceError> {
        let started = Instant::now();
        let fetched = source.fetch(chunk, deadline).await?;
        let node = fetched.node;
        let stored = fetched.bytes;
        let stored_len = stored.len() as u64;
        // Shares the body's buffer; dropped unless the chunk verifies.
        let keep = cache.keeps_stored_form_from(source).then(|| stored.clone());
        if let Some(arrived) = self.arrived {
            if stored.starts_with(&crate::blocks::BLOCKS_MAGIC) {
                arrived.send_if_modified(|progress| match progress {
                    Progress::Fetching | Progress::Arrived(_) => {
                        *progress = Progress::Arrived(stored.clone());
                        true
                    }
                    _ => false,
                });
            }
        }
        let (digest, len) = (chunk.digest, chunk.len as usize);
        let shown = stored.as_ptr() as usize;
        let decoded = run_at(
            self.priority,
            cache.demand_within(READERS_ACTIVE),
            move || crate::encoding::decode(stored, len, &digest),
        )
        .await
        .map_err(|e| SourceError::Unreachable {
            source_name: source.name().to_string(),
            detail: format!("decoding task failed: {e}"),
        })?;
        match decoded {
            Ok((encoding, bytes)) => {
                cache
                    .observer
                    .fetched(chunk, source.name(), stored_len, started.elapsed());
                let value = Verified {
                    raw: bytes,
                    stored: keep.map(|stored| (encoding, stored)),
                };
                Ok(Answer::Verified { value, node })
            }
            // Raw bytes of the wrong length were cut short or padded on the way (a
            // transport failure, never hashed), not a chunk that lies.
            Err(crate::encoding::DecodeError::Length { stored, len }) => Err(SourceError::Length {
                source_name: source.name().to_string(),
                got: stored as u64,
                expected: len as u64,
            }),
            Err(crate::encoding::DecodeError::Truncated { stored, expected }) => {
                Err(SourceError::Length {
                    source_name: source.name().to_string(),
                    got: stored as u64,
                    expected,
                })
            }
            Err(e) => {
                // Its stored form is not kept for readers past its attempt.
                if let Some(arrived) = self.arrived {
                    arrived.send_if_modified(|progress| match progress {
                        Progress::Arrived(bytes) if bytes.as_ptr() as usize == shown => {
                            *progress = Progress::Fetching;
                            true
                        }
                        _ => false,
                    });
                }
                cache.observer.corrupt(chunk, source.name());
                tracing::error!(template = %chunk.template, chunk = chunk.index,
                    source = source.name(), node = node.as_deref().unwrap_or("-"),
                    expected = %digest, error = %e,
                    "chunk bytes are not the chunk; discarded");
                Ok(Answer::Corrupt { node })
            }
        }
    }
}

impl ChunkCache {
    /// The chunk's verified raw bytes (and the stored form to keep, if any) from the
    /// first source that delivers them (see
    /// [`super::runner`]). A demand fetch has a budget of its own (`--read-deadline`
    /// from its start: it may serve several readers, each of which stops waiting at
    /// the end of its own budget); background work has none.
    pub(super) async fn fetch_verified(
        &self,
        chunk: &ChunkRef,
        sources: &[Source],
        priority: Priority,
        arrived: Option<&watch::Sender<Progress>>,
    ) -> Result<Verified, FetchError> {
        let budget_ends = (priority == Priority::Demand).then(|| Instant::now() + self.read_budget);
        // Reads hedge a slow node; fills wait it out (see `crate::planner`).
        let hedge_after = (priority != Priority::Fill)
            .then(|| self.hedging.delay(budget_ends.map(|_| self.read_budget)));
        self.run(&Run {
            want: &WholeChunk { priority, arrived },
            chunk,
            sources,
            budget_ends,
            hedge_after,
        })
        .await
    }
}
