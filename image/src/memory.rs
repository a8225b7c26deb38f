//! An image set in memory: [`MemImages`] of [`MemImage`]s. For tests of a frontend (its
//! unit tests and the conformance suite, which runs the same operations through every
//! door over these and over the daemon's images), and as the smallest complete example
//! of the traits.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::image::{Extent, PrefetchImage, ReadImage, SparseImage, WriteImage};
use crate::set::{Images, Kind, Listing, OpenError};
use crate::slices::FileSlices;

/// The unit a [`MemImage`] tracks allocation in (as the daemon's overlays do).
pub const MEM_BLOCK_SIZE: u64 = 4096;

/// One image in memory: its bytes and which [`MEM_BLOCK_SIZE`] blocks are allocated.
/// Trims and write-zeroes zero their range and make the whole blocks in it holes;
/// an allocated write-zeroes keeps them allocated.
#[derive(Debug)]
pub struct MemImage {
    writable: bool,
    state: Mutex<MemState>,
    flushes: AtomicU64,
}

#[derive(Debug)]
struct MemState {
    bytes: Vec<u8>,
    /// One flag per block, the last one possibly partial.
    allocated: Vec<bool>,
}

impl MemImage {
    /// An image holding `bytes`; blocks that are all zeroes start as holes (as a
    /// template's zero chunks, which are never stored).
    pub fn new(bytes: Vec<u8>, writable: bool) -> MemImage {
        let allocated = bytes
            .chunks(MEM_BLOCK_SIZE as usize)
            .map(|block| block.iter().any(|&b| b != 0))
            .collect();
        MemImage {
            writable,
            state: Mutex::new(MemState { bytes, allocated }),
            flushes: AtomicU64::new(0),
        }
    }

    /// A copy of every byte.
    pub fn contents(&self) -> Vec<u8> {
        self.state().bytes.clone()
    }

    /// Flushes so far.
    pub fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }

    fn state(&self) -> MutexGuard<'_, MemState> {
        // Every update is one step on plain data: a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `[offset, offset + len)` as a `usize` range inside the image, or EINVAL.
    fn range(&self, offset: u64, len: u64) -> io::Result<std::ops::Range<usize>> {
        let size = self.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(offset as usize..end as usize),
            _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(libc::EROFS))
        }
    }

    /// Zeroes the range; whole blocks in it become holes unless `allocate`.
    fn zero(&self, offset: u64, len: u64, allocate: bool) -> io::Result<()> {
        self.check_writable()?;
        let range = self.range(offset, len)?;
        let mut state = self.state();
        let size = state.bytes.len() as u64;
        state.bytes[range.clone()].fill(0);
        let (start, end) = (range.start as u64, range.end as u64);
        for block in start / MEM_BLOCK_SIZE..end.div_ceil(MEM_BLOCK_SIZE) {
            let whole = block * MEM_BLOCK_SIZE >= start
                && ((block + 1) * MEM_BLOCK_SIZE <= end || end == size);
            if allocate {
                state.allocated[block as usize] = true;
            } else if whole {
                state.allocated[block as usize] = false;
            }
        }
        Ok(())
    }
}

impl ReadImage for MemImage {
    fn size(&self) -> u64 {
        self.state().bytes.len() as u64
    }

    fn block_size(&self) -> u32 {
        MEM_BLOCK_SIZE as u32
    }

    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let range = self.range(offset, buf.len() as u64)?;
        buf.copy_from_slice(&self.state().bytes[range]);
        Ok(())
    }

    /// A range that lies wholly in holes is a run of zeroes (so a frontend can send it
    /// as a hole); data lives in no file, so any other range is copied.
    fn resident_pieces(&self, offset: u64, len: u32, out: &mut FileSlices) -> bool {
        let Ok(range) = self.range(offset, u64::from(len)) else {
            return false;
        };
        if range.is_empty() {
            return false;
        }
        let state = self.state();
        let first = range.start as u64 / MEM_BLOCK_SIZE;
        let last = (range.end as u64 - 1) / MEM_BLOCK_SIZE;
        let all_holes = (first..=last).all(|block| !state.allocated[block as usize]);
        all_holes && out.push_zeroes(len)
    }
}

