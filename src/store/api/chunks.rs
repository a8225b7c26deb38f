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

pub(super) async fn get_chunk(
    State(state): State<AppState>,
    Path(digest): Path<String>,
) -> Result<Response, ApiError> {
    let digest = checked_digest(&digest)?;
    let Some((stream, len)) = state.backend.open_chunk(&digest).await? else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("chunk {digest} is not in the store"),
        ));
    };
    state.metrics.chunks_served.inc();
    state.metrics.bytes_served.inc_by(len);
    let body = Body::from_stream(stream);
    Ok((chunk_headers(len), body).into_response())
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
