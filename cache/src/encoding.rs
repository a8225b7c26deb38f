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
//! ([`crate::chunk_store::StoredForm`]).

use std::borrow::Cow;

use bytes::Bytes;
use serde::Serialize;

use crate::blocks::WINDOW_LOG_MAX;
use crate::digest::{Digest, DigestWriter};

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
    /// The bytes began a block table: a chunk in blocks being decoded.
    blocks: Option<crate::blocks::BlocksState>,
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
            blocks: None,
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
            } else if self.head == crate::blocks::BLOCKS_MAGIC {
                let mut blocks = crate::blocks::BlocksState::new(self.limit);
                blocks.feed(&self.head);
                self.blocks = Some(blocks);
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
        if let Some(blocks) = &mut self.blocks {
            blocks.feed(input);
        }
    }

    /// What a decoder of the stored bytes (a frame, or blocks) found: the chunk in
    /// `encoding` if its output hashes to `digest`, else why not.
    fn outcome(
        &self,
        encoding: Encoding,
        (decoded, decoded_len): (DigestWriter, u64),
        failed: Option<String>,
        digest: &Digest,
    ) -> Result<(Encoding, u64), DecodeError> {
        match failed {
            None => {
                let actual = decoded.finish();
                if actual == *digest {
                    Ok((encoding, decoded_len))
                } else {
                    Err(DecodeError::Mismatch { actual })
                }
            }
            Some(detail) => Err(DecodeError::BadFrame {
                stored: self.stored_len as usize,
                len: self.limit as usize,
                detail,
            }),
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
            let decoded = (frame.decoded, frame.decoded_len);
            match self.outcome(Encoding::Zstd, decoded, frame.failed, digest) {
                Ok(done) => return Ok(done),
                Err(e) => frame_error = Some(e),
            }
        }
        if let Some(blocks) = self.blocks.take() {
            let failed = blocks.incomplete().or_else(|| {
                (self.stored_len >= blocks.decoded_len)
                    .then(|| "the blocks are not smaller than the chunk".to_string())
            });
            let decoded = (blocks.decoded, blocks.decoded_len);
            match self.outcome(Encoding::Blocks, decoded, failed, digest) {
                Ok(done) => return Ok(done),
                Err(e) => frame_error = Some(e),
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
        let (encoding, stored) = encode_frame(&raw);
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
        let (encoding, stored) = encode_frame(&raw);
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
        let mut stored = encode_frame(&raw).1.into_owned();
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
        let frame = encode_frame(&raw).1.into_owned();
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
    fn a_block_slot_of_two_frames_is_refused_by_both_decoders() {
        let raw = text(16384);
        let digest = Digest::of(&raw);
        let block = crate::blocks::STORED_BLOCK as usize;
        // Two blocks; the first slot holds two frames (of its halves), the second one.
        let mut first = zstd::bulk::compress(&raw[..block / 2], 3).unwrap();
        first.extend(zstd::bulk::compress(&raw[block / 2..block], 3).unwrap());
        let second = zstd::bulk::compress(&raw[block..], 3).unwrap();
        let mut stored = Vec::new();
        stored.extend_from_slice(&crate::blocks::BLOCKS_MAGIC);
        stored.extend_from_slice(&20u32.to_le_bytes());
        stored.extend_from_slice(b"LZBK");
        stored.extend_from_slice(&(block as u32).to_le_bytes());
        stored.extend_from_slice(&2u32.to_le_bytes());
        stored.extend_from_slice(&(first.len() as u32).to_le_bytes());
        stored.extend_from_slice(&(second.len() as u32).to_le_bytes());
        stored.extend_from_slice(&first);
        stored.extend_from_slice(&second);
        assert!(decode(Bytes::from(stored.clone()), raw.len(), &digest).is_err());
        assert!(verify_streaming(&stored, 16 << 20, &digest, 100).is_err());
    }

    #[test]
    fn bytes_after_the_frame_are_refused() {
        let raw = text(1 << 18);
        let digest = Digest::of(&raw);
        let mut stored = encode_frame(&raw).1.into_owned();
        stored.extend_from_slice(b"trailing");
        assert!(decode(Bytes::from(stored.clone()), raw.len(), &digest).is_err());
        assert!(verify_streaming(&stored, 1 << 18, &digest, 7).is_err());
    }

    #[test]
    fn chunks_are_stored_in_blocks_that_decode_whole_and_alone() {
        let mut raw = text(1 << 20);
        raw[..1 << 16].copy_from_slice(&random(1 << 16));
        let digest = Digest::of(&raw);
        let (encoding, stored) = encode(&raw);
        assert_eq!(encoding, Encoding::Blocks);
        assert!(stored.len() < raw.len() / 5, "{}", stored.len());
        let (got, bytes) = decode(Bytes::copy_from_slice(&stored), raw.len(), &digest).unwrap();
        assert_eq!(got, Encoding::Blocks);
        assert_eq!(&bytes[..], &raw[..]);
        for piece in [1, 7, 4096, 20000, 1 << 20] {
            assert_eq!(
                verify_streaming(&stored, 16 << 20, &digest, piece),
                Ok((Encoding::Blocks, 1 << 20)),
                "piece {piece}"
            );
        }
        // Each block decodes on its own from its range of the stored bytes.
        let table = crate::blocks::BlockTable::parse(&stored, Some(1 << 20), 1 << 20).unwrap();
        assert_eq!(
            table.count(),
            (1 << 20) / crate::blocks::STORED_BLOCK as usize
        );
        for i in [0, 3, 63] {
            let frame = &stored[table.offsets[i] as usize..table.offsets[i + 1] as usize];
            let mut out = vec![0u8; table.block_len(i, 1 << 20)];
            with_decompressor(|d| crate::blocks::decode_block(frame, &mut out, d)).unwrap();
            let at = i * crate::blocks::STORED_BLOCK as usize;
            assert_eq!(&out[..], &raw[at..at + out.len()]);
        }
        // The stored bytes are a zstd stream: `zstd -d` decodes them.
        let mut decoder = zstd::stream::Decoder::new(&stored[..]).unwrap();
        let mut all = Vec::new();
        std::io::Read::read_to_end(&mut decoder, &mut all).unwrap();
        assert_eq!(all, raw);
    }

    #[test]
    fn a_short_last_block_and_a_corrupt_block_are_told_apart() {
        let raw = text((1 << 20) - 12288);
        let digest = Digest::of(&raw);
        let stored = encode(&raw).1.into_owned();
        assert_eq!(
            decode(Bytes::from(stored.clone()), raw.len(), &digest)
                .unwrap()
                .0,
            Encoding::Blocks
        );
        assert_eq!(
            verify_streaming(&stored, 16 << 20, &digest, 999),
            Ok((Encoding::Blocks, raw.len() as u64))
        );
        let table =
            crate::blocks::BlockTable::parse(&stored, Some(raw.len() as u64), 1 << 20).unwrap();
        let mut bad = stored.clone();
        let at = table.offsets[10] as usize + 5;
        bad[at] ^= 0x40;
        assert!(decode(Bytes::from(bad.clone()), raw.len(), &digest).is_err());
        assert!(verify_streaming(&bad, 16 << 20, &digest, 4096).is_err());
        // Cut short, or with bytes after the last block.
        assert!(verify_streaming(&stored[..stored.len() - 1], 16 << 20, &digest, 4096).is_err());
        let mut long = stored.clone();
        long.push(0);
        assert!(decode(Bytes::from(long.clone()), raw.len(), &digest).is_err());
        assert!(verify_streaming(&long, 16 << 20, &digest, 4096).is_err());
    }

    #[test]
    fn a_block_that_decodes_past_its_size_is_refused_without_allocating_it() {
        // A table of one block of 16 KiB whose frame holds 1 GiB of zeros.
        let mut encoder = zstd::stream::Encoder::new(Vec::new(), 19).unwrap();
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..1024 {
            std::io::Write::write_all(&mut encoder, &zeros).unwrap();
        }
        let bomb = encoder.finish().unwrap();
        let block = crate::blocks::STORED_BLOCK;
        let mut stored = Vec::new();
        stored.extend_from_slice(&crate::blocks::BLOCKS_MAGIC);
        stored.extend_from_slice(&16u32.to_le_bytes());
        stored.extend_from_slice(b"LZBK");
        stored.extend_from_slice(&block.to_le_bytes());
        stored.extend_from_slice(&1u32.to_le_bytes());
        stored.extend_from_slice(&(bomb.len() as u32).to_le_bytes());
        stored.extend_from_slice(&bomb);
        let digest = Digest::of(&zeros[..block as usize]);
        let refused = decode(Bytes::from(stored.clone()), block as usize, &digest);
        assert!(
            matches!(refused, Err(DecodeError::BadFrame { .. })),
            "{refused:?}"
        );
        let streamed = verify_streaming(&stored, 16 << 20, &digest, 4096);
        assert!(
            matches!(streamed, Err(DecodeError::BadFrame { .. })),
            "{streamed:?}"
        );
        let mut out = vec![0u8; block as usize];
        assert!(with_decompressor(|d| crate::blocks::decode_block(&bomb, &mut out, d)).is_err());
    }
}
