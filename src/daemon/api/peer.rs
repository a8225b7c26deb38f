//! The chunk endpoints other daemons call: `/v1/chunks/{digest}` (what this node holds,
//! for a template it is the origin of) and `/v1/peer/chunks/{digest}` (an owner's
//! fetch-and-serve, DESIGN section 10).
//!
//! They answer only in a fleet (`--advertise` or `--peers`), with the peer token when
//! one is set; an owner fetches for a peer only a chunk that a manifest it knows names
//! at the index the peer gives, so no one can read the store through it or fill its
//! disk with chunks of their choosing. Responses stream from the chunk file in
//! [`PIECE`]s, each holding its bytes of the node-wide [`PeerBudget`] until hyper has
//! written it: peers that never read hold at most the budget, not a chunk each.
//!
//! A peer that names the encodings it decodes (`x-lazyblk-accept-stored-form`) gets the
//! chunk's stored form, the bytes the store sent (zstd blocks, about 0.4x a root file
//! system's chunk), streamed from the file this node kept beside the chunk
//! ([`lazyblk_cache::stored_forms`]), with its encoding named (`x-lazyblk-chunk-encoding`);
//! the peer decodes and verifies it as it would the store's. A chunk with no kept form is
//! encoded once (at most [`ENCODES_AT_ONCE`] at a time, else served decoded this once).
//! A peer that does not name encodings (a daemon from before stored forms, curl) gets
//! the decoded chunk, named `raw`.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use lazyblk_cache::encoding::Encoding;
use lazyblk_cache::transport::{ACCEPT_STORED_FORM, CHUNK_ENCODING};
use lazyblk_cache::{Chunk, ChunkFile, ChunkRef, Digest, Priority, StoredForm};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::state::{checked_id, ApiError, ApiState};

/// Bytes of a chunk read from its file and handed to hyper at once.
const PIECE: u64 = 64 << 10;
/// How long a peer request waits for room in the budget before it gets 503.
const BUDGET_WAIT: Duration = Duration::from_secs(1);
/// The Retry-After of that 503, in seconds (the peer asks the store meanwhile).
const RETRY_AFTER_SECS: &str = "1";
/// The largest chunk (DESIGN section 2).
const MAX_CHUNK: u64 = 16 << 20;
/// Chunks encoded at once for peers (those with no kept stored form): each holds a
/// chunk and its encoding in memory and keeps a core busy for about 5 ms per MiB, so a
/// burst of asks for a commit's chunks cannot take every core from the node's reads.
/// An ask that finds none free is served the decoded chunk.
const ENCODES_AT_ONCE: usize = 2;

/// The bytes of chunk responses to peers that may be in flight (read from the files and
/// not yet written to a socket) over all of them (`--peer-max-bytes-in-flight`).
pub struct PeerBudget {
    pub(super) bytes: Arc<Semaphore>,
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
    pub(super) async fn first_piece(&self, len: u64) -> Result<OwnedSemaphorePermit, Response> {
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

/// Query of `GET /v1/peer/chunks/{digest}`.
#[derive(serde::Deserialize)]
pub struct PeerChunkQuery {
    /// The chunk's length (from the asker's manifest); checked against the owner's.
    len: u64,
    /// The template the asker reads, and the chunk's index in it: the owner fetches
    /// only a chunk that a manifest it knows names there.
    template: Option<String>,
    index: Option<usize>,
}

/// An owner's fetch-and-serve (DESIGN section 10): the chunk from this node's cache, or
/// fetched once from the store (never from a peer, so requests cannot loop), cached and
/// served from its file.
pub async fn peer_chunk(
    State(state): State<ApiState>,
    Path(digest): Path<String>,
    Query(query): Query<PeerChunkQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let digest = peer_request(&state, &headers, &digest)?;
    if query.len == 0 || query.len > MAX_CHUNK {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("len={} is not a chunk length (1 to {MAX_CHUNK})", query.len),
        ));
    }
    let chunk = known_chunk(&state, digest, &query).await?;
    if let Some(range) = headers.get(header::RANGE) {
        return super::peer_ranges::ranged(&state, &chunk, range, &headers).await;
    }
    // Room for the first piece before the fetch: a node sending all it may answers 503
    // at once rather than fetch for a peer that will ask the store instead.
    let permit = match state.peer_budget.first_piece(chunk.len).await {
        Ok(permit) => permit,
        Err(busy) => return Ok(busy),
    };
    let node = &state.node;
    let sources = node.templates.store_sources();
    let fetched = tokio::time::timeout(
        lazyblk_cache::DEFAULT_READ_BUDGET,
        node.cache.fetch(&chunk, sources, Priority::Demand),
    )
    .await
    .map_err(|_| {
        ApiError(
            StatusCode::GATEWAY_TIMEOUT,
            format!("chunk {digest} did not arrive from the store in time"),
        )
    })?
    .map_err(|e| ApiError(StatusCode::BAD_GATEWAY, e.to_string()))?;
    let body = served_form(&state, fetched, &headers).await?;
    node.metrics.peer_served(body.len());
    Ok(streamed(&state, body, None, permit))
}

