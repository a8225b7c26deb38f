//! The store link gauges (`lazyblk_store_request_seconds`,
//! `lazyblk_store_prefers_whole_chunks`): what a request to each store takes, as the
//! chunk cache measures it (`lazyblk_cache::link`), set at each scrape.

use std::sync::atomic::AtomicU64;

use lazyblk_cache::source::Source;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreLabel {
    pub store: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreRequestLabel {
    pub store: String,
    pub kind: &'static str,
}

/// The gauges of every store source's link.
#[derive(Default)]
pub struct StoreLinks {
    request_seconds: Family<StoreRequestLabel, Gauge<f64, AtomicU64>>,
    prefers_whole_chunks: Family<StoreLabel, Gauge>,
}

impl StoreLinks {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "store_request_seconds",
            "Mean time of a request to each store, from the request to its last byte: kind=small (a range of at most 64 KiB: about the link's latency) or kind=whole (a whole chunk); absent until measured",
            self.request_seconds.clone(),
        );
        r.register(
            "store_prefers_whole_chunks",
            "1 while a chunk's first read fetches it whole from the store instead of its table and blocks, because a whole chunk takes at most two small ranges there (a store tens of milliseconds away)",
            self.prefers_whole_chunks.clone(),
        );
    }

    /// Sets the gauges from each store source's measured request times.
    pub fn set(&self, sources: &[Source]) {
        for source in sources {
            let Some(link) = source.link() else { continue };
            let store = source.name().to_string();
            let now = link.snapshot();
            for (kind, seconds) in [("small", now.small), ("whole", now.whole)] {
                if let Some(seconds) = seconds {
                    let label = StoreRequestLabel {
                        store: store.clone(),
                        kind,
                    };
                    self.request_seconds.get_or_create(&label).set(seconds);
                }
            }
            self.prefers_whole_chunks
                .get_or_create(&StoreLabel { store })
                .set(i64::from(link.whole_is_cheaper(false)));
        }
    }
}
