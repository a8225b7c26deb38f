//! What both engines check before they store a document: a manifest (parsed, its
//! signature, the canonical form), a trace (against its template), and the difference
//! named when another manifest already holds an id.

use lazyblk_cache::Manifest;

use super::error::BackendError;
use crate::store::TraceDoc;
use crate::trust::ManifestSignature;

/// A manifest to store: parsed, and the bytes to keep. A signed manifest is kept
/// exactly as it was signed (its signature checked first); an unsigned one is written
/// in the canonical form, with the time of publication if it has none.
pub(super) fn manifest_to_store(
    id: &str,
    body: &[u8],
    signature: Option<&ManifestSignature>,
) -> Result<(Manifest, Vec<u8>), BackendError> {
    let mut manifest = Manifest::parse(body, Some(id))?;
    if let Some(sig) = signature {
        sig.verify(id, body)?;
        return Ok((manifest, body.to_vec()));
    }
    if manifest.created_at.is_empty() {
        manifest.created_at =
            humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    }
    let bytes = manifest.to_json();
    Ok((manifest, bytes))
}

/// Checks a trace document against its template's manifest; the bytes to store.
pub(super) fn check_trace(
    id: &str,
    manifest: &Manifest,
    body: &[u8],
) -> Result<Vec<u8>, BackendError> {
    let invalid = |reason: String| BackendError::InvalidTrace {
        template: id.to_string(),
        reason,
    };
    let doc: TraceDoc = serde_json::from_slice(body).map_err(|e| invalid(e.to_string()))?;
    doc.check(id, manifest)
        .map_err(|e| invalid(e.to_string()))?;
    serde_json::to_vec(&doc).map_err(|e| invalid(e.to_string()))
}

/// Says how two manifests with one id differ, for the 409 message.
pub(super) fn difference(stored: &Manifest, offered: &Manifest) -> String {
    if stored.size != offered.size {
        return format!("stored size {}, offered {}", stored.size, offered.size);
    }
    if stored.chunk_size != offered.chunk_size {
        return format!(
            "stored chunk size {}, offered {}",
            stored.chunk_size, offered.chunk_size
        );
    }
    if let Some(i) = (0..stored.chunks.len()).find(|&i| stored.chunks[i] != offered.chunks[i]) {
        return format!("chunk {i} differs");
    }
    if stored.parent != offered.parent {
        return format!(
            "stored parent {:?}, offered {:?}",
            stored.parent, offered.parent
        );
    }
    "labels differ".to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use lazyblk_cache::Digest;

    fn manifest(id: &str, chunks: &[Option<&[u8]>]) -> Manifest {
        let mut m = Manifest::new(id, chunks.len() as u64 * 65536, 65536);
        for (i, c) in chunks.iter().enumerate() {
            m.chunks[i] = c.map(Digest::of);
        }
        m
    }

    #[test]
    fn differences_are_named() {
        let a = manifest("t", &[Some(b"a"), Some(b"b")]);
        let b = manifest("t", &[Some(b"a"), Some(b"x")]);
        assert_eq!(difference(&a, &b), "chunk 1 differs");
    }
}
