//! Layers applied in order into a staging directory, as an overlay file system would
//! merge them, without root: the files' bytes, directories, symlinks and hard links go
//! to the staging directory (which `mkfs.ext4 -d` copies); what an unprivileged process
//! cannot make there (ownership, device nodes, fifos, set-id bits, extended attributes
//! such as file capabilities) is recorded in a [`Tree`] and written into the image
//! afterwards by [`crate::build::debugfs`].
//!
//! Whiteouts follow the OCI layer spec: `.wh.NAME` removes NAME of the layers below;
//! `.wh..wh..opq` in a directory removes what the layers below had in it (entries of the
//! same layer stay). Every path stays inside the staging directory: `..` is refused, and
//! symlinks met on the way to an entry are resolved inside the image's root, never on
//! the host.
//!
//! Layout: this file, the tree of entries and a layer's tar applied to it;
//! [`paths`], paths inside the root (symlinks resolved in the image, whiteouts).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsString;
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context};
use sha2::{Digest as _, Sha256};

mod paths;

use paths::normalize;

use super::headers::HeaderGuard;
use super::limits::{self, bytes, check_path, Limits, Refused};
use super::oci::{Compression, Layer};
use super::pax::Pax;

/// Permission bits kept on a staged directory whatever the image says, so that later
/// layers can write into it; the image's own bits are set by debugfs.
const STAGED_DIR_BITS: u32 = 0o700;

/// What an entry is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    File {
        size: u64,
    },
    Dir,
    Symlink,
    /// A second name of a file: its inode is the target's (made with `link(2)`).
    HardLink,
    Char {
        major: u32,
        minor: u32,
    },
    Block {
        major: u32,
        minor: u32,
    },
    Fifo,
}

/// The metadata of one path of the merged tree.
#[derive(Clone, Debug)]
pub struct Entry {
    pub kind: Kind,
    pub uid: u64,
    pub gid: u64,
    /// Permission bits, set-id and sticky bits included (no file type).
    pub mode: u32,
    pub mtime: u64,
    /// Extended attributes from the layer's PAX headers (`SCHILY.xattr.*`), names in a
    /// known namespace, values as bytes.
    pub xattrs: Vec<(String, Vec<u8>)>,
}

impl Entry {
    /// The mode bits the staging directory holds for this entry.
    pub fn staged_mode(&self) -> u32 {
        match self.kind {
            Kind::Dir => (self.mode | STAGED_DIR_BITS) & 0o777,
            // Readable by its owner, so mkfs.ext4 -d can copy it without root.
            Kind::File { .. } | Kind::HardLink => (self.mode | 0o400) & 0o777,
            Kind::Char { .. } | Kind::Block { .. } | Kind::Fifo => 0o600,
            Kind::Symlink => 0o777,
        }
    }
}

/// The merged tree: a staging directory and the metadata of every path in it (the
/// relative path; the root is the empty path).
pub struct Tree {
    root: PathBuf,
    pub entries: BTreeMap<PathBuf, Entry>,
    /// Paths the layer being applied made (its entries and the directories it left
    /// implicit): an opaque directory keeps these and drops the rest.
    created: HashSet<PathBuf>,
    limits: Limits,
    /// Bytes of the regular files in the tree now.
    content: u64,
    /// Entries in each directory of the tree now (see `--max-dir-entries`).
    children: HashMap<PathBuf, u64>,
    /// Bytes of names and attribute values read into the tree (never less: a bound on
    /// memory, see [`limits::MAX_HELD_BYTES`]).
    held: u64,
}

/// What one layer held.
#[derive(Debug, Default)]
pub struct LayerStats {
    pub entries: u64,
    pub whiteouts: u64,
}

impl Tree {
    pub fn new(root: &Path, limits: Limits) -> anyhow::Result<Tree> {
        fs::create_dir_all(root).with_context(|| format!("making {}", root.display()))?;
        let mut entries = BTreeMap::new();
        entries.insert(PathBuf::new(), implicit_dir());
        set_mode(root, 0o755)?;
        Ok(Tree {
            root: root.to_path_buf(),
            entries,
            created: HashSet::new(),
            limits,
            content: 0,
            children: HashMap::new(),
            held: 0,
        })
    }

