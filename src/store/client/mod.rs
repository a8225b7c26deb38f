//! [`StoreClient`], the client of the store's HTTP API used by the commands, publish
//! and the daemon: manifests, chunks, traces, delete, gc and scrub here; membership and
//! the template center in [`center`]; the transport (failover over several servers,
//! the store's errors) in [`transport`]. Answers are parsed into the store's own types.

mod center;
mod transport;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use lazyblk_cache::{validate_id, Digest, Manifest};

use super::direct::Direct;
use super::{GcReport, TemplateSummary, TraceDoc};
use crate::identity::NodeKey;
use crate::trust::ManifestSignature;

/// Deadline of a metadata request (manifests, lists, traces): a 50 GiB template's
/// manifest at 64 KiB chunks is ~55 MB, still seconds on any link a node uses.
const METADATA_TIMEOUT: Duration = Duration::from_secs(60);
/// Deadline of one chunk upload: 16 MiB (the largest chunk) at ~1 Mbit/s.
const CHUNK_TIMEOUT: Duration = Duration::from_secs(150);
/// Deadline of a gc, which walks every chunk file of the store.
const GC_TIMEOUT: Duration = Duration::from_secs(3600);
/// A heartbeat that takes longer than its interval is as good as lost.
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(2);
/// Digests per `POST /v1/chunks/missing`: ~550 KB of JSON, so a 50 GiB image at small
/// chunk sizes takes a few hundred requests instead of one huge one.
const MISSING_BATCH: usize = 8192;

use super::error::parse_manifest;
pub use super::error::{PutOutcome, SignedManifest, StoreError};

/// A client of one store, reached through one or more store servers (`--store
/// URL,URL`: servers over one bucket, `lazyblk store --shared`). A request goes to the
/// server that last answered; one that cannot be reached or answers 502, 503 or 504 is
/// passed over for the next. Cheap to clone; clones share one connection pool and the
/// choice of server.
#[derive(Clone, Debug)]
pub struct StoreClient {
    /// The first server's base URL without a trailing slash: requests are built on it
    /// and sent to whichever server [`StoreClient::current`] names.
    url: String,
    /// Every server's base URL, in the order given.
    urls: Arc<[String]>,
    /// The index in `urls` of the server that answered last.
    current: Arc<std::sync::atomic::AtomicUsize>,
    http: reqwest::Client,
    /// Sent with every write (PUT, POST, DELETE).
    write_token: Option<String>,
    /// Sent with lease requests instead of the write token, when set (`--member-token`).
    member_token: Option<String>,
    /// Sent with chunk reads by users of [`StoreClient::http`]; kept here for them.
    #[allow(dead_code, reason = "read by the daemon's chunk sources")]
    read_token: Option<String>,
    /// Set for an object store read directly: every call goes there instead.
    direct: Option<Arc<Direct>>,
    /// Signs every manifest this client publishes (`--signing-key`, or a daemon's
    /// node key for its commits and resizes).
    signer: Option<Arc<NodeKey>>,
}

impl std::fmt::Debug for Direct {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("object store")
    }
}

impl StoreClient {
    /// A client of the store server(s) `base_url` names (`URL` or `URL,URL,...`).
    pub fn new(
        base_url: &str,
        write_token: Option<String>,
        read_token: Option<String>,
    ) -> StoreClient {
        let http = crate::http_client::http_client();
        let urls: Vec<String> = base_url
            .split(',')
            .map(|u| u.trim().trim_end_matches('/').to_string())
            .filter(|u| !u.is_empty())
            .collect();
        let urls: Arc<[String]> = if urls.is_empty() {
            Arc::from(vec![String::new()])
        } else {
            urls.into()
        };
        StoreClient {
            url: urls[0].clone(),
            urls,
            current: Arc::default(),
            http,
            write_token: write_token.filter(|t| !t.is_empty()),
            member_token: None,
            read_token: read_token.filter(|t| !t.is_empty()),
            direct: None,
            signer: None,
        }
    }

    /// This client, signing the manifests it publishes with `key`.
    pub fn with_signer(mut self, key: Arc<NodeKey>) -> StoreClient {
        self.signer = Some(key);
        self
    }

    /// The bytes `m` is published as, and their signature when this client signs: the
    /// time of publication is set first, since the store keeps a signed manifest
    /// exactly as it was signed.
    pub fn manifest_to_publish(&self, m: &Manifest) -> (Vec<u8>, Option<ManifestSignature>) {
        let Some(key) = &self.signer else {
            return (m.to_json(), None);
        };
        let mut m = m.clone();
        if m.created_at.is_empty() {
            m.created_at =
                humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
        }
        let bytes = m.to_json();
        let signature = ManifestSignature::sign(key, &bytes);
        (bytes, Some(signature))
    }

