//! The store's HTTP API (DESIGN.md section 7): routes, bearer tokens, JSON errors and
//! the store's Prometheus counters.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{MatchedPath, Path, Query, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;

use crate::auth::carries;
use lazyblk_cache::{validate_id, Digest};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::Deserialize;

use super::backend::{drain, Backend, BackendError, ChunkPut, ManifestPut, MAX_CHUNK_BODY};
use super::{GcReport, TemplateSummary};

/// The largest JSON body accepted (manifest, trace, missing list). The manifest of a
/// 50 GiB template at the smallest chunk size (64 KiB) lists 819,200 digests, about
/// 55 MB of JSON; this leaves room above that and still bounds what one request costs.
pub const MAX_JSON_BODY: u64 = 64 << 20;
/// How long gc keeps unreferenced chunks that were written or confirmed recently,
/// unless the request says otherwise: longer than a large publish takes between
/// uploading its chunks and putting its manifest.
pub const DEFAULT_GC_GRACE: Duration = Duration::from_secs(600);

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    backend: Arc<Backend>,
    /// The fleet's live nodes (leases renewed by heartbeats).
    nodes: Arc<super::nodes::Membership>,
    metrics: Arc<StoreMetrics>,
    tokens: Arc<Tokens>,
}

impl AppState {
    pub fn new(
        backend: Arc<Backend>,
        write_token: Option<String>,
        read_token: Option<String>,
    ) -> AppState {
        AppState {
            backend,
            nodes: Arc::default(),
            metrics: Arc::new(StoreMetrics::new()),
            tokens: Arc::new(Tokens {
                write: write_token.filter(|t| !t.is_empty()),
                read: read_token.filter(|t| !t.is_empty()),
            }),
        }
    }
}

/// The store's routes, with token checks and request counting on every one.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .route("/v1/templates", get(list_templates))
        .route(
            "/v1/templates/{id}",
            get(get_template).delete(delete_template),
        )
        .route(
            "/v1/templates/{id}/manifest",
            get(get_manifest).put(put_manifest),
        )
        .route("/v1/templates/{id}/trace", get(get_trace).put(put_trace))
        .route("/v1/gc", post(gc))
        .route("/v1/scrub", post(scrub))
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/nodes/{node}", axum::routing::put(renew_node))
        .route("/v1/chunks/missing", post(missing))
        .route(
            "/v1/chunks/{digest}",
            get(get_chunk).head(head_chunk).put(put_chunk),
        )
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such route".into()) })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this route".into(),
            )
        })
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .with_state(state)
}

/// The store's counters (`lazyblk_store_*`); tests read them to prove laziness, so each
/// counts exactly one event per request.
struct StoreMetrics {
    registry: Registry,
    chunks_served: Counter,
    bytes_served: Counter,
    chunks_uploaded: Counter,
    bytes_uploaded: Counter,
    digest_mismatch: Counter,
    manifests_published: Counter,
    http_requests: Family<HttpLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    /// The route pattern (`/v1/chunks/{digest}`), not the path, so digests do not
    /// make one series each.
    route: String,
    status: u16,
}

impl StoreMetrics {
    fn new() -> StoreMetrics {
        let mut registry = Registry::with_prefix("lazyblk_store");
        let mut counter = |name: &str, help: &str| {
            let c = Counter::default();
            registry.register(name, help, c.clone());
            c
        };
        let chunks_served = counter("chunks_served", "Chunks sent in full to GET requests");
        let bytes_served = counter("bytes_served", "Bytes of chunks sent to GET requests");
        let chunks_uploaded = counter("chunks_uploaded", "Chunks verified and newly stored");
        let bytes_uploaded = counter("bytes_uploaded", "Bytes of chunks newly stored");
        let digest_mismatch = counter(
            "digest_mismatch",
            "Chunk uploads refused because the body did not match its digest",
        );
        let manifests_published = counter("manifests_published", "Manifests newly stored");
        let http_requests = Family::<HttpLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by route and status",
            http_requests.clone(),
        );
        StoreMetrics {
            registry,
            chunks_served,
            bytes_served,
            chunks_uploaded,
            bytes_uploaded,
            digest_mismatch,
            manifests_published,
            http_requests,
        }
    }
}

/// The configured bearer tokens.
struct Tokens {
    /// Needed for every request that is not GET or HEAD.
    write: Option<String>,
    /// Needed (or the write token) for chunk reads.
    read: Option<String>,
}

