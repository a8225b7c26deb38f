//! Traces: the byte ranges of a template first read on this node (the boot working set,
//! at block granularity, in order) and the order of the chunks they lie in, recorded
//! without anyone asking and published to the store, so that any other node that opens
//! the template replays those ranges before its boot reads them
//! ([`crate::daemon::replay`]) and its fill fetches those chunks first.
//!
//! Published: by the first node whose boot's trace is complete, and improved by later
//! boots as a union: the stored ranges keep their order and a boot appends what it read
//! that the stored trace missed (nothing is published when it missed nothing), up to
//! [`MAX_TRACE_RANGES`]. A union, not the most recent boot's: a boot on a node that
//! already holds part of the template (or that a short-lived sandbox cut off) reads less
//! than a cold one, and replacing the trace with its reads would drop what the next cold
//! boot needs; a replay that overshoots a boot costs only bytes, and stops as soon as the
//! boot's reads leave the trace.

pub mod ranges;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use lazyblk_cache::manifest::BLOCK_SIZE;
use lazyblk_cache::Manifest;

use crate::store::{TraceDoc, MAX_TRACE_RANGES, TRACE_VERSION};
use ranges::RangeSet;

/// When a trace is complete.
#[derive(Clone, Copy, Debug)]
pub struct TraceTiming {
    /// How long after a template's first read on this node its reads count as the boot
    /// working set. A microVM boots in seconds; the default minute covers slow starts
    /// without turning the trace into a record of everything the sandbox later does.
    pub window: Duration,
    /// How long the trace must stop growing before it is published early (a boot that
    /// finished before the window closed).
    pub quiet: Duration,
}

/// Records the first read of each chunk of one template.
pub struct TraceRecorder {
    /// One bit per chunk: already recorded. Checked without a lock on every read.
    seen: Vec<AtomicU64>,
    /// Chunk indices in the order of their first read.
    order: Mutex<Vec<u32>>,
    started: OnceLock<Instant>,
    /// When the last new chunk was recorded, in ms since `started`.
    last_growth_ms: AtomicU64,
    /// Bumped at every new chunk or range recorded.
    growth: AtomicU64,
    /// `growth` when the trace was last published (or found in the store already): a
    /// boot that pauses longer than the quiet time is published in parts, each a union
    /// with the last, until the window closes.
    published_growth: AtomicU64,
    /// Set when this node stored the trace: the next round reads it back, and publishes
    /// again if what this node recorded is not in it (two nodes storing their unions at
    /// once: the last write wins, the other node adds its ranges again).
    check_stored: AtomicBool,
    timing: TraceTiming,
    /// Byte ranges first read, block-aligned, in order; bounded by [`MAX_TRACE_RANGES`].
    ranges: Mutex<RecordedRanges>,
}

/// The ranges of a trace being recorded.
#[derive(Default)]
struct RecordedRanges {
    /// What was read so far.
    covered: RangeSet,
    /// `[offset, length]` of each first read, a read that continues the last merged
    /// into it (a sequential stream is one range).
    order: Vec<[u64; 2]>,
}

