//! The fleet's nodes as chunk sources: each chunk digest has one owner among the live
//! nodes, chosen by rendezvous hashing over their ids (so a node that comes or goes
//! moves only its own share of chunks). A node missing a chunk asks the owner
//! (`GET {owner}/v1/peer/chunks/{digest}?len=N&template=ID&index=I`), which answers from its cache or
//! fetches the chunk once from the store. An owner never asks a peer: its own fetches
//! use the store only, so requests cannot loop.
//!
//! [`PeerSet`] is the membership as this node sees it (set by the daemon from the
//! store's lease listing, or from `--peers`), the per-peer health (a peer that fails is
//! passed over for a while) and per-peer byte counts. Every byte from a peer is
//! verified by [`crate::fetch`] like any other.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use sha2::{Digest as _, Sha256};

use crate::digest::Digest;
use crate::fetch::ChunkRef;
use crate::transport::{HttpClients, HttpSource, SourceError};

/// Owners tried for one chunk before the read goes on to the store: the owner, then the
/// next in rendezvous order (it fetches the chunk once from the store, so a dead owner
/// costs the store no extra copies while the membership catches up).
pub const OWNERS_TRIED: usize = 2;
/// How long a peer that failed is passed over.
pub const PEER_BACKOFF: Duration = Duration::from_secs(5);

/// One live node: its id (stable across restarts) and the URL it is reached at.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct Member {
    pub id: String,
    pub url: String,
}

/// Bytes and outcomes of one peer, for status and metrics.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct PeerStats {
    pub chunks: u64,
    pub bytes: u64,
    pub failures: u64,
    pub seconds: f64,
}

/// The live nodes of the fleet, as this node sees them.
pub struct PeerSet {
    /// This node's id: never a peer of itself.
    self_id: String,
    /// The live nodes other than this one, sorted by id.
    members: RwLock<Arc<Vec<Member>>>,
    clients: HttpClients,
    /// Sent to peers (`--peer-token`); never the store's read token.
    token: Option<String>,
    /// Peers passed over until the given time.
    skipped: Mutex<BTreeMap<String, Instant>>,
    stats: Mutex<BTreeMap<String, PeerStats>>,
}

impl PeerSet {
    pub fn new(self_id: &str, clients: HttpClients, token: Option<String>) -> PeerSet {
        PeerSet {
            self_id: self_id.to_string(),
            members: RwLock::new(Arc::new(Vec::new())),
            clients,
            token,
            skipped: Mutex::new(BTreeMap::new()),
            stats: Mutex::new(BTreeMap::new()),
        }
    }

    /// Replaces the membership; logs who joined and who left (once per change).
    pub fn set_members(&self, members: Vec<Member>) {
        let mut next: Vec<Member> = members
            .into_iter()
            .filter(|m| m.id != self.self_id)
            .map(|m| Member {
                id: m.id,
                url: m.url.trim_end_matches('/').to_string(),
            })
            .collect();
        next.sort();
        next.dedup_by(|a, b| a.id == b.id);
        let mut current = self.members.write().unwrap_or_else(|e| e.into_inner());
        for m in next.iter().filter(|m| !current.contains(m)) {
            tracing::info!(peer = %m.id, url = %m.url, "peer joined");
        }
        for m in current.iter().filter(|m| !next.contains(m)) {
            tracing::info!(peer = %m.id, url = %m.url, "peer left");
        }
        *current = Arc::new(next);
    }