    /// Bytes of regular files and the number of paths: what sizing the image needs.
    pub fn totals(&self) -> (u64, u64) {
        let bytes = self
            .entries
            .values()
            .map(|e| match e.kind {
                Kind::File { size } => size,
                _ => 0,
            })
            .sum();
        (bytes, self.entries.len() as u64)
    }

    /// Applies one layer (its blob read through `counted`, which reports progress) and
    /// checks the uncompressed tar against the layer's diff id.
    pub fn apply(&mut self, layer: &Layer, counted: impl Read) -> anyhow::Result<LayerStats> {
        let decoded: Box<dyn Read> = match layer.compression {
            Compression::None => Box::new(counted),
            Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(counted)),
            Compression::Zstd => Box::new(
                zstd::stream::read::Decoder::new(counted)
                    .context("starting the zstd decoder of a layer")?,
            ),
        };
        let mut hashed = Hashing {
            inner: decoded,
            hasher: Sha256::new(),
        };
        let stats = self.apply_tar(&mut hashed)?;
        // The tar ends before its padding; the diff id covers every byte.
        io::copy(&mut hashed, &mut io::sink()).context("reading the end of the layer")?;
        let actual = format!("sha256:{}", hex::encode(hashed.hasher.finalize()));
        if let Some(expected) = &layer.diff_id {
            if &actual != expected {
                bail!(
                    "layer {} is corrupt: its tar hashes to {actual}, but its diff id in the image config is {expected}",
                    layer.path.display()
                );
            }
        }
        Ok(stats)
    }

    fn apply_tar(&mut self, reader: &mut dyn Read) -> anyhow::Result<LayerStats> {
        let (guard, headers) = HeaderGuard::new(reader, self.limits.header);
        let mut archive = tar::Archive::new(guard);
        self.created.clear();
        let mut stats = LayerStats::default();
        for entry in archive.entries().context("reading a layer's tar")? {
            let mut entry = entry.context("reading a layer's tar")?;
            let pax = Pax::of(&headers)?;
            let raw = match &pax.path {
                Some(p) => p.clone(),
                None => entry.path_bytes().into_owned(),
            };
            check_path(&raw, &self.limits)?;
            let rel = normalize(&raw)?;
            let Some(name) = rel.file_name().map(|n| n.to_os_string()) else {
                // The root itself: only its metadata.
                let meta = entry_meta(&entry, Kind::Dir, &pax)?;
                self.entries.insert(PathBuf::new(), meta);
                continue;
            };
            let parent = self.resolve_dir(rel.parent().unwrap_or(Path::new("")))?;
            let name_bytes = name.as_encoded_bytes();
            if name_bytes == b".wh..wh..opq" {
                stats.whiteouts += 1;
                self.clear_below(&parent)?;
                continue;
            }
            if let Some(hidden) = name_bytes.strip_prefix(b".wh.") {
                if matches!(hidden, b"" | b"." | b"..") {
                    bail!(
                        "layer entry {:?}: a whiteout of {:?} names no file",
                        rel.display(),
                        String::from_utf8_lossy(hidden)
                    );
                }
                stats.whiteouts += 1;
                let hidden = std::ffi::OsStr::from_bytes(hidden);
                self.remove(&parent.join(hidden))?;
                continue;
            }
            stats.entries += 1;
            let rel = parent.join(&name);
            // Symlinks on the way may have made it longer or deeper.
            check_path(rel.as_os_str().as_bytes(), &self.limits)?;
            let full = self.root.join(&rel);
            let kind = match entry.header().entry_type() {
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    Kind::File { size: entry.size() }
                }
                tar::EntryType::Directory => Kind::Dir,
                tar::EntryType::Symlink => Kind::Symlink,
                tar::EntryType::Link => Kind::HardLink,
                tar::EntryType::Char => Kind::Char {
                    major: device(entry.header().device_major(), MAJOR_LIMIT)?,
                    minor: device(entry.header().device_minor(), MINOR_LIMIT)?,
                },
                tar::EntryType::Block => Kind::Block {
                    major: device(entry.header().device_major(), MAJOR_LIMIT)?,
                    minor: device(entry.header().device_minor(), MINOR_LIMIT)?,
                },
                tar::EntryType::Fifo => Kind::Fifo,
                other => {
                    tracing::warn!(path = %rel.display(), kind = ?other, "skipping a layer entry of an unsupported kind");
                    continue;
                }
            };
            let mut meta = entry_meta(&entry, kind.clone(), &pax)?;
            // Whatever the lower layers had at this path goes, except a directory that
            // stays a directory (its contents merge).
            let existing = fs::symlink_metadata(&full).ok();
            if let Some(existing) = existing {
                if !(existing.is_dir() && kind == Kind::Dir) {
                    self.remove(&rel)?;
                }
            }
            self.admit(&rel, &meta)?;
            match kind {
                Kind::File { size } => {
                    let mut file = fs::File::create(&full)
                        .with_context(|| format!("creating {}", full.display()))?;
                    io::copy(&mut (&mut entry).take(size), &mut file)
                        .with_context(|| format!("writing {}", full.display()))?;
                    set_mode(&full, meta.staged_mode())?;
                }
                Kind::Dir => {
                    if !full.is_dir() {
                        fs::create_dir(&full)
                            .with_context(|| format!("creating {}", full.display()))?;
                    }
                    set_mode(&full, meta.staged_mode())?;
                }
                Kind::Symlink => {
                    let target = link_name(&entry, &pax)
                        .with_context(|| format!("symlink {} has no target", rel.display()))?;
                    if target.len() >= limits::MAX_PATH {
                        bail!(Refused {
                            what: format!("the target of symlink {}", limits::shown(&target)),
                            limit: format!("{} bytes (Linux's PATH_MAX)", limits::MAX_PATH - 1),
                            flag: "",
                        });
                    }
                    let target = std::ffi::OsStr::from_bytes(&target);
                    std::os::unix::fs::symlink(target, &full)
                        .with_context(|| format!("creating symlink {}", full.display()))?;
                }
                Kind::HardLink => {
                    let target = link_name(&entry, &pax)
                        .with_context(|| format!("hard link {} has no target", rel.display()))?;
                    check_path(&target, &self.limits)?;
                    let target = normalize(&target)?;
                    let target_parent =
                        self.resolve_dir(target.parent().unwrap_or(Path::new("")))?;
                    let target = match target.file_name() {
                        Some(n) => target_parent.join(n),
                        None => bail!("hard link {} points at the root", rel.display()),
                    };
                    let Some(of) = self.entries.get(&target).cloned() else {
                        bail!(
                            "hard link {} points at {}, which no layer holds",
                            rel.display(),
                            target.display()
                        );
                    };
                    match of.kind {
                        Kind::File { .. } | Kind::HardLink => {
                            fs::hard_link(self.root.join(&target), &full).with_context(|| {
                                format!("linking {} to {}", full.display(), target.display())
                            })?;
                            // One inode: the target's metadata is the link's.
                            meta = Entry {
                                kind: Kind::HardLink,
                                ..of
                            };
                        }
                        Kind::Symlink => {
                            // A second name of a symlink: the same link, made again.
                            let points_to = fs::read_link(self.root.join(&target))
                                .with_context(|| format!("reading {}", target.display()))?;
                            std::os::unix::fs::symlink(&points_to, &full)
                                .with_context(|| format!("creating symlink {}", full.display()))?;
                            meta = of;
                        }
                        Kind::Char { .. } | Kind::Block { .. } | Kind::Fifo => {
                            // A node of the same kind here (a second inode).
                            make_special(&full, &of.kind)?;
                            set_mode(&full, of.staged_mode())?;
                            meta = of;
                        }
                        Kind::Dir => bail!(
                            "hard link {} points at a directory, {}",
                            rel.display(),
                            target.display()
                        ),
                    }
                }
                Kind::Char { .. } | Kind::Block { .. } | Kind::Fifo => {
                    make_special(&full, &meta.kind)?;
                    set_mode(&full, meta.staged_mode())?;
                }
            }
            self.created.insert(rel.clone());
            self.entries.insert(rel, meta);
        }
        Ok(stats)
    }

    /// Gives every staged path its image's mtime (after all layers: writing into a
    /// directory changes its own).
    pub fn set_times(&self) -> anyhow::Result<()> {
        // Children first, so setting a file's time never touches its directory's.
        for (rel, entry) in self.entries.iter().rev() {
            let full = self.root.join(rel);
            let c = std::ffi::CString::new(full.as_os_str().as_encoded_bytes())
                .with_context(|| format!("{}: a NUL in the path", full.display()))?;
            let t = libc::timespec {
                tv_sec: entry.mtime as libc::time_t,
                tv_nsec: 0,
            };
            let times = [t, t];
            // SAFETY: `c` is a valid NUL-terminated path and `times` two timespecs.
            let rc = unsafe {
                libc::utimensat(
                    libc::AT_FDCWD,
                    c.as_ptr(),
                    times.as_ptr(),
                    libc::AT_SYMLINK_NOFOLLOW,
                )
            };
            if rc != 0 {
                let e = io::Error::last_os_error();
                return Err(e).with_context(|| format!("setting the time of {}", full.display()));
            }
        }
        Ok(())
    }
}

