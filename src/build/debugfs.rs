//! The second step of a build from a container image: what the staging directory could
//! not hold without root, written into the ext4 image by debugfs. Ownership where it
//! differs from the staging directory's owner, modes where the staged ones differ
//! (directories kept writable, set-id bits), device nodes (made from their placeholder
//! files) and extended attributes.
//!
//! Every command names its inode by number (`<ino>`), never by path: debugfs looks a
//! path up by reading each directory on the way from its start, so a command per entry
//! by path costs the size of the directory each time, and a build with 100,000 files in
//! one directory never ended. The numbers come from listing the image's directories
//! level by level (`ls -p <ino>`), one debugfs run per level, each directory read once.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use super::layers::{Entry, Kind, Tree};

/// File type bits of an inode's mode.
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;
const S_IFBLK: u32 = 0o060000;
const S_IFIFO: u32 = 0o010000;

/// The root directory's inode on ext4.
const ROOT_INODE: u64 = 2;
/// i_block words of an inode that mkfs.ext4 gave an empty file's extent header (12
/// bytes), cleared when the inode becomes a device node.
const EXTENT_HEADER_WORDS: usize = 3;
/// How many lines of debugfs's complaints an error shows.
const ERROR_LINES: usize = 5;
/// What debugfs prints before each command of a script it runs (on stdout).
const ECHO: &[u8] = b"debugfs: ";

/// Writes `tree`'s ownership, modes, devices and attributes into `image`. Attribute
/// values go to files in `values` (debugfs reads them with `ea_set -f`); scripts to
/// `work`.
///
/// With `same`, every inode's times are set from the image (the root's to its time) and
/// both tools run at that time, so two builds of one image are the same bytes.
pub async fn apply(
    image: &Path,
    tree: &Tree,
    values: &Path,
    work: &Path,
    same: Option<&super::Reproducible>,
) -> anyhow::Result<u64> {
    let inodes = inodes(image, tree, work).await?;
    let (mut script, commands, devices) = script(tree, &inodes, values)?;
    if let Some(same) = same {
        script.extend(times(tree, &inodes, same.time));
    }
    let path = work.join("metadata.debugfs");
    std::fs::write(&path, script).with_context(|| format!("writing {}", path.display()))?;
    let now = same.map(|s| s.time);
    run(image, &path, true, now).await?;
    if devices > 0 {
        // A device was a file in its directory entry; e2fsck sets the entry's type.
        set_entry_types(image, now).await?;
    }
    Ok(commands)
}

/// Commands that give every inode of `tree` its mtime as access, change and modify
/// time, and the root `time`: the staging directory's access and change times are
/// those of the unpacking, which mkfs.ext4 copies.
fn times(tree: &Tree, inodes: &HashMap<PathBuf, u64>, time: u64) -> Vec<u8> {
    let mut out = Vec::new();
    let mut set = |ino: u64, t: u64| {
        for field in ["atime", "ctime", "mtime"] {
            out.extend_from_slice(format!("sif <{ino}> {field} @{t}\n").as_bytes());
        }
    };
    set(ROOT_INODE, time);
    let mut done: HashSet<u64> = HashSet::new();
    for (rel, entry) in &tree.entries {
        if let Some(&ino) = inodes.get(rel) {
            if done.insert(ino) {
                set(ino, entry.mtime);
            }
        }
    }
    out
}

/// The inode number of every path of `tree` in `image`, found by listing its
/// directories by number, one level of the tree per debugfs run.
async fn inodes(image: &Path, tree: &Tree, work: &Path) -> anyhow::Result<HashMap<PathBuf, u64>> {
    let mut found: HashMap<PathBuf, u64> = HashMap::with_capacity(tree.entries.len());
    found.insert(PathBuf::new(), ROOT_INODE);
    let mut level: Vec<(PathBuf, u64)> = vec![(PathBuf::new(), ROOT_INODE)];
    let script_path = work.join("list.debugfs");
    while !level.is_empty() {
        let mut script = Vec::new();
        let mut dirs: HashMap<u64, &Path> = HashMap::new();
        for (rel, ino) in &level {
            script.extend_from_slice(format!("ls -p <{ino}>\n").as_bytes());
            dirs.insert(*ino, rel);
        }
        std::fs::write(&script_path, &script)
            .with_context(|| format!("writing {}", script_path.display()))?;
        let listing = run(image, &script_path, false, None).await?;
        let mut next = Vec::new();
        let mut dir: Option<&Path> = None;
        for line in listing.split(|&b| b == b'\n') {
            if let Some(command) = line.strip_prefix(ECHO) {
                dir = listed_dir(command).and_then(|ino| dirs.get(&ino).copied());
                continue;
            }
            let (Some(dir), Some((ino, name))) = (dir, parse_listing(line)) else {
                continue;
            };
            if name == b"." || name == b".." {
                continue;
            }
            let rel = dir.join(OsStr::from_bytes(name));
            if let Some(entry) = tree.entries.get(&rel) {
                if entry.kind == Kind::Dir {
                    next.push((rel.clone(), ino));
                }
                found.insert(rel, ino);
            }
        }
        level = next;
    }
    if let Some(missing) = tree.entries.keys().find(|p| !found.contains_key(*p)) {
        bail!(
            "{}: not found in the image mkfs.ext4 made from the staging directory",
            missing.display()
        );
    }
    Ok(found)
}

