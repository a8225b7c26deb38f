//! The fleet's nodes as chunk sources: each chunk digest has one owner among the live
//! nodes, chosen by rendezvous hashing over their ids (so a node that comes or goes
//! moves only its own share of chunks). A node missing a chunk asks the owner
//! (`GET {owner}/v1/peer/chunks/{digest}?len=N&template=ID&index=I`), which answers
//! from its cache or fetches the chunk once from the store, and sends the chunk's stored
//! form (the bytes the store sent, zstd blocks) with its encoding named
//! ([`crate::transport`]). A small read asks the owner for a range of that form
//! ([`PeerSet::fetch_range`]) when the owner holds it. An owner never asks a peer to
//! fetch for it: its own fetches and those it makes for peers use the store, so requests
//! cannot loop.
//!
//! The fallback. When the owners and the store have failed (a store outage), a read
//! asks the next nodes in rendezvous order for the chunk from their caches
//! (`GET {node}/v1/chunks/{digest}`, which serves what a node holds and never fetches),
//! so an owner can still read the chunks it owns from a peer that holds them, and the
//! fallback cannot loop either.
//!
//! [`PeerSet`] is the membership as this node sees it (set by the daemon from the
//! store's lease listing, or from `--peers`), the per-peer health and per-peer byte
//! counts. A peer that fails is passed over at least as long as its failed attempt took
//! (and at least [`PEER_MIN_BACKOFF`]), doubling at each failed trial up to
//! [`PEER_MAX_BACKOFF`]; when its backoff ends, one request tries it (others still pass
//! it over) and its answer decides. A peer that answers with an HTTP error (an owner
//! whose own fetch failed answers 502) is alive: counted, not passed over. An attempt a read gave up on because a hedge
//! answered first ([`crate::planner::Hedging`]) counts as a failure when it had run
//! for the shortest hedge delay. Every byte from a peer is verified by
//! [`crate::fetch`] like any other, which is told which node sent them: a node whose
//! bytes are not the chunk is passed over by itself ([`PeerSet::distrust`]), doubling
//! with each lie in a row, and the read asks the next owner; the other peers keep
//! serving.
//!
//! Layout: this file, the members, who owns a chunk and the fetches from them;
//! [`health`], which peers are passed over and for how long.

mod health;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use sha2::{Digest as _, Sha256};

use crate::chunk_ref::ChunkRef;
use crate::digest::Digest;
use crate::transport::{HttpClients, HttpSource, SourceError};

use health::{Outcome, PeerHealth};

/// Owners tried for one chunk before the read goes on to the store: the owner, then the
/// next in rendezvous order (it fetches the chunk once from the store, so a dead owner
/// costs the store no extra copies while the membership catches up).
pub const OWNERS_TRIED: usize = 2;
/// The shortest time a peer that failed is passed over: a peer refusing connections
/// (restarting) is not asked again at every read. A peer whose failed attempt took
/// longer (a stall until the source deadline) is passed over at least that long.
pub const PEER_MIN_BACKOFF: Duration = Duration::from_secs(5);
/// The longest a failing peer is passed over: its backoff doubles at each failed trial
/// up to this, so a member that stalls for good costs one trial (and one hedge delay of
/// one read) per two minutes, and a recovered one is asked again within two minutes.
pub const PEER_MAX_BACKOFF: Duration = Duration::from_secs(120);
/// Nodes asked for a chunk from their caches after the owners and the store failed:
/// a few, so a read during a store outage finds a node that read the template, without
/// asking the whole fleet for every chunk.
pub const FALLBACK_NODES: usize = 3;

/// The shortest hedge delay ([`crate::planner::Hedging`]), and so how long a peer's
/// attempt may run before a hedge beside it counts it as failed: a peer's cold answer includes its own fetch from the
/// store, tens of milliseconds on a LAN, so a second is well past a healthy owner's
/// answer even on a loaded node; hedging sooner would cost the store the copies that
/// asking the owner saves.
pub const HEDGE_DELAY_MIN: Duration = Duration::from_secs(1);

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
    /// Peers that failed, by id (see the module header).
    health: Mutex<BTreeMap<String, PeerHealth>>,
    /// Chunks in a row each peer sent that were not the chunk ([`PeerSet::distrust`]):
    /// kept across its answers, so a peer that lies at every trial waits longer each
    /// time; its first verified chunk clears it ([`PeerSet::vouch`]).
    lies: Mutex<BTreeMap<String, u32>>,
    stats: Mutex<BTreeMap<String, PeerStats>>,
}

