//! Membership (DESIGN section 10): the store server keeps each node's lease. A daemon
//! renews its lease with a signed `PUT /v1/nodes/{id}` every [`HEARTBEAT`] (the id
//! derives from the key that signs, [`crate::identity`]); a node that misses
//! [`MISSED_RENEWALS`] renewals drops out of `GET /v1/nodes`.
//!
//! Leases are soft state, but which nodes were members is kept (`center/members.json`,
//! written when a node joins or leaves, before the join is answered): after a restart
//! the store's view is not trusted for deletes and gc until every node it knew has
//! renewed again or [`SETTLE`] has passed ([`Membership::unsettled`]).
//!
//! Several store servers over one bucket (`--shared`) see the same leases: each one
//! writes the leases it received as one document, `center/leases/<replica>.json`, every
//! [`HEARTBEAT`], and reads the others' ([`Membership::view`], [`Membership::absorb`]).
//! A node may heartbeat to any of them; for each node the report with the latest
//! signed timestamp wins, so a node that moves from one server to another is seen
//! once, with its newest report. Ages are measured on each server's own monotonic
//! clock (the age a lease had when its view was written, plus the time since this
//! server saw that view change), never by comparing two servers' wall clocks, so a
//! server whose clock is off sees the same leases as the others. A view seen for the
//! first time is trusted only once it changes (its writer is alive); a view that has
//! not changed for [`STALE_VIEW`] is deleted.
//!
//! Every bound here is one a client can make the store spend: members
//! (`--max-members`), a report's replicas ([`MAX_REPORTED_REPLICAS`]), users per
//! replica ([`MAX_USERS_PER_REPLICA`]) and the length of every string in a report
//! ([`MAX_REPORT_STRING`]).
//!
//! Layout: [`report`], what a node says of itself in a heartbeat (and the bounds a
//! report must keep); [`views`], the lease views store servers over one bucket share;
//! this file, the leases and the members.

mod report;
#[cfg(test)]
mod tests;
mod views;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub use report::{Heartbeat, NodeEntry, Phase, ReplicaPhase, ReplicaReport};
pub use views::LeaseView;
use views::RemoteView;

/// How often a daemon renews its lease.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// Renewals a node may miss before it is no longer live.
pub const MISSED_RENEWALS: u32 = 3;
/// How long after a start the store waits for the nodes it knew before it trusts its
/// view for deletes and gc: two leases, so a node that renews on time is seen twice.
pub const SETTLE: Duration = Duration::from_secs(2 * 2 * 3);
/// The members a store takes by default (`--max-members`): each costs a lease and its
/// report in memory, at most [`MAX_HEARTBEAT_BODY`].
pub const DEFAULT_MAX_MEMBERS: usize = 1024;
/// The largest heartbeat body: a node's report of up to [`MAX_REPORTED_REPLICAS`]
/// replicas with their users.
pub const MAX_HEARTBEAT_BODY: usize = 256 << 10;
/// Replicas one report may list (a node reports only those it fills or uses).
pub const MAX_REPORTED_REPLICAS: usize = 1024;
/// Users one replica may list; a node with more reports the first ones and a count.
pub const MAX_USERS_PER_REPLICA: usize = 32;
/// The longest string in a report (a template id is at most 128 bytes, a user names
/// an export or a sandbox).
pub const MAX_REPORT_STRING: usize = 256;
/// The document that lists the members the store knew.
pub const MEMBERS_DOC: &str = "members.json";
/// The folder of the replicas' lease views (`--shared`): one document per store server.
pub const LEASES_DIR: &str = "leases";
/// How long a store server's lease view may stay unchanged before the others delete it
/// (the server is gone for good: a view changes every [`HEARTBEAT`] while it runs).
pub const STALE_VIEW: Duration = Duration::from_secs(3600);

/// A lease refused.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("the store has {0} members, its --max-members; node not admitted")]
    Full(usize),
    #[error("a request of node {0} older than one already accepted (a replay, or a clock that went back)")]
    Replayed(String),
}

/// One node's lease.
struct Lease {
    beat: Heartbeat,
    /// The public key that proved the node (hex).
    key: String,
    seen: Instant,
    /// The timestamp of the last request accepted from it (replays are older).
    last_at_ms: u64,
    /// It left (a clean shutdown): kept until it would have expired, so the other store
    /// servers learn of the leave through this server's view.
    left: bool,
}

