//! What a request to one source costs, as measured: the basis of fetches shaped for
//! latency.
//!
//! A read of part of a missing chunk stored in blocks ([`crate::partial`]) makes two
//! requests one after the other when the chunk's table is not known yet (the table,
//! then the blocks), and each later read of another part of that chunk makes one more.
//! On loopback or a LAN a request costs about its bytes, and fetching only the blocks
//! read saves bytes at no cost in time. A store 20 ms away costs about 20 ms per
//! request whatever its size up to a few MiB (at 1 Gbit/s a 1 MiB chunk takes 8 ms on
//! the wire): there the two requests cost more than the whole chunk in one, and every
//! later read of the chunk is then local. A lazy boot over such a link waited on 418
//! chunk requests nearly one after another, 67 of them for tables, for 100 chunks
//! (scripts/bench/requests.py on B12's first boot).
//!
//! So each source keeps two running means of what its successful requests took, from
//! the request to the last byte of the body: small ranges (a table, a few blocks: at
//! most [`SMALL_RANGE`] bytes) and whole chunks ([`LinkTimes::whole_is_cheaper`]),
//! which decide once each has [`MIN_SAMPLES`] samples. A chunk's first read, which
//! would fetch its table and then its blocks, fetches the chunk whole instead when the
//! whole takes at most [`WHOLE_VS_TABLE_AND_BLOCKS`] small requests: never slower, and
//! every later read of the chunk is local (in B12's first boot two chunks in three were
//! read more than once, four times on average). A later read of a chunk whose table is
//! known does when the whole takes at most [`WHOLE_VS_BLOCKS`]. Until the means are
//! known, on a link where a whole chunk costs more (loopback, a LAN: a request costs
//! about its bytes), and wherever a small request takes less than [`MIN_LATENCY`] (a
//! busy machine's loopback, where both kinds take its scheduling's time), reads fetch
//! blocks as before. Blocks a read finds in memory
//! (a replay's) are used first either way.

use std::sync::Mutex;
use std::time::Duration;

/// A range of at most this many bytes is a "small" request: its time is about the
/// link's latency (a table is 532 bytes for 128 blocks; a boot's block runs are a few
/// KiB compressed).
pub const SMALL_RANGE: u64 = 64 * 1024;
/// Samples of each kind before the means decide anything: the first requests of a
/// node (a new connection, TLS) are slower than the link.
pub const MIN_SAMPLES: u32 = 4;
/// A chunk's first read (its table not known) fetches it whole when that takes at most
/// this many small requests: the two it replaces, one after the other. A store 20 ms
/// away at 1 Gbit/s takes about 1.15 (a 400 KiB stored chunk), 60 ms away at
/// 200 Mbit/s about 1.3, through B12's emulated guest network up to about 1.7;
/// loopback 3 or more, unless the chunks compress to a few KiB (then a whole one costs
/// nothing either).
pub const WHOLE_VS_TABLE_AND_BLOCKS: f64 = 2.0;
/// A later read (the table known) fetches the chunk whole when that takes at most this
/// many small requests: at most half a request more than its blocks, for a chunk that
/// is being read again.
pub const WHOLE_VS_BLOCKS: f64 = 1.5;
/// Whole chunks are preferred only where a small request takes at least this long: a
/// link's latency, not the machine's own scheduling. On loopback under load a small
/// range and a whole chunk can take about as long (B4 measured 1.17 ms and 2.04 ms on
/// a busy two-core machine), and fetching whole chunks there cost the lazy boot 2-4x the
/// bytes of its blocks for no time saved. A store in region answers in 20 ms or more.
pub const MIN_LATENCY: Duration = Duration::from_millis(5);
/// The weight of a new sample in a running mean: 1/8 follows a link that changes
/// within a few dozen requests and is not swayed by one slow answer.
const WEIGHT: f64 = 1.0 / 8.0;

#[derive(Clone, Copy, Debug, Default)]
struct Mean {
    seconds: f64,
    samples: u32,
}

impl Mean {
    fn add(&mut self, took: Duration) {
        let t = took.as_secs_f64();
        self.seconds = if self.samples == 0 {
            t
        } else {
            self.seconds + WEIGHT * (t - self.seconds)
        };
        self.samples = self.samples.saturating_add(1);
    }

    fn known(&self) -> Option<f64> {
        (self.samples >= MIN_SAMPLES).then_some(self.seconds)
    }
}

/// The measured cost of one source's requests (shared by the clones of the source).
#[derive(Debug, Default)]
pub struct LinkTimes {
    means: Mutex<(Mean, Mean)>,
}

