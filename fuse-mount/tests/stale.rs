//! A daemon killed while mounted leaves a dead mount behind; `clear_stale_mount`
//! detaches it so a new daemon can mount there. The "daemon" is this test binary,
//! run again as a child that mounts and is then killed.

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use lazyblk_fuse::{clear_stale_mount, Folder, FuseError, MountOptions};
use support::{is_mount_point, runtime, wait_until, MemFile, MemFiles};

/// Set for the child: the directory it mounts at before waiting to be killed.
const CHILD_DIR_ENV: &str = "LAZYBLK_FUSE_STALE_CHILD_DIR";

/// How long the child may take to start and mount.
const CHILD_MOUNT_TIMEOUT: Duration = Duration::from_secs(10);

fn backend() -> Arc<MemFiles> {
    let files = MemFiles::default();
    files.insert(Folder::Templates, "t", MemFile::new(vec![1; 4096], false));
    Arc::new(files)
}

/// The child's part: mount, forget the mount (as a SIGKILL would), wait to die.
/// A no-op in a normal test run.
#[test]
fn child_mounts_and_waits_to_be_killed() {
    let Some(dir) = std::env::var_os(CHILD_DIR_ENV) else {
        return;
    };
    let runtime = runtime();
    let mount = lazyblk_fuse::mount(
        Path::new(&dir),
        backend(),
        runtime.handle().clone(),
        MountOptions::default(),
    )
    .expect("child mount");
    std::mem::forget(mount);
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Kills the child and clears whatever it left, even when the test fails.
struct Cleanup {
    child: Child,
    dir: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Err(err) = clear_stale_mount(&self.dir) {
            eprintln!("cleanup: {err}");
        }
    }
}

#[test]
fn a_killed_daemons_mount_is_cleared() {
    require_fuse!();
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("mnt");
    fs::create_dir(&dir).unwrap();

    let child = Command::new(std::env::current_exe().unwrap())
        .args([
            "child_mounts_and_waits_to_be_killed",
            "--exact",
            "--nocapture",
        ])
        .env(CHILD_DIR_ENV, &dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut cleanup = Cleanup {
        child,
        dir: dir.clone(),
    };
    assert!(
        wait_until(CHILD_MOUNT_TIMEOUT, || is_mount_point(&dir)),
        "the child never mounted"
    );
    assert!(fs::read_dir(dir.join("templates")).is_ok());

    cleanup.child.kill().unwrap();
    cleanup.child.wait().unwrap();
    // Listing always asks the daemon (a stat may be answered from the kernel's cache).
    let err = fs::read_dir(&dir).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOTCONN), "{err}");

    let runtime = runtime();
    let refused = lazyblk_fuse::mount(
        &dir,
        backend(),
        runtime.handle().clone(),
        MountOptions::default(),
    );
    assert!(
        matches!(refused, Err(FuseError::StaleMount { .. })),
        "{refused:?}"
    );

    clear_stale_mount(&dir).unwrap();
    assert!(fs::metadata(&dir).unwrap().is_dir());
    assert!(!is_mount_point(&dir));
    // Nothing left to clear: a no-op.
    clear_stale_mount(&dir).unwrap();

    // A new daemon mounts there again, and a live mount is not "stale".
    let mount = lazyblk_fuse::mount(
        &dir,
        backend(),
        runtime.handle().clone(),
        MountOptions::default(),
    )
    .unwrap();
    assert_eq!(fs::metadata(dir.join("templates/t")).unwrap().len(), 4096);
    let live = clear_stale_mount(&dir);
    assert!(
        matches!(live, Err(FuseError::AlreadyMounted { .. })),
        "{live:?}"
    );
    mount.unmount().unwrap();
}

#[test]
fn a_plain_directory_is_left_alone() {
    let root = tempfile::tempdir().unwrap();
    fs::write(root.path().join("keep"), b"x").unwrap();
    clear_stale_mount(root.path()).unwrap();
    clear_stale_mount(&root.path().join("missing")).unwrap();
    assert_eq!(fs::read(root.path().join("keep")).unwrap(), b"x");
}