/// The leases of the live nodes, and what the store remembers of its members.
pub struct Membership {
    leases: Mutex<BTreeMap<String, Lease>>,
    max_members: usize,
    /// When this store started: its view is unsettled until [`SETTLE`] after.
    started: Instant,
    /// The members the store knew when it started that have not renewed since.
    awaited: Mutex<BTreeSet<String>>,
    /// The members as last written to (or read from) [`MEMBERS_DOC`] (id to public key).
    persisted: tokio::sync::Mutex<BTreeMap<String, String>>,
    /// The other store servers' lease views (`--shared`), by replica name.
    remote: Mutex<BTreeMap<String, RemoteView>>,
    /// This server's view's sequence number.
    seq: std::sync::atomic::AtomicU64,
}

/// A member as [`MEMBERS_DOC`] keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Known {
    key: String,
}

impl Membership {
    /// Membership of a store that knew `known` (from [`MEMBERS_DOC`]) when it stopped.
    pub fn new(max_members: usize, known: Option<&[u8]>) -> Membership {
        let known: BTreeMap<String, Known> = known
            .and_then(|b| {
                serde_json::from_slice(b)
                    .map_err(|e| tracing::warn!(error = %e, "center/{MEMBERS_DOC} is unreadable"))
                    .ok()
            })
            .unwrap_or_default();
        Membership {
            leases: Mutex::default(),
            max_members,
            started: Instant::now(),
            awaited: Mutex::new(known.keys().cloned().collect()),
            persisted: tokio::sync::Mutex::new(
                known.into_iter().map(|(id, k)| (id, k.key)).collect(),
            ),
            remote: Mutex::default(),
            seq: std::sync::atomic::AtomicU64::new(random_start()),
        }
    }

    /// Renews the lease of node `id`, proven by `key` at `at_ms`; a node seen for the
    /// first time (or again after it dropped out) is logged once.
    pub fn renew(
        &self,
        id: &str,
        key: String,
        at_ms: u64,
        beat: Heartbeat,
    ) -> Result<(), LeaseError> {
        // Another server may have accepted a later request of this node.
        if self.latest_at_ms(id).is_some_and(|t| at_ms <= t) {
            return Err(LeaseError::Replayed(id.to_string()));
        }
        let members = self.merge(|_| ());
        let live_members = members.values().filter(|c| !c.left).count();
        let known = members.get(id).is_some_and(|c| !c.left);
        let mut leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
        Self::expire(&mut leases);
        let clean = crate::printable::printable;
        match leases.get(id) {
            Some(old) if at_ms <= old.last_at_ms => {
                return Err(LeaseError::Replayed(id.to_string()))
            }
            _ if !known && live_members >= self.max_members => {
                return Err(LeaseError::Full(live_members));
            }
            None | Some(Lease { left: true, .. }) if !known => {
                tracing::info!(node = id, url = %clean(&beat.url), "node joined")
            }
            None | Some(Lease { left: true, .. }) => {}
            Some(old) if old.beat.url != beat.url => {
                tracing::info!(node = id, url = %clean(&beat.url), was = %clean(&old.beat.url), "node moved")
            }
            Some(_) => {}
        }
        leases.insert(
            id.to_string(),
            Lease {
                beat,
                key,
                seen: Instant::now(),
                last_at_ms: at_ms,
                left: false,
            },
        );
        drop(leases);
        self.awaited
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        Ok(())
    }

    /// Ends node `id`'s lease at once (a clean shutdown); whether it had one.
    pub fn leave(&self, id: &str, at_ms: u64) -> Result<bool, LeaseError> {
        if self.latest_at_ms(id).is_some_and(|t| at_ms <= t) {
            return Err(LeaseError::Replayed(id.to_string()));
        }
        let had = self
            .merged()
            .get(id)
            .filter(|c| !c.left)
            .map(|c| (c.key.clone(), c.beat.clone()));
        let mut leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
        if leases.get(id).is_some_and(|l| at_ms <= l.last_at_ms) {
            return Err(LeaseError::Replayed(id.to_string()));
        }
        if let Some((key, beat)) = &had {
            tracing::info!(node = id, url = %crate::printable::printable(&beat.url), "node left (shut down)");
            // Kept, marked, until it would have expired: the other servers learn of it.
            leases.insert(
                id.to_string(),
                Lease {
                    beat: beat.clone(),
                    key: key.clone(),
                    seen: Instant::now(),
                    last_at_ms: at_ms,
                    left: true,
                },
            );
        }
        drop(leases);
        self.awaited
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        Ok(had.is_some())
    }

