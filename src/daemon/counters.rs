//! The daemon's metrics (Prometheus) and the per-template byte counts that `status`
//! shows. The cache reports into it through [`FetchObserver`]; the NBD server through
//! its `observe` hook. The series' labels are in [`super::metric_labels`], the
//! per-template counts in [`super::template_bytes`].

use std::sync::atomic::AtomicU64;
use std::sync::Mutex;
use std::time::Duration;

use lazyblk_cache::fetch::{ChunkRef, FetchObserver};
use lazyblk_cache::source::SourceError;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::metric_labels::{
    attach_histogram, latency_histogram, CommandLabel, CommandOnly, PeerLabel, PhaseLabel,
    SourceLabel, TemplateLabel,
};
use super::store_links::StoreLinks;
use super::template_bytes::{PerTemplate, TemplateBytes};

/// Every counter of the daemon.
pub struct DaemonMetrics {
    pub registry: Mutex<Registry>,
    hits: Counter,
    misses: Counter,
    read_budget_spent: Counter,
    served_before_verified: Counter,
    /// Bytes of cached reads sent with splice, never copied through a buffer.
    spliced_bytes: Counter,
    bytes_fetched: Family<SourceLabel, Counter>,
    /// The same chunks' bytes as the sources sent them (compressed where they shrank).
    stored_bytes_fetched: Family<SourceLabel, Counter>,
    chunks_fetched: Family<SourceLabel, Counter>,
    /// Blocks of chunks fetched in part (format 3's block index).
    blocks_fetched: Family<SourceLabel, Counter>,
    fetch_seconds: Family<SourceLabel, Histogram, fn() -> Histogram>,
    fetch_failures: Family<SourceLabel, Counter>,
    verify_failures: Family<SourceLabel, Counter>,
    nbd_requests: Family<CommandLabel, Counter>,
    nbd_seconds: Family<CommandOnly, Histogram, fn() -> Histogram>,
    nbd_bytes: Family<CommandOnly, Counter>,
    /// Phases of kernel device attaches and reconnects.
    device_attach_seconds: Family<PhaseLabel, Histogram, fn() -> Histogram>,
    pub fill_chunks_local: Family<TemplateLabel, Gauge>,
    pub fill_chunks_total: Family<TemplateLabel, Gauge>,
    pub cache_bytes: Gauge,
    pub cache_budget_bytes: Gauge,
    /// Replicas in memory, and templates known (in memory or only on disk).
    pub replicas_in_memory: Gauge,
    pub templates_known: Gauge,
    pub evictions: Gauge<u64, AtomicU64>,
    /// 1 while fetched chunks cannot be kept on disk (see `CacheHealth`).
    pub cache_degraded: Gauge,
    pub cache_write_failures: Gauge<u64, AtomicU64>,
    pub cache_corrupt_files: Gauge<u64, AtomicU64>,
    /// What a request to each store takes, and whether reads fetch whole chunks there.
    pub store_links: StoreLinks,
    /// Chunks and bytes this node served to peers as their owner (bytes as sent: the
    /// stored form where the peer took it).
    peer_chunks_served: Counter,
    peer_bytes_served: Counter,
    /// Bytes of chunk bodies this node handed to peers' connections, from both chunk
    /// endpoints (what its peer links carry out).
    peer_bytes_sent: Counter,
    /// Bytes of chunk bodies received from peers, over all of them (what its peer links
    /// carry in).
    peer_bytes_received: Gauge<u64, AtomicU64>,
    peer_fetched_bytes: Family<PeerLabel, Gauge<u64, AtomicU64>>,
    peer_fetched_chunks: Family<PeerLabel, Gauge<u64, AtomicU64>>,
    peer_failures: Family<PeerLabel, Gauge<u64, AtomicU64>>,
    store_url: std::sync::OnceLock<String>,
    per_template: PerTemplate,
}

