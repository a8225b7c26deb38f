//! The chunk endpoints other daemons call: `/v1/chunks/{digest}` (what this node holds,
//! for a template it is the origin of) and `/v1/peer/chunks/{digest}` (an owner's
//! fetch-and-serve, DESIGN section 10).
//!
//! They answer only in a fleet (`--advertise` or `--peers`), with the peer token when
//! one is set; an owner fetches for a peer only a chunk that a manifest it knows names
//! at the index the peer gives, so no one can read the store through it or fill its
//! disk with chunks of their choosing. Responses stream from the chunk file in
//! [`PIECE`](body::PIECE)s, each holding its bytes of the node-wide [`PeerBudget`] until hyper has
//! written it: peers that never read hold at most the budget, not a chunk each.
//!
//! A peer that names the encodings it decodes (`x-lazyblk-accept-stored-form`) gets the
//! chunk's stored form, the bytes the store sent (zstd blocks, about 0.4x a root file
//! system's chunk), streamed from the file this node kept beside the chunk
//! ([`lazyblk_cache::stored_forms`]), with its encoding named (`x-lazyblk-chunk-encoding`);
//! the peer decodes and verifies it as it would the store's. A chunk with no kept form is
//! encoded once (at most [`ENCODES_AT_ONCE`](body::ENCODES_AT_ONCE) at a time, else served decoded this once).
//! A peer that does not name encodings (a daemon from before stored forms, curl) gets
//! the decoded chunk, named `raw`.

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use lazyblk_cache::transport::CHUNK_ENCODING;
use lazyblk_cache::{ChunkRef, Digest, Priority};

use super::state::{checked_id, ApiError, ApiState};

use body::{served_form, streamed};

pub(super) mod body;

pub use body::PeerBudget;

/// The largest chunk (DESIGN section 2).
const MAX_CHUNK: u64 = 16 << 20;

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
