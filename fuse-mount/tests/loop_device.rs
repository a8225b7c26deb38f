//! The files as loop devices, the way a runtime without NBD uses them: an ext4
//! template mounted read-only from `templates/`, and a sandbox mounted read-write
//! from `sandboxes/`, then checked with e2fsck.

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use lazyblk_fuse::Folder;
use support::{pattern, MemFile, MemFiles, TestMount};

/// The size of the test image: quick to build and to check. mkfs is told to use
/// 4 KiB blocks, as for real templates; at this size it would pick 1 KiB.
const IMAGE_SIZE: &str = "16M";

/// Runs a command; its stdout, or a message naming the command and its stderr.
fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(|err| format!("{program}: {err}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    } else {
        Err(format!(
            "{program} {args:?}: {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// Why loop device tests cannot run here, if they cannot.
fn loop_unavailable() -> Option<String> {
    if let Some(why) = support::fuse_unavailable() {
        return Some(why.to_owned());
    }
    if !Path::new("/dev/loop-control").exists() {
        return Some("/dev/loop-control is missing".into());
    }
    for tool in [
        "mkfs.ext4",
        "losetup",
        "mount",
        "umount",
        "e2fsck",
        "debugfs",
    ] {
        if Command::new(tool).arg("-V").output().is_err() {
            return Some(format!("{tool} is not installed"));
        }
    }
    None
}

macro_rules! require_loop {
    () => {
        if let Some(why) = loop_unavailable() {
            eprintln!("skipping: {why}");
            return;
        }
    };
}

/// A loop device, detached on drop.
struct LoopDevice {
    device: String,
}

impl LoopDevice {
    fn attach(file: &Path, read_only: bool) -> LoopDevice {
        let file = file.to_str().expect("utf-8 path");
        let mut args = vec!["--find", "--show"];
        if read_only {
            args.push("--read-only");
        }
        args.push(file);
        let device = run("losetup", &args).expect("losetup");
        LoopDevice { device }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        if let Err(err) = run("losetup", &["-d", &self.device]) {
            eprintln!("cleanup: {err}");
        }
    }
}

/// A file system mounted from a loop device, unmounted on drop.
struct Mounted {
    dir: PathBuf,
    mounted: bool,
}

impl Mounted {
    fn new(device: &LoopDevice, dir: &Path, read_only: bool) -> Mounted {
        fs::create_dir_all(dir).expect("mount point");
        let options = if read_only { "ro" } else { "rw" };
        let dir_str = dir.to_str().expect("utf-8 path");
        run("mount", &["-o", options, &device.device, dir_str]).expect("mount");
        Mounted {
            dir: dir.to_path_buf(),
            mounted: true,
        }
    }

    /// Unmounts now, so that failures are the test's.
    fn unmount(mut self) {
        self.mounted = false;
        run("umount", &[self.dir.to_str().expect("utf-8 path")]).expect("umount");
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if !self.mounted {
            return;
        }
        let dir = self.dir.to_string_lossy().into_owned();
        if let Err(err) = run("umount", &[&dir]) {
            eprintln!("cleanup: {err}; detaching lazily");
            let _ = run("umount", &["-l", &dir]);
        }
    }
}

/// The files put into the test image, by path inside it.
fn image_files() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("hello.txt", b"hello from a lazyblk template\n".to_vec()),
        ("data.bin", pattern(3 * 1024 * 1024 + 123, 11)),
        ("etc/nested/config", pattern(10_000, 12)),
    ]
}

/// An ext4 image (4 KiB blocks) holding [`image_files`], as bytes.
fn build_image(work: &Path) -> Vec<u8> {
    let source = work.join("source");
    for (path, contents) in image_files() {
        let path = source.join(path);
        fs::create_dir_all(path.parent().expect("parent")).expect("source dir");
        fs::write(path, contents).expect("source file");
    }
    let image = work.join("image.ext4");
    run(
        "mkfs.ext4",
        &[
            "-q",
            "-b",
            "4096",
            "-d",
            source.to_str().expect("utf-8 path"),
            image.to_str().expect("utf-8 path"),
            IMAGE_SIZE,
        ],
    )
    .expect("mkfs.ext4");
    fs::read(&image).expect("image bytes")
}

fn assert_image_files(root: &Path) {
    for (path, contents) in image_files() {
        let read = fs::read(root.join(path)).expect(path);
        assert!(read == contents, "{path} differs");
    }
}

#[test]
fn a_template_mounts_read_only_from_a_loop_device() {
    require_loop!();
    let work = tempfile::tempdir().unwrap();
    let files = MemFiles::default();
    files.insert(
        Folder::Templates,
        "ext4",
        MemFile::new(build_image(work.path()), false),
    );
    let fuse = TestMount::new(files);

    let device = LoopDevice::attach(&fuse.path(Folder::Templates, "ext4"), true);
    let mounted = Mounted::new(&device, &work.path().join("guest"), true);
    assert_image_files(&mounted.dir);
    mounted.unmount();
}

#[test]
fn a_sandbox_mounts_read_write_and_stays_consistent() {
    require_loop!();
    let work = tempfile::tempdir().unwrap();
    let sandbox = MemFile::new(build_image(work.path()), true);
    let files = MemFiles::default();
    files.insert(Folder::Sandboxes, "sb", Arc::clone(&sandbox));
    let fuse = TestMount::new(files);
    let file = fuse.path(Folder::Sandboxes, "sb");
    let written = pattern(2 * 1024 * 1024 + 5, 13);

    {
        let device = LoopDevice::attach(&file, false);
        let mounted = Mounted::new(&device, &work.path().join("guest"), false);
        assert_image_files(&mounted.dir);
        fs::write(mounted.dir.join("written.bin"), &written).unwrap();
        fs::remove_file(mounted.dir.join("hello.txt")).unwrap();
        mounted.unmount();
    }

    let file_str = file.to_str().unwrap();
    run("e2fsck", &["-f", "-n", file_str]).expect("e2fsck finds the file system clean");
    let dumped = work.path().join("written.out");
    let dump = format!("dump /written.bin {}", dumped.display());
    run("debugfs", &["-R", &dump, file_str]).expect("debugfs dump");
    assert!(fs::read(&dumped).unwrap() == written);
    let listing = run("debugfs", &["-R", "ls -l /", file_str]).expect("debugfs ls");
    assert!(!listing.contains("hello.txt"), "{listing}");
}
