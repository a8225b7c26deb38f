//! One transmission reply, ready for the wire: a small header kept inline and an
//! optional body (read data on loan from the buffer pool, or a few owned bytes).
//!
//! The constructors pick simple or structured framing; the writer sends the header and
//! the body in one vectored write. A read answered from files has no body: its parts
//! ([`Reply::file_parts`]), a header and the pieces after it each, go through the splice
//! pipe.

use tokio::sync::OwnedSemaphorePermit;

use crate::proto::{self, MAX_EXTENTS};
use lazyblk_image::PooledBuffer;
use lazyblk_image::{Extent, FileSlices, Slice};

/// The longest reply header: a structured chunk header plus an OFFSET_DATA offset (or
/// an OFFSET_HOLE chunk's whole payload: offset and length).
const MAX_HEAD: usize = proto::STRUCTURED_HEADER_LEN + 12;

/// A reply to one request.
#[derive(Debug)]
pub struct Reply {
    /// The reply or chunk header, inline so that framing a reply never allocates.
    head: [u8; MAX_HEAD],
    /// How much of `head` is used.
    head_len: usize,
    body: Body,
    /// The request's share of the connection's in-flight limits, released once the
    /// reply has been written (or dropped), so queued replies count against them too.
    _permits: Option<Permits>,
}

/// What follows a reply's header.
#[derive(Debug)]
enum Body {
    Empty,
    /// Read data, returned to the pool when the reply is dropped.
    Data(PooledBuffer),
    /// Block status descriptors or an error message.
    Owned(Vec<u8>),
    /// Read data that lies in files, sent with `splice` ([`crate::splice`]); with
    /// `holes`, as a structured chunk per run of file pieces and per run of zeroes.
    Files {
        files: FileSlices,
        holes: Option<Holes>,
    },
}

/// What a structured read answered from files needs to frame its chunks as it is sent.
#[derive(Debug, Clone, Copy)]
struct Holes {
    cookie: u64,
    offset: u64,
}

/// A chunk header, inline.
#[derive(Debug, Clone, Copy)]
pub struct Head {
    bytes: [u8; MAX_HEAD],
    len: usize,
}

impl std::ops::Deref for Head {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// The semaphore permits a request holds while it is in flight; held only to be
/// released when dropped.
#[derive(Debug)]
pub struct Permits {
    _request: OwnedSemaphorePermit,
    _bytes: Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)>,
}

impl Permits {
    /// A request's slot and, for reads and writes, its payload bytes (of the
    /// connection's budget and of the server's).
    pub fn new(
        request: OwnedSemaphorePermit,
        bytes: Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)>,
    ) -> Self {
        Self {
            _request: request,
            _bytes: bytes,
        }
    }
}

/// How replies are framed on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Simple,
    /// Structured replies were negotiated.
    Structured,
}

impl Reply {
    /// Success without data (any command but read and block status).
    pub fn done(cookie: u64) -> Self {
        Self::with_head(&proto::simple_reply(0, cookie), Body::Empty)
    }

    /// Successful read of `data` at `offset`.
    pub fn data(framing: Framing, cookie: u64, offset: u64, data: PooledBuffer) -> Self {
        let len = data.len() as u64;
        Self::read(framing, cookie, offset, len, Body::Data(data))
    }

    /// Successful read at `offset` whose bytes are the file pieces `files` (not empty).
    /// With structured replies, runs of zeroes go as hole chunks and the file pieces
    /// between them as data chunks, unless the client asked for one content chunk
    /// (`df`, NBD_CMD_FLAG_DF) and the read is not all one hole: then the zeroes are
    /// sent as data.
    pub fn file_data(
        framing: Framing,
        cookie: u64,
        offset: u64,
        files: FileSlices,
        df: bool,
    ) -> Self {
        let all_hole = files.pieces().len() == 1 && files.has_zeroes();
        let sparse = framing == Framing::Structured && files.has_zeroes() && (!df || all_hole);
        if sparse {
            let holes = Some(Holes { cookie, offset });
            return Self::with_head(&[], Body::Files { files, holes });
        }
        let len = files.len();
        Self::read(
            framing,
            cookie,
            offset,
            len,
            Body::Files { files, holes: None },
        )
    }