impl Tokens {
    fn check(&self, method: &Method, path: &str, headers: &HeaderMap) -> Result<(), ApiError> {
        let matches = |t: &Option<String>| t.as_deref().is_some_and(|t| carries(headers, t));
        let reading = method == Method::GET || method == Method::HEAD;
        if !reading && self.write.is_some() && !matches(&self.write) {
            return Err(unauthorized("writes need the store's write token"));
        }
        let chunk_read = reading && path.starts_with("/v1/chunks/");
        if chunk_read && self.read.is_some() && !matches(&self.read) && !matches(&self.write) {
            return Err(unauthorized("chunk reads need the store's read token"));
        }
        Ok(())
    }
}

fn unauthorized(what: &str) -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        format!("missing or wrong bearer token: {what}"),
    )
}

async fn authorize(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let checked = state
        .tokens
        .check(request.method(), request.uri().path(), request.headers());
    match checked {
        Ok(()) => next.run(request).await,
        Err(e) => {
            // Read what the client is sending so it sees the 401 instead of a broken pipe.
            drain(request.into_body().into_data_stream(), MAX_CHUNK_BODY).await;
            e.into_response()
        }
    }
}

async fn count_requests(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let response = next.run(request).await;
    let labels = HttpLabels {
        route,
        status: response.status().as_u16(),
    };
    state.metrics.http_requests.get_or_create(&labels).inc();
    response
}

/// An error answer: `{"error": "..."}` with a status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: String) -> ApiError {
        ApiError { status, message }
    }

    fn bad_request(message: String) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }
}

impl From<BackendError> for ApiError {
    fn from(e: BackendError) -> ApiError {
        let status = match &e {
            BackendError::UnknownTemplate(_) | BackendError::NoTrace(_) => StatusCode::NOT_FOUND,
            BackendError::InvalidManifest(_)
            | BackendError::InvalidTrace { .. }
            | BackendError::DigestMismatch { .. }
            | BackendError::Body { .. } => StatusCode::BAD_REQUEST,
            BackendError::Conflict { .. } => StatusCode::CONFLICT,
            BackendError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            // The bucket behind the store failed, not the store itself.
            BackendError::Object { .. } => StatusCode::BAD_GATEWAY,
            BackendError::Corrupt { .. }
            | BackendError::Io { .. }
            | BackendError::Config { .. }
            | BackendError::Task(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!("{}", self.message);
        }
        (
            self.status,
            Json(serde_json::json!({ "error": self.message })),
        )
            .into_response()
    }
}

fn checked_id(id: &str) -> Result<(), ApiError> {
    validate_id(id).map_err(|e| ApiError::bad_request(e.to_string()))
}

fn checked_digest(digest: &str) -> Result<Digest, ApiError> {
    digest
        .parse()
        .map_err(|e: lazyblk_cache::digest::DigestParseError| ApiError::bad_request(e.to_string()))
}

/// Reads a whole request body of at most `limit` bytes.
async fn read_body(body: Body, limit: u64, what: &str) -> Result<Bytes, ApiError> {
    let mut stream = body.into_data_stream();
    let mut out = Vec::new();
    while let Some(piece) = stream.next().await {
        let piece =
            piece.map_err(|e| ApiError::bad_request(format!("reading the body of {what}: {e}")))?;
        if (out.len() + piece.len()) as u64 > limit {
            return Err(BackendError::TooLarge {
                what: what.to_string(),
                limit,
            }
            .into());
        }
        out.extend_from_slice(&piece);
    }
    Ok(Bytes::from(out))
}

fn json_bytes(bytes: Vec<u8>) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], bytes).into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    crate::metrics::response(&state.metrics.registry)
}

async fn list_templates(
    State(state): State<AppState>,
) -> Result<Json<Vec<TemplateSummary>>, ApiError> {
    Ok(Json(state.backend.list().await?))
}

