//! Guarded deletes: a template is deleted only while no live node reports a user of
//! it and the store's membership has settled; a forced delete leaves a tombstone, so gc
//! spares its chunks while a node that used it may still do.

use std::collections::BTreeMap;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use lazyblk_cache::Digest;
use serde::Deserialize;

use crate::printable::printable as clean;
use crate::store::backend::DocChange;
use crate::store::nodes::NodeEntry;

use super::state::{checked_id, ApiError, AppState};

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
