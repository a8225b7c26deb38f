//! Paths inside the staging root: a layer's names made relative ([`normalize`]),
//! directories resolved through the image's own symlinks, never the host's, and what
//! whiteouts and replaced entries remove.

use super::*;

/// Symlinks followed while resolving one path before it is called a loop (as Linux).
const MAX_SYMLINK_HOPS: usize = 40;

impl Tree {
    /// Resolves a directory path inside the root, following symlinks within the image
    /// and making directories a layer left implicit. Returns the path with no symlink.
    pub(super) fn resolve_dir(&mut self, rel: &Path) -> anyhow::Result<PathBuf> {
        enum Step {
            Up,
            Name(OsString),
        }
        let mut pending: Vec<Step> = rel
            .components()
            .rev()
            .filter_map(|c| match c {
                Component::Normal(n) => Some(Step::Name(n.to_os_string())),
                Component::ParentDir => Some(Step::Up),
                _ => None,
            })
            .collect();
        let mut out = PathBuf::new();
        let mut hops = 0;
        while let Some(step) = pending.pop() {
            let name = match step {
                Step::Up => {
                    out.pop();
                    continue;
                }
                Step::Name(n) => n,
            };
            let candidate = out.join(&name);
            let full = self.root.join(&candidate);
            match fs::symlink_metadata(&full) {
                Ok(m) if m.file_type().is_symlink() => {
                    hops += 1;
                    if hops > MAX_SYMLINK_HOPS {
                        bail!("{}: too many levels of symbolic links", rel.display());
                    }
                    let target = fs::read_link(&full)
                        .with_context(|| format!("reading symlink {}", full.display()))?;
                    if target.is_absolute() {
                        out = PathBuf::new();
                    }
                    for c in target.components().rev() {
                        match c {
                            Component::Normal(n) => pending.push(Step::Name(n.to_os_string())),
                            Component::ParentDir => pending.push(Step::Up),
                            _ => {}
                        }
                    }
                }
                Ok(m) if m.is_dir() => out = candidate,
                Ok(_) => {
                    // A file of a lower layer where this layer has a directory.
                    self.remove(&candidate)?;
                    self.make_implicit_dir(&candidate)?;
                    out = candidate;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    self.make_implicit_dir(&candidate)?;
                    out = candidate;
                }
                Err(e) => return Err(e).with_context(|| format!("looking at {}", full.display())),
            }
        }
        Ok(out)
    }

    /// Counts a new entry against the limits before it is made: entries, bytes of
    /// files, bytes held in memory.
    pub(super) fn admit(&mut self, rel: &Path, meta: &Entry) -> anyhow::Result<()> {
        if !self.entries.contains_key(rel) {
            if self.entries.len() as u64 >= self.limits.entries {
                bail!(Refused {
                    what: format!("the image's tree, at {}, ", rel.display()),
                    limit: format!("{} entries", self.limits.entries),
                    flag: "--max-entries",
                });
            }
            let parent = rel.parent().unwrap_or(Path::new("")).to_path_buf();
            let children = self.children.entry(parent).or_default();
            if *children >= self.limits.dir_entries {
                bail!(Refused {
                    what: format!(
                        "the directory {}, at {},",
                        limits::shown(rel.parent().unwrap_or(Path::new("")).as_os_str().as_bytes()),
                        limits::shown(rel.as_os_str().as_bytes())
                    ),
                    limit: format!("{} entries", self.limits.dir_entries),
                    flag: "--max-dir-entries",
                });
            }
            *children += 1;
        }
        if let Kind::File { size } = meta.kind {
            let total = self.content.saturating_add(size);
            if total > self.limits.content {
                bail!(Refused {
                    what: format!(
                        "the image's files ({} and more, at {})",
                        bytes(total),
                        limits::shown(rel.as_os_str().as_bytes())
                    ),
                    limit: bytes(self.limits.content),
                    flag: self.limits.content_flag,
                });
            }
            self.content = total;
        }
        let attrs: usize = meta.xattrs.iter().map(|(n, v)| n.len() + v.len()).sum();
        self.held += (rel.as_os_str().len() + attrs) as u64;
        if self.held > limits::MAX_HELD_BYTES {
            bail!(Refused {
                what: "the names and attributes of the image's tree".to_string(),
                limit: bytes(limits::MAX_HELD_BYTES),
                flag: "",
            });
        }
        Ok(())
    }

