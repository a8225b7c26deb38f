//! Inode numbers: fixed ones for the root and the two folders, and one per
//! (folder, name) for files.
//!
//! A file keeps its number for as long as its name stays in the backend. Once the
//! filesystem sees the name gone (a lookup, open or listing without it), the number
//! is retired, and the name gets a fresh number if it comes back. That matters because
//! template files are opened with `FOPEN_KEEP_CACHE`: the kernel keeps their pages
//! across opens, keyed by inode, and a template deleted and published again under the
//! same id must not be served from the old one's pages.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tracing::warn;

use crate::files::Folder;
use crate::record::{Recovered, SessionRecord};

/// The mount point's inode (FUSE fixes it at 1).
pub(crate) const ROOT_INO: u64 = 1;
/// `templates/`.
const TEMPLATES_INO: u64 = 2;
/// `sandboxes/`.
const SANDBOXES_INO: u64 = 3;
/// Files are numbered from here up; numbers are never reused.
const FIRST_FILE_INO: u64 = 4;

/// What an inode number stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Node {
    /// The mount point.
    Root,
    /// `templates/` or `sandboxes/`.
    Folder(Folder),
    /// A file in a folder.
    File { folder: Folder, name: String },
}

/// The inode number of a folder.
pub(crate) fn folder_ino(folder: Folder) -> u64 {
    match folder {
        Folder::Templates => TEMPLATES_INO,
        Folder::Sandboxes => SANDBOXES_INO,
    }
}

/// The table of file inode numbers; shared by every FUSE callback.
#[derive(Debug, Default)]
pub(crate) struct Inodes {
    table: Mutex<Table>,
    /// Where numbers are written down as they are handed out and retired, for the
    /// process that serves the mount after this one (a mount kept across restarts).
    record: Option<Arc<SessionRecord>>,
}

#[derive(Debug, Default)]
struct Table {
    /// The current number of each name the backend has shown.
    by_name: HashMap<(Folder, String), u64>,
    /// The reverse of `by_name`: retired numbers are removed from both.
    by_ino: HashMap<u64, (Folder, String)>,
    /// Files handed out so far; the next number is `FIRST_FILE_INO + issued`.
    issued: u64,
    /// The content id of the image each file's last open served (see
    /// [`Inodes::same_content`]).
    contents: HashMap<u64, u64>,
}

impl Inodes {
    /// A table that writes its numbers to `record`, starting with those an earlier
    /// process handed out (already in `record`, which was written from them).
    pub(crate) fn recorded(record: Arc<SessionRecord>, earlier: &Recovered) -> Inodes {
        let mut table = Table::default();
        for (ino, (folder, name)) in &earlier.inodes {
            table.by_ino.insert(*ino, (*folder, name.clone()));
            table.by_name.insert((*folder, name.clone()), *ino);
        }
        table.issued = earlier.next_ino.saturating_sub(FIRST_FILE_INO);
        Inodes {
            table: Mutex::new(table),
            record: Some(record),
        }
    }

    /// What `ino` stands for, or None for an unknown or retired number.
    pub(crate) fn node(&self, ino: u64) -> Option<Node> {
        match ino {
            ROOT_INO => Some(Node::Root),
            TEMPLATES_INO => Some(Node::Folder(Folder::Templates)),
            SANDBOXES_INO => Some(Node::Folder(Folder::Sandboxes)),
            _ => {
                let table = self.lock();
                let (folder, name) = table.by_ino.get(&ino)?;
                Some(Node::File {
                    folder: *folder,
                    name: name.clone(),
                })
            }
        }
    }

    /// The number of a file that the backend has just shown to exist.
    pub(crate) fn file_ino(&self, folder: Folder, name: &str) -> u64 {
        let mut table = self.lock();
        let key = (folder, name.to_owned());
        if let Some(ino) = table.by_name.get(&key) {
            return *ino;
        }
        let ino = FIRST_FILE_INO.saturating_add(table.issued);
        table.issued += 1;
        self.write_down(|record| record.issued(ino, folder, name));
        table.by_ino.insert(ino, key.clone());
        table.by_name.insert(key, ino);
        ino
    }

    /// Whether an open of `ino` that serves content `id` serves what its previous open
    /// did, so the kernel may keep the pages it cached of it. A name whose image was
    /// deleted and published again between two looks keeps its number (nothing saw it
    /// gone), and must not be served from the old image's pages. `id` is remembered for
    /// the next open; a first open (nothing cached yet) answers false.
    pub(crate) fn same_content(&self, ino: u64, id: u64) -> bool {
        self.lock().contents.insert(ino, id) == Some(id)
    }

    /// The backend no longer has `name`: retire its number.
    pub(crate) fn retire(&self, folder: Folder, name: &str) {
        let mut table = self.lock();
        if let Some(ino) = table.by_name.remove(&(folder, name.to_owned())) {
            table.by_ino.remove(&ino);
            table.contents.remove(&ino);
            self.write_down(|record| record.retired(ino));
        }
    }

