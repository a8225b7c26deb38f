//! The image a publish reads: its size and, for ext4, its block size (the kernel mounts
//! only 4096-byte blocks from a device with 4096-byte blocks).

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use lazyblk_cache::manifest::BLOCK_SIZE;

use super::PublishError;

/// Offset of the ext4 superblock.
const EXT4_SUPERBLOCK: u64 = 1024;
/// `s_log_block_size` (block size = 1024 << value), relative to the superblock.
const EXT4_LOG_BLOCK_SIZE: usize = 24;
/// `s_magic`, relative to the superblock.
const EXT4_MAGIC_OFFSET: usize = 56;
const EXT4_MAGIC: u16 = 0xEF53;
/// The only ext4 block size the kernel mounts from a device with 4096-byte blocks.
const REQUIRED_BLOCK_SIZE: u64 = 4096;
/// Checks the image and returns its size: a non-zero multiple of 4096, and, when it
/// is ext4, 4096-byte blocks. Other content is published with a warning.
pub(super) fn inspect_image(path: &Path) -> Result<u64, PublishError> {
    let open = |source| PublishError::Open {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(open)?;
    let size = file.metadata().map_err(open)?.len();
    if size == 0 || size % BLOCK_SIZE != 0 {
        return Err(PublishError::Size {
            path: path.to_path_buf(),
            size,
            suggested: size.div_ceil(BLOCK_SIZE).max(1) * BLOCK_SIZE,
        });
    }
    let mut superblock = [0u8; 64];
    let read = file
        .seek(SeekFrom::Start(EXT4_SUPERBLOCK))
        .and_then(|_| file.read_exact(&mut superblock));
    let magic = read.ok().map(|()| {
        u16::from_le_bytes([
            superblock[EXT4_MAGIC_OFFSET],
            superblock[EXT4_MAGIC_OFFSET + 1],
        ])
    });
    if magic != Some(EXT4_MAGIC) {
        eprintln!(
            "warning: {} is not an ext4 image (no ext4 superblock); publishing its bytes as they are",
            path.display()
        );
        return Ok(size);
    }
    let log = u32::from_le_bytes([
        superblock[EXT4_LOG_BLOCK_SIZE],
        superblock[EXT4_LOG_BLOCK_SIZE + 1],
        superblock[EXT4_LOG_BLOCK_SIZE + 2],
        superblock[EXT4_LOG_BLOCK_SIZE + 3],
    ]);
    let block_size = 1024u64.checked_shl(log).unwrap_or(0);
    if block_size != REQUIRED_BLOCK_SIZE {
        return Err(PublishError::BlockSize {
            path: path.to_path_buf(),
            block_size,
        });
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn image_with_superblock(log_block_size: u32, magic: u16) -> tempfile::NamedTempFile {
        let mut data = vec![0u8; 8192];
        let sb = EXT4_SUPERBLOCK as usize;
        data[sb + EXT4_LOG_BLOCK_SIZE..sb + EXT4_LOG_BLOCK_SIZE + 4]
            .copy_from_slice(&log_block_size.to_le_bytes());
        data[sb + EXT4_MAGIC_OFFSET..sb + EXT4_MAGIC_OFFSET + 2]
            .copy_from_slice(&magic.to_le_bytes());
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&data).unwrap();
        f
    }

    #[test]
    fn block_size_is_checked() {
        let ok = image_with_superblock(2, EXT4_MAGIC);
        assert_eq!(inspect_image(ok.path()).unwrap(), 8192);
        let small = image_with_superblock(0, EXT4_MAGIC);
        let err = inspect_image(small.path()).unwrap_err().to_string();
        assert!(
            err.contains("1024-byte blocks") && err.contains("mkfs.ext4 -b 4096"),
            "{err}"
        );
        let raw = image_with_superblock(0, 0);
        assert_eq!(inspect_image(raw.path()).unwrap(), 8192);
    }
}
