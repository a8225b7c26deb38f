//! The template center (DESIGN section 10): the fleet's replicas at a glance, and the
//! desired state that steers them. Heartbeats bring each node's replicas and users (soft
//! state, kept with the lease in [`super::nodes`]); operators record where a template
//! should be READY (a wish: every node, named nodes, or at least K nodes), which is kept
//! durably in the store (`center/wishes.json`) and pulled by the nodes: each heartbeat's
//! answer says what this node should keep warm, and the node reconciles. Nothing is
//! pushed to a node.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::backend::{Backend, BackendError};
use super::nodes::NodeEntry;

/// The document that holds the wishes.
const WISHES_DOC: &str = "wishes.json";
/// The document that holds the label policy.
const POLICY_DOC: &str = "policy.json";

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

/// The center's desired state.
pub struct Center {
    backend: Arc<Backend>,
    wishes: tokio::sync::Mutex<BTreeMap<String, Wish>>,
    /// Minimum versions by label key (`policy set KEY '>=VERSION'`).
    policy: tokio::sync::Mutex<BTreeMap<String, String>>,
}

impl Center {
    /// Loads the wishes and the policy the store kept.
    pub async fn load(backend: Arc<Backend>) -> Result<Center, BackendError> {
        let wishes = match backend.doc(WISHES_DOC).await? {
            Some(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::error!(error = %e, "center/wishes.json is unreadable; starting without wishes");
                BTreeMap::new()
            }),
            None => BTreeMap::new(),
        };
        let policy = match backend.doc(POLICY_DOC).await? {
            Some(bytes) => serde_json::from_slice(&bytes).unwrap_or_default(),
            None => BTreeMap::new(),
        };
        Ok(Center {
            backend,
            wishes: tokio::sync::Mutex::new(wishes),
            policy: tokio::sync::Mutex::new(policy),
        })
    }

    /// Every wish.
    pub async fn wishes(&self) -> Vec<Wish> {
        self.wishes.lock().await.values().cloned().collect()
    }

    /// Records (or replaces) a wish; the last word wins.
    pub async fn set(&self, wish: Wish) -> Result<Wish, BackendError> {
        let mut wishes = self.wishes.lock().await;
        let redo = wishes.get(&wish.template).map_or(0, |w| w.redo);
        let wish = Wish { redo, ..wish };
        wishes.insert(wish.template.clone(), wish.clone());
        self.save(&wishes).await?;
        tracing::info!(template = %wish.template, placement = ?wish.placement, "wish recorded");
        Ok(wish)
    }

    /// Removes a template's wish (nodes unpin it at their next heartbeat).
    pub async fn remove(&self, template: &str) -> Result<bool, BackendError> {
        let mut wishes = self.wishes.lock().await;
        let had = wishes.remove(template).is_some();
        self.save(&wishes).await?;
        Ok(had)
    }

    /// Raises the redo count of a wish (`warm --failed`); `None` without a wish.
    pub async fn redo(&self, template: &str) -> Result<Option<Wish>, BackendError> {
        let mut wishes = self.wishes.lock().await;
        let Some(wish) = wishes.get_mut(template) else {
            return Ok(None);
        };
        wish.redo += 1;
        let wish = wish.clone();
        self.save(&wishes).await?;
        Ok(Some(wish))
    }

    async fn save(&self, wishes: &BTreeMap<String, Wish>) -> Result<(), BackendError> {
        let bytes = serde_json::to_vec_pretty(wishes).unwrap_or_default();
        self.backend.put_doc(WISHES_DOC, bytes).await
    }

    /// What `node` should keep READY, given the live nodes.
    pub async fn wanted_on(&self, node: &str, live: &[NodeEntry]) -> Vec<Want> {
        let wishes = self.wishes.lock().await;
        wishes
            .values()
            .filter(|w| placed_on(w, node, live))
            .map(|w| Want {
                template: w.template.clone(),
                redo: w.redo,
            })
            .collect()
    }

    /// A template's replicas over `live`.
    pub async fn counts(&self, template: &str, live: &[NodeEntry]) -> ReplicaCounts {
        let wanted = match self.wishes.lock().await.get(template) {
            Some(w) => live.iter().filter(|n| placed_on(w, &n.id, live)).count(),
            None => 0,
        };
        counts(template, live, wanted)
    }

    /// Sets the minimum version of label `key` (`>=1.4.2`); `None` removes it.
    pub async fn set_policy(&self, key: &str, minimum: Option<String>) -> Result<(), BackendError> {
        let mut policy = self.policy.lock().await;
        match minimum {
            Some(m) => policy.insert(key.to_string(), m),
            None => policy.remove(key),
        };
        let bytes = serde_json::to_vec_pretty(&*policy).unwrap_or_default();
        self.backend.put_doc(POLICY_DOC, bytes).await
    }

    pub async fn policy(&self) -> BTreeMap<String, String> {
        self.policy.lock().await.clone()
    }
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
            match r.phase.as_str() {
                "READY" => c.ready += 1,
                "DISTRIBUTING" => c.distributing += 1,
                "FAILED" => c.failed += 1,
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
                        phase: p.into(),
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
