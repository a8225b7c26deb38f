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
//! keeps chunks decoded (see the crate header).

use std::borrow::Cow;

use bytes::Bytes;
use serde::Serialize;

use crate::digest::{Digest, DigestWriter};

/// zstd's level for chunks: level 3 (zstd's default) compresses a root file system
/// about 2.5x at several hundred MB/s per core; higher levels cost the publisher far more
/// for a few percent.
pub const ZSTD_LEVEL: i32 = 3;

/// The first bytes of every zstd frame.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xB5, 0x2F, 0xFD];

/// The largest window a stored frame may use: 16 MiB, the largest chunk. Both decoders
/// hold to it, so they accept the same frames, and a frame cannot make a decoder
/// allocate a larger window.
const WINDOW_LOG_MAX: u32 = 24;

/// A stored chunk's encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    Raw,
    Zstd,
}

impl Encoding {
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Raw => "raw",
            Encoding::Zstd => "zstd",
        }
    }
}

/// The stored form of a chunk's raw bytes: one zstd frame when that is smaller, the raw
/// bytes when it is not (already compressed or random data). Each thread keeps one
/// compression context, and the frame is written into a buffer no larger than the chunk
/// (a frame that would not fit is not worth keeping).
pub fn encode(raw: &[u8]) -> (Encoding, Cow<'_, [u8]>) {
    thread_local! {
        static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    let mut frame = Vec::with_capacity(raw.len().saturating_sub(1));
    let compressed = COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.is_none() {
            *c = zstd::bulk::Compressor::new(ZSTD_LEVEL).ok();
        }
        c.as_mut()
            .is_some_and(|c| c.compress_to_buffer(raw, &mut frame).is_ok())
    });
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
        "a zstd frame of {stored} bytes that does not decode to the chunk's {len} bytes ({detail})"
    )]
    BadFrame {
        stored: usize,
        len: usize,
        detail: String,
    },
    /// Raw bytes of the wrong length.
    #[error("{stored} bytes stored, the chunk is {len} bytes")]
    Length { stored: usize, len: usize },
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
                    return Ok((Encoding::Zstd, Bytes::from(raw)));
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

/// Decodes one frame into at most `len` bytes, with this thread's context.
fn decompress(frame: &[u8], len: usize) -> std::io::Result<Vec<u8>> {
    thread_local! {
        static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    DECOMPRESSOR.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            let mut decompressor = zstd::bulk::Decompressor::new()?;
            decompressor
                .set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(WINDOW_LOG_MAX))?;
            *d = Some(decompressor);
        }
        let mut out = Vec::with_capacity(len);
        d.as_mut()
            .map_or(Ok(0), |d| d.decompress_to_buffer(frame, &mut out))?;
        Ok(out)
    })
}

/// Verifies a stored chunk as its bytes stream by (an upload to the store, a scrub),
/// without holding it: it hashes the bytes as they come, and when they begin with
/// zstd's magic also decodes them as they come and hashes the output, which may not
/// pass `limit` bytes.
pub struct StoredVerifier {
    limit: u64,
    /// The first bytes, until there are enough to tell a frame.
    head: Vec<u8>,
    stored: DigestWriter,
    stored_len: u64,
    frame: Option<FrameState>,
    /// Set when the bytes began a frame but no decoder could be made.
    unavailable: Option<String>,
}

/// A frame being decoded: its output's hash, or why it is not a frame of the chunk.
struct FrameState {
    decoder: zstd::stream::raw::Decoder<'static>,
    out: Box<[u8]>,
    decoded: DigestWriter,
    decoded_len: u64,
    /// The frame ended (zstd said so): bytes after it make it invalid.
    ended: bool,
    failed: Option<String>,
}

/// Output buffer of a streaming decode.
const DECODE_PIECE: usize = 64 << 10;

impl StoredVerifier {
    /// A verifier for a chunk of at most `limit` raw bytes.
    pub fn new(limit: u64) -> StoredVerifier {
        StoredVerifier {
            limit,
            head: Vec::with_capacity(ZSTD_MAGIC.len()),
            stored: DigestWriter::default(),
            stored_len: 0,
            frame: None,
            unavailable: None,
        }
    }

    /// Stored bytes so far.
    pub fn stored_len(&self) -> u64 {
        self.stored_len
    }

    pub fn update(&mut self, piece: &[u8]) {
        if piece.is_empty() {
            return;
        }
        self.stored.update(piece);
        self.stored_len += piece.len() as u64;
        if self.head.len() < ZSTD_MAGIC.len() {
            let take = (ZSTD_MAGIC.len() - self.head.len()).min(piece.len());
            self.head.extend_from_slice(&piece[..take]);
            if self.head.len() < ZSTD_MAGIC.len() {
                return;
            }
            if self.head == ZSTD_MAGIC {
                self.frame = match FrameState::new() {
                    Ok(frame) => Some(frame),
                    Err(e) => {
                        self.unavailable = Some(e.to_string());
                        None
                    }
                };
                let head = std::mem::take(&mut self.head);
                self.feed(&head);
                self.head = head;
            }
            self.feed(&piece[take..]);
            return;
        }
        self.feed(piece);
    }

