//! Peer health: a peer that fails or lies is passed over (see the module header of
//! [`crate::peers`]), alone, for a backoff that grows with each failed trial in a row.

use std::time::{Duration, Instant};

use super::{PeerSet, HEDGE_DELAY_MIN, PEER_MAX_BACKOFF, PEER_MIN_BACKOFF};

/// What this node remembers of a peer that failed (a peer without an entry is healthy).
#[derive(Clone, Copy, Debug)]
pub(super) struct PeerHealth {
    /// Failed trials in a row: the backoff doubles with each.
    pub(super) failures: u32,
    /// Passed over until then.
    pub(super) until: Instant,
    /// A request is trying the peer after its backoff; others pass it over meanwhile.
    pub(super) on_trial: bool,
}

/// How one request to a peer ended, for its health.
pub(super) enum Outcome {
    /// It answered (with the chunk, or that it does not hold it).
    Answered,
    /// It failed, or did not answer, after this long.
    Failed(Duration),
}

/// One request to a peer. Dropped unsettled (the read took another source's answer
/// first), it counts as a failure if it ran for the shortest hedge delay, so a peer
/// that never answers is passed over even though no request to it ever timed out.
pub(super) struct Attempt<'a> {
    peers: &'a PeerSet,
    id: String,
    pub(super) started: Instant,
    pub(super) trial: bool,
    settled: bool,
}

impl Attempt<'_> {
    pub(super) fn settle(mut self, outcome: Outcome) {
        self.settled = true;
        self.peers.record(&self.id, self.trial, outcome);
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let ran = self.started.elapsed();
        if ran >= HEDGE_DELAY_MIN {
            tracing::debug!(peer = %self.id, ?ran, "a peer did not answer before a hedge did; passing it over");
            self.peers
                .record(&self.id, self.trial, Outcome::Failed(ran));
        } else {
            self.peers.end_trial(&self.id);
        }
    }
}

impl PeerSet {
    /// Whether `id` may be asked now: `None` while it is passed over; `Some(trial)`
    /// otherwise, `trial` when this request is the one that tries it after its backoff
    /// (others pass it over until it settles).
    pub(super) fn admit(&self, id: &str) -> Option<bool> {
        let mut health = self.health.lock().unwrap_or_else(|e| e.into_inner());
        let Some(h) = health.get_mut(id) else {
            return Some(false);
        };
        if h.until > Instant::now() || h.on_trial {
            return None;
        }
        h.on_trial = true;
        Some(true)
    }

    /// Starts a request to `id`, if it may be asked now.
    pub(super) fn attempt(&self, id: &str) -> Option<Attempt<'_>> {
        let trial = self.admit(id)?;
        Some(Attempt {
            peers: self,
            id: id.to_string(),
            started: Instant::now(),
            trial,
            settled: false,
        })
    }

    /// Records how a request to `id` ended. A failure passes the peer over at least as
    /// long as the attempt took (at least [`PEER_MIN_BACKOFF`]), doubled per failed
    /// trial in a row up to [`PEER_MAX_BACKOFF`]. Requests that were already under way
    /// when it first failed fail together: they extend the backoff, not double it.
    pub(super) fn record(&self, id: &str, trial: bool, outcome: Outcome) {
        let took = match outcome {
            Outcome::Answered => {
                let was = self
                    .health
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(id);
                if was.is_some_and(|h| h.failures > 0) {
                    tracing::info!(peer = %id, "peer answers again");
                }
                return;
            }
            Outcome::Failed(took) => took,
        };
        self.count(id, |s| s.failures += 1);
        let now = Instant::now();
        let mut health = self.health.lock().unwrap_or_else(|e| e.into_inner());
        match health.get_mut(id) {
            Some(h) if !trial && h.until > now => {
                h.until = h.until.max(now + took);
            }
            Some(h) => {
                h.failures = h.failures.saturating_add(1);
                h.until = now + backoff(took, h.failures);
                if trial {
                    h.on_trial = false;
                }
                tracing::debug!(peer = %id, failures = h.failures, backoff = ?backoff(took, h.failures), "peer failed again; passing it over");
            }
            None => {
                let wait = backoff(took, 1);
                tracing::warn!(peer = %id, ?took, ?wait, "peer failed; passing it over");
                health.insert(
                    id.to_string(),
                    PeerHealth {
                        failures: 1,
                        until: now + wait,
                        on_trial: false,
                    },
                );
            }
        }
    }

    /// A request that was the peer's trial ended without telling anything (given up
    /// on at once): the next request may try the peer.
    pub(super) fn end_trial(&self, id: &str) {
        let mut health = self.health.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = health.get_mut(id) {
            h.on_trial = false;
        }
    }

    /// Node `id` sent bytes that are not the chunk it was asked for (the reader's
    /// verification says so; the transport saw an answer): it is passed over like a
    /// peer that failed, doubling with each lie in a row, and a read asks the next
    /// owner instead. Only that node: the other peers keep serving.
    pub fn distrust(&self, id: &str) {
        let lies = {
            let mut lies = self.lies.lock().unwrap_or_else(|e| e.into_inner());
            let n = lies.entry(id.to_string()).or_default();
            *n = n.saturating_add(1);
            *n
        };
        self.count(id, |s| s.failures += 1);
        let wait = backoff(PEER_MIN_BACKOFF, lies);
        let until = Instant::now() + wait;
        let mut health = self.health.lock().unwrap_or_else(|e| e.into_inner());
        let h = health.entry(id.to_string()).or_insert(PeerHealth {
            failures: 0,
            until,
            on_trial: false,
        });
        h.failures = h.failures.max(lies);
        h.until = h.until.max(until);
        h.on_trial = false;
        tracing::warn!(peer = %id, lies, ?wait, "peer sent bytes that are not the chunk; passing it over");
    }

    /// Node `id` sent a chunk that verified: its lies in a row are forgotten.
    pub fn vouch(&self, id: &str) {
        let mut lies = self.lies.lock().unwrap_or_else(|e| e.into_inner());
        if lies.remove(id).is_some() {
            tracing::info!(peer = %id, "peer sends verified chunks again");
        }
    }
}

/// How long a peer is passed over after its `failures`-th failed trial in a row, the
/// last one having taken `took`.
pub(super) fn backoff(took: Duration, failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    let base = took.max(PEER_MIN_BACKOFF);
    base.saturating_mul(1 << doublings)
        .min(PEER_MAX_BACKOFF.max(took))
}
