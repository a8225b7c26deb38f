//! The flag grammar every layer shares: the store's default address, the bearer token
//! a client sends (`--token`, `--token-file`), sizes (`64K`, `20G`) and labels
//! (`KEY=VALUE`). The argument structs that use it live next to the code that runs them
//! (`daemon::args`, `store::args`, `publish::args`, `build::args`, `commands::*`), so
//! this module imports none of them.

use std::path::PathBuf;

use clap::Args;

/// The store's default address.
pub const DEFAULT_STORE: &str = "http://127.0.0.1:7070";

/// The write token a command sends: `--token`, `LAZYBLK_WRITE_TOKEN`, or
/// `--token-file`. Never printed.
#[derive(Args, Debug, Clone, Default)]
pub struct TokenArg {
    /// Bearer token for the server's changing requests, when the server requires one
    /// (the daemon's or the store's write token, whichever this command talks to).
    #[arg(
        long = "token",
        alias = "write-token",
        env = "LAZYBLK_WRITE_TOKEN",
        hide_env_values = true,
        conflicts_with = "token_file"
    )]
    pub token: Option<String>,
    /// Read the token from this file (its first line), so it stays out of the process
    /// list and the shell history.
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
}

/// A `--token-file` that gives no token.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    /// The file could not be read.
    #[error("cannot read the token file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Its first line is empty.
    #[error("the token file {path} is empty")]
    Empty { path: PathBuf },
}

impl TokenArg {
    /// The token, read from its file when one was named.
    pub fn resolve(&self) -> Result<Option<String>, TokenFileError> {
        let Some(path) = &self.token_file else {
            return Ok(self.token.clone().filter(|t| !t.is_empty()));
        };
        let text = std::fs::read_to_string(path).map_err(|source| TokenFileError::Read {
            path: path.clone(),
            source,
        })?;
        let token = text.lines().next().unwrap_or("").trim().to_string();
        if token.is_empty() {
            return Err(TokenFileError::Empty { path: path.clone() });
        }
        Ok(Some(token))
    }
}

/// Parses sizes such as `4096`, `64K`, `1M`, `20G`, `1T` (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits.parse().map_err(|_| {
        format!("invalid size {s:?}: expected a number with an optional K, M, G or T")
    })?;
    let shift = match unit
        .trim_end_matches(['i', 'B'])
        .to_ascii_uppercase()
        .as_str()
    {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(format!("invalid size {s:?}: unknown unit {unit:?}")),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

/// Parses `KEY=VALUE`, checked against the label grammar (`lazyblk_cache::labels`).
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    let (key, value) = s.split_once('=').ok_or_else(|| {
        format!(
            "label {:?} must be KEY=VALUE",
            s.chars().take(80).collect::<String>()
        )
    })?;
    lazyblk_cache::labels::validate_label(key, value)?;
    Ok((key.to_string(), value.to_string()))
}

/// Parses a policy's label key (the label grammar's keys).
pub fn parse_label_key(s: &str) -> Result<String, String> {
    lazyblk_cache::labels::validate_label_key(s)?;
    Ok(s.to_string())
}

/// Labels as the servers take them.
pub fn label_map(labels: &[(String, String)]) -> std::collections::BTreeMap<String, String> {
    labels.iter().cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_follow_the_grammar() {
        assert_eq!(
            parse_label("guest_agent=1.4.2").unwrap(),
            ("guest_agent".to_string(), "1.4.2".to_string())
        );
        assert!(parse_label("no-equals").is_err());
        assert!(parse_label("bad key=1").is_err());
        assert!(parse_label("k=a\u{1b}b").is_err());
        assert!(parse_label_key("bad\nkey").is_err());
    }

    #[test]
    fn a_token_file_gives_its_first_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "s3cret\n").unwrap();
        let arg = TokenArg {
            token: None,
            token_file: Some(path.clone()),
        };
        assert_eq!(arg.resolve().unwrap().as_deref(), Some("s3cret"));
        std::fs::write(&path, "\n").unwrap();
        assert!(arg.resolve().is_err());
        let err = TokenArg {
            token: None,
            token_file: Some(dir.path().join("absent")),
        }
        .resolve()
        .unwrap_err();
        assert!(err.to_string().contains("absent"), "{err}");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64K").unwrap(), 65536);
        assert_eq!(parse_size("1M").unwrap(), 1 << 20);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert!(parse_size("1X").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