impl WriteImage for MemImage {
    fn writable(&self) -> bool {
        self.writable
    }

    /// Every opener shares the one image, and writes are visible at once.
    fn shared(&self) -> bool {
        true
    }

    async fn write_at(&self, offset: u64, data: &[u8], _fua: bool) -> io::Result<()> {
        self.check_writable()?;
        let range = self.range(offset, data.len() as u64)?;
        let mut state = self.state();
        state.bytes[range.clone()].copy_from_slice(data);
        if !range.is_empty() {
            let first = range.start as u64 / MEM_BLOCK_SIZE;
            let last = (range.end as u64 - 1) / MEM_BLOCK_SIZE;
            for block in first..=last {
                state.allocated[block as usize] = true;
            }
        }
        Ok(())
    }

    async fn flush(&self) -> io::Result<()> {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

impl SparseImage for MemImage {
    async fn trim(&self, offset: u64, len: u64, _fua: bool) -> io::Result<()> {
        self.zero(offset, len, false)
    }

    async fn write_zeroes(&self, offset: u64, len: u64, _fua: bool) -> io::Result<()> {
        self.zero(offset, len, false)
    }

    async fn write_zeroes_allocated(&self, offset: u64, len: u64, _fua: bool) -> io::Result<()> {
        self.zero(offset, len, true)
    }

    async fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        let state = self.state();
        let end = offset.saturating_add(len).min(state.bytes.len() as u64);
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let block = pos / MEM_BLOCK_SIZE;
            let next = ((block + 1) * MEM_BLOCK_SIZE).min(end);
            let hole = !state.allocated[block as usize];
            match out.last_mut() {
                Some(last) if last.hole == hole => last.length += next - pos,
                _ => out.push(Extent {
                    length: next - pos,
                    hole,
                    zero: hole,
                }),
            }
            pos = next;
        }
        Ok(out)
    }
}

impl PrefetchImage for MemImage {}

/// A set of named [`MemImage`]s. Every open of a name shares its one image.
#[derive(Debug, Default)]
pub struct MemImages {
    images: Mutex<BTreeMap<String, (Kind, Arc<MemImage>)>>,
    opens: AtomicU64,
}

impl MemImages {
    pub fn new() -> MemImages {
        MemImages::default()
    }

    /// Adds (or replaces) `name`: a template is read-only, a sandbox read-write.
    pub fn insert(&self, kind: Kind, name: &str, bytes: Vec<u8>) -> Arc<MemImage> {
        let image = Arc::new(MemImage::new(bytes, kind == Kind::Sandbox));
        self.all().insert(name.to_string(), (kind, image.clone()));
        image
    }

    /// Removes `name`; images already open keep working.
    pub fn remove(&self, name: &str) -> bool {
        self.all().remove(name).is_some()
    }

    /// The image called `name`, if any (without counting an open).
    pub fn get(&self, name: &str) -> Option<Arc<MemImage>> {
        self.all().get(name).map(|(_, image)| image.clone())
    }

    /// Opens so far, by any door.
    pub fn opens(&self) -> u64 {
        self.opens.load(Ordering::Relaxed)
    }

