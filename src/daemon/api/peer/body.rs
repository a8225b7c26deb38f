//! The body of a chunk response to a peer: which form of the chunk it carries (the
//! decoded chunk, or its stored form when the asker decodes that), and how it streams,
//! a [`PIECE`] at a time, each piece holding its bytes of the node-wide [`PeerBudget`]
//! until hyper has written it.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use lazyblk_cache::encoding::Encoding;
use lazyblk_cache::transport::{ACCEPT_STORED_FORM, CHUNK_ENCODING};
use lazyblk_cache::{Chunk, ChunkFile, StoredForm};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::daemon::api::state::{ApiError, ApiState};

/// Bytes of a chunk read from its file and handed to hyper at once.
const PIECE: u64 = 64 << 10;
/// How long a peer request waits for room in the budget before it gets 503.
const BUDGET_WAIT: Duration = Duration::from_secs(1);
/// The Retry-After of that 503, in seconds (the peer asks the store meanwhile).
const RETRY_AFTER_SECS: &str = "1";
/// Chunks encoded at once for peers (those with no kept stored form): each holds a
/// chunk and its encoding in memory and keeps a core busy for about 5 ms per MiB, so a
/// burst of asks for a commit's chunks cannot take every core from the node's reads.
/// An ask that finds none free is served the decoded chunk.
const ENCODES_AT_ONCE: usize = 2;

/// The bytes of chunk responses to peers that may be in flight (read from the files and
/// not yet written to a socket) over all of them (`--peer-max-bytes-in-flight`).
pub struct PeerBudget {
    bytes: Arc<Semaphore>,
    /// Room to encode a chunk that has no kept stored form ([`ENCODES_AT_ONCE`]).
    encodes: Arc<Semaphore>,
}

impl PeerBudget {
    pub fn new(bytes: u64) -> PeerBudget {
        let bytes = usize::try_from(bytes.max(PIECE))
            .unwrap_or(Semaphore::MAX_PERMITS)
            .min(Semaphore::MAX_PERMITS);
        PeerBudget {
            bytes: Arc::new(Semaphore::new(bytes)),
            encodes: Arc::new(Semaphore::new(ENCODES_AT_ONCE)),
        }
    }

    /// Room for the first piece of a `len`-byte response, or after [`BUDGET_WAIT`] the
    /// answer to send instead: 503 with Retry-After.
    pub(in crate::daemon::api) async fn first_piece(
        &self,
        len: u64,
    ) -> Result<OwnedSemaphorePermit, Response> {
        let wanted = len.min(PIECE) as u32;
        match tokio::time::timeout(BUDGET_WAIT, self.bytes.clone().acquire_many_owned(wanted)).await
        {
            Ok(Ok(permit)) => Ok(permit),
            _ => {
                let busy = ApiError(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "this node is sending as many chunk bytes to peers as it may; ask again or ask the store"
                        .into(),
                );
                Err(([(header::RETRY_AFTER, RETRY_AFTER_SECS)], busy).into_response())
            }
        }
    }
}

/// What a chunk response carries: the decoded chunk, or its stored form.
pub(in crate::daemon::api) enum Served {
    Decoded(ChunkFile),
    Stored(StoredForm),
}

impl Served {
    pub(super) fn len(&self) -> u64 {
        match self {
            Served::Decoded(file) => file.len,
            Served::Stored(form) => form.len,
        }
    }

    pub(super) fn encoding(&self) -> Encoding {
        match self {
            Served::Decoded(_) => Encoding::Raw,
            Served::Stored(form) => form.encoding,
        }
    }

    /// Reads `buf.len()` bytes at `offset`; a read that would wait for the disk is
    /// moved off the runtime's hands (see `lazyblk_cache::blocking`).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), lazyblk_cache::ChunkStoreError> {
        match self {
            Served::Decoded(file) => Chunk::File(file.clone()).read_at(offset, buf),
            Served::Stored(form) => lazyblk_cache::blocking::blocking(|| form.read_at(offset, buf)),
        }
    }
}

/// The encodings the asker decodes (its `x-lazyblk-accept-stored-form`); none for an
/// asker that did not name any.
pub(in crate::daemon::api) fn accepted(headers: &HeaderMap) -> Vec<Encoding> {
    headers
        .get_all(ACCEPT_STORED_FORM)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| Encoding::parse(name.trim()))
        .filter(|e| *e != Encoding::Raw)
        .collect()
}

