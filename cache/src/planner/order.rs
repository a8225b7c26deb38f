//! Which sources a template's chunks come from, in the order a fetch tries them
//! (before health moves failing ones last, [`super::SourceHealth::plan`]).

use std::sync::Arc;

use crate::manifest::Manifest;
use crate::peers::PeerSet;
use crate::source::{HttpClients, HttpSource, Source};

/// Where a template's chunks come from, other than this node's cache: the daemon's
/// configuration of its sources, from which [`SourcePlan::sources`] makes each
/// template's list.
pub struct SourcePlan {
    /// The URL peers reach this daemon at; never used as a source of its own.
    pub advertise: String,
    /// Bearer token sent with chunk reads to origins (other daemons).
    pub peer_token: Option<String>,
    /// The fleet's live nodes, when this node is a member: chunk owners to ask, and the
    /// origins it may contact.
    pub peers: Option<Arc<PeerSet>>,
    /// The store alone (several store servers, or the object store read directly):
    /// what an owner fetches a peer's request from (never a peer: the asking node
    /// tries the peers' caches itself when the store fails).
    pub store: Arc<[Source]>,
    /// The clients origins are reached with.
    pub clients: HttpClients,
}

impl SourcePlan {
    /// A template's sources, in order: its origins (other than this node; with a
    /// membership, only while they are live members), then the chunk's owner among the
    /// peers, then the store, then (a store outage) the caches of the next peers in
    /// rendezvous order, which answer only from their caches, so an owner can read the
    /// chunks it owns from a peer that holds them. The store's read token goes to the
    /// store alone; origins and peers get the peer token.
    pub fn sources(&self, manifest: &Manifest) -> Vec<Source> {
        let own = self.advertise.trim_end_matches('/');
        let mut sources: Vec<Source> = manifest
            .origins
            .iter()
            .filter(|o| o.trim_end_matches('/') != own)
            .map(|base| Source::Origin {
                http: HttpSource::new(self.clients.clone(), base, self.peer_token.clone()),
                members: self.peers.clone(),
            })
            .collect();
        if let Some(peers) = &self.peers {
            sources.push(Source::Peers(peers.clone()));
        }
        sources.extend(self.store.iter().cloned());
        if let Some(peers) = &self.peers {
            sources.push(Source::PeerCaches(peers.clone()));
        }
        sources
    }

    /// The store alone, for fetches made on a peer's behalf.
    pub fn store(&self) -> &Arc<[Source]> {
        &self.store
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_then_owners_then_the_store_then_the_peers_caches_never_this_node() {
        let clients = HttpClients::new(reqwest::Client::new);
        let store = Source::Http(HttpSource::new(clients.clone(), "http://store", None));
        let peers = Arc::new(PeerSet::new("me", clients.clone(), None));
        let plan = SourcePlan {
            advertise: "http://me/".into(),
            peer_token: None,
            peers: Some(peers),
            store: vec![store].into(),
            clients,
        };
        let mut manifest: Manifest = serde_json::from_str(
            r#"{"format": 1, "template": "t", "size": 0, "chunk_size": 1048576, "chunks": []}"#,
        )
        .expect("a manifest");
        manifest.origins = vec!["http://me".into(), "http://origin".into()];
        let names: Vec<String> = plan
            .sources(&manifest)
            .iter()
            .map(|s| s.name().to_string())
            .collect();
        assert_eq!(
            names,
            [
                "http://origin",
                "peers",
                "http://store",
                crate::source::PEER_CACHES
            ]
        );
    }
}
