//! The store link gauges (`lazyblk_store_request_seconds`,
//! `lazyblk_store_prefers_whole_chunks`): what a request to each store takes, as the
//! chunk cache measures it (`lazyblk_cache::link`), set at each scrape.

use lazyblk_cache::source::Source;
use prometheus_client::encoding::EncodeLabelSet;

use super::counters::DaemonMetrics;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreLabel {
    pub store: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreRequestLabel {
    pub store: String,
    pub kind: &'static str,
}

impl DaemonMetrics {
    /// Sets the store link gauges from each store source's measured request times.
    pub fn set_store_links(&self, sources: &[Source]) {
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
                    self.store_request_seconds
                        .get_or_create(&label)
                        .set(seconds);
                }
            }
            self.store_prefers_whole_chunks
                .get_or_create(&StoreLabel { store })
                .set(i64::from(link.whole_is_cheaper()));
        }
    }
}
