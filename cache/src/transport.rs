//! The transports that move a chunk's stored bytes (raw, a zstd frame or zstd blocks,
//! at most the chunk's size; unverified: [`crate::fetch`] decodes and verifies):
//! HTTP (`GET {base}/v1/chunks/{digest}`, a store server or another daemon) and an
//! object store read directly, and the error every source reports.
//!
//! Another daemon (a peer, an origin) is asked for the stored form
//! ([`ACCEPT_STORED_FORM`], naming the encodings this node decodes) and names the
//! encoding of what it sends ([`CHUNK_ENCODING`]). A body it names encoded must be
//! smaller than the chunk; one it names raw, or one without the header (a daemon from
//! before stored forms, during a rolling upgrade), is the decoded chunk, exactly its
//! length. Either way the bytes are decoded and verified like the store's.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::digest::Digest;
use crate::encoding::Encoding;
use crate::link::LinkTimes;

/// Request header to another daemon: the encodings of a chunk's stored form the asker
/// decodes (comma-separated [`Encoding::as_str`] names). Without it a daemon sends the
/// decoded chunk, as daemons did before stored forms.
pub const ACCEPT_STORED_FORM: &str = "x-lazyblk-accept-stored-form";
/// Response header of a daemon's chunk: the encoding of the body
/// ([`Encoding::as_str`]); `raw` is the decoded chunk.
pub const CHUNK_ENCODING: &str = "x-lazyblk-chunk-encoding";
/// What this node asks another daemon for: every encoded form it decodes.
const ACCEPTED_FORMS: &str = "zstd-blocks, zstd";

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
    /// The body was longer than the chunk (no stored form of a chunk is), or ended
    /// before its declared length.
    #[error("{source_name}: body of {got} bytes, chunk is {expected} bytes")]
    Length {
        source_name: String,
        got: u64,
        expected: u64,
    },
    /// A daemon named an encoding this node does not know for the body it sent.
    #[error("{source_name}: a body in an unknown encoding {encoding:?}")]
    Encoding {
        source_name: String,
        encoding: String,
    },
    /// The source does not apply to this chunk now (this node owns it; an origin that
    /// is not a live member): passed over without counting against its health.
    #[error("{source_name}: passed over: {why}")]
    Skipped { source_name: String, why: String },
    /// The object store answered with an error.
    #[error("{source_name}: {detail}")]
    Object { source_name: String, detail: String },
}

impl SourceError {
    /// Whether trying the same source again later may help.
    pub fn is_transient(&self) -> bool {
        match self {
            SourceError::Unreachable { .. } | SourceError::Timeout { .. } => true,
            SourceError::Status { status, .. } => *status >= 500,
            SourceError::Length { .. } => true,
            SourceError::Encoding { .. } => false,
            SourceError::Skipped { .. } => false,
            SourceError::Object { .. } => true,
        }
    }

    /// Whether the source was passed over rather than tried.
    pub fn is_skip(&self) -> bool {
        matches!(self, SourceError::Skipped { .. })
    }
}

/// An object store's chunks, read directly: `{prefix}/chunks/{2 hex}/{digest}`, the keys
/// of `lazyblk store --backend`.
#[derive(Clone)]
pub struct ObjectSource {
    store: Arc<dyn object_store::ObjectStore>,
    prefix: object_store::path::Path,
    /// The bucket URL, for logs and metrics.
    pub(crate) name: String,
    /// What its requests cost ([`crate::link`]).
    pub(crate) link: Arc<LinkTimes>,
}

impl ObjectSource {
    pub fn new(
        store: Arc<dyn object_store::ObjectStore>,
        prefix: &str,
        name: &str,
    ) -> ObjectSource {
        ObjectSource {
            store,
            prefix: object_store::path::Path::from(prefix.trim_matches('/')),
            name: name.to_string(),
            link: Arc::default(),
        }
    }

    pub(crate) async fn fetch(
        &self,
        digest: &Digest,
        len: u64,
        deadline: Duration,
    ) -> Result<Bytes, SourceError> {
        use object_store::ObjectStoreExt as _;
        let key = self.chunk_key(digest);
        let fail = |e: object_store::Error| self.error(e);
        let fetched = async {
            let got = self.store.get(&key).await.map_err(fail)?;
            if got.meta.size > len {
                return Err(SourceError::Length {
                    source_name: self.name.clone(),
                    got: got.meta.size,
                    expected: len,
                });
            }
            got.bytes().await.map_err(fail)
        };
        let started = std::time::Instant::now();
        match tokio::time::timeout(deadline, fetched).await {
            Ok(result) => {
                if result.is_ok() {
                    self.link.whole(started.elapsed());
                }
                result
            }
            Err(_) => Err(SourceError::Timeout {
                source_name: self.name.clone(),
                deadline,
            }),
        }
    }

