//! Container images as `lazyblk build --from-oci` reads them: an OCI image layout (a
//! directory with `index.json` and `blobs/sha256/`, or a tar of one) or a `docker save`
//! archive (`manifest.json` naming a config and layer tars). Both come down to
//! [`Image`]: the layers in order, each with the sha256 of its uncompressed tar (the
//! config's `rootfs.diff_ids`, checked while the layer is unpacked), the image's digest
//! and its config labels. An image pulled from a registry ([`super::registry`]) comes
//! down to the same [`Image`] through [`parse_pulled`] and [`from_registry`].
//!
//! An index with several manifests picks the one for this machine's platform
//! (linux/amd64 here), else the only one; an index nested in an index is followed.
//! Files of an archive are read through [`super::oci_archive`], which treats them as
//! untrusted.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use super::limits::Limits;
pub use super::oci_archive::MAX_JSON_BYTES;
use super::oci_archive::{inside, read_json, read_small, regular_within, unpack};

/// How a layer blob is compressed, found from its first bytes (media types lie, and a
/// `docker save` archive has none).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// One layer: a tar, applied over the layers before it.
#[derive(Debug)]
pub struct Layer {
    pub path: PathBuf,
    pub compression: Compression,
    /// Bytes of the blob as stored (for progress).
    pub size: u64,
    /// `sha256:<hex>` of the uncompressed tar, when the config lists it.
    pub diff_id: Option<String>,
    /// `sha256:<hex>` of the blob as stored, when a descriptor names it (OCI layouts).
    pub digest: Option<String>,
}

/// An image to build a template from.
#[derive(Debug)]
pub struct Image {
    pub layers: Vec<Layer>,
    /// `sha256:<hex>`: of the manifest for an OCI layout, of the config (the image id)
    /// for a `docker save` archive.
    pub digest: String,
    /// The config's labels (`config.Labels`).
    pub labels: BTreeMap<String, String>,
    /// The image's name where the archive gives one (a repo tag or
    /// `org.opencontainers.image.ref.name`).
    pub name: Option<String>,
    /// A directory holding an unpacked archive, removed when the image is dropped.
    _unpacked: Option<tempfile::TempDir>,
}

/// Opens `path`: a layout directory, or a tar of a layout or of `docker save`. A tar is
/// unpacked into `work` first ([`unpack`]).
pub fn open(path: &Path, work: &Path, limits: &Limits) -> anyhow::Result<Image> {
    let meta = fs::metadata(path).with_context(|| format!("--from-oci {}", path.display()))?;
    if meta.is_dir() {
        return open_dir(path, None);
    }
    if !meta.is_file() {
        bail!(
            "--from-oci {}: not a directory nor a regular file",
            path.display()
        );
    }
    let unpacked = unpack(path, work, limits)?;
    let root = unpacked.path().to_path_buf();
    open_dir(&root, Some(unpacked))
}

fn open_dir(root: &Path, unpacked: Option<tempfile::TempDir>) -> anyhow::Result<Image> {
    // Present at all (a link is followed only inside the archive, when it is read).
    let present = |name: &str| root.join(name).symlink_metadata().is_ok();
    let image = if present("manifest.json") {
        docker_save(root)
    } else if present("index.json") {
        oci_layout(root)
    } else {
        bail!(
            "{}: neither an OCI image layout (index.json) nor a docker save archive (manifest.json)",
            root.display()
        )
    }?;
    Ok(Image {
        _unpacked: unpacked,
        ..image
    })
}

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    platform: Option<Platform>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct Platform {
    architecture: String,
    os: String,
}

#[derive(Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct ImageManifest {
    config: Descriptor,
    layers: Vec<Descriptor>,
}

#[derive(Deserialize, Default)]
struct Config {
    #[serde(default)]
    config: Option<ConfigInner>,
    #[serde(default)]
    rootfs: Option<RootFs>,
}

