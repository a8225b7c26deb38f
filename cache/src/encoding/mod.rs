//! How a chunk is stored (DESIGN.md section 4, format 2): its raw bytes, or one zstd
//! frame of them when that is smaller. Its name is the sha256 of the raw bytes either
//! way, so dedup, keys and verification do not depend on the encoding.
//!
//! A stored chunk says how it is encoded by its first bytes: a zstd frame begins with
//! zstd's magic number. A raw chunk may begin with the same four bytes (a `.zst` file in
//! the image, aligned to a chunk), and a format-1 store holds such chunks raw; the
//! digest tells the two apart, so verification decides, never the guess. Decoding is
//! bounded by the chunk's size: a frame that would decode past it (a zstd bomb) is
//! refused without allocating more than that size.
//!
//! Where it happens: publish, commit uploads and resize encode ([`encode`]); the fetch
//! planner decodes and verifies what any transport brought ([`decode`]); the store
//! verifies uploads and scrubs with [`StoredVerifier`], which streams. The node's cache
//! keeps chunks decoded (see the crate header), and in a fleet also the stored form of
//! those it fetched from the store, which it serves to peers as it came
//! ([`crate::chunk_store::StoredForm`]).//!
//! Layout: this file, the encodings, encode and decode; [`verifier`], the streaming
//! check of a stored chunk.

#[cfg(test)]
mod tests;
mod verifier;

pub use verifier::StoredVerifier;

use std::borrow::Cow;

use bytes::Bytes;
use serde::Serialize;

use crate::blocks::WINDOW_LOG_MAX;
use crate::digest::Digest;

/// zstd's level for chunks: level 3 (zstd's default) compresses a root file system
/// about 2.5x at several hundred MB/s per core; higher levels cost the publisher far more
/// for a few percent.
pub const ZSTD_LEVEL: i32 = 3;

/// The first bytes of every zstd frame.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xB5, 0x2F, 0xFD];

/// A stored chunk's encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    Raw,
    /// One zstd frame of the whole chunk (format 2).
    Zstd,
    /// A zstd frame per block, after a table of their sizes (format 3, [`crate::blocks`]).
    Blocks,
}

impl Encoding {
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Raw => "raw",
            Encoding::Zstd => "zstd",
            Encoding::Blocks => "zstd-blocks",
        }
    }

    /// The encoding named `name` ([`Encoding::as_str`]'s names).
    pub fn parse(name: &str) -> Option<Encoding> {
        [Encoding::Raw, Encoding::Zstd, Encoding::Blocks]
            .into_iter()
            .find(|e| e.as_str() == name)
    }

    /// Whether `stored` begins as a stored form in this encoding does (its magic
    /// number; raw bytes may begin with anything).
    pub fn begins(self, stored: &[u8]) -> bool {
        match self {
            Encoding::Raw => true,
            Encoding::Zstd => stored.starts_with(&ZSTD_MAGIC),
            Encoding::Blocks => stored.starts_with(&crate::blocks::BLOCKS_MAGIC),
        }
    }
}

/// The stored form of a chunk's raw bytes: a zstd frame per block of
/// [`crate::blocks::STORED_BLOCK`] bytes when that is smaller, so readers can fetch part
/// of it, the raw bytes when it is not (already compressed or random data). Each thread
/// keeps one compression context.
pub fn encode(raw: &[u8]) -> (Encoding, Cow<'_, [u8]>) {
    thread_local! {
        static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    let blocks = COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.is_none() {
            *c = zstd::bulk::Compressor::new(ZSTD_LEVEL).ok();
        }
        c.as_mut()
            .and_then(|c| crate::blocks::encode_blocks(raw, c))
    });
    match blocks {
        Some(stored) => (Encoding::Blocks, Cow::Owned(stored)),
        None => (Encoding::Raw, Cow::Borrowed(raw)),
    }
}

/// One zstd frame of the whole chunk when that is smaller (format 2's stored form, which
/// every reader still decodes), for tests and tools that write format-2 stores.
pub fn encode_frame(raw: &[u8]) -> (Encoding, Cow<'_, [u8]>) {
    let mut frame = Vec::with_capacity(raw.len().saturating_sub(1));
    let compressed = zstd::bulk::Compressor::new(ZSTD_LEVEL)
        .is_ok_and(|mut c| c.compress_to_buffer(raw, &mut frame).is_ok());
    if compressed && frame.len() < raw.len() {
        (Encoding::Zstd, Cow::Owned(frame))
    } else {
        (Encoding::Raw, Cow::Borrowed(raw))
    }
}

