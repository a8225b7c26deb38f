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
    /// Wishes and the label policy.
    center: Arc<super::center::Center>,
    metrics: Arc<StoreMetrics>,
    tokens: Arc<Tokens>,
}

impl AppState {
    pub fn new(
        backend: Arc<Backend>,
        center: Arc<super::center::Center>,
        write_token: Option<String>,
        read_token: Option<String>,
    ) -> AppState {
        AppState {
            backend,
            center,
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
        .route("/v1/wishes", get(list_wishes))
        .route(
            "/v1/wishes/{id}",
            axum::routing::put(put_wish).delete(delete_wish),
        )
        .route("/v1/wishes/{id}/redo", post(redo_wish))
        .route("/v1/fleet/{id}", get(fleet_status))
        .route("/v1/policy", get(get_policy))
        .route("/v1/policy/{key}", axum::routing::put(put_policy))
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
    /// The template center's view, set at each scrape.
    fleet: FleetGauges,
}

/// The template center's gauges (DESIGN section 10): live nodes, replicas by template
/// and phase, the wishes' targets, STALE templates.
#[derive(Default)]
struct FleetGauges {
    live_nodes: prometheus_client::metrics::gauge::Gauge,
    replicas: Family<ReplicaLabels, prometheus_client::metrics::gauge::Gauge>,
    wanted: Family<TemplateOnly, prometheus_client::metrics::gauge::Gauge>,
    stale: Family<TemplateOnly, prometheus_client::metrics::gauge::Gauge>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReplicaLabels {
    template: String,
    phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TemplateOnly {
    template: String,
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
        let fleet = FleetGauges::default();
        registry.register(
            "live_nodes",
            "Nodes with a live lease",
            fleet.live_nodes.clone(),
        );
        registry.register(
            "replicas",
            "Replicas of each template on live nodes, by phase",
            fleet.replicas.clone(),
        );
        registry.register(
            "replicas_wanted",
            "Live nodes a wish wants each template READY on",
            fleet.wanted.clone(),
        );
        registry.register(
            "template_stale",
            "1 for a template below the label policy",
            fleet.stale.clone(),
        );
        StoreMetrics {
            registry,
            fleet,
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
    let live = state.nodes.live();
    let fleet = &state.metrics.fleet;
    fleet.live_nodes.set(live.len() as i64);
    fleet.replicas.clear();
    for n in &live {
        for r in &n.replicas {
            fleet
                .replicas
                .get_or_create(&ReplicaLabels {
                    template: r.template.clone(),
                    phase: r.phase.clone(),
                })
                .inc();
        }
    }
    fleet.wanted.clear();
    for w in state.center.wishes().await {
        let wanted = state.center.counts(&w.template, &live).await.wanted;
        fleet
            .wanted
            .get_or_create(&TemplateOnly {
                template: w.template,
            })
            .set(wanted as i64);
    }
    let policy = state.center.policy().await;
    fleet.stale.clear();
    if !policy.is_empty() {
        if let Ok(mut list) = state.backend.list().await {
            for t in &mut list {
                enrich(&state, t, &live, &policy).await;
                fleet
                    .stale
                    .get_or_create(&TemplateOnly {
                        template: t.template.clone(),
                    })
                    .set(i64::from(t.stale));
            }
        }
    }
    crate::metrics::response(&state.metrics.registry)
}

async fn list_templates(
    State(state): State<AppState>,
) -> Result<Json<Vec<TemplateSummary>>, ApiError> {
    let mut list = state.backend.list().await?;
    let live = state.nodes.live();
    let policy = state.center.policy().await;
    for t in &mut list {
        enrich(&state, t, &live, &policy).await;
    }
    Ok(Json(list))
}

/// Adds the fleet's view (replicas) and the policy's verdict (STALE) to a summary.
async fn enrich(
    state: &AppState,
    t: &mut TemplateSummary,
    live: &[super::nodes::NodeEntry],
    policy: &std::collections::BTreeMap<String, String>,
) {
    t.replicas = Some(state.center.counts(&t.template, live).await);
    for (key, minimum) in policy {
        let version = t.labels.get(key).map(String::as_str).unwrap_or("");
        if super::center::below(version, minimum) {
            t.stale = true;
            t.stale_because = Some(format!(
                "label {key}={} is below {minimum}",
                if version.is_empty() {
                    "(none)"
                } else {
                    version
                }
            ));
            break;
        }
    }
}

async fn get_template(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<TemplateSummary>, ApiError> {
    checked_id(&id)?;
    let mut t = state.backend.summary(&id).await?;
    let live = state.nodes.live();
    let policy = state.center.policy().await;
    enrich(&state, &mut t, &live, &policy).await;
    Ok(Json(t))
}

/// The document of forced deletes still in use somewhere: template id to manifest.
const TOMBSTONES_DOC: &str = "deleted.json";

async fn tombstones(
    state: &AppState,
) -> Result<std::collections::BTreeMap<String, String>, ApiError> {
    Ok(match state.backend.doc(TOMBSTONES_DOC).await? {
        Some(b) => serde_json::from_slice(&b).unwrap_or_default(),
        None => Default::default(),
    })
}

async fn save_tombstones(
    state: &AppState,
    t: &std::collections::BTreeMap<String, String>,
) -> Result<(), ApiError> {
    let bytes = serde_json::to_vec(t).unwrap_or_default();
    Ok(state.backend.put_doc(TOMBSTONES_DOC, bytes).await?)
}

/// The chunks gc must keep although no manifest names them: those of templates deleted
/// with --force that a live node still reports in use (an overlay's base, an export).
/// Tombstones no live node uses any more are dropped.
async fn chunks_in_use(state: &AppState) -> Result<std::collections::HashSet<Digest>, ApiError> {
    let live = state.nodes.live();
    let in_use = |id: &str| {
        live.iter().any(|n| {
            n.replicas
                .iter()
                .any(|r| r.template == id && !r.users.is_empty())
        })
    };
    let mut tombstones = tombstones(state).await?;
    let before = tombstones.len();
    tombstones.retain(|id, _| in_use(id));
    if tombstones.len() != before {
        save_tombstones(state, &tombstones).await?;
    }
    let mut keep = std::collections::HashSet::new();
    for (id, json) in &tombstones {
        if let Ok(m) = lazyblk_cache::Manifest::parse(json.as_bytes(), Some(id)) {
            keep.extend(m.stored_chunks().map(|(_, d)| d));
        }
    }
    Ok(keep)
}

/// Query of `DELETE /v1/templates/{id}`.
#[derive(Deserialize, Default)]
struct ForceQuery {
    #[serde(default)]
    force: bool,
}

/// Removes a template, refused while a live node reports a user of it (the error names
/// the nodes and users) unless `?force=true`. A forced delete keeps the manifest as a
/// tombstone, so gc spares its chunks while any live node still uses them.
async fn delete_template(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(query): Query<ForceQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    checked_id(&id)?;
    let users: Vec<String> = state
        .nodes
        .live()
        .iter()
        .flat_map(|n| {
            n.replicas
                .iter()
                .filter(|r| r.template == id && !r.users.is_empty())
                .map(move |r| format!("node {} ({}): {}", n.id, n.url, r.users.join(", ")))
        })
        .collect();
    if !users.is_empty() && !query.force {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "template {id} is in use by {}; use --force to delete it anyway",
                users.join("; ")
            ),
        ));
    }
    if !users.is_empty() {
        if let Some(bytes) = state.backend.manifest_bytes(&id).await? {
            let mut tombstones = tombstones(&state).await?;
            tombstones.insert(id.clone(), String::from_utf8_lossy(&bytes).into_owned());
            save_tombstones(&state, &tombstones).await?;
        }
    }
    state.backend.delete(&id).await?;
    tracing::info!(template = %id, forced = query.force, "template deleted");
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
    let keep = chunks_in_use(&state).await?;
    let report = state.backend.gc(grace, keep).await?;
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
) -> Result<Json<super::nodes::HeartbeatAnswer>, ApiError> {
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
    let nodes = state.nodes.live();
    let warm = state.center.wanted_on(&node, &nodes).await;
    Ok(Json(super::nodes::HeartbeatAnswer { nodes, warm }))
}

/// Body of `PUT /v1/wishes/{id}`: where the template should be READY.
#[derive(Deserialize)]
struct WishBody {
    placement: super::center::Placement,
}

/// `PUT /v1/wishes/{id}`: records a wish (the last word wins). The template must exist;
/// named nodes must be live (by id or address).
async fn put_wish(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Json(body): Json<WishBody>,
) -> Result<Json<super::center::Wish>, ApiError> {
    checked_id(&id)?;
    if state.backend.manifest_bytes(&id).await?.is_none() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("unknown template {id}: publish it before warming it"),
        ));
    }
    match &body.placement {
        super::center::Placement::Nodes(names) => {
            let live = state.nodes.live();
            let unknown: Vec<&String> = names
                .iter()
                .filter(|n| {
                    !live
                        .iter()
                        .any(|l| &l.id == *n || l.url == n.trim_end_matches('/'))
                })
                .collect();
            if names.is_empty() || !unknown.is_empty() {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("no live node is named {unknown:?} (lazyblk nodes lists them by id and address)"),
                ));
            }
        }
        super::center::Placement::MinReplicas(0) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "--min-replicas must be at least 1".into(),
            ));
        }
        _ => {}
    }
    let wish = state
        .center
        .set(super::center::Wish {
            template: id,
            placement: body.placement,
            redo: 0,
        })
        .await?;
    Ok(Json(wish))
}

