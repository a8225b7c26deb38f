//! Chunks: GET, HEAD and verified PUT, the missing list, and scrub.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use lazyblk_cache::Digest;

use crate::store::backend::{drain, BackendError, ChunkPut, MAX_CHUNK_BODY};

use super::state::{checked_digest, read_body, ApiError, AppState, MAX_JSON_BODY};

/// `POST /v1/scrub`: hashes every stored chunk, deletes bad ones (a write: it needs the
/// write token when one is set).
pub(super) async fn scrub(
    State(state): State<AppState>,
) -> Result<Json<lazyblk_cache::ScrubReport>, ApiError> {
    let report = state.backend.scrub().await?;
    tracing::info!(
        checked = report.checked,
        dropped = report.dropped.len(),
        "store scrub finished"
    );
    Ok(Json(report))
}

pub(super) fn chunk_headers(len: u64) -> [(header::HeaderName, String); 2] {
    [
        (header::CONTENT_TYPE, "application/octet-stream".to_string()),
        (header::CONTENT_LENGTH, len.to_string()),
    ]
}

/// `GET /v1/chunks/{digest}`: the stored bytes, or with `Range: bytes=A-B` (one range)
/// those bytes of them (206), which is how a reader fetches a few blocks of a chunk
/// stored in blocks.
pub(super) async fn get_chunk(
    State(state): State<AppState>,
    Path(digest): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let digest = checked_digest(&digest)?;
    let range = match headers.get(header::RANGE) {
        Some(value) => Some(parse_range(value).ok_or_else(|| {
            ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                format!("unsupported range {value:?}: one range, bytes=A-B or bytes=A-"),
            )
        })?),
        None => None,
    };
    let partial = range.is_some();
    let Some(open) = state.backend.open_chunk(&digest, range).await? else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("chunk {digest} is not in the store"),
        ));
    };
    let served = open.range.end - open.range.start;
    state.metrics.bytes_served.inc_by(served);
    let body = Body::from_stream(open.stream);
    if !partial {
        state.metrics.chunks_served.inc();
        return Ok((chunk_headers(open.len), body).into_response());
    }
    state.metrics.ranges_served.inc();
    let content_range = format!(
        "bytes {}-{}/{}",
        open.range.start,
        open.range.end - 1,
        open.len
    );
    Ok((
        StatusCode::PARTIAL_CONTENT,
        chunk_headers(served),
        [(header::CONTENT_RANGE, content_range)],
        body,
    )
        .into_response())
}

/// One byte range, `bytes=A-B` (inclusive) or `bytes=A-`, as `A..B+1`.
fn parse_range(value: &header::HeaderValue) -> Option<std::ops::Range<u64>> {
    let spec = value.to_str().ok()?.trim().strip_prefix("bytes=")?;
    let (start, end) = spec.split_once('-')?;
    let start: u64 = start.trim().parse().ok()?;
    let end = match end.trim() {
        "" => u64::MAX,
        end => end.parse::<u64>().ok()?.checked_add(1)?,
    };
    (start < end).then_some(start..end)
}

pub(super) async fn head_chunk(
    State(state): State<AppState>,
    Path(digest): Path<String>,
) -> Result<Response, ApiError> {
    let digest = checked_digest(&digest)?;
    match state.backend.chunk_len(&digest).await? {
        Some(len) => Ok((chunk_headers(len), Body::empty()).into_response()),
        None => Ok(StatusCode::NOT_FOUND.into_response()),
    }
}

pub(super) async fn put_chunk(
    State(state): State<AppState>,
    Path(digest): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let digest = match checked_digest(&digest) {
        Ok(d) => d,
        Err(e) => {
            drain(body.into_data_stream(), MAX_CHUNK_BODY).await;
            return Err(e);
        }
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > MAX_CHUNK_BODY) {
        return Err(BackendError::TooLarge {
            what: format!("chunk {digest}"),
            limit: MAX_CHUNK_BODY,
        }
        .into());
    }
    match state
        .backend
        .put_chunk(digest, body.into_data_stream())
        .await
    {
        Ok(ChunkPut::Stored(len)) => {
            state.metrics.chunks_uploaded.inc();
            state.metrics.bytes_uploaded.inc_by(len);
            let answer = serde_json::json!({ "digest": digest, "stored": true, "size": len });
            Ok((StatusCode::CREATED, Json(answer)).into_response())
        }
        Ok(ChunkPut::Present) => {
            let answer = serde_json::json!({ "digest": digest, "stored": false });
            Ok((StatusCode::OK, Json(answer)).into_response())
        }
        Err(e) => {
            if matches!(e, BackendError::DigestMismatch { .. }) {
                state.metrics.digest_mismatch.inc();
                tracing::warn!("refused an upload: {e}");
            }
            Err(e.into())
        }
    }
}

pub(super) async fn missing(
    State(state): State<AppState>,
    body: Body,
) -> Result<Json<Vec<Digest>>, ApiError> {
    let bytes = read_body(body, MAX_JSON_BODY, "the digest list").await?;
    let digests: Vec<Digest> = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::bad_request(format!("expected a JSON list of chunk digests: {e}"))
    })?;
    Ok(Json(state.backend.missing(digests).await?))
}
