//! What every handler of the store shares: the state, the error answer, limits,
//! and the checks of ids, digests and bodies.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use lazyblk_cache::{validate_id, Digest};

use crate::auth::carries;
use crate::http_server::ErrorAnswer;
use crate::store::backend::{Backend, BackendError};

use super::counters::StoreMetrics;

/// The largest JSON body accepted (manifest, trace, missing list). The manifest of a
/// 50 GiB template at the smallest chunk size (64 KiB) lists 819,200 digests, about
/// 55 MB of JSON; this leaves room above that and still bounds what one request costs.
pub const MAX_JSON_BODY: u64 = 64 << 20;
/// How long gc keeps unreferenced chunks that were written or confirmed recently,
/// unless the request says otherwise: longer than a large publish takes between
/// uploading its chunks and putting its manifest.
pub const DEFAULT_GC_GRACE: Duration = Duration::from_secs(600);

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub(super) backend: Arc<Backend>,
    /// The fleet's live nodes (leases renewed by heartbeats).
    pub(super) nodes: Arc<crate::store::nodes::Membership>,
    /// Wishes and the label policy.
    pub(super) center: Arc<crate::store::center::Center>,
    pub(super) metrics: Arc<StoreMetrics>,
    pub(super) tokens: Arc<Tokens>,
    /// Who may be a member, at what address (`--member-keys`, `--member-networks`).
    pub(super) admission: Arc<crate::store::admission::Admission>,
    /// The keys a manifest must be signed by to be published (`--trusted-keys`); any
    /// manifest, signed or not, when unset.
    pub(super) trusted_keys: Option<Arc<crate::trust::TrustedKeys>>,
}

impl AppState {
    pub fn new(
        backend: Arc<Backend>,
        center: Arc<crate::store::center::Center>,
        nodes: crate::store::nodes::Membership,
        admission: crate::store::admission::Admission,
        tokens: Tokens,
    ) -> AppState {
        AppState {
            backend,
            center,
            nodes: Arc::new(nodes),
            metrics: Arc::new(StoreMetrics::new()),
            tokens: Arc::new(tokens),
            admission: Arc::new(admission),
            trusted_keys: None,
        }
    }

    /// This state, publishing only manifests signed by one of `keys`.
    pub fn with_trusted_keys(mut self, keys: Arc<crate::trust::TrustedKeys>) -> AppState {
        self.trusted_keys = Some(keys);
        self
    }

    /// The store's engine.
    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }

    /// The fleet's membership.
    pub fn nodes(&self) -> &crate::store::nodes::Membership {
        &self.nodes
    }

    /// Writes the member list when it changed (see [`crate::store::nodes::Membership::persist`]).
    pub async fn persist_members(&self) -> Result<(), BackendError> {
        self.nodes.persist(&self.backend).await
    }
}

/// An error answer: `{"error": "..."}` with a status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, message: String) -> ApiError {
        ApiError { status, message }
    }

    pub(super) fn bad_request(message: String) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }
}

impl From<BackendError> for ApiError {
    fn from(e: BackendError) -> ApiError {
        let status = match &e {
            BackendError::UnknownTemplate(_) | BackendError::NoTrace(_) => StatusCode::NOT_FOUND,
            BackendError::InvalidManifest(_)
            | BackendError::Signature(_)
            | BackendError::InvalidTrace { .. }
            | BackendError::DigestMismatch { .. }
            | BackendError::Body { .. } => StatusCode::BAD_REQUEST,
            BackendError::Conflict { .. } | BackendError::GcRunning(_) => StatusCode::CONFLICT,
            BackendError::Unsatisfiable { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
            BackendError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            // The bucket behind the store failed, not the store itself.
            BackendError::Object { .. } => StatusCode::BAD_GATEWAY,
            BackendError::Contended { .. } => StatusCode::SERVICE_UNAVAILABLE,
            BackendError::Corrupt { .. }
            | BackendError::Io { .. }
            | BackendError::Config { .. }
            | BackendError::Task(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // A refusal for now (503: membership settling, members full) is not a fault.
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            tracing::info!("{}", self.message);
        } else if self.status.is_server_error() {
            tracing::error!("{}", self.message);
        }
        (
            self.status,
            Json(ErrorAnswer {
                error: self.message,
            }),
        )
            .into_response()
    }
}

pub(super) fn checked_id(id: &str) -> Result<(), ApiError> {
    validate_id(id).map_err(|e| ApiError::bad_request(e.to_string()))
}

pub(super) fn checked_digest(digest: &str) -> Result<Digest, ApiError> {
    digest
        .parse()
        .map_err(|e: lazyblk_cache::digest::DigestParseError| ApiError::bad_request(e.to_string()))
}

/// Reads a whole request body of at most `limit` bytes.
pub(super) async fn read_body(body: Body, limit: u64, what: &str) -> Result<Bytes, ApiError> {
    let mut stream = body.into_data_stream();
    let mut out = Vec::new();
    while let Some(piece) = stream.next().await {
        let piece =
            piece.map_err(|e| ApiError::bad_request(format!("reading the body of {what}: {e}")))?;
        if (out.len() + piece.len()) as u64 > limit {
            return Err(BackendError::TooLarge {
                what: what.to_string(),
                limit,
            }
            .into());
        }
        out.extend_from_slice(&piece);
    }
    Ok(Bytes::from(out))
}

pub(super) fn json_bytes(bytes: Vec<u8>) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], bytes).into_response()
}

