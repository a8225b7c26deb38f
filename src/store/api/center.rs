//! The template center's routes: wishes (where a template should be READY), the
//! fleet's view of a template, and the label policy; and the fleet's view and the
//! policy's verdict added to a template's summary.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;

use crate::store::center_wire::{FleetLine, Policy, PolicyBody, WishBody, WishRemoved};
use crate::store::TemplateSummary;

use super::state::{checked_id, ApiError, AppState};

/// Adds the fleet's view (replicas) and the policy's verdict (STALE) to a summary.
pub(super) async fn enrich(
    state: &AppState,
    t: &mut TemplateSummary,
    live: &[crate::store::nodes::NodeEntry],
    policy: &std::collections::BTreeMap<String, String>,
) -> Result<(), ApiError> {
    t.replicas = Some(state.center.counts(&t.template, live).await?);
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
    Ok(())
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
) -> Result<Json<WishRemoved>, ApiError> {
    checked_id(&id)?;
    let removed = state.center.remove(&id).await?;
    Ok(Json(WishRemoved {
        template: id,
        removed,
    }))
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
) -> Result<Json<Vec<crate::store::center::Wish>>, ApiError> {
    Ok(Json(state.center.wishes().await?))
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
            .await?
            .iter()
            .any(|w| w.template == id);
        let r = n.replicas.iter().find(|r| r.template == id);
        lines.push(FleetLine {
            node: n.id.clone(),
            url: n.url.clone(),
            phase: r.map_or("PENDING".into(), |r| r.phase.as_str().to_string()),
            local_chunks: r.map_or(0, |r| r.local_chunks),
            stored_chunks: r.map_or(0, |r| r.stored_chunks),
            last_error: r.and_then(|r| r.last_error.clone()),
            users: r.map(|r| r.users.clone()).unwrap_or_default(),
            wanted,
        });
    }
    Ok(Json(lines))
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
) -> Result<Json<Policy>, ApiError> {
    if let Some(m) = &body.minimum {
        // Checked when a rule is set, not when one is removed: a key stored before
        // the grammar can still go.
        lazyblk_cache::labels::validate_label_key(&key)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("policy: {e}")))?;
        let policy = state.center.policy().await?;
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
    Ok(Json(state.center.policy().await?))
}

pub(super) async fn get_policy(State(state): State<AppState>) -> Result<Json<Policy>, ApiError> {
    Ok(Json(state.center.policy().await?))
}
