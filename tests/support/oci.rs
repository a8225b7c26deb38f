//! Container images made at test time for `lazyblk build --from-oci`: digests, gzip,
//! image configs, OCI image layouts on disk, directories the unprivileged builder can
//! read, and the built template read back through a daemon and looked at with debugfs.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

use super::node::{sh, DaemonProc};
use super::StoreProc;

pub const LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const CONFIG: &str = "application/vnd.oci.image.config.v1+json";

/// `sha256:<hex>` of `bytes`, as OCI digests are written.
pub fn sha(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// An image config for amd64 Linux with these layers' diff ids and, if given, labels.
pub fn config(diff_ids: &[String], labels: Option<&Value>) -> Vec<u8> {
    let mut config = json!({
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    if let Some(labels) = labels {
        config["config"] = json!({ "Labels": labels });
    }
    serde_json::to_vec(&config).unwrap()
}

/// One layer as a layout stores it: its bytes, their media type, and the digest of the
/// uncompressed tar.
pub struct Layer {
    pub stored: Vec<u8>,
    pub media_type: &'static str,
    pub diff_id: String,
}

impl Layer {
    /// A tar stored as it is.
    pub fn plain(tar: Vec<u8>) -> Layer {
        Layer {
            diff_id: sha(&tar),
            stored: tar,
            media_type: LAYER_TAR,
        }
    }

    /// A tar stored gzip-compressed.
    pub fn gzip(tar: &[u8]) -> Layer {
        Layer {
            stored: gzip(tar),
            media_type: LAYER_GZIP,
            diff_id: sha(tar),
        }
    }
}

/// What [`write_layout`] wrote: the manifest's digest and each stored layer's.
pub struct Layout {
    pub manifest_digest: String,
    pub layer_digests: Vec<String>,
}

/// An OCI image layout of `layers` in `dir`, its config carrying `labels`, its index
/// entry named `ref_name` (`org.opencontainers.image.ref.name`) when given.
pub fn write_layout(
    dir: &Path,
    layers: &[Layer],
    labels: Option<&Value>,
    ref_name: Option<&str>,
) -> Layout {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| -> String {
        let d = sha(bytes);
        std::fs::write(blobs.join(&d[7..]), bytes).unwrap();
        d
    };
    let diff_ids: Vec<String> = layers.iter().map(|l| l.diff_id.clone()).collect();
    let config = config(&diff_ids, labels);
    let config_digest = put(&config);
    let layer_digests: Vec<String> = layers.iter().map(|l| put(&l.stored)).collect();
    let descriptors: Vec<Value> = layers
        .iter()
        .zip(&layer_digests)
        .map(|(l, d)| json!({"mediaType": l.media_type, "digest": d, "size": l.stored.len()}))
        .collect();
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": {"mediaType": CONFIG, "digest": config_digest, "size": config.len()},
        "layers": descriptors,
    }))
    .unwrap();
    let manifest_digest = put(&manifest);
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let mut entry =
        json!({"mediaType": MANIFEST, "digest": manifest_digest, "size": manifest.len()});
    if let Some(name) = ref_name {
        entry["annotations"] = json!({ "org.opencontainers.image.ref.name": name });
    }
    let index = json!({"schemaVersion": 2, "manifests": [entry]});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    Layout {
        manifest_digest,
        layer_digests,
    }
}

/// A directory every user can read (the tests' temporary directories are 0700), so a
/// build running as uid 65534 can read what is put in it.
pub fn open_dir(tmp: &Path, name: &str) -> PathBuf {
    let dir = tmp.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for p in [tmp, dir.as_path()] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    dir
}

/// Makes `path` (a file or a tree) readable by every user.
pub fn chmod_tree(path: &Path) {
    let (ok, _, err) = sh("chmod", &["-R", "a+rX", path.to_str().unwrap()]);
    assert!(ok, "{err}");
}

/// Template `template` of `store` read back through a daemon into `DIR/NAME.img`.
pub fn read_back(store: &StoreProc, dir: &Path, template: &str, name: &str) -> PathBuf {
    let node = DaemonProc::start_unix(&store.url(), &dir.join(format!("node-{name}")), &[]);
    let image = dir.join(format!("{name}.img"));
    let (ok, _, err) = sh(
        "nbdcopy",
        &[&node.nbd_uri(template), image.to_str().unwrap()],
    );
    assert!(ok, "nbdcopy: {err}");
    image
}

/// What debugfs answers `request` about `image` (its banner and complaints go to
/// stderr, what was asked for to stdout).
pub fn debugfs(image: &Path, request: &str) -> String {
    let (_, out, _) = sh("debugfs", &["-R", request, image.to_str().unwrap()]);
    out
}
