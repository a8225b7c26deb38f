//! A chunk a reader can read: its file in the cache, or its verified bytes in memory.

use bytes::Bytes;

use crate::chunk_store::{ChunkFile, ChunkStoreError};
use crate::digest::Digest;

/// A chunk a reader can read: its file in the cache, or its verified bytes in memory
/// while the file is being written (a reader never waits for the cache's disk).
#[derive(Clone, Debug)]
pub enum Chunk {
    File(ChunkFile),
    Verified { digest: Digest, bytes: Bytes },
}

impl Chunk {
    /// Reads `buf.len()` bytes at `offset` within the chunk.
    /// A file read tries the page cache first and blocks (off the runtime's hands)
    /// only when it must (see [`crate::blocking`]).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), ChunkStoreError> {
        match self {
            Chunk::File(f) => {
                if f.read_at_nowait(offset, buf)? {
                    return Ok(());
                }
                crate::blocking::blocking(|| f.read_at(offset, buf))
            }
            Chunk::Verified { digest, bytes } => {
                let start = offset as usize;
                let piece =
                    bytes
                        .get(start..start + buf.len())
                        .ok_or_else(|| ChunkStoreError::Read {
                            digest: *digest,
                            source: std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
                        })?;
                buf.copy_from_slice(piece);
                Ok(())
            }
        }
    }

    pub fn len(&self) -> u64 {
        match self {
            Chunk::File(f) => f.len,
            Chunk::Verified { bytes, .. } => bytes.len() as u64,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
