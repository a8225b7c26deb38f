//! How this node finds the fleet (DESIGN section 10): with `--advertise` and a store
//! server, it renews a lease there every heartbeat and takes the live nodes from the
//! answer; with `--peers URL,...` or `--peers dns:NAME:PORT` (re-resolved), it asks each
//! address for its id (`GET /v1/node`) instead. Either way the result goes to the
//! node's [`PeerSet`]; membership is soft state, and a node that cannot see it reads
//! from the store.

use std::sync::Arc;
use std::time::Duration;

use lazyblk_cache::{Member, PeerSet};
use tokio::sync::watch;

use crate::daemon::fill::FillScheduler;
use crate::daemon::node::Node;
use crate::daemon::node_state::phases::Phase;
use crate::daemon::node_state::Wishes;
use crate::store::admission::checked_url;
use crate::store::center::Want;
use crate::store::client::StoreClient;
use crate::store::nodes::{
    Heartbeat, ReplicaReport, HEARTBEAT, MAX_REPORTED_REPLICAS, MAX_REPORT_STRING,
    MAX_USERS_PER_REPLICA,
};

/// The replicas this node reports: those that are not merely known (a fill ran, or
/// someone uses them), so a node that knows thousands of templates sends a short list.
/// The store's bounds are kept: replicas in use first, at most
/// [`MAX_REPORTED_REPLICAS`], each with at most [`MAX_USERS_PER_REPLICA`] users (the
/// last one says how many more), every string cut to [`MAX_REPORT_STRING`].
fn report(node: &Node) -> Vec<ReplicaReport> {
    let mut reports: Vec<ReplicaReport> = node
        .templates
        .all()
        .iter()
        .filter_map(|r| {
            let users = r.users();
            let fill = r.fill_status();
            let (phase, last_error) = (fill.phase, fill.last_error);
            // A template refused here (--trusted-keys) is reported, with why.
            let refused = node.templates.trusted(r.id()).err().map(|e| e.to_string());
            if phase == Phase::Pending && users.is_empty() && refused.is_none() {
                return None;
            }
            let last_error = refused.or(last_error);
            Some(ReplicaReport {
                template: r.id().to_string(),
                phase: phase.into(),
                local_chunks: r.local_chunks(),
                stored_chunks: r.manifest().stored_chunks().count(),
                last_error: last_error.map(|e| cut(&e)),
                users: bounded_users(users),
            })
        })
        .collect();
    if reports.len() > MAX_REPORTED_REPLICAS {
        // Users matter most to the store (deletes and gc are refused on them).
        reports.sort_by_key(|r| r.users.is_empty());
        tracing::warn!(
            replicas = reports.len(),
            "more replicas than a heartbeat may report; the unused ones beyond {MAX_REPORTED_REPLICAS} are left out"
        );
        reports.truncate(MAX_REPORTED_REPLICAS);
    }
    reports
}

/// At most [`MAX_USERS_PER_REPLICA`] users, the last saying how many were left out.
fn bounded_users(mut users: Vec<String>) -> Vec<String> {
    if users.len() > MAX_USERS_PER_REPLICA {
        let more = users.len() - (MAX_USERS_PER_REPLICA - 1);
        users.truncate(MAX_USERS_PER_REPLICA - 1);
        users.push(format!("and {more} more"));
    }
    users.iter().map(|u| cut(u)).collect()
}