/// The form of the local chunk `file` to send to an asker with `headers`: its stored
/// form when the asker decodes it (kept, or encoded now when there is room), else the
/// decoded chunk.
pub(super) async fn served_form(
    state: &ApiState,
    file: ChunkFile,
    headers: &HeaderMap,
) -> Result<Served, ApiError> {
    let accepts = accepted(headers);
    if accepts.is_empty() {
        return Ok(Served::Decoded(file));
    }
    let encode = state.peer_budget.encodes.clone().try_acquire_owned().ok();
    let cache = state.node.cache.clone();
    let chunk = file.clone();
    // Opening may check the form (its first open by this daemon), encoding reads and
    // compresses the chunk: off the runtime.
    let form = tokio::task::spawn_blocking(move || {
        let kept = cache.open_stored_form(&chunk.digest)?;
        match (kept, encode) {
            (Some(form), _) => Ok(Some(form)),
            (None, Some(_room)) => cache.encode_stored_form(&chunk),
            (None, None) => Ok(None),
        }
    })
    .await
    .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    match form {
        Ok(Some(form)) if accepts.contains(&form.encoding) => Ok(Served::Stored(form)),
        Ok(_) => Ok(Served::Decoded(file)),
        Err(e) => {
            // The decoded chunk is still here: the asker gets that.
            tracing::warn!(chunk = %file.digest, error = %e, "reading a chunk's stored form for a peer");
            Ok(Served::Decoded(file))
        }
    }
}

/// A chunk's bytes held by a piece of a response, with their room in the budget: both
/// go when hyper drops the piece (written to the socket, or the connection gone).
struct Piece {
    bytes: Vec<u8>,
    _room: OwnedSemaphorePermit,
}

impl AsRef<[u8]> for Piece {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

/// The response that streams bytes `range` of `body` (all of it when `None`; then 200,
/// else 206 with its Content-Range), a [`PIECE`] at a time, each piece waiting for its
/// room in the peer budget (the first one's is `first`) and counted as sent to a peer.
/// The chunk's file rides along, so the chunk is not evicted meanwhile.
pub(in crate::daemon::api) fn streamed(
    state: &ApiState,
    body: Served,
    range: Option<std::ops::Range<u64>>,
    first: OwnedSemaphorePermit,
) -> Response {
    let total = body.len();
    let encoding = body.encoding();
    let (status, span) = match range {
        Some(r) => (StatusCode::PARTIAL_CONTENT, r),
        None => (StatusCode::OK, 0..total),
    };
    let content_range = format!(
        "bytes {}-{}/{total}",
        span.start,
        span.end.saturating_sub(1)
    );
    let budget = state.peer_budget.bytes.clone();
    let metrics = state.node.metrics.clone();
    let end = span.end;
    let pieces = futures::stream::unfold(
        (body, span.start, Some(first)),
        move |(chunk, offset, first)| {
            let budget = budget.clone();
            let metrics = metrics.clone();
            async move {
                if offset >= end {
                    return None;
                }
                let n = PIECE.min(end - offset);
                let room = match first {
                    Some(room) => room,
                    None => budget.acquire_many_owned(n as u32).await.ok()?,
                };
                let mut bytes = vec![0u8; n as usize];
                if let Err(e) = chunk.read_at(offset, &mut bytes) {
                    tracing::warn!(error = %e, "reading a chunk for a peer");
                    return Some((Err(std::io::Error::other(e)), (chunk, end, None)));
                }
                metrics.peer_bytes_sent(n);
                let piece = Bytes::from_owner(Piece { bytes, _room: room });
                Some((Ok(piece), (chunk, offset + n, None)))
            }
        },
    );
    let mut response = (
        status,
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, (span.end - span.start).to_string()),
            (
                header::HeaderName::from_static(CHUNK_ENCODING),
                encoding.as_str().to_string(),
            ),
        ],
        Body::from_stream(pieces),
    )
        .into_response();
    if status == StatusCode::PARTIAL_CONTENT {
        if let Ok(value) = header::HeaderValue::from_str(&content_range) {
            response.headers_mut().insert(header::CONTENT_RANGE, value);
        }
    }
    response
}