    /// Fetches bytes `range` of a chunk's stored object (exactly those, or an error).
    pub(crate) async fn fetch_range(
        &self,
        digest: &Digest,
        range: std::ops::Range<u64>,
        deadline: Duration,
    ) -> Result<Bytes, SourceError> {
        let key = self.chunk_key(digest);
        let len = range.end - range.start;
        let fetched = async {
            use object_store::ObjectStoreExt as _;
            self.store
                .get_range(&key, range)
                .await
                .map_err(|e| self.error(e))
        };
        let started = std::time::Instant::now();
        let fetched = exactly(&self.name, len, deadline, fetched).await;
        if fetched.is_ok() {
            self.link.range(len, started.elapsed());
        }
        fetched
    }

    fn chunk_key(&self, digest: &Digest) -> object_store::path::Path {
        let hex = digest.to_hex();
        let mut key = self.prefix.clone();
        for part in ["chunks", &hex[..2], &hex] {
            key = key.join(part);
        }
        key
    }

    fn error(&self, e: object_store::Error) -> SourceError {
        match e {
            object_store::Error::NotFound { .. } => SourceError::Status {
                source_name: self.name.clone(),
                status: 404,
            },
            other => SourceError::Object {
                source_name: self.name.clone(),
                detail: other.to_string(),
            },
        }
    }
}

/// The body of a ranged fetch within `deadline`: exactly `len` bytes, or an error.
async fn exactly(
    source_name: &str,
    len: u64,
    deadline: Duration,
    fetch: impl std::future::Future<Output = Result<Bytes, SourceError>>,
) -> Result<Bytes, SourceError> {
    match tokio::time::timeout(deadline, fetch).await {
        Ok(Ok(body)) if body.len() as u64 == len => Ok(body),
        Ok(Ok(body)) => Err(SourceError::Length {
            source_name: source_name.to_string(),
            got: body.len() as u64,
            expected: len,
        }),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(SourceError::Timeout {
            source_name: source_name.to_string(),
            deadline,
        }),
    }
}

/// The HTTP clients of a node's fetches: one for demand work, one for background
/// fetches on [`crate::background`]'s runtime. Two clients, two connection pools: a
/// connection is driven by the runtime that opened it, so a demand read must never
/// take one the low-priority runtime opened (nor a fill one of the demand runtime's).
#[derive(Clone, Debug)]
pub struct HttpClients {
    demand: reqwest::Client,
    background: reqwest::Client,
}

impl HttpClients {
    /// Clients built by `make`, called once for each.
    pub fn new(make: impl Fn() -> reqwest::Client) -> HttpClients {
        HttpClients {
            demand: make(),
            background: make(),
        }
    }

    /// The client for work on the calling thread's runtime.
    pub fn current(&self) -> &reqwest::Client {
        if crate::background::on_background_runtime() {
            &self.background
        } else {
            &self.demand
        }
    }
}

/// A store or origin daemon reached over HTTP.
#[derive(Clone, Debug)]
pub struct HttpSource {
    /// Base URL without a trailing slash, e.g. `http://127.0.0.1:7070`.
    pub(crate) base: String,
    clients: HttpClients,
    /// Bearer token for chunk reads, when the source requires one.
    token: Option<String>,
    /// What its requests for the store's chunks cost ([`crate::link`]).
    pub(crate) link: Arc<LinkTimes>,
}

impl HttpSource {
    pub fn new(clients: HttpClients, base: &str, token: Option<String>) -> HttpSource {
        HttpSource {
            base: base.trim_end_matches('/').to_string(),
            clients,
            token,
            link: Arc::default(),
        }
    }

    pub(crate) async fn fetch(
        &self,
        digest: &Digest,
        len: u64,
        deadline: Duration,
    ) -> Result<Bytes, SourceError> {
        let url = format!("{}/v1/chunks/{}", self.base, digest);
        let started = std::time::Instant::now();
        let fetched = self.fetch_within(&url, len, deadline, Server::Store).await;
        if fetched.is_ok() {
            self.link.whole(started.elapsed());
        }
        fetched
    }

    /// Fetches a chunk of `len` bytes from another daemon (an origin) at its
    /// `/v1/chunks/{digest}`: its stored form when it keeps one (see the module header).
    pub(crate) async fn fetch_from_node(
        &self,
        digest: &Digest,
        len: u64,
        deadline: Duration,
    ) -> Result<Bytes, SourceError> {
        let url = format!("{}/v1/chunks/{}", self.base, digest);
        self.fetch_within(&url, len, deadline, Server::Daemon).await
    }

    /// Fetches a chunk of `len` bytes from another daemon's `url` within `deadline`: its
    /// stored form (smaller than `len`) or the decoded chunk (exactly `len`), as the
    /// daemon's [`CHUNK_ENCODING`] says (see the module header).
    pub async fn fetch_url(
        &self,
        url: &str,
        len: u64,
        deadline: Duration,
    ) -> Result<Bytes, SourceError> {
        self.fetch_within(url, len, deadline, Server::Daemon).await
    }

    async fn fetch_within(
        &self,
        url: &str,
        len: u64,
        deadline: Duration,
        server: Server,
    ) -> Result<Bytes, SourceError> {
        match tokio::time::timeout(deadline, self.fetch_body(url, len, None, server)).await {
            Ok(result) => result,
            Err(_) => Err(SourceError::Timeout {
                source_name: self.base.clone(),
                deadline,
            }),
        }
    }