/// The configured bearer tokens: one right each.
#[derive(Default)]
pub struct Tokens {
    /// Publishing: manifests, chunks, traces (every request that is not GET or HEAD
    /// and has no right of its own below).
    pub write: Option<String>,
    /// Chunk reads (the write token also reads).
    pub read: Option<String>,
    /// Leases (`/v1/nodes/{id}`), besides the node's key; the write token when unset.
    pub member: Option<String>,
    /// Wishes, policy, deletes, gc and scrub; the write token when unset.
    pub admin: Option<String>,
}

impl Tokens {
    /// The tokens as configured; an empty one is none.
    pub fn new(
        write: Option<String>,
        read: Option<String>,
        member: Option<String>,
        admin: Option<String>,
    ) -> Tokens {
        let set = |t: Option<String>| t.filter(|t| !t.is_empty());
        Tokens {
            write: set(write),
            read: set(read),
            member: set(member),
            admin: set(admin),
        }
    }

    /// The right a changing request of `method` on `path` needs: (its token, its name).
    fn right<'s>(&'s self, method: &Method, path: &str) -> (Option<&'s String>, &'static str) {
        let or_write = |t: &'s Option<String>| t.as_ref().or(self.write.as_ref());
        if path.starts_with("/v1/nodes/") {
            return (
                or_write(&self.member),
                "leases need the store's member token",
            );
        }
        let admin = path.starts_with("/v1/wishes")
            || path.starts_with("/v1/policy")
            || path == "/v1/gc"
            || path == "/v1/scrub"
            || (method == Method::DELETE && path.starts_with("/v1/templates/"));
        if admin {
            return (
                or_write(&self.admin),
                "wishes, policy, deletes, gc and scrub need the store's admin token",
            );
        }
        (self.write.as_ref(), "writes need the store's write token")
    }

    pub(super) fn check(
        &self,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
    ) -> Result<(), ApiError> {
        let matches = |t: &Option<String>| t.as_deref().is_some_and(|t| carries(headers, t));
        let reading = method == Method::GET || method == Method::HEAD;
        if !reading {
            if let (Some(token), what) = self.right(method, path) {
                if !carries(headers, token) {
                    return Err(unauthorized(what));
                }
            }
        }
        let chunk_read = reading && path.starts_with("/v1/chunks/");
        if chunk_read && self.read.is_some() && !matches(&self.read) && !matches(&self.write) {
            return Err(unauthorized("chunk reads need the store's read token"));
        }
        Ok(())
    }
}

pub(super) fn unauthorized(what: &str) -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        format!("missing or wrong bearer token: {what}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::header;

    #[test]
    fn tokens_guard_writes_and_chunk_reads() {
        let tokens = Tokens::new(Some("w".into()), Some("r".into()), None, None);
        let auth = |t: &str| {
            let mut h = HeaderMap::new();
            h.insert(
                header::AUTHORIZATION,
                format!("Bearer {t}").parse().unwrap(),
            );
            h
        };
        let none = HeaderMap::new();
        assert!(tokens.check(&Method::PUT, "/v1/chunks/x", &none).is_err());
        assert!(tokens
            .check(&Method::PUT, "/v1/chunks/x", &auth("r"))
            .is_err());
        assert!(tokens
            .check(&Method::PUT, "/v1/chunks/x", &auth("w"))
            .is_ok());
        assert!(tokens.check(&Method::GET, "/v1/chunks/x", &none).is_err());
        assert!(tokens
            .check(&Method::GET, "/v1/chunks/x", &auth("r"))
            .is_ok());
        assert!(tokens
            .check(&Method::HEAD, "/v1/chunks/x", &auth("w"))
            .is_ok());
        assert!(tokens.check(&Method::GET, "/v1/templates", &none).is_ok());
        // Without tokens of their own, leases and admin routes take the write token.
        assert!(tokens
            .check(&Method::PUT, "/v1/nodes/a", &auth("w"))
            .is_ok());
        assert!(tokens.check(&Method::PUT, "/v1/nodes/a", &none).is_err());
        assert!(tokens.check(&Method::POST, "/v1/gc", &auth("w")).is_ok());
    }

    #[test]
    fn member_and_admin_rights_are_separate() {
        let tokens = Tokens::new(Some("w".into()), None, Some("m".into()), Some("a".into()));
        let auth = |t: &str| {
            let mut h = HeaderMap::new();
            h.insert(
                header::AUTHORIZATION,
                format!("Bearer {t}").parse().unwrap(),
            );
            h
        };
        let ok = |m: Method, p: &str, t: &str| tokens.check(&m, p, &auth(t)).is_ok();
        assert!(ok(Method::PUT, "/v1/nodes/a", "m"));
        assert!(!ok(Method::PUT, "/v1/nodes/a", "w"));
        assert!(!ok(Method::PUT, "/v1/nodes/a", "a"));
        assert!(ok(Method::DELETE, "/v1/templates/t", "a"));
        assert!(!ok(Method::DELETE, "/v1/templates/t", "w"));
        assert!(!ok(Method::DELETE, "/v1/templates/t", "m"));
        assert!(ok(Method::PUT, "/v1/wishes/t", "a"));
        assert!(!ok(Method::PUT, "/v1/wishes/t", "m"));
        assert!(ok(Method::PUT, "/v1/policy/k", "a"));
        assert!(ok(Method::POST, "/v1/gc", "a"));
        assert!(!ok(Method::POST, "/v1/gc", "w"));
        assert!(ok(Method::PUT, "/v1/templates/t/manifest", "w"));
        assert!(!ok(Method::PUT, "/v1/templates/t/manifest", "a"));
        assert!(!ok(Method::PUT, "/v1/chunks/x", "m"));
    }
}
