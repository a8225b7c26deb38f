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

/// Free buffers, lent out by [`BufferPool::take`] (returned when the loan drops) or
/// handed out detached by [`BufferPool::take_filled`] and [`BufferPool::take_empty`]
/// (returned by [`BufferPool::give_back`], e.g. when the last reader of the `Bytes`
/// made from it lets go).
#[derive(Debug)]
pub struct BufferPool {
    free: Mutex<Free>,
    /// The most idle bytes (by capacity) kept; a buffer returned past it is freed.
    retained: usize,
    /// The largest buffer kept (a burst of huge requests does not pin huge buffers).
    largest: usize,
}

#[derive(Debug)]
struct Free {
    /// Idle buffers.
    buffers: Vec<Vec<u8>>,
    /// Their capacities, summed.
    bytes: usize,
}

impl BufferPool {
    /// A pool keeping at most [`RETAINED_BYTES`] idle.
    pub fn new() -> Arc<Self> {
        Self::with_retained(RETAINED_BYTES)
    }

    /// A pool keeping at most `retained` idle bytes (a buffer larger than that is never
    /// kept).
    pub fn with_retained(retained: usize) -> Arc<Self> {
        Arc::new(BufferPool::bounded(retained, retained))
    }

    /// A pool keeping at most `retained` idle bytes, and no buffer larger than
    /// `largest`. `const`, for a process-wide pool in a `static`.
    pub const fn bounded(retained: usize, largest: usize) -> BufferPool {
        BufferPool {
            free: Mutex::new(Free {
                buffers: Vec::new(),
                bytes: 0,
            }),
            retained,
            largest,
        }
    }

    /// A buffer of exactly `len` bytes, on loan until dropped. Its contents are
    /// unspecified (zeroes, or bytes this pool's user read or wrote before); callers
    /// overwrite all of it.
    pub fn take(self: &Arc<Self>, len: usize) -> PooledBuffer {
        PooledBuffer {
            buf: self.take_initialised(len),
            len,
            pool: Arc::clone(self),
        }
    }

    /// A detached buffer of exactly `len` bytes, contents unspecified, for a user that
    /// writes every byte of it; give it back with [`BufferPool::give_back`].
    pub fn take_filled(&self, len: usize) -> Vec<u8> {
        let mut buf = self.take_initialised(len);
        buf.truncate(len);
        buf
    }

    /// A buffer of at least `len` initialised bytes; only bytes past what it held
    /// before are zeroed, so reusing a buffer costs no memset.
    fn take_initialised(&self, len: usize) -> Vec<u8> {
        let mut buf = self.pop_fitting(len);
        if buf.len() < len {
            // Exact: growing a kept buffer must not double it past what was asked.
            buf.reserve_exact(len - buf.len());
            buf.resize(len, 0);
        }
        buf
    }

    /// A detached empty buffer with room for `len` bytes, for a body appended to.
    pub fn take_empty(&self, len: usize) -> Vec<u8> {
        let mut buf = self.pop_fitting(len);
        buf.clear();
        // Exact: growing a kept buffer must not double it past what was asked.
        buf.reserve_exact(len);
        buf
    }

    /// The idle buffer with the smallest capacity that holds `len` bytes, else the
    /// largest one (to grow), else a new empty one.
    fn pop_fitting(&self, len: usize) -> Vec<u8> {
        let mut free = self.free();
        let fitting = (0..free.buffers.len())
            .filter(|&i| free.buffers[i].capacity() >= len)
            .min_by_key(|&i| free.buffers[i].capacity());
        let chosen =
            fitting.or_else(|| (0..free.buffers.len()).max_by_key(|&i| free.buffers[i].capacity()));
        match chosen {
            Some(i) => {
                let buf = free.buffers.swap_remove(i);
                free.bytes -= buf.capacity();
                buf
            }
            None => Vec::new(),
        }
    }

    /// Keeps `buf` for reuse, unless it is larger than the largest kept or the pool
    /// holds enough; a buffer not kept is freed outside the lock.
    pub fn give_back(&self, buf: Vec<u8>) {
        let capacity = buf.capacity();
        if capacity == 0 || capacity > self.largest {
            return;
        }
        let refused = {
            let mut free = self.free();
            if free.bytes + capacity <= self.retained {
                free.bytes += capacity;
                free.buffers.push(buf);
                None
            } else {
                Some(buf)
            }
        };
        drop(refused);
    }

    /// Bytes (capacity) of the idle buffers.
    pub fn idle_bytes(&self) -> usize {
        self.free().bytes
    }

    fn free(&self) -> std::sync::MutexGuard<'_, Free> {
        // Every update is one step on plain data: a poisoned lock is still consistent.
        self.free.lock().unwrap_or_else(PoisonError::into_inner)
    }

    #[cfg(test)]
    fn idle(&self) -> usize {
        self.free().buffers.len()
    }
}

/// A buffer on loan from a [`BufferPool`]; it goes back when dropped.
#[derive(Debug)]
pub struct PooledBuffer {
    /// At least `len` initialised bytes (more from an earlier, larger loan).
    buf: Vec<u8>,
    /// The length asked for.
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
    fn detached_buffers_come_back_and_the_largest_kept_is_bounded() {
        let pool = BufferPool::bounded(16 << 20, 4 << 20);
        pool.give_back(vec![0; (4 << 20) + 1]);
        assert_eq!(pool.idle_bytes(), 0, "too large a buffer is not kept");
        let mut body = pool.take_empty(1 << 20);
        body.extend_from_slice(&[7; 1000]);
        let address = body.as_ptr();
        pool.give_back(body);
        assert_eq!(pool.idle_bytes(), 1 << 20);
        let decoded = pool.take_filled(1 << 20);
        assert_eq!(decoded.len(), 1 << 20);
        assert_eq!(decoded.as_ptr(), address, "the same memory: no fresh pages");
        assert_eq!(pool.idle_bytes(), 0);
        for _ in 0..20 {
            pool.give_back(Vec::with_capacity(1 << 20));
        }
        assert_eq!(
            pool.idle_bytes(),
            16 << 20,
            "filled up to the bound, not past it"
        );
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