    fn read(framing: Framing, cookie: u64, offset: u64, len: u64, body: Body) -> Self {
        match framing {
            Framing::Simple => Self::with_head(&proto::simple_reply(0, cookie), body),
            // An OFFSET_DATA chunk must carry at least one byte; an empty read is a NONE.
            Framing::Structured if len == 0 => {
                Self::structured(cookie, proto::REPLY_TYPE_NONE, Body::Empty)
            }
            Framing::Structured => {
                // The length was checked against max_request (a u32) before reading.
                let length = u32::try_from(len + 8).unwrap_or(u32::MAX);
                let mut head = [0; MAX_HEAD];
                head[..proto::STRUCTURED_HEADER_LEN].copy_from_slice(&proto::structured_header(
                    proto::REPLY_FLAG_DONE,
                    proto::REPLY_TYPE_OFFSET_DATA,
                    cookie,
                    length,
                ));
                head[proto::STRUCTURED_HEADER_LEN..][..8].copy_from_slice(&offset.to_be_bytes());
                Self::with_head(&head[..proto::STRUCTURED_HEADER_LEN + 8], body)
            }
        }
    }

    /// A failed request. Structured framing carries `message` to the user; simple
    /// framing has room for the error value only.
    pub fn error(framing: Framing, cookie: u64, error: u32, message: &str) -> Self {
        match framing {
            Framing::Simple => Self::with_head(&proto::simple_reply(error, cookie), Body::Empty),
            Framing::Structured => {
                let message = proto::clip_string(message);
                let mut payload = Vec::with_capacity(6 + message.len());
                payload.extend_from_slice(&error.to_be_bytes());
                // `clip_string` keeps the message within MAX_STRING, which fits u16.
                payload.extend_from_slice(&(message.len() as u16).to_be_bytes());
                payload.extend_from_slice(message.as_bytes());
                Self::structured(cookie, proto::REPLY_TYPE_ERROR, Body::Owned(payload))
            }
        }
    }

    /// A `NBD_REPLY_TYPE_BLOCK_STATUS` chunk for context `context` over a request of
    /// `len` bytes: zero-length extents are skipped, lengths are clipped so that no
    /// extent reaches past the request, and with `req_one` only the first is sent.
    /// `None` when no extent covers anything.
    pub fn block_status(
        cookie: u64,
        context: u32,
        len: u32,
        extents: &[Extent],
        req_one: bool,
    ) -> Option<Self> {
        let limit = if req_one { 1 } else { MAX_EXTENTS };
        let mut payload = Vec::with_capacity(4 + 8 * extents.len().min(limit));
        payload.extend_from_slice(&context.to_be_bytes());
        let mut covered: u64 = 0;
        for extent in extents.iter().filter(|e| e.length > 0).take(limit) {
            let remaining = u64::from(len) - covered;
            if remaining == 0 {
                break;
            }
            // `remaining` is at most `len`, a u32.
            let length = extent.length.min(remaining) as u32;
            let flags = if extent.hole { proto::STATE_HOLE } else { 0 }
                | if extent.zero { proto::STATE_ZERO } else { 0 };
            payload.extend_from_slice(&length.to_be_bytes());
            payload.extend_from_slice(&flags.to_be_bytes());
            covered += u64::from(length);
        }
        if covered == 0 {
            return None;
        }
        Some(Self::structured(
            cookie,
            proto::REPLY_TYPE_BLOCK_STATUS,
            Body::Owned(payload),
        ))
    }

    /// Attaches the request's in-flight permits, to be released with the reply.
    pub fn holding(mut self, permits: Permits) -> Self {
        self._permits = Some(permits);
        self
    }

    /// The header bytes.
    pub fn head(&self) -> &[u8] {
        &self.head[..self.head_len]
    }

