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

use bytes::Bytes;
use lazyblk_image::BufferPool;

/// The most bytes of idle buffers kept: as many 1 MiB chunks as the node fetches at once
/// on demand.
pub const KEPT_BYTES: usize = 16 << 20;
/// The largest buffer kept.
pub const LARGEST_KEPT: usize = 4 << 20;

/// The node's idle fetch buffers: `lazyblk-image`'s one [`BufferPool`], process-wide.
static KEPT: BufferPool = BufferPool::bounded(KEPT_BYTES, LARGEST_KEPT);

/// Runs `f` on the pool, not SCHED_IDLE meanwhile: fills' low-priority threads take
/// and give back buffers too, and one preempted holding the pool's lock would keep a
/// demand read's fetch waiting (as with the chunk index).
fn with_pool<T>(pool: &BufferPool, f: impl FnOnce(&BufferPool) -> T) -> T {
    let _foreground = crate::background::foreground();
    f(pool)
}

/// An empty buffer with room for `len` bytes, for a body appended to.
pub fn take_empty(len: usize) -> Vec<u8> {
    with_pool(&KEPT, |pool| pool.take_empty(len))
}

/// A buffer of exactly `len` bytes whose contents are unspecified (an earlier chunk's,
/// or zeroes), for a decoder that writes every byte of it.
pub fn take_filled(len: usize) -> Vec<u8> {
    with_pool(&KEPT, |pool| pool.take_filled(len))
}

/// `buffer`'s bytes as [`Bytes`]; the buffer is given back when the last clone drops.
pub fn into_bytes(buffer: Vec<u8>) -> Bytes {
    Bytes::from_owner(Returned(buffer, &KEPT))
}

struct Returned(Vec<u8>, &'static BufferPool);

impl AsRef<[u8]> for Returned {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Returned {
    fn drop(&mut self) {
        let buffer = std::mem::take(&mut self.0);
        with_pool(self.1, |pool| pool.give_back(buffer));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local() -> &'static BufferPool {
        Box::leak(Box::new(BufferPool::bounded(KEPT_BYTES, LARGEST_KEPT)))
    }

    #[test]
    fn a_buffer_comes_back_when_its_last_reader_drops_it_and_is_reused() {
        let kept = local();
        let mut body = kept.take_empty(1 << 20);
        body.extend_from_slice(&[7; 1000]);
        let address = body.as_ptr();
        let bytes = Bytes::from_owner(Returned(body, kept));
        let reader = bytes.clone();
        assert_eq!(&bytes[..], &[7; 1000][..], "only the bytes written");
        drop(bytes);
        assert_eq!(kept.idle_bytes(), 0, "a reader still holds it");
        drop(reader);
        assert_eq!(kept.idle_bytes(), 1 << 20, "given back by the last reader");
        let decoded = kept.take_filled(1 << 20);
        assert_eq!(decoded.len(), 1 << 20);
        assert_eq!(decoded.as_ptr(), address, "the same memory: no fresh pages");
        assert_eq!(kept.idle_bytes(), 0);
    }

    #[test]
    fn what_is_kept_is_bounded_and_the_best_fit_is_taken() {
        let kept = local();
        kept.give_back(vec![0; LARGEST_KEPT + 1]);
        assert_eq!(kept.idle_bytes(), 0, "too large a buffer is not kept");
        kept.give_back(Vec::with_capacity(4 << 20));
        for _ in 0..KEPT_BYTES >> 20 {
            kept.give_back(Vec::with_capacity(1 << 20));
        }
        assert_eq!(
            kept.idle_bytes(),
            KEPT_BYTES,
            "filled up to the bound, not past it"
        );
        let small = kept.take_empty(1000);
        assert_eq!(
            small.capacity(),
            1 << 20,
            "the smallest that fits, not the 4 MiB one"
        );
        let large = kept.take_filled(3 << 20);
        assert_eq!(large.capacity(), 4 << 20);
        assert_eq!(large.len(), 3 << 20);
    }
}