    fn feed(&mut self, input: &[u8]) {
        let limit = self.limit;
        if let Some(frame) = &mut self.frame {
            frame.feed(input, limit);
        }
    }

    /// The chunk's encoding if the bytes are the chunk named `digest` (raw bytes of at
    /// most the limit, or a frame of them), with its raw length.
    pub fn finish(mut self, digest: &Digest) -> Result<(Encoding, u64), DecodeError> {
        let limit = self.limit;
        let mut frame_error = None;
        if let Some(mut frame) = self.frame.take() {
            frame.drain(limit);
            if !frame.ended && frame.failed.is_none() {
                frame.failed = Some("the frame is cut short".into());
            }
            if frame.failed.is_none() && self.stored_len >= frame.decoded_len {
                // A frame no smaller than its chunk is never stored (`encode`), and the
                // daemon's transports refuse bodies longer than the chunk.
                frame.failed = Some("the frame is not smaller than the chunk".into());
            }
            match frame.failed {
                None => {
                    let actual = frame.decoded.finish();
                    if actual == *digest {
                        return Ok((Encoding::Zstd, frame.decoded_len));
                    }
                    frame_error = Some(DecodeError::Mismatch { actual });
                }
                Some(detail) => {
                    frame_error = Some(DecodeError::BadFrame {
                        stored: self.stored_len as usize,
                        len: limit as usize,
                        detail,
                    })
                }
            }
        }
        let actual = self.stored.finish();
        if actual == *digest && self.stored_len <= limit {
            return Ok((Encoding::Raw, self.stored_len));
        }
        if let Some(e) = self.unavailable {
            return Err(DecodeError::Unavailable(e));
        }
        Err(frame_error.unwrap_or(DecodeError::Mismatch { actual }))
    }
}

