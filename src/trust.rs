//! Signed templates (DESIGN section 10, "The same key signs the templates it commits"):
//! a manifest's signature, and the keys a daemon or a store trusts.
//!
//! - `publish` and `build` sign with `--signing-key FILE` (PKCS#8 PEM, as `lazyblk
//!   keygen` or `openssl genpkey -algorithm ed25519` writes it); a daemon signs its
//!   commits and resizes with its node key ([`crate::identity`]).
//! - A signature covers the exact bytes of the stored manifest, after [`DOMAIN`] (so a
//!   manifest's signature can never pass for a signed request, nor the reverse). It is
//!   kept beside the manifest (`manifests/<id>.sig`, `{"key", "signature"}` in hex) in
//!   every backend, and travels over HTTP in the headers [`KEY_HEADER`] and
//!   [`SIGNATURE_HEADER`] of the manifest's PUT and GET.
//! - `--trusted-keys FILE` lists the public keys (hex, one a line, `#` comments), read
//!   at start and again on SIGHUP. A daemon with it serves only templates signed by one
//!   of them; a store with it publishes only such manifests.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use ed25519_dalek::Signature;
use serde::{Deserialize, Serialize};

use crate::identity::{parse_public, NodeKey};

/// What a manifest's signature covers before its bytes.
pub const DOMAIN: &[u8] = b"lazyblk-manifest-v1\n";
/// The header that carries the signing public key (64 hex digits) with a manifest.
pub const KEY_HEADER: &str = "x-lazyblk-manifest-key";
/// The header that carries the manifest's signature (128 hex digits).
pub const SIGNATURE_HEADER: &str = "x-lazyblk-manifest-signature";
/// The largest trusted keys file read: a few thousand keys, far more than any
/// rotation needs, and a file someone pointed at the wrong thing is refused quickly.
pub const MAX_KEYS_FILE: u64 = 1 << 20;
/// The largest `.sig` document read: two hex strings and their names.
pub const MAX_SIGNATURE_DOC: usize = 4096;

/// Why a template's manifest is not trusted, or a signature cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrustError {
    #[error("template {template}: its manifest is not signed, and only manifests signed by a key in {keys} are trusted")]
    Unsigned { template: String, keys: String },
    #[error("template {template}: its manifest is signed by key {key}, which is not in {keys}")]
    Untrusted {
        template: String,
        key: String,
        keys: String,
    },
    #[error("template {template}: the signature by key {key} does not match the manifest's bytes")]
    Forged { template: String, key: String },
    #[error("template {template}: the manifest's signature is malformed: {reason}")]
    Malformed { template: String, reason: String },
    #[error("trusted keys {path}: {reason}")]
    KeysFile { path: PathBuf, reason: String },
}

/// A manifest's signature: who signed, and the signature, both in hex.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestSignature {
    pub key: String,
    pub signature: String,
}

impl ManifestSignature {
    /// `key`'s signature of the manifest bytes `manifest`.
    pub fn sign(key: &NodeKey, manifest: &[u8]) -> ManifestSignature {
        let signature = key.sign_bytes(&message(manifest));
        ManifestSignature {
            key: key.public_hex(),
            signature: hex::encode(signature.to_bytes()),
        }
    }

    /// The signature in a `.sig` document of `template`.
    pub fn parse(template: &str, doc: &[u8]) -> Result<ManifestSignature, TrustError> {
        let malformed = |reason: String| TrustError::Malformed {
            template: template.to_string(),
            reason,
        };
        if doc.len() > MAX_SIGNATURE_DOC {
            return Err(malformed(format!("longer than {MAX_SIGNATURE_DOC} bytes")));
        }
        let sig: ManifestSignature =
            serde_json::from_slice(doc).map_err(|e| malformed(e.to_string()))?;
        sig.checked(template)
    }

