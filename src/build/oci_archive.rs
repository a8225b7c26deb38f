//! An image archive on disk, read as untrusted input: a tar unpacked into a work
//! directory (its directories, regular files and links only, its headers bounded as a
//! layer's are), and every file read from it resolved inside it, a regular file, and
//! (for JSON) small.

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use super::headers::HeaderGuard;
use super::limits::{bytes, check_path, Limits, Refused};

/// The largest JSON file (index, manifest, config) read from an archive or a registry:
/// they are read whole, and an image config with a long history is a few hundred KiB.
pub const MAX_JSON_BYTES: u64 = 16 << 20;

/// Unpacks the tar at `path` into a new directory under `work`, removed when the
/// returned handle is dropped. Each entry is made writable by the builder (so that it
/// can be removed); nothing in the tar is trusted as a path.
pub(super) fn unpack(
    path: &Path,
    work: &Path,
    limits: &Limits,
) -> anyhow::Result<tempfile::TempDir> {
    let unpacked = tempfile::Builder::new()
        .prefix("lazyblk-oci-")
        .tempdir_in(work)
        .with_context(|| format!("making a directory in {}", work.display()))?;
    let file = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let (guard, _) = HeaderGuard::new(std::io::BufReader::new(file), limits.header);
    let mut archive = tar::Archive::new(guard);
    for entry in archive
        .entries()
        .with_context(|| format!("{}: not a tar archive", path.display()))?
    {
        let mut entry = entry.with_context(|| format!("reading {}", path.display()))?;
        check_path(&entry.path_bytes(), limits)
            .with_context(|| format!("unpacking {}", path.display()))?;
        let mode = match entry.header().entry_type() {
            tar::EntryType::Directory => 0o700,
            tar::EntryType::Regular | tar::EntryType::Continuous => 0o600,
            tar::EntryType::Symlink | tar::EntryType::Link => 0,
            other => {
                // Devices, fifos, sparse files: nothing an image archive holds.
                tracing::warn!(kind = ?other, "skipping an archive entry of an unsupported kind");
                continue;
            }
        };
        // unpack_in refuses paths that leave the directory (`..`, absolute) and links
        // on the way out of it.
        entry
            .unpack_in(unpacked.path())
            .with_context(|| format!("unpacking {}", path.display()))?;
        if mode != 0 {
            let rel = entry
                .path()
                .with_context(|| format!("unpacking {}", path.display()))?;
            let made = within(unpacked.path(), &unpacked.path().join(rel))?;
            fs::set_permissions(&made, fs::Permissions::from_mode(mode))
                .with_context(|| format!("setting the mode of {}", made.display()))?;
        }
    }
    Ok(unpacked)
}

/// `path` with every symlink resolved, refused unless it stays under `root`: an archive
/// may link its blobs to one another, never to a file of the host.
fn within(root: &Path, path: &Path) -> anyhow::Result<PathBuf> {
    let real_root = fs::canonicalize(root).with_context(|| format!("{}", root.display()))?;
    let real = fs::canonicalize(path).with_context(|| format!("{}", path.display()))?;
    if !real.starts_with(&real_root) {
        bail!(
            "{} resolves to {}, outside the image",
            path.display(),
            real.display()
        );
    }
    Ok(real)
}

/// A file of the archive the build reads: inside it, and a regular file (a fifo would
/// hang the build, a device would be read for ever).
pub(super) fn regular_within(root: &Path, path: &Path) -> anyhow::Result<PathBuf> {
    let real = within(root, path)?;
    let meta = fs::metadata(&real).with_context(|| format!("{}", real.display()))?;
    if !meta.is_file() {
        bail!("{} is not a regular file", path.display());
    }
    Ok(real)
}

/// A JSON file of the archive, read whole once it is known to be small.
pub(super) fn read_small(path: &Path) -> anyhow::Result<Vec<u8>> {
    let file = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut data = Vec::new();
    file.take(MAX_JSON_BYTES + 1)
        .read_to_end(&mut data)
        .with_context(|| format!("reading {}", path.display()))?;
    if data.len() as u64 > MAX_JSON_BYTES {
        bail!(Refused {
            what: format!("{}, a JSON file of the image,", path.display()),
            limit: bytes(MAX_JSON_BYTES),
            flag: "",
        });
    }
    Ok(data)
}

/// `rel` under `root`, refusing paths that leave it.
pub(super) fn inside(root: &Path, rel: &str) -> anyhow::Result<PathBuf> {
    let p = Path::new(rel);
    if p.is_absolute()
        || p.components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        bail!("{rel:?} is outside the archive");
    }
    regular_within(root, &root.join(p))
}

pub(super) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let bytes = read_small(path)?;
    serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))
}
