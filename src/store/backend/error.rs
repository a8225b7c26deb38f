//! What a store operation answers: the errors the API maps to HTTP statuses, and what
//! a put did.

use std::io;
use std::path::PathBuf;

use lazyblk_cache::{Digest, ManifestError};

use crate::trust::TrustError;

/// Why a store operation failed; the API maps each variant to an HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// No manifest is stored under this id.
    #[error("unknown template {0}")]
    UnknownTemplate(String),
    /// No trace is stored for this template.
    #[error("no trace recorded for template {0}")]
    NoTrace(String),
    /// A manifest (or id) that breaks the format's rules.
    #[error(transparent)]
    InvalidManifest(#[from] ManifestError),
    /// A different manifest already has this id; manifests are immutable.
    #[error(
        "template {template} already exists with other content ({detail}); publish under a new id"
    )]
    Conflict { template: String, detail: String },
    /// A trace document that does not parse or names chunks the template lacks.
    #[error("invalid trace for template {template}: {reason}")]
    InvalidTrace { template: String, reason: String },
    /// The uploaded bytes (decoded, when they are a zstd frame) do not hash to the
    /// digest they were sent under.
    #[error("the body is not chunk {expected}: {detail}")]
    DigestMismatch { expected: Digest, detail: String },
    /// A manifest's signature that is malformed or not of the manifest's bytes.
    #[error(transparent)]
    Signature(#[from] TrustError),
    /// A body larger than its limit.
    #[error("{what} exceeds {limit} bytes")]
    TooLarge { what: String, limit: u64 },
    /// The client's body could not be read to its end.
    #[error("reading the body of {what}: {detail}")]
    Body { what: String, detail: String },
    /// A stored manifest that no longer parses (disk corruption or a hand edit).
    #[error("stored manifest {path} is unreadable: {source}")]
    Corrupt {
        path: PathBuf,
        source: ManifestError,
    },
    /// A file operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// An object storage request failed (after the client's own retries).
    #[error("{op} {key} in object storage: {source}")]
    Object {
        op: &'static str,
        key: String,
        source: object_store::Error,
    },
    /// A byte range that starts at or past the end of the chunk.
    #[error("chunk {digest} is {len} bytes; range {start}.. is past its end")]
    Unsatisfiable {
        digest: Digest,
        len: u64,
        start: u64,
    },
    /// A `--backend` URL that cannot be used.
    #[error("backend {url}: {reason}")]
    Config { url: String, reason: String },
    /// A control-plane document kept changing under this server's updates.
    #[error("{doc} changed under {attempts} tries to update it (other store servers writing it); try again")]
    Contended { doc: String, attempts: u32 },
    /// A gc could not run (another runs through another store process) or stopped
    /// (it lost its marker to another).
    #[error("{0}")]
    GcRunning(String),
    /// A blocking task died (a panic in disk code).
    #[error("store task failed: {0}")]
    Task(String),
}

/// What `put_manifest` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ManifestPut {
    Created,
    /// A manifest with the same content was already stored.
    Unchanged,
}

/// What `put_chunk` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkPut {
    /// Verified and stored; the chunk's length.
    Stored(u64),
    /// The store already had it; nothing was written.
    Present,
}