/// `DELETE /v1/wishes/{id}`: removes the wish; the nodes unpin the template.
async fn delete_wish(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    checked_id(&id)?;
    let had = state.center.remove(&id).await?;
    Ok(Json(serde_json::json!({ "template": id, "removed": had })))
}

/// `POST /v1/wishes/{id}/redo`: the nodes where the template FAILED retry it.
async fn redo_wish(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<super::center::Wish>, ApiError> {
    checked_id(&id)?;
    state.center.redo(&id).await?.map(Json).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no wish for {id}: warm it with --all-nodes, --nodes or --min-replicas first"),
        )
    })
}

async fn list_wishes(State(state): State<AppState>) -> Json<Vec<super::center::Wish>> {
    Json(state.center.wishes().await)
}

/// One node's line in `status ID --fleet`.
#[derive(serde::Serialize)]
struct FleetLine {
    node: String,
    url: String,
    phase: String,
    local_chunks: usize,
    stored_chunks: usize,
    last_error: Option<String>,
    users: Vec<String>,
    wanted: bool,
}

/// `GET /v1/fleet/{id}`: the template's replica on every live node.
async fn fleet_status(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Vec<FleetLine>>, ApiError> {
    checked_id(&id)?;
    let live = state.nodes.live();
    let mut lines = Vec::new();
    for n in &live {
        let wanted = state
            .center
            .wanted_on(&n.id, &live)
            .await
            .iter()
            .any(|w| w.template == id);
        let r = n.replicas.iter().find(|r| r.template == id);
        lines.push(FleetLine {
            node: n.id.clone(),
            url: n.url.clone(),
            phase: r.map_or("PENDING".into(), |r| r.phase.clone()),
            local_chunks: r.map_or(0, |r| r.local_chunks),
            stored_chunks: r.map_or(0, |r| r.stored_chunks),
            last_error: r.and_then(|r| r.last_error.clone()),
            users: r.map(|r| r.users.clone()).unwrap_or_default(),
            wanted,
        });
    }
    Ok(Json(lines))
}

/// Body of `PUT /v1/policy/{key}`.
#[derive(Deserialize)]
struct PolicyBody {
    /// `>=VERSION`, or null to remove the rule.
    minimum: Option<String>,
}

async fn put_policy(
    State(state): State<AppState>,
    Path(key): Path<String>,
    Json(body): Json<PolicyBody>,
) -> Result<Json<std::collections::BTreeMap<String, String>>, ApiError> {
    if let Some(m) = &body.minimum {
        let v = m.trim().trim_start_matches(">=");
        if v.is_empty() || v.split('.').any(|p| p.parse::<u64>().is_err()) {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("policy {m:?}: expected >=VERSION with dotted numbers, e.g. '>=1.4.2'"),
            ));
        }
    }
    state.center.set_policy(&key, body.minimum).await?;
    Ok(Json(state.center.policy().await))
}

async fn get_policy(
    State(state): State<AppState>,
) -> Json<std::collections::BTreeMap<String, String>> {
    Json(state.center.policy().await)
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
