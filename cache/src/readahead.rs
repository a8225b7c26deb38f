//! Sequential-read detection: which chunks to fetch ahead of a reader.
//!
//! A few streams are tracked at once (nbdcopy and the kernel read several regions in
//! parallel). A stream that moves on to the next chunk again and again earns a window
//! that doubles, 2 to [`MAX_WINDOW`] chunks; reads that jump about (an ext4 mount
//! reading metadata, a boot reading scattered files) earn none, so a lazy boot fetches
//! what it reads and little more. A move counts only when the stream read at least a
//! quarter of the chunk it leaves ([`COVERED_SHARE`]): a walk that reads a few small
//! files in each chunk in turn (`find` and `cat` over a tree laid out in order) moves
//! from chunk to chunk too, but reads a few KiB of each, and fetching whole chunks
//! ahead of it would fetch mostly what it skips.

use std::ops::Range;
use std::sync::Mutex;

/// Streams tracked at once; more parallel sequential readers than this share windows
/// less well but stay correct.
const STREAMS: usize = 8;
/// The largest window: 8 chunks (8 MiB at the default size) keeps a loopback or LAN
/// link busy while the reader consumes the current chunk; a larger one mostly fetches
/// past the end of the files a boot reads.
pub const MAX_WINDOW: usize = 8;
/// Consecutive chunk moves before a stream gets a window: three moves (four chunks in a
/// row) tell a sequential reader from a few neighbouring reads of a small file.
const MOVES_BEFORE_WINDOW: u32 = 3;
/// A move to the next chunk counts when the stream read at least 1/4 of the chunk it
/// left.
const COVERED_SHARE: u64 = 4;

#[derive(Clone, Copy, Default)]
struct Stream {
    /// The last chunk this stream read; `None` for a free slot.
    last: Option<usize>,
    /// Consecutive moves to the next chunk.
    moves: u32,
    /// Bytes read in the chunk `last`.
    bytes: u64,
    /// Chunks up to (not including) this one were already asked for.
    fetched_to: usize,
    /// For replacement: larger is more recent.
    used: u64,
}

/// The sequential streams of one template's readers.
pub struct Readahead {
    state: Mutex<(u64, [Stream; STREAMS])>,
    chunk_size: u64,
}

impl Readahead {
    /// The streams of a template of chunks of `chunk_size` bytes.
    pub fn new(chunk_size: u64) -> Readahead {
        Readahead {
            state: Mutex::default(),
            chunk_size,
        }
    }

    /// Records a read of `len` bytes in chunks `first..=last`; returns chunks to fetch
    /// ahead, if any.
    pub fn on_read(&self, first: usize, last: usize, len: u64) -> Option<Range<usize>> {
        let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (clock, streams) = &mut *guard;
        *clock += 1;
        let now = *clock;
        let found = streams
            .iter()
            .position(|s| s.last.is_some_and(|l| first == l || first == l + 1));
        let slot = match found {
            Some(i) => i,
            None => {
                let oldest = (0..STREAMS).min_by_key(|&i| streams[i].used).unwrap_or(0);
                streams[oldest] = Stream {
                    last: Some(last),
                    moves: 0,
                    bytes: len,
                    fetched_to: last + 1,
                    used: now,
                };
                return None;
            }
        };
        let stream = &mut streams[slot];
        stream.used = now;
        let previous = stream.last.unwrap_or(last);
        if last <= previous {
            if last == previous {
                stream.bytes += len;
            }
            return None;
        }
        // A read across a chunk boundary covers what it crosses.
        let covered = first < last || stream.bytes >= self.chunk_size / COVERED_SHARE;
        stream.bytes = len;
        stream.last = Some(last);
        if !covered {
            stream.moves = 0;
            return None;
        }
        stream.moves += (last - previous) as u32;
        if stream.moves < MOVES_BEFORE_WINDOW {
            stream.fetched_to = stream.fetched_to.max(last + 1);
            return None;
        }
        let window = (1usize << (stream.moves - MOVES_BEFORE_WINDOW + 1).min(8)).min(MAX_WINDOW);
        let from = stream.fetched_to.max(last + 1);
        let to = last + 1 + window;
        if from >= to {
            return None;
        }
        stream.fetched_to = to;
        Some(from..to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sequential_reader_earns_a_growing_window() {
        let r = Readahead::new(1 << 20);
        assert_eq!(r.on_read(0, 0, 1 << 20), None);
        assert_eq!(r.on_read(0, 0, 1 << 20), None, "same chunk");
        assert_eq!(
            r.on_read(1, 1, 1 << 20),
            None,
            "one move is not a stream yet"
        );
        assert_eq!(r.on_read(2, 2, 1 << 20), None, "nor two");
        assert_eq!(r.on_read(3, 3, 1 << 20), Some(4..6));
        assert_eq!(r.on_read(4, 4, 1 << 20), Some(6..9));
        assert_eq!(r.on_read(5, 5, 1 << 20), Some(9..14));
        let mut last = None;
        for c in 5..40 {
            if let Some(range) = r.on_read(c, c, 1 << 20) {
                assert!(range.end - c - 1 <= MAX_WINDOW);
                last = Some(range);
            }
        }
        assert_eq!(last.map(|r| r.end), Some(39 + 1 + MAX_WINDOW));
    }

    #[test]
    fn random_reads_earn_nothing() {
        let r = Readahead::new(1 << 20);
        for c in [50, 3, 900, 52, 7, 400, 55, 2, 600, 51, 4] {
            assert_eq!(r.on_read(c, c, 1 << 20), None, "chunk {c}");
        }
    }

    #[test]
    fn parallel_streams_are_told_apart() {
        let r = Readahead::new(1 << 20);
        let mut got = [false; 2];
        for step in 0..8 {
            for (i, base) in [0usize, 1000].iter().enumerate() {
                if r.on_read(base + step, base + step, 1 << 20).is_some() {
                    got[i] = true;
                }
            }
        }
        assert_eq!(got, [true, true]);
    }

    #[test]
    fn a_walk_that_reads_a_little_of_each_chunk_earns_nothing() {
        let r = Readahead::new(1 << 20);
        for c in 0..40 {
            // Three small files in each chunk, in order.
            for _ in 0..3 {
                assert_eq!(r.on_read(c, c, 16 << 10), None, "chunk {c}");
            }
        }
        // Then a file read whole, across chunks: a stream again.
        let mut got = None;
        for c in 100..110 {
            for _ in 0..4 {
                got = got.or(r.on_read(c, c, 256 << 10));
            }
        }
        assert!(got.is_some());
    }
}