async fn get_template(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<TemplateSummary>, ApiError> {
    checked_id(&id)?;
    Ok(Json(state.backend.summary(&id).await?))
}

async fn delete_template(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    checked_id(&id)?;
    state.backend.delete(&id).await?;
    tracing::info!(template = %id, "template deleted");
    Ok(Json(serde_json::json!({ "deleted": id })))
}

async fn get_manifest(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    checked_id(&id)?;
    match state.backend.manifest_bytes(&id).await? {
        Some(bytes) => Ok(json_bytes(bytes)),
        None => Err(BackendError::UnknownTemplate(id).into()),
    }
}

async fn put_manifest(
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let bytes = read_body(body, MAX_JSON_BODY, "a manifest").await?;
    checked_id(&id)?;
    let outcome = state.backend.put_manifest(&id, &bytes).await?;
    let (status, created) = match outcome {
        ManifestPut::Created => {
            state.metrics.manifests_published.inc();
            tracing::info!(template = %id, "manifest published");
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

async fn get_trace(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    checked_id(&id)?;
    Ok(json_bytes(state.backend.trace_bytes(&id).await?))
}

async fn put_trace(
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
struct GcParams {
    /// Seconds; [`DEFAULT_GC_GRACE`] when absent.
    grace_secs: Option<u64>,
}

async fn gc(
    State(state): State<AppState>,
    Query(params): Query<GcParams>,
) -> Result<Json<GcReport>, ApiError> {
    let grace = params
        .grace_secs
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_GC_GRACE);
    let report = state.backend.gc(grace).await?;
    tracing::info!(
        deleted = report.chunks_deleted,
        bytes = report.bytes_freed,
        "gc swept unreferenced chunks"
    );
    Ok(Json(report))
}

/// `GET /v1/nodes`: the live nodes.
async fn list_nodes(State(state): State<AppState>) -> Json<Vec<super::nodes::NodeEntry>> {
    Json(state.nodes.live())
}

/// `PUT /v1/nodes/{node}`: renews a node's lease; answers with the live nodes, so one
/// request a heartbeat keeps every node's view of the fleet current.
async fn renew_node(
    State(state): State<AppState>,
    Path(node): Path<String>,
    Json(beat): Json<super::nodes::Heartbeat>,
) -> Result<Json<Vec<super::nodes::NodeEntry>>, ApiError> {
    let valid = !node.is_empty()
        && node.len() <= 64
        && node.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if !valid || !(beat.url.starts_with("http://") || beat.url.starts_with("https://")) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("bad heartbeat: node id {node:?} (hex or alphanumerics) and an http(s) URL"),
        ));
    }
    state.nodes.renew(&node, beat);
    Ok(Json(state.nodes.live()))
}

/// `POST /v1/scrub`: hashes every stored chunk, deletes bad ones (a write: it needs the
/// write token when one is set).
async fn scrub(
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

fn chunk_headers(len: u64) -> [(header::HeaderName, String); 2] {
    [
        (header::CONTENT_TYPE, "application/octet-stream".to_string()),
        (header::CONTENT_LENGTH, len.to_string()),
    ]
}

async fn get_chunk(
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

async fn head_chunk(
    State(state): State<AppState>,
    Path(digest): Path<String>,
) -> Result<Response, ApiError> {
    let digest = checked_digest(&digest)?;
    match state.backend.chunk_len(&digest).await? {
        Some(len) => Ok((chunk_headers(len), Body::empty()).into_response()),
        None => Ok(StatusCode::NOT_FOUND.into_response()),
    }
}

async fn put_chunk(
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

async fn missing(State(state): State<AppState>, body: Body) -> Result<Json<Vec<Digest>>, ApiError> {
    let bytes = read_body(body, MAX_JSON_BODY, "the digest list").await?;
    let digests: Vec<Digest> = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::bad_request(format!("expected a JSON list of chunk digests: {e}"))
    })?;
    Ok(Json(state.backend.missing(digests).await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_guard_writes_and_chunk_reads() {
        let tokens = Tokens {
            write: Some("w".into()),
            read: Some("r".into()),
        };
        let auth = |t: &str| {
            let mut h = HeaderMap::new();
            h.insert(
                header::AUTHORIZATION,
                format!("Bearer {t}").parse().unwrap(),
            );
            h
        };
        let none = HeaderMap::new();
        assert!(tokens.check(&Method::PUT, "/v1/chunks/x", &none).is_err());
        assert!(tokens
            .check(&Method::PUT, "/v1/chunks/x", &auth("r"))
            .is_err());
        assert!(tokens
            .check(&Method::PUT, "/v1/chunks/x", &auth("w"))
            .is_ok());
        assert!(tokens.check(&Method::GET, "/v1/chunks/x", &none).is_err());
        assert!(tokens
            .check(&Method::GET, "/v1/chunks/x", &auth("r"))
            .is_ok());
        assert!(tokens
            .check(&Method::HEAD, "/v1/chunks/x", &auth("w"))
            .is_ok());
        assert!(tokens.check(&Method::GET, "/v1/templates", &none).is_ok());
    }
}
