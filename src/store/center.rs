//! The template center (DESIGN section 10): the fleet's replicas at a glance, and the
//! desired state that steers them. Heartbeats bring each node's replicas and users (soft
//! state, kept with the lease in [`super::nodes`]); operators record where a template
//! should be READY (a wish: every node, named nodes, or at least K nodes), which is kept
//! durably in the store (`center/wishes/<template>.json`, each changed by
//! compare-and-swap, so several store servers share them) and pulled by the nodes: each heartbeat's
//! answer says what this node should keep warm, and the node reconciles. Nothing is
//! pushed to a node.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::backend::{Backend, BackendError, DocChange, DocVersion};
use super::nodes::{NodeEntry, Phase, ReplicaPhase};

/// The document of the wishes a store of an earlier version kept (all in one); read
/// once at start, moved to one document per template, then removed.
const OLD_WISHES_DOC: &str = "wishes.json";
/// The folder of the wishes: `wishes/<template>.json`, one document per template, so
/// operators changing different templates through different servers never contend.
const WISHES_DIR: &str = "wishes";
/// The document that holds the label policy (rarely written: one document, updated by
/// compare-and-swap).
const POLICY_DOC: &str = "policy.json";
/// How long a server answers heartbeats and listings from the wishes it last read
/// before it lists them again: a wish recorded through another server reaches the
/// nodes within this plus a heartbeat. A listing costs one request per period plus a
/// read of each wish whose ETag changed.
pub const WISHES_REFRESH: std::time::Duration = std::time::Duration::from_secs(1);

/// Where a template should be READY.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    AllNodes,
    /// Node ids or addresses.
    Nodes(Vec<String>),
    MinReplicas(usize),
}

/// One template's wish.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wish {
    pub template: String,
    pub placement: Placement,
    /// Raised by `warm --failed`: nodes where the replica FAILED retry once per raise.
    #[serde(default)]
    pub redo: u64,
}

/// What a heartbeat's answer asks of one node: keep these templates READY.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Want {
    pub template: String,
    pub redo: u64,
}

/// A template's replicas over the live nodes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaCounts {
    pub ready: usize,
    pub distributing: usize,
    pub failed: usize,
    pub live_nodes: usize,
    /// Nodes a wish wants it READY on (0 without a wish).
    pub wanted: usize,
    /// READY k/n, PARTIALLY_READY, FAILED m, or "-".
    pub status: String,
}

/// The center's desired state. The wishes and the policy live in the bucket; what this
/// server holds is a read cache of them, refreshed every [`WISHES_REFRESH`] and after
/// each of its own writes, never the base of an update (every update reads the
/// document again and writes it only if unchanged: [`Backend::update_doc`]).
pub struct Center {
    backend: Arc<Backend>,
    cache: tokio::sync::Mutex<WishCache>,
}

/// The wishes as last read: each document's name, version and content.
#[derive(Default)]
struct WishCache {
    read_at: Option<std::time::Instant>,
    docs: BTreeMap<String, (Option<DocVersion>, Option<Wish>)>,
}

fn wish_doc(template: &str) -> String {
    format!("{WISHES_DIR}/{template}.json")
}

impl Center {
    /// The center over `backend`; wishes an earlier version kept in one document are
    /// moved to one document each first.
    pub async fn load(backend: Arc<Backend>) -> Result<Center, BackendError> {
        let center = Center {
            backend,
            cache: tokio::sync::Mutex::new(WishCache::default()),
        };
        center.migrate().await?;
        Ok(center)
    }