    /// The signature sent in a manifest's headers, if any: both headers or neither.
    pub fn from_headers(
        template: &str,
        key: Option<&str>,
        signature: Option<&str>,
    ) -> Result<Option<ManifestSignature>, TrustError> {
        match (key, signature) {
            (None, None) => Ok(None),
            (Some(key), Some(signature)) => ManifestSignature {
                key: key.trim().to_ascii_lowercase(),
                signature: signature.trim().to_ascii_lowercase(),
            }
            .checked(template)
            .map(Some),
            _ => Err(TrustError::Malformed {
                template: template.to_string(),
                reason: format!("{KEY_HEADER} and {SIGNATURE_HEADER} come together"),
            }),
        }
    }

    /// This signature if its key and signature have the right form.
    fn checked(self, template: &str) -> Result<ManifestSignature, TrustError> {
        let malformed = |reason: &str| TrustError::Malformed {
            template: template.to_string(),
            reason: reason.to_string(),
        };
        if parse_public(&self.key).is_none() {
            return Err(malformed("the key is not an ed25519 public key in hex"));
        }
        if self.signature_bytes().is_none() {
            return Err(malformed("the signature is not 64 bytes in hex"));
        }
        Ok(self)
    }

    fn signature_bytes(&self) -> Option<[u8; 64]> {
        hex::decode(&self.signature).ok()?.try_into().ok()
    }

    /// The `.sig` document.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Whether this is a signature of exactly `manifest` by its key.
    pub fn verify(&self, template: &str, manifest: &[u8]) -> Result<(), TrustError> {
        let checked = self.clone().checked(template)?;
        let (Some(key), Some(signature)) = (parse_public(&checked.key), checked.signature_bytes())
        else {
            return Err(TrustError::Malformed {
                template: template.to_string(),
                reason: "unreadable key or signature".into(),
            });
        };
        key.verify_strict(&message(manifest), &Signature::from_bytes(&signature))
            .map_err(|_| TrustError::Forged {
                template: template.to_string(),
                key: self.key.clone(),
            })
    }
}

fn message(manifest: &[u8]) -> Vec<u8> {
    [DOMAIN, manifest].concat()
}

/// The keys in a `--trusted-keys` file, read again on [`TrustedKeys::reload`].
pub struct TrustedKeys {
    path: PathBuf,
    keys: RwLock<BTreeSet<String>>,
}

impl TrustedKeys {
    /// The keys in `path`; a file that cannot be read or has a line that is not a key
    /// is an error (a daemon or store does not start on it).
    pub fn open(path: &Path) -> Result<Arc<TrustedKeys>, TrustError> {
        let keys = read_keys(path)?;
        Ok(Arc::new(TrustedKeys {
            path: path.to_path_buf(),
            keys: RwLock::new(keys),
        }))
    }

    /// Reads the file again. A file that no longer reads leaves the keys as they were
    /// (and the error is returned for the log): a half-written file must not open the
    /// node to every key, nor close it to all.
    pub fn reload(&self) -> Result<usize, TrustError> {
        let keys = read_keys(&self.path)?;
        let count = keys.len();
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = keys;
        Ok(count)
    }

    /// Whether `signer` (the verified key of `template`'s manifest, if it is signed) is
    /// trusted.
    pub fn check_signer(&self, template: &str, signer: Option<&str>) -> Result<(), TrustError> {
        let keys = self.path.display().to_string();
        let Some(key) = signer else {
            return Err(TrustError::Unsigned {
                template: template.to_string(),
                keys,
            });
        };
        if self
            .keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&key.to_ascii_lowercase())
        {
            Ok(())
        } else {
            Err(TrustError::Untrusted {
                template: template.to_string(),
                key: key.to_string(),
                keys,
            })
        }
    }

    /// Whether `manifest` (the exact bytes of `template`'s manifest) carries a valid
    /// signature by a trusted key.
    pub fn check(
        &self,
        template: &str,
        manifest: &[u8],
        signature: Option<&ManifestSignature>,
    ) -> Result<(), TrustError> {
        if let Some(sig) = signature {
            sig.verify(template, manifest)?;
        }
        self.check_signer(template, signature.map(|s| s.key.as_str()))
    }
}

