//! Who may be a member of the store's fleet, and at what address (DESIGN section 10).
//!
//! A lease is proven by the node's key ([`crate::identity`]); on top of that an operator
//! may list the keys that may join (`--member-keys FILE`, re-read when the file
//! changes) and the networks members may advertise (`--member-networks CIDR,...`).
//! Every advertised URL is a bare origin (`http(s)://HOST[:PORT]`): other daemons send
//! their peer token to it, so it may carry no path, query, fragment or credentials
//! that would turn their requests into requests of the registrant's choosing.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use ipnet::IpNet;

/// The longest advertised URL.
pub const MAX_URL: usize = 256;
/// How long resolving an advertised host name may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);

/// `url` as a bare origin (`scheme://host[:port]`, no trailing slash), or why it is not
/// one a member may advertise.
pub fn checked_url(url: &str) -> Result<String, String> {
    let bad = |why: &str| {
        Err(format!(
            "advertised URL {:?}: {why}",
            crate::printable::printable(url)
        ))
    };
    if url.len() > MAX_URL {
        return bad(&format!("longer than {MAX_URL} bytes"));
    }
    let Ok(parsed) = reqwest::Url::parse(url) else {
        return bad("not a URL");
    };
    if !matches!(parsed.scheme(), "http" | "https") {
        return bad("not http:// or https://");
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return bad("no host");
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return bad("credentials in a member's URL are refused");
    }
    if !matches!(parsed.path(), "" | "/") || parsed.query().is_some() || parsed.fragment().is_some()
    {
        return bad("a member's URL is scheme://host[:port], with no path, query or fragment");
    }
    Ok(parsed.as_str().trim_end_matches('/').to_string())
}

/// The store's admission rules.
pub struct Admission {
    keys: Option<KeyList>,
    networks: Vec<IpNet>,
}

/// `--member-keys`: the file, and its keys as of its last change.
struct KeyList {
    path: PathBuf,
    loaded: Mutex<(Option<SystemTime>, Vec<String>)>,
}

