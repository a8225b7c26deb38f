//! Shared by the integration tests: an in-memory backend, a mounted test
//! filesystem, and checks for what the machine offers.

// Each test binary uses its own subset of these helpers.
#![allow(dead_code)]

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use lazyblk_fuse::{Folder, Mount, MountOptions};
use lazyblk_image::{
    Extent, Images, Kind, Listing, OpenError, PrefetchImage, ReadImage, SparseImage, WriteImage,
};
use tempfile::TempDir;
use tokio::runtime::Runtime;

/// Skips the calling test (with a message) when FUSE cannot be mounted here.
#[macro_export]
macro_rules! require_fuse {
    () => {
        if let Some(why) = $crate::support::fuse_unavailable() {
            eprintln!("skipping: {why}");
            return;
        }
    };
}

/// Why FUSE tests cannot run here, if they cannot.
pub fn fuse_unavailable() -> Option<&'static str> {
    if !Path::new("/dev/fuse").exists() {
        return Some("/dev/fuse is missing");
    }
    if !nix::unistd::geteuid().is_root() {
        return Some("not running as root");
    }
    None
}

/// A deterministic, non-repeating byte pattern, so misplaced bytes show.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    (0..len as u64)
        .map(|i| ((i.wrapping_add(seed).wrapping_mul(0x9E37_79B9_7F4A_7C15)) >> 56) as u8)
        .collect()
}

/// One in-memory file; counts what the filesystem asked of it.
pub struct MemFile {
    data: RwLock<Vec<u8>>,
    writable: bool,
    /// Every read waits this long first, like a chunk fetch.
    read_delay: Duration,
    in_flight: AtomicUsize,
    /// The most reads that were waiting at the same moment.
    pub max_in_flight: AtomicUsize,
    pub flushes: AtomicUsize,
}

impl MemFile {
    pub fn new(data: Vec<u8>, writable: bool) -> Arc<MemFile> {
        MemFile::slow(data, writable, Duration::ZERO)
    }

    pub fn slow(data: Vec<u8>, writable: bool, read_delay: Duration) -> Arc<MemFile> {
        Arc::new(MemFile {
            data: RwLock::new(data),
            writable,
            read_delay,
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            flushes: AtomicUsize::new(0),
        })
    }

    pub fn contents(&self) -> Vec<u8> {
        self.data.read().unwrap().clone()
    }

    /// The range `offset..offset+len`, or the error a misbehaving filesystem earns.
    fn range(&self, offset: u64, len: usize) -> io::Result<std::ops::Range<usize>> {
        let size = self.data.read().unwrap().len();
        let start = usize::try_from(offset).map_err(io::Error::other)?;
        match start.checked_add(len) {
            Some(end) if end <= size => Ok(start..end),
            _ => Err(io::Error::other(format!(
                "out of range: {len} bytes at {offset} of {size}"
            ))),
        }
    }
}

impl ReadImage for MemFile {
    fn size(&self) -> u64 {
        self.data.read().unwrap().len() as u64
    }

    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        if !self.read_delay.is_zero() {
            tokio::time::sleep(self.read_delay).await;
        }
        let result = self.range(offset, buf.len()).map(|range| {
            buf.copy_from_slice(&self.data.read().unwrap()[range]);
        });
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        result
    }
}

impl WriteImage for MemFile {
    fn writable(&self) -> bool {
        self.writable
    }

    async fn write_at(&self, offset: u64, data: &[u8], _fua: bool) -> io::Result<()> {
        if !self.writable {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        let range = self.range(offset, data.len())?;
        self.data.write().unwrap()[range].copy_from_slice(data);
        Ok(())
    }

    async fn flush(&self) -> io::Result<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// Zeroes are written as zero bytes; every byte counts as data.
impl SparseImage for MemFile {
    async fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.write_zeroes(offset, len, fua).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        let len = usize::try_from(len).map_err(io::Error::other)?;
        self.write_at(offset, &vec![0; len], fua).await
    }

    async fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        let length = len.min(self.size().saturating_sub(offset));
        Ok(vec![Extent {
            length,
            hole: false,
            zero: false,
        }])
    }
}

impl PrefetchImage for MemFile {}

/// An in-memory backend whose files can be added and removed while mounted.
#[derive(Default)]
pub struct MemFiles {
    files: Mutex<HashMap<(Folder, String), Arc<MemFile>>>,
}

impl MemFiles {
    pub fn insert(&self, folder: Folder, name: &str, file: Arc<MemFile>) {
        self.files
            .lock()
            .unwrap()
            .insert((folder, name.to_owned()), file);
    }

    pub fn remove(&self, folder: Folder, name: &str) {
        self.files
            .lock()
            .unwrap()
            .remove(&(folder, name.to_owned()));
    }
}

fn folder(kind: Kind) -> Folder {
    match kind {
        Kind::Template => Folder::Templates,
        Kind::Sandbox => Folder::Sandboxes,
    }
}

impl Images for MemFiles {
    type Image = MemFile;

    async fn open(&self, name: &str, user: &str) -> Result<Arc<MemFile>, OpenError> {
        self.open_local(Kind::Sandbox, name, user)
            .or_else(|_| self.open_local(Kind::Template, name, user))
    }

    fn open_local(&self, kind: Kind, name: &str, _user: &str) -> Result<Arc<MemFile>, OpenError> {
        let files = self.files.lock().unwrap();
        files
            .get(&(folder(kind), name.to_owned()))
            .cloned()
            .ok_or(OpenError::Unknown)
    }

    async fn list(&self) -> Vec<Listing> {
        Vec::new()
    }

    fn list_local(&self, kind: Kind) -> Vec<String> {
        let files = self.files.lock().unwrap();
        files
            .keys()
            .filter(|(f, _)| *f == folder(kind))
            .map(|(_, name)| name.clone())
            .collect()
    }
}

/// A runtime like the daemon's: a few workers, timers on.
pub fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A filesystem mounted in a temporary directory. Fields drop in order: the mount
/// first (while the runtime still runs its tasks), the directory last.
pub struct TestMount {
    pub mount: Option<Mount>,
    pub files: Arc<MemFiles>,
    pub runtime: Runtime,
    pub root: TempDir,
}

impl TestMount {
    pub fn new(files: MemFiles) -> TestMount {
        let root = tempfile::tempdir().expect("tempdir");
        let runtime = runtime();
        let files = Arc::new(files);
        let dir = root.path().join("mnt");
        let mount = lazyblk_fuse::mount(
            &dir,
            Arc::clone(&files),
            runtime.handle().clone(),
            MountOptions::default(),
        )
        .expect("mount");
        TestMount {
            mount: Some(mount),
            files,
            runtime,
            root,
        }
    }

    pub fn dir(&self) -> PathBuf {
        self.root.path().join("mnt")
    }

    pub fn path(&self, folder: Folder, name: &str) -> PathBuf {
        self.dir().join(folder.dir_name()).join(name)
    }
}

/// Whether something is mounted at `dir`, per this process's mount table.
pub fn is_mount_point(dir: &Path) -> bool {
    let Ok(table) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let dir = dir.to_string_lossy();
    table
        .lines()
        .any(|line| line.split(' ').nth(4) == Some(dir.as_ref()))
}

/// Polls `check` every 20 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    check()
}