/// Reads `keys` again on every SIGHUP, for as long as the process runs. Installed
/// without keys too, so a reload (systemd's `ExecReload`) never ends the process, as
/// SIGHUP's default action would.
pub fn reload_on_sighup(keys: Option<Arc<TrustedKeys>>) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            let Some(keys) = &keys else {
                tracing::info!("SIGHUP: no --trusted-keys to read again");
                continue;
            };
            match keys.reload() {
                Ok(n) => {
                    tracing::info!(path = %keys.path.display(), keys = n, "trusted keys read again")
                }
                Err(e) => tracing::error!(error = %e, "trusted keys unchanged"),
            }
        }
    });
    Ok(())
}

/// The keys of a trusted keys file: one public key in hex at the start of each line
/// (words after it name the key), `#` starts a comment.
fn read_keys(path: &Path) -> Result<BTreeSet<String>, TrustError> {
    let err = |reason: String| TrustError::KeysFile {
        path: path.to_path_buf(),
        reason,
    };
    let len = std::fs::metadata(path)
        .map_err(|e| err(e.to_string()))?
        .len();
    if len > MAX_KEYS_FILE {
        return Err(err(format!("larger than {MAX_KEYS_FILE} bytes")));
    }
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let mut keys = BTreeSet::new();
    for (n, line) in text.lines().enumerate() {
        let word = line.split('#').next().unwrap_or("").trim();
        let Some(word) = word.split_whitespace().next() else {
            continue;
        };
        if parse_public(word).is_none() {
            return Err(err(format!(
                "line {}: expected an ed25519 public key in hex (lazyblk keygen and lazyblk node-key print it)",
                n + 1
            )));
        }
        keys.insert(word.to_ascii_lowercase());
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_covers_exactly_its_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let key = NodeKey::load_or_create(&dir.path().join("node.key")).unwrap();
        let sig = ManifestSignature::sign(&key, b"{\"a\":1}");
        sig.verify("t", b"{\"a\":1}").unwrap();
        assert!(matches!(
            sig.verify("t", b"{\"a\":2}"),
            Err(TrustError::Forged { .. })
        ));
        let mut short = sig.clone();
        short.signature.truncate(100);
        assert!(matches!(
            short.verify("t", b"{\"a\":1}"),
            Err(TrustError::Malformed { .. })
        ));
        let doc = sig.to_json();
        assert_eq!(ManifestSignature::parse("t", &doc).unwrap(), sig);
        assert!(ManifestSignature::parse("t", &doc[..doc.len() / 2]).is_err());
        assert!(ManifestSignature::from_headers("t", Some(&sig.key), None).is_err());
    }

    #[test]
    fn only_listed_keys_are_trusted_and_a_reload_revokes() {
        let dir = tempfile::tempdir().unwrap();
        let key = NodeKey::load_or_create(&dir.path().join("node.key")).unwrap();
        let path = dir.path().join("trusted");
        std::fs::write(&path, format!("# ops\n{} release key\n", key.public_hex())).unwrap();
        let trusted = TrustedKeys::open(&path).unwrap();
        let sig = ManifestSignature::sign(&key, b"m");
        trusted.check("t", b"m", Some(&sig)).unwrap();
        assert!(matches!(
            trusted.check("t", b"m", None),
            Err(TrustError::Unsigned { .. })
        ));
        std::fs::write(&path, "").unwrap();
        trusted.reload().unwrap();
        assert!(matches!(
            trusted.check("t", b"m", Some(&sig)),
            Err(TrustError::Untrusted { .. })
        ));
        // A file that no longer reads keeps the keys it had.
        std::fs::write(&path, "not a key\n").unwrap();
        assert!(trusted.reload().is_err());
        assert!(TrustedKeys::open(&path).is_err());
    }
}