    /// This client, sending `token` with its lease requests instead of the write token.
    pub fn with_member_token(mut self, token: Option<String>) -> StoreClient {
        self.member_token = token.filter(|t| !t.is_empty());
        self
    }

    /// This client over an object store read directly.
    pub fn with_direct(mut self, direct: Arc<Direct>) -> StoreClient {
        self.direct = Some(direct);
        self
    }

    /// The object store read directly, if this client has one.
    pub fn direct(&self) -> Option<&Arc<Direct>> {
        self.direct.as_ref()
    }

    /// The ids of the store's templates (what OPT_LIST and the daemon's learning need).
    pub async fn template_ids(&self) -> Result<Vec<String>, StoreError> {
        if let Some(d) = &self.direct {
            return d.template_ids().await;
        }
        Ok(self
            .templates()
            .await?
            .into_iter()
            .map(|t| t.template)
            .collect())
    }

    /// The shared HTTP client (one pool), for chunk sources.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// The base URL of the store server that answered last, without a trailing slash.
    pub fn url(&self) -> &str {
        &self.urls[self.current.load(std::sync::atomic::Ordering::Relaxed) % self.urls.len()]
    }

    /// Every store server's base URL, in the order given.
    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// The read token chunk GETs need, if one was given.
    #[allow(dead_code, reason = "for the daemon's chunk sources")]
    pub fn read_token(&self) -> Option<&str> {
        self.read_token.as_deref()
    }

    /// The manifest of `id`; `None` when the store does not have it.
    pub async fn manifest(&self, id: &str) -> Result<Option<Manifest>, StoreError> {
        if let Some(d) = &self.direct {
            return d.manifest(id).await;
        }
        validate_id(id)?;
        let what = format!("the manifest of {id}");
        let request = self
            .http
            .get(self.endpoint(&format!("/v1/templates/{id}/manifest")));
        let Some(bytes) = self.fetch_optional(request, &what).await? else {
            return Ok(None);
        };
        parse_manifest(&bytes, id, &self.url).map(Some)
    }