impl FrameState {
    fn new() -> std::io::Result<FrameState> {
        let mut decoder = zstd::stream::raw::Decoder::new()?;
        decoder.set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(WINDOW_LOG_MAX))?;
        Ok(FrameState {
            decoder,
            out: vec![0u8; DECODE_PIECE].into_boxed_slice(),
            decoded: DigestWriter::default(),
            decoded_len: 0,
            ended: false,
            failed: None,
        })
    }

    fn feed(&mut self, mut input: &[u8], limit: u64) {
        use zstd::stream::raw::Operation as _;
        while self.failed.is_none() && !input.is_empty() {
            if self.ended {
                self.failed = Some("bytes follow the frame".into());
                return;
            }
            match self.decoder.run_on_buffers(input, &mut self.out) {
                Ok(status) => {
                    input = &input[status.bytes_read..];
                    self.output(status.bytes_written, limit);
                    if status.remaining == 0 {
                        self.ended = true;
                    }
                }
                Err(e) => self.failed = Some(e.to_string()),
            }
        }
        // Output the decoder still holds for input already given.
        self.drain(limit);
    }

    /// Takes the output the decoder holds without more input.
    fn drain(&mut self, limit: u64) {
        use zstd::stream::raw::Operation as _;
        while self.failed.is_none() && !self.ended {
            match self.decoder.run_on_buffers(&[], &mut self.out) {
                Ok(status) => {
                    self.output(status.bytes_written, limit);
                    if status.remaining == 0 {
                        self.ended = true;
                    }
                    if status.bytes_written < self.out.len() {
                        return;
                    }
                }
                Err(e) => self.failed = Some(e.to_string()),
            }
        }
    }

    fn output(&mut self, written: usize, limit: u64) {
        self.decoded_len += written as u64;
        if self.decoded_len > limit {
            self.failed = Some(format!("it decodes past {limit} bytes"));
            return;
        }
        self.decoded.update(&self.out[..written]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(len: usize) -> Vec<u8> {
        (0..len).map(|i| b"lazyblk chunk "[i % 14]).collect()
    }

    fn random(len: usize) -> Vec<u8> {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn verify_streaming(
        stored: &[u8],
        limit: u64,
        digest: &Digest,
        piece: usize,
    ) -> Result<(Encoding, u64), DecodeError> {
        let mut v = StoredVerifier::new(limit);
        for p in stored.chunks(piece.max(1)) {
            v.update(p);
        }
        v.finish(digest)
    }

    #[test]
    fn compressible_chunks_are_stored_as_a_frame_and_decode_back() {
        let raw = text(1 << 20);
        let digest = Digest::of(&raw);
        let (encoding, stored) = encode(&raw);
        assert_eq!(encoding, Encoding::Zstd);
        assert!(stored.len() < raw.len() / 10);
        let (got, bytes) = decode(Bytes::copy_from_slice(&stored), raw.len(), &digest).unwrap();
        assert_eq!(got, Encoding::Zstd);
        assert_eq!(&bytes[..], &raw[..]);
        for piece in [1, 3, 4096, 1 << 20] {
            assert_eq!(
                verify_streaming(&stored, 1 << 20, &digest, piece),
                Ok((Encoding::Zstd, 1 << 20))
            );
        }
    }

    #[test]
    fn incompressible_chunks_stay_raw() {
        let raw = random(1 << 20);
        let digest = Digest::of(&raw);
        let (encoding, stored) = encode(&raw);
        assert_eq!(encoding, Encoding::Raw);
        assert_eq!(&stored[..], &raw[..]);
        assert_eq!(
            decode(Bytes::from(raw.clone()), raw.len(), &digest)
                .unwrap()
                .0,
            Encoding::Raw
        );
        assert_eq!(
            verify_streaming(&raw, 1 << 20, &digest, 65536),
            Ok((Encoding::Raw, 1 << 20))
        );
    }

    #[test]
    fn a_raw_chunk_that_begins_with_the_magic_is_raw() {
        // A format-1 store's chunk holding the start of a .zst file.
        let mut raw = zstd::bulk::compress(&text(1 << 16), 3).unwrap();
        raw.extend_from_slice(&random(4096));
        let digest = Digest::of(&raw);
        let (encoding, bytes) = decode(Bytes::from(raw.clone()), raw.len(), &digest).unwrap();
        assert_eq!(encoding, Encoding::Raw);
        assert_eq!(&bytes[..], &raw[..]);
        assert_eq!(
            verify_streaming(&raw, raw.len() as u64, &digest, 1000),
            Ok((Encoding::Raw, raw.len() as u64))
        );
    }

    #[test]
    fn a_corrupt_frame_is_refused() {
        let raw = text(1 << 20);
        let digest = Digest::of(&raw);
        let mut stored = encode(&raw).1.into_owned();
        let middle = stored.len() / 2;
        stored[middle] ^= 0x55;
        assert!(decode(Bytes::from(stored.clone()), raw.len(), &digest).is_err());
        assert!(verify_streaming(&stored, 1 << 20, &digest, 4096).is_err());
        // Cut short.
        let short = &stored[..stored.len() - 10];
        assert!(decode(Bytes::copy_from_slice(short), raw.len(), &digest).is_err());
        assert!(verify_streaming(short, 1 << 20, &digest, 4096).is_err());
    }

    #[test]
    fn a_frame_that_decodes_past_the_chunk_is_refused_without_allocating_it() {
        // 1 GiB of zeros in a few kilobytes, offered as a 1 MiB chunk.
        let mut encoder = zstd::stream::Encoder::new(Vec::new(), 19).unwrap();
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..1024 {
            std::io::Write::write_all(&mut encoder, &zeros).unwrap();
        }
        let bomb = encoder.finish().unwrap();
        assert!(bomb.len() < 1 << 20);
        let digest = Digest::of(&zeros);
        let refused = decode(Bytes::from(bomb.clone()), 1 << 20, &digest);
        assert!(
            matches!(refused, Err(DecodeError::BadFrame { .. })),
            "{refused:?}"
        );
        let streamed = verify_streaming(&bomb, 1 << 20, &digest, 65536);
        assert!(
            matches!(streamed, Err(DecodeError::BadFrame { .. })),
            "{streamed:?}"
        );
    }

    #[test]
    fn both_decoders_refuse_what_the_other_refuses() {
        let raw = text(1 << 18);
        let digest = Digest::of(&raw);
        let frame = encode(&raw).1.into_owned();
        // Two frames of the chunk's halves: one chunk, but not one frame.
        let mut two = zstd::bulk::compress(&raw[..1 << 17], 3).unwrap();
        two.extend(zstd::bulk::compress(&raw[1 << 17..], 3).unwrap());
        // A skippable frame after the chunk's frame.
        let mut skippable = frame.clone();
        skippable.extend_from_slice(&[0x50, 0x2A, 0x4D, 0x18, 4, 0, 0, 0, 1, 2, 3, 4]);
        // A frame of random bytes, larger than the chunk it holds.
        let noise = random(1 << 16);
        let big = zstd::bulk::compress(&noise, 1).unwrap();
        assert!(big.len() >= noise.len());
        for (body, len, digest) in [
            (&two, raw.len(), digest),
            (&skippable, raw.len(), digest),
            (&big, noise.len(), Digest::of(&noise)),
        ] {
            assert!(decode(Bytes::copy_from_slice(body), len, &digest).is_err());
            assert!(verify_streaming(body, 1 << 24, &digest, 4096).is_err());
        }
        // Empty pieces between the bytes change nothing.
        let mut v = StoredVerifier::new(1 << 24);
        for piece in frame.chunks(100) {
            for _ in 0..20 {
                v.update(&[]);
            }
            v.update(piece);
        }
        assert_eq!(v.finish(&digest), Ok((Encoding::Zstd, 1 << 18)));
    }

    #[test]
    fn bytes_after_the_frame_are_refused() {
        let raw = text(1 << 18);
        let digest = Digest::of(&raw);
        let mut stored = encode(&raw).1.into_owned();
        stored.extend_from_slice(b"trailing");
        assert!(decode(Bytes::from(stored.clone()), raw.len(), &digest).is_err());
        assert!(verify_streaming(&stored, 1 << 18, &digest, 7).is_err());
    }
}
