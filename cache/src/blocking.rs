//! The one policy for blocking I/O in async code (the crate header says when each
//! part applies).
//!
//! - Reads of cached chunks try the page cache first, without blocking
//!   ([`crate::ChunkFile::read_at_nowait`], `preadv2(RWF_NOWAIT)`), on the runtime
//!   thread: the common case costs one system call and no hand-off. Only a read that
//!   would wait for the disk goes through [`blocking`].
//! - Work on borrowed buffers (an overlay's reads and writes of a client's bytes, the
//!   rare cold pread above) goes through [`blocking`]: on the daemon's multi-thread
//!   runtime `block_in_place` hands this worker's other tasks to another thread while
//!   this one blocks, so no copy into an owned buffer is needed.
//! - Work that owns its data (hashing and writing a fetched chunk, a flush's fsyncs,
//!   commit's chunk builds, scrub, first-open verification for peers) goes to
//!   `spawn_blocking`, or for fills to the low-priority threads of [`crate::background`].
//! - Pieces of chunk files handed to a frontend to `splice` are checked resident first
//!   (`cachestat(2)`, [`crate::ChunkFile::resident`]); anything else is read as above.

use tokio::runtime::{Handle, RuntimeFlavor};

/// Runs blocking file I/O from async code without stalling the runtime: on a
/// multi-thread runtime through `block_in_place`; on a current-thread runtime (tests)
/// or outside a runtime, where `block_in_place` is not allowed, inline.
pub fn blocking<R>(f: impl FnOnce() -> R) -> R {
    match Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}
