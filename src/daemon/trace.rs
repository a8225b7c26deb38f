//! Traces: the order in which a template's chunks are first read on this node (the boot
//! working set), recorded without anyone asking and published to the store, so that a
//! fill on any other node fetches those chunks first, in that order.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

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
    /// The trace has been published (or the store already had one).
    published: AtomicBool,
    timing: TraceTiming,
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
            published: AtomicBool::new(false),
            timing,
        }
    }

    /// Records a client read of chunks `first..=last`.
    pub fn record(&self, first: usize, last: usize) {
        if self.published.load(Ordering::Relaxed) {
            return;
        }
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
                self.last_growth_ms
                    .store(elapsed.as_millis() as u64, Ordering::Relaxed);
            }
        }
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

    /// Whether the trace is complete enough to publish: the window closed, or nothing
    /// new was read for the quiet time.
    pub fn ready_to_publish(&self) -> bool {
        let Some(started) = self.started.get() else {
            return false;
        };
        if self.published.load(Ordering::Relaxed) {
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

    /// Stops recording: the trace was published or the store has one already.
    pub fn mark_published(&self) {
        self.published.store(true, Ordering::Relaxed);
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
        t.mark_published();
        t.record(7, 7);
        assert_eq!(t.order().len(), 4);
    }
}