/// Why stored bytes are not the chunk they are named for.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// A zstd frame that decodes to more than the chunk's size (or is not a valid frame),
    /// and the bytes are not the raw chunk either.
    #[error(
        "{stored} stored bytes (zstd) that do not decode to the chunk's {len} bytes ({detail})"
    )]
    BadFrame {
        stored: usize,
        len: usize,
        detail: String,
    },
    /// Raw bytes of the wrong length.
    #[error("{stored} bytes stored, the chunk is {len} bytes")]
    Length { stored: usize, len: usize },
    /// A chunk in blocks whose bytes end before (or run past) the length its table
    /// gives: cut short or padded on the way.
    #[error("{stored} bytes of a chunk in blocks whose table adds up to {expected}")]
    Truncated { stored: usize, expected: u64 },
    /// The bytes (decoded where they were a frame) hash to another digest.
    #[error("digest mismatch: the bytes hash to {actual}")]
    Mismatch { actual: Digest },
    /// No decoder could be made (out of memory): nothing is known of the bytes.
    #[error("cannot decode: {0}")]
    Unavailable(String),
}

/// Decodes and verifies the stored bytes of a chunk of `len` raw bytes named `digest`:
/// the raw bytes, or why they are not the chunk. Allocates at most `len`, whatever a
/// frame's header claims.
pub fn decode(
    stored: Bytes,
    len: usize,
    digest: &Digest,
) -> Result<(Encoding, Bytes), DecodeError> {
    let mut frame_error = None;
    if stored.starts_with(&crate::blocks::BLOCKS_MAGIC) {
        let table = crate::blocks::BlockTable::parse(&stored, Some(len as u64), len as u64);
        if let Ok(table) = &table {
            if table.stored_len() != stored.len() as u64 && Digest::of(&stored) != *digest {
                return Err(DecodeError::Truncated {
                    stored: stored.len(),
                    expected: table.stored_len(),
                });
            }
        }
        let decoded = table.and_then(|table| {
            with_decompressor(|d| crate::blocks::decode_blocks(&stored, &table, len, d))
        });
        match decoded {
            Ok(raw) => {
                let actual = Digest::of(&raw);
                if actual == *digest {
                    return Ok((Encoding::Blocks, crate::buffers::into_bytes(raw)));
                }
                frame_error = Some(DecodeError::Mismatch { actual });
            }
            Err(detail) => {
                frame_error = Some(DecodeError::BadFrame {
                    stored: stored.len(),
                    len,
                    detail,
                })
            }
        }
    }
    // A stored frame is exactly one frame, smaller than its chunk: what the store
    // accepts (see `StoredVerifier`), so both ends agree on every body.
    let one_frame = stored.starts_with(&ZSTD_MAGIC)
        && stored.len() < len
        && zstd::zstd_safe::find_frame_compressed_size(&stored) == Ok(stored.len());
    if stored.starts_with(&ZSTD_MAGIC) && !one_frame {
        frame_error = Some(DecodeError::BadFrame {
            stored: stored.len(),
            len,
            detail: "not one frame smaller than the chunk".into(),
        });
    }
    if one_frame {
        match decompress(&stored, len) {
            Ok(raw) if raw.len() == len => {
                let actual = Digest::of(&raw);
                if actual == *digest {
                    return Ok((Encoding::Zstd, crate::buffers::into_bytes(raw)));
                }
                frame_error = Some(DecodeError::Mismatch { actual });
            }
            Ok(raw) => {
                frame_error = Some(DecodeError::BadFrame {
                    stored: stored.len(),
                    len,
                    detail: format!("it decodes to {} bytes", raw.len()),
                })
            }
            Err(e) => {
                frame_error = Some(DecodeError::BadFrame {
                    stored: stored.len(),
                    len,
                    detail: e.to_string(),
                })
            }
        }
    }
    // Raw bytes, or a raw chunk that happens to begin with zstd's magic.
    if stored.len() != len {
        return Err(frame_error.unwrap_or(DecodeError::Length {
            stored: stored.len(),
            len,
        }));
    }
    let actual = Digest::of(&stored);
    if actual == *digest {
        return Ok((Encoding::Raw, stored));
    }
    Err(frame_error.unwrap_or(DecodeError::Mismatch { actual }))
}

/// Runs `f` with this thread's decompression context (windows up to
/// [`WINDOW_LOG_MAX`]).
pub(crate) fn with_decompressor<T>(
    f: impl FnOnce(&mut zstd::bulk::Decompressor<'static>) -> Result<T, String>,
) -> Result<T, String> {
    thread_local! {
        static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    DECOMPRESSOR.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            let mut decompressor = zstd::bulk::Decompressor::new().map_err(|e| e.to_string())?;
            decompressor
                .set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(WINDOW_LOG_MAX))
                .map_err(|e| e.to_string())?;
            *d = Some(decompressor);
        }
        match d.as_mut() {
            Some(d) => f(d),
            None => Err("no zstd context".into()),
        }
    })
}

/// Decodes one frame into at most `len` bytes, with this thread's context.
fn decompress(frame: &[u8], len: usize) -> std::io::Result<Vec<u8>> {
    with_decompressor(|d| {
        let mut out = crate::buffers::take_filled(len);
        let n = d
            .decompress_to_buffer(frame, &mut out[..])
            .map_err(|e| e.to_string())?;
        out.truncate(n);
        Ok(out)
    })
    .map_err(std::io::Error::other)
}
