//! The namespace: the root, the two folders and their files; their attributes,
//! lookups, listings, and the checks on setattr and access.

use std::ffi::OsStr;
use std::sync::Arc;

use fuser::{AccessFlags, Errno, FileAttr, FileType, INodeNo};
use tracing::warn;

use lazyblk_image::{Images, ReadImage, WriteImage};

use crate::attrs::{AttrChange, BLOCK_SIZE, NAME_MAX};
use crate::files::Folder;
use crate::fs::LazyFs;
use crate::handles::DirEntry;
use crate::inodes::{folder_ino, Node, ROOT_INO};

impl<F: Images> LazyFs<F> {
    /// The attributes of the root or a folder.
    fn dir_attr(&self, ino: u64) -> FileAttr {
        // A folder links to itself and its parent; the root also to the two folders.
        let nlink = if ino == ROOT_INO { 4 } else { 2 };
        self.attr(ino, FileType::Directory, 0, 0o555, nlink)
    }

    /// The attributes of a file.
    fn file_attr(&self, ino: u64, size: u64, writable: bool) -> FileAttr {
        let perm = if writable { 0o644 } else { 0o444 };
        self.attr(ino, FileType::RegularFile, size, perm, 1)
    }

    fn attr(&self, ino: u64, kind: FileType, size: u64, perm: u16, nlink: u32) -> FileAttr {
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: self.mounted_at,
            mtime: self.mounted_at,
            ctime: self.mounted_at,
            crtime: self.mounted_at,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: BLOCK_SIZE,
            flags: 0,
        }
    }

    /// What `ino` stands for. A retired number answers ESTALE, as does a file inode
    /// whose backend file is gone: on ESTALE the kernel looks the path up again
    /// (once) instead of failing on its cached entry, so a name removed and added
    /// back within the entry TTL resolves to the new file at once.
    pub(crate) fn node(&self, ino: u64) -> Result<Node, Errno> {
        self.inodes.node(ino).ok_or(Errno::ESTALE)
    }

    /// The backend's file `name`, retiring the name's inode if it is gone.
    pub(crate) fn backend_file(&self, folder: Folder, name: &str) -> Option<Arc<F::Image>> {
        match self
            .files
            .open_local(folder.kind(), name, &folder.user(name))
        {
            Ok(file) => Some(file),
            Err(error) => {
                tracing::debug!(?folder, name, ?error, "not opened");
                self.inodes.retire(folder, name);
                None
            }
        }
    }

    /// The attributes of `ino`, from the open file `fh` when the kernel names one.
    pub(crate) fn current_attr(&self, ino: u64, fh: Option<u64>) -> Result<FileAttr, Errno> {
        if let Some(open) = fh.and_then(|fh| self.handles.file(fh)) {
            return Ok(self.file_attr(ino, open.file.size(), open.writable));
        }
        match self.node(ino)? {
            Node::Root | Node::Folder(_) => Ok(self.dir_attr(ino)),
            Node::File { folder, name } => {
                let file = self.backend_file(folder, &name).ok_or(Errno::ESTALE)?;
                Ok(self.file_attr(ino, file.size(), is_writable(folder, &*file)))
            }
        }
    }

    /// The attributes of `name` in directory `parent`; ENOENT when there is none.
    pub(crate) fn lookup_name(&self, parent: u64, name: &OsStr) -> Result<FileAttr, Errno> {
        let name = name.to_str().ok_or(Errno::ENOENT)?;
        match self.node(parent)? {
            Node::Root => {
                let folder = Folder::from_dir_name(name).ok_or(Errno::ENOENT)?;
                Ok(self.dir_attr(folder_ino(folder)))
            }
            Node::Folder(folder) => {
                let file = self.backend_file(folder, name).ok_or(Errno::ENOENT)?;
                let ino = self.inodes.file_ino(folder, name);
                Ok(self.file_attr(ino, file.size(), is_writable(folder, &*file)))
            }
            Node::File { .. } => Err(Errno::ENOTDIR),
        }
    }

    /// A setattr: sizes are fixed and owners and modes are the mount's, so only
    /// no-op changes (and times, which are not kept) are accepted.
    pub(crate) fn check_setattr(attr: &FileAttr, change: &AttrChange) -> Result<(), Errno> {
        if let Some(size) = change.size {
            if attr.kind == FileType::Directory {
                return Err(Errno::EISDIR);
            }
            if size != attr.size {
                return Err(Errno::EPERM);
            }
        }
        let mode_changes = change
            .mode
            .is_some_and(|m| m & 0o7777 != u32::from(attr.perm));
        let uid_changes = change.uid.is_some_and(|u| u != attr.uid);
        let gid_changes = change.gid.is_some_and(|g| g != attr.gid);
        if mode_changes || uid_changes || gid_changes {
            return Err(Errno::EPERM);
        }
        Ok(())
    }

    /// The entries of a directory, taken now.
    pub(crate) fn listing(&self, ino: u64) -> Result<Vec<DirEntry>, Errno> {
        let folder = match self.node(ino)? {
            Node::Root => None,
            Node::Folder(folder) => Some(folder),
            Node::File { .. } => return Err(Errno::ENOTDIR),
        };
        // The root's parent is outside the mount; the kernel answers `..` there itself.
        let mut entries = vec![
            dir_entry(ino, FileType::Directory, "."),
            dir_entry(ROOT_INO, FileType::Directory, ".."),
        ];
        match folder {
            Some(folder) => entries.extend(self.folder_entries(folder)),
            None => entries.extend(
                Folder::ALL.map(|f| dir_entry(folder_ino(f), FileType::Directory, f.dir_name())),
            ),
        }
        Ok(entries)
    }

    /// The files of a folder, as the backend lists them now, sorted.
    fn folder_entries(&self, folder: Folder) -> Vec<DirEntry> {
        let mut names = self.files.list_local(folder.kind());
        names.retain(|name| {
            let valid = is_valid_name(name);
            if !valid {
                warn!(
                    ?folder,
                    name, "backend listed a name that cannot be a file name"
                );
            }
            valid
        });
        names.sort_unstable();
        names.dedup();
        self.inodes.retain_listed(folder, &names);
        names
            .into_iter()
            .map(|name| DirEntry {
                ino: self.inodes.file_ino(folder, &name),
                kind: FileType::RegularFile,
                name,
            })
            .collect()
    }

    /// access(2): templates are read-only, folders are not writable, nothing is
    /// executable.
    pub(crate) fn check_access(&self, ino: u64, mask: AccessFlags) -> Result<(), Errno> {
        let wants_write = mask.contains(AccessFlags::W_OK);
        let wants_exec = mask.contains(AccessFlags::X_OK);
        match self.node(ino)? {
            // Folders are listed and searched, never changed by their users.
            Node::Root | Node::Folder(_) if wants_write => Err(Errno::EACCES),
            Node::Root | Node::Folder(_) => Ok(()),
            Node::File { folder, name } => {
                let file = self.backend_file(folder, &name).ok_or(Errno::ESTALE)?;
                if wants_write && folder == Folder::Templates {
                    Err(Errno::EROFS)
                } else if (wants_write && !file.writable()) || wants_exec {
                    Err(Errno::EACCES)
                } else {
                    Ok(())
                }
            }
        }
    }
}

