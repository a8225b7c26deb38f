//! Open files and open directory listings, by the handle number the kernel passes
//! back with every request on them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use fuser::FileType;

use crate::files::Folder;

/// A file between open and release. Holding it holds the backend's `Arc`, which is
/// how the daemon knows the file is in use.
#[derive(Debug)]
pub(crate) struct OpenFile<T> {
    /// The backend's file.
    pub(crate) file: Arc<T>,
    /// Where it lives; named in logs.
    pub(crate) folder: Folder,
    /// Its name; named in logs.
    pub(crate) name: String,
    /// Whether writes are accepted (a sandbox whose backend allows them).
    pub(crate) writable: bool,
}

/// One entry of a directory listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct DirEntry {
    pub(crate) ino: u64,
    pub(crate) kind: FileType,
    pub(crate) name: String,
}

/// Handle numbers carry the generation of the process that made them above this bit:
/// 2^40 opens per process, 2^24 restarts of one mount. A process that serves a mount
/// after a restart starts a new generation, so its handles never equal one the kernel
/// still holds from an earlier process, and it can tell those apart.
const GENERATION_SHIFT: u32 = 40;

/// Every open file and directory of the mount.
#[derive(Debug)]
pub(crate) struct Handles<T> {
    /// The next handle number; handles are never reused while the mount lives.
    next: AtomicU64,
    /// This process's generation (0 for a fresh mount).
    generation: u64,
    /// Open files; a read or write clones the `Arc` and lets go of the lock at once.
    files: Mutex<HashMap<u64, Arc<OpenFile<T>>>>,
    /// Directory listings taken at opendir, so one `ls` sees one consistent list
    /// however many readdir calls it takes.
    dirs: Mutex<HashMap<u64, Arc<[DirEntry]>>>,
}

impl<T> Default for Handles<T> {
    fn default() -> Self {
        Handles::of_generation(0)
    }
}

impl<T> Handles<T> {
    /// Handles numbered for a process of `generation`.
    pub(crate) fn of_generation(generation: u64) -> Self {
        Handles {
            // 0 is left unused so that a zero handle is always an error.
            next: AtomicU64::new((generation << GENERATION_SHIFT) | 1),
            generation,
            files: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `fh` was handed out by an earlier process serving this mount.
    pub(crate) fn is_earlier(&self, fh: u64) -> bool {
        (fh >> GENERATION_SHIFT) < self.generation
    }

    /// Registers an open file under the handle an earlier process gave it; returns
    /// what is registered under `fh` (another request may have done it first).
    pub(crate) fn adopt_file(&self, fh: u64, file: OpenFile<T>) -> Arc<OpenFile<T>> {
        lock(&self.files)
            .entry(fh)
            .or_insert_with(|| Arc::new(file))
            .clone()
    }

    /// Registers a listing under the handle an earlier process gave it.
    pub(crate) fn adopt_dir(&self, fh: u64, entries: Vec<DirEntry>) -> Arc<[DirEntry]> {
        lock(&self.dirs)
            .entry(fh)
            .or_insert_with(|| entries.into())
            .clone()
    }

    /// Registers an open file; returns its handle.
    pub(crate) fn open_file(&self, file: OpenFile<T>) -> u64 {
        let fh = self.next_handle();
        lock(&self.files).insert(fh, Arc::new(file));
        fh
    }

    /// The open file behind `fh`.
    pub(crate) fn file(&self, fh: u64) -> Option<Arc<OpenFile<T>>> {
        lock(&self.files).get(&fh).cloned()
    }

    /// Forgets `fh`; the backend's `Arc` goes once in-flight requests finish.
    pub(crate) fn release_file(&self, fh: u64) -> Option<Arc<OpenFile<T>>> {
        lock(&self.files).remove(&fh)
    }

    /// Registers a directory listing; returns its handle.
    pub(crate) fn open_dir(&self, entries: Vec<DirEntry>) -> u64 {
        let fh = self.next_handle();
        lock(&self.dirs).insert(fh, entries.into());
        fh
    }

    /// The listing behind `fh`.
    pub(crate) fn dir(&self, fh: u64) -> Option<Arc<[DirEntry]>> {
        lock(&self.dirs).get(&fh).cloned()
    }

    /// Forgets a listing.
    pub(crate) fn release_dir(&self, fh: u64) {
        lock(&self.dirs).remove(&fh);
    }

    fn next_handle(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }
}

/// A map, even if a thread panicked while holding it: single inserts and removes
/// cannot leave it half-updated.
fn lock<V>(map: &Mutex<V>) -> MutexGuard<'_, V> {
    map.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(file: &Arc<u32>) -> OpenFile<u32> {
        OpenFile {
            file: Arc::clone(file),
            folder: Folder::Sandboxes,
            name: "sb".into(),
            writable: true,
        }
    }

    #[test]
    fn an_open_file_holds_the_backend_arc_until_release() {
        let handles = Handles::default();
        let file = Arc::new(7_u32);
        let fh = handles.open_file(open(&file));
        assert_eq!(Arc::strong_count(&file), 2);
        assert_eq!(*handles.file(fh).map(|f| Arc::clone(&f.file)).unwrap(), 7);
        drop(handles.release_file(fh));
        assert_eq!(Arc::strong_count(&file), 1);
        assert!(handles.file(fh).is_none());
    }

    #[test]
    fn a_later_generation_never_hands_out_an_earlier_handle() {
        let first = Handles::default();
        let file = Arc::new(0_u32);
        let old = first.open_file(open(&file));
        let second = Handles::of_generation(1);
        let new = second.open_file(open(&file));
        assert_ne!(old, new);
        assert!(second.is_earlier(old));
        assert!(!second.is_earlier(new));
        assert!(second.file(old).is_none());
        second.adopt_file(old, open(&file));
        assert!(second.file(old).is_some());
    }

    #[test]
    fn handles_are_distinct_and_never_zero() {
        let handles = Handles::default();
        let file = Arc::new(0_u32);
        let a = handles.open_file(open(&file));
        let b = handles.open_dir(Vec::new());
        assert_ne!(a, 0);
        assert_ne!(a, b);
        assert!(handles.dir(b).is_some());
        handles.release_dir(b);
        assert!(handles.dir(b).is_none());
    }
}
