//! The label sets of the daemon's Prometheus series and the buckets of its histograms.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

/// The label of a chunk source in the per-source series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    pub source: String,
    /// "store", "origin" or "peer".
    pub class: &'static str,
}

/// The label of a peer in the per-peer series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabel {
    pub peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TemplateLabel {
    pub template: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CommandLabel {
    /// Static strings: building a label costs no allocation on the hot path.
    pub command: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CommandOnly {
    pub command: &'static str,
}

/// The label of a kernel device attach's phase (handshake, connect, size_visible,
/// reconfigure).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    pub phase: &'static str,
}

pub(super) fn attach_histogram() -> Histogram {
    // 1 ms to ~65 s: a handshake on a warm node takes milliseconds, a connect hundreds
    // of them on many-core hosts, a wave of attaches queued behind each other seconds.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

pub(super) fn latency_histogram() -> Histogram {
    // 50 µs to ~26 s: cached reads land in the first buckets, remote fetches in the last.
    Histogram::new(exponential_buckets(0.00005, 2.0, 20))
}
