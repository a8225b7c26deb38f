//! The node's own health on the HTTP API: its identity, whether its cache keeps what it
//! fetches, and `scrub` (every cached chunk hashed, bad ones dropped and fetched again
//! on demand), which runs in the background while `GET /v1/scrub` shows its progress.

use std::sync::{Arc, Mutex};

use lazyblk_cache::ScrubReport;
use serde::Serialize;

use crate::daemon::node::Node;

/// What `GET /v1/node` answers.
#[derive(Serialize)]
pub struct NodeInfo {
    pub node_id: String,
    /// The public key the node's id derives from (hex).
    pub public_key: String,
    pub advertise: String,
    pub version: &'static str,
    pub cache_used_bytes: u64,
    pub cache_budget_bytes: u64,
    pub cache_chunks: usize,
    /// True while fetched chunks cannot be written to the cache (a full disk, say).
    pub cache_degraded: bool,
    pub cache_write_failures: u64,
    pub cache_last_write_error: Option<String>,
    /// Cached chunk files found corrupt and dropped since start.
    pub cache_corrupt_files: u64,
    /// The fleet's other live nodes as this node sees them (empty without membership).
    pub peers: Vec<lazyblk_cache::Member>,
    /// What each peer delivered to this node.
    pub peer_stats: std::collections::BTreeMap<String, lazyblk_cache::PeerStats>,
}

impl NodeInfo {
    pub fn of(node: &Node) -> NodeInfo {
        let usage = node.cache.usage();
        let health = node.cache.health();
        NodeInfo {
            node_id: node.node_id.clone(),
            public_key: node.key.public_hex(),
            advertise: node.advertise.clone(),
            version: env!("CARGO_PKG_VERSION"),
            cache_used_bytes: usage.used_bytes,
            cache_budget_bytes: usage.budget_bytes,
            cache_chunks: usage.chunks,
            cache_degraded: health.degraded(),
            cache_write_failures: health.write_failures(),
            cache_last_write_error: health.last_error(),
            cache_corrupt_files: usage.corrupt_files,
            peers: node
                .peers
                .as_ref()
                .map(|p| p.members().to_vec())
                .unwrap_or_default(),
            peer_stats: node.peers.as_ref().map(|p| p.stats()).unwrap_or_default(),
        }
    }
}

/// A scrub's progress, and its report once done.
#[derive(Clone, Default, Serialize, serde::Deserialize)]
pub struct ScrubProgress {
    pub running: bool,
    /// Bytes hashed so far, of `total`.
    pub done: u64,
    pub total: u64,
    pub report: Option<ScrubReport>,
}

/// The node's one scrub at a time.
#[derive(Default)]
pub struct Scrubs(Arc<Mutex<ScrubProgress>>);

impl Scrubs {
    /// The last scrub's progress or report.
    pub fn get(&self) -> ScrubProgress {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Starts a scrub of `node`'s cache unless one runs; returns the progress.
    pub fn start(&self, node: Arc<Node>) -> ScrubProgress {
        let progress = self.0.clone();
        {
            let mut p = progress.lock().unwrap_or_else(|e| e.into_inner());
            if p.running {
                return p.clone();
            }
            *p = ScrubProgress {
                running: true,
                ..ScrubProgress::default()
            };
        }
        tokio::task::spawn_blocking(move || {
            let report = node.cache.scrub(|done, total| {
                let mut p = progress.lock().unwrap_or_else(|e| e.into_inner());
                p.done = done;
                p.total = total;
            });
            tracing::info!(
                checked = report.checked,
                dropped = report.dropped.len(),
                unreadable = report.unreadable.len(),
                "scrub finished"
            );
            let mut p = progress.lock().unwrap_or_else(|e| e.into_inner());
            p.running = false;
            p.report = Some(report);
        });
        self.get()
    }
}
