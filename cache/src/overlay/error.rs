//! Why an overlay operation failed: [`OverlayError`], each variant naming the sandbox
//! or the path, and the OS error behind an I/O failure.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use crate::image::ReadError;
use crate::manifest::{ManifestError, BLOCK_SIZE};

/// Why an overlay operation failed. Every variant names the sandbox or the path.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    /// The request reaches past the end of the device (EINVAL for a read, ENOSPC for a
    /// write, by NBD's rules).
    #[error("sandbox {sandbox}: {op} of {len} bytes at offset {offset} passes the end of the overlay ({size} bytes)")]
    OutOfRange {
        sandbox: Arc<str>,
        op: &'static str,
        offset: u64,
        len: u64,
        size: u64,
    },
    /// A chunk index past the template's last chunk.
    #[error("sandbox {sandbox}: chunk {index} does not exist (the template has {count})")]
    NoSuchChunk {
        sandbox: Arc<str>,
        index: usize,
        count: usize,
    },
    /// A file of the overlay failed.
    #[error("sandbox {sandbox}: {op} at offset {offset} of {path}: {source}")]
    Io {
        sandbox: Arc<str>,
        op: &'static str,
        offset: u64,
        path: PathBuf,
        source: io::Error,
    },
    /// The template's bytes under the overlay could not be read (fetch failed).
    #[error("sandbox {sandbox}: reading template {template} at offset {offset}: {source}")]
    Base {
        sandbox: Arc<str>,
        template: Arc<str>,
        offset: u64,
        source: ReadError,
    },
    /// The overlay was made over another template (or one of another size).
    #[error("overlay {path} of sandbox {sandbox} is over template {found_template} ({found_size} bytes), not {template} ({size} bytes)")]
    MetaMismatch {
        sandbox: Arc<str>,
        path: PathBuf,
        found_template: String,
        found_size: u64,
        template: Arc<str>,
        size: u64,
    },
    /// A file of the overlay does not hold what this format writes.
    #[error("overlay file {path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    /// `create` found a complete overlay in the directory already.
    #[error("sandbox {sandbox}: an overlay already exists at {path}")]
    Exists { sandbox: Arc<str>, path: PathBuf },
    /// The template's size is not whole blocks (a manifest that skipped validation).
    #[error("template {template}: size {size} is not a multiple of {BLOCK_SIZE}")]
    UnalignedTemplate { template: Arc<str>, size: u64 },
    /// An earlier `fdatasync` failed: writes since the flush before it may be lost.
    #[error("sandbox {sandbox}: an earlier sync of {path} failed, so no flush can promise durability; recreate the overlay")]
    SyncFailed { sandbox: Arc<str>, path: PathBuf },
    /// A blocking task of the overlay did not finish (the runtime is shutting down).
    #[error("sandbox {sandbox}: {op} did not finish: {detail}")]
    Interrupted {
        sandbox: Arc<str>,
        op: &'static str,
        detail: String,
    },
    /// The sandbox id is not a valid id.
    #[error(transparent)]
    InvalidSandbox(#[from] ManifestError),
}

impl OverlayError {
    /// The OS error code behind an I/O failure (ENOSPC, EIO, ...), for a frontend that
    /// passes it on.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            OverlayError::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}
