//! Templates, manifests, traces and gc.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

use crate::store::backend::{BackendError, ManifestPut};
use crate::store::{GcReport, TemplateSummary};
use crate::trust::{ManifestSignature, KEY_HEADER, SIGNATURE_HEADER};

use super::center::enrich;
use super::deletes::chunks_in_use;
use super::state::{
    checked_id, json_bytes, read_body, ApiError, AppState, DEFAULT_GC_GRACE, MAX_JSON_BODY,
};

pub(super) async fn list_templates(
    State(state): State<AppState>,
) -> Result<Json<Vec<TemplateSummary>>, ApiError> {
    let mut list = state.backend.list().await?;
    let live = state.nodes.live();
    let policy = state.center.policy().await?;
    for t in &mut list {
        enrich(&state, t, &live, &policy).await?;
    }
    Ok(Json(list))
}

pub(super) async fn get_template(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<TemplateSummary>, ApiError> {
    checked_id(&id)?;
    let mut t = state.backend.summary(&id).await?;
    let live = state.nodes.live();
    let policy = state.center.policy().await?;
    enrich(&state, &mut t, &live, &policy).await?;
    Ok(Json(t))
}

pub(super) async fn get_manifest(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    checked_id(&id)?;
    // The signature first: a manifest is written after its signature, so one read
    // after the other never pairs a new manifest with no signature.
    let signature = state.backend.manifest_signature(&id).await?;
    let Some(bytes) = state.backend.manifest_bytes(&id).await? else {
        return Err(BackendError::UnknownTemplate(id).into());
    };
    let mut response = json_bytes(bytes);
    if let Some(sig) = signature {
        let headers = response.headers_mut();
        for (name, value) in [(KEY_HEADER, sig.key), (SIGNATURE_HEADER, sig.signature)] {
            if let Ok(value) = HeaderValue::from_str(&value) {
                headers.insert(name, value);
            }
        }
    }
    Ok(response)
}

/// The signature sent with a manifest's PUT, if any, and whether the store trusts it.
fn offered_signature(
    state: &AppState,
    id: &str,
    headers: &HeaderMap,
    manifest: &[u8],
) -> Result<Option<ManifestSignature>, ApiError> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let signature =
        ManifestSignature::from_headers(id, header(KEY_HEADER), header(SIGNATURE_HEADER))
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
    if let Some(trusted) = &state.trusted_keys {
        trusted
            .check(id, manifest, signature.as_ref())
            .map_err(|e| {
                tracing::warn!(template = %id, error = %e, "manifest refused");
                ApiError::new(StatusCode::FORBIDDEN, format!("{e}; this store publishes only manifests signed by a key it trusts (--signing-key)"))
            })?;
    }
    Ok(signature)
}

pub(super) async fn put_manifest(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let bytes = read_body(body, MAX_JSON_BODY, "a manifest").await?;
    checked_id(&id)?;
    let signature = offered_signature(&state, &id, &headers, &bytes)?;
    let outcome = state
        .backend
        .put_manifest(&id, &bytes, signature.as_ref())
        .await?;
    let (status, created) = match outcome {
        ManifestPut::Created => {
            state.metrics.manifests_published.inc();
            tracing::info!(template = %id, "manifest published");
            // Its summary now, in the background: a DURABLE one is kept, so the next
            // listing does not read this manifest again.
            let backend = state.backend.clone();
            let summarized = id.clone();
            tokio::spawn(async move {
                let _ = backend.summary(&summarized).await;
            });
            (StatusCode::CREATED, true)
        }
        ManifestPut::Unchanged => (StatusCode::OK, false),
    };
    Ok((
        status,
        Json(serde_json::json!({ "template": id, "created": created })),
    )
        .into_response())
}

pub(super) async fn get_trace(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    checked_id(&id)?;
    Ok(json_bytes(state.backend.trace_bytes(&id).await?))
}

pub(super) async fn put_trace(
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Body,
) -> Result<Json<serde_json::Value>, ApiError> {
    let bytes = read_body(body, MAX_JSON_BODY, "a trace").await?;
    checked_id(&id)?;
    state.backend.put_trace(&id, &bytes).await?;
    Ok(Json(serde_json::json!({ "template": id })))
}

#[derive(Deserialize)]
pub(super) struct GcParams {
    /// Seconds; [`DEFAULT_GC_GRACE`] when absent.
    grace_secs: Option<u64>,
}

pub(super) async fn gc(
    State(state): State<AppState>,
    Query(params): Query<GcParams>,
) -> Result<Json<GcReport>, ApiError> {
    let grace = params
        .grace_secs
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_GC_GRACE);
    let keep = chunks_in_use(&state).await?;
    let report = state.backend.gc(grace, keep).await?;
    tracing::info!(
        deleted = report.chunks_deleted,
        bytes = report.bytes_freed,
        "gc swept unreferenced chunks"
    );
    Ok(Json(report))
}
