//! The mounted filesystem through plain std::fs, as a runtime sees it: contents,
//! listings, attributes, errors, concurrency and unmounting.

mod support;

use std::collections::BTreeSet;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use lazyblk_fuse::{Folder, FuseError};
use support::{is_mount_point, pattern, wait_until, MemFile, MemFiles, TestMount};

const MIB: usize = 1024 * 1024;
const TEMPLATE_SIZE: usize = 8 * MIB;
const SANDBOX_SIZE: usize = MIB;

/// A template `base` (8 MiB of pattern) and an empty sandbox `sb1` (1 MiB).
fn standard_files() -> (MemFiles, Arc<MemFile>, Arc<MemFile>) {
    let files = MemFiles::default();
    let template = MemFile::new(pattern(TEMPLATE_SIZE, 1), false);
    let sandbox = MemFile::new(vec![0; SANDBOX_SIZE], true);
    files.insert(Folder::Templates, "base", Arc::clone(&template));
    files.insert(Folder::Sandboxes, "sb1", Arc::clone(&sandbox));
    (files, template, sandbox)
}

fn names(dir: &std::path::Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect()
}

#[test]
fn template_bytes_match_the_backend() {
    require_fuse!();
    let (files, template, _) = standard_files();
    let mnt = TestMount::new(files);
    let path = mnt.path(Folder::Templates, "base");
    let read = fs::read(&path).unwrap();
    assert!(read == template.contents(), "whole-file read differs");

    // An unaligned read across a 1 MiB boundary.
    let file = fs::File::open(&path).unwrap();
    let mut buf = vec![0; 300_000];
    file.read_exact_at(&mut buf, MIB as u64 - 12_345).unwrap();
    assert!(buf[..] == template.contents()[MIB - 12_345..MIB - 12_345 + 300_000]);
}

#[test]
fn reads_stop_at_the_end_of_the_file() {
    require_fuse!();
    let (files, template, _) = standard_files();
    let mnt = TestMount::new(files);
    let file = fs::File::open(mnt.path(Folder::Templates, "base")).unwrap();
    let mut buf = vec![0; 8192];
    let n = file.read_at(&mut buf, TEMPLATE_SIZE as u64 - 100).unwrap();
    assert_eq!(n, 100);
    assert!(buf[..100] == template.contents()[TEMPLATE_SIZE - 100..]);
    assert_eq!(file.read_at(&mut buf, TEMPLATE_SIZE as u64).unwrap(), 0);
    assert_eq!(
        file.read_at(&mut buf, 10 * TEMPLATE_SIZE as u64).unwrap(),
        0
    );
}