/// The directory inode of an echoed `ls -p <N>` command.
fn listed_dir(command: &[u8]) -> Option<u64> {
    let n = command.strip_prefix(b"ls -p <")?.strip_suffix(b">")?;
    std::str::from_utf8(n).ok()?.parse().ok()
}

/// One line of `ls -p`: `/INODE/MODE/UID/GID/NAME/SIZE/` (names hold no `/`, and no line
/// break: those are refused when layers are applied).
fn parse_listing(line: &[u8]) -> Option<(u64, &[u8])> {
    let mut fields = line.strip_prefix(b"/")?.splitn(6, |&b| b == b'/');
    let ino = std::str::from_utf8(fields.next()?).ok()?.parse().ok()?;
    let name = fields.nth(3)?;
    fields.next()?;
    Some((ino, name))
}

/// The script for `tree`: one command per line, every entry named by inode number.
/// Owners are set on every entry (the staging directory's may differ by directory, a
/// setgid one say), and modes on every directory and special file. Returns the script,
/// its commands and the devices it makes.
fn script(
    tree: &Tree,
    inodes: &HashMap<PathBuf, u64>,
    values: &Path,
) -> anyhow::Result<(Vec<u8>, u64, u64)> {
    let mut out: Vec<u8> = Vec::new();
    let mut commands = 0u64;
    let mut devices = 0u64;
    let mut value_files = 0usize;
    let mut line = |out: &mut Vec<u8>, parts: &[&[u8]]| {
        for p in parts {
            out.extend_from_slice(p);
        }
        out.push(b'\n');
        commands += 1;
    };
    // A hard link's inode once.
    let mut done: HashSet<u64> = HashSet::new();
    for (rel, entry) in &tree.entries {
        let Some(&ino) = inodes.get(rel) else {
            bail!("{}: no inode found in the image", rel.display());
        };
        if !done.insert(ino) {
            continue;
        }
        let at = format!("<{ino}>");
        let at = at.as_bytes();
        if let Kind::Char { major, minor } | Kind::Block { major, minor } = entry.kind {
            devices += 1;
            // The placeholder file becomes the node: its type, no extent tree, and the
            // device number where the kernel reads it (old and new encodings).
            line(
                &mut out,
                &[
                    b"sif ",
                    at,
                    format!(" mode 0{:o}", file_type(entry) | entry.mode).as_bytes(),
                ],
            );
            line(&mut out, &[b"sif ", at, b" flags 0"]);
            let (old, new) = device_words(major, minor);
            line(
                &mut out,
                &[b"sif ", at, format!(" block[0] {old}").as_bytes()],
            );
            line(
                &mut out,
                &[b"sif ", at, format!(" block[1] {new}").as_bytes()],
            );
            for word in 2..EXTENT_HEADER_WORDS {
                line(
                    &mut out,
                    &[b"sif ", at, format!(" block[{word}] 0").as_bytes()],
                );
            }
        }
        line(
            &mut out,
            &[b"sif ", at, format!(" uid {}", entry.uid).as_bytes()],
        );
        line(
            &mut out,
            &[b"sif ", at, format!(" gid {}", entry.gid).as_bytes()],
        );
        if entry.kind == Kind::Symlink {
            // A symlink's mode is fixed.
            continue;
        }
        let device = matches!(entry.kind, Kind::Char { .. } | Kind::Block { .. });
        if !device
            && (entry.kind == Kind::Fifo
                || entry.kind == Kind::Dir
                || entry.mode != entry.staged_mode())
        {
            let mode = format!(" mode 0{:o}", file_type(entry) | entry.mode);
            line(&mut out, &[b"sif ", at, mode.as_bytes()]);
        }
        for (name, value) in &entry.xattrs {
            value_files += 1;
            let file = values.join(format!("xattr-{value_files}"));
            std::fs::write(&file, value).with_context(|| format!("writing {}", file.display()))?;
            let file = quote(file.as_os_str().as_bytes())?;
            // `--` ends the options: a name is never read as one (the layers refuse names
            // outside Linux's namespaces, so none starts with `-` anyway).
            line(
                &mut out,
                &[
                    b"ea_set -f ",
                    &file,
                    b" -- ",
                    at,
                    b" ",
                    &quote(name.as_bytes())?,
                ],
            );
        }
    }
    Ok((out, commands, devices))
}

/// A device number as ext4 stores it in i_block[0] (old: 8-bit major and minor) and
/// i_block[1] (new), as the kernel's ext4_set_inode's callers and mke2fs write them.
fn device_words(major: u32, minor: u32) -> (u32, u32) {
    if major < 256 && minor < 256 {
        (major * 256 + minor, 0)
    } else {
        (0, (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12))
    }
}

