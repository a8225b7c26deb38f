//! The second step of a build from a container image: what the staging directory could
//! not hold without root, written into the ext4 image with one `debugfs -w` script.
//! Ownership where it differs from the staging directory's owner, modes where the staged
//! ones differ (directories kept writable, set-id bits), device nodes and fifos (made
//! in place of their placeholder files), and extended attributes.

use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use anyhow::{bail, Context};

use super::layers::{Entry, Kind, Tree};

/// File type bits of an inode's mode.
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;
const S_IFBLK: u32 = 0o060000;
const S_IFIFO: u32 = 0o010000;

/// The longest script line: debugfs reads its script in lines of 8 KiB and runs the
/// rest of a longer one as a command of its own, so a longer name is refused.
const MAX_LINE: usize = 4096 + 128;
/// The longest extended attribute name Linux has (XATTR_NAME_MAX).
const XATTR_NAME_MAX: usize = 255;

/// How many lines of debugfs's complaints an error shows.
const ERROR_LINES: usize = 5;

/// The script for `tree`: one command per line, as bytes (names need not be UTF-8).
/// Attribute values are written to files in `values` (debugfs reads them with
/// `ea_set -f`). Owners are set on every entry (the staging directory's may differ by
/// directory, a setgid one say), and modes on every directory and special file.
pub fn script(tree: &Tree, values: &Path) -> anyhow::Result<(Vec<u8>, u64)> {
    let mut out: Vec<u8> = Vec::new();
    let mut commands = 0u64;
    let mut value_files = 0usize;
    let mut line = |out: &mut Vec<u8>, parts: &[&[u8]]| -> anyhow::Result<()> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len > MAX_LINE {
            bail!("a path or attribute name is too long to be written into the image");
        }
        for p in parts {
            out.extend_from_slice(p);
        }
        out.push(b'\n');
        commands += 1;
        Ok(())
    };
    for (rel, entry) in &tree.entries {
        let mut abs = b"/".to_vec();
        abs.extend_from_slice(rel.as_os_str().as_bytes());
        let path = quote(&abs)?;
        let special = match entry.kind {
            Kind::Char { major, minor } => Some(format!("c {major} {minor}")),
            Kind::Block { major, minor } => Some(format!("b {major} {minor}")),
            Kind::Fifo => Some("p".to_string()),
            _ => None,
        };
        if let Some(node) = &special {
            // debugfs's mknod takes a name in the current directory, not a path.
            let mut dir = b"/".to_vec();
            dir.extend_from_slice(rel.parent().unwrap_or(Path::new("")).as_os_str().as_bytes());
            let name = quote(rel.file_name().unwrap_or_default().as_bytes())?;
            line(&mut out, &[b"rm ", &path])?;
            line(&mut out, &[b"cd ", &quote(&dir)?])?;
            line(&mut out, &[b"mknod ", &name, b" ", node.as_bytes()])?;
            line(&mut out, &[b"cd \"/\""])?;
        }
        line(
            &mut out,
            &[b"sif ", &path, format!(" uid {}", entry.uid).as_bytes()],
        )?;
        line(
            &mut out,
            &[b"sif ", &path, format!(" gid {}", entry.gid).as_bytes()],
        )?;
        if entry.kind == Kind::Symlink {
            // A symlink's mode is fixed.
            continue;
        }
        if special.is_some() || entry.kind == Kind::Dir || entry.mode != entry.staged_mode() {
            let mode = format!(" mode 0{:o}", file_type(entry) | entry.mode);
            line(&mut out, &[b"sif ", &path, mode.as_bytes()])?;
        }
        if special.is_some() {
            let mtime = format!(" mtime @{}", entry.mtime);
            line(&mut out, &[b"sif ", &path, mtime.as_bytes()])?;
        }
        for (name, value) in &entry.xattrs {
            if name.is_empty() || name.len() > XATTR_NAME_MAX {
                bail!(
                    "{}: an extended attribute name of {} bytes (at most {XATTR_NAME_MAX})",
                    rel.display(),
                    name.len()
                );
            }
            value_files += 1;
            let file = values.join(format!("xattr-{value_files}"));
            std::fs::write(&file, value).with_context(|| format!("writing {}", file.display()))?;
            let file = quote(file.as_os_str().as_bytes())?;
            line(
                &mut out,
                &[
                    b"ea_set -f ",
                    &file,
                    b" ",
                    &path,
                    b" ",
                    &quote(name.as_bytes())?,
                ],
            )?;
        }
    }
    Ok((out, commands))
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

/// Runs the script on `image`. debugfs reports failed commands on stderr and still exits
/// 0, so any line there other than its banner is an error.
pub async fn run(image: &Path, script: &Path) -> anyhow::Result<()> {
    let output = tokio::process::Command::new("debugfs")
        .arg("-w")
        .arg("-f")
        .arg(script)
        .arg(image)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .context("running debugfs (install e2fsprogs)")?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    let complaints: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("debugfs "))
        .collect();
    if !output.status.success() || !complaints.is_empty() {
        bail!(
            "debugfs could not set the image's ownership, modes, devices and attributes: {}",
            complaints
                .iter()
                .take(ERROR_LINES)
                .copied()
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    Ok(())
}