    /// Fetches bytes `range` of a chunk's stored object (exactly those, or an error).
    pub(crate) async fn fetch_range(
        &self,
        digest: &Digest,
        range: std::ops::Range<u64>,
        deadline: Duration,
    ) -> Result<Bytes, SourceError> {
        let url = format!("{}/v1/chunks/{}", self.base, digest);
        let len = range.end - range.start;
        let started = std::time::Instant::now();
        let fetched = exactly(
            &self.base,
            len,
            deadline,
            self.fetch_body(&url, len, Some(range), Server::Store),
        )
        .await;
        if fetched.is_ok() {
            self.link.range(len, started.elapsed());
        }
        fetched
    }

    /// Fetches bytes `range` of the stored form another daemon serves at `url` (exactly
    /// those, in an encoding it names, or an error).
    pub(crate) async fn fetch_range_url(
        &self,
        url: &str,
        range: std::ops::Range<u64>,
        deadline: Duration,
    ) -> Result<Bytes, SourceError> {
        let len = range.end - range.start;
        exactly(
            &self.base,
            len,
            deadline,
            self.fetch_body(url, len, Some(range), Server::Daemon),
        )
        .await
    }

    async fn fetch_body(
        &self,
        url: &str,
        len: u64,
        range: Option<std::ops::Range<u64>>,
        server: Server,
    ) -> Result<Bytes, SourceError> {
        let unreachable = |e: reqwest::Error| SourceError::Unreachable {
            source_name: self.base.clone(),
            detail: e.to_string(),
        };
        let mut request = self.clients.current().get(url);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if server == Server::Daemon {
            request = request.header(ACCEPT_STORED_FORM, ACCEPTED_FORMS);
        }
        let ranged = range.is_some();
        if let Some(range) = range {
            request = request.header(
                reqwest::header::RANGE,
                format!("bytes={}-{}", range.start, range.end - 1),
            );
        }
        let mut response = request.send().await.map_err(unreachable)?;
        // A source that ignores the range would send the whole object: refused.
        if ranged && response.status() != reqwest::StatusCode::PARTIAL_CONTENT {
            return Err(SourceError::Status {
                source_name: self.base.clone(),
                status: response.status().as_u16(),
            });
        }
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
        let encoding = match server {
            Server::Store => None,
            Server::Daemon => Some(self.named_encoding(response.headers())?),
        };
        let declared = response.content_length();
        if let Some(declared) = declared {
            if declared > len {
                return Err(length_error(declared));
            }
        }
        // Read at most `len` bytes: a hostile or broken source cannot make us buffer more.
        let mut body = crate::buffers::take_empty(len as usize);
        while let Some(piece) = response.chunk().await.map_err(unreachable)? {
            if body.len() + piece.len() > len as usize {
                return Err(length_error((body.len() + piece.len()) as u64));
            }
            body.extend_from_slice(&piece);
        }
        if declared.is_some_and(|d| d != body.len() as u64) {
            return Err(length_error(body.len() as u64));
        }
        // A decoded chunk is its length; a stored form is smaller (else it is stored raw).
        // A range is of a stored form (its length is checked by the caller).
        let fits = match (ranged, encoding) {
            (_, None) => true,
            (true, Some(encoding)) => encoding != Encoding::Raw,
            (false, Some(Encoding::Raw)) => body.len() as u64 == len,
            (false, Some(_)) => (body.len() as u64) < len,
        };
        if !fits {
            return Err(length_error(body.len() as u64));
        }
        Ok(crate::buffers::into_bytes(body))
    }

    /// The encoding a daemon named for its body: raw (the decoded chunk) when it named
    /// none, as daemons from before stored forms do.
    fn named_encoding(
        &self,
        headers: &reqwest::header::HeaderMap,
    ) -> Result<Encoding, SourceError> {
        let Some(value) = headers.get(CHUNK_ENCODING) else {
            return Ok(Encoding::Raw);
        };
        let name = String::from_utf8_lossy(value.as_bytes()).trim().to_string();
        Encoding::parse(&name).ok_or(SourceError::Encoding {
            source_name: self.base.clone(),
            encoding: name,
        })
    }
}

/// What kind of server a chunk is fetched from: the store (its objects are stored forms,
/// told apart by their bytes) or another daemon (which names its body's encoding).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Server {
    Store,
    Daemon,
}

#[cfg(test)]
mod tests {
    use super::HttpClients;

    #[tokio::test]
    async fn background_work_gets_the_background_client() {
        let clients = HttpClients::new(reqwest::Client::new);
        assert!(std::ptr::eq(clients.current(), &clients.demand));
        let on_background = clients.clone();
        let picked_background = crate::background::spawn(|| false, async move {
            std::ptr::eq(on_background.current(), &on_background.background)
        })
        .await
        .unwrap();
        assert!(picked_background);
    }
}