    pub(super) fn make_implicit_dir(&mut self, rel: &Path) -> anyhow::Result<()> {
        check_path(rel.as_os_str().as_bytes(), &self.limits)?;
        self.admit(rel, &implicit_dir())?;
        let full = self.root.join(rel);
        fs::create_dir(&full).with_context(|| format!("creating {}", full.display()))?;
        set_mode(&full, 0o755)?;
        self.entries.insert(rel.to_path_buf(), implicit_dir());
        self.created.insert(rel.to_path_buf());
        Ok(())
    }

    /// Removes a path and everything under it, from the staging directory and the tree.
    pub(super) fn remove(&mut self, rel: &Path) -> anyhow::Result<()> {
        let full = self.root.join(rel);
        match fs::symlink_metadata(&full) {
            Ok(m) if m.is_dir() => {
                fs::remove_dir_all(&full).with_context(|| format!("removing {}", full.display()))?
            }
            Ok(_) => {
                fs::remove_file(&full).with_context(|| format!("removing {}", full.display()))?
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("looking at {}", full.display())),
        }
        // A path's descendants sort right after it (paths compare by components).
        let doomed: Vec<PathBuf> = self
            .entries
            .range(rel.to_path_buf()..)
            .take_while(|(p, _)| p.starts_with(rel))
            .map(|(p, _)| p.clone())
            .collect();
        for p in doomed {
            self.children.remove(&p);
            if let Some(count) = p.parent().and_then(|d| self.children.get_mut(d)) {
                *count = count.saturating_sub(1);
            }
            if let Some(Entry {
                kind: Kind::File { size },
                ..
            }) = self.entries.remove(&p)
            {
                self.content -= size.min(self.content);
            }
        }
        Ok(())
    }

    /// An opaque directory: removes what lower layers put anywhere under `dir`, and
    /// keeps what this layer made there (and the directories leading to it).
    pub(super) fn clear_below(&mut self, dir: &Path) -> anyhow::Result<()> {
        let full = self.root.join(dir);
        let Ok(children) = fs::read_dir(&full) else {
            return Ok(());
        };
        let mut children: Vec<PathBuf> = children
            .map(|c| c.map(|c| dir.join(c.file_name())))
            .collect::<Result<_, _>>()
            .with_context(|| format!("listing {}", full.display()))?;
        children.sort();
        for rel in children {
            let leads_to_new = self
                .created
                .iter()
                .any(|c| c.starts_with(&rel) && c != &rel);
            let is_dir = fs::symlink_metadata(self.root.join(&rel)).is_ok_and(|m| m.is_dir());
            if self.created.contains(&rel) || leads_to_new {
                if is_dir {
                    self.clear_below(&rel)?;
                }
            } else {
                self.remove(&rel)?;
            }
        }
        Ok(())
    }
}

/// A layer path made relative, refusing any that would leave the root, and names that
/// hold a line break (debugfs lists directories one name a line).
pub(super) fn normalize(raw: &[u8]) -> anyhow::Result<PathBuf> {
    if raw.iter().any(|&b| b == b'\n' || b == b'\r' || b == 0) {
        bail!(
            "layer entry {}: a name with a line break cannot be written into the image",
            limits::shown(raw)
        );
    }
    let raw = Path::new(std::ffi::OsStr::from_bytes(raw));
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir => bail!(
                "layer entry {:?} leaves the image's root (`..`)",
                raw.display()
            ),
            Component::Prefix(_) => bail!("layer entry {:?}: not a Unix path", raw.display()),
        }
    }
    Ok(out)
}
