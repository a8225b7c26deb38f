//! Which chunk of which template: what a fetch, a source and a peer request name, and
//! the context of every log line about a chunk.

use std::sync::Arc;

use crate::digest::Digest;

/// Which chunk of which template a fetch is for (the context of every log line).
#[derive(Clone, Debug)]
pub struct ChunkRef {
    pub template: Arc<str>,
    pub index: usize,
    pub digest: Digest,
    pub len: u64,
}
