//! The fetch planner: which sources a template's chunks come from and in which order
//! ([`SourcePlan`]: its origins, the chunk's owners among the peers, the store or the
//! object store, the peers' caches), which class of work may fetch now (slots per
//! priority, demand first), which sources go last (their health) and when a read
//! hedges a slow node. The one runner in [`crate::fetch`] carries the plan out: one
//! fetch per chunk, every attempt within its deadline and a demand read's budget,
//! verification of whatever a transport returns.
//!
//! Slots. Demand reads, prefetches (readahead and NBD CACHE) and fills each have their
//! own slots, so a burst of prefetch or a fill never queues a demand read behind it. A
//! prefetch or fill fetch that a demand reader joins while it still waits for a slot is
//! promoted: it takes the next demand slot instead.
//!
//! Health. A source that fails [`FAILURES_BEFORE_BACKOFF`] times in a row is moved to
//! the end of every plan for a while (doubling from [`FIRST_BACKOFF`] up to
//! [`MAX_BACKOFF`]); it is still tried when every other source has failed, and its
//! first success restores it. So a stalled origin costs one deadline, not one per read.
//!
//! Hedging. A read (demand or prefetch) whose attempt at another node (a peer, an
//! origin) has not answered after [`Hedging::delay`] starts the next source of its plan
//! beside it and takes the first verified answer: a member that accepts and never
//! answers costs a read one hedge delay, not the source deadline, and fits in the
//! read's budget (`--read-deadline`). Fills do not hedge (a copy more from the store
//! for a chunk nobody waits for buys nothing); they wait out the source deadline.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::source::Source;

mod order;

pub use order::SourcePlan;

/// Fetches at once for demand reads: a deep guest queue of scattered cold reads.
pub const DEMAND_SLOTS: usize = 16;
/// Fetches at once for readahead and NBD CACHE.
pub const PREFETCH_SLOTS: usize = 8;
/// Fetches at once for background fills (each fill also bounds its own concurrency).
pub const FILL_SLOTS: usize = 8;

/// Consecutive failures after which a source is tried last.
pub const FAILURES_BEFORE_BACKOFF: u32 = 2;
/// How long a failing source is tried last, at first; doubled per further failure.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(2);
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// The shortest hedge delay (see [`crate::peers::HEDGE_DELAY_MIN`]: how long a healthy
/// node takes at most to answer).
pub use crate::peers::HEDGE_DELAY_MIN;
/// The longest hedge delay, and the delay before any node has answered (a wave of
/// cold reads, when the owners are busiest): half the default source deadline, so a
/// hedged read still has most of its budget for the next source.
pub const HEDGE_DELAY_MAX: Duration = Duration::from_secs(4);
/// The hedge delay is this many times the slowest recent answer of a node, within the
/// bounds above: owners that are slow under load (a wave of nodes booting one
/// template, each owner fetching for all) are waited for instead of every read also
/// going to the store. Paired runs of the fleet's wave test on this 2-core machine
/// (six daemons): with 4x the average answer the store sent 1.5-1.8 copies of the
/// template (answers took up to 1.6 s); with this, about one.
pub const HEDGE_SLOW_FACTOR: u32 = 2;
/// How fast the slowest recent answer is forgotten: by 1/16 at each answer, so it
/// follows the tail of the last few dozen answers.
const SLOW_DECAY: u64 = 16;
/// A demand read hedges within this share of its budget (1/4), so the next source has
/// the rest.
const HEDGE_BUDGET_SHARE: u32 = 4;

/// When a read hedges a slow node (see the module header): learns how long nodes
/// take to answer.
#[derive(Default)]
pub struct Hedging {
    /// The slowest recent time a node took to deliver a chunk, decaying (see
    /// [`SLOW_DECAY`]), in µs; 0 before the first answer.
    slow_us: AtomicU64,
}

