//! lazyblk-cache: manifests, chunk digests, the node's content-addressed chunk cache,
//! the sources chunks are fetched from, and sandbox overlays.
//!
//! # Layout
//! - [`digest`]: the sha256 [`Digest`] that names a chunk; [`durable`]: the one
//!   crash-safe write (temporary file, fsync, rename, directory fsync) of every
//!   state file.
//! - [`manifest`]: the [`Manifest`] of a template (format 1, DESIGN.md section 4);
//!   [`labels`]: the grammar and size limits of its labels (and of policy keys);
//!   [`block_index`]: its block index (format 3).
//! - [`chunk_store`]: chunk files on local disk: crash-safe writes, byte budget, LRU
//!   eviction, claims.
//! - [`pins`]: named claims on chunks (`replica:<id>`, `upload:<id>`): each owner
//!   holds a digest once and releases exactly its own.
//! - [`source`]: the transports missing chunks come from (the store server, origins,
//!   the fleet's peers, an object store read directly).
//! - [`transport`]: HTTP and object-store transports, and [`SourceError`].
//! - [`peers`]: the fleet's live nodes and chunk ownership by rendezvous hashing.
//! - [`stored_forms`]: which chunks keep the stored form they came as (zstd blocks),
//!   so a fleet member serves peers what the store sends, not the decoded chunk.
//! - [`planner`]: the fetch plan: which sources a template's chunks come from and in
//!   which order ([`SourcePlan`]: origins, the owners among the peers, the store or the
//!   object store, the peers' caches), slots per priority (demand, prefetch, fill;
//!   demand first), source health (a failing source is tried last for a while) and
//!   hedging.
//! - [`fetch`]: the [`ChunkCache`]: one shared fetch per missing chunk, and the one
//!   runner of every attempt (whole chunks, and the byte ranges of [`partial`]) within
//!   per-attempt deadlines and one budget per demand read ([`ReadBudget`]), decoded and
//!   verified on the blocking pool; bytes that are not the chunk demote the source, or
//!   the one peer, that sent them.
//!   It is all the daemon sees of the cache: calls by intent (claim a template's chunks
//!   for a named owner, release an owner, keep a chunk made here, evict a template's
//!   unclaimed chunks, count what is local, open a chunk for a peer or an upload, usage
//!   and scrub); the index itself is not reachable from outside this crate. Its `peer`
//!   part fetches for peers that ask by digest and length, a length it does not trust.
//! - [`health`]: the cache's usage and whether it is DEGRADED (cannot keep chunks).
//! - [`background`]: low-priority threads for the work of background fills: a runtime
//!   of one thread of its own that moves a fill's bytes (SCHED_IDLE while readers are
//!   active, normal once a demand reader joins the fetch), with HTTP clients of its own
//!   ([`HttpClients`]), and two threads for its hashing and writing.
//! - [`blocking`]: the one policy for blocking I/O from async code: cached chunk reads
//!   try the page cache without blocking (`RWF_NOWAIT`) and block through
//!   `block_in_place` only when they must; work on borrowed buffers (overlay I/O) goes
//!   through `block_in_place`; work that owns its data (hashing, writing, fsyncs,
//!   scrub) goes to `spawn_blocking`, or for fills to the low-priority threads. A
//!   frontend that splices cached bytes asks [`TemplateImage::resident_pieces`], which
//!   hands out chunk file pieces only when `cachestat(2)` says they are in the page
//!   cache, so the splice does not wait for the disk either (and zero chunks as runs of
//!   zeroes, which the NBD server sends as holes).
//! - [`blocks`]: a chunk stored in blocks (format 3): its table, encoding, decoding.
//! - [`partial`]: small reads of a missing chunk answered from the blocks that hold
//!   them, verified against the manifest's block index; [`block_memory`]: the verified
//!   blocks and chunk layouts it keeps in memory; [`block_fetch`]: its fetches of a
//!   chunk's table and of its blocks.
//! - [`readahead`]: which chunks to fetch ahead of sequential readers.
//! - [`replay`]: one run of a boot trace's replay fetched ahead of the reads, through
//!   the same fetches and in-flight table as the reads.
//! - [`image`]: a [`TemplateImage`], the byte-addressed view of a template over the cache.
//! - [`overlay`]: a sandbox's [`Overlay`], its copy-on-write layer over a template image
//!   (4 KiB blocks, a sparse data file and a block map, durable at FLUSH).
//!
//! # Data flow
//! A read at an offset of a template ([`TemplateImage::read_at`]) maps to chunks; a
//! local chunk is read with one `pread`; a missing one is fetched once (whoever asks
//! first leads, later readers wait for the same fetch), verified, and answered from the
//! verified bytes while it is written to a temporary file and renamed into place (made
//! durable once per replica, before READY: [`ChunkStore::make_durable`]). A sandbox
//! reads through its [`Overlay`] first: blocks it wrote come from the overlay's files, the rest from the
//! template image. Nothing here knows NBD or FUSE.

pub mod background;
pub mod block_fetch;
pub mod block_index;
pub mod block_memory;
pub mod blocking;
pub mod blocks;
pub mod buffers;
pub mod chunk_ref;
pub mod chunk_store;
pub mod digest;
pub mod durable;
pub mod encoding;
pub mod fetch;
pub mod health;
pub mod image;
pub mod labels;
pub mod link;
pub mod manifest;
pub mod overlay;
pub mod partial;
pub mod peers;
pub mod pins;
pub mod planner;
pub mod readahead;
pub mod replay;
pub mod source;
pub mod stored_forms;
pub mod transport;

pub use chunk_store::{
    file_resident, ChunkFile, ChunkStore, ChunkStoreError, ScrubReport, StoredForm,
};
pub use digest::Digest;
pub use fetch::{
    CacheHealth, CacheUsage, Chunk, ChunkCache, ChunkRef, FetchError, FetchObserver, NoObserver,
    Priority, ReadBudget, DEFAULT_READ_BUDGET, DEFAULT_SOURCE_DEADLINE,
};
pub use image::{ImageExtent, ReadError, TemplateImage};
pub use manifest::{validate_id, Manifest, ManifestError};
pub use overlay::{FreezeGuard, Overlay, OverlayError, OverlayMeta, OverlayStats};
pub use peers::{Member, PeerSet, PeerStats};
pub use planner::SourcePlan;
pub use source::{Fetched, HttpClients, HttpSource, ObjectSource, Source, SourceError};
