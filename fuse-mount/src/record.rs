//! The session record: what a restarted daemon needs to keep answering a mount it did
//! not make. The kernel names files by inode number and open files by handle, numbers
//! the process that died handed out; the record keeps them.
//!
//! It is a memory file (`memfd`) that the daemon hands to systemd's file descriptor
//! store beside the `/dev/fuse` descriptor, so it lives exactly as long as the
//! connection it describes, outlives a `kill -9`, and never touches the disk. Lines
//! are appended, each with one `write` before the kernel is answered:
//!
//! ```text
//! G <generation>              a process began serving the mount
//! N <ino>                     no number below <ino> is handed out again
//! I <ino> <t|s> <hex name>    inode <ino> is templates/ or sandboxes/<name>
//! R <ino>                     inode <ino> is retired
//! ```
//!
//! An adopting process reads it back, starts a new record with the live numbers only
//! (so it does not grow across restarts) and the next generation. Handle numbers carry
//! their generation in their high bits: a handle of an earlier generation that this
//! process does not know is reopened from its inode number (see `file_io`).

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::OwnedFd;
use std::sync::Mutex;

use crate::files::Folder;

/// The name the memory file shows in `/proc/PID/fd`.
const RECORD_NAME: &str = "lazyblk-fuse-record";

/// The largest record read back. A record holds one line per file name the mount has
/// shown since the last restart (about 100 bytes each); 64 MiB is hundreds of
/// thousands of templates and sandboxes, far beyond a node's, and bounds what a
/// corrupted descriptor could make the daemon read.
const MAX_RECORD_BYTES: u64 = 64 << 20;

/// A record being written; appends are serialised so that lines never interleave.
#[derive(Debug)]
pub(crate) struct SessionRecord {
    file: Mutex<File>,
}

/// What a record read back says.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Recovered {
    /// The generation of the last process that served the mount.
    pub(crate) generation: u64,
    /// Live inode numbers and what they stand for.
    pub(crate) inodes: HashMap<u64, (Folder, String)>,
    /// Above every number ever handed out, retired ones included.
    pub(crate) next_ino: u64,
}

impl SessionRecord {
    /// A new, empty record in memory.
    pub(crate) fn create() -> io::Result<SessionRecord> {
        let fd = nix::sys::memfd::memfd_create(RECORD_NAME, nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
            .map_err(io::Error::from)?;
        Ok(SessionRecord {
            file: Mutex::new(File::from(fd)),
        })
    }

    /// Reads back the record an earlier process kept. A last line cut short (the
    /// process died inside a write) is ignored; any other malformed line is an error.
    pub(crate) fn read_back(fd: OwnedFd) -> io::Result<Recovered> {
        let mut file = File::from(fd);
        file.seek(SeekFrom::Start(0))?;
        let mut text = String::new();
        file.take(MAX_RECORD_BYTES).read_to_string(&mut text)?;
        let complete = match text.rfind('\n') {
            Some(end) => &text[..=end],
            None => "",
        };
        let mut recovered = Recovered::default();
        for line in complete.lines() {
            apply(&mut recovered, line).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("malformed FUSE session record line {line:?}"),
                )
            })?;
        }
        Ok(recovered)
    }

    /// A duplicate of the record's descriptor, for the file descriptor store.
    pub(crate) fn descriptor(&self) -> io::Result<OwnedFd> {
        let file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        Ok(OwnedFd::from(file.try_clone()?))
    }

    pub(crate) fn generation(&self, generation: u64) -> io::Result<()> {
        self.append(&format!("G {generation}\n"))
    }

    pub(crate) fn issued(&self, ino: u64, folder: Folder, name: &str) -> io::Result<()> {
        self.append(&format!("I {ino} {} {}\n", folder_code(folder), hex(name)))
    }

    pub(crate) fn next_ino(&self, ino: u64) -> io::Result<()> {
        self.append(&format!("N {ino}\n"))
    }

    pub(crate) fn retired(&self, ino: u64) -> io::Result<()> {
        self.append(&format!("R {ino}\n"))
    }

    /// One line, one `write` at the end of the file.
    fn append(&self, line: &str) -> io::Result<()> {
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        file.seek(SeekFrom::End(0))?;
        file.write_all(line.as_bytes())
    }
}

fn apply(recovered: &mut Recovered, line: &str) -> Option<()> {
    let mut words = line.split(' ');
    match (words.next()?, words.next(), words.next(), words.next()) {
        ("G", Some(generation), None, None) => recovered.generation = generation.parse().ok()?,
        ("I", Some(ino), Some(folder), Some(name)) => {
            let folder = match folder {
                "t" => Folder::Templates,
                "s" => Folder::Sandboxes,
                _ => return None,
            };
            let ino: u64 = ino.parse().ok()?;
            recovered.inodes.insert(ino, (folder, unhex(name)?));
            recovered.next_ino = recovered.next_ino.max(ino.saturating_add(1));
        }
        ("N", Some(ino), None, None) => {
            recovered.next_ino = recovered.next_ino.max(ino.parse().ok()?);
        }
        ("R", Some(ino), None, None) => {
            recovered.inodes.remove(&ino.parse().ok()?);
        }
        _ => return None,
    }
    Some(())
}

fn folder_code(folder: Folder) -> &'static str {
    match folder {
        Folder::Templates => "t",
        Folder::Sandboxes => "s",
    }
}

/// Names are written in hex: a line then never depends on what a name contains.
fn hex(name: &str) -> String {
    name.bytes().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<String> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    let bytes = (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    String::from_utf8(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_reads_back_its_live_numbers_and_generation() {
        let record = SessionRecord::create().unwrap();
        record.generation(3).unwrap();
        record.issued(4, Folder::Templates, "tpl a").unwrap();
        record.issued(5, Folder::Sandboxes, "sb\n1").unwrap();
        record.issued(6, Folder::Templates, "gone").unwrap();
        record.retired(6).unwrap();
        let back = SessionRecord::read_back(record.descriptor().unwrap()).unwrap();
        assert_eq!(back.generation, 3);
        assert_eq!(back.next_ino, 7);
        assert_eq!(back.inodes.len(), 2);
        assert_eq!(back.inodes[&4], (Folder::Templates, "tpl a".to_owned()));
        assert_eq!(back.inodes[&5], (Folder::Sandboxes, "sb\n1".to_owned()));
    }

    #[test]
    fn a_line_cut_short_is_ignored_and_garbage_is_refused() {
        let record = SessionRecord::create().unwrap();
        record.issued(4, Folder::Templates, "a").unwrap();
        record.append("I 5 s 6").unwrap();
        let back = SessionRecord::read_back(record.descriptor().unwrap()).unwrap();
        assert_eq!(back.inodes.len(), 1);
        record.append("\nX nonsense\n").unwrap();
        assert!(SessionRecord::read_back(record.descriptor().unwrap()).is_err());
    }
}