impl Hedging {
    /// A node (peer or origin) delivered a chunk after `took`.
    pub fn observe(&self, took: Duration) {
        let took = took.as_micros().min(u64::MAX as u128) as u64;
        // A race of two updates loses one sample, which an estimate does not miss.
        let was = self.slow_us.load(Ordering::Relaxed);
        let now = took.max(was - was / SLOW_DECAY);
        self.slow_us.store(now.max(1), Ordering::Relaxed);
    }

    /// How long a read waits for a node before it hedges; `budget` is a demand read's.
    pub fn delay(&self, budget: Option<Duration>) -> Duration {
        let slow = self.slow_us.load(Ordering::Relaxed);
        let delay = if slow == 0 {
            HEDGE_DELAY_MAX
        } else {
            (Duration::from_micros(slow) * HEDGE_SLOW_FACTOR)
                .clamp(HEDGE_DELAY_MIN, HEDGE_DELAY_MAX)
        };
        match budget {
            Some(budget) => delay.min(budget / HEDGE_BUDGET_SHARE).max(HEDGE_DELAY_MIN),
            None => delay,
        }
    }
}

/// Who a fetch is for. Demand reads go first; prefetches (readahead, NBD CACHE) next;
/// fills last, with their hashing and writing on low-priority threads
/// ([`crate::background`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priority {
    Demand,
    Prefetch,
    Fill,
}

/// The slots of each class of fetch.
pub struct FetchSlots {
    demand: Arc<Semaphore>,
    prefetch: Arc<Semaphore>,
    fill: Arc<Semaphore>,
}

impl Default for FetchSlots {
    fn default() -> Self {
        FetchSlots {
            demand: Arc::new(Semaphore::new(DEMAND_SLOTS)),
            prefetch: Arc::new(Semaphore::new(PREFETCH_SLOTS)),
            fill: Arc::new(Semaphore::new(FILL_SLOTS)),
        }
    }
}

/// Set when a demand reader joins a fetch: the fetch then waits for a demand slot.
#[derive(Default)]
pub struct Promotion {
    demand: AtomicBool,
    notify: Notify,
}

impl Promotion {
    /// A demand reader waits for this fetch.
    pub fn promote(&self) {
        if !self.demand.swap(true, Ordering::AcqRel) {
            self.notify.notify_waiters();
        }
    }

    /// Whether a demand reader waits for this fetch.
    pub fn is_promoted(&self) -> bool {
        self.demand.load(Ordering::Acquire)
    }

