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
//! Every bound here is one a client can make the store spend: members
//! (`--max-members`), a report's replicas ([`MAX_REPORTED_REPLICAS`]), users per
//! replica ([`MAX_USERS_PER_REPLICA`]) and the length of every string in a report
//! ([`MAX_REPORT_STRING`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

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

/// What a daemon says of itself in a heartbeat.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The URL peers reach it at (`--advertise`).
    pub url: String,
    pub version: String,
    /// The node's replicas (the template center's view).
    #[serde(default)]
    pub replicas: Vec<ReplicaReport>,
    /// Bytes its chunk cache holds.
    #[serde(default)]
    pub cache_used_bytes: u64,
}

impl Heartbeat {
    /// Why this report is over the store's bounds, if it is.
    pub fn over_bounds(&self) -> Option<String> {
        if self.replicas.len() > MAX_REPORTED_REPLICAS {
            return Some(format!(
                "{} replicas reported (at most {MAX_REPORTED_REPLICAS})",
                self.replicas.len()
            ));
        }
        let long = |s: &String| s.len() > MAX_REPORT_STRING;
        if long(&self.url) || long(&self.version) {
            return Some(format!("a URL or version over {MAX_REPORT_STRING} bytes"));
        }
        for r in &self.replicas {
            if r.users.len() > MAX_USERS_PER_REPLICA {
                return Some(format!(
                    "{} users of one replica (at most {MAX_USERS_PER_REPLICA})",
                    r.users.len()
                ));
            }
            let strings = [&r.template, &r.phase]
                .into_iter()
                .chain(r.last_error.as_ref())
                .chain(&r.users);
            if strings.into_iter().any(|s| s.len() > MAX_REPORT_STRING * 4) {
                return Some(format!(
                    "a string in the report of {} is too long",
                    crate::printable::printable(&r.template)
                ));
            }
        }
        None
    }
}

/// One replica as its node reports it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ReplicaReport {
    pub template: String,
    pub phase: String,
    pub local_chunks: usize,
    pub stored_chunks: usize,
    #[serde(default)]
    pub last_error: Option<String>,
    /// Who uses it on the node: exports, open files, overlays ("overlay SB").
    #[serde(default)]
    pub users: Vec<String>,
}

/// One live node, as `GET /v1/nodes` lists it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeEntry {
    pub id: String,
    pub url: String,
    pub version: String,
    /// Seconds since its last heartbeat.
    pub last_seen_secs: f64,
    /// The public key its leases are signed with (hex).
    #[serde(default)]
    pub key: String,
    /// Its replicas, as of its last heartbeat.
    #[serde(default)]
    pub replicas: Vec<ReplicaReport>,
    #[serde(default)]
    pub cache_used_bytes: u64,
}

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
}

/// The leases of the live nodes, and what the store remembers of its members.
pub struct Membership {
    leases: Mutex<BTreeMap<String, Lease>>,
    max_members: usize,
    /// When this store started: its view is unsettled until [`SETTLE`] after.
    started: Instant,
    /// The members the store knew when it started that have not renewed since.
    awaited: Mutex<BTreeSet<String>>,
    /// The members as last written to [`MEMBERS_DOC`] (id to public key).
    persisted: tokio::sync::Mutex<BTreeMap<String, String>>,
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
        let mut leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
        Self::expire(&mut leases);
        let clean = crate::printable::printable;
        match leases.get(id) {
            None if leases.len() >= self.max_members => {
                return Err(LeaseError::Full(leases.len()));
            }
            None => tracing::info!(node = id, url = %clean(&beat.url), "node joined"),
            Some(old) if at_ms <= old.last_at_ms => {
                return Err(LeaseError::Replayed(id.to_string()))
            }
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
        let mut leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
        if leases.get(id).is_some_and(|l| at_ms <= l.last_at_ms) {
            return Err(LeaseError::Replayed(id.to_string()));
        }
        let left = leases.remove(id);
        if let Some(lease) = &left {
            tracing::info!(node = id, url = %crate::printable::printable(&lease.beat.url), "node left (shut down)");
        }
        drop(leases);
        self.awaited
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        Ok(left.is_some())
    }

    /// The live nodes, by id, with their reports.
    pub fn live(&self) -> Vec<NodeEntry> {
        let mut leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
        Self::expire(&mut leases);
        leases
            .iter()
            .map(|(id, lease)| NodeEntry {
                id: id.clone(),
                url: lease.beat.url.clone(),
                version: lease.beat.version.clone(),
                last_seen_secs: lease.seen.elapsed().as_secs_f64(),
                key: lease.key.clone(),
                replicas: lease.beat.replicas.clone(),
                cache_used_bytes: lease.beat.cache_used_bytes,
            })
            .collect()
    }

