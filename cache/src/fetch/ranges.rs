//! Byte-range fetches in the in-flight table: concurrent small reads of the same
//! chunk's table, or of the same blocks, share one fetch (two guests booting one
//! template on a node read the same blocks at the same time). The first reader runs
//! the fetch in its own task, within its budget; the others wait for its outcome
//! within theirs. A leader that goes away (its budget ended) leaves its followers
//! without an outcome: they read the chunk whole. A read of blocks that a fetch under
//! way covers (a boot trace's replay fetches a run of blocks, [`crate::replay`]) joins
//! that fetch rather than asking for its blocks a second time.

use std::collections::HashMap;
use std::future::Future;

use tokio::sync::watch;

use super::flight::{FetchKey, Flight, RangeValue};
use super::ChunkCache;

impl ChunkCache {
    /// The outcome of the range fetch `key`: joined if one is under way, else run here
    /// (`work`) and published to every reader that joins it meanwhile.
    pub(crate) async fn range_flight(
        &self,
        key: FetchKey,
        work: impl Future<Output = Option<RangeValue>>,
    ) -> Option<RangeValue> {
        let lead = {
            let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
            match inflight.get(&key).or_else(|| covering(&inflight, key)) {
                Some(Flight::Range(rx)) => Err(rx.clone()),
                _ => {
                    let (tx, rx) = watch::channel(None);
                    inflight.insert(key, Flight::Range(rx));
                    Ok(tx)
                }
            }
        };
        match lead {
            Err(mut rx) => {
                // The leader went away without an outcome: `None`, read whole.
                let outcome = rx.wait_for(Option::is_some).await.ok()?;
                outcome.clone().flatten()
            }
            Ok(tx) => {
                let _registered = RangeRegistered { cache: self, key };
                let value = work.await;
                let _ = tx.send(Some(value.clone()));
                value
            }
        }
    }
}

impl ChunkCache {
    /// Whether the range fetch `key`, or one that covers it, is under way (a reader
    /// would join it).
    pub(crate) fn range_in_flight(&self, key: FetchKey) -> bool {
        let inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        matches!(
            inflight.get(&key).or_else(|| covering(&inflight, key)),
            Some(Flight::Range(_))
        )
    }
}

/// A fetch under way of blocks of the same chunk that include `key`'s (for blocks).
/// The table holds at most the fetches in flight (tens), so a scan costs little.
fn covering(inflight: &HashMap<FetchKey, Flight>, key: FetchKey) -> Option<&Flight> {
    let FetchKey::Blocks(digest, from, to) = key else {
        return None;
    };
    inflight.iter().find_map(|(k, flight)| match (k, flight) {
        (FetchKey::Blocks(d, f, t), Flight::Range(_)) if *d == digest && *f <= from && to <= *t => {
            Some(flight)
        }
        _ => None,
    })
}

/// Removes a range fetch from the in-flight table when its leader ends, however it
/// ends.
struct RangeRegistered<'a> {
    cache: &'a ChunkCache,
    key: FetchKey,
}

impl Drop for RangeRegistered<'_> {
    fn drop(&mut self) {
        let mut inflight = self
            .cache
            .inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if matches!(inflight.get(&self.key), Some(Flight::Range(_))) {
            inflight.remove(&self.key);
        }
    }
}
