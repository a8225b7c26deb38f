//! The in-flight table's keys and entries: a whole chunk's fetch (its progress, as its
//! readers see it) or a byte range's ([`super::ranges`]), keyed by what they fetch.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::watch;

use super::FetchError;
use crate::chunk_store::ChunkFile;
use crate::digest::Digest;
use crate::planner::Promotion;

/// The state of one fetch, as its readers see it.
#[derive(Clone)]
pub(super) enum Progress {
    Fetching,
    /// The stored form of a chunk stored in blocks came from a source and is being
    /// decoded and verified whole: a small read may verify and serve its own blocks
    /// from it meanwhile (`ChunkCache::get_or_read_arrived`). Not verified: every other
    /// reader waits on.
    Arrived(Bytes),
    /// Verified bytes, being written to the cache.
    Verified(Bytes),
    /// The chunk is in the cache.
    Stored(ChunkFile),
    /// Verified bytes that could not be written to the cache (disk full, I/O error):
    /// readers are answered from the bytes; fills, which need the file, get the error.
    Unstored(Bytes, Arc<FetchError>),
    Failed(Arc<FetchError>),
}

pub(super) type Outcome = Progress;

/// A whole chunk's fetch under way: its progress, the flag a demand reader sets when it
/// joins, and whether it runs on the background runtime (which a demand read does not
/// wait on).
pub(super) type InFlight = (watch::Receiver<Outcome>, Arc<Promotion>, bool);

/// What the in-flight table is keyed by: a whole chunk, or a byte range of its stored
/// object that a small read fetches ([`crate::partial`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum FetchKey {
    Chunk(Digest),
    /// The chunk's table.
    Table(Digest),
    /// Blocks `.1..=.2` of the chunk.
    Blocks(Digest, usize, usize),
}

/// One entry of the in-flight table.
pub(super) enum Flight {
    Chunk(InFlight),
    Range(RangeFlight),
}

/// What a range fetch gave its readers: `None` when it failed (they read the chunk
/// whole).
#[derive(Clone, Debug)]
pub(crate) enum RangeValue {
    /// The chunk's table was fetched and its layout kept
    /// ([`crate::block_memory::Partial::layout`]; without a table when the chunk is not
    /// stored in blocks).
    Table,
    /// The verified blocks, in order, from the block numbered `.0`.
    Blocks(usize, Arc<Vec<Bytes>>),
}

/// A range fetch under way, as its followers see it: `None` until it ends.
pub(crate) type RangeFlight = watch::Receiver<Option<Option<RangeValue>>>;
