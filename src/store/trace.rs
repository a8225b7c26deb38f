//! The trace document (`/v1/templates/{id}/trace`, `traces/<id>.json`): what the store
//! keeps of a template's boot trace, and the checks a trace must pass before it is
//! stored or replayed.

use serde::{Deserialize, Serialize};

/// The recorded prefetch order of a template (`/v1/templates/{id}/trace`).
///
/// Version 1 names chunks only (what a fill fetches first). Version 2
/// ([`TRACE_VERSION`]) adds the byte ranges the boots first read, in order, at block
/// granularity, and the content they were read from (size and
/// [`lazyblk_cache::Manifest::content_digest`]), so a node that opens the template
/// without a replica replays them ([`crate::daemon::replay`]) and refuses a trace of
/// other content. Version 1 documents stay readable; `chunks` is kept in version 2 (the
/// chunks of the ranges, in order) for the fill and for older daemons.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceDoc {
    pub template: String,
    /// Chunk indices in the order the first boots read them.
    pub chunks: Vec<usize>,
    /// 1 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    /// The template's size in bytes when the ranges were recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// The content the ranges were read from (hex sha256).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// `[offset, length]` of each range first read, in order of the first read.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ranges: Vec<[u64; 2]>,
}

/// The version of the trace documents this daemon writes (see [`TraceDoc`]).
pub const TRACE_VERSION: u32 = 2;

/// Ranges a trace may hold: a Debian boot reads about a thousand distinct ranges, so
/// this keeps tens of boots' unions while a document stays under a megabyte (the store
/// accepts JSON bodies up to its own limit).
pub const MAX_TRACE_RANGES: usize = 16384;

/// Why a trace is not replayed (nor stored).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TraceRefusal {
    /// The document names another template.
    #[error("the trace names template {named:?}, not {template:?}")]
    OtherTemplate { template: String, named: String },
    /// The document was recorded on other content.
    #[error("the trace of {template} was recorded on other content ({named}), not this template's ({actual})")]
    OtherContent {
        template: String,
        named: String,
        actual: String,
    },
    /// A chunk index past the template's end.
    #[error("the trace of {template} names chunk {index}, out of range (the template has {count} chunks)")]
    ChunkPastEnd {
        template: String,
        index: usize,
        count: usize,
    },
    /// A range past the template's end (or empty).
    #[error("the trace of {template} names bytes {offset}+{len}, out of range: past the template's end ({size} bytes) or empty")]
    RangePastEnd {
        template: String,
        offset: u64,
        len: u64,
        size: u64,
    },
    /// Too many ranges.
    #[error("the trace of {template} has {count} ranges; at most {MAX_TRACE_RANGES} are kept")]
    TooLarge { template: String, count: usize },
    /// A version this daemon does not know.
    #[error(
        "the trace of {template} is version {version}; this daemon knows 1 and {TRACE_VERSION}"
    )]
    UnknownVersion { template: String, version: u32 },
}

impl TraceDoc {
    /// Checks the document against the template it is for: its id, its content and its
    /// end. Every refusal names what is wrong.
    pub fn check(&self, id: &str, manifest: &lazyblk_cache::Manifest) -> Result<(), TraceRefusal> {
        let template = id.to_string();
        if self.template != id {
            return Err(TraceRefusal::OtherTemplate {
                template,
                named: self.template.clone(),
            });
        }
        let version = self.version.unwrap_or(1);
        if version == 0 || version > TRACE_VERSION {
            return Err(TraceRefusal::UnknownVersion { template, version });
        }
        let count = manifest.chunk_count();
        if let Some(&index) = self.chunks.iter().find(|&&i| i >= count) {
            return Err(TraceRefusal::ChunkPastEnd {
                template,
                index,
                count,
            });
        }
        if self.ranges.len() > MAX_TRACE_RANGES {
            return Err(TraceRefusal::TooLarge {
                template,
                count: self.ranges.len(),
            });
        }
        if let Some(named) = &self.content {
            let actual = manifest.content_digest().to_string();
            if *named != actual || self.size.is_some_and(|s| s != manifest.size) {
                return Err(TraceRefusal::OtherContent {
                    template,
                    named: named.clone(),
                    actual,
                });
            }
        }
        let size = manifest.size;
        if let Some(&[offset, len]) = self
            .ranges
            .iter()
            .find(|[o, l]| *l == 0 || o.checked_add(*l).is_none_or(|end| end > size))
        {
            return Err(TraceRefusal::RangePastEnd {
                template,
                offset,
                len,
                size,
            });
        }
        Ok(())
    }
}