/// `s` cut to at most [`MAX_REPORT_STRING`] bytes, on a character boundary.
fn cut(s: &str) -> String {
    let mut end = s.len().min(MAX_REPORT_STRING);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// Templates warmed here because the center wishes it, with the redo count acted on
/// (kept in the node's state, [`crate::daemon::node_state::Wishes`]).
struct Wished {
    templates: Wishes,
}

impl Wished {
    fn load(node: &Node) -> Wished {
        Wished {
            templates: node.state.wishes(),
        }
    }

    fn save(&self, node: &Node) {
        if let Err(e) = node.state.save_wishes(&self.templates) {
            tracing::warn!(error = %e, "saving the wished templates");
        }
    }

    /// Warms what is wanted here and not READY (a FAILED one again when its redo count
    /// rose), and unpins what was wished here before and no longer is.
    async fn reconcile(&mut self, node: &Arc<Node>, fill: &Arc<FillScheduler>, wanted: Vec<Want>) {
        let mut changed = false;
        for want in &wanted {
            let replica = match node.templates.replica(&want.template).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(template = %want.template, error = %e, "cannot warm a wished template");
                    continue;
                }
            };
            let acted = self.templates.get(&want.template).copied();
            let redo = replica.phase() == Phase::Failed && acted.is_none_or(|r| want.redo > r);
            match fill.warm(&replica, redo) {
                Ok(phase) if acted.is_none() || redo => {
                    tracing::info!(template = %want.template, ?phase, redo, "warming: wished on this node")
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(template = %want.template, error = %e, "cannot warm a wished template")
                }
            }
            if acted != Some(want.redo) {
                self.templates.insert(want.template.clone(), want.redo);
                changed = true;
            }
        }
        let gone: Vec<String> = self
            .templates
            .keys()
            .filter(|t| !wanted.iter().any(|w| &w.template == *t))
            .cloned()
            .collect();
        for template in gone {
            if let Some(replica) = node.templates.known(&template) {
                fill.unpin(&replica);
            }
            self.templates.remove(&template);
            changed = true;
        }
        if changed {
            self.save(node);
        }
    }
}

/// How often `--peers` is resolved and probed again.
const PEERS_REFRESH: Duration = Duration::from_secs(3);
/// How long one probe of a peer's `/v1/node` may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Where the membership comes from.
#[derive(Clone, Debug)]
pub enum Discovery {
    /// Leases on the store server.
    Store,
    /// Fixed peer URLs.
    Static(Vec<String>),
    /// A DNS name whose addresses are the peers, all on one port.
    Dns { name: String, port: u16 },
}

impl Discovery {
    /// Parses `--peers`: `dns:NAME:PORT` or a comma-separated list of URLs. A spec
    /// that names no host (`dns::80`, `http://`), no port, or nothing at all is refused
    /// here, at start, rather than resolved or probed in vain every few seconds.
    pub fn parse_peers(spec: &str) -> Result<Discovery, String> {
        if let Some(rest) = spec.strip_prefix("dns:") {
            let (name, port) = rest
                .rsplit_once(':')
                .ok_or_else(|| format!("--peers {spec:?}: expected dns:NAME:PORT"))?;
            let port = port
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("--peers {spec:?}: {port:?} is not a port (1 to 65535)"))?;
            if !is_dns_name(name) {
                return Err(format!(
                    "--peers {spec:?}: {name:?} is not a DNS name (dns:NAME:PORT)"
                ));
            }
            return Ok(Discovery::Dns {
                name: name.to_string(),
                port,
            });
        }
        let urls: Vec<String> = spec
            .split(',')
            .map(|u| u.trim().trim_end_matches('/').to_string())
            .filter(|u| !u.is_empty())
            .collect();
        if urls.is_empty() {
            return Err(format!(
                "--peers {spec:?} names no peer (URL,URL,... or dns:NAME:PORT)"
            ));
        }
        for url in &urls {
            check_peer_url(url).map_err(|why| format!("--peers: {url:?} {why}"))?;
        }
        Ok(Discovery::Static(urls))
    }
}

/// Whether `name` is a host name DNS can resolve: dot-separated labels of 1 to 63
/// letters, digits and inner hyphens, 253 bytes at most (a final dot allowed).
fn is_dns_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Why `url` cannot be a peer's base URL, if it cannot: it must be `http://HOST[:PORT]`
/// with a host, and nothing after it that would swallow the paths appended to it.
fn check_peer_url(url: &str) -> Result<(), &'static str> {
    if !url.starts_with("http://") {
        return Err("is not an http:// URL");
    }
    let parsed = reqwest::Url::parse(url).map_err(|_| "is not a URL")?;
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err("names no host");
    }
    if parsed.port() == Some(0) {
        return Err("names port 0");
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err("carries credentials");
    }
    if parsed.query().is_some() || parsed.fragment().is_some() || parsed.path() != "/" {
        return Err("has a path, query or fragment (give http://HOST:PORT)");
    }
    Ok(())
}