impl DaemonMetrics {
    pub fn new() -> DaemonMetrics {
        let m = DaemonMetrics {
            registry: Mutex::new(Registry::default()),
            hits: Counter::default(),
            misses: Counter::default(),
            read_budget_spent: Counter::default(),
            served_before_verified: Counter::default(),
            spliced_bytes: Counter::default(),
            bytes_fetched: Family::default(),
            stored_bytes_fetched: Family::default(),
            chunks_fetched: Family::default(),
            blocks_fetched: Family::default(),
            fetch_seconds: Family::new_with_constructor(latency_histogram),
            fetch_failures: Family::default(),
            verify_failures: Family::default(),
            nbd_requests: Family::default(),
            nbd_seconds: Family::new_with_constructor(latency_histogram),
            nbd_bytes: Family::default(),
            device_attach_seconds: Family::new_with_constructor(attach_histogram),
            fill_chunks_local: Family::default(),
            fill_chunks_total: Family::default(),
            cache_bytes: Gauge::default(),
            cache_budget_bytes: Gauge::default(),
            replicas_in_memory: Gauge::default(),
            templates_known: Gauge::default(),
            evictions: Gauge::default(),
            cache_degraded: Gauge::default(),
            cache_write_failures: Gauge::default(),
            cache_corrupt_files: Gauge::default(),
            store_links: StoreLinks::default(),
            peer_chunks_served: Counter::default(),
            peer_bytes_served: Counter::default(),
            peer_bytes_sent: Counter::default(),
            peer_bytes_received: Gauge::default(),
            peer_fetched_bytes: Family::default(),
            peer_fetched_chunks: Family::default(),
            peer_failures: Family::default(),
            store_url: std::sync::OnceLock::new(),
            per_template: PerTemplate::default(),
        };
        {
            let mut r = m.registry.lock().unwrap_or_else(|e| e.into_inner());
            let r = r.sub_registry_with_prefix("lazyblk");
            r.register("cache_hits", "Reads whose chunk was local", m.hits.clone());
            r.register(
                "cache_misses",
                "Reads that needed a fetch",
                m.misses.clone(),
            );
            r.register(
                "read_budget_spent",
                "Demand reads that failed with EIO because no source delivered within --read-deadline",
                m.read_budget_spent.clone(),
            );
            r.register(
                "reads_served_before_verified",
                "Missed reads served from their own blocks, checked against the block index, as soon as a whole chunk's stored form came, before the chunk was verified whole",
                m.served_before_verified.clone(),
            );
            r.register(
                "nbd_spliced_bytes",
                "Bytes of cached NBD reads sent from chunk files with splice, without a copy",
                m.spliced_bytes.clone(),
            );
            r.register(
                "fetched_bytes",
                "Verified chunk bytes fetched, by source (decoded: the chunks' own size)",
                m.bytes_fetched.clone(),
            );
            r.register(
                "fetched_stored_bytes",
                "Bytes of the same chunks as the sources sent them (zstd frames where the chunk shrank): what crossed the network",
                m.stored_bytes_fetched.clone(),
            );
            r.register(
                "fetched_chunks",
                "Verified chunks fetched, by source",
                m.chunks_fetched.clone(),
            );
            r.register(
                "fetched_blocks",
                "Byte ranges of chunks fetched in part (a small read of a missing chunk stored in blocks), by source; their bytes count in fetched_bytes and fetched_stored_bytes",
                m.blocks_fetched.clone(),
            );
            r.register(
                "fetch_seconds",
                "Time to fetch and verify one chunk, by source",
                m.fetch_seconds.clone(),
            );
            r.register(
                "fetch_failures",
                "Chunk fetches a source failed, by source",
                m.fetch_failures.clone(),
            );
            r.register(
                "verify_failures",
                "Chunks whose bytes did not match their digest, by source",
                m.verify_failures.clone(),
            );
            r.register(
                "nbd_requests",
                "NBD requests by command and result",
                m.nbd_requests.clone(),
            );
            r.register(
                "nbd_request_seconds",
                "NBD request latency by command",
                m.nbd_seconds.clone(),
            );
            r.register(
                "nbd_bytes",
                "Bytes read or written over NBD, by command",
                m.nbd_bytes.clone(),
            );
            r.register(
                "replica_chunks_local",
                "Non-zero chunks local, per template",
                m.fill_chunks_local.clone(),
            );
            r.register(
                "replica_chunks",
                "Non-zero chunks, per template",
                m.fill_chunks_total.clone(),
            );
            r.register(
                "cache_used_bytes",
                "Bytes of chunks in the node's cache",
                m.cache_bytes.clone(),
            );
            r.register(
                "cache_budget_bytes",
                "The cache's byte budget (0: none)",
                m.cache_budget_bytes.clone(),
            );
            r.register(
                "replicas_in_memory",
                "Replicas held in memory (every busy one, and a bounded number of idle ones)",
                m.replicas_in_memory.clone(),
            );
            r.register(
                "templates_known",
                "Templates this node has a manifest of, in memory or on disk",
                m.templates_known.clone(),
            );
            r.register(
                "cache_evictions",
                "Chunks evicted from the cache since start",
                m.evictions.clone(),
            );
            r.register(
                "cache_degraded",
                "1 while fetched chunks cannot be written to the cache (reads are served from memory)",
                m.cache_degraded.clone(),
            );
            r.register(
                "cache_write_failures",
                "Fetched chunks that could not be written to the cache since start",
                m.cache_write_failures.clone(),
            );
            r.register(
                "peer_chunks_served",
                "Chunks this node served to peers as their owner",
                m.peer_chunks_served.clone(),
            );
            r.register(
                "peer_bytes_served",
                "Bytes this node served to peers as their owner, as sent (the stored form where the peer took it)",
                m.peer_bytes_served.clone(),
            );
            r.register(
                "peer_bytes_sent",
                "Bytes of chunk bodies sent to peers from both chunk endpoints (the peer links' outgoing bytes)",
                m.peer_bytes_sent.clone(),
            );
            r.register(
                "peer_bytes_received",
                "Bytes of whole chunk bodies (and ranges) received from peers, over all of them (the peer links' incoming bytes)",
                m.peer_bytes_received.clone(),
            );
            r.register(
                "peer_fetched_bytes",
                "Bytes fetched from each peer (as the chunks' owner)",
                m.peer_fetched_bytes.clone(),
            );
            r.register(
                "peer_fetched_chunks",
                "Chunks fetched from each peer",
                m.peer_fetched_chunks.clone(),
            );
            r.register(
                "peer_failures",
                "Failed fetches from each peer",
                m.peer_failures.clone(),
            );
            r.register(
                "cache_corrupt_files",
                "Cached chunk files found corrupt (and dropped) since start",
                m.cache_corrupt_files.clone(),
            );
            m.store_links.register(r);
            r.register(
                "device_attach_seconds",
                "Phases of kernel block device attaches (handshake, connect, size_visible) and of their reconnects after a restart (handshake, reconfigure)",
                m.device_attach_seconds.clone(),
            );
        }
        m
    }

