//! Reusable I/O buffers, so that a read or write request does not allocate (and
//! fault in) a fresh megabyte each time.

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, PoisonError};

/// A bounded free list of equally sized buffers.
#[derive(Debug)]
pub(crate) struct BufferPool {
    /// Buffers waiting for the next request, each `buffer_len` bytes long.
    free: Mutex<Vec<Vec<u8>>>,
    /// The size of a pooled buffer: the largest request the kernel sends.
    buffer_len: usize,
    /// How many idle buffers are kept; more are freed on return, so a burst of
    /// requests does not pin its peak memory forever.
    retained: usize,
}

impl BufferPool {
    /// A pool of `buffer_len`-byte buffers that keeps at most `retained` idle ones.
    pub(crate) fn new(buffer_len: usize, retained: usize) -> Arc<BufferPool> {
        Arc::new(BufferPool {
            free: Mutex::new(Vec::new()),
            buffer_len,
            retained,
        })
    }

    /// A buffer of exactly `len` bytes (contents unspecified), returned to the pool
    /// when dropped. A request larger than the pooled size gets a one-off buffer.
    pub(crate) fn take(self: &Arc<Self>, len: usize) -> PooledBuffer {
        let reused = if len <= self.buffer_len {
            self.free
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop()
        } else {
            None
        };
        let buf = reused.unwrap_or_else(|| vec![0; len.max(self.buffer_len)]);
        PooledBuffer {
            buf,
            len,
            pool: Arc::clone(self),
        }
    }

    fn give_back(&self, buf: Vec<u8>) {
        if buf.len() != self.buffer_len {
            return;
        }
        let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        if free.len() < self.retained {
            free.push(buf);
        }
    }
}

/// A buffer on loan from a [`BufferPool`]; derefs to its `len` bytes.
#[derive(Debug)]
pub(crate) struct PooledBuffer {
    /// The whole allocation (at least `len` bytes).
    buf: Vec<u8>,
    /// How many bytes this request uses.
    len: usize,
    /// Where the allocation goes back to.
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
    fn buffers_are_reused() {
        let pool = BufferPool::new(1024, 2);
        let first = pool.take(10);
        let ptr = first.as_ptr();
        assert_eq!(first.len(), 10);
        drop(first);
        let second = pool.take(1024);
        assert_eq!(second.as_ptr(), ptr);
        assert_eq!(second.len(), 1024);
    }

    #[test]
    fn oversized_requests_get_their_own_buffer() {
        let pool = BufferPool::new(16, 2);
        let big = pool.take(100);
        assert_eq!(big.len(), 100);
        drop(big);
        assert!(pool.free.lock().unwrap().is_empty());
    }

    #[test]
    fn idle_buffers_are_bounded() {
        let pool = BufferPool::new(16, 2);
        let held: Vec<_> = (0..5).map(|_| pool.take(16)).collect();
        drop(held);
        assert_eq!(pool.free.lock().unwrap().len(), 2);
    }
}