/// Keeps `peers` in step with the fleet until `stop`.
pub async fn run(
    discovery: Discovery,
    node: Arc<Node>,
    fill: Arc<FillScheduler>,
    peers: Arc<PeerSet>,
    mut stop: watch::Receiver<bool>,
) {
    let store: StoreClient = node.store.clone();
    let http = store.http().clone();
    let mut reachable = true;
    let mut wishes = Wished::load(&node);
    loop {
        let interval = match &discovery {
            Discovery::Store => {
                let beat = Heartbeat {
                    url: node.advertise.clone(),
                    version: env!("CARGO_PKG_VERSION").to_string(),
                    replicas: report(&node),
                    cache_used_bytes: node.cache.usage().used_bytes,
                };
                match store.heartbeat(&node.key, &beat).await {
                    Ok(answer) => {
                        if !reachable {
                            tracing::info!("store membership reachable again");
                            reachable = true;
                        }
                        // The store vouched for these ids (each proved its key); their
                        // addresses are checked again before the peer token goes there.
                        peers.set_members(
                            answer
                                .nodes
                                .into_iter()
                                .filter_map(|n| match checked_url(&n.url) {
                                    Ok(url) => Some(Member { id: n.id, url }),
                                    Err(e) => {
                                        tracing::warn!(node = %crate::printable::printable(&n.id), "{e}; not asked as a peer");
                                        None
                                    }
                                })
                                .collect(),
                        );
                        wishes.reconcile(&node, &fill, answer.warm).await;
                    }
                    Err(e) => {
                        if reachable {
                            tracing::warn!(error = %e, "cannot renew this node's lease; keeping the last membership");
                            reachable = false;
                        }
                    }
                }
                HEARTBEAT
            }
            Discovery::Static(urls) => {
                peers.set_members(probe_all(&http, urls.clone()).await);
                PEERS_REFRESH
            }
            Discovery::Dns { name, port } => {
                match tokio::net::lookup_host((name.as_str(), *port)).await {
                    Ok(addrs) => {
                        let urls = addrs.map(|a| format!("http://{a}")).collect();
                        peers.set_members(probe_all(&http, urls).await);
                    }
                    Err(e) => tracing::debug!(name, error = %e, "resolving --peers"),
                }
                PEERS_REFRESH
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.changed() => return,
        }
    }
}

/// The members among `urls`: those that answer `GET /v1/node` with a node id (a URL
/// that is down, or not a lazyblk daemon, is left out).
async fn probe_all(http: &reqwest::Client, urls: Vec<String>) -> Vec<Member> {
    let probes = urls.into_iter().map(|url| async move {
        let answer = http
            .get(format!("{url}/v1/node"))
            .timeout(PROBE_TIMEOUT)
            .send()
            .await
            .ok()?;
        let info: serde_json::Value = answer.json().await.ok()?;
        let id = info.get("node_id")?.as_str()?.to_string();
        Some(Member { id, url })
    });
    futures::future::join_all(probes)
        .await
        .into_iter()
        .flatten()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_are_urls_or_a_dns_name() {
        assert!(matches!(
            Discovery::parse_peers("http://a:7071, http://b:7071/").unwrap(),
            Discovery::Static(u) if u == ["http://a:7071", "http://b:7071"]
        ));
        assert!(matches!(
            Discovery::parse_peers("dns:lazyblk.svc:7071").unwrap(),
            Discovery::Dns { name, port: 7071 } if name == "lazyblk.svc"
        ));
        assert!(Discovery::parse_peers("dns:nope").is_err());
        assert!(Discovery::parse_peers("ftp://x").is_err());
        for bad in [
            "dns::80",
            "dns:a:0",
            "dns:a:",
            "dns:-a:80",
            "dns:a b:80",
            "",
            " , ",
            "http://",
            "http://:80",
            "http://a:0",
            "http://a b:80",
            "http://u:p@a:80",
            "http://a:80/internal?x=",
        ] {
            assert!(Discovery::parse_peers(bad).is_err(), "{bad:?}");
        }
        assert!(Discovery::parse_peers("http://10.0.0.7:7071").is_ok());
        assert!(Discovery::parse_peers("dns:lazyblk.default.svc.cluster.local.:7071").is_ok());
    }
}
