//! A node's identity (DESIGN section 10): an ed25519 key pair made once and kept in the
//! node's cache directory, an id derived from its public key, and requests signed with
//! it, so that no one can register, renew or end a lease as another node.
//!
//! - The key is `node.key` in the cache directory, PKCS#8 PEM (the form
//!   `openssl genpkey -algorithm ed25519` writes), mode 0600. `lazyblk node-key` prints
//!   its public half, which is what a store's `--member-keys` file lists.
//! - The id is the first [`ID_BYTES`] bytes of the public key's sha256, in hex: an id
//!   names exactly one key, so the store needs no table to bind ids to keys, and a
//!   request for an id made with another key is refused.
//! - A signed request carries three headers: the public key, a timestamp in
//!   milliseconds, and the signature of [`message`] (method, path, timestamp, the
//!   body's sha256). The store accepts a timestamp within [`MAX_SKEW_MS`] of its clock and
//!   above the last one it accepted from that node, so a captured request cannot be
//!   sent again while the store runs.
//!
//! Why signed requests and not mutual TLS between nodes and the store: the store is
//! reached over plain HTTP on trusted networks and through load balancers that end
//! TLS, and a node's key must also sign the templates it commits (the same key, one
//! file); a signature over the request survives both, where a client certificate does
//! not, and needs no CA to run.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use sha2::{Digest as _, Sha256};

/// Bytes of the public key's sha256 that make the id: 128 bits, so that no one can
/// make a key whose id is another node's.
pub const ID_BYTES: usize = 16;
/// How far a request's timestamp may be from the store's clock, in milliseconds:
/// wide enough for clocks that NTP keeps, narrow enough that a request captured today
/// is useless tomorrow.
pub const MAX_SKEW_MS: u64 = 120_000;

/// The header that carries the public key (64 hex digits).
pub const KEY_HEADER: &str = "x-lazyblk-node-key";
/// The header that carries the request's time (milliseconds since the epoch).
pub const TIME_HEADER: &str = "x-lazyblk-timestamp";
/// The header that carries the signature (128 hex digits).
pub const SIGNATURE_HEADER: &str = "x-lazyblk-signature";

/// A node's key could not be made, read or used.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// reading or writing the key {path}: {source}
    #[error("reading or writing the key {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// {path} is not an ed25519 private key in PKCS#8 PEM: {reason}
    #[error("{path} is not an ed25519 private key in PKCS#8 PEM: {reason}")]
    Format { path: PathBuf, reason: String },
    /// `lazyblk keygen` never replaces a key: whatever it signed would lose its signer.
    #[error("{0} already exists; a key is never replaced (remove it first, or pick another file)")]
    Exists(PathBuf),
}

/// Why a signed request was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    #[error("the request is not signed by a node key (headers {KEY_HEADER}, {TIME_HEADER}, {SIGNATURE_HEADER})")]
    Missing,
    #[error("the node key header is not an ed25519 public key in hex")]
    BadKey,
    #[error("the signature header is not 64 bytes in hex")]
    BadSignature,
    #[error("the signature does not match the request and key")]
    Forged,
    #[error("the request's timestamp is {0} ms away from the store's clock (at most {MAX_SKEW_MS} ms): check the node's clock")]
    Skewed(i128),
    #[error("node id {claimed} is not the id of the key that signed the request ({actual})")]
    WrongId { claimed: String, actual: String },
}

/// This node's key pair and the id derived from it.
pub struct NodeKey {
    signing: SigningKey,
    id: String,
}

/// Shows the public half only: a key in a log line must never be the private one.
impl std::fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NodeKey({})", self.public_hex())
    }
}

