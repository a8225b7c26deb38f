//! Replay of a template's boot trace: when this node opens a template it has no READY
//! replica of (a template export, or a sandbox overlay over it), the byte ranges that
//! earlier boots read first ([`crate::daemon::trace`]) are fetched at once, before this
//! boot reads them, so a boot over a network with tens of milliseconds per request
//! waits for few of them.
//!
//! The trace's ranges become runs ([`plan_runs`]): chunk by chunk in the order the boot
//! reached them, sorted and merged within a chunk, at most `--replay-max-run` bytes
//! each. Several run at once (`--replay-in-flight`), within a bandwidth cap
//! (`--replay-rate`), through the one fetch pipeline at prefetch priority
//! ([`lazyblk_cache::replay`]): a demand read of bytes being replayed joins that fetch,
//! and any other demand read takes a demand slot, which a replay never holds, so no
//! demand read waits behind a replay.
//!
//! A replay stops when it is done, when the template is evicted or no longer wished on
//! this node (unwarmed), when the boot's reads leave the trace
//! ([`slot::LEFT_TRACE_READS`] reads in a row outside it), or when the trace is refused (it
//! names another template or other content, or bytes past the template's end). Every
//! stop is counted by reason in `lazyblk_replay_stopped_total`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::daemon::node_state::phases::Phase;
use crate::daemon::replica::Replica;
use crate::daemon::trace::ranges::{plan_runs, RangeSet};
use crate::store::client::StoreClient;

pub mod slot;

use slot::Running;
pub use slot::StopReason;

/// Gaps within a chunk up to this many bytes are fetched with the ranges around them: one
/// request of 32 KiB more costs less than a second round trip at 20 ms per request.
pub const RUN_MERGE_GAP: u64 = 32 << 10;

/// A chunk whose traced ranges cover a quarter of it or more is replayed whole (as a
/// demand read of a quarter of a chunk is).
const WHOLE_CHUNK_SHARE: u64 = 4;

/// Replay settings (`--replay-*`).
#[derive(Clone, Copy, Debug)]
pub struct ReplayConfig {
    /// Whether traces are replayed at all.
    pub enabled: bool,
    /// Runs fetched at once.
    pub in_flight: usize,
    /// Bandwidth cap in bytes per second of replayed bytes; 0 = none.
    pub rate: u64,
    /// Largest run, in bytes.
    pub max_run: u64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// The replay counters on `/metrics`.
#[derive(Default)]
pub struct ReplayMetrics {
    started: Counter,
    stopped: Family<ReasonLabel, Counter>,
    /// Trace ranges a replay fetched (runs whose bytes were not local yet).
    runs: Counter,
    bytes: Counter,
}

impl ReplayMetrics {
    /// Registers the counters (under the daemon's `lazyblk` prefix).
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        let r = registry.sub_registry_with_prefix("lazyblk");
        r.register(
            "replay_started",
            "Boot trace replays started (a template opened without a READY replica, with a trace in the store)",
            self.started.clone(),
        );
        r.register(
            "replay_stopped",
            "Boot trace replays stopped, by reason (done, evicted, unwarmed, left_trace, refused, failed)",
            self.stopped.clone(),
        );
        r.register(
            "replay_ranges",
            "Runs of boot trace ranges a replay fetched before they were read",
            self.runs.clone(),
        );
        r.register(
            "replay_bytes",
            "Bytes a boot trace replay fetched, or waited for when a fetch of them was under way already (blocks, or whole chunks for dense runs)",
            self.bytes.clone(),
        );
    }

    fn stopped(&self, reason: StopReason) {
        self.stopped
            .get_or_create(&ReasonLabel {
                reason: reason.as_str(),
            })
            .inc();
    }
}

/// Starts replays: what the node's frontends call when they open a template.
pub struct Replays {
    pub config: ReplayConfig,
    store: StoreClient,
    pub metrics: Arc<ReplayMetrics>,
}

impl Replays {
    pub fn new(config: ReplayConfig, store: StoreClient, metrics: Arc<ReplayMetrics>) -> Replays {
        Replays {
            config,
            store,
            metrics,
        }
    }