fn link_name<R: Read>(entry: &tar::Entry<'_, R>, pax: &Pax) -> Option<Vec<u8>> {
    match &pax.linkpath {
        Some(l) => Some(l.clone()),
        None => entry.link_name_bytes().map(|l| l.into_owned()),
    }
}

fn entry_meta<R: Read>(entry: &tar::Entry<'_, R>, kind: Kind, pax: &Pax) -> anyhow::Result<Entry> {
    let header = entry.header();
    let uid = match pax.uid {
        Some(uid) => uid,
        None => header.uid().context("a layer entry's uid")?,
    };
    let gid = match pax.gid {
        Some(gid) => gid,
        None => header.gid().context("a layer entry's gid")?,
    };
    let mode = header.mode().context("a layer entry's mode")? & 0o7777;
    let mtime = pax.mtime.unwrap_or_else(|| header.mtime().unwrap_or(0));
    Ok(Entry {
        kind,
        uid,
        gid,
        mode,
        mtime,
        xattrs: pax.xattrs.clone(),
    })
}

/// A device node or fifo in the staging directory: a fifo as itself (mkfs.ext4 -d copies
/// it), a device as an empty file that debugfs turns into the node (making one needs
/// root).
fn make_special(full: &Path, kind: &Kind) -> anyhow::Result<()> {
    if *kind == Kind::Fifo {
        nix::unistd::mkfifo(full, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .with_context(|| format!("making the fifo {}", full.display()))
    } else {
        fs::File::create(full)
            .map(drop)
            .with_context(|| format!("creating {}", full.display()))
    }
}

fn implicit_dir() -> Entry {
    Entry {
        kind: Kind::Dir,
        uid: 0,
        gid: 0,
        mode: 0o755,
        mtime: 0,
        xattrs: Vec::new(),
    }
}

/// Linux's device numbers: a 12-bit major and a 20-bit minor; ext4 stores no more.
const MAJOR_LIMIT: u32 = 1 << 12;
const MINOR_LIMIT: u32 = 1 << 20;

fn device(n: io::Result<Option<u32>>, limit: u32) -> anyhow::Result<u32> {
    let n = n.context("a device entry's number")?.unwrap_or(0);
    if n >= limit {
        bail!("a device number part of {n}: Linux's stop below {limit}");
    }
    Ok(n)
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))
}

/// A reader that hashes what passes through it.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}
