//! The template center's routes: node leases, wishes, the fleet's view of a template,
//! the label policy, and deletes that a node's use refuses.

use std::collections::BTreeMap;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::Json;
use lazyblk_cache::Digest;
use serde::Deserialize;

use crate::printable::printable as clean;
use crate::store::admission::checked_url;
use crate::store::backend::DocChange;
use crate::store::center_wire::{FleetLine, Policy, PolicyBody, WishBody, WishRemoved};
use crate::store::nodes::{Heartbeat, NodeEntry, MAX_HEARTBEAT_BODY};
use crate::store::TemplateSummary;

use super::state::{checked_id, read_body, ApiError, AppState};

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

/// The document of forced deletes still in use somewhere (see [`Tombstone`]).
pub(super) const TOMBSTONES_DOC: &str = "deleted.json";
/// How long a tombstone waits for a node that used its template and then went away
/// (crashed, partitioned, rescheduled) to come back and say whether it still does.
pub(super) const TOMBSTONE_HOLD: std::time::Duration = std::time::Duration::from_secs(6 * 3600);
/// The node a tombstone of an older store (which did not say who used it) waits for.
const UNKNOWN_USER: &str = "(a node of an older store)";

/// A template deleted with `--force` while nodes used it: its manifest (gc spares its
/// chunks) and, for each node that reported a user of it, when it last did.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(super) struct Tombstone {
    manifest: String,
    /// Node id to the unix second it last reported a user of the template.
    users: BTreeMap<String, u64>,
}

impl Tombstone {
    /// Brings the users up to date with `live` at `now` (unix seconds): a live node that
    /// reports a user is seen again, a live node that reports none is done with it, a
    /// node gone for [`TOMBSTONE_HOLD`] is forgotten. Whether anyone may still use it:
    /// a tombstone is never dropped because the view is empty, only because every node
    /// that used the template has said it no longer does, or has been gone for hours.
    fn refresh(&mut self, id: &str, live: &[NodeEntry], now: u64) -> bool {
        for n in live {
            if uses(n, id) {
                self.users.insert(n.id.clone(), now);
            } else {
                self.users.remove(&n.id);
            }
        }
        self.users
            .retain(|_, seen| now.saturating_sub(*seen) < TOMBSTONE_HOLD.as_secs());
        !self.users.is_empty()
    }
}

fn uses(node: &NodeEntry, template: &str) -> bool {
    node.replicas
        .iter()
        .any(|r| r.template == template && !r.users.is_empty())
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The tombstones in a stored [`TOMBSTONES_DOC`] (none when there is none).
fn parse_tombstones(bytes: Option<&[u8]>) -> Result<BTreeMap<String, Tombstone>, ApiError> {
    let Some(bytes) = bytes else {
        return Ok(BTreeMap::new());
    };
    if let Ok(t) = serde_json::from_slice(bytes) {
        return Ok(t);
    }
    // An older store kept id to manifest, without the users: wait for whoever it was.
    match serde_json::from_slice::<BTreeMap<String, String>>(bytes) {
        Ok(old) => Ok(old
            .into_iter()
            .map(|(id, manifest)| {
                let users = BTreeMap::from([(UNKNOWN_USER.to_string(), unix_now())]);
                (id, Tombstone { manifest, users })
            })
            .collect()),
        Err(e) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("center/{TOMBSTONES_DOC} is unreadable ({e}); gc refuses to run without it"),
        )),
    }
}

/// Changes the tombstones by compare-and-swap (another store server may be changing
/// them too); `change` says whether it changed anything. The tombstones as stored.
async fn update_tombstones(
    state: &AppState,
    mut change: impl FnMut(&mut BTreeMap<String, Tombstone>) -> bool,
) -> Result<BTreeMap<String, Tombstone>, ApiError> {
    state
        .backend
        .update_doc(TOMBSTONES_DOC, |bytes| {
            let mut stones = parse_tombstones(bytes)?;
            Ok::<_, ApiError>(if change(&mut stones) {
                let bytes = serde_json::to_vec_pretty(&stones).unwrap_or_default();
                DocChange::Write(bytes, stones)
            } else {
                DocChange::Keep(stones)
            })
        })
        .await
}

/// Refuses while the store's membership is too young to be trusted: it restarted and
/// has not heard from every node it knew.
pub(super) fn settled(state: &AppState, what: &str) -> Result<(), ApiError> {
    match state.nodes.unsettled() {
        None => Ok(()),
        Some((waiting, left)) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "{what} refused: the store restarted and has not heard from every node it knew yet \
                 ({} of them, e.g. {}); its view of who uses what is not trusted for {} s more",
                waiting.len(),
                waiting.first().map(String::as_str).unwrap_or(""),
                left.as_secs() + 1
            ),
        )),
    }
}

/// The chunks gc must keep although no manifest names them: those of templates deleted
/// with --force that a node may still use (an overlay's base, an export). Tombstones
/// that no node uses any more are dropped.
pub(super) async fn chunks_in_use(
    state: &AppState,
) -> Result<std::collections::HashSet<Digest>, ApiError> {
    settled(state, "gc")?;
    let live = state.nodes.live();
    let now = unix_now();
    let tombstones = update_tombstones(state, |stones| {
        let before = stones.clone();
        stones.retain(|id, t| t.refresh(id, &live, now));
        *stones != before
    })
    .await?;
    let mut keep = std::collections::HashSet::new();
    for (id, t) in &tombstones {
        if let Ok(m) = lazyblk_cache::Manifest::parse(t.manifest.as_bytes(), Some(id)) {
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
/// the nodes and users) unless `?force=true`, and while the store's membership has not
/// settled after a restart. A forced delete keeps the manifest as a tombstone, so gc
/// spares its chunks while any node that used it may still do.
pub(super) async fn delete_template(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(query): Query<ForceQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    checked_id(&id)?;
    settled(&state, &format!("deleting template {id}"))?;
    let live = state.nodes.live();
    let users: Vec<String> = live
        .iter()
        .flat_map(|n| {
            n.replicas
                .iter()
                .filter(|r| r.template == id && !r.users.is_empty())
                .map(move |r| {
                    clean(&format!(
                        "node {} ({}): {}",
                        n.id,
                        n.url,
                        r.users.join(", ")
                    ))
                    .into_owned()
                })
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
            let mut stone = Tombstone {
                manifest: String::from_utf8_lossy(&bytes).into_owned(),
                users: BTreeMap::new(),
            };
            stone.refresh(&id, &live, unix_now());
            update_tombstones(&state, |stones| {
                stones.insert(id.clone(), stone.clone());
                true
            })
            .await?;
        }
    }
    state.backend.delete(&id).await?;
    tracing::info!(template = %id, forced = query.force, "template deleted");
    Ok(Json(serde_json::json!({ "deleted": id })))
}

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