    /// The live nodes without their reports: what a heartbeat's answer carries.
    pub fn members(&self) -> Vec<NodeEntry> {
        let mut leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
        Self::expire(&mut leases);
        leases
            .iter()
            .map(|(id, lease)| NodeEntry {
                id: id.clone(),
                url: lease.beat.url.clone(),
                version: lease.beat.version.clone(),
                last_seen_secs: lease.seen.elapsed().as_secs_f64(),
                key: lease.key.clone(),
                replicas: Vec::new(),
                cache_used_bytes: lease.beat.cache_used_bytes,
            })
            .collect()
    }

    /// While the store's view cannot be trusted for deletes and gc: the nodes it knew
    /// at start and has not heard from, and how long it will wait for them at most.
    pub fn unsettled(&self) -> Option<(Vec<String>, Duration)> {
        let left = SETTLE.checked_sub(self.started.elapsed())?;
        let awaited = self.awaited.lock().unwrap_or_else(|e| e.into_inner());
        (!awaited.is_empty()).then(|| (awaited.iter().cloned().collect(), left))
    }

    /// Writes [`MEMBERS_DOC`] if the members differ from what it holds; a join is
    /// answered only after this succeeded, so a restarted store waits for the node.
    pub async fn persist(
        &self,
        backend: &crate::store::backend::Backend,
    ) -> Result<(), crate::store::backend::BackendError> {
        let mut persisted = self.persisted.lock().await;
        let now: BTreeMap<String, String> = {
            let mut leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
            Self::expire(&mut leases);
            leases
                .iter()
                .map(|(id, l)| (id.clone(), l.key.clone()))
                .collect()
        };
        // Nodes awaited after a restart stay listed until they renew or SETTLE ends.
        let awaited: Vec<String> = match self.unsettled() {
            Some((ids, _)) => ids,
            None => Vec::new(),
        };
        let mut doc: BTreeMap<String, Known> = now
            .iter()
            .map(|(id, key)| (id.clone(), Known { key: key.clone() }))
            .collect();
        for id in awaited {
            if let Some(key) = persisted.get(&id) {
                doc.entry(id).or_insert(Known { key: key.clone() });
            }
        }
        let flat: BTreeMap<String, String> = doc
            .iter()
            .map(|(id, k)| (id.clone(), k.key.clone()))
            .collect();
        if flat == *persisted {
            return Ok(());
        }
        let bytes = serde_json::to_vec_pretty(&doc).unwrap_or_default();
        backend.put_doc(MEMBERS_DOC, bytes).await?;
        *persisted = flat;
        Ok(())
    }

    fn expire(leases: &mut BTreeMap<String, Lease>) {
        let lease = HEARTBEAT * MISSED_RENEWALS;
        leases.retain(|id, l| {
            let live = l.seen.elapsed() <= lease;
            if !live {
                tracing::info!(node = %id, url = %crate::printable::printable(&l.beat.url), "node left (lease expired)");
            }
            live
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat(url: &str) -> Heartbeat {
        Heartbeat {
            url: url.into(),
            version: "0".into(),
            replicas: Vec::new(),
            cache_used_bytes: 0,
        }
    }

    #[test]
    fn members_are_bounded_and_replays_refused() {
        let m = Membership::new(2, None);
        m.renew("a", "ka".into(), 10, beat("http://a")).unwrap();
        m.renew("b", "kb".into(), 10, beat("http://b")).unwrap();
        assert!(matches!(
            m.renew("c", "kc".into(), 10, beat("http://c")),
            Err(LeaseError::Full(2))
        ));
        assert!(matches!(
            m.renew("a", "ka".into(), 10, beat("http://evil")),
            Err(LeaseError::Replayed(_))
        ));
        m.renew("a", "ka".into(), 11, beat("http://a2")).unwrap();
        assert_eq!(m.live()[0].url, "http://a2");
        assert!(m.leave("a", 11).is_err());
        assert!(m.leave("a", 12).unwrap());
        assert!(
            m.unsettled().is_none(),
            "a store that knew no one is settled"
        );
    }

    #[test]
    fn a_restarted_store_waits_for_the_members_it_knew() {
        let doc = br#"{"a": {"key": "ka"}, "b": {"key": "kb"}}"#;
        let m = Membership::new(8, Some(doc));
        let (waiting, left) = m.unsettled().unwrap();
        assert_eq!(waiting, ["a", "b"]);
        assert!(left <= SETTLE);
        m.renew("a", "ka".into(), 1, beat("http://a")).unwrap();
        assert_eq!(m.unsettled().unwrap().0, ["b"]);
        m.renew("b", "kb".into(), 1, beat("http://b")).unwrap();
        assert!(m.unsettled().is_none());
    }

    #[test]
    fn reports_over_bounds_are_named() {
        let mut b = beat("http://a");
        assert!(b.over_bounds().is_none());
        b.replicas = vec![ReplicaReport::default(); MAX_REPORTED_REPLICAS + 1];
        assert!(b.over_bounds().unwrap().contains("replicas"));
        b.replicas = vec![ReplicaReport {
            users: vec!["u".into(); MAX_USERS_PER_REPLICA + 1],
            ..ReplicaReport::default()
        }];
        assert!(b.over_bounds().unwrap().contains("users"));
    }
}