    /// A full listing of `folder`: retire every name not in it.
    pub(crate) fn retain_listed(&self, folder: Folder, listed: &[String]) {
        let listed: HashSet<&str> = listed.iter().map(String::as_str).collect();
        let mut table = self.lock();
        let gone: Vec<(Folder, String)> = table
            .by_name
            .keys()
            .filter(|(f, name)| *f == folder && !listed.contains(name.as_str()))
            .cloned()
            .collect();
        for key in gone {
            if let Some(ino) = table.by_name.remove(&key) {
                table.by_ino.remove(&ino);
                table.contents.remove(&ino);
                self.write_down(|record| record.retired(ino));
            }
        }
    }

    /// Writes a change to the record (called under the table's lock, so the record's
    /// lines come in the table's order). A failed write loses only what a restart
    /// would know about this number: logged, and the mount goes on.
    fn write_down(&self, write: impl FnOnce(&SessionRecord) -> std::io::Result<()>) {
        if let Some(record) = &self.record {
            if let Err(err) = write(record) {
                warn!(%err, "cannot write the FUSE session record; a restart may not find this file");
            }
        }
    }

    /// The table, even if a thread panicked while holding it: every update leaves
    /// the two maps consistent before it can panic.
    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_numbers() {
        let inodes = Inodes::default();
        assert_eq!(inodes.node(ROOT_INO), Some(Node::Root));
        for folder in Folder::ALL {
            assert_eq!(inodes.node(folder_ino(folder)), Some(Node::Folder(folder)));
        }
        assert_eq!(inodes.node(0), None);
        assert_eq!(inodes.node(FIRST_FILE_INO), None);
    }

    #[test]
    fn names_keep_their_number() {
        let inodes = Inodes::default();
        let a = inodes.file_ino(Folder::Templates, "a");
        let b = inodes.file_ino(Folder::Sandboxes, "a");
        assert_ne!(a, b, "same name in two folders is two files");
        assert_eq!(inodes.file_ino(Folder::Templates, "a"), a);
        assert_eq!(
            inodes.node(a),
            Some(Node::File {
                folder: Folder::Templates,
                name: "a".into()
            })
        );
    }

    #[test]
    fn cached_pages_are_kept_only_while_a_name_serves_the_same_content() {
        let inodes = Inodes::default();
        let a = inodes.file_ino(Folder::Templates, "a");
        assert!(
            !inodes.same_content(a, 7),
            "a first open has nothing cached to keep"
        );
        assert!(inodes.same_content(a, 7), "the same bytes again");
        // Deleted and published again between two looks: the number stays, the
        // content changes, so the old pages must go.
        assert!(!inodes.same_content(a, 8));
        assert!(inodes.same_content(a, 8));
        inodes.retire(Folder::Templates, "a");
        let again = inodes.file_ino(Folder::Templates, "a");
        assert!(!inodes.same_content(again, 8), "a new number starts afresh");
    }

    #[test]
    fn a_name_that_comes_back_gets_a_new_number() {
        let inodes = Inodes::default();
        let old = inodes.file_ino(Folder::Templates, "a");
        inodes.retire(Folder::Templates, "a");
        assert_eq!(inodes.node(old), None);
        let new = inodes.file_ino(Folder::Templates, "a");
        assert_ne!(old, new);
    }

    #[test]
    fn a_recorded_table_comes_back_with_its_numbers() {
        let record = Arc::new(SessionRecord::create().unwrap());
        let first = Inodes::recorded(record.clone(), &Recovered::default());
        let a = first.file_ino(Folder::Templates, "a");
        let gone = first.file_ino(Folder::Sandboxes, "gone");
        first.retire(Folder::Sandboxes, "gone");
        let earlier = SessionRecord::read_back(record.descriptor().unwrap()).unwrap();
        let second = Inodes::recorded(Arc::new(SessionRecord::create().unwrap()), &earlier);
        assert_eq!(second.file_ino(Folder::Templates, "a"), a);
        assert_eq!(second.node(gone), None);
        let fresh = second.file_ino(Folder::Sandboxes, "new");
        assert!(fresh > gone, "numbers are never reused");
    }

    #[test]
    fn a_listing_retires_missing_names_of_its_folder_only() {
        let inodes = Inodes::default();
        let kept = inodes.file_ino(Folder::Templates, "kept");
        let gone = inodes.file_ino(Folder::Templates, "gone");
        let other = inodes.file_ino(Folder::Sandboxes, "gone");
        inodes.retain_listed(Folder::Templates, &["kept".to_owned()]);
        assert!(inodes.node(kept).is_some());
        assert_eq!(inodes.node(gone), None);
        assert!(inodes.node(other).is_some());
    }
}
