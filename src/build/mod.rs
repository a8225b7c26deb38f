//! `lazyblk build`: an ext4 image made with `mkfs.ext4 -d` (4 KiB blocks, so the kernel
//! can mount it from a block device), then published. The root comes from a directory
//! or from a container image, whose layers are merged into a staging directory
//! ([`layers`]) and whose ownership, devices and attributes are then written into the
//! image ([`debugfs`]); no step needs root.
//!
//! # Layout
//! - [`args`]: its flags ([`BuildArgs`]).
//! - [`oci`]: reading OCI image layouts and `docker save` archives.
//! - [`oci_archive`]: an image archive's files read as untrusted (unpacking, paths
//!   that stay inside, small JSON).
//! - [`registry`]: pulling an image from a registry into the layer cache.
//! - [`credentials`]: a registry's credentials, from the flag or Docker/Podman files.
//! - [`layers`]: applying layers (whiteouts, opaque directories, links) into a tree.
//! - [`debugfs`]: the metadata an unprivileged staging directory cannot hold.
//! - [`limits`]: what an archive may hold (headers, names, depth, entries, bytes).
//! - [`headers`]: a tar stream's extension headers bounded before they are read.
//! - [`pax`]: an entry's PAX records (path, owner, extended attributes) as bytes.
//!
//! A build that fails removes its work directory, whatever step failed.

mod args;
mod credentials;
mod debugfs;
mod headers;
mod layers;
mod limits;
mod oci;
mod oci_archive;
mod pax;
mod registry;

pub use args::BuildArgs;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use sha2::{Digest as _, Sha256};

use crate::progress::Progress;
use crate::publish;
use crate::publish::PublishArgs;

/// Chunks uploaded at once, as `publish` does by default.
const UPLOAD_CONCURRENCY: usize = 8;
/// Sizes chosen from the content are multiples of this, and at least this.
const SIZE_STEP: u64 = 64 << 20;
/// Room for the journal and the file system's own metadata in a size chosen from the
/// content: this much, plus [`METADATA_SHARE`] of the rest.
const METADATA_ROOM: u64 = 16 << 20;
/// The share of a size chosen from the content kept for ext4's metadata (inode tables,
/// bitmaps), its journal (up to 1/32 of mid-sized file systems) and the 5% of blocks
/// reserved for root: 15%.
const METADATA_SHARE: (u64, u64) = (15, 100);
/// Bytes an inode takes in the inode table.
const INODE_SIZE: u64 = 256;
/// Times a build whose size was chosen from the content retries with 1.5 times the size
/// when mkfs.ext4 finds it too small.
const SIZE_RETRIES: usize = 3;
/// Labels a build from a container image adds (the user's `--label`s win).
const LABEL_DIGEST: &str = "oci.digest";
const LABEL_IMAGE: &str = "oci.image";

pub async fn run(args: BuildArgs) -> anyhow::Result<()> {
    lazyblk_cache::validate_id(&args.template)?;
    // A key that does not load fails the build before the image is made.
    if let Some(path) = &args.signing_key {
        crate::identity::NodeKey::load(path)?;
    }
    if let Some(size) = args.size {
        if size == 0 || !size.is_multiple_of(4096) {
            bail!("--size {size}: the image size must be a non-zero multiple of 4096");
        }
    }
    let work = tempfile::Builder::new()
        .prefix("lazyblk-build-")
        .tempdir_in(&args.work_dir)
        .with_context(|| format!("making a work directory in {}", args.work_dir.display()))?;
    let outcome = build(args, work.path()).await;
    let path = work.path().to_path_buf();
    let removed = tokio::task::spawn_blocking(move || work.close())
        .await
        .context("removing the work directory")?;
    if let Err(e) = removed {
        let e = anyhow::Error::new(e).context(format!("removing {}", path.display()));
        return Err(match outcome {
            Err(failed) => failed.context(format!("{e:#}")),
            Ok(()) => e,
        });
    }
    outcome
}

