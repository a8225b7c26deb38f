//! Node leases: a node joins, renews and leaves with requests signed by its key and
//! admitted by `--member-keys`; the live nodes are listed.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::Json;

use crate::printable::printable as clean;
use crate::store::admission::checked_url;
use crate::store::nodes::{Heartbeat, NodeEntry, MAX_HEARTBEAT_BODY};

use super::state::{read_body, ApiError, AppState};

/// `GET /v1/nodes`: the live nodes, with their reports.
pub(super) async fn list_nodes(State(state): State<AppState>) -> Json<Vec<NodeEntry>> {
    Json(state.nodes.live())
}

/// The proven sender of a signed lease request (see [`crate::identity`]), admitted by
/// `--member-keys`.
fn proven(
    state: &AppState,
    headers: &HeaderMap,
    method: &str,
    path: &str,
    body: &[u8],
    node: &str,
) -> Result<crate::identity::Proof, ApiError> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let proof =
        crate::identity::verify(header, method, path, body, node, crate::identity::now_ms())
            .map_err(|e| {
                ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    format!("lease of node {}: {e}", clean(node)),
                )
            })?;
    state
        .admission
        .admits_key(&proof.public_hex(), &proof.id)
        .map_err(|e| ApiError::new(StatusCode::FORBIDDEN, e))?;
    Ok(proof)
}

fn lease_refused(e: crate::store::nodes::LeaseError) -> ApiError {
    let status = match e {
        crate::store::nodes::LeaseError::Full(_) => StatusCode::SERVICE_UNAVAILABLE,
        crate::store::nodes::LeaseError::Replayed(_) => StatusCode::CONFLICT,
    };
    ApiError::new(status, e.to_string())
}

/// `PUT /v1/nodes/{node}`: renews a node's lease, signed by the node's key; answers
/// with the live nodes (ids, addresses, keys: not their reports) and what this node
/// should keep READY.
pub(super) async fn renew_node(
    State(state): State<AppState>,
    Path(node): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<crate::store::center::HeartbeatAnswer>, ApiError> {
    let bytes = read_body(body, MAX_HEARTBEAT_BODY as u64, "a heartbeat").await?;
    let proof = proven(&state, &headers, "PUT", uri.path(), &bytes, &node)?;
    let mut beat: Heartbeat = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("bad heartbeat of node {node}: {e}")))?;
    if let Some(why) = beat.over_bounds() {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("heartbeat of node {node} refused: {why}"),
        ));
    }
    beat.url = checked_url(&beat.url).map_err(ApiError::bad_request)?;
    state
        .admission
        .admits_url(&beat.url)
        .await
        .map_err(|e| ApiError::new(StatusCode::FORBIDDEN, e))?;
    state
        .nodes
        .renew(&node, proof.public_hex(), proof.at_ms, beat)
        .map_err(lease_refused)?;
    // A join is durable before it is answered: a restarted store then waits for it.
    state.persist_members().await?;
    // Placement needs ids and addresses only, not every node's report.
    let nodes = state.nodes.members();
    let warm = state.center.wanted_on(&node, &nodes).await?;
    Ok(Json(crate::store::center::HeartbeatAnswer { nodes, warm }))
}

/// `DELETE /v1/nodes/{node}`: a node that shuts down cleanly leaves at once (signed by
/// its key), so its chunks move to the next owners without waiting for its lease.
pub(super) async fn leave_node(
    State(state): State<AppState>,
    Path(node): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<serde_json::Value>, ApiError> {
    let bytes = read_body(body, MAX_HEARTBEAT_BODY as u64, "a leave").await?;
    let proof = proven(&state, &headers, "DELETE", uri.path(), &bytes, &node)?;
    let left = state
        .nodes
        .leave(&node, proof.at_ms)
        .map_err(lease_refused)?;
    state.persist_members().await?;
    Ok(Json(serde_json::json!({ "node": node, "left": left })))
}
