//! The store's counters (`lazyblk_store_*`): tests read them to prove laziness, so each
//! counts exactly one event per request; and the template center's gauges.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// The store's counters (`lazyblk_store_*`); tests read them to prove laziness, so each
/// counts exactly one event per request.
pub(super) struct StoreMetrics {
    pub(super) registry: Registry,
    pub(super) chunks_served: Counter,
    pub(super) ranges_served: Counter,
    pub(super) bytes_served: Counter,
    pub(super) chunks_uploaded: Counter,
    pub(super) bytes_uploaded: Counter,
    pub(super) digest_mismatch: Counter,
    pub(super) manifests_published: Counter,
    pub(super) http_requests: Family<HttpLabels, Counter>,
    /// The template center's view, set at each scrape.
    pub(super) fleet: FleetGauges,
}

/// The template center's gauges (DESIGN section 10): live nodes, replicas by template
/// and phase, the wishes' targets, STALE templates.
#[derive(Default)]
pub(super) struct FleetGauges {
    pub(super) live_nodes: prometheus_client::metrics::gauge::Gauge,
    pub(super) replicas: Family<ReplicaLabels, prometheus_client::metrics::gauge::Gauge>,
    pub(super) wanted: Family<TemplateOnly, prometheus_client::metrics::gauge::Gauge>,
    pub(super) stale: Family<TemplateOnly, prometheus_client::metrics::gauge::Gauge>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ReplicaLabels {
    pub(super) template: String,
    pub(super) phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct TemplateOnly {
    pub(super) template: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct HttpLabels {
    /// The route pattern (`/v1/chunks/{digest}`), not the path, so digests do not
    /// make one series each.
    pub(super) route: String,
    pub(super) status: u16,
}

impl StoreMetrics {
    pub(super) fn new() -> StoreMetrics {
        let mut registry = Registry::with_prefix("lazyblk_store");
        let mut counter = |name: &str, help: &str| {
            let c = Counter::default();
            registry.register(name, help, c.clone());
            c
        };
        let chunks_served = counter("chunks_served", "Chunks sent in full to GET requests");
        let ranges_served = counter(
            "ranges_served",
            "Byte ranges of chunks sent to GET requests with a Range header (blocks of a chunk)",
        );
        let bytes_served = counter(
            "bytes_served",
            "Bytes of chunks sent to GET requests, whole or ranges",
        );
        let chunks_uploaded = counter("chunks_uploaded", "Chunks verified and newly stored");
        let bytes_uploaded = counter("bytes_uploaded", "Bytes of chunks newly stored");
        let digest_mismatch = counter(
            "digest_mismatch",
            "Chunk uploads refused because the body did not match its digest",
        );
        let manifests_published = counter("manifests_published", "Manifests newly stored");
        let http_requests = Family::<HttpLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by route and status",
            http_requests.clone(),
        );
        let fleet = FleetGauges::default();
        registry.register(
            "live_nodes",
            "Nodes with a live lease",
            fleet.live_nodes.clone(),
        );
        registry.register(
            "replicas",
            "Replicas of each template on live nodes, by phase",
            fleet.replicas.clone(),
        );
        registry.register(
            "replicas_wanted",
            "Live nodes a wish wants each template READY on",
            fleet.wanted.clone(),
        );
        registry.register(
            "template_stale",
            "1 for a template below the label policy",
            fleet.stale.clone(),
        );
        StoreMetrics {
            registry,
            fleet,
            chunks_served,
            ranges_served,
            bytes_served,
            chunks_uploaded,
            bytes_uploaded,
            digest_mismatch,
            manifests_published,
            http_requests,
        }
    }
}
