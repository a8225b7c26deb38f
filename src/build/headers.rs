//! A tar stream watched header by header as the `tar` crate reads it. The crate reads a
//! GNU long name, long link or PAX header into memory whole, whatever size its header
//! claims; [`HeaderGuard`] sees each header block before the crate reads the data behind
//! it and refuses one over the limit. It also keeps each entry's PAX records as bytes
//! ([`super::pax`] parses them by their lengths), because the crate splits them at line
//! breaks and so loses binary attribute values such as `security.ima`.
//!
//! The guard finds the headers where the crate does: after each entry's data rounded up
//! to 512 bytes, with the size a PAX `size` record gives (parsed as the crate parses it),
//! and after the extension blocks of a GNU sparse entry. At the first all-zero block the
//! crate stops, and so does the guard.

use std::cell::RefCell;
use std::io::{self, Read};
use std::rc::Rc;

use super::limits::{bytes, Refused};

/// A tar block: headers and data are laid out in these.
const BLOCK: u64 = 512;
/// Offset of the flag that says another sparse block follows, in a GNU sparse header and
/// in each of its extension blocks.
const GNU_IS_EXTENDED: usize = 482;
const GNU_EXT_IS_EXTENDED: usize = 504;

/// What the next block of the stream is.
#[derive(Clone, Copy)]
enum Expect {
    Header,
    /// An extension block of a GNU sparse entry whose data (this many bytes) follows.
    SparseExtension(u64),
    /// The end of the archive: the crate reads no further headers.
    Done,
}

struct Scan {
    limit: u64,
    /// Bytes of the stream passed through.
    pos: u64,
    /// Where the next header or extension block starts (bytes before it are data).
    next_block: u64,
    block: [u8; BLOCK as usize],
    filled: usize,
    expect: Expect,
    /// The data of a PAX header being read, and where it ends.
    collecting: Option<(Vec<u8>, u64)>,
    /// PAX records read, waiting for the entry they describe.
    pending_pax: Option<Vec<u8>>,
    /// The PAX records of the entry whose header was read last.
    current_pax: Option<Vec<u8>>,
}

/// The caller's side of a guard: the PAX records of the entry the crate yielded last.
#[derive(Clone)]
pub struct Headers(Rc<RefCell<Scan>>);

impl Headers {
    pub fn current_pax(&self) -> Option<Vec<u8>> {
        self.0.borrow().current_pax.clone()
    }
}

/// A reader of a tar stream that refuses extension headers over `limit` bytes.
pub struct HeaderGuard<R> {
    inner: R,
    scan: Rc<RefCell<Scan>>,
}

impl<R: Read> HeaderGuard<R> {
    pub fn new(inner: R, limit: u64) -> (HeaderGuard<R>, Headers) {
        let scan = Rc::new(RefCell::new(Scan {
            limit,
            pos: 0,
            next_block: 0,
            block: [0; BLOCK as usize],
            filled: 0,
            expect: Expect::Header,
            collecting: None,
            pending_pax: None,
            current_pax: None,
        }));
        let headers = Headers(scan.clone());
        (HeaderGuard { inner, scan }, headers)
    }
}

impl<R: Read> Read for HeaderGuard<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.scan.borrow_mut().feed(&buf[..n])?;
        Ok(n)
    }
}

impl Scan {
    fn feed(&mut self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            if matches!(self.expect, Expect::Done) {
                return Ok(());
            }
            if self.pos < self.next_block {
                let n = (buf.len() as u64).min(self.next_block - self.pos) as usize;
                if let Some((data, end)) = &mut self.collecting {
                    let wanted = end.saturating_sub(self.pos).min(n as u64) as usize;
                    data.extend_from_slice(&buf[..wanted]);
                }
                self.pos += n as u64;
                buf = &buf[n..];
                continue;
            }
            let n = (BLOCK as usize - self.filled).min(buf.len());
            self.block[self.filled..self.filled + n].copy_from_slice(&buf[..n]);
            self.filled += n;
            self.pos += n as u64;
            buf = &buf[n..];
            if self.filled == BLOCK as usize {
                self.filled = 0;
                match self.expect {
                    Expect::Header => self.header()?,
                    Expect::SparseExtension(size) => self.sparse_extension(size),
                    Expect::Done => {}
                }
            }
        }
        Ok(())
    }

    fn header(&mut self) -> io::Result<()> {
        if let Some((data, _)) = self.collecting.take() {
            self.pending_pax = Some(data);
        }
        if self.block.iter().all(|&b| b == 0) {
            self.expect = Expect::Done;
            return Ok(());
        }
        let header = tar::Header::from_byte_slice(&self.block);
        let kind = header.entry_type();
        let (long_name, long_link) = (kind.is_gnu_longname(), kind.is_gnu_longlink());
        let pax = kind.is_pax_local_extensions();
        let extension = long_name || long_link || pax || kind.is_pax_global_extensions();
        let Ok(mut size) = header.entry_size() else {
            // The crate refuses this header itself.
            self.expect = Expect::Done;
            return Ok(());
        };
        if !extension {
            if let Some(s) = self.pending_pax.as_deref().and_then(crate_pax_size) {
                size = s;
            }
        }
        if extension && size > self.limit {
            let what = if long_name {
                "a GNU long name"
            } else if long_link {
                "a GNU long link"
            } else {
                "a PAX header"
            };
            return Err(io::Error::other(Refused {
                what: format!("{what} of {}", bytes(size)),
                limit: bytes(self.limit),
                flag: "--max-header",
            }));
        }
        if pax {
            self.collecting = Some((Vec::with_capacity(size as usize), self.pos + size));
        } else if !(long_name || long_link) {
            // The crate hands the records to this entry and forgets them.
            self.current_pax = self.pending_pax.take();
        }
        let sparse_extended =
            kind.is_gnu_sparse() && header.as_gnu().is_some() && self.block[GNU_IS_EXTENDED] == 1;
        if sparse_extended {
            self.expect = Expect::SparseExtension(size);
            self.next_block = self.pos;
        } else {
            self.skip_data(size);
        }
        Ok(())
    }

    fn sparse_extension(&mut self, size: u64) {
        if self.block[GNU_EXT_IS_EXTENDED] != 1 {
            self.expect = Expect::Header;
            self.skip_data(size);
        }
    }

    /// The next header follows `size` bytes of data, rounded up to a block.
    fn skip_data(&mut self, size: u64) {
        match size
            .checked_add(BLOCK - 1)
            .and_then(|s| self.pos.checked_add(s & !(BLOCK - 1)))
        {
            Some(next) => {
                self.next_block = next;
                self.expect = Expect::Header;
            }
            // The crate refuses the size as an overflow.
            None => self.expect = Expect::Done,
        }
    }
}

