//! The template center's routes: node leases, wishes, the fleet's view of a template,
//! the label policy, and deletes that a node's use refuses.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use lazyblk_cache::Digest;
use serde::Deserialize;

use crate::store::TemplateSummary;

use super::state::{checked_id, ApiError, AppState};

/// Adds the fleet's view (replicas) and the policy's verdict (STALE) to a summary.
pub(super) async fn enrich(
    state: &AppState,
    t: &mut TemplateSummary,
    live: &[crate::store::nodes::NodeEntry],
    policy: &std::collections::BTreeMap<String, String>,
) {
    t.replicas = Some(state.center.counts(&t.template, live).await);
    for (key, minimum) in policy {
        let version = t.labels.get(key).map(String::as_str).unwrap_or("");
        if crate::store::center::below(version, minimum) {
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

/// The document of forced deletes still in use somewhere: template id to manifest.
pub(super) const TOMBSTONES_DOC: &str = "deleted.json";

pub(super) async fn tombstones(
    state: &AppState,
) -> Result<std::collections::BTreeMap<String, String>, ApiError> {
    Ok(match state.backend.doc(TOMBSTONES_DOC).await? {
        Some(b) => serde_json::from_slice(&b).unwrap_or_default(),
        None => Default::default(),
    })
}

pub(super) async fn save_tombstones(
    state: &AppState,
    t: &std::collections::BTreeMap<String, String>,
) -> Result<(), ApiError> {
    let bytes = serde_json::to_vec(t).unwrap_or_default();
    Ok(state.backend.put_doc(TOMBSTONES_DOC, bytes).await?)
}

/// The chunks gc must keep although no manifest names them: those of templates deleted
/// with --force that a live node still reports in use (an overlay's base, an export).
/// Tombstones no live node uses any more are dropped.
pub(super) async fn chunks_in_use(
    state: &AppState,
) -> Result<std::collections::HashSet<Digest>, ApiError> {
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
            keep.extend(m.referenced());
        }
    }
    Ok(keep)
}

/// Query of `DELETE /v1/templates/{id}`.
#[derive(Deserialize, Default)]
pub(super) struct ForceQuery {
    #[serde(default)]
    force: bool,
}

/// Removes a template, refused while a live node reports a user of it (the error names
/// the nodes and users) unless `?force=true`. A forced delete keeps the manifest as a
/// tombstone, so gc spares its chunks while any live node still uses them.
pub(super) async fn delete_template(
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

/// `GET /v1/nodes`: the live nodes.
pub(super) async fn list_nodes(
    State(state): State<AppState>,
) -> Json<Vec<crate::store::nodes::NodeEntry>> {
    Json(state.nodes.live())
}

/// `PUT /v1/nodes/{node}`: renews a node's lease; answers with the live nodes, so one
/// request a heartbeat keeps every node's view of the fleet current.
pub(super) async fn renew_node(
    State(state): State<AppState>,
    Path(node): Path<String>,
    Json(beat): Json<crate::store::nodes::Heartbeat>,
) -> Result<Json<crate::store::center::HeartbeatAnswer>, ApiError> {
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
    Ok(Json(crate::store::center::HeartbeatAnswer { nodes, warm }))
}

/// `DELETE /v1/nodes/{node}`: a node that shuts down cleanly leaves at once, so its
/// chunks move to the next owners without waiting for its lease to run out.
pub(super) async fn leave_node(
    State(state): State<AppState>,
    Path(node): Path<String>,
) -> Json<serde_json::Value> {
    let left = state.nodes.leave(&node);
    Json(serde_json::json!({ "node": node, "left": left }))
}

/// Body of `PUT /v1/wishes/{id}`: where the template should be READY.
#[derive(Deserialize)]
pub(super) struct WishBody {
    placement: crate::store::center::Placement,
}

/// `PUT /v1/wishes/{id}`: records a wish (the last word wins). The template must exist;
/// named nodes must be live (by id or address).
pub(super) async fn put_wish(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Json(body): Json<WishBody>,
) -> Result<Json<crate::store::center::Wish>, ApiError> {
    checked_id(&id)?;
    if state.backend.manifest_bytes(&id).await?.is_none() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("unknown template {id}: publish it before warming it"),
        ));
    }
    match &body.placement {
        crate::store::center::Placement::Nodes(names) => {
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
        crate::store::center::Placement::MinReplicas(0) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "--min-replicas must be at least 1".into(),
            ));
        }
        _ => {}
    }
    let wish = state
        .center
        .set(crate::store::center::Wish {
            template: id,
            placement: body.placement,
            redo: 0,
        })
        .await?;
    Ok(Json(wish))
}

/// `DELETE /v1/wishes/{id}`: removes the wish; the nodes unpin the template.
pub(super) async fn delete_wish(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    checked_id(&id)?;
    let had = state.center.remove(&id).await?;
    Ok(Json(serde_json::json!({ "template": id, "removed": had })))
}

/// `POST /v1/wishes/{id}/redo`: the nodes where the template FAILED retry it.
pub(super) async fn redo_wish(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<crate::store::center::Wish>, ApiError> {
    checked_id(&id)?;
    state.center.redo(&id).await?.map(Json).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no wish for {id}: warm it with --all-nodes, --nodes or --min-replicas first"),
        )
    })
}

pub(super) async fn list_wishes(
    State(state): State<AppState>,
) -> Json<Vec<crate::store::center::Wish>> {
    Json(state.center.wishes().await)
}

/// One node's line in `status ID --fleet`.
#[derive(serde::Serialize)]
pub(super) struct FleetLine {
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
pub(super) async fn fleet_status(
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
pub(super) struct PolicyBody {
    /// `>=VERSION`, or null to remove the rule.
    minimum: Option<String>,
}

/// Longest policy minimum, in bytes: `>=` and a dotted version of a dozen or so parts.
const MAX_POLICY_MINIMUM: usize = 64;
/// Rules the policy may hold: every listing checks each template against each rule.
const MAX_POLICY_RULES: usize = 256;

/// `PUT /v1/policy/{key}`: sets or removes a label's minimum. The key follows the label
/// grammar (`lazyblk_cache::labels`), so `policy list` prints one line per rule.
pub(super) async fn put_policy(
    State(state): State<AppState>,
    Path(key): Path<String>,
    Json(body): Json<PolicyBody>,
) -> Result<Json<std::collections::BTreeMap<String, String>>, ApiError> {
    if let Some(m) = &body.minimum {
        // Checked when a rule is set, not when one is removed: a key stored before
        // the grammar can still go.
        lazyblk_cache::labels::validate_label_key(&key)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("policy: {e}")))?;
        let policy = state.center.policy().await;
        if !policy.contains_key(&key) && policy.len() >= MAX_POLICY_RULES {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("policy: {MAX_POLICY_RULES} rules already; unset one first"),
            ));
        }
        let v = m.trim().trim_start_matches(">=");
        if m.len() > MAX_POLICY_MINIMUM {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!(
                    "policy {key}: a minimum of {} bytes; minimums are at most {MAX_POLICY_MINIMUM}",
                    m.len()
                ),
            ));
        }
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

pub(super) async fn get_policy(
    State(state): State<AppState>,
) -> Json<std::collections::BTreeMap<String, String>> {
    Json(state.center.policy().await)
}
