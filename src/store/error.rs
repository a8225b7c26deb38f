//! What the store's clients (over HTTP, or on an object store directly) report: their
//! errors, a manifest as read, and a publish's outcome.

use lazyblk_cache::{Manifest, ManifestError};

use crate::trust::{ManifestSignature, TrustError};

/// Why a store request failed; each variant names the store and what was asked.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No HTTP answer (refused, reset, timed out).
    #[error("store {url} unreachable: {detail} (is `lazyblk store` running there?)")]
    Unreachable { url: String, detail: String },
    /// The store answered with an error status.
    #[error("store {url}: HTTP {status} for {what}: {detail}")]
    Http {
        url: String,
        status: u16,
        what: String,
        detail: String,
    },
    /// A manifest with this id and other content is already published.
    #[error("store refused template {template}: {detail}")]
    Conflict { template: String, detail: String },
    /// The stored manifest does not parse or break the format's rules.
    #[error("malformed manifest for template {template} from {url}: {source}")]
    MalformedManifest {
        template: String,
        url: String,
        source: ManifestError,
    },
    /// Another answer that is not what the API promises.
    #[error("store {url}: unreadable answer for {what}: {detail}")]
    Malformed {
        url: String,
        what: String,
        detail: String,
    },
    /// An object store read directly failed.
    #[error("object store {url}: {detail}")]
    Object { url: String, detail: String },
    /// The operation needs a store server (membership, gc, scrub over HTTP).
    #[error("{what} needs a store server (http://), not an object store ({url})")]
    NeedsServer { what: String, url: String },
    /// A template id outside `[a-z0-9][a-z0-9._-]{0,127}` (checked before any request).
    #[error(transparent)]
    InvalidId(#[from] ManifestError),
}

/// What `put_manifest` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutOutcome {
    /// The manifest is new.
    Created,
    /// The store already had a manifest with the same content.
    Unchanged,
}

/// The manifest of `id` in `bytes` read from the store at `url`, however it was reached.
pub(crate) fn parse_manifest(bytes: &[u8], id: &str, url: &str) -> Result<Manifest, StoreError> {
    Manifest::parse(bytes, Some(id)).map_err(|source| StoreError::MalformedManifest {
        template: id.to_string(),
        url: url.to_string(),
        source,
    })
}

/// A manifest as the store keeps it: parsed, its exact bytes, and its signature (an
/// error when the one stored is malformed, so a reader can say so).
pub struct SignedManifest {
    pub manifest: Manifest,
    pub bytes: Vec<u8>,
    pub signature: Result<Option<ManifestSignature>, TrustError>,
}