impl NodeKey {
    /// The key in the file `path` (a node's is its state's `node.key`,
    /// [`crate::daemon::node_state`]), made (random, from the kernel) and kept durably
    /// there if there is none.
    pub fn load_or_create(path: &Path) -> Result<NodeKey, IdentityError> {
        let path = path.to_path_buf();
        match std::fs::read_to_string(&path) {
            Ok(pem) => NodeKey::from_pem(&pem, &path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => NodeKey::create(&path),
            Err(source) => Err(IdentityError::Io { path, source }),
        }
    }

    /// The key in the PEM file `path` (a `--signing-key`), which must exist: a signing
    /// key is made on purpose (`lazyblk keygen`, openssl), never by accident.
    pub fn load(path: &Path) -> Result<NodeKey, IdentityError> {
        let pem = std::fs::read_to_string(path).map_err(|source| IdentityError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        NodeKey::from_pem(&pem, path)
    }

    /// Makes a key and writes it to `path`, which must not exist yet (`lazyblk keygen`).
    pub fn create_new(path: &Path) -> Result<NodeKey, IdentityError> {
        if path.exists() {
            return Err(IdentityError::Exists(path.to_path_buf()));
        }
        NodeKey::create(path)
    }

    fn from_pem(pem: &str, path: &Path) -> Result<NodeKey, IdentityError> {
        let signing = SigningKey::from_pkcs8_pem(pem).map_err(|e| IdentityError::Format {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        Ok(NodeKey::from_signing(signing))
    }

    fn from_signing(signing: SigningKey) -> NodeKey {
        let id = node_id_of(&signing.verifying_key());
        NodeKey { signing, id }
    }

    /// Makes a key and writes it to `path` (0600, fsynced, then renamed into place and
    /// the directory fsynced: the id must never change once a store has seen it).
    fn create(path: &Path) -> Result<NodeKey, IdentityError> {
        let io = |source| IdentityError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut seed = [0u8; 32];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut seed))
            .map_err(io)?;
        let signing = SigningKey::from_bytes(&seed);
        let pem = signing
            .to_pkcs8_pem(Default::default())
            .map_err(|e| IdentityError::Format {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        lazyblk_cache::durable::write_file_mode(path, pem.as_bytes(), 0o600).map_err(io)?;
        let key = NodeKey::from_signing(signing);
        tracing::info!(node_id = %key.id, path = %path.display(), "made this node's key");
        Ok(key)
    }

    /// The node's id (hex, [`ID_BYTES`] bytes).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The public key in hex, as `--member-keys` files list it.
    pub fn public_hex(&self) -> String {
        hex::encode(self.signing.verifying_key().as_bytes())
    }

    /// This key's signature of `message` (a manifest's, see [`crate::trust`]).
    pub(crate) fn sign_bytes(&self, message: &[u8]) -> Signature {
        self.signing.sign(message)
    }

    /// The headers that prove this key on a request of `method` to `path` with `body`,
    /// signed now.
    pub fn sign(&self, method: &str, path: &str, body: &[u8]) -> [(&'static str, String); 3] {
        self.sign_at(method, path, body, now_ms())
    }

    fn sign_at(
        &self,
        method: &str,
        path: &str,
        body: &[u8],
        at_ms: u64,
    ) -> [(&'static str, String); 3] {
        let signature = self.signing.sign(&message(method, path, at_ms, body));
        [
            (KEY_HEADER, self.public_hex()),
            (TIME_HEADER, at_ms.to_string()),
            (SIGNATURE_HEADER, hex::encode(signature.to_bytes())),
        ]
    }
}

/// The id of the node whose public key is `key`.
pub fn node_id_of(key: &VerifyingKey) -> String {
    hex::encode(&Sha256::digest(key.as_bytes())[..ID_BYTES])
}

/// Parses a public key in hex (64 digits).
pub fn parse_public(hex_key: &str) -> Option<VerifyingKey> {
    let bytes: [u8; 32] = hex::decode(hex_key.trim()).ok()?.try_into().ok()?;
    VerifyingKey::from_bytes(&bytes).ok()
}

/// What a signature covers: the request's method, path, time and body.
fn message(method: &str, path: &str, at_ms: u64, body: &[u8]) -> Vec<u8> {
    format!(
        "lazyblk-request-v1\n{method}\n{path}\n{at_ms}\n{}",
        hex::encode(Sha256::digest(body))
    )
    .into_bytes()
}

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A request's proven key.
#[derive(Clone, Debug)]
pub struct Proof {
    pub key: VerifyingKey,
    /// The node id the key derives.
    pub id: String,
    /// The request's timestamp (milliseconds), for replay checks.
    pub at_ms: u64,
}

impl Proof {
    pub fn public_hex(&self) -> String {
        hex::encode(self.key.as_bytes())
    }
}

/// Checks that a request (its headers as name to value) was signed by the key it names,
/// for node `claimed`, within [`MAX_SKEW_MS`] of `now_ms`.
pub fn verify(
    header: impl Fn(&str) -> Option<String>,
    method: &str,
    path: &str,
    body: &[u8],
    claimed: &str,
    now_ms: u64,
) -> Result<Proof, ProofError> {
    let (Some(key), Some(at), Some(signature)) = (
        header(KEY_HEADER),
        header(TIME_HEADER),
        header(SIGNATURE_HEADER),
    ) else {
        return Err(ProofError::Missing);
    };
    let key = parse_public(&key).ok_or(ProofError::BadKey)?;
    let signature: [u8; 64] = hex::decode(signature.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or(ProofError::BadSignature)?;
    let at_ms: u64 = at.trim().parse().map_err(|_| ProofError::Forged)?;
    let skew = at_ms as i128 - now_ms as i128;
    if skew.unsigned_abs() > MAX_SKEW_MS as u128 {
        return Err(ProofError::Skewed(skew));
    }
    key.verify_strict(
        &message(method, path, at_ms, body),
        &Signature::from_bytes(&signature),
    )
    .map_err(|_| ProofError::Forged)?;
    let id = node_id_of(&key);
    if id != claimed {
        return Err(ProofError::WrongId {
            claimed: claimed.to_string(),
            actual: id,
        });
    }
    Ok(Proof { key, id, at_ms })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers<'a>(
        signed: &'a [(&'static str, String); 3],
    ) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            signed
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.clone())
        }
    }

    #[test]
    fn key_is_made_once_and_its_id_is_stable() {
        let dir = tempfile::tempdir().unwrap();
        let a = NodeKey::load_or_create(&dir.path().join("node.key")).unwrap();
        let b = NodeKey::load_or_create(&dir.path().join("node.key")).unwrap();
        assert_eq!(a.id(), b.id());
        assert_eq!(a.id().len(), ID_BYTES * 2);
        assert_eq!(a.public_hex(), b.public_hex());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("node.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_signature_proves_the_request_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let key = NodeKey::load_or_create(&dir.path().join("node.key")).unwrap();
        let now = 1_000_000_000;
        let signed = key.sign_at("PUT", "/v1/nodes/x", b"body", now);
        let ok = verify(
            headers(&signed),
            "PUT",
            "/v1/nodes/x",
            b"body",
            key.id(),
            now,
        )
        .unwrap();
        assert_eq!(ok.id, key.id());
        assert_eq!(ok.at_ms, now);
        // Another body, path, method or id: refused.
        let check = |m, p, b: &[u8], id: &str, at| verify(headers(&signed), m, p, b, id, at);
        assert_eq!(
            check("PUT", "/v1/nodes/x", b"other", key.id(), now).unwrap_err(),
            ProofError::Forged
        );
        assert_eq!(
            check("PUT", "/v1/nodes/y", b"body", key.id(), now).unwrap_err(),
            ProofError::Forged
        );
        assert_eq!(
            check("DELETE", "/v1/nodes/x", b"body", key.id(), now).unwrap_err(),
            ProofError::Forged
        );
        assert!(matches!(
            check("PUT", "/v1/nodes/x", b"body", "0123", now).unwrap_err(),
            ProofError::WrongId { .. }
        ));
        assert!(matches!(
            check(
                "PUT",
                "/v1/nodes/x",
                b"body",
                key.id(),
                now + MAX_SKEW_MS + 1
            )
            .unwrap_err(),
            ProofError::Skewed(_)
        ));
        assert_eq!(
            verify(|_| None, "PUT", "/", b"", key.id(), now).unwrap_err(),
            ProofError::Missing
        );
    }

    #[test]
    fn openssl_keys_load() {
        // An operator may provision the key: the form `openssl genpkey` writes.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        let made = std::process::Command::new("openssl")
            .args(["genpkey", "-algorithm", "ed25519", "-out"])
            .arg(&path)
            .status()
            .expect("openssl (scripts/setup.sh installs it)");
        assert!(made.success());
        let key = NodeKey::load_or_create(&dir.path().join("node.key")).unwrap();
        assert_eq!(key.public_hex().len(), 64);
        std::fs::write(&path, "not a key").unwrap();
        assert!(matches!(
            NodeKey::load_or_create(&dir.path().join("node.key")),
            Err(IdentityError::Format { .. })
        ));
    }
}
