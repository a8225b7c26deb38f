//! What every HTTP handler of the daemon shares: the state, the error answer, and the
//! `?force=` query.

use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::daemon::attach::Attachments;
use crate::daemon::fill::FillScheduler;
use crate::daemon::health::Scrubs;
use crate::daemon::node::Node;
use crate::http_server::ErrorAnswer;

/// What the API handlers share.
#[derive(Clone)]
pub struct ApiState {
    pub node: Arc<Node>,
    pub fill: Arc<FillScheduler>,
    /// Kernel block devices (`/dev/nbdN`) attached to exports.
    pub attachments: Arc<Attachments>,
    /// Bearer token required to read chunks (peers and origins), when configured.
    pub peer_token: Option<String>,
    /// Whether this node is in a fleet (`--advertise` or `--peers`): only then does it
    /// serve chunks to other nodes.
    pub fleet: bool,
    /// The bytes of chunk responses to peers in flight, node-wide.
    pub peer_budget: Arc<super::PeerBudget>,
    /// Bearer token required for changing requests (POST, PUT, DELETE), when configured.
    pub write_token: Option<String>,
    /// The node's scrub of its cache.
    pub scrubs: Arc<Scrubs>,
}

/// An API error: a status and a sentence.
pub struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorAnswer { error: self.1 })).into_response()
    }
}

/// Query of `POST /v1/templates/{id}/evict`.
#[derive(serde::Deserialize, Default)]
pub struct EvictQuery {
    #[serde(default)]
    pub force: bool,
}

/// Refuses an invalid template or sandbox id with 400.
pub fn checked_id(id: &str) -> Result<(), ApiError> {
    lazyblk_cache::validate_id(id).map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))
}