/// The build in its work directory (removed by the caller, whatever happens here).
async fn build(args: BuildArgs, work: &Path) -> anyhow::Result<()> {
    let limits = limits::Limits::from_args(&args);
    let image = work.join(format!("{}.img", args.template));
    let mut labels: BTreeMap<String, String> = BTreeMap::new();
    match (&args.from_dir, &args.from_oci) {
        (Some(dir), None) => {
            if !dir.is_dir() {
                bail!("--from-dir {}: not a directory", dir.display());
            }
            let content = {
                let dir = dir.clone();
                tokio::task::spawn_blocking(move || measure(&dir))
                    .await
                    .context("measuring the directory")??
            };
            make_ext4(&args, dir, &image, content, None).await?;
        }
        (None, Some(path)) => {
            let pulled = match path.to_str().filter(|p| p.starts_with(registry::SCHEME)) {
                Some(source) => registry::pull(source, &args, &limits).await?,
                None => {
                    let (path, work) = (path.clone(), work.to_path_buf());
                    tokio::task::spawn_blocking(move || oci::open(&path, &work, &limits))
                        .await
                        .context("the task reading the image failed")??
                }
            };
            let (tree, oci_labels) = unpack(pulled, work, limits).await?;
            let rootfs = work.join("rootfs");
            let totals = tree.totals();
            let same = oci_labels
                .get(LABEL_DIGEST)
                .map(|digest| Reproducible::of(digest, &tree));
            make_ext4(&args, &rootfs, &image, totals, same.as_ref()).await?;
            let values = work.join("xattrs");
            std::fs::create_dir_all(&values)
                .with_context(|| format!("making {}", values.display()))?;
            let commands = debugfs::apply(&image, &tree, &values, work, same.as_ref()).await?;
            tracing::debug!(commands, "ownership, devices and attributes written");
            labels = oci_labels;
        }
        _ => bail!("give exactly one of --from-dir and --from-oci"),
    }
    labels.extend(args.labels.iter().cloned());
    publish::run(PublishArgs {
        image,
        template: args.template,
        store: args.store,
        chunk_size: args.chunk_size,
        parent: None,
        labels: labels.into_iter().collect(),
        concurrency: UPLOAD_CONCURRENCY,
        no_compress: false,
        token: args.token,
        signing_key: args.signing_key,
        json: args.json,
    })
    .await
}

/// Merges the image's layers into `<work>/rootfs`; returns the tree and the labels
/// the template gets from the image.
async fn unpack(
    image: oci::Image,
    work: &Path,
    limits: limits::Limits,
) -> anyhow::Result<(layers::Tree, BTreeMap<String, String>)> {
    let work = work.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let total: u64 = image.layers.iter().map(|l| l.size).sum();
        let progress = Progress::new("unpacking", total);
        let mut tree = layers::Tree::new(&work.join("rootfs"), limits)?;
        let (mut entries, mut whiteouts) = (0, 0);
        for (i, layer) in image.layers.iter().enumerate() {
            let file = std::fs::File::open(&layer.path)
                .with_context(|| format!("opening layer {}", layer.path.display()))?;
            let mut counted = Counted {
                inner: std::io::BufReader::new(file),
                progress: progress.clone(),
                hasher: Sha256::new(),
            };
            let what = || format!("layer {} of {}", i + 1, image.layers.len());
            let stats = tree.apply(layer, &mut counted).with_context(what)?;
            // The blob itself against its descriptor (bytes a decoder left unread too).
            std::io::copy(&mut counted, &mut std::io::sink()).with_context(what)?;
            if let Some(expected) = &layer.digest {
                let actual = format!("sha256:{}", hex::encode(counted.hasher.finalize()));
                if &actual != expected {
                    bail!(
                        "{}: blob {} is corrupt: its bytes hash to {actual}",
                        what(),
                        expected
                    );
                }
            }
            entries += stats.entries;
            whiteouts += stats.whiteouts;
        }
        tree.set_times()?;
        progress.finish(&format!(
            "{} layers, {entries} entries, {whiteouts} whiteouts",
            image.layers.len()
        ));
        let mut labels = image.labels.clone();
        labels.insert(LABEL_DIGEST.to_string(), image.digest.clone());
        if let Some(name) = &image.name {
            labels.insert(LABEL_IMAGE.to_string(), name.clone());
        }
        Ok((tree, labels))
    })
    .await
    .context("the unpacking task failed")?
}

/// Bytes of file data (in 4 KiB blocks) and the number of paths under `dir`.
fn measure(dir: &Path) -> anyhow::Result<(u64, u64)> {
    let mut bytes = 0;
    let mut paths = 1;
    let mut pending: Vec<PathBuf> = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("listing {}", d.display()))? {
            let entry = entry.with_context(|| format!("listing {}", d.display()))?;
            let meta = entry
                .path()
                .symlink_metadata()
                .with_context(|| format!("looking at {}", entry.path().display()))?;
            paths += 1;
            if meta.is_dir() {
                pending.push(entry.path());
            } else if meta.is_file() {
                bytes += meta.len();
            }
        }
    }
    Ok((bytes, paths))
}

