//! `/v1/attachments`: kernel block devices connected to exports, over
//! [`crate::daemon::attach::Attachments`].

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;

use super::state::{ApiError, ApiState, EvictQuery};
use crate::daemon::attach::{AttachError, AttachmentStatus};

/// Body of `POST /v1/attachments`.
#[derive(serde::Serialize, Deserialize)]
pub struct AttachBody {
    /// A template id or sandbox id.
    pub export: String,
    /// `/dev/nbdN` or `nbdN`; the first free device when absent.
    pub device: Option<String>,
    /// Sockets the device gets (1 when absent; NBD only).
    pub connections: Option<u32>,
    /// "nbd" (when absent) or "ublk".
    pub kind: Option<String>,
}

/// `POST /v1/attachments`.
pub async fn create(
    State(state): State<ApiState>,
    Json(body): Json<AttachBody>,
) -> Result<(StatusCode, Json<AttachmentStatus>), ApiError> {
    // In its own task: a client that goes away mid-attach must not leave a device the
    // kernel has connected without a record here to detach it by.
    let ublk = match body.kind.as_deref() {
        None | Some("nbd") => false,
        Some("ublk") => true,
        Some(other) => {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                format!("kind must be \"nbd\" or \"ublk\", not {other:?}"),
            ))
        }
    };
    let attachments = state.attachments.clone();
    let status = tokio::spawn(async move {
        attachments
            .attach(
                &body.export,
                body.device.as_deref(),
                body.connections.unwrap_or(1),
                ublk,
            )
            .await
    })
    .await
    .map_err(|e| AttachError::Task {
        what: "the attach request".into(),
        detail: e.to_string(),
    })??;
    Ok((StatusCode::CREATED, Json(status)))
}

/// `GET /v1/attachments`.
pub async fn list(State(state): State<ApiState>) -> Json<Vec<AttachmentStatus>> {
    Json(state.attachments.list())
}

/// `DELETE /v1/attachments/{device}` (`nbdN`), `?force=true` to detach a mounted one.
pub async fn remove(
    State(state): State<ApiState>,
    Path(device): Path<String>,
    Query(query): Query<EvictQuery>,
) -> Result<Json<AttachmentStatus>, ApiError> {
    // In its own task, like an attach: a detach that has begun runs to the end.
    let attachments = state.attachments.clone();
    let status = tokio::spawn(async move { attachments.detach(&device, query.force).await })
        .await
        .map_err(|e| AttachError::Task {
            what: "the detach request".into(),
            detail: e.to_string(),
        })??;
    Ok(Json(status))
}
