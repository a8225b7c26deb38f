//! Where missing chunks come from, the transports: the store server over HTTP
//! (`GET {base}/v1/chunks/{digest}`), an origin node (the same endpoint, contacted only
//! while it is a live member when the fleet's membership is known), the fleet's peers by
//! chunk ownership ([`crate::peers`]), the caches of the next peers when the owners and
//! the store failed, and an object store read directly. Transports only move bytes,
//! and say which node sent them; [`crate::planner`] orders the sources,
//! [`crate::fetch`] times and verifies every attempt.

use std::time::Duration;

use std::sync::Arc;

use bytes::Bytes;

use crate::chunk_ref::ChunkRef;
use crate::peers::PeerSet;

pub use crate::transport::{HttpClients, HttpSource, ObjectSource, SourceError};

/// The name of [`Source::PeerCaches`] in logs and metrics.
pub const PEER_CACHES: &str = "peer-caches";

/// What a source sent for a chunk, or for a range of its stored form: the bytes
/// (unverified: a stored form, raw, a zstd frame or zstd blocks, which the fetch decodes
/// and checks) and, for a source of several nodes, the id of the node that sent them.
#[derive(Clone, Debug)]
pub struct Fetched {
    pub bytes: Bytes,
    pub node: Option<String>,
}

/// A source of chunks. An enum, not a trait object: the set of kinds is closed.
#[derive(Clone)]
pub enum Source {
    /// The store server.
    Http(HttpSource),
    /// An origin node named in the manifest; with a membership, contacted only while
    /// it is a live member (or listed in `--peers`).
    Origin {
        http: HttpSource,
        members: Option<Arc<PeerSet>>,
    },
    /// The chunk's owner among the live peers.
    Peers(Arc<PeerSet>),
    /// The caches of the next peers in rendezvous order, which answer from their caches
    /// only: after the store, for a read that the owners and the store failed (see
    /// [`crate::peers`]).
    PeerCaches(Arc<PeerSet>),
    /// An object store read directly (S3 and compatible, GCS, Azure).
    Object(ObjectSource),
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Source {
    /// A printable name for logs and metrics (the base URL; "peers" for the owners).
    pub fn name(&self) -> &str {
        match self {
            Source::Http(s) | Source::Origin { http: s, .. } => &s.base,
            Source::Peers(_) => "peers",
            Source::PeerCaches(_) => PEER_CACHES,
            Source::Object(o) => &o.name,
        }
    }

    /// The class of the source: "store", "origin" or "peer".
    pub fn class(&self) -> &'static str {
        match self {
            Source::Http(_) | Source::Object(_) => "store",
            Source::Origin { .. } => "origin",
            Source::Peers(_) | Source::PeerCaches(_) => "peer",
        }
    }

    /// Whether the source is another node of the fleet (an origin, a peer): a read
    /// hedges one that is slow ([`crate::planner::Hedging`]).
    pub fn is_node(&self) -> bool {
        matches!(
            self,
            Source::Origin { .. } | Source::Peers(_) | Source::PeerCaches(_)
        )
    }

    /// Whether the source keeps a health per node of its own ([`crate::peers`]): then
    /// one dead peer does not demote the others in the planner's health.
    pub fn has_own_health(&self) -> bool {
        matches!(self, Source::Peers(_) | Source::PeerCaches(_))
    }

    /// Whether the source's background fetches use connections of their own (see
    /// [`HttpClients`]): HTTP sources do; an object store's client has one pool.
    pub fn has_own_connections(&self) -> bool {
        !matches!(self, Source::Object(_))
    }

    /// Fetches the chunk's bytes (unverified; the caller checks the digest), with the
    /// node that sent them when the source is several nodes (the peers), so that bytes
    /// that are not the chunk are held against that node alone ([`Source::distrust`]).
    /// Peers are told the chunk's template and index too: an owner fetches for a peer
    /// only what a manifest it knows names there.
    pub async fn fetch(
        &self,
        chunk: &ChunkRef,
        deadline: Duration,
    ) -> Result<Fetched, SourceError> {
        let whole = |bytes| Fetched { bytes, node: None };
        let from = |(bytes, node)| Fetched {
            bytes,
            node: Some(node),
        };
        let (digest, len) = (&chunk.digest, chunk.len);
        match self {
            Source::Http(s) => s.fetch(digest, len, deadline).await.map(whole),
            Source::Origin { http, members } => {
                if let Some(members) = members {
                    if !members.is_member_url(&http.base) {
                        return Err(SourceError::Skipped {
                            source_name: http.base.clone(),
                            why: "not a live member of the fleet".into(),
                        });
                    }
                }
                http.fetch_from_node(digest, len, deadline).await.map(whole)
            }
            Source::Peers(p) => p.fetch(chunk, deadline).await.map(from),
            Source::PeerCaches(p) => p.fetch_cached(digest, len, deadline).await.map(from),
            Source::Object(o) => o.fetch(digest, len, deadline).await.map(whole),
        }
    }

    /// `node` of this source sent bytes that are not what it was asked for: it is passed
    /// over by itself (see [`PeerSet::distrust`]). Sources of one node have no nodes to
    /// tell apart; the planner's health counts them ([`crate::planner::SourceHealth`]).
    pub fn distrust(&self, node: &str) {
        if let Source::Peers(p) | Source::PeerCaches(p) = self {
            p.distrust(node);
        }
    }

    /// `node` of this source sent a chunk that verified (see [`PeerSet::vouch`]).
    pub fn vouch(&self, node: &str) {
        if let Source::Peers(p) | Source::PeerCaches(p) = self {
            p.vouch(node);
        }
    }

    /// Whether the source serves byte ranges of a chunk's stored object: the store's
    /// objects (over HTTP or directly), and the owners among the peers, of the chunks
    /// they hold as the store sent them ([`PeerSet::fetch_range`]); origins and the
    /// peers' caches serve whole chunks.
    pub fn serves_ranges(&self) -> bool {
        matches!(self, Source::Http(_) | Source::Object(_) | Source::Peers(_))
    }

    /// What this source's requests cost, where it is measured: the store (over HTTP or
    /// an object store read directly). Peers are a rack away; their requests cost about
    /// their bytes.
    pub fn link(&self) -> Option<&crate::link::LinkTimes> {
        match self {
            Source::Http(s) => Some(&s.link),
            Source::Object(o) => Some(&o.link),
            Source::Origin { .. } | Source::Peers(_) | Source::PeerCaches(_) => None,
        }
    }

    /// Fetches bytes `range` of the chunk's stored object (unverified; the caller checks
    /// each block against the block index), with the node that sent them when the
    /// source is several nodes (an owner among the peers), so that blocks that are not
    /// their index entries are held against that node alone ([`Source::distrust`]).
    pub async fn fetch_range(
        &self,
        chunk: &ChunkRef,
        range: std::ops::Range<u64>,
        deadline: Duration,
    ) -> Result<Fetched, SourceError> {
        let whole = |bytes| Fetched { bytes, node: None };
        let digest = &chunk.digest;
        match self {
            Source::Http(s) => s.fetch_range(digest, range, deadline).await.map(whole),
            Source::Object(o) => o.fetch_range(digest, range, deadline).await.map(whole),
            Source::Peers(p) => p
                .fetch_range(chunk, range, deadline)
                .await
                .map(|(bytes, node)| Fetched {
                    bytes,
                    node: Some(node),
                }),
            Source::Origin { .. } | Source::PeerCaches(_) => Err(SourceError::Skipped {
                source_name: self.name().to_string(),
                why: "serves whole chunks only".into(),
            }),
        }
    }
}
