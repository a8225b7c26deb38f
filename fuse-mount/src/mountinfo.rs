//! `/proc/self/mountinfo`, read by the FUSE mount's stale-mount check and by the daemon
//! (its kept FUSE mount, the ublk mount namespace's copies of its devices' mounts).

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

/// This process's mount table, one entry per line that parses.
pub fn read() -> std::io::Result<Vec<MountEntry>> {
    let table = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(table.lines().filter_map(parse_line).collect())
}

/// One line of `/proc/self/mountinfo`, the fields used here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// The mounted device's numbers (`MAJ:MIN`).
    pub major: u32,
    pub minor: u32,
    pub mount_point: PathBuf,
    pub fstype: String,
    pub source: String,
}

/// The last (topmost) mount at `path` in a mountinfo table.
pub fn top_mount_at(table: &str, path: &Path) -> Option<MountEntry> {
    table
        .lines()
        .rev()
        .filter_map(parse_line)
        .find(|entry| entry.mount_point == path)
}

/// Parses `ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER`.
/// Spaces inside fields are escaped as `\040`, so " - " only ever separates.
pub fn parse_line(line: &str) -> Option<MountEntry> {
    let (mount, filesystem) = line.split_once(" - ")?;
    let mut fields = mount.split(' ');
    let (major, minor) = fields.nth(2)?.split_once(':')?;
    let mount_point = fields.nth(1)?;
    let mut filesystem = filesystem.split(' ');
    let fstype = filesystem.next()?;
    let source = filesystem.next()?;
    Some(MountEntry {
        major: major.parse().ok()?,
        minor: minor.parse().ok()?,
        mount_point: PathBuf::from(OsString::from_vec(unescape_octal(mount_point))),
        fstype: String::from_utf8_lossy(&unescape_octal(fstype)).into_owned(),
        source: String::from_utf8_lossy(&unescape_octal(source)).into_owned(),
    })
}

/// Undoes the kernel's `\ooo` escapes of space, tab, newline and backslash.
fn unescape_octal(field: &str) -> Vec<u8> {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = bytes
            .get(i + 1..i + 4)
            .filter(|digits| bytes[i] == b'\\' && digits.iter().all(|d| (b'0'..=b'7').contains(d)))
            .and_then(|digits| {
                let value = digits
                    .iter()
                    .fold(0_u32, |v, d| v * 8 + u32::from(d - b'0'));
                u8::try_from(value).ok()
            });
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "\
22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:5 - proc proc rw
61 29 0:52 / /srv/lazy\\040mnt rw,nosuid,nodev,relatime shared:33 - fuse lazyblk rw,user_id=0,group_id=0
62 61 0:53 / /srv/lazy\\040mnt rw,nosuid,nodev,relatime - fuse other rw,user_id=0,group_id=0
";

    #[test]
    fn finds_the_topmost_mount_at_a_path() {
        let entry = top_mount_at(TABLE, Path::new("/srv/lazy mnt")).unwrap();
        assert_eq!(
            entry,
            MountEntry {
                major: 0,
                minor: 53,
                mount_point: "/srv/lazy mnt".into(),
                fstype: "fuse".into(),
                source: "other".into(),
            }
        );
        assert_eq!(top_mount_at(TABLE, Path::new("/srv")), None);
    }

    #[test]
    fn malformed_lines_are_skipped() {
        assert_eq!(parse_line(""), None);
        assert_eq!(parse_line("1 2 3"), None);
        assert_eq!(parse_line("1 2 0:1 / - "), None);
    }

    #[test]
    fn octal_escapes_are_undone() {
        assert_eq!(unescape_octal(r"a\040b\011c\012d\134e"), b"a b\tc\nd\\e");
        // A lone or malformed backslash is kept as it is.
        assert_eq!(unescape_octal(r"a\"), b"a\\");
        assert_eq!(unescape_octal(r"a\9xx"), b"a\\9xx");
        assert_eq!(unescape_octal(r"a\+12"), b"a\\+12");
        assert_eq!(unescape_octal(r"a\777"), b"a\\777");
    }
}