    /// The live nodes other than this one.
    pub fn members(&self) -> Arc<Vec<Member>> {
        self.members
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether `url` is a live node's URL (an origin named in a manifest is contacted
    /// only then).
    pub fn is_member_url(&self, url: &str) -> bool {
        let url = url.trim_end_matches('/');
        self.members().iter().any(|m| m.url == url)
    }

    /// Every live node, this one included, in rendezvous order for `digest`: the first
    /// is the chunk's owner.
    fn ranked(&self, digest: &Digest) -> Vec<(u64, Option<Member>)> {
        let members = self.members();
        let mut ranked: Vec<(u64, Option<Member>)> = members
            .iter()
            .map(|m| (score(digest, &m.id), Some(m.clone())))
            .collect();
        ranked.push((score(digest, &self.self_id), None));
        ranked.sort_by_key(|r| std::cmp::Reverse(r.0));
        ranked
    }

    /// Whether this node owns `digest` (then it fetches the chunk from the store itself).
    pub fn owns(&self, digest: &Digest) -> bool {
        matches!(self.ranked(digest).first(), Some((_, None)))
    }

    /// The peers to ask for `digest`, best first: the owner and the next in rendezvous
    /// order, without this node and without peers in backoff. Empty when this node is
    /// the owner (it goes to the store).
    pub fn owners(&self, digest: &Digest) -> Vec<Member> {
        let ranked = self.ranked(digest);
        if matches!(ranked.first(), Some((_, None))) {
            return Vec::new();
        }
        let now = Instant::now();
        let skipped = self.skipped.lock().unwrap_or_else(|e| e.into_inner());
        ranked
            .into_iter()
            .take(OWNERS_TRIED)
            .filter_map(|(_, m)| m)
            .filter(|m| skipped.get(&m.id).is_none_or(|until| *until <= now))
            .collect()
    }

    /// Fetches `chunk` from its owners (unverified; the caller checks the digest).
    pub async fn fetch(&self, chunk: &ChunkRef, deadline: Duration) -> Result<Bytes, SourceError> {
        let (digest, len) = (&chunk.digest, chunk.len);
        if crate::manifest::validate_id(&chunk.template).is_err() {
            // Not a template's chunk (an owner would refuse it): the store has it.
            return Err(SourceError::Skipped {
                source_name: "peers".into(),
                why: format!("{:?} names no template an owner could know", chunk.template),
            });
        }
        let owners = self.owners(digest);
        if owners.is_empty() {
            return Err(SourceError::Skipped {
                source_name: "peers".into(),
                why: "this node owns the chunk, or its owners are passed over".into(),
            });
        }
        let started = Instant::now();
        let mut last = None;
        for owner in owners {
            let left = deadline.saturating_sub(started.elapsed());
            if left.is_zero() {
                break;
            }
            let source = HttpSource::new(self.clients.clone(), &owner.url, self.token.clone());
            let url = format!(
                "{}/v1/peer/chunks/{digest}?len={len}&template={}&index={}",
                owner.url, chunk.template, chunk.index
            );
            let attempt = Instant::now();
            match source.fetch_url(&url, len, left).await {
                Ok(bytes) => {
                    self.count(&owner.id, |s| {
                        s.chunks += 1;
                        s.bytes += bytes.len() as u64;
                        s.seconds += attempt.elapsed().as_secs_f64();
                    });
                    return Ok(bytes);
                }
                Err(e) => {
                    self.peer_failed(&owner.id);
                    tracing::debug!(peer = %owner.id, error = %e, "peer fetch failed; passing it over");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or(SourceError::Timeout {
            source_name: "peers".into(),
            deadline,
        }))
    }

    /// A peer sent bytes that do not match their digest: passed over like a failure.
    pub fn peer_failed(&self, id: &str) {
        self.skipped
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_string(), Instant::now() + PEER_BACKOFF);
        self.count(id, |s| s.failures += 1);
    }

    fn count(&self, id: &str, f: impl FnOnce(&mut PeerStats)) {
        let mut stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        f(stats.entry(id.to_string()).or_default());
    }

    /// What each peer delivered since start.
    pub fn stats(&self) -> BTreeMap<String, PeerStats> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The rendezvous score of a node for a chunk: the first 8 bytes of
/// sha256(digest || node id). Every node computes the same ranking.
fn score(digest: &Digest, id: &str) -> u64 {
    let mut h = Sha256::new();
    h.update(digest.as_bytes());
    h.update(id.as_bytes());
    let out = h.finalize();
    u64::from_be_bytes(out[..8].try_into().unwrap_or([0; 8]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(self_id: &str, ids: &[&str]) -> PeerSet {
        let s = PeerSet::new(self_id, HttpClients::new(reqwest::Client::new), None);
        s.set_members(
            ids.iter()
                .map(|id| Member {
                    id: id.to_string(),
                    url: format!("http://{id}"),
                })
                .collect(),
        );
        s
    }

    #[test]
    fn every_node_agrees_on_the_owner_and_a_departure_moves_only_its_chunks() {
        let ids = ["a", "b", "c", "d"];
        let nodes: Vec<PeerSet> = ids.iter().map(|me| set(me, &ids)).collect();
        let digests: Vec<Digest> = (0..200u32).map(|i| Digest::of(&i.to_be_bytes())).collect();
        for d in &digests {
            let owners: Vec<usize> = (0..4).filter(|&n| nodes[n].owns(d)).collect();
            assert_eq!(owners.len(), 1, "exactly one owner per chunk");
        }
        // "d" leaves: the chunks the others owned keep their owner.
        let before: Vec<bool> = digests.iter().map(|d| nodes[0].owns(d)).collect();
        nodes[0].set_members(vec![
            Member {
                id: "b".into(),
                url: "http://b".into(),
            },
            Member {
                id: "c".into(),
                url: "http://c".into(),
            },
        ]);
        for (d, owned) in digests.iter().zip(before) {
            if owned {
                assert!(nodes[0].owns(d), "a chunk of a staying node moved");
            }
        }
    }
}
