//! Registry credentials for `build --from-oci docker://...`: `--registry-auth` (USER:PASS,
//! or `@FILE` holding it), else the first of the files Podman and Docker keep them in
//! that has an entry for the registry: `$REGISTRY_AUTH_FILE`,
//! `$XDG_RUNTIME_DIR/containers/auth.json`, `$DOCKER_CONFIG/config.json` (default
//! `~/.docker/config.json`). Credential helpers (`credsStore`, `credHelpers`) are not run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use base64::Engine as _;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;

/// The largest credentials file read: they hold a few entries of a few hundred bytes.
const MAX_AUTH_FILE_BYTES: u64 = 1 << 20;

#[derive(Deserialize, Default)]
struct AuthFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
}

#[derive(Deserialize, Default)]
struct AuthEntry {
    /// base64 of `user:password`.
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
}

/// The credentials for `registry` (`host[:port]`): the flag's, else a file's, else none.
pub fn resolve(flag: Option<&str>, registry: &str) -> anyhow::Result<RegistryAuth> {
    if let Some(value) = flag {
        let value = match value.strip_prefix('@') {
            Some(path) => read_small(Path::new(path))
                .with_context(|| format!("--registry-auth @{path}"))?
                .trim_end_matches(['\r', '\n'])
                .to_string(),
            None => value.to_string(),
        };
        return user_pass(&value).context("--registry-auth: expected USER:PASS or @FILE");
    }
    for path in auth_files() {
        if !path.exists() {
            continue;
        }
        let text = read_small(&path)?;
        let file: AuthFile = serde_json::from_str(&text)
            .with_context(|| format!("parsing the registry credentials in {}", path.display()))?;
        if let Some(entry) = file.auths.iter().find(|(k, _)| same_registry(k, registry)) {
            tracing::debug!(file = %path.display(), registry, "registry credentials");
            return entry_auth(entry.1)
                .with_context(|| format!("{}: the entry for {registry}", path.display()));
        }
    }
    Ok(RegistryAuth::Anonymous)
}

fn auth_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    if let Some(p) = std::env::var_os("REGISTRY_AUTH_FILE") {
        files.push(PathBuf::from(p));
    }
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR") {
        files.push(PathBuf::from(dir).join("containers/auth.json"));
    }
    match std::env::var_os("DOCKER_CONFIG") {
        Some(dir) => files.push(PathBuf::from(dir).join("config.json")),
        None => {
            if let Some(home) = std::env::var_os("HOME") {
                files.push(PathBuf::from(home).join(".docker/config.json"));
            }
        }
    }
    files
}

/// A key of `auths` names `registry`: `host[:port]`, maybe with a scheme and a path
/// (`https://index.docker.io/v1/`).
fn same_registry(key: &str, registry: &str) -> bool {
    let host = key
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap_or_default();
    let hub = |h: &str| matches!(h, "docker.io" | "index.docker.io" | "registry-1.docker.io");
    host == registry || (hub(host) && hub(registry))
}

fn entry_auth(entry: &AuthEntry) -> anyhow::Result<RegistryAuth> {
    if let Some(token) = &entry.identitytoken {
        return Ok(RegistryAuth::Bearer(token.clone()));
    }
    if let (Some(user), Some(pass)) = (&entry.username, &entry.password) {
        return Ok(RegistryAuth::Basic(user.clone(), pass.clone()));
    }
    let encoded = entry
        .auth
        .as_deref()
        .context("no auth, username or password")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .context("auth is not base64")?;
    let text = String::from_utf8(decoded).context("auth is not UTF-8")?;
    user_pass(&text)
}

fn user_pass(value: &str) -> anyhow::Result<RegistryAuth> {
    match value.split_once(':') {
        Some((user, pass)) if !user.is_empty() => {
            Ok(RegistryAuth::Basic(user.to_string(), pass.to_string()))
        }
        _ => bail!("not USER:PASS"),
    }
}

fn read_small(path: &Path) -> anyhow::Result<String> {
    let meta = std::fs::metadata(path).with_context(|| format!("{}", path.display()))?;
    if !meta.is_file() || meta.len() > MAX_AUTH_FILE_BYTES {
        bail!(
            "{}: not a regular file of at most {MAX_AUTH_FILE_BYTES} bytes",
            path.display()
        );
    }
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_keys_match_with_or_without_scheme() {
        assert!(same_registry("127.0.0.1:5000", "127.0.0.1:5000"));
        assert!(same_registry(
            "https://127.0.0.1:5000/v2/",
            "127.0.0.1:5000"
        ));
        assert!(same_registry("https://index.docker.io/v1/", "docker.io"));
        assert!(!same_registry("127.0.0.1:5001", "127.0.0.1:5000"));
    }

    #[test]
    fn entries_decode() {
        let e = AuthEntry {
            auth: Some("dXNlcjpwYTpzcw==".into()), // user:pa:ss
            ..Default::default()
        };
        assert!(matches!(entry_auth(&e).unwrap(),
            RegistryAuth::Basic(u, p) if u == "user" && p == "pa:ss"));
        assert!(user_pass("nocolon").is_err());
        assert!(user_pass(":pass").is_err());
    }
}
