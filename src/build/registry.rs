//! `build --from-oci docker://HOST[:PORT]/REPO:TAG` (or `@sha256:DIGEST`): an image pulled
//! through the OCI distribution API with `oci-client` (its auth challenges: a 401 then
//! a bearer token endpoint, or basic auth). Nothing the registry says is trusted: every
//! manifest is checked against the digest that named it, every blob against its
//! descriptor's digest and size while it streams to disk. Layers are kept by digest in
//! the layer cache (`--layer-cache`), so a rebuild from a new tag downloads only the
//! layers it has not seen; a cached layer is checked against its digest again when it
//! is unpacked. Blobs go to files, never to memory; only manifests and configs (bounded
//! by [`oci::MAX_JSON_BYTES`]) are held whole.
//!
//! Manifests are fetched with reqwest directly (with the token oci-client got), so that
//! their size is bounded while they are read.
//!
//! A redirect to another host for a blob is followed, as registries use them for their
//! storage, without the credentials (reqwest drops `Authorization` across hosts).

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::{bail, Context};
use base64::Engine as _;
use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::errors::{DigestError, OciDistributionError};
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWrite;

use super::credentials;
use super::limits::{bytes, Limits, Refused};
use super::oci::{self, BlobRef, Pulled};
use crate::build::BuildArgs;
use crate::progress::Progress;