/// Whether a file of `folder` takes writes: only sandboxes, and only while their
/// backend allows it.
pub(crate) fn is_writable(folder: Folder, file: &impl WriteImage) -> bool {
    folder == Folder::Sandboxes && file.writable()
}

/// Whether a name from the backend can be shown as a file name.
fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name.len() <= NAME_MAX as usize
        && !name.contains(['/', '\0'])
}

fn dir_entry(ino: u64, kind: FileType, name: &str) -> DirEntry {
    DirEntry {
        ino,
        kind,
        name: name.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use lazyblk_image::MemImages;

    use super::*;

    #[test]
    fn names_that_cannot_be_files_are_rejected() {
        assert!(is_valid_name("py311"));
        assert!(is_valid_name("a.b-c_d"));
        for bad in ["", ".", "..", "a/b", "nul\0"] {
            assert!(!is_valid_name(bad), "{bad:?}");
        }
        assert!(!is_valid_name(&"x".repeat(256)));
    }

    fn attr(kind: FileType, size: u64, perm: u16) -> FileAttr {
        FileAttr {
            ino: INodeNo(9),
            size,
            blocks: 0,
            atime: SystemTime::UNIX_EPOCH,
            mtime: SystemTime::UNIX_EPOCH,
            ctime: SystemTime::UNIX_EPOCH,
            crtime: SystemTime::UNIX_EPOCH,
            kind,
            perm,
            nlink: 1,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: BLOCK_SIZE,
            flags: 0,
        }
    }

    fn change(size: Option<u64>, mode: Option<u32>, uid: Option<u32>) -> AttrChange {
        AttrChange {
            mode,
            uid,
            gid: None,
            size,
        }
    }

    #[test]
    fn setattr_accepts_only_no_op_changes() {
        type Fs = LazyFs<MemImages>;
        let file = attr(FileType::RegularFile, 4096, 0o644);
        assert_eq!(Fs::check_setattr(&file, &change(None, None, None)), Ok(()));
        assert_eq!(
            Fs::check_setattr(&file, &change(Some(4096), None, None)),
            Ok(())
        );
        assert_eq!(
            Fs::check_setattr(&file, &change(Some(0), None, None)),
            Err(Errno::EPERM)
        );
        assert_eq!(
            Fs::check_setattr(&file, &change(Some(8192), None, None)),
            Err(Errno::EPERM)
        );
        // chmod carries the file type bits; only the permission bits count.
        assert_eq!(
            Fs::check_setattr(&file, &change(None, Some(0o100644), None)),
            Ok(())
        );
        assert_eq!(
            Fs::check_setattr(&file, &change(None, Some(0o100600), None)),
            Err(Errno::EPERM)
        );
        assert_eq!(
            Fs::check_setattr(&file, &change(None, None, Some(1000))),
            Err(Errno::EPERM)
        );
        let dir = attr(FileType::Directory, 0, 0o555);
        assert_eq!(
            Fs::check_setattr(&dir, &change(Some(0), None, None)),
            Err(Errno::EISDIR)
        );
    }
}
