//! [`StoreClient`], the client of the store's HTTP API used by publish and the daemon,
//! and the commands built on it: `templates`, `delete`, `gc`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use indicatif::HumanBytes;
use lazyblk_cache::{validate_id, Digest, Manifest};
use reqwest::{RequestBuilder, StatusCode};
use serde::de::DeserializeOwned;

use super::direct::Direct;
use super::{GcReport, TemplateSummary, TraceDoc};
use crate::cli::{DeleteArgs, GcArgs, TemplatesArgs};
use crate::identity::NodeKey;
use crate::printable::printable;
use crate::trust::{ManifestSignature, TrustError};

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
pub use super::error::{PutOutcome, StoreError};

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

/// A manifest as the store keeps it: parsed, its exact bytes, and its signature (an
/// error when the one stored is malformed, so a reader can say so).
pub struct SignedManifest {
    pub manifest: Manifest,
    pub bytes: Vec<u8>,
    pub signature: Result<Option<ManifestSignature>, TrustError>,
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
            Ok((StatusCode::CREATED, _)) => Ok(PutOutcome::Created),
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

    /// Renews this node's lease, signed with its key; the answer is the live nodes.
    pub async fn heartbeat(
        &self,
        key: &crate::identity::NodeKey,
        beat: &crate::store::nodes::Heartbeat,
    ) -> Result<crate::store::center::HeartbeatAnswer, StoreError> {
        let what = "a heartbeat";
        let body = serde_json::to_vec(beat).unwrap_or_default();
        let request = self.lease_request(key, reqwest::Method::PUT, body, what)?;
        // Any refusal passes to the next server: one whose clock is off refuses every
        // signed lease (401), one still settling answers 503, and the others may not.
        let bytes = self
            .send_passing(request, HEARTBEAT_TIMEOUT, what, |_| true)
            .await?
            .2;
        self.decode(&bytes, what)
    }

    /// Ends this node's lease (at a clean shutdown).
    pub async fn leave(&self, key: &crate::identity::NodeKey) -> Result<(), StoreError> {
        let what = "leaving the membership";
        let request = self.lease_request(key, reqwest::Method::DELETE, Vec::new(), what)?;
        self.send(request, HEARTBEAT_TIMEOUT, what)
            .await
            .map(|_| ())
    }

    /// A request on this node's lease, signed with its key and carrying the member token.
    fn lease_request(
        &self,
        key: &crate::identity::NodeKey,
        method: reqwest::Method,
        body: Vec<u8>,
        what: &str,
    ) -> Result<RequestBuilder, StoreError> {
        if self.direct.is_some() {
            return Err(StoreError::NeedsServer {
                what: what.into(),
                url: self.url.clone(),
            });
        }
        let path = format!("/v1/nodes/{}", key.id());
        let mut request = self
            .http
            .request(method.clone(), self.endpoint(&path))
            .header(reqwest::header::CONTENT_TYPE, "application/json");
        for (name, value) in key.sign(method.as_str(), &path, &body) {
            request = request.header(name, value);
        }
        if let Some(token) = self.member_token.as_ref().or(self.write_token.as_ref()) {
            request = request.bearer_auth(token);
        }
        Ok(request.body(body))
    }

    /// The live nodes.
    pub async fn nodes(&self) -> Result<Vec<crate::store::nodes::NodeEntry>, StoreError> {
        let what = "the node list";
        let request = self.http.get(self.endpoint("/v1/nodes"));
        let bytes = self.send(request, METADATA_TIMEOUT, what).await?.1;
        self.decode(&bytes, what)
    }