/// What `--from-oci` starts with to name an image in a registry.
pub const SCHEME: &str = "docker://";
/// Indexes followed to reach an image manifest (an index may name another index).
const MAX_INDEX_DEPTH: usize = 4;
/// How long connecting to the registry may take before the build gives up: a registry
/// that does not answer in this long is down or firewalled.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// The manifest media types asked for: OCI and Docker, images and indexes.
const ACCEPT: [&str; 4] = [
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

/// The image `source` (`docker://...`) names, its layers in the layer cache.
pub async fn pull(source: &str, args: &BuildArgs, limits: &Limits) -> anyhow::Result<oci::Image> {
    let name = source.strip_prefix(SCHEME).unwrap_or(source);
    let reference: Reference = name.parse().with_context(|| {
        format!(
            "--from-oci {source}: not an image reference (HOST[:PORT]/REPO:TAG or @sha256:DIGEST)"
        )
    })?;
    let registry = reference.resolve_registry().to_string();
    let auth = credentials::resolve(args.registry_auth.as_deref(), &registry)?;
    let certificates = ca_certificates(args)?;
    let mut config = client_config(args);
    config.extra_root_certificates = certificates
        .iter()
        .map(|data| Certificate {
            encoding: CertificateEncoding::Pem,
            data: data.clone(),
        })
        .collect();
    // Client::new would fall back to a default client (no CA, HTTPS) on an error.
    let client = Client::try_from(config)
        .map_err(anyhow::Error::new)
        .context("setting up the registry client")?;
    let bearer = client
        .auth(&reference, &auth, RegistryOperation::Pull)
        .await
        .map_err(|e| explain(e, args))
        .with_context(|| format!("{source}: authenticating to {registry}"))?;
    let manifests = ManifestClient::new(args, &certificates, bearer, &auth)?;

    let (digest, config, layers) = manifest(&manifests, &reference, source).await?;
    let config_bytes = config_blob(&client, &reference, &config, source, args).await?;
    let cache = layer_cache(args)?;
    for (i, layer) in layers.iter().enumerate() {
        let what = format!("layer {} of {} ({})", i + 1, layers.len(), layer.digest);
        fetch_layer(&client, &reference, layer, &cache, (limits, args), &what)
            .await
            .with_context(|| format!("{source}: {what}"))?;
    }
    oci::from_registry(name.to_string(), digest, &config_bytes, &layers, |d| {
        cached_path(&cache, d)
    })
}

fn client_config(args: &BuildArgs) -> ClientConfig {
    ClientConfig {
        protocol: if args.registry_insecure_http {
            ClientProtocol::Http
        } else {
            ClientProtocol::Https
        },
        // The index is read here, to pick a platform the way layouts are picked.
        platform_resolver: None,
        read_timeout: Some(args.registry_timeout),
        connect_timeout: Some(CONNECT_TIMEOUT),
        ..ClientConfig::default()
    }
}

/// The PEM files of `--registry-ca` (one, checked to hold a certificate).
fn ca_certificates(args: &BuildArgs) -> anyhow::Result<Vec<Vec<u8>>> {
    let Some(path) = &args.registry_ca else {
        return Ok(Vec::new());
    };
    let data = std::fs::read(path).with_context(|| format!("--registry-ca {}", path.display()))?;
    if reqwest::Certificate::from_pem_bundle(&data).map_or(true, |c| c.is_empty()) {
        bail!("--registry-ca {}: no PEM certificate in it", path.display());
    }
    Ok(vec![data])
}

/// Manifests are fetched here rather than by oci-client, which reads a response whole
/// before anything can bound it: this reads at most [`oci::MAX_JSON_BYTES`].
struct ManifestClient {
    http: reqwest::Client,
    scheme: &'static str,
    /// The `Authorization` header: the bearer token `auth` got, else basic credentials.
    authorization: Option<String>,
    timeout: Duration,
}

impl ManifestClient {
    fn new(
        args: &BuildArgs,
        certificates: &[Vec<u8>],
        bearer: Option<String>,
        auth: &RegistryAuth,
    ) -> anyhow::Result<Self> {
        let mut roots = Vec::new();
        for data in certificates {
            roots.extend(reqwest::Certificate::from_pem_bundle(data).context("--registry-ca")?);
        }
        let http = reqwest::Client::builder()
            .tls_certs_merge(roots)
            .read_timeout(args.registry_timeout)
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .context("setting up the registry client")?;
        let authorization = match (bearer, auth) {
            (Some(token), _) => Some(format!("Bearer {token}")),
            (None, RegistryAuth::Basic(user, pass)) => {
                let pair = format!("{user}:{pass}");
                Some(format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(pair)
                ))
            }
            (None, RegistryAuth::Bearer(token)) => Some(format!("Bearer {token}")),
            (None, RegistryAuth::Anonymous) => None,
        };
        Ok(ManifestClient {
            http,
            scheme: if args.registry_insecure_http {
                "http"
            } else {
                "https"
            },
            authorization,
            timeout: args.registry_timeout,
        })
    }

    /// The manifest `reference` names, at most [`oci::MAX_JSON_BYTES`] of it.
    async fn fetch(&self, reference: &Reference, source: &str) -> anyhow::Result<Vec<u8>> {
        let url = format!(
            "{}://{}/v2/{}/manifests/{}",
            self.scheme,
            reference.resolve_registry(),
            reference.repository(),
            reference.digest().or(reference.tag()).unwrap_or("latest")
        );
        let mut request = self
            .http
            .get(&url)
            .header(reqwest::header::ACCEPT, ACCEPT.join(", "));
        if let Some(value) = &self.authorization {
            request = request.header(reqwest::header::AUTHORIZATION, value);
        }
        let timed_out = |e: reqwest::Error| {
            let timeout = e.is_timeout();
            let e = anyhow::Error::new(e).context(format!("pulling the manifest {url}"));
            if timeout {
                e.context(format!(
                    "the registry sent nothing for {} (--registry-timeout)",
                    humantime::format_duration(self.timeout)
                ))
            } else {
                e
            }
        };
        let mut response = request.send().await.map_err(timed_out)?;
        let status = response.status();
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
            bail!(
                "Not authorized: url {url} (check --registry-auth or the registry's entry in \
                 the credentials files)"
            );
        }
        if !status.is_success() {
            bail!("pulling the manifest {url}: the registry answered {status}");
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(timed_out)? {
            if (body.len() + chunk.len()) as u64 > oci::MAX_JSON_BYTES {
                bail!(Refused {
                    what: format!("{source}: the manifest"),
                    limit: bytes(oci::MAX_JSON_BYTES),
                    flag: "",
                });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }
}

/// The image manifest `reference` names, through indexes: its digest, config and layers.
async fn manifest(
    manifests: &ManifestClient,
    reference: &Reference,
    source: &str,
) -> anyhow::Result<(String, BlobRef, Vec<BlobRef>)> {
    let mut current = reference.clone();
    for _ in 0..=MAX_INDEX_DEPTH {
        let body = manifests
            .fetch(&current, source)
            .await
            .with_context(|| format!("{source}: pulling the manifest {current}"))?;
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&body)));
        if let Some(expected) = current.digest() {
            if expected != digest {
                bail!("{source}: the registry sent a manifest for {expected} whose bytes hash to {digest}");
            }
        }
        match oci::parse_pulled(source, &body)? {
            Pulled::Image { config, layers } => return Ok((digest, config, layers)),
            Pulled::Index(chosen) => {
                oci::sha256_hex(&chosen.digest)?;
                current = Reference::with_digest(
                    current.registry().to_string(),
                    current.repository().to_string(),
                    chosen.digest,
                );
            }
        }
    }
    bail!("{source}: indexes nested more than {MAX_INDEX_DEPTH} deep")
}

/// The image config, read whole (it is small), checked against its digest.
async fn config_blob(
    client: &Client,
    reference: &Reference,
    config: &BlobRef,
    source: &str,
    args: &BuildArgs,
) -> anyhow::Result<Vec<u8>> {
    oci::sha256_hex(&config.digest)?;
    if config.size > oci::MAX_JSON_BYTES {
        bail!(Refused {
            what: format!("{source}: the image config"),
            limit: bytes(oci::MAX_JSON_BYTES),
            flag: "",
        });
    }
    let mut out = Vec::new();
    client
        .pull_blob(
            reference,
            &descriptor(config),
            Bounded::new(&mut out, config.size, None),
        )
        .await
        .map_err(|e| explain(e, args))
        .with_context(|| format!("{source}: pulling the image config {}", config.digest))?;
    Ok(out)
}

