//! The lease views store servers over one bucket share (`--shared`): each writes the
//! leases it received, reads the others', and a node's freshest lease wins.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{Heartbeat, Membership, HEARTBEAT, MISSED_RENEWALS, STALE_VIEW};

/// A lease as a store server shares it with the others (`--shared`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SharedLease {
    pub id: String,
    pub key: String,
    pub beat: Heartbeat,
    /// The node's signed timestamp of the request that renewed (or ended) it.
    pub last_at_ms: u64,
    /// How old the lease was, on its server's clock, when the view was written.
    pub age_ms: u64,
    #[serde(default)]
    pub left: bool,
}

/// One store server's lease view, as written to `center/leases/<replica>.json`.
#[derive(Debug, Serialize, Deserialize)]
pub struct LeaseView {
    pub replica: String,
    /// Raised at every write: a reader that sees it change knows the writer is alive.
    pub seq: u64,
    pub leases: Vec<SharedLease>,
}

/// Another server's view as this one last read it.
pub(super) struct RemoteView {
    pub(super) seq: u64,
    /// When this server saw `seq` change (the view's ages count from then).
    pub(super) changed: Instant,
    /// Seen to change at least once: its writer is alive.
    pub(super) trusted: bool,
    pub(super) leases: Vec<SharedLease>,
}

/// A lease from any server, its age on this server's clock, with what the caller took
/// of its report (`B`: all of it, its address only, or nothing).
pub(super) struct Candidate<B> {
    pub(super) key: String,
    pub(super) beat: B,
    pub(super) last_at_ms: u64,
    pub(super) age: Duration,
    pub(super) left: bool,
}

impl Membership {
    /// Every node's freshest lease (from this server or another), unexpired; left ones
    /// included (they mask the older leases of the node). With the whole reports.
    pub(super) fn merged(&self) -> BTreeMap<String, Candidate<Heartbeat>> {
        self.merge(Heartbeat::clone)
    }

    /// Like [`Membership::merged`], taking of each report what `take` returns: a check
    /// made at every heartbeat does not copy a thousand nodes' reports.
    pub(super) fn merge<B>(
        &self,
        take: impl Fn(&Heartbeat) -> B,
    ) -> BTreeMap<String, Candidate<B>> {
        let lease_time = HEARTBEAT * MISSED_RENEWALS;
        let mut out: BTreeMap<String, Candidate<B>> = BTreeMap::new();
        let mut offer = |id: &str, c: Candidate<B>| {
            if c.age > lease_time {
                return;
            }
            match out.get(id) {
                Some(have) if have.last_at_ms >= c.last_at_ms => {}
                _ => {
                    out.insert(id.to_string(), c);
                }
            }
        };
        {
            let mut leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
            Self::expire(&mut leases);
            for (id, l) in leases.iter() {
                offer(
                    id,
                    Candidate {
                        key: l.key.clone(),
                        beat: take(&l.beat),
                        last_at_ms: l.last_at_ms,
                        age: l.seen.elapsed(),
                        left: l.left,
                    },
                );
            }
        }
        let remote = self.remote.lock().unwrap_or_else(|e| e.into_inner());
        for view in remote.values().filter(|v| v.trusted) {
            for l in &view.leases {
                offer(
                    &l.id,
                    Candidate {
                        key: l.key.clone(),
                        beat: take(&l.beat),
                        last_at_ms: l.last_at_ms,
                        age: Duration::from_millis(l.age_ms) + view.changed.elapsed(),
                        left: l.left,
                    },
                );
            }
        }
        out
    }

    /// The latest signed timestamp any server accepted from node `id`.
    pub(super) fn latest_at_ms(&self, id: &str) -> Option<u64> {
        let remote = self.remote.lock().unwrap_or_else(|e| e.into_inner());
        remote
            .values()
            .flat_map(|v| v.leases.iter())
            .filter(|l| l.id == id)
            .map(|l| l.last_at_ms)
            .max()
    }

    /// This server's leases as a view for the others (`--shared`).
    pub fn view(&self, replica: &str) -> LeaseView {
        let seq = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let mut leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
        Self::expire(&mut leases);
        LeaseView {
            replica: replica.to_string(),
            seq,
            leases: leases
                .iter()
                .map(|(id, l)| SharedLease {
                    id: id.clone(),
                    key: l.key.clone(),
                    beat: l.beat.clone(),
                    last_at_ms: l.last_at_ms,
                    age_ms: l.seen.elapsed().as_millis() as u64,
                    left: l.left,
                })
                .collect(),
        }
    }

    /// Takes in another server's view as read from the bucket; whether it is stale
    /// (unchanged for [`STALE_VIEW`]: its server is gone, the view may be deleted).
    pub fn absorb(&self, name: &str, view: LeaseView) -> bool {
        let mut remote = self.remote.lock().unwrap_or_else(|e| e.into_inner());
        match remote.get_mut(name) {
            Some(known) if known.seq == view.seq => known.changed.elapsed() > STALE_VIEW,
            Some(known) => {
                known.seq = view.seq;
                known.changed = Instant::now();
                known.trusted = true;
                known.leases = view.leases;
                false
            }
            None => {
                remote.insert(
                    name.to_string(),
                    RemoteView {
                        seq: view.seq,
                        changed: Instant::now(),
                        trusted: false,
                        leases: view.leases,
                    },
                );
                false
            }
        }
    }

    /// Forgets a view that was deleted.
    pub fn forget_view(&self, name: &str) {
        self.remote
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
    }
}