    /// The manifest of `id` as stored, with its signature; `None` when the store does
    /// not have it.
    pub async fn signed_manifest(&self, id: &str) -> Result<Option<SignedManifest>, StoreError> {
        if let Some(d) = &self.direct {
            return d.signed_manifest(id).await;
        }
        validate_id(id)?;
        let what = format!("the manifest of {id}");
        let request = self
            .http
            .get(self.endpoint(&format!("/v1/templates/{id}/manifest")));
        let (headers, bytes) = match self
            .send_with_headers(request, METADATA_TIMEOUT, &what)
            .await
        {
            Ok((_, headers, bytes)) => (headers, bytes),
            Err(StoreError::Http { status: 404, .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let signature = ManifestSignature::from_headers(
            id,
            header(crate::trust::KEY_HEADER),
            header(crate::trust::SIGNATURE_HEADER),
        );
        Ok(Some(SignedManifest {
            manifest: parse_manifest(&bytes, id, &self.url)?,
            bytes: bytes.to_vec(),
            signature,
        }))
    }

    /// Every template in the store with its durability.
    pub async fn templates(&self) -> Result<Vec<TemplateSummary>, StoreError> {
        if let Some(d) = &self.direct {
            return d.templates().await;
        }
        let what = "the template list";
        let request = self.http.get(self.endpoint("/v1/templates"));
        let bytes = self.send(request, METADATA_TIMEOUT, what).await?.1;
        self.decode(&bytes, what)
    }

    /// Publishes a manifest. Another manifest under its id is a [`StoreError::Conflict`].
    pub async fn put_manifest(&self, m: &Manifest) -> Result<PutOutcome, StoreError> {
        if let Some(d) = &self.direct {
            let (bytes, signature) = self.manifest_to_publish(m);
            return d
                .put_manifest(&m.template, &bytes, signature.as_ref())
                .await;
        }
        validate_id(&m.template)?;
        let what = format!("publishing the manifest of {}", m.template);
        let (bytes, signature) = self.manifest_to_publish(m);
        let mut request = self
            .write(
                self.http
                    .put(self.endpoint(&format!("/v1/templates/{}/manifest", m.template))),
            )
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(bytes);
        if let Some(sig) = signature {
            request = request
                .header(crate::trust::KEY_HEADER, sig.key)
                .header(crate::trust::SIGNATURE_HEADER, sig.signature);
        }
        match self.send(request, METADATA_TIMEOUT, &what).await {
            Ok((reqwest::StatusCode::CREATED, _)) => Ok(PutOutcome::Created),
            Ok(_) => Ok(PutOutcome::Unchanged),
            Err(StoreError::Http {
                status: 409,
                detail,
                ..
            }) => Err(StoreError::Conflict {
                template: m.template.clone(),
                detail,
            }),
            Err(e) => Err(e),
        }
    }

    /// The digests among `digests` that the store does not have.
    pub async fn missing(&self, digests: &[Digest]) -> Result<Vec<Digest>, StoreError> {
        if let Some(d) = &self.direct {
            return d.missing(digests).await;
        }
        let mut missing = Vec::new();
        for batch in digests.chunks(MISSING_BATCH) {
            let what = format!("the missing list of {} chunks", batch.len());
            let body = serde_json::to_vec(batch).map_err(|e| self.malformed(&what, e))?;
            let request = self
                .write(self.http.post(self.endpoint("/v1/chunks/missing")))
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body);
            let bytes = self.send(request, METADATA_TIMEOUT, &what).await?.1;
            missing.extend(self.decode::<Vec<Digest>>(&bytes, &what)?);
        }
        Ok(missing)
    }

    /// Uploads one chunk; the store verifies it against `digest`.
    pub async fn put_chunk(&self, digest: &Digest, bytes: Bytes) -> Result<(), StoreError> {
        if let Some(d) = &self.direct {
            return d.put_chunk(digest, bytes).await;
        }
        let what = format!("uploading chunk {digest}");
        let request = self
            .write(
                self.http
                    .put(self.endpoint(&format!("/v1/chunks/{digest}"))),
            )
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(bytes);
        self.send(request, CHUNK_TIMEOUT, &what).await.map(|_| ())
    }

    /// The recorded trace of `id` (see [`TraceDoc`]); `None` when none is recorded.
    pub async fn trace(&self, id: &str) -> Result<Option<TraceDoc>, StoreError> {
        if let Some(d) = &self.direct {
            return d.trace(id).await;
        }
        validate_id(id)?;
        let what = format!("the trace of {id}");
        let request = self
            .http
            .get(self.endpoint(&format!("/v1/templates/{id}/trace")));
        let Some(bytes) = self.fetch_optional(request, &what).await? else {
            return Ok(None);
        };
        Ok(Some(self.decode::<TraceDoc>(&bytes, &what)?))
    }

    /// Records the trace of `id` (replacing an earlier one); the store checks it against
    /// the template.
    pub async fn put_trace(&self, id: &str, doc: &TraceDoc) -> Result<(), StoreError> {
        if let Some(d) = &self.direct {
            return d.put_trace(id, doc).await;
        }
        validate_id(id)?;
        let what = format!("storing the trace of {id}");
        let body = serde_json::to_vec(doc).map_err(|e| self.malformed(&what, e))?;
        let request = self
            .write(
                self.http
                    .put(self.endpoint(&format!("/v1/templates/{id}/trace"))),
            )
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        self.send(request, METADATA_TIMEOUT, &what)
            .await
            .map(|_| ())
    }

    /// Removes a template's manifest and trace (chunks stay until gc).
    pub async fn delete(&self, id: &str, force: bool) -> Result<(), StoreError> {
        if let Some(d) = &self.direct {
            return d.delete(id).await;
        }
        validate_id(id)?;
        let what = format!("deleting template {id}");
        let query = if force { "?force=true" } else { "" };
        let request = self.write(
            self.http
                .delete(self.endpoint(&format!("/v1/templates/{id}{query}"))),
        );
        self.send(request, METADATA_TIMEOUT, &what)
            .await
            .map(|_| ())
    }

    /// Deletes unreferenced chunks older than `grace`.
    pub async fn gc(&self, grace: Duration) -> Result<GcReport, StoreError> {
        let what = "gc";
        let url = format!("{}?grace_secs={}", self.endpoint("/v1/gc"), grace.as_secs());
        let request = self.write(self.http.post(url));
        let bytes = self.send(request, GC_TIMEOUT, what).await?.1;
        self.decode(&bytes, what)
    }

    /// Asks the store to hash every chunk and delete the bad ones.
    pub async fn scrub(&self) -> Result<lazyblk_cache::ScrubReport, StoreError> {
        let what = "scrub";
        let request = self.write(self.http.post(self.endpoint("/v1/scrub")));
        let bytes = self.send(request, GC_TIMEOUT, what).await?.1;
        self.decode(&bytes, what)
    }
}

/// The client of `url`: a store server (`http://`) or an object store read directly.
pub fn connect(
    url: &str,
    write_token: Option<String>,
    read_token: Option<String>,
) -> Result<StoreClient, StoreError> {
    let client = StoreClient::new(url, write_token, read_token);
    if super::direct::is_object_url(url) {
        Ok(client.with_direct(Arc::new(Direct::open(url)?)))
    } else {
        Ok(client)
    }
}