fn file_type(entry: &Entry) -> u32 {
    match entry.kind {
        Kind::Dir => S_IFDIR,
        Kind::File { .. } | Kind::HardLink => S_IFREG,
        Kind::Char { .. } => S_IFCHR,
        Kind::Block { .. } => S_IFBLK,
        Kind::Fifo => S_IFIFO,
        Kind::Symlink => 0,
    }
}

/// A debugfs argument: in double quotes, a quote doubled. A line break cannot be
/// passed in a script line.
fn quote(s: &[u8]) -> anyhow::Result<Vec<u8>> {
    if s.iter().any(|&b| b == b'\n' || b == b'\r' || b == 0) {
        bail!(
            "{:?}: a path or attribute name with a line break cannot be written into the image",
            String::from_utf8_lossy(s)
        );
    }
    let mut out = Vec::with_capacity(s.len() + 2);
    out.push(b'"');
    for &b in s {
        if b == b'"' {
            out.push(b'"');
        }
        out.push(b);
    }
    out.push(b'"');
    Ok(out)
}

/// Runs a script on `image` (writable with `write`) and returns what it printed. debugfs
/// reports failed commands on stderr, and a command it could not parse (a usage line) on
/// stdout, and still exits 0: any line there other than its banner, the echo of a
/// command, or (for a listing) a listed entry is an error.
async fn run(
    image: &Path,
    script: &Path,
    write: bool,
    now: Option<u64>,
) -> anyhow::Result<Vec<u8>> {
    let mut cmd = tokio::process::Command::new("debugfs");
    if write {
        cmd.arg("-w");
    }
    if let Some(now) = now {
        cmd.env(super::Reproducible::FAKE_TIME, now.to_string());
    }
    let output = cmd
        .arg("-f")
        .arg(script)
        .arg(image)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .context("running debugfs (install e2fsprogs)")?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    let mut complaints: Vec<String> = stderr
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("debugfs "))
        .map(str::to_string)
        .collect();
    // A read-only run lists directories: `/INODE/MODE/UID/GID/NAME/SIZE/` lines.
    let listed = |l: &[u8]| !write && l.starts_with(b"/");
    complaints.extend(
        output
            .stdout
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty() && !l.starts_with(ECHO) && !listed(l))
            .map(|l| String::from_utf8_lossy(l).into_owned()),
    );
    if !output.status.success() || !complaints.is_empty() {
        bail!(
            "debugfs could not set the image's ownership, modes, devices and attributes: {}",
            complaints
                .iter()
                .take(ERROR_LINES)
                .map(|l| super::limits::shown(l.as_bytes()))
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    Ok(output.stdout)
}

/// `e2fsck -fy`: sets the type in the directory entry of each device made from a
/// placeholder file. Exit codes 0 and 1 are a clean or corrected file system.
async fn set_entry_types(image: &Path, now: Option<u64>) -> anyhow::Result<()> {
    let mut cmd = tokio::process::Command::new("e2fsck");
    if let Some(now) = now {
        cmd.env(super::Reproducible::FAKE_TIME, now.to_string());
        cmd.env(super::Reproducible::FSCK_TIME, now.to_string());
    }
    let output = cmd
        .arg("-fy")
        .arg(image)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .context("running e2fsck (install e2fsprogs)")?;
    match output.status.code() {
        Some(0 | 1) => Ok(()),
        code => bail!(
            "e2fsck of the image after its devices were made failed ({code:?}): {}",
            String::from_utf8_lossy(&output.stdout)
                .lines()
                .chain(String::from_utf8_lossy(&output.stderr).lines())
                .take(ERROR_LINES)
                .collect::<Vec<_>>()
                .join("; ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A usage line on stdout (where debugfs prints it, exiting 0) fails the run.
    #[tokio::test]
    async fn a_usage_line_on_stdout_is_a_failure() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("img");
        let made = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F", "-b", "4096"])
            .arg(&image)
            .arg("8M")
            .output()
            .unwrap();
        assert!(made.status.success());
        let script = dir.path().join("s");
        std::fs::write(&script, "sif <2> uid 7\n").unwrap();
        run(&image, &script, true, None).await.unwrap();
        std::fs::write(&script, "ea_set <2>\n").unwrap();
        let err = run(&image, &script, true, None)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("Usage"), "{err}");
    }

    #[test]
    fn listings_and_device_numbers_parse() {
        assert_eq!(
            parse_listing(b"/14/100644/0/0/a b\"c/3/"),
            Some((14, &b"a b\"c"[..]))
        );
        assert_eq!(parse_listing(b"/12/040755/0/0/d//"), Some((12, &b"d"[..])));
        assert_eq!(parse_listing(b"debugfs: ls -p <2>"), None);
        assert_eq!(listed_dir(b"ls -p <12>"), Some(12));
        assert_eq!(device_words(1, 3), (0x103, 0));
        assert_eq!(
            device_words(259, 70000),
            (0, (70000 & 0xff) | (259 << 8) | ((70000 & !0xff) << 12))
        );
    }
}