    /// Tells the metrics which source is the store (the rest are origins and peers).
    pub fn set_store(&self, url: &str) {
        let url = url.trim_end_matches('/').to_string();
        // The store's series exist from the start (at 0), so dashboards and alerts on
        // failure rates have a series before the first failure.
        let label = SourceLabel {
            source: url.clone(),
            class: "store",
        };
        drop(self.fetch_failures.get_or_create(&label));
        drop(self.verify_failures.get_or_create(&label));
        drop(self.bytes_fetched.get_or_create(&label));
        drop(self.chunks_fetched.get_or_create(&label));
        let _ = self.store_url.set(url);
    }

    fn class_of(&self, source: &str) -> &'static str {
        if source == "peers" || source == lazyblk_cache::source::PEER_CACHES {
            "peer"
        } else if self.store_url.get().is_some_and(|s| s == source) {
            "store"
        } else {
            "origin"
        }
    }

    /// Sets the per-peer series from the peers' counts (at scrape time).
    pub fn set_peer_stats(
        &self,
        stats: &std::collections::BTreeMap<String, lazyblk_cache::PeerStats>,
    ) {
        self.peer_bytes_received
            .set(stats.values().map(|st| st.bytes).sum());
        for (peer, st) in stats {
            let label = PeerLabel { peer: peer.clone() };
            self.peer_fetched_bytes.get_or_create(&label).set(st.bytes);
            self.peer_fetched_chunks
                .get_or_create(&label)
                .set(st.chunks);
            self.peer_failures.get_or_create(&label).set(st.failures);
        }
    }

    /// One chunk served to a peer.
    pub fn peer_served(&self, bytes: u64) {
        self.peer_chunks_served.inc();
        self.peer_bytes_served.inc_by(bytes);
    }

    /// A piece of a chunk body handed to a peer's connection.
    pub fn peer_bytes_sent(&self, bytes: u64) {
        self.peer_bytes_sent.inc_by(bytes);
    }

    /// Records one finished request of a frontend; `command` is the NBD command's name,
    /// or `fuse_read` / `fuse_write` for the FUSE files. No allocation once a label
    /// has been seen.
    pub fn nbd_request(&self, command: &'static str, bytes: u64, elapsed: Duration, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.nbd_requests
            .get_or_create(&CommandLabel { command, result })
            .inc();
        let only = CommandOnly { command };
        self.nbd_seconds
            .get_or_create(&only)
            .observe(elapsed.as_secs_f64());
        if bytes > 0 {
            self.nbd_bytes.get_or_create(&only).inc_by(bytes);
        }
    }

    /// Records one phase of a kernel device attach or reconnect.
    pub fn device_attach_phase(&self, phase: &'static str, elapsed: Duration) {
        self.device_attach_seconds
            .get_or_create(&PhaseLabel { phase })
            .observe(elapsed.as_secs_f64());
    }

    /// Bytes fetched for `template`, by source.
    pub fn template_bytes(&self, template: &str) -> TemplateBytes {
        self.per_template.get(template)
    }

    fn with_template(&self, template: &str, f: impl FnOnce(&mut TemplateBytes)) {
        self.per_template.update(template, f);
    }
}

