//! `/v1/node` and `/v1/scrub`: the node's identity and cache health, and its scrub.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;

use super::state::ApiState;
use crate::daemon::health::{NodeInfo, ScrubProgress};

/// `GET /v1/node`.
pub async fn node_info(State(state): State<ApiState>) -> Json<NodeInfo> {
    Json(NodeInfo::of(&state.node))
}

/// `POST /v1/scrub`: starts a scrub unless one runs.
pub async fn start_scrub(State(state): State<ApiState>) -> (StatusCode, Json<ScrubProgress>) {
    let progress = state.scrubs.start(state.node.clone());
    (StatusCode::ACCEPTED, Json(progress))
}

/// `GET /v1/scrub`: the last scrub's progress or report.
pub async fn scrub_status(State(state): State<ApiState>) -> Json<ScrubProgress> {
    Json(state.scrubs.get())
}