    fn all(&self) -> MutexGuard<'_, BTreeMap<String, (Kind, Arc<MemImage>)>> {
        self.images.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Images for MemImages {
    type Image = MemImage;

    async fn open(&self, name: &str, _user: &str) -> Result<Arc<MemImage>, OpenError> {
        let image = self.get(name).ok_or(OpenError::Unknown)?;
        self.opens.fetch_add(1, Ordering::Relaxed);
        Ok(image)
    }

    fn open_local(&self, kind: Kind, name: &str, _user: &str) -> Result<Arc<MemImage>, OpenError> {
        match self.all().get(name) {
            Some((found, image)) if *found == kind => {
                self.opens.fetch_add(1, Ordering::Relaxed);
                Ok(image.clone())
            }
            _ => Err(OpenError::Unknown),
        }
    }

    async fn list(&self) -> Vec<Listing> {
        self.all()
            .iter()
            .map(|(name, (kind, _))| Listing {
                name: name.clone(),
                kind: *kind,
                description: match kind {
                    Kind::Template => "template (read-only)".to_string(),
                    Kind::Sandbox => "sandbox (read-write)".to_string(),
                },
            })
            .collect()
    }

    fn list_local(&self, kind: Kind) -> Vec<String> {
        self.all()
            .iter()
            .filter(|(_, (k, _))| *k == kind)
            .map(|(name, _)| name.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> MemImage {
        let mut bytes = vec![0u8; 4 * MEM_BLOCK_SIZE as usize];
        bytes[MEM_BLOCK_SIZE as usize] = 1;
        MemImage::new(bytes, true)
    }

    async fn holes(image: &MemImage) -> Vec<(u64, bool)> {
        let extents = image.extents(0, image.size()).await.expect("extents");
        extents.iter().map(|e| (e.length, e.hole)).collect()
    }

    #[tokio::test]
    async fn zero_blocks_start_as_holes_and_writes_allocate() {
        let image = image();
        assert_eq!(
            holes(&image).await,
            [(4096, true), (4096, false), (8192, true)]
        );
        image
            .write_at(3 * 4096 + 10, b"abc", false)
            .await
            .expect("write");
        assert_eq!(
            holes(&image).await,
            [(4096, true), (4096, false), (4096, true), (4096, false)]
        );
        let mut buf = [0u8; 3];
        image.read_at(3 * 4096 + 10, &mut buf).await.expect("read");
        assert_eq!(&buf, b"abc");
    }

    #[tokio::test]
    async fn zeroing_makes_whole_blocks_holes_and_keeps_partial_ones() {
        let image = MemImage::new(vec![7u8; 3 * MEM_BLOCK_SIZE as usize], true);
        image
            .write_zeroes(100, 2 * 4096, false)
            .await
            .expect("zero");
        assert_eq!(
            holes(&image).await,
            [(4096, false), (4096, true), (4096, false)]
        );
        let bytes = image.contents();
        assert!(bytes[100..100 + 2 * 4096].iter().all(|&b| b == 0));
        assert_eq!(bytes[99], 7);
        image
            .write_zeroes_allocated(4096, 4096, false)
            .await
            .expect("zero");
        assert_eq!(holes(&image).await, [(3 * 4096, false)]);
    }

    #[tokio::test]
    async fn read_only_images_refuse_writes_and_ranges_are_checked() {
        let image = MemImage::new(vec![1u8; 4096], false);
        let error = image.write_at(0, b"x", false).await.expect_err("read-only");
        assert_eq!(error.raw_os_error(), Some(libc::EROFS));
        let mut buf = [0u8; 2];
        let error = image
            .read_at(4095, &mut buf)
            .await
            .expect_err("past the end");
        assert_eq!(error.raw_os_error(), Some(libc::EINVAL));
    }

    #[tokio::test]
    async fn a_range_of_holes_is_offered_as_zeroes() {
        let image = image();
        let mut pieces = FileSlices::default();
        assert!(image.resident_pieces(2 * 4096, 8192, &mut pieces));
        assert!(pieces.has_zeroes() && pieces.len() == 8192);
        let mut pieces = FileSlices::default();
        assert!(
            !image.resident_pieces(0, 8192, &mut pieces),
            "data is copied"
        );
    }

    #[tokio::test]
    async fn opens_share_one_image_and_kinds_are_kept_apart() {
        let images = MemImages::new();
        images.insert(Kind::Sandbox, "sb", vec![0u8; 4096]);
        images.insert(Kind::Template, "t", vec![1u8; 4096]);
        let a = images.open("sb", "a").await.expect("open");
        let b = images.open_local(Kind::Sandbox, "sb", "b").expect("open");
        a.write_at(0, b"z", false).await.expect("write");
        assert_eq!(b.contents()[0], b'z');
        assert!(images.open_local(Kind::Sandbox, "t", "c").is_err());
        assert!(!images.open("t", "d").await.expect("open").writable());
        assert_eq!(images.list_local(Kind::Template), ["t"]);
        assert_eq!(images.list().await.len(), 2);
        assert!(matches!(
            images.open("nope", "e").await,
            Err(OpenError::Unknown)
        ));
    }
}