/// What [`LinkTimes::snapshot`] reports: the mean seconds of a small range and of a
/// whole chunk, each once it has [`MIN_SAMPLES`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinkSnapshot {
    pub small: Option<f64>,
    pub whole: Option<f64>,
}

impl LinkTimes {
    /// Records a successful ranged request of `bytes` that took `took`.
    pub fn range(&self, bytes: u64, took: Duration) {
        if bytes <= SMALL_RANGE {
            self.lock().0.add(took);
        }
    }

    /// Records a successful fetch of a whole chunk's stored object that took `took`.
    pub fn whole(&self, took: Duration) {
        self.lock().1.add(took);
    }

    /// Whether a read of a chunk should fetch it whole rather than in blocks: when a
    /// small request takes at least [`MIN_LATENCY`] and the whole takes at most
    /// [`WHOLE_VS_TABLE_AND_BLOCKS`] small requests (the chunk's table not known) or
    /// [`WHOLE_VS_BLOCKS`] (known); `false` until both means are known.
    pub fn whole_is_cheaper(&self, table_known: bool) -> bool {
        let factor = if table_known {
            WHOLE_VS_BLOCKS
        } else {
            WHOLE_VS_TABLE_AND_BLOCKS
        };
        match self.snapshot() {
            LinkSnapshot {
                small: Some(small),
                whole: Some(whole),
            } => small >= MIN_LATENCY.as_secs_f64() && whole <= factor * small,
            _ => false,
        }
    }

    pub fn snapshot(&self) -> LinkSnapshot {
        let (small, whole) = *self.lock();
        LinkSnapshot {
            small: small.known(),
            whole: whole.known(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Mean, Mean)> {
        self.means.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn nothing_is_decided_before_enough_samples() {
        let link = LinkTimes::default();
        for _ in 0..MIN_SAMPLES - 1 {
            link.range(600, ms(20));
            link.whole(ms(24));
        }
        assert!(!link.whole_is_cheaper(false));
        link.range(600, ms(20));
        assert!(
            !link.whole_is_cheaper(false),
            "whole chunks still have too few samples"
        );
        link.whole(ms(24));
        assert!(link.whole_is_cheaper(false));
    }

    #[test]
    fn a_far_store_prefers_whole_chunks_and_loopback_prefers_blocks() {
        let far = LinkTimes::default();
        let near = LinkTimes::default();
        for _ in 0..MIN_SAMPLES {
            // 20 ms per request, 1 Gbit/s: a 400 KiB stored chunk takes 23 ms.
            far.range(4000, ms(20));
            far.whole(ms(23));
            // Loopback: 0.2 ms per request, a chunk 1 ms.
            near.range(4000, Duration::from_micros(200));
            near.whole(ms(1));
        }
        assert!(far.whole_is_cheaper(false));
        assert!(!near.whole_is_cheaper(false));
    }

    #[test]
    fn a_busy_loopback_is_not_a_slow_link() {
        // B4 on a loaded two-core machine: small ranges 1.17 ms, whole chunks 2.04 ms.
        let busy = LinkTimes::default();
        for _ in 0..MIN_SAMPLES {
            busy.range(4000, Duration::from_micros(1170));
            busy.whole(Duration::from_micros(2040));
        }
        assert!(!busy.whole_is_cheaper(false));
        assert!(!busy.whole_is_cheaper(true));
    }

    #[test]
    fn a_later_read_needs_a_cheaper_whole_chunk_than_a_first_one() {
        let link = LinkTimes::default();
        for _ in 0..MIN_SAMPLES {
            link.range(600, ms(20));
            // 1.75 small requests: under the table and blocks, over blocks alone.
            link.whole(ms(35));
        }
        assert!(link.whole_is_cheaper(false));
        assert!(!link.whole_is_cheaper(true));
    }

    #[test]
    fn large_ranges_are_not_latency_samples() {
        let link = LinkTimes::default();
        for _ in 0..MIN_SAMPLES {
            link.range(SMALL_RANGE + 1, ms(100));
            link.whole(ms(30));
        }
        assert_eq!(link.snapshot().small, None);
        assert!(!link.whole_is_cheaper(false));
    }

    #[test]
    fn the_mean_follows_a_link_that_changes() {
        let link = LinkTimes::default();
        for _ in 0..MIN_SAMPLES {
            link.range(600, ms(20));
            link.whole(ms(25));
        }
        assert!(link.whole_is_cheaper(false));
        // The link gets slow for large bodies (a rate cap): whole chunks now take 200 ms.
        for _ in 0..40 {
            link.whole(ms(200));
        }
        assert!(!link.whole_is_cheaper(false));
    }
}
