//! One transmission reply, ready for the wire: a small header kept inline and an
//! optional body (read data on loan from the buffer pool, or a few owned bytes).
//!
//! The constructors pick simple or structured framing; the writer sends the header and
//! the body in one vectored write.

use tokio::sync::OwnedSemaphorePermit;

use crate::buffer_pool::PooledBuffer;
use crate::export::{Extent, FileSlices};
use crate::proto::{self, MAX_EXTENTS};

/// The longest reply header: a structured chunk header plus an OFFSET_DATA offset.
const MAX_HEAD: usize = proto::STRUCTURED_HEADER_LEN + 8;

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
    /// Read data that lies in files, sent with `splice` ([`crate::splice`]).
    Files(FileSlices),
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
    pub fn file_data(framing: Framing, cookie: u64, offset: u64, files: FileSlices) -> Self {
        let len = files.len();
        Self::read(framing, cookie, offset, len, Body::Files(files))
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
                head[proto::STRUCTURED_HEADER_LEN..].copy_from_slice(&offset.to_be_bytes());
                Self::with_head(&head, body)
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
            Body::Empty | Body::Files(_) => &[],
            Body::Data(data) => data,
            Body::Owned(bytes) => bytes,
        }
    }

    /// The file pieces that follow the header, for a read answered from files.
    pub fn files(&self) -> Option<&FileSlices> {
        match &self.body {
            Body::Files(files) => Some(files),
            _ => None,
        }
    }

    /// A final (DONE) structured chunk: the chunk header, then `body`.
    fn structured(cookie: u64, kind: u16, body: Body) -> Self {
        let body_len = match &body {
            Body::Empty => 0,
            Body::Data(data) => data.len(),
            Body::Owned(bytes) => bytes.len(),
            Body::Files(files) => files.len() as usize,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer_pool::BufferPool;
    use crate::proto::MAX_STRING;

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
