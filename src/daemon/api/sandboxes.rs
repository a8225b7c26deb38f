//! Sandboxes over HTTP: create, list, show, delete, and commit into a template.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;

use super::state::{checked_id, ApiError, ApiState, EvictQuery};
use crate::daemon::commit::CommitOutcome;
use crate::daemon::sandboxes::{SandboxError, SandboxStatus};

/// Body of `POST /v1/overlays`.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct CreateOverlay {
    pub template: String,
    pub sandbox: String,
}

pub(super) async fn create(
    State(state): State<ApiState>,
    Json(body): Json<CreateOverlay>,
) -> Result<(StatusCode, Json<SandboxStatus>), ApiError> {
    checked_id(&body.template)?;
    let sandbox = state
        .node
        .sandboxes
        .create(&body.template, &body.sandbox)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(state.node.sandboxes.status(&sandbox)),
    ))
}

pub(super) async fn list(State(state): State<ApiState>) -> Json<Vec<SandboxStatus>> {
    Json(
        state
            .node
            .sandboxes
            .all()
            .iter()
            .map(|s| state.node.sandboxes.status(s))
            .collect(),
    )
}

pub(super) async fn status(
    State(state): State<ApiState>,
    Path(sb): Path<String>,
) -> Result<Json<SandboxStatus>, ApiError> {
    let sandbox = state
        .node
        .sandboxes
        .get(&sb)
        .ok_or_else(|| ApiError::from(SandboxError::Unknown(sb.clone())))?;
    Ok(Json(state.node.sandboxes.status(&sandbox)))
}

pub(super) async fn delete(
    State(state): State<ApiState>,
    Path(sb): Path<String>,
    Query(query): Query<EvictQuery>,
) -> Result<StatusCode, ApiError> {
    state.node.sandboxes.delete(&sb, query.force).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Body of `POST /v1/overlays/{sb}/commit`.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct CommitBody {
    pub template: String,
    /// Labels over the parent's.
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
}

pub(super) async fn commit(
    State(state): State<ApiState>,
    Path(sb): Path<String>,
    Json(body): Json<CommitBody>,
) -> Result<(StatusCode, Json<CommitOutcome>), ApiError> {
    let outcome = state
        .node
        .commits
        .commit(&sb, &body.template, &body.labels)
        .await?;
    Ok((StatusCode::CREATED, Json(outcome)))
}
