//! What a build from a container image may hold, and the refusals that name each limit.
//! An archive is input from a stranger: its headers, names, depth, entries and bytes are
//! bounded before they cost memory, disk or time, and every refusal says which limit
//! was passed and which flag raises it.

use std::fmt;

use crate::build::BuildArgs;

/// The longest path Linux can open (PATH_MAX, terminating NUL included): a longer one
/// could not be made in the staging directory nor read back from the image.
pub const MAX_PATH: usize = 4096;
/// The longest name of one path component ext4 can hold (EXT4_NAME_LEN).
pub const MAX_NAME: usize = 255;
/// Bytes of names and attribute values held in memory for the whole tree until the
/// image is made: a distribution image's 200,000 paths of ~60 bytes take 12 MB, so 1 GiB
/// refuses only archives that would otherwise take the builder's memory.
pub const MAX_HELD_BYTES: u64 = 1 << 30;
/// Bytes of extended attributes (names and values) on one entry: ext4 with 4 KiB blocks
/// keeps an inode's attributes in the inode and one block, so more cannot be written.
pub const MAX_XATTR_BYTES: usize = 4096;

/// The limits of one build, from its flags.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Bytes of one entry's GNU long name, long link or PAX records (`--max-header`).
    pub header: u64,
    /// Entries in the merged tree (`--max-entries`).
    pub entries: u64,
    /// Entries in one directory (`--max-dir-entries`).
    pub dir_entries: u64,
    /// Directories above an entry (`--max-depth`).
    pub depth: usize,
    /// Bytes of the merged tree's files, and which flag set it.
    pub content: u64,
    pub content_flag: &'static str,
}

impl Limits {
    pub fn from_args(args: &BuildArgs) -> Limits {
        // The content can never be larger than an image of the size asked for.
        let (content, content_flag) = match args.size {
            Some(size) if size < args.max_content => (size, "--size"),
            _ => (args.max_content, "--max-content"),
        };
        Limits {
            header: args.max_header,
            entries: args.max_entries,
            dir_entries: args.max_dir_entries,
            depth: usize::from(args.max_depth),
            content,
            content_flag,
        }
    }
}

/// A limit an archive passed; the message names the limit and the flag that sets it.
#[derive(Debug)]
pub struct Refused {
    pub what: String,
    pub limit: String,
    pub flag: &'static str,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} is over the limit of {}", self.what, self.limit)?;
        if !self.flag.is_empty() {
            write!(f, " ({} raises it)", self.flag)?;
        }
        Ok(())
    }
}

impl std::error::Error for Refused {}

/// A byte count as people read it: `64 MiB`, `1536 KiB`, `12 bytes`.
pub fn bytes(n: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    for (unit, name) in UNITS {
        if n >= unit && n.is_multiple_of(unit) {
            return format!("{} {name}", n / unit);
        }
    }
    format!("{n} bytes")
}

/// A path or name shortened for an error message: a hostile name can be megabytes.
pub fn shown(name: &[u8]) -> String {
    /// Bytes of a name an error message shows.
    const SHOWN: usize = 120;
    let text = String::from_utf8_lossy(&name[..name.len().min(SHOWN)]);
    if name.len() > SHOWN {
        format!("{text:?}...")
    } else {
        format!("{text:?}")
    }
}

/// Checks a path (relative to the image's root) against the name, path and depth
/// limits.
pub fn check_path(rel: &[u8], limits: &Limits) -> Result<(), Refused> {
    if rel.len() >= MAX_PATH {
        return Err(Refused {
            what: format!("the path {} of {} bytes", shown(rel), rel.len()),
            limit: format!("{} bytes (Linux's PATH_MAX)", MAX_PATH - 1),
            flag: "",
        });
    }
    let mut depth = 0;
    for part in rel.split(|&b| b == b'/').filter(|p| !p.is_empty()) {
        depth += 1;
        if part.len() > MAX_NAME {
            return Err(Refused {
                what: format!("the name {} of {} bytes", shown(part), part.len()),
                limit: format!("{MAX_NAME} bytes (ext4's longest name)"),
                flag: "",
            });
        }
    }
    if depth > limits.depth {
        return Err(Refused {
            what: format!("the path {} of depth {depth}", shown(rel)),
            limit: format!("{} directories", limits.depth),
            flag: "--max-depth",
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            header: 1 << 20,
            entries: 10,
            dir_entries: 10,
            depth: 3,
            content: 1 << 20,
            content_flag: "--max-content",
        }
    }

    #[test]
    fn paths_are_checked_for_length_names_and_depth() {
        assert!(check_path(b"a/b/c", &limits()).is_ok());
        let deep = check_path(b"a/b/c/d", &limits()).unwrap_err().to_string();
        assert!(
            deep.contains("depth 4") && deep.contains("--max-depth"),
            "{deep}"
        );
        let name = vec![b'n'; 256];
        let long = check_path(&name, &limits()).unwrap_err().to_string();
        assert!(long.contains("256 bytes") && long.len() < 400, "{long}");
        let path = vec![b'p'; 5000];
        let long = check_path(&path, &limits()).unwrap_err().to_string();
        assert!(long.contains("PATH_MAX") && long.len() < 400, "{long}");
    }

    #[test]
    fn byte_counts_read_as_people_write_them() {
        assert_eq!(bytes(64 << 20), "64 MiB");
        assert_eq!(bytes(1536 << 10), "1536 KiB");
        assert_eq!(bytes(12), "12 bytes");
    }
}