    /// `replica` was opened (as a template or as a sandbox's base): replays its trace
    /// in the background unless the replica is READY, a replay ran for it already, or
    /// replays are off.
    pub fn opened(&self, replica: &Arc<Replica>) {
        if !self.config.enabled
            || replica.phase() == Phase::Ready
            || tokio::runtime::Handle::try_current().is_err()
        {
            return;
        }
        let Some(running) = replica.replay.begin() else {
            return;
        };
        let (replica, store, metrics, config) = (
            replica.clone(),
            self.store.clone(),
            self.metrics.clone(),
            self.config,
        );
        tokio::spawn(async move {
            let reason = replay(&replica, &running, &store, &metrics, config).await;
            running.stop(reason);
            let reason = (*running.stop.borrow()).unwrap_or(reason);
            if reason == StopReason::NoTrace {
                tracing::debug!(template = replica.id(), "no boot trace to replay");
                return;
            }
            metrics.stopped(reason);
            tracing::info!(
                template = replica.id(),
                reason = reason.as_str(),
                "boot trace replay stopped"
            );
        });
    }
}

/// Runs one replay to its end; returns why it ended (a stop asked meanwhile wins).
async fn replay(
    replica: &Arc<Replica>,
    running: &Running,
    store: &StoreClient,
    metrics: &ReplayMetrics,
    config: ReplayConfig,
) -> StopReason {
    let id = replica.id().to_string();
    let doc = match store.trace(&id).await {
        Ok(Some(doc)) if !doc.ranges.is_empty() => doc,
        // No trace, or one of chunks only (the fill uses it): nothing to replay.
        Ok(_) => return StopReason::NoTrace,
        Err(e) => {
            tracing::warn!(template = %id, error = %e, "boot trace unavailable; not replayed");
            return StopReason::Failed;
        }
    };
    let manifest = replica.manifest();
    if let Err(e) = doc.check(&id, manifest) {
        tracing::warn!(template = %id, error = %e, "boot trace refused; not replayed");
        return StopReason::Refused;
    }
    *running.covered.lock().unwrap_or_else(|e| e.into_inner()) = RangeSet::of(&doc.ranges);
    let runs = plan_runs(
        &doc.ranges,
        manifest.chunk_size as u64,
        RUN_MERGE_GAP,
        config.max_run,
        WHOLE_CHUNK_SHARE,
    );
    metrics.started.inc();
    tracing::info!(template = %id, ranges = doc.ranges.len(), runs = runs.len(), "replaying boot trace");
    let mut stop = running.stop.subscribe();
    let pacer = Pacer::new(config.rate);
    let image = replica.image.clone();
    let mut fetches = futures::stream::iter(runs)
        .map(|(offset, len)| {
            let (image, pacer) = (&image, &pacer);
            async move {
                pacer.wait(len).await;
                image.replay_run(offset, len).await
            }
        })
        .buffer_unordered(config.in_flight.max(1));
    loop {
        tokio::select! {
            next = fetches.next() => match next {
                None => return StopReason::Done,
                Some(Ok(fetched)) => {
                    if fetched.bytes() > 0 {
                        metrics.runs.inc();
                        metrics.bytes.inc_by(fetched.bytes());
                    }
                }
                // A source failing is logged by the cache; the boot's own read retries.
                Some(Err(e)) => tracing::debug!(template = %id, error = %e, "a replayed run failed"),
            },
            reason = stop.wait_for(Option::is_some) => {
                return reason.ok().and_then(|r| *r).unwrap_or(StopReason::Done);
            }
        }
    }
}

/// Spaces runs out to the bandwidth cap.
struct Pacer {
    rate: u64,
    next: Mutex<Instant>,
}

impl Pacer {
    fn new(rate: u64) -> Pacer {
        Pacer {
            rate,
            next: Mutex::new(Instant::now()),
        }
    }

    /// Waits until `bytes` more fit under the cap.
    async fn wait(&self, bytes: u64) {
        if self.rate == 0 {
            return;
        }
        let wait = {
            let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let start = (*next).max(now);
            *next = start + Duration::from_secs_f64(bytes as f64 / self.rate as f64);
            start - now
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}