    /// The bytes after the header held in memory (none for a file reply).
    pub fn body(&self) -> &[u8] {
        match &self.body {
            Body::Empty | Body::Files { .. } => &[],
            Body::Data(data) => data,
            Body::Owned(bytes) => bytes,
        }
    }

    /// For a read answered from files, its parts in order: a header (after
    /// [`Reply::head`], which is empty when the parts carry their own) and the pieces
    /// that follow it.
    pub fn file_parts(&self) -> Option<FileParts<'_>> {
        match &self.body {
            Body::Files { files, holes } => Some(FileParts {
                pieces: files.pieces(),
                next: 0,
                at: holes.map_or(0, |h| h.offset),
                holes: *holes,
            }),
            _ => None,
        }
    }

    /// A final (DONE) structured chunk: the chunk header, then `body`.
    fn structured(cookie: u64, kind: u16, body: Body) -> Self {
        let body_len = match &body {
            Body::Empty => 0,
            Body::Data(data) => data.len(),
            Body::Owned(bytes) => bytes.len(),
            Body::Files { .. } => 0,
        };
        // Bodies here are bounded: MAX_STRING messages or MAX_EXTENTS descriptors.
        let length = u32::try_from(body_len).unwrap_or(u32::MAX);
        let header = proto::structured_header(proto::REPLY_FLAG_DONE, kind, cookie, length);
        Self::with_head(&header, body)
    }

    fn with_head(bytes: &[u8], body: Body) -> Self {
        let mut head = [0; MAX_HEAD];
        head[..bytes.len()].copy_from_slice(bytes);
        Self {
            head,
            head_len: bytes.len(),
            body,
            _permits: None,
        }
    }
}

/// The parts of a read answered from files ([`Reply::file_parts`]).
pub struct FileParts<'a> {
    pieces: &'a [Option<Slice>],
    /// The first piece not yet handed out.
    next: usize,
    /// Where that piece's bytes lie in the export.
    at: u64,
    /// Without it, one part: no header of its own, every piece.
    holes: Option<Holes>,
}

