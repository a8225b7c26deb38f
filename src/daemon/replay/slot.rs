//! A replica's replay as its readers and its evict see it: the one replay that runs or
//! ran for the replica, the reads that tell it the boot left its trace, and the stop.
//! The replay itself ([`super`]) drives it; the replica only holds it, so a read can
//! stop a replay without knowing how one runs.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::daemon::trace::ranges::RangeSet;

/// First reads in a row outside the trace after which the boot has left it and the
/// replay stops: a boot's reads interleave a few outside the trace (files a previous
/// boot did not need), a sandbox's own work after its boot is all outside.
pub const LEFT_TRACE_READS: u32 = 64;

/// Why a replay stopped (the `reason` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StopReason {
    /// The store has no trace of ranges for the template: nothing was replayed, and
    /// nothing is counted.
    NoTrace,
    Done,
    Evicted,
    Unwarmed,
    LeftTrace,
    Refused,
    Failed,
}

impl StopReason {
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::NoTrace => "no_trace",
            StopReason::Done => "done",
            StopReason::Evicted => "evicted",
            StopReason::Unwarmed => "unwarmed",
            StopReason::LeftTrace => "left_trace",
            StopReason::Refused => "refused",
            StopReason::Failed => "failed",
        }
    }
}

/// A replica's replay, as the readers and the evict see it.
#[derive(Default)]
pub struct ReplaySlot {
    state: Mutex<Option<Arc<Running>>>,
}

/// One replay under way (or finished: then it is not started again for the replica).
pub(super) struct Running {
    /// The trace's coverage, to tell reads that left it; empty until the trace is read.
    pub(super) covered: Mutex<RangeSet>,
    outside_in_a_row: AtomicU32,
    /// Set once, to the reason the replay stops.
    pub(super) stop: watch::Sender<Option<StopReason>>,
}

impl Running {
    pub(super) fn stop(&self, reason: StopReason) {
        self.stop.send_if_modified(|r| {
            if r.is_none() {
                *r = Some(reason);
                true
            } else {
                false
            }
        });
    }
}

impl ReplaySlot {
    /// A read of `[offset, offset + len)` by a client of the template: stops the replay
    /// when the reads have left its trace.
    pub fn note_read(&self, offset: u64, len: u64) {
        let running = match &*self.state.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(r) if r.stop.borrow().is_none() => r.clone(),
            _ => return,
        };
        let inside = {
            let covered = running.covered.lock().unwrap_or_else(|e| e.into_inner());
            covered.is_empty() || covered.overlaps(offset, offset.saturating_add(len))
        };
        if inside {
            running.outside_in_a_row.store(0, Ordering::Relaxed);
        } else if running.outside_in_a_row.fetch_add(1, Ordering::Relaxed) + 1 >= LEFT_TRACE_READS {
            running.stop(StopReason::LeftTrace);
        }
    }

    /// Stops the replay (evict, unwarm); a later open starts one again.
    pub fn stop(&self, reason: StopReason) {
        if let Some(running) = self.state.lock().unwrap_or_else(|e| e.into_inner()).take() {
            running.stop(reason);
        }
    }

    /// Registers a new replay unless one ran or runs for this replica.
    pub(super) fn begin(&self) -> Option<Arc<Running>> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.is_some() {
            return None;
        }
        let running = Arc::new(Running {
            covered: Mutex::default(),
            outside_in_a_row: AtomicU32::new(0),
            stop: watch::channel(None).0,
        });
        *state = Some(running.clone());
        Some(running)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_that_leave_the_trace_stop_the_replay_and_reads_in_it_do_not() {
        let slot = ReplaySlot::default();
        let running = slot.begin().expect("a first replay");
        assert!(slot.begin().is_none(), "one replay per replica");
        *running.covered.lock().unwrap() = RangeSet::of(&[[0, 4096], [1 << 20, 8192]]);
        for i in 0..LEFT_TRACE_READS - 1 {
            slot.note_read((10 << 20) + i as u64 * 4096, 4096);
        }
        // A read in the trace: the boot is still in it.
        slot.note_read((1 << 20) + 4096, 512);
        for i in 0..LEFT_TRACE_READS - 1 {
            slot.note_read((20 << 20) + i as u64 * 4096, 4096);
        }
        assert_eq!(*running.stop.borrow(), None);
        slot.note_read(30 << 20, 4096);
        assert_eq!(*running.stop.borrow(), Some(StopReason::LeftTrace));
        // An evict after the stop does not change the reason, and lets a later open
        // replay again.
        slot.stop(StopReason::Evicted);
        assert_eq!(*running.stop.borrow(), Some(StopReason::LeftTrace));
        assert!(slot.begin().is_some());
    }
}
