//! The manifest: the JSON description of one template (DESIGN.md section 4). Its
//! block index is [`crate::block_index`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use crate::block_index::{BlockIndex, PAGE_BYTES};
use crate::digest::Digest;

/// The manifest format this code writes: 3, whose chunks may be stored as one zstd
/// frame (format 2) or a frame per block ([`crate::blocks`]), and which may carry a
/// [`BlockIndex`]. It reads 1 (every chunk raw), 2 and 3.
pub const MANIFEST_FORMAT: u32 = 3;
/// The format of a manifest whose chunks are all stored raw (`publish --no-compress`),
/// which builds before format 2 can read.
pub const MANIFEST_FORMAT_RAW: u32 = 1;
/// The default chunk size: large enough that a 10 GiB template has 10k chunks, small
/// enough that a 4 KiB read on a cold node fetches little more than it needs.
pub const DEFAULT_CHUNK_SIZE: u32 = 1 << 20;
/// Chunk sizes allowed: powers of two in [64 KiB, 16 MiB].
pub const MIN_CHUNK_SIZE: u32 = 64 << 10;
pub const MAX_CHUNK_SIZE: u32 = 16 << 20;
/// Template sizes are whole 4 KiB blocks (the ext4 block size and the overlay granularity).
pub const BLOCK_SIZE: u64 = 4096;
/// The largest template accepted (16 TiB); bounds `chunks` so a hostile manifest cannot
/// make a node allocate without limit.
pub const MAX_TEMPLATE_SIZE: u64 = 16 << 40;
/// Longest template id (DESIGN.md section 2).
const MAX_ID_LEN: usize = 128;

/// Why a manifest, id or size was refused.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The bytes are not a manifest.
    #[error("malformed manifest{}: {source}", context(.template))]
    Malformed {
        template: Option<String>,
        source: serde_json::Error,
    },
    /// The manifest parsed but breaks a rule of format 1.
    #[error("invalid manifest for template {template:?}: {reason}")]
    Invalid { template: String, reason: String },
    /// A template or sandbox id outside `[a-z0-9][a-z0-9._-]{0,127}`.
    #[error("invalid id {0:?}: ids are 1 to 128 of [a-z0-9._-], starting with [a-z0-9]")]
    InvalidId(String),
}

fn context(template: &Option<String>) -> String {
    template
        .as_ref()
        .map(|t| format!(" for template {t:?}"))
        .unwrap_or_default()
}

/// One template's description. Immutable once published.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub template: String,
    /// Bytes; a multiple of [`BLOCK_SIZE`].
    pub size: u64,
    pub chunk_size: u32,
    /// The digest of every chunk, `None` for an all-zero chunk (never stored).
    pub chunks: Vec<Option<Digest>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Node daemons (base URLs) that hold every chunk; tried before the store.
    #[serde(default)]
    pub origins: Vec<String>,
    #[serde(default)]
    pub created_at: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The sha256 of every block of every chunk, so a reader can fetch and verify part
    /// of a chunk; absent, reads fetch whole chunks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocks: Option<BlockIndex>,
}

impl Manifest {
    /// An identity of the bytes this manifest describes: the first 8 bytes of
    /// [`Manifest::content_digest`]. Two manifests with equal ids describe equal bytes; a
    /// template deleted and published again under its id with other bytes gets another.
    pub fn content_id(&self) -> u64 {
        let digest = self.content_digest();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest.as_bytes()[..8]);
        u64::from_le_bytes(first)
    }
}

/// Checks a template or sandbox id against `[a-z0-9][a-z0-9._-]{0,127}`.
pub fn validate_id(id: &str) -> Result<(), ManifestError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ManifestError::InvalidId(id.chars().take(160).collect()))
    }
}

/// Checks a chunk size: a power of two in [64 KiB, 16 MiB].
pub fn validate_chunk_size(chunk_size: u64) -> Result<(), String> {
    if chunk_size.is_power_of_two()
        && (MIN_CHUNK_SIZE as u64..=MAX_CHUNK_SIZE as u64).contains(&chunk_size)
    {
        Ok(())
    } else {
        Err(format!(
            "chunk size {chunk_size} must be a power of two from 64 KiB to 16 MiB"
        ))
    }
}

impl Manifest {
    /// A manifest for `size` bytes with all chunks zero; callers fill `chunks`.
    pub fn new(template: &str, size: u64, chunk_size: u32) -> Manifest {
        let count = size.div_ceil(chunk_size as u64) as usize;
        Manifest {
            format: MANIFEST_FORMAT,
            template: template.to_string(),
            size,
            chunk_size,
            chunks: vec![None; count],
            parent: None,
            origins: Vec::new(),
            created_at: String::new(),
            labels: BTreeMap::new(),
            blocks: None,
        }
    }