    async fn promoted(&self) {
        loop {
            let notified = self.notify.notified();
            if self.demand.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }
}

impl FetchSlots {
    /// A slot for a fetch of `priority`, or a demand slot once the fetch is promoted.
    /// The semaphores are never closed, so this only waits.
    pub async fn acquire(
        &self,
        priority: Priority,
        promotion: &Promotion,
    ) -> Option<OwnedSemaphorePermit> {
        let own = match priority {
            Priority::Demand => return self.demand.clone().acquire_owned().await.ok(),
            Priority::Prefetch => self.prefetch.clone(),
            Priority::Fill => self.fill.clone(),
        };
        tokio::select! {
            permit = own.acquire_owned() => permit.ok(),
            () = promotion.promoted() => self.demand.clone().acquire_owned().await.ok(),
        }
    }
}

/// What the planner remembers of one source.
#[derive(Default, Clone, Copy)]
struct SourceState {
    failures: u32,
    tried_last_until: Option<Instant>,
}

/// The health of every source this node fetched from, by name.
#[derive(Default)]
pub struct SourceHealth {
    sources: Mutex<HashMap<String, SourceState>>,
}

impl SourceHealth {
    /// `sources` in the order to try them: healthy ones in their given order (origins,
    /// then the store), then those in backoff.
    pub fn plan<'a>(&self, sources: &'a [Source]) -> Vec<&'a Source> {
        let now = Instant::now();
        let states = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        let backing_off = |s: &Source| {
            states
                .get(s.name())
                .and_then(|st| st.tried_last_until)
                .is_some_and(|until| until > now)
        };
        let (mut healthy, sick): (Vec<&Source>, Vec<&Source>) =
            sources.iter().partition(|s| !backing_off(s));
        healthy.extend(sick);
        healthy
    }

    /// A source delivered verified bytes.
    pub fn succeeded(&self, source: &str) {
        let mut states = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(st) = states.get_mut(source) {
            if st.failures > 0 {
                *st = SourceState::default();
                tracing::info!(source, "source answers again");
            }
        }
    }

    /// A source failed (an error, a stall, bad bytes).
    pub fn failed(&self, source: &str) {
        let mut states = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        let st = states.entry(source.to_string()).or_default();
        st.failures += 1;
        if st.failures >= FAILURES_BEFORE_BACKOFF {
            let doublings = (st.failures - FAILURES_BEFORE_BACKOFF).min(8);
            let backoff = (FIRST_BACKOFF * (1 << doublings)).min(MAX_BACKOFF);
            if st.failures == FAILURES_BEFORE_BACKOFF {
                tracing::warn!(
                    source,
                    ?backoff,
                    "source keeps failing; trying it last for a while"
                );
            }
            st.tried_last_until = Some(Instant::now() + backoff);
        }
    }

    /// Whether `source` is in backoff now.
    pub fn backing_off(&self, source: &str) -> bool {
        let states = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        states
            .get(source)
            .and_then(|st| st.tried_last_until)
            .is_some_and(|until| until > Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{HttpClients, HttpSource};

    fn source(name: &str) -> Source {
        Source::Http(HttpSource::new(
            HttpClients::new(reqwest::Client::new),
            name,
            None,
        ))
    }

    #[test]
    fn a_failing_source_goes_last_until_it_succeeds() {
        let health = SourceHealth::default();
        let sources = [source("http://origin"), source("http://store")];
        let names = |h: &SourceHealth| {
            h.plan(&sources)
                .iter()
                .map(|s| s.name().to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&health), ["http://origin", "http://store"]);
        health.failed("http://origin");
        assert_eq!(
            names(&health)[0],
            "http://origin",
            "one failure is not a pattern"
        );
        health.failed("http://origin");
        assert_eq!(names(&health), ["http://store", "http://origin"]);
        health.succeeded("http://origin");
        assert_eq!(names(&health)[0], "http://origin");
    }

    #[test]
    fn the_hedge_delay_follows_the_slowest_recent_answer_within_bounds() {
        let h = Hedging::default();
        assert_eq!(h.delay(None), HEDGE_DELAY_MAX, "no answer seen yet");
        // A short read budget hedges sooner, never under the minimum.
        assert_eq!(
            h.delay(Some(Duration::from_secs(5))),
            Duration::from_millis(1250)
        );
        assert_eq!(h.delay(Some(Duration::from_secs(1))), HEDGE_DELAY_MIN);
        h.observe(Duration::from_millis(10));
        assert_eq!(h.delay(None), HEDGE_DELAY_MIN);
        // One slow answer among fast ones sets the delay, then fades.
        h.observe(Duration::from_millis(1500));
        assert_eq!(h.delay(None), Duration::from_secs(3));
        h.observe(Duration::from_millis(10));
        assert!(h.delay(None) > Duration::from_millis(2800));
        for _ in 0..100 {
            h.observe(Duration::from_millis(10));
        }
        assert_eq!(h.delay(None), HEDGE_DELAY_MIN);
    }

    #[tokio::test]
    async fn a_joined_prefetch_takes_a_demand_slot() {
        let slots = FetchSlots::default();
        // Every prefetch slot is taken.
        let mut held = Vec::new();
        for _ in 0..PREFETCH_SLOTS {
            held.push(
                slots
                    .acquire(Priority::Prefetch, &Promotion::default())
                    .await,
            );
        }
        let promotion = Arc::new(Promotion::default());
        let waiting = {
            let p = promotion.clone();
            async move { slots.acquire(Priority::Prefetch, &p).await.is_some() }
        };
        let promote = async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            promotion.promote();
        };
        let (got, ()) = tokio::time::timeout(Duration::from_secs(5), async {
            tokio::join!(waiting, promote)
        })
        .await
        .expect("a promoted fetch does not wait for a prefetch slot");
        assert!(got);
    }
}