/// The size and inode count for `bytes` of files in `paths` paths: the data in whole
/// blocks plus a quarter, room for metadata, rounded up to [`SIZE_STEP`].
fn auto_size(bytes: u64, paths: u64) -> (u64, u64) {
    let inodes = paths + paths / 2 + 1024;
    let data = bytes + paths * 4096;
    let content = data + data / 4 + inodes * INODE_SIZE;
    let size = content + content * METADATA_SHARE.0 / METADATA_SHARE.1 + METADATA_ROOM;
    (size.div_ceil(SIZE_STEP) * SIZE_STEP, inodes)
}

/// What makes two builds of one container image byte for byte the same image (so the
/// same chunks, which nodes already hold): mkfs.ext4 would otherwise pick a random UUID
/// and directory hash seed and stamp the current time, and the staging directory's
/// change times are those of the unpacking.
pub struct Reproducible {
    /// The file system's UUID and directory hash seed, from the image's digest.
    pub uuid: String,
    /// The time every e2fsprogs step sees as now: the newest mtime in the image.
    pub time: u64,
}

impl Reproducible {
    fn of(digest: &str, tree: &layers::Tree) -> Reproducible {
        let hash = Sha256::digest(format!("lazyblk-ext4-uuid\n{digest}").as_bytes());
        let mut b: [u8; 16] = hash[..16].try_into().unwrap_or([0; 16]);
        // A version-4-shaped UUID (RFC 9562 bits), which every tool accepts.
        b[6] = (b[6] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        let h = hex::encode(b);
        let uuid = format!(
            "{}-{}-{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        );
        let time = tree
            .entries
            .values()
            .map(|e| e.mtime)
            .max()
            .unwrap_or(0)
            .max(1);
        Reproducible { uuid, time }
    }

    /// The environment variable e2fsprogs reads its "now" from.
    pub const FAKE_TIME: &'static str = "E2FSPROGS_FAKE_TIME";
    /// e2fsck's own (1.47.0 ignores `FAKE_TIME`): without it a check stamps the
    /// superblock's write and check times with the clock.
    pub const FSCK_TIME: &'static str = "E2FSCK_TIME";
}

async fn make_ext4(
    args: &BuildArgs,
    root: &Path,
    image: &Path,
    (bytes, paths): (u64, u64),
    same: Option<&Reproducible>,
) -> anyhow::Result<()> {
    // The volume label is at most 16 bytes.
    let label: String = args.template.chars().take(16).collect();
    let (mut size, inodes) = match args.size {
        Some(size) => (size, None),
        None => {
            let (size, inodes) = auto_size(bytes, paths);
            (size, Some(inodes))
        }
    };
    let mut attempt = 0;
    loop {
        attempt += 1;
        let _ = std::fs::remove_file(image);
        let mut cmd = tokio::process::Command::new("mkfs.ext4");
        cmd.args(["-q", "-F", "-b", "4096", "-L", &label]);
        if let Some(inodes) = inodes {
            cmd.arg("-N").arg(inodes.to_string());
        }
        if let Some(same) = same {
            cmd.args(["-U", &same.uuid, "-E", &format!("hash_seed={}", same.uuid)]);
            cmd.env(Reproducible::FAKE_TIME, same.time.to_string());
        }
        let output = cmd
            .arg("-d")
            .arg(root)
            .arg(image)
            .arg(format!("{}k", size / 1024))
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .context("running mkfs.ext4 (install e2fsprogs)")?;
        if output.status.success() {
            tracing::info!(size, "ext4 image made");
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        let too_small = stderr.contains("Could not allocate")
            || stderr.contains("No space")
            || stderr.contains("Could not allocate block");
        if too_small && args.size.is_none() && attempt <= SIZE_RETRIES {
            size = (size + size / 2).div_ceil(SIZE_STEP) * SIZE_STEP;
            tracing::warn!(size, "the content did not fit; trying a larger image");
            continue;
        }
        let hint = if too_small {
            " (the files do not fit: raise --size)"
        } else {
            ""
        };
        bail!(
            "mkfs.ext4 -d {} failed{hint}: {}",
            root.display(),
            stderr.trim()
        );
    }
}

/// A reader that reports and hashes the bytes read through it.
struct Counted<R> {
    inner: R,
    progress: Progress,
    hasher: Sha256,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.progress.inc(n as u64);
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}
