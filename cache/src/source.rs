//! Where missing chunks come from: origin nodes and the store, both over HTTP
//! (`GET {base}/v1/chunks/{digest}`).

use std::time::Duration;

use bytes::{Bytes, BytesMut};

use crate::digest::Digest;

/// Why one source could not give a chunk.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The request did not complete (refused, reset, DNS).
    #[error("{source_name}: unreachable: {detail}")]
    Unreachable { source_name: String, detail: String },
    /// The deadline passed before the whole chunk arrived.
    #[error("{source_name}: no complete answer within {deadline:?}")]
    Timeout {
        source_name: String,
        deadline: Duration,
    },
    /// The source answered with an HTTP error.
    #[error("{source_name}: HTTP {status}")]
    Status { source_name: String, status: u16 },
    /// The body was shorter or longer than the chunk.
    #[error("{source_name}: body of {got} bytes, chunk is {expected} bytes")]
    Length {
        source_name: String,
        got: u64,
        expected: u64,
    },
}

impl SourceError {
    /// Whether trying the same source again later may help.
    pub fn is_transient(&self) -> bool {
        match self {
            SourceError::Unreachable { .. } | SourceError::Timeout { .. } => true,
            SourceError::Status { status, .. } => *status >= 500,
            SourceError::Length { .. } => true,
        }
    }
}

/// A source of chunks. An enum, not a trait object: the set of kinds is closed.
#[derive(Clone, Debug)]
pub enum Source {
    Http(HttpSource),
}

impl Source {
    /// A printable name for logs and metrics (the base URL).
    pub fn name(&self) -> &str {
        match self {
            Source::Http(s) => &s.base,
        }
    }

    /// Fetches the chunk's bytes (unverified; the caller checks the digest).
    pub async fn fetch(
        &self,
        digest: &Digest,
        len: u64,
        deadline: Duration,
    ) -> Result<Bytes, SourceError> {
        match self {
            Source::Http(s) => s.fetch(digest, len, deadline).await,
        }
    }
}

/// A store or origin daemon reached over HTTP.
#[derive(Clone, Debug)]
pub struct HttpSource {
    /// Base URL without a trailing slash, e.g. `http://127.0.0.1:7070`.
    base: String,
    client: reqwest::Client,
    /// Bearer token for chunk reads, when the source requires one.
    token: Option<String>,
}

impl HttpSource {
    pub fn new(client: reqwest::Client, base: &str, token: Option<String>) -> HttpSource {
        HttpSource {
            base: base.trim_end_matches('/').to_string(),
            client,
            token,
        }
    }

    async fn fetch(
        &self,
        digest: &Digest,
        len: u64,
        deadline: Duration,
    ) -> Result<Bytes, SourceError> {
        let url = format!("{}/v1/chunks/{}", self.base, digest);
        match tokio::time::timeout(deadline, self.fetch_body(&url, len)).await {
            Ok(result) => result,
            Err(_) => Err(SourceError::Timeout {
                source_name: self.base.clone(),
                deadline,
            }),
        }
    }

    async fn fetch_body(&self, url: &str, len: u64) -> Result<Bytes, SourceError> {
        let unreachable = |e: reqwest::Error| SourceError::Unreachable {
            source_name: self.base.clone(),
            detail: e.to_string(),
        };
        let mut request = self.client.get(url);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let mut response = request.send().await.map_err(unreachable)?;
        if !response.status().is_success() {
            return Err(SourceError::Status {
                source_name: self.base.clone(),
                status: response.status().as_u16(),
            });
        }
        let length_error = |got| SourceError::Length {
            source_name: self.base.clone(),
            got,
            expected: len,
        };
        if let Some(declared) = response.content_length() {
            if declared != len {
                return Err(length_error(declared));
            }
        }
        // Read at most `len` bytes: a hostile or broken source cannot make us buffer more.
        let mut body = BytesMut::with_capacity(len as usize);
        while let Some(piece) = response.chunk().await.map_err(unreachable)? {
            if body.len() + piece.len() > len as usize {
                return Err(length_error((body.len() + piece.len()) as u64));
            }
            body.extend_from_slice(&piece);
        }
        if body.len() as u64 != len {
            return Err(length_error(body.len() as u64));
        }
        Ok(body.freeze())
    }
}