    /// The live nodes, by id, with their reports (from whichever server has the
    /// freshest lease of each).
    pub fn live(&self) -> Vec<NodeEntry> {
        self.merged()
            .into_iter()
            .filter(|(_, c)| !c.left)
            .map(|(id, c)| NodeEntry {
                id,
                url: c.beat.url,
                version: c.beat.version,
                last_seen_secs: c.age.as_secs_f64(),
                key: c.key,
                replicas: c.beat.replicas,
                cache_used_bytes: c.beat.cache_used_bytes,
            })
            .collect()
    }

    /// The live nodes without their reports: what a heartbeat's answer carries.
    pub fn members(&self) -> Vec<NodeEntry> {
        self.merge(|b| (b.url.clone(), b.version.clone(), b.cache_used_bytes))
            .into_iter()
            .filter(|(_, c)| !c.left)
            .map(|(id, c)| NodeEntry {
                id,
                url: c.beat.0,
                version: c.beat.1,
                last_seen_secs: c.age.as_secs_f64(),
                key: c.key,
                replicas: Vec::new(),
                cache_used_bytes: c.beat.2,
            })
            .collect()
    }

    /// While the store's view cannot be trusted for deletes and gc: the nodes it knew
    /// at start and has not heard from, and how long it will wait for them at most.
    pub fn unsettled(&self) -> Option<(Vec<String>, Duration)> {
        let left = SETTLE.checked_sub(self.started.elapsed())?;
        let seen = self.merge(|_| ());
        let mut awaited = self.awaited.lock().unwrap_or_else(|e| e.into_inner());
        // A member another server has a lease of is heard from.
        awaited.retain(|id| !seen.contains_key(id));
        (!awaited.is_empty()).then(|| (awaited.iter().cloned().collect(), left))
    }

    /// Writes [`MEMBERS_DOC`] if the members differ from what it holds (by
    /// compare-and-swap: other store servers write it too, from the same shared view);
    /// a join is answered only after this succeeded, so a restarted store waits for it.
    pub async fn persist(
        &self,
        backend: &crate::store::backend::Backend,
    ) -> Result<(), crate::store::backend::BackendError> {
        use crate::store::backend::DocChange;
        let mut persisted = self.persisted.lock().await;
        let now: BTreeMap<String, String> =
            self.live().into_iter().map(|n| (n.id, n.key)).collect();
        // Nodes awaited after a restart stay listed until they renew or SETTLE ends.
        let awaited: Vec<String> = match self.unsettled() {
            Some((ids, _)) => ids,
            None => Vec::new(),
        };
        let with_awaited = |stored: &BTreeMap<String, String>| {
            let mut doc = now.clone();
            for id in &awaited {
                if let Some(key) = stored.get(id) {
                    doc.entry(id.clone()).or_insert(key.clone());
                }
            }
            doc
        };
        if with_awaited(&persisted) == *persisted {
            return Ok(());
        }
        let stored = backend
            .update_doc(MEMBERS_DOC, |bytes| {
                let stored: BTreeMap<String, String> = bytes
                    .and_then(|b| serde_json::from_slice::<BTreeMap<String, Known>>(b).ok())
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(id, k)| (id, k.key))
                    .collect();
                let doc = with_awaited(&stored);
                Ok::<_, crate::store::backend::BackendError>(if doc == stored {
                    DocChange::Keep(doc)
                } else {
                    let known: BTreeMap<&String, Known> = doc
                        .iter()
                        .map(|(id, key)| (id, Known { key: key.clone() }))
                        .collect();
                    let bytes = serde_json::to_vec_pretty(&known).unwrap_or_default();
                    DocChange::Write(bytes, doc)
                })
            })
            .await?;
        *persisted = stored;
        Ok(())
    }

    fn expire(leases: &mut BTreeMap<String, Lease>) {
        let lease = HEARTBEAT * MISSED_RENEWALS;
        leases.retain(|id, l| {
            let live = l.seen.elapsed() <= lease;
            if !live && !l.left {
                tracing::info!(node = %id, url = %crate::printable::printable(&l.beat.url), "node left (lease expired)");
            }
            live
        });
    }
}

/// Where a fresh server's view numbers start: random, so a restarted server that
/// reuses its replica name still changes its view's number.
fn random_start() -> u64 {
    crate::store::backend::random_u64() >> 16
}
