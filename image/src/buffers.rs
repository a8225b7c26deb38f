//! The one pool of request buffers, so that a steady stream of reads and writes
//! allocates (and faults in) nothing (DESIGN.md section 9). The NBD server keeps one per
//! connection, the FUSE mount one per mount.
//!
//! A buffer handed out again is not zeroed: it holds bytes its pool's user read or
//! wrote before. An NBD connection's pool only ever held that connection's own image
//! bytes; the FUSE mount's are all served to the kernel, which checks access itself.

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, PoisonError};

/// Bytes of idle buffers a pool keeps for reuse by default: enough for a kernel client's
/// usual queue of 128 KiB–1 MiB requests, small enough that a thousand idle
/// connections do not pin gigabytes.
pub const RETAINED_BYTES: usize = 8 << 20;

/// Free buffers, lent out by [`BufferPool::take`].
#[derive(Debug)]
pub struct BufferPool {
    /// Idle buffers; each is fully initialised up to its `len()`.
    free: Mutex<Vec<Vec<u8>>>,
    /// The most idle bytes kept; a buffer returned past it is freed.
    retained: usize,
}

impl BufferPool {
    /// A pool keeping at most [`RETAINED_BYTES`] idle.
    pub fn new() -> Arc<Self> {
        Self::with_retained(RETAINED_BYTES)
    }

    /// A pool keeping at most `retained` idle bytes (a buffer larger than that is never
    /// kept).
    pub fn with_retained(retained: usize) -> Arc<Self> {
        Arc::new(BufferPool {
            free: Mutex::new(Vec::new()),
            retained,
        })
    }

    /// A buffer of exactly `len` bytes. Its contents are unspecified (zeroes, or bytes this
    /// connection read or wrote before); callers overwrite all of it.
    pub fn take(self: &Arc<Self>, len: usize) -> PooledBuffer {
        let mut buf = self.pop_fitting(len);
        if buf.len() < len {
            buf.resize(len, 0);
        }
        PooledBuffer {
            buf,
            len,
            pool: Arc::clone(self),
        }
    }

    /// The smallest idle buffer that holds `len` bytes, else the largest one (to grow),
    /// else a new empty one.
    fn pop_fitting(&self, len: usize) -> Vec<u8> {
        let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        let fitting = (0..free.len())
            .filter(|&i| free[i].len() >= len)
            .min_by_key(|&i| free[i].len());
        let chosen = fitting.or_else(|| (0..free.len()).max_by_key(|&i| free[i].len()));
        match chosen {
            Some(i) => free.swap_remove(i),
            None => Vec::new(),
        }
    }

    fn give_back(&self, buf: Vec<u8>) {
        let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        let retained: usize = free.iter().map(Vec::len).sum();
        if retained + buf.len() <= self.retained {
            free.push(buf);
        }
    }

    #[cfg(test)]
    fn idle(&self) -> usize {
        self.free
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// A buffer on loan from a [`BufferPool`]; it goes back when dropped.
#[derive(Debug)]
pub struct PooledBuffer {
    buf: Vec<u8>,
    /// The length asked for; `buf` may be longer from an earlier, larger loan.
    len: usize,
    pool: Arc<BufferPool>,
}

impl Deref for PooledBuffer {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl DerefMut for PooledBuffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.buf[..self.len]
    }
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        self.pool.give_back(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_returned_buffer_is_reused_without_reallocating() {
        let pool = BufferPool::new();
        let first = pool.take(4096);
        let address = first.as_ptr();
        drop(first);
        let second = pool.take(1024);
        assert_eq!(second.len(), 1024);
        assert_eq!(second.as_ptr(), address);
    }

    #[test]
    fn a_small_buffer_grows_to_the_request() {
        let pool = BufferPool::new();
        drop(pool.take(10));
        let mut big = pool.take(100);
        assert_eq!(big.len(), 100);
        big.fill(7);
        assert!(big.iter().all(|&b| b == 7));
    }

    #[test]
    fn idle_bytes_are_bounded() {
        let pool = BufferPool::new();
        let loans: Vec<_> = (0..4).map(|_| pool.take(RETAINED_BYTES / 2)).collect();
        drop(loans);
        assert_eq!(pool.idle(), 2);
        drop(pool.take(RETAINED_BYTES + 1));
        assert_eq!(pool.idle(), 1, "the grown buffer is too large to keep");
    }

    #[test]
    fn the_best_fitting_buffer_is_chosen() {
        let pool = BufferPool::new();
        let (small, large) = (pool.take(100), pool.take(10_000));
        let small_address = small.as_ptr();
        drop((small, large));
        assert_eq!(pool.take(50).as_ptr(), small_address);
    }
}