    async fn migrate(&self) -> Result<(), BackendError> {
        let Some(bytes) = self.backend.doc(OLD_WISHES_DOC).await? else {
            return Ok(());
        };
        let old: BTreeMap<String, Wish> = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            tracing::error!(error = %e, "center/{OLD_WISHES_DOC} is unreadable; its wishes are dropped");
            BTreeMap::new()
        });
        for wish in old.into_values() {
            if lazyblk_cache::validate_id(&wish.template).is_err() {
                continue;
            }
            let bytes = serde_json::to_vec_pretty(&Some(&wish)).unwrap_or_default();
            // Create only: a wish another server recorded since wins over the old one.
            self.backend
                .put_doc_if(&wish_doc(&wish.template), bytes, None)
                .await?;
        }
        self.backend.delete_doc(OLD_WISHES_DOC).await?;
        tracing::info!("moved center/{OLD_WISHES_DOC} to one document per template");
        Ok(())
    }

    /// The wishes, as read from the bucket at most [`WISHES_REFRESH`] ago.
    async fn snapshot(&self) -> Result<BTreeMap<String, Wish>, BackendError> {
        let mut cache = self.cache.lock().await;
        let fresh = cache.read_at.is_some_and(|t| t.elapsed() < WISHES_REFRESH);
        if !fresh {
            let listed = self.backend.list_docs(WISHES_DIR).await?;
            let mut docs = BTreeMap::new();
            for (name, version) in listed {
                let known = cache.docs.get(&name);
                let entry = match (known, &version) {
                    (Some((Some(v), wish)), Some(listed)) if v == listed => {
                        (Some(v.clone()), wish.clone())
                    }
                    _ => match self.backend.doc_versioned(&name).await? {
                        Some((bytes, v)) => (Some(v), parse_wish(&name, &bytes)),
                        None => continue,
                    },
                };
                docs.insert(name, entry);
            }
            cache.docs = docs;
            cache.read_at = Some(std::time::Instant::now());
        }
        Ok(cache
            .docs
            .values()
            .filter_map(|(_, w)| w.clone())
            .map(|w| (w.template.clone(), w))
            .collect())
    }

    /// Makes the next read list the wishes again (after this server wrote one).
    async fn invalidate(&self) {
        self.cache.lock().await.read_at = None;
    }

    /// Every wish, read again now (an operator who wrote through another server reads
    /// what they wrote).
    pub async fn wishes(&self) -> Result<Vec<Wish>, BackendError> {
        self.invalidate().await;
        Ok(self.snapshot().await?.into_values().collect())
    }

    /// Changes the wish of `template` by compare-and-swap: `change` gets the stored wish
    /// (none when there is none or it was removed) and says what to store (`None`:
    /// remove). What was stored before and what is stored now.
    async fn change(
        &self,
        template: &str,
        mut change: impl FnMut(Option<Wish>) -> Option<Option<Wish>>,
    ) -> Result<(Option<Wish>, Option<Wish>), BackendError> {
        let name = wish_doc(template);
        let out = self
            .backend
            .update_doc(&name, |bytes| {
                let old = bytes.and_then(|b| parse_wish(&name, b));
                Ok::<_, BackendError>(match change(old.clone()) {
                    None => DocChange::Keep((old.clone(), old)),
                    Some(new) => {
                        let bytes = serde_json::to_vec_pretty(&new).unwrap_or_default();
                        DocChange::Write(bytes, (old, new))
                    }
                })
            })
            .await?;
        self.invalidate().await;
        Ok(out)
    }

    /// Records (or replaces) a wish; the last word wins, whole.
    pub async fn set(&self, wish: Wish) -> Result<Wish, BackendError> {
        let (_, new) = self
            .change(&wish.template, |old| {
                let redo = old.map_or(0, |w| w.redo);
                Some(Some(Wish {
                    redo,
                    ..wish.clone()
                }))
            })
            .await?;
        let wish = new.unwrap_or(wish);
        tracing::info!(template = %wish.template, placement = ?wish.placement, "wish recorded");
        Ok(wish)
    }

    /// Removes a template's wish (nodes unpin it at their next heartbeat). The document
    /// stays, saying `null`, so a later wish is again a compare-and-swap of it.
    pub async fn remove(&self, template: &str) -> Result<bool, BackendError> {
        let (old, _) = self
            .change(template, |old| old.is_some().then_some(None))
            .await?;
        Ok(old.is_some())
    }

    /// Raises the redo count of a wish (`warm --failed`); `None` without a wish.
    pub async fn redo(&self, template: &str) -> Result<Option<Wish>, BackendError> {
        let (_, new) = self
            .change(template, |old| {
                old.map(|w| {
                    Some(Wish {
                        redo: w.redo + 1,
                        ..w
                    })
                })
            })
            .await?;
        Ok(new)
    }

    /// What `node` should keep READY, given the live nodes.
    pub async fn wanted_on(
        &self,
        node: &str,
        live: &[NodeEntry],
    ) -> Result<Vec<Want>, BackendError> {
        Ok(self
            .snapshot()
            .await?
            .values()
            .filter(|w| placed_on(w, node, live))
            .map(|w| Want {
                template: w.template.clone(),
                redo: w.redo,
            })
            .collect())
    }

    /// A template's replicas over `live`.
    pub async fn counts(
        &self,
        template: &str,
        live: &[NodeEntry],
    ) -> Result<ReplicaCounts, BackendError> {
        let wanted = match self.snapshot().await?.get(template) {
            Some(w) => live.iter().filter(|n| placed_on(w, &n.id, live)).count(),
            None => 0,
        };
        Ok(counts(template, live, wanted))
    }

    /// Sets the minimum version of label `key` (`>=1.4.2`); `None` removes it.
    pub async fn set_policy(&self, key: &str, minimum: Option<String>) -> Result<(), BackendError> {
        self.backend
            .update_doc(POLICY_DOC, |bytes| {
                let mut policy = parse_policy(bytes);
                let before = policy.clone();
                match &minimum {
                    Some(m) => policy.insert(key.to_string(), m.clone()),
                    None => policy.remove(key),
                };
                Ok::<_, BackendError>(if policy == before {
                    DocChange::Keep(())
                } else {
                    DocChange::Write(serde_json::to_vec_pretty(&policy).unwrap_or_default(), ())
                })
            })
            .await
    }

    /// The label policy, as stored now.
    pub async fn policy(&self) -> Result<BTreeMap<String, String>, BackendError> {
        Ok(parse_policy(self.backend.doc(POLICY_DOC).await?.as_deref()))
    }
}

