//! A template's summary as both engines compute it (its durability from which of its
//! chunks are stored), and the summaries kept once a template is DURABLE.

use std::collections::{HashMap, HashSet};

use lazyblk_cache::{Digest, Manifest};

use crate::store::{Durability, TemplateSummary};

/// Summaries of templates found DURABLE, shared by both engines: a durable template
/// stays durable while it exists (gc keeps what a manifest references), so its summary
/// is not computed again until it is deleted.
#[derive(Default)]
pub(crate) struct DurableSummaries(std::sync::Mutex<HashMap<String, TemplateSummary>>);

impl DurableSummaries {
    /// The kept summary of `id`; the caller checks that the template still exists.
    pub(crate) fn get(&self, id: &str) -> Option<TemplateSummary> {
        self.0.lock().ok().and_then(|d| d.get(id).cloned())
    }

    /// Keeps `summary` if it is DURABLE.
    pub(crate) fn keep(&self, id: &str, summary: &TemplateSummary) {
        if summary.durability == Durability::Durable {
            if let Ok(mut durable) = self.0.lock() {
                durable.insert(id.to_string(), summary.clone());
            }
        }
    }

    /// Drops every kept summary (a scrub deleted chunks: a template may no longer be
    /// DURABLE).
    pub(crate) fn clear(&self) {
        if let Ok(mut durable) = self.0.lock() {
            durable.clear();
        }
    }

    /// Drops what was kept of `id` (it was deleted).
    pub(crate) fn forget(&self, id: &str) {
        if let Ok(mut durable) = self.0.lock() {
            durable.remove(id);
        }
    }
}

/// The summary of `manifest`; `is_stored` says whether the store holds a chunk.
pub(super) fn summarize(
    manifest: &Manifest,
    parent: Option<&Manifest>,
    mut is_stored: impl FnMut(&Digest) -> bool,
) -> TemplateSummary {
    let mut present: HashMap<Digest, bool> = HashMap::new();
    let mut present_chunks = 0;
    for (_, digest) in manifest.stored_chunks() {
        let here = *present.entry(digest).or_insert_with(|| is_stored(&digest));
        present_chunks += usize::from(here);
    }
    let stored_chunks = manifest.stored_chunks().count();
    let inherited: HashSet<Digest> = parent
        .map(|p| p.stored_chunks().map(|(_, d)| d).collect())
        .unwrap_or_default();
    let own: Vec<bool> = present
        .iter()
        .filter(|(d, _)| !inherited.contains(d))
        .map(|(_, here)| *here)
        .collect();
    // A template that adds no chunks of its own is as durable as the ones it reuses.
    let judged: Vec<bool> = if own.is_empty() {
        present.values().copied().collect()
    } else {
        own
    };
    let durability = if present_chunks == stored_chunks {
        Durability::Durable
    } else if judged.iter().any(|here| *here) {
        Durability::Uploading
    } else {
        Durability::OriginOnly
    };
    TemplateSummary {
        template: manifest.template.clone(),
        size: manifest.size,
        chunk_size: manifest.chunk_size,
        chunks: manifest.chunk_count(),
        stored_chunks,
        stored_bytes: manifest.stored_bytes(),
        present_chunks,
        parent: manifest.parent.clone(),
        replicas: None,
        stale: false,
        stale_because: None,
        labels: manifest.labels.clone(),
        origins: manifest.origins.clone(),
        created_at: manifest.created_at.clone(),
        durability,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(id: &str, chunks: &[Option<&[u8]>], parent: Option<&str>) -> Manifest {
        let mut m = Manifest::new(id, chunks.len() as u64 * 65536, 65536);
        for (i, c) in chunks.iter().enumerate() {
            m.chunks[i] = c.map(Digest::of);
        }
        m.parent = parent.map(str::to_string);
        m
    }

    #[test]
    fn durability_follows_the_stored_chunks() {
        let mut stored = HashSet::new();
        let parent = manifest("base", &[Some(b"a"), Some(b"b")], None);
        let child = manifest("child", &[Some(b"a"), Some(b"c"), None], Some("base"));
        let sum = |s: &HashSet<Digest>, m: &Manifest, p: Option<&Manifest>| {
            summarize(m, p, |d: &Digest| s.contains(d))
        };
        let d = |s: &HashSet<Digest>, m: &Manifest, p| sum(s, m, p).durability;
        assert_eq!(d(&stored, &child, Some(&parent)), Durability::OriginOnly);
        stored.insert(Digest::of(b"a"));
        // The parent's chunk is there, the child's own one is not.
        assert_eq!(d(&stored, &child, Some(&parent)), Durability::OriginOnly);
        assert_eq!(d(&stored, &parent, None), Durability::Uploading);
        stored.insert(Digest::of(b"c"));
        let s = sum(&stored, &child, Some(&parent));
        assert_eq!(
            (s.durability, s.present_chunks, s.stored_chunks),
            (Durability::Durable, 2, 2)
        );
    }
}
