//! The daemon's HTTP API: replica status and control, chunk serving to peers, health and
//! metrics.

mod attach;
mod errors;
mod health;
mod peer;
mod peer_ranges;
mod sandboxes;
mod state;

pub use peer::PeerBudget;

pub use attach::AttachBody;
pub use sandboxes::{CommitBody, CreateOverlay};
use state::checked_id;
pub use state::{ApiError, ApiState, EvictQuery};

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::daemon::node::Node;
use crate::daemon::node_state::phases::Phase;
use crate::daemon::replica::Replica;
use crate::daemon::resize::ResizeOutcome;
use crate::store::Durability;

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/v1/node", get(health::node_info))
        .route("/v1/peer/chunks/{digest}", get(peer::peer_chunk))
        .route(
            "/v1/scrub",
            get(health::scrub_status).post(health::start_scrub),
        )
        .route("/v1/templates", get(list_templates))
        .route("/v1/templates/{id}", get(template_status))
        .route("/v1/templates/{id}/warm", post(warm))
        .route("/v1/templates/{id}/evict", post(evict))
        .route("/v1/templates/{id}/resize", post(resize))
        .route("/v1/overlays", get(sandboxes::list).post(sandboxes::create))
        .route(
            "/v1/overlays/{sb}",
            get(sandboxes::status).delete(sandboxes::delete),
        )
        .route("/v1/overlays/{sb}/commit", post(sandboxes::commit))
        .route("/v1/chunks/{digest}", get(peer::chunk).head(peer::chunk))
        .route("/v1/attachments", get(attach::list).post(attach::create))
        .route("/v1/attachments/{device}", delete(attach::remove))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_write_token,
        ))
        .with_state(state)
}

/// Refuses changing requests without the write token, when one is configured; reads
/// (status, metrics, chunks for peers) are not affected.
async fn require_write_token(
    State(state): State<ApiState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let changing = !matches!(
        *request.method(),
        axum::http::Method::GET | axum::http::Method::HEAD
    );
    if let (true, Some(token)) = (changing, &state.write_token) {
        if !crate::auth::carries(request.headers(), token) {
            // Answered at once, the body unread and the connection closed (see
            // crate::store::api::auth).
            return (
                [(header::CONNECTION, "close")],
                ApiError(
                    StatusCode::UNAUTHORIZED,
                    "this daemon needs its write token for changes (--token or LAZYBLK_WRITE_TOKEN)"
                        .into(),
                ),
            )
                .into_response();
        }
    }
    next.run(request).await
}

/// One replica as `lazyblk status` shows it.
#[derive(Serialize, Deserialize)]
pub struct ReplicaStatus {
    pub template: String,
    pub phase: Phase,
    /// For templates this node committed: ORIGIN_ONLY, UPLOADING or DURABLE.
    pub durability: Option<Durability>,
    pub pending_upload_chunks: Option<usize>,
    pub last_error_at: Option<String>,
    pub size: u64,
    pub chunk_size: u32,
    pub chunks: usize,
    pub stored_chunks: usize,
    pub local_chunks: usize,
    /// Bytes of the non-zero chunks, and of those that are local.
    pub stored_bytes: u64,
    pub local_bytes: u64,
    pub bytes_by_source: std::collections::BTreeMap<String, u64>,
    pub corrupt_chunks: u64,
    pub last_error: Option<String>,
    pub users: Vec<String>,
    pub origins: Vec<String>,
    pub parent: Option<String>,
}

pub fn replica_status(node: &Node, replica: &Replica) -> ReplicaStatus {
    let manifest = replica.manifest();
    let bytes = node.metrics.template_bytes(replica.id());
    let upload = node.uploads.status(replica.id());
    let fill = replica.fill_status();
    let (phase, fill_error, fill_error_at) = (fill.phase, fill.last_error, fill.last_error_at);
    ReplicaStatus {
        template: replica.id().to_string(),
        phase,
        durability: upload.as_ref().map(|u| u.durability),
        pending_upload_chunks: upload.as_ref().map(|u| u.pending_chunks),
        last_error_at: fill_error_at,
        size: manifest.size,
        chunk_size: manifest.chunk_size,
        chunks: manifest.chunk_count(),
        stored_chunks: manifest.stored_chunks().count(),
        local_chunks: replica.local_chunks(),
        stored_bytes: manifest.stored_bytes(),
        local_bytes: replica.local_bytes(),
        bytes_by_source: bytes.by_source,
        corrupt_chunks: bytes.corrupt,
        // A template this node refuses (--trusted-keys) says why first.
        last_error: (node.templates.trusted(replica.id()).err())
            .map(|e| e.to_string())
            .or(fill_error)
            .or(bytes.last_error),
        users: replica.users(),
        origins: manifest.origins.clone(),
        parent: manifest.parent.clone(),
    }
}