/// A wish document's content; an unreadable one is logged and counts as none.
fn parse_wish(name: &str, bytes: &[u8]) -> Option<Wish> {
    serde_json::from_slice::<Option<Wish>>(bytes)
        .map_err(|e| tracing::error!(error = %e, "center/{name} is unreadable; ignored"))
        .ok()
        .flatten()
}

fn parse_policy(bytes: Option<&[u8]>) -> BTreeMap<String, String> {
    bytes
        .and_then(|b| {
            serde_json::from_slice(b)
                .map_err(|e| tracing::error!(error = %e, "center/{POLICY_DOC} is unreadable"))
                .ok()
        })
        .unwrap_or_default()
}

/// Whether a wish places its template on `node` (an id) among `live`.
fn placed_on(wish: &Wish, node: &str, live: &[NodeEntry]) -> bool {
    match &wish.placement {
        Placement::AllNodes => true,
        Placement::Nodes(names) => {
            let url = live.iter().find(|n| n.id == node).map(|n| n.url.as_str());
            names
                .iter()
                .any(|n| n == node || Some(n.trim_end_matches('/')) == url)
        }
        Placement::MinReplicas(k) => {
            // The K live nodes with the highest rendezvous score for the template: the
            // same choice on every call, and a departure moves only its own share.
            let mut ranked: Vec<(u64, &str)> = live
                .iter()
                .map(|n| (score(&wish.template, &n.id), n.id.as_str()))
                .collect();
            ranked.sort_by(|a, b| b.cmp(a));
            ranked.iter().take(*k).any(|(_, id)| *id == node)
        }
    }
}

fn score(template: &str, node: &str) -> u64 {
    let mut h = Sha256::new();
    h.update(template.as_bytes());
    h.update([0]);
    h.update(node.as_bytes());
    u64::from_be_bytes(h.finalize()[..8].try_into().unwrap_or([0; 8]))
}