    /// Parses and validates a manifest. `expected` names the template the caller asked
    /// for, so a manifest stored under the wrong name is refused.
    pub fn parse(bytes: &[u8], expected: Option<&str>) -> Result<Manifest, ManifestError> {
        let manifest: Manifest =
            serde_json::from_slice(bytes).map_err(|source| ManifestError::Malformed {
                template: expected.map(str::to_string),
                source,
            })?;
        manifest.validate()?;
        if let Some(expected) = expected {
            if manifest.template != expected {
                return Err(manifest.invalid(format!(
                    "manifest names template {:?}, expected {expected:?}",
                    manifest.template
                )));
            }
        }
        Ok(manifest)
    }

    /// Serialized form, pretty-printed (manifests are read by people too).
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec_pretty(self).unwrap_or_default();
        out.push(b'\n');
        out
    }

    /// Checks every rule of formats 1 to 3 (1 and 2 differ in how chunks are stored, not
    /// in the manifest; 3 may add a block index).
    pub fn validate(&self) -> Result<(), ManifestError> {
        validate_id(&self.template)?;
        if !(MANIFEST_FORMAT_RAW..=MANIFEST_FORMAT).contains(&self.format) {
            return Err(self.invalid(format!(
                "format {} is not supported (this build reads formats {MANIFEST_FORMAT_RAW} to {MANIFEST_FORMAT})",
                self.format
            )));
        }
        if self.size == 0 || !self.size.is_multiple_of(BLOCK_SIZE) || self.size > MAX_TEMPLATE_SIZE
        {
            return Err(self.invalid(format!(
                "size {} must be a non-zero multiple of 4096 up to 16 TiB",
                self.size
            )));
        }
        validate_chunk_size(self.chunk_size as u64).map_err(|r| self.invalid(r))?;
        let expected = self.size.div_ceil(self.chunk_size as u64);
        if self.chunks.len() as u64 != expected {
            return Err(self.invalid(format!(
                "{} chunks listed, size {} at chunk size {} needs {expected}",
                self.chunks.len(),
                self.size,
                self.chunk_size
            )));
        }
        if let Some(parent) = &self.parent {
            validate_id(parent)?;
        }
        if let Some(blocks) = &self.blocks {
            if self.format < 3 {
                return Err(self.invalid("a block index needs format 3".into()));
            }
            blocks
                .check(self.chunk_size, self.chunks.len(), BLOCK_SIZE as u32)
                .map_err(|r| self.invalid(r))?;
        }
        Ok(())
    }

    /// Checks the labels against [`crate::labels`]: for a manifest being published, not
    /// one being read (a store's older manifests stay readable).
    pub fn validate_labels(&self) -> Result<(), ManifestError> {
        crate::labels::validate_labels(self.labels.iter()).map_err(|r| self.invalid(r))
    }

    fn invalid(&self, reason: String) -> ManifestError {
        ManifestError::Invalid {
            template: self.template.clone(),
            reason,
        }
    }

    /// Number of chunks.
    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    /// Byte length of chunk `index` (the last one may be short).
    pub fn chunk_len(&self, index: usize) -> u64 {
        let start = index as u64 * self.chunk_size as u64;
        (self.size - start).min(self.chunk_size as u64)
    }

    /// Chunks that are not all-zero, with their index.
    pub fn stored_chunks(&self) -> impl Iterator<Item = (usize, Digest)> + '_ {
        self.chunks
            .iter()
            .enumerate()
            .filter_map(|(i, d)| d.map(|d| (i, d)))
    }

    /// Every object the template needs from the store: its non-zero chunks and its
    /// block index's pages (what a store's gc keeps).
    pub fn referenced(&self) -> impl Iterator<Item = Digest> + '_ {
        let pages = self
            .blocks
            .iter()
            .flat_map(|b| b.pages.iter().flatten().copied());
        self.chunks.iter().flatten().copied().chain(pages)
    }

    /// Bytes held by non-zero chunks.
    pub fn stored_bytes(&self) -> u64 {
        self.stored_chunks().map(|(i, _)| self.chunk_len(i)).sum()
    }

    /// A fingerprint of the template's bytes: the sha256 of its size, chunk size and
    /// chunk digests (zero chunks as 32 zero bytes). What a boot trace names to say which
    /// content it was recorded on, so a trace of another template (or of an earlier
    /// template published under the same id and since deleted) is refused, not replayed.
    pub fn content_digest(&self) -> Digest {
        let mut hash = crate::digest::DigestWriter::default();
        hash.update(&self.size.to_le_bytes());
        hash.update(&self.chunk_size.to_le_bytes());
        for chunk in &self.chunks {
            match chunk {
                Some(digest) => hash.update(digest.as_bytes()),
                None => hash.update(&[0u8; 32]),
            }
        }
        hash.finish()
    }

    /// Whether `other` describes the same content (ignores origins and created_at, which
    /// differ between two publishes of the same image).
    pub fn same_content(&self, other: &Manifest) -> bool {
        self.template == other.template
            && self.size == other.size
            && self.chunk_size == other.chunk_size
            && self.chunks == other.chunks
            && self.parent == other.parent
            && self.labels == other.labels
            && self.blocks == other.blocks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        let mut m = Manifest::new("py311", 3 * 1048576 + 8192, DEFAULT_CHUNK_SIZE);
        m.chunks[0] = Some(Digest::of(b"a"));
        m.chunks[3] = Some(Digest::of(b"b"));
        m
    }

    #[test]
    fn round_trips_and_counts() {
        let m = sample();
        let back = Manifest::parse(&m.to_json(), Some("py311")).unwrap();
        assert_eq!(back, m);
        assert_eq!(m.chunk_count(), 4);
        assert_eq!(m.chunk_len(3), 8192);
        assert_eq!(m.stored_bytes(), 1048576 + 8192);
        let json = String::from_utf8(m.to_json()).unwrap();
        assert!(json.contains("null"), "zero chunks are null: {json}");
    }

    #[test]
    fn refuses_broken_manifests() {
        let mut m = sample();
        m.size += 1;
        assert!(m.validate().is_err());
        let mut m = sample();
        m.chunks.pop();
        assert!(m.validate().is_err());
        let mut m = sample();
        m.chunk_size = 3000;
        assert!(m.validate().is_err());
        assert!(Manifest::parse(b"{\"format\":1", None).is_err());
        assert!(Manifest::parse(&sample().to_json(), Some("other")).is_err());
        let err = Manifest::parse(b"[]", Some("x")).unwrap_err().to_string();
        assert!(err.contains("\"x\""), "{err}");
    }

    #[test]
    fn ids() {
        for ok in ["a", "py311", "debian-12.1_x", &"a".repeat(128)] {
            validate_id(ok).unwrap();
        }
        for bad in ["", "-a", "A", "a/b", "a b", &"a".repeat(129), ".."] {
            assert!(validate_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_block_index_locates_entries_and_follows_commits_and_growth() {
        let mut m = Manifest::new("b", 40 << 20, DEFAULT_CHUNK_SIZE);
        let mut index = BlockIndex::layout(m.chunk_size, 8192, m.chunk_count());
        // 128 blocks of 32 bytes per 1 MiB chunk: 8 chunks per 32 KiB page.
        assert_eq!(index.entry_len(m.chunk_size), 4096);
        assert_eq!(index.chunks_per_page, 8);
        assert_eq!(index.pages.len(), 5);
        assert_eq!(index.locate(17, m.chunk_size), (2, 4096));
        assert_eq!(index.page_len(4, m.chunk_count(), m.chunk_size), 8 * 4096);
        for p in &mut index.pages {
            *p = Some(Digest::of(b"page"));
        }
        m.blocks = Some(index.clone());
        m.validate().unwrap();
        let back = Manifest::parse(&m.to_json(), Some("b")).unwrap();
        assert_eq!(back.blocks, m.blocks);
        // A commit that changed chunk 17 drops page 2 only.
        let mut committed = index.clone();
        committed.forget(17);
        assert_eq!(committed.pages.iter().filter(|p| p.is_none()).count(), 1);
        assert!(committed.pages[2].is_none());
        // Growing 40 chunks to 44 keeps the 5 full pages and adds one empty; growing 36
        // chunks to 44 drops the last page, which gains chunks.
        let grown = index.grown(40, 44);
        assert_eq!(grown.pages.len(), 6);
        assert!(grown.pages[..5].iter().all(Option::is_some) && grown.pages[5].is_none());
        let grown = index.grown(36, 44);
        assert!(grown.pages[..4].iter().all(Option::is_some) && grown.pages[4].is_none());
        // A broken index is refused.
        for broken in [
            BlockIndex {
                pages: vec![None; 4],
                ..index.clone()
            },
            BlockIndex {
                block_size: 3000,
                ..index.clone()
            },
            BlockIndex {
                block_size: 2 << 20,
                ..index.clone()
            },
            BlockIndex {
                chunks_per_page: 0,
                ..index.clone()
            },
            BlockIndex {
                chunks_per_page: 1 << 20,
                pages: vec![None; 1],
                ..index.clone()
            },
        ] {
            let mut bad = m.clone();
            bad.blocks = Some(broken);
            assert!(bad.validate().is_err(), "{:?}", bad.blocks);
        }
        let mut old = m.clone();
        old.format = 2;
        assert!(old.validate().is_err(), "an index needs format 3");
    }
}
