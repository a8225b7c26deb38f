//! Chunk-sized buffers kept for the next fetch. A cold read or a fill takes two for every
//! chunk (the body as it arrives, the decoded chunk), and a fresh one costs a page fault
//! per 4 KiB, an mmap and a munmap (glibc maps a buffer this large on its own, see the
//! daemon's `bound_heap`): on B2's cold read, a quarter of the daemon's CPU went to
//! faulting in such buffers and a tenth to unmapping them. A buffer handed out as
//! [`Bytes`] ([`into_bytes`]) comes back here when its last reader lets go.
//!
//! What is kept is bounded: at most [`KEPT_BYTES`] in all, and no buffer larger than
//! [`LARGEST_KEPT`] (a template with 16 MiB chunks does not pin 16 MiB per buffer). A
//! buffer handed out may hold an earlier chunk's bytes; every user overwrites what it
//! hands on ([`take_filled`] for decoders that fill every byte, [`take_empty`] for bodies
//! appended to).

use std::sync::Mutex;

use bytes::Bytes;

/// The most bytes of idle buffers kept: as many 1 MiB chunks as the node fetches at once
/// on demand.
pub const KEPT_BYTES: usize = 16 << 20;
/// The largest buffer kept.
pub const LARGEST_KEPT: usize = 4 << 20;

struct Kept {
    buffers: Vec<Vec<u8>>,
    bytes: usize,
}

static KEPT: Mutex<Kept> = Mutex::new(Kept {
    buffers: Vec::new(),
    bytes: 0,
});

fn kept() -> std::sync::MutexGuard<'static, Kept> {
    // Every update is one step on plain data: a poisoned lock is still consistent.
    KEPT.lock().unwrap_or_else(|e| e.into_inner())
}

/// A kept buffer of at least `len` bytes' capacity, if there is one.
fn reuse(len: usize) -> Option<Vec<u8>> {
    let mut kept = kept();
    let at = kept.buffers.iter().position(|b| b.capacity() >= len)?;
    let buffer = kept.buffers.swap_remove(at);
    kept.bytes -= buffer.capacity();
    Some(buffer)
}

/// An empty buffer with room for `len` bytes, for a body appended to.
pub fn take_empty(len: usize) -> Vec<u8> {
    match reuse(len) {
        Some(mut buffer) => {
            buffer.clear();
            buffer
        }
        None => Vec::with_capacity(len),
    }
}

/// A buffer of exactly `len` bytes whose contents are unspecified (an earlier chunk's,
/// or zeroes), for a decoder that writes every byte of it.
pub fn take_filled(len: usize) -> Vec<u8> {
    match reuse(len) {
        Some(mut buffer) => {
            buffer.resize(len, 0);
            buffer
        }
        None => vec![0; len],
    }
}

/// Keeps `buffer` for the next taker, unless it is too large or enough is kept.
pub fn give_back(buffer: Vec<u8>) {
    let capacity = buffer.capacity();
    if capacity == 0 || capacity > LARGEST_KEPT {
        return;
    }
    let mut kept = kept();
    if kept.bytes + capacity <= KEPT_BYTES {
        kept.bytes += capacity;
        kept.buffers.push(buffer);
    }
}

/// `buffer`'s bytes as [`Bytes`]; the buffer is given back when the last clone drops.
pub fn into_bytes(buffer: Vec<u8>) -> Bytes {
    Bytes::from_owner(Returned(buffer))
}

/// The bytes of idle buffers kept now (for metrics and tests).
pub fn kept_bytes() -> usize {
    kept().bytes
}

struct Returned(Vec<u8>);

impl AsRef<[u8]> for Returned {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Returned {
    fn drop(&mut self) {
        give_back(std::mem::take(&mut self.0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // One test: the kept set is process-wide, and tests run in parallel.
    #[test]
    fn buffers_come_back_bounded_and_are_reused() {
        let before = kept_bytes();
        let mut body = take_empty(1 << 20);
        body.extend_from_slice(&[7; 1000]);
        let address = body.as_ptr();
        let bytes = into_bytes(body);
        let reader = bytes.clone();
        assert_eq!(&bytes[..], &[7; 1000][..]);
        drop(bytes);
        assert_eq!(kept_bytes(), before, "a reader still holds it");
        drop(reader);
        assert!(
            kept_bytes() >= before + (1 << 20),
            "given back by the last reader"
        );
        let again = take_filled(1 << 20);
        assert_eq!(again.len(), 1 << 20);
        assert_eq!(again.as_ptr(), address, "the same memory, no fresh pages");
        give_back(again);
        give_back(vec![0; LARGEST_KEPT + 1]);
        assert!(kept_bytes() <= KEPT_BYTES, "too large a buffer is not kept");
        for _ in 0..(KEPT_BYTES >> 20) + 4 {
            give_back(Vec::with_capacity(1 << 20));
        }
        assert!(kept_bytes() <= KEPT_BYTES);
    }
}