impl TraceRecorder {
    pub fn new(chunks: usize, timing: TraceTiming) -> TraceRecorder {
        TraceRecorder {
            seen: (0..chunks.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            order: Mutex::new(Vec::new()),
            started: OnceLock::new(),
            last_growth_ms: AtomicU64::new(0),
            growth: AtomicU64::new(0),
            published_growth: AtomicU64::new(0),
            check_stored: AtomicBool::new(false),
            timing,
            ranges: Mutex::default(),
        }
    }

    /// Records a client read of `len` bytes at `offset` of a template of `size` bytes in
    /// chunks of `chunk_size`: its chunks, and its bytes widened to whole blocks.
    pub fn record_read(&self, offset: u64, len: u64, size: u64, chunk_size: u64) {
        if len == 0 || offset >= size || chunk_size == 0 {
            return;
        }
        let last = (offset + len - 1).min(size - 1);
        self.record((offset / chunk_size) as usize, (last / chunk_size) as usize);
        if self.is_closed() {
            return;
        }
        let start = offset / BLOCK_SIZE * BLOCK_SIZE;
        let end = (last / BLOCK_SIZE + 1) * BLOCK_SIZE;
        let mut ranges = self.ranges.lock().unwrap_or_else(|e| e.into_inner());
        if ranges.order.len() >= MAX_TRACE_RANGES {
            return;
        }
        let end = end.min(size.div_ceil(BLOCK_SIZE) * BLOCK_SIZE);
        let ranges = &mut *ranges;
        let new = ranges.covered.insert(start, end);
        if !new.is_empty() {
            self.grew();
        }
        for (s, e) in new {
            let full = ranges.order.len() >= MAX_TRACE_RANGES;
            match ranges.order.last_mut() {
                Some(last) if last[0] + last[1] == s => last[1] += e - s,
                _ if !full => ranges.order.push([s, e - s]),
                _ => return,
            }
        }
    }

    /// Whether the recording window has closed.
    fn is_closed(&self) -> bool {
        self.started
            .get()
            .is_some_and(|s| s.elapsed() > self.timing.window)
    }

    /// The document to publish for `manifest`'s template, given the one the store has
    /// (`stored`, already checked against the template): the union of the stored ranges
    /// (in their order) and this node's (those the stored trace missed, after them).
    /// `None` when this node read nothing the stored trace misses.
    pub fn document(&self, manifest: &Manifest, stored: Option<&TraceDoc>) -> Option<TraceDoc> {
        let own = self
            .ranges
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .order
            .clone();
        let kept: Vec<[u64; 2]> = stored.map(|d| d.ranges.clone()).unwrap_or_default();
        let mut covered = RangeSet::of(&kept);
        let mut ranges = kept.clone();
        for [offset, len] in own {
            for (s, e) in covered.insert(offset, offset + len) {
                if ranges.len() < MAX_TRACE_RANGES {
                    ranges.push([s, e - s]);
                }
            }
        }
        let upgraded = stored.is_some_and(|d| d.ranges.is_empty()) && !ranges.is_empty();
        if stored.is_some() && ranges.len() == kept.len() && !upgraded {
            return None;
        }
        let chunk_size = (manifest.chunk_size as u64).max(1);
        let mut seen = std::collections::HashSet::new();
        let mut chunks = Vec::new();
        let from_ranges = ranges
            .iter()
            .flat_map(|&[offset, len]| (offset / chunk_size)..=((offset + len - 1) / chunk_size));
        let stored_chunks = stored
            .iter()
            .flat_map(|d| d.chunks.iter().map(|&c| c as u64));
        let own_chunks = self.order().into_iter().map(|c| c as u64);
        for chunk in from_ranges.chain(stored_chunks).chain(own_chunks) {
            if (chunk as usize) < manifest.chunk_count() && seen.insert(chunk) {
                chunks.push(chunk as usize);
            }
        }
        Some(TraceDoc {
            template: manifest.template.clone(),
            chunks,
            version: Some(TRACE_VERSION),
            size: Some(manifest.size),
            content: Some(manifest.content_digest().to_string()),
            ranges,
        })
    }

    /// Records a client read of chunks `first..=last`.
    pub fn record(&self, first: usize, last: usize) {
        let started = *self.started.get_or_init(Instant::now);
        let elapsed = started.elapsed();
        if elapsed > self.timing.window {
            return;
        }
        for index in first..=last {
            let Some(word) = self.seen.get(index / 64) else {
                return;
            };
            let bit = 1u64 << (index % 64);
            if word.load(Ordering::Relaxed) & bit != 0 {
                continue;
            }
            if word.fetch_or(bit, Ordering::Relaxed) & bit == 0 {
                self.order
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(index as u32);
                self.grew();
            }
        }
    }

    /// Notes that the trace grew now.
    fn grew(&self) {
        if let Some(started) = self.started.get() {
            self.last_growth_ms
                .store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
        }
        self.growth.fetch_add(1, Ordering::Relaxed);
    }

    /// How often the trace grew so far: what [`TraceRecorder::mark_published`] is given
    /// once what was taken after it is published.
    pub fn growth(&self) -> u64 {
        self.growth.load(Ordering::Relaxed)
    }

    /// The recorded order so far.
    pub fn order(&self) -> Vec<usize> {
        self.order
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|&i| i as usize)
            .collect()
    }

    /// Whether the trace is complete enough to publish: it grew since it was last
    /// published, and the window closed or nothing new was read for the quiet time.
    pub fn ready_to_publish(&self) -> bool {
        let Some(started) = self.started.get() else {
            return false;
        };
        if self.check_stored.load(Ordering::Relaxed) {
            return true;
        }
        if self.growth() <= self.published_growth.load(Ordering::Relaxed) {
            return false;
        }
        let elapsed = started.elapsed();
        let last = Duration::from_millis(self.last_growth_ms.load(Ordering::Relaxed));
        elapsed > self.timing.window || elapsed.saturating_sub(last) > self.timing.quiet
    }