/// A template's replica counts over `live` nodes.
pub fn counts(template: &str, live: &[NodeEntry], wanted: usize) -> ReplicaCounts {
    let mut c = ReplicaCounts {
        live_nodes: live.len(),
        wanted,
        ..ReplicaCounts::default()
    };
    for node in live {
        if let Some(r) = node.replicas.iter().find(|r| r.template == template) {
            match r.phase {
                ReplicaPhase::Known(Phase::Ready) => c.ready += 1,
                ReplicaPhase::Known(Phase::Distributing) => c.distributing += 1,
                ReplicaPhase::Known(Phase::Failed) => c.failed += 1,
                _ => {}
            }
        }
    }
    let target = if wanted > 0 { wanted } else { live.len() };
    c.status = if c.failed > 0 {
        format!("FAILED {}", c.failed)
    } else if c.ready > 0 && c.ready >= target {
        format!("READY {}/{}", c.ready, target)
    } else if c.ready > 0 || c.distributing > 0 {
        format!("PARTIALLY_READY {}/{}", c.ready, target)
    } else {
        "-".to_string()
    };
    c
}

/// Whether `version` is below `minimum` (`>=1.4.2`), comparing dotted numbers; a
/// version that does not parse is below any minimum.
pub fn below(version: &str, minimum: &str) -> bool {
    let parse =
        |v: &str| -> Option<Vec<u64>> { v.trim().split('.').map(|p| p.parse().ok()).collect() };
    let minimum = minimum.trim().trim_start_matches(">=");
    match (parse(version), parse(minimum)) {
        (Some(v), Some(m)) => {
            let len = v.len().max(m.len());
            let pad = |x: &Vec<u64>| -> Vec<u64> {
                let mut x = x.clone();
                x.resize(len, 0);
                x
            };
            pad(&v) < pad(&m)
        }
        _ => true,
    }
}

/// The answer to a heartbeat: the live nodes, and what this node should keep READY.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct HeartbeatAnswer {
    pub nodes: Vec<NodeEntry>,
    #[serde(default)]
    pub warm: Vec<Want>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::nodes::ReplicaReport;

    fn node(id: &str, phase: Option<&str>) -> NodeEntry {
        NodeEntry {
            id: id.into(),
            url: format!("http://{id}"),
            version: "0.1.0".into(),
            last_seen_secs: 0.0,
            key: String::new(),
            replicas: phase
                .map(|p| {
                    vec![ReplicaReport {
                        template: "t".into(),
                        // As a node's heartbeat carries it.
                        phase: serde_json::from_value(p.into()).unwrap(),
                        ..ReplicaReport::default()
                    }]
                })
                .unwrap_or_default(),
            cache_used_bytes: 0,
        }
    }

    #[test]
    fn placements_and_counts() {
        let live = vec![
            node("a", Some("READY")),
            node("b", Some("FAILED")),
            node("c", None),
        ];
        let all = Wish {
            template: "t".into(),
            placement: Placement::AllNodes,
            redo: 0,
        };
        assert!(live.iter().all(|n| placed_on(&all, &n.id, &live)));
        let named = Wish {
            template: "t".into(),
            placement: Placement::Nodes(vec!["http://b".into()]),
            redo: 0,
        };
        assert!(placed_on(&named, "b", &live) && !placed_on(&named, "a", &live));
        let two = Wish {
            template: "t".into(),
            placement: Placement::MinReplicas(2),
            redo: 0,
        };
        assert_eq!(
            live.iter()
                .filter(|n| placed_on(&two, &n.id, &live))
                .count(),
            2
        );
        assert_eq!(counts("t", &live, 0).status, "FAILED 1");
        assert_eq!(counts("t", &live[..1], 0).status, "READY 1/1");
        assert_eq!(
            counts("t", &[node("a", Some("READY")), node("c", None)], 0).status,
            "PARTIALLY_READY 1/2"
        );
    }

    #[test]
    fn dotted_versions() {
        assert!(below("1.4.1", ">=1.4.2"));
        assert!(!below("1.4.2", ">=1.4.2"));
        assert!(!below("1.10", ">=1.9.9"));
        assert!(below("1.4", ">=1.4.1"));
        assert!(below("garbage", ">=1"));
    }
}
