//! [`StoredVerifier`]: a stored chunk checked as its bytes stream by (an upload to the
//! store, a scrub), without holding it.

use crate::digest::{Digest, DigestWriter};

use super::*;

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