/// What a chunk response carries: the decoded chunk, or its stored form.
pub(super) enum Served {
    Decoded(ChunkFile),
    Stored(StoredForm),
}

impl Served {
    fn len(&self) -> u64 {
        match self {
            Served::Decoded(file) => file.len,
            Served::Stored(form) => form.len,
        }
    }

    fn encoding(&self) -> Encoding {
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
pub(super) fn accepted(headers: &HeaderMap) -> Vec<Encoding> {
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
async fn served_form(
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

/// The chunk a peer asks for, if a manifest this node knows (or learns now from the
/// store: a template published a moment ago) names `digest` at the index given (as a
/// chunk, or as the page of the block index that covers it).
async fn known_chunk(
    state: &ApiState,
    digest: Digest,
    query: &PeerChunkQuery,
) -> Result<ChunkRef, ApiError> {
    let (Some(template), Some(index)) = (&query.template, query.index) else {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "a peer request names its template and chunk index (&template=ID&index=N)".into(),
        ));
    };
    checked_id(template)?;
    let not_known = || {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("{digest} is not chunk {index} of a template {template:?} this node knows"),
        )
    };
    let replica = state.node.templates.replica(template).await?;
    let manifest = replica.manifest();
    let len = if manifest.chunks.get(index) == Some(&Some(digest)) {
        manifest.chunk_len(index)
    } else {
        let blocks = manifest.blocks.as_ref().ok_or_else(not_known)?;
        let (page, _) = blocks.locate(index, manifest.chunk_size);
        if blocks.pages.get(page) != Some(&Some(digest)) {
            return Err(not_known());
        }
        blocks.page_len(page, manifest.chunk_count(), manifest.chunk_size)
    };
    if len != query.len {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("chunk {digest} is {len} bytes, not len={}", query.len),
        ));
    }
    Ok(ChunkRef {
        template: template.as_str().into(),
        index,
        digest,
        len,
    })
}

/// The checks of both chunk endpoints: a fleet, the peer token (when one is set) and
/// the digest in the path.
fn peer_request(state: &ApiState, headers: &HeaderMap, digest: &str) -> Result<Digest, ApiError> {
    if !state.fleet {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            "this node is not in a fleet (no --advertise or --peers): it serves no chunks to other nodes"
                .into(),
        ));
    }
    if let Some(token) = &state.peer_token {
        if !crate::auth::carries(headers, token) {
            return Err(ApiError(
                StatusCode::UNAUTHORIZED,
                "chunk reads need this daemon's peer token (--peer-token)".into(),
            ));
        }
    }
    digest
        .parse()
        .map_err(|e: lazyblk_cache::digest::DigestParseError| {
            ApiError(StatusCode::BAD_REQUEST, e.to_string())
        })
}

/// Serves a local chunk to a peer node (this node is an origin of its commits).
pub async fn chunk(
    State(state): State<ApiState>,
    Path(digest): Path<String>,
    method: Method,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let digest = peer_request(&state, &headers, &digest)?;
    let node = state.node.clone();
    // Opening may hash the file (its first open by this daemon): off the runtime.
    let opened = tokio::task::spawn_blocking(move || node.cache.open_local(&digest))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let Some(file) = opened else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("chunk {digest} is not on this node"),
        ));
    };
    let body = served_form(&state, file, &headers).await?;
    if method == Method::HEAD {
        return Ok((
            [
                (header::CONTENT_LENGTH, body.len().to_string()),
                (
                    header::HeaderName::from_static(CHUNK_ENCODING),
                    body.encoding().as_str().to_string(),
                ),
            ],
            Body::empty(),
        )
            .into_response());
    }
    let permit = match state.peer_budget.first_piece(body.len()).await {
        Ok(permit) => permit,
        Err(busy) => return Ok(busy),
    };
    Ok(streamed(&state, body, None, permit))
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
pub(super) fn streamed(
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
