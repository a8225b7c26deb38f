//! The small traits a backend implements to be served as files: [`Files`] names and
//! opens them, [`File`] reads, writes and flushes one of them.

use std::future::Future;
use std::io;
use std::sync::Arc;

/// The two folders at the top of the mount.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Folder {
    /// `templates/`: read-only files, one per template.
    Templates,
    /// `sandboxes/`: read-write files, one per sandbox overlay.
    Sandboxes,
}

impl Folder {
    /// Both folders, in the order a directory listing shows them.
    pub const ALL: [Folder; 2] = [Folder::Templates, Folder::Sandboxes];

    /// The folder's directory name under the mount point.
    pub fn dir_name(self) -> &'static str {
        match self {
            Folder::Templates => "templates",
            Folder::Sandboxes => "sandboxes",
        }
    }

    /// The folder called `name`, if there is one.
    pub fn from_dir_name(name: &str) -> Option<Folder> {
        Folder::ALL.into_iter().find(|f| f.dir_name() == name)
    }
}

/// One served file: a template image or a sandbox overlay, of a fixed size.
///
/// Offsets and lengths handed to [`File::read`] and [`File::write`] always lie inside
/// `0..size()`: the filesystem clamps reads at the end of the file and refuses writes
/// that start past it.
pub trait File: Send + Sync + 'static {
    /// The size in bytes; fixed for the life of the file.
    fn size(&self) -> u64;

    /// Whether writes are accepted. Only consulted for files under `sandboxes/`;
    /// templates are always read-only.
    fn writable(&self) -> bool;

    /// Fills all of `buf` with the bytes at `offset`. The buffer is reused between
    /// requests, so an `Ok` that leaves part of it unfilled would serve stale bytes.
    fn read(&self, offset: u64, buf: &mut [u8]) -> impl Future<Output = io::Result<()>> + Send;

    /// Writes all of `data` at `offset`.
    fn write(&self, offset: u64, data: &[u8]) -> impl Future<Output = io::Result<()>> + Send;

    /// fsync / flush: make every acknowledged write durable.
    fn flush(&self) -> impl Future<Output = io::Result<()>> + Send;
}

/// The set of files the mount shows, answered by the daemon.
pub trait Files: Send + Sync + 'static {
    /// The type of one open file.
    type File: File;

    /// Names in a folder; answered from local state, never blocks on the network.
    fn list(&self, folder: Folder) -> Vec<String>;

    /// The file, or None. Called at lookup/open; the Arc is held while the file is open
    /// (so the daemon knows it is in use) and dropped at release.
    fn open(&self, folder: Folder, name: &str) -> Option<Arc<Self::File>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folder_names_round_trip() {
        for folder in Folder::ALL {
            assert_eq!(Folder::from_dir_name(folder.dir_name()), Some(folder));
        }
        assert_eq!(Folder::from_dir_name("overlays"), None);
    }
}