impl DaemonMetrics {
    /// Bytes of a cached read spliced into a client's socket.
    pub fn spliced(&self, bytes: u64) {
        self.spliced_bytes.inc_by(bytes);
    }
}

impl FetchObserver for DaemonMetrics {
    fn hit(&self, _template: &str) {
        self.hits.inc();
    }

    fn miss(&self, _template: &str) {
        self.misses.inc();
    }

    fn read_budget_spent(&self, _template: &str) {
        self.read_budget_spent.inc();
    }

    fn served_before_verified(&self, _template: &str) {
        self.served_before_verified.inc();
    }

    fn fetched(&self, chunk: &ChunkRef, source: &str, stored: u64, elapsed: Duration) {
        let label = SourceLabel {
            source: source.to_string(),
            class: self.class_of(source),
        };
        self.bytes_fetched.get_or_create(&label).inc_by(chunk.len);
        self.stored_bytes_fetched
            .get_or_create(&label)
            .inc_by(stored);
        self.chunks_fetched.get_or_create(&label).inc();
        self.fetch_seconds
            .get_or_create(&label)
            .observe(elapsed.as_secs_f64());
        self.with_template(&chunk.template, |t| {
            *t.by_source.entry(source.to_string()).or_default() += chunk.len;
        });
    }

    fn fetched_blocks(&self, chunk: &ChunkRef, source: &str, raw: u64, stored: u64, _: Duration) {
        let label = SourceLabel {
            source: source.to_string(),
            class: self.class_of(source),
        };
        self.bytes_fetched.get_or_create(&label).inc_by(raw);
        self.stored_bytes_fetched
            .get_or_create(&label)
            .inc_by(stored);
        self.blocks_fetched.get_or_create(&label).inc();
        self.with_template(&chunk.template, |t| {
            *t.by_source.entry(source.to_string()).or_default() += raw;
        });
    }

    fn source_failed(&self, chunk: &ChunkRef, source: &str, error: &SourceError) {
        self.fetch_failures
            .get_or_create(&SourceLabel {
                source: source.to_string(),
                class: self.class_of(source),
            })
            .inc();
        self.with_template(&chunk.template, |t| t.last_error = Some(error.to_string()));
    }

    fn corrupt(&self, chunk: &ChunkRef, source: &str) {
        self.verify_failures
            .get_or_create(&SourceLabel {
                source: source.to_string(),
                class: self.class_of(source),
            })
            .inc();
        self.with_template(&chunk.template, |t| {
            t.corrupt += 1;
            t.last_error = Some(format!(
                "chunk {} from {source} did not match its digest",
                chunk.index
            ));
        });
    }
}