    fn endpoint(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    fn write(&self, request: RequestBuilder) -> RequestBuilder {
        match &self.write_token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// A GET whose 404 means "none".
    async fn fetch_optional(
        &self,
        request: RequestBuilder,
        what: &str,
    ) -> Result<Option<Bytes>, StoreError> {
        match self.send(request, METADATA_TIMEOUT, what).await {
            Ok((_, bytes)) => Ok(Some(bytes)),
            Err(StoreError::Http { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Sends a request; a non-success status becomes [`StoreError::Http`] with the
    /// store's `{"error"}` message.
    async fn send(
        &self,
        request: RequestBuilder,
        timeout: Duration,
        what: &str,
    ) -> Result<(StatusCode, Bytes), StoreError> {
        let (status, _, body) = self.send_with_headers(request, timeout, what).await?;
        Ok((status, body))
    }

    /// [`StoreClient::send`], with the answer's headers; passes over a server that is
    /// unreachable or answers 502 to 504 for the next one.
    async fn send_with_headers(
        &self,
        request: RequestBuilder,
        timeout: Duration,
        what: &str,
    ) -> Result<(StatusCode, reqwest::header::HeaderMap, Bytes), StoreError> {
        self.send_passing(request, timeout, what, |e| {
            matches!(
                e,
                StoreError::Unreachable { .. }
                    | StoreError::Http {
                        status: 502..=504,
                        ..
                    }
            )
        })
        .await
    }

    /// Sends a request to the server that answered last, and to the next ones while
    /// `passes` says another server may answer better.
    async fn send_passing(
        &self,
        request: RequestBuilder,
        timeout: Duration,
        what: &str,
        passes: fn(&StoreError) -> bool,
    ) -> Result<(StatusCode, reqwest::header::HeaderMap, Bytes), StoreError> {
        let request = request
            .timeout(timeout)
            .build()
            .map_err(|e| StoreError::Unreachable {
                url: self.url.clone(),
                detail: error_chain(&e),
            })?;
        let first = self.current.load(std::sync::atomic::Ordering::Relaxed);
        let mut last = None;
        for step in 0..self.urls.len() {
            let index = (first + step) % self.urls.len();
            let result = self.send_to(&request, &self.urls[index], what).await;
            match result {
                Err(e) if self.urls.len() > 1 && passes(&e) => {
                    tracing::debug!(error = %e, "store server passed over");
                    last = Some(Err(e));
                }
                result => {
                    if result.is_ok() && index != first {
                        tracing::info!(store = %self.urls[index], "store server answered in place of {}", self.urls[first % self.urls.len()]);
                        self.current
                            .store(index, std::sync::atomic::Ordering::Relaxed);
                    }
                    return result;
                }
            }
        }
        last.unwrap_or_else(|| {
            Err(StoreError::Unreachable {
                url: self.url.clone(),
                detail: "no store server".into(),
            })
        })
    }

    /// Sends `request` (built on the first server's URL) to the server at `base`.
    async fn send_to(
        &self,
        request: &reqwest::Request,
        base: &str,
        what: &str,
    ) -> Result<(StatusCode, reqwest::header::HeaderMap, Bytes), StoreError> {
        let unreachable = |e: reqwest::Error| StoreError::Unreachable {
            url: base.to_string(),
            detail: error_chain(&e),
        };
        let Some(mut request) = request.try_clone() else {
            return Err(StoreError::Unreachable {
                url: base.to_string(),
                detail: format!("{what}: a streamed body cannot be sent again"),
            });
        };
        let path = request
            .url()
            .as_str()
            .strip_prefix(self.url.as_str())
            .unwrap_or("")
            .to_string();
        *request.url_mut() =
            reqwest::Url::parse(&format!("{base}{path}")).map_err(|e| StoreError::Unreachable {
                url: base.to_string(),
                detail: e.to_string(),
            })?;
        let response = self.http.execute(request).await.map_err(unreachable)?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.bytes().await.map_err(unreachable)?;
        if status.is_success() {
            return Ok((status, headers, body));
        }
        // The store's message may quote a node's lease (a delete refused for its
        // users): kept without control characters wherever it is shown.
        let detail = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or_else(|| {
                String::from_utf8_lossy(&body)
                    .trim()
                    .chars()
                    .take(500)
                    .collect()
            });
        let detail = printable(&detail).into_owned();
        Err(StoreError::Http {
            url: base.to_string(),
            status: status.as_u16(),
            what: what.to_string(),
            detail,
        })
    }

    fn decode<T: DeserializeOwned>(&self, bytes: &[u8], what: &str) -> Result<T, StoreError> {
        serde_json::from_slice(bytes).map_err(|e| self.malformed(what, e))
    }

    fn malformed(&self, what: &str, e: serde_json::Error) -> StoreError {
        StoreError::Malformed {
            url: self.url.clone(),
            what: what.to_string(),
            detail: e.to_string(),
        }
    }
}

/// An error with its causes, `outer: inner: innermost` (reqwest's own message hides
/// "connection refused" in its sources).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// `lazyblk templates`: the store's templates as a table or JSON.
pub async fn list_command(args: TemplatesArgs) -> anyhow::Result<()> {
    let client = connect(&args.store, None, None)?;
    let mut templates = client.templates().await?;
    templates.retain(|t| {
        args.labels.iter().all(|(k, v)| t.labels.get(k) == Some(v)) && (!args.stale || t.stale)
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&templates)?);
    } else {
        print!("{}", table(&templates));
    }
    Ok(())
}

/// The `templates` table: one row per template, columns padded to their widest cell.
fn table(templates: &[TemplateSummary]) -> String {
    let header = [
        "TEMPLATE",
        "SIZE",
        "CHUNKS",
        "STORED",
        "DURABILITY",
        "REPLICAS",
        "PARENT",
        "CREATED",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    for t in templates {
        rows.push(vec![
            t.template.clone(),
            HumanBytes(t.size).to_string(),
            t.chunks.to_string(),
            format!("{}/{}", t.present_chunks, t.stored_chunks),
            if t.stale {
                format!("{} STALE", t.durability.as_str())
            } else {
                t.durability.as_str().to_string()
            },
            t.replicas
                .as_ref()
                .map_or("-".to_string(), |r| r.status.clone()),
            t.parent.clone().unwrap_or_else(|| "-".to_string()),
            if t.created_at.is_empty() {
                "-".to_string()
            } else {
                t.created_at.clone()
            },
        ]);
    }
    // Cells hold what a manifest or a node said (a parent, a creation time): shown
    // without control characters.
    for cell in rows.iter_mut().flatten() {
        *cell = printable(cell).into_owned();
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// `lazyblk delete ID`: removes a template from the store.
pub async fn delete_command(args: DeleteArgs) -> anyhow::Result<()> {
    let client = StoreClient::new(&args.store, args.write_token, None);
    client.delete(&args.template, args.force).await?;
    println!(
        "deleted template {} (its chunks stay until `lazyblk gc`)",
        args.template
    );
    Ok(())
}

/// `lazyblk gc`: sweeps chunks that no manifest references.
pub async fn gc_command(args: GcArgs) -> anyhow::Result<()> {
    let client = StoreClient::new(&args.store, args.write_token, None);
    let report = client
        .gc(args.grace)
        .await
        .with_context(|| format!("gc of store {}", client.url()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "gc: deleted {} chunks ({}), kept {} referenced and {} recent",
            report.chunks_deleted,
            HumanBytes(report.bytes_freed),
            report.chunks_referenced,
            report.chunks_recent
        );
    }
    Ok(())
}

/// `lazyblk nodes`: the live nodes of the store's fleet.
pub async fn nodes_command(args: crate::cli::NodesArgs) -> anyhow::Result<()> {
    let client = connect(&args.store, None, None)?;
    let nodes = client
        .nodes()
        .await
        .with_context(|| format!("listing the nodes of {}", client.url()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&nodes)?);
        return Ok(());
    }
    if nodes.is_empty() {
        println!("no live nodes (daemons with --advertise register with their store)");
        return Ok(());
    }
    println!(
        "{:<32} {:<32} {:<9} {:>9}",
        "NODE", "ADDRESS", "VERSION", "LAST SEEN"
    );
    // What a node says of itself in its lease: shown without control characters.
    for n in nodes {
        println!(
            "{:<32} {:<32} {:<9} {:>8.1}s",
            printable(&n.id),
            printable(&n.url),
            printable(&n.version),
            n.last_seen_secs
        );
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Durability;

    #[test]
    fn table_aligns_columns() {
        let row = TemplateSummary {
            template: "py311".into(),
            size: 64 << 20,
            chunk_size: 1 << 20,
            chunks: 64,
            stored_chunks: 10,
            stored_bytes: 10 << 20,
            present_chunks: 4,
            parent: None,
            replicas: None,
            stale: false,
            stale_because: None,
            labels: Default::default(),
            origins: vec![],
            created_at: "2026-11-22T10:00:00Z".into(),
            durability: Durability::Uploading,
        };
        let out = table(&[row]);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].starts_with("TEMPLATE  SIZE"), "{out}");
        assert!(
            lines[1].contains("4/10") && lines[1].contains("UPLOADING"),
            "{out}"
        );
        assert_eq!(lines[0].find("CHUNKS"), lines[1].find("64 "), "{out}");
    }
}