#[derive(Deserialize, Default)]
struct ConfigInner {
    #[serde(rename = "Labels", default)]
    labels: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

#[derive(Deserialize)]
struct DockerEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

const INDEX_TYPES: [&str; 2] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

fn oci_layout(root: &Path) -> anyhow::Result<Image> {
    let index: Index = read_json(&inside(root, "index.json")?)?;
    let mut chosen = pick(&root.display().to_string(), index.manifests, "index.json")?;
    let mut name = chosen
        .annotations
        .get("org.opencontainers.image.ref.name")
        .cloned();
    // An index may point at another index (a multi-platform image).
    for _ in 0..4 {
        if !INDEX_TYPES.contains(&chosen.media_type.as_str()) {
            break;
        }
        let nested: Index = serde_json::from_slice(&read_blob(root, &chosen)?)
            .with_context(|| format!("parsing the index {}", chosen.digest))?;
        chosen = pick(
            &root.display().to_string(),
            nested.manifests,
            &chosen.digest,
        )?;
        name = name.or_else(|| {
            chosen
                .annotations
                .get("org.opencontainers.image.ref.name")
                .cloned()
        });
    }
    let manifest_bytes = read_blob(root, &chosen)?;
    let manifest: ImageManifest = serde_json::from_slice(&manifest_bytes)
        .with_context(|| format!("parsing the image manifest {}", chosen.digest))?;
    let config: Config = serde_json::from_slice(&read_blob(root, &manifest.config)?)
        .with_context(|| format!("parsing the image config {}", manifest.config.digest))?;
    let diff_ids = diff_ids(&config, manifest.layers.len())?;
    let mut layers = Vec::with_capacity(manifest.layers.len());
    for (layer, diff_id) in manifest.layers.iter().zip(diff_ids) {
        let path = blob_path(root, &layer.digest)?;
        layers.push(Layer {
            compression: sniff(&path)?,
            size: fs::metadata(&path)
                .with_context(|| format!("layer {}", layer.digest))?
                .len(),
            path,
            diff_id,
            digest: Some(layer.digest.clone()),
        });
    }
    Ok(Image {
        layers,
        digest: chosen.digest.clone(),
        labels: labels(config),
        name,
        _unpacked: None,
    })
}

fn docker_save(root: &Path) -> anyhow::Result<Image> {
    let entries: Vec<DockerEntry> = read_json(&inside(root, "manifest.json")?)?;
    let entry = match entries.len() {
        1 => entries.into_iter().next().expect("one entry"),
        0 => bail!("{}: manifest.json lists no image", root.display()),
        n => bail!(
            "{}: manifest.json lists {n} images; save one image per archive",
            root.display()
        ),
    };
    let config_path = inside(root, &entry.config)?;
    let config_bytes = read_small(&config_path)?;
    let config: Config = serde_json::from_slice(&config_bytes)
        .with_context(|| format!("parsing the image config {}", entry.config))?;
    let diff_ids = diff_ids(&config, entry.layers.len())?;
    let mut layers = Vec::with_capacity(entry.layers.len());
    for (layer, diff_id) in entry.layers.iter().zip(diff_ids) {
        let path = inside(root, layer)?;
        layers.push(Layer {
            compression: sniff(&path)?,
            size: fs::metadata(&path)
                .with_context(|| format!("layer {layer}"))?
                .len(),
            path,
            diff_id,
            digest: None,
        });
    }
    Ok(Image {
        layers,
        digest: format!("sha256:{}", hex::encode(Sha256::digest(&config_bytes))),
        labels: labels(config),
        name: entry.repo_tags.and_then(|t| t.into_iter().next()),
        _unpacked: None,
    })
}

/// The manifest for this platform among `manifests` (`source` names the image in errors).
fn pick(source: &str, manifests: Vec<Descriptor>, what: &str) -> anyhow::Result<Descriptor> {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let count = manifests.len();
    if count == 1 {
        return Ok(manifests.into_iter().next().expect("one manifest"));
    }
    manifests
        .into_iter()
        .find(|m| {
            m.platform
                .as_ref()
                .is_some_and(|p| p.os == "linux" && p.architecture == arch)
        })
        .with_context(|| {
            format!("{source}: {what} lists {count} manifests and none for linux/{arch}")
        })
}

/// A blob a registry's manifest names: its digest and size, as its descriptor says.
#[derive(Clone, Debug)]
pub struct BlobRef {
    pub digest: String,
    pub size: u64,
}

/// What a manifest pulled from a registry is: an index (the manifest chosen from it
/// for this machine's platform) or an image manifest (its config and layers).
pub enum Pulled {
    Index(BlobRef),
    Image {
        config: BlobRef,
        layers: Vec<BlobRef>,
    },
}

/// Parses a manifest a registry sent for `source`.
pub fn parse_pulled(source: &str, bytes: &[u8]) -> anyhow::Result<Pulled> {
    #[derive(Deserialize)]
    struct Kind {
        #[serde(rename = "mediaType", default)]
        media_type: String,
        #[serde(default)]
        manifests: Option<serde_json::Value>,
    }
    let kind: Kind = serde_json::from_slice(bytes)
        .with_context(|| format!("{source}: the registry sent a manifest that is not JSON"))?;
    let blob = |d: &Descriptor| BlobRef {
        digest: d.digest.clone(),
        size: d.size,
    };
    if INDEX_TYPES.contains(&kind.media_type.as_str()) || kind.manifests.is_some() {
        let index: Index = serde_json::from_slice(bytes)
            .with_context(|| format!("{source}: parsing the image index"))?;
        let chosen = pick(source, index.manifests, "the image index")?;
        return Ok(Pulled::Index(blob(&chosen)));
    }
    let manifest: ImageManifest = serde_json::from_slice(bytes)
        .with_context(|| format!("{source}: parsing the image manifest"))?;
    Ok(Pulled::Image {
        config: blob(&manifest.config),
        layers: manifest.layers.iter().map(blob).collect(),
    })
}

/// The image pulled from a registry: its layers are files named by digest under `blobs`
/// (checked against the digest again while they are unpacked).
pub fn from_registry(
    name: String,
    digest: String,
    config_bytes: &[u8],
    layers: &[BlobRef],
    blob_path: impl Fn(&str) -> PathBuf,
) -> anyhow::Result<Image> {
    let config: Config = serde_json::from_slice(config_bytes)
        .with_context(|| format!("{name}: parsing the image config"))?;
    let diff_ids = diff_ids(&config, layers.len())?;
    let mut pulled = Vec::with_capacity(layers.len());
    for (layer, diff_id) in layers.iter().zip(diff_ids) {
        let path = blob_path(&layer.digest);
        pulled.push(Layer {
            compression: sniff(&path)?,
            size: layer.size,
            path,
            diff_id,
            digest: Some(layer.digest.clone()),
        });
    }
    Ok(Image {
        layers: pulled,
        digest,
        labels: labels(config),
        name: Some(name),
        _unpacked: None,
    })
}

/// The hex of a `sha256:<64 hex>` digest; nothing else is a name for a blob.
pub fn sha256_hex(digest: &str) -> anyhow::Result<&str> {
    digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .with_context(|| format!("unsupported blob digest {digest:?} (expected sha256:<64 hex>)"))
}

/// The layers' diff ids in order, when the config has one per layer.
fn diff_ids(config: &Config, layers: usize) -> anyhow::Result<Vec<Option<String>>> {
    match &config.rootfs {
        Some(rootfs) if !rootfs.diff_ids.is_empty() => {
            if rootfs.diff_ids.len() != layers {
                bail!(
                    "the image config lists {} layer diff ids for {layers} layers",
                    rootfs.diff_ids.len()
                );
            }
            Ok(rootfs.diff_ids.iter().cloned().map(Some).collect())
        }
        _ => Ok(vec![None; layers]),
    }
}

fn labels(config: Config) -> BTreeMap<String, String> {
    config.config.and_then(|c| c.labels).unwrap_or_default()
}

/// A blob's bytes, checked against its digest.
fn read_blob(root: &Path, d: &Descriptor) -> anyhow::Result<Vec<u8>> {
    let path = blob_path(root, &d.digest)?;
    let bytes = read_small(&path).with_context(|| format!("reading blob {}", d.digest))?;
    let actual = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
    if actual != d.digest {
        bail!("blob {} is corrupt: its bytes hash to {actual}", d.digest);
    }
    if d.size != 0 && d.size != bytes.len() as u64 {
        bail!(
            "blob {} has {} bytes, its descriptor says {}",
            d.digest,
            bytes.len(),
            d.size
        );
    }
    Ok(bytes)
}

fn blob_path(root: &Path, digest: &str) -> anyhow::Result<PathBuf> {
    let hex = sha256_hex(digest)?;
    regular_within(root, &root.join("blobs").join("sha256").join(hex))
}

fn sniff(path: &Path) -> anyhow::Result<Compression> {
    let mut magic = [0u8; 4];
    let mut f = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let n = f
        .read(&mut magic)
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(match &magic[..n] {
        [0x1f, 0x8b, ..] => Compression::Gzip,
        [0x28, 0xb5, 0x2f, 0xfd] => Compression::Zstd,
        _ => Compression::None,
    })
}
