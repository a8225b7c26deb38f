//! Membership (DESIGN section 10): the store server keeps each node's lease as soft
//! state. A daemon renews its lease with `PUT /v1/nodes/{id}` every
//! [`HEARTBEAT`]; a node that misses [`MISSED_RENEWALS`] renewals drops out of
//! `GET /v1/nodes`. Nothing is written to disk: after a restart of the store the
//! membership is rebuilt from the next heartbeats.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// How often a daemon renews its lease.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// Renewals a node may miss before it is no longer live.
pub const MISSED_RENEWALS: u32 = 3;

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

/// One live node, as `GET /v1/nodes` and the heartbeat's answer list it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeEntry {
    pub id: String,
    pub url: String,
    pub version: String,
    /// Seconds since its last heartbeat.
    pub last_seen_secs: f64,
    /// Its replicas, as of its last heartbeat.
    #[serde(default)]
    pub replicas: Vec<ReplicaReport>,
    #[serde(default)]
    pub cache_used_bytes: u64,
}

/// The leases of the live nodes.
#[derive(Default)]
pub struct Membership {
    leases: Mutex<BTreeMap<String, (Heartbeat, Instant)>>,
}

impl Membership {
    /// Renews the lease of node `id`; a node seen for the first time (or again after it
    /// dropped out) is logged once.
    pub fn renew(&self, id: &str, beat: Heartbeat) {
        let mut leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
        Self::expire(&mut leases);
        match leases.get(id) {
            None => tracing::info!(node = id, url = %beat.url, "node joined"),
            Some((old, _)) if old.url != beat.url => {
                tracing::info!(node = id, url = %beat.url, was = %old.url, "node moved")
            }
            Some(_) => {}
        }
        leases.insert(id.to_string(), (beat, Instant::now()));
    }

    /// Ends node `id`'s lease at once (a clean shutdown); whether it had one.
    pub fn leave(&self, id: &str) -> bool {
        let mut leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
        let left = leases.remove(id);
        if let Some((beat, _)) = &left {
            tracing::info!(node = id, url = %beat.url, "node left (shut down)");
        }
        left.is_some()
    }

    /// The live nodes, by id.
    pub fn live(&self) -> Vec<NodeEntry> {
        let mut leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
        Self::expire(&mut leases);
        leases
            .iter()
            .map(|(id, (beat, seen))| NodeEntry {
                id: id.clone(),
                url: beat.url.clone(),
                version: beat.version.clone(),
                last_seen_secs: seen.elapsed().as_secs_f64(),
                replicas: beat.replicas.clone(),
                cache_used_bytes: beat.cache_used_bytes,
            })
            .collect()
    }

    fn expire(leases: &mut BTreeMap<String, (Heartbeat, Instant)>) {
        let lease = HEARTBEAT * MISSED_RENEWALS;
        leases.retain(|id, (beat, seen)| {
            let live = seen.elapsed() <= lease;
            if !live {
                tracing::info!(node = %id, url = %beat.url, "node left (lease expired)");
            }
            live
        });
    }
}