    /// Whether a read was recorded (the trace has something to keep).
    pub fn is_started(&self) -> bool {
        self.started.get().is_some()
    }

    /// What the trace held at `growth` ([`TraceRecorder::growth`]) is published
    /// (`stored`: this node wrote it, to be read back once) or the store has it already;
    /// recording goes on until the window closes.
    pub fn mark_published(&self, growth: u64, stored: bool) {
        self.published_growth.fetch_max(growth, Ordering::Relaxed);
        self.check_stored.store(stored, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_first_reads_in_order_once() {
        let t = TraceRecorder::new(
            200,
            TraceTiming {
                window: Duration::from_secs(60),
                quiet: Duration::from_secs(10),
            },
        );
        t.record(5, 5);
        t.record(130, 131);
        t.record(5, 6);
        t.record(300, 300); // past the end: ignored
        assert_eq!(t.order(), vec![5, 130, 131, 6]);
        assert!(!t.ready_to_publish());
        t.mark_published(t.growth(), false);
        t.record(7, 7);
        assert_eq!(t.order().len(), 5, "recorded until the window closes");
        assert!(t.growth() > 4);
    }

    fn recorder() -> TraceRecorder {
        TraceRecorder::new(
            16,
            TraceTiming {
                window: Duration::from_secs(60),
                quiet: Duration::from_secs(10),
            },
        )
    }

    const C: u64 = 1 << 20;

    #[test]
    fn ranges_are_block_aligned_first_reads_in_order_and_a_stream_is_one_range() {
        let t = recorder();
        let m = Manifest::new("t", 16 * C, C as u32);
        t.record_read(5 * C + 100, 10, m.size, C);
        t.record_read(2 * C, 8192, m.size, C);
        t.record_read(2 * C + 8192, 4096, m.size, C);
        t.record_read(5 * C, 4096, m.size, C); // read already
        t.record_read(16 * C, 4096, m.size, C); // past the end
        let doc = t.document(&m, None).expect("a first trace");
        assert_eq!(doc.ranges, vec![[5 * C, 4096], [2 * C, 12288]]);
        assert_eq!(doc.chunks, vec![5, 2]);
        assert_eq!(doc.version, Some(TRACE_VERSION));
        assert_eq!(doc.check("t", &m), Ok(()));
    }

    #[test]
    fn a_later_boot_adds_what_the_stored_trace_missed_after_it_or_nothing() {
        let m = Manifest::new("t", 16 * C, C as u32);
        let first = recorder();
        first.record_read(3 * C, 4096, m.size, C);
        first.record_read(C, 4096, m.size, C);
        let stored = first.document(&m, None).unwrap();
        let again = recorder();
        again.record_read(C, 4096, m.size, C);
        assert!(again.document(&m, Some(&stored)).is_none(), "nothing new");
        let later = recorder();
        later.record_read(7 * C, 4096, m.size, C);
        later.record_read(3 * C, 8192, m.size, C);
        let union = later.document(&m, Some(&stored)).unwrap();
        assert_eq!(
            union.ranges,
            vec![
                [3 * C, 4096],
                [C, 4096],
                [7 * C, 4096],
                [3 * C + 4096, 4096]
            ]
        );
        assert_eq!(union.chunks, vec![3, 1, 7]);
    }

    #[test]
    fn traces_of_another_template_other_content_or_past_the_end_are_refused() {
        let m = Manifest::new("t", 16 * C, C as u32);
        let t = recorder();
        t.record_read(0, 4096, m.size, C);
        let doc = t.document(&m, None).unwrap();
        let mut other = m.clone();
        other.size = 32 * C;
        other.chunks = vec![None; 32];
        assert!(matches!(
            doc.check("t", &other),
            Err(crate::store::trace::TraceRefusal::OtherContent { .. })
        ));
        assert!(matches!(
            doc.check("u", &m),
            Err(crate::store::trace::TraceRefusal::OtherTemplate { .. })
        ));
        let mut past = doc.clone();
        past.ranges.push([16 * C - 4096, 8192]);
        assert!(matches!(
            past.check("t", &m),
            Err(crate::store::trace::TraceRefusal::RangePastEnd { .. })
        ));
        let mut empty = doc.clone();
        empty.ranges.push([0, 0]);
        assert!(empty.check("t", &m).is_err());
        let mut future = doc;
        future.version = Some(TRACE_VERSION + 1);
        assert!(future.check("t", &m).is_err());
    }
}
