//! The second step of a build from a container image: what the staging directory could
//! not hold without root, written into the ext4 image with one `debugfs -w` script.
//! Ownership where it differs from the staging directory's owner, modes where the staged
//! ones differ (directories kept writable, set-id bits), device nodes and fifos (made
//! in place of their placeholder files), and extended attributes.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{bail, Context};

use super::layers::{Entry, Kind, Tree};

/// File type bits of an inode's mode.
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;
const S_IFBLK: u32 = 0o060000;
const S_IFIFO: u32 = 0o010000;

/// How many lines of debugfs's complaints an error shows.
const ERROR_LINES: usize = 5;

/// The script for `tree`: one command per line. Attribute values are written to files
/// in `values` (debugfs reads them with `ea_set -f`).
pub fn script(tree: &Tree, values: &Path, owner: (u64, u64)) -> anyhow::Result<(String, u64)> {
    let mut out = String::new();
    let mut commands = 0u64;
    let mut value_files = 0usize;
    for (rel, entry) in &tree.entries {
        let path = quote(&format!("/{}", rel.display()))?;
        let special = match entry.kind {
            Kind::Char { major, minor } => Some(format!("c {major} {minor}")),
            Kind::Block { major, minor } => Some(format!("b {major} {minor}")),
            Kind::Fifo => Some("p".to_string()),
            _ => None,
        };
        if let Some(node) = &special {
            // debugfs's mknod takes a name in the current directory, not a path.
            let dir = quote(&format!(
                "/{}",
                rel.parent().unwrap_or(Path::new("")).display()
            ))?;
            let name = quote(&rel.file_name().unwrap_or_default().to_string_lossy())?;
            writeln!(out, "rm {path}\ncd {dir}\nmknod {name} {node}\ncd \"/\"").ok();
            commands += 4;
        }
        if entry.kind == Kind::Symlink {
            // A symlink's mode is fixed; its owner is still the image's.
            if (entry.uid, entry.gid) != owner {
                writeln!(out, "sif {path} uid {}", entry.uid).ok();
                writeln!(out, "sif {path} gid {}", entry.gid).ok();
                commands += 2;
            }
            continue;
        }
        if special.is_some() || (entry.uid, entry.gid) != owner {
            writeln!(out, "sif {path} uid {}", entry.uid).ok();
            writeln!(out, "sif {path} gid {}", entry.gid).ok();
            commands += 2;
        }
        if special.is_some() || entry.mode != entry.staged_mode() {
            writeln!(out, "sif {path} mode 0{:o}", file_type(entry) | entry.mode).ok();
            commands += 1;
        }
        if special.is_some() {
            writeln!(out, "sif {path} mtime @{}", entry.mtime).ok();
            commands += 1;
        }
        for (name, value) in &entry.xattrs {
            value_files += 1;
            let file = values.join(format!("xattr-{value_files}"));
            std::fs::write(&file, value).with_context(|| format!("writing {}", file.display()))?;
            let file = quote(&file.display().to_string())?;
            writeln!(out, "ea_set -f {file} {path} {}", quote(name)?).ok();
            commands += 1;
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

/// A debugfs argument: in double quotes, a quote doubled. A newline cannot be passed
/// in a script line.
fn quote(s: &str) -> anyhow::Result<String> {
    if s.contains('\n') || s.contains('\r') {
        bail!("{s:?}: a path or attribute name with a line break cannot be written into the image");
    }
    Ok(format!("\"{}\"", s.replace('"', "\"\"")))
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
