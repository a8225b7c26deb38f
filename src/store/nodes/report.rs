//! What a daemon says of itself in a heartbeat, and the bounds a report keeps.

use serde::{Deserialize, Serialize};

use super::{MAX_REPORTED_REPLICAS, MAX_REPORT_STRING, MAX_USERS_PER_REPLICA};

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
            let strings = [r.template.as_str(), r.phase.as_str()]
                .into_iter()
                .chain(r.last_error.as_deref())
                .chain(r.users.iter().map(String::as_str));
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
    pub phase: ReplicaPhase,
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

/// A replica's phase (DESIGN.md section 6; names shared with CubeSandbox).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Phase {
    /// Registered; chunks are fetched only when read.
    Pending,
    /// A background fill is under way; reads are served lazily all along.
    Distributing,
    /// Every non-zero chunk is local and pinned.
    Ready,
    /// The fill stopped on an error (shown); reads still work while any source does.
    Failed,
    /// Being evicted.
    Cleaning,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "PENDING",
            Phase::Distributing => "DISTRIBUTING",
            Phase::Ready => "READY",
            Phase::Failed => "FAILED",
            Phase::Cleaning => "CLEANING",
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A replica's phase as a heartbeat carries it: a [`Phase`] this lazyblk knows, or the
/// name a newer node sent, kept as sent. Both cross the wire as the phase's name, as
/// before phases were typed, so an unknown name never fails a heartbeat and is shown as
/// the node named it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ReplicaPhase {
    Known(Phase),
    Other(String),
}

impl ReplicaPhase {
    pub fn as_str(&self) -> &str {
        match self {
            ReplicaPhase::Known(phase) => phase.as_str(),
            ReplicaPhase::Other(name) => name,
        }
    }
}

impl Default for ReplicaPhase {
    fn default() -> ReplicaPhase {
        ReplicaPhase::Known(Phase::Pending)
    }
}

impl From<Phase> for ReplicaPhase {
    fn from(phase: Phase) -> ReplicaPhase {
        ReplicaPhase::Known(phase)
    }
}