async fn list_templates(State(state): State<ApiState>) -> Json<Vec<ReplicaStatus>> {
    let node = &state.node;
    // Every known template, those dropped from memory read again for this listing.
    Json(
        node.templates
            .snapshot()
            .iter()
            .map(|r| replica_status(node, r))
            .collect(),
    )
}

async fn template_status(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<ReplicaStatus>, ApiError> {
    checked_id(&id)?;
    let replica = state.node.templates.replica(&id).await?;
    Ok(Json(replica_status(&state.node, &replica)))
}

/// What `POST /v1/templates/{id}/evict` answers.
#[derive(Serialize, Deserialize)]
pub struct EvictOutcome {
    pub template: String,
    pub removed_chunks: usize,
    /// The replica's phase after the eviction.
    pub phase: Phase,
}

/// Query of `POST /v1/templates/{id}/warm`.
#[derive(serde::Deserialize, Default)]
pub struct WarmQuery {
    #[serde(default)]
    pub redo: bool,
}

async fn warm(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    Query(query): Query<WarmQuery>,
) -> Result<Json<ReplicaStatus>, ApiError> {
    checked_id(&id)?;
    let replica = state.node.templates.replica(&id).await?;
    state.fill.warm(&replica, query.redo)?;
    Ok(Json(replica_status(&state.node, &replica)))
}

async fn evict(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    Query(query): Query<EvictQuery>,
) -> Result<Json<EvictOutcome>, ApiError> {
    checked_id(&id)?;
    let replica = state.node.templates.known(&id).ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("template {id:?} has no replica on this node"),
        )
    })?;
    let fill = state.fill.clone();
    let removed = fill.evict(&replica, query.force)?;
    Ok(Json(EvictOutcome {
        template: id,
        removed_chunks: removed,
        phase: replica.phase(),
    }))
}

/// Body of `POST /v1/templates/{id}/resize`.
#[derive(Serialize, Deserialize)]
pub struct ResizeBody {
    pub size: u64,
    pub template: String,
    /// Labels over the parent's.
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
}

async fn resize(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    Json(body): Json<ResizeBody>,
) -> Result<(StatusCode, Json<ResizeOutcome>), ApiError> {
    checked_id(&id)?;
    let outcome = state
        .node
        .resizes
        .resize(&id, body.size, &body.template, &body.labels)
        .await?;
    Ok((StatusCode::CREATED, Json(outcome)))
}

async fn metrics(State(state): State<ApiState>) -> Response {
    let node = &state.node;
    let usage = node.cache.usage();
    node.metrics.cache_bytes.set(usage.used_bytes as i64);
    node.metrics
        .cache_budget_bytes
        .set(usage.budget_bytes as i64);
    node.metrics.evictions.set(usage.evictions);
    node.metrics
        .replicas_in_memory
        .set(node.templates.all().len() as i64);
    node.metrics
        .templates_known
        .set(node.templates.known_ids().len() as i64);
    let health = node.cache.health();
    node.metrics
        .cache_degraded
        .set(i64::from(health.degraded()));
    node.metrics
        .cache_write_failures
        .set(health.write_failures());
    node.metrics.cache_corrupt_files.set(usage.corrupt_files);
    node.metrics.store_links.set(node.templates.store_sources());
    if let Some(peers) = &node.peers {
        node.metrics.set_peer_stats(&peers.stats());
    }
    for r in node.templates.all() {
        let label = crate::daemon::metric_labels::TemplateLabel {
            template: r.id().to_string(),
        };
        node.metrics
            .fill_chunks_local
            .get_or_create(&label)
            .set(r.local_chunks() as i64);
        node.metrics
            .fill_chunks_total
            .get_or_create(&label)
            .set(r.manifest().stored_chunks().count() as i64);
    }
    let registry = node
        .metrics
        .registry
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    crate::metrics::response(&registry)
}