impl PeerSet {
    pub fn new(self_id: &str, clients: HttpClients, token: Option<String>) -> PeerSet {
        PeerSet {
            self_id: self_id.to_string(),
            members: RwLock::new(Arc::new(Vec::new())),
            clients,
            token,
            health: Mutex::new(BTreeMap::new()),
            lies: Mutex::new(BTreeMap::new()),
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

    /// The peers to ask to fetch `digest` for this node, best first: the owner and the
    /// next in rendezvous order, without this node. Empty when this node is the owner
    /// (it goes to the store). Peers in backoff are passed over when asked (see
    /// [`PeerSet::admit`]).
    pub fn owners(&self, digest: &Digest) -> Vec<Member> {
        let ranked = self.ranked(digest);
        if matches!(ranked.first(), Some((_, None))) {
            return Vec::new();
        }
        ranked
            .into_iter()
            .take(OWNERS_TRIED)
            .filter_map(|(_, m)| m)
            .collect()
    }

    /// The nodes to ask for `digest` from their caches once the owners and the store
    /// failed: the next [`FALLBACK_NODES`] in rendezvous order after those asked to
    /// fetch it (after this node, when it is the owner).
    pub fn fallbacks(&self, digest: &Digest) -> Vec<Member> {
        let ranked = self.ranked(digest);
        let asked = if matches!(ranked.first(), Some((_, None))) {
            1
        } else {
            OWNERS_TRIED
        };
        ranked
            .into_iter()
            .skip(asked)
            .filter_map(|(_, m)| m)
            .take(FALLBACK_NODES)
            .collect()
    }

    /// Fetches `chunk` from its owners (unverified; the caller checks the digest), with
    /// the id of the node that answered. An owner fetches for a peer only a chunk a
    /// manifest it knows names at that index, so the request names both.
    pub async fn fetch(
        &self,
        chunk: &ChunkRef,
        deadline: Duration,
    ) -> Result<(Bytes, String), SourceError> {
        let (digest, len) = (&chunk.digest, chunk.len);
        if crate::manifest::validate_id(&chunk.template).is_err() {
            // Not a template's chunk (an owner would refuse it): the store has it.
            return Err(SourceError::Skipped {
                source_name: "peers".into(),
                why: format!("{:?} names no template an owner could know", chunk.template),
            });
        }
        let path = format!(
            "v1/peer/chunks/{digest}?len={len}&template={}&index={}",
            chunk.template, chunk.index
        );
        self.fetch_from(self.owners(digest), &path, len, deadline, "peers")
            .await
    }

    /// Fetches bytes `range` of `chunk`'s stored form (its blocks, for a small read:
    /// [`crate::partial`]) from an owner that holds the chunk as the store sent it. An
    /// owner does not fetch for a range: one without it answers 404 or 416 at once, and
    /// the read asks the store. Whatever the owners said, a failure is reported as
    /// passed over (the peers keep their health here, per peer), so a chunk no owner
    /// holds does not demote the peers for whole chunks. With the bytes, the id of the
    /// owner that sent them: blocks that fail their check are held against it alone
    /// ([`PeerSet::distrust`]).
    pub async fn fetch_range(
        &self,
        chunk: &ChunkRef,
        range: std::ops::Range<u64>,
        deadline: Duration,
    ) -> Result<(Bytes, String), SourceError> {
        let passed_over = |why: &str| SourceError::Skipped {
            source_name: "peers".into(),
            why: why.to_string(),
        };
        if crate::manifest::validate_id(&chunk.template).is_err() {
            return Err(passed_over("no template an owner could know"));
        }
        let started = Instant::now();
        for node in self.owners(&chunk.digest) {
            let left = deadline.saturating_sub(started.elapsed());
            if left.is_zero() {
                break;
            }
            let Some(attempt) = self.attempt(&node.id) else {
                continue;
            };
            let source = HttpSource::new(self.clients.clone(), &node.url, self.token.clone());
            let url = format!(
                "{}/v1/peer/chunks/{}?len={}&template={}&index={}",
                node.url, chunk.digest, chunk.len, chunk.template, chunk.index
            );
            let fetched = source.fetch_range_url(&url, range.clone(), left).await;
            let took = attempt.started.elapsed();
            match fetched {
                Ok(bytes) => {
                    attempt.settle(Outcome::Answered);
                    self.count(&node.id, |s| {
                        s.bytes += bytes.len() as u64;
                        s.seconds += took.as_secs_f64();
                    });
                    return Ok((bytes, node.id));
                }
                // Alive: it does not hold the chunk in a form it serves ranges of (or is
                // from before ranges, and sent the whole chunk).
                Err(SourceError::Status { .. }) => attempt.settle(Outcome::Answered),
                Err(e) => {
                    attempt.settle(Outcome::Failed(took));
                    tracing::debug!(peer = %node.id, error = %e, "peer range failed; passing it over");
                }
            }
        }
        Err(passed_over("no owner holds the chunk's stored form"))
    }

    /// Fetches `digest` from the caches of the next nodes in rendezvous order (see the
    /// module header), with the id of the node that answered: a node that does not hold
    /// it answers 404 at once.
    pub async fn fetch_cached(
        &self,
        digest: &Digest,
        len: u64,
        deadline: Duration,
    ) -> Result<(Bytes, String), SourceError> {
        let path = format!("v1/chunks/{digest}");
        self.fetch_from(self.fallbacks(digest), &path, len, deadline, "peer-caches")
            .await
    }

    /// Asks `nodes` in turn for `path` within `deadline` over all of them; the bytes
    /// and the id of the node that sent them.
    async fn fetch_from(
        &self,
        nodes: Vec<Member>,
        path: &str,
        len: u64,
        deadline: Duration,
        name: &str,
    ) -> Result<(Bytes, String), SourceError> {
        let started = Instant::now();
        let mut last = None;
        let mut asked = 0;
        for node in nodes {
            let left = deadline.saturating_sub(started.elapsed());
            if left.is_zero() {
                break;
            }
            let Some(attempt) = self.attempt(&node.id) else {
                continue;
            };
            asked += 1;
            let source = HttpSource::new(self.clients.clone(), &node.url, self.token.clone());
            let url = format!("{}/{path}", node.url);
            let fetched = source.fetch_url(&url, len, left).await;
            let took = attempt.started.elapsed();
            match fetched {
                Ok(bytes) => {
                    attempt.settle(Outcome::Answered);
                    self.count(&node.id, |s| {
                        s.chunks += 1;
                        s.bytes += bytes.len() as u64;
                        s.seconds += took.as_secs_f64();
                    });
                    return Ok((bytes, node.id));
                }
                // Alive, and without the chunk: no mark against it.
                Err(e @ SourceError::Status { status: 404, .. }) => {
                    attempt.settle(Outcome::Answered);
                    last = Some(e);
                }
                // Alive, and it said no (an owner whose own fetch from the store failed
                // answers 502): counted, but not passed over; the chunks it holds are
                // still asked of it during a store outage.
                Err(e @ SourceError::Status { .. }) => {
                    attempt.settle(Outcome::Answered);
                    self.count(&node.id, |s| s.failures += 1);
                    tracing::debug!(peer = %node.id, error = %e, "peer refused a chunk");
                    last = Some(e);
                }
                Err(e) => {
                    attempt.settle(Outcome::Failed(took));
                    tracing::debug!(peer = %node.id, error = %e, "peer fetch failed; passing it over");
                    last = Some(e);
                }
            }
        }
        if asked == 0 {
            return Err(SourceError::Skipped {
                source_name: name.into(),
                why: "this node owns the chunk, or the nodes to ask are passed over".into(),
            });
        }
        Err(last.unwrap_or(SourceError::Timeout {
            source_name: name.into(),
            deadline,
        }))
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