#[test]
fn templates_refuse_writes() {
    require_fuse!();
    let (files, template, _) = standard_files();
    let mnt = TestMount::new(files);
    let path = mnt.path(Folder::Templates, "base");
    for options in [
        OpenOptions::new().write(true).clone(),
        OpenOptions::new().read(true).write(true).clone(),
    ] {
        let err = options.open(&path).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    }
    let err = fs::write(&path, b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    let access = nix::unistd::access(&path, nix::unistd::AccessFlags::W_OK);
    assert_eq!(access, Err(nix::errno::Errno::EROFS));
    assert_eq!(
        nix::unistd::access(&path, nix::unistd::AccessFlags::R_OK),
        Ok(())
    );
    assert!(template.contents() == pattern(TEMPLATE_SIZE, 1));
}

#[test]
fn sandbox_writes_are_flushed_and_read_back() {
    require_fuse!();
    let (files, _, sandbox) = standard_files();
    let mnt = TestMount::new(files);
    let path = mnt.path(Folder::Sandboxes, "sb1");
    let data = pattern(3 * 4096 + 17, 7);
    let offset = 5 * 4096 + 3;

    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    file.write_all_at(&data, offset as u64).unwrap();
    file.sync_all().unwrap();
    assert!(
        sandbox.flushes.load(Ordering::SeqCst) >= 1,
        "fsync reached the backend"
    );
    assert!(sandbox.contents()[offset..offset + data.len()] == data[..]);
    drop(file);

    let reopened = fs::File::open(&path).unwrap();
    let mut back = vec![0; data.len()];
    reopened.read_exact_at(&mut back, offset as u64).unwrap();
    assert!(back == data);
}

#[test]
fn sandbox_writes_stop_at_the_end_of_the_file() {
    require_fuse!();
    let (files, _, sandbox) = standard_files();
    let mnt = TestMount::new(files);
    let file = OpenOptions::new()
        .write(true)
        .open(mnt.path(Folder::Sandboxes, "sb1"))
        .unwrap();
    let end = SANDBOX_SIZE as u64;
    // Straddling the end: cut short, as on a block device.
    assert_eq!(file.write_at(&[7; 200], end - 100).unwrap(), 100);
    assert!(sandbox.contents()[SANDBOX_SIZE - 100..] == [7; 100]);
    for offset in [end, end + 4096] {
        let err = file.write_at(&[1; 10], offset).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    }
    assert_eq!(sandbox.contents().len(), SANDBOX_SIZE);
}

#[test]
fn sizes_are_fixed() {
    require_fuse!();
    let (files, _, _) = standard_files();
    let mnt = TestMount::new(files);
    let file = OpenOptions::new()
        .write(true)
        .open(mnt.path(Folder::Sandboxes, "sb1"))
        .unwrap();
    file.set_len(SANDBOX_SIZE as u64).unwrap();
    for size in [0, SANDBOX_SIZE as u64 + 4096] {
        let err = file.set_len(size).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
    }
    assert_eq!(file.metadata().unwrap().len(), SANDBOX_SIZE as u64);
}

#[test]
fn listings_and_attributes() {
    require_fuse!();
    let (files, _, _) = standard_files();
    let mnt = TestMount::new(files);
    assert_eq!(
        names(&mnt.dir()),
        ["sandboxes", "templates"].map(String::from).into()
    );
    assert_eq!(
        names(&mnt.dir().join("templates")),
        ["base".to_owned()].into()
    );
    assert_eq!(
        names(&mnt.dir().join("sandboxes")),
        ["sb1".to_owned()].into()
    );

    let template = fs::metadata(mnt.path(Folder::Templates, "base")).unwrap();
    assert!(template.is_file());
    assert_eq!(template.len(), TEMPLATE_SIZE as u64);
    assert_eq!(template.permissions().mode() & 0o777, 0o444);
    let sandbox = fs::metadata(mnt.path(Folder::Sandboxes, "sb1")).unwrap();
    assert_eq!(sandbox.len(), SANDBOX_SIZE as u64);
    assert_eq!(sandbox.permissions().mode() & 0o777, 0o644);
    assert!(fs::metadata(mnt.dir().join("templates")).unwrap().is_dir());
}

#[test]
fn unknown_names_are_not_found_and_nothing_is_created() {
    require_fuse!();
    let (files, _, _) = standard_files();
    let mnt = TestMount::new(files);
    for path in [
        mnt.path(Folder::Templates, "nope"),
        mnt.path(Folder::Sandboxes, "base"),
        mnt.dir().join("overlays"),
    ] {
        let err = fs::metadata(&path).unwrap_err();
        assert_eq!(
            err.kind(),
            std::io::ErrorKind::NotFound,
            "{}",
            path.display()
        );
    }
    let err = fs::File::create(mnt.path(Folder::Sandboxes, "new")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
    let err = fs::remove_file(mnt.path(Folder::Sandboxes, "sb1")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
}

#[test]
fn files_appear_and_disappear_with_the_backend() {
    require_fuse!();
    let (files, _, _) = standard_files();
    let mnt = TestMount::new(files);
    let path = mnt.path(Folder::Sandboxes, "sb2");
    assert!(fs::metadata(&path).is_err());

    mnt.files
        .insert(Folder::Sandboxes, "sb2", MemFile::new(vec![0; 8192], true));
    assert_eq!(fs::metadata(&path).unwrap().len(), 8192);
    assert!(names(&mnt.dir().join("sandboxes")).contains("sb2"));

    mnt.files.remove(Folder::Sandboxes, "sb2");
    assert!(!names(&mnt.dir().join("sandboxes")).contains("sb2"));
    // The kernel may trust the old entry for its TTL (1 s).
    assert!(wait_until(Duration::from_secs(3), || fs::metadata(&path).is_err()));
}

#[test]
fn a_template_published_again_is_not_served_from_the_old_cache() {
    require_fuse!();
    let (files, _, _) = standard_files();
    let mnt = TestMount::new(files);
    let path = mnt.path(Folder::Templates, "base");
    assert!(fs::read(&path).unwrap() == pattern(TEMPLATE_SIZE, 1));

    mnt.files.remove(Folder::Templates, "base");
    assert!(wait_until(Duration::from_secs(3), || fs::metadata(&path).is_err()));
    let replacement = pattern(TEMPLATE_SIZE, 2);
    mnt.files.insert(
        Folder::Templates,
        "base",
        MemFile::new(replacement.clone(), false),
    );
    assert!(fs::read(&path).unwrap() == replacement);
}

#[test]
fn open_files_hold_the_backend_file_until_closed() {
    require_fuse!();
    let (files, template, _) = standard_files();
    let mnt = TestMount::new(files);
    // The backend's map and this test hold one each.
    let idle = 2;
    let file = fs::File::open(mnt.path(Folder::Templates, "base")).unwrap();
    assert!(Arc::strong_count(&template) > idle);
    drop(file);
    // The kernel sends release after close returns.
    assert!(wait_until(Duration::from_secs(3), || Arc::strong_count(
        &template
    ) == idle));
}

#[test]
fn reads_are_served_concurrently() {
    require_fuse!();
    const READERS: usize = 8;
    const DELAY: Duration = Duration::from_millis(300);
    let files = MemFiles::default();
    let slow = MemFile::slow(pattern(READERS * MIB, 3), false, DELAY);
    files.insert(Folder::Templates, "slow", Arc::clone(&slow));
    let mnt = TestMount::new(files);
    let path = mnt.path(Folder::Templates, "slow");

    std::thread::scope(|scope| {
        for reader in 0..READERS {
            let path = &path;
            let expected = &slow;
            scope.spawn(move || {
                let file = fs::File::open(path).unwrap();
                let mut buf = vec![0; 4096];
                let offset = reader * MIB;
                file.read_exact_at(&mut buf, offset as u64).unwrap();
                assert!(buf == expected.contents()[offset..offset + 4096]);
            });
        }
    });
    // Concurrency is read off the backend (how many reads it held at once), never off
    // the clock: a shared machine can stretch any elapsed time.
    let overlap = slow.max_in_flight.load(Ordering::SeqCst);
    assert!(
        overlap >= 2,
        "reads never overlapped (max in flight {overlap})"
    );
}

#[test]
fn unmount_frees_the_directory() {
    require_fuse!();
    let (files, _, _) = standard_files();
    let mut mnt = TestMount::new(files);
    let dir = mnt.dir();
    assert!(is_mount_point(&dir));
    mnt.mount.take().unwrap().unmount().unwrap();
    assert!(!is_mount_point(&dir));
    assert!(names(&dir).is_empty());
}

#[test]
fn a_busy_mount_is_detached_and_keeps_serving_open_files() {
    require_fuse!();
    let (files, template, _) = standard_files();
    let mut mnt = TestMount::new(files);
    let dir = mnt.dir();
    let file = fs::File::open(mnt.path(Folder::Templates, "base")).unwrap();

    let result = mnt.mount.take().unwrap().unmount();
    assert!(
        matches!(result, Err(FuseError::DetachedBusy { .. })),
        "{result:?}"
    );
    assert!(!is_mount_point(&dir));
    let mut buf = vec![0; 4096];
    file.read_exact_at(&mut buf, 4096).unwrap();
    assert!(buf[..] == template.contents()[4096..8192]);
}

#[test]
fn dropping_the_mount_unmounts() {
    require_fuse!();
    let (files, _, _) = standard_files();
    let mut mnt = TestMount::new(files);
    let dir = mnt.dir();
    drop(mnt.mount.take());
    assert!(!is_mount_point(&dir));
}