impl<'a> Iterator for FileParts<'a> {
    type Item = (Head, &'a [Option<Slice>]);

    /// Structured chunks: one per run of file pieces (OFFSET_DATA, the header before
    /// the pieces) and one per run of zeroes (OFFSET_HOLE, no pieces after it), the
    /// last flagged DONE.
    fn next(&mut self) -> Option<Self::Item> {
        let start = self.next;
        if start >= self.pieces.len() {
            return None;
        }
        let Some(Holes { cookie, .. }) = self.holes else {
            self.next = self.pieces.len();
            let none = Head {
                bytes: [0; MAX_HEAD],
                len: 0,
            };
            return Some((none, self.pieces));
        };
        let zeroes = |i: usize| self.pieces[i].as_ref().is_some_and(Slice::is_zeroes);
        let hole = zeroes(start);
        let mut end = start + 1;
        while !hole && end < self.pieces.len() && !zeroes(end) {
            end += 1;
        }
        let run: u64 = self.pieces[start..end]
            .iter()
            .flatten()
            .map(|p| u64::from(p.len()))
            .sum();
        let at = self.at;
        (self.next, self.at) = (end, at + run);
        let flags = if end == self.pieces.len() {
            proto::REPLY_FLAG_DONE
        } else {
            0
        };
        let mut bytes = [0; MAX_HEAD];
        let header = proto::STRUCTURED_HEADER_LEN;
        bytes[header..header + 8].copy_from_slice(&at.to_be_bytes());
        // Runs are at most a read's length, which was checked against max_request (a u32).
        let run = u32::try_from(run).unwrap_or(u32::MAX);
        let (kind, length, used, pieces) = if hole {
            bytes[header + 8..header + 12].copy_from_slice(&run.to_be_bytes());
            (
                proto::REPLY_TYPE_OFFSET_HOLE,
                12,
                header + 12,
                &self.pieces[end..end],
            )
        } else {
            let length = run.saturating_add(8);
            (
                proto::REPLY_TYPE_OFFSET_DATA,
                length,
                header + 8,
                &self.pieces[start..end],
            )
        };
        bytes[..header].copy_from_slice(&proto::structured_header(flags, kind, cookie, length));
        Some((Head { bytes, len: used }, pieces))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::MAX_STRING;
    use lazyblk_image::BufferPool;

    fn be32(bytes: &[u8], at: usize) -> u32 {
        u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
    }

    #[test]
    fn simple_read_is_header_then_data() {
        let pool = BufferPool::new();
        let mut data = pool.take(3);
        data.copy_from_slice(b"abc");
        let reply = Reply::data(Framing::Simple, 7, 0, data);
        assert_eq!(reply.head(), &proto::simple_reply(0, 7));
        assert_eq!(reply.body(), b"abc");
    }

    #[test]
    fn structured_read_is_one_final_offset_data_chunk() {
        let pool = BufferPool::new();
        let mut data = pool.take(4);
        data.copy_from_slice(b"wxyz");
        let reply = Reply::data(Framing::Structured, 9, 4096, data);
        let head = reply.head();
        assert_eq!(head.len(), 28);
        assert_eq!(
            &head[..20],
            &proto::structured_header(proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_OFFSET_DATA, 9, 12)
        );
        assert_eq!(&head[20..28], &4096u64.to_be_bytes());
        assert_eq!(reply.body(), b"wxyz");
    }

    /// Pieces: two of a file, a run of zeroes, one of a file, of `PIECE` bytes each.
    fn sparse_pieces() -> FileSlices {
        let file = std::sync::Arc::new(tempfile::tempfile().expect("temp file"));
        let mut files = FileSlices::default();
        let resident: lazyblk_image::Resident = |_, _, _| true;
        assert!(files.push(&file, 0, PIECE, resident));
        assert!(files.push(&file, 1 << 20, PIECE, resident));
        assert!(
            files.push_zeroes(PIECE / 2) && files.push_zeroes(PIECE / 2),
            "one run"
        );
        assert!(files.push(&file, 0, PIECE, resident));
        files
    }

    const PIECE: u32 = 4096;

    fn parts(reply: &Reply) -> Vec<(Vec<u8>, usize)> {
        let parts = reply.file_parts().expect("a file reply");
        parts
            .map(|(head, pieces)| (head.to_vec(), pieces.len()))
            .collect()
    }

    #[test]
    fn a_structured_file_reply_over_zeroes_is_a_chunk_per_run() {
        let at = 1u64 << 30;
        let reply = Reply::file_data(Framing::Structured, 4, at, sparse_pieces(), false);
        assert!(reply.head().is_empty(), "the parts carry the headers");
        let data = |flags, offset: u64, len: u32| {
            let mut head =
                proto::structured_header(flags, proto::REPLY_TYPE_OFFSET_DATA, 4, len + 8).to_vec();
            head.extend_from_slice(&offset.to_be_bytes());
            head
        };
        let mut hole = proto::structured_header(0, proto::REPLY_TYPE_OFFSET_HOLE, 4, 12).to_vec();
        hole.extend_from_slice(&(at + 2 * u64::from(PIECE)).to_be_bytes());
        hole.extend_from_slice(&PIECE.to_be_bytes());
        let done = proto::REPLY_FLAG_DONE;
        assert_eq!(
            parts(&reply),
            [
                (data(0, at, 2 * PIECE), 2),
                (hole, 0),
                (data(done, at + 3 * u64::from(PIECE), PIECE), 1)
            ]
        );
    }

    #[test]
    fn a_file_reply_that_must_not_fragment_or_is_simple_is_one_part() {
        for (framing, df) in [(Framing::Structured, true), (Framing::Simple, false)] {
            let reply = Reply::file_data(framing, 4, 0, sparse_pieces(), df);
            let expected = Reply::read(framing, 4, 0, 4 * u64::from(PIECE), Body::Empty);
            assert_eq!(reply.head(), expected.head(), "{framing:?}");
            assert_eq!(parts(&reply), [(Vec::new(), 4)], "{framing:?}");
        }
        let mut hole = FileSlices::default();
        assert!(hole.push_zeroes(PIECE));
        let reply = Reply::file_data(Framing::Structured, 4, 8192, hole, true);
        let mut hole_head =
            proto::structured_header(proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_OFFSET_HOLE, 4, 12)
                .to_vec();
        hole_head.extend_from_slice(&8192u64.to_be_bytes());
        hole_head.extend_from_slice(&PIECE.to_be_bytes());
        assert_eq!(
            parts(&reply),
            [(hole_head, 0)],
            "one content chunk: the hole"
        );
    }

    #[test]
    fn structured_empty_read_is_a_none_chunk() {
        let pool = BufferPool::new();
        let reply = Reply::data(Framing::Structured, 1, 0, pool.take(0));
        assert_eq!(
            reply.head(),
            &proto::structured_header(proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_NONE, 1, 0)
        );
        assert!(reply.body().is_empty());
    }

    #[test]
    fn structured_error_carries_value_and_message() {
        let reply = Reply::error(Framing::Structured, 3, proto::EINVAL, "past the end");
        assert_eq!(be32(reply.head(), 16), 6 + 12);
        let body = reply.body();
        assert_eq!(be32(body, 0), proto::EINVAL);
        assert_eq!(&body[4..6], &12u16.to_be_bytes());
        assert_eq!(&body[6..], b"past the end");
    }

    #[test]
    fn simple_error_has_no_body() {
        let reply = Reply::error(Framing::Simple, 3, proto::EPERM, "read-only");
        assert_eq!(reply.head(), &proto::simple_reply(proto::EPERM, 3));
        assert!(reply.body().is_empty());
    }

    #[test]
    fn long_messages_are_cut_on_a_character_boundary() {
        let message = "é".repeat(MAX_STRING);
        let reply = Reply::error(Framing::Structured, 3, proto::EIO, &message);
        let body = reply.body();
        let len = usize::from(u16::from_be_bytes([body[4], body[5]]));
        assert!(len <= MAX_STRING);
        assert!(std::str::from_utf8(&body[6..6 + len]).is_ok());
    }

    #[test]
    fn block_status_clips_to_the_request() {
        let extents = [
            Extent {
                length: 0,
                hole: false,
                zero: false,
            },
            Extent {
                length: 4096,
                hole: false,
                zero: false,
            },
            Extent {
                length: 1 << 40,
                hole: true,
                zero: true,
            },
        ];
        let reply = Reply::block_status(5, 1, 8192, &extents, false).expect("covers bytes");
        let body = reply.body();
        assert_eq!(be32(reply.head(), 16), 4 + 16);
        assert_eq!(be32(body, 0), 1, "context id");
        assert_eq!((be32(body, 4), be32(body, 8)), (4096, 0));
        assert_eq!(
            (be32(body, 12), be32(body, 16)),
            (4096, proto::STATE_HOLE | proto::STATE_ZERO)
        );
    }

    #[test]
    fn block_status_req_one_sends_one_extent_within_the_request() {
        let extents = [
            Extent {
                length: 1 << 20,
                hole: true,
                zero: true,
            },
            Extent {
                length: 4096,
                hole: false,
                zero: false,
            },
        ];
        let reply = Reply::block_status(5, 1, 512, &extents, true).expect("covers bytes");
        let body = reply.body();
        assert_eq!(body.len(), 12);
        assert_eq!(be32(body, 4), 512);
    }

    #[test]
    fn block_status_without_extents_is_none() {
        assert!(Reply::block_status(5, 1, 512, &[], false).is_none());
        let empty = [Extent {
            length: 0,
            hole: false,
            zero: false,
        }];
        assert!(Reply::block_status(5, 1, 512, &empty, false).is_none());
    }
}