/// The `size` record as the `tar` crate finds it (its line-based parser, which gives up
/// at the first record it cannot parse), so the guard and the crate agree on where the
/// entry's data ends.
fn crate_pax_size(records: &[u8]) -> Option<u64> {
    for ext in tar::PaxExtensions::new(records) {
        let ext = ext.ok()?;
        if ext.key() != Ok("size") {
            continue;
        }
        return ext.value().ok()?.parse().ok();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::super::pax::pax_records;
    use super::*;

    fn archive(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        b.into_inner().unwrap()
    }

    fn file(b: &mut tar::Builder<Vec<u8>>, path: &str, body: &[u8]) {
        let mut h = tar::Header::new_gnu();
        h.set_size(body.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, path, body).unwrap();
    }

    /// Reads every entry through a guard; returns each path and its PAX records.
    fn read(tar_bytes: &[u8], limit: u64) -> io::Result<Vec<(String, Option<Vec<u8>>)>> {
        let (guard, headers) = HeaderGuard::new(tar_bytes, limit);
        let mut archive = tar::Archive::new(guard);
        let mut out = Vec::new();
        for entry in archive.entries()? {
            let mut entry = entry?;
            let path = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            io::copy(&mut entry, &mut io::sink())?;
            out.push((path, headers.current_pax()));
        }
        Ok(out)
    }

    #[test]
    fn long_names_and_pax_records_over_the_limit_are_refused() {
        let long = "n".repeat(5000);
        let tar = archive(|b| file(b, &long, b"x"));
        assert_eq!(read(&tar, 8192).unwrap()[0].0, long);
        let err = read(&tar, 4096).unwrap_err().to_string();
        assert!(
            err.contains("GNU long name") && err.contains("--max-header"),
            "{err}"
        );

        let tar = archive(|b| {
            b.append_pax_extensions([("comment", &vec![b'c'; 9000][..])])
                .unwrap();
            file(b, "f", b"x");
        });
        let err = read(&tar, 4096).unwrap_err().to_string();
        assert!(err.contains("PAX header"), "{err}");
    }

    /// A PAX `size` (how files over 8 GiB are written, the header's field 0) moves the
    /// next header as it moves the crate's: a long name after it is still seen.
    #[test]
    fn a_pax_size_moves_the_next_header() {
        let tar = archive(|b| {
            b.append_pax_extensions([("size", &b"1000"[..])]).unwrap();
            let mut h = tar::Header::new_gnu();
            h.set_path("big").unwrap();
            h.set_size(0);
            h.set_entry_type(tar::EntryType::Regular);
            h.set_cksum();
            b.append(&h, &[9u8; 1000][..]).unwrap();
            file(b, &"a".repeat(5000), b"after");
        });
        let entries = read(&tar, 8192).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[1].0.len(), 5000);
        let err = read(&tar, 4096).unwrap_err().to_string();
        assert!(err.contains("GNU long name of 5001 bytes"), "{err}");
    }

    #[test]
    fn each_entry_gets_its_own_pax_records_with_binary_values() {
        let value = [1u8, b'\n', 0, 255, b'\n'];
        let tar = archive(|b| {
            file(b, "a", &[7; 700]);
            b.append_pax_extensions([("SCHILY.xattr.security.ima", &value[..])])
                .unwrap();
            file(b, "b", b"body");
            file(b, &"l".repeat(300), b"");
            file(b, "c", b"");
        });
        let entries = read(&tar, 1 << 20).unwrap();
        let names: Vec<&str> = entries.iter().map(|(p, _)| &p[..p.len().min(3)]).collect();
        assert_eq!(names, ["a", "b", "lll", "c"]);
        assert!(entries[0].1.is_none() && entries[2].1.is_none() && entries[3].1.is_none());
        let records = entries[1].1.clone().unwrap();
        let parsed = pax_records(&records).unwrap();
        assert_eq!(
            parsed,
            vec![(&b"SCHILY.xattr.security.ima"[..], &value[..])]
        );
    }
}