/// The layer in the cache: downloaded (to a temporary file beside it, renamed once its
/// digest checks) unless it is there already.
async fn fetch_layer(
    client: &Client,
    reference: &Reference,
    layer: &BlobRef,
    cache: &Path,
    (limits, args): (&Limits, &BuildArgs),
    what: &str,
) -> anyhow::Result<()> {
    oci::sha256_hex(&layer.digest)?;
    let path = cached_path(cache, &layer.digest);
    if path.is_file() {
        eprintln!("{what}: cached, {}", bytes(layer.size));
        return Ok(());
    }
    // A compressed layer is smaller than what it unpacks to, which --max-content bounds.
    if layer.size > limits.content {
        bail!(Refused {
            what: "the layer's blob".to_string(),
            limit: bytes(limits.content),
            flag: limits.content_flag,
        });
    }
    let partial = tempfile::Builder::new()
        .prefix(".partial-")
        .tempfile_in(cache)
        .with_context(|| format!("making a file in {}", cache.display()))?;
    let file = tokio::fs::File::from_std(
        partial
            .reopen()
            .with_context(|| format!("opening {}", partial.path().display()))?,
    );
    let progress = Progress::new(what, layer.size);
    client
        .pull_blob(
            reference,
            &descriptor(layer),
            Bounded::new(file, layer.size, Some(progress.clone())),
        )
        .await
        .map_err(|e| explain(e, args))
        .context("downloading")?;
    partial
        .persist(&path)
        .with_context(|| format!("saving {}", path.display()))?;
    progress.finish(&format!("downloaded, {}", bytes(layer.size)));
    Ok(())
}

/// The client's error in a user's words: what a wrong digest, a refusal of the
/// credentials or a silent registry mean, and which flag is involved.
fn explain(e: OciDistributionError, args: &BuildArgs) -> anyhow::Error {
    match e {
        OciDistributionError::DigestError(DigestError::VerificationError { expected, actual }) => {
            anyhow::anyhow!(
                "the registry sent bytes that do not match their digest (Invalid digest. \
                 Expected {expected}, got {actual}); nothing was kept"
            )
        }
        OciDistributionError::UnauthorizedError { url } => anyhow::anyhow!(
            "Not authorized: url {url} (check --registry-auth or the registry's entry in \
             the credentials files)"
        ),
        e => {
            let e = anyhow::Error::new(e);
            let timed_out = e.chain().any(|c| {
                c.downcast_ref::<reqwest::Error>()
                    .is_some_and(reqwest::Error::is_timeout)
                    || c.to_string().contains("timed out")
            });
            if timed_out {
                e.context(format!(
                    "the registry sent nothing for {} (--registry-timeout)",
                    humantime::format_duration(args.registry_timeout)
                ))
            } else {
                e
            }
        }
    }
}

fn descriptor(blob: &BlobRef) -> OciDescriptor {
    OciDescriptor {
        digest: blob.digest.clone(),
        size: i64::try_from(blob.size).unwrap_or(i64::MAX),
        ..OciDescriptor::default()
    }
}

/// The layer cache's directory for sha256 blobs, made if missing.
fn layer_cache(args: &BuildArgs) -> anyhow::Result<PathBuf> {
    let root = match &args.layer_cache {
        Some(dir) => dir.clone(),
        None => default_layer_cache().context(
            "no cache directory (neither XDG_CACHE_HOME nor HOME is set): give --layer-cache",
        )?,
    };
    let dir = root.join("sha256");
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("--layer-cache: making {}", dir.display()))?;
    Ok(dir)
}

/// `$XDG_CACHE_HOME/lazyblk/layers`, else `~/.cache/lazyblk/layers`.
pub fn default_layer_cache() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("lazyblk").join("layers"))
}

fn cached_path(cache: &Path, digest: &str) -> PathBuf {
    cache.join(digest.strip_prefix("sha256:").unwrap_or(digest))
}

/// A writer that refuses more bytes than the blob's descriptor says (a registry could
/// otherwise stream for ever before its digest is found wrong) and reports progress.
struct Bounded<W> {
    inner: W,
    written: u64,
    size: u64,
    progress: Option<Progress>,
}

impl<W> Bounded<W> {
    fn new(inner: W, size: u64, progress: Option<Progress>) -> Self {
        Bounded {
            inner,
            written: 0,
            size,
            progress,
        }
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Bounded<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.written + buf.len() as u64 > this.size {
            return Poll::Ready(Err(io::Error::other(format!(
                "the registry sent more than the {} bytes the blob's descriptor says",
                this.size
            ))));
        }
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &polled {
            this.written += *n as u64;
            if let Some(p) = &this.progress {
                p.inc(*n as u64);
            }
        }
        polled
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