impl Admission {
    /// The rules of `--member-keys` and `--member-networks`; an unreadable key file or a
    /// network that does not parse is an error at start.
    pub fn new(keys: Option<PathBuf>, networks: &[String]) -> Result<Admission, String> {
        let networks = networks
            .iter()
            .flat_map(|n| n.split(','))
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(|n| {
                n.parse::<IpNet>()
                    .or_else(|_| n.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| format!("--member-networks: {n:?} is not a CIDR (10.0.0.0/8)"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let keys = match keys {
            Some(path) => {
                let list = KeyList {
                    path,
                    loaded: Mutex::new((None, Vec::new())),
                };
                list.current()?;
                Some(list)
            }
            None => None,
        };
        Ok(Admission { keys, networks })
    }

    /// Whether a node with public key `key` (hex) and id `id` may be a member.
    pub fn admits_key(&self, key: &str, id: &str) -> Result<(), String> {
        let Some(list) = &self.keys else {
            return Ok(());
        };
        let keys = list.current()?;
        if keys.iter().any(|k| k.eq_ignore_ascii_case(key) || k == id) {
            Ok(())
        } else {
            Err(format!(
                "node {id} (key {key}) is not in --member-keys {}",
                list.path.display()
            ))
        }
    }

    /// Whether `url` (already a bare origin) is in `--member-networks`: an IP literal in
    /// one of them, or a name all of whose addresses are.
    pub async fn admits_url(&self, url: &str) -> Result<(), String> {
        if self.networks.is_empty() {
            return Ok(());
        }
        let parsed = reqwest::Url::parse(url).map_err(|e| e.to_string())?;
        let host = parsed.host_str().unwrap_or_default();
        let port = parsed.port_or_known_default().unwrap_or(80);
        let addrs: Vec<IpAddr> = match host.trim_matches(['[', ']']).parse::<IpAddr>() {
            Ok(ip) => vec![ip],
            Err(_) => {
                let lookup = tokio::net::lookup_host((host, port));
                match tokio::time::timeout(RESOLVE_TIMEOUT, lookup).await {
                    Ok(Ok(addrs)) => addrs.map(|a| a.ip()).collect(),
                    _ => return Err(format!("advertised host {host:?} does not resolve")),
                }
            }
        };
        let outside: Vec<String> = addrs
            .iter()
            .filter(|ip| !self.networks.iter().any(|n| n.contains(*ip)))
            .map(IpAddr::to_string)
            .collect();
        if addrs.is_empty() || !outside.is_empty() {
            return Err(format!(
                "advertised URL {url} is outside --member-networks ({})",
                outside.join(", ")
            ));
        }
        Ok(())
    }
}

impl KeyList {
    /// The keys, read again if the file changed since the last read.
    fn current(&self) -> Result<Vec<String>, String> {
        let err = |e: std::io::Error| format!("--member-keys {}: {e}", self.path.display());
        let modified = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .map_err(err)?;
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if loaded.0 != Some(modified) {
            let text = std::fs::read_to_string(&self.path).map_err(err)?;
            let mut keys = Vec::new();
            for (n, line) in text.lines().enumerate() {
                let word = line.split('#').next().unwrap_or("").trim();
                let Some(word) = word.split_whitespace().next() else {
                    continue;
                };
                let is_key = crate::identity::parse_public(word).is_some();
                let is_id = word.len() == 2 * crate::identity::ID_BYTES
                    && word.bytes().all(|b| b.is_ascii_hexdigit());
                if !is_key && !is_id {
                    return Err(format!(
                        "--member-keys {} line {}: expected a node's public key or id in hex (lazyblk node-key prints both)",
                        self.path.display(),
                        n + 1
                    ));
                }
                keys.push(word.to_ascii_lowercase());
            }
            *loaded = (Some(modified), keys);
        }
        Ok(loaded.1.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertised_urls_are_bare_origins() {
        assert_eq!(
            checked_url("http://10.0.0.1:7071/").unwrap(),
            "http://10.0.0.1:7071"
        );
        assert_eq!(
            checked_url("https://node-a.svc").unwrap(),
            "https://node-a.svc"
        );
        for bad in [
            "http://host/internal/admin?x=",
            "http://host:1/?x=1",
            "http://u:p@host:1",
            "http://host#f",
            "ftp://host",
            "host:7071",
            "http://",
        ] {
            assert!(checked_url(bad).is_err(), "{bad} accepted");
        }
    }

    #[tokio::test]
    async fn networks_bound_where_members_live() {
        let a = Admission::new(None, &["10.0.0.0/8, 127.0.0.1".into()]).unwrap();
        assert!(a.admits_url("http://10.1.2.3:7071").await.is_ok());
        assert!(a.admits_url("http://127.0.0.1:7071").await.is_ok());
        assert!(a.admits_url("http://192.168.1.1:7071").await.is_err());
        assert!(Admission::new(None, &["10.0.0.0/33".into()]).is_err());
    }

    #[test]
    fn member_keys_are_read_again_when_the_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        let node = crate::identity::NodeKey::load_or_create(&dir.path().join("node.key")).unwrap();
        let key = node.public_hex();
        std::fs::write(&path, "# fleet\n").unwrap();
        let a = Admission::new(Some(path.clone()), &[]).unwrap();
        assert!(a.admits_key(&key, "x").is_err());
        // A later mtime, whatever the file system's resolution.
        std::fs::write(&path, format!("{key} node a\n")).unwrap();
        let later = SystemTime::now() + Duration::from_secs(5);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(later)
            .unwrap();
        assert!(a.admits_key(&key, "x").is_ok());
        assert!(a.admits_key(&"22".repeat(32), "y").is_err());
        std::fs::write(&path, "nonsense\n").unwrap();
        assert!(Admission::new(Some(path), &[]).is_err());
    }
}
