//! Ranges of a chunk's stored form for peers' small reads (format 3): `Range: bytes=A-B`
//! on `GET /v1/peer/chunks/{digest}`, with the encodings the asker decodes named. A
//! small read of a chunk stored in blocks fetches the blocks it reads
//! (`lazyblk_cache::partial`) from the chunk's owner when the owner holds the chunk,
//! instead of from the store.
//!
//! Served only from a stored form this node keeps as fetched (the store's object byte
//! for byte), so the ranges match the block table the reader took from any source; a
//! form this node encoded itself may differ and is served whole only. Never fetched for
//! a range: an owner that does not hold the chunk answers 404 at once, one that holds
//! no such form 416, and the reader asks the store. The reader checks every block
//! against the manifest's block index before a byte is served.

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use lazyblk_cache::ChunkRef;

use super::peer::body::{accepted, streamed, Served};
use super::state::{ApiError, ApiState};

/// Bytes `A..B+1` of a `len`-byte body asked as `bytes=A-B` (one range, within the body).
fn parse_range(value: &HeaderValue, len: u64) -> Option<std::ops::Range<u64>> {
    let spec = value.to_str().ok()?.trim().strip_prefix("bytes=")?;
    let (first, last) = spec.split_once('-')?;
    let (first, last): (u64, u64) = (first.trim().parse().ok()?, last.trim().parse().ok()?);
    (first <= last && last < len).then_some(first..last + 1)
}

fn unsatisfiable(len: Option<u64>, why: String) -> Response {
    let mut response = axum::response::IntoResponse::into_response(ApiError(
        StatusCode::RANGE_NOT_SATISFIABLE,
        why,
    ));
    if let Some(len) = len {
        if let Ok(value) = HeaderValue::from_str(&format!("bytes */{len}")) {
            response.headers_mut().insert(header::CONTENT_RANGE, value);
        }
    }
    response
}

/// Answers a ranged peer request for `chunk` (a chunk a manifest this node knows names).
pub(super) async fn ranged(
    state: &ApiState,
    chunk: &ChunkRef,
    range: &HeaderValue,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let accepts = accepted(headers);
    let cache = state.node.cache.clone();
    let digest = chunk.digest;
    // Opening may hash the chunk or check its form (their first open by this daemon).
    let opened = tokio::task::spawn_blocking(move || match cache.open_local(&digest)? {
        Some(_) => cache.open_stored_form(&digest),
        None => Ok(None),
    })
    .await
    .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let Some(form) = opened else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("this node holds no stored form of chunk {digest}; ask the store for ranges"),
        ));
    };
    if !form.as_fetched || !accepts.contains(&form.encoding) {
        return Ok(unsatisfiable(
            None,
            format!("this node holds chunk {digest} in no form the asker may take ranges of"),
        ));
    }
    let Some(span) = parse_range(range, form.len) else {
        return Ok(unsatisfiable(
            Some(form.len),
            format!(
                "not one range within the {} stored bytes of {digest}",
                form.len
            ),
        ));
    };
    let permit = match state.peer_budget.first_piece(span.end - span.start).await {
        Ok(permit) => permit,
        Err(busy) => return Ok(busy),
    };
    Ok(streamed(state, Served::Stored(form), Some(span), permit))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_range_within_the_body_is_taken() {
        let v = |s: &str| HeaderValue::from_str(s).unwrap();
        assert_eq!(parse_range(&v("bytes=0-99"), 100), Some(0..100));
        assert_eq!(parse_range(&v("bytes=10-10"), 100), Some(10..11));
        assert_eq!(parse_range(&v("bytes=10-100"), 100), None);
        assert_eq!(parse_range(&v("bytes=20-10"), 100), None);
        assert_eq!(parse_range(&v("bytes=-10"), 100), None);
        assert_eq!(parse_range(&v("bytes=0-1,4-5"), 100), None);
        assert_eq!(parse_range(&v("items=0-1"), 100), None);
    }
}
